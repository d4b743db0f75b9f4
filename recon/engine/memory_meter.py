"""Peak memory of one epoch window, per device and kind (the loop's ``memory/...`` metrics).

Every figure covers one epoch (its training and its validation) and starts afresh at the next, so
a stage never reports what an earlier stage of the same process held:

* ``memory/cuda_allocated_peak_mb``: the CUDA caching allocator's peak of bytes held by tensors
  (``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats`` at epoch start).
* ``memory/cuda_reserved_peak_mb``: the allocator's peak of bytes reserved from the driver
  (``torch.cuda.max_memory_reserved``): what the card must have free, so "does it fit in 8 GB" is
  this figure against 8192 (plus the CUDA context, a few hundred MiB, which neither counts).
* ``memory/cpu_rss_peak_mb``: the peak resident set of this process (host memory, on every device),
  sampled by a daemon thread (``psutil.Process().memory_info().rss`` every 20 ms, plus one reading
  at each end of the window), so a spike shorter than the interval can be missed; DataLoader worker
  processes are not included. Linux could give the exact peak (reset ``VmHWM`` by writing ``5`` to
  ``/proc/self/clear_refs``), but that also resets the process's ``ru_maxrss``, which ``time -v``
  and batch schedulers report as the job's peak.

There is no CPU figure for bytes held by tensors: PyTorch's CPU allocator keeps no statistics that
Python can read (``torch.cpu`` has no memory counters), and counting allocations with the profiler's
memory events or a ``TorchDispatchMode`` would slow every training step. Resident memory can fall
between stages because glibc returns large blocks (the tensors of a training step) to the kernel.
"""

from __future__ import annotations

import threading

import psutil
import torch

_MIB = 2**20


#: What each memory metric of a stage run means (the tracking layer logs this beside the run as ``metrics.md``).
METRIC_DOCS = {
    "memory/cuda_allocated_peak_mb": "CUDA only: peak MiB held by tensors in the epoch (allocator, reset per epoch)",
    "memory/cuda_reserved_peak_mb": "CUDA only: peak MiB reserved from the driver in the epoch; does it fit in "
                                    "8 GB = this below 8192 minus the CUDA context",
    "memory/cpu_rss_peak_mb": "peak resident host memory of the process in the epoch (sampled every 20 ms; "
                              "DataLoader workers not included)",
    "memory/probe_predicted_mb": "the memory probe's prediction of one training step's peak (meta device on "
                                 "CPU): the 8 GB answer of a CPU run",
}


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
        interval_s: sampling interval of the RSS thread, in seconds.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self._sampler: _RssSampler | None = None

    def start(self) -> None:
        """Open a window: reset the CUDA allocator's peaks and start the RSS sampler."""
        self.close()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sampler = _RssSampler(self.interval_s)

    def stop(self) -> dict[str, float]:
        """Close the window; returns its ``memory/...`` metrics in MiB (see the module docstring)."""
        metrics: dict[str, float] = {}
        if self.device.type == "cuda":
            metrics["memory/cuda_allocated_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / _MIB
            metrics["memory/cuda_reserved_peak_mb"] = torch.cuda.max_memory_reserved(self.device) / _MIB
        if self._sampler is not None:
            metrics["memory/cpu_rss_peak_mb"] = self._sampler.stop() / _MIB
            self._sampler = None
        return metrics

    def close(self) -> None:
        """Stop a running sampler without reporting (after an exception)."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
