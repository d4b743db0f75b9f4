"""Time, FLOPs and memory of the PromptMR+ network on CPU, in interleaved rounds that survive a shared machine.

The configurations compared (checkpointing off/on x per-coil sensitivities off/on, optionally x code trees) are
*arms*: one persistent child process each (its peak RSS is its own; set-up and warm-up are paid once). Each round
asks every arm for one no-grad forward and one training step (forward, ``1 - SSIM`` loss against a synthetic
target, backward, AdamW step), in an order rotated from round to round (:mod:`rounds`), so that other load falls
on all arms alike. Figures are ``median [min..max] @load`` over ``--rounds`` (>= 3) rounds, where ``@load`` is the
median 1-minute load average read before those measurements; ``*_cpu_s`` (process CPU seconds) are given per
round too. With ``--flops`` each arm counts the FLOPs of one forward and one step
(``torch.utils.flop_counter``; checkpointing recomputes, so its step counts more), the parent measures the machine's
peak (large conv2d and matmul, same threads, fp32) after every round, and the table adds the achieved fraction
(counted FLOPs / median time / median peak). ``--profile`` prints each arm's top 15 operators of one step by self
CPU time. ``--code LABEL=PATH`` adds the same arms run on another code tree (e.g. an ``git archive`` of an older
commit), for before/after comparisons in the same rounds.

``probe GiB`` is the meta-device estimate of :func:`recon.engine.memory.probe_training_step`; ``saved GiB`` the
bytes autograd saved in the warm-up step; ``--live-peak`` adds one profiled step that measures the peak of live
tensor bytes, which glibc's RSS overstates.

Examples::

    python experiments/benchmarks/model_step.py                       # smartify, brain 16x768x396, 1 slice
    python experiments/benchmarks/model_step.py --coils 4 --height 128 --width 96 --rounds 3 --flops --profile
    python experiments/benchmarks/model_step.py --checkpoint on --sens-per-coil both --rounds 5
    python experiments/benchmarks/model_step.py --code before=/tmp/smartify-before --checkpoint off
    python experiments/benchmarks/model_step.py --preset promptmr-plus --params-only
    python experiments/benchmarks/model_step.py --set reduction=4 --set n_history=0 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules when run as a script
from limit import count_flops, measure_peak, profile_table  # noqa: E402
from rounds import Arm, fmt, load1, run_rounds, serve, summary, timed  # noqa: E402

from recon.errors import InputError  # noqa: E402
from recon.fft import fft2c  # noqa: E402
from recon.masks import acs_width, public_mask  # noqa: E402
from recon.models.config import PromptMRConfig  # noqa: E402
from recon.models.promptmr import PromptMR, count_parameters  # noqa: E402

log = logging.getLogger("model_step")
GIB = 1024 ** 3


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are parsed as YAML (``[8,16,24]``, ``true``, ``4``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_code_trees(items: list[str]) -> list[tuple[str, str]]:
    """``--code LABEL=PATH`` values to ``(label, absolute path)``; PATH must hold a ``recon`` package."""
    trees = []
    for item in items:
        label, sep, root = item.partition("=")
        if not sep or not label or not os.path.isdir(os.path.join(root, "recon")):
            raise InputError(f"--code {item!r}: expected LABEL=PATH with PATH/recon a package folder")
        trees.append((label, os.path.abspath(root)))
    return trees


def synthetic_input(adj: int, coils: int, height: int, width: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """A phantom (ellipses) times smooth coil maps, scaled like fastMRI k-space, public 4x mask.

    Returns:
        ``(masked k-space (1, A, C, H, W) complex64, mask (1, W) bool, ACS width, target (1, H, W))``.
    """
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    slices = []
    for a in range(adj):
        img = ((x / 0.7) ** 2 + (y / 0.9) ** 2 < 1).float() * (1.0 + 0.05 * a)
        for _ in range(6):
            cx, cy, rx, ry = (torch.rand(4, generator=g) * torch.tensor([1.0, 1.0, 0.3, 0.3])
                              + torch.tensor([-0.5, -0.5, 0.05, 0.05]))
            img = img + 0.5 * (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1).float()
        slices.append(img)
    images = torch.stack(slices)  # (A, H, W)
    angles = torch.arange(coils) * 2 * math.pi / coils
    maps = torch.stack([torch.exp(-((x - 0.9 * torch.cos(t)) ** 2 + (y - 0.9 * torch.sin(t)) ** 2) / 1.5)
                        * torch.exp(1j * (t + x)) for t in angles])  # (C, H, W)
    coil_images = images[:, None] * maps[None]
    kspace = fft2c(coil_images.to(torch.complex64)) * 1e-4
    mask = torch.from_numpy(public_mask(width, 4)).bool()[None]
    target = (coil_images[adj // 2].abs().square().sum(0).sqrt() * 1e-4)[None].float()
    return (kspace * mask[0])[None].contiguous(), mask, acs_width(width), target


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """``1 - SSIM`` with a 7x7 uniform window (k1 0.01, k2 0.03, unbiased covariance), mean over the map."""
    c1, c2, n = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, 49
    x, y = pred[:, None], target[:, None]
    mx, my = F.avg_pool2d(x, 7, 1), F.avg_pool2d(y, 7, 1)
    vx = (F.avg_pool2d(x * x, 7, 1) - mx * mx) * n / (n - 1)
    vy = (F.avg_pool2d(y * y, 7, 1) - my * my) * n / (n - 1)
    cxy = (F.avg_pool2d(x * y, 7, 1) - mx * my) * n / (n - 1)
    ssim = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return 1 - ssim.mean()


def live_peak_bytes(fn: Any) -> int:
    """Peak of (allocated - freed) CPU tensor bytes while ``fn()`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def child(spec: dict[str, Any]) -> None:
    """Serve one arm: build the model and input, warm up, then answer ``forward``/``step``/``flops``/``profile``."""
    try:
        from recon.engine.memory import autograd_saved_bytes, probe_training_step
    except ImportError:  # code trees from before the memory probe moved under engine/ (--code)
        from recon.memory import autograd_saved_bytes, probe_training_step  # type: ignore[no-redef]

    torch.set_num_threads(spec["threads"])
    cfg = PromptMRConfig.from_dict(spec["config"])
    a, c, h, w = cfg.num_adj_slices, spec["coils"], spec["height"], spec["width"]
    t0 = time.perf_counter()
    probe = probe_training_step(cfg, c, h, w)
    probe_s = time.perf_counter() - t0
    model = PromptMR(cfg)
    trainable, fixed = count_parameters(model)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    kspace, mask, nlf, target = synthetic_input(a, c, h, w)
    data_range = float(target.max())

    def forward() -> None:
        with torch.no_grad():
            model(kspace, mask, nlf)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        ssim_loss(model(kspace, mask, nlf).image, target, data_range).backward()
        optimiser.step()

    forward()
    optimiser.zero_grad(set_to_none=True)
    saved, image = autograd_saved_bytes(model, kspace, mask, nlf)
    ssim_loss(image, target, data_range).backward()
    optimiser.step()

    def measure(_: dict[str, Any]) -> dict[str, Any]:
        fwd, stp = timed(forward), timed(step)
        return {"forward_s": fwd["wall_s"], "forward_cpu_s": fwd["cpu_s"], "train_step_s": stp["wall_s"],
                "train_step_cpu_s": stp["cpu_s"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def flops(_: dict[str, Any]) -> dict[str, Any]:
        return {"forward_flops": count_flops(forward), "train_step_flops": count_flops(step)}

    def profile(_: dict[str, Any]) -> dict[str, Any]:
        return {"table": profile_table(step)}

    def live(_: dict[str, Any]) -> dict[str, Any]:
        # Tensors alive when the profiled step starts: weights, last step's gradients, AdamW state, input.
        alive = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                 *(t for st in optimiser.state.values() for t in st.values() if isinstance(t, torch.Tensor)),
                 kspace, mask, target]
        baseline = sum(t.untyped_storage().nbytes() for t in alive)
        return {"live_peak_bytes": baseline + live_peak_bytes(step)}

    info = {"coils": c, "height": h, "width": w, "adj": a, "checkpoint": cfg.use_checkpoint,
            "sens_per_coil": cfg.sens_per_coil, "threads": spec["threads"], "params_trainable": trainable,
            "params_fixed": fixed, "saved_bytes": saved, "probe_bytes": probe.peak_bytes,
            "probe_saved_bytes": probe.saved_bytes, "probe_recompute_bytes": probe.recompute_bytes,
            "probe_s": probe_s, "torch": torch.__version__}
    serve({"measure": measure, "flops": flops, "profile": profile, "live": live}, info)


def make_arms(args: argparse.Namespace, base: PromptMRConfig, overrides: dict[str, Any]) -> list[Arm]:
    """One arm per (code tree, checkpointing, per-coil sensitivities)."""
    both = {"off": [False], "on": [True], "both": [False, True]}
    codes = [("", "")] + parse_code_trees(args.code)
    arms = []
    for code, root in codes:
        for ckpt in both[args.checkpoint]:
            for per_coil in both[args.sens_per_coil]:
                cfg = base.replace(use_checkpoint=ckpt, sens_use_checkpoint=ckpt, sens_per_coil=per_coil)
                spec = {"config": cfg.to_dict(), "coils": args.coils, "height": args.height, "width": args.width,
                        "threads": args.threads}
                label = f"{code + ' ' if code else ''}ckpt={'on' if ckpt else 'off'} " \
                        f"per_coil={'on' if per_coil else 'off'}"
                env = {"PYTHONPATH": root} if root else {}
                if args.thp:
                    env["THP_MEM_ALLOC_ENABLE"] = "1"
                arm = Arm(label, [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env)
                arm.info.update(code=code or "this", preset=args.preset, overrides=overrides)
                arms.append(arm)
    return arms


def print_table(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One row per arm: median [min..max] @load of the rounds, memory, and the achieved fraction with --flops."""
    print(f"{'code':>8} {'ckpt':>4} {'per_coil':>8} {'fwd s':>22} {'step s':>22} {'fwd cpu s':>10} "
          f"{'step cpu s':>10} {'saved GiB':>9} {'probe GiB':>9} {'RSS GiB':>7}"
          + (f" {'fwd GFLOP':>9} {'step GFLOP':>10} {'fwd %peak':>9} {'step %peak':>10}" if args.flops else ""))
    for r in records:
        runs = r["rounds"]
        loads = [x["load1"] for x in runs]
        row = (f"{r['code']:>8} {'on' if r['checkpoint'] else 'off':>4} {'on' if r['sens_per_coil'] else 'off':>8} "
               f"{fmt([x['forward_s'] for x in runs], loads):>22} {fmt([x['train_step_s'] for x in runs], loads):>22} "
               f"{r['forward_cpu_s']['median']:10.2f} {r['train_step_cpu_s']['median']:10.2f} "
               f"{r['saved_bytes'] / GIB:9.2f} {r['probe_bytes'] / GIB:9.2f} {r['peak_rss_bytes'] / GIB:7.2f}")
        if args.flops:
            row += (f" {r['forward_flops'] / 1e9:9.1f} {r['train_step_flops'] / 1e9:10.1f} "
                    f"{100 * r['forward_fraction']:8.1f}% {100 * r['train_step_fraction']:9.1f}%")
        print(row)
    if args.flops:
        print("peak GFLOP/s per round (conv2d / matmul): " + ", ".join(
            f"{p['conv_gflops']:.1f}/{p['matmul_gflops']:.1f} @{p['load1']:.1f}" for p in records[0]["peaks"]))


def collect(arms: list[Arm], answers: dict[str, list[dict[str, Any]]], extra: dict[str, dict[str, Any]],
            peaks: list[dict[str, float]]) -> list[dict[str, Any]]:
    """One JSON record per arm: its set-up info, every round, medians and spreads."""
    records = []
    for arm in arms:
        runs = answers[arm.label]
        rec = {**arm.info, **extra.get(arm.label, {}), "label": arm.label, "rounds": runs}
        for key in ("forward_s", "train_step_s", "forward_cpu_s", "train_step_cpu_s"):
            rec[key] = summary([x[key] for x in runs])
        rec["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs)
        if peaks:
            rec["peaks"] = peaks
            peak = statistics.median(p["peak_gflops"] for p in peaks) * 1e9
            rec["peak_gflops"] = peak / 1e9
            rec["forward_fraction"] = rec["forward_flops"] / rec["forward_s"]["median"] / peak
            rec["train_step_fraction"] = rec["train_step_flops"] / rec["train_step_s"]["median"] / peak
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Examples::")[1])
    parser.add_argument("--preset", default="smartify", help="smartify | promptmr-plus")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--coils", type=int, default=16)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=396)
    parser.add_argument("--adj", type=int, default=None, help="adjacent slices (default: the preset's)")
    parser.add_argument("--checkpoint", choices=("off", "on", "both"), default="both")
    parser.add_argument("--sens-per-coil", choices=("off", "on", "both"), default="both",
                        help="sensitivity U-Net one coil at a time (a column of its own)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flops", action="store_true", help="count FLOPs, measure the peak, print %% of peak")
    parser.add_argument("--profile", action="store_true", help="top 15 operators of one step per arm")
    parser.add_argument("--live-peak", action="store_true", help="also profile one step for the live-tensor peak")
    parser.add_argument("--thp", action="store_true", help="children run with THP_MEM_ALLOC_ENABLE=1 (huge pages)")
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=PATH",
                        help="also run every arm on the code tree PATH (its recon package), labelled LABEL")
    parser.add_argument("--params-only", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per arm instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.child:
        child(json.loads(args.child))
        return 0
    try:
        if args.rounds < 3:
            raise InputError(f"--rounds {args.rounds}: expected at least 3 (a median and a spread)")
        parse_code_trees(args.code)
        overrides = parse_overrides(args.set)
        if args.adj is not None:
            overrides["num_adj_slices"] = args.adj
        base = PromptMRConfig.preset(args.preset, **overrides)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.params_only:
        with torch.device("meta"):
            trainable, fixed = count_parameters(PromptMR(base))
        rec = {"preset": args.preset, "overrides": overrides, "params_trainable": trainable, "params_fixed": fixed}
        print(json.dumps(rec) if args.json else f"trainable {trainable:,}  fixed prompts {fixed:,}")
        return 0
    torch.set_num_threads(args.threads)
    arms = make_arms(args, base, overrides)
    extra: dict[str, dict[str, Any]] = {a.label: {} for a in arms}
    peaks: list[dict[str, float]] = []
    try:
        for arm in arms:
            log.info("starting %s on (1, %d, %d, %d, %d) ...", arm.label, base.num_adj_slices, args.coils,
                     args.height, args.width)
            info = arm.info
            arm.start()
            arm.info = {**info, **arm.info}
        answers: dict[str, list[dict[str, Any]]] = {a.label: [] for a in arms}
        for r in range(args.rounds):  # one round at a time, so that the peak is measured between rounds
            for label, runs in run_rounds(arms[r % len(arms):] + arms[:r % len(arms)], 1, {"op": "measure"},
                                          log.info).items():
                answers[label] += [{**x, "round": r} for x in runs]
            if args.flops:
                load = load1()
                peaks.append({**measure_peak(), "load1": load, "round": r})
                log.info("round %d peak: conv %.1f GFLOP/s, matmul %.1f GFLOP/s @%.1f", r + 1,
                         peaks[-1]["conv_gflops"], peaks[-1]["matmul_gflops"], load)
        for arm in arms:
            if args.flops:
                extra[arm.label].update(arm.ask({"op": "flops"}))
            if args.live_peak:
                extra[arm.label].update(arm.ask({"op": "live"}))
            if args.profile:
                load = load1()
                table = arm.ask({"op": "profile"})["table"]
                print(f"\n== {arm.label}: top 15 operators of one training step by self CPU time (load {load:.1f})")
                print(table)
    finally:
        for arm in arms:
            arm.stop()
    records = collect(arms, answers, extra, peaks)
    if args.json:
        for rec in records:
            print(json.dumps(rec))
        return 0
    print(f"preset {args.preset} {overrides}, input (1, {base.num_adj_slices}, {args.coils}, {args.height}, "
          f"{args.width}), {args.rounds} interleaved rounds, {args.threads} threads; "
          "median [min..max] @1-min load average")
    print_table(records, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
