"""A vectorised NumPy GRAPPA for 1-D column undersampling (the generator's ``image_grappa``).

Standard 1-D GRAPPA (Griswold et al., MRM 2002): every missing column is a linear combination, over
all coils, of ``kx`` read-out neighbours on ``ky`` nearby *grid* columns (the equispaced columns
``start, start + acc, ...``). One kernel is fitted per offset ``r`` of the missing column from the
previous grid column, by Tikhonov-regularised least squares on the fully sampled ACS block.
Acquired columns are kept as they are.

Implementation notes:

* The kernel is applied as a sum over the ``ky * kx`` source shifts of a ``(C, C)`` matrix times a
  shifted view of the padded k-space, so no large patch matrix is built.
* When the ACS block is too narrow for a kernel (it must span ``ky`` grid columns plus the
  target), the farthest source columns are dropped until it fits; with the public masks
  (ACS = 8 % of W) this keeps at least the nearest grid column even at W = 64, acc = 8.
* The regulariser is relative: ``lambda * trace(A^H A) / n_unknowns``. A larger ``lambda``
  trades residual aliasing for less noise amplification.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_controller: Any = None


def single_thread_blas() -> AbstractContextManager[Any]:
    """Limit BLAS to one thread inside the ``with`` block, when ``threadpoolctl`` is importable.

    GRAPPA makes many small matrix products and solves; OpenBLAS's threads make those 10-100x
    slower on a busy 2-core machine (measured: the tiny data set takes 0.9 s single-threaded and
    5-9 s with two BLAS threads while other jobs run). ``threadpoolctl`` is optional; without it
    nothing changes. The previous limits are restored on exit.
    """
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional dependency
        return nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def _acs_block(mask: np.ndarray) -> tuple[int, int]:
    """The longest run of sampled columns that contains the centre column ``W // 2``."""
    width = mask.shape[0]
    centre = width // 2
    if not mask[centre]:
        raise ValueError("GRAPPA needs an ACS block: the centre column W//2 of the mask is not sampled")
    lo = centre
    while lo > 0 and mask[lo - 1]:
        lo -= 1
    hi = centre + 1
    while hi < width and mask[hi]:
        hi += 1
    return lo, hi


def _grid(mask: np.ndarray, acs: tuple[int, int], acc: int | None) -> tuple[int, int]:
    """Spacing and first column of the equispaced grid outside the ACS block."""
    lo, hi = acs
    cols = np.flatnonzero(mask)
    outside = cols[(cols < lo) | (cols >= hi)]
    if outside.size < 2:
        raise ValueError("GRAPPA needs equispaced columns outside the ACS block; the mask has fewer than 2")
    if acc is None:
        acc = int(np.min(np.diff(outside)))
    if acc < 2:
        raise ValueError(f"GRAPPA acceleration must be >= 2, got {acc}")
    start = int(outside[0] % acc)
    if np.any(outside % acc != start):
        raise ValueError(f"mask is not equispaced with spacing {acc} outside the ACS block")
    return acc, start


def _source_offsets(r: int, acc: int, ky: int, acs_len: int) -> list[int]:
    """Column offsets (relative to the target) of the grid sources, shrunk to fit the ACS block."""

    def span(chosen: list[int]) -> int:
        return max(max(chosen), 0) - min(min(chosen), 0) + 1

    first = -((ky - 1) // 2)
    window = [-r + m * acc for m in range(first, first + ky)]
    if span(window) <= acs_len:
        return window
    candidates = sorted(set(window) | {-r, acc - r}, key=lambda d: (abs(d), d))
    for n in range(min(ky, len(candidates)), 0, -1):
        chosen = sorted(candidates[:n])
        if span(chosen) <= acs_len:
            log.debug("GRAPPA offset %d: ACS of %d columns fits %d of %d source columns", r, acs_len, n, ky)
            return chosen
    raise ValueError(f"GRAPPA: ACS block of {acs_len} columns is too narrow for missing offset {r} (acc {acc})")


def _fit_kernel(
    padded: np.ndarray,
    pad: tuple[int, int],
    acs: tuple[int, int],
    offsets: list[int],
    kx: int,
    lamda: float,
    max_rows: int,
) -> np.ndarray:
    """Least-squares kernel ``(n_src, kx, C_out, C_in)`` for one set of source offsets."""
    n_coils, padded_h, _ = padded.shape
    height = padded_h - 2 * pad[0]
    lo, hi = acs
    t_lo, t_hi = lo - min(offsets[0], 0), hi - max(offsets[-1], 0)
    targets = np.arange(t_lo, t_hi)
    rows = np.arange(height)
    if rows.size * targets.size > max_rows:
        n_rows = max(1, max_rows // targets.size)
        rows = np.unique(np.linspace(0, height - 1, n_rows).round().astype(int))
    half = kx // 2
    # A[(row, target), (c, src, dx)] and B[(row, target), c]
    blocks = []
    for off in offsets:
        for dx in range(-half, half + 1):
            view = padded[:, rows[:, None] + pad[0] + dx, targets[None, :] + pad[1] + off]  # (C, R, T)
            blocks.append(view.reshape(n_coils, -1))
    a_h = np.stack(blocks, axis=1).reshape(n_coils * len(blocks), -1).conj()  # A^H, (unknowns, equations)
    b = padded[:, rows[:, None] + pad[0], targets[None, :] + pad[1]].reshape(n_coils, -1).T
    # normal equations in single precision (BLAS), solved in double precision
    gram = (a_h @ a_h.conj().T).astype(np.complex128)
    rhs = (a_h @ b).astype(np.complex128)
    reg = lamda * np.real(np.trace(gram)) / gram.shape[0]
    weights = np.linalg.solve(gram + reg * np.eye(gram.shape[0]), rhs)  # (C*n_src*kx, C_out)
    weights = weights.reshape(n_coils, len(offsets), kx, n_coils)
    return np.ascontiguousarray(weights.transpose(1, 2, 3, 0)).astype(np.complex64)


def grappa(
    kspace: np.ndarray,
    mask: np.ndarray,
    acc: int | None = None,
    acs: tuple[int, int] | None = None,
    kx: int = 5,
    ky: int = 2,
    lamda: float = 1e-2,
    max_calib_rows: int = 4096,
) -> np.ndarray:
    """Fill the missing columns of one undersampled multi-coil slice with GRAPPA.

    Args:
        kspace: centred multi-coil k-space ``(C, H, W)`` complex; missing columns may hold
            anything (they are ignored), acquired columns are kept.
        mask: column mask ``(W,)`` with 0/1 values: an ACS block around ``W // 2`` plus
            equispaced columns.
        acc: grid spacing; inferred from the mask when None.
        acs: half-open ACS column range ``(lo, hi)``; the sampled run around ``W // 2`` when None.
        kx: read-out neighbours per source column (odd).
        ky: grid columns per kernel (2 = one on each side of the target).
        lamda: relative Tikhonov weight.
        max_calib_rows: at most this many calibration equations per kernel (rows are thinned
            evenly above it; it bounds the cost at full size).

    Returns:
        ``complex64`` k-space ``(C, H, W)`` with the missing columns filled (a column whose every
        source lies beyond the k-space edge stays 0, as with zero padding).

    Raises:
        ValueError: wrong shapes, or a mask without an ACS block or an equispaced grid.
    """
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise ValueError(f"grappa expects complex k-space (C, H, W), got {kspace.dtype} {kspace.shape}")
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.shape[0] != kspace.shape[-1]:
        raise ValueError(f"grappa: mask shape {mask.shape} does not match k-space width {kspace.shape[-1]}")
    if kx < 1 or kx % 2 == 0 or ky < 1:
        raise ValueError(f"grappa: kx must be odd and ky >= 1, got kx={kx}, ky={ky}")
    sampled = mask != 0
    filled = np.where(sampled[None, None, :], kspace, 0).astype(np.complex64)
    if sampled.all():
        return filled
    acs = _acs_block(sampled) if acs is None else acs
    acc, start = _grid(sampled, acs, acc)
    with single_thread_blas():
        _fill(filled, sampled, acs, acc, start, kx, ky, lamda, max_calib_rows)
    return filled


def _fill(filled: np.ndarray, sampled: np.ndarray, acs: tuple[int, int], acc: int, start: int, kx: int, ky: int,
          lamda: float, max_calib_rows: int) -> None:
    """Fit and apply one kernel per missing offset, writing into ``filled`` in place."""
    pad_w = acc * ((ky + 1) // 2 + 1)
    pad = (kx // 2, pad_w)
    padded = np.pad(filled, ((0, 0), (pad[0], pad[0]), (pad_w, pad_w)))
    height = filled.shape[1]
    missing = np.flatnonzero(~sampled)
    offset_of = (missing - start) % acc
    if np.any(offset_of == 0):
        raise ValueError(f"grappa: mask is not equispaced: grid column {int(missing[offset_of == 0][0])} is missing")
    for r in np.unique(offset_of):
        targets = missing[offset_of == r]
        offsets = _source_offsets(int(r), acc, ky, acs[1] - acs[0])
        weights = _fit_kernel(padded, pad, acs, offsets, kx, lamda, max_calib_rows)
        out = np.zeros((filled.shape[0], height, targets.size), dtype=np.complex64)
        flat = out.reshape(out.shape[0], -1)
        for i, off in enumerate(offsets):
            columns = padded[:, :, targets + pad_w + off]  # (C, H + 2 pad, T), one gather per source column
            for j in range(kx):
                src = columns[:, j:j + height, :]  # a view: shift by dx = j - kx // 2 along the read-out
                flat += weights[i, j] @ src.reshape(src.shape[0], -1)
        filled[:, :, targets] = out
