"""``smartify submit``: reconstruct a leaderboard folder with the registry's champions, as a tracked run.

Resolves ``models:/smartify-{hacker,helper,classifier}@champion`` (each overridable) to concrete
versions, runs the same inference as ``smartify reconstruct``, scores the output when labels
exist (and, by default then, scores the Hacker, the Helper and the Broker on the public leaderboard and on
re-masked copies of it: ``submission/robustness.md``), and logs a ``submission`` run with the exact
versions used. ``--device auto`` (the default) is CUDA where present; the progress bar is on when
stderr is a terminal. Exit code 0 within the time
budget, 1 over it, 2 for bad input or a tracking server that cannot be reached (never read as "no alias").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  smartify submit --data Data/leaderboard --out result/reconstructions_leaderboard --device cuda --amp
  smartify submit --data /tmp/data/leaderboard --out /tmp/submission --hacker models:/smartify-hacker/3
  smartify submit --data /tmp/data/leaderboard --out /tmp/submission --classifier none --anatomy-from-filename
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``submit`` parser."""
    from recon.inference.reconstruct import CHALLENGE_BUDGET_S
    from tracking.registry.submission import DEFAULT_HACKER, DEFAULT_HELPER

    parser = subparsers.add_parser(
        "submit", help="reconstruct the leaderboard with the registry's champions and log a submission run",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Reconstruct DATA/{acc4,acc8} into OUT/{acc4,acc8}/<name>.h5 with registered model versions (default: "
            "the 'champion' alias of smartify-hacker, smartify-helper and smartify-classifier), score it when "
            "labels exist, and log an MLflow run 'submission' with the exact versions, scores, routing report, "
            "timing against the budget and the output manifest."
        ),
    )
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="leaderboard folder ({acc4,acc8}/)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--hacker", default=DEFAULT_HACKER, metavar="URI", help="Hacker model (default: %(default)s)")
    parser.add_argument("--helper", default=DEFAULT_HELPER, metavar="URI", help="Helper model (default: %(default)s)")
    parser.add_argument("--classifier", metavar="URI|none",
                        help="classifier model, or 'none' (default: models:/smartify-classifier@champion, "
                             "or none with --anatomy-from-filename)")
    parser.add_argument("--anatomy-from-filename", action="store_true",
                        help="take each file's anatomy from its name (when no classifier is used)")
    parser.add_argument("--budget-s", type=float, default=CHALLENGE_BUDGET_S, metavar="S",
                        help="time budget in seconds (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="allow an output folder that already holds .h5 files")
    parser.add_argument("--device", default="auto",
                        help="torch device; auto = cuda when available, else cpu (default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="slices per forward pass (default: 4)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="DataLoader workers (default: 2)")
    parser.add_argument("--experiment", default="smartify", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--parent-run-id", help="nest the submission run under this run")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation even when labels exist")
    parser.add_argument("--robustness", action=argparse.BooleanOptionalAction, default=None,
                        help="also score the Hacker, the Helper and the Broker on the public leaderboard and on "
                             "re-masked copies (equispaced, random; never the public pattern): about 3 more "
                             "reconstructions of the leaderboard, not counted against the budget "
                             "(default: on when labels exist)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: on when stderr is a terminal)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run)


def _classifier_ref(args: argparse.Namespace) -> str | None:
    from tracking.registry.submission import DEFAULT_CLASSIFIER

    if args.classifier is None:
        return None if args.anatomy_from_filename else DEFAULT_CLASSIFIER
    return None if args.classifier.strip().lower() == "none" else args.classifier


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (0 within budget, 1 over budget)."""
    from recon.errors import InputError
    from tracking.registry.submission import submit

    if args.batch_size < 1 or args.workers < 0:
        raise InputError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    result = submit(
        args.data, args.out, hacker=args.hacker, helper=args.helper, classifier=_classifier_ref(args),
        anatomy_from_filename=args.anatomy_from_filename, experiment=args.experiment,
        parent_run_id=args.parent_run_id, budget_s=args.budget_s, overwrite=args.overwrite, device=args.device,
        amp=args.amp, batch_size=args.batch_size, num_workers=args.workers,
        progress=sys.stderr.isatty() if args.progress is None else args.progress, evaluate=not args.no_eval,
        robustness=args.robustness,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0 if result.within_budget else 1
    for role, info in result.versions.items():
        print(f"{role:<10} {info if info else 'none (anatomy from file names)'}")
    print(result.recon.format())
    if result.evaluation is not None:
        ev = result.evaluation
        print(f"Leaderboard SSIM : {ev['leaderboard']:.4f} (acc4 {ev['acc4']:.4f}, acc8 {ev['acc8']:.4f})")
    if result.robustness is not None:
        from tracking.registry.robustness import markdown

        table = markdown(result.robustness).split("\n\n")
        print("\n".join(part for part in table if part.startswith("| system | public")))
    print(f"submission run {result.run_id}")
    return 0 if result.within_budget else 1
