"""How long the training step waits for data, at the challenge's sizes, with 0 and 2 DataLoader workers.

Writes a few volumes of the ``full`` synthetic preset (brain 16 coils 768 x 396, knee 15 coils 640 x 368; one
volume per anatomy and acceleration, 4 slices each, no GRAPPA, about 1.2 GB) into a temporary folder (deleted
afterwards), builds the engine's own training pipeline (the stage's ``SliceDataset`` through its
``StageTransform`` and the engine's ``DataLoader``) and runs real training steps of the stage's model (forward,
``1 - SSIM``, backward, AdamW) on what it yields. Per step it records the seconds spent in ``next(loader)`` (the
wait) and in the step. Worker settings alternate round by round (interleaved), each round ``--steps`` steps from a
fresh iterator (the first item of an iterator with workers includes their start-up, which the table shows apart).
The figure is the wait as a share of the step, median [min..max] @1-min load over rounds; the target is < 5 %.

Usage::

    python experiments/benchmarks/data_wait.py                       # hacker_baseline, 0 and 2 workers
    python experiments/benchmarks/data_wait.py --rounds 3 --steps 4 --set model.use_checkpoint=false
    python experiments/benchmarks/data_wait.py --data /path/to/full --keep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from rounds import fmt, load1  # noqa: E402


def step_fn(cfg: Any) -> Any:
    """A training step of the stage's model on a list of :class:`TrainItem` (stacked as the loop does)."""
    from model_step import ssim_loss

    from recon.models.promptmr import PromptMR

    model = PromptMR(cfg.model)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(items: list[Any]) -> None:
        kspace = torch.stack([i.masked_kspace for i in items])
        mask = torch.stack([i.mask for i in items])
        target = torch.stack([i.target for i in items])
        optimiser.zero_grad(set_to_none=True)
        image = model(kspace, mask, -1).image
        h, w = target.shape[-2:]
        top, left = (image.shape[-2] - h) // 2, (image.shape[-1] - w) // 2
        ssim_loss(image[:, top:top + h, left:left + w], target, float(items[0].max_value)).backward()
        optimiser.step()

    return step


def run_round(cfg: Any, ds: Any, workers: int, steps: int, step: Any) -> dict[str, Any]:
    """``steps`` steps from a fresh loader with ``workers`` workers; waits and step times per step."""
    from recon.engine import trainer

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    indices = list(range(len(ds)))[:steps]
    loader = iter(trainer._loader(ds, indices, cfg, 0))  # the engine's own loader (batch, workers, seeds)
    waits, times = [], []
    for _ in indices:
        start = time.perf_counter()
        items = next(loader)
        waits.append(time.perf_counter() - start)
        start = time.perf_counter()
        step(items)
        times.append(time.perf_counter() - start)
    # the first wait includes the workers' start-up (once per epoch); the steady state is the rest
    steady = waits[1:] or waits
    return {"workers": workers, "waits_s": waits, "steps_s": times, "first_wait_s": waits[0],
            "wait_share": sum(steady) / sum(times[1:] or times), "load1": load1()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Usage::")[1])
    parser.add_argument("--stage", default=str(ROOT / "experiments" / "hacker_baseline.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage override")
    parser.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per round (>= 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="an existing data root (else a temporary full-preset one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data set")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from recon.data.synth import write_dataset
    from recon.engine.stage import load_stage_config
    from recon.engine.trainer import _load_data
    from recon.engine.transform import EpochDataset, StageTransform
    from recon.errors import InputError

    torch.set_num_threads(args.threads)
    tmp = None
    try:
        if args.rounds < 3 or args.steps < 2:
            raise InputError(f"--rounds {args.rounds} --steps {args.steps}: expected >= 3 rounds and >= 2 steps")
        root = args.data
        if root is None:
            tmp = tempfile.mkdtemp(prefix="smartify-data-wait-")
            t0 = time.perf_counter()
            summary = write_dataset(tmp, preset="full", grappa="none", n_train=1, n_val=1, n_leaderboard=0)
            print(f"wrote {summary['files']} files, {summary['bytes'] / 1e9:.2f} GB in "
                  f"{time.perf_counter() - t0:.0f} s to {tmp}", file=sys.stderr)
            root = tmp
        cfg, _ = load_stage_config(args.stage, overrides=[*args.set, f"data.root={root}"])
        ds = EpochDataset(_load_data(cfg).train, StageTransform(cfg, train=True))
        step = step_fn(cfg)
        counts = [int(w) for w in args.workers.split(",")]
        rounds: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
        for r in range(args.rounds):
            for w in counts[r % len(counts):] + counts[:r % len(counts)]:
                rounds[w].append(run_round(cfg, ds, w, args.steps, step))
                print(f"round {r + 1} workers {w}: wait share {100 * rounds[w][-1]['wait_share']:.2f}% "
                      f"@{rounds[w][-1]['load1']:.1f}", file=sys.stderr)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"stage": args.stage, "overrides": args.set, "rounds": rounds}))
        return 0
    print(f"stage {Path(args.stage).name} {args.set}, {args.rounds} interleaved rounds of {args.steps} steps, "
          f"{args.threads} threads; median [min..max] @1-min load")
    print(f"{'workers':>7} {'wait % of step':>26} {'step s':>24} {'first wait s':>24} {'steady wait s':>14}")
    for w, runs in rounds.items():
        loads = [x["load1"] for x in runs]
        steady = statistics.median(v for x in runs for v in x["waits_s"][1:])
        print(f"{w:>7} {fmt([100 * x['wait_share'] for x in runs], loads):>26} "
              f"{fmt([statistics.median(x['steps_s']) for x in runs], loads):>24} "
              f"{fmt([x['first_wait_s'] for x in runs], loads):>24} {steady:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
