"""Coil-sensitivity estimation of PromptMR+ (docs/promptmr.md 1.3).

ACS columns -> low-resolution coil images -> prompt U-Net per coil (its adjacent slices as channels with
``use_sens_adj``, else every slice of every coil alone) -> division by the root-sum-of-squares over coils.
``sens_per_coil`` runs the U-Net one coil at a time, with or without a graph (batching the coils of a no-grad
forward was tried and made a full-size brain slice about 25 % slower on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from recon.fft import ifft2c
from recon.models.blocks import ActFactory
from recon.models.checkpointing import run_region
from recon.models.config import PromptMRConfig
from recon.models.ops import acs_coil_images, normalise_maps
from recon.models.unet import NormPromptUnet


class SensitivityNet(nn.Module):
    """Estimates unit-RSS sensitivity maps from the ACS region of the masked k-space.

    Args:
        cfg: the model configuration (``sens_*`` fields, ``num_adj_slices``, ``use_sens_adj``,
            ``sens_per_coil``, ``sens_use_checkpoint``).
        act: PReLU factory shared with the cascades.
    """

    def __init__(self, cfg: PromptMRConfig, act: ActFactory) -> None:
        super().__init__()
        self.num_adj_slices = cfg.num_adj_slices
        self.use_sens_adj = cfg.use_sens_adj
        self.mask_center = cfg.mask_center
        self.per_coil = cfg.sens_per_coil
        self.use_checkpoint = cfg.sens_use_checkpoint
        chans = cfg.num_adj_slices if cfg.use_sens_adj else 1
        structure = cfg.sens_structure()
        self.norm_unet = NormPromptUnet(
            chans, chans, n_feat0=cfg.sens_n_feat0, feature_dim=cfg.sens_feature_dim,
            prompt_dim=cfg.sens_prompt_dim, len_prompt=structure["len_prompt"],
            prompt_size=structure["prompt_size"], n_enc_cab=structure["n_enc_cab"],
            n_dec_cab=structure["n_dec_cab"], n_skip_cab=structure["n_skip_cab"],
            n_bottleneck_cab=structure["n_bottleneck_cab"], kernel_size=cfg.kernel_size, reduction=cfg.reduction,
            act=act, use_ca=cfg.sens_ca, learnable_prompt=cfg.learnable_prompt, n_history=0)

    def forward(self, kspace: torch.Tensor, acs_columns: torch.Tensor) -> torch.Tensor:
        """Estimate the maps.

        Args:
            kspace: ``(B, A, C, H, W)`` complex centred masked k-space.
            acs_columns: ``(B, W)`` bool ACS columns (see :func:`recon.models.ops.low_frequency_columns`).

        Returns:
            ``(B, A, C, H, W)`` complex maps with ``Σ_c |S_c|² = 1``.
        """
        b, a, c, h, w = kspace.shape
        images = acs_coil_images(kspace, acs_columns) if self.mask_center else ifft2c(kspace)
        if self.use_sens_adj:
            items = images.permute(0, 2, 1, 3, 4).reshape(b * c, a, h, w)
        else:
            items = images.reshape(b * a * c, 1, h, w)
        if self.per_coil:
            # One item at a time; each its own checkpoint region so that the backward holds one coil's activations.
            # Also without a graph: on the CPU, one 8-channel 768 x 396 image per convolution stays in cache, and a
            # batch of 16 does not (forward 3.5 ms per image alone, 168 ms for the batch of 16, 3x slower).
            chunks = [run_region("sens_coil", self._unet, items[i:i + 1], checkpoint=self.use_checkpoint)
                      for i in range(items.shape[0])]
            maps = torch.cat(chunks, dim=0)
        else:
            maps = self._unet(items)
        if self.use_sens_adj:
            # Normalise in the (B, C, A, H, W) layout the U-Net produced, then one copy to a contiguous
            # (B, A, C, H, W): every cascade multiplies with the maps several times.
            maps = normalise_maps(maps.reshape(b, c, a, h, w), coil_dim=1)
            return maps.permute(0, 2, 1, 3, 4).contiguous()
        return normalise_maps(maps.reshape(b, a, c, h, w))

    def _unet(self, items: torch.Tensor) -> torch.Tensor:
        return self.norm_unet([items])[0]
