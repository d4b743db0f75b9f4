"""Slice datasets over SNU volumes: typed samples, lazy per-worker HDF5 handles, adjacent slices.

:class:`SliceDataset` makes one example per k-space slice of a list of :class:`FilePair`. An
example is a :class:`Sample` with named fields (never a tuple). With ``num_adj_slices = A`` the
k-space holds the centre slice and its ``A - 1`` neighbours, clamped at the volume edges
(slice 0 with A = 5 reads slices ``0, 0, 0, 1, 2``), ordered slice-major so the centre is
``A // 2``. The stored k-space is returned as is (fully sampled in the SNU files); applying the
mask is the transform's job.

HDF5 files are opened lazily, once per process: the first ``__getitem__`` in a DataLoader worker
opens its own handles (fork-inherited handles are dropped when the pid changes), and pickling
drops them too. Files are validated when the dataset is built (:func:`validate_pair`, metadata
only); data read later is checked for NaN/inf slice by slice.

The open-time checks refuse, each with one line naming the file: image arrays of another size
than the data set's crop (given, or that of the first image file) or taller than the k-space
image; an all-zero mask, or one without an ACS block (``require_acs``); an image file without
``attrs['max']`` when targets are loaded (the SSIM data range of training and validation).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import h5py
import numpy as np
import torch

from recon.data.layout import FilePair, image_crop, validate_pair
from recon.errors import InputError
from recon.io import open_h5

ANATOMY_LABELS = {"brain": 0, "knee": 1}


@dataclass
class Sample:
    """One slice of one volume.

    Attributes:
        kspace: stored k-space of the centre slice and its neighbours, ``(A, C, H, W)`` complex64.
        mask: the file's column mask ``(W,)`` float32.
        target: ``image_label`` of the centre slice ``(h, w)`` float32, or None without an image file.
        grappa: ``image_grappa`` of the centre slice ``(h, w)`` float32, or None when not loaded.
        max_value: ``attrs['max']`` of the image file (the SSIM data range), NaN when absent.
        fname: the file name, e.g. ``brain_acc4_1.h5``.
        slice_idx: index of the centre slice.
        num_slices: slices in the volume.
        anatomy: ``"brain"`` or ``"knee"``.
        acc: acceleration of the file.
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor | None
    grappa: torch.Tensor | None
    max_value: float
    fname: str
    slice_idx: int
    num_slices: int
    anatomy: str
    acc: int


@dataclass
class SampleBatch:
    """Samples stacked along a new batch axis B (strings stay lists).

    Attributes:
        kspace: ``(B, A, C, H, W)`` complex64.
        mask: ``(B, W)`` float32.
        target: ``(B, h, w)`` float32 or None.
        grappa: ``(B, h, w)`` float32 or None.
        max_value: ``(B,)`` float64.
        fname: B file names.
        slice_idx: ``(B,)`` int64.
        num_slices: ``(B,)`` int64.
        anatomy: B anatomy names.
        acc: ``(B,)`` int64.
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor | None
    grappa: torch.Tensor | None
    max_value: torch.Tensor
    fname: list[str]
    slice_idx: torch.Tensor
    num_slices: torch.Tensor
    anatomy: list[str]
    acc: torch.Tensor

    def __len__(self) -> int:
        return len(self.fname)

    def to(self, device: torch.device | str) -> SampleBatch:
        """A copy with every tensor moved to ``device``."""
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return SampleBatch(
            kspace=self.kspace.to(device), mask=self.mask.to(device), target=move(self.target),
            grappa=move(self.grappa), max_value=self.max_value.to(device), fname=list(self.fname),
            slice_idx=self.slice_idx.to(device), num_slices=self.num_slices.to(device),
            anatomy=list(self.anatomy), acc=self.acc.to(device),
        )


def _stack_optional(items: list[torch.Tensor | None], name: str) -> torch.Tensor | None:
    present = [x is not None for x in items]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"collate_samples: field '{name}' is None for some samples and not for others")
    return _stack([x for x in items if x is not None], name)


def _stack(items: list[torch.Tensor], name: str) -> torch.Tensor:
    shapes = {tuple(x.shape) for x in items}
    if len(shapes) > 1:
        raise ValueError(f"collate_samples: field '{name}' has different shapes {sorted(shapes)}; use batch_size=1")
    return torch.stack(items)


def collate_samples(samples: Sequence[Sample]) -> SampleBatch:
    """Stack samples of equal shapes into a :class:`SampleBatch` (``DataLoader(collate_fn=...)``).

    Args:
        samples: one or more samples; tensors must have equal shapes across samples.

    Returns:
        The batch.

    Raises:
        ValueError: empty input, unequal shapes, or a field None in only some samples.
    """
    if not samples:
        raise ValueError("collate_samples: no samples")
    return SampleBatch(
        kspace=_stack([s.kspace for s in samples], "kspace"),
        mask=_stack([s.mask for s in samples], "mask"),
        target=_stack_optional([s.target for s in samples], "target"),
        grappa=_stack_optional([s.grappa for s in samples], "grappa"),
        max_value=torch.tensor([s.max_value for s in samples], dtype=torch.float64),
        fname=[s.fname for s in samples],
        slice_idx=torch.tensor([s.slice_idx for s in samples], dtype=torch.int64),
        num_slices=torch.tensor([s.num_slices for s in samples], dtype=torch.int64),
        anatomy=[s.anatomy for s in samples],
        acc=torch.tensor([s.acc for s in samples], dtype=torch.int64),
    )


class _LazyFiles:
    """Per-process cache of open read-only HDF5 files (at most ``max_open``, least recently used out)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._files: OrderedDict[Path, h5py.File] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: Path) -> h5py.File:
        if os.getpid() != self._pid:
            # handles inherited through fork belong to the parent; never use or close them here
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is None:
            f = open_h5(path)
            self._files[path] = f
            while len(self._files) > self.max_open:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(path)
        return f

    def close(self) -> None:
        if os.getpid() == self._pid:
            for f in self._files.values():
                f.close()
        self._files = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_open"])  # type: ignore[misc]


def _finite(array: np.ndarray, path: Path, key: str, slice_idx: int) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path}: key '{key}' has non-finite values (slice {slice_idx})")
    return array


class SliceDataset(torch.utils.data.Dataset):
    """One :class:`Sample` per k-space slice of the given volumes.

    Args:
        pairs: the volumes (from :func:`recon.data.layout.discover_pairs`).
        num_adj_slices: A, odd; the centre slice plus ``A - 1`` neighbours (clamped at the edges).
        load_target: read ``image_label`` when the pair has an image file (then the key must exist).
            ``attrs['max']`` is read whenever the pair has an image file.
        load_grappa: read ``image_grappa`` (then image files must exist and hold the key).
        slice_filter: keep slice ``s`` of ``pair`` only when ``slice_filter(pair, s)`` is True.
        crop: the image size ``(h, w)`` (the stage's crop) every image array must have; None:
            the size of the first image file's arrays, so that all volumes share one crop. The
            size in use is the attribute ``crop`` (None without image files).
        require_acs: refuse masks without a centred ACS block (the model estimates coil
            sensitivities from it; the challenge's masks all have one).
        require_max: refuse image files without ``attrs['max']``; None: when ``load_target``
            (the target's SSIM data range).

    Raises:
        InputError: a file fails the open-time checks (:func:`validate_pair`).
        ValueError: ``num_adj_slices`` is not a positive odd number.
    """

    def __init__(
        self,
        pairs: Sequence[FilePair],
        num_adj_slices: int = 1,
        load_target: bool = True,
        load_grappa: bool = False,
        slice_filter: Callable[[FilePair, int], bool] | None = None,
        crop: tuple[int, int] | None = None,
        require_acs: bool = True,
        require_max: bool | None = None,
    ):
        if num_adj_slices < 1 or num_adj_slices % 2 == 0:
            raise ValueError(f"num_adj_slices must be a positive odd number, got {num_adj_slices}")
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"crop must be two positive sizes (h, w), got {crop!r}")
        self.pairs = list(pairs)
        self.num_adj_slices = num_adj_slices
        self.load_target = load_target
        self.load_grappa = load_grappa
        self.crop: tuple[int, int] | None = None if crop is None else (int(crop[0]), int(crop[1]))
        crop_source = "the stage's crop"
        need_max = load_target if require_max is None else require_max
        keys = (("image_label",) if load_target else ()) + (("image_grappa",) if load_grappa else ())
        self.num_slices: list[int] = []
        self.index: list[tuple[int, int]] = []
        for i, pair in enumerate(self.pairs):
            if load_grappa and pair.image is None:
                raise InputError(f"{pair.kspace}: no image file, needed for 'image_grappa'")
            if self.crop is None and pair.image is not None:
                self.crop = image_crop(pair.image)
                crop_source = f"the crop of the first volume, {pair.image}"
            n = validate_pair(pair, image_keys=keys, scan_values=False, crop=self.crop, crop_source=crop_source,
                              require_acs=require_acs, require_max=need_max)
            self.num_slices.append(n)
            self.index.extend((i, s) for s in range(n) if slice_filter is None or slice_filter(pair, s))
        self._files = _LazyFiles()

    def __len__(self) -> int:
        return len(self.index)

    def adjacent_indices(self, slice_idx: int, num_slices: int) -> list[int]:
        """Slice indices read for ``slice_idx``: ``slice_idx - A//2 .. slice_idx + A//2``, clamped."""
        half = self.num_adj_slices // 2
        return [min(max(slice_idx + d, 0), num_slices - 1) for d in range(-half, half + 1)]

    def __getitem__(self, i: int) -> Sample:
        file_idx, slice_idx = self.index[i]
        pair = self.pairs[file_idx]
        n = self.num_slices[file_idx]
        idx = self.adjacent_indices(slice_idx, n)
        kf = self._files.get(pair.kspace)
        lo, hi = idx[0], idx[-1]
        block = np.asarray(kf["kspace"][lo:hi + 1])
        kspace = _finite(block[np.asarray(idx) - lo].astype(np.complex64, copy=False), pair.kspace, "kspace", slice_idx)
        mask = np.asarray(kf["mask"][()], dtype=np.float32)
        target = grappa = None
        max_value = math.nan
        if pair.image is not None:
            imf = self._files.get(pair.image)
            if "max" in imf.attrs:
                max_value = float(np.asarray(imf.attrs["max"]).reshape(-1)[0])
            if self.load_target:
                label = np.asarray(imf["image_label"][slice_idx], dtype=np.float32)
                target = torch.from_numpy(_finite(label, pair.image, "image_label", slice_idx))
            if self.load_grappa:
                image = np.asarray(imf["image_grappa"][slice_idx], dtype=np.float32)
                grappa = torch.from_numpy(_finite(image, pair.image, "image_grappa", slice_idx))
        return Sample(
            kspace=torch.from_numpy(np.ascontiguousarray(kspace)),
            mask=torch.from_numpy(mask),
            target=target,
            grappa=grappa,
            max_value=max_value,
            fname=pair.name,
            slice_idx=slice_idx,
            num_slices=n,
            anatomy=pair.anatomy,
            acc=pair.acc,
        )

    def close(self) -> None:
        """Close this process's open HDF5 files (they reopen on the next access)."""
        self._files.close()


class ImageSample(NamedTuple):
    """One image slice for the anatomy classifier (a NamedTuple so ``default_collate`` stacks it).

    Attributes:
        image: ``(1, h, w)`` float32.
        label: 0 for brain, 1 for knee.
        fname: the file name.
        slice_idx: the slice index.
    """

    image: torch.Tensor
    label: int
    fname: str
    slice_idx: int


class ImageSliceDataset(torch.utils.data.Dataset):
    """Image slices of one key (default ``image_grappa``) with the anatomy label, for the classifier.

    Args:
        pairs: volumes with image files.
        key: the image key to read.

    Raises:
        InputError: a pair without an image file, or an image file without ``key`` or of wrong rank.
    """

    def __init__(self, pairs: Sequence[FilePair], key: str = "image_grappa"):
        self.pairs = list(pairs)
        self.key = key
        self.index: list[tuple[int, int]] = []
        for i, pair in enumerate(self.pairs):
            if pair.image is None:
                raise InputError(f"{pair.kspace}: no image file (needed for '{key}')")
            with open_h5(pair.image) as f:
                if key not in f:
                    raise InputError(f"{pair.image}: key '{key}' missing (expected (S, h, w) float)")
                if f[key].ndim != 3:
                    raise InputError(f"{pair.image}: key '{key}' has rank {f[key].ndim}, expected 3 (S, h, w)")
                n = f[key].shape[0]
            self.index.extend((i, s) for s in range(n))
        self._files = _LazyFiles()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> ImageSample:
        file_idx, slice_idx = self.index[i]
        pair = self.pairs[file_idx]
        assert pair.image is not None  # checked in __init__
        image = np.asarray(self._files.get(pair.image)[self.key][slice_idx], dtype=np.float32)
        image = _finite(image, pair.image, self.key, slice_idx)
        return ImageSample(torch.from_numpy(image)[None], ANATOMY_LABELS[pair.anatomy], pair.name, slice_idx)

    def close(self) -> None:
        """Close this process's open HDF5 files."""
        self._files.close()
