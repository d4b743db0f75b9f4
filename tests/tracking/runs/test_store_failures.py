"""A full or failing tracking store never stops training (issue 13, item 3).

Real failures, no mocks: a 64 KiB tmpfs mounted as the artifact root (uploads fail with ENOSPC) or as a
full spool folder next to an unreachable tracking server; a tiny stage trains 2 epochs through the real
CLI, and the run is read back with a fresh ``MlflowClient``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tracking.runs.failures import FailureLog, is_store_full
from tracking.runs.spool import Spool
from tests.mounts import tmpfs

TINY = Path(__file__).resolve().parents[3] / "experiments" / "tiny"
FAST = ["data.max_train_slices=2", "data.max_val_slices=4", "train.panel_every=0", "train.epochs=2"]


def _fill(folder: Path) -> None:
    """Fill a file system until it has no space left."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert is_store_full(exc), exc


def _train(data: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tracking.cli", "train", str(TINY / "hacker_baseline.yaml"),
            "--set", f"data.root={data}", "--set", f"output.dir={out}", *[a for s in FAST for a in ("--set", s)]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


def _lost(summary: str) -> int:
    match = re.search(r"tracking: (\d+) records could not be written/spooled: ", summary)
    assert match, summary
    return int(match.group(1))


def _checkpoints(out: Path) -> dict[str, dict]:
    found = {k: torch.load(out / "checkpoints" / f"{k}.pt", weights_only=True) for k in ("best", "last")}
    assert not list((out / "checkpoints").glob("*.tmp")), "temporary checkpoint files left"
    return found


def test_full_artifact_store_costs_one_warning_and_training_finishes(tiny_data: Path, tmp_path: Path,
                                                                     _isolated_tracking: Path) -> None:
    from mlflow.tracking import MlflowClient

    home, out = _isolated_tracking, tmp_path / "stage"
    with tmpfs(home / "artifacts", size="64k", strict=False):
        done = _train(tiny_data, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # one warning for the kind (every upload fails), one summary line at the stage's end
    assert len([line for line in _lines(done.stderr, "WARNING") if "tracking" in line]) == 2, done.stderr[-3000:]
    (warning,) = _lines(done.stderr, "not stored by")
    assert "No space left on device" in warning and "rejected.jsonl" in warning
    (summary,) = _lines(done.stderr, "records could not be written/spooled")
    assert "log_artifact" in summary and "No space left on device" in summary
    ckpt = _checkpoints(out)
    assert ckpt["last"]["epoch"] == 1
    # the metrics reached the sqlite store: what the engine computed, read back by a fresh client
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("smartify").experiment_id])
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/ssim")}
    assert sorted(history) == [0, 1]
    assert history[1] == pytest.approx(ckpt["last"]["metrics"]["val/ssim"], rel=1e-12)
    assert history[ckpt["best"]["epoch"]] == pytest.approx(ckpt["best"]["metrics"]["val/ssim"], rel=1e-12)
    assert run.data.tags["smartify.best_epoch"] == str(ckpt["best"]["epoch"])
    # the refused uploads are listed with their reason, not queued for a replay
    spool = Spool(home / "spool")
    assert spool.keys() == []
    rejected = (home / "spool" / f"{run.info.run_id}.rejected.jsonl").read_text().splitlines()
    assert len(rejected) == _lost(summary)


def test_unreachable_server_and_full_spool_never_stop_training(tiny_data: Path, tmp_path: Path,
                                                              _isolated_tracking: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "stage"
    with tmpfs(_isolated_tracking / "spool", size="64k", strict=False) as spool_dir:
        _fill(spool_dir)
        done = _train(tiny_data, out, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        left = sorted(p.name for p in spool_dir.iterdir())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(_lines(done.stderr, f"tracking server http://127.0.0.1:{port} unreachable")) == 1, done.stderr[-3000:]
    assert len(_lines(done.stderr, "could not write the spool")) == 1, done.stderr[-3000:]
    (summary,) = _lines(done.stderr, "records could not be written/spooled")
    assert _lost(summary) >= 2 * 2 and "log_batch" in summary and "No space left on device" in summary
    assert left == ["filler"], left  # nothing half-written in the full spool
    assert _checkpoints(out)["last"]["epoch"] == 1


def test_failure_log_warns_once_per_kind_and_counts_losses(caplog: pytest.LogCaptureFixture) -> None:
    failures = FailureLog()
    with caplog.at_level("DEBUG", logger="tracking.runs.writer"):
        for _ in range(3):
            failures.warn("store full", "upload failed: %s", "disk full")
            failures.lost("log_artifact", OSError(28, "No space left on device"))
        failures.warn("spool", "spool failed")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["upload failed: disk full (shown once)", "spool failed (shown once)"]
    assert failures.take_summary() == ("tracking: 3 records could not be written/spooled: "
                                       "3 log_artifact (OSError: [Errno 28] No space left on device)")
    assert failures.take_summary() is None
