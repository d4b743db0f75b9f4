"""Runtime helpers of the stage loop: device selection and checkpoint writing.

The per-epoch memory figures are measured by :mod:`recon.engine.memory_meter`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from recon.engine.checkpoint import Checkpoint, save_checkpoint
from recon.events import Callback, CheckpointSaved
from recon.seeding import capture_rng_state


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, never a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def write_checkpoint(
    callbacks: Callback,
    out_dir: Path,
    kind: str,
    metric: float | None,
    checkpoint: Checkpoint,
) -> Path:
    """Write ``checkpoints/{kind}.pt`` with RNG streams and tracking state, then emit the event.

    Args:
        callbacks: listeners (their :meth:`~recon.events.Callback.state_dict` is stored).
        out_dir: the stage's output folder.
        kind: ``last`` or ``best``.
        metric: the epoch's validation score, for the event.
        checkpoint: the epoch's checkpoint (its ``rng`` and ``tracking`` are filled in here).

    Returns:
        The file written.
    """
    checkpoint = replace(checkpoint, rng=capture_rng_state(), tracking=callbacks.state_dict())
    path = save_checkpoint(out_dir / "checkpoints" / f"{kind}.pt", checkpoint)
    callbacks.on_checkpoint(CheckpointSaved(path=path, kind=kind, epoch=checkpoint.epoch, metric=metric))
    return path
