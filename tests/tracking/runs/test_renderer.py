"""The plot helper process: figures come back in order, a killed helper is replaced, a user's script runs once."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tracking.runs import renderer
from tracking.runs.renderer import PlotJobs

ROOT = Path(__file__).resolve().parents[3]
HISTORY = {"train/loss": [(0, 1.0), (1, 0.5)], "val/ssim": [(0, 0.6), (1, 0.7)], "lr": [(0, 1e-3), (1, 5e-4)]}
PNG = b"\x89PNG\r\n\x1a\n"


def test_figures_come_back_in_the_order_asked_with_their_pngs(tmp_path):
    jobs, done = PlotJobs(), []
    jobs.submit("curves", done.append, HISTORY, tmp_path / "curves.png", "t")
    jobs.submit("schedules", done.append, HISTORY, tmp_path / "schedules.png", title="t")
    HISTORY["train/loss"].append((2, 0.1))  # after the request: not in the figure, and no error
    assert jobs.collect(wait=True) == 0 and jobs.pending() == 0
    assert done == [tmp_path / "curves.png", tmp_path / "schedules.png"]
    assert all(p.read_bytes()[:8] == PNG for p in done)
    HISTORY["train/loss"].pop()
    with pytest.raises(ValueError, match="unknown figure 'bars'"):
        jobs.submit("bars", done.append)


def test_a_killed_helper_fails_its_figures_and_the_next_figure_starts_a_new_one(tmp_path, caplog):
    jobs, done = PlotJobs(), []
    jobs.submit("curves", done.append, HISTORY, tmp_path / "a.png", "t")
    helper = renderer._HELPER
    assert helper is not None and helper.proc.pid != os.getpid()
    helper.proc.send_signal(signal.SIGKILL)
    with caplog.at_level(logging.ERROR, logger="tracking.runs.renderer"):
        jobs.collect(wait=True, timeout=30)
        messages = [r.getMessage() for r in caplog.records]
        if done:  # the figure was drawn before the signal arrived: it still counts, nothing is lost
            assert done == [tmp_path / "a.png"]
        else:
            assert any("plot curves not made" in m and "exited with code -9" in m for m in messages), messages
        jobs.submit("curves", done.append, HISTORY, tmp_path / "b.png", "t")
        assert jobs.collect(wait=True, timeout=60) == 0
    assert done[-1] == tmp_path / "b.png" and done[-1].read_bytes()[:8] == PNG
    assert renderer._HELPER is not helper and helper.proc.poll() is not None
    assert any("starting a new one" in r.getMessage() for r in caplog.records)


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    # a multiprocessing "spawn" helper would import this script again and run its body a second time
    marker = tmp_path / "ran.txt"
    script = tmp_path / "user_script.py"
    script.write_text(
        "from pathlib import Path\n"
        "from tracking.runs.renderer import PlotJobs\n"
        f"marker = Path({str(marker)!r})\n"
        "marker.write_text(marker.read_text() + 'x' if marker.exists() else 'x')\n"
        "jobs, done = PlotJobs(), []\n"
        f"jobs.submit('curves', done.append, {{'train/loss': [(0, 1.0)]}}, Path({str(tmp_path / 'c.png')!r}))\n"
        "assert jobs.collect(wait=True) == 0 and len(done) == 1, done\n")
    result = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "x"
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
