"""Hand-written backward passes for the two hot spots of a CPU training step (docs/promptmr.md section 6).

Both compute the same function as the plain PyTorch expressions they replace; their forward passes are the same
operators, so outputs are bit-identical. Their gradients differ only in the order of floating-point sums (under
1e-5 relative for a training step, against about 2e-3 between its fp32 and fp64 gradients).

* :class:`ChannelAttention`: the attention tail of a CAB, ``x + res * sigmoid(W_up relu(W_down mean(res)))``.
  Autograd's backward of those lines makes five full-size passes; this one makes three.
* :func:`conv2d_same`: a stride-1 "same" convolution whose *weight* gradient, on the CPU for wide
  ``channels_last`` layers, is ``k * k`` matrix products instead of oneDNN's backward-weights kernel, which is
  2-4x slower than its forward at batch 1 (measured at 32-64 channels). The input gradient stays oneDNN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Both widths at least this many channels: the matrix-product weight gradient wins (measured on a 2-core AMD
# EPYC: 32 ch at 384x200 61 -> 32 ms, 48 ch at 192x100 19 -> 10 ms, 64 ch at 96x50 7.8 -> 4.2 ms; at 24 ch and
# below, and at 16 images of 8 channels, oneDNN's kernel is as fast or faster). A fixed rule, not a timing, so
# that the same shapes always take the same path (resumed runs repeat their arithmetic).
GEMM_WEIGHT_GRAD_MIN_CHANNELS = 32


class ChannelAttention(torch.autograd.Function):
    """``x + res * sigmoid(W_up relu(W_down mean_hw(res)))`` with a backward of three full-size passes.

    The backward computes ``g_res = g * scale + g_pooled / N`` in one fused pass (autograd: the product, the
    mean's expanded division and their sum, three passes) and ``g_x`` is ``g`` itself.

    Inputs: ``x``, ``res`` ``(B, C, H, W)``; ``w_down`` ``(C/r, C)``; ``w_up`` ``(C, C/r)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, res: torch.Tensor, w_down: torch.Tensor,  # type: ignore[override]
                w_up: torch.Tensor) -> torch.Tensor:
        pooled = res.mean(dim=(-2, -1))
        hidden = F.relu(F.linear(pooled, w_down))
        scale = torch.sigmoid(F.linear(hidden, w_up))
        ctx.save_for_backward(res, pooled, hidden, scale, w_down, w_up)
        return torch.addcmul(x, res, scale[:, :, None, None])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        res, pooled, hidden, scale, w_down, w_up = ctx.saved_tensors
        h, w = res.shape[-2:]
        # the product-and-sum autograd computes, in its order: the diagonal of a (B, C, HW) x (B, HW, C) product
        # would skip one pass but moves small attention-weight gradients by up to 2e-5 relative
        g_scale = (g * res).sum(dim=(-2, -1))
        g_up_in = g_scale * scale * (1 - scale)  # through the sigmoid
        g_w_up = g_up_in.t() @ hidden
        g_hidden = (g_up_in @ w_up) * (hidden > 0)
        g_w_down = g_hidden.t() @ pooled
        g_pooled = (g_hidden @ w_down) / (h * w)
        g_res = torch.empty_like(g)  # keeps g's memory format
        torch.addcmul(g_pooled[:, :, None, None].expand_as(g), g, scale[:, :, None, None], out=g_res)
        return g, g_res, g_w_down, g_w_up


def conv2d_same(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=k // 2)`` (odd square kernel, no bias), with a faster weight gradient where it
    pays (see the module docstring); elsewhere exactly ``F.conv2d``."""
    k = weight.shape[-1]
    if (torch.is_grad_enabled() and weight.requires_grad and x.device.type == "cpu"
            and min(weight.shape[0], weight.shape[1]) >= GEMM_WEIGHT_GRAD_MIN_CHANNELS
            and _channels_last(x) and k % 2 == 1 and weight.shape[-2] == k):
        return _SameConv.apply(x, weight)
    return F.conv2d(x, weight, padding=k // 2)


class _SameConv(torch.autograd.Function):
    """Stride-1 same convolution: oneDNN forward and input gradient, matrix-product weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = torch.ops.aten.convolution_backward(
                g, x, weight, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        g_w = _weight_grad(x, g.contiguous(memory_format=torch.channels_last), k) if ctx.needs_input_grad[1] else None
        return g_x, g_w


def _weight_grad(x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """``∂L/∂W[o, i, a, b] = Σ_{n,y,x} g[n, o, y, x] · xpad[n, i, y + a, x + b]`` as ``k * k`` matrix products.

    Both tensors are laid out as rows of pixels: ``x`` zero-padded to ``(N, H + 2p + 1, W + 2p, C)`` and ``g``
    to ``(N, H + 2p + 1, W + 2p, O)`` with zeros in the padded columns and rows. In that flattened layout the
    window of tap ``(a, b)`` is the contiguous slice that starts ``a * (W + 2p) + b`` pixels later, so each tap is
    one ``(O, P) @ (P, C)`` product; the zero columns and rows of ``g`` cancel every term that wraps into the
    next row or image (the extra bottom row keeps the last tap's slice inside the buffer).
    """
    n, c, h, w = x.shape
    o, p = g.shape[1], k // 2
    wp, hp = w + 2 * p, h + 2 * p + 1
    x_rows = F.pad(x, (p, p, p, p + 1)).permute(0, 2, 3, 1).reshape(n * hp * wp, c)
    g_rows = F.pad(g, (0, 2 * p, 0, 2 * p + 1)).permute(0, 2, 3, 1).reshape(n * hp * wp, o)
    length = n * hp * wp - (k - 1) * (wp + 1)  # every tap's slice stays inside x_rows
    g_t = g_rows[:length].t()
    out = torch.empty(k, k, o, c, dtype=x.dtype, device=x.device)
    for a in range(k):
        for b in range(k):
            start = a * wp + b
            torch.mm(g_t, x_rows[start:start + length], out=out[a, b])
    return out.permute(2, 3, 0, 1).contiguous()


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_meta
