"""A trial's peak GPU memory, predicted before it trains, and the memory it may use.

* :class:`MemoryPredictor` predicts the peak of a stage's training step with the memory probe of
  :mod:`recon.engine.memory` on the largest training input (:func:`largest_training_input`, or the tune file's
  ``probe_input``), with a free lower bound first (the input tensor alone) and a cache per model configuration
  (seeds aside), so repeated architectures cost nothing. :func:`device_for_probe` picks a meta-device estimate
  on the CPU or a measured step on CUDA.
* :func:`cap_cuda_memory` caps the process's CUDA allocator at the budget, so a trial that exceeds it fails
  with a real out-of-memory error, as it would on a card of that size.
* :func:`release_memory` gives collected memory back between trials; :func:`format_bytes` prints sizes.

What a prediction above the budget does to a trial is :mod:`tracking.tune.oom`.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recon.engine.runtime import select_device
from recon.engine.stage import StageConfig
from recon.errors import InputError
from tracking.tune.config import TuneConfig

log = logging.getLogger(__name__)


def format_bytes(size: int | None) -> str:
    """``1.50 GiB`` style text (``none`` for None)."""
    if size is None:
        return "none"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def release_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver (when CUDA was used)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class MemoryPrediction:
    """A trial's predicted peak memory.

    Attributes:
        predicted_bytes: the peak, in bytes.
        source: ``input-bound`` (the input alone exceeds the budget; no probe run), ``probe`` (meta-device
            estimate), ``measured`` (a real step on CUDA) or ``cache`` (an earlier probe of the same model).
        details: the probe's parts (weights, saved activations...) for the record.
    """

    predicted_bytes: int
    source: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeInput:
    """The training input a prediction is for: one k-space of ``coils x height x width`` per sample."""

    coils: int
    height: int
    width: int
    batch_size: int = 1

    def input_bytes(self, adjacent: int) -> int:
        """Bytes of the complex64 masked k-space ``(B, A, C, H, W)`` plus the float32 column mask."""
        return self.batch_size * (adjacent * self.coils * self.height * self.width * 8 + self.width * 4)


class MemoryPredictor:
    """Peak memory of a stage's training step, from the memory probe, with a cache per model configuration.

    For a mixture of experts only one expert trains per step; the others keep their weights and AdamW state
    (their gradients are freed each step), which is added to the single-expert figure.

    Args:
        device: ``cpu``/``meta`` for the meta-device estimate, ``cuda`` to measure a real step.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._cache: dict[str, Any] = {}

    def predict(self, cfg: StageConfig, inp: ProbeInput, budget_bytes: int | None = None) -> MemoryPrediction:
        """The predicted peak for ``cfg`` on ``inp``.

        Args:
            cfg: the trial's stage.
            inp: the largest training input.
            budget_bytes: when given and the input alone exceeds it, no probe is run (``input-bound``).

        Returns:
            The :class:`MemoryPrediction`.
        """
        lower = inp.input_bytes(cfg.model.num_adj_slices)
        if budget_bytes is not None and lower > budget_bytes:
            return MemoryPrediction(lower, "input-bound", {"input_bytes": lower})
        model = {k: v for k, v in cfg.model.to_dict().items() if k != "seed"}  # the seed does not change memory
        key = json.dumps([model, inp.coils, inp.height, inp.width, inp.batch_size, self.device])
        source = "cache"
        estimate = self._cache.get(key)
        if estimate is None:
            from recon.engine.memory import probe_training_step

            estimate = probe_training_step(cfg.model, inp.coils, inp.height, inp.width, device=self.device,
                                           batch_size=inp.batch_size)
            self._cache[key] = estimate
            source = "measured" if estimate.measured else "probe"
            if self.device.startswith("cuda"):
                release_memory()
        details = {k: v for k, v in estimate.to_dict().items() if isinstance(v, (int, bool))}
        peak = int(estimate.peak_bytes)
        if cfg.stage.kind == "moe":
            idle = (len(cfg.moe.experts) - 1) * (estimate.params_bytes + estimate.optimizer_bytes)
            details["idle_experts_bytes"] = int(idle)
            peak += int(idle)
        return MemoryPrediction(peak, source, details)


def device_for_probe(cfg: TuneConfig, stage: StageConfig) -> str:
    """``cuda`` to measure a step on the GPU, ``cpu`` for the meta-device estimate."""
    if cfg.probe_device != "auto":
        return cfg.probe_device
    return "cuda" if select_device(stage.train.device).type == "cuda" else "cpu"


def largest_training_input(stage: StageConfig) -> ProbeInput:
    """The largest k-space (by coils x rows x columns) among the stage's training files."""
    from recon.data.layout import data_fingerprint, discover_split

    root = Path(stage.data.root)
    splits = list(stage.data.train_splits) + ([stage.data.val_split] if stage.data.use_val_for_final else [])
    hint = "the memory probe needs the training data, or set probe_input in the tune file"
    pairs = [p for split in splits for p in discover_split(root, split, hint)]
    shapes = [tuple(f["kspace"]["keys"]["kspace"]["shape"]) for f in data_fingerprint(pairs)["files"]]
    if not shapes:
        raise InputError(f"{root}: no training files found for the memory probe")
    _, coils, height, width = max(shapes, key=lambda s: s[1] * s[2] * s[3])
    return ProbeInput(int(coils), int(height), int(width), stage.train.batch_size)


def cap_cuda_memory(budget_bytes: int | None, stage: StageConfig) -> float | None:
    """On CUDA, limit this process's allocator to the budget (as on an 8 GB card); returns the fraction set."""
    if budget_bytes is None or select_device(stage.train.device).type != "cuda":
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("CUDA allocator capped at %s of %s (fraction %.4f)", format_bytes(budget_bytes),
             format_bytes(total), fraction)
    return fraction
