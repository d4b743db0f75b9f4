"""1-D column undersampling masks of the SNU FastMRI Challenge, and tests on them.

A mask is a ``float32`` NumPy array of shape ``(W,)`` with values 0/1 that selects k-space columns
(the last axis, phase encoding). The public challenge pattern ("hacked" pattern in the team's
words) is::

    n_acs = round(0.08 * W) centred columns [(W - n_acs + 1) // 2, ... + n_acs)
    plus every acc-th column from start = (W // 2) % acc

so the centre column ``W // 2`` is always sampled. Generators that need randomness take an explicit
``numpy.random.Generator`` and never touch global RNG state.
"""

from __future__ import annotations

import numpy as np

PUBLIC_CENTER_FRACTION = 0.08
# The team's rule: acc4 masks sample about 31 % of columns, acc8 about 19 %.
ACC_RATIO_THRESHOLD = 0.24


def _check_width(width: int) -> None:
    if width < 2:
        raise ValueError(f"mask width must be >= 2, got {width}")


def _check_acc(acc: int) -> None:
    if acc < 1:
        raise ValueError(f"acceleration must be >= 1, got {acc}")


def acs_width(width: int, center_fraction: float = PUBLIC_CENTER_FRACTION) -> int:
    """Number of fully sampled centre columns: ``round(center_fraction * width)``.

    Args:
        width: k-space width W.
        center_fraction: fraction of W that is fully sampled.

    Returns:
        The ACS width (at least 1).
    """
    _check_width(width)
    return max(1, int(round(center_fraction * width)))


def acs_bounds(width: int, n_acs: int) -> tuple[int, int]:
    """Half-open column range ``[start, stop)`` of a centred ACS block of ``n_acs`` columns."""
    if not 0 < n_acs <= width:
        raise ValueError(f"ACS width must be in 1..{width}, got {n_acs}")
    start = (width - n_acs + 1) // 2
    return start, start + n_acs


def public_start(width: int, acc: int) -> int:
    """First equispaced column of the public pattern: ``(W // 2) % acc``."""
    _check_acc(acc)
    return (width // 2) % acc


def equispaced_mask(width: int, acc: int, start: int, n_acs: int | None = None) -> np.ndarray:
    """Every ``acc``-th column from ``start`` plus a centred ACS block.

    Args:
        width: k-space width W.
        acc: acceleration (column spacing).
        start: first sampled column, ``0 <= start < acc``.
        n_acs: ACS width; ``round(0.08 W)`` when None.

    Returns:
        ``float32`` mask of shape ``(W,)``.
    """
    _check_width(width)
    _check_acc(acc)
    if not 0 <= start < acc:
        raise ValueError(f"equispaced start must be in 0..{acc - 1} for acc={acc}, got {start}")
    n_acs = acs_width(width) if n_acs is None else n_acs
    mask = np.zeros(width, dtype=np.float32)
    lo, hi = acs_bounds(width, n_acs)
    mask[lo:hi] = 1.0
    mask[start::acc] = 1.0
    return mask


def public_mask(width: int, acc: int) -> np.ndarray:
    """The public SNU pattern for a width and acceleration (see module docstring)."""
    return equispaced_mask(width, acc, public_start(width, acc))


def random_mask(width: int, acc: int, rng: np.random.Generator, n_acs: int | None = None) -> np.ndarray:
    """Columns kept i.i.d. with probability ``1 / acc``, plus a centred ACS block.

    Args:
        width: k-space width W.
        acc: acceleration.
        rng: the caller's generator (global state is never used).
        n_acs: ACS width; ``round(0.08 W)`` when None.

    Returns:
        ``float32`` mask of shape ``(W,)``.
    """
    _check_width(width)
    _check_acc(acc)
    n_acs = acs_width(width) if n_acs is None else n_acs
    mask = (rng.random(width) < 1.0 / acc).astype(np.float32)
    lo, hi = acs_bounds(width, n_acs)
    mask[lo:hi] = 1.0
    return mask


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise ValueError(f"a column mask must be 1-D (W,), got shape {mask.shape}")
    _check_width(mask.shape[0])
    return mask


def infer_acc(mask: np.ndarray) -> int:
    """Acceleration of a challenge mask from its sampled fraction (the team's rule).

    Returns 4 when more than 24 % of the columns are sampled, else 8. The 2025 challenge has only
    these two accelerations.
    """
    mask = _as_mask(mask)
    ratio = float(np.count_nonzero(mask)) / mask.shape[0]
    return 4 if ratio > ACC_RATIO_THRESHOLD else 8


def detect_acs_width(mask: np.ndarray) -> int:
    """ACS width as PromptMR+ infers it: ``2 * min(left, right)`` of the sampled run at ``W // 2``.

    ``left`` counts sampled columns from ``W // 2 - 1`` leftwards and ``right`` from ``W // 2``
    rightwards, both stopping at the first gap. Returns 0 when the centre column is not sampled.
    """
    mask = _as_mask(mask) != 0
    width = mask.shape[0]
    centre = width // 2
    right = 0
    while centre + right < width and mask[centre + right]:
        right += 1
    left = 0
    while centre - left - 1 >= 0 and mask[centre - left - 1]:
        left += 1
    return 2 * min(left, right)


def is_public_pattern(mask: np.ndarray) -> bool:
    """The Broker's test: is ``mask`` exactly the public pattern for its width and acceleration?"""
    mask = _as_mask(mask)
    ideal = public_mask(mask.shape[0], infer_acc(mask))
    return bool(np.array_equal(mask != 0, ideal != 0))
