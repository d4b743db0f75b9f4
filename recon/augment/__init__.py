"""Training-time augmentation: k-space mask re-drawing (Hacker/Helper) and MRAugment.

Both are pure per-sample functions of their inputs and an explicit ``numpy.random.Generator``.
"""

from recon.augment.mask_aug import MASK_AUG_MODES, MaskAugConfig, MaskAugmenter, MaskDecision
from recon.augment.mraugment import (
    BRAIN,
    KNEE,
    TRANSFORMS,
    AnatomyAugConfig,
    AugResult,
    MRAugmentConfig,
    MRAugmenter,
)

__all__ = [
    "BRAIN",
    "KNEE",
    "MASK_AUG_MODES",
    "TRANSFORMS",
    "AnatomyAugConfig",
    "AugResult",
    "MRAugmentConfig",
    "MRAugmenter",
    "MaskAugConfig",
    "MaskAugmenter",
    "MaskDecision",
]
