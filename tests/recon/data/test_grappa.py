"""The numpy GRAPPA of the generator: it beats zero-filling where the ACS allows, keeps acquired data."""

from __future__ import annotations

import numpy as np
import pytest

from recon.data.grappa import grappa
from recon.data.phantoms import CoilModel, Grid, SmoothPhase, make_phantom
from recon.fft import center_crop, fft2c_np, ifft2c_np, rss
from recon.masks import equispaced_mask, public_mask


def _slice_kspace(anatomy: str, coils: int, height: int, width: int, crop: int, noise: float,
                  seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = Grid(height, width, crop / 2)
    phantom = make_phantom(anatomy, rng, grid)
    coil = CoilModel(rng, phantom.coil_centres(rng, coils, 0.0), 0.5)
    image = coil.maps(grid, 0.0) * phantom.slice(0.0) * SmoothPhase(rng).slice(grid, 0.0)
    kspace = fft2c_np(image)
    sigma = noise * rss(image).max() / np.sqrt(2 * coils)
    kspace += sigma * (rng.normal(size=kspace.shape) + 1j * rng.normal(size=kspace.shape))
    return kspace.astype(np.complex64)


def _nrmse(image: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(image - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("anatomy", ["brain", "knee"])
@pytest.mark.parametrize(("acc", "factor"), [(4, 0.3), (8, 0.5)])
def test_grappa_beats_zero_filling(anatomy: str, acc: int, factor: float) -> None:
    """16 coils, 128x160 (ACS 13 columns): GRAPPA removes most of the aliasing."""
    kspace = _slice_kspace(anatomy, 16, 128, 160, 64, noise=0.01)
    mask = public_mask(160, acc)
    crop = lambda k: center_crop(rss(ifft2c_np(k)), 64, 64)  # noqa: E731
    ref = crop(kspace)
    zero_filled = _nrmse(crop(kspace * mask), ref)
    filled = _nrmse(crop(grappa(kspace * mask, mask)), ref)
    assert filled < factor * zero_filled, (filled, zero_filled)


def test_acquired_columns_are_kept_and_every_column_filled() -> None:
    kspace = _slice_kspace("brain", 8, 64, 64, 64, noise=0.02)
    for acc in (4, 8):  # acc 8 at W=64: ACS of 5 columns forces the narrow-kernel fallback
        mask = public_mask(64, acc)
        out = grappa(kspace * mask, mask)
        assert out.dtype == np.complex64 and out.shape == kspace.shape
        assert np.array_equal(out[:, :, mask == 1], kspace[:, :, mask == 1])
        assert np.all(np.isfinite(out))
        # no column left empty (the last few may have their only source beyond the k-space edge)
        inner = (mask == 0) & (np.arange(64) >= 8) & (np.arange(64) < 56)
        assert np.all(np.abs(out[:, :, inner]).sum(axis=(0, 1)) > 0)


def test_unmasked_input_values_are_ignored() -> None:
    kspace = _slice_kspace("knee", 8, 64, 96, 64, noise=0.02)
    mask = public_mask(96, 4)
    assert np.array_equal(grappa(kspace, mask), grappa(kspace * mask, mask))


def test_fully_sampled_is_unchanged() -> None:
    kspace = _slice_kspace("knee", 4, 32, 32, 32, noise=0.0)
    assert np.array_equal(grappa(kspace, np.ones(32, dtype=np.float32)), kspace)


def test_bad_inputs_raise() -> None:
    kspace = _slice_kspace("brain", 4, 32, 32, 32, noise=0.0)
    mask = public_mask(32, 4)
    with pytest.raises(ValueError, match="complex"):
        grappa(np.abs(kspace), mask)
    with pytest.raises(ValueError, match="width"):
        grappa(kspace, public_mask(30, 4))
    no_centre = mask.copy()
    no_centre[16] = 0
    with pytest.raises(ValueError, match="ACS"):
        grappa(kspace, no_centre)
    holey = equispaced_mask(32, 4, 1)
    holey[5] = 0  # a grid column missing
    with pytest.raises(ValueError, match="equispaced"):
        grappa(kspace, holey)
    with pytest.raises(ValueError, match="kx"):
        grappa(kspace, mask, kx=4)
