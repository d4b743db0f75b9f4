"""recon.io: atomic writes leave the old file or the new one, never a temp file; HDF5 open/list."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from recon.errors import InputError
from recon.io import atomic_path, list_h5, open_h5, write_text_atomic


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
