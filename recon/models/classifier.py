"""The brain/knee classifier: a torchvision ResNet50 with a 1-channel stem and 2 logits.

The team fed raw ``image_grappa`` slices (values around 1e-4) to the network; here every slice is
standardised on its own (zero mean, unit standard deviation) before it goes in, so the
classifier does not depend on the scanner's intensity scale. Class 0 is brain, class 1 is knee.
A file's label is the argmax of the logits summed over its slices (the team's file-level vote).

Training loss (:func:`slice_losses`): ``bce`` is the team's ``BCEWithLogits`` on one-hot targets, two
independent sigmoids, one per logit; ``ce`` is softmax cross-entropy over the 2 logits. They are not
the same function (BCE also pushes the two logits apart in absolute terms, CE only their difference),
but both rank a slice by ``argmax`` of its logits, so the file vote reads either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from recon.errors import InputError

CLASSES = ("brain", "knee")
LossKind = Literal["bce", "ce"]


@dataclass(frozen=True)
class ClassifierConfig:
    """The classifier network.

    Attributes:
        arch: torchvision architecture; ``resnet50`` as the team (Bottleneck blocks [3, 4, 6, 3]).
        in_channels: input channels (1: one magnitude slice).
        num_classes: 2 (brain, knee).
        normalise: ``per_slice`` standardisation (default) or ``none`` (the team's raw input).
        seed: weight initialisation seed (global RNG state is left untouched).
    """

    arch: Literal["resnet18", "resnet50"] = "resnet50"
    in_channels: int = 1
    num_classes: int = 2
    normalise: Literal["per_slice", "none"] = "per_slice"
    seed: int = 430

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, stored in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierConfig":
        """Build from plain data, refusing unknown keys."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"classifier config: unknown key {unknown[0]!r}")
        return cls(**data)


def normalise_slices(x: torch.Tensor, mode: str = "per_slice") -> torch.Tensor:
    """Standardise each slice of ``x`` (B, 1, H, W) to zero mean and unit std (eps-guarded)."""
    if x.ndim != 4:
        raise ValueError(f"classifier input must be (B, 1, H, W), got shape {tuple(x.shape)}")
    if mode == "none":
        return x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-12)


class SliceClassifier(nn.Module):
    """ResNet with a 1-channel stem; ``forward`` normalises then returns logits (B, num_classes)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        # torchvision is imported here so that the rest of recon works without it
        from torchvision import models

        self.cfg = cfg
        builder = getattr(models, cfg.arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = builder(weights=None, num_classes=cfg.num_classes)
            net.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for slices ``x`` (B, 1, H, W)."""
        return self.net(normalise_slices(x, self.cfg.normalise))


def slice_losses(logits: torch.Tensor, labels: torch.Tensor, kind: LossKind) -> torch.Tensor:
    """The classification loss of each slice, ``(B,)``; its mean is the batch loss.

    Args:
        logits: ``(B, num_classes)``.
        labels: ``(B,)`` class indices (0 brain, 1 knee).
        kind: ``bce`` (BCE-with-logits on one-hot targets, averaged over the classes, so the batch
            mean equals torch's default ``BCEWithLogitsLoss()`` the team used) or ``ce`` (cross-entropy).

    Returns:
        One loss per slice.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if kind == "bce":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
    raise ValueError(f"classifier loss must be 'bce' or 'ce', got {kind!r}")


@torch.no_grad()
def classify_volume(model: SliceClassifier, slices: torch.Tensor, batch_size: int = 16) -> tuple[str, torch.Tensor]:
    """File-level decision: argmax of the logits summed over all slices.

    Args:
        model: the classifier (put in eval mode by the caller).
        slices: ``(S, 1, H, W)`` float images (``image_grappa``).
        batch_size: slices per forward pass.

    Returns:
        The anatomy (``brain`` or ``knee``) and the summed logits (num_classes,).
    """
    total = None
    device = next(model.parameters()).device
    for start in range(0, slices.shape[0], batch_size):
        logits = model(slices[start:start + batch_size].to(device)).float().sum(dim=0)
        total = logits if total is None else total + logits
    if total is None:
        raise ValueError("classify_volume needs at least one slice")
    return CLASSES[int(total.argmax())], total.cpu()
