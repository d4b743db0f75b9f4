"""Reconstruct a leaderboard folder with the Hacker/Helper systems, within the challenge's time budget.

Input layout (``docs/challenge.md`` section 1.1)::

    DATA/{acc4,acc8}/kspace/<name>.h5     kspace (S, C, H, W) complex, mask (W,)
    DATA/{acc4,acc8}/image/<name>.h5      image_grappa (for the classifier), image_label (crop size)

Output: ``OUT/{acc4,acc8}/<name>.h5`` with dataset ``reconstruction``, float32 ``(S, h, w)`` where
``(h, w)`` is the shape of the file's images (384 x 384 on the challenge data; 384 when no image
file exists). Each file is written to a temporary file in the same folder and renamed once all
of its slices are done, so a folder never holds a partial volume.

Per file the anatomy comes from the classifier (logits summed over the ``image_grappa`` slices)
or, only when asked explicitly, from the file name. Per slice the Broker
(:mod:`recon.inference.broker`) picks the system from the mask and the expert from the anatomy
and the mask's acceleration. The k-space is multiplied by the file's mask before the model, as
the challenge's loader does, and the ACS width is detected from the mask (``-1``).

All input checks (file pairs and names, mask widths, checkpoint experts, the output folder) run
before the first file is written. Wall time counts from ``clock_start`` (the caller may start
the clock before loading checkpoints) to the last file written, and is compared with the
budget (3600 s, the challenge's limit on its GPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from recon.data.dataset import Sample, SliceDataset
from recon.data.layout import IMAGE_KEYS, FilePair, discover_leaderboard
from recon.data.names import expert_name
from recon.errors import InputError
from recon.fft import center_crop
from recon.inference.broker import Router, RoutingReport, route_slice
from recon.inference.systems import ReconBatch, ReconSystem
from recon.io import atomic_path, open_h5

log = logging.getLogger(__name__)

RECON_KEY = "reconstruction"
DEFAULT_CROP = 384
CHALLENGE_BUDGET_S = 3600.0


@dataclass
class FileTiming:
    """One output file.

    Attributes:
        file: ``<acc folder>/<name>``.
        slices: slices reconstructed.
        seconds: wall time from the end of the previous file to this file's rename (data waiting
            included).
        system: the system(s) used, e.g. ``hacker`` (``hacker+helper`` if slices differ).
        expert: the expert(s) used.
        sha256: digest of the written file.
    """

    file: str
    slices: int
    seconds: float
    system: str
    expert: str
    sha256: str


@dataclass
class ReconResult:
    """What a reconstruction run did and how long it took.

    Attributes:
        data_dir: the leaderboard folder read.
        out_dir: the folder written.
        routing: the Broker's counts.
        files: one :class:`FileTiming` per written file, in order.
        total_s: wall time from the clock start to the last file written.
        setup_s: the part of ``total_s`` before the first slice (loading, checks, classifier).
        budget_s: the time budget.
        device: the torch device used.
        amp: whether float16 autocast was used.
        batch_size: slices per forward pass (at most).
        num_workers: DataLoader workers.
        systems: :meth:`ReconSystem.describe` of the Hacker and Helper.
    """

    data_dir: str
    out_dir: str
    routing: RoutingReport
    files: list[FileTiming]
    total_s: float
    setup_s: float
    budget_s: float
    device: str
    amp: bool
    batch_size: int
    num_workers: int
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def slices(self) -> int:
        """Slices reconstructed."""
        return sum(f.slices for f in self.files)

    @property
    def seconds_per_slice(self) -> float:
        """Total wall time divided by the slice count (setup included)."""
        return self.total_s / self.slices if self.slices else float("nan")

    @property
    def within_budget(self) -> bool:
        """Whether the total time is below the budget (the challenge requires < 3600 s)."""
        return self.total_s < self.budget_s

    @property
    def verdict(self) -> str:
        """``within budget`` or ``OVER BUDGET``."""
        return "within budget" if self.within_budget else "OVER BUDGET"

    @property
    def manifest(self) -> dict[str, str]:
        """``<acc folder>/<name>`` -> sha256 of every written file."""
        return {f.file: f.sha256 for f in self.files}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {
            "data_dir": self.data_dir,
            "out_dir": self.out_dir,
            "device": self.device,
            "amp": self.amp,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "systems": self.systems,
            "routing": self.routing.to_dict(),
            "files": [vars(f).copy() for f in self.files],
            "slices": self.slices,
            "total_s": self.total_s,
            "setup_s": self.setup_s,
            "seconds_per_slice": self.seconds_per_slice,
            "budget_s": self.budget_s,
            "within_budget": self.within_budget,
            "verdict": self.verdict,
        }

    def format(self) -> str:
        """Readable summary: routing, timing, and the budget verdict."""
        loop = self.total_s - self.setup_s
        lines = [
            self.routing.format(),
            f"reconstructed {len(self.files)} files, {self.slices} slices into {self.out_dir} "
            f"(device {self.device}, amp {'on' if self.amp else 'off'}, batch {self.batch_size})",
            f"time: {self.total_s:.1f} s total = {self.setup_s:.1f} s setup + {loop:.1f} s reconstruction; "
            f"{self.seconds_per_slice:.3f} s/slice overall, {loop / max(self.slices, 1):.3f} s/slice in the loop",
            f"budget {self.budget_s:.0f} s: {self.verdict} ({100.0 * self.total_s / self.budget_s:.1f} % used)",
        ]
        return "\n".join(lines)


@dataclass
class _Volume:
    """A file in flight."""

    key: str
    pair: FilePair
    acc_dir: str
    num_slices: int
    crop: tuple[int, int]
    out_path: Path
    buffer: np.ndarray | None = None
    done: int = 0
    systems: set[str] = field(default_factory=set)
    experts: set[str] = field(default_factory=set)


class _Indexed(torch.utils.data.Dataset):
    """Wraps a :class:`SliceDataset` to return ``(file index, sample)`` and carry bad-input errors.

    An :class:`InputError` raised in a worker would come back as a multi-line traceback; it is
    returned as its message instead and re-raised in the main process as one line.
    """

    def __init__(self, dataset: SliceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Sample | str]:
        file_idx = self.dataset.index[i][0]
        try:
            return file_idx, self.dataset[i]
        except InputError as exc:
            return file_idx, str(exc)


def _discover(data_dir: Path, need_images: bool) -> list[tuple[str, FilePair]]:
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data folder not found (expected {{acc4,acc8}}/kspace/*.h5)")
    board = discover_leaderboard(data_dir, require_image=True if need_images else None)
    return [(acc_dir, pair) for acc_dir, pairs in board.items() for pair in pairs]


def _image_shape(pair: FilePair, crop: int | None) -> tuple[int, int]:
    if crop is not None:
        return crop, crop
    if pair.image is None:
        return DEFAULT_CROP, DEFAULT_CROP
    with open_h5(pair.image) as f:
        for key in IMAGE_KEYS:
            if key in f:
                shape = f[key].shape
                return int(shape[-2]), int(shape[-1])
    raise InputError(f"{pair.image}: none of {', '.join(IMAGE_KEYS)} present (needed for the output size)")


def _read_mask(pair: FilePair) -> np.ndarray:
    with open_h5(pair.kspace) as f:
        return np.asarray(f["mask"][()], dtype=np.float32).reshape(-1)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    existing = sorted(p for p in out_dir.glob("**/*.h5") if p.is_file()) if out_dir.is_dir() else []
    if existing and not overwrite:
        first = existing[0].relative_to(out_dir)
        raise InputError(
            f"{out_dir}: already holds {len(existing)} .h5 result file(s) (e.g. {first}); "
            "choose another folder or overwrite (--overwrite)"
        )
    if existing:
        log.warning("%s: %d existing .h5 file(s); files of the same names will be replaced", out_dir, len(existing))


def write_volume(path: Path, volume: np.ndarray, key: str = RECON_KEY) -> str:
    """Write ``volume`` to ``path`` atomically (see :func:`recon.io.atomic_path`).

    Args:
        path: destination ``.h5`` file.
        volume: ``(S, h, w)`` float32.
        key: dataset name.

    Returns:
        The sha256 hex digest of the written file.
    """
    if volume.ndim != 3 or volume.dtype != np.float32:
        raise ValueError(f"a reconstruction must be float32 (S, h, w), got {volume.dtype} {volume.shape}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w-") as f:
            # no timestamps in the file, so equal volumes give equal digests
            f.create_dataset(key, data=volume, track_times=False)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return digest


def _classify(pair: FilePair, classifier: nn.Module, device: torch.device) -> tuple[str, list[float]]:
    from recon.models.classifier import classify_volume

    assert pair.image is not None  # images are required when a classifier is given
    with open_h5(pair.image) as f:
        if "image_grappa" not in f:
            raise InputError(f"{pair.image}: key 'image_grappa' missing (needed by the classifier)")
        grappa = np.asarray(f["image_grappa"][()], dtype=np.float32)
    if grappa.ndim != 3 or not np.all(np.isfinite(grappa)):
        raise InputError(f"{pair.image}: key 'image_grappa' must be finite (S, h, w), got shape {grappa.shape}")
    anatomy, logits = classify_volume(classifier, torch.from_numpy(grappa)[:, None].to(device))
    return anatomy, [float(v) for v in logits]


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _adjacent_window(total: int, wanted: int) -> slice:
    """The centre ``wanted`` of ``total`` adjacent slices (edge clamping composes, so this is exact)."""
    half = total // 2
    return slice(half - wanted // 2, half + wanted // 2 + 1)


def reconstruct_leaderboard(
    data_dir: str | Path,
    out_dir: str | Path,
    hacker: ReconSystem,
    helper: ReconSystem,
    classifier: nn.Module | None = None,
    anatomy_from_filename: bool = False,
    device: str | torch.device = "cpu",
    amp: bool = False,
    batch_size: int = 4,
    num_workers: int = 2,
    budget_s: float = CHALLENGE_BUDGET_S,
    overwrite: bool = False,
    progress: bool = False,
    crop: int | None = None,
    clock_start: float | None = None,
) -> ReconResult:
    """Reconstruct every file of a leaderboard folder (see the module docstring for layouts).

    Args:
        data_dir: the leaderboard folder holding ``acc4/`` and/or ``acc8/``.
        out_dir: where ``{acc4,acc8}/<name>.h5`` go (created).
        hacker: the system for slices whose mask is exactly the public pattern.
        helper: the system for every other slice.
        classifier: the brain/knee slice classifier; decides each file's anatomy.
        anatomy_from_filename: take the anatomy from the file name instead; exactly one of
            ``classifier`` and ``anatomy_from_filename`` must be given (the choice is never implicit).
        device: torch device for the models.
        amp: float16 autocast on CUDA (a warning, and float32, on other devices).
        batch_size: slices of one file per forward pass, at most.
        num_workers: DataLoader worker processes reading HDF5 while the model runs.
        budget_s: the time budget in seconds.
        overwrite: allow an output folder that already holds ``.h5`` files.
        progress: show a tqdm bar over slices.
        crop: output size (square); by default the shape of each file's images, else 384.
        clock_start: ``time.perf_counter()`` value the wall time counts from (default: now).

    Returns:
        The :class:`ReconResult` (routing report, timings, budget verdict, manifest).

    Raises:
        InputError: no or two anatomy sources, a bad data folder or file, an expert a system lacks, or an
            output folder that already holds results (without ``overwrite``).
    """
    start = time.perf_counter() if clock_start is None else clock_start
    if classifier is None and not anatomy_from_filename:
        raise InputError(
            "no anatomy source: give a classifier checkpoint (--classifier) or choose the file names "
            "explicitly (--anatomy-from-filename)"
        )
    if classifier is not None and anatomy_from_filename:
        raise InputError("two anatomy sources: give either a classifier (--classifier) or --anatomy-from-filename")
    if batch_size < 1 or num_workers < 0 or crop is not None and crop < 1:
        raise InputError(
            f"batch_size must be >= 1, num_workers >= 0, crop >= 1; got {batch_size}, {num_workers}, {crop}"
        )
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = torch.device(device)
    if amp and device.type != "cuda":
        log.warning("amp requested on %s: mixed precision is used on CUDA only; running float32", device)
        amp = False

    # ---- every check before anything is written ----------------------------------------------
    entries = _discover(data_dir, need_images=classifier is not None)
    adj = max(hacker.num_adj_slices, helper.num_adj_slices)
    dataset = SliceDataset([p for _, p in entries], num_adj_slices=adj, load_target=False, load_grappa=False)
    volumes = [
        _Volume(f"{acc_dir}/{pair.name}", pair, acc_dir, dataset.num_slices[i], _image_shape(pair, crop),
                out_dir / acc_dir / pair.name)
        for i, (acc_dir, pair) in enumerate(entries)
    ]
    _check_out_dir(out_dir, overwrite)

    router = Router("classifier" if classifier is not None else "filename")
    systems = {"hacker": hacker.to(device), "helper": helper.to(device)}
    if classifier is not None:
        classifier.to(device).eval()
    for vol in volumes:
        if classifier is not None:
            anatomy, logits = _classify(vol.pair, classifier, device)
        else:
            anatomy, logits = vol.pair.anatomy, None
        router.decide_file(vol.key, anatomy, vol.pair.anatomy, logits, int(vol.acc_dir[3:]))
        system, acc = route_slice(_read_mask(vol.pair))
        systems[system].check_expert(expert_name(anatomy, acc))
    setup_s = time.perf_counter() - start
    log.info("setup done in %.1f s: %d files, %d slices", setup_s, len(volumes), len(dataset))

    # ---- reconstruction loop -------------------------------------------------------------------
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=None,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    timings: list[FileTiming] = []
    pending: list[tuple[Sample, str, str]] = []
    pending_file = -1
    file_clock = time.perf_counter()
    bar = _progress(len(dataset), progress)

    def flush() -> None:
        if not pending:
            return
        vol = volumes[pending_file]
        _, system, expert = pending[0]
        kspace = torch.stack([s.kspace for s, _, _ in pending])
        mask = torch.stack([s.mask for s, _, _ in pending])
        kspace, mask = kspace.to(device), mask.to(device)
        kspace = kspace[:, _adjacent_window(adj, systems[system].num_adj_slices)]
        masked = kspace * mask[:, None, None, None, :].to(kspace.dtype)
        nlf = torch.full((len(pending),), -1, dtype=torch.long, device=device)
        with _autocast(device, amp):
            image = systems[system].reconstruct(ReconBatch(masked, mask, nlf), expert)
        image = center_crop(image.float(), *vol.crop).cpu().numpy()
        if vol.buffer is None:
            vol.buffer = np.zeros((vol.num_slices, *vol.crop), dtype=np.float32)
        for row, (sample, _, _) in enumerate(pending):
            vol.buffer[sample.slice_idx] = image[row]
        vol.done += len(pending)
        bar.update(len(pending))
        pending.clear()

    try:
        for file_idx, sample in loader:
            if isinstance(sample, str):
                raise InputError(sample)
            vol = volumes[file_idx]
            system, expert = router.route(vol.key, sample.mask.numpy())
            vol.systems.add(system)
            vol.experts.add(expert)
            same_group = file_idx == pending_file and pending and pending[0][1:] == (system, expert)
            if pending and (not same_group or len(pending) >= batch_size):
                flush()
            pending_file = file_idx
            pending.append((sample, system, expert))
            if vol.done + len(pending) == vol.num_slices:
                flush()
                assert vol.buffer is not None
                digest = write_volume(vol.out_path, vol.buffer)
                now = time.perf_counter()
                timings.append(FileTiming(vol.key, vol.num_slices, now - file_clock, "+".join(sorted(vol.systems)),
                                          "+".join(sorted(vol.experts)), digest))
                log.debug("%s: %d slices in %.2f s", vol.key, vol.num_slices, now - file_clock)
                file_clock = now
                vol.buffer = None
    finally:
        bar.close()
    total_s = time.perf_counter() - start
    return ReconResult(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        routing=router.report(),
        files=timings,
        total_s=total_s,
        setup_s=setup_s,
        budget_s=float(budget_s),
        device=str(device),
        amp=amp,
        batch_size=batch_size,
        num_workers=num_workers,
        systems={name: s.describe() for name, s in systems.items()},
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="slice", desc="reconstruct")

