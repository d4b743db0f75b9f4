"""Peak memory of one PromptMR+ training step (forward, loss, backward, AdamW step), for pruning tuning trials.

Two modes:

* **CUDA, measured**: a real step on the GPU; the figure is ``torch.cuda.max_memory_allocated`` of the second
  of two steps (so the AdamW state exists), minus nothing: it includes weights, state, input and activations.
* **CPU/meta, estimated**: the model runs once on the ``meta`` device (shapes only, no arithmetic, no memory;
  every op the model uses, FFTs and bilinear interpolation included, has a meta kernel). A
  ``saved_tensors_hooks`` pack hook records each tensor autograd saves, counted once per storage, and the
  model's checkpoint regions (:mod:`recon.models.checkpointing`) report where they begin and end. The estimate
  is::

      peak = weights + gradients + AdamW state (2 per trainable weight) + input
             + residual saved tensors (everything without checkpointing; with it, the tensors saved outside
               checkpointed regions plus the inputs each region keeps for its recompute)
             + the largest recompute (the saved tensors of one checkpointed region, recursively for nested
               regions, excluding storages already counted).

  It ignores transient temporaries and activation gradients during the backward. Against the live-tensor peak
  measured by ``experiments/benchmarks/model_step.py --live-peak`` (profiler allocation events) it was within
  -1 % (no checkpointing) and +8 % (checkpointing) at 8 coils 320x320 with 5 slices, and within 5 % at
  160x160 with and without per-coil regions. One call costs about 1-4 s of CPU (the meta kernels of bilinear
  interpolation are Python decompositions; per-coil sensitivity regions run the U-Net once per coil); results
  are cached per (configuration, shape, dtype).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from recon.models.checkpointing import observe_regions
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, in bytes.

    Attributes:
        peak_bytes: the peak (measured on CUDA; the sum of the parts below otherwise).
        saved_bytes: bytes autograd keeps between forward and backward (unique storages); with checkpointing
            the residual outside the checkpointed regions, including the inputs kept for recomputation.
        params_bytes: all weights, fixed prompts included.
        grads_bytes: gradients of the trainable weights.
        optimizer_bytes: AdamW state (``exp_avg`` and ``exp_avg_sq``).
        recompute_bytes: largest set of tensors re-saved while one checkpointed region is recomputed (0 without
            checkpointing).
        input_bytes: the masked k-space and the mask not already counted in ``saved_bytes``.
        measured: True when ``peak_bytes`` was measured on a device, False for the meta-device estimate.
        device: the device the figure is for.
        oom: the measured step ran out of device memory (``peak_bytes`` is then the device capacity + 1).
    """

    peak_bytes: int
    saved_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    recompute_bytes: int
    input_bytes: int
    measured: bool
    device: str
    oom: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)


def probe_training_step(cfg: PromptMRConfig, coils: int, height: int, width: int, device: str | torch.device = "cpu",
                        batch_size: int = 1, dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    """Peak memory of one training step of ``PromptMR(cfg)`` on a ``(batch_size, A, coils, height, width)`` input.

    Args:
        cfg: model configuration (its checkpointing switches are honoured).
        coils: number of coils C.
        height: k-space height H.
        width: k-space width W.
        device: ``"cuda"``/``"cuda:N"`` to measure a real step; ``"cpu"`` or ``"meta"`` to estimate.
        batch_size: batch size B.
        dtype: real dtype of the weights (the k-space is the matching complex dtype).

    Returns:
        The :class:`MemoryEstimate`.

    Raises:
        ValueError: a size is not positive or the dtype is not float32/float64.
    """
    if min(coils, height, width, batch_size) < 1:
        raise ValueError(f"probe_training_step: sizes must be >= 1, got B={batch_size} C={coils} "
                         f"H={height} W={width}")
    if dtype not in _COMPLEX_OF:
        raise ValueError(f"probe_training_step: dtype must be float32 or float64, got {dtype}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return _measure_cuda(cfg, coils, height, width, dev, batch_size, dtype)
    return _estimate(cfg, coils, height, width, batch_size, dtype)


def autograd_saved_bytes(model: PromptMR, masked_kspace: torch.Tensor, mask: torch.Tensor,
                         num_low_frequencies: int | torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves during one real forward (unique storages), as the benchmark reports them.

    Weights that autograd saves (convolution weights, prompts) are not counted. With checkpointing on, only
    tensors saved outside the checkpointed regions are seen (the inputs the regions keep are not saved tensors
    and are not included).

    Args:
        model: the model (its own checkpointing settings apply).
        masked_kspace: input, see :meth:`PromptMR.forward`.
        mask: column mask.
        num_low_frequencies: ACS width or -1.

    Returns:
        ``(saved bytes, image)``; the image output keeps the graph alive for a backward.
    """
    seen: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    keep: list[torch.Tensor] = []  # a freed storage's address can be reused; hold every counted one

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            seen[storage._cdata] = storage.nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        image = model(masked_kspace, mask, num_low_frequencies).image
    return sum(seen.values()), image


# ----- estimate on the meta device ----------------------------------------------------------------------------
@dataclass
class _Region:
    name: str
    checkpointed: bool
    parent: "_Region | None"
    saved: dict[int, int] = field(default_factory=dict)
    children: list["_Region"] = field(default_factory=list)

    def holder(self) -> "_Region":
        """The innermost checkpointed region (or the root) that owns tensors saved here."""
        node: _Region = self
        while node.parent is not None and not node.checkpointed:
            node = node.parent
        return node


class _Tracker:
    """Region observer + pack hook: attributes every saved storage to the region that would recompute it."""

    def __init__(self, weights: set[int]) -> None:
        self.root = _Region("root", True, None)
        self.stack = [self.root]
        self.weights = weights
        # Storages are keyed by address; holding every counted tensor keeps the addresses unique. Regions run
        # without checkpointing here, so nothing else would keep a region's inputs alive.
        self.keep: list[torch.Tensor] = []

    def enter(self, name: str, args: tuple[Any, ...], checkpointed: bool) -> None:
        parent = self.stack[-1]
        node = _Region(name, checkpointed, parent)
        parent.children.append(node)
        if checkpointed:
            # A checkpoint keeps its inputs alive for the recompute; they belong to the enclosing graph.
            keeper = parent.holder().saved
            for t in _tensors(args):
                storage = t.untyped_storage()
                if storage._cdata not in self.weights:
                    keeper[storage._cdata] = storage.nbytes()
                    self.keep.append(t)
        self.stack.append(node)

    def exit(self, name: str) -> None:
        self.stack.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.weights:  # weights are counted once, in params_bytes
            self.stack[-1].holder().saved[storage._cdata] = storage.nbytes()
            self.keep.append(t)
        return t


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _checkpointed_children(node: _Region) -> list[_Region]:
    out: list[_Region] = []
    for child in node.children:
        out.extend([child] if child.checkpointed else _checkpointed_children(child))
    return out


def _recompute_peak(node: _Region, counted: set[int]) -> int:
    own = {k: v for k, v in node.saved.items() if k not in counted}
    inner = counted | own.keys()
    deepest = max((_recompute_peak(c, inner) for c in _checkpointed_children(node)), default=0)
    return sum(own.values()) + deepest


@functools.lru_cache(maxsize=256)
def _estimate(cfg: PromptMRConfig, coils: int, height: int, width: int, batch_size: int,
              dtype: torch.dtype) -> MemoryEstimate:
    meta = torch.device("meta")
    with torch.device(meta):
        model = PromptMR(cfg).to(dtype)
    kspace = torch.empty(batch_size, cfg.num_adj_slices, coils, height, width, dtype=_COMPLEX_OF[dtype],
                         device=meta)
    mask = torch.empty(batch_size, width, dtype=torch.bool, device=meta)
    nlf = max(1, round(0.08 * width))
    tracker = _Tracker({p.untyped_storage()._cdata for p in model.parameters()})
    with observe_regions(tracker), torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        image = model(kspace, mask, nlf).image
        loss = image.abs().mean()  # stands in for the SSIM loss, whose saved tensors are a few (B, H, W) images
    del loss, image
    root_saved = tracker.root.saved
    residual = sum(root_saved.values())
    recompute = max((_recompute_peak(c, set(root_saved)) for c in _checkpointed_children(tracker.root)),
                    default=0)
    input_bytes = sum(t.untyped_storage().nbytes() for t in (kspace, mask)
                      if t.untyped_storage()._cdata not in root_saved)
    params = grads = 0
    for p in model.parameters():
        params += p.numel() * p.element_size()
        if p.requires_grad:
            grads += p.numel() * p.element_size()
    optimizer = 2 * grads
    peak = params + grads + optimizer + input_bytes + residual + recompute
    return MemoryEstimate(peak, residual, params, grads, optimizer, recompute, input_bytes, False, "meta")


# ----- measurement on CUDA ------------------------------------------------------------------------------------
def _measure_cuda(cfg: PromptMRConfig, coils: int, height: int, width: int, device: torch.device, batch_size: int,
                  dtype: torch.dtype) -> MemoryEstimate:
    torch.cuda.synchronize(device)
    model = PromptMR(cfg).to(device=device, dtype=dtype)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    generator = torch.Generator(device=device).manual_seed(0)
    kspace = torch.randn(batch_size, cfg.num_adj_slices, coils, height, width, dtype=_COMPLEX_OF[dtype],
                         device=device, generator=generator)
    mask = torch.zeros(batch_size, width, dtype=torch.bool, device=device)
    mask[:, ::4] = True
    nlf = max(1, round(0.08 * width))
    lo = (width - nlf + 1) // 2
    mask[:, lo:lo + nlf] = True
    kspace = kspace * mask[:, None, None, None, :]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = 0
    try:
        for step in range(2):
            optimiser.zero_grad(set_to_none=True)
            if step == 1:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            saved, image = autograd_saved_bytes(model, kspace, mask, nlf)
            image.abs().mean().backward()
            optimiser.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        oom = False
    except torch.cuda.OutOfMemoryError:
        peak = torch.cuda.get_device_properties(device).total_memory + 1
        oom = True
    finally:
        del model, optimiser, kspace
        torch.cuda.empty_cache()
    return MemoryEstimate(int(peak), int(saved), params, grads, 2 * grads, 0, 0, True, str(device), oom)
