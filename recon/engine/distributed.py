"""Data-parallel context: single process by default, ``torch.distributed`` under ``torchrun``.

The engine asks this module which rank it is, which training slices are its own, and to
average gradients. Gradients are all-reduced explicitly after each step's backward pass instead of
through a DDP wrapper, because in the 4-expert mixture only the routed expert runs: parameters
that no rank used in a step keep ``grad=None`` (so AdamW skips them, exactly as in one process),
and parameters that some rank used are averaged over all ranks (zeros where a rank did not use
them). With ``world_size`` ranks at batch size b this reproduces one process at batch size
``world_size * b`` on the same global order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True under ``torchrun`` with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, order: list[int]) -> list[int]:
        """This rank's share of the epoch's global order; every rank gets the same count.

        The order is padded by repeating its head to a multiple of ``world_size``; rank r takes
        positions ``r, r + world_size, ...``, so step t of all ranks together covers the same
        slices as step t of a single process at ``world_size`` times the batch size.
        """
        if not self.enabled or not order:
            return order
        pad = (-len(order)) % self.world_size
        padded = order + order[:pad]
        return padded[self.rank::self.world_size]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module used for training (gradients are synchronised by :meth:`sync_gradients`)."""
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        """Average gradients over ranks, leaving parameters no rank used at ``grad=None``."""
        if not self.enabled:
            return
        import torch.distributed as tdist

        params = [p for p in model.parameters() if p.requires_grad]
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        tdist.all_reduce(used)
        active = [p for p, u in zip(params, used.tolist()) if u > 0]
        if not active:
            return
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in active
        ])
        tdist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in active:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks (identity in one process)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()


_CONTEXT: DistContext | None = None


def context() -> DistContext:
    """The process's context: initialises the process group once when ``WORLD_SIZE > 1``.

    ``gloo`` on CPU, ``nccl`` when CUDA is available; each rank uses ``cuda:LOCAL_RANK``.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local, device=device)
    return _CONTEXT
