"""The masked, sqrt-area weighted SSIM loss and its per-volume area cache."""

import math

import numpy as np
import pytest
import torch

from recon.losses import LossConfig, MaskedSSIMLoss, VolumeAreaCache, area_weight, foreground_area
from recon.metric import foreground_mask, slice_ssim, ssim


def _squares(sides, n=64, value=1e-3):
    """(S, n, n) targets, each with a centred square of the given side (0 = empty slice)."""
    out = np.zeros((len(sides), n, n), np.float32)
    for i, side in enumerate(sides):
        lo = (n - side) // 2
        out[i, lo : lo + side, lo : lo + side] = value
    return out


def _batch(seed=0, b=3, n=64):
    """A foreground block far enough (>= 16 px) from the borders that the mask does not reach them."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(b, n, n)
    target[:, 22:42, 20:44] = 1e-3 * (0.5 + torch.rand(b, 20, 24, generator=g))
    output = (target + 3e-5 * torch.randn(b, n, n, generator=g)).clamp_min(0)
    return output, target, torch.full((b,), 1.5e-3)


def test_loss_equals_one_minus_metric_ssim_unweighted():
    output, target, maxv = _batch()
    anatomies = ["brain", "knee", "brain"]
    loss_fn = MaskedSSIMLoss(LossConfig(sqrt_area_weight=False))
    out = loss_fn(output, target, maxv, anatomies, area_weight=None, epoch=0)
    metric = [slice_ssim(output[i], target[i], float(maxv[i]), anatomies[i]) for i in range(3)]
    torch.testing.assert_close(out.ssim, torch.tensor(metric), rtol=0, atol=1e-7)
    assert float(out.loss) == pytest.approx(1 - np.mean(metric), abs=1e-7)
    # Weighting on with weights of one gives the same value.
    weighted = MaskedSSIMLoss()(output, target, maxv, anatomies, area_weight=torch.ones(3), epoch=0)
    assert float(weighted.loss) == pytest.approx(float(out.loss), abs=1e-8)


def test_loss_applies_the_area_weights_per_slice():
    output, target, maxv = _batch(1)
    w = torch.tensor([1.0, 0.5, 0.25])
    out = MaskedSSIMLoss()(output, target, maxv, "brain", area_weight=w)
    # loss = mean_b (1 - ssim_b) * w_b
    expected = float(((1 - out.ssim) * w).mean())
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    assert float(out.loss) < float((1 - out.ssim).mean())  # the weights really scale it down
    torch.testing.assert_close(out.weight, w)


def test_shade_one_and_gamyun_off_are_plain_ssim():
    output, target, maxv = _batch(2)
    plain = 1 - ssim(output, target, maxv)
    for cfg in (LossConfig(shade=1.0, sqrt_area_weight=False), LossConfig(use_gamyun=False, sqrt_area_weight=False)):
        out = MaskedSSIMLoss(cfg)(output, target, maxv, "brain")
        assert float(out.loss) == pytest.approx(float(plain.mean()), abs=1e-7)
    # An intermediate shade lies in between masking off the background and keeping it.
    half = MaskedSSIMLoss(LossConfig(shade=0.5, sqrt_area_weight=False))(output, target, maxv, "brain").loss
    masked = MaskedSSIMLoss(LossConfig(sqrt_area_weight=False))(output, target, maxv, "brain").loss
    assert float(half) != pytest.approx(float(masked), abs=1e-7)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_regularizer_weight_and_start_epoch(kind):
    output, target, maxv = _batch(3)
    w = torch.tensor([1.0, 0.5, 0.8])
    cfg = LossConfig(regularizer=kind, regularizer_weight=0.1, regularizer_start_epoch=2)
    loss_fn = MaskedSSIMLoss(cfg)
    before = loss_fn(output, target, maxv, "knee", area_weight=w, epoch=1)
    after = loss_fn(output, target, maxv, "knee", area_weight=w, epoch=2)
    assert float(before.regularizer) == 0.0
    mask = foreground_mask(target, "knee")
    diff = (output - target) * mask
    per_slice = (diff.abs() if kind == "l1" else diff.square()).mean(dim=(-2, -1))
    expected = 0.1 * float((per_slice * w).mean())  # lambda * mean_b(reg_b * w_b)
    assert expected > 0
    assert float(after.regularizer) == pytest.approx(expected, rel=1e-5)
    assert float(after.loss) == pytest.approx(float(before.loss) + expected, rel=1e-6)


def test_loss_gradient_reaches_the_output_only():
    output, target, maxv = _batch(4)
    output.requires_grad_(True)
    out = MaskedSSIMLoss()(output, target, maxv, ["brain"] * 3, area_weight=torch.tensor([1.0, 0.7, 0.3]))
    out.loss.backward()
    assert output.grad is not None and float(output.grad.abs().sum()) > 0
    # Outside the foreground mask (shade 0) the output has no influence.
    mask = foreground_mask(target, "brain")
    assert 0 < float(mask.mean()) < 0.5
    assert float((output.grad * (1 - mask)).abs().max()) == 0.0


def test_cached_mask_gives_the_same_loss():
    output, target, maxv = _batch(5)
    w = torch.ones(3)
    loss_fn = MaskedSSIMLoss()
    computed = loss_fn(output, target, maxv, "brain", area_weight=w)
    given = loss_fn(output, target, maxv, "brain", area_weight=w, mask=foreground_mask(target, "brain"))
    assert float(given.loss) == float(computed.loss)


def test_volume_area_cache_weights():
    # Areas: side 20 -> 400, side 10 -> 100, empty -> 0 (centred squares are their own masks).
    cache = VolumeAreaCache(keep_masks=True)
    areas = cache.add_volume("brain_acc4_1.h5", _squares([20, 10, 0]), "brain")
    assert areas.tolist() == [400, 100, 0]
    assert "brain_acc4_1.h5" in cache and cache.max_area("brain_acc4_1.h5") == 400
    assert cache.weight("brain_acc4_1.h5", 0) == 1.0
    assert cache.weight("brain_acc4_1.h5", 1) == pytest.approx(0.5)  # sqrt(100 / 400)
    assert cache.weight("brain_acc4_1.h5", 2) == 0.0
    # Augmented target: its own area over the cached volume max, clipped to 1.
    assert cache.weight("brain_acc4_1.h5", 1, target_area=225) == pytest.approx(0.75)  # sqrt(225 / 400)
    assert cache.weight("brain_acc4_1.h5", 1, target_area=900) == 1.0
    # ... or pass the (augmented) target itself: its mask area is recomputed (side 15 -> 225).
    aug = torch.from_numpy(_squares([15])[0])
    assert cache.weight("brain_acc4_1.h5", 1, aug, "brain", True) == pytest.approx(0.75)
    assert cache.weight("brain_acc4_1.h5", 1, aug, "brain", False) == pytest.approx(0.5)  # not augmented: cached
    with pytest.raises(ValueError, match="needs the anatomy"):
        cache.weight("brain_acc4_1.h5", 1, aug)
    # A volume without any foreground weighs 1 everywhere.
    cache.add_volume("knee_acc8_2.h5", _squares([0, 0]), "knee")
    assert cache.weight("knee_acc8_2.h5", 1) == 1.0
    # Cached masks are the metric's masks.
    np.testing.assert_array_equal(cache.mask("brain_acc4_1.h5", 1), foreground_mask(_squares([10])[0], "brain"))
    # Round trip of the areas.
    other = VolumeAreaCache()
    other.load_state_dict(cache.state_dict())
    assert other.weight("brain_acc4_1.h5", 1) == pytest.approx(0.5) and len(other) == 2
    with pytest.raises(KeyError, match="not in the area cache"):
        cache.weight("missing.h5", 0)
    with pytest.raises(IndexError, match="slice 3 out of range"):
        cache.weight("brain_acc4_1.h5", 3)
    with pytest.raises(KeyError, match="no cached masks"):
        other.mask("brain_acc4_1.h5", 0)


def test_area_helpers():
    assert area_weight(0, 0) == 1.0
    assert area_weight(100, 400) == 0.5
    assert foreground_area(torch.from_numpy(_squares([16])[0]), "knee") == 256
    # An augmented (here: shifted and shrunk) target gets its area from its own mask.
    shifted = np.roll(_squares([12])[0], 5, axis=1)
    assert foreground_area(shifted, "brain") == 144
    with pytest.raises(ValueError, match="one \\(H, W\\) slice"):
        foreground_area(_squares([4, 4]), "brain")


def test_loss_bad_input_and_config():
    output, target, maxv = _batch(6)
    with pytest.raises(ValueError, match="no area_weight"):
        MaskedSSIMLoss()(output, target, maxv, "brain")
    with pytest.raises(ValueError, match=r"area_weight must have shape \(3,\)"):
        MaskedSSIMLoss()(output, target, maxv, "brain", area_weight=torch.ones(2))
    with pytest.raises(ValueError, match="one shape"):
        MaskedSSIMLoss()(output, target[:, :-1], maxv, "brain", area_weight=torch.ones(3))
    with pytest.raises(ValueError, match="3 anatomies|anatomies"):
        MaskedSSIMLoss()(output, target, maxv, ["brain"], area_weight=torch.ones(3))
    for kwargs, message in (
        ({"regularizer": "huber"}, "regularizer must be one of"),
        ({"shade": 1.5}, "shade must be in"),
        ({"regularizer_weight": math.nan}, "regularizer_weight"),
        ({"regularizer_start_epoch": -1}, "start_epoch"),
    ):
        with pytest.raises(ValueError, match=message):
            LossConfig(**kwargs)
