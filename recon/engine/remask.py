"""Re-masked validation: the validation files under masks that are not the public pattern.

Validation files carry the public mask (docs/challenge.md 1.2), which is the distribution the Hacker
is trained for. The Helper exists for the other masks, so every reconstruction stage also scores the
same fully sampled validation k-space under, per file:

* ``equispaced``: every ``acc``-th column from a start other than the public ``(W // 2) % acc``;
* ``random``: columns kept i.i.d. with probability ``1 / acc``;

both at the file's acceleration and with a centred ACS block of ``round(center_fraction * W)``
columns. A file's mask of one kind is drawn from ``derive_seed(validation.remask.seed, "remask",
file name, kind)`` only, never from a global generator, so every epoch, process, rank and stage sees
the same masks for the same settings (:meth:`recon.engine.stage.RemaskConfig.protocol` names them).
A drawn mask equal to the public pattern (of its width, at any challenge acceleration) is never
used: an equispaced start moves on to the next start, a random mask is drawn again.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from recon.data.dataset import SliceDataset
from recon.data.names import expert_name
from recon.engine.stage import RemaskConfig, StageConfig
from recon.engine.transform import TrainItem
from recon.masks import acs_width, equispaced_mask, public_mask, public_start, random_mask
from recon.seeding import derive_seed

#: accelerations whose public pattern a re-mask must differ from (the challenge's two)
PUBLIC_ACCS = (4, 8)
# Redraws of a random mask that equals a public pattern; only degenerate tiny widths get near it.
_MAX_REDRAWS = 1000


def _public_patterns(width: int, n_acs: int) -> list[np.ndarray]:
    pats = [public_mask(width, acc) != 0 for acc in PUBLIC_ACCS]
    pats += [equispaced_mask(width, acc, public_start(width, acc), n_acs=n_acs) != 0 for acc in PUBLIC_ACCS]
    return pats


def _is_public(mask: np.ndarray, publics: list[np.ndarray]) -> bool:
    return any(np.array_equal(mask != 0, pub) for pub in publics)


def remask(fname: str, width: int, acc: int, kind: str, cfg: RemaskConfig) -> np.ndarray:
    """The re-masked validation mask of one file and kind (deterministic, see the module docstring).

    Args:
        fname: the file name (e.g. ``brain_acc4_3.h5``), part of the seed.
        width: k-space width W.
        acc: the file's acceleration.
        kind: ``equispaced`` or ``random``.
        cfg: the re-masking settings (seed, ACS fraction).

    Returns:
        ``float32`` 0/1 column mask ``(W,)``, never a public pattern.

    Raises:
        ValueError: an unknown kind, or a width too small to hold a non-public mask.
    """
    rng = np.random.default_rng(derive_seed(cfg.seed, "remask", fname, kind))
    n_acs = acs_width(width, cfg.center_fraction)
    publics = _public_patterns(width, n_acs)
    if kind == "equispaced":
        first = int(rng.integers(acc))
        for step in range(acc):
            start = (first + step) % acc
            if start == public_start(width, acc):
                continue  # the public start: take the next one
            mask = equispaced_mask(width, acc, start, n_acs=n_acs)
            if not _is_public(mask, publics):
                break
        else:
            raise ValueError(f"{fname}: every equispaced start of W={width}, acc={acc} gives a public pattern")
        assert start != public_start(width, acc) and not _is_public(mask, publics)
        return mask
    if kind == "random":
        for _ in range(_MAX_REDRAWS):
            mask = random_mask(width, acc, rng, n_acs=n_acs)
            if not _is_public(mask, publics):
                return mask
        raise ValueError(f"{fname}: no non-public random mask for W={width}, acc={acc} in {_MAX_REDRAWS} draws")
    raise ValueError(f"re-mask kind must be equispaced or random, got {kind!r}")


class RemaskedDataset(Dataset):
    """Every validation slice once per re-mask kind, as :class:`TrainItem` (file label, no augmentation).

    Item ``i`` is slice ``i // len(kinds)`` of ``base`` under kind ``kinds[i % len(kinds)]``;
    ``mask_kind`` names the kind, ``acc`` is the file's acceleration (the mask is drawn at it), and
    the MoE routes on it. Masks are computed once per (file, kind) and kept.

    Args:
        base: the validation slices (file masks, stored labels).
        cfg: the stage configuration (``validation.remask``).
        slices: how many of ``base``'s slices to use (``data.max_val_slices``); all when None.
    """

    def __init__(self, base: SliceDataset, cfg: StageConfig, slices: int | None = None) -> None:
        self.base = base
        self.cfg = cfg.validation.remask
        self.kinds = tuple(self.cfg.kinds)
        self.slices = len(base) if slices is None else min(slices, len(base))
        self._masks: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.slices * len(self.kinds)

    def base_index(self, index: int) -> int:
        """The validation slice of item ``index``."""
        return index // len(self.kinds)

    def mask_for(self, fname: str, width: int, acc: int, kind: str) -> torch.Tensor:
        """The (cached) re-mask of one file and kind as a tensor ``(W,)``."""
        key = (fname, kind)
        if key not in self._masks:
            self._masks[key] = torch.from_numpy(remask(fname, width, acc, kind, self.cfg))
        return self._masks[key]

    def __getitem__(self, index: int) -> TrainItem:
        sample = self.base[self.base_index(index)]
        if sample.target is None:
            raise ValueError(f"{sample.fname}: re-masked validation needs the image file's target (image_label)")
        kind = self.kinds[index % len(self.kinds)]
        mask = self.mask_for(sample.fname, int(sample.mask.shape[-1]), int(sample.acc), kind)
        kspace = sample.kspace
        return TrainItem(
            masked_kspace=kspace * mask.to(kspace.real.dtype), mask=mask.clone(), target=sample.target.float(),
            max_value=float(sample.max_value), anatomy=sample.anatomy, acc=int(sample.acc),
            expert=expert_name(sample.anatomy, int(sample.acc)), fname=sample.fname,
            slice_idx=int(sample.slice_idx), index=index, mask_kind=kind, augmented=False,
        )

    def indices_for_rank(self, rank: int, world_size: int) -> list[int]:
        """Items of whole volumes owned by ``rank`` (as the plain validation pass shards them)."""
        return [i for i in range(len(self)) if self.base.index[self.base_index(i)][0] % world_size == rank]

    def batches(self, indices: list[int], size: int) -> Iterator[list[TrainItem]]:
        """``indices`` in batches of ``size`` items."""
        for start in range(0, len(indices), size):
            yield [self[i] for i in indices[start:start + size]]


def stats_key(item: TrainItem) -> str:
    """The statistics key of a re-masked item: ``<kind>:<expert>``."""
    return f"{item.mask_kind}:{item.expert}"
