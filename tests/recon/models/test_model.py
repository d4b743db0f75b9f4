"""Tests of the PromptMR+ network: configuration, parameter counts, shapes, exactness of the fast paths against a
literal re-statement of docs/promptmr.md section 1, and exact gradients under activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recon.errors import InputError
from recon.fft import center_crop, fft2c, ifft2c
from recon.masks import acs_bounds, detect_acs_width, public_mask, random_mask
from recon.models.blocks import CAB
from recon.models.config import PromptMRConfig
from recon.models.ops import column_multiplier, expand_reduce, low_frequency_columns
from recon.models.promptmr import PromptMR, count_parameters


def tiny_config(**overrides: object) -> PromptMRConfig:
    """A small configuration with every feature on (history, buffer, prompts, attention, adjacent slices)."""
    base = dict(num_cascades=3, num_adj_slices=3, n_feat0=4, feature_dim=(6, 8, 10), prompt_dim=(2, 4, 6),
                sens_n_feat0=4, sens_feature_dim=(4, 6, 8), sens_prompt_dim=(2, 2, 4), len_prompt=(2, 3, 2),
                prompt_size=(5, 4, 3), n_enc_cab=(1, 2, 1), n_dec_cab=(1, 1, 2), n_skip_cab=(1, 0, 1),
                n_bottleneck_cab=1, n_history=2, reduction=2, use_checkpoint=False, sens_use_checkpoint=False,
                sens_per_coil=False, seed=7)
    base.update(overrides)
    return PromptMRConfig(**base)  # type: ignore[arg-type]


def make_input(b: int, a: int, c: int, h: int, w: int, dtype: torch.dtype = torch.complex128,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kspace = torch.randn(b, a, c, h, w, dtype=dtype, generator=g)
    mask = torch.from_numpy(public_mask(w, 4)).bool()[None].expand(b, w)
    return kspace * mask[:, None, None, None, :], mask


# ----- configuration ------------------------------------------------------------------------------------------
def test_config_round_trip_and_presets() -> None:
    cfg = PromptMRConfig.preset("smartify")
    assert cfg.num_cascades == 8 and cfg.reduction == 2 and cfg.n_history == 3 and cfg.num_adj_slices == 1
    assert cfg.feature_dim == (24, 32, 40) and cfg.sens_feature_dim == (12, 16, 20)
    up = PromptMRConfig.preset("promptmr-plus")
    assert up.num_cascades == 12 and up.reduction == 4 and up.n_history == 11 and up.len_prompt == (5, 5, 5)
    d = up.to_dict()
    assert isinstance(d["feature_dim"], list)
    assert PromptMRConfig.from_dict(d) == up
    assert PromptMRConfig.preset("smartify", feature_dim=[20, 30, 40]).feature_dim == (20, 30, 40)
    assert cfg.replace(reduction=4).reduction == 4


@pytest.mark.parametrize("overrides, key", [
    ({"bogus": 1}, "bogus"),
    ({"reduction": 9}, "reduction"),           # zero-channel attention at width 8
    ({"num_adj_slices": 4}, "num_adj_slices"),
    ({"n_history": 8}, "n_history"),           # >= num_cascades
    ({"adaptive_input": False}, "n_buffer"),   # n_buffer 4 without the adaptive input (docs/promptmr.md P12)
    ({"n_buffer": 2}, "n_buffer"),
    ({"feature_dim": (24, 32)}, "feature_dim"),
    ({"use_checkpoint": 1}, "use_checkpoint"),
    ({"num_cascades": 2.0}, "num_cascades"),
    ({"kernel_size": 4}, "kernel_size"),
])
def test_config_rejects_bad_values(overrides: dict, key: str) -> None:
    with pytest.raises(InputError, match=key):
        PromptMRConfig.preset("smartify", **overrides)


def test_config_unknown_preset_and_non_mapping() -> None:
    with pytest.raises(InputError, match="preset"):
        PromptMRConfig.preset("varnet")
    with pytest.raises(InputError):
        PromptMRConfig.from_dict([("num_cascades", 2)])  # type: ignore[arg-type]


# ----- parameter counts (docs/promptmr.md section 2) ----------------------------------------------------------
def _meta_model(cfg: PromptMRConfig) -> PromptMR:
    with torch.device("meta"):
        return PromptMR(cfg)


def test_parameter_counts_match_upstream_smartify() -> None:
    model = _meta_model(PromptMRConfig.preset("smartify", num_adj_slices=5, reduction=2))
    assert count_parameters(model) == (6_015_267, 88_128)
    assert count_parameters(model.sens_net)[0] == 167_883
    assert all(count_parameters(c)[0] == 730_924 for c in model.cascades)
    model4 = _meta_model(PromptMRConfig.preset("smartify", num_adj_slices=5, reduction=4))
    assert count_parameters(model4) == (5_870_371, 88_128)


def test_parameter_counts_match_upstream_promptmr_plus() -> None:
    model = _meta_model(PromptMRConfig.preset("promptmr-plus"))
    assert count_parameters(model) == (82_491_005, 10_368_000)
    assert count_parameters(model.sens_net)[0] == 1_456_817
    assert count_parameters(model.cascades[0])[0] == 6_752_850


def test_per_block_prelu_differs_only_by_the_shared_slopes() -> None:
    cfg = PromptMRConfig.preset("smartify", num_adj_slices=5)
    shared = _meta_model(cfg)
    own = _meta_model(cfg.replace(shared_prelu=False))
    cabs = [m for m in shared.modules() if isinstance(m, CAB)]
    slopes = {id(m.act) for m in cabs}
    # One shared slope plus the own slope of the first block of each encoder (1 sens net + 8 cascades).
    assert len(slopes) == 1 + 9
    n_sharing = len(cabs) - 9
    assert count_parameters(own)[0] - count_parameters(shared)[0] == n_sharing - 1


# ----- construction -------------------------------------------------------------------------------------------
def test_construction_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    m1, m2 = PromptMR(tiny_config()), PromptMR(tiny_config())
    assert torch.equal(torch.get_rng_state(), state)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    m3 = PromptMR(tiny_config(seed=8))
    prompt_keys = [k for k in s1 if k.endswith("prompt")]
    assert prompt_keys and not torch.equal(s1[prompt_keys[0]], m3.state_dict()[prompt_keys[0]])
    # The fixed prompts are in the state dict: loading it reproduces a model built from another seed.
    m3.load_state_dict(s1)
    k, mask = make_input(1, 3, 2, 24, 20, dtype=torch.complex64)
    with torch.no_grad():
        assert torch.equal(m1(k, mask, -1).image, m3(k, mask, -1).image)


def test_construction_queues_no_cuda_seed() -> None:
    # torch.manual_seed would queue a lazy manual_seed_all for CUDA (replayed when CUDA initialises); the model
    # must not, so that building it cannot change a later CUDA stream of random numbers.
    initialised = torch.cuda.is_initialized()
    seeds = [id(call) for call in torch.cuda._lazy_seed_tracker.get_calls()]
    queued = len(torch.cuda._queued_calls)
    PromptMR(tiny_config())
    assert [id(call) for call in torch.cuda._lazy_seed_tracker.get_calls()] == seeds
    assert len(torch.cuda._queued_calls) == queued
    assert torch.cuda.is_initialized() == initialised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_construction_on_cuda_leaves_cuda_generators_alone_and_equals_cpu_weights() -> None:
    cpu = PromptMR(tiny_config()).state_dict()
    states = torch.cuda.get_rng_state_all()
    with torch.device("cuda"):
        model = PromptMR(tiny_config())
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), states))
    gpu = model.state_dict()
    assert all(v.is_cuda for v in gpu.values())
    assert all(torch.equal(cpu[k], gpu[k].cpu()) for k in cpu)


# ----- shapes and conventions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("a, h, w", [(1, 64, 70), (1, 72, 65), (3, 72, 65)])
def test_output_shapes_on_odd_sizes(a: int, h: int, w: int) -> None:
    model = PromptMR(tiny_config(num_adj_slices=a))
    k, mask = make_input(2, a, 8, h, w, dtype=torch.complex64)
    with torch.no_grad():
        out = model(k, mask, torch.tensor([-1, 6]))
    assert out.image.shape == (2, h, w) and out.image.dtype == torch.float32
    assert out.sens_maps.shape == (2, 8, h, w) and out.sens_maps.dtype == torch.complex64
    assert torch.isfinite(out.image).all()
    rss = out.sens_maps.abs().square().sum(dim=1)
    assert torch.allclose(rss, torch.ones_like(rss), atol=1e-5)


def test_width_below_evaluation_size_is_not_cropped() -> None:
    model = PromptMR(tiny_config(num_adj_slices=1, num_cascades=1, n_history=0))
    k, mask = make_input(1, 1, 3, 48, 40, dtype=torch.complex64)
    with torch.no_grad():
        image = model(k, mask, -1).image
    assert image.shape == (1, 48, 40)
    cropped = center_crop(image, 384, 384)  # the crop happens outside the network and zero-pads W < 384
    assert cropped.shape == (1, 384, 384) and cropped[:, :, :100].abs().sum() == 0


def test_complex128_with_float64_weights() -> None:
    model = PromptMR(tiny_config()).double()
    k, mask = make_input(1, 3, 2, 24, 21)
    out = model(k, mask, -1)
    assert out.image.dtype == torch.float64 and out.sens_maps.dtype == torch.complex128


@pytest.mark.parametrize("kind", ["real", "slices", "dtype", "mask", "nlf", "nlf_float"])
def test_boundary_checks_raise_value_error(kind: str) -> None:
    model = PromptMR(tiny_config())
    k, mask = make_input(1, 3, 2, 24, 20, dtype=torch.complex64)
    args: list = [k, mask, -1]
    if kind == "real":
        args[0] = torch.view_as_real(k)
    elif kind == "slices":
        args[0] = k[:, :1]
    elif kind == "dtype":
        args[0] = k.to(torch.complex128)
    elif kind == "mask":
        args[1] = mask[:, :-1]
    elif kind == "nlf":
        args[2] = 21
    else:
        args[2] = torch.tensor([4.0])
    with pytest.raises(ValueError):
        model(*args)


# ----- exactness of the rearranged arithmetic -----------------------------------------------------------------
@pytest.mark.parametrize("w", [20, 21])
def test_normal_operator_needs_only_fft_along_width(w: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, w, dtype=torch.complex128, generator=g)
    sens = torch.randn(2, 3, 4, 9, w, dtype=torch.complex128, generator=g)
    mask = torch.rand(2, w, generator=g) > 0.5
    fast = expand_reduce(x, sens, column_multiplier(mask, torch.float64))
    literal = (ifft2c(fft2c(x[:, :, None] * sens) * mask[:, None, None, None, :]) * sens.conj()).sum(2)
    assert torch.allclose(fast, literal, rtol=0, atol=1e-12)


def test_acs_columns_follow_upstream_rule() -> None:
    rng = __import__("numpy").random.default_rng(0)
    masks = [public_mask(368, 4), public_mask(396, 8), random_mask(320, 4, rng)]
    for m in masks:
        w = m.shape[0]
        cols = low_frequency_columns(torch.from_numpy(m)[None] != 0, torch.tensor([-1]))[0]
        lo, hi = acs_bounds(w, detect_acs_width(m))
        expected = torch.zeros(w, dtype=torch.bool)
        expected[lo:hi] = True
        assert torch.equal(cols, expected)
    explicit = low_frequency_columns(torch.ones(1, 31, dtype=torch.bool), torch.tensor([5]))[0]
    assert explicit.nonzero().flatten().tolist() == list(range(13, 18))
    full = low_frequency_columns(torch.ones(1, 30, dtype=torch.bool), torch.tensor([-1]))[0]
    assert int(full.sum()) == 30  # a fully sampled mask (upstream's argmin gives 1 here)


def _lit_cab(cab: CAB, x: torch.Tensor) -> torch.Tensor:
    pad = cab.conv1.padding
    r = F.conv2d(F.prelu(F.conv2d(x, cab.conv1.weight, padding=pad), cab.act.weight), cab.conv2.weight, padding=pad)
    if cab.use_ca:
        y = torch.sigmoid(F.conv2d(F.relu(F.conv2d(r.mean((2, 3), keepdim=True), cab.ca_down.weight)),
                                   cab.ca_up.weight))
        r = r * y
    return r + x


def _lit_seq(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for cab in seq:
        x = _lit_cab(cab, x)
    return x


def _lit_prompt(pb: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = F.softmax(F.linear(x.mean((-2, -1)), pb.linear.weight, pb.linear.bias), dim=1)
    p = (w[:, :, None, None, None] * pb.prompt.repeat(x.shape[0], 1, 1, 1, 1)).sum(1)
    return F.conv2d(F.interpolate(p, x.shape[-2:], mode="bilinear"), pb.conv.weight, padding=1)


def _lit_up(ub: torch.nn.Module, x: torch.Tensor, prompt: torch.Tensor, skip: torch.Tensor,
            hist: torch.Tensor | None) -> torch.Tensor:
    if ub.n_history:
        x = torch.tile(x, (1, ub.n_history + 1, 1, 1)) if hist is None else torch.cat([x, hist], 1)
        x = _lit_cab(ub.momentum_cab, F.conv2d(x, ub.momentum.weight))
    x = F.conv2d(_lit_seq(ub.fuse, torch.cat([x, prompt], 1)), ub.reduce.weight)
    x = F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), ub.up.weight)
    return _lit_cab(ub.cab, x + skip)


def _lit_unet(u: torch.nn.Module, x: torch.Tensor, hist: list | None) -> tuple[torch.Tensor, list | None]:
    x = F.conv2d(x, u.feat_extract.weight, padding=u.feat_extract.padding)
    skips = []
    for enc in (u.enc1, u.enc2, u.enc3):
        e = _lit_seq(enc.encoder, x)
        skips.append(e)
        x = F.conv2d(e, enc.down.weight, enc.down.bias, stride=2, padding=1)
    x = _lit_seq(u.bottleneck, x)
    cur = []
    for i, (dec, pb, sk, e) in enumerate(zip((u.dec3, u.dec2, u.dec1), (u.prompt3, u.prompt2, u.prompt1),
                                             (u.skip3, u.skip2, u.skip1), skips[::-1])):
        cur.append(x)
        x = _lit_up(dec, x, _lit_prompt(pb, x), _lit_seq(sk, e), None if hist is None else hist[i])
    out = F.conv2d(x, u.conv_last.weight, padding=2)
    if not u.n_history:
        return out, None
    if hist is None:
        return out, [torch.tile(c, (1, u.n_history, 1, 1)) for c in cur]
    return out, [torch.cat([c, h[:, :-c.shape[1]]], 1) for c, h in zip(cur, hist)]


def _lit_norm_unet(nu: torch.nn.Module, z: torch.Tensor, hist: list | None) -> tuple[torch.Tensor, list | None]:
    b, c, h, w = z.shape
    x = torch.view_as_real(z).permute(0, 4, 1, 2, 3).reshape(b, 2 * c, h, w)  # b c h w two -> b (two c) h w
    mean = x.reshape(b, -1).mean(1).view(b, 1, 1, 1)
    std = x.reshape(b, -1).std(1).view(b, 1, 1, 1)
    hm, wm = ((h - 1) | 7) + 1, ((w - 1) | 7) + 1
    hp, wp = [math.floor((hm - h) / 2), math.ceil((hm - h) / 2)], [math.floor((wm - w) / 2), math.ceil((wm - w) / 2)]
    y, hist = _lit_unet(nu.unet, F.pad((x - mean) / std, wp + hp), hist)
    y = y[..., hp[0]:hm - hp[1], wp[0]:wm - wp[1]] * std + mean
    y = y.reshape(b, 2, -1, h, w).permute(0, 2, 3, 4, 1).contiguous()
    return torch.view_as_complex(y), hist


def _literal_forward(model: PromptMR, k: torch.Tensor, mask: torch.Tensor, nlf: int) -> torch.Tensor:
    """docs/promptmr.md 1.3-1.4 stated literally: 2-D centred FFTs, tiled history, every output block."""
    b, a, c, h, w = k.shape
    pad = (w - nlf + 1) // 2
    acs = torch.zeros_like(k)
    acs[..., pad:pad + nlf] = k[..., pad:pad + nlf]
    items = ifft2c(acs).permute(0, 2, 1, 3, 4).reshape(b * c, a, h, w)
    sens = _lit_norm_unet(model.sens_net.norm_unet, items, None)[0].view(b, c, a, h, w).permute(0, 2, 1, 3, 4)
    sens = sens / sens.abs().square().sum(2, keepdim=True).sqrt()
    m = mask[:, None, None, None, :]
    x0 = (ifft2c(k) * sens.conj()).sum(2)
    x, latent, hist = x0.clone(), x0.clone(), None
    for cas in model.cascades:
        ffx = (ifft2c(torch.where(m, fft2c(x[:, :, None] * sens), 0)) * sens.conj()).sum(2)
        buffer = torch.cat([ffx, latent, x0] + [ffx - x0] * (cas.n_buffer - 3), 1)
        out, hist = _lit_norm_unet(cas.unet, torch.cat([x, buffer], 1), hist)
        blocks = out.split(a, dim=1)
        latent = blocks[2]
        x = x - cas.dc_weight * (ffx - x0) - blocks[0]
    return x[:, a // 2].abs()


@pytest.mark.parametrize("h, w", [(24, 20), (19, 27)])
def test_matches_literal_statement_of_the_spec(h: int, w: int) -> None:
    model = PromptMR(tiny_config()).double()
    k, mask = make_input(1, 3, 2, h, w, seed=1)
    nlf = 6
    with torch.no_grad():
        fast = model(k, mask, nlf).image
        literal = _literal_forward(model, k, mask, nlf)
    assert torch.allclose(fast, literal, rtol=1e-10, atol=1e-12 * float(literal.abs().max()))


# ----- exact activation checkpointing (docs/promptmr.md P1) -----------------------------------------------------------
def _gradients(cfg: PromptMRConfig, k: torch.Tensor, mask: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model = PromptMR(cfg).double()
    out = model(k, mask, -1)
    loss = out.image.square().mean() + out.sens_maps.real.mean()
    loss.backward()
    # The history path is live: the momentum weights that see earlier cascades get a gradient.
    dec1 = model.cascades[-1].unet.unet.dec1
    assert float(dec1.momentum.weight.grad[:, dec1.in_channels:].abs().max()) > 0
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("per_coil", [False, True])
def test_checkpointed_gradients_equal_plain_gradients(per_coil: bool) -> None:
    k, mask = make_input(1, 3, 3, 20, 18, seed=2)
    base = tiny_config(n_history=2, num_cascades=3, sens_per_coil=per_coil)
    loss_plain, plain = _gradients(base, k, mask)
    loss_ckpt, ckpt = _gradients(base.replace(use_checkpoint=True, sens_use_checkpoint=True), k, mask)
    assert loss_plain == loss_ckpt
    assert len(plain) == len(ckpt) and all(g is not None for g in plain + ckpt)
    for gp, gc in zip(plain, ckpt):
        scale = float(gp.abs().max())
        assert float((gp - gc).abs().max()) <= 1e-10 * max(scale, 1e-300)
