"""What a run records about where it ran: who started it, the command, the git state and the software versions.

Every stage run, pipeline run and study run carries these tags, so a result can be traced to the code
and the libraries that produced it. :func:`source_tags` fills MLflow's standard fields (the UI's "User"/
"Created by" and "Source" columns); :class:`tracking.runs.writer.TrackingWriter` adds them to every run it
creates.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys

from recon import __version__ as smartify_version
from recon.errors import InputError
from tracking.runs.stores import repo_root

log = logging.getLogger(__name__)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> tuple[str, str]:
    """``(commit, dirty)`` of the smartify checkout (``unknown`` outside a git checkout)."""
    try:
        root = repo_root()
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=20, check=True).stdout
    except (InputError, OSError, subprocess.SubprocessError) as exc:
        log.debug("git state unknown: %s", exc)
        return "unknown", "unknown"
    return commit, "true" if status.strip() else "false"


def run_user() -> str:
    """Who starts the run: ``$MLFLOW_TRACKING_USERNAME`` if set (the server login), else the login name."""
    name = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user database entry (some containers)
        return "unknown"


def source_name(argv: list[str] | None = None) -> str:
    """The command that created the run, as MLflow's "Source" column shows it (no ``/``: the UI keeps the last part).

    Args:
        argv: the command line (default ``sys.argv``).

    Returns:
        ``smartify <command>`` for the smartify CLI (``smartify`` script or ``python -m tracking.cli``),
        else the program's file name (``pytest``...).
    """
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0]) if argv and argv[0] else "python"
    if program in ("smartify", "cli.py"):
        words = [a for a in argv[1:2] if not a.startswith("-")]
        return " ".join(["smartify", *words])
    return program


def source_tags() -> dict[str, str]:
    """MLflow's standard fields of a run: ``mlflow.user``, ``mlflow.source.name`` and ``mlflow.source.type``."""
    return {"mlflow.user": run_user(), "mlflow.source.name": source_name(), "mlflow.source.type": "LOCAL"}


def environment_tags() -> dict[str, str]:
    """The standard source fields (:func:`source_tags`), git commit and dirty flag, package and Python versions."""
    commit, dirty = git_state()
    tags = {**source_tags(), "git.commit": commit, "git.dirty": dirty, "version.python": platform.python_version(),
            "version.smartify": smartify_version}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    for package in ("mlflow", "optuna", "numpy", "h5py"):
        tags[f"version.{package}"] = _version(package)
    import torch  # the build tag (+cu130, +cpu) and the CUDA/cuDNN versions are only known at runtime

    tags["version.torch"] = torch.__version__
    tags["version.cuda"] = str(torch.version.cuda)
    tags["version.cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "None"
    return tags
