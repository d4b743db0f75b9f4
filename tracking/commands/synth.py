"""``smartify synth OUT``: write a synthetic data set in the SNU layout (see ``recon.data.synth``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recon.data.synth import GRAPPA_MODES, PRESETS, clear_layout, write_dataset
from recon.errors import InputError

EPILOG = """examples:
  smartify synth /tmp/data                      # tiny preset, seed 0 (tests; a few seconds)
  smartify synth /tmp/demo --preset small       # CPU demos
  smartify synth /tmp/real --preset full --grappa none --seed 3
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` parser."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic data set (train, val, leaderboard) in the SNU layout",
        description="Write brain-like and knee-like multi-coil volumes in the SNU FastMRI Challenge file "
        "format: OUT/{train,val}/{image,kspace}/ and OUT/leaderboard/{acc4,acc8}/{image,kspace}/.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder (must be empty or absent)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="sizes and counts (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--grappa", choices=GRAPPA_MODES, default="numpy",
                        help="image_grappa: numpy GRAPPA, or none to omit the key (default numpy)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT, deleting the .h5 files of an earlier layout there")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the data set and print a one-line summary."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise InputError(f"{out}: folder is not empty (use --overwrite to replace a data set there)")
        clear_layout(out)
    summary = write_dataset(out, preset=args.preset, seed=args.seed, grappa=args.grappa,
                            progress=not args.no_progress and sys.stderr.isatty())
    print(
        f"synth {summary['preset']} seed {summary['seed']}: {summary['files']} files "
        f"({summary['volumes']} volumes, {summary['slices']} slices, {summary['bytes'] / 1e6:.1f} MB) "
        f"in {summary['seconds']:.1f} s -> {out}"
    )
    return 0
