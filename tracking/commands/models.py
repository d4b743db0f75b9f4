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
