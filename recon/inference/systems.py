"""Reconstruction systems (Hacker, Helper) and the classifier, as inference sees them.

A *system* is either one PromptMR+ (a baseline stage) or a :class:`recon.models.experts.MixtureOfExperts`
(an MoE stage). A single model ignores the expert name it is given; an MoE runs only the named
expert. A system also carries the number of adjacent slices it was trained with, which the data
loader must reproduce.

Systems come from a stage's checkpoint folder (:func:`load_system`) or from modules already built
elsewhere, passed to :class:`ReconSystem` directly (the tracking layer loads registry versions that way).
Nothing falls back: a checkpoint of the wrong kind, or whose configuration does not fit its
weights, raises :class:`recon.errors.InputError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from recon.engine.checkpoint import Checkpoint, build_model
from recon.errors import InputError

log = logging.getLogger(__name__)


class ReconBatch(NamedTuple):
    """One batch of slices for a system, all of the same shape and routed to the same expert.

    Attributes:
        masked_kspace: complex ``(B, A, C, H, W)``, already multiplied by the mask, centred.
        mask: float ``(B, W)`` column masks (0/1).
        num_low_frequencies: int ``(B,)`` ACS widths, ``-1`` to let the model detect them.
    """

    masked_kspace: torch.Tensor
    mask: torch.Tensor
    num_low_frequencies: torch.Tensor


def _check_batch(batch: ReconBatch) -> None:
    k, m, n = batch
    if not torch.is_complex(k) or k.ndim != 5:
        raise ValueError(f"masked_kspace must be complex (B, A, C, H, W), got {k.dtype} {tuple(k.shape)}")
    if m.ndim != 2 or m.shape[0] != k.shape[0] or m.shape[1] != k.shape[-1]:
        raise ValueError(f"mask must be (B, W) = ({k.shape[0]}, {k.shape[-1]}), got {tuple(m.shape)}")
    if n.ndim != 1 or n.shape[0] != k.shape[0]:
        raise ValueError(f"num_low_frequencies must be ({k.shape[0]},), got {tuple(n.shape)}")


def adjacent_slices(checkpoint: Checkpoint) -> int:
    """The adjacent slices a checkpoint's model was trained with.

    Reads ``config.data.num_adj_slices`` and ``model_config.num_adj_slices``; they must agree when
    both are present.

    Args:
        checkpoint: a loaded checkpoint.

    Returns:
        The number of adjacent slices (odd, >= 1).
    """
    source = checkpoint.source
    found: dict[str, int] = {}
    data_cfg = (checkpoint.config or {}).get("data") or {}
    if isinstance(data_cfg, dict) and data_cfg.get("num_adj_slices") is not None:
        found["config.data.num_adj_slices"] = int(data_cfg["num_adj_slices"])
    model_cfg = checkpoint.model_config or {}
    if isinstance(model_cfg, dict) and model_cfg.get("num_adj_slices") is not None:
        found["model_config.num_adj_slices"] = int(model_cfg["num_adj_slices"])
    if not found:
        raise InputError(f"{source}: neither config.data.num_adj_slices nor model_config.num_adj_slices is set")
    values = set(found.values())
    if len(values) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in found.items())
        raise InputError(f"{source}: adjacent slice counts disagree ({detail})")
    value = values.pop()
    if value < 1 or value % 2 == 0:
        raise InputError(f"{source}: num_adj_slices must be odd and >= 1, got {value}")
    return value


@dataclass
class ReconSystem:
    """A single PromptMR+ or a mixture of experts, ready for no-grad inference.

    Attributes:
        module: ``PromptMR`` or ``MixtureOfExperts`` (anything with ``.names`` and ``.expert(name)``
            counts as a mixture).
        num_adj_slices: adjacent slices the model takes (A).
        name: a label for reports (``hacker``, ``helper``).
        source: where it came from (checkpoint file, registry URI, ``<module>``).
        epoch: the checkpoint's epoch, when known.
    """

    module: nn.Module
    num_adj_slices: int
    name: str = "system"
    source: str = "<module>"
    epoch: int | None = None

    def __post_init__(self) -> None:
        if self.num_adj_slices < 1 or self.num_adj_slices % 2 == 0:
            raise ValueError(f"num_adj_slices must be odd and >= 1, got {self.num_adj_slices}")
        self.module.eval()

    @property
    def is_moe(self) -> bool:
        """True for a mixture of experts."""
        return hasattr(self.module, "names") and hasattr(self.module, "expert")

    @property
    def experts(self) -> tuple[str, ...] | None:
        """Expert names of a mixture, None for a single model."""
        return tuple(self.module.names) if self.is_moe else None  # type: ignore[union-attr]

    @property
    def device(self) -> torch.device:
        """Device of the module's parameters."""
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> "ReconSystem":
        """Move the module to ``device`` (in place); returns self."""
        self.module.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for reports."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": "moe" if self.is_moe else "baseline",
            "experts": list(self.experts) if self.is_moe else None,  # type: ignore[arg-type]
            "num_adj_slices": self.num_adj_slices,
            "epoch": self.epoch,
            "parameters": sum(p.numel() for p in self.module.parameters()),
        }

    def check_expert(self, expert: str) -> None:
        """Raise :class:`InputError` when a mixture lacks ``expert`` (a single model takes any)."""
        if self.is_moe and expert not in self.experts:  # type: ignore[operator]
            have = ", ".join(self.experts or ())
            raise InputError(f"{self.source}: the {self.name} system has no expert {expert!r} (it has {have})")

    @torch.inference_mode()
    def reconstruct(self, batch: ReconBatch, expert: str) -> torch.Tensor:
        """Reconstruct a batch with the named expert (a single model ignores the name).

        Args:
            batch: the slices (see :class:`ReconBatch`), on the system's device; ``A`` must equal
                :attr:`num_adj_slices`.
            expert: e.g. ``brain_acc4``.

        Returns:
            The magnitude images ``(B, H, W)`` (not cropped), float32.
        """
        _check_batch(batch)
        if batch.masked_kspace.shape[1] != self.num_adj_slices:
            raise ValueError(
                f"{self.name}: expects {self.num_adj_slices} adjacent slices, got {batch.masked_kspace.shape[1]}"
            )
        self.check_expert(expert)
        model = self.module.expert(expert) if self.is_moe else self.module  # type: ignore[operator]
        output = model(batch.masked_kspace, batch.mask, batch.num_low_frequencies)
        image = output.image
        if image.ndim != 3 or image.shape[0] != batch.masked_kspace.shape[0]:
            raise ValueError(f"{self.name}: model returned image of shape {tuple(image.shape)}, expected (B, H, W)")
        return image.float()


def load_system(
    path: str | Path, which: str = "best", device: str | torch.device = "cpu", name: str = "system"
) -> ReconSystem:
    """Load a Hacker or Helper system from a stage's checkpoint (folder or file).

    Args:
        path: stage output folder (``<dir>/checkpoints/<which>.pt``) or a ``.pt`` file.
        which: ``best`` or ``last``.
        device: where the module goes.
        name: label for reports and error messages.

    Returns:
        The system in eval mode on ``device``.
    """
    checkpoint = Checkpoint.load(path, which)
    source = checkpoint.source
    if checkpoint.kind not in ("baseline", "moe"):
        raise InputError(
            f"{source}: the {name} system needs a baseline or moe checkpoint, got kind {checkpoint.kind!r}"
        )
    num_adj = adjacent_slices(checkpoint)
    module = build_model(checkpoint)
    model_adj = getattr(getattr(module, "cfg", None), "num_adj_slices", None)
    if model_adj is not None and int(model_adj) != num_adj:
        raise InputError(f"{source}: the model is built for {model_adj} adjacent slices, the checkpoint says {num_adj}")
    system = ReconSystem(module, num_adj, name, source, checkpoint.epoch)
    log.info("%s system: %s (%s, epoch %s, %d adjacent)", name, source, checkpoint.kind, checkpoint.epoch, num_adj)
    return system.to(device)


def load_classifier(path: str | Path, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
    """Load the brain/knee slice classifier from its stage checkpoint.

    Args:
        path: stage output folder or ``.pt`` file.
        which: ``best`` or ``last``.
        device: where the module goes.

    Returns:
        The ``SliceClassifier`` in eval mode on ``device``.
    """
    checkpoint = Checkpoint.load(path, which)
    if checkpoint.kind != "classifier":
        raise InputError(f"{checkpoint.source}: expected a classifier checkpoint, got kind {checkpoint.kind!r}")
    module = build_model(checkpoint)
    log.info("classifier: %s (epoch %s)", checkpoint.source, checkpoint.epoch)
    return module.to(device).eval()
