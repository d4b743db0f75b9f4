"""``smartify tracking``: where tracking data goes, and replaying what the server missed.

``info`` prints the resolved tracking/registry URIs, the local folders, the HTTP retry settings, the
artifact location the experiment actually uses (stored in the tracking database when the experiment
was created: an absolute URI that does not follow a moved or copied store) and how many records wait
in the spool. ``sync`` replays the spool (records that could not reach the
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
  smartify tracking info --experiment smartify-tune
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
    info = sub.add_parser("info", help="print the resolved URIs, folders, artifact location and pending spool records")
    info.add_argument("--experiment", default="smartify", metavar="NAME",
                      help="experiment whose artifact location is shown (default: smartify)")
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
    print(_artifact_location(stores, args.experiment))
    pending = spool_summary(stores.spool_dir)
    print(f"pending records: {sum(pending.values())}" + (f" in {len(pending)} run(s)" if pending else ""))
    return 0


def _artifact_location(stores, experiment: str) -> str:
    """The line about the experiment's stored artifact location (what MLflow actually writes to)."""
    from mlflow.exceptions import MlflowException

    from tracking.runs.stores import make_client

    try:
        found = make_client(stores).get_experiment_by_name(experiment)
    except MlflowException as exc:
        return f"experiment {experiment} artifact location: unknown ({exc.error_code})"
    if found is None:
        return f"experiment {experiment} artifact location: none yet (the experiment does not exist)"
    location = found.artifact_location
    line = f"experiment {experiment} artifact location: {location}"
    if location.startswith("file://") and not Path(location.removeprefix("file://")).is_dir():
        line += "\nwarning: that folder does not exist here (a moved or copied store keeps the old absolute path)"
    return line


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
