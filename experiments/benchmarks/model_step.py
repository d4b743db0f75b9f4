"""Time and memory of the PromptMR+ network on CPU: parameters, no-grad forward, training step, saved tensors.

Each measurement (checkpointing off / on) runs in its own child process, so that its peak RSS is its own. Per
measurement: a warm-up (one no-grad forward and one training step, which also records the bytes autograd saves),
then ``--repeats`` timed no-grad forwards and training steps (forward, loss, backward, AdamW step); medians of
wall-clock seconds are reported (``*_cpu_s``: process CPU seconds, less sensitive to other load). The loss is ``1 - SSIM`` (7x7 uniform window) against a synthetic target. ``probe_bytes`` is the
meta-device estimate of :func:`recon.engine.memory.probe_training_step`; ``--live-peak`` adds one profiled step that
measures the peak of live tensor bytes (weights, gradients, AdamW state and input alive at its start, plus the
peak of allocations minus frees during it), which glibc's RSS overstates.

Examples::

    python experiments/benchmarks/model_step.py                       # smartify, brain 16x768x396, 1 slice
    python experiments/benchmarks/model_step.py --coils 16 --height 640 --width 320 --adj 5 --repeats 1
    python experiments/benchmarks/model_step.py --coils 15 --height 640 --width 368 --checkpoint on
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
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from recon.errors import InputError
from recon.fft import fft2c
from recon.masks import acs_width, public_mask
from recon.engine.memory import autograd_saved_bytes, probe_training_step
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR, count_parameters

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


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (run in a child process); returns the JSON record."""
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

    def step(record: bool = False) -> int:
        optimiser.zero_grad(set_to_none=True)
        if record:
            saved, image = autograd_saved_bytes(model, kspace, mask, nlf)
        else:
            saved, image = 0, model(kspace, mask, nlf).image
        ssim_loss(image, target, data_range).backward()
        optimiser.step()
        return saved

    cpu: dict[str, list[float]] = {"forward": [], "step": []}

    def timed(fn: Any, kind: str) -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu[kind].append(time.process_time() - start_cpu)
        return time.perf_counter() - start

    saved = None
    saved_box: list[int] = []
    if spec["warmup"]:
        forward()
        saved = step(record=True)
    forwards = [timed(forward, "forward") for _ in range(spec["repeats"])]
    steps = []
    for _ in range(spec["repeats"]):
        if saved is None:
            steps.append(timed(lambda: saved_box.append(step(record=True)), "step"))
            saved = saved_box[0]
        else:
            steps.append(timed(step, "step"))
    record = {
        "preset": spec["preset"], "overrides": spec["overrides"], "coils": c, "height": h, "width": w, "adj": a,
        "checkpoint": cfg.use_checkpoint, "sens_per_coil": cfg.sens_per_coil, "threads": spec["threads"],
        "params_trainable": trainable, "params_fixed": fixed,
        "forward_s": statistics.median(forwards), "train_step_s": statistics.median(steps),
        "forward_runs": forwards, "train_step_runs": steps,
        "forward_cpu_s": statistics.median(cpu["forward"]), "train_step_cpu_s": statistics.median(cpu["step"]),
        "saved_bytes": saved,
        "probe_bytes": probe.peak_bytes, "probe_saved_bytes": probe.saved_bytes,
        "probe_recompute_bytes": probe.recompute_bytes, "probe_s": probe_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
    }
    if spec["live_peak"]:
        # Tensors alive when the profiled step starts: weights, last step's gradients, AdamW state, input.
        alive = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                 *(t for st in optimiser.state.values() for t in st.values() if isinstance(t, torch.Tensor)),
                 kspace, mask, target]
        baseline = sum(t.untyped_storage().nbytes() for t in alive)
        record["live_peak_bytes"] = baseline + live_peak_bytes(step)
    return record


def run_child(spec: dict[str, Any], thp: bool = False) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter and parse its JSON line.

    With ``thp``, PyTorch's CPU allocator asks for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``): glibc
    returns every block above 32 MiB to the OS when it is freed, so each step page-faults its activations in
    again 4 KiB at a time; huge pages cut those faults about 25-fold.
    """
    env = dict(os.environ)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(records: list[dict[str, Any]]) -> None:
    head = f"{'checkpoint':>10} {'params':>11} {'fwd s':>8} {'step s':>8} {'saved GiB':>10} {'probe GiB':>10} " \
           f"{'RSS GiB':>8} {'live GiB':>9}"
    print(head)
    for r in records:
        live = f"{r['live_peak_bytes'] / GIB:9.2f}" if "live_peak_bytes" in r else f"{'-':>9}"
        print(f"{str(r['checkpoint']):>10} {r['params_trainable']:>11,} {r['forward_s']:8.2f} "
              f"{r['train_step_s']:8.2f} {r['saved_bytes'] / GIB:10.2f} {r['probe_bytes'] / GIB:10.2f} "
              f"{r['peak_rss_bytes'] / GIB:8.2f} {live}")


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up forward and step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--live-peak", action="store_true", help="also profile one step for the live-tensor peak")
    parser.add_argument("--thp", action="store_true", help="children run with THP_MEM_ALLOC_ENABLE=1 (huge pages)")
    parser.add_argument("--params-only", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    try:
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
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpoint]
    records = []
    for ckpt in modes:
        cfg = base.replace(use_checkpoint=ckpt, sens_use_checkpoint=ckpt)
        spec = {"config": cfg.to_dict(), "preset": args.preset, "overrides": overrides, "coils": args.coils,
                "height": args.height, "width": args.width, "repeats": args.repeats, "warmup": not args.no_warmup,
                "threads": args.threads, "live_peak": args.live_peak}
        log.info("measuring checkpoint=%s on (1, %d, %d, %d, %d) ...", ckpt, cfg.num_adj_slices, args.coils,
                 args.height, args.width)
        record = run_child(spec, thp=args.thp)
        record["thp"] = args.thp
        records.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
    if not args.json:
        print(f"preset {args.preset} {overrides}, input (1, {base.num_adj_slices}, {args.coils}, {args.height}, "
              f"{args.width}), median of {args.repeats}, {args.threads} threads")
        print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
