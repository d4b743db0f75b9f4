"""Multi-coil forward-model operations of PromptMR+ on native complex tensors.

Shapes: ``B`` batch, ``A`` adjacent slices, ``C`` coils. Images are ``(B, A, H, W)`` complex, coil data and
sensitivity maps ``(B, A, C, H, W)`` complex, k-space is *centred* (see :mod:`recon.fft`).

The undersampling masks are column masks (the W axis), so the normal operator needs no FFT along H::

    ifft2c(M * fft2c(u)) = ifft_W(ifftshift(M) * fft_W(u))

because (i) the H transforms cancel when M does not depend on the row, and (ii) the remaining 1-D operator is a
circular convolution, which commutes with the centring shifts. This is exact, halves the FFT work of each
cascade and removes all shift copies (docs/promptmr.md 1.4 computes two full centred 2-D FFTs per cascade).
"""

from __future__ import annotations

import torch

from recon.fft import ifft2c


def column_multiplier(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a centred column mask into the multiplier of the uncentred 1-D spectrum.

    Args:
        mask: ``(B, W)`` bool or 0/1 column mask of centred k-space.
        dtype: real dtype of the result.

    Returns:
        ``(B, 1, 1, 1, W)`` real 0/1 tensor, ``ifftshift`` of the mask along W, broadcastable to coil data.
    """
    return torch.fft.ifftshift(mask.to(dtype), dim=-1)[:, None, None, None, :]


def expand_reduce(x: torch.Tensor, sens: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """The normal operator ``AᴴA x = Σ_c conj(S_c) F⁻¹ M F (S_c x)`` of a column-masked acquisition.

    Args:
        x: image ``(B, A, H, W)`` complex.
        sens: maps ``(B, A, C, H, W)`` complex (unit root-sum-of-squares over C).
        multiplier: ``(B, 1, 1, 1, W)`` from :func:`column_multiplier`.

    Returns:
        ``(B, A, H, W)`` complex.
    """
    coil = torch.fft.fft(x.unsqueeze(2) * sens, dim=-1, norm="ortho")
    coil = torch.fft.ifft(coil * multiplier, dim=-1, norm="ortho")
    return (coil * sens.conj()).sum(dim=2)


def low_frequency_columns(mask: torch.Tensor, num_low_frequencies: torch.Tensor) -> torch.Tensor:
    """Columns of the ACS block, as PromptMR+'s ``KspaceACSExtractor`` selects them for Cartesian masks.

    For each sample the block is ``[pad, pad + n)`` with ``pad = (W - n + 1) // 2``. When ``n < 0`` the width is
    detected from the mask: ``2 * min(left, right)`` of the contiguous sampled run around ``W // 2`` (at least 1).
    Unlike upstream, detection is per sample and a fully sampled half is counted correctly. Only tensor
    operations are used, so this also runs on the ``meta`` device.

    Args:
        mask: ``(B, W)`` bool column mask.
        num_low_frequencies: ``(B,)`` integer ACS widths, -1 = detect.

    Returns:
        ``(B, W)`` bool mask of the ACS columns.
    """
    width = mask.shape[-1]
    centre = width // 2
    sampled = mask.to(torch.int32)
    right = torch.cumprod(sampled[:, centre:], dim=1).sum(dim=1)
    left = torch.cumprod(sampled[:, :centre].flip(1), dim=1).sum(dim=1)
    detected = torch.clamp(2 * torch.minimum(left, right), min=1)
    nlf = num_low_frequencies.to(device=mask.device, dtype=detected.dtype)
    nlf = torch.where(nlf < 0, detected, nlf)
    pad = torch.div(width - nlf + 1, 2, rounding_mode="floor")
    cols = torch.arange(width, device=mask.device)
    return (cols >= pad[:, None]) & (cols < (pad + nlf)[:, None])


def acs_coil_images(kspace: torch.Tensor, acs_columns: torch.Tensor) -> torch.Tensor:
    """Low-resolution coil images from the ACS columns only.

    Args:
        kspace: ``(B, A, C, H, W)`` complex centred k-space.
        acs_columns: ``(B, W)`` bool from :func:`low_frequency_columns`.

    Returns:
        ``(B, A, C, H, W)`` complex images.
    """
    keep = acs_columns.to(kspace.real.dtype)[:, None, None, None, :]
    return ifft2c(kspace * keep)


def normalise_maps(sens: torch.Tensor, coil_dim: int = 2) -> torch.Tensor:
    """Divide maps by their root-sum-of-squares over coils so that ``Σ_c |S_c|² = 1`` at every pixel.

    Upstream divides with no epsilon (an all-zero pixel gives NaN, docs/promptmr.md P6); here the divisor is clamped to
    the dtype's smallest normal number, which changes nothing elsewhere and maps an all-zero pixel to zero maps.

    Args:
        sens: ``(B, A, C, H, W)`` complex.
        coil_dim: the coil axis (2 for the layout above).

    Returns:
        Same shape, unit RSS over the coil axis.
    """
    power = sens.real.square() + sens.imag.square()
    norm = power.sum(dim=coil_dim, keepdim=True).sqrt().clamp_min(torch.finfo(power.dtype).tiny)
    return sens / norm
