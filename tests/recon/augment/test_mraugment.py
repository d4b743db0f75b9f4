"""Tests of recon.augment.mraugment: k-space/target consistency of MRAugment and its target rules."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from recon.augment import BRAIN, KNEE, AnatomyAugConfig, MRAugmentConfig, MRAugmenter
from recon.augment.mraugment import _affine_theta
from recon.errors import InputError
from recon.fft import center_crop, fft2c, ifft2c, rss

ONLY_AFFINE_ZERO = AnatomyAugConfig(translation_weight=1, rotation_weight=1, shearing_weight=1, scaling_weight=1)
ONLY_FLIPH = AnatomyAugConfig(fliph_weight=1)
ONLY_FLIPV = AnatomyAugConfig(flipv_weight=1)


def make_kspace(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth off-centre object with coil-dependent smooth phase and magnitude, as k-space (complex64)."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - 0.45 * h, torch.arange(w) - 0.55 * w, indexing="ij")
    obj = torch.exp(-((xx / (0.2 * w)) ** 2 + (yy / (0.15 * h)) ** 2)) + 0.5 * torch.exp(
        -(((xx - 0.1 * w) / (0.07 * w)) ** 2 + ((yy + 0.1 * h) / (0.1 * h)) ** 2))
    lead = shape[:-2]
    phase = torch.randn(*lead, 1, 1, generator=g) + 0.02 * torch.randn(*lead, 1, 1, generator=g) * xx
    gain = 1.0 + 0.3 * torch.rand(*lead, 1, 1, generator=g) * torch.cos(yy / h * 3.0)
    images = (obj * gain * torch.exp(1j * phase)).to(torch.complex64)
    return fft2c(images)


def rss_label(kspace: torch.Tensor, h: int, w: int) -> torch.Tensor:
    centre = kspace[kspace.shape[0] // 2] if kspace.ndim == 4 else kspace
    return center_crop(rss(ifft2c(centre)), h, w).contiguous()


def augmenter(anat: AnatomyAugConfig | None = None, **kwargs) -> MRAugmenter:
    if anat is not None:
        kwargs.update(brain=anat, knee=anat)
    return MRAugmenter(MRAugmentConfig(enabled=True, **kwargs))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_presets_are_the_pipeline_table() -> None:
    assert (BRAIN.translation_weight, BRAIN.max_translation_x, BRAIN.max_translation_y) == (1, 0.03, 0.05)
    assert (KNEE.translation_weight, KNEE.max_translation_x, KNEE.max_translation_y) == (1, 0.08, 0.08)
    for a in (BRAIN, KNEE):
        assert (a.rotation_weight, a.max_rotation, a.shearing_weight) == (1, 5, 1)
        assert (a.scaling_weight, a.max_scaling, a.flipv_weight, a.rot90_weight) == (1, 0.12, 0, 0)
        assert a.interpolation == "bilinear"
    assert (BRAIN.max_shear_x, BRAIN.max_shear_y, BRAIN.fliph_weight) == (5, 5, 0.4)
    assert (KNEE.max_shear_x, KNEE.max_shear_y, KNEE.fliph_weight) == (10, 10, 0.5)
    assert MRAugmentConfig().target == "label"


def test_p0_is_exact_identity() -> None:
    k = make_kspace((3, 4, 24, 20))
    label = torch.rand(16, 16)
    for aug, p in [(augmenter(), 0.0), (MRAugmenter(MRAugmentConfig(enabled=False)), 1.0)]:
        res = aug(k, label, "knee", p, np.random.default_rng(0))
        assert not res.augmented
        assert res.kspace is k and res.target is label
        assert res.applied["scale"] == 1.0 and res.applied["rot90"] == 0 and not res.applied["fliph"]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(3, 4, 24, 20), (4, 23, 17)])
def test_zero_limits_forced_fire_is_identity(shape: tuple[int, ...], interpolation: str) -> None:
    k = make_kspace(shape)
    label = rss_label(k, 14, 12) * 1.7 + 0.1  # not the RSS: the label path must carry the label itself
    res = augmenter(replace(ONLY_AFFINE_ZERO, interpolation=interpolation))(k, label, "brain", 1.0,
                                                                            np.random.default_rng(0))
    assert res.augmented and res.applied["affine"]
    assert res.kspace.shape == k.shape and res.kspace.dtype == torch.complex64
    assert rel_err(res.kspace, k) < 1e-6
    assert rel_err(res.target, label) < 1e-6


@pytest.mark.parametrize("width,w", [(20, 12), (21, 12), (10, 12), (11, 12)])
def test_hflip_is_exact_for_kspace_and_label(width: int, w: int) -> None:
    k = make_kspace((2, 3, 16, width), seed=1)
    # A label unrelated to the RSS (so only a geometric copy can match), zero-padded where the crop pads.
    label = center_crop(torch.rand(16, width, generator=torch.Generator().manual_seed(2)), 10, w).contiguous()
    res = augmenter(ONLY_FLIPH)(k, label, "knee", 1.0, np.random.default_rng(0))
    assert res.applied["fliph"] and res.augmented
    expected_k = fft2c(ifft2c(k).flip(-1))
    assert rel_err(res.kspace, expected_k) < 1e-6
    flipped = label.flip(-1)
    if (width - w) % 2 == 0:
        # The crop window is symmetric about the image centre: the flip is exact, bit for bit.
        assert torch.equal(res.target, flipped)
    else:
        # Odd W - w: the window is one pixel off-centre, so the flipped label moves one pixel; the new edge
        # column lies outside the stored crop and comes from the fill (RSS of the image at that place).
        if width >= w:
            assert torch.equal(res.target[:, 1:], flipped[:, :-1])
            left = (width - w) // 2
            fill_col = rss(ifft2c(k[1]))[3:13, width - 1 - left]
            assert torch.allclose(res.target[:, 0], fill_col, atol=0, rtol=1e-6)
        else:  # label wider than the image: its column without image content comes back as zero padding
            assert torch.equal(res.target[:, 1:], flipped[:, :-1])
            assert torch.all(res.target[:, 0] == 0)


@pytest.mark.parametrize("height", [18, 19])
def test_vflip_is_exact_for_even_row_margin(height: int) -> None:
    k = make_kspace((3, height, 16), seed=4)
    label = torch.rand(10, 10, generator=torch.Generator().manual_seed(5))
    res = augmenter(ONLY_FLIPV)(k, label, "brain", 1.0, np.random.default_rng(0))
    assert rel_err(res.kspace, fft2c(ifft2c(k).flip(-2))) < 1e-6
    if (height - 10) % 2 == 0:
        assert torch.equal(res.target, label.flip(-2))
    else:
        assert torch.equal(res.target[1:], label.flip(-2)[:-1])


def _shift_reference(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """NumPy reference of an integer translation with 'reflect' padding."""
    h, w = images.shape[-2:]
    pad = [(0, 0)] * (images.ndim - 2) + [(abs(dy), abs(dy)), (abs(dx), abs(dx))]
    padded = np.pad(images, pad, mode="reflect")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top:top + h, left:left + w]


@pytest.mark.parametrize("limit", [0.3, 2.5])  # 2.5: shifts beyond the image size (repeated reflection)
def test_translation_matches_numpy_reflect_reference(limit: float) -> None:
    k = make_kspace((2, 3, 32, 26), seed=6)
    anat = AnatomyAugConfig(translation_weight=1, max_translation_x=limit, max_translation_y=limit)
    seen = 0
    for seed in range(6):
        res = augmenter(anat)(k, None, "knee", 1.0, np.random.default_rng(seed))
        dy, dx = res.applied["translation_y"], res.applied["translation_x"]
        assert abs(dx) <= round(limit * 26) and abs(dy) <= round(limit * 32)
        seen += dx != 0 and dy != 0
        expected = _shift_reference(ifft2c(k).numpy(), dy, dx)
        assert np.abs(ifft2c(res.kspace).numpy() - expected).max() < 1e-6 * np.abs(expected).max()
        assert res.target is None
    assert seen >= 3


def test_label_rule_equals_rss_rule_when_label_is_the_rss_crop() -> None:
    k = make_kspace((3, 4, 40, 34), seed=7)
    label = rss_label(k, 24, 24)
    pixel_only = AnatomyAugConfig(fliph_weight=1, translation_weight=1, max_translation_x=0.2, max_translation_y=0.2)
    for seed in range(4):
        a = augmenter(pixel_only)(k, label, "brain", 1.0, np.random.default_rng(seed))
        b = augmenter(pixel_only, target="rss")(k, label, "brain", 1.0, np.random.default_rng(seed))
        assert a.applied == b.applied and torch.equal(a.kspace, b.kspace)
        assert rel_err(a.target, b.target) < 1e-6
    # With the interpolating affine the label (a magnitude) and the coil images (complex) are resampled
    # separately, so the two rules agree only up to interpolation error.
    for seed in range(4):
        a = augmenter(KNEE)(k, label, "knee", 1.0, np.random.default_rng(seed))
        b = augmenter(KNEE, target="rss")(k, label, "knee", 1.0, np.random.default_rng(seed))
        assert rel_err(a.target, b.target) < 0.02


def test_rss_rule_target_is_rss_of_new_kspace() -> None:
    k = make_kspace((3, 4, 40, 34), seed=8)
    label = torch.zeros(24, 24)  # ignored by the rss rule, except for its size
    aug = augmenter(BRAIN, target="rss")
    res = aug(k, label, "brain", 1.0, np.random.default_rng(1))
    assert res.augmented
    assert rel_err(res.target, rss_label(res.kspace, 24, 24)) < 1e-5
    # The rule holds for un-augmented samples too (p = 0): the target switches, the k-space does not.
    res0 = aug(k, label, "brain", 0.0, np.random.default_rng(1))
    assert res0.kspace is k and not res0.augmented
    assert torch.allclose(res0.target, rss_label(k, 24, 24))
    # Without a target, the configured size is used.
    res1 = augmenter(BRAIN, target="rss", target_size=(20, 18))(k, None, "brain", 1.0, np.random.default_rng(1))
    assert res1.target.shape == (20, 18)


def test_small_rotation_keeps_energy_and_changes_image() -> None:
    k = make_kspace((4, 48, 48), seed=9)
    anat = AnatomyAugConfig(rotation_weight=1, max_rotation=5)
    res = augmenter(anat)(k, None, "brain", 1.0, np.random.default_rng(6))
    assert 4.0 < abs(res.applied["rotation"]) <= 5.0
    e0, e1 = float(k.abs().square().sum()), float(res.kspace.abs().square().sum())
    assert abs(e1 / e0 - 1) < 0.02
    assert rel_err(rss(ifft2c(res.kspace)), rss(ifft2c(k))) > 0.05


def test_rotation_direction_and_centre() -> None:
    # +90 degrees moves a dot right of the centre ((W-1)/2) to above it (row 0 on top).
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1.0
    grid = torch.nn.functional.affine_grid(
        torch.tensor(_affine_theta(90.0, 0.0, 0.0, 1.0, 9, 9), dtype=torch.float32)[None], [1, 1, 9, 9],
        align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.nonzero(y[0, 0] > 0.5).tolist() == [[1, 4]]


def test_rot90_square_and_non_square() -> None:
    anat = AnatomyAugConfig(rot90_weight=1)
    ks = make_kspace((2, 16, 16), seed=10)
    ks_seen = set()
    for seed in range(12):
        res = augmenter(anat)(ks, None, "knee", 1.0, np.random.default_rng(seed))
        q = res.applied["rot90"]
        ks_seen.add(q)
        assert rel_err(res.kspace, fft2c(torch.rot90(ifft2c(ks), q, dims=(-2, -1)))) < 1e-6
    assert ks_seen == {1, 2, 3}
    kn = make_kspace((2, 16, 12), seed=10)
    for seed in range(6):
        res = augmenter(anat)(kn, None, "knee", 1.0, np.random.default_rng(seed))
        assert res.applied["rot90"] == 2 and res.kspace.shape == kn.shape


def test_output_shapes_dtypes_and_determinism() -> None:
    k = make_kspace((3, 4, 40, 34), seed=11)
    label = rss_label(k, 24, 24)
    aug = augmenter(KNEE)
    a = aug(k, label, "knee", 1.0, np.random.default_rng(42))
    b = aug(k, label, "knee", 1.0, np.random.default_rng(42))
    c = aug(k, label, "knee", 1.0, np.random.default_rng(43))
    assert a.kspace.shape == k.shape and a.kspace.dtype == torch.complex64
    assert a.target.shape == (24, 24) and a.target.dtype == torch.float32
    assert a.applied == b.applied and torch.equal(a.kspace, b.kspace) and torch.equal(a.target, b.target)
    assert a.applied != c.applied
    k3 = make_kspace((4, 40, 34), seed=11)
    r3 = aug(k3, None, "knee", 1.0, np.random.default_rng(42))
    assert r3.kspace.shape == k3.shape and r3.target is None


def test_fire_rates_follow_weight_times_p_and_limits() -> None:
    rng = np.random.default_rng(0)
    aug = MRAugmenter(MRAugmentConfig(enabled=True))
    for anatomy, preset in [("brain", BRAIN), ("knee", KNEE)]:
        draws = [aug.draw(anatomy, 0.5, 768, 396, rng) for _ in range(4000)]
        assert abs(np.mean([d["fliph"] for d in draws]) - 0.5 * preset.fliph_weight) < 0.03
        assert abs(np.mean([d["rotation"] != 0 for d in draws]) - 0.5) < 0.03
        assert not any(d["flipv"] or d["rot90"] for d in draws)
        assert max(abs(d["translation_x"]) for d in draws) <= round(preset.max_translation_x * 396)
        assert max(abs(d["translation_y"]) for d in draws) <= round(preset.max_translation_y * 768)
        assert max(abs(d["shear_x"]) for d in draws) <= preset.max_shear_x
        scales = [d["scale"] for d in draws]
        assert 0.88 <= min(scales) and max(scales) <= 1.12
    strong = MRAugmenter(MRAugmentConfig(enabled=True, magnitude=2.0))
    assert max(abs(strong.draw("knee", 1.0, 64, 64, rng)["rotation"]) for _ in range(500)) > 5.0


def test_global_rng_untouched() -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    t_state, n_state, p_state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    k = make_kspace((2, 3, 20, 18), seed=12)
    augmenter(KNEE)(k, rss_label(k, 12, 12), "knee", 1.0, np.random.default_rng(0))
    assert torch.equal(torch.random.get_rng_state(), t_state)
    assert np.array_equal(np.random.get_state()[1], n_state[1]) and random.getstate() == p_state


def test_bad_inputs_rejected() -> None:
    aug = augmenter(KNEE)
    k = make_kspace((3, 16, 16))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="complex"):
        aug(k.real, None, "knee", 0.5, rng)
    with pytest.raises(ValueError, match="anatomy"):
        aug(k, None, "liver", 0.5, rng)
    with pytest.raises(ValueError, match="p must be"):
        aug(k, None, "knee", 1.5, rng)
    with pytest.raises(ValueError, match="target"):
        aug(k, torch.zeros(2, 8, 8), "knee", 0.5, rng)
    with pytest.raises(InputError):
        MRAugmentConfig(target="image")
    with pytest.raises(InputError):
        AnatomyAugConfig(max_scaling=1.2)
    with pytest.raises(InputError):
        AnatomyAugConfig(interpolation="nearest")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    k = make_kspace((3, 4, 40, 34), seed=13)
    label = rss_label(k, 24, 24)
    aug = augmenter(KNEE)
    cpu = aug(k, label, "knee", 1.0, np.random.default_rng(4))
    gpu = aug(k.cuda(), label.cuda(), "knee", 1.0, np.random.default_rng(4))
    assert gpu.kspace.is_cuda and gpu.target.is_cuda and gpu.applied == cpu.applied
    assert rel_err(gpu.kspace.cpu(), cpu.kspace) < 1e-4
    assert rel_err(gpu.target.cpu(), cpu.target) < 1e-4
