"""Interleaved rounds for benchmarks on a shared machine: persistent worker processes, round-robin, load beside each.

A benchmark defines *arms* (the configurations compared). Each arm is one long-lived child process, so its peak
RSS is its own and its set-up (model, warm-up) is paid once. A round asks every arm for one measurement, in an
order rotated from round to round, so slow spells of other load fall on all arms alike instead of on whichever
ran last; the figure of an arm is the median over rounds with the spread (min..max). The 1-minute load average
(``os.getloadavg()``) is read before every measurement and reported beside it.

Protocol: the child reads one JSON request per line on stdin and answers one JSON line on stdout; it announces
itself with one line once its set-up is done. :func:`serve` is the child side.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable


def load1() -> float:
    """The 1-minute load average (runnable processes, all cores)."""
    return os.getloadavg()[0]


@dataclass
class Arm:
    """One configuration under test, served by a child process.

    Attributes:
        label: name in the tables.
        argv: the child's command line.
        env: extra environment of the child (e.g. ``PYTHONPATH`` of another code tree).
        info: what the child reported after its set-up.
    """

    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the child and wait for its set-up line."""
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **self.env})
        self.info = self._read()

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the answer."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        """Ask the child to exit and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ask({"op": "exit"})
                self.proc.wait(timeout=60)
            except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # our own child, by its handle
                self.proc.wait()

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"arm {self.label}: the child exited (code {self.proc.wait()}); see its stderr")
        return json.loads(line)


def run_rounds(arms: list[Arm], rounds: int, request: dict[str, Any],
               log: Callable[[str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Ask every arm ``rounds`` times, round-robin with a rotating start; each answer gets ``load1`` and ``round``.

    Returns:
        label -> the answers of that arm, in round order.
    """
    out: dict[str, list[dict[str, Any]]] = {arm.label: [] for arm in arms}
    for r in range(rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            load = load1()
            answer = arm.ask(request)
            answer.update(load1=load, round=r)
            out[arm.label].append(answer)
            if log is not None:
                log(f"round {r + 1}/{rounds} {arm.label}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in answer.items() if isinstance(v, float)))
    return out


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of a list of figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(values: list[float], loads: list[float], digits: int = 2) -> str:
    """``median [min..max] @load`` with the median load of the same measurements."""
    s = summary(values)
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}] @{statistics.median(loads):.1f}"


def serve(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], info: dict[str, Any]) -> None:
    """Child side: print ``info``, then answer requests ``{"op": name, ...}`` until ``exit`` or end of input."""
    # The protocol gets the original stdout to itself; anything else printed (console callbacks, logging set up
    # on stdout) goes to stderr, so it cannot be mistaken for an answer.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    answer(info)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "exit":
            answer({})
            return
        answer(handlers[request["op"]](request))


def timed(fn: Callable[[], Any]) -> dict[str, float]:
    """Wall-clock and process-CPU seconds of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu}
