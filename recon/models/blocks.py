"""Building blocks of the PromptMR+ U-Net (docs/promptmr.md section 1.6), on real ``(B, C, H, W)`` tensors.

The parameter layout follows upstream exactly (so parameter counts match), but the arithmetic is rearranged where
that is exact and saves work:

* channel attention runs its 1x1 convolutions as ``linear`` on the pooled ``(B, C)`` vector and fuses
  ``x + res * attention`` into one ``addcmul``, with a hand-written backward
  (:class:`recon.models.kernels.ChannelAttention`);
* the CAB convolutions take their weight gradient from matrix products on the CPU at 32+ channels
  (:func:`recon.models.kernels.conv2d_same`);
* ``UpBlock`` merges the two consecutive 1x1 convolutions (``reduce`` then the up-projection) into one product
  weight and applies it *before* the bilinear up-sampling (both are linear and act on different axes, so they
  commute), which runs the convolution at a quarter of the pixels;
* the first cascade's momentum layer sees its input tiled ``n_history + 1`` times; the 1x1 convolution of a tiled
  tensor equals the convolution of the tensor with the group-summed weight, so no tiled copy is built.

History features are passed as tuples and never modified in place (docs/promptmr.md P1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recon.models.kernels import ChannelAttention, conv2d_same


def conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = False, stride: int = 1) -> nn.Conv2d:
    """A 2-D convolution with "same" padding (``kernel_size // 2``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias, stride=stride)


class CAB(nn.Module):
    """Channel-attention block: conv, PReLU, conv, channel attention, residual.

    Args:
        channels: width C (input = output).
        kernel_size: kernel of both convolutions.
        reduction: attention hidden width ``C // reduction`` (must be >= 1 channel).
        act: the PReLU to use (shared between blocks, or this block's own).
        use_ca: False replaces the attention by the identity (upstream ``no_use_ca``).
    """

    def __init__(self, channels: int, kernel_size: int, reduction: int, act: nn.PReLU, use_ca: bool = True) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels, kernel_size)
        self.act = act
        self.conv2 = conv(channels, channels, kernel_size)
        self.use_ca = use_ca
        if use_ca:
            hidden = channels // reduction
            if hidden < 1:
                raise ValueError(f"CAB: reduction {reduction} leaves no attention channel at width {channels}")
            self.ca_down = nn.Conv2d(channels, hidden, 1, bias=False)
            self.ca_up = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``(B, C, H, W)``."""
        res = conv2d_same(F.prelu(conv2d_same(x, self.conv1.weight), self.act.weight), self.conv2.weight)
        if not self.use_ca:
            return x + res
        return ChannelAttention.apply(x, res, self.ca_down.weight.flatten(1), self.ca_up.weight.flatten(1))


def cab_stack(n: int, channels: int, kernel_size: int, reduction: int, act: ActFactory,
              use_ca: bool) -> nn.Sequential:
    """``n`` consecutive :class:`CAB` of one width (an empty ``Sequential`` is the identity)."""
    return nn.Sequential(*[CAB(channels, kernel_size, reduction, act(), use_ca) for _ in range(n)])


class ActFactory:
    """Hands out PReLU modules: always the same one (upstream's shared slope) or a fresh one per block."""

    def __init__(self, shared: nn.PReLU | None) -> None:
        self.shared = shared

    def __call__(self) -> nn.PReLU:
        return self.shared if self.shared is not None else nn.PReLU()


class DownBlock(nn.Module):
    """Encoder level: ``n`` CABs at the input width, then a stride-2 3x3 convolution (with bias).

    Args:
        in_channels: width of the level.
        out_channels: width after down-sampling.
        n_cab: number of blocks (>= 1).
        kernel_size: kernel of the blocks.
        reduction: attention reduction.
        act: PReLU factory.
        use_ca: channel attention on/off.
        own_first_act: the first block gets its own PReLU (upstream's ``first_act`` at level 1).
    """

    def __init__(self, in_channels: int, out_channels: int, n_cab: int, kernel_size: int, reduction: int,
                 act: ActFactory, use_ca: bool, own_first_act: bool = False) -> None:
        super().__init__()
        blocks = []
        for i in range(n_cab):
            block_act = nn.PReLU() if (own_first_act and i == 0) else act()
            blocks.append(CAB(in_channels, kernel_size, reduction, block_act, use_ca))
        self.encoder = nn.Sequential(*blocks)
        self.down = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(down-sampled features, pre-down features for the skip)``."""
        enc = self.encoder(x)
        return self.down(enc), enc


class PromptBlock(nn.Module):
    """Mixes ``length`` fixed (or learnable) prompt tensors with weights predicted from the decoder input.

    The prompts are a parameter of shape ``(1, length, channels, size, size)`` drawn with ``torch.rand`` (uniform
    [0, 1)); with ``learnable=False`` it does not require grad but is saved in the state dict.

    Args:
        channels: prompt channels p.
        length: number of prompts L.
        size: spatial size of each prompt.
        in_channels: channels of the decoder input (the linear layer's input).
        learnable: train the prompt tensors.
    """

    def __init__(self, channels: int, length: int, size: int, in_channels: int, learnable: bool) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.rand(1, length, channels, size, size), requires_grad=learnable)
        self.linear = nn.Linear(in_channels, length)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt features ``(B, p, H, W)`` for the decoder input ``x`` of shape ``(B, C, H, W)``."""
        weights = F.softmax(self.linear(x.mean(dim=(-2, -1))), dim=1)
        prompts = self.prompt[0]
        mixed = (weights @ prompts.flatten(1)).view(x.shape[0], *prompts.shape[1:])
        mixed = F.interpolate(mixed, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(mixed.contiguous(memory_format=_format_of(x)))


class UpBlock(nn.Module):
    """Decoder level: optional momentum over earlier cascades, prompt fusion, up-sampling, skip, one CAB.

    Args:
        in_channels: width of the decoder input.
        out_channels: width after up-sampling (the skip's width).
        prompt_channels: channels of the prompt features.
        n_cab: fuse blocks at width ``in + prompt``.
        kernel_size: kernel of the blocks.
        reduction: attention reduction.
        act: PReLU factory.
        use_ca: channel attention on/off.
        n_history: earlier features fed to the momentum layer (0 = no momentum layer).
    """

    def __init__(self, in_channels: int, out_channels: int, prompt_channels: int, n_cab: int, kernel_size: int,
                 reduction: int, act: ActFactory, use_ca: bool, n_history: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.n_history = n_history
        if n_history > 0:
            self.momentum = nn.Conv2d(in_channels * (n_history + 1), in_channels, kernel_size=1, bias=False)
            self.momentum_cab = CAB(in_channels, kernel_size, reduction, act(), use_ca)
        self.fuse = cab_stack(n_cab, in_channels + prompt_channels, kernel_size, reduction, act, use_ca)
        self.reduce = nn.Conv2d(in_channels + prompt_channels, in_channels, kernel_size=1, bias=False)
        self.up = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.cab = CAB(out_channels, kernel_size, reduction, act(), use_ca)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor, skip: torch.Tensor,
                history: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """Decode one level.

        Args:
            x: decoder input ``(B, in, h, w)``.
            prompt: prompt features ``(B, p, h, w)``.
            skip: skip features ``(B, out, 2h, 2w)``.
            history: ``n_history`` earlier inputs of this level, newest first, or None in the first cascade.

        Returns:
            ``(B, out, 2h, 2w)``.
        """
        if self.n_history > 0:
            weight = self.momentum.weight
            if history is None:
                c = self.in_channels
                weight = weight.view(c, self.n_history + 1, c).sum(dim=1)[:, :, None, None]
                x = F.conv2d(x, weight)
            else:
                x = F.conv2d(torch.cat([x, *history], dim=1), weight)
            x = self.momentum_cab(x)
        x = self.fuse(torch.cat([x, prompt], dim=1))
        merged = self.up.weight.flatten(1) @ self.reduce.weight.flatten(1)
        x = F.conv2d(x, merged[:, :, None, None])
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.cab(x + skip)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
