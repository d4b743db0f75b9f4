"""Are two code trees the same function? Output and gradients of one training step, compared tensor by tensor.

Each tree (this one, and every ``--code LABEL=PATH``, e.g. a ``git archive`` of an older commit) runs in its own
process: it builds the model from the preset's seed, takes the synthetic input of ``model_step.py``, computes a
no-grad forward, then a forward and backward of ``1 - SSIM``, and saves the images and every parameter gradient.
The parent compares every tree with the first ``--code`` tree (the reference) and prints, per configuration
(checkpointing x per-coil sensitivities), the worst relative L2 difference ``|a - b| / |b|`` over all tensors
and the worst ``max|a - b| / max|b|``, with the tensor they come from. ``--fp64`` adds the reference tree in
float64 (complex128 input), which shows how far fp32 itself is from the exact gradients.

Examples::

    git archive 58c4f5b | tar -x -C /tmp/before
    python experiments/benchmarks/step_equality.py --code before=/tmp/before
    python experiments/benchmarks/step_equality.py --code before=/tmp/before --coils 8 --height 128 --width 96 --fp64
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BOTH = {"off": [False], "on": [True], "both": [False, True]}


def child(args: argparse.Namespace) -> None:
    """Compute and save the tensors of every configuration with the code on ``sys.path``."""
    sys.path.insert(0, HERE)
    from model_step import ssim_loss, synthetic_input

    from recon.models.config import PromptMRConfig
    from recon.models.promptmr import PromptMR

    torch.set_num_threads(args.threads)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for ckpt in BOTH[args.checkpoint]:
        for per_coil in BOTH[args.sens_per_coil]:
            cfg = PromptMRConfig.preset(args.preset, use_checkpoint=ckpt, sens_use_checkpoint=ckpt,
                                        sens_per_coil=per_coil)
            model = PromptMR(cfg)
            kspace, mask, nlf, target = synthetic_input(cfg.num_adj_slices, args.coils, args.height, args.width)
            if args.double:
                model, kspace, target = model.double(), kspace.to(torch.complex128), target.double()
            with torch.no_grad():
                forward = model(kspace, mask, nlf).image
            image = model(kspace, mask, nlf).image
            ssim_loss(image, target, float(target.max())).backward()
            grads = {f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
            out[f"ckpt={'on' if ckpt else 'off'} per_coil={'on' if per_coil else 'off'}"] = {
                "no-grad forward": forward, "training forward": image.detach(), **grads}
    torch.save(out, args.save)


def compare(this: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Worst relative L2 and worst relative max-abs difference over the tensors, with their names."""
    if this.keys() != ref.keys():
        raise SystemExit(f"error: the trees have different parameters: {sorted(this.keys() ^ ref.keys())[:5]}")
    l2 = {n: float((t.double() - ref[n].double()).norm() / ref[n].double().norm().clamp_min(1e-300))
          for n, t in this.items()}
    mx = {n: float((t.double() - ref[n].double()).abs().max() / ref[n].double().abs().max().clamp_min(1e-300))
          for n, t in this.items()}
    worst_l2, worst_max = max(l2, key=l2.get), max(mx, key=mx.get)
    return {"l2": l2[worst_l2], "l2_name": worst_l2, "max": mx[worst_max], "max_name": worst_max,
            "forward_l2": max(l2["no-grad forward"], l2["training forward"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Examples::")[1])
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=PATH",
                        help="a code tree to compare (the first one is the reference)")
    parser.add_argument("--preset", default="smartify")
    parser.add_argument("--coils", type=int, default=16)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=396)
    parser.add_argument("--checkpoint", choices=tuple(BOTH), default="both")
    parser.add_argument("--sens-per-coil", choices=tuple(BOTH), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp64", action="store_true", help="also run the reference tree in float64")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--double", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not args.code:
        print("error: --code LABEL=PATH: at least one tree to compare with is needed", file=sys.stderr)
        return 2
    sys.path.insert(0, HERE)
    from model_step import parse_code_trees

    from recon.errors import InputError

    try:
        trees = [("this", os.path.dirname(os.path.dirname(HERE))), *parse_code_trees(args.code)]
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = trees + ([(f"{trees[1][0]} fp64", trees[1][1])] if args.fp64 else [])
    common = ["--preset", args.preset, "--coils", str(args.coils), "--height", str(args.height), "--width",
              str(args.width), "--checkpoint", args.checkpoint, "--sens-per-coil", args.sens_per_coil,
              "--threads", str(args.threads)]
    results: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, root) in enumerate(runs):
            path = os.path.join(tmp, f"{i}.pt")
            env = {**os.environ, "PYTHONPATH": root}
            argv = [sys.executable, os.path.abspath(__file__), "--child", "--save", path, *common,
                    *(["--double"] if label.endswith("fp64") else [])]
            print(f"computing {label} ...", file=sys.stderr)
            subprocess.run(argv, env=env, check=True)
            results[label] = torch.load(path, weights_only=True)
    ref_label = trees[1][0]
    print(f"preset {args.preset}, input (1, A, {args.coils}, {args.height}, {args.width}), fp32 unless marked; "
          f"relative to '{ref_label}'")
    for label in results:
        if label == ref_label:
            continue
        for config, tensors in results[label].items():
            c = compare(tensors, results[ref_label][config])
            print(f"{label:>14} {config}: worst L2 {c['l2']:.1e} ({c['l2_name']}), worst max {c['max']:.1e} "
                  f"({c['max_name']}), outputs L2 {c['forward_l2']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
