"""The stage loop and the typed checkpoint: one divergence path for every stage, lossless payloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon.engine.checkpoint import FORMAT, Checkpoint, save_checkpoint
from recon.engine.loop import DivergenceError
from recon.engine.trainer import run_stage
from recon.events import Divergence
from tests.recon.engine.test_engine import Recorder, _stage

LEGACY = Path(__file__).resolve().parents[2] / "data" / "legacy" / "hacker_baseline_epoch0_last.pt"


class DivergenceRecorder(Recorder):
    """Also keeps the divergence event."""

    def __init__(self) -> None:
        super().__init__()
        self.divergences: list[Divergence] = []

    def on_divergence(self, event: Divergence) -> None:
        self.divergences.append(event)


def test_classifier_divergence_is_a_divergence_error(tiny_data: Path, tmp_path: Path) -> None:
    # a huge weight penalty overflows the float32 loss to inf on the first step
    cfg, resolved = _stage("classifier", tiny_data, tmp_path / "cls", "train.epochs=1",
                           "classifier.weight_penalty=1.0e+300")
    rec = DivergenceRecorder()
    with pytest.raises(DivergenceError, match="non-finite loss"):
        run_stage(cfg, resolved, rec)
    assert [(d.epoch, d.step) for d in rec.divergences] == [(0, 0)]
    assert [e.status for e in rec.ends] == ["diverged"]


def test_checkpoint_payload_round_trip_keeps_every_key_and_value(tmp_path: Path) -> None:
    stored = torch.load(LEGACY, weights_only=True)
    checkpoint = Checkpoint.from_payload(stored, path=LEGACY)
    assert checkpoint.kind == "baseline" and checkpoint.epoch == 0 and checkpoint.source == str(LEGACY)
    assert checkpoint.run_id is None and checkpoint.optimizer is not None and checkpoint.rng
    again = checkpoint.to_payload()
    # the one key added since: the metric of best_metric, for an old file the val/ssim selection used then
    assert again.pop("best_metric_name") == "val/ssim" and "best_metric_name" not in stored
    assert list(again) == list(stored)  # same keys, same order
    assert again["format"] == FORMAT and again["versions"] == stored["versions"]
    assert all(torch.equal(again["model"][k], stored["model"][k]) for k in stored["model"])
    assert again["config"] == stored["config"] and again["metrics"] == stored["metrics"]
    written = torch.load(save_checkpoint(tmp_path / "again.pt", checkpoint), weights_only=True)
    assert [k for k in written if k != "best_metric_name"] == list(stored) and written["rng"].keys() == stored["rng"].keys()
    assert written["optimizer"]["param_groups"] == stored["optimizer"]["param_groups"]


def test_exported_weights_keep_no_optimizer_or_rng() -> None:
    exported = Checkpoint.from_payload(torch.load(LEGACY, weights_only=True)).exported()
    payload = exported.to_payload()
    assert payload["optimizer"] is None and "rng" not in payload and "path" not in payload
