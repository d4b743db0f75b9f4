"""``smartify evaluate``: the official 2025 leaderboard SSIM of a reconstruction folder.

Prints the official script's lines (4 decimals) or, with ``--json``, one JSON object with at least
``acc4``, ``acc8`` and ``leaderboard`` (null without ``--recon``), plus ``zero_filled`` and
``grappa`` objects of the same shape with ``--baselines``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recon.errors import InputError
from recon.inference.evaluation import ACCS, RECON_KEY, evaluate_baselines, evaluate_folder

EPILOG = """examples:
  smartify evaluate --leaderboard Data/leaderboard --recon result/run/reconstructions_leaderboard
  smartify evaluate --leaderboard Data/leaderboard --recon result/run/reconstructions_leaderboard --expect-files 58
  smartify evaluate --leaderboard /tmp/data/leaderboard --baselines --json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` parser."""
    parser = subparsers.add_parser(
        "evaluate",
        help="official leaderboard SSIM of a reconstruction folder (and baselines)",
        description=(
            "Score RECON/{acc4,acc8}/<name>.h5 against LEADERBOARD/{acc4,acc8}/image/<name>.h5 with the "
            "2025 challenge metric: masked 7x7 SSIM per slice, slice-weighted per acceleration, "
            "leaderboard = mean of acc4 and acc8."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--leaderboard", type=Path, required=True, metavar="DIR", help="leaderboard root")
    parser.add_argument("--recon", type=Path, metavar="DIR", help="reconstruction root (acc4/, acc8/)")
    parser.add_argument(
        "--baselines", action="store_true", help="also score zero-filled (image_input) and GRAPPA (image_grappa)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--key", default=RECON_KEY, help="dataset name of the reconstructions (default: %(default)s)")
    parser.add_argument(
        "--expect-files",
        type=int,
        default=None,
        metavar="N",
        help="require N files per acc folder (58 on the challenge)",
    )
    parser.add_argument("--device", default="cpu", help="torch device to compute on (default: %(default)s)")
    parser.set_defaults(func=run)


def _row(name: str, result: dict | None) -> str:
    if result is None:
        return ""
    return f"{name:<14}{result['acc4']:>9.4f}{result['acc8']:>9.4f}{result['leaderboard']:>13.4f}"


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code."""
    if args.recon is None and not args.baselines:
        raise InputError("--recon DIR is required unless --baselines is given")
    if args.expect_files is not None and args.expect_files < 1:
        raise InputError(f"--expect-files must be >= 1, got {args.expect_files}")
    result = None
    if args.recon is not None:
        result = evaluate_folder(args.leaderboard, args.recon, args.key, args.expect_files, args.device)
    baselines = evaluate_baselines(args.leaderboard, args.expect_files, args.device) if args.baselines else {}

    if args.json:
        obj: dict = dict(result) if result is not None else {"acc4": None, "acc8": None, "leaderboard": None}
        obj.update(baselines)
        print(json.dumps(obj, indent=2, sort_keys=False))
        return 0

    if result is not None:
        # The official script's lines.
        print(f"Leaderboard SSIM : {result['leaderboard']:.4f}")
        print("=" * 10 + " Details " + "=" * 10)
        for acc in ACCS:
            print(f"Leaderboard SSIM ({acc}): {result[acc]:.4f}")
    if baselines:
        if result is not None:
            print()
        print(f"{'source':<14}{'acc4':>9}{'acc8':>9}{'leaderboard':>13}")
        if result is not None:
            print(_row("recon", result))
        for name, res in baselines.items():
            print(_row(name, res))
    counts = (result or next(iter(baselines.values())))["slices"]
    print("slices: " + ", ".join(f"{acc} {counts[acc]}" for acc in ACCS))
    return 0
