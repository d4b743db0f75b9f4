"""The one stage loop: everything a training stage does around its own epochs.

:func:`run_loop` resumes or initialises the weights, builds the optimizer (and restores its state
and the RNG streams on resume), writes ``config.yaml``, emits :class:`~recon.events.StageStart`,
then for every epoch sets the learning rate, times the epoch and measures its memory peaks
(:class:`~recon.engine.memory_meter.EpochMemory`, reset every epoch), lets the stage
train and validate, emits :class:`~recon.events.EpochEnd`, writes ``last`` (and ``best``, and
``epoch_NNN`` for ``train.keep_epochs``) checkpoints,
and finally emits :class:`~recon.events.StageEnd`. A non-finite or stuck loss is a
:class:`DivergenceError`: the loop emits :class:`~recon.events.Divergence` and re-raises it.

What differs between stages (the PromptMR+/MoE reconstruction stage and the slice classifier) is a
:class:`StageHooks` subclass: the model, how one epoch trains and validates, which score is "best",
and the extra fields of the events.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recon.config import dump_yaml
from recon.engine import distributed as dist
from recon.engine.checkpoint import Checkpoint, load_state_strict
from recon.engine.memory_meter import EpochMemory
from recon.engine.outputs import resume_tracking
from recon.engine.runtime import select_device, write_checkpoint
from recon.engine.stage import StageConfig, auto_select_metric
from recon.errors import InputError
from recon.events import Callback, Divergence, EpochEnd, Panel, StageEnd, StageStart
from recon.schedules import lr_at, set_lr
from recon.seeding import restore_rng_state


class DivergenceError(RuntimeError):
    """Training diverged (NaN/inf loss, or the loss stuck at 1)."""

    def __init__(self, event: Divergence) -> None:
        super().__init__(f"training diverged at epoch {event.epoch}, step {event.step}: {event.reason}")
        self.event = event


class StageHooks(ABC):
    """What one kind of stage adds to :func:`run_loop`.

    Subclasses build :attr:`model` in their constructor (after calling this one) and implement the
    abstract hooks. The loop owns the optimizer, the schedule, the checkpoints and the events.

    Attributes:
        cfg: the typed stage configuration.
        resolved: its resolved plain form (saved in every checkpoint).
        ctx: the data-parallel context (a single process unless started by torchrun).
        device: where the model runs.
        model: the network being trained.
        checkpoint_family: the ``family`` stored in checkpoints.
        select_metric: the name of the metric :meth:`score` returns (``train.select_metric`` resolved,
            :func:`recon.engine.stage.auto_select_metric`); stored with ``best_metric`` in checkpoints.
    """

    model: nn.Module
    checkpoint_family: str | None

    def __init__(self, cfg: StageConfig, resolved: dict[str, Any]) -> None:
        self.cfg = cfg
        self.resolved = resolved
        self.select_metric = auto_select_metric(cfg)
        self.ctx = dist.context()
        self.device = select_device(cfg.train.device) if not self.ctx.enabled else self.ctx.device

    @abstractmethod
    def init_weights(self, donor: Checkpoint) -> None:
        """Initialise :attr:`model` from another stage's checkpoint (weights only)."""

    def resumed(self, checkpoint: Checkpoint) -> None:
        """Restore the stage's own state from the checkpoint it resumes (default: nothing)."""

    @abstractmethod
    def prepare(self, start: int) -> None:
        """Build what the epochs need (data loaders, datasets), once, after the optimizer exists."""

    @abstractmethod
    def start_fields(self) -> dict[str, Any]:
        """``family``, ``seeds``, ``data_fingerprint``, ``param_count`` and ``determinism`` of StageStart."""

    @abstractmethod
    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Train one epoch; returns its ``train/...`` metrics. Raises :class:`DivergenceError`."""

    @abstractmethod
    def trained_slices(self, train_metrics: dict[str, float]) -> float:
        """Slices the epoch trained on (for the throughput)."""

    @abstractmethod
    def validate_epoch(self, epoch: int, panels: bool) -> tuple[dict[str, float], tuple[Panel, ...]]:
        """Validate; returns the ``val/...`` metrics and (when ``panels``) reconstruction panels."""

    @abstractmethod
    def schedule_metrics(self, epoch: int, lr: float) -> dict[str, float]:
        """The epoch's schedule values to report (at least ``lr``)."""

    @abstractmethod
    def score(self, metrics: dict[str, float]) -> float:
        """The validation score of the epoch (higher is better): the value of :attr:`select_metric`."""

    @abstractmethod
    def record_best(self, metrics: dict[str, float], best: float) -> bool:
        """Whether the epoch beats ``best`` (the hook may remember tie-breakers when it does)."""

    @abstractmethod
    def best_metrics(self, best: float) -> dict[str, float]:
        """The running-best metrics reported with every epoch."""

    def extra_metrics(self) -> dict[str, float]:
        """Further metrics reported with every epoch (default: none)."""
        return {}

    @abstractmethod
    def model_config(self) -> dict[str, Any]:
        """The network's configuration, as stored in checkpoints."""

    def experts(self) -> tuple[str, ...]:
        """Expert names stored in checkpoints (default: none)."""
        return ()


def _resume(hooks: StageHooks, resume: str | Path) -> Checkpoint:
    checkpoint = Checkpoint.load(resume, which="last")
    kind = hooks.cfg.stage.kind
    if checkpoint.kind != kind:
        raise InputError(f"{checkpoint.source}: a {checkpoint.kind} checkpoint cannot resume a {kind} stage")
    load_state_strict(hooks.model, checkpoint.model, checkpoint.source)
    _adopt_select_metric(hooks, checkpoint)
    hooks.resumed(checkpoint)
    return checkpoint


def _adopt_select_metric(hooks: StageHooks, checkpoint: Checkpoint) -> None:
    """A resumed stage keeps selecting on the metric of the checkpoint's ``best_metric``.

    ``select_metric: auto`` takes the checkpoint's metric (an old file's best was ``val/ssim``); an
    explicit, different metric is refused, since the running best would compare two metrics.
    """
    stored = checkpoint.best_metric_name
    if stored is None or stored == hooks.select_metric:
        return
    if hooks.cfg.train.select_metric == "auto":
        hooks.select_metric = stored
        return
    raise InputError(f"{checkpoint.source}: its best_metric is {stored}, but train.select_metric is "
                     f"{hooks.cfg.train.select_metric}; resume with --set train.select_metric={stored} "
                     "(or start a new stage from it with --init-from)")


def run_loop(
    hooks: StageHooks,
    callbacks: Callback,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
) -> StageEnd:
    """Run a stage's epochs ``train.start_epoch .. train.epochs - 1`` (or from the resumed epoch).

    Args:
        hooks: the stage (its model already built).
        callbacks: listeners; only the main rank reports and writes files.
        resume: checkpoint file or stage folder to resume exactly (``last`` of a folder).
        init_from: checkpoint to initialise the weights from (default ``init_from`` of the config).

    Returns:
        The :class:`StageEnd` event (also sent to the callbacks).

    Raises:
        DivergenceError: the loss became non-finite or stuck (after the divergence event).
    """
    cfg, ctx, device, out_dir = hooks.cfg, hooks.ctx, hooks.device, hooks.cfg.output_dir
    start, best, best_epoch = cfg.train.start_epoch, -math.inf, None
    resume_state: dict[str, Any] = {}
    init_state: dict[str, Any] = {}
    init_source = str(init_from or cfg.init_from) if (init_from or cfg.init_from) else None
    checkpoint = None
    if resume is not None:
        checkpoint = _resume(hooks, resume)
        start = checkpoint.epoch + 1
        best = float(checkpoint.best_metric) if checkpoint.best_metric is not None else -math.inf
        best_epoch, resume_state = checkpoint.best_epoch, resume_tracking(checkpoint, out_dir)
    elif init_source:
        donor = Checkpoint.load(init_source, which="best")
        hooks.init_weights(donor)
        init_state = dict(donor.tracking)
    model = hooks.model
    model.to(device)
    ctx.broadcast_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=lr_at(cfg.lr, start), betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
        restore_rng_state(checkpoint.rng or {})
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(hooks.resolved, out_dir / "config.yaml")
    hooks.prepare(start)
    start_event = StageStart(
        stage=cfg.stage.name, kind=cfg.stage.kind, config=hooks.resolved, data_root=str(cfg.data.root),
        device=str(device), start_epoch=start, epochs=cfg.train.epochs, output_dir=out_dir,
        resume_state=resume_state, init_from=init_source, init_from_state=init_state, **hooks.start_fields(),
    )
    if ctx.is_main:  # only rank 0 reports and writes
        callbacks.on_stage_start(start_event)
    last_path = best_path = None
    status = "failed"
    memory = EpochMemory(device)
    try:
        for epoch in range(start, cfg.train.epochs):
            lr = lr_at(cfg.lr, epoch)
            set_lr(optimizer, lr)
            memory.start()
            t0 = time.perf_counter()
            metrics = hooks.train_epoch(epoch, optimizer)
            train_s = time.perf_counter() - t0
            want_panels = cfg.train.panel_every > 0 and (epoch - start) % cfg.train.panel_every == 0
            val_metrics, panels = hooks.validate_epoch(epoch, want_panels)
            metrics.update(val_metrics)
            metrics.update(memory.stop())
            score = hooks.score(metrics)
            # select_by last: every epoch replaces the best (the choice is the epoch, not the score)
            last = cfg.train.select_by == "last"
            improved = hooks.record_best(metrics, -math.inf if last else best) or last
            if improved:
                best, best_epoch = score, epoch
            metrics.update(hooks.schedule_metrics(epoch, lr))
            metrics.update({
                "time/epoch_s": time.perf_counter() - t0,
                "throughput/slices_per_s": hooks.trained_slices(metrics) / max(train_s, 1e-9),
            })
            metrics.update(hooks.best_metrics(best))
            metrics.update(hooks.extra_metrics())
            if not ctx.is_main:
                continue
            callbacks.on_epoch_end(EpochEnd(epoch=epoch, metrics=metrics, panels=tuple(panels)))
            saved = Checkpoint(
                kind=cfg.stage.kind, stage=cfg.stage.name, family=hooks.checkpoint_family, epoch=epoch,
                config=hooks.resolved, model_config=hooks.model_config(), experts=hooks.experts(),
                model=model.state_dict(), optimizer=optimizer.state_dict(), best_metric=best,
                best_epoch=best_epoch, best_metric_name=hooks.select_metric, metrics=dict(metrics),
            )
            last_path = write_checkpoint(callbacks, out_dir, "last", score, saved)
            if improved:
                best_path = write_checkpoint(callbacks, out_dir, "best", score, saved)
            if epoch + 1 in cfg.train.keep_epochs:
                write_checkpoint(callbacks, out_dir, f"epoch_{epoch + 1:03d}", score, saved)
        status = "finished"
    except DivergenceError as exc:
        status = "diverged"
        if ctx.is_main:
            callbacks.on_divergence(exc.event)
        raise
    finally:
        memory.close()
        best_file = out_dir / "checkpoints" / "best.pt"
        end = StageEnd(
            status=status, best_metric=None if best == -math.inf else best, best_epoch=best_epoch,
            best_path=best_path or (best_file if best_file.exists() else None), last_path=last_path,
            output_dir=out_dir,
        )
        if ctx.is_main:
            callbacks.on_stage_end(end)
    return end
