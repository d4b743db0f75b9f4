"""Centred orthonormal 2-D FFTs, root-sum-of-squares and the evaluation crop.

Convention (fastMRI / SNU): k-space is *centred* (DC in the middle of the last two axes) and the
transforms are orthonormal, so noise has the same standard deviation in both domains::

    ifft2c(k) = fftshift(ifft2(ifftshift(k, dims), norm="ortho"), dims),  dims = (-2, -1)

Tensors are native complex (``torch.complex64``/``complex128``); the two spatial axes are always
the last two. Functions accept any number of leading axes.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

_DIMS = (-2, -1)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _require_complex(x: torch.Tensor, name: str) -> None:
    if not torch.is_complex(x):
        raise ValueError(f"{name} expects a complex tensor (last two axes H, W), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} expects at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two axes.

    Args:
        x: complex image, shape ``(..., H, W)``.

    Returns:
        Complex k-space of the same shape, DC at ``(H // 2, W // 2)``.
    """
    _require_complex(x, "fft2c")
    x = torch.fft.ifftshift(x, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2-D FFT over the last two axes.

    Args:
        k: complex centred k-space, shape ``(..., H, W)``.

    Returns:
        Complex image of the same shape.
    """
    _require_complex(k, "ifft2c")
    k = torch.fft.ifftshift(k, dim=_DIMS)
    k = torch.fft.ifft2(k, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(k, dim=_DIMS)


def fft2c_np(x: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`fft2c` (used by the synthetic-data generator and GRAPPA)."""
    x = np.fft.ifftshift(x, axes=_DIMS)
    x = np.fft.fft2(x, axes=_DIMS, norm="ortho")
    return np.fft.fftshift(x, axes=_DIMS)


def ifft2c_np(k: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`ifft2c`."""
    k = np.fft.ifftshift(k, axes=_DIMS)
    k = np.fft.ifft2(k, axes=_DIMS, norm="ortho")
    return np.fft.fftshift(k, axes=_DIMS)


def rss(x: ArrayT, dim: int = -3) -> ArrayT:
    """Root-sum-of-squares over the coil axis.

    Args:
        x: complex or real coil images, coil axis at ``dim`` (default ``(..., C, H, W)``).
        dim: the coil axis.

    Returns:
        Real magnitude image with the coil axis removed.
    """
    if isinstance(x, torch.Tensor):
        mag2 = x.real.square() + x.imag.square() if torch.is_complex(x) else x.square()
        return mag2.sum(dim=dim).sqrt()
    return np.sqrt(np.sum(np.abs(x) ** 2, axis=dim))


def center_crop(x: ArrayT, height: int, width: int) -> ArrayT:
    """Centre-crop the last two axes to ``(height, width)``, zero-padding axes that are smaller.

    Cropping starts at ``(size - target) // 2`` (fastMRI's rule); padding places the input so that
    its centre pixel ``size // 2`` lands on ``target // 2``. W=320 brain files are zero-padded to
    384 this way, as the challenge expects.

    Args:
        x: array or tensor ``(..., H, W)``.
        height: output height.
        width: output width.

    Returns:
        Array or tensor ``(..., height, width)`` of the same type and dtype.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"center_crop: target size must be positive, got {height}x{width}")
    h, w = x.shape[-2], x.shape[-1]
    if h < height or w < width:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        before_h = (h + pad_h) // 2 - h // 2 if pad_h else 0
        before_w = (w + pad_w) // 2 - w // 2 if pad_w else 0
        shape = (*x.shape[:-2], h + pad_h, w + pad_w)
        if isinstance(x, torch.Tensor):
            out = x.new_zeros(shape)
        else:
            out = np.zeros(shape, dtype=x.dtype)
        out[..., before_h:before_h + h, before_w:before_w + w] = x
        x, h, w = out, h + pad_h, w + pad_w
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]
