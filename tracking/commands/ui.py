"""``smartify ui``: the MLflow UI on the embedded store (or whatever ``MLFLOW_TRACKING_URI`` names).

Replaces itself with ``mlflow ui`` on 127.0.0.1 with the store's backend URI and artifact root, and prints the URL
to open. A tracking server (``MLFLOW_TRACKING_URI=http://...``) already has a UI: its URL is
printed instead. Binding to another interface needs an explicit ``--host`` and prints a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from recon.errors import InputError
from tracking.runs.stores import ensure_local_dirs, redact_uri, resolve_stores

EPILOG = """examples:
  smartify ui
  smartify ui --port 5001
  SMARTIFY_HOME=/scratch/mlruns smartify ui
"""

LOOPBACK = "127.0.0.1"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` parser."""
    parser = subparsers.add_parser(
        "ui", help="start the MLflow UI on the local tracking store",
        description="Start `mlflow ui` against the embedded SQLite store and artifact folder (127.0.0.1 only).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    parser.add_argument("--host", default=None,
                        help=f"interface to bind (default: {LOOPBACK}); anything else exposes your runs")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and the URL, start nothing")
    parser.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_command(tracking_uri: str, registry_uri: str, artifact_root: str, host: str, port: int,
                  workers: int) -> list[str]:
    """The ``mlflow ui`` command line (run with this interpreter)."""
    return [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--registry-store-uri",
        registry_uri, "--default-artifact-root", artifact_root, "--host", host, "--port", str(port),
        "--workers", str(workers),
    ]


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code."""
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: expected 1..65535")
    stores = resolve_stores()
    if stores.is_remote:
        print(f"tracking goes to the server {redact_uri(stores.tracking_uri)}: open it there (nothing started)")
        return 0
    host = args.host or LOOPBACK
    if not _is_loopback(host):
        print(f"warning: --host {host} makes the MLflow UI (runs, artifacts, no login) reachable from other "
              "machines", file=sys.stderr)
    ensure_local_dirs(stores)
    command = build_command(stores.tracking_uri, stores.registry_uri, stores.artifact_root.as_uri(), host,
                            args.port, args.workers)
    url_host = LOOPBACK if host in ("0.0.0.0", "::") else host
    print(f"MLflow UI for {redact_uri(stores.tracking_uri)} (artifacts {stores.artifact_root})")
    print(f"open http://{url_host}:{args.port}")
    if args.dry_run:
        print(" ".join(command))
        return 0
    sys.stdout.flush()
    # Become the MLflow server: Ctrl-C and kill reach it directly and nothing is left orphaned.
    os.execv(sys.executable, command)
    return 0  # not reached
