"""``smartify promote NAME VERSION``: move an alias (``champion``) to a version if it is no worse.

Exit codes: 0 promoted (or already the holder), 1 refused (one line names both scores or what
differs), 2 bad input (unknown model or version, ``--force`` without ``--reason``) or a tracking
server that cannot be reached (one line naming its URL, never "no version").
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  smartify promote smartify-hacker 3
  smartify promote smartify-helper 2 --alias challenger
  smartify promote smartify-hacker 2 --force --reason "roll back: version 3 fails on knee acc8"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``promote`` parser."""
    parser = subparsers.add_parser(
        "promote", help="move an alias to a version if its validation score is at least the holder's",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Move ALIAS of registered model NAME to VERSION only when its validation score is at least the "
            "current holder's, measured on the same validation data (fingerprint) and protocol. --force with "
            "--reason overrides. Every move is recorded as tags (who, when, previous holder, scores, reason)."
        ),
    )
    parser.add_argument("name", help="registered model, e.g. smartify-hacker")
    parser.add_argument("version", type=int, help="version number")
    parser.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="promote even if refused (needs --reason)")
    parser.add_argument("--reason", help="why; required with --force, recorded in any case")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (1 when refused)."""
    from recon.errors import InputError
    from tracking.registry.promotion import promote

    if args.force and not (args.reason or "").strip():
        raise InputError("--force needs --reason TEXT (the override is recorded)")
    result = promote(args.name, args.version, alias=args.alias, force=args.force, reason=args.reason)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.message, file=sys.stdout if result.promoted else sys.stderr)
    return 0 if result.promoted else 1
