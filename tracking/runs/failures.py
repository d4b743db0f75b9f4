"""Tracking failures seen by one writer: one warning per kind, and a count of what was lost.

:class:`tracking.runs.writer.TrackingWriter` never lets a tracking failure reach the engine. What it
cannot send goes to the spool; what it can neither send nor spool (the spool's disk is full, the
artifact store is full, the server refused the record for good) is lost for the run and counted here.
Every kind of failure is logged once, at WARNING, the first time it happens (later ones at DEBUG),
so that a full disk costs one line, not one per epoch; :meth:`FailureLog.take_summary` gives the one
line that the end of a stage prints about the records lost since the last summary.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter

log = logging.getLogger("tracking.runs.writer")

#: OSError numbers that mean the store's disk is full (or over quota): retrying now fails again
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_store_full(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it wraps) says the disk is full or over quota."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if "database or disk is full" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first line of an error (``Type: message`` for exceptions), at most ``limit`` characters."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return (text.strip().splitlines() or [""])[0][:limit]


class FailureLog:
    """One warning per failure kind, and the count of lost records per kind (see the module docstring)."""

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._lost: Counter[str] = Counter()
        self._reason: dict[str, str] = {}

    def warn(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        """Log ``message % args`` at WARNING the first time ``kind`` happens, at DEBUG afterwards.

        Args:
            kind: the failure kind (e.g. ``"unreachable"``, ``"artifact store full"``).
            message: a ``%``-style log message.
            *args: its arguments.
            exc_info: add the current traceback (first time only): for failures that may be bugs here.
        """
        if kind in self._warned:
            log.debug(message, *args)
            return
        self._warned.add(kind)
        log.warning(message + " (shown once)", *args,
                    exc_info=exc_info)

    def lost(self, kind: str, reason: BaseException | str) -> None:
        """Count one record that could neither be written nor spooled; ``reason`` is kept for the summary."""
        self._lost[kind] += 1
        self._reason.setdefault(kind, first_line(reason))

    @property
    def lost_total(self) -> int:
        """Records lost since the last :meth:`take_summary`."""
        return sum(self._lost.values())

    def take_summary(self) -> str | None:
        """The one line about the records lost since the last call (None when none was), then reset."""
        if not self._lost:
            return None
        parts = "; ".join(f"{n} {kind} ({self._reason[kind]})" for kind, n in sorted(self._lost.items()))
        line = f"tracking: {self.lost_total} records could not be written/spooled: {parts}"
        self._lost.clear()
        self._reason.clear()
        return line
