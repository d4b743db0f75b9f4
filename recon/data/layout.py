"""The SNU folder layout: find k-space/image file pairs, validate them, fingerprint a data set.

A *split folder* holds ``kspace/`` and ``image/`` with files of the same names::

    train/{kspace,image}/{brain,knee}_acc{4,8}_N.h5
    leaderboard/acc4/{kspace,image}/{brain,knee}_testN.h5

Image and k-space files are paired **by name** (the baseline paired two sorted lists by position,
which silently mispairs when one file is missing). Every problem is an :class:`InputError` with
one line naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from recon.data.names import FileInfo, parse_name, sort_key
from recon.errors import InputError
from recon.io import list_h5, open_h5
from recon.masks import detect_acs_width, infer_acc

KSPACE_DIR = "kspace"
IMAGE_DIR = "image"
LEADERBOARD_ACCS = ("acc4", "acc8")
IMAGE_KEYS = ("image_label", "image_input", "image_grappa")
MAX_ATTR = "max"
# the smallest ACS block PromptMR+ can estimate coil sensitivities from (docs/promptmr.md P5)
MIN_ACS_WIDTH = 2
_ACC_DIR_RE = re.compile(r"^acc(\d+)$")


@dataclass(frozen=True)
class FilePair:
    """One volume: its k-space file and (optionally) its image file.

    Attributes:
        kspace: path of the k-space file (keys ``kspace``, ``mask``).
        image: path of the image file of the same name, or None when absent.
        info: what the file name says.
        acc: acceleration: from the name, else from an ``accN`` parent folder, else from the mask.
        anatomy: ``"brain"`` or ``"knee"``.
    """

    kspace: Path
    image: Path | None
    info: FileInfo
    acc: int
    anatomy: str

    @property
    def name(self) -> str:
        """The shared file name, e.g. ``brain_acc4_1.h5``."""
        return self.info.name


def _parse(path: Path) -> FileInfo:
    try:
        return parse_name(path)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _acc_for(path: Path, info: FileInfo) -> int:
    if info.acc is not None:
        return info.acc
    for parent in path.parents[:3]:
        match = _ACC_DIR_RE.match(parent.name)
        if match:
            return int(match.group(1))
    with open_h5(path) as f:
        if "mask" not in f:
            raise InputError(f"{path}: key 'mask' missing (needed to infer the acceleration)")
        return infer_acc(np.asarray(f["mask"][()]).reshape(-1))


def discover_pairs(folder: str | Path, require_image: bool = True) -> list[FilePair]:
    """List the volumes of a split folder, paired by file name.

    Args:
        folder: a folder holding ``kspace/`` and ``image/`` (a train/val split or a leaderboard
            ``accN`` folder).
        require_image: when True every k-space file needs an image file of the same name; when
            False a missing image file gives ``image=None`` (inference on k-space only).

    Returns:
        The pairs in the evaluator's order (brain before knee, then acceleration, then number).

    Raises:
        InputError: missing folder, empty folder, unknown file name, unpaired file.
    """
    folder = Path(folder)
    kdir, idir = folder / KSPACE_DIR, folder / IMAGE_DIR
    if not kdir.is_dir():
        raise InputError(f"{folder}: no '{KSPACE_DIR}/' folder (expected {KSPACE_DIR}/ and {IMAGE_DIR}/)")
    kfiles = {p.name: p for p in list_h5(kdir)}
    ifiles = {p.name: p for p in list_h5(idir)} if idir.is_dir() else {}
    if not kfiles:
        raise InputError(f"{kdir}: empty folder (no .h5 files)")
    if require_image and not idir.is_dir():
        raise InputError(f"{folder}: no '{IMAGE_DIR}/' folder")
    extra = sorted(set(ifiles) - set(kfiles))
    if extra:
        raise InputError(f"{ifiles[extra[0]]}: unpaired file (no {KSPACE_DIR}/{extra[0]})")
    pairs = []
    for name in sorted(kfiles, key=lambda n: sort_key(_parse(kfiles[n]).name)):
        path = kfiles[name]
        info = _parse(path)
        image = ifiles.get(name)
        if image is None and require_image:
            raise InputError(f"{path}: unpaired file (no {IMAGE_DIR}/{name})")
        pairs.append(FilePair(kspace=path, image=image, info=info, acc=_acc_for(path, info), anatomy=info.anatomy))
    return pairs


def discover_split(root: str | Path, split: str, hint: str = "") -> list[FilePair]:
    """The volumes of one training split folder ``root/split`` (image files required).

    Args:
        root: the data set root (``data.root``).
        split: the split folder's name, e.g. ``train`` or ``val``.
        hint: what to do about a missing folder, appended to its message after ``;``.

    Returns:
        The pairs, as :func:`discover_pairs` gives them.

    Raises:
        InputError: the folder is missing, or any problem :func:`discover_pairs` finds.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        more = f"; {hint}" if hint else ""
        raise InputError(f"{folder}: data split folder not found (data.root={root}, split {split!r}){more}")
    return discover_pairs(folder, require_image=True)


def discover_leaderboard(root: str | Path, require_image: bool | None = True) -> dict[str, list[FilePair]]:
    """The leaderboard folders ``root/acc4`` and ``root/acc8`` (those present, at least one).

    Args:
        root: the ``leaderboard`` folder.
        require_image: passed to :func:`discover_pairs`; None requires image files only in the
            ``accN`` folders that have an ``image/`` folder (inference on k-space alone).

    Returns:
        ``{"acc4": [...], "acc8": [...]}`` in that order.

    Raises:
        InputError: no ``accN`` folder, or any problem :func:`discover_pairs` finds.
    """
    root = Path(root)
    found = {}
    for acc in LEADERBOARD_ACCS:
        folder = root / acc
        if folder.is_dir():
            need = (folder / IMAGE_DIR).is_dir() if require_image is None else require_image
            found[acc] = discover_pairs(folder, need)
    if not found:
        raise InputError(f"{root}: no leaderboard folders (expected {' and '.join(LEADERBOARD_ACCS)})")
    return found


def _dataset(f: h5py.File, path: Path, key: str, rank: int, what: str) -> h5py.Dataset:
    if key not in f:
        raise InputError(f"{path}: key '{key}' missing (expected {what})")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{path}: key '{key}' is not a dataset (expected {what})")
    if ds.ndim != rank:
        raise InputError(f"{path}: key '{key}' has rank {ds.ndim} {ds.shape}, expected rank {rank} {what}")
    return ds


def _check_finite(ds: h5py.Dataset, path: Path, key: str) -> None:
    """Scan a dataset slice by slice for NaN/inf (bounded memory)."""
    for s in range(ds.shape[0]):
        if not np.all(np.isfinite(ds[s])):
            raise InputError(f"{path}: key '{key}' has non-finite values (slice {s})")


def image_crop(path: str | Path) -> tuple[int, int] | None:
    """The image size ``(h, w)`` of an image file: that of its first image key (in :data:`IMAGE_KEYS` order).

    Args:
        path: the image file.

    Returns:
        The last two axes of the first key present with rank >= 2, or None when there is none.

    Raises:
        InputError: the file cannot be opened.
    """
    with open_h5(path) as f:
        for key in IMAGE_KEYS:
            ds = f.get(key)
            if isinstance(ds, h5py.Dataset) and ds.ndim >= 2:
                return int(ds.shape[-2]), int(ds.shape[-1])
    return None


def _size(shape: Sequence[int]) -> str:
    return " x ".join(str(int(n)) for n in shape)


def _check_mask(mask: np.ndarray, path: Path, require_acs: bool) -> None:
    if not np.any(mask):
        raise InputError(f"{path}: key 'mask' is all zeros (no k-space column sampled); expected a column mask "
                         "with a centred block of sampled (ACS) columns")
    acs = detect_acs_width(mask)
    if require_acs and acs < MIN_ACS_WIDTH:
        centre = mask.shape[0] // 2
        raise InputError(
            f"{path}: key 'mask' has no ACS block (detected width {acs}: columns {centre - 1} and {centre} must both "
            f"be sampled); expected a centred block of at least {MIN_ACS_WIDTH} sampled columns around column {centre}"
        )


def _check_max(f: h5py.File, path: Path, required: bool) -> None:
    """``attrs['max']`` (the SSIM data range): finite and > 0 when present; present when ``required``."""
    if MAX_ATTR not in f.attrs:
        if required:
            raise InputError(f"{path}: attribute {MAX_ATTR!r} not found; it is the SSIM data range")
        return
    values = np.asarray(f.attrs[MAX_ATTR]).reshape(-1)
    try:
        maximum = float(values[0]) if values.size else math.nan
    except (TypeError, ValueError):
        maximum = math.nan
    if not (math.isfinite(maximum) and maximum > 0):
        raise InputError(f"{path}: attrs[{MAX_ATTR!r}] = {maximum}; expected a finite value > 0")


def validate_pair(
    pair: FilePair,
    image_keys: Sequence[str] = ("image_label",),
    scan_values: bool = True,
    crop: tuple[int, int] | None = None,
    crop_source: str = "the expected crop",
    require_acs: bool = False,
    require_max: bool = False,
) -> int:
    """The open-time checks of one volume.

    Checks: ``kspace`` is complex rank 4 ``(S, C, H, W)``; ``mask`` is rank 1 with width W,
    finite 0/1 values and at least one sampled column (and, with ``require_acs``, a centred ACS
    block as :func:`recon.masks.detect_acs_width` finds it); the image keys present are rank 3
    with S slices, all of one size ``(h, w)`` (``crop`` when given) and no taller than the
    k-space image (a crop of a ``H x W`` image has ``h <= H``; only the width may be zero-padded,
    docs/challenge.md 1.4); ``image_keys`` exist; ``attrs['max']``, when present, is finite and
    > 0 (and, with ``require_max``, present); and (``scan_values``) no NaN/inf in the data.

    Args:
        pair: the volume.
        image_keys: keys the image file must hold (ignored when ``pair.image`` is None).
        scan_values: read the data to look for non-finite values (costs one pass over the file).
        crop: the image size ``(h, w)`` every image key must have; None: the first key's size.
        crop_source: where ``crop`` comes from, for the message (e.g. ``the crop of <file>``).
        require_acs: refuse a mask without a centred ACS block (the model estimates coil
            sensitivities from it).
        require_max: refuse an image file without ``attrs['max']`` (training and validation use
            it as the SSIM data range).

    Returns:
        The number of slices S.

    Raises:
        InputError: one line naming the file and key (and both shapes for a size mismatch).
    """
    path = pair.kspace
    with open_h5(path) as f:
        kspace = _dataset(f, path, "kspace", 4, "(S, C, H, W) complex")
        if not np.issubdtype(kspace.dtype, np.complexfloating):
            raise InputError(f"{path}: key 'kspace' has dtype {kspace.dtype}, expected complex")
        n_slices, width = kspace.shape[0], kspace.shape[-1]
        if n_slices == 0:
            raise InputError(f"{path}: key 'kspace' has 0 slices")
        mask = np.asarray(_dataset(f, path, "mask", 1, "(W,)")[()])
        if mask.shape[0] != width:
            raise InputError(f"{path}: key 'mask' has width {mask.shape[0]} but 'kspace' width is {width}")
        if not np.all(np.isfinite(mask)):
            raise InputError(f"{path}: key 'mask' has non-finite values")
        if not np.all((mask == 0) | (mask == 1)):
            raise InputError(f"{path}: key 'mask' has values other than 0 and 1")
        _check_mask(mask, path, require_acs)
        image_size = tuple(int(n) for n in kspace.shape[-2:])
        if scan_values:
            _check_finite(kspace, path, "kspace")
    if pair.image is None:
        return n_slices
    path = pair.image
    with open_h5(path) as f:
        for key in image_keys:
            if key not in f:
                raise InputError(f"{path}: key '{key}' missing (expected (S, h, w) float)")
        for key in IMAGE_KEYS:
            if key not in f:
                continue
            ds = _dataset(f, path, key, 3, "(S, h, w)")
            if ds.shape[0] != n_slices:
                raise InputError(
                    f"{path}: key '{key}' has {ds.shape[0]} slices but {pair.kspace} 'kspace' has {n_slices}"
                )
            size = tuple(int(n) for n in ds.shape[1:])
            if crop is None:
                crop, crop_source = size, f"the size of '{key}' in the same file"
            elif size != tuple(crop):
                raise InputError(f"{path}: key '{key}' has size {_size(size)}, expected {_size(crop)} ({crop_source})")
            if size[0] > image_size[0]:
                raise InputError(
                    f"{path}: key '{key}' has size {_size(size)} but {pair.kspace} 'kspace' is {_size(image_size)}; "
                    "an image crop cannot be taller than the k-space image"
                )
            if scan_values:
                _check_finite(ds, path, key)
        _check_max(f, path, require_max)
    return n_slices


def _attrs_digest(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(attrs):
        value = attrs[key]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value if isinstance(value, (str, int, float, bool, list)) else repr(value)
    return out


def _h5_summary(path: Path) -> dict[str, Any]:
    with open_h5(path) as f:
        datasets = [k for k in sorted(f) if isinstance(f[k], h5py.Dataset)]
        keys = {k: {"shape": list(f[k].shape), "dtype": str(f[k].dtype)} for k in datasets}
        attrs = _attrs_digest(f.attrs)
    attrs_hash = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=repr).encode()).hexdigest()[:16]
    return {"name": path.name, "bytes": path.stat().st_size, "keys": keys, "attrs_hash": attrs_hash}


def data_fingerprint(pairs: Sequence[FilePair]) -> dict[str, Any]:
    """A cheap identity of a data set: names, shapes, dtypes, sizes and attrs (metadata only).

    Args:
        pairs: the volumes (e.g. from :func:`discover_pairs`).

    Returns:
        ``{"n_files", "n_slices", "bytes", "files": [...], "digest"}``; ``digest`` is a sha256 hex
        string over everything else, so two data sets with the same digest have the same files,
        shapes and attributes (the data values themselves are not read).
    """
    files = []
    n_slices = 0
    total = 0
    for pair in pairs:
        entry: dict[str, Any] = {"name": pair.name, "anatomy": pair.anatomy, "acc": pair.acc,
                                 "kspace": _h5_summary(pair.kspace)}
        shape = entry["kspace"]["keys"].get("kspace", {}).get("shape", [0])
        n_slices += int(shape[0]) if shape else 0
        total += entry["kspace"]["bytes"]
        if pair.image is not None:
            entry["image"] = _h5_summary(pair.image)
            total += entry["image"]["bytes"]
        files.append(entry)
    body = {"n_files": len(files), "n_slices": n_slices, "bytes": total, "files": files}
    body["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body
