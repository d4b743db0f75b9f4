"""The ``smartify`` command line: one entry point, one subcommand per module in ``tracking.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` where ``run(args) -> int`` returns the exit code. Bad input raises
:class:`recon.errors.InputError` (or ``FileNotFoundError``) and is reported as one line with exit
code 2; nothing here falls back silently.

Signals: SIGTERM (``timeout``, SLURM preemption, Kubernetes) is translated into :class:`Terminated`, a
``KeyboardInterrupt``, so that it takes the Ctrl-C path everywhere: the step in progress is abandoned,
checkpoints stay as they were (they are written atomically), the stage's MLflow run ends KILLED, and the
command prints one line and exits 143 (130 for Ctrl-C). A second SIGTERM during that cleanup is ignored;
one whose exception Python swallowed (raised inside a ``__del__``) is sent again.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator, Sequence

from recon.errors import InputError

# Order is the order of ``smartify --help``.
COMMAND_MODULES = (
    "synth",
    "evaluate",
    "train",
    "pipeline",
    "tune",
    "models",
    "promote",
    "reconstruct",
    "ui",
    "tracking",
    "submit",
)

EPILOG = """examples:
  smartify demo
  smartify synth /tmp/data --preset tiny
  smartify evaluate --leaderboard /tmp/data/leaderboard --baselines
  smartify train experiments/tiny/hacker_baseline.yaml --set data.root=/tmp/data
  smartify tune experiments/tiny/tune.yaml --set data.root=/tmp/data
  smartify submit --data /tmp/data/leaderboard --out /tmp/submission
  smartify ui
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the handler that :func:`sigterm_as_exception` installs.

    A command may add ``output_dir`` (a stage's folder: the message names its checkpoints and ``--resume``)
    or ``detail`` (one more clause for the message) while the exception propagates.
    """

    signal_name = "SIGTERM"


_terminating = threading.Event()  # set from the first SIGTERM until its exception is under way


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if _terminating.is_set():
        return  # a second SIGTERM must not cut the cleanup of the first short
    _terminating.set()
    raise Terminated()


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that sends SIGTERM again when its exception was swallowed.

    The handler runs between any two bytecodes of the main thread, also inside a ``__del__`` or a weakref
    callback, where Python prints the exception and drops it: then the signal is sent again, once the
    current callback is over.
    """

    def run(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Terminated):
            hook(unraisable)
            return
        _terminating.clear()
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()

    return run


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only); the previous handler comes back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, hook = signal.signal(signal.SIGTERM, _on_sigterm), sys.unraisablehook
    sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook
        _terminating.clear()


def terminated_message(command: str, exc: Terminated) -> str:
    """The one line printed for a command ended by SIGTERM."""
    parts = [f"smartify {command}: terminated ({exc.signal_name})"]
    out = getattr(exc, "output_dir", None)
    if out is not None:
        last = Path(out) / "checkpoints" / "last.pt"
        if last.is_file():
            parts.append(f"checkpoints in {last.parent}")
            if command == "train":
                parts.append(f"resume with --resume {out}")
        else:
            parts.append(f"no checkpoint written yet in {last.parent}")
    if getattr(exc, "detail", None):
        parts.append(str(exc.detail))
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="smartify",
        description="Experiment tracking around PromptMR+ for the SNU FastMRI Challenge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"tracking.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # before torch loads: transparent huge pages for large CPU tensors (a brain training step on the
    # CPU spent ~28 s in page faults with glibc's default; ~1/3 faster with THP); set 0 to disable
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        with sigterm_as_exception():
            return int(args.func(args) or 0)
    except (InputError, FileNotFoundError, FileExistsError) as exc:
        print(f"smartify {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(terminated_message(args.command, exc), file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"smartify {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
