"""Golden reference of the PromptMR+ network: weight checksums, output and gradients of two tiny models, saved once.

``tests/recon/models/data/golden.pt`` was written by this script from the implementation before issue 17's
speed-ups (commit dbd66cb); ``test_golden.py`` checks today's code against it. Re-run only when the *function*
is meant to change, and say so in the commit::

    python -m tests.recon.models.golden
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR

PATH = Path(__file__).parent / "data" / "golden.pt"
BASE = dict(num_cascades=3, num_adj_slices=3, n_feat0=4, feature_dim=(6, 8, 10), prompt_dim=(2, 4, 6),
            sens_n_feat0=4, sens_feature_dim=(4, 6, 8), sens_prompt_dim=(2, 2, 4), len_prompt=(2, 3, 2),
            prompt_size=(5, 4, 3), n_enc_cab=(1, 2, 1), n_dec_cab=(1, 1, 2), n_skip_cab=(1, 0, 1),
            n_bottleneck_cab=1, n_history=2, reduction=2, use_checkpoint=False, sens_use_checkpoint=False,
            sens_per_coil=False, seed=7)
#: name -> (config overrides, input shape (B, A, C, H, W))
CASES: dict[str, tuple[dict[str, Any], tuple[int, int, int, int, int]]] = {
    "adj3": ({}, (2, 3, 3, 20, 18)),
    "adj1": ({"num_adj_slices": 1, "seed": 3}, (1, 1, 4, 27, 19)),
}


def case_config(name: str) -> PromptMRConfig:
    """The configuration of one golden case."""
    return PromptMRConfig(**{**BASE, **CASES[name][0]})  # type: ignore[arg-type]


def case_input(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked complex64 k-space and a (B, W) bool column mask with a centre block and a few outer columns."""
    b, a, c, h, w = CASES[name][1]
    g = torch.Generator().manual_seed(11)
    kspace = torch.randn(b, a, c, h, w, dtype=torch.complex64, generator=g)
    mask = torch.zeros(b, w, dtype=torch.bool)
    mask[:, w // 2 - 3:w // 2 + 3] = True
    mask[:, ::4] = True
    return kspace * mask[:, None, None, None, :], mask


def loss_of(out: Any) -> torch.Tensor:
    """A loss that reaches every parameter through the image and the maps."""
    return out.image.square().mean() + out.sens_maps.real.mean() + 0.1 * out.sens_maps.imag.square().mean()


def compute(name: str, model: PromptMR) -> dict[str, Any]:
    """Output and gradients of ``model`` on the case's input (fp32)."""
    kspace, mask = case_input(name)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        nograd = model(kspace, mask, -1)
    out = model(kspace, mask, -1)
    loss_of(out).backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return {"image": nograd.image, "sens_maps": nograd.sens_maps, "image_grad_mode": out.image.detach(),
            "grad_names": names, "grads": flat}


def checksums(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Per state-dict entry ``(sum, sum of squares)`` in float64: equal weights give equal sums."""
    return {k: (float(v.double().sum()), float(v.double().square().sum())) for k, v in model.state_dict().items()}


def main() -> None:
    """Write the golden file."""
    record: dict[str, Any] = {}
    for name in CASES:
        model = PromptMR(case_config(name))
        record[name] = {"state": checksums(model), **compute(name, model)}
    record["smartify"] = checksums(PromptMR(PromptMRConfig.preset("smartify")))
    PATH.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, PATH)


if __name__ == "__main__":
    main()
