"""k-space column-mask augmentation: the team's "Hacker" and "Helper" re-masking (docs/pipeline.md 4.3).

Every training slice arrives with its file's 1-D column mask ``(W,)``. The augmenter decides, per
sample, which mask the engine applies to the fully sampled k-space:

* ``"hacker"``: the mask is **always** replaced by the public pattern (``recon.masks.public_mask``) at
  an acceleration drawn uniformly from ``accelerations`` (default ``{4, 8}``), independent of the file's
  acceleration. ``p`` is ignored, as in the team's code (it bypassed the schedule from epoch 0).
* ``"helper"``: with probability ``p`` the mask is replaced, otherwise the file mask is kept. A
  replacement draws ``acc`` from ``accelerations``, then with probability ``random_fraction`` a random
  mask (every column kept i.i.d. with probability ``1 / acc``) and otherwise an equispaced mask with a
  uniformly drawn start in ``0..acc-1``; both carry the centred ACS block of ``round(center_fraction W)``
  columns.
* ``"off"``: the file mask is always kept.

From ``exclude_public_from_epoch`` on, the Helper never *draws* the public pattern: the equispaced
start comes from ``{0..acc-1} \\ {(W // 2) % acc}`` and a random mask equal to the public pattern (at
any configured acceleration) is drawn again. (For tiny widths only, an equispaced start whose mask
coincides with the public pattern of another acceleration is dropped as well.) The team meant to do
this but compared ``start == W // 2``, which can never hold for ``start < acc`` (docs/pipeline.md 6.3); the
correct public start is ``(W // 2) % acc``. Kept file masks are public masks by construction
(docs/challenge.md 1.2) and are not affected: exclusion concerns the replacement draws only; use ``p = 1``
to replace every mask.

Randomness comes only from the ``numpy.random.Generator`` that the caller passes per sample; the
global NumPy state is never touched. ``p`` comes from the engine's schedule (for the team: the
exponential ramp, 0 before epoch 15 and 1 from epoch 25).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from recon.masks import acs_width, equispaced_mask, infer_acc, public_start, random_mask
from recon.sections import Section

logger = logging.getLogger(__name__)

MaskAugMode = Literal["hacker", "helper", "off"]
MaskKind = Literal["file", "public", "random", "equispaced"]

MASK_AUG_MODES = ("hacker", "helper", "off")
# Redraws allowed for a random mask that equals the public pattern. For real widths the chance of
# one hit is astronomically small; the bound only stops a loop for degenerate tiny widths.
_MAX_RANDOM_REDRAWS = 1000


@dataclass(frozen=True)
class MaskAugConfig(Section):
    """Settings of the mask augmentation.

    Attributes:
        mode: ``"hacker"`` (always the public pattern), ``"helper"`` (replace with probability p),
            or ``"off"`` (keep the file mask).
        accelerations: accelerations drawn uniformly for a replacement mask.
        random_fraction: Helper only: share of random masks among replacements (the rest are
            equispaced).
        exclude_public_from_epoch: Helper only: from this epoch on (inclusive) a replacement never
            has the public pattern; None = never. The team's README intent is 30.
        center_fraction: ACS width as a fraction of W (0.08 is the public pattern's).
    """

    mode: MaskAugMode = "off"
    accelerations: tuple[int, ...] = (4, 8)
    random_fraction: float = 0.5
    exclude_public_from_epoch: int | None = None
    center_fraction: float = 0.08

    def validate(self) -> None:
        """Check the values (run on construction, see :class:`recon.sections.Section`)."""
        accs = self.accelerations
        self.require(bool(accs) and min(accs) >= 2, "accelerations", "must be a non-empty list of integers >= 2")
        self.require(0.0 <= self.random_fraction <= 1.0, "random_fraction", "must be in [0, 1]")
        first = self.exclude_public_from_epoch
        self.require(first is None or first >= 0, "exclude_public_from_epoch", "must be null or an epoch >= 0")
        self.require(0.0 < self.center_fraction <= 1.0, "center_fraction", "must be in (0, 1]")


@dataclass(frozen=True)
class MaskDecision:
    """The mask chosen for one training sample.

    Attributes:
        mask: ``float32`` 0/1 column mask, shape ``(W,)`` (a fresh array, never the caller's).
        acc: acceleration of the mask (for a kept file mask: inferred with ``recon.masks.infer_acc``).
            The MoE engine routes on this value.
        kind: ``"file"`` (kept), ``"public"`` (Hacker), ``"random"`` or ``"equispaced"`` (Helper).
        start: first equispaced column for ``"public"``/``"equispaced"``, else None.
    """

    mask: np.ndarray
    acc: int
    kind: MaskKind
    start: int | None


class MaskAugmenter:
    """Per-sample mask replacement (see the module docstring for the rules).

    Args:
        cfg: the settings.
    """

    def __init__(self, cfg: MaskAugConfig) -> None:
        self.cfg = cfg

    def remask_probability(self, p: float) -> float:
        """The probability that a training slice's file mask is replaced, given the schedule's ``p``.

        This is what happens, whatever the schedule says: 1 for ``"hacker"`` (always the public
        pattern), ``p`` for ``"helper"``, 0 for ``"off"``. The engine logs it as ``schedule/p_remask``.
        """
        return {"hacker": 1.0, "helper": float(p)}.get(self.cfg.mode, 0.0)

    def excluding_public(self, epoch: int) -> bool:
        """Whether the Helper excludes the public pattern at ``epoch``."""
        first = self.cfg.exclude_public_from_epoch
        return first is not None and epoch >= first

    def __call__(self, mask: np.ndarray, epoch: int, p: float, rng: np.random.Generator) -> MaskDecision:
        """Choose the mask for one sample.

        Args:
            mask: the file's column mask, shape ``(W,)``, values 0/1.
            epoch: the current (0-based) epoch; only the public-start exclusion reads it.
            p: Helper replacement probability in ``[0, 1]`` (ignored by ``"hacker"`` and ``"off"``).
            rng: the sample's generator; the only source of randomness.

        Returns:
            The :class:`MaskDecision`.

        Raises:
            ValueError: ``mask`` is not 1-D with W >= 2, or ``p`` is outside ``[0, 1]``.
        """
        file_mask = np.asarray(mask)
        if file_mask.ndim != 1 or file_mask.shape[0] < 2:
            raise ValueError(f"mask augmentation expects a 1-D column mask (W,) with W >= 2, got {file_mask.shape}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mask augmentation probability must be in [0, 1], got {p}")
        width = int(file_mask.shape[0])
        mode = self.cfg.mode
        if mode == "hacker":
            return self._public(width, rng)
        if mode == "helper" and rng.random() < p:
            return self._helper_draw(width, self.excluding_public(epoch), rng)
        return MaskDecision(
            mask=(file_mask != 0).astype(np.float32), acc=infer_acc(file_mask), kind="file", start=None
        )

    def _n_acs(self, width: int) -> int:
        return acs_width(width, self.cfg.center_fraction)

    def _draw_acc(self, rng: np.random.Generator) -> int:
        accs = self.cfg.accelerations
        return accs[int(rng.integers(len(accs)))]

    def _public(self, width: int, rng: np.random.Generator) -> MaskDecision:
        acc = self._draw_acc(rng)
        start = public_start(width, acc)
        mask = equispaced_mask(width, acc, start, n_acs=self._n_acs(width))
        return MaskDecision(mask=mask, acc=acc, kind="public", start=start)

    def _helper_draw(self, width: int, exclude: bool, rng: np.random.Generator) -> MaskDecision:
        acc = self._draw_acc(rng)
        n_acs = self._n_acs(width)
        if rng.random() < self.cfg.random_fraction:
            return MaskDecision(mask=self._random(width, acc, n_acs, exclude, rng), acc=acc, kind="random", start=None)
        starts = list(range(acc))
        if exclude:
            # Drop the public start, and (only possible for tiny W) any start whose mask coincides with
            # the public pattern of another configured acceleration.
            public = self._public_patterns(width, n_acs)
            starts = [
                s for s in starts
                if s != public_start(width, acc)
                and not any(np.array_equal(equispaced_mask(width, acc, s, n_acs=n_acs) != 0, pub) for pub in public)
            ]
            if not starts:
                raise ValueError(f"mask augmentation: every equispaced start is public for W={width}, acc={acc}")
        start = starts[int(rng.integers(len(starts)))]
        return MaskDecision(
            mask=equispaced_mask(width, acc, start, n_acs=n_acs), acc=acc, kind="equispaced", start=start
        )

    def _public_patterns(self, width: int, n_acs: int) -> list[np.ndarray]:
        return [equispaced_mask(width, a, public_start(width, a), n_acs=n_acs) != 0 for a in self.cfg.accelerations]

    def _random(self, width: int, acc: int, n_acs: int, exclude: bool, rng: np.random.Generator) -> np.ndarray:
        mask = random_mask(width, acc, rng, n_acs=n_acs)
        if not exclude:
            return mask
        public = self._public_patterns(width, n_acs)
        for _ in range(_MAX_RANDOM_REDRAWS):
            if not any(np.array_equal(mask != 0, pub) for pub in public):
                return mask
            mask = random_mask(width, acc, rng, n_acs=n_acs)
        raise ValueError(
            f"mask augmentation: could not draw a non-public random mask for W={width}, acc={acc} "
            f"in {_MAX_RANDOM_REDRAWS} tries (the width is too small)"
        )
