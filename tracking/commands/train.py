"""``smartify train STAGE.yaml``: run one training stage, tracked in MLflow."""

from __future__ import annotations

import argparse
import logging

from recon.engine.stage import load_stage_config
from recon.engine.trainer import DivergenceError, run_stage
from recon.events import ConsoleCallback
from recon.seeding import seed_everything

log = logging.getLogger(__name__)

EPILOG = """examples:
  smartify train experiments/hacker_baseline.yaml --set data.root=/data/snu
  smartify train experiments/tiny/hacker_baseline.yaml --set train.epochs=3
  smartify train experiments/hacker_moe.yaml --init-from runs/hacker_baseline
  smartify train experiments/hacker_baseline.yaml --resume runs/hacker_baseline
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
    p.set_defaults(func=run)


def build_callbacks(args: argparse.Namespace, stage_name: str):
    """Console plus, unless ``--no-tracking``, the MLflow adapter."""
    callbacks = [ConsoleCallback()]
    if not getattr(args, "no_tracking", False):
        from tracking.mlflow_callback import MLflowCallback
        from tracking.stores import resolve_stores

        callbacks.append(MLflowCallback(resolve_stores(), experiment=args.experiment,
                                        parent_run_id=getattr(args, "parent_run_id", None), run_name=stage_name))
    from recon.events import CallbackList

    return CallbackList(callbacks)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        from recon.checkpoint import load_checkpoint

        payload = load_checkpoint(args.resume, which="last")
        cfg, resolved = load_stage_config(data=payload["config"], overrides=args.overrides)
    else:
        cfg, resolved = load_stage_config(args.config, overrides=args.overrides)
    seed_everything(cfg.seed, cfg.deterministic)
    callbacks = build_callbacks(args, cfg.stage.name)
    try:
        end = run_stage(cfg, resolved, callbacks, resume=args.resume, init_from=args.init_from)
    except DivergenceError as exc:
        log.error("%s", exc)
        return 3
    print(f"stage {cfg.stage.name}: {end.status}; best {end.best_metric} at epoch {end.best_epoch}; "
          f"checkpoints in {end.output_dir / 'checkpoints'}")
    if args.register and end.best_path is not None:
        from tracking.registry import register_stage

        version = register_stage(end.best_path)
        print(f"registered {version}")
    return 0
