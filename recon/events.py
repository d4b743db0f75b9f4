"""The engine's event interface: how training reports progress without knowing who listens.

``recon`` never imports a tracking library. The training engine emits the events below to a
:class:`Callback`; ``tracking`` implements one with MLflow, and :class:`ConsoleCallback` (plain
``logging``) is the default. A callback may keep state that must survive a resume (for example a
tracking run id): :meth:`Callback.state_dict` is stored in every checkpoint under ``"tracking"``,
and comes back as :attr:`StageStart.resume_state` when the stage resumes.

A callback may stop training by raising from a hook (the tuning layer raises its pruning
exception from :meth:`Callback.on_epoch_end`); the engine does not swallow exceptions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger("recon")


#: The one name of a stage's tracking run id outside the tracking store: the key of the tracking callback's
#: resume state, which every checkpoint keeps under ``tracking`` (so ``--resume`` reopens the run and the
#: registry finds the stage's run).
RUN_ID_KEY = "mlflow_run_id"

@dataclass(frozen=True)
class StageStart:
    """A stage begins (or resumes).

    Attributes:
        stage: stage name from the configuration (e.g. ``hacker_baseline``).
        kind: ``baseline``, ``moe`` or ``classifier``.
        family: ``hacker``, ``helper`` or None (classifier).
        config: the fully resolved configuration, nested plain data (YAML-able).
        seeds: every seed the stage uses, by name.
        data_root: the data set root.
        data_fingerprint: file names, shapes, sizes and an attrs hash of the data (see
            ``recon.data``), with a ``"digest"`` entry summarising it.
        param_count: trainable parameters of the model (all experts for an MoE).
        device: e.g. ``cpu`` or ``cuda:0``.
        determinism: the determinism flags in force (cudnn, torch deterministic algorithms...).
        start_epoch: first epoch this invocation trains (absolute epoch numbering).
        epochs: the epoch after the last one (exclusive end).
        resume_state: the ``"tracking"`` entry of the checkpoint being resumed ({} when fresh).
        init_from: checkpoint the weights were initialised from, or None.
        init_from_state: the ``"tracking"`` entry of that checkpoint ({} when none).
        output_dir: where checkpoints are written.
    """

    stage: str
    kind: str
    family: str | None
    config: dict[str, Any]
    seeds: dict[str, int]
    data_root: str
    data_fingerprint: dict[str, Any]
    param_count: int
    device: str
    determinism: dict[str, Any]
    start_epoch: int
    epochs: int
    output_dir: Path
    resume_state: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init_from_state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    """A fixed validation slice for a reconstruction panel (2-D float arrays, same shape).

    Attributes:
        name: ``<file>:<slice>``.
        target: the reference image.
        zero_filled: the zero-filled reconstruction.
        output: the model's reconstruction.
        max_value: the volume's maximum (the SSIM data range; error maps are shown relative to it), NaN if unknown.
        ssim: the slice's SSIM as the metric computes it, NaN if unknown.
    """

    name: str
    target: np.ndarray
    zero_filled: np.ndarray
    output: np.ndarray
    max_value: float = float("nan")
    ssim: float = float("nan")


@dataclass(frozen=True)
class EpochEnd:
    """An epoch finished.

    Attributes:
        epoch: absolute epoch number (0-based).
        metrics: flat metric names to floats (the README's "Metric names" table). A reconstruction
            stage: ``train/loss``, ``train/mask_share/{file,public,equispaced,random}``,
            ``train/augmented_share``, ``val/ssim``, ``val/ssim/acc4``, ``val/ssim/acc8``,
            ``val/ssim/<group>`` (``brain_acc4``..., or per expert), ``val/leaderboard``, ``lr``,
            ``schedule/p_remask``, ``schedule/p_aug``, ``time/epoch_s``, ``throughput/slices_per_s``,
            ``memory/cpu_rss_peak_mb`` (and on CUDA ``memory/cuda_allocated_peak_mb``,
            ``memory/cuda_reserved_peak_mb``; every memory figure is the peak within this epoch),
            ``memory/probe_predicted_mb`` and ``best_val_ssim``. The classifier: ``val/accuracy``,
            ``val/file_accuracy``, ``val/loss``, ``best_val_accuracy``...
        panels: reconstruction panels, on the epochs the configuration asks for; else empty.
    """

    epoch: int
    metrics: dict[str, float]
    panels: tuple[Panel, ...] = ()


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint was written (atomically). ``kind`` is ``best`` or ``last``."""

    path: Path
    kind: str
    epoch: int
    metric: float | None


@dataclass(frozen=True)
class Divergence:
    """Training diverged (NaN/inf loss, or a loss stuck at 1); the stage stops after this event."""

    epoch: int
    step: int
    reason: str
    loss: float


@dataclass(frozen=True)
class StageEnd:
    """A stage ended.

    Attributes:
        status: ``finished``, ``diverged`` or ``failed``.
        best_metric: best validation score (SSIM, or accuracy for the classifier), or None.
        best_epoch: the epoch of the best checkpoint, or None.
        best_path: best checkpoint path, or None.
        last_path: last checkpoint path, or None.
        output_dir: the stage's output folder.
    """

    status: str
    best_metric: float | None
    best_epoch: int | None
    best_path: Path | None
    last_path: Path | None
    output_dir: Path


class Callback:
    """Base class: every hook is a no-op. Override what you need."""

    #: key under which :meth:`state_dict` is stored in checkpoints
    name: str = "callback"

    def on_stage_start(self, event: StageStart) -> None:
        """Called once before the first epoch of this invocation."""

    def on_epoch_end(self, event: EpochEnd) -> None:
        """Called after validation of every epoch, before its checkpoints are written."""

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        """Called after a checkpoint was written."""

    def on_divergence(self, event: Divergence) -> None:
        """Called when the engine detects divergence (before :meth:`on_stage_end`)."""

    def on_stage_end(self, event: StageEnd) -> None:
        """Called once when the stage ends, also after divergence or an exception."""

    def state_dict(self) -> dict[str, Any]:
        """State to store in checkpoints (plain data: str/int/float/bool, lists, dicts)."""
        return {}


class CallbackList(Callback):
    """Dispatches every event to several callbacks, in order."""

    name = "callbacks"

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_stage_start(self, event: StageStart) -> None:
        for cb in self.callbacks:
            cb.on_stage_start(event)

    def on_epoch_end(self, event: EpochEnd) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(event)

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(event)

    def on_divergence(self, event: Divergence) -> None:
        for cb in self.callbacks:
            cb.on_divergence(event)

    def on_stage_end(self, event: StageEnd) -> None:
        for cb in self.callbacks:
            cb.on_stage_end(event)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for cb in self.callbacks:
            state.update(cb.state_dict())
        return state


class ConsoleCallback(Callback):
    """The default listener: one log line per event."""

    name = "console"

    def on_stage_start(self, event: StageStart) -> None:
        log.info(
            "stage %s (%s%s): epochs %d..%d, %s trainable parameters, device %s, output %s",
            event.stage, event.kind, f", {event.family}" if event.family else "",
            event.start_epoch, event.epochs - 1, f"{event.param_count:,}", event.device, event.output_dir,
        )

    def on_epoch_end(self, event: EpochEnd) -> None:
        shown = ", ".join(f"{k}={v:.5g}" for k, v in sorted(event.metrics.items()))
        log.info("epoch %d: %s", event.epoch, shown)

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        log.info("checkpoint (%s, epoch %d) -> %s", event.kind, event.epoch, event.path)

    def on_divergence(self, event: Divergence) -> None:
        log.error("diverged at epoch %d step %d: %s (loss %.5g)", event.epoch, event.step, event.reason, event.loss)

    def on_stage_end(self, event: StageEnd) -> None:
        best = "n/a" if event.best_metric is None else f"{event.best_metric:.5f} at epoch {event.best_epoch}"
        log.info("stage ended: %s; best %s; output %s", event.status, best, event.output_dir)
