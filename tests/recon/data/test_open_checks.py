"""Open-time refusals of bad training data (issue 13 items 7, 8, 9) on real synthetic HDF5 files.

Each defect is applied to a copy of the tiny data set and must be refused when the dataset is
built as the trainer builds it (``SliceDataset(pairs, num_adj_slices=A, load_target=True)``),
with one line naming the file and what was expected; a few go through a real ``smartify train``
subprocess (exit code 2, one error line on stderr, no traceback).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from recon.data.dataset import SliceDataset
from recon.data.layout import discover_split
from recon.errors import InputError

REPO = Path(__file__).resolve().parents[3]
FIRST = "brain_acc4_1.h5"  # the first training volume in the evaluator's order (it sets the crop)
OTHER = "knee_acc8_1.h5"


def _copy_data(tiny_data: Path, dst: Path) -> Path:
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split, dst / split)
    return dst


def _resize_images(path: Path, size: int = 320) -> None:
    """Every image array of the file becomes ``(S, size, size)`` (values kept in range)."""
    with h5py.File(path, "a") as f:
        for key in ("image_label", "image_input", "image_grappa"):
            if key in f:
                old = f[key][()]
                del f[key]
                f[key] = np.resize(old, (old.shape[0], size, size)).astype(np.float32)


def _set_mask(path: Path, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    with h5py.File(path, "a") as f:
        mask = edit(f["mask"][()].copy())
        del f["mask"]
        f["mask"] = mask


def _no_acs(mask: np.ndarray) -> np.ndarray:
    mask[mask.shape[0] // 2 - 1] = 0.0  # the run around W // 2 is broken: detected ACS width 0
    return mask


def _drop_max(path: Path) -> None:
    with h5py.File(path, "a") as f:
        del f.attrs["max"]


# (id, what to change in the copied data set, the file named, parts of the message; ROOT: the copy)
CASES = [
    ("size-other-file", lambda root: _resize_images(root / "train/image" / OTHER), f"image/{OTHER}",
     ("'image_label'", "320 x 320", "expected 64 x 64", f"the crop of the first volume, ROOT/train/image/{FIRST}")),
    ("size-every-file", lambda root: [_resize_images(p) for p in (root / "train/image").glob("*.h5")],
     f"image/{FIRST}", ("'image_label'", "320 x 320", f"kspace/{FIRST} 'kspace' is 64 x 64", "taller")),
    ("mask-all-zero", lambda root: _set_mask(root / "train/kspace" / OTHER, np.zeros_like), f"kspace/{OTHER}",
     ("'mask'", "all zeros", "ACS")),
    ("mask-without-acs", lambda root: _set_mask(root / "train/kspace" / OTHER, _no_acs), f"kspace/{OTHER}",
     ("'mask'", "no ACS block", "detected width 0", "column 32")),
    ("no-max", lambda root: _drop_max(root / "train/image" / OTHER), f"image/{OTHER}",
     ("attribute 'max' not found; it is the SSIM data range",)),
]


def _parts(root: Path, parts: tuple[str, ...]) -> list[str]:
    return [part.replace("ROOT", str(root)) for part in parts]


@pytest.mark.parametrize(("edit", "named", "parts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_training_data_is_refused_at_open(tiny_data: Path, tmp_path: Path, edit: Callable[[Path], object],
                                              named: str, parts: tuple[str, ...]) -> None:
    root = _copy_data(tiny_data, tmp_path / "data")
    edit(root)
    pairs = discover_split(root, "train")
    with pytest.raises(InputError) as info:
        SliceDataset(pairs, num_adj_slices=1, load_target=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{root / 'train' / named}: "), message
    for part in _parts(root, parts):
        assert part in message, (part, message)


def test_the_unchanged_copy_opens(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy_data(tiny_data, tmp_path / "data")
    ds = SliceDataset(discover_split(root, "train"), num_adj_slices=1, load_target=True)
    assert ds.crop == (64, 64) and len(ds) > 0


def test_a_given_crop_is_the_stage_crop(tiny_data: Path) -> None:
    pairs = discover_split(tiny_data, "val")
    assert SliceDataset(pairs, crop=(64, 64)).crop == (64, 64)
    with pytest.raises(InputError) as info:
        SliceDataset(pairs, crop=(48, 48))
    message = str(info.value)
    assert "\n" not in message and str(pairs[0].image) in message
    assert "'image_label' has size 64 x 64, expected 48 x 48 (the stage's crop)" in message
    with pytest.raises(ValueError, match="crop must be two positive sizes"):
        SliceDataset(pairs, crop=(0, 64))


def test_what_is_required_depends_on_the_use(tiny_data: Path, tmp_path: Path) -> None:
    """Without targets (reconstruction) the max is not needed; ACS only when the model uses it."""
    root = _copy_data(tiny_data, tmp_path / "data")
    _drop_max(root / "train/image" / OTHER)
    _set_mask(root / "train/kspace" / FIRST, _no_acs)
    pairs = discover_split(root, "train")
    with pytest.raises(InputError, match="no ACS block"):
        SliceDataset(pairs, load_target=False)
    ds = SliceDataset(pairs, load_target=False, require_acs=False)
    sample = next(ds[i] for i in range(len(ds)) if ds.pairs[ds.index[i][0]].name == OTHER)
    assert np.isnan(sample.max_value) and sample.target is None
    ds.close()
    with pytest.raises(InputError, match="attribute 'max' not found"):
        SliceDataset(pairs, load_target=False, require_acs=False, require_max=True)
    # an all-zero mask is refused whatever the use
    _set_mask(root / "train/kspace" / OTHER, np.zeros_like)
    with pytest.raises(InputError, match="all zeros"):
        SliceDataset(discover_split(root, "train"), load_target=False, require_acs=False)


@pytest.mark.parametrize(("edit", "named", "parts"), [CASES[i][1:] for i in (0, 2, 4)],
                         ids=[CASES[i][0] for i in (0, 2, 4)])
def test_smartify_train_refuses_with_one_line(tiny_data: Path, tmp_path: Path, edit: Callable[[Path], object],
                                              named: str, parts: tuple[str, ...]) -> None:
    root = _copy_data(tiny_data, tmp_path / "data")
    edit(root)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tracking.cli", "train", "experiments/tiny/hacker_baseline.yaml", "--no-tracking",
           "--set", f"data.root={root}", "--set", f"output.dir={out}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    # INFO log records (the seeding line) go to stderr too; everything else is the one error line
    lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"smartify train: error: {root / 'train' / named}: ")
    for part in _parts(root, parts):
        assert part in lines[0], (part, lines[0])
    assert not (out / "checkpoints").exists()
