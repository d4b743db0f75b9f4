"""Exact activation checkpointing of model regions, and a hook for the memory probe to observe them.

A *region* is a function of tensors (the sensitivity network, one cascade, one coil of the sensitivity U-Net)
whose activations may be dropped after the forward and recomputed in the backward. Checkpointing is the
non-reentrant kind (``use_reentrant=False``), which gives bit-identical gradients as long as a region is a pure
function of its arguments: the model never mutates a tensor or a container it received (docs/promptmr.md P1).

The memory probe (:mod:`recon.engine.memory`) installs a :class:`RegionObserver` with :func:`observe_regions`; while one
is installed regions run without checkpointing and report where they begin and end, so the probe can attribute
every tensor autograd saves to the region that would recompute it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Protocol, TypeVar

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

T = TypeVar("T")


class RegionObserver(Protocol):
    """Receives region boundaries during a forward pass (used by the memory probe)."""

    def enter(self, name: str, args: tuple[Any, ...], checkpointed: bool) -> None:
        """A region starts; ``args`` are its inputs; ``checkpointed`` says whether it would be checkpointed."""

    def exit(self, name: str) -> None:
        """The region that started last ends."""


_OBSERVER: ContextVar[RegionObserver | None] = ContextVar("recon_region_observer", default=None)


@contextmanager
def observe_regions(observer: RegionObserver) -> Iterator[None]:
    """Report region boundaries to ``observer`` (and disable checkpointing) inside the ``with`` block."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def run_region(name: str, fn: Callable[..., T], *args: Any, checkpoint: bool) -> T:
    """Call ``fn(*args)``, checkpointed when asked and a graph is being recorded.

    Args:
        name: label of the region (for the memory probe).
        fn: a pure function of ``args`` (it must not modify them).
        *args: tensors or nested tuples of tensors.
        checkpoint: drop the region's activations and recompute them in the backward.

    Returns:
        ``fn(*args)``.
    """
    observer = _OBSERVER.get()
    if observer is not None:
        observer.enter(name, args, checkpoint)
        try:
            return fn(*args)
        finally:
            observer.exit(name)
    if checkpoint and torch.is_grad_enabled():
        # The model draws no random numbers, so the RNG state need not be saved and restored.
        return _checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)  # type: ignore[return-value]
    return fn(*args)
