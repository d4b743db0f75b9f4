"""Per-epoch memory figures and the mask/augmentation shares say what the epoch did.

Two stages in one process: the first holds a large tensor while it trains, the second does not. Each
stage's figure is the peak of its own epochs, so the second reports less than the first (a lifetime
peak, ``ru_maxrss``, would report the first stage's peak again). The mask shares of a Hacker and a
Helper epoch are compared with the mask decisions recomputed from the same per-sample generators.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from recon.engine.loop import run_loop
from recon.engine.memory_meter import EpochMemory
from recon.engine.stage import load_stage_config
from recon.engine.trainer import ReconStage, _order, run_stage
from recon.engine.transform import StageTransform
from recon.schedules import prob_at
from tests.recon.engine.test_engine import EXPERIMENTS, FAST, Recorder

BALLAST_MB = 256
RSS = "memory/cpu_rss_peak_mb"


def _stage(name: str, tiny_data: Path, out: Path, *extra: str):
    overrides = [f"data.root={tiny_data}", f"output.dir={out}", *FAST, "train.probe_memory=false", *extra]
    return load_stage_config(EXPERIMENTS / "tiny" / f"{name}.yaml", overrides)


class BallastStage(ReconStage):
    """A reconstruction stage that also holds ``BALLAST_MB`` of touched memory while each epoch trains."""

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        ballast = torch.ones(BALLAST_MB * 2**20 // 4)  # ones, not empty: the pages are resident
        try:
            time.sleep(0.1)  # several sampling intervals with the ballast held, however fast the epoch
            return super().train_epoch(epoch, optimizer)
        finally:
            del ballast


def test_window_sees_a_held_tensor_and_the_next_window_does_not():
    meter = EpochMemory(torch.device("cpu"), interval_s=0.01)
    meter.start()
    held = torch.ones(BALLAST_MB * 2**20 // 4)
    time.sleep(0.1)
    del held
    first = meter.stop()
    meter.start()
    time.sleep(0.05)
    second = meter.stop()
    assert set(first) == set(second) == {RSS}  # no CUDA figures on the CPU
    assert first[RSS] - second[RSS] > BALLAST_MB / 2


def test_second_smaller_stage_reports_less_memory_than_the_first(tiny_data, tmp_path):
    big_cfg, big_res = _stage("hacker_baseline", tiny_data, tmp_path / "big", "train.epochs=2")
    big = Recorder()
    run_loop(BallastStage(big_cfg, big_res), big)
    small_cfg, small_res = _stage("hacker_baseline", tiny_data, tmp_path / "small", "train.epochs=2")
    small = Recorder()
    run_stage(small_cfg, small_res, small)

    big_peaks = [e.metrics[RSS] for e in big.epochs]
    small_peaks = [e.metrics[RSS] for e in small.epochs]
    assert len(big_peaks) == len(small_peaks) == 2
    # every epoch of the first stage held the ballast; no epoch of the second reports it
    assert min(big_peaks) - max(small_peaks) > BALLAST_MB / 2, (big_peaks, small_peaks)
    for event in big.epochs + small.epochs:
        memory = {k for k in event.metrics if k.startswith("memory/")}
        assert memory == {RSS}  # CPU run, probe off: no CUDA figure, no old lifetime-peak name


def _expected_shares(cfg, epoch: int) -> tuple[dict[str, float], float]:
    """Mask-kind shares and the MRAugment share of an epoch, recomputed from the per-sample generators."""
    stage = ReconStage(cfg, {})
    transform = StageTransform(cfg, train=True)
    order = _order(cfg, len(stage.data.train), epoch)
    items = [transform(stage.data.train[i], epoch, i) for i in order]
    kinds = Counter(item.mask_kind for item in items)
    shares = {kind: kinds.get(kind, 0) / len(items) for kind in ("file", "public", "equispaced", "random")}
    return shares, sum(item.augmented for item in items) / len(items)


def _shares(metrics: dict[str, float]) -> dict[str, float]:
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("train/mask_share/")}


def test_hacker_masks_show_as_public_with_remask_probability_one(tiny_data, tmp_path):
    cfg, resolved = _stage("hacker_baseline", tiny_data, tmp_path / "hacker", "train.epochs=1")
    assert cfg.p_mask.kind == "off"  # the schedule says 0; the Hacker replaces every mask regardless
    rec = Recorder()
    run_stage(cfg, resolved, rec)
    metrics = rec.epochs[0].metrics
    assert _shares(metrics) == {"public": 1.0, "file": 0.0, "equispaced": 0.0, "random": 0.0}
    assert metrics["schedule/p_remask"] == 1.0
    assert metrics["train/augmented_share"] == 0.0 and metrics["schedule/p_aug"] == 0.0
    assert "p_mask" not in metrics and not any(k.endswith("_fraction") for k in metrics)


def test_helper_shares_equal_the_masks_it_drew(tiny_data, tmp_path):
    cfg, resolved = _stage(
        "helper_baseline", tiny_data, tmp_path / "helper", "train.epochs=1", "data.max_train_slices=12",
        "p_mask.kind=constant", "p_mask.start=0", "p_mask.p_max=0.6",
        "mraugment.enabled=true", "p_aug.kind=constant", "p_aug.start=0", "p_aug.p_max=0.5",
    )
    rec = Recorder()
    run_stage(cfg, resolved, rec)
    metrics = rec.epochs[0].metrics
    expected, augmented = _expected_shares(cfg, 0)
    assert _shares(metrics) == pytest.approx(expected)
    assert sum(_shares(metrics).values()) == pytest.approx(1.0)
    assert 0.0 < expected["file"] < 1.0 and expected["public"] == 0.0  # a Helper replaces some, never public
    assert metrics["train/augmented_share"] == pytest.approx(augmented)
    assert metrics["schedule/p_remask"] == pytest.approx(prob_at(cfg.p_mask, 0)) == pytest.approx(0.6)
    assert metrics["schedule/p_aug"] == pytest.approx(0.5)


def test_moe_prediction_counts_the_idle_experts(tiny_data, tmp_path):
    base_cfg, base_res = _stage("hacker_baseline", tiny_data, tmp_path / "b")
    moe_cfg, moe_res = _stage("hacker_moe", tiny_data, tmp_path / "m")
    assert moe_cfg.model == base_cfg.model and len(moe_cfg.moe.experts) == 4
    base, moe = ReconStage(base_cfg, base_res), ReconStage(moe_cfg, moe_res)
    one_expert = sum(p.numel() * p.element_size() for p in base.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in base.model.parameters() if p.requires_grad)
    # three idle experts keep their weights and both AdamW moments resident
    extra = 3 * (one_expert + 2 * trainable) / 2**20
    assert moe.probe_mb(moe.data) == pytest.approx(base.probe_mb(base.data) + extra, rel=1e-6)
