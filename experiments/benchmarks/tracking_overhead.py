"""What the tracking layer costs: one stage with and without MLflow tracking, interleaved, per epoch.

Two arms, each a persistent child process (:mod:`rounds`): ``tracked`` runs the stage with
``run_tracked_stage(..., tracking=StageTracking())`` against a sqlite MLflow store in a temporary
``SMARTIFY_HOME``; ``untracked`` runs the same stage with ``tracking=None`` (console only, as ``--no-tracking``).
Rounds alternate the arms. Per run the child reports the engine's ``time/epoch_s`` of every epoch and the stage's
wall time (which adds the run's creation and its final records). The overhead per epoch is the median tracked
epoch minus the median untracked one, median [min..max] @1-min load over rounds, and its share of the untracked
epoch (target < 1 % at the ``small`` preset). The projection to full size assumes the per-epoch cost does not
grow with the data (scalars, fixed-size panels): cost / (``--full-epoch-s``, default 4,937 slices x 46 s, the
quiet checkpointed CPU step of the smartify preset at 16 x 768 x 396 on 2 threads). Because whole epochs vary
by several per cent on a shared machine, the tracked arm also reports the time its training thread spends
inside the MLflow adapter's epoch and checkpoint hooks (the part tracking adds to the epoch synchronously), and
the CPU seconds per epoch of the adapter's plot helper process (:mod:`tracking.runs.renderer`), which draws
beside training at a lower priority: free where a core is idle (a GPU machine), taken from training where the
training threads fill every core (this 2-core machine). The benchmark's ``train.panel_every=1`` redraws every
epoch; the experiment stages redraw every 5.

Usage::

    python experiments/benchmarks/tracking_overhead.py                  # small preset data, 3 rounds
    python experiments/benchmarks/tracking_overhead.py --stage experiments/tiny/hacker_baseline.yaml \\
        --data-preset tiny --set train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from rounds import Arm, fmt, run_rounds, serve  # noqa: E402

DEFAULT_STAGE = ROOT / "experiments" / "tiny" / "hacker_baseline.yaml"
SMALL = ["train.epochs=2", "train.panel_every=1", "data.num_workers=0"]


def helper_cpu_s() -> float:
    """CPU seconds (user + system) of the plot helper process so far; 0 before it starts."""
    import psutil

    from tracking.runs.renderer import helper_pid

    pid = helper_pid()
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def child(spec: dict[str, Any]) -> None:
    """Serve ``run`` requests: one stage per request, tracked or not, in a fresh output folder."""
    import torch

    from recon.events import Callback, EpochEnd
    from tracking.train import StageTracking, run_tracked_stage

    torch.set_num_threads(spec["threads"])

    class Epochs(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_epoch_end(self, event: EpochEnd) -> None:
            self.seconds.append(float(event.metrics["time/epoch_s"]))

    count = [0]
    in_callback = {"s": 0.0, "epochs": 0}
    if spec["tracked"]:
        # Time the training thread spends inside the MLflow adapter (its writer thread runs beside training):
        # a figure that the epoch-to-epoch noise of a shared machine does not drown.
        from tracking.runs.callback import MLflowCallback

        for hook in ("on_epoch_end", "on_checkpoint"):
            plain = getattr(MLflowCallback, hook)

            def timed_hook(self: Any, event: Any, _plain: Any = plain, _hook: str = hook) -> None:
                start = time.perf_counter()
                try:
                    _plain(self, event)
                finally:
                    in_callback["s"] += time.perf_counter() - start
                    in_callback["epochs"] += _hook == "on_epoch_end"

            setattr(MLflowCallback, hook, timed_hook)

    def run(_: dict[str, Any]) -> dict[str, Any]:
        count[0] += 1
        out = Path(spec["work"]) / f"{spec['label']}-{count[0]}"
        epochs = Epochs()
        in_callback.update(s=0.0, epochs=0)
        helper_before = helper_cpu_s()
        start = time.perf_counter()
        outcome = run_tracked_stage(spec["stage"], [*spec["overrides"], f"output.dir={out}"],
                                    tracking=StageTracking("overhead") if spec["tracked"] else None,
                                    callbacks=[epochs])
        wall = time.perf_counter() - start
        helper = helper_cpu_s() - helper_before
        if outcome.status != "finished":
            raise RuntimeError(f"stage {outcome.status}: {outcome.error}")
        shutil.rmtree(out, ignore_errors=True)
        per_epoch = in_callback["s"] / in_callback["epochs"] if in_callback["epochs"] else 0.0
        return {"epoch_s": statistics.median(epochs.seconds), "epochs_s": epochs.seconds, "stage_s": wall,
                "callback_s_per_epoch": per_epoch,
                "helper_cpu_s_per_epoch": helper / len(epochs.seconds) if epochs.seconds else 0.0}

    serve({"run": run}, {"label": spec["label"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Usage::")[1])
    parser.add_argument("--stage", default=str(DEFAULT_STAGE))
    parser.add_argument("--data-preset", default="small", help="synthetic preset written to a temporary folder")
    parser.add_argument("--data", default=None, help="an existing data root instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage override")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-epoch-s", type=float, default=4937 * 46.0, help="epoch seconds at full size")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.rounds < 3:
        print(f"error: --rounds {args.rounds}: expected at least 3", file=sys.stderr)
        return 2
    from recon.data.synth import write_dataset

    work = tempfile.mkdtemp(prefix="smartify-overhead-")
    arms = []
    try:
        root = args.data
        if root is None:
            root = os.path.join(work, "data")
            write_dataset(root, preset=args.data_preset, grappa="numpy")
        overrides = [*SMALL, *args.set, f"data.root={root}"]
        for tracked in (True, False):
            label = "tracked" if tracked else "untracked"
            spec = {"label": label, "tracked": tracked, "stage": args.stage, "overrides": overrides,
                    "threads": args.threads, "work": work}
            arm = Arm(label, [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                      {"SMARTIFY_HOME": os.path.join(work, "home"), "PYTHONPATH": str(ROOT)})
            arm.start()
            arms.append(arm)
        answers = run_rounds(arms, args.rounds, {"op": "run"}, lambda m: print(m, file=sys.stderr))
    finally:
        for arm in arms:
            arm.stop()
        shutil.rmtree(work, ignore_errors=True)
    t, u = answers["tracked"], answers["untracked"]
    cost = [a["epoch_s"] - b["epoch_s"] for a, b in zip(t, u)]  # same round: same spell of load
    share = [100 * c / b["epoch_s"] for c, b in zip(cost, u)]
    stage_cost = [a["stage_s"] - b["stage_s"] for a, b in zip(t, u)]
    loads = [x["load1"] for x in t + u]
    full = [100 * c / args.full_epoch_s for c in cost]
    full_inside = [100 * x["callback_s_per_epoch"] / args.full_epoch_s for x in t]
    if args.json:
        print(json.dumps({"stage": args.stage, "overrides": overrides, "rounds": answers,
                          "cost_per_epoch_s": cost, "share_pct": share, "full_share_pct": full,
                          "full_adapter_share_pct": full_inside}))
        return 0
    print(f"stage {Path(args.stage).name} on {args.data or args.data_preset} data {args.set}, {args.rounds} "
          f"interleaved rounds, {args.threads} threads; median [min..max] @1-min load")
    print(f"  epoch s, tracked       {fmt([x['epoch_s'] for x in t], loads, 3)}")
    print(f"  epoch s, untracked     {fmt([x['epoch_s'] for x in u], loads, 3)}")
    print(f"  tracking s per epoch   {fmt(cost, loads, 3)}  = {fmt(share, loads, 2)} % of the epoch (target < 1 %)")
    inside = [x["callback_s_per_epoch"] for x in t]
    inside_share = [100 * a / b["epoch_s"] for a, b in zip(inside, u)]
    print(f"  in the adapter per ep. {fmt(inside, loads, 3)}  = {fmt(inside_share, loads, 2)} % of the epoch "
          "(training thread inside MLflowCallback's epoch and checkpoint hooks)")
    helper = [x["helper_cpu_s_per_epoch"] for x in t]
    helper_share = [100 * a / b["epoch_s"] for a, b in zip(helper, u)]
    print(f"  plot helper CPU s/ep.  {fmt(helper, loads, 3)}  = {fmt(helper_share, loads, 2)} % of the epoch "
          "(drawn beside training at nice 10; costs wall time only where training fills every core)")
    print(f"  tracking s per stage   {fmt(stage_cost, loads, 3)}  (run creation, final records, registry-free)")
    print(f"  projected at full size {statistics.median(full):.4f} % (adapter: {statistics.median(full_inside):.4f} %) "
          f"of a {args.full_epoch_s:.0f} s epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
