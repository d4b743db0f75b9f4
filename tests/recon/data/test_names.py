"""Challenge file names."""

import pytest

from recon.data.names import expert_name, parse_name, sort_key
from recon.errors import InputError


def test_train_and_leaderboard_names():
    info = parse_name("/x/train/kspace/brain_acc4_12.h5")
    assert (info.anatomy, info.acc, info.index, info.leaderboard) == ("brain", 4, 12, False)
    info = parse_name("knee_test7.h5")
    assert (info.anatomy, info.acc, info.index, info.leaderboard) == ("knee", None, 7, True)


@pytest.mark.parametrize("bad", ["brain_test_1.h5", "liver_acc4_1.h5", "brain_acc4_1.hdf5", "brain.h5"])
def test_unknown_patterns_are_refused_with_the_name(bad):
    with pytest.raises(InputError, match="unknown file name pattern"):
        parse_name(bad)


def test_order_and_experts():
    names = ["knee_test1.h5", "brain_test10.h5", "brain_test2.h5"]
    assert sorted(names, key=sort_key) == ["brain_test2.h5", "brain_test10.h5", "knee_test1.h5"]
    assert expert_name("knee", 8) == "knee_acc8"
    with pytest.raises(ValueError):
        expert_name("knee", 2)
