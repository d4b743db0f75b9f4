"""The brain/knee classifier stage (docs/pipeline.md 4.6), with the team's bugs fixed.

The loss is the team's BCE-with-logits on one-hot targets by default (``classifier.loss: bce``; ``ce``
for cross-entropy) and the best checkpoint is the lowest validation loss, ties to the higher accuracy
(the team's rule; ``classifier.select: val_accuracy`` keeps the highest accuracy, ties to the lower loss).

Fixed on purpose: slices are standardised (the team fed raw ~1e-4 values); the best epoch starts
from "nothing seen" rather than a loss of 1.0 (the team's first epoch, at loss 4.37, could never be
saved); the weight penalty is named for what it is (squared L2). The inverted split of the team
(train on ``val``, validate on ``train``) is the default of ``classifier.train_split`` /
``classifier.val_split``; file-level decisions sum the slice logits.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from recon.data.dataset import ImageSliceDataset
from recon.data.layout import data_fingerprint, discover_split
from recon.engine.checkpoint import Checkpoint, load_state_strict
from recon.engine.loop import DivergenceError, StageHooks
from recon.engine.stage import StageConfig
from recon.errors import InputError
from recon.events import Divergence, Panel
from recon.models.classifier import LossKind, SliceClassifier, slice_losses
from recon.seeding import derive_seed, determinism_flags, worker_init_fn

log = logging.getLogger(__name__)


def _dataset(cfg: StageConfig, split: str) -> tuple[ImageSliceDataset, list]:
    pairs = discover_split(cfg.data.root, split)
    return ImageSliceDataset(pairs, key=cfg.classifier.image_key), pairs


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([int(s.label) for s in samples], dtype=torch.long)
    return images, labels, [s.fname for s in samples]


@torch.no_grad()
def _evaluate(model: SliceClassifier, loader: DataLoader, device: torch.device, loss: LossKind) -> dict[str, float]:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    file_logits: dict[str, torch.Tensor] = {}
    file_label: dict[str, int] = {}
    for images, labels, names in loader:
        logits = model(images.to(device)).float().cpu()
        loss_sum += float(slice_losses(logits, labels, loss).sum())
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
        for name, row, label in zip(names, logits, labels.tolist()):
            file_logits[name] = file_logits.get(name, torch.zeros_like(row)) + row
            file_label[name] = label
    files_right = sum(int(int(file_logits[n].argmax()) == file_label[n]) for n in file_logits)
    return {
        "val/loss": loss_sum / max(total, 1),
        "val/accuracy": correct / max(total, 1),
        "val/errors": float(total - correct),
        "val/file_accuracy": files_right / max(len(file_logits), 1),
        "val/slices": float(total),
    }


class ClassifierStage(StageHooks):
    """The hooks of the classifier stage: best checkpoint by ``classifier.select`` (see the module docstring)."""

    def __init__(self, cfg: StageConfig, resolved: dict[str, Any]) -> None:
        super().__init__(cfg, resolved)
        self.train_ds, self.train_pairs = _dataset(cfg, cfg.classifier.train_split)
        self.val_ds, self.val_pairs = _dataset(cfg, cfg.classifier.val_split)
        self.model = SliceClassifier(cfg.classifier_model)
        self.checkpoint_family = None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.best_loss = math.inf
        self.slices = 0

    def init_weights(self, donor: Checkpoint) -> None:
        """Weights of another classifier checkpoint."""
        if donor.kind != "classifier":
            raise InputError(f"{donor.source}: a {donor.kind} checkpoint cannot initialise a classifier stage")
        load_state_strict(self.model, donor.model, donor.source)

    def resumed(self, checkpoint: Checkpoint) -> None:
        """The best epoch's validation loss (the tie-breaker) from the checkpoint's metrics."""
        self.best_loss = float(checkpoint.metrics.get("best_val_loss", math.inf))

    def prepare(self, start: int) -> None:
        """The validation loader (the training loader is built every epoch: its order depends on it)."""
        self.val_loader = DataLoader(self.val_ds, batch_size=self.cfg.classifier.batch_size, shuffle=False,
                                     collate_fn=_collate)

    def start_fields(self) -> dict[str, Any]:
        """StageStart fields of the classifier stage."""
        cfg = self.cfg
        return {
            "family": None, "seeds": {"stage": cfg.seed, "model": cfg.classifier_model.seed},
            "data_fingerprint": {**data_fingerprint(self.train_pairs + self.val_pairs),
                                 "val_digest": data_fingerprint(self.val_pairs)["digest"]},
            "param_count": sum(p.numel() for p in self.params),
            "determinism": {**determinism_flags(), "deterministic": cfg.deterministic},
        }

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One shuffled pass over the training slices; ``train/loss`` includes the weight penalty."""
        cfg, model, device = self.cfg, self.model, self.device
        order = np.random.default_rng(derive_seed(cfg.seed, "shuffle", epoch)).permutation(len(self.train_ds)).tolist()
        loader = DataLoader(self.train_ds, batch_size=cfg.classifier.batch_size, sampler=order,
                            num_workers=cfg.data.num_workers, collate_fn=_collate,
                            worker_init_fn=worker_init_fn if cfg.data.num_workers else None)
        model.train()
        losses: list[float] = []
        for images, labels, _ in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = model(images.to(device))
            loss = slice_losses(logits, labels.to(device), cfg.classifier.loss).mean()
            if cfg.classifier.weight_penalty:
                loss = loss + cfg.classifier.weight_penalty * sum(p.square().sum() for p in self.params)
            if not torch.isfinite(loss):
                raise DivergenceError(Divergence(epoch, len(losses), "non-finite loss", float(loss.detach())))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        self.slices = len(order)
        return {"train/loss": float(np.mean(losses)) if losses else math.nan}

    def trained_slices(self, train_metrics: dict[str, float]) -> float:
        """The slices of the last training epoch."""
        return float(self.slices)

    def validate_epoch(self, epoch: int, panels: bool) -> tuple[dict[str, float], tuple[Panel, ...]]:
        """Slice and file accuracy on the validation split (no panels)."""
        return _evaluate(self.model, self.val_loader, self.device, self.cfg.classifier.loss), ()

    def schedule_metrics(self, epoch: int, lr: float) -> dict[str, float]:
        """``lr``."""
        return {"lr": lr}

    def score(self, metrics: dict[str, float]) -> float:
        """``val/accuracy``."""
        return metrics["val/accuracy"]

    def record_best(self, metrics: dict[str, float], best: float) -> bool:
        """By ``classifier.select``: lower loss (ties: higher accuracy) or higher accuracy (ties: lower
        loss); remembers the loss when it is better. ``best`` is the accuracy of the best epoch so far."""
        if self.cfg.classifier.select == "val_loss":
            improved = (-metrics["val/loss"], metrics["val/accuracy"]) > (-self.best_loss, best)
        else:
            improved = (metrics["val/accuracy"], -metrics["val/loss"]) > (best, -self.best_loss)
        if improved:
            self.best_loss = metrics["val/loss"]
        return improved

    def best_metrics(self, best: float) -> dict[str, float]:
        """``best_val_accuracy`` and its ``best_val_loss``."""
        return {"best_val_accuracy": best, "best_val_loss": self.best_loss}

    def model_config(self) -> dict[str, Any]:
        """``ClassifierConfig.to_dict()``."""
        return self.cfg.classifier_model.to_dict()
