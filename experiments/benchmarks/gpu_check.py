"""The prepared GPU check: every CUDA path the CPU machines cannot run, in one script, one JSON report.

On a CUDA machine, in a few minutes (each part has its own time limit, the whole is meant to stay under 8):

1. ``pytest -m gpu`` (the tests marked ``gpu``), its exit code and the tail of its output;
2. the memory probe (:func:`recon.engine.memory.probe_training_step`) for the team's preset (``smartify``) with
   checkpointing on the largest challenge slice (brain, 16 coils, 768 x 396): the meta-device estimate against
   the allocator's peak of a real training step (``torch.cuda.max_memory_allocated`` and
   ``max_memory_reserved``), and their ratio;
3. one AMP training step (float16 autocast, ``GradScaler``, AdamW) of the same model and input: time, finite loss,
   allocator peaks;
4. the leaderboard projection at full size (``experiments/benchmarks/reconstruct.py --devices cuda``) against the
   3600 s budget.

Without CUDA it writes ``{"cuda": false, ...}``, prints one line saying so and exits 0.

Usage::

    python experiments/benchmarks/gpu_check.py --out report.json
    python experiments/benchmarks/gpu_check.py --out report.json --skip-tests --slices 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHAPE = (16, 768, 396)  # brain: coils, H, W
MIB = 2 ** 20


def run_gpu_tests(timeout_s: int) -> dict[str, Any]:
    """``pytest -m gpu`` in a child process; exit code, duration and the last lines of its output."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False)
        tail, code = (proc.stdout + proc.stderr).strip().splitlines()[-15:], proc.returncode
    except subprocess.TimeoutExpired:
        tail, code = [f"timed out after {timeout_s} s"], None
    # pytest exit 5 = nothing collected (no test marked gpu): reported, not hidden
    return {"command": " ".join(cmd[1:]), "exit_code": code, "passed": code == 0, "seconds": time.perf_counter() - start,
            "tail": tail}


def synthetic_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Masked k-space (1, 1, 16, 768, 396), the public acc4 mask, its ACS width and a target, on ``device``."""
    sys.path.insert(0, str(HERE))
    from model_step import synthetic_input  # the benchmark's phantom, so figures compare with model_step.py

    kspace, mask, nlf, target = synthetic_input(1, *SHAPE)
    return kspace.to(device), mask.to(device), nlf, target.to(device)


def memory_probe(device: torch.device) -> dict[str, Any]:
    """The probe's estimate and a real checkpointed fp32 step's allocator peaks, for the smartify preset."""
    from recon.engine.memory import probe_training_step
    from recon.models.config import PromptMRConfig

    cfg = PromptMRConfig.preset("smartify", use_checkpoint=True, sens_use_checkpoint=True)
    start = time.perf_counter()
    estimate = probe_training_step(cfg, *SHAPE, device="meta")
    estimate_s = time.perf_counter() - start
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    measured = probe_training_step(cfg, *SHAPE, device=device)
    allocated = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    return {"preset": "smartify", "checkpoint": True, "shape": list(SHAPE),
            "estimate": estimate.to_dict(), "estimate_s": estimate_s, "measured": measured.to_dict(),
            "allocator_peak_allocated_mib": allocated / MIB, "allocator_peak_reserved_mib": reserved / MIB,
            "estimate_over_allocated": estimate.peak_bytes / allocated if allocated else None,
            "estimate_over_reserved": estimate.peak_bytes / reserved if reserved else None}


def amp_step(device: torch.device) -> dict[str, Any]:
    """One float16-autocast training step (GradScaler, AdamW) of the checkpointed smartify model at full size."""
    from model_step import ssim_loss

    from recon.models.config import PromptMRConfig
    from recon.models.promptmr import PromptMR

    cfg = PromptMRConfig.preset("smartify", use_checkpoint=True, sens_use_checkpoint=True)
    with torch.device(device):
        model = PromptMR(cfg)
    kspace, mask, nlf, target = synthetic_batch(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(2):  # the first step includes cuDNN's algorithm search
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            image = model(kspace, mask, nlf).image
        loss = ssim_loss(image.float(), target, float(target.max()))
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"steps_s": times, "loss": float(loss), "finite": bool(torch.isfinite(loss)), "scale": scaler.get_scale(),
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}


def leaderboard(slices: int, timeout_s: int) -> dict[str, Any]:
    """``reconstruct.py --devices cuda --json`` (fp32) in a child process; its CUDA projection."""
    cmd = [sys.executable, str(HERE / "reconstruct.py"), "--devices", "cuda", "--slices", str(slices), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-5:]}
    report = json.loads(proc.stdout)
    return report["devices"]["cuda"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (written atomically)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--slices", type=int, default=4, help="slices timed per shape for the projection")
    parser.add_argument("--tests-timeout", type=int, default=240, help="seconds for pytest -m gpu")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from recon.io import write_text_atomic

    report: dict[str, Any] = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    if not report["cuda"]:
        report["message"] = "no CUDA device: nothing to check here (run this on a GPU machine)"
        write_text_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
        print(f"gpu_check: {report['message']}; wrote {args.out}")
        return 0
    device = torch.device("cuda")
    report.update(device=torch.cuda.get_device_name(device), cuda_version=torch.version.cuda,
                  capability=list(torch.cuda.get_device_capability(device)),
                  memory_mib=torch.cuda.get_device_properties(device).total_memory / MIB)
    start = time.perf_counter()
    parts = [("memory_probe", lambda: memory_probe(device)), ("amp_step", lambda: amp_step(device)),
             ("leaderboard", lambda: leaderboard(args.slices, 240))]
    if not args.skip_tests:
        parts.insert(0, ("gpu_tests", lambda: run_gpu_tests(args.tests_timeout)))
    for name, fn in parts:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as err:  # one failing part must not hide the others' figures
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        report[name]["part_s"] = time.perf_counter() - t0
        print(f"gpu_check: {name} done in {report[name]['part_s']:.0f} s", flush=True)
        write_text_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
    report["total_s"] = time.perf_counter() - start
    write_text_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
    lb = report.get("leaderboard", {}).get("projection", {})
    print(f"gpu_check: {report['device']}; probe/allocated "
          f"{report['memory_probe'].get('estimate_over_allocated')}; leaderboard {lb.get('seconds')} s vs "
          f"{lb.get('budget_s')} s ({lb.get('verdict')}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
