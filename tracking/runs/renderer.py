"""Plots drawn in a helper process, so that the training thread never waits on matplotlib.

Drawing the curves, schedules and a reconstruction panel takes about 1-2 s of pure-Python matplotlib per
epoch; in the training thread that was nearly all of what tracking cost an epoch (``tracking_overhead.py``). A
thread would not help: matplotlib holds the GIL, which the training thread needs between every two operators.

:class:`PlotJobs` sends each figure to one helper process (``spawn``, shared by every callback of the
process and started on the first figure) and gives the finished PNG back to the thread that asked for it, in
the order asked, through :meth:`PlotJobs.collect`; the MLflow records are then written by that thread, so the
tracking writer is never used from two threads. A figure that fails (bad data, the helper killed) is logged as
an error and not retried; a dead helper is replaced, with an error line, on the next figure.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

from tracking.runs import plots

log = logging.getLogger(__name__)

#: how long the end of a stage waits for the figures it asked for
END_TIMEOUT_S = 120.0

_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ProcessPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _POOL


def _replace_pool(broken: ProcessPoolExecutor) -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is broken:
            _POOL = None
    broken.shutdown(wait=False, cancel_futures=True)


FIGURES: dict[str, Callable[..., Path]] = {"curves": plots.plot_curves, "schedules": plots.plot_schedules,
                                           "panel": plots.plot_panel}


def _draw(kind: str, payload: bytes) -> str:
    """Runs in the helper: one figure of :mod:`tracking.runs.plots`, its PNG path."""
    args, kwargs = pickle.loads(payload)
    return str(FIGURES[kind](*args, **kwargs))


class PlotJobs:
    """The figures one callback asked for and what to do with each PNG once drawn (see module docstring)."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, Future[str], Callable[[Path], None]]] = []

    def submit(self, kind: str, then: Callable[[Path], None], *args: Any, **kwargs: Any) -> None:
        """Draw ``plots.plot_<kind>(*args, **kwargs)`` in the helper; ``then(png)`` runs in :meth:`collect`.

        The arguments are pickled now, so later changes to them do not reach the figure.
        """
        if kind not in FIGURES:
            raise ValueError(f"PlotJobs: unknown figure {kind!r} (expected one of {', '.join(FIGURES)})")
        payload = pickle.dumps((args, kwargs))
        pool = _pool()
        try:
            future = pool.submit(_draw, kind, payload)
        except BrokenProcessPool as exc:
            log.error("the plot helper process died (%s); starting a new one", exc)
            _replace_pool(pool)
            future = _pool().submit(_draw, kind, payload)
        self._pending.append((kind, future, then))

    def pending(self) -> int:
        """Figures asked for and not collected yet."""
        return len(self._pending)

    def collect(self, wait: bool = False, timeout: float = END_TIMEOUT_S) -> int:
        """Run ``then`` for the figures drawn so far, in the order they were asked for.

        Args:
            wait: wait for every figure asked for (at most ``timeout`` seconds in all); otherwise stop at the
                first one still being drawn.
            timeout: seconds, with ``wait``.

        Returns:
            The number of figures still pending (0 after a successful ``wait``).
        """
        deadline = time.monotonic() + timeout
        while self._pending:
            kind, future, then = self._pending[0]
            if not future.done():
                if not wait:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("%d plot(s) not drawn within %.0f s; not logged", len(self._pending), timeout)
                    for _, late, _ in self._pending:
                        late.cancel()
                    self._pending.clear()
                    break
                try:
                    future.result(timeout=left)
                except Exception:
                    pass  # reported below
                continue
            self._pending.pop(0)
            try:
                png = Path(future.result())
            except BrokenProcessPool as exc:
                log.error("plot %s not made: the plot helper process died (%s)", kind, exc)
                continue  # the next submit replaces the helper
            except Exception as exc:  # the figure's own error (bad panel data, a full disk)
                log.error("plot %s not made: %s", kind, exc)
                continue
            then(png)
        return len(self._pending)
