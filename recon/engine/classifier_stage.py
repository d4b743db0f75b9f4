"""The brain/knee classifier stage (docs/pipeline.md 4.6), with the team's bugs fixed.

Fixed on purpose: slices are standardised (the team fed raw ~1e-4 values); the best epoch starts
from "nothing seen" rather than a loss of 1.0 (the team's first epoch, at loss 4.37, could never be
saved); the weight penalty is named for what it is (squared L2). The inverted split of the team
(train on ``val``, validate on ``train``) is the default of ``classifier.train_split`` /
``classifier.val_split``; file-level decisions sum the slice logits.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from recon.engine.checkpoint import load_checkpoint, load_state_strict
from recon.models.classifier import SliceClassifier
from recon.config import dump_yaml
from recon.data.dataset import ImageSliceDataset
from recon.data.layout import data_fingerprint, discover_split
from recon.engine.runtime import peak_memory_mb, reset_peak_memory, select_device, write_checkpoint
from recon.engine.stage import StageConfig
from recon.errors import InputError
from recon.events import Callback, EpochEnd, StageEnd, StageStart
from recon.schedules import lr_at, set_lr
from recon.seeding import derive_seed, determinism_flags, restore_rng_state, worker_init_fn

log = logging.getLogger(__name__)


def _dataset(cfg: StageConfig, split: str) -> tuple[ImageSliceDataset, list]:
    pairs = discover_split(cfg.data.root, split)
    return ImageSliceDataset(pairs, key=cfg.classifier.image_key), pairs


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([int(s.label) for s in samples], dtype=torch.long)
    return images, labels, [s.fname for s in samples]


@torch.no_grad()
def _evaluate(model: SliceClassifier, loader: DataLoader, device: torch.device) -> dict[str, float]:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    file_logits: dict[str, torch.Tensor] = {}
    file_label: dict[str, int] = {}
    for images, labels, names in loader:
        logits = model(images.to(device)).float().cpu()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
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


def run_classifier_stage(
    cfg: StageConfig,
    resolved: dict[str, Any],
    callbacks: Callback,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
) -> StageEnd:
    """Train the slice classifier; best checkpoint on validation accuracy (ties: lower loss)."""
    device = select_device(cfg.train.device)
    out_dir = cfg.output_dir
    train_ds, train_pairs = _dataset(cfg, cfg.classifier.train_split)
    val_ds, val_pairs = _dataset(cfg, cfg.classifier.val_split)
    model = SliceClassifier(cfg.classifier_model)
    params = [p for p in model.parameters() if p.requires_grad]
    start, best, best_epoch, best_loss = cfg.train.start_epoch, -math.inf, None, math.inf
    resume_state: dict[str, Any] = {}
    init_state: dict[str, Any] = {}
    checkpoint = None
    source = init_from or cfg.init_from
    if resume is not None:
        checkpoint = load_checkpoint(resume, which="last")
        if checkpoint["kind"] != "classifier":
            raise InputError(f"{checkpoint['path']}: a {checkpoint['kind']} checkpoint cannot resume a classifier stage")
        load_state_strict(model, checkpoint["model"], checkpoint["path"])
        start = int(checkpoint["epoch"]) + 1
        best = float(checkpoint.get("best_metric", -math.inf))
        best_epoch = checkpoint.get("best_epoch")
        best_loss = float(checkpoint.get("metrics", {}).get("best_val_loss", math.inf))
        resume_state = dict(checkpoint.get("tracking") or {})
    elif source:
        donor = load_checkpoint(source, which="best")
        if donor["kind"] != "classifier":
            raise InputError(f"{donor['path']}: a {donor['kind']} checkpoint cannot initialise a classifier stage")
        load_state_strict(model, donor["model"], donor["path"])
        init_state = dict(donor.get("tracking") or {})
    model.to(device)
    optimizer = torch.optim.AdamW(params, lr=lr_at(cfg.lr, start), betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint.get("rng") or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(resolved, out_dir / "config.yaml")
    val_loader = DataLoader(val_ds, batch_size=cfg.classifier.batch_size, shuffle=False, collate_fn=_collate)
    callbacks.on_stage_start(StageStart(
        stage=cfg.stage.name, kind="classifier", family=None, config=resolved, seeds={"stage": cfg.seed,
        "model": cfg.classifier_model.seed}, data_root=str(cfg.data.root),
        data_fingerprint={**data_fingerprint(train_pairs + val_pairs),
                          "val_digest": data_fingerprint(val_pairs)["digest"]},
        param_count=sum(p.numel() for p in params), device=str(device),
        determinism={**determinism_flags(), "deterministic": cfg.deterministic}, start_epoch=start,
        epochs=cfg.train.epochs, output_dir=out_dir, resume_state=resume_state,
        init_from=str(source) if source else None, init_from_state=init_state,
    ))
    status, last_path, best_path = "failed", None, None
    try:
        for epoch in range(start, cfg.train.epochs):
            lr = lr_at(cfg.lr, epoch)
            set_lr(optimizer, lr)
            reset_peak_memory(device)
            t0 = time.perf_counter()
            order = np.random.default_rng(derive_seed(cfg.seed, "shuffle", epoch)).permutation(len(train_ds)).tolist()
            loader = DataLoader(train_ds, batch_size=cfg.classifier.batch_size, sampler=order,
                                num_workers=cfg.data.num_workers, collate_fn=_collate,
                                worker_init_fn=worker_init_fn if cfg.data.num_workers else None)
            model.train()
            losses: list[float] = []
            for images, labels, _ in loader:
                optimizer.zero_grad(set_to_none=True)
                logits = model(images.to(device))
                loss = F.cross_entropy(logits, labels.to(device))
                if cfg.classifier.weight_penalty:
                    loss = loss + cfg.classifier.weight_penalty * sum(p.square().sum() for p in params)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"classifier loss is not finite at epoch {epoch}")
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            train_s = time.perf_counter() - t0
            metrics = {"train/loss": float(np.mean(losses)) if losses else math.nan, "lr": lr}
            metrics.update(_evaluate(model, val_loader, device))
            improved = (metrics["val/accuracy"], -metrics["val/loss"]) > (best, -best_loss)
            if improved:
                best, best_loss, best_epoch = metrics["val/accuracy"], metrics["val/loss"], epoch
            metrics.update({
                "best_val_accuracy": best, "best_val_loss": best_loss,
                "time/epoch_s": time.perf_counter() - t0,
                "throughput/slices_per_s": len(order) / max(train_s, 1e-9),
                "memory/peak_mb": peak_memory_mb(device),
            })
            callbacks.on_epoch_end(EpochEnd(epoch=epoch, metrics=metrics))
            payload = {
                "kind": "classifier", "stage": cfg.stage.name, "family": None, "epoch": epoch, "config": resolved,
                "model_config": cfg.classifier_model.to_dict(), "experts": [], "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "best_metric": best, "best_epoch": best_epoch,
                "metrics": metrics,
            }
            last_path = write_checkpoint(callbacks, out_dir, "last", epoch, metrics["val/accuracy"], payload)
            if improved:
                best_path = write_checkpoint(callbacks, out_dir, "best", epoch, metrics["val/accuracy"], payload)
        status = "finished"
    finally:
        best_file = out_dir / "checkpoints" / "best.pt"
        end = StageEnd(status=status, best_metric=None if best == -math.inf else best, best_epoch=best_epoch,
                       best_path=best_path or (best_file if best_file.exists() else None), last_path=last_path,
                       output_dir=out_dir)
        callbacks.on_stage_end(end)
    return end
