"""``smartify train STAGE.yaml``: run one training stage, tracked in MLflow."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from recon.engine import distributed
from recon.engine.stage import load_stage_config
from recon.engine.loop import DivergenceError
from recon.engine.trainer import run_stage
from recon.errors import InputError
from recon.events import ConsoleCallback
from recon.seeding import seed_everything

log = logging.getLogger(__name__)

EPILOG = """examples:
  smartify train experiments/hacker_baseline.yaml --set data.root=/data/snu
  smartify train experiments/tiny/hacker_baseline.yaml --set train.epochs=3
  smartify train experiments/hacker_moe.yaml --init-from runs/hacker_baseline
  smartify train experiments/hacker_baseline.yaml --resume runs/hacker_baseline
  smartify train experiments/tiny/hacker_baseline.yaml --nproc 2 --set train.batch_size=1
"""


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set``, shared with ``smartify tune``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (dotted path, YAML value); repeatable")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training stage", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run one training stage from a stage YAML file.")
    p.add_argument("config", help="stage YAML file (experiments/*.yaml)")
    add_stage_arguments(p)
    p.add_argument("--resume", metavar="PATH",
                   help="resume exactly from a checkpoint file or stage folder (its last.pt); "
                        "the configuration comes from the checkpoint, --set still applies")
    p.add_argument("--init-from", metavar="PATH", help="initialise weights only from another stage's checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (console only)")
    p.add_argument("--experiment", default="smartify", help="MLflow experiment name (default: smartify)")
    p.add_argument("--parent-run-id", help="nest the stage's MLflow run under this run")
    p.add_argument("--register", action="store_true",
                   help="register the best model in the MLflow Model Registry after the stage")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel ranks on this machine (gloo on CPU, nccl on GPUs): runs this command "
                        "as N processes that talk over 127.0.0.1 only; the global batch is N x train.batch_size")
    p.set_defaults(func=run)
    global _PARSER
    _PARSER = p


_PARSER: argparse.ArgumentParser | None = None


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The ``smartify`` arguments that repeat this ``train`` command in every rank (without ``--nproc``)."""
    if _PARSER is None:
        raise RuntimeError("rank_argv before register")
    argv = (["-v"] if getattr(args, "verbose", False) else []) + (["-q"] if getattr(args, "quiet", False) else [])
    argv.append("train")
    for action in _PARSER._actions:
        if action.dest in ("help", "nproc") or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:
            argv.append(str(value))
            continue
        opt = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreConstAction):
            if value != action.default:
                argv.append(opt)
        elif isinstance(action, argparse._AppendAction):
            argv.extend(f"{opt}={v}" for v in value or [])
        elif value is not None and value != action.default:
            argv.append(f"{opt}={value}")
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


def build_callbacks(args: argparse.Namespace, stage_name: str):
    """Console plus, unless ``--no-tracking``, the MLflow adapter."""
    callbacks = [ConsoleCallback()]
    # in a data-parallel run only rank 0 tracks (the engine calls callbacks on rank 0 only)
    if not getattr(args, "no_tracking", False) and distributed.context().is_main:
        from tracking.runs.callback import MLflowCallback
        from tracking.runs.stores import resolve_stores

        callbacks.append(MLflowCallback(resolve_stores(), experiment=args.experiment,
                                        parent_run_id=getattr(args, "parent_run_id", None), run_name=stage_name))
    from recon.events import CallbackList

    return CallbackList(callbacks)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", 1) != 1:
        return launch(args)
    if args.resume:
        from recon.engine.checkpoint import Checkpoint

        resumed = Checkpoint.load(args.resume, which="last")
        cfg, resolved = load_stage_config(data=resumed.config, overrides=args.overrides)
    else:
        cfg, resolved = load_stage_config(args.config, overrides=args.overrides)
    seed_everything(cfg.seed, cfg.deterministic)
    callbacks = build_callbacks(args, cfg.stage.name)
    try:
        end = run_stage(cfg, resolved, callbacks, resume=args.resume, init_from=args.init_from)
    except DivergenceError as exc:
        log.error("%s", exc)
        return 3
    if not distributed.context().is_main:
        return 0
    print(f"stage {cfg.stage.name}: {end.status}; best {end.best_metric} at epoch {end.best_epoch}; "
          f"checkpoints in {end.output_dir / 'checkpoints'}")
    if args.register and end.best_path is not None:
        from tracking.registry.versions import register_stage

        version = register_stage(end.best_path)
        print(f"registered {version}")
    return 0
