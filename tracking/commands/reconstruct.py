"""``smartify reconstruct``: reconstruct a leaderboard folder with the Hacker/Helper systems.

Loads the two systems (and the classifier) from their stage checkpoint folders, reconstructs
``DATA/{acc4,acc8}/kspace/*.h5`` into ``OUT/{acc4,acc8}/<name>.h5``, prints the Broker's routing
report, the time per slice and the verdict against the budget, then, when the data folder holds
``image_label`` for every file, the official evaluation. ``--device auto`` (the default) is CUDA where
present, so the budget verdict is the GPU's; the progress bar is on when stderr is a terminal. Exit code 0 within the budget, 1 over it,
2 for bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from recon.data.layout import LEADERBOARD_ACCS
from recon.errors import InputError
from recon.inference.evaluation import labels_available
from recon.inference.device import resolve_device
from recon.inference.reconstruct import CHALLENGE_BUDGET_S, reconstruct_leaderboard
from recon.inference.systems import load_classifier, load_system

log = logging.getLogger(__name__)

EPILOG = """examples:
  smartify reconstruct --hacker runs/hacker_moe --helper runs/helper_moe --classifier runs/classifier \\
      --data Data/leaderboard --out result/reconstructions_leaderboard --device cuda --amp
  smartify reconstruct --hacker runs/hacker_moe --helper runs/helper_baseline --anatomy-from-filename \\
      --data /tmp/data/leaderboard --out /tmp/recon --which last --json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``reconstruct`` parser."""
    parser = subparsers.add_parser(
        "reconstruct",
        help="reconstruct a leaderboard folder (Broker: Hacker/Helper routing) within the time budget",
        description=(
            "Reconstruct DATA/{acc4,acc8}/kspace/*.h5 into OUT/{acc4,acc8}/<name>.h5 (dataset 'reconstruction', "
            "float32). Slices whose mask is exactly the public pattern go to the Hacker system, the rest to the "
            "Helper; the expert is {brain,knee} x {acc4,acc8} (anatomy per file from the classifier, or from the "
            "file name with --anatomy-from-filename; acceleration from the mask)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hacker", required=True, metavar="PATH", help="Hacker stage folder or checkpoint file")
    parser.add_argument("--helper", required=True, metavar="PATH", help="Helper stage folder or checkpoint file")
    parser.add_argument("--classifier", metavar="PATH", help="brain/knee classifier stage folder or checkpoint")
    parser.add_argument(
        "--anatomy-from-filename", action="store_true",
        help="take each file's anatomy from its name (required when no --classifier is given)",
    )
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="leaderboard folder ({acc4,acc8}/)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder ({acc4,acc8}/<name>.h5)")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of each stage folder")
    parser.add_argument("--budget-s", type=float, default=CHALLENGE_BUDGET_S, metavar="S",
                        help="time budget in seconds (default: %(default)s, the challenge's limit)")
    parser.add_argument("--device", default="auto",
                        help="torch device; auto = cuda when available, else cpu (default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="slices per forward pass (default: 4)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="DataLoader workers (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="allow an output folder that already holds .h5 files")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation even when labels exist")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: on when stderr is a terminal)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (0 within budget, 1 over budget)."""
    clock = time.perf_counter()
    if args.classifier is None and not args.anatomy_from_filename:
        raise InputError("no anatomy source: give --classifier PATH or choose --anatomy-from-filename explicitly")
    if args.classifier is not None and args.anatomy_from_filename:
        raise InputError("give either --classifier or --anatomy-from-filename, not both")
    args.device = resolve_device(args.device)
    if args.budget_s <= 0:
        raise InputError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.batch_size < 1 or args.workers < 0:
        raise InputError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    hacker = load_system(args.hacker, args.which, args.device, name="hacker")
    helper = load_system(args.helper, args.which, args.device, name="helper")
    classifier = load_classifier(args.classifier, args.which, args.device) if args.classifier else None
    result = reconstruct_leaderboard(
        args.data, args.out, hacker, helper, classifier=classifier,
        anatomy_from_filename=args.anatomy_from_filename, device=args.device, amp=args.amp,
        batch_size=args.batch_size, num_workers=args.workers, budget_s=args.budget_s,
        overwrite=args.overwrite, clock_start=clock,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    evaluation = None
    if not args.no_eval and labels_available(args.data):
        from recon.inference.evaluation import evaluate_folder

        evaluation = evaluate_folder(args.data, args.out, device=args.device)

    if args.json:
        obj = result.to_dict()
        obj["evaluation"] = evaluation
        print(json.dumps(obj, indent=2))
    else:
        print(result.format())
        if evaluation is not None:
            print(f"Leaderboard SSIM : {evaluation['leaderboard']:.4f}")
            print("=" * 10 + " Details " + "=" * 10)
            for acc in LEADERBOARD_ACCS:
                print(f"Leaderboard SSIM ({acc}): {evaluation[acc]:.4f}")
        elif not args.no_eval:
            print("evaluation skipped: the data folder has no image_label for every file of acc4 and acc8")
    return 0 if result.within_budget else 1
