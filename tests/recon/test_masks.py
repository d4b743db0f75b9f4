"""The public SNU mask rule and the mask utilities."""

import numpy as np
import pytest

from recon.masks import (
    acs_bounds,
    acs_width,
    detect_acs_width,
    equispaced_mask,
    infer_acc,
    is_public_pattern,
    public_mask,
    public_start,
    random_mask,
)

WIDTHS = (320, 322, 338, 356, 368, 370, 372, 386, 388, 392, 396, 480, 64, 65)


def test_public_mask_examples_from_the_challenge():
    m = public_mask(396, 8)
    lo, hi = acs_bounds(396, acs_width(396))
    assert (lo, hi - 1) == (182, 213)  # 32 ACS columns
    assert np.all(m[182:214] == 1)
    assert np.flatnonzero(m)[0] == 6  # (396 // 2) % 8
    lo, hi = acs_bounds(320, acs_width(320))
    assert (lo, hi - 1) == (147, 172)
    assert public_start(322, 4) == 1


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("acc", (4, 8))
def test_public_mask_rule(width, acc):
    m = public_mask(width, acc)
    assert m.dtype == np.float32 and m.shape == (width,)
    start = (width // 2) % acc
    # every acc-th column from (W//2) % acc, so the centre column is sampled
    assert np.all(m[start::acc] == 1)
    assert m[width // 2] == 1
    n_acs = int(round(0.08 * width))
    lo = (width - n_acs + 1) // 2
    assert np.all(m[lo:lo + n_acs] == 1)
    # nothing else is sampled
    expected = np.zeros(width, bool)
    expected[start::acc] = True
    expected[lo:lo + n_acs] = True
    np.testing.assert_array_equal(m != 0, expected)
    assert infer_acc(m) == acc
    assert is_public_pattern(m)


@pytest.mark.parametrize("width", (320, 396, 65))
@pytest.mark.parametrize("acc", (4, 8))
def test_shifted_masks_are_not_public(width, acc):
    for start in range(acc):
        m = equispaced_mask(width, acc, start)
        assert is_public_pattern(m) == (start == (width // 2) % acc)


def test_random_mask_owns_its_rng_and_keeps_acs():
    state = np.random.get_state()
    a = random_mask(396, 4, np.random.default_rng(5))
    b = random_mask(396, 4, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert np.all(a[182:214] == 1)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1])


def test_detect_acs_width_on_public_masks():
    # the symmetric run around W//2: for W=396 the ACS block 182..213 is centred on 198
    assert detect_acs_width(public_mask(396, 8)) == 32
    assert detect_acs_width(np.zeros(10, np.float32)) == 0
    m = np.zeros(20, np.float32)
    m[8:14] = 1  # left of centre: 8, 9 (2 columns); from centre rightwards: 10..13 (4)
    assert detect_acs_width(m) == 4


def test_bad_masks_are_refused():
    with pytest.raises(ValueError):
        equispaced_mask(64, 4, 4)
    with pytest.raises(ValueError):
        infer_acc(np.zeros((2, 3)))
