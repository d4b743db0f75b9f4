"""Tests of the training-step memory probe (meta-device estimate; CUDA measurement when a GPU exists)."""

from __future__ import annotations

import pytest
import torch

from recon.engine.memory import MemoryEstimate, autograd_saved_bytes, probe_training_step
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR, count_parameters

from tests.recon.models.test_model import make_input, tiny_config

C, H, W = 3, 40, 36


def _cfg(checkpoint: bool, per_coil: bool = False) -> PromptMRConfig:
    return tiny_config(use_checkpoint=checkpoint, sens_use_checkpoint=checkpoint, sens_per_coil=per_coil)


def test_meta_estimate_counts_exactly_what_autograd_saves_on_cpu() -> None:
    cfg = _cfg(False)
    est = probe_training_step(cfg, C, H, W)
    model = PromptMR(cfg)
    k, mask = make_input(1, cfg.num_adj_slices, C, H, W, dtype=torch.complex64)
    saved, image = autograd_saved_bytes(model, k, mask, round(0.08 * W))
    image.abs().mean().backward()
    # The estimate also holds the stand-in loss's saved input, the (B, H, W) float32 image.
    assert est.saved_bytes == saved + H * W * 4
    assert not est.measured and est.device == "meta" and est.recompute_bytes == 0


def test_estimate_parts_add_up_and_weights_are_counted() -> None:
    cfg = _cfg(False)
    est = probe_training_step(cfg, C, H, W)
    trainable, fixed = count_parameters(PromptMR(cfg))
    assert est.params_bytes == 4 * (trainable + fixed)
    assert est.grads_bytes == 4 * trainable and est.optimizer_bytes == 8 * trainable
    assert est.peak_bytes == (est.params_bytes + est.grads_bytes + est.optimizer_bytes + est.input_bytes
                              + est.saved_bytes + est.recompute_bytes)
    est64 = probe_training_step(cfg, C, H, W, dtype=torch.float64)
    assert est64.params_bytes == 2 * est.params_bytes and est64.saved_bytes > 1.9 * est.saved_bytes


def test_checkpointing_lowers_the_estimate_and_keeps_more_than_autograd_sees() -> None:
    plain = probe_training_step(_cfg(False), C, H, W)
    ckpt = probe_training_step(_cfg(True), C, H, W)
    per_coil = probe_training_step(_cfg(True, per_coil=True), C, H, W)
    assert ckpt.saved_bytes < plain.saved_bytes / 4
    assert 0 < ckpt.recompute_bytes < plain.saved_bytes
    assert ckpt.peak_bytes < plain.peak_bytes
    # Per-coil sensitivity regions: one coil's activations are recomputed at a time.
    assert per_coil.recompute_bytes < ckpt.recompute_bytes
    # The residual includes the inputs the checkpoints keep, which are not autograd-saved tensors.
    model = PromptMR(_cfg(True))
    k, mask = make_input(1, 3, C, H, W, dtype=torch.complex64)
    seen, image = autograd_saved_bytes(model, k, mask, round(0.08 * W))
    image.abs().mean().backward()
    assert seen < ckpt.saved_bytes


def test_estimate_scales_with_the_image_and_leaves_rng_alone() -> None:
    state = torch.get_rng_state()
    small = probe_training_step(_cfg(False), C, 32, 32)
    large = probe_training_step(_cfg(False), C, 64, 64)
    assert torch.equal(torch.get_rng_state(), state)
    assert 3.5 < large.saved_bytes / small.saved_bytes < 4.5
    assert isinstance(large, MemoryEstimate) and large.to_dict()["peak_bytes"] == large.peak_bytes


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        probe_training_step(_cfg(False), 0, H, W)
    with pytest.raises(ValueError):
        probe_training_step(_cfg(False), C, H, W, dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measurement_is_close_to_the_estimate() -> None:
    cfg = _cfg(True)
    measured = probe_training_step(cfg, 4, 96, 96, device="cuda")
    estimate = probe_training_step(cfg, 4, 96, 96)
    assert measured.measured and not measured.oom
    assert 0.5 < measured.peak_bytes / estimate.peak_bytes < 2.0
