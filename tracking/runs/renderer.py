"""Plots drawn in a helper process, so that the training thread never waits on matplotlib.

Drawing the curves, schedules and a reconstruction panel takes about 1-2 s of pure-Python matplotlib per
redraw; in the training thread that was nearly all of what tracking cost an epoch (``tracking_overhead.py``). A
thread would not help: matplotlib holds the GIL, which the training thread needs between every two operators.

:class:`PlotJobs` sends each figure to one helper process (``python -m tracking.runs.renderer``, shared by every
callback of the process, started on the first figure, at a lower CPU priority) and gives the finished PNG back
to the thread that asked for it, in the order asked, through :meth:`PlotJobs.collect`; the MLflow records are
then written by that thread, so the tracking writer is never used from two threads. The helper is a plain
subprocess rather than a ``multiprocessing`` one: ``spawn`` would re-import the user's main script in it
(running a script without a ``__main__`` guard a second time) and ``fork`` would copy a process full of threads.

Requests and answers are length-prefixed pickles on the helper's stdin and stdout: ``(id, kind, payload)`` and
``(id, ok, PNG path or error text)``. A figure that fails (bad data, a full disk) is logged as an error and not
retried; a dead helper fails the figures it had and is replaced, with an error line, on the next figure.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, Callable

log = logging.getLogger(__name__)

#: how long the end of a stage waits for the figures it asked for
END_TIMEOUT_S = 120.0
#: the helper's ``nice`` increment: training threads win the CPU when both want it
HELPER_NICE = 10
#: figure kind -> its function in :mod:`tracking.runs.plots` (looked up in the helper, which alone imports it)
FIGURES = {"curves": "plot_curves", "schedules": "plot_schedules", "panel": "plot_panel"}
_HEADER = struct.Struct(">Q")


class HelperDied(RuntimeError):
    """The helper process exited (killed, out of memory) before answering."""


class FigureFailed(RuntimeError):
    """The figure's own function raised in the helper; the message is its one-line error."""


def _write_frame(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Any:
    """The next object, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class _Helper:
    """The helper process and the two threads that feed it and read its answers."""

    def __init__(self) -> None:
        env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        # its own session: Ctrl-C and signals sent to the training's process group do not reach it; it ends
        # when its stdin closes (this process exited or closed it)
        self.proc = subprocess.Popen([sys.executable, "-m", "tracking.runs.renderer"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.dead: str | None = None
        self._futures: dict[int, Future[str]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._outbox: queue.SimpleQueue[tuple[int, str, bytes] | None] = queue.SimpleQueue()
        threading.Thread(target=self._send, name="smartify-plots-send", daemon=True).start()
        threading.Thread(target=self._receive, name="smartify-plots-receive", daemon=True).start()

    def submit(self, kind: str, payload: bytes) -> Future[str]:
        future: Future[str] = Future()
        with self._lock:
            if self.dead is not None:
                raise HelperDied(self.dead)
            job = next(self._ids)
            self._futures[job] = future
        self._outbox.put((job, kind, payload))
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._outbox.put(None)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _send(self) -> None:
        assert self.proc.stdin is not None
        try:
            while (item := self._outbox.get()) is not None:
                _write_frame(self.proc.stdin, item)
            self.proc.stdin.close()
        except OSError as exc:  # the helper is gone; _receive reports it
            log.debug("plot helper: send failed: %s", exc)

    def _receive(self) -> None:
        assert self.proc.stdout is not None
        try:
            while (answer := _read_frame(self.proc.stdout)) is not None:
                job, ok, value = answer
                with self._lock:
                    future = self._futures.pop(job, None)
                if future is None:
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(FigureFailed(value))
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            log.debug("plot helper: receive failed: %s", exc)
        code = self.proc.wait()
        with self._lock:
            self.dead = f"the plot helper process exited with code {code}"
            pending, self._futures = list(self._futures.values()), {}
        for future in pending:
            future.set_exception(HelperDied(self.dead))


_HELPER: _Helper | None = None
_HELPER_LOCK = threading.Lock()


def _submit(kind: str, payload: bytes) -> Future[str]:
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is not None and _HELPER.dead is not None:
            log.error("%s; starting a new one", _HELPER.dead)
            _HELPER = None
        if _HELPER is None:
            _HELPER = _Helper()
        helper = _HELPER
    return helper.submit(kind, payload)


def helper_pid() -> int | None:
    """The process id of the running plot helper, or None (not started yet, or dead)."""
    with _HELPER_LOCK:
        helper = _HELPER
    return helper.proc.pid if helper is not None and helper.dead is None and helper.proc.poll() is None else None


@atexit.register
def _close_helper() -> None:
    with _HELPER_LOCK:
        helper = _HELPER
    if helper is not None and helper.dead is None:
        helper.close()


class PlotJobs:
    """The figures one callback asked for and what to do with each PNG once drawn (see module docstring)."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, Future[str], Callable[[Path], None]]] = []

    def submit(self, kind: str, then: Callable[[Path], None], *args: Any, **kwargs: Any) -> None:
        """Draw ``tracking.runs.plots.plot_<kind>(*args, **kwargs)`` in the helper; ``then(png)`` runs in
        :meth:`collect`. The arguments are pickled now, so later changes to them do not reach the figure.

        Raises:
            ValueError: an unknown ``kind``.
        """
        if kind not in FIGURES:
            raise ValueError(f"PlotJobs: unknown figure {kind!r} (expected one of {', '.join(FIGURES)})")
        payload = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            future = _submit(kind, payload)
        except HelperDied:  # died between the check and the request: one more try with a new helper
            future = _submit(kind, payload)
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
            Without ``wait``, the figures still being drawn; with it, the figures dropped because they were not
            drawn within ``timeout`` (0 when every one was logged or failed with its own error line).
        """
        deadline = time.monotonic() + timeout
        while self._pending:
            kind, future, then = self._pending[0]
            if not future.done():
                if not wait:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    dropped = len(self._pending)
                    log.error("%d plot(s) not drawn within %.0f s; not logged", dropped, timeout)
                    self._pending.clear()
                    return dropped
                try:
                    future.exception(timeout=left)
                except TimeoutError:
                    pass
                continue
            self._pending.pop(0)
            try:
                png = Path(future.result())
            except (FigureFailed, HelperDied) as exc:
                log.error("plot %s not made: %s", kind, exc)
                continue
            then(png)
        return len(self._pending)


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The helper's loop: draw each requested figure and answer with its path or its error."""
    from tracking.runs import plots

    figures: dict[str, Callable[..., Path]] = {kind: getattr(plots, name) for kind, name in FIGURES.items()}
    while (request := _read_frame(requests)) is not None:
        job, kind, payload = request
        try:
            args, kwargs = pickle.loads(payload)
            answer = (job, True, str(figures[kind](*args, **kwargs)))
        except Exception as exc:  # the figure's error goes back to the asking process
            answer = (job, False, f"{type(exc).__name__}: {exc}")
        _write_frame(answers, answer)


def main() -> int:
    """Entry point of the helper: the answers go to the real stdout; anything printed goes to stderr."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (C or Python) never corrupt the answer stream
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the end of stdin, not an interrupt, ends the helper
    try:
        os.nice(HELPER_NICE)
    except OSError:
        pass  # not allowed here: same priority as training
    serve(sys.stdin.buffer, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
