"""The training engine on the tiny synthetic data: stages run, resume is exact, bad configs fail."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recon.engine.checkpoint import load_checkpoint
from recon.engine.stage import load_stage_config
from recon.engine.trainer import run_stage
from recon.errors import InputError
from recon.events import Callback, CheckpointSaved, EpochEnd, StageEnd, StageStart

EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"
FAST = ["data.max_train_slices=3", "data.max_val_slices=4", "train.panel_slices=1"]


class Recorder(Callback):
    """Keeps every event (the engine's contract with the platform)."""

    name = "recorder"

    def __init__(self) -> None:
        self.starts: list[StageStart] = []
        self.epochs: list[EpochEnd] = []
        self.checkpoints: list[CheckpointSaved] = []
        self.ends: list[StageEnd] = []

    def on_stage_start(self, event: StageStart) -> None:
        self.starts.append(event)

    def on_epoch_end(self, event: EpochEnd) -> None:
        self.epochs.append(event)

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        self.checkpoints.append(event)

    def on_stage_end(self, event: StageEnd) -> None:
        self.ends.append(event)

    def state_dict(self) -> dict:
        return {"recorder_epochs": len(self.epochs)}


def _stage(name: str, tiny_data: Path, out: Path, *extra: str):
    overrides = [f"data.root={tiny_data}", f"output.dir={out}", *FAST, *extra]
    return load_stage_config(EXPERIMENTS / "tiny" / f"{name}.yaml", overrides)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")) + sorted((EXPERIMENTS / "tiny").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_file_loads(path):
    pipelines = ("pipeline.yaml", "demo.yaml", "final.yaml")
    if path.name in ("base.yaml", "overlay.yaml", *pipelines) or path.name.startswith("tune"):
        pytest.skip("not a stage file")  # base.yaml names no stage (test_safety_outputs refuses it alone)
    cfg, resolved = load_stage_config(path)
    assert resolved["stage"]["name"] == cfg.stage.name
    # the preset is expanded: every model field is in the resolved config
    assert "num_cascades" in resolved["model"] and "reduction" in resolved["model"]


def test_team_defaults_are_explicit():
    cfg, _ = load_stage_config(EXPERIMENTS / "hacker_moe.yaml")
    assert (cfg.model.num_cascades, cfg.model.reduction, cfg.model.n_history) == (8, 2, 3)
    assert cfg.train.start_epoch == 30 and cfg.lr.step_start == 45
    assert cfg.p_aug.start == 33 and cfg.p_aug.plateau == 50 and cfg.p_aug.p_max == 0.5
    assert cfg.mraugment.target == "label" and cfg.seed == 430
    helper, _ = load_stage_config(EXPERIMENTS / "helper_moe.yaml")
    assert helper.mask_aug.mode == "helper" and helper.mask_aug.exclude_public_from_epoch == 30


@pytest.mark.parametrize("override, message", [
    ("data.rooot=/x", "did you mean 'data.root'"),
    ("train.epochs=many", "train.epochs"),
    ("model.reduction=100", "reduction"),
    ("data.num_adj_slices=3", "num_adj_slices"),
])
def test_bad_config_is_refused_with_the_key(override, message):
    with pytest.raises(InputError, match=message):
        load_stage_config(EXPERIMENTS / "tiny" / "hacker_baseline.yaml", [override])


def test_baseline_emits_events_and_self_describing_checkpoints(tiny_data, tmp_path):
    cfg, resolved = _stage("hacker_baseline", tiny_data, tmp_path / "run", "train.epochs=2")
    rec = Recorder()
    end = run_stage(cfg, resolved, rec)
    assert end.status == "finished" and len(rec.starts) == 1 and len(rec.ends) == 1
    assert [e.epoch for e in rec.epochs] == [0, 1]
    metrics = rec.epochs[-1].metrics
    for key in ("train/loss", "val/ssim", "val/ssim/brain_acc4", "lr", "schedule/p_remask", "schedule/p_aug",
                "time/epoch_s", "throughput/slices_per_s", "memory/cpu_rss_peak_mb", "best_val_ssim"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["train/mask_share/public"] == 1.0  # Hacker: always the public pattern
    assert 0.0 < metrics["val/ssim"] <= 1.0
    assert rec.epochs[0].panels and rec.epochs[0].panels[0].output.shape == rec.epochs[0].panels[0].target.shape
    assert {c.kind for c in rec.checkpoints} >= {"last", "best"}
    payload = load_checkpoint(tmp_path / "run", which="last")  # weights_only=True inside
    assert payload["epoch"] == 1 and payload["config"] == resolved
    assert payload["tracking"] == {"recorder_epochs": 2}
    assert set(payload) >= {"model", "optimizer", "rng", "model_config", "best_metric", "best_epoch"}
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    full_cfg, full_res = _stage("helper_baseline", tiny_data, tmp_path / "full", "train.epochs=3")
    full = Recorder()
    run_stage(full_cfg, full_res, full)

    part_cfg, part_res = _stage("helper_baseline", tiny_data, tmp_path / "part", "train.epochs=2")
    run_stage(part_cfg, part_res, Recorder())
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore what it needs
    res_cfg, res_res = load_stage_config(data=load_checkpoint(tmp_path / "part", "last")["config"],
                                         overrides=["train.epochs=3"])
    resumed = Recorder()
    run_stage(res_cfg, res_res, resumed, resume=tmp_path / "part")
    assert [e.epoch for e in resumed.epochs] == [2]
    assert resumed.starts[0].start_epoch == 2 and resumed.starts[0].resume_state == {"recorder_epochs": 2}
    a, b = full.epochs[2].metrics, resumed.epochs[0].metrics
    for key in ("train/loss", "val/ssim", "lr", "schedule/p_remask", "train/mask_share/random"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_moe_from_baseline_steps_only_routed_experts(tiny_data, tmp_path):
    base_cfg, base_res = _stage("hacker_baseline", tiny_data, tmp_path / "base", "train.epochs=1")
    run_stage(base_cfg, base_res, Recorder())
    cfg, resolved = _stage("hacker_moe", tiny_data, tmp_path / "moe", "train.epochs=3",
                           f"init_from={tmp_path / 'base'}", "data.max_train_slices=1")
    rec = Recorder()
    run_stage(cfg, resolved, rec)
    assert rec.starts[0].init_from == str(tmp_path / "base")
    metrics = rec.epochs[-1].metrics
    groups = {k for k in metrics if k.startswith("val/ssim/") and not k.startswith("val/ssim/acc")}
    assert groups <= {f"val/ssim/{e}" for e in cfg.moe.experts}
    # one training slice: exactly one expert moved away from the shared initialisation
    payload = load_checkpoint(tmp_path / "moe", "last")
    donor = load_checkpoint(tmp_path / "base", "best")["model"]
    moved = set()
    for key, value in payload["model"].items():
        expert, rest = key.split(".")[1], ".".join(key.split(".")[2:])
        if not torch.equal(value, donor[rest]):
            moved.add(expert)
    assert len(moved) == 1
    assert payload["experts"] == list(cfg.moe.experts)
    # one optimizer state for all experts, not four copies
    assert isinstance(payload["optimizer"]["state"], dict)


def test_classifier_stage_reports_slice_and_file_accuracy(tiny_data, tmp_path):
    cfg, resolved = _stage("classifier", tiny_data, tmp_path / "cls", "train.epochs=1")
    rec = Recorder()
    end = run_stage(cfg, resolved, rec)
    metrics = rec.epochs[-1].metrics
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and 0.0 <= metrics["val/file_accuracy"] <= 1.0
    assert end.best_path is not None and load_checkpoint(end.best_path)["kind"] == "classifier"
