"""Tests of recon.augment.mask_aug: Hacker/Helper mask replacement statistics and public-start exclusion."""

from __future__ import annotations

import random

import numpy as np
import pytest

from recon.augment import MaskAugConfig, MaskAugmenter, MaskDecision
from recon.errors import InputError
from recon.masks import equispaced_mask, infer_acc, is_public_pattern, public_mask, public_start

N_DRAWS = 2000


def _draws(cfg: MaskAugConfig, width: int, *, epoch: int = 0, p: float = 1.0, acc: int = 4,
           seed: int = 0, n: int = N_DRAWS) -> list[MaskDecision]:
    aug = MaskAugmenter(cfg)
    rng = np.random.default_rng(seed)
    file_mask = public_mask(width, acc)
    return [aug(file_mask, epoch, p, rng) for _ in range(n)]


@pytest.mark.parametrize("width", [396, 322, 320, 387])
def test_hacker_always_public_pattern_with_both_accelerations(width: int) -> None:
    decisions = _draws(MaskAugConfig(mode="hacker"), width, p=0.0, acc=8)  # p is ignored by the Hacker
    accs = np.array([d.acc for d in decisions])
    assert set(accs.tolist()) == {4, 8}
    assert abs(np.mean(accs == 4) - 0.5) < 0.05
    for d in decisions[:200]:
        assert d.kind == "public"
        assert d.start == public_start(width, d.acc)
        assert d.mask.dtype == np.float32 and d.mask.shape == (width,)
        np.testing.assert_array_equal(d.mask, public_mask(width, d.acc))
        assert is_public_pattern(d.mask)
        assert infer_acc(d.mask) == d.acc


def test_helper_p0_keeps_file_mask_and_off_mode_always_keeps() -> None:
    file_mask = public_mask(396, 8)
    for cfg, p in [(MaskAugConfig(mode="helper"), 0.0), (MaskAugConfig(mode="off"), 1.0)]:
        aug = MaskAugmenter(cfg)
        rng = np.random.default_rng(3)
        for _ in range(100):
            d = aug(file_mask, 40, p, rng)
            assert d.kind == "file" and d.acc == 8 and d.start is None
            np.testing.assert_array_equal(d.mask, file_mask)
            assert d.mask is not file_mask


def test_helper_replacement_rate_follows_p() -> None:
    decisions = _draws(MaskAugConfig(mode="helper"), 396, p=0.3, n=4000)
    replaced = np.mean([d.kind != "file" for d in decisions])
    assert abs(replaced - 0.3) < 0.03


def test_helper_p1_half_random_half_equispaced() -> None:
    width = 396
    decisions = _draws(MaskAugConfig(mode="helper"), width, n=4000)
    kinds = [d.kind for d in decisions]
    assert "file" not in kinds
    assert abs(kinds.count("random") / len(kinds) - 0.5) < 0.03
    assert abs(np.mean([d.acc == 4 for d in decisions]) - 0.5) < 0.03
    for acc in (4, 8):
        starts = [d.start for d in decisions if d.kind == "equispaced" and d.acc == acc]
        counts = np.bincount(starts, minlength=acc)
        assert len(counts) == acc and counts.min() > 0.6 * len(starts) / acc  # every start, roughly uniform
    for d in decisions[:300]:
        if d.kind == "random":
            # i.i.d. columns at 1/acc plus the ACS block: a sampled fraction near 1/acc + 0.08.
            assert 0.5 * (1 / d.acc) < d.mask.mean() < 1 / d.acc + 0.08 + 0.12
        else:
            assert d.mask[d.start::d.acc].all()


def test_random_fraction_setting_is_respected() -> None:
    decisions = _draws(MaskAugConfig(mode="helper", random_fraction=0.2), 396, n=3000)
    assert abs(np.mean([d.kind == "random" for d in decisions]) - 0.2) < 0.03


@pytest.mark.parametrize("width", [396, 322, 387, 15, 9])
def test_exclusion_never_yields_public_start(width: int) -> None:
    cfg = MaskAugConfig(mode="helper", exclude_public_from_epoch=30)
    publics = [public_mask(width, a) for a in (4, 8)]

    def is_public(mask: np.ndarray) -> bool:
        return any(np.array_equal(mask, pub) for pub in publics)

    before = _draws(cfg, width, epoch=29, n=3000, seed=1)
    after = _draws(cfg, width, epoch=30, n=3000, seed=1)
    # Before the epoch the public start is drawn with probability 1/acc (so the check below can fail).
    assert any(d.kind == "equispaced" and d.start == public_start(width, d.acc) for d in before)
    for d in after:
        assert d.kind in ("random", "equispaced")
        if d.kind == "equispaced":
            assert d.start != public_start(width, d.acc)
        assert not is_public(d.mask)
    for acc in (4, 8):
        seen = {d.start for d in after if d.kind == "equispaced" and d.acc == acc}
        allowed = {s for s in range(acc) if not is_public(equispaced_mask(width, acc, s))}
        assert seen == allowed and public_start(width, acc) not in allowed
        if width > 100:  # at real widths only the public start itself is excluded
            assert allowed == set(range(acc)) - {public_start(width, acc)}


def test_exclusion_rejects_random_masks_equal_to_public() -> None:
    # W=9: ACS is the one centre column; a random acc4 mask equals the public pattern about 1 % of the time.
    width = 9
    public4 = public_mask(width, 4)
    cfg_in = MaskAugConfig(mode="helper", random_fraction=1.0, accelerations=(4,))
    cfg_ex = MaskAugConfig(mode="helper", random_fraction=1.0, accelerations=(4,), exclude_public_from_epoch=0)
    hits_in = sum(np.array_equal(d.mask, public4) for d in _draws(cfg_in, width, n=4000))
    hits_ex = sum(np.array_equal(d.mask, public4) for d in _draws(cfg_ex, width, n=4000))
    assert hits_in > 10
    assert hits_ex == 0


def test_exclusion_impossible_width_raises() -> None:
    cfg = MaskAugConfig(mode="helper", random_fraction=1.0, exclude_public_from_epoch=0, center_fraction=1.0)
    with pytest.raises(ValueError, match="non-public random mask"):
        MaskAugmenter(cfg)(np.ones(6, np.float32), 0, 1.0, np.random.default_rng(0))


def test_same_seed_same_decisions_and_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()
    cfg = MaskAugConfig(mode="helper", exclude_public_from_epoch=30)
    a = _draws(cfg, 322, epoch=31, seed=7, n=300)
    b = _draws(cfg, 322, epoch=31, seed=7, n=300)
    c = _draws(cfg, 322, epoch=31, seed=8, n=300)
    assert all(x.kind == y.kind and x.acc == y.acc and x.start == y.start and np.array_equal(x.mask, y.mask)
               for x, y in zip(a, b))
    assert any(not np.array_equal(x.mask, y.mask) for x, y in zip(a, c))
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


def test_custom_center_fraction_sets_acs_width() -> None:
    d = MaskAugmenter(MaskAugConfig(mode="hacker", center_fraction=0.16))(
        public_mask(100, 4), 0, 1.0, np.random.default_rng(0))
    lo = (100 - 16 + 1) // 2
    assert d.mask[lo:lo + 16].all()
    assert not is_public_pattern(d.mask)


@pytest.mark.parametrize("kwargs", [
    {"mode": "hack"},
    {"accelerations": ()},
    {"accelerations": (1, 4)},
    {"random_fraction": 1.5},
    {"exclude_public_from_epoch": -1},
    {"center_fraction": 0.0},
])
def test_bad_config_rejected(kwargs: dict) -> None:
    with pytest.raises(InputError):
        MaskAugConfig(**kwargs)


def test_bad_call_arguments_rejected() -> None:
    aug = MaskAugmenter(MaskAugConfig(mode="helper"))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="1-D"):
        aug(np.ones((2, 8), np.float32), 0, 0.5, rng)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aug(public_mask(396, 4), 0, 1.5, rng)
