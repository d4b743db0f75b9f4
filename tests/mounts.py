"""A real small file system for full-disk tests: a tmpfs mounted for the duration of a block (root only)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m", strict: bool = True) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``folder`` for the block; skip the test when that is impossible.

    Args:
        folder: the mount point (created).
        size: the file system's size (``mount -o size=``).
        strict: fail the test when the mount is still busy afterwards (a writer kept a deleted file open);
            the mount is removed either way.
    """
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, and mounting needs root (CI runs as root)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on {folder}: {(done.stderr or done.stdout).strip()}")
    busy = False
    try:
        yield folder
    finally:
        busy = subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0
        if busy:  # never leave a mount behind
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    assert not (strict and busy), f"{folder}: busy after the test (a failed writer kept its deleted temp file open)"
