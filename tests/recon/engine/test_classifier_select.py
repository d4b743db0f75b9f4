"""The classifier's loss (classifier.loss: bce|ce) and best-checkpoint rule (classifier.select).

The team trained with ``BCEWithLogits`` on one-hot targets and kept the epoch of the lowest
validation loss; both are the defaults. The tracked run is read back from its MLflow store and the
kept checkpoint compared with the epoch of the lowest logged ``val/loss``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from recon.engine.checkpoint import load_checkpoint
from recon.engine.classifier_stage import ClassifierStage
from recon.engine.stage import load_stage_config
from recon.errors import InputError
from recon.models.classifier import slice_losses

TINY = Path(__file__).resolve().parents[3] / "experiments" / "tiny"


def test_bce_is_the_teams_loss_and_ce_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-4.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    team = torch.nn.BCEWithLogitsLoss()(logits, onehot)
    assert torch.allclose(slice_losses(logits, labels, "bce").mean(), team)
    assert torch.allclose(slice_losses(logits, labels, "ce"), F.cross_entropy(logits, labels, reduction="none"))
    # not the same function: the same logits give different losses
    assert not torch.allclose(slice_losses(logits, labels, "bce"), slice_losses(logits, labels, "ce"))


def test_defaults_and_bad_values(tiny_data: Path) -> None:
    cfg, _ = load_stage_config(TINY / "classifier.yaml", [f"data.root={tiny_data}"])
    assert (cfg.classifier.loss, cfg.classifier.select) == ("bce", "val_loss")
    with pytest.raises(InputError, match=r"classifier\.select.*expected one of 'val_loss', 'val_accuracy'"):
        load_stage_config(TINY / "classifier.yaml", ["classifier.select=accuracy"])


def test_select_rules_on_a_sequence_of_epochs(tiny_data: Path) -> None:
    epochs = [{"val/loss": 0.5, "val/accuracy": 0.9}, {"val/loss": 0.3, "val/accuracy": 0.8},
              {"val/loss": 0.3, "val/accuracy": 0.85}, {"val/loss": 0.4, "val/accuracy": 0.95}]

    def kept(select: str) -> int:
        cfg, resolved = load_stage_config(TINY / "classifier.yaml", [f"data.root={tiny_data}",
                                                                     f"classifier.select={select}"])
        hooks, best, best_epoch = ClassifierStage(cfg, resolved), float("-inf"), -1
        for epoch, metrics in enumerate(epochs):
            if hooks.record_best(metrics, best):
                best, best_epoch = hooks.score(metrics), epoch
        return best_epoch

    assert kept("val_loss") == 2  # lowest loss, the tie to the higher accuracy
    assert kept("val_accuracy") == 3


def test_tracked_classifier_keeps_the_lowest_validation_loss(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tracking.runs.stores import resolve_stores
    from tracking.train import StageTracking, run_tracked_stage

    out = tmp_path / "cls"
    outcome = run_tracked_stage(TINY / "classifier.yaml", [f"data.root={tiny_data}", f"output.dir={out}",
                                                           "train.epochs=3"],
                                tracking=StageTracking("classifier-select"))
    assert outcome.status == "finished", outcome.error
    history = MlflowClient(resolve_stores().tracking_uri).get_metric_history(outcome.run_id, "val/loss")
    losses = {m.step: m.value for m in sorted(history, key=lambda m: m.step)}
    assert len(losses) == 3
    lowest = min(losses, key=lambda step: (losses[step], step))
    assert outcome.best_epoch == lowest
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["epoch"] == lowest and best["metrics"]["best_val_loss"] == pytest.approx(losses[lowest])
