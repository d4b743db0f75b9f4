"""A checkpoint written before the typed ``Checkpoint`` still resumes, and repeats the old run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recon.engine.checkpoint import load_checkpoint
from recon.engine.stage import load_stage_config
from recon.engine.trainer import run_stage
from tests.recon.engine.test_engine import Recorder

LEGACY = Path(__file__).resolve().parents[2] / "data" / "legacy"
# figures that depend on the machine, not on the computation
UNSTABLE = ("time/", "throughput/", "memory/")
# the stored metrics were recorded under the names of the time; the same figures' names now
RENAMED = {
    "p_mask": "schedule/p_remask", "p_aug": "schedule/p_aug",
    "memory/peak_mb": "memory/cpu_rss_peak_mb", "memory/probe_mb": "memory/probe_predicted_mb",
    "val/ssim_acc4": "val/ssim/acc4", "train/augmented_fraction": "train/augmented_share",
    **{f"train/mask_{kind}_fraction": f"train/mask_share/{kind}" for kind in ("file", "public", "equispaced", "random")},
}


def test_old_checkpoint_resumes_exactly(tiny_data: Path, tmp_path: Path) -> None:
    stored = LEGACY / "hacker_baseline_epoch0_last.pt"
    stored_metrics = json.loads((LEGACY / "hacker_baseline_epoch1_metrics.json").read_text())
    expected = {RENAMED.get(key, key): value for key, value in stored_metrics.items()}
    # p_mask was the schedule's value (0, ignored by the Hacker); p_remask is what the Hacker does
    assert expected["schedule/p_remask"] == 0.0
    expected["schedule/p_remask"] = 1.0
    old = load_checkpoint(stored)
    assert old["epoch"] == 0 and old["kind"] == "baseline"
    cfg, resolved = load_stage_config(data=old["config"],
                                      overrides=[f"data.root={tiny_data}", f"output.dir={tmp_path / 'resumed'}"])
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore what it needs
    rec = Recorder()
    end = run_stage(cfg, resolved, rec, resume=stored)
    assert end.status == "finished" and [e.epoch for e in rec.epochs] == [1]
    got = rec.epochs[0].metrics
    # the same metric names, plus the re-masked validation added since (not in the old config: on by default)
    added = {k for k in got if k.startswith(("val_remasked/", "best_val_remasked_"))}
    assert "val_remasked/ssim" in added and set(got) - added == set(expected)
    for key, value in expected.items():
        if not key.startswith(UNSTABLE):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_a_stored_configuration_is_upgraded_to_what_it_ran_with() -> None:
    """Renamed keys take their new name; settings added since keep the behaviour the old stage had."""
    from recon.engine.stage import upgrade_stored_config

    stored = {"mraugment": {"strength": 1.5, "enabled": True}, "classifier": {"epochs": 3}}
    upgraded = upgrade_stored_config(stored)
    assert upgraded["mraugment"] == {"enabled": True, "magnitude": 1.5}
    assert upgraded["classifier"] == {"epochs": 3, "loss": "ce", "select": "val_accuracy"}
    assert stored["mraugment"] == {"strength": 1.5, "enabled": True}  # the input is not modified
    today = {"mraugment": {"magnitude": 1.0}, "classifier": {"loss": "bce", "select": "val_loss"}}
    assert upgrade_stored_config(today) == today
