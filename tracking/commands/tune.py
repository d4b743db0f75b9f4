"""``smartify tune TUNE.yaml``: an Optuna study over a training stage under a GPU-memory budget."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from tracking.commands.train import add_record_arguments, add_stage_arguments

log = logging.getLogger(__name__)

EPILOG = """examples:
  smartify tune experiments/tune.yaml --trials 40 --memory-budget 8GiB
  smartify tune experiments/tiny/tune.yaml --trials 4 --set data.root=data/tiny
  smartify tune experiments/tune.yaml --workers 2 --trials 20          # 2 processes, one study
  smartify tune experiments/tune.yaml --storage postgresql://user@db/optuna --study pmr   # on each machine
  optuna-dashboard sqlite:///mlruns/optuna.db                           # watch the study live
  smartify tune experiments/tiny/tune.yaml --trials 3 --study aug --print-config   # what the study run logs
  smartify tune experiments/tune_moe_aug.yaml --trials 10    # again later: 10 more trials in the same study
  smartify tune --report hacker-moe-aug [--storage URL]      # figures, table, overlay from storage; no training

the two studies:
  tune_moe_aug.yaml: short MoE stages from the baseline checkpoint (init_from), the p_aug ramp compressed
  into the trial (compress_schedule), searching p_max, the magnitude and the per-anatomy limits; objective
  val/leaderboard (tune_moe_aug_helper.yaml: the Helper's). tune_model.yaml: the channel-attention reduction
  and widths on the baseline under the 8 GiB budget.

growing a study:
  A study is named by --study (else the file's study or name) and keeps its definition in the storage. The
  same command again adds --trials N trials to it; a tune file whose space or metric changed is refused
  with the dimension that changed, unless a new --study name is given.

what a trial does:
  It samples the tune file's space, builds the base stage (+ fixed, trial_only, --set, the sampled values),
  predicts its peak memory with the memory probe on the largest training input and, above the budget, is
  pruned at once (prune_reason=oom-predicted). Otherwise it trains epochs_per_trial epochs, reporting the
  metric every epoch to the pruner. A real out-of-memory error (prune_reason=oom) or a divergence
  (prune_reason=diverged) prunes the trial; any other error fails it; the study always goes on.

storage and workers:
  The study lives in --storage (default sqlite:///<home>/optuna.db, <home> = $SMARTIFY_HOME or
  <repo>/mlruns) with heartbeats: a trial whose worker was killed is marked FAIL after the grace period and
  retried with the same values. Running the same command in several processes (or --workers K) shares the
  study; --trials is the number of trials this command runs (split over the K workers).

the overlay:
  The best trial's values are written to <overlay-dir>/<study>.yaml (default experiments/tuned/). It inherits
  the base stage and sets the tune file's fixed keys and the tuned keys, so it trains as it is:
    smartify train experiments/tuned/<study>.yaml
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="tune augmentation and model size with Optuna under a memory budget",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run (or join) an Optuna study over a training stage.")
    p.add_argument("config", nargs="?", help="tune YAML file (experiments/tune_moe_aug.yaml); not with --report")
    p.add_argument("--report", metavar="STUDY",
                   help="re-draw the figures, trial table and overlay of a stored study from --storage, without "
                        "training (--output-dir: where; default the study's trial folder)")
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="trials this command runs (default: n_trials of the tune file; 0: only report)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="start no trial after S seconds")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna RDB storage: sqlite:///path.db, postgresql+psycopg://user@host/db... "
                        "(default: sqlite:///<home>/optuna.db)")
    p.add_argument("--study", metavar="NAME",
                   help="study name, also the overlay's file name: letters, digits, . _ - (default: the tune "
                        "file's study or file name)")
    p.add_argument("--memory-budget", metavar="SIZE", help="GPU memory per trial, e.g. 8GiB, 7.5GB, none")
    add_stage_arguments(p)
    p.add_argument("--workers", type=int, default=1, metavar="K",
                   help="run the trials in K worker processes on the same study (default: 1, in this process)")
    p.add_argument("--overlay-dir", metavar="DIR", help="where <study>.yaml is written (default: experiments/tuned)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="trial outputs, {study} expanded (default: output_dir of the tune file, runs/tune/{study})")
    p.add_argument("--parent-run-id", help="nest the study's MLflow run under this run when it is created")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    add_record_arguments(p, "run of the study, when it is created (default: study-<study>)")
    p.add_argument("--experiment", default="smartify-tune", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --workers: no report
    p.set_defaults(func=run)


def split_trials(total: int, workers: int) -> list[int]:
    """``total`` trials over ``workers`` processes, as evenly as possible."""
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers)]


def _worker_argv(args: argparse.Namespace, storage: str, study: str, trials: int) -> list[str]:
    argv = [sys.executable, "-m", "tracking.cli"]
    if getattr(args, "verbose", False):
        argv.append("-v")
    if getattr(args, "quiet", False):
        argv.append("-q")
    argv += ["tune", args.config, "--worker", "--trials", str(trials), "--storage", storage, "--study", study,
             "--experiment", args.experiment]
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    if args.memory_budget is not None:
        argv += ["--memory-budget", args.memory_budget]
    if args.no_tracking:
        argv.append("--no-tracking")
    if args.output_dir:
        argv += ["--output-dir", args.output_dir]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


def _print_result(result) -> None:
    print(f"study {result.study} in {result.storage}")
    print(result.table)
    for key, values in result.excluded.items():
        print(f"{key}: {values} never proposed (zero-channel attention layers)")
    by_kind: dict[str, list[float]] = {}
    for row in result.rows:
        if row["seconds"] is None:
            continue
        kind = row["reason"] if row["state"] == "PRUNED" else row["state"].lower()
        by_kind.setdefault(kind, []).append(row["seconds"])
    if by_kind:
        print("seconds per trial: " + ", ".join(f"{k} {sum(v) / len(v):.2f} (n={len(v)})"
                                                 for k, v in sorted(by_kind.items())))
    if result.overlay is not None:
        print(f"overlay: {result.overlay}  (smartify train {result.overlay})")
    for name, path in result.figures.items():
        print(f"figure {name}: {path}")


def _report(args: argparse.Namespace) -> int:
    """``--report STUDY``: the study's figures, table and overlay from the storage alone."""
    from recon.io import safe_component
    from tracking.runs.stores import default_optuna_storage
    from tracking.tune.config import check_storage_url
    from tracking.tune.stored import report_study

    if args.config is not None:
        print(f"smartify tune: error: --report {args.report} reads the study from storage; drop the tune file "
              f"{args.config}", file=sys.stderr)
        return 2
    name = safe_component(args.report, "--report")
    url = check_storage_url(args.storage) if args.storage else default_optuna_storage()
    result = report_study(name, url, Path(args.output_dir) if args.output_dir else None,
                          Path(args.overlay_dir) if args.overlay_dir else None)
    _print_result(result)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run (or join) the study; with ``--print-config`` print its effective configuration and exit."""
    from recon.config import to_dict
    from tracking.train import config_text
    from tracking.tune.study import TuneOptions, finish, prepare, resolved_tune, run_tune

    if args.report is not None:
        return _report(args)
    if args.config is None:
        print("smartify tune: error: give a tune file (or --report STUDY)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("smartify tune: error: --workers must be >= 1", file=sys.stderr)
        return 2
    options = TuneOptions(
        tune_file=Path(args.config), trials=args.trials, timeout=args.timeout, storage=args.storage,
        study=args.study, memory_budget=args.memory_budget, overrides=tuple(args.overrides),
        overlay_dir=Path(args.overlay_dir) if args.overlay_dir else None, tracking=not args.no_tracking,
        experiment=args.experiment, finalize=not args.worker,
        output_dir=Path(args.output_dir) if args.output_dir else None, parent_run_id=args.parent_run_id,
        run_name=args.run_name,
    )
    if args.print_config:
        sys.stdout.write(config_text(to_dict(resolved_tune(options))))
        return 0
    if args.workers == 1:
        result = run_tune(options)
        if result is not None:
            _print_result(result)
        return 0
    # The study (and its MLflow run) is created here, once, before any worker starts: no schema race.
    prepared = prepare(options)
    total = prepared.session.cfg.n_trials if args.trials is None else args.trials
    procs = []
    for n in split_trials(total, args.workers):
        if n == 0 and args.timeout is None:
            continue
        argv = _worker_argv(args, prepared.storage_url, prepared.study.study_name, n)
        log.info("starting worker: %s", " ".join(argv))
        procs.append(subprocess.Popen(argv))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM to this parent only (``timeout``): stop the workers too
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait()
        prepared.session.abandon_study_run()  # this process created the study's run
        raise
    failed = [c for c in codes if c != 0]
    if failed:
        log.error("%d of %d workers exited with an error (codes %s)", len(failed), len(codes), failed)
    _print_result(finish(prepared, options.overlay_dir))
    return 1 if failed else 0
