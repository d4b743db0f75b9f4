"""``smartify tracking``: where tracking data goes, and replaying what the server missed.

``info`` prints the resolved tracking/registry URIs, the local folders, the HTTP retry settings and
how many records wait in the spool. ``sync`` replays the spool (records that could not reach the
tracking server during training) and prints the counts; it exits 1 while records remain.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tracking.runs.spool import spool_summary
from tracking.runs.stores import apply_http_defaults, resolve_stores
from tracking.runs.replay import replay_spool

EPILOG = """examples:
  smartify tracking info
  smartify tracking sync
  MLFLOW_TRACKING_URI=http://127.0.0.1:5000 smartify tracking sync --spool /scratch/mlruns/spool
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tracking`` parser with its ``info`` and ``sync`` subcommands."""
    parser = subparsers.add_parser(
        "tracking", help="tracking stores and the offline spool",
        description="Show the tracking stores, or replay records spooled while the server was unreachable.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    info = sub.add_parser("info", help="print the resolved URIs, folders and pending spool records")
    info.set_defaults(func=run_info)
    sync = sub.add_parser("sync", help="replay spooled records to the tracking server")
    sync.add_argument("--spool", type=Path, default=None, metavar="DIR", help="spool folder (default: <home>/spool)")
    sync.set_defaults(func=run_sync)


def run_info(args: argparse.Namespace) -> int:
    """Print where tracking goes; returns 0."""
    stores = resolve_stores()
    for key, value in stores.describe().items():
        print(f"{key}: {value}")
    for key, value in apply_http_defaults().items():
        print(f"{key}: {value}")
    pending = spool_summary(stores.spool_dir)
    print(f"pending records: {sum(pending.values())}" + (f" in {len(pending)} run(s)" if pending else ""))
    return 0


def run_sync(args: argparse.Namespace) -> int:
    """Replay the spool; returns 0 when nothing is left, 1 otherwise."""
    stores = resolve_stores()
    stats = replay_spool(stores, spool_dir=args.spool)
    print(f"runs {stats.runs}, sent {stats.sent} (created {stats.created} run(s)), skipped duplicate metrics "
          f"{stats.skipped_metrics}, superseded artifacts {stats.superseded}, rejected {stats.rejected}, "
          f"pending {stats.pending}, other servers {stats.elsewhere}")
    if stats.rejected:
        print(f"rejected records are kept in {args.spool or stores.spool_dir}/*.rejected.jsonl")
    return 1 if stats.pending or stats.elsewhere else 0
