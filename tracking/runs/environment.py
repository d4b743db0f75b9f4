"""What a run records about where it ran: the git state of the checkout and the versions of its software.

Every stage run, pipeline run and study run carries these tags, so a result can be traced to the code
and the libraries that produced it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess

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


def environment_tags() -> dict[str, str]:
    """Git commit and dirty flag, package and Python versions."""
    commit, dirty = git_state()
    tags = {"git.commit": commit, "git.dirty": dirty, "version.python": platform.python_version(),
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
