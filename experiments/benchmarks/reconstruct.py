"""Inference speed of the ``smartify`` PromptMR+ preset at the challenge's real sizes, and the leaderboard projection.

Measures no-grad slices per second of one randomly initialised ``smartify``-preset PromptMR+ (the team's reduced
model: 8 cascades, widths 8/[24,32,40]; random weights cost the same time as trained ones) on

* brain: 16 coils, 768 x 396 (``brain_acc4_1.h5`` of the challenge),
* knee: 15 coils, 640 x 368 (fastMRI knee size),

with the public acc4 mask and ``--adj`` adjacent slices (1, as the team), on the CPU and on CUDA when present. One
warm-up pass per shape runs first. Then it projects the wall time of the 2 x 58-file leaderboard (29 brain + 29 knee
files per acc folder) and compares it with the challenge's 3600 s budget.

Slice counts per file are assumptions (flags): brain 16 (the challenge's example file); knee 13, derived from the
challenge totals, (4,937 train slices - 170 brain files x 16) / 170 knee files = 13.0 (val gives 12.8). fastMRI knee
volumes have about 35 slices; pass ``--knee-slices 35`` for that pessimistic case. The projection counts model time
only (HDF5 reads overlap with compute in ``smartify reconstruct``; checkpoint loading and the classifier add a few
seconds).

Usage::

    python experiments/benchmarks/reconstruct.py                       # CPU (+ CUDA if present), 1 slice each
    python experiments/benchmarks/reconstruct.py --devices cuda --slices 8 --batch 2 --amp
    python experiments/benchmarks/reconstruct.py --knee-slices 35 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from typing import Any

import torch

from recon.masks import public_mask
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR

SHAPES = {"brain": (16, 768, 396), "knee": (15, 640, 368)}  # coils, H, W
FILES_PER_ANATOMY = 29  # per acc folder: brain_test1..29, knee_test1..29
ACC_FOLDERS = 2


def make_input(anatomy: str, adj: int, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Masked k-space ``(B, A, C, H, W)`` complex64 at fastMRI scale, the public acc4 mask ``(B, W)``, ACS -1."""
    coils, h, w = SHAPES[anatomy]
    gen = torch.Generator().manual_seed(seed)
    real = torch.randn((batch, adj, coils, h, w), generator=gen)
    imag = torch.randn((batch, adj, coils, h, w), generator=gen)
    mask = torch.from_numpy(public_mask(w, 4))
    kspace = torch.complex(real, imag).mul_(1e-5) * mask
    return kspace.to(device), mask.expand(batch, w).contiguous().to(device), torch.full((batch,), -1, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_shape(model: PromptMR, anatomy: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Warm up, then time ``args.slices`` slices (in batches of ``args.batch``) of one shape."""
    kspace, mask, nlf = make_input(anatomy, args.adj, args.batch, device)
    use_amp = args.amp and device.type == "cuda"
    passes = max(1, -(-args.slices // args.batch))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
        for _ in range(args.warmup):
            model(kspace, mask, nlf)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        cpu_start = time.process_time()
        for _ in range(passes):
            start = time.perf_counter()
            image = model(kspace, mask, nlf).image
            _sync(device)
            times.append(time.perf_counter() - start)
        cpu_seconds = time.process_time() - cpu_start
    assert torch.isfinite(image).all()
    per_slice = sum(times) / (passes * args.batch)
    out = {
        "anatomy": anatomy, "shape": list(SHAPES[anatomy]), "slices_timed": passes * args.batch,
        "seconds_per_slice": per_slice, "slices_per_s": 1.0 / per_slice,
        # CPU time of this process (all threads): robust to other processes sharing the cores
        "cpu_seconds_per_slice": cpu_seconds / (passes * args.batch),
        "pass_seconds": [round(t, 4) for t in times],
    }
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def project(rates: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Leaderboard wall time from the measured seconds per slice."""
    slices = {"brain": args.brain_slices, "knee": args.knee_slices}
    total_slices = ACC_FOLDERS * FILES_PER_ANATOMY * sum(slices.values())
    seconds = ACC_FOLDERS * FILES_PER_ANATOMY * sum(slices[a] * rates[a]["seconds_per_slice"] for a in slices)
    cpu = ACC_FOLDERS * FILES_PER_ANATOMY * sum(slices[a] * rates[a]["cpu_seconds_per_slice"] for a in slices)
    return {
        "files": ACC_FOLDERS * 2 * FILES_PER_ANATOMY, "slices": total_slices, "seconds": seconds,
        "cpu_seconds": cpu,
        "budget_s": args.budget_s, "within_budget": seconds < args.budget_s,
        "verdict": "within budget" if seconds < args.budget_s else "OVER BUDGET",
        "slices_per_file": slices,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adj", type=int, default=1, help="adjacent slices (odd; the team used 1)")
    parser.add_argument("--slices", type=int, default=1, help="slices timed per shape (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up passes per shape")
    parser.add_argument("--batch", type=int, default=1, help="slices per forward pass")
    parser.add_argument("--devices", default=None, help="comma list (default: cpu, plus cuda when present)")
    parser.add_argument("--amp", action="store_true", help="float16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--brain-slices", type=int, default=16, help="slices per brain file (default 16)")
    parser.add_argument("--knee-slices", type=int, default=13, help="slices per knee file (default 13, see above)")
    parser.add_argument("--budget-s", type=float, default=3600.0, help="time budget (the challenge: 3600 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cfg = PromptMRConfig.preset("smartify", num_adj_slices=args.adj)
    report: dict[str, Any] = {
        "model": "smartify preset, random init", "num_adj_slices": args.adj, "batch": args.batch,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0], "devices": {},
    }
    for name in devices:
        device = torch.device(name)
        model = PromptMR(cfg).to(device).eval()
        rates = {anatomy: time_shape(model, anatomy, args, device) for anatomy in SHAPES}
        entry = {"rates": rates, "projection": project(rates, args), "amp": args.amp and device.type == "cuda"}
        if device.type == "cuda":
            entry["gpu"] = torch.cuda.get_device_name(device)
        report["devices"][name] = entry
        del model
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["load_average_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']}, {args.adj} adjacent slice(s), batch {args.batch}, torch {report['torch']}, "
          f"{report['cpu_threads']} CPU threads")
    for name, entry in report["devices"].items():
        label = entry.get("gpu", report["cpu"]) + (", amp" if entry["amp"] else ", float32")
        print(f"\n{name} ({label})")
        print(f"  {'anatomy':<8}{'coils x H x W':>16}{'s/slice':>10}{'slices/s':>10}{'CPU s/slice':>13}")
        for anatomy, r in entry["rates"].items():
            shape = "x".join(map(str, r["shape"]))
            extra = f"  peak {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else ""
            print(f"  {anatomy:<8}{shape:>16}{r['seconds_per_slice']:>10.3f}{r['slices_per_s']:>10.3f}"
                  f"{r['cpu_seconds_per_slice']:>13.3f}{extra}")
        p = entry["projection"]
        print(f"  leaderboard {p['files']} files = {ACC_FOLDERS} x ({FILES_PER_ANATOMY} brain x "
              f"{p['slices_per_file']['brain']} + {FILES_PER_ANATOMY} knee x {p['slices_per_file']['knee']}) = "
              f"{p['slices']} slices: {p['seconds']:.0f} s projected vs {p['budget_s']:.0f} s budget: {p['verdict']}")
        if name == "cpu":
            threads = report["cpu_threads"]
            scaled = f"; {p['cpu_seconds'] / threads:.0f} s if {threads} threads scaled perfectly" if threads > 1 else ""
            print(f"  (from CPU time: {p['cpu_seconds']:.0f} CPU s, the wall time of one uncontended core{scaled})")
    print(f"\npeak RSS {report['peak_rss_mib']:.0f} MiB; load average {report['load_average_start']:.1f} at the start, "
          f"{report['load_average_end']:.1f} at the end (other processes on the cores slow the wall times)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
