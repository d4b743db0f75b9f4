"""The 4-expert mixture: one PromptMR+ per (anatomy, acceleration), routed per slice.

Only the routed expert runs (and, in training, receives gradients), as in the team's
``MixtureOfPromptMR``. Routing is explicit: callers pass the expert name.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recon.data.names import EXPERTS
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR


class MixtureOfExperts(nn.Module):
    """Several PromptMR+ experts with the same configuration, keyed by name.

    Args:
        cfg: the network configuration shared by every expert.
        experts: expert names, by default ``brain_acc4, brain_acc8, knee_acc4, knee_acc8``.
    """

    def __init__(self, cfg: PromptMRConfig, experts: Sequence[str] = EXPERTS) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = tuple(experts)
        self.experts = nn.ModuleDict({name: PromptMR(cfg) for name in self.names})

    def expert(self, name: str) -> PromptMR:
        """The expert called ``name`` (``ValueError`` for an unknown name)."""
        if name not in self.experts:
            raise ValueError(f"unknown expert {name!r}; experts are {', '.join(self.names)}")
        return self.experts[name]  # type: ignore[return-value]

    def forward(self, expert: str, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies):  # noqa: D102
        return self.expert(expert)(masked_kspace, mask, num_low_frequencies)
