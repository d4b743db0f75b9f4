"""Peak memory of one epoch window, per device and kind (the loop's ``memory/...`` metrics).

Every figure covers one epoch (its training and its validation) and starts afresh at the next, so
a stage never reports what an earlier stage of the same process held:

* ``memory/cuda_allocated_peak_mb``: the CUDA caching allocator's peak of bytes held by tensors
  (``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats`` at epoch start).
* ``memory/cuda_reserved_peak_mb``: the allocator's peak of bytes reserved from the driver
  (``torch.cuda.max_memory_reserved``): what the card must have free, so "does it fit in 8 GB" is
  this figure against 8192 (plus the CUDA context, a few hundred MiB, which neither counts).
* ``memory/cpu_rss_peak_mb``: the peak resident set of this process (host memory, on every device).
  On Linux the kernel keeps the exact high-water mark and lets a process reset it
  (``echo 5 > /proc/self/clear_refs``, then ``VmHWM`` of ``/proc/self/status``); where that is not
  possible a daemon thread samples ``psutil.Process().memory_info().rss`` every 20 ms, so a spike
  shorter than that can be missed. DataLoader worker processes are not included.

There is no CPU figure for bytes held by tensors: PyTorch's CPU allocator keeps no statistics that
Python can read (``torch.cpu`` has no memory counters), and counting allocations with the profiler's
memory events or a ``TorchDispatchMode`` would slow every training step. Resident memory can fall
between stages because glibc returns large blocks (the tensors of a training step) to the kernel.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)

_MIB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_FIELD = r"^{}:\s+(\d+)\s+kB"
# slack between the reset peak and the resident memory read with it (other threads may allocate)
_RESET_SLACK_MB = 8.0


def _status_mb(name: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB, or None where ``/proc`` does not show it."""
    try:
        found = re.search(_FIELD.format(name), _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def _kernel_peak_mb() -> float | None:
    """``VmHWM``: the peak RSS since the last reset, in MiB (None where not available)."""
    return _status_mb("VmHWM")


def _reset_kernel_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where the kernel does not allow or do it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    peak, rss = _kernel_peak_mb(), _status_mb("VmRSS")
    # a kernel that accepts the write but keeps the lifetime peak must not pass for a per-epoch figure
    return peak is not None and rss is not None and peak <= rss + _RESET_SLACK_MB


class _RssSampler:
    """A daemon thread keeping the largest RSS it reads, every ``interval_s``, until stopped."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        """Stop the thread; returns the peak in bytes (including one last reading)."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.process.memory_info().rss)


class EpochMemory:
    """Measures the memory peaks of one epoch window at a time.

    Args:
        device: the device the stage trains on (CUDA adds the allocator figures).
        interval_s: sampling interval of the RSS thread (used only where the kernel peak cannot be reset).
        use_kernel_peak: read the kernel's resettable high-water mark when available (False: always sample).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02, use_kernel_peak: bool = True) -> None:
        self.device = device
        self.interval_s = interval_s
        self.use_kernel_peak = use_kernel_peak
        self._sampler: _RssSampler | None = None
        self._kernel = False
        self.method = ""

    def start(self) -> None:
        """Open a window: reset the CUDA peaks and the RSS peak (or start the sampler)."""
        self.close()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._kernel = self.use_kernel_peak and _reset_kernel_peak()
        if not self._kernel:
            self._sampler = _RssSampler(self.interval_s)
        method = "kernel high-water mark" if self._kernel else f"sampled every {self.interval_s * 1000:.0f} ms"
        if method != self.method:
            log.info("memory/cpu_rss_peak_mb: peak resident memory per epoch, %s", method)
            self.method = method

    def stop(self) -> dict[str, float]:
        """Close the window; returns its ``memory/...`` metrics in MiB (see the module docstring)."""
        metrics: dict[str, float] = {}
        if self.device.type == "cuda":
            metrics["memory/cuda_allocated_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / _MIB
            metrics["memory/cuda_reserved_peak_mb"] = torch.cuda.max_memory_reserved(self.device) / _MIB
        peak = _kernel_peak_mb() if self._kernel else None
        if self._sampler is not None:
            peak = self._sampler.stop() / _MIB
            self._sampler = None
        if peak is not None:
            metrics["memory/cpu_rss_peak_mb"] = peak
        self._kernel = False
        return metrics

    def close(self) -> None:
        """Stop a running sampler without reporting (after an exception)."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
