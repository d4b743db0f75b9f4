"""Training loss: 1 - SSIM on foreground-masked images ("gamyun"), sqrt-area weighted.

Per slice (``docs/pipeline.md`` section 4.2)::

    gamyun = foreground_mask(target, anatomy)          the evaluator's mask (recon.metric)
    gamyun[gamyun == 0] = shade                        shade 0 by default
    w      = sqrt(area / largest area in the same volume)   area = number of foreground pixels; 1 if that max is 0
    loss   = (1 - SSIM(output * gamyun, target * gamyun; data_range = attrs['max'])) * w
           + lambda * {L1 | MSE}(output * gamyun, target * gamyun) * w      from regularizer_start_epoch on

The SSIM is :func:`recon.metric.ssim`, the metric's own implementation, so with ``shade = 0`` and
``w = 1`` the loss is exactly ``1 - slice score``. The batch loss is the mean over the batch of the
per-slice losses (the team trained with batch 1, where the two agree).

Augmented targets (``docs/pipeline.md`` 6.9). The team weighted an augmented slice with the area
of the *original* target's mask while recomputing the mask itself from the augmented target. Here
both the mask and its area come from the augmented target, and the weight is that area over the
volume's cached (un-augmented) largest area, clipped to 1 so that an enlarged slice never weighs
more than the largest slice of its volume. :class:`VolumeAreaCache` holds the per-volume areas
(and optionally the masks) so the un-augmented case costs nothing per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from recon.metric import foreground_mask, ssim
from recon.sections import Section

REGULARIZERS = ("none", "l1", "l2")


@dataclass(frozen=True)
class LossConfig(Section):
    """Settings of :class:`MaskedSSIMLoss`.

    Attributes:
        shade: value given to background pixels of the gamyun mask (0 removes the background).
        use_gamyun: multiply output and target by the gamyun mask; off means plain SSIM.
        sqrt_area_weight: multiply each slice's loss by its sqrt-area weight.
        regularizer: ``"none"``, ``"l1"`` or ``"l2"`` (mean squared error) on the masked images.
        regularizer_weight: lambda of the regulariser term.
        regularizer_start_epoch: first epoch (0-based) with the regulariser on.
    """

    shade: float = 0.0
    use_gamyun: bool = True
    sqrt_area_weight: bool = True
    regularizer: str = "none"
    regularizer_weight: float = 1e-4
    regularizer_start_epoch: int = 0

    def validate(self) -> None:
        """Check the values (run on construction, see :class:`recon.sections.Section`)."""
        self.require(0.0 <= self.shade <= 1.0, "shade", "must be in [0, 1]")
        self.require(self.regularizer in REGULARIZERS, "regularizer", f"must be one of {', '.join(REGULARIZERS)}")
        self.require(math.isfinite(self.regularizer_weight) and self.regularizer_weight >= 0, "regularizer_weight",
                     "must be finite and >= 0")
        self.require(self.regularizer_start_epoch >= 0, "regularizer_start_epoch", "must be >= 0")


@dataclass(frozen=True)
class LossOutput:
    """What :class:`MaskedSSIMLoss` returns.

    Attributes:
        loss: scalar tensor to back-propagate.
        ssim: ``(B,)`` masked SSIM per slice (detached).
        weight: ``(B,)`` area weights used (ones when weighting is off; detached).
        regularizer: scalar regulariser term already included in ``loss`` (0 when off; detached).
    """

    loss: torch.Tensor
    ssim: torch.Tensor
    weight: torch.Tensor
    regularizer: torch.Tensor


def area_weight(area: float, max_area: float) -> float:
    """The sqrt-area weight ``sqrt(area / max_area)``, clipped to [0, 1]; 1 when ``max_area`` is 0.

    Args:
        area: foreground pixel count of the slice (possibly of an augmented target).
        max_area: largest foreground pixel count among the un-augmented slices of its volume.

    Returns:
        The weight.
    """
    if max_area <= 0:
        return 1.0
    return math.sqrt(min(max(area, 0.0) / max_area, 1.0))


def foreground_area(target: np.ndarray | torch.Tensor, anatomy: str) -> int:
    """Number of foreground pixels of one target slice (the gamyun area).

    Args:
        target: ``(H, W)`` target, NumPy or torch on any device (e.g. an augmented target).
        anatomy: ``"brain"`` or ``"knee"``.

    Returns:
        The pixel count.
    """
    if target.ndim != 2:
        raise ValueError(f"foreground_area expects one (H, W) slice, got shape {tuple(target.shape)}")
    mask = foreground_mask(target, anatomy)
    return int(mask.sum().item())


class VolumeAreaCache:
    """Per-volume foreground areas (and optionally masks) of the un-augmented targets.

    Build it once per data set (``add_volume`` for each file), then ask ``weight(fname, i)`` per
    sample. For an augmented target pass the area of its recomputed mask as ``target_area``.

    Args:
        keep_masks: also keep every slice's mask (bit-packed, about H*W/8 bytes per slice) so a
            loader can hand the cached mask to the loss instead of recomputing it.
    """

    def __init__(self, keep_masks: bool = False) -> None:
        self.keep_masks = keep_masks
        self._areas: dict[str, np.ndarray] = {}
        self._masks: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}

    def __contains__(self, fname: object) -> bool:
        return fname in self._areas

    def __len__(self) -> int:
        return len(self._areas)

    def add_volume(self, fname: str, targets: np.ndarray | torch.Tensor, anatomy: str) -> np.ndarray:
        """Compute and cache the masks' areas of one volume's targets.

        Args:
            fname: key of the volume (its file name).
            targets: ``(S, H, W)`` ``image_label`` of the volume, NumPy or torch.
            anatomy: ``"brain"`` or ``"knee"``.

        Returns:
            The ``(S,)`` int64 areas.
        """
        if targets.ndim != 3:
            raise ValueError(f"{fname}: add_volume expects targets of shape (S, H, W), got {tuple(targets.shape)}")
        masks = foreground_mask(targets, anatomy)
        m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else masks
        binary = m > 0.5
        areas = binary.reshape(binary.shape[0], -1).sum(axis=1).astype(np.int64)
        self._areas[fname] = areas
        if self.keep_masks:
            self._masks[fname] = (np.packbits(binary.reshape(binary.shape[0], -1), axis=1), binary.shape[1:])
        return areas

    def set_areas(self, fname: str, areas: Sequence[int] | np.ndarray) -> None:
        """Store precomputed areas of a volume (e.g. from :meth:`state_dict` of an earlier run)."""
        arr = np.asarray(areas, dtype=np.int64).reshape(-1)
        if arr.size == 0 or np.any(arr < 0):
            raise ValueError(f"{fname}: areas must be a non-empty list of counts >= 0")
        self._areas[fname] = arr
        self._masks.pop(fname, None)

    def areas(self, fname: str) -> np.ndarray:
        """The ``(S,)`` areas of a cached volume."""
        try:
            return self._areas[fname]
        except KeyError:
            raise KeyError(
                f"{fname}: volume not in the area cache; call add_volume(fname, image_label, anatomy) first"
            ) from None

    def max_area(self, fname: str) -> int:
        """Largest slice area of a cached volume."""
        return int(self.areas(fname).max())

    def weight(
        self,
        fname: str,
        slice_idx: int,
        target_area: float | np.ndarray | torch.Tensor | None = None,
        anatomy: str | None = None,
        augmented: bool = True,
    ) -> float:
        """sqrt-area weight of a slice.

        Args:
            fname: cached volume.
            slice_idx: slice index in the volume.
            target_area: None uses the cached area. A number is the mask area of an augmented
                target. An ``(H, W)`` array/tensor is the target itself: its area is recomputed
                (with ``anatomy``) when ``augmented`` is True, and the cached area is used when
                it is False (the target is the stored one).
            anatomy: ``"brain"``/``"knee"``, needed only to recompute the area of a target.
            augmented: whether a target passed as ``target_area`` was augmented.

        Returns:
            ``sqrt(area / max area of the volume)`` clipped to 1, or 1 when that max is 0.
        """
        areas = self.areas(fname)
        if not 0 <= slice_idx < len(areas):
            raise IndexError(f"{fname}: slice {slice_idx} out of range 0..{len(areas) - 1}")
        if isinstance(target_area, (np.ndarray, torch.Tensor)):
            if not augmented:
                target_area = None
            elif anatomy is None:
                raise ValueError(f"{fname}: weight needs the anatomy to recompute the area of an augmented target")
            else:
                target_area = foreground_area(target_area, anatomy)
        area = float(areas[slice_idx]) if target_area is None else float(target_area)
        return area_weight(area, float(areas.max()))

    def mask(self, fname: str, slice_idx: int) -> np.ndarray:
        """Cached ``(H, W)`` float32 0/1 mask of an un-augmented slice (needs ``keep_masks=True``)."""
        if fname not in self._masks:
            raise KeyError(f"{fname}: no cached masks (keep_masks={self.keep_masks})")
        packed, (h, w) = self._masks[fname]
        return np.unpackbits(packed[slice_idx], count=h * w).reshape(h, w).astype(np.float32)

    def state_dict(self) -> dict[str, list[int]]:
        """Areas per volume as plain lists (JSON/YAML friendly)."""
        return {name: areas.tolist() for name, areas in self._areas.items()}

    def load_state_dict(self, state: dict[str, Sequence[int]]) -> None:
        """Load areas written by :meth:`state_dict`."""
        for name, areas in state.items():
            self.set_areas(name, areas)


class MaskedSSIMLoss:
    """``(1 - masked SSIM) * sqrt-area weight`` plus an optional L1/L2 term (see module docstring).

    Args:
        config: the loss settings.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        self.config = config or LossConfig()

    def __call__(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        max_value: torch.Tensor,
        anatomy: Sequence[str] | str,
        area_weight: torch.Tensor | None = None,
        epoch: int = 0,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss of a batch.

        Args:
            output: model output ``(B, H, W)``, real float.
            target: target ``(B, H, W)``, same dtype and device (augmented or not).
            max_value: ``(B,)`` ``attrs['max']`` per slice (the SSIM data range), or a scalar.
            anatomy: ``B`` anatomies (mask thresholds) or one for the whole batch.
            area_weight: ``(B,)`` sqrt-area weights (from :class:`VolumeAreaCache`). Required when
                ``config.sqrt_area_weight`` is on, ignored when off.
            epoch: current 0-based epoch (gates the regulariser).
            mask: optional ``(B, H, W)`` 0/1 foreground masks to use instead of recomputing them
                from ``target`` (e.g. cached masks of un-augmented targets).

        Returns:
            A :class:`LossOutput`.

        Raises:
            ValueError: bad shapes, or weighting on without ``area_weight``.
        """
        cfg = self.config
        if output.ndim != 3 or output.shape != target.shape:
            raise ValueError(
                f"loss expects output and target of one shape (B, H, W), got {tuple(output.shape)} "
                f"and {tuple(target.shape)}"
            )
        b = output.shape[0]
        target = target.detach()
        if cfg.use_gamyun:
            if mask is None:
                fg = foreground_mask(target, anatomy)
            else:
                if mask.shape != target.shape:
                    raise ValueError(f"loss mask shape {tuple(mask.shape)} differs from target {tuple(target.shape)}")
                fg = mask.to(device=target.device, dtype=target.dtype)
            gamyun = fg if cfg.shade == 0 else cfg.shade + (1.0 - cfg.shade) * fg
            out_m, tgt_m = output * gamyun, target * gamyun
        else:
            out_m, tgt_m = output, target
        scores = ssim(out_m, tgt_m, max_value)
        if cfg.sqrt_area_weight:
            if area_weight is None:
                raise ValueError("loss has sqrt_area_weight on but got no area_weight; pass (B,) weights")
            weight = torch.as_tensor(area_weight, dtype=scores.dtype, device=scores.device).reshape(-1)
            if weight.shape != (b,):
                raise ValueError(f"loss area_weight must have shape ({b},), got {tuple(weight.shape)}")
        else:
            weight = torch.ones(b, dtype=scores.dtype, device=scores.device)
        loss = ((1.0 - scores) * weight).mean()
        reg = torch.zeros((), dtype=scores.dtype, device=scores.device)
        if cfg.regularizer != "none" and epoch >= cfg.regularizer_start_epoch and cfg.regularizer_weight > 0:
            diff = out_m - tgt_m
            per_slice = diff.abs() if cfg.regularizer == "l1" else diff.square()
            reg = (per_slice.mean(dim=(-2, -1)) * weight).mean() * cfg.regularizer_weight
            loss = loss + reg
        return LossOutput(loss=loss, ssim=scores.detach(), weight=weight.detach(), regularizer=reg.detach())
