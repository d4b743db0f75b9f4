"""recon.io: atomic writes leave the old file or the new one, never a temp file; HDF5 open/list.

A full file system (issue 13 item 5) is tested for real on a 1 MiB tmpfs when the tests run as
root (skipped with the reason otherwise), through ``save_checkpoint``, a plain write, h5py, and a
``smartify train`` subprocess whose ``output.dir`` is on the tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch

import recon.io
from recon.engine.checkpoint import save_checkpoint
from recon.errors import InputError, StorageError
from recon.io import atomic_path, is_no_space, list_h5, open_h5, write_text_atomic
from tests.mounts import tmpfs

REPO = Path(__file__).resolve().parents[2]
TORCH_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def test_write_text_atomic_creates_folders_and_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "config.yaml"
    assert write_text_atomic(dest, "one\n") == dest
    write_text_atomic(dest, "two: é\n")
    assert dest.read_text(encoding="utf-8") == "two: é\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["config.yaml"]


def test_atomic_path_failure_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "best.pt"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and not tmp.exists() and tmp.name.endswith(".tmp")
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_atomic_path_with_an_hdf5_writer(tmp_path: Path) -> None:
    dest = tmp_path / "acc4" / "brain_test1.h5"
    with atomic_path(dest) as tmp:
        with h5py.File(tmp, "w-") as f:  # the temp name is free, so an exclusive create works
            f.create_dataset("reconstruction", data=np.ones((1, 2, 2), np.float32))
        assert list_h5(dest.parent) == []  # the temp file is not an .h5 listing entry
    with open_h5(dest) as f:
        assert f["reconstruction"].shape == (1, 2, 2)
    assert list_h5(dest.parent) == [dest]


def test_list_h5_sorted_files_only(tmp_path: Path) -> None:
    for name in ("b.h5", "a.h5", "c.txt", ".b.h5.123.ab.tmp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.h5").mkdir()
    assert [p.name for p in list_h5(tmp_path)] == ["a.h5", "b.h5"]
    assert list_h5(tmp_path / "missing") == []


def test_open_h5_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing\.h5: file not found"):
        open_h5(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(InputError, match=r"bad\.h5: not a readable HDF5 file \(") as info:
        open_h5(bad)
    assert "\n" not in str(info.value)


# --- full file system (issue 13 item 5) --------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chained_enospc() -> BaseException:
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "free", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 10**9, True),
        (_chained_enospc(), 10**9, True),
        (OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"),
         10**9, True),
        (RuntimeError(TORCH_FAILURE), 0, True),
        (RuntimeError(TORCH_FAILURE), 10**9, False),  # torch failed, but not for want of space
        (RuntimeError("disk full"), 0, False),  # not a writer failure
        (OSError(errno.EACCES, "Permission denied"), 0, False),
    ],
    ids=["enospc", "enospc-in-chain", "h5py-text", "torch-full", "torch-not-full", "other", "eacces"],
)
def test_is_no_space(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: BaseException, free: int,
                     expected: bool) -> None:
    monkeypatch.setattr(recon.io, "_free_bytes", lambda folder: free)
    assert is_no_space(exc, tmp_path) is expected


def test_atomic_path_enospc_is_one_storage_error(tmp_path: Path) -> None:
    dest = tmp_path / "best.pt"
    dest.write_text("old")
    with pytest.raises(StorageError) as info:
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{dest}: ") and "no space left on device" in message
    assert isinstance(info.value, InputError) and info.value.path == str(dest)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, no chained traceback
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def _write_torch(tmp: Path) -> None:
    torch.save({"weights": torch.zeros(1 << 19)}, tmp)  # 2 MiB, a checkpoint larger than the disk


def _write_plain(tmp: Path) -> None:
    with open(tmp, "wb") as fh:
        fh.write(b"\0" * (2 << 20))


def _write_h5(tmp: Path) -> None:
    with h5py.File(tmp, "w-") as f:
        f.create_dataset("reconstruction", data=np.ones((2, 512, 512), np.float32))


@pytest.mark.parametrize("writer", [_write_torch, _write_plain, _write_h5], ids=["torch", "plain", "h5py"])
def test_full_tmpfs_through_atomic_path(tmp_path: Path, writer: Callable[[Path], None]) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        dest = disk / "checkpoints" / "last.pt"
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"previous result")
        before = _sha256(dest)
        with pytest.raises(StorageError) as info:
            with atomic_path(dest) as tmp:
                writer(tmp)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{dest}: ") and "no space left on device" in message
        assert _sha256(dest) == before
        assert [p.name for p in dest.parent.iterdir()] == ["last.pt"]


def test_full_tmpfs_through_save_checkpoint(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        dest = disk / "checkpoints" / "best.pt"
        save_checkpoint(dest, {"kind": "baseline", "epoch": 0, "state_dict": {"w": torch.ones(16)}})
        before = _sha256(dest)
        with pytest.raises(StorageError) as info:
            save_checkpoint(dest, {"kind": "baseline", "epoch": 1, "state_dict": {"w": torch.ones(1 << 19)}})
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{dest}: ") and "no space left on device" in message
        assert "inline_container" not in message
        assert _sha256(dest) == before
        assert [p.name for p in dest.parent.iterdir()] == ["best.pt"]
        # the failed writer's file is closed: the deleted temp file's blocks are free again at once
        assert shutil.disk_usage(disk).free > 900_000


def test_train_into_a_full_output_dir_exits_2_with_one_line(tiny_data: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        out = disk / "run"
        cmd = [sys.executable, "-m", "tracking.cli", "train", "experiments/tiny/hacker_baseline.yaml", "--no-tracking",
               "--set", f"data.root={tiny_data}", "--set", f"output.dir={out}", "--set", "train.epochs=1"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"smartify train: error: {out / 'checkpoints'}")
        assert "no space left on device" in lines[0] and "Traceback" not in done.stderr
        leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []
