"""Today's PromptMR+ against the golden reference written by ``tests/recon/models/golden.py`` before issue 17's
speed-ups: equal weights for the same seed, and output and gradients within 1e-5 relative in fp32."""

from __future__ import annotations

import pytest
import torch

from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR
from tests.recon.models.golden import CASES, PATH, case_config, checksums, compute

RTOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(PATH)


def _close(new: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = float(ref.abs().max())
    err = float((new - ref).abs().max())
    assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} > {RTOL} x max |ref| {scale:.3g}"


def _sums_equal(new: dict, ref: dict) -> None:
    assert new.keys() == ref.keys()
    diff = [k for k in ref if new[k] != ref[k]]
    assert not diff, f"weights differ from the golden file in {diff[:5]}"


@pytest.mark.parametrize("name", list(CASES))
def test_weights_output_and_gradients_equal_the_golden_file(golden: dict, name: str) -> None:
    ref = golden[name]
    model = PromptMR(case_config(name))
    _sums_equal(checksums(model), ref["state"])
    new = compute(name, model)
    _close(new["image"], ref["image"], "no-grad image")
    _close(new["sens_maps"], ref["sens_maps"], "maps")
    _close(new["image_grad_mode"], ref["image_grad_mode"], "image with grad")
    assert new["grad_names"] == ref["grad_names"]
    _close(new["grads"], ref["grads"], "gradients")


@pytest.mark.parametrize("ckpt, per_coil", [(True, True), (False, True), (True, False)])
def test_checkpointing_and_per_coil_match_the_golden_file(golden: dict, ckpt: bool, per_coil: bool) -> None:
    cfg = case_config("adj3").replace(use_checkpoint=ckpt, sens_use_checkpoint=ckpt, sens_per_coil=per_coil)
    new = compute("adj3", PromptMR(cfg))
    _close(new["image"], golden["adj3"]["image"], "no-grad image")
    _close(new["image_grad_mode"], golden["adj3"]["image_grad_mode"], "image with grad")
    _close(new["grads"], golden["adj3"]["grads"], "gradients")


def test_smartify_preset_weights_equal_the_golden_file(golden: dict) -> None:
    _sums_equal(checksums(PromptMR(PromptMRConfig.preset("smartify"))), golden["smartify"])


def test_inference_mode_equals_the_golden_no_grad_output(golden: dict) -> None:
    from tests.recon.models.golden import case_input

    model = PromptMR(case_config("adj3").replace(sens_per_coil=True))
    kspace, mask = case_input("adj3")
    with torch.inference_mode():
        out = model(kspace, mask, -1)
    _close(out.image, golden["adj3"]["image"], "inference-mode image")
    _close(out.sens_maps, golden["adj3"]["sens_maps"], "inference-mode maps")
