"""``smartify train STAGE.yaml``: run one training stage, tracked in MLflow."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from recon.engine import distributed
from recon.errors import InputError
from tracking.train import DEFAULT_EXPERIMENT, StageTracking, config_text, effective_stage, load_stage, run_tracked_stage

log = logging.getLogger(__name__)

EPILOG = """examples:
  smartify train experiments/hacker_baseline.yaml --set data.root=/data/snu
  smartify train experiments/tiny/hacker_baseline.yaml --set train.epochs=3
  smartify train experiments/hacker_moe.yaml --init-from runs/hacker_baseline
  smartify train experiments/hacker_baseline.yaml --resume runs/hacker_baseline
  smartify train experiments/tiny/hacker_baseline.yaml --overwrite   # replaces runs/hacker_baseline's checkpoints
  smartify train experiments/tiny/hacker_baseline.yaml --nproc 2 --set train.batch_size=1
  smartify train experiments/hacker_moe.yaml --init-from runs/hacker_baseline --print-config
  smartify train experiments/tiny/hacker_baseline.yaml --run-name lr-check
"""


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set``, shared with ``smartify tune``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (dotted path, YAML value); repeatable")


def add_record_arguments(parser: argparse.ArgumentParser, run: str) -> None:
    """``--print-config`` and ``--run-name``, shared by ``train``, ``tune`` and ``pipeline``.

    Args:
        parser: the command's parser.
        run: which MLflow run ``--run-name`` names (for the help text).
    """
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML (exactly what the run logs) and exit "
                             "without training or touching the tracking store")
    parser.add_argument("--run-name", metavar="NAME", help=f"name of the MLflow {run}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` parser."""
    p = sub.add_parser("train", help="run a training stage", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run one training stage from a stage YAML file.")
    p.add_argument("config", help="stage YAML file (experiments/*.yaml)")
    add_stage_arguments(p)
    p.add_argument("--resume", metavar="PATH",
                   help="resume exactly from a checkpoint file or stage folder (its last.pt); "
                        "the configuration comes from the checkpoint, --set still applies; the stage continues "
                        "in the checkpoint's folder (a copied folder gets a new MLflow run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of a stage whose output.dir already holds checkpoints: its "
                        "checkpoints/ is deleted when the stage starts (without this, such a folder is refused)")
    p.add_argument("--init-from", metavar="PATH", help="initialise weights only from another stage's checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (console only)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help=f"MLflow experiment name (default: {DEFAULT_EXPERIMENT})")
    p.add_argument("--parent-run-id", help="nest the stage's MLflow run under this run")
    p.add_argument("--register", action="store_true",
                   help="register the best model in the MLflow Model Registry after the stage")
    add_record_arguments(p, "run of the stage (default: the stage name)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel ranks on this machine (gloo on CPU, nccl on GPUs): runs this command "
                        "as N processes that talk over 127.0.0.1 only; the global batch is N x train.batch_size")
    p.set_defaults(func=run)


#: ``train`` options that take a value, as ``(flag, attribute)``: repeated in every rank when set
_VALUE_OPTIONS = (("--resume", "resume"), ("--init-from", "init_from"), ("--parent-run-id", "parent_run_id"),
                  ("--run-name", "run_name"))
#: ``train`` switches, as ``(flag, attribute)``: repeated in every rank when on
_SWITCHES = (("--no-tracking", "no_tracking"), ("--register", "register"), ("--overwrite", "overwrite"))


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The ``smartify`` arguments that repeat this ``train`` command in every rank (without ``--nproc``).

    Args:
        args: the parsed ``train`` command.

    Returns:
        The arguments after ``smartify``: the global flags, ``train``, the stage file and every option
        that was given (``--set`` items in their order, ``--experiment`` unless it is the default).
    """
    argv = (["-v"] if getattr(args, "verbose", False) else []) + (["-q"] if getattr(args, "quiet", False) else [])
    argv += ["train", str(args.config)]
    argv += [f"--set={item}" for item in args.overrides]
    for flag, name in _VALUE_OPTIONS:
        if getattr(args, name) is not None:
            argv.append(f"{flag}={getattr(args, name)}")
    if args.experiment != DEFAULT_EXPERIMENT:
        argv.append(f"--experiment={args.experiment}")
    argv += [flag for flag, name in _SWITCHES if getattr(args, name)]
    return argv


def launch(args: argparse.Namespace) -> int:
    """Run this ``train`` command as ``args.nproc`` ranks (see :func:`recon.engine.distributed.launch_local`)."""
    if args.nproc < 1:
        raise InputError(f"--nproc {args.nproc}: expected a number of processes >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # already a rank: do not join its group here
        raise InputError("--nproc inside a distributed launch (torchrun or --nproc): start one launcher only")
    command = [sys.executable, "-m", "tracking.cli", *rank_argv(args)]
    log.info("launching %d ranks: %s", args.nproc, " ".join(command))
    return distributed.launch_local(command, args.nproc)


def run(args: argparse.Namespace) -> int:
    """Run the stage (or launch ``--nproc`` ranks of it); returns the exit code (3: the stage diverged)."""
    if getattr(args, "print_config", False):
        if args.resume is not None and args.init_from is not None:
            raise InputError(f"--resume {args.resume} and --init-from {args.init_from}: give one of them")
        _, resolved = effective_stage(load_stage(args.config, args.overrides, args.resume), args.init_from)
        sys.stdout.write(config_text(resolved))
        return 0
    if getattr(args, "nproc", 1) != 1:
        return launch(args)
    tracking = None if args.no_tracking else StageTracking(args.experiment, parent_run_id=args.parent_run_id,
                                                           run_name=getattr(args, "run_name", None))
    outcome = run_tracked_stage(args.config, args.overrides, resume=args.resume, init_from=args.init_from,
                                tracking=tracking, register=args.register, overwrite=args.overwrite)
    if outcome.status == "diverged":
        log.error("%s", outcome.error)
        return 3
    if not distributed.context().is_main:
        return 0
    print(f"stage {outcome.config.stage.name}: {outcome.status}; best {outcome.best_metric} at epoch "
          f"{outcome.best_epoch}; checkpoints in {outcome.output_dir / 'checkpoints'}")
    if outcome.version is not None:
        print(f"registered {outcome.version}")
    return 0
