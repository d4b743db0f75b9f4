"""Schedules against the per-epoch values of docs/pipeline.md 4.3-4.6 and against torch's own schedulers."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR, StepLR

from recon.schedules import (
    BASELINE_LR,
    CLASSIFIER_LR,
    CLUTCH_LR,
    MOE_LR,
    MOE_LR_README,
    P_AUG,
    P_MASK,
    P_OFF,
    LRScheduleConfig,
    RampScheduleConfig,
    lr_at,
    prob_at,
    set_lr,
)


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=0.01)


def _expect(cfg: LRScheduleConfig, table: dict[range, float]) -> None:
    for epochs, value in table.items():
        for e in epochs:
            assert lr_at(cfg, e) == pytest.approx(value, rel=1e-12), f"epoch {e}"


# ---------------------------------------------------------------------------------------- lr


def test_baseline_lr_matches_spec_table() -> None:
    _expect(BASELINE_LR, {range(0, 16): 2e-4, range(16, 27): 6e-5, range(27, 38): 1.8e-5, range(38, 45): 5.4e-6})


def test_baseline_lr_matches_gated_torch_steplr() -> None:
    # The team's loop: StepLR(11, 0.3), scheduler.step() only when epoch >= 5.
    opt = _optimizer(2e-4)
    sched = StepLR(opt, step_size=11, gamma=0.3)
    for epoch in range(60):
        assert lr_at(BASELINE_LR, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        if epoch >= 5:
            sched.step()


def test_moe_lr_matches_spec_table() -> None:
    _expect(
        MOE_LR,
        {
            range(30, 31): 2e-5,
            range(31, 32): 8e-5,
            range(32, 33): 1.4e-4,
            range(33, 45): 2e-4,
            range(45, 50): 2e-4,
            range(50, 55): 6e-5,
            range(55, 60): 1.8e-5,
            range(60, 65): 5.4e-6,
        },
    )


def _team_sequential(opt: torch.optim.Optimizer, warmup: int, step_phase_start: int) -> SequentialLR:
    return SequentialLR(
        opt,
        [
            LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=warmup),
            ConstantLR(opt, factor=1.0, total_iters=step_phase_start - warmup),
            StepLR(opt, step_size=5, gamma=0.3),
        ],
        milestones=[warmup, step_phase_start],
    )


@pytest.mark.parametrize(("cfg", "relative_start"), [(MOE_LR, 15), (MOE_LR_README, 9)])
def test_moe_lr_matches_torch_sequentiallr(cfg: LRScheduleConfig, relative_start: int) -> None:
    opt = _optimizer(2e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(0) deprecation warning at a milestone
        sched = _team_sequential(opt, warmup=3, step_phase_start=relative_start)
        for epoch in range(30, 80):
            assert lr_at(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), epoch
            opt.step()
            sched.step()


def test_moe_readme_variant_steps_at_44() -> None:
    assert lr_at(MOE_LR_README, 43) == pytest.approx(2e-4)
    assert lr_at(MOE_LR_README, 44) == pytest.approx(6e-5)
    assert lr_at(MOE_LR_README, 49) == pytest.approx(1.8e-5)


def test_moe_warmup_factors_are_linearlr() -> None:
    factors = [lr_at(MOE_LR, 30 + k) / MOE_LR.base_lr for k in range(4)]
    assert factors == pytest.approx([0.1, 0.4, 0.7, 1.0])


def test_lr_before_stage_start_is_refused() -> None:
    with pytest.raises(ValueError, match="before the schedule's start_epoch 30"):
        lr_at(MOE_LR, 29)
    with pytest.raises(ValueError, match="epoch must be"):
        lr_at(BASELINE_LR, -1)


def test_clutch_constant_is_constant() -> None:
    # docs/pipeline.md 4.4: the team built the clutch as SequentialLR with a zero-length warm-up and
    # trained at 0.1 x 2e-5 = 2e-6; an explicit constant schedule is exactly 2e-5.
    assert [lr_at(CLUTCH_LR, e) for e in range(30, 35)] == [2e-5] * 5


def test_moe_without_warmup_is_flat_until_step_phase() -> None:
    cfg = LRScheduleConfig(kind="moe", base_lr=2e-5, start_epoch=30, warmup_epochs=0, step_start=45, step_every=5)
    assert {lr_at(cfg, e) for e in range(30, 50)} == {2e-5}


def test_cosine_matches_torch_over_100_epochs() -> None:
    base = CLASSIFIER_LR.base_lr
    opt = _optimizer(base)
    sched = CosineAnnealingLR(opt, T_max=10, eta_min=0.01 * base)
    seen = []
    for epoch in range(100):
        torch_lr = opt.param_groups[0]["lr"]
        assert lr_at(CLASSIFIER_LR, epoch) == pytest.approx(torch_lr, rel=1e-9, abs=1e-15), epoch
        seen.append(torch_lr)
        opt.step()
        sched.step()
    # It "restarts": minima at 10, 30, 50, ... and back to base at 20, 40, ...
    assert seen[10] == pytest.approx(0.01 * base) and seen[90] == pytest.approx(0.01 * base)
    assert seen[20] == pytest.approx(base) and seen[80] == pytest.approx(base)


def test_set_lr_sets_every_group() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr": 1.0}], lr=2e-4)
    set_lr(opt, lr_at(MOE_LR, 31))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(8e-5)] * 2
    with pytest.raises(ValueError):
        set_lr(opt, math.nan)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_lr": 0.0},
        {"gamma": 1.5},
        {"kind": "step", "warmup_epochs": 3},
        {"kind": "moe", "start_epoch": 30, "warmup_epochs": 3, "step_start": 31},
        {"kind": "cosine", "t_max": 0},
        {"step_every": 0},
    ],
)
def test_lr_config_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LRScheduleConfig(**kwargs)


# ---------------------------------------------------------------------------------------- p


def test_p_mask_matches_spec() -> None:
    expected = {16: 0.396, 17: 0.636, 18: 0.782, 19: 0.871, 20: 0.924, 22: 0.976, 24: 0.996}
    for epoch, value in expected.items():
        assert round(prob_at(P_MASK, epoch), 3) == value, epoch
    assert [prob_at(P_MASK, e) for e in range(0, 16)] == [0.0] * 16
    assert [prob_at(P_MASK, e) for e in range(25, 40)] == [1.0] * 15


def _team_mraugment_p(epoch: int, num_epochs: int = 60, annealing: int = 10, starting: int = 30) -> float:
    """The team's MRAugment p: MRAugment's exp formula with the epoch counter frozen at T - 1."""
    d, t_max, p_max = 3 + starting, num_epochs - annealing, 0.5
    t = min(epoch, t_max - 1)
    if t < d:
        return 0.0
    c = 5.0 / (t_max - d)
    return p_max / (1 - math.exp(-(t_max - d) * c)) * (1 - math.exp(-(t - d) * c))


def test_p_aug_matches_spec() -> None:
    expected = {34: 0.128, 35: 0.224, 36: 0.295, 38: 0.388, 40: 0.439, 45: 0.489, 49: 0.499}
    for epoch, value in expected.items():
        assert round(prob_at(P_AUG, epoch), 3) == value, epoch
    assert prob_at(P_AUG, 33) == 0.0 and prob_at(P_AUG, 0) == 0.0
    assert prob_at(P_AUG, 50) == 0.5 and prob_at(P_AUG, 100) == 0.5


def test_p_aug_equals_team_counter_until_plateau() -> None:
    # Same values as the team's frozen-counter implementation for every epoch up to T - 1 = 49;
    # from T = 50 on the team kept p(49) = 0.4988 while the absolute-epoch form gives p_max.
    for epoch in range(30, 50):
        assert prob_at(P_AUG, epoch) == pytest.approx(_team_mraugment_p(epoch), abs=1e-12), epoch
    assert _team_mraugment_p(55) == pytest.approx(prob_at(P_AUG, 49))
    assert prob_at(P_AUG, 55) - _team_mraugment_p(55) == pytest.approx(0.0012, abs=1e-4)


def test_team_run_length_maps_to_plateau() -> None:
    # The team's T = num_epochs - annealing_epoch is the absolute plateau epoch: final helper.sh
    # (e=60, annealing 15) is plateau 45; the schedule here no longer depends on the run length.
    final_helper = dataclasses.replace(P_AUG, plateau=45)
    for epoch in range(30, 45):
        assert prob_at(final_helper, epoch) == pytest.approx(_team_mraugment_p(epoch, annealing=15), abs=1e-12)
    assert prob_at(final_helper, 40) != pytest.approx(prob_at(P_AUG, 40))


def test_ramp_constant_off() -> None:
    ramp = RampScheduleConfig(kind="ramp", start=10, plateau=20, p_max=0.5)
    assert [prob_at(ramp, e) for e in (9, 10, 15, 19, 20, 30)] == pytest.approx([0, 0, 0.25, 0.45, 0.5, 0.5])
    const = RampScheduleConfig(kind="constant", start=5, p_max=0.7)
    assert [prob_at(const, e) for e in (4, 5, 50)] == [0.0, 0.7, 0.7]
    assert {prob_at(P_OFF, e) for e in range(100)} == {0.0}


def test_exp_is_monotone_and_bounded() -> None:
    values = [prob_at(P_AUG, e) for e in range(0, 80)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(values) == P_AUG.p_max


@pytest.mark.parametrize(
    "kwargs",
    [{"p_max": 1.5}, {"kind": "exp", "start": 10, "plateau": 10}, {"kind": "exp", "decay": 0.0, "plateau": 5}],
)
def test_ramp_config_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RampScheduleConfig(**kwargs)
