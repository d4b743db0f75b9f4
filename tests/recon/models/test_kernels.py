"""The hand-written backward passes compute the gradients of the expressions they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recon.models.kernels import GEMM_WEIGHT_GRAD_MIN_CHANNELS, ChannelAttention, conv2d_same


def _plain_attention(x, res, w_down, w_up):
    pooled = res.mean(dim=(-2, -1))
    scale = torch.sigmoid(F.linear(F.relu(F.linear(pooled, w_down)), w_up))
    return torch.addcmul(x, res, scale[:, :, None, None])  # the CAB before the hand-written backward


def _leaves(*shapes, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_())
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_attention_passes_gradcheck(channels_last: bool) -> None:
    x, res, w_down, w_up = _leaves((2, 4, 5, 3), (2, 4, 5, 3), (2, 4), (4, 2), channels_last=channels_last)
    assert torch.autograd.gradcheck(ChannelAttention.apply, (x, res, w_down, w_up))


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_attention_equals_the_plain_expression(channels_last: bool) -> None:
    leaves = _leaves((3, 8, 7, 6), (3, 8, 7, 6), (4, 8), (8, 4), channels_last=channels_last, seed=1)
    grad = torch.randn(3, 8, 7, 6, dtype=torch.float64)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    got = ChannelAttention.apply(*leaves)
    got_grads = torch.autograd.grad(got, leaves, grad)
    want = _plain_attention(*leaves)
    want_grads = torch.autograd.grad(want, leaves, grad)
    assert torch.equal(got, want)  # the forward is the same arithmetic
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if channels_last:  # the gradient keeps the layout (the convolution before it is channels_last)
        assert got_grads[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("batch", "kernel", "height", "width"), [(1, 3, 9, 7), (2, 3, 6, 11), (2, 5, 8, 8)])
def test_wide_cpu_convolution_takes_the_matrix_product_weight_gradient(batch, kernel, height, width) -> None:
    c = GEMM_WEIGHT_GRAD_MIN_CHANNELS
    x, weight = _leaves((batch, c, height, width), (c + 8, c, kernel, kernel), channels_last=True, seed=2)
    out = conv2d_same(x, weight)
    assert type(out.grad_fn).__name__ == "_SameConvBackward"
    grad = torch.randn(out.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, (x, weight), grad)
    ref = F.conv2d(x, weight, padding=kernel // 2)
    assert torch.equal(out, ref)
    want = torch.autograd.grad(ref, (x, weight), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_narrow_contiguous_or_gradient_free_convolutions_are_plain_conv2d() -> None:
    narrow = _leaves((1, 8, 6, 6), (8, 8, 3, 3), channels_last=True)
    assert type(conv2d_same(*narrow).grad_fn).__name__ == "ConvolutionBackward0"
    c = GEMM_WEIGHT_GRAD_MIN_CHANNELS
    contiguous = _leaves((1, c, 6, 6), (c, c, 3, 3))
    assert type(conv2d_same(*contiguous).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad():
        assert conv2d_same(*_leaves((1, c, 6, 6), (c, c, 3, 3), channels_last=True)).grad_fn is None
