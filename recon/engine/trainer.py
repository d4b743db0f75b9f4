"""The reconstruction stages: a baseline PromptMR+ or the 4-expert mixture.

``run_stage`` is the one entry point for every stage (the classifier stage is dispatched to
:mod:`recon.engine.classifier_stage`). It trains ``train.start_epoch .. train.epochs - 1`` with the
explicit schedules of :mod:`recon.schedules`, validates every epoch with the official metric,
writes self-describing ``last`` and ``best`` checkpoints, and reports through a
:class:`recon.events.Callback`.

Exact resume: the learning rate is a pure function of the epoch, every random draw of a sample
comes from ``(seed, epoch, index)``, and the shuffle order from ``(seed, epoch)``; a checkpoint
holds the weights, the optimizer state, the epoch, the best metric and the RNG streams, so a
resumed run repeats the uninterrupted run's later epochs.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from recon.engine.checkpoint import build_model, load_checkpoint, load_state_strict
from recon.config import dump_yaml
from recon.data.dataset import SliceDataset
from recon.data.layout import FilePair, data_fingerprint, discover_split, open_h5
from recon.engine import distributed as dist
from recon.engine.runtime import peak_memory_mb, reset_peak_memory, select_device, write_checkpoint
from recon.engine.stage import StageConfig
from recon.engine.transform import EpochDataset, StageTransform, TrainItem, collate_items
from recon.engine.validation import metrics_from_stats, panel_indices, validate
from recon.errors import InputError
from recon.events import Callback, ConsoleCallback, Divergence, EpochEnd, StageEnd, StageStart
from recon.data.names import EXPERTS
from recon.models.experts import MixtureOfExperts
from recon.fft import center_crop
from recon.losses import MaskedSSIMLoss, VolumeAreaCache
from recon.models.promptmr import PromptMR, count_parameters
from recon.schedules import lr_at, set_lr
from recon.seeding import derive_seed, determinism_flags, restore_rng_state, worker_init_fn

log = logging.getLogger(__name__)

STUCK_LOSS = 1.0 - 1e-4


class DivergenceError(RuntimeError):
    """Training diverged (NaN/inf loss, or the loss stuck at 1)."""

    def __init__(self, event: Divergence) -> None:
        super().__init__(f"training diverged at epoch {event.epoch}, step {event.step}: {event.reason}")
        self.event = event


@dataclass
class _Data:
    train: SliceDataset
    val: SliceDataset
    pairs: list[FilePair]
    fingerprint: dict[str, Any]


def _load_data(cfg: StageConfig) -> _Data:
    root = Path(cfg.data.root)
    train_pairs = [p for split in cfg.data.train_splits for p in discover_split(root, split)]
    val_pairs = discover_split(root, cfg.data.val_split)
    if cfg.data.use_val_for_final:
        # one shuffled pool of train + val (the team ran val as a second sequential pass)
        train_pairs = train_pairs + val_pairs
    adj = cfg.data.num_adj_slices
    train = SliceDataset(train_pairs, num_adj_slices=adj, load_target=True)
    val = SliceDataset(val_pairs, num_adj_slices=adj, load_target=True)
    all_pairs = train_pairs + ([] if cfg.data.use_val_for_final else val_pairs)
    fingerprint = data_fingerprint(all_pairs)
    # promotion compares models on the same validation data: keep that digest on its own
    fingerprint["val_digest"] = data_fingerprint(val_pairs)["digest"]
    return _Data(train, val, all_pairs, fingerprint)


def _fill_area_cache(cache: VolumeAreaCache, pairs: list[FilePair]) -> None:
    """Foreground areas of every training volume's labels (for the sqrt-area weight), read once."""
    for pair in pairs:
        if pair.name in cache or pair.image is None:
            continue
        with open_h5(pair.image) as f:
            cache.add_volume(pair.name, f["image_label"][()], pair.anatomy)


def _build_model(cfg: StageConfig) -> nn.Module:
    if cfg.stage.kind == "moe":
        return MixtureOfExperts(cfg.model, cfg.moe.experts)
    return PromptMR(cfg.model)


def _init_weights(cfg: StageConfig, model: nn.Module, source: str) -> dict[str, Any]:
    """Weights-only initialisation from another stage's checkpoint; returns its tracking state."""
    payload = load_checkpoint(source, which="best")
    donor = build_model(payload)
    if isinstance(model, MixtureOfExperts) and isinstance(donor, PromptMR):
        for name in model.names:
            load_state_strict(model.experts[name], donor.state_dict(), payload["path"])
    elif type(donor) is type(model):
        load_state_strict(model, donor.state_dict(), payload["path"])
    else:
        raise InputError(
            f"{payload['path']}: a {payload['kind']} checkpoint cannot initialise a {cfg.stage.kind} stage"
        )
    log.info("initialised weights from %s (epoch %s)", payload["path"], payload["epoch"])
    return dict(payload.get("tracking") or {})


def _order(cfg: StageConfig, n: int, epoch: int) -> list[int]:
    order = np.random.default_rng(derive_seed(cfg.seed, "shuffle", epoch)).permutation(n).tolist()
    if cfg.data.max_train_slices is not None:
        order = order[: cfg.data.max_train_slices]
    return order


def _loader(ds: EpochDataset, indices: list[int], cfg: StageConfig, epoch: int) -> DataLoader:
    ds.set_epoch(epoch)
    workers = cfg.data.num_workers
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        sampler=indices,
        num_workers=workers,
        collate_fn=collate_items,
        worker_init_fn=worker_init_fn if workers else None,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader", epoch)),
        persistent_workers=False,
    )


def _groups(items: list[TrainItem]) -> Iterator[list[TrainItem]]:
    """Items that can share one forward pass: same expert and same shapes."""
    buckets: dict[tuple, list[TrainItem]] = defaultdict(list)
    for item in items:
        buckets[(item.expert, tuple(item.masked_kspace.shape), tuple(item.target.shape))].append(item)
    yield from buckets.values()


class _Runner:
    """State of one stage invocation (model, optimizer, data, callbacks)."""

    def __init__(self, cfg: StageConfig, resolved: dict[str, Any], callbacks: Callback) -> None:
        self.cfg = cfg
        self.resolved = resolved
        self.callbacks = callbacks
        self.ctx = dist.context()
        self.device = select_device(cfg.train.device) if not self.ctx.enabled else self.ctx.device
        self.out_dir = cfg.output_dir
        self.model = _build_model(cfg)
        self.loss_fn = MaskedSSIMLoss(cfg.loss)
        self.areas = VolumeAreaCache()

    # ----------------------------------------------------------------- forward
    def net_for(self, expert: str) -> nn.Module:
        if isinstance(self.model, MixtureOfExperts):
            return self.model.expert(expert)
        return self.model

    def forward(self, items: list[TrainItem], net: nn.Module | None = None) -> torch.Tensor:
        """Cropped magnitude outputs ``(B, h, w)`` for items of one expert and shape."""
        net = net if net is not None else self.net_for(items[0].expert)
        kspace = torch.stack([it.masked_kspace for it in items]).to(self.device, non_blocking=True)
        mask = torch.stack([it.mask for it in items]).to(self.device, non_blocking=True)
        use_amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=use_amp):
            image = net(kspace, mask, -1).image
        return center_crop(image.float(), *items[0].target.shape[-2:])

    def eval_forward(self, items: list[TrainItem]) -> torch.Tensor:
        outs = []
        for group in _groups(items):
            net = self.model.expert(group[0].expert) if isinstance(self.model, MixtureOfExperts) else self.model
            outs.append((group, self.forward(group, net)))
        by_index = {it.index: out for group, out in outs for it, out in zip(group, out)}
        return torch.stack([by_index[it.index] for it in items])

    # ----------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int, ds: EpochDataset, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        cfg = self.cfg
        indices = self.ctx.shard(_order(cfg, len(ds), epoch))
        self.model.train()
        losses: list[float] = []
        stuck = 0
        counts: dict[str, int] = defaultdict(int)
        step = 0
        loader = _loader(ds, indices, cfg, epoch)
        if cfg.train.progress and self.ctx.is_main:
            from tqdm import tqdm

            loader = tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="step")
        for items in loader:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for group in _groups(items):
                output = self.forward(group)
                target = torch.stack([it.target for it in group]).to(self.device)
                max_value = torch.tensor([it.max_value for it in group], device=self.device)
                weights = torch.tensor(
                    [self.areas.weight(it.fname, it.slice_idx, it.target, it.anatomy, it.augmented) for it in group],
                    device=self.device,
                )
                result = self.loss_fn(output, target, max_value, [it.anatomy for it in group], weights, epoch)
                loss = result.loss * (len(group) / len(items))
                loss.backward()
                total += float(loss.detach())
                for it in group:
                    counts[f"mask/{it.mask_kind}"] += 1
                    counts["augmented"] += int(it.augmented)
                    counts[f"expert/{it.expert}"] += 1
            if self.ctx.enabled:  # one decision on every rank: the global batch's mean loss
                total = self.ctx.all_reduce_sum([total])[0] / self.ctx.world_size
            if not math.isfinite(total):
                raise DivergenceError(Divergence(epoch, step, "non-finite loss", total))
            stuck = stuck + 1 if total >= STUCK_LOSS else 0
            if stuck >= cfg.train.stuck_steps:
                raise DivergenceError(Divergence(epoch, step, f"loss stuck at 1 for {stuck} steps", total))
            self.ctx.sync_gradients(self.model)
            if cfg.optim.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip_norm)
            optimizer.step()
            losses.append(total)
            step += 1
        kinds = ("mask/file", "mask/public", "mask/random", "mask/equispaced", "augmented")
        slices_here = sum(v for k, v in counts.items() if k.startswith("expert/"))
        summed = self.ctx.all_reduce_sum(
            [float(sum(losses)), float(len(losses)), float(slices_here)] + [float(counts.get(k, 0)) for k in kinds]
        )
        loss_sum, steps, slices = summed[0], summed[1], summed[2]
        metrics = {"train/loss": loss_sum / max(steps, 1.0), "train/steps": steps / self.ctx.world_size,
                   "train/slices": slices}
        if slices:
            for key, value in zip(kinds, summed[3:]):
                metrics[f"train/{key.replace('/', '_')}_fraction"] = value / slices
        return metrics

    def validate_epoch(self, val_ds: EpochDataset, epoch: int, panel_at: list[int]) -> tuple[dict[str, float], list]:
        """Validate; in a data-parallel run each rank scores whole volumes and the sums are reduced once."""
        self.model.eval()
        n = len(val_ds)
        if self.cfg.data.max_val_slices is not None:
            n = min(n, self.cfg.data.max_val_slices)
        val_ds.set_epoch(epoch)
        mine = [i for i in range(n) if val_ds.base.index[i][0] % self.ctx.world_size == self.ctx.rank]
        size = self.cfg.train.batch_size

        def batches() -> Iterator[list[TrainItem]]:
            for start in range(0, len(mine), size):
                yield [val_ds[i] for i in mine[start:start + size]]

        stats, panels = validate(batches(), self.eval_forward, panel_at)
        if self.ctx.enabled:
            keys = sorted(set(self.cfg.moe.experts) | set(EXPERTS))
            flat = [float(x) for k in keys for x in stats.get(k, (0.0, 0))]
            summed = self.ctx.all_reduce_sum(flat)
            stats = {k: (summed[2 * i], int(round(summed[2 * i + 1]))) for i, k in enumerate(keys)}
        return metrics_from_stats(stats), panels

    # ----------------------------------------------------------------- stage
    def checkpoint_payload(self, epoch: int, optimizer, best: float, best_epoch: int | None, metrics) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "kind": cfg.stage.kind,
            "stage": cfg.stage.name,
            "family": cfg.stage.family,
            "epoch": epoch,
            "config": self.resolved,
            "model_config": cfg.model.to_dict(),
            "experts": list(self.model.names) if isinstance(self.model, MixtureOfExperts) else [],
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_metric": best,
            "best_epoch": best_epoch,
            "metrics": dict(metrics),
        }

    def run(self, resume: str | Path | None, init_from: str | Path | None) -> StageEnd:
        cfg = self.cfg
        data = _load_data(cfg)
        if cfg.loss.sqrt_area_weight:
            _fill_area_cache(self.areas, list(data.train.pairs))
        start, best, best_epoch = cfg.train.start_epoch, -math.inf, None
        resume_state: dict[str, Any] = {}
        init_state: dict[str, Any] = {}
        init_source = str(init_from or cfg.init_from) if (init_from or cfg.init_from) else None
        checkpoint = None
        if resume is not None:
            checkpoint = load_checkpoint(resume, which="last")
            if checkpoint["kind"] != cfg.stage.kind:
                raise InputError(f"{checkpoint['path']}: a {checkpoint['kind']} checkpoint cannot resume a {cfg.stage.kind} stage")
            load_state_strict(self.model, checkpoint["model"], checkpoint["path"])
            start = int(checkpoint["epoch"]) + 1
            best = float(checkpoint.get("best_metric", -math.inf))
            best_epoch = checkpoint.get("best_epoch")
            resume_state = dict(checkpoint.get("tracking") or {})
        elif init_source:
            init_state = _init_weights(cfg, self.model, init_source)
        self.model.to(self.device)
        self.ctx.broadcast_parameters(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=lr_at(cfg.lr, start), betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
            restore_rng_state(checkpoint.get("rng") or {})
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.resolved, self.out_dir / "config.yaml")
        train_ds = EpochDataset(data.train, StageTransform(cfg, train=True))
        val_ds = EpochDataset(data.val, StageTransform(cfg, train=False))
        trainable, _fixed = count_parameters(self.model)
        probe_mb = self.probe_mb(data) if cfg.train.probe_memory else None
        start_event = StageStart(
            stage=cfg.stage.name, kind=cfg.stage.kind, family=None if cfg.stage.family == "none" else cfg.stage.family,
            config=self.resolved, seeds={"stage": cfg.seed, "model": cfg.model.seed},
            data_root=str(cfg.data.root), data_fingerprint=data.fingerprint, param_count=trainable,
            device=str(self.device), determinism={**determinism_flags(), "deterministic": cfg.deterministic,
                                                    "world_size": self.ctx.world_size},
            start_epoch=start, epochs=cfg.train.epochs, output_dir=self.out_dir,
            resume_state=resume_state, init_from=init_source, init_from_state=init_state,
        )
        if self.ctx.is_main:  # only rank 0 reports and writes
            self.callbacks.on_stage_start(start_event)
        last_path = best_path = None
        status = "failed"
        panel_at = panel_indices(len(val_ds), cfg.train.panel_slices)
        try:
            for epoch in range(start, cfg.train.epochs):
                lr = lr_at(cfg.lr, epoch)
                set_lr(optimizer, lr)
                p_mask, p_aug = train_ds.transform.probabilities(epoch)
                reset_peak_memory(self.device)
                t0 = time.perf_counter()
                metrics = self.train_epoch(epoch, train_ds, optimizer)
                train_s = time.perf_counter() - t0
                want_panels = cfg.train.panel_every > 0 and (epoch - start) % cfg.train.panel_every == 0
                val_metrics, panels = self.validate_epoch(val_ds, epoch, panel_at if want_panels else [])
                metrics.update(val_metrics)
                score = metrics.get("val/ssim", -math.inf)
                improved = score > best
                if improved:
                    best, best_epoch = score, epoch
                metrics.update({
                    "lr": lr, "p_mask": p_mask, "p_aug": p_aug,
                    "time/epoch_s": time.perf_counter() - t0,
                    "throughput/slices_per_s": metrics["train/slices"] / max(train_s, 1e-9),
                    "memory/peak_mb": peak_memory_mb(self.device),
                    "best_val_ssim": best,
                })
                if probe_mb is not None:
                    metrics["memory/probe_mb"] = probe_mb
                if not self.ctx.is_main:
                    continue
                self.callbacks.on_epoch_end(EpochEnd(epoch=epoch, metrics=metrics, panels=tuple(panels)))
                payload = self.checkpoint_payload(epoch, optimizer, best, best_epoch, metrics)
                last_path = write_checkpoint(self.callbacks, self.out_dir, "last", epoch, score, payload)
                if improved:
                    best_path = write_checkpoint(self.callbacks, self.out_dir, "best", epoch, score, payload)
            status = "finished"
        except DivergenceError as exc:
            status = "diverged"
            if self.ctx.is_main:
                self.callbacks.on_divergence(exc.event)
            raise
        finally:
            best_file = self.out_dir / "checkpoints" / "best.pt"
            end = StageEnd(
                status=status, best_metric=None if best == -math.inf else best, best_epoch=best_epoch,
                best_path=best_path or (best_file if best_file.exists() else None), last_path=last_path,
                output_dir=self.out_dir,
            )
            if self.ctx.is_main:
                self.callbacks.on_stage_end(end)
        return end

    def probe_mb(self, data: _Data) -> float | None:
        """The memory probe's estimate for the largest training input, in MiB (None if unavailable)."""
        try:
            from recon.engine.memory import probe_training_step
        except ImportError:
            return None
        shapes = [tuple(f["kspace"]["keys"]["kspace"]["shape"]) for f in data.fingerprint["files"]]
        if not shapes:
            return None
        _, coils, height, width = max(shapes, key=lambda s: s[1] * s[2] * s[3])
        estimate = probe_training_step(self.cfg.model, coils, height, width, device=str(self.device),
                                       batch_size=self.cfg.train.batch_size)
        return estimate.peak_bytes / 2**20


def run_stage(
    cfg: StageConfig,
    resolved: dict[str, Any],
    callbacks: Callback | None = None,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
) -> StageEnd:
    """Run one training stage.

    Args:
        cfg: the typed stage configuration.
        resolved: its fully resolved plain form (saved with every checkpoint).
        callbacks: listeners; :class:`ConsoleCallback` when None.
        resume: checkpoint file or stage folder to resume exactly (``last`` of a folder).
        init_from: checkpoint to initialise the weights from (weights only; MoE from a baseline).

    Returns:
        The :class:`StageEnd` event (also sent to the callbacks).

    Raises:
        DivergenceError: the loss became non-finite or stuck at 1 (after the divergence event).
    """
    callbacks = callbacks if callbacks is not None else ConsoleCallback()
    if cfg.stage.kind == "classifier":
        if dist.context().enabled:
            raise InputError(f"stage {cfg.stage.name}: the classifier stage runs in one process; "
                             "start it without --nproc/torchrun")
        from recon.engine.classifier_stage import run_classifier_stage

        return run_classifier_stage(cfg, resolved, callbacks, resume=resume, init_from=init_from)
    return _Runner(cfg, resolved, callbacks).run(resume, init_from)
