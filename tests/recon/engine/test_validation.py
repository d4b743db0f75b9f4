"""Validation bookkeeping: group names, slice-weighted averages, the leaderboard mean, panels."""

from __future__ import annotations

import pytest
import torch

from recon.engine import validation
from recon.engine.transform import TrainItem
from recon.engine.validation import metrics_from_stats, panel_indices, validate

# (sum of slice scores, slice count) per group; the per-slice scores behind them are
# brain_acc4 0.8 + 1.0, knee_acc4 0.5 + 0.7 + 0.9, brain_acc8 0.6, knee_acc8 0.6 + 0.8.
STATS = {
    "brain_acc4": (1.8, 2),
    "knee_acc4": (2.1, 3),
    "brain_acc8": (0.6, 1),
    "knee_acc8": (1.4, 2),
}


def test_group_means_are_sum_over_count() -> None:
    m = metrics_from_stats(STATS)
    assert m["val/ssim/brain_acc4"] == pytest.approx(0.9)
    assert m["val/ssim/knee_acc4"] == pytest.approx(0.7)
    assert m["val/ssim/brain_acc8"] == pytest.approx(0.6)
    assert m["val/ssim/knee_acc8"] == pytest.approx(0.7)
    assert m["val/slices"] == 8.0


def test_acceleration_scores_are_slice_weighted_over_anatomies() -> None:
    m = metrics_from_stats(STATS)
    # acc4: (1.8 + 2.1) / (2 + 3) = 0.78, not the mean of the group means (0.8)
    assert m["val/ssim/acc4"] == pytest.approx(0.78)
    # acc8: (0.6 + 1.4) / (1 + 2) = 2/3, not (0.6 + 0.7) / 2 = 0.65
    assert m["val/ssim/acc8"] == pytest.approx(2.0 / 3.0)


def test_leaderboard_is_the_mean_of_acc4_and_acc8() -> None:
    m = metrics_from_stats(STATS)
    # (0.78 + 2/3) / 2 = 0.72333..., which differs from the slice-weighted overall 5.9 / 8 = 0.7375
    assert m["val/leaderboard"] == pytest.approx((0.78 + 2.0 / 3.0) / 2)
    assert m["val/ssim"] == pytest.approx(0.7375)
    assert m["val/leaderboard"] != pytest.approx(m["val/ssim"])


def test_exact_key_set() -> None:
    assert set(metrics_from_stats(STATS)) == {
        "val/slices", "val/ssim", "val/leaderboard", "val/ssim/acc4", "val/ssim/acc8",
        "val/ssim/brain_acc4", "val/ssim/knee_acc4", "val/ssim/brain_acc8", "val/ssim/knee_acc8",
    }


def test_acceleration_is_parsed_from_the_group_name() -> None:
    # the number after the last "acc", with more than one digit too
    m = metrics_from_stats({"knee_acc12": (1.5, 3), "brain_acc12": (0.5, 1)})
    assert m["val/ssim/acc12"] == pytest.approx(0.5)
    assert "val/ssim/acc1" not in m and "val/ssim/acc2" not in m
    assert "val/leaderboard" not in m  # needs both acc4 and acc8


def test_one_acceleration_gives_no_leaderboard() -> None:
    m = metrics_from_stats({"brain_acc4": (0.9, 1), "knee_acc4": (0.5, 1)})
    assert m["val/ssim/acc4"] == pytest.approx(0.7)
    assert "val/ssim/acc8" not in m
    assert "val/leaderboard" not in m


def test_empty_groups_are_left_out() -> None:
    m = metrics_from_stats({"brain_acc4": (0.9, 1), "brain_acc8": (0.0, 0)})
    assert "val/ssim/brain_acc8" not in m
    assert "val/ssim/acc8" not in m
    assert "val/leaderboard" not in m
    assert m["val/ssim"] == pytest.approx(0.9)
    assert metrics_from_stats({}) == {"val/slices": 0.0}


def test_panel_indices_are_fixed_and_spread() -> None:
    assert panel_indices(10, 3) == [0, 4, 9]  # linspace 0, 4.5, 9; 4.5 rounds to even
    assert panel_indices(2, 5) == [0, 1]
    assert panel_indices(0, 3) == []
    assert panel_indices(7, 0) == []


def _item(index: int, expert: str, value: float) -> TrainItem:
    anatomy, acc = expert.split("_acc")
    return TrainItem(
        masked_kspace=torch.ones(1, 1, 4, 4, dtype=torch.complex64),
        mask=torch.ones(4),
        target=torch.full((4, 4), value),
        max_value=2.0 + index,
        anatomy=anatomy,
        acc=int(acc),
        expert=expert,
        fname=f"{expert}_{index}.h5",
        slice_idx=10 + index,
        index=index,
        mask_kind="file",
        augmented=False,
    )


def test_validate_sums_scores_per_expert_and_collects_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, float, str]] = []

    def fake_ssim(recon, target, max_value: float, anatomy: str) -> float:
        seen.append((float(target[0, 0]), max_value, anatomy))
        return float(recon.mean())  # the score is the output value, so the sums are known

    monkeypatch.setattr(validation, "slice_ssim", fake_ssim)
    batches = [
        [_item(0, "brain_acc4", 0.25), _item(1, "knee_acc8", 0.5)],
        [_item(2, "brain_acc4", 0.75)],
    ]

    def forward(batch: list[TrainItem]) -> torch.Tensor:
        return torch.stack([item.target for item in batch])  # output == target value

    stats, panels = validate(batches, forward, panel_at=[1, 5])
    assert stats == {"brain_acc4": (pytest.approx(1.0), 2), "knee_acc8": (pytest.approx(0.5), 1)}
    assert seen == [(0.25, 2.0, "brain"), (0.5, 3.0, "knee"), (0.75, 4.0, "brain")]
    assert [p.name for p in panels] == ["knee_acc8_1.h5:11"]
    assert panels[0].output.shape == (4, 4) and panels[0].zero_filled.shape == (4, 4)
    # the panel carries the volume's max (the error-map scale) and the slice's own score
    assert panels[0].max_value == 3.0 and panels[0].ssim == pytest.approx(0.5)
