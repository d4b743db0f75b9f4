"""``smartify ui``: the MLflow UI on the embedded store (or whatever ``MLFLOW_TRACKING_URI`` names).

Replaces itself with ``mlflow ui`` on 127.0.0.1 with the store's backend URI and artifact root, and prints the URL
to open: the runs table of the experiment (:func:`runs_url`, ``#/experiments/<id>/runs?workflowType=machine_learning``),
not the MLflow 3 home page, which opens on the GenAI overview. A tracking server (``MLFLOW_TRACKING_URI=http://...``)
already has a UI: its URL is printed instead. Binding to another interface needs an explicit ``--host`` and prints a
warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from recon.errors import InputError
from tracking.runs.stores import Stores, ensure_local_dirs, make_client, redact_uri, resolve_stores

EPILOG = """examples:
  smartify ui
  smartify ui --port 5001
  smartify ui --experiment smartify-tune
  SMARTIFY_HOME=/scratch/mlruns smartify ui
"""

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_EXPERIMENT = "smartify"
#: the MLflow 3 UI keeps a "workflow type" (GenAI or machine learning); this one shows the training runs' pages
WORKFLOW = "machine_learning"


def runs_url(base: str, experiment_id: str | None) -> str:
    """The URL of an experiment's runs table in the MLflow UI (the UI's home page without an experiment).

    Args:
        base: the UI's address, e.g. ``http://127.0.0.1:5000``.
        experiment_id: the experiment, or None.

    Returns:
        e.g. ``http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning``.
    """
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType={WORKFLOW}"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW}"


def experiment_id_of(stores: Stores, experiment: str | None = None, run_id: str | None = None) -> str | None:
    """The id of an experiment, by name or by one of its runs; None when it does not exist (yet) or the
    store cannot be read now (a placeholder run id, a server that does not answer)."""
    from mlflow.exceptions import MlflowException

    if run_id is not None and run_id.startswith("local-"):
        return None
    try:
        client = make_client(stores)
        if run_id is not None:
            return client.get_run(run_id).info.experiment_id
        found = client.get_experiment_by_name(experiment or DEFAULT_EXPERIMENT)
    except (MlflowException, OSError) as exc:
        print(f"note: experiment of {run_id or experiment} not found in {redact_uri(stores.tracking_uri)} "
              f"({str(exc).splitlines()[0][:120]})", file=sys.stderr)
        return None
    return found.experiment_id if found is not None and found.lifecycle_stage == "active" else None


def ui_hint(run_id: str | None, port: int = DEFAULT_PORT) -> str:
    """One line telling how to open the runs of ``run_id``'s experiment (the pipeline summary's last line)."""
    stores = resolve_stores()
    experiment_id = experiment_id_of(stores, run_id=run_id) if run_id else None
    if stores.is_remote:
        return f"open the runs: {runs_url(redact_uri(stores.tracking_uri), experiment_id)}"
    return f"open the runs: smartify ui   (then browse {runs_url(f'http://{LOOPBACK}:{port}', experiment_id)})"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` parser."""
    parser = subparsers.add_parser(
        "ui", help="start the MLflow UI on the local tracking store",
        description="Start `mlflow ui` against the embedded SQLite store and artifact folder (127.0.0.1 only).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help="experiment whose runs table the printed URL opens (default: %(default)s)")
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
        url = runs_url(redact_uri(stores.tracking_uri), experiment_id_of(stores, args.experiment))
        print(f"tracking goes to the server {redact_uri(stores.tracking_uri)}: open it there (nothing started)")
        print(f"open {url}")
        return 0
    host = args.host or LOOPBACK
    if not _is_loopback(host):
        print(f"warning: --host {host} makes the MLflow UI (runs, artifacts, no login) reachable from other "
              "machines", file=sys.stderr)
    ensure_local_dirs(stores)
    command = build_command(stores.tracking_uri, stores.registry_uri, stores.artifact_root.as_uri(), host,
                            args.port, args.workers)
    url_host = LOOPBACK if host in ("0.0.0.0", "::") else host
    experiment_id = experiment_id_of(stores, args.experiment)
    print(f"MLflow UI for {redact_uri(stores.tracking_uri)} (artifacts {stores.artifact_root})")
    if experiment_id is None:
        print(f"experiment {args.experiment!r} has no runs yet; the URL opens the experiment list")
    print(f"open {runs_url(f'http://{url_host}:{args.port}', experiment_id)}")
    if args.dry_run:
        print(" ".join(command))
        return 0
    sys.stdout.flush()
    # Become the MLflow server: Ctrl-C and kill reach it directly and nothing is left orphaned.
    os.execv(sys.executable, command)
    return 0  # not reached
