"""The synthetic SNU data set: brain-like and knee-like multi-coil volumes in the challenge's file format.

Per volume (``docs/data.md`` section 3): an analytic phantom (:mod:`recon.data.phantoms`) is
evaluated on a slab of adjacent slices, multiplied by a smooth phase and loop-coil sensitivities,
scaled so that the label maximum is about ``1e-4 .. 6e-4`` (fastMRI's intensity scale, which keeps
the evaluator's 5e-5 / 2e-5 foreground thresholds meaningful), transformed with the centred
orthonormal FFT and given complex white noise. Then, as the challenge defines them:

Each volume's width W is the preset's ``brain_width`` / ``knee_width``, or, when the preset lists
``widths``, one of them drawn per volume (``full``: the challenge's widths, :data:`CHALLENGE_WIDTHS`;
``small``: the same widths scaled to its 96-pixel crop), so one data set mixes widths, W below and
above the crop, even and odd W and odd ACS sizes ``round(0.08 W)`` as the challenge's files do.

* k-space file: ``kspace`` complex64 ``(S, C, H, W)`` fully sampled, ``mask`` float32 ``(W,)``,
  the public pattern for the file's acceleration (:func:`recon.masks.public_mask`);
* image file: ``image_label`` (RSS of the full k-space), ``image_input`` (RSS zero-filled),
  ``image_grappa`` (RSS after :func:`recon.data.grappa.grappa`; absent with ``grappa="none"``),
  all float32 ``(S, crop, crop)``, and ``attrs['max'] = image_label.max()``.

:func:`write_dataset` writes the whole layout (``train``, ``val``, ``leaderboard/{acc4,acc8}``).
Each volume draws from its own generator seeded by ``(seed, relative path)``, so a seed gives the
same bytes on every run and one file does not depend on which others are written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from recon.data.grappa import grappa as grappa_fill
from recon.data.grappa import single_thread_blas
from recon.data.layout import IMAGE_DIR, KSPACE_DIR, LEADERBOARD_ACCS
from recon.data.names import ANATOMIES
from recon.data.phantoms import CoilModel, Grid, SmoothPhase, make_phantom
from recon.errors import InputError
from recon.fft import center_crop, fft2c_np, ifft2c_np, rss
from recon.io import atomic_path, list_h5, write_text_atomic
from recon.masks import public_mask

log = logging.getLogger(__name__)

ACCELERATIONS = (4, 8)
GRAPPA_MODES = ("numpy", "none")
MANIFEST = "synth.json"
#: The k-space widths met in the challenge's data (docs/challenge.md 1.1), for a 384 x 384 image.
CHALLENGE_WIDTHS = (320, 322, 338, 356, 368, 370, 372, 386, 388, 392, 396, 480)
CHALLENGE_CROP = 384


def scaled_widths(crop: int) -> tuple[int, ...]:
    """:data:`CHALLENGE_WIDTHS` scaled to an image of ``crop`` pixels (half up), keeping W / crop as in the data."""
    return tuple(sorted({int(w * crop / CHALLENGE_CROP + 0.5) for w in CHALLENGE_WIDTHS}))


@dataclass(frozen=True)
class SynthPreset:
    """Sizes and counts of a synthetic data set.

    Attributes:
        name: preset name.
        brain_coils, brain_height, brain_width: brain k-space ``C, H, W`` (W unless ``widths`` is set).
        knee_coils, knee_height, knee_width: knee k-space ``C, H, W`` (W unless ``widths`` is set).
        crop: image size of the image files (``crop x crop``).
        min_slices, max_slices: slices per volume, drawn uniformly in this range.
        n_train: train volumes per (anatomy, acceleration).
        n_val: val volumes per (anatomy, acceleration), numbered after the train ones.
        n_leaderboard: leaderboard volumes per anatomy in each of ``acc4`` and ``acc8``.
        noise: background RSS noise as a fraction of the label maximum.
        brain_max, knee_max: range of the per-volume label maximum.
        slice_gap: distance between adjacent slices in object units (``crop / 2`` pixels).
        coil_radius: loop-coil radius in object units.
        grappa_lambda: relative Tikhonov weight of the GRAPPA fit.
        widths: when not empty, each volume's W is drawn uniformly from these (both anatomies).
    """

    name: str
    brain_coils: int
    brain_height: int
    brain_width: int
    knee_coils: int
    knee_height: int
    knee_width: int
    crop: int
    min_slices: int
    max_slices: int
    n_train: int
    n_val: int
    n_leaderboard: int
    noise: float = 0.02
    brain_max: tuple[float, float] = (2e-4, 5.5e-4)
    knee_max: tuple[float, float] = (1.5e-4, 4e-4)
    slice_gap: float = 0.06
    coil_radius: float = 0.5
    grappa_lambda: float = 1e-2
    widths: tuple[int, ...] = ()

    def shape(self, anatomy: str) -> tuple[int, int, int]:
        """``(C, H, W)`` of one k-space slice of ``anatomy`` (a volume draws W when ``widths`` is set)."""
        if anatomy == "brain":
            return self.brain_coils, self.brain_height, self.brain_width
        return self.knee_coils, self.knee_height, self.knee_width

    def check(self) -> None:
        """Raise :class:`InputError` for values the generator cannot use."""
        for anatomy in ANATOMIES:
            c, h, w = self.shape(anatomy)
            if c < 1 or h < 16 or w < 16:
                raise InputError(f"synth preset {self.name}: {anatomy} shape {c}x{h}x{w} (need C >= 1, H, W >= 16)")
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 16 for w in self.widths):
            raise InputError(f"synth preset {self.name}: widths={list(self.widths)}, expected integers >= 16")
        if self.crop < 8:
            raise InputError(f"synth preset {self.name}: crop={self.crop}, expected >= 8")
        if not 1 <= self.min_slices <= self.max_slices:
            raise InputError(f"synth preset {self.name}: slices {self.min_slices}..{self.max_slices} is not a range")
        if self.n_train < 1 or self.n_val < 0 or self.n_leaderboard < 0:
            raise InputError(f"synth preset {self.name}: need n_train >= 1, n_val >= 0, n_leaderboard >= 0")
        if self.noise < 0:
            raise InputError(f"synth preset {self.name}: noise={self.noise}, expected >= 0")


PRESETS: dict[str, SynthPreset] = {
    # tests: a whole data set in a few seconds; 20 volumes, 3-4 slices each
    "tiny": SynthPreset("tiny", 8, 64, 64, 8, 64, 64, crop=64, min_slices=3, max_slices=4,
                        n_train=2, n_val=1, n_leaderboard=2),
    # CPU demos: real coil counts, 2x read-out oversampling, a 96x96 crop, the challenge's widths scaled by 96/384
    "small": SynthPreset("small", 16, 192, 96, 15, 192, 92, crop=96, min_slices=5, max_slices=6,
                         n_train=2, n_val=1, n_leaderboard=2, widths=scaled_widths(96)),
    # real sizes: 2x read-out oversampling of a 384-row image, the challenge's widths (fewer slices than
    # the real 16-ish, to keep the data set near 2 GB)
    "full": SynthPreset("full", 16, 768, 396, 15, 768, 368, crop=384, min_slices=4, max_slices=4,
                        n_train=1, n_val=1, n_leaderboard=1, widths=CHALLENGE_WIDTHS),
}


def resolve_preset(preset: str | SynthPreset = "tiny", **overrides: Any) -> SynthPreset:
    """A preset by name (or as given), with fields replaced by ``overrides``.

    Raises:
        InputError: unknown preset name or override key, or values out of range.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise InputError(f"unknown synth preset {preset!r}; expected one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(SynthPreset)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown synth option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(fields))}")
    resolved = dataclasses.replace(preset, **overrides)
    resolved.check()
    return resolved


@dataclass(frozen=True)
class VolumeJob:
    """One file pair to write: ``root/<folder>/{kspace,image}/<name>``."""

    folder: str
    name: str
    anatomy: str
    acc: int

    @property
    def key(self) -> str:
        """The relative path that seeds this volume's generator."""
        return f"{self.folder}/{self.name}"


def plan_jobs(preset: SynthPreset) -> list[VolumeJob]:
    """Every volume of the layout, with the challenge's file names."""
    jobs = []
    for anatomy in ANATOMIES:
        for acc in ACCELERATIONS:
            for i in range(1, preset.n_train + 1):
                jobs.append(VolumeJob("train", f"{anatomy}_acc{acc}_{i}.h5", anatomy, acc))
            for i in range(preset.n_train + 1, preset.n_train + preset.n_val + 1):
                jobs.append(VolumeJob("val", f"{anatomy}_acc{acc}_{i}.h5", anatomy, acc))
    for acc_dir in LEADERBOARD_ACCS:
        for anatomy in ANATOMIES:
            for i in range(1, preset.n_leaderboard + 1):
                jobs.append(VolumeJob(f"leaderboard/{acc_dir}", f"{anatomy}_test{i}.h5", anatomy, int(acc_dir[3:])))
    return jobs


def volume_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one volume: seeded by the data set seed and the volume's relative path."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode())]))


@dataclass
class SynthSlice:
    """One generated slice: ``kspace`` ``(C, H, W)`` complex64 and the three float32 crop images."""

    kspace: np.ndarray
    label: np.ndarray
    input: np.ndarray
    grappa: np.ndarray | None


class VolumeModel:
    """The random draws of one volume; :meth:`slices` generates its slices one at a time.

    Args:
        rng: the volume's generator (consumed in a fixed order).
        anatomy: ``"brain"`` or ``"knee"``.
        acc: acceleration of the file's mask.
        preset: sizes, noise and intensity range.
    """

    def __init__(self, rng: np.random.Generator, anatomy: str, acc: int, preset: SynthPreset):
        self.rng = rng
        self.anatomy = anatomy
        self.acc = acc
        self.preset = preset
        self.n_slices = int(rng.integers(preset.min_slices, preset.max_slices + 1))
        self.coils, height, width = preset.shape(anatomy)
        if preset.widths:  # drawn only then, so presets without widths keep their streams (and bytes)
            width = int(preset.widths[int(rng.integers(len(preset.widths)))])
        self.height, self.width = height, width
        self.grid = Grid(height, width, preset.crop / 2.0)
        self.phantom = make_phantom(anatomy, rng, self.grid)
        z_mid = float(rng.uniform(-0.15, 0.15))
        self.z = z_mid + (np.arange(self.n_slices) - (self.n_slices - 1) / 2.0) * preset.slice_gap
        self.coil_model = CoilModel(rng, self.phantom.coil_centres(rng, self.coils, z_mid), preset.coil_radius)
        self.phase = SmoothPhase(rng)
        lo, hi = preset.brain_max if anatomy == "brain" else preset.knee_max
        self.label_max = float(rng.uniform(lo, hi))
        self.mask = public_mask(width, acc)

    def _coil_images(self, s: int) -> np.ndarray:
        z = float(self.z[s])
        obj = self.phantom.slice(z) * self.phase.slice(self.grid, z)
        return self.coil_model.maps(self.grid, z) * obj[None]

    def slices(self, grappa: str = "numpy") -> Iterator[SynthSlice]:
        """Generate the slices in order.

        Args:
            grappa: ``"numpy"`` to compute ``image_grappa``, ``"none"`` to skip it.

        Yields:
            One :class:`SynthSlice` per slice.
        """
        crop = self.preset.crop
        # noise-free RSS = |object| * RSS(maps): sets the scale before any noise is drawn
        peak = 0.0
        for s in range(self.n_slices):
            z = float(self.z[s])
            clean = self.phantom.slice(z) * rss(self.coil_model.magnitude(self.grid, z))
            peak = max(peak, float(center_crop(clean, crop, crop).max()))
        scale = self.label_max / max(peak, 1e-12)
        sigma = self.preset.noise * self.label_max / np.sqrt(2.0 * self.coils)
        for s in range(self.n_slices):
            kspace = fft2c_np(self._coil_images(s) * np.float32(scale)).astype(np.complex64)
            noise = self.rng.standard_normal((2, *kspace.shape), dtype=np.float32) * np.float32(sigma)
            kspace += noise[0] + 1j * noise[1]
            masked = kspace * self.mask
            label = center_crop(rss(ifft2c_np(kspace)), crop, crop).astype(np.float32)
            zero_filled = center_crop(rss(ifft2c_np(masked)), crop, crop).astype(np.float32)
            image_grappa = None
            if grappa == "numpy":
                filled = grappa_fill(masked, self.mask, acc=self.acc, lamda=self.preset.grappa_lambda)
                image_grappa = center_crop(rss(ifft2c_np(filled)), crop, crop).astype(np.float32)
            yield SynthSlice(kspace, label, zero_filled, image_grappa)


def write_volume(root: Path, job: VolumeJob, preset: SynthPreset, seed: int, grappa: str,
                 on_slice: Callable[[], object] | None = None) -> int:
    """Write one k-space/image file pair atomically (see :func:`recon.io.atomic_path`).

    Args:
        root: data set root.
        job: which volume.
        preset: sizes.
        seed: data set seed.
        grappa: ``"numpy"`` or ``"none"``.
        on_slice: optional callable run after each slice (progress).

    Returns:
        The number of slices written.
    """
    model = VolumeModel(volume_rng(seed, job.key), job.anatomy, job.acc, preset)
    kdir, idir = root / job.folder / KSPACE_DIR, root / job.folder / IMAGE_DIR
    c, h, w = model.coils, model.height, model.width
    s, crop = model.n_slices, preset.crop
    # the inner context ends first: the k-space file is put in place before its image file
    with atomic_path(idir / job.name) as itmp, atomic_path(kdir / job.name) as ktmp:
        with h5py.File(ktmp, "w-") as kf, h5py.File(itmp, "w-") as imf:
            kspace = kf.create_dataset("kspace", shape=(s, c, h, w), dtype=np.complex64)
            kf.create_dataset("mask", data=model.mask.astype(np.float32))
            keys = ["image_label", "image_input"] + (["image_grappa"] if grappa == "numpy" else [])
            images = {k: imf.create_dataset(k, shape=(s, crop, crop), dtype=np.float32) for k in keys}
            label_max = np.float32(-np.inf)
            for i, sl in enumerate(model.slices(grappa)):
                kspace[i] = sl.kspace
                images["image_label"][i] = sl.label
                images["image_input"][i] = sl.input
                if sl.grappa is not None:
                    images["image_grappa"][i] = sl.grappa
                label_max = max(label_max, sl.label.max())
                if on_slice is not None:
                    on_slice()
            imf.attrs["max"] = float(label_max)
    return s


def clear_layout(root: str | Path) -> int:
    """Delete the ``.h5`` files of the SNU layout under ``root`` (nothing else); returns the count."""
    root = Path(root)
    folders = ["train", "val"] + [f"leaderboard/{acc}" for acc in LEADERBOARD_ACCS]
    removed = 0
    for folder in folders:
        for sub in (KSPACE_DIR, IMAGE_DIR):
            for path in list_h5(root / folder / sub):
                path.unlink()
                removed += 1
    (root / MANIFEST).unlink(missing_ok=True)
    return removed


def write_dataset(
    root: str | Path,
    preset: str | SynthPreset = "tiny",
    seed: int = 0,
    grappa: str = "numpy",
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Write a complete synthetic data set in the SNU layout.

    Args:
        root: output folder (created); existing files of the same names are replaced.
        preset: ``"tiny"``, ``"small"``, ``"full"`` or a :class:`SynthPreset`.
        seed: the data set seed (same seed, same files).
        grappa: ``"numpy"`` (compute ``image_grappa``) or ``"none"`` (omit the key).
        progress: show a tqdm bar over slices.
        **overrides: :class:`SynthPreset` fields to change (e.g. ``n_train=4``).

    Returns:
        A summary: root, preset, seed, grappa, volumes, files, slices, bytes, seconds, per-split
        volume counts (also written to ``root/synth.json``).

    Raises:
        InputError: unknown preset, option or GRAPPA mode.
    """
    if grappa not in GRAPPA_MODES:
        raise InputError(f"unknown grappa mode {grappa!r}; expected one of {', '.join(GRAPPA_MODES)}")
    spec = resolve_preset(preset, **overrides)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(spec)
    total = sum(VolumeModel(volume_rng(seed, j.key), j.anatomy, j.acc, spec).n_slices for j in jobs)
    start = time.perf_counter()
    n_slices = 0
    with single_thread_blas(), tqdm(total=total, unit="slice", desc=f"synth {spec.name}", disable=not progress) as bar:
        for job in jobs:
            n_slices += write_volume(root, job, spec, seed, grappa, on_slice=lambda: bar.update(1))
    splits: dict[str, int] = {}
    for job in jobs:
        splits[job.folder] = splits.get(job.folder, 0) + 1
    n_bytes = sum(p.stat().st_size for p in root.rglob("*.h5"))
    summary = {
        "root": str(root), "preset": spec.name, "seed": seed, "grappa": grappa, "volumes": len(jobs),
        "files": 2 * len(jobs), "slices": n_slices, "bytes": n_bytes,
        "seconds": round(time.perf_counter() - start, 3), "splits": splits,
        "options": {k: v for k, v in dataclasses.asdict(spec).items() if k != "name"},
    }
    write_text_atomic(root / MANIFEST, json.dumps(summary, indent=2) + "\n")
    log.debug("synth %s: %d volumes, %d slices, %.1f MB in %.1f s",
              spec.name, len(jobs), n_slices, n_bytes / 1e6, summary["seconds"])
    return summary
