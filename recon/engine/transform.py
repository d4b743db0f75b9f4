"""The per-sample training transform: mask augmentation, MRAugment, masking, target rule.

Every random draw of a sample comes from a generator derived from ``(seed, epoch, index, stream)``
(:func:`recon.seeding.sample_rng`), so a sample's augmentation does not depend on the number of
DataLoader workers, the order in which they run, or on whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from recon.augment.mask_aug import MaskAugmenter
from recon.augment.mraugment import MRAugmenter
from recon.data.dataset import Sample, SliceDataset
from recon.data.names import ANATOMIES, expert_name
from recon.engine.stage import StageConfig
from recon.masks import infer_acc
from recon.schedules import prob_at
from recon.seeding import sample_rng


@dataclass
class TrainItem:
    """One model-ready sample.

    Attributes:
        masked_kspace: complex64 ``(A, C, H, W)``: the (augmented) k-space times the mask.
        mask: float32 ``(W,)`` column mask applied.
        target: float32 ``(h, w)`` target image.
        max_value: the SSIM data range (``attrs['max']`` of the volume).
        anatomy: ``brain`` or ``knee`` (from the file name).
        acc: acceleration of the applied mask.
        expert: ``{anatomy}_acc{acc}`` (the MoE routing key).
        fname: file name.
        slice_idx: slice index in the volume.
        index: index in the dataset.
        mask_kind: how the mask was chosen (``file``, ``public``, ``random``, ``equispaced``).
        augmented: whether MRAugment changed the sample.
    """

    masked_kspace: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    max_value: float
    anatomy: str
    acc: int
    expert: str
    fname: str
    slice_idx: int
    index: int
    mask_kind: str
    augmented: bool


class StageTransform:
    """Turns a :class:`Sample` into a :class:`TrainItem` for one epoch.

    Args:
        cfg: the stage configuration.
        train: training (augmentations on) or validation (the file's mask, the stored label).
    """

    def __init__(self, cfg: StageConfig, train: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.mask_aug = MaskAugmenter(cfg.mask_aug)
        self.mraugment = MRAugmenter(cfg.mraugment)
        self.aug_schedules = {a: cfg.mraugment.schedule_for(a, cfg.p_aug) for a in ANATOMIES}

    @property
    def aug_per_anatomy(self) -> bool:
        """Whether the anatomies' ``p_aug`` schedules differ (``mraugment.{brain,knee}.schedule``)."""
        return len(set(self.aug_schedules.values())) > 1

    def probabilities(self, epoch: int) -> tuple[float, float]:
        """``(p_mask, p_aug)`` at an epoch (0 for validation); ``p_aug`` of the stage's ``p_aug`` schedule."""
        if not self.train:
            return 0.0, 0.0
        p_aug = prob_at(self.cfg.p_aug, epoch) if self.cfg.mraugment.enabled else 0.0
        return prob_at(self.cfg.p_mask, epoch), p_aug

    def aug_probability(self, anatomy: str, epoch: int) -> float:
        """MRAugment's ``p`` for a slice of ``anatomy`` at an epoch (0 for validation or when off)."""
        if not (self.train and self.cfg.mraugment.enabled):
            return 0.0
        return prob_at(self.aug_schedules[anatomy], epoch)

    def __call__(self, sample: Sample, epoch: int, index: int) -> TrainItem:
        if sample.target is None:
            raise ValueError(f"{sample.fname}: training needs the image file's target (image_label)")
        kspace, target = sample.kspace, sample.target
        file_mask = sample.mask.numpy()
        mask_kind, augmented = "file", False
        if self.train:
            p_mask, _ = self.probabilities(epoch)
            p_aug = self.aug_probability(sample.anatomy, epoch)
            seed = self.cfg.seed
            decision = self.mask_aug(file_mask, epoch, p_mask, sample_rng(seed, epoch, index, "mask"))
            mask_np, acc, mask_kind = decision.mask, decision.acc, decision.kind
            if self.cfg.mraugment.enabled and (p_aug > 0 or self.cfg.mraugment.target == "rss"):
                result = self.mraugment(kspace, target, sample.anatomy, p_aug, sample_rng(seed, epoch, index, "mraugment"))
                kspace, target, augmented = result.kspace, result.target, result.augmented
        else:
            mask_np, acc = file_mask, infer_acc(file_mask)
        mask = torch.from_numpy(np.ascontiguousarray(mask_np, dtype=np.float32))
        route_acc = acc if self.cfg.moe.route_acc_from == "mask" else sample.acc
        return TrainItem(
            masked_kspace=kspace * mask.to(kspace.real.dtype),
            mask=mask,
            target=target.float(),
            max_value=float(sample.max_value),
            anatomy=sample.anatomy,
            acc=int(acc),
            expert=expert_name(sample.anatomy, int(route_acc)),
            fname=sample.fname,
            slice_idx=int(sample.slice_idx),
            index=index,
            mask_kind=mask_kind,
            augmented=bool(augmented),
        )


class EpochDataset(Dataset):
    """A :class:`SliceDataset` seen through a :class:`StageTransform` at a given epoch.

    ``set_epoch`` must be called before each epoch's DataLoader iterator is created (workers get
    a copy of the dataset, epoch included, when the iterator starts).
    """

    def __init__(self, base: SliceDataset, transform: StageTransform) -> None:
        self.base = base
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iterator uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> TrainItem:
        return self.transform(self.base[index], self.epoch, index)


def collate_items(items: list[TrainItem]) -> list[TrainItem]:
    """Keep items as a list (the loop stacks equal shapes itself)."""
    return items
