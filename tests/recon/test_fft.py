"""FFT and image conventions against NumPy references, on odd and even shapes."""

import numpy as np
import pytest
import torch

from recon.fft import center_crop, fft2c, fft2c_np, ifft2c, ifft2c_np, rss


def _np_fft2c(x: np.ndarray) -> np.ndarray:
    # the reference written out: shift the centre to the origin, orthonormal FFT, shift back
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 7, 9), (1, 6, 5), (4, 64, 70)])
def test_fft2c_matches_numpy_and_inverts(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    k = fft2c(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(k, _np_fft2c(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fft2c_np(x), k, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ifft2c(torch.from_numpy(k)).numpy(), x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ifft2c_np(k), x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9)])
def test_dc_is_at_the_centre_and_transform_is_orthonormal(h, w):
    x = np.ones((h, w), dtype=np.complex128)
    k = fft2c(torch.from_numpy(x)).numpy()
    # a constant image has all its energy at DC, which sits at (H//2, W//2) for the centred FFT
    assert np.argmax(np.abs(k)) == (h // 2) * w + w // 2
    # ortho norm: energy preserved (Parseval)
    assert np.isclose(np.sum(np.abs(k) ** 2), np.sum(np.abs(x) ** 2))


def test_fft_refuses_real_input():
    with pytest.raises(ValueError, match="complex"):
        fft2c(torch.zeros(4, 4))


def test_rss_numpy_and_torch_agree():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5, 6)) + 1j * rng.standard_normal((2, 3, 5, 6))
    expected = np.sqrt((np.abs(x) ** 2).sum(axis=1))
    np.testing.assert_allclose(rss(x, dim=1), expected)
    np.testing.assert_allclose(rss(torch.from_numpy(x), dim=1).numpy(), expected)


def test_center_crop_crops_like_fastmri():
    x = np.arange(10 * 12).reshape(10, 12)
    out = center_crop(x, 4, 5)
    # start = (size - target) // 2: rows 3..6, columns 3..7
    np.testing.assert_array_equal(out, x[3:7, 3:8])


@pytest.mark.parametrize("w", [320, 321])
def test_center_crop_zero_pads_narrow_images_keeping_the_centre(w):
    x = torch.zeros(1, 400, w)
    x[0, 200, w // 2] = 1.0  # the centre pixel
    out = center_crop(x, 384, 384)
    assert out.shape == (1, 384, 384)
    assert out[0, 192, 192] == 1.0
    assert out.sum() == 1.0
    # padded columns are zero on both sides
    pad = 384 - w
    assert torch.all(out[..., : pad // 2] == 0) and torch.all(out[..., 384 - pad // 2:] == 0)


def test_center_crop_rejects_bad_size():
    with pytest.raises(ValueError):
        center_crop(np.zeros((4, 4)), 0, 4)
