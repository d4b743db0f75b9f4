"""MRAugment on fully sampled multi-coil k-space, with an explicit target rule (docs/pipeline.md 4.4, 4.7, 6.1).

For one training sample the augmenter

1. goes to complex coil images with ``ifft2c`` (all adjacent slices and coils at once);
2. applies the pixel-preserving transforms in this order: horizontal flip (columns, ``j -> W-1-j``),
   vertical flip (rows), rot90 by ``k`` quarter turns, integer translation with ``"reflect"`` padding;
3. applies ONE combined affine map (rotation, shear x/y, isotropic scale about the image centre)
   with a single ``grid_sample`` call and ``"reflection"`` padding, on the real and imaginary parts
   of every coil and adjacent slice stacked as channels (no loop over coils);
4. returns the new k-space ``fft2c(images)``. The engine applies the mask afterwards.

Each transform fires independently with probability ``min(1, weight * p)``; ``p`` comes from the
engine's schedule (the team: exponential ramp in absolute epochs, start 33, plateau 50, p_max 0.5),
the stage's ``p_aug`` with the changes of the slice's anatomy (``mraugment.brain.schedule`` /
``mraugment.knee.schedule``: ``start``, ``plateau``, ``p_max``; unset = the stage's value). The team
ran one augmenter per anatomy with its own ``aug_delay`` and ``aug_strength``, both 3 and 0.5, so the
default (no changes) is what it ran. ``magnitude`` multiplies every magnitude limit; it is not the
team's ``aug_strength``, which is ``p_aug.p_max``.

**Target rule** (``MRAugmentConfig.target``), one rule for augmented and un-augmented samples:

* ``"label"`` (default): the stored ``image_label`` is returned untouched for an un-augmented sample
  and, for an augmented one, transformed with the SAME geometry. The label is the centre crop
  ``(h, w)`` of the RSS of the ``(H, W)`` image (``recon.fft.center_crop`` rule), so it is placed on a
  canvas of the image grid at exactly that crop window, the canvas goes through the very same ops as
  the coil images (it is one more channel of the stack), and the result is centre-cropped back. The
  canvas outside the window (which translations and the affine map can move into view) is filled by
  ``label_fill``: ``"rss"`` (the RSS of the centre slice's coil images, i.e. the true neighbourhood if
  the label is the RSS crop) or ``"reflect"`` (the label mirrored at its own border). A flip is exact
  when ``H - h`` (resp. ``W - w``) is even, as for all challenge data; otherwise the crop window is not
  symmetric about the image centre and the flipped label is shifted by one pixel, whose edge row/column
  comes from the fill. When the label is wider than the image (W=320 vs 384), its columns outside the
  image grid are zero padding and come back as zeros.
* ``"rss"``: ``center_crop(rss(ifft2c(new kspace)), h, w)`` of the centre slice, for every sample,
  even when nothing fires and even when ``p = 0``: that is the rule's point (the team's code switched
  silently to it once ``p > 0``, docs/pipeline.md 6.1). The crop size is the given target's or
  ``target_size``.

When nothing fires, the k-space is returned untouched (the same tensor object, not a copy).

Differences from upstream MRAugment (facts from docs/pipeline.md 4.7, behaviour re-designed here):
translation x is along columns (W) and y along rows (H), each as a fraction of its own axis; the
affine map samples with reflection instead of padding to a bounding box, affine and cropping back;
every call draws the same number of random variates (a fixed order), so a seed fully defines a sample;
rot90 with ``k`` odd is only used for square images (``H == W``), otherwise ``k = 2`` (the only
shape-preserving quarter-turn multiple).
"""

from __future__ import annotations

import logging
import math
import dataclasses
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from recon.fft import center_crop, fft2c, ifft2c, rss
from recon.schedules import RampScheduleConfig
from recon.sections import FieldError, Section

logger = logging.getLogger(__name__)

TargetRule = Literal["label", "rss"]
LabelFill = Literal["rss", "reflect"]
Interpolation = Literal["bilinear", "bicubic"]

# The order in which the fire decisions are drawn (one uniform each, every call).
TRANSFORMS = ("fliph", "flipv", "rot90", "translation", "rotation", "shearing", "scaling")


@dataclass(frozen=True)
class ScheduleChanges(Section):
    """One anatomy's changes to the stage's ``p_aug`` schedule; ``None`` keeps the stage's value.

    Attributes:
        start: absolute epoch from which this anatomy is augmented (the team's ``aug_delay`` plus the
            stage's first epoch).
        plateau: epoch from which ``p = p_max``.
        p_max: the final probability (the team's ``aug_strength``).
    """

    start: int | None = None
    plateau: int | None = None
    p_max: float | None = None

    def changes(self) -> dict[str, int | float]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class AnatomyAugConfig(Section):
    """Weights and limits of the transforms for one anatomy.

    Attributes:
        translation_weight: weight of the integer translation.
        max_translation_x: largest |shift| along columns, as a fraction of W.
        max_translation_y: largest |shift| along rows, as a fraction of H.
        rotation_weight: weight of the rotation.
        max_rotation: largest |angle| in degrees.
        shearing_weight: weight of the shear.
        max_shear_x: largest |shear angle| along x in degrees.
        max_shear_y: largest |shear angle| along y in degrees.
        scaling_weight: weight of the isotropic scale.
        max_scaling: scale drawn in ``[1 - max_scaling, 1 + max_scaling]``.
        fliph_weight: weight of the horizontal (column) flip.
        flipv_weight: weight of the vertical (row) flip.
        rot90_weight: weight of the rotation by a multiple of 90 degrees.
        interpolation: ``"bilinear"`` or ``"bicubic"`` for the affine resampling.
        schedule: this anatomy's changes to the stage's ``p_aug`` (none by default).
    """

    translation_weight: float = 0.0
    max_translation_x: float = 0.0
    max_translation_y: float = 0.0
    rotation_weight: float = 0.0
    max_rotation: float = 0.0
    shearing_weight: float = 0.0
    max_shear_x: float = 0.0
    max_shear_y: float = 0.0
    scaling_weight: float = 0.0
    max_scaling: float = 0.0
    fliph_weight: float = 0.0
    flipv_weight: float = 0.0
    rot90_weight: float = 0.0
    interpolation: Interpolation = "bilinear"
    schedule: ScheduleChanges = field(default_factory=ScheduleChanges)

    def validate(self) -> None:
        """Check the limits (run on construction, see :class:`recon.sections.Section`)."""
        for f in fields(self):
            if f.name not in ("interpolation", "schedule"):
                self.require(getattr(self, f.name) >= 0, f.name, "must be a number >= 0")
        self.require(self.max_scaling < 1.0, "max_scaling", "must be < 1")
        for name in ("max_shear_x", "max_shear_y"):
            self.require(getattr(self, name) < 90.0, name, "must be an angle < 90 degrees")

    def weight(self, transform: str) -> float:
        """The weight of one of :data:`TRANSFORMS`."""
        return float(getattr(self, f"{transform}_weight"))


# The team's settings (docs/pipeline.md 4.4 table); upsampling is off in both.
BRAIN = AnatomyAugConfig(
    translation_weight=1.0, max_translation_x=0.03, max_translation_y=0.05,
    rotation_weight=1.0, max_rotation=5.0,
    shearing_weight=1.0, max_shear_x=5.0, max_shear_y=5.0,
    scaling_weight=1.0, max_scaling=0.12,
    fliph_weight=0.4, flipv_weight=0.0, rot90_weight=0.0,
    interpolation="bilinear",
)
KNEE = AnatomyAugConfig(
    translation_weight=1.0, max_translation_x=0.08, max_translation_y=0.08,
    rotation_weight=1.0, max_rotation=5.0,
    shearing_weight=1.0, max_shear_x=10.0, max_shear_y=10.0,
    scaling_weight=1.0, max_scaling=0.12,
    fliph_weight=0.5, flipv_weight=0.0, rot90_weight=0.0,
    interpolation="bilinear",
)


@dataclass(frozen=True)
class MRAugmentConfig(Section):
    """Settings of MRAugment.

    Attributes:
        enabled: False forces ``p = 0`` (the target rule still applies).
        target: ``"label"`` or ``"rss"`` (module docstring).
        label_fill: ``"rss"`` or ``"reflect"``: what surrounds the label on its canvas (``"label"`` rule).
        brain: settings for brain slices.
        knee: settings for knee slices.
        magnitude: multiplier on every magnitude limit (translation, rotation, shear, scale deviation);
            1.0 = the table. Probabilities are set by ``p`` alone (the team's ``aug_strength`` is
            ``p_aug.p_max``, not this).
        target_size: crop size of the ``"rss"`` target when no target is given.
    """

    enabled: bool = False
    target: TargetRule = "label"
    label_fill: LabelFill = "rss"
    brain: AnatomyAugConfig = BRAIN
    knee: AnatomyAugConfig = KNEE
    magnitude: float = 1.0
    target_size: tuple[int, int] = field(default=(384, 384))

    RENAMED: ClassVar[dict[str, tuple[str, str]]] = {
        "strength": ("magnitude", "a multiplier on the magnitude limits; the team's aug_strength is p_aug.p_max"),
    }

    def validate(self) -> None:
        """Check the values (run on construction, see :class:`recon.sections.Section`)."""
        self.require(self.magnitude >= 0, "magnitude", "must be a number >= 0")
        scaling = max(self.brain.max_scaling, self.knee.max_scaling)
        self.require(self.magnitude * scaling < 1.0, "magnitude",
                     f"must keep magnitude * max_scaling < 1 (max_scaling is {scaling})")
        shear = max(self.brain.max_shear_x, self.brain.max_shear_y, self.knee.max_shear_x, self.knee.max_shear_y)
        self.require(self.magnitude * shear < 90.0, "magnitude",
                     f"must keep magnitude * max_shear < 90 degrees (max_shear is {shear})")
        self.require(min(self.target_size) >= 1, "target_size", "must be two positive integers")

    def schedule_for(self, anatomy: str, base: RampScheduleConfig) -> RampScheduleConfig:
        """The ``p_aug`` schedule of one anatomy: ``base`` with the anatomy's :class:`ScheduleChanges`.

        Args:
            anatomy: ``"brain"`` or ``"knee"``.
            base: the stage's ``p_aug``.

        Returns:
            ``base`` itself when the anatomy changes nothing, else a new schedule.

        Raises:
            FieldError: the changes make no valid schedule (field ``{anatomy}.schedule.<name>``), or
                they are set while ``base.kind`` is ``"off"`` (they would have no effect).
        """
        changes = self.anatomy(anatomy).schedule.changes()
        if not changes:
            return base
        first = next(iter(changes))
        if base.kind == "off":
            raise FieldError(f"{anatomy}.schedule.{first}", "has no effect while p_aug.kind is 'off' (set p_aug.kind)",
                             changes[first])
        try:
            return dataclasses.replace(base, **changes)
        except FieldError as exc:
            if exc.field in changes:
                raise FieldError(f"{anatomy}.schedule.{exc.field}", exc.message, changes[exc.field]) from None
            raise FieldError(f"{anatomy}.schedule.{first}", f"with p_aug.{exc.field} = {getattr(base, exc.field)}, "
                             f"{exc.field} {exc.message}", changes[first]) from None

    def anatomy(self, name: str) -> AnatomyAugConfig:
        """The settings for ``"brain"`` or ``"knee"``.

        Raises:
            ValueError: any other name.
        """
        if name == "brain":
            return self.brain
        if name == "knee":
            return self.knee
        raise ValueError(f"MRAugment: anatomy must be 'brain' or 'knee', got {name!r}")


@dataclass(frozen=True)
class AugResult:
    """One augmented sample.

    Attributes:
        kspace: complex k-space, same shape, dtype and device as the input (the input object itself
            when nothing fired).
        target: real ``(h, w)`` target by the configured rule, or None (``"label"`` rule, no target given).
        applied: the drawn parameters (``p``, ``fliph``, ``flipv``, ``rot90`` (k, 0 = off),
            ``translation_x``/``translation_y`` (pixels), ``rotation``, ``shear_x``, ``shear_y``
            (degrees), ``scale``, ``affine`` (whether the resampling ran); the values of transforms that
            did not fire are neutral).
        augmented: whether any transform fired.
    """

    kspace: torch.Tensor
    target: torch.Tensor | None
    applied: dict[str, float | int | bool]
    augmented: bool


def _reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map integer positions onto ``0..n-1`` by mirror reflection without edge repeat (``"reflect"``)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx > n - 1, period - idx, idx)


def _crop_offset(size: int, crop: int) -> int:
    """Image index of crop index 0 under ``recon.fft.center_crop`` (negative when the crop pads)."""
    return (size - crop) // 2 if size >= crop else size // 2 - crop // 2


def _shift_reflect(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., r, c] = x[..., r - dy, c - dx]`` with ``"reflect"`` padding (any shift size)."""
    h, w = x.shape[-2:]
    if not dy and not dx:
        return x
    if abs(dy) < h and abs(dx) < w and x.ndim == 4:
        # One reflect-padded copy and a view of it (F.pad's "reflect" needs pad < size and a batch axis).
        padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="reflect")
        top, left = max(-dy, 0), max(-dx, 0)
        return padded[..., top:top + h, left:left + w]
    if dy:
        rows = _reflect_index(torch.arange(h, device=x.device) - dy, h)
        x = x.index_select(-2, rows)
    if dx:
        cols = _reflect_index(torch.arange(w, device=x.device) - dx, w)
        x = x.index_select(-1, cols)
    return x


def _affine_theta(rotation: float, shear_x: float, shear_y: float, scale: float, h: int, w: int) -> np.ndarray:
    """``affine_grid`` matrix (2, 3) that resamples with the forward map ``s * R(rot) @ Sh_y @ Sh_x``.

    The map acts on pixel offsets ``(x, y)`` (x along columns, y along rows, row 0 on top) from the
    image centre ``((W-1)/2, (H-1)/2)``; a positive angle turns the image counter-clockwise as displayed.
    ``grid_sample`` needs the inverse map, expressed in normalised coordinates (``align_corners=False``:
    a pixel offset is ``(W/2, H/2)`` times the normalised one).
    """
    rot, sx, sy = (math.radians(a) for a in (rotation, shear_x, shear_y))
    r = np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])
    shx = np.array([[1.0, math.tan(sx)], [0.0, 1.0]])
    shy = np.array([[1.0, 0.0], [math.tan(sy), 1.0]])
    forward = scale * r @ shy @ shx
    to_pixels = np.diag([w / 2.0, h / 2.0])
    inverse_normalised = np.linalg.inv(to_pixels) @ np.linalg.inv(forward) @ to_pixels
    return np.concatenate([inverse_normalised, np.zeros((2, 1))], axis=1)


class MRAugmenter:
    """MRAugment for one sample at a time (see the module docstring).

    Args:
        cfg: the settings.
    """

    def __init__(self, cfg: MRAugmentConfig) -> None:
        self.cfg = cfg

    def draw(self, anatomy: str, p: float, height: int, width: int,
             rng: np.random.Generator) -> dict[str, float | int | bool]:
        """Draw the parameters of one sample (always 7 fire uniforms then 7 parameter variates).

        Args:
            anatomy: ``"brain"`` or ``"knee"``.
            p: augmentation probability in ``[0, 1]``.
            height: image height H.
            width: image width W.
            rng: the sample's generator.

        Returns:
            The ``applied`` dictionary of :class:`AugResult`.
        """
        a = self.cfg.anatomy(anatomy)
        p = p if self.cfg.enabled else 0.0
        s = self.cfg.magnitude
        fire_u = rng.random(len(TRANSFORMS))
        fire = {t: bool(u < min(1.0, a.weight(t) * p)) for t, u in zip(TRANSFORMS, fire_u)}
        # k is drawn for every shape so that the stream does not depend on it; odd k only when square.
        k = int(rng.integers(1, 4))
        k = k if height == width else 2
        tx, ty, rot, shx, shy, sc = rng.uniform(-1.0, 1.0, size=6)
        return {
            "p": float(p),
            "fliph": fire["fliph"],
            "flipv": fire["flipv"],
            "rot90": k if fire["rot90"] else 0,
            "translation_x": int(round(tx * s * a.max_translation_x * width)) if fire["translation"] else 0,
            "translation_y": int(round(ty * s * a.max_translation_y * height)) if fire["translation"] else 0,
            "rotation": float(rot * s * a.max_rotation) + 0.0 if fire["rotation"] else 0.0,
            "shear_x": float(shx * s * a.max_shear_x) + 0.0 if fire["shearing"] else 0.0,
            "shear_y": float(shy * s * a.max_shear_y) + 0.0 if fire["shearing"] else 0.0,
            "scale": float(1.0 + sc * s * a.max_scaling) if fire["scaling"] else 1.0,
            "affine": fire["rotation"] or fire["shearing"] or fire["scaling"],
            "augmented": any(fire.values()),
        }

    def __call__(self, kspace: torch.Tensor, target: torch.Tensor | None, anatomy: str, p: float,
                 rng: np.random.Generator) -> AugResult:
        """Augment one fully sampled sample.

        Args:
            kspace: complex fully sampled k-space ``(A, C, H, W)`` (A adjacent slices) or ``(C, H, W)``.
            target: the stored label ``(h, w)`` of the centre slice ``A // 2``, real, same device; or None.
            anatomy: ``"brain"`` or ``"knee"``.
            p: augmentation probability in ``[0, 1]``.
            rng: the sample's generator (the only source of randomness).

        Returns:
            The :class:`AugResult`.

        Raises:
            ValueError: wrong dtype, rank, shape or device, an unknown anatomy or ``p`` outside ``[0, 1]``.
        """
        self._check(kspace, target, p)
        height, width = kspace.shape[-2:]
        applied = self.draw(anatomy, p, height, width, rng)
        augmented = bool(applied.pop("augmented"))
        crop = tuple(target.shape) if target is not None else self.cfg.target_size
        real_dtype = kspace.real.dtype
        if not augmented:
            out_target: torch.Tensor | None = target
            if self.cfg.target == "rss":
                out_target = center_crop(rss(ifft2c(self._centre(kspace))), *crop).contiguous()
            elif target is not None:
                out_target = target.to(real_dtype)
            return AugResult(kspace=kspace, target=out_target, applied=applied, augmented=False)

        images = ifft2c(kspace)
        batched = images if images.ndim == 4 else images.unsqueeze(0)
        n_slices, n_coils = batched.shape[:2]
        stack = torch.view_as_real(batched).permute(0, 1, 4, 2, 3).reshape(1, n_slices * n_coils * 2, height, width)
        with_label = self.cfg.target == "label" and target is not None
        if with_label:
            canvas = self._label_canvas(target.to(real_dtype), batched[n_slices // 2])
            stack = torch.cat([stack, canvas[None, None]], dim=1)
        stack = self._geometry(stack, applied, self.cfg.anatomy(anatomy).interpolation)

        out_images = torch.view_as_complex(
            stack[:, : n_slices * n_coils * 2].reshape(n_slices, n_coils, 2, height, width)
            .permute(0, 1, 3, 4, 2).contiguous()
        )
        if with_label:
            out_target = center_crop(stack[0, -1], *crop).contiguous()
        elif self.cfg.target == "rss":
            out_target = center_crop(rss(out_images[n_slices // 2]), *crop).contiguous()
        else:
            out_target = None
        new_kspace = fft2c(out_images)
        if kspace.ndim == 3:
            new_kspace = new_kspace.squeeze(0)
        logger.debug("MRAugment %s: %s", anatomy, applied)
        return AugResult(kspace=new_kspace, target=out_target, applied=applied, augmented=True)

    @staticmethod
    def _centre(kspace: torch.Tensor) -> torch.Tensor:
        return kspace[kspace.shape[0] // 2] if kspace.ndim == 4 else kspace

    @staticmethod
    def _check(kspace: torch.Tensor, target: torch.Tensor | None, p: float) -> None:
        if not isinstance(kspace, torch.Tensor) or not torch.is_complex(kspace):
            got = getattr(kspace, "dtype", type(kspace))
            raise ValueError(f"MRAugment: kspace must be a complex tensor, got {got}")
        if kspace.ndim not in (3, 4) or min(kspace.shape[-2:]) < 2:
            raise ValueError(f"MRAugment: kspace must be (A, C, H, W) or (C, H, W) with H, W >= 2, "
                             f"got {tuple(kspace.shape)}")
        if target is not None:
            if target.ndim != 2 or torch.is_complex(target):
                raise ValueError(f"MRAugment: target must be a real (h, w) tensor, got {tuple(target.shape)} "
                                 f"{target.dtype}")
            if target.device != kspace.device:
                raise ValueError(f"MRAugment: target on {target.device} but kspace on {kspace.device}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"MRAugment: p must be in [0, 1], got {p}")

    def _label_canvas(self, label: torch.Tensor, centre_images: torch.Tensor) -> torch.Tensor:
        """The label on the image grid ``(H, W)`` at its crop window, surrounded by ``label_fill``."""
        height, width = centre_images.shape[-2:]
        h, w = label.shape
        top, left = _crop_offset(height, h), _crop_offset(width, w)
        rows = torch.arange(height, device=label.device) - top
        cols = torch.arange(width, device=label.device) - left
        if self.cfg.label_fill == "reflect":
            return label.index_select(0, _reflect_index(rows, h)).index_select(1, _reflect_index(cols, w))
        canvas = rss(centre_images).to(label.dtype)
        r0, r1 = max(top, 0), min(height, top + h)
        c0, c1 = max(left, 0), min(width, left + w)
        canvas[r0:r1, c0:c1] = label[r0 - top:r1 - top, c0 - left:c1 - left]
        return canvas

    @staticmethod
    def _geometry(stack: torch.Tensor, applied: dict[str, float | int | bool], interpolation: str) -> torch.Tensor:
        """Apply the drawn transforms to a real stack ``(1, N, H, W)``, all channels at once."""
        if applied["fliph"]:
            stack = stack.flip(-1)
        if applied["flipv"]:
            stack = stack.flip(-2)
        if applied["rot90"]:
            stack = torch.rot90(stack, int(applied["rot90"]), dims=(-2, -1))
        stack = _shift_reflect(stack, int(applied["translation_y"]), int(applied["translation_x"]))
        if applied["affine"]:
            height, width = stack.shape[-2:]
            theta = _affine_theta(float(applied["rotation"]), float(applied["shear_x"]), float(applied["shear_y"]),
                                  float(applied["scale"]), height, width)
            theta_t = torch.as_tensor(theta, dtype=stack.dtype, device=stack.device).unsqueeze(0)
            grid = F.affine_grid(theta_t, list(stack.shape), align_corners=False)
            stack = F.grid_sample(stack, grid, mode=interpolation, padding_mode="reflection", align_corners=False)
        return stack
