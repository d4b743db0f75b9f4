"""The 3-level prompt U-Net and its complex, normalising, padding wrapper (docs/promptmr.md 1.5 and 1.6).

Complex convention: the wrapper takes native complex tensors ``(B, K, H, W)`` and maps them to ``2K`` real
channels as ``[real parts of all K channels, imaginary parts of all K channels]`` (upstream's
``b c h w two -> b (two c) h w``); the output is mapped back the same way. The U-Net runs in the
``channels_last`` memory format, which makes oneDNN's CPU convolutions 1.5-3x faster at these small widths.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recon.models.blocks import ActFactory, DownBlock, PromptBlock, UpBlock, cab_stack, conv

History = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


class PromptUnet(nn.Module):
    """PromptMR+'s U-Net: feature extraction, 3 encoder levels, bottleneck, 3 prompted decoder levels, 5x5 output.

    Args:
        in_chans: real input channels.
        out_chans: real output channels of ``conv_last``.
        n_feat0: full-resolution width.
        feature_dim: widths of levels 1-3.
        prompt_dim: prompt channels of decoder levels 1-3.
        len_prompt: prompts per decoder level.
        prompt_size: prompt sizes per decoder level.
        n_enc_cab, n_dec_cab, n_skip_cab, n_bottleneck_cab: block counts.
        kernel_size: kernel of the blocks.
        reduction: channel-attention reduction.
        act: PReLU factory (shared slope or one per block).
        use_ca: channel attention on/off.
        learnable_prompt: train the prompts.
        n_history: momentum history length (0 = off).
    """

    def __init__(self, in_chans: int, out_chans: int, n_feat0: int, feature_dim: Sequence[int],
                 prompt_dim: Sequence[int], len_prompt: Sequence[int], prompt_size: Sequence[int],
                 n_enc_cab: Sequence[int], n_dec_cab: Sequence[int], n_skip_cab: Sequence[int],
                 n_bottleneck_cab: int, kernel_size: int, reduction: int, act: ActFactory, use_ca: bool,
                 learnable_prompt: bool, n_history: int) -> None:
        super().__init__()
        f0, f, p = n_feat0, feature_dim, prompt_dim
        k, r = kernel_size, reduction
        self.n_history = n_history
        self.feat_extract = conv(in_chans, f0, k)
        self.enc1 = DownBlock(f0, f[0], n_enc_cab[0], k, r, act, use_ca, own_first_act=True)
        self.enc2 = DownBlock(f[0], f[1], n_enc_cab[1], k, r, act, use_ca)
        self.enc3 = DownBlock(f[1], f[2], n_enc_cab[2], k, r, act, use_ca)
        self.skip1 = cab_stack(n_skip_cab[0], f0, k, r, act, use_ca)
        self.skip2 = cab_stack(n_skip_cab[1], f[0], k, r, act, use_ca)
        self.skip3 = cab_stack(n_skip_cab[2], f[1], k, r, act, use_ca)
        self.bottleneck = cab_stack(n_bottleneck_cab, f[2], k, r, act, use_ca)
        self.prompt3 = PromptBlock(p[2], len_prompt[2], prompt_size[2], f[2], learnable_prompt)
        self.dec3 = UpBlock(f[2], f[1], p[2], n_dec_cab[2], k, r, act, use_ca, n_history)
        self.prompt2 = PromptBlock(p[1], len_prompt[1], prompt_size[1], f[1], learnable_prompt)
        self.dec2 = UpBlock(f[1], f[0], p[1], n_dec_cab[1], k, r, act, use_ca, n_history)
        self.prompt1 = PromptBlock(p[0], len_prompt[0], prompt_size[0], f[0], learnable_prompt)
        self.dec1 = UpBlock(f[0], f0, p[0], n_dec_cab[0], k, r, act, use_ca, n_history)
        self.conv_last = conv(f0, out_chans, 5)

    def forward(self, x: torch.Tensor, history: History | None = None,
                out_index: torch.Tensor | None = None) -> tuple[torch.Tensor, History | None]:
        """Run the U-Net.

        Args:
            x: ``(B, in_chans, H, W)`` with H and W multiples of 8.
            history: per decoder level (3, 2, 1) a tuple of ``n_history`` earlier inputs, or None.
            out_index: output channels of ``conv_last`` to compute (None = all); unused channels cost nothing.

        Returns:
            ``(output, new_history)``; ``new_history`` is a new tuple (the argument is never modified) or None
            when ``n_history`` is 0.
        """
        x = self.feat_extract(x)
        x, enc1 = self.enc1(x)
        x, enc2 = self.enc2(x)
        x, enc3 = self.enc3(x)
        feat3 = self.bottleneck(x)
        old3, old2, old1 = history if history is not None else (None, None, None)
        feat2 = self.dec3(feat3, self.prompt3(feat3), self.skip3(enc3), old3)
        feat1 = self.dec2(feat2, self.prompt2(feat2), self.skip2(enc2), old2)
        x = self.dec1(feat1, self.prompt1(feat1), self.skip1(enc1), old1)
        weight = self.conv_last.weight if out_index is None else self.conv_last.weight[out_index]
        out = F.conv2d(x, weight, padding=self.conv_last.padding)
        if self.n_history == 0:
            return out, None
        n = self.n_history
        if history is None:
            new = tuple((feat,) * n for feat in (feat3, feat2, feat1))
        else:
            new = tuple((feat, *old[:-1]) for feat, old in zip((feat3, feat2, feat1), history))
        return out, new  # type: ignore[return-value]


class NormPromptUnet(nn.Module):
    """Complex wrapper: complex to channels, one mean/std per sample, zero-pad to multiples of 8, U-Net, undo.

    Args:
        in_complex: complex input channels K (real channels 2K).
        out_complex: complex output channels of the U-Net.
        **unet_kwargs: the remaining :class:`PromptUnet` arguments.
    """

    def __init__(self, in_complex: int, out_complex: int, **unet_kwargs: object) -> None:
        super().__init__()
        self.in_complex = in_complex
        self.out_complex = out_complex
        self.unet = PromptUnet(2 * in_complex, 2 * out_complex, **unet_kwargs)  # type: ignore[arg-type]

    def forward(self, parts: Sequence[torch.Tensor], history: History | None = None,
                out_channels: Sequence[int] | None = None) -> tuple[torch.Tensor, History | None]:
        """Run the wrapped U-Net on the concatenation of complex parts.

        Args:
            parts: complex tensors ``(B, K_i, H, W)`` with ``Σ K_i = in_complex`` (concatenated along channels).
            history: momentum history (see :meth:`PromptUnet.forward`).
            out_channels: complex output channels to compute, in order (None = all ``out_complex``).

        Returns:
            ``(complex output (B, len(out_channels), H, W), new history)``.
        """
        b, _, h, w = parts[0].shape
        x = torch.cat([p.real for p in parts] + [p.imag for p in parts], dim=1)
        if x.shape[1] != 2 * self.in_complex:
            raise ValueError(f"NormPromptUnet: expected {self.in_complex} complex channels, got {x.shape[1] // 2}")
        # One mean and one (unbiased) std per sample over all channels and pixels, as upstream. The clamp only
        # matters for a constant input (upstream gives NaN there, docs/promptmr.md P6).
        flat = x.reshape(b, -1)
        mean = flat.mean(dim=1).view(b, 1, 1, 1)
        std = flat.std(dim=1).view(b, 1, 1, 1).clamp_min(torch.finfo(x.dtype).tiny)
        h_pad, w_pad = (-h) % 8, (-w) % 8
        top, left = h_pad // 2, w_pad // 2
        x = F.pad((x - mean) / std, (left, w_pad - left, top, h_pad - top))
        x = x.contiguous(memory_format=torch.channels_last)
        index = None
        n_out = self.out_complex
        if out_channels is not None:
            sel = list(out_channels)
            index = torch.tensor(sel + [n_out + c for c in sel], device=x.device)
            n_out = len(sel)
        y, new_history = self.unet(x, history, index)
        y = y[..., top:top + h, left:left + w] * std + mean
        return torch.complex(y[:, :n_out], y[:, n_out:]).contiguous(), new_history
