"""Leaderboard evaluation of a reconstruction folder, baselines, and per-slice validation scores.

Layouts (``docs/challenge.md`` sections 1.1, 2 and 3)::

    LEADERBOARD/{acc4,acc8}/image/<name>.h5     image_label (S, H, W), image_input, image_grappa, attrs['max']
    RECON/{acc4,acc8}/<name>.h5                 reconstruction (S, H, W) float32

Scores follow the official 2025 ``leaderboard_eval.py``: every slice is scored with
:func:`recon.metric.slice_ssim` semantics (foreground mask from the target, ``data_range =
attrs['max']``); ``SSIM_accX`` is the mean over all slices of the folder (slice-weighted), and the
leaderboard score is ``(SSIM_acc4 + SSIM_acc8) / 2``. The anatomy (mask threshold) comes from the
file name. The challenge requires exactly 58 files per folder; here one reconstruction per
leaderboard file with the same name is required, and ``expected_count`` enforces a count.

The same per-slice scoring and slice-weighted aggregation serve training validation:
:func:`score_slices` and :class:`ScoreAggregator`.

:func:`write_remasked_leaderboard` makes the private-like copy of a leaderboard: every k-space
file's ``mask`` replaced by the re-masked validation's mask of that file and kind
(:func:`recon.engine.remask.remask`, deterministic per file name and kind, never the public
pattern); the inference multiplies the fully sampled k-space by it, so the copy is the same
scans under another mask, scored against the same labels.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import h5py
import numpy as np
import torch

from recon.data.names import parse_name, sort_key
from recon.errors import InputError
from recon.io import atomic_path, list_h5, open_h5
from recon.metric import foreground_mask, ssim

if TYPE_CHECKING:
    from recon.engine.stage import RemaskConfig

logger = logging.getLogger(__name__)

ACCS = ("acc4", "acc8")
TARGET_KEY = "image_label"
MAX_ATTR = "max"
RECON_KEY = "reconstruction"
# Baseline name -> dataset of the leaderboard image file.
BASELINES = {"zero_filled": "image_input", "grappa": "image_grappa"}


def score_slices(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    max_values: torch.Tensor | float,
    anatomies: Sequence[str] | str,
) -> torch.Tensor:
    """Official per-slice scores of a batch (masked SSIM, ``data_range`` = volume max).

    Args:
        outputs: reconstructions ``(B, H, W)``, real float tensor (float32 for the official value).
        targets: ``image_label`` slices ``(B, H, W)``, same dtype and device.
        max_values: ``attrs['max']`` of each slice's volume, ``(B,)`` tensor or one scalar.
        anatomies: one anatomy per slice (``"brain"``/``"knee"``), or one for all.

    Returns:
        ``(B,)`` tensor of slice SSIMs (differentiable in ``outputs``).
    """
    if outputs.ndim != 3 or outputs.shape != targets.shape:
        raise ValueError(
            f"score_slices expects outputs and targets of one shape (B, H, W), got "
            f"{tuple(outputs.shape)} and {tuple(targets.shape)}"
        )
    mask = foreground_mask(targets, anatomies)
    return ssim(outputs * mask, targets * mask, max_values)


class ScoreAggregator:
    """Slice-weighted means of slice scores per (anatomy, acceleration), per acc and overall.

    ``summary()`` gives ``overall`` (mean over every slice), ``acc4``/``acc8`` (mean over the
    slices of that acceleration), ``leaderboard`` (mean of ``acc4`` and ``acc8`` when both are
    present) and ``{anatomy}_acc{N}`` groups. Keys ``(fname, slice)`` may be given to drop repeats
    (e.g. samples padded in by a distributed sampler).
    """

    def __init__(self) -> None:
        self._sums: dict[tuple[str, int], float] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._seen: set[tuple[str, int]] = set()

    def add(
        self,
        scores: torch.Tensor | np.ndarray | Sequence[float],
        anatomies: Sequence[str],
        accs: Sequence[int],
        keys: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        """Add slice scores.

        Args:
            scores: ``(B,)`` slice scores.
            anatomies: ``B`` anatomies.
            accs: ``B`` accelerations (4 or 8; any positive int is kept as its own group).
            keys: optional ``B`` ``(file name, slice index)`` pairs; a pair seen before is skipped.
        """
        values = torch.as_tensor(scores).detach().double().cpu().reshape(-1).tolist()
        if not (len(values) == len(anatomies) == len(accs)) or (keys is not None and len(keys) != len(values)):
            raise ValueError(
                f"ScoreAggregator.add got {len(values)} scores, {len(anatomies)} anatomies, {len(accs)} accs"
                + (f", {len(keys)} keys" if keys is not None else "")
            )
        for i, (value, anatomy, acc) in enumerate(zip(values, anatomies, accs)):
            if keys is not None:
                key = (str(keys[i][0]), int(keys[i][1]))
                if key in self._seen:
                    continue
                self._seen.add(key)
            group = (str(anatomy), int(acc))
            self._sums[group] = self._sums.get(group, 0.0) + value
            self._counts[group] = self._counts.get(group, 0) + 1

    def merge(self, other: "ScoreAggregator") -> None:
        """Add another aggregator's sums and counts (e.g. gathered from other ranks)."""
        for group, total in other._sums.items():
            self._sums[group] = self._sums.get(group, 0.0) + total
            self._counts[group] = self._counts.get(group, 0) + other._counts[group]
        self._seen |= other._seen

    def counts(self) -> dict[str, int]:
        """Slice counts per group name, per acc and ``overall``."""
        out: dict[str, int] = {}
        for (anatomy, acc), n in sorted(self._counts.items()):
            out[f"{anatomy}_acc{acc}"] = n
            out[f"acc{acc}"] = out.get(f"acc{acc}", 0) + n
        out["overall"] = sum(self._counts.values())
        return out

    def summary(self) -> dict[str, float]:
        """Slice-weighted means; empty when nothing was added."""
        out: dict[str, float] = {}
        acc_sums: dict[int, float] = {}
        acc_counts: dict[int, int] = {}
        for (anatomy, acc), total in sorted(self._sums.items()):
            n = self._counts[(anatomy, acc)]
            out[f"{anatomy}_acc{acc}"] = total / n
            acc_sums[acc] = acc_sums.get(acc, 0.0) + total
            acc_counts[acc] = acc_counts.get(acc, 0) + n
        for acc in sorted(acc_sums):
            out[f"acc{acc}"] = acc_sums[acc] / acc_counts[acc]
        if acc_counts:
            out["overall"] = sum(acc_sums.values()) / sum(acc_counts.values())
        if 4 in acc_sums and 8 in acc_sums:
            out["leaderboard"] = (out["acc4"] + out["acc8"]) / 2
        return out


@dataclass(frozen=True)
class _LeaderboardFile:
    acc: str
    name: str
    path: Path
    anatomy: str
    shape: tuple[int, ...]


def _h5_names(folder: Path) -> list[str]:
    return [p.name for p in list_h5(folder)]


def _leaderboard_files(leaderboard_dir: str | Path, expected_count: int | None) -> dict[str, list[_LeaderboardFile]]:
    root = Path(leaderboard_dir)
    if not root.is_dir():
        raise InputError(f"{root}: leaderboard folder not found; expected {root}/{{acc4,acc8}}/image/*.h5")
    if expected_count is not None and expected_count < 1:
        raise InputError(f"expected file count must be >= 1, got {expected_count}")
    plan: dict[str, list[_LeaderboardFile]] = {}
    for acc in ACCS:
        folder = root / acc / "image"
        if not folder.is_dir():
            raise InputError(f"{folder}: folder not found; expected leaderboard images in {{acc4,acc8}}/image")
        names = _h5_names(folder)
        if not names:
            raise InputError(f"{folder}: no .h5 files")
        if expected_count is not None and len(names) != expected_count:
            raise InputError(f"{folder}: holds {len(names)} .h5 files; expected {expected_count}")
        entries = []
        for name in names:
            try:
                info = parse_name(name)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            path = folder / name
            with open_h5(path) as f:
                if TARGET_KEY not in f:
                    raise InputError(f"{path}: dataset {TARGET_KEY!r} not found; keys are {', '.join(f.keys())}")
                shape = tuple(f[TARGET_KEY].shape)
                if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 7:
                    raise InputError(
                        f"{path}: {TARGET_KEY!r} has shape {shape}; expected (S, H, W) with S >= 1 and H, W >= 7"
                    )
                if MAX_ATTR not in f.attrs:
                    raise InputError(f"{path}: attribute {MAX_ATTR!r} not found; it is the SSIM data range")
                maximum = float(np.asarray(f.attrs[MAX_ATTR]).reshape(-1)[0])
                if not (math.isfinite(maximum) and maximum > 0):
                    raise InputError(f"{path}: attrs[{MAX_ATTR!r}] = {maximum}; expected a finite value > 0")
            entries.append(_LeaderboardFile(acc, name, path, info.anatomy, shape))
        plan[acc] = sorted(entries, key=lambda e: sort_key(e.name))
    return plan


def labels_available(leaderboard_dir: str | Path) -> bool:
    """Whether both acc folders hold image files that all have ``image_label`` (needed to score).

    Args:
        leaderboard_dir: the leaderboard folder (``{acc4,acc8}/image/*.h5``).

    Returns:
        True when ``acc4/image`` and ``acc8/image`` are non-empty and every file has the key.
    """
    root = Path(leaderboard_dir)
    for acc in ACCS:
        folder = root / acc / "image"
        files = _h5_names(folder) if folder.is_dir() else []
        if not files:
            return False
        for name in files:
            with open_h5(root / acc / "image" / name) as f:
                if "image_label" not in f:
                    return False
    return True


def check_submission(
    leaderboard_dir: str | Path,
    recon_dir: str | Path,
    key: str = RECON_KEY,
    expected_count: int | None = None,
) -> dict[str, list[str]]:
    """Check a reconstruction folder against the leaderboard before scoring it.

    Requires ``RECON/{acc4,acc8}/<name>.h5`` for every leaderboard file and no other ``.h5``
    files, each with dataset ``key``, dtype float32 and the shape of the leaderboard's
    ``image_label`` (``(S, 384, 384)`` on the challenge data, the data set's crop elsewhere).

    Args:
        leaderboard_dir: leaderboard root holding ``acc4/image`` and ``acc8/image``.
        recon_dir: reconstruction root holding ``acc4`` and ``acc8``.
        key: dataset name of the reconstructions.
        expected_count: if given, the number of files required per acc folder (58 on the challenge).

    Returns:
        The checked file names per acc folder, in evaluation order (brain, then knee, by number).

    Raises:
        InputError: one line naming the folder, file, key, dtype or shape at fault.
    """
    plan = _checked_plan(leaderboard_dir, recon_dir, key, expected_count)
    return {acc: [e.name for e in plan[acc]] for acc in ACCS}


def _checked_plan(
    leaderboard_dir: str | Path, recon_dir: str | Path, key: str, expected_count: int | None
) -> dict[str, list[_LeaderboardFile]]:
    plan = _leaderboard_files(leaderboard_dir, expected_count)
    root = Path(recon_dir)
    if not root.is_dir():
        raise InputError(f"{root}: reconstruction folder not found; expected {root}/{{acc4,acc8}}/<name>.h5")
    for acc in ACCS:
        folder = root / acc
        if not folder.is_dir():
            raise InputError(f"{folder}: folder not found; expected one reconstruction per leaderboard file")
        have = set(_h5_names(folder))
        want = [e.name for e in plan[acc]]
        missing = [n for n in want if n not in have]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(f"{folder}: missing {missing[0]}{more}; expected one file per leaderboard file")
        extra = sorted(have - set(want))
        if extra:
            raise InputError(f"{folder / extra[0]}: no leaderboard file of that name in {acc}/image")
        for entry in plan[acc]:
            path = folder / entry.name
            with open_h5(path) as f:
                if key not in f:
                    raise InputError(f"{path}: dataset {key!r} not found; keys are {', '.join(f.keys()) or 'none'}")
                dset = f[key]
                if not isinstance(dset, h5py.Dataset):
                    raise InputError(f"{path}: {key!r} is a group; expected a float32 dataset")
                if dset.dtype != np.float32:
                    raise InputError(f"{path}: {key!r} has dtype {dset.dtype}; expected float32")
                if tuple(dset.shape) != entry.shape:
                    raise InputError(
                        f"{path}: {key!r} has shape {tuple(dset.shape)}; expected {entry.shape} "
                        f"like {TARGET_KEY} of {entry.path}"
                    )
    return plan


Reader = Callable[[_LeaderboardFile, h5py.File], np.ndarray]


def _score(plan: dict[str, list[_LeaderboardFile]], read: Reader, device: str | torch.device) -> dict:
    """Score every slice of the plan; ``read`` returns the (S, H, W) image to score for a file."""
    agg = ScoreAggregator()
    per_file: dict[str, dict[str, float]] = {acc: {} for acc in ACCS}
    for acc in ACCS:
        acc_n = int(acc[3:])
        for entry in plan[acc]:
            with open_h5(entry.path) as f:
                target = np.asarray(f[TARGET_KEY][()], dtype=np.float32)
                maximum = float(np.asarray(f.attrs[MAX_ATTR]).reshape(-1)[0])
                recon = read(entry, f)
            if not np.all(np.isfinite(recon)):
                raise InputError(f"{entry.acc}/{entry.name}: the image to score holds NaN or inf values")
            t = torch.from_numpy(target).to(device)
            r = torch.from_numpy(np.ascontiguousarray(recon, dtype=np.float32)).to(device)
            with torch.no_grad():
                scores = score_slices(r, t, maximum, entry.anatomy)
            agg.add(scores, [entry.anatomy] * len(scores), [acc_n] * len(scores))
            per_file[acc][entry.name] = float(scores.double().mean())
            logger.debug("%s/%s: %d slices, mean SSIM %.6f", acc, entry.name, len(scores), per_file[acc][entry.name])
    summary = agg.summary()
    counts = agg.counts()
    groups = {k: v for k, v in summary.items() if "_acc" in k}
    return {
        "acc4": summary["acc4"],
        "acc8": summary["acc8"],
        "leaderboard": summary["leaderboard"],
        "slices": {acc: counts[acc] for acc in ACCS},
        "groups": groups,
        "per_file": per_file,
    }


def evaluate_folder(
    leaderboard_dir: str | Path,
    recon_dir: str | Path,
    key: str = RECON_KEY,
    expected_count: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Official 2025 leaderboard SSIM of a reconstruction folder.

    Args:
        leaderboard_dir: leaderboard root (``acc4/image``, ``acc8/image``).
        recon_dir: reconstruction root (``acc4``, ``acc8``), checked by :func:`check_submission`.
        key: dataset name of the reconstructions.
        expected_count: files required per acc folder (58 for the challenge), or None.
        device: torch device to compute on.

    Returns:
        ``{"acc4", "acc8", "leaderboard"}`` floats, ``"slices"`` (count per acc), ``"groups"``
        (``{anatomy}_acc{N}`` slice-weighted means) and ``"per_file"`` (acc -> name -> mean SSIM).

    Raises:
        InputError: the submission or the leaderboard folder is malformed, or a reconstruction
            holds NaN/inf.
    """
    plan = _checked_plan(leaderboard_dir, recon_dir, key, expected_count)
    root = Path(recon_dir)

    def read(entry: _LeaderboardFile, _: h5py.File) -> np.ndarray:
        path = root / entry.acc / entry.name
        with open_h5(path) as f:
            return np.asarray(f[key][()])

    return _score(plan, read, device)


def evaluate_baselines(
    leaderboard_dir: str | Path,
    expected_count: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Scores of the baselines stored in the leaderboard files themselves.

    ``zero_filled`` scores ``image_input`` (aliased RSS), ``grappa`` scores ``image_grappa``; both
    are cast to float32 as a submission would be.

    Args:
        leaderboard_dir: leaderboard root.
        expected_count: files required per acc folder, or None.
        device: torch device to compute on.

    Returns:
        ``{"zero_filled": result, "grappa": result}``, each shaped like :func:`evaluate_folder`'s.

    Raises:
        InputError: a baseline dataset is missing or its shape differs from ``image_label``.
    """
    plan = _leaderboard_files(leaderboard_dir, expected_count)
    results: dict[str, dict] = {}
    for name, dataset in BASELINES.items():

        def read(entry: _LeaderboardFile, f: h5py.File, dataset: str = dataset) -> np.ndarray:
            if dataset not in f:
                raise InputError(f"{entry.path}: dataset {dataset!r} not found; needed for the baseline scores")
            data = np.asarray(f[dataset][()])
            if data.shape != entry.shape or not np.issubdtype(data.dtype, np.floating):
                raise InputError(
                    f"{entry.path}: {dataset!r} has shape {data.shape} and dtype {data.dtype}; "
                    f"expected a real float array of shape {entry.shape}"
                )
            return data.astype(np.float32, copy=False)

        results[name] = _score(plan, read, device)
    return results


def write_remasked_leaderboard(leaderboard_dir: str | Path, out_dir: str | Path, kind: str,
                               cfg: "RemaskConfig | None" = None) -> dict[str, list[int]]:
    """A copy of a leaderboard folder whose k-space files carry a re-masked validation mask.

    ``OUT/{acc4,acc8}/kspace/<name>.h5`` hold ``mask = remask(name, W, acc, kind, cfg)``, the original's
    attributes and, as HDF5 external links to the original file, every other dataset (so the copy takes
    no disk); ``OUT/{acc4,acc8}/image/<name>.h5`` are symbolic links to the
    original image files (labels, GRAPPA images for the classifier). The k-space itself is the
    original, fully sampled one: inference applies the new mask to it.

    Args:
        leaderboard_dir: the leaderboard folder (``{acc4,acc8}/kspace``, ``image`` optional).
        out_dir: where the copy goes (created; must not hold files yet).
        kind: ``equispaced`` or ``random`` (see :mod:`recon.engine.remask`).
        cfg: the re-masking settings (seed, ACS fraction); the validation's defaults when None.

    Returns:
        ``<acc folder>/<name>`` -> the columns the new mask keeps, for every copied file.

    Raises:
        InputError: a bad leaderboard folder or file, an out folder that already holds files, or a width
            too small for a non-public mask.
    """
    from recon.data.layout import discover_leaderboard
    from recon.engine.remask import remask
    from recon.engine.stage import RemaskConfig

    cfg = cfg or RemaskConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: already holds files; a re-masked copy needs an empty folder")
    kept: dict[str, list[int]] = {}
    for acc_dir, pairs in discover_leaderboard(leaderboard_dir, require_image=None).items():
        for pair in pairs:
            dest = out / acc_dir / "kspace" / pair.name
            with open_h5(pair.kspace) as f:
                if "mask" not in f:
                    raise InputError(f"{pair.kspace}: dataset 'mask' not found; keys are {', '.join(f.keys())}")
                shape, dtype = tuple(f["mask"].shape), f["mask"].dtype
                width = int(shape[-1])
            try:
                mask = remask(pair.name, width, pair.acc, kind, cfg)
            except ValueError as exc:
                raise InputError(f"{pair.kspace}: {exc}") from None
            source = Path(pair.kspace).resolve()
            with atomic_path(dest) as tmp:
                with h5py.File(tmp, "w-") as f, open_h5(source) as src:
                    for name in src:  # the k-space and anything else, linked: the copy costs no disk
                        if name != "mask":
                            f[name] = h5py.ExternalLink(str(source), name)
                    f.attrs.update(dict(src.attrs))
                    f.create_dataset("mask", data=mask.reshape(shape).astype(dtype), track_times=False)
            if pair.image is not None:
                link = out / acc_dir / "image" / pair.name
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(Path(pair.image).resolve(), link)
            kept[f"{acc_dir}/{pair.name}"] = [int(i) for i in np.flatnonzero(mask)]
    return kept
