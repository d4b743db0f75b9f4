"""The data layer: pairing by name, open-time validation, slice datasets, collate, fingerprint."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from recon.data.dataset import ImageSliceDataset, SliceDataset, collate_samples
from recon.data.layout import FilePair, data_fingerprint, discover_leaderboard, discover_pairs, validate_pair
from recon.data.names import parse_name
from recon.errors import InputError
from recon.fft import center_crop, ifft2c_np, rss
from recon.masks import equispaced_mask


def _copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_pair(folder: Path, name: str = "brain_acc4_1.h5", slices: int = 3, coils: int = 2, size: int = 16,
                image_slices: int | None = None, mask_width: int | None = None, kspace_rank: int = 4,
                drop_kspace_key: str | None = None, drop_image_key: str | None = None,
                nan_in: str | None = None, max_attr: float = 1.0) -> FilePair:
    """A small hand-made pair in ``folder/{kspace,image}`` with one defect chosen by the arguments."""
    (folder / "kspace").mkdir(parents=True, exist_ok=True)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (slices, coils, size, size)[4 - kspace_rank:]
    kspace = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    if nan_in == "kspace":
        kspace[-1, 0, 0, 0] = np.nan
    label = rng.random((image_slices or slices, 8, 8)).astype(np.float32)
    if nan_in == "image_label":
        label[1, 2, 2] = np.inf
    with h5py.File(folder / "kspace" / name, "w") as f:
        if drop_kspace_key != "kspace":
            f["kspace"] = kspace
        if drop_kspace_key != "mask":
            f["mask"] = equispaced_mask(mask_width or size, 4, 0, n_acs=4)  # an ACS block even at W = 16
    with h5py.File(folder / "image" / name, "w") as f:
        if drop_image_key != "image_label":
            f["image_label"] = label
        f["image_input"] = label
        f.attrs["max"] = max_attr
    return FilePair(folder / "kspace" / name, folder / "image" / name, parse_name(name), 4, "brain")


def _one_line_error(exc: pytest.ExceptionInfo[InputError], *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


# --- discovery and pairing -------------------------------------------------------------------------


def test_discover_pairs_order_and_parsed_fields(tiny_data: Path) -> None:
    pairs = discover_pairs(tiny_data / "train")
    assert [p.name for p in pairs] == [
        "brain_acc4_1.h5", "brain_acc4_2.h5", "brain_acc8_1.h5", "brain_acc8_2.h5",
        "knee_acc4_1.h5", "knee_acc4_2.h5", "knee_acc8_1.h5", "knee_acc8_2.h5",
    ]
    for p in pairs:
        assert p.image is not None and p.image.name == p.kspace.name == p.name
        assert p.anatomy == p.name.split("_")[0] and p.acc == int(p.name.split("_")[1][3:])
    board = discover_leaderboard(tiny_data / "leaderboard")
    assert list(board) == ["acc4", "acc8"]
    assert [p.name for p in board["acc8"]] == ["brain_test1.h5", "brain_test2.h5", "knee_test1.h5", "knee_test2.h5"]
    assert {p.acc for p in board["acc4"]} == {4} and {p.acc for p in board["acc8"]} == {8}


def test_numeric_order_not_lexicographic(tmp_path: Path) -> None:
    for name in ("knee_test2.h5", "brain_test10.h5", "brain_test2.h5"):
        _write_pair(tmp_path / "acc8", name)
    assert [p.name for p in discover_pairs(tmp_path / "acc8")] == ["brain_test2.h5", "brain_test10.h5", "knee_test2.h5"]


def test_acc_from_mask_when_name_and_folder_do_not_tell(tiny_data: Path, tmp_path: Path) -> None:
    src = tiny_data / "leaderboard" / "acc8"
    dst = _copy_split(src, tmp_path / "board")
    pairs = discover_pairs(dst)
    assert {p.acc for p in pairs} == {8}


def test_pairing_is_by_name_not_position(tiny_data: Path, tmp_path: Path) -> None:
    """With one image file missing, a position-based pairing would shift every later pair by one."""
    split = _copy_split(tiny_data / "train", tmp_path / "train")
    (split / "image" / "brain_acc4_1.h5").unlink()
    with pytest.raises(InputError) as exc:
        discover_pairs(split)
    _one_line_error(exc, "brain_acc4_1.h5", "unpaired")
    pairs = discover_pairs(split, require_image=False)
    assert pairs[0].name == "brain_acc4_1.h5" and pairs[0].image is None
    ds = SliceDataset(pairs)
    seen = set()
    for i in range(len(ds)):
        sample = ds[i]
        if sample.fname == "brain_acc4_1.h5":
            assert sample.target is None and math.isnan(sample.max_value)
            continue
        # the target really belongs to this k-space
        expected = center_crop(rss(ifft2c_np(sample.kspace[0].numpy())), 64, 64)
        np.testing.assert_allclose(sample.target.numpy(), expected, rtol=1e-4, atol=1e-9)
        seen.add(sample.fname)
    assert len(seen) == 7
    ds.close()


def test_unpaired_image_file(tiny_data: Path, tmp_path: Path) -> None:
    split = _copy_split(tiny_data / "val", tmp_path / "val")
    (split / "kspace" / "knee_acc8_3.h5").unlink()
    for require in (True, False):
        with pytest.raises(InputError) as exc:
            discover_pairs(split, require_image=require)
        _one_line_error(exc, str(split / "image" / "knee_acc8_3.h5"), "unpaired", "kspace/knee_acc8_3.h5")


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "split" / "kspace").mkdir(parents=True)
    (tmp_path / "split" / "image").mkdir()
    with pytest.raises(InputError) as exc:
        discover_pairs(tmp_path / "split")
    _one_line_error(exc, "kspace", "empty folder")
    with pytest.raises(InputError) as exc:
        discover_pairs(tmp_path / "nowhere")
    _one_line_error(exc, "nowhere", "kspace")
    with pytest.raises(InputError) as exc:
        discover_leaderboard(tmp_path)
    _one_line_error(exc, str(tmp_path), "acc4")


def test_unknown_file_name(tmp_path: Path) -> None:
    pair = _write_pair(tmp_path, "brain_acc4_1.h5")
    shutil.copy(pair.kspace, tmp_path / "kspace" / "scan_01.h5")
    with pytest.raises(InputError) as exc:
        discover_pairs(tmp_path)
    _one_line_error(exc, "scan_01.h5", "file name")


# --- open-time validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "file", "parts"),
    [
        ({"drop_kspace_key": "kspace"}, "kspace", ("'kspace'", "missing")),
        ({"drop_kspace_key": "mask"}, "kspace", ("'mask'", "missing")),
        ({"drop_image_key": "image_label"}, "image", ("'image_label'", "missing")),
        ({"kspace_rank": 3}, "kspace", ("'kspace'", "rank 3", "expected rank 4")),
        ({"mask_width": 20}, "kspace", ("'mask'", "width 20", "16")),
        ({"image_slices": 2}, "image", ("'image_label'", "2 slices", "3")),
        ({"nan_in": "kspace"}, "kspace", ("'kspace'", "non-finite", "slice 2")),
        ({"nan_in": "image_label"}, "image", ("'image_label'", "non-finite", "slice 1")),
        ({"max_attr": float("nan")}, "image", ("attrs['max'] = nan", "expected a finite value > 0")),
        ({"max_attr": 0.0}, "image", ("attrs['max'] = 0.0", "expected a finite value > 0")),
    ],
)
def test_validate_pair_names_file_and_key(tmp_path: Path, kwargs: dict, file: str, parts: tuple[str, ...]) -> None:
    pair = _write_pair(tmp_path, **kwargs)
    with pytest.raises(InputError) as exc:
        validate_pair(pair)
    _one_line_error(exc, str(tmp_path / file / "brain_acc4_1.h5"), *parts)


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    pair = _write_pair(tmp_path)
    pair.kspace.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError) as exc:
        validate_pair(pair)
    _one_line_error(exc, str(pair.kspace), "HDF5")


def test_dataset_validates_at_open_and_checks_values_when_read(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        SliceDataset([_write_pair(tmp_path / "a", mask_width=12)])
    _one_line_error(exc, "'mask'", "width 12")
    # non-finite data is found when the slice is read (opening only reads metadata)
    ds = SliceDataset([_write_pair(tmp_path / "b", nan_in="kspace")])
    ds[0]
    with pytest.raises(InputError) as exc:
        ds[2]
    _one_line_error(exc, str(tmp_path / "b" / "kspace" / "brain_acc4_1.h5"), "'kspace'", "slice 2")
    ds.close()


# --- SliceDataset -----------------------------------------------------------------------------------


def test_slice_dataset_samples(tiny_data: Path) -> None:
    pairs = discover_pairs(tiny_data / "train")
    ds = SliceDataset(pairs, load_grappa=True)
    n_total = 0
    for p in pairs:
        with h5py.File(p.kspace) as f:
            n_total += f["kspace"].shape[0]
    assert len(ds) == len(ds.index) == n_total
    sample = ds[len(ds) - 1]
    assert sample.fname == "knee_acc8_2.h5" and sample.anatomy == "knee" and sample.acc == 8
    assert sample.slice_idx == sample.num_slices - 1
    assert sample.kspace.dtype == torch.complex64 and tuple(sample.kspace.shape) == (1, 8, 64, 64)
    assert sample.mask.dtype == torch.float32 and tuple(sample.mask.shape) == (64,)
    assert sample.target.dtype == torch.float32 and tuple(sample.target.shape) == (64, 64)
    assert sample.grappa is not None and tuple(sample.grappa.shape) == (64, 64)
    with h5py.File(pairs[-1].image) as f:
        assert sample.max_value == float(f.attrs["max"])
        assert np.array_equal(sample.target.numpy(), f["image_label"][sample.slice_idx])
    with h5py.File(pairs[-1].kspace) as f:
        assert np.array_equal(sample.kspace[0].numpy(), f["kspace"][sample.slice_idx])
        assert np.array_equal(sample.mask.numpy(), f["mask"][()])
    ds.close()


@pytest.mark.parametrize("num_adj", [3, 5])
def test_adjacent_slices_clamped_at_edges(tiny_data: Path, num_adj: int) -> None:
    pair = discover_pairs(tiny_data / "train")[0]
    with h5py.File(pair.kspace) as f:
        volume = f["kspace"][()]
    n = volume.shape[0]
    ds = SliceDataset([pair], num_adj_slices=num_adj, load_target=False)
    half = num_adj // 2
    for s in range(n):
        sample = ds[s]
        assert sample.target is None and tuple(sample.kspace.shape) == (num_adj, 8, 64, 64)
        for a in range(num_adj):
            expected = volume[min(max(s + a - half, 0), n - 1)]
            assert np.array_equal(sample.kspace[a].numpy(), expected), (s, a)
    first = ds[0]
    assert np.array_equal(first.kspace[0], first.kspace[half])  # clamped to slice 0
    assert not np.array_equal(first.kspace[half], first.kspace[-1])
    with pytest.raises(ValueError, match="odd"):
        SliceDataset([pair], num_adj_slices=2)
    ds.close()


def test_slice_filter(tiny_data: Path) -> None:
    pairs = discover_pairs(tiny_data / "val")
    ds = SliceDataset(pairs, slice_filter=lambda pair, s: pair.anatomy == "knee" and s > 0)
    assert len(ds) > 0
    assert all(pairs[f].anatomy == "knee" and s > 0 for f, s in ds.index)
    assert {ds[i].anatomy for i in range(len(ds))} == {"knee"}


def test_dataloader_workers_and_collate(tiny_data: Path) -> None:
    ds = SliceDataset(discover_pairs(tiny_data / "val"), num_adj_slices=3)
    ds[0]  # open handles in the parent: workers must not reuse them
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_samples)
    seen = []
    for batch in loader:
        assert tuple(batch.kspace.shape) == (1, 3, 8, 64, 64) and batch.target.shape == (1, 64, 64)
        assert batch.max_value.dtype == torch.float64 and len(batch) == 1
        seen.append((batch.fname[0], int(batch.slice_idx[0])))
    expected = [(ds.pairs[f].name, s) for f, s in ds.index]
    assert seen == expected
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files._files == {} and clone[0].fname == ds[0].fname
    ds.close()


def test_collate_stacks_and_rejects_mixed_shapes(tiny_data: Path) -> None:
    ds = SliceDataset(discover_pairs(tiny_data / "train"))
    batch = collate_samples([ds[0], ds[1], ds[len(ds) - 1]])
    assert tuple(batch.kspace.shape) == (3, 1, 8, 64, 64) and tuple(batch.mask.shape) == (3, 64)
    assert batch.anatomy == ["brain", "brain", "knee"] and batch.acc.tolist() == [4, 4, 8]
    assert batch.grappa is None and batch.to("cpu").fname == batch.fname
    other = ds[0]
    other.target = other.target[:32]
    with pytest.raises(ValueError, match="target"):
        collate_samples([ds[0], other])
    other.target = None
    with pytest.raises(ValueError, match="None"):
        collate_samples([ds[0], other])


def test_image_slice_dataset(tiny_data: Path) -> None:
    pairs = discover_pairs(tiny_data / "train")
    ds = ImageSliceDataset(pairs)
    labels = [ds[i].label for i in range(len(ds))]
    assert set(labels) == {0, 1}
    item = ds[0]
    assert tuple(item.image.shape) == (1, 64, 64) and item.image.dtype == torch.float32 and item.label == 0
    batch = default_collate([ds[0], ds[len(ds) - 1]])
    assert tuple(batch.image.shape) == (2, 1, 64, 64) and batch.label.tolist() == [0, 1]
    with pytest.raises(InputError, match="image_nope"):
        ImageSliceDataset(pairs, key="image_nope")


# --- fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive(tiny_data: Path, tmp_path: Path) -> None:
    pairs = discover_pairs(tiny_data / "val")
    fp = data_fingerprint(pairs)
    assert fp["n_files"] == 4 and fp["n_slices"] == sum(len(SliceDataset([p]).index) for p in pairs)
    assert len(fp["digest"]) == 64 and fp == data_fingerprint(pairs)
    copy = _copy_split(tiny_data / "val", tmp_path / "val")
    assert data_fingerprint(discover_pairs(copy))["digest"] == fp["digest"]  # paths do not matter
    with h5py.File(copy / "image" / "brain_acc4_3.h5", "a") as f:
        f.attrs["max"] = 1.0
    assert data_fingerprint(discover_pairs(copy))["digest"] != fp["digest"]
