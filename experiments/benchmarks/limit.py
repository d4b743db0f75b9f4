"""The machine's limit for the model's kind of work: counted FLOPs, measured peak, and a profile of one call.

* :func:`count_flops` counts the floating-point operations of a call with ``torch.utils.flop_counter`` (matrix
  products and convolutions, forward and backward; FFTs and element-wise work are not counted, so the achieved
  fraction is a fraction of the *counted* work);
* :func:`measure_peak` times a large fp32 ``conv2d`` (3x3, 64 -> 64 channels, 256 x 256, channels_last, the
  layout the model uses) and a 2048 x 2048 matmul on the current threads and returns the better GFLOP/s of each
  (best of ``repeats``: the peak is what the machine *can* do, so the least disturbed run counts);
* :func:`profile_table` runs a call under ``torch.profiler`` and returns the table of the top operators by self
  CPU time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations counted while ``fn()`` runs (a multiply-add is 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _best_rate(fn: Callable[[], Any], flops: float, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def measure_peak(repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a large conv2d and a large matmul (fp32, current threads), best of ``repeats``.

    Returns:
        ``{"conv_gflops": ..., "matmul_gflops": ..., "peak_gflops": max of both}``.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 256, 256, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    conv_flops = 2.0 * 64 * 64 * 9 * 256 * 256
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    with torch.no_grad():
        conv = _best_rate(lambda: F.conv2d(x, w, padding=1), conv_flops, repeats)
        mm = _best_rate(lambda: a @ b, 2.0 * 2048 ** 3, repeats)
    return {"conv_gflops": conv, "matmul_gflops": mm, "peak_gflops": max(conv, mm)}


def profile_table(fn: Callable[[], Any], rows: int = 15) -> str:
    """The profiler's table of the top ``rows`` operators of one ``fn()`` call, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
