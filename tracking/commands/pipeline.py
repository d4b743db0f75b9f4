"""``smartify pipeline FILE`` and ``smartify demo``: stage lists run as one tracked invocation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recon.config import parse_overrides
from tracking.commands.train import add_record_arguments
from tracking.pipeline.config import load_pipeline
from tracking.pipeline.runner import PipelineRunner
from tracking.pipeline.summary import format_summary
from tracking.train import config_text

DEMO_FILE = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"

PIPELINE_EPILOG = """examples:
  smartify pipeline experiments/demo.yaml
  smartify pipeline experiments/pipeline.yaml --set data_root=/data/snu --set workdir=runs/full
  smartify pipeline experiments/demo.yaml --print-config      # the pipeline and every step's configuration
  smartify pipeline experiments/demo.yaml --run-name demo-lr  # name the parent run

--print-config prints YAML documents: the pipeline as it runs (the parent run's pipeline.yaml), then each
train step's stage (its run's config.yaml, with init_from the earlier step's folder) and each tune step's
effective tune configuration; nothing is trained, synthesised or tracked.
"""
OVERWRITE_HELP = ("write into the workdir even when it holds an earlier run's results, replacing each stage's "
                  "checkpoints (default: a new numbered workdir beside it, e.g. runs/demo-2)")
DEMO_EPILOG = """The demo synthesises the tiny data set, trains the Hacker and Helper baselines, their 4-expert
mixtures and the classifier, runs a short Optuna study, registers and promotes the models, submits
the leaderboard from the registry and evaluates it, all as one parent MLflow run. Run again, it
writes into a new numbered folder (runs/demo-2, ...) and reuses the data in runs/demo/data.

examples:
  smartify demo
  smartify demo --workdir /tmp/demo --preset small
"""


def _run(path: Path, overrides: dict, device: str | None, overwrite: bool = False,
         run_name: str | None = None, print_config: bool = False) -> int:
    cfg, base = load_pipeline(path, overrides)
    runner = PipelineRunner(cfg, base, device=device, overwrite=overwrite, run_name=run_name, source=path)
    if print_config:
        docs = runner.resolved_documents()
        sys.stdout.write("---\n".join(f"# {title}\n{config_text(doc)}" for title, doc in docs))
        return 0
    result = runner.run()
    print(format_summary(result))
    bad = [s for s in result.steps if s.status in ("failed", "diverged")]
    return 1 if bad else 0


def run_pipeline(args: argparse.Namespace) -> int:
    """``smartify pipeline FILE``: run the file's steps; exit code 1 when a step failed or diverged."""
    overrides = dict(parse_overrides(args.overrides))
    return _run(Path(args.file), overrides, args.device, args.overwrite, args.run_name, args.print_config)


def run_demo(args: argparse.Namespace) -> int:
    """``smartify demo``: the demo pipeline on synthetic data (``--preset``, ``--workdir``)."""
    overrides: dict = {"workdir": args.workdir}
    if args.preset != "tiny":
        overrides["synth"] = {"preset": args.preset, "seed": 0, "grappa": "numpy"}
        overrides["workdir"] = f"{args.workdir}-{args.preset}" if args.workdir == "runs/demo" else args.workdir
    return _run(DEMO_FILE, overrides, args.device, args.overwrite)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pipeline`` and ``demo`` parsers."""
    p = sub.add_parser("pipeline", help="run a pipeline file (stages, tuning, promotion, submission)",
                       epilog=PIPELINE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="pipeline YAML (experiments/pipeline.yaml, experiments/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a top-level pipeline key (workdir, data_root, name, experiment)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device for every stage (default: the stage's)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_record_arguments(p, "parent run of the pipeline (default: pipeline-<name>)")
    p.set_defaults(func=run_pipeline)

    d = sub.add_parser("demo", help="the main job: the whole pipeline on synthetic data",
                       epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--workdir", default="runs/demo", help="where data and outputs go (default: runs/demo)")
    d.add_argument("--preset", choices=("tiny", "small"), default="tiny", help="synthetic data size (default: tiny)")
    d.add_argument("--device", choices=("cpu", "cuda"), help="device for every stage")
    d.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    d.set_defaults(func=run_demo)
