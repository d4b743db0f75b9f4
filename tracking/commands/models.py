"""``smartify models``: the model registry (``list`` its versions, ``register`` a stage checkpoint).

Exit code 2 for bad input, and when the tracking server cannot be reached (one line naming its URL).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EPILOG = """examples:
  smartify models list
  smartify models list --name smartify-hacker --json
  smartify models register runs/hacker_moe
  smartify models register runs/helper_baseline/checkpoints/best.pt --name smartify-helper
  smartify models serve smartify-hacker@champion --port 5001
  smartify models upgrade smartify-hacker 3
"""

_COLUMNS = ("NAME", "VERSION", "ALIASES", "METRIC", "SCORE", "STAGE", "EPOCH", "KIND", "DATA", "RUN", "CREATED")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` parser and its sub-commands."""
    parser = subparsers.add_parser(
        "models", help="list and register versions in the MLflow Model Registry", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Versions of smartify-hacker, smartify-helper and smartify-classifier: scores, aliases, lineage.",
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    p_list = sub.add_parser("list", help="a table of versions, aliases, scores, stage and run")
    p_list.add_argument("--name", help="one registered model (default: all)")
    p_list.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    p_list.set_defaults(func=run_list)
    p_reg = sub.add_parser("register", help="register a stage checkpoint as a new version")
    p_reg.add_argument("checkpoint", type=Path, help="a .pt file or a stage folder (its checkpoints/best.pt)")
    p_reg.add_argument("--name", help="registered model name: letters, digits, . _ - (default: from the "
                       "checkpoint's family)")
    p_reg.add_argument("--which", choices=("best", "last"), default="best",
                       help="checkpoint of a folder (default: best)")
    p_reg.add_argument("--data-fingerprint", metavar="DIGEST",
                       help="digest of the validation data (default: the stage run's data.fingerprint param)")
    p_reg.add_argument("--experiment", default="smartify",
                       help="experiment of the registration run when the checkpoint has none (default: smartify)")
    p_reg.set_defaults(func=run_register)
    p_serve = sub.add_parser("serve", help="serve a version over HTTP on 127.0.0.1 (mlflow models serve)")
    p_serve.add_argument("model", metavar="NAME@ALIAS", help="e.g. smartify-hacker@champion, or NAME/VERSION")
    p_serve.add_argument("--port", type=int, default=5001, help="port on 127.0.0.1 (default: 5001)")
    p_serve.set_defaults(func=run_serve)
    p_up = sub.add_parser("upgrade", help="add the MLflow model (MLmodel, pyfunc) to a version registered before it")
    p_up.add_argument("name", help="registered model name")
    p_up.add_argument("version", help="version number")
    p_up.set_defaults(func=run_upgrade)


def _row(info) -> tuple[str, ...]:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_ms / 1000)) if info.created_ms else "-"
    return (
        info.name, str(info.version), ",".join(info.aliases) or "-", info.val_metric,
        f"{info.val_score:.4f}" if info.val_score is not None else "-", info.stage or "-",
        str(info.epoch) if info.epoch is not None else "-", info.kind or "-", info.data_fingerprint[:12],
        (info.run_id or "-")[:12], created,
    )


def format_table(infos) -> str:
    """The versions as an aligned text table."""
    rows = [_COLUMNS] + [_row(i) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def run_list(args: argparse.Namespace) -> int:
    """``smartify models list``."""
    from tracking.registry.versions import list_versions

    infos = list_versions(args.name)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
    elif not infos:
        print(f"no registered versions{f' of {args.name}' if args.name else ''}")
    else:
        print(format_table(infos))
    return 0


def run_register(args: argparse.Namespace) -> int:
    """``smartify models register``."""
    from tracking.registry.versions import register_stage

    info = register_stage(args.checkpoint, name=args.name, which=args.which,
                          data_fingerprint=args.data_fingerprint, experiment=args.experiment)
    print(f"{info.uri}: {info}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``smartify models serve``: ``mlflow models serve --env-manager local`` bound to 127.0.0.1."""
    import os
    import subprocess
    import sys

    from recon.errors import InputError
    from tracking.registry.versions import get_version_info
    from tracking.runs.stores import resolve_stores

    if "@" not in args.model and "/" not in args.model:
        raise InputError(f"model {args.model!r}: expected NAME@ALIAS or NAME/VERSION")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    stores = resolve_stores()
    uri = f"models:/{args.model}"
    info = get_version_info(uri, stores=stores)  # refuses an unknown name, alias or version
    # mlflow runs `uvicorn` from PATH: this interpreter's scripts folder first
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": stores.tracking_uri, "MLFLOW_REGISTRY_URI": stores.registry_uri,
           "PATH": path}
    print(f"serving {info} on http://127.0.0.1:{args.port}/invocations (Ctrl-C stops)", flush=True)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(args.port)]
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


def run_upgrade(args: argparse.Namespace) -> int:
    """``smartify models upgrade``."""
    from tracking.registry.pyfunc import upgrade_version
    from tracking.registry.versions import get_version_info
    from tracking.runs.stores import resolve_stores

    stores = resolve_stores()
    print(upgrade_version(get_version_info(args.name, version=args.version, stores=stores), stores))
    return 0
