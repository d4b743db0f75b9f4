"""Tracking survives a real ``mlflow server`` that dies mid-run or is not up yet (integration)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.tracking.runs.test_tracking_mlflow import artifact_paths, epoch_end, run_epochs, stage_end, stage_start, steps
from tracking.runs.callback import MLflowCallback
from tracking.runs.parent import start_parent_run
from tracking.runs.spool import is_placeholder, spool_summary
from tracking.runs.stores import Stores, make_client, sqlite_uri
from tracking.runs.replay import replay_spool
from tracking.runs.writer import TrackingWriter

pytestmark = pytest.mark.integration

KEYS = ("train/loss", "val/ssim", "val/ssim/brain_acc8", "lr", "schedule/p_remask", "schedule/p_aug",
        "memory/cpu_rss_peak_mb", "best_val_ssim")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ``mlflow server`` subprocess (its own process group, stopped by PID)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        """Start the server (on the same port every time) and wait until it answers."""
        if self.proc is not None:
            return
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite_uri(self.folder / "server.db"),
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy after {timeout} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's process group (the server, its uvicorn worker and job runner)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Module-wide so the tests share server starts (seconds each); every test sets the state it needs.
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


def timed_epochs(cb, out, epochs) -> list[float]:
    took = []
    for e in epochs:
        start = time.monotonic()
        run_epochs(cb, out, [e])
        took.append(time.monotonic() - start)
    return took


def test_server_down_at_stage_start_creates_the_run_at_replay(server, tmp_path):
    server.kill()
    stores = Stores(server.url, server.url, tmp_path / "home", None)
    writer = TrackingWriter(stores)
    parent = start_parent_run(stores, "integration", "late-pipeline", writer=writer)
    cb = MLflowCallback(stores, "integration", parent_run_id=parent, writer=writer, system_metrics=False)
    out = tmp_path / "out"
    cb.on_stage_start(stage_start(out, epochs=5))
    run_epochs(cb, out, [0, 1])
    state = cb.state_dict()
    assert is_placeholder(parent) and is_placeholder(state["mlflow_run_id"])

    server.start()
    run_epochs(cb, out, [2])
    cb.on_stage_end(stage_end(out, status="failed"))
    writer.set_terminated(parent, "FINISHED")
    replay_spool(stores)
    assert spool_summary(stores.spool_dir) == {}

    real = writer.resolve(state["mlflow_run_id"])
    assert real is not None and cb.state_dict() == {"mlflow_run_id": real}
    client = make_client(stores)
    run = client.get_run(real)
    assert run.data.tags["mlflow.parentRunId"] == writer.resolve(parent)
    assert run.info.status == "FAILED" and run.data.params["seed.mask"] == "11"
    assert steps(client, real, "train/loss") == [0, 1, 2]

    # A checkpoint that still holds the placeholder resumes the real run.
    resumed = MLflowCallback(stores, "integration", system_metrics=False)
    resumed.on_stage_start(stage_start(out, start=2, epochs=5, resume_state=state))
    resumed.on_epoch_end(epoch_end(2))
    resumed.on_epoch_end(epoch_end(3))
    resumed.on_stage_end(stage_end(out))
    assert resumed.state_dict() == {"mlflow_run_id": real}
    assert steps(client, real, "train/loss") == [0, 1, 2, 3]
    assert client.get_run(real).info.status == "FINISHED"


def test_server_killed_mid_run_loses_and_duplicates_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    server.start()  # already up after the test above
    stores = Stores(server.url, server.url, tmp_path / "home", None)
    writer = TrackingWriter(stores)
    parent = start_parent_run(stores, "integration", "pipeline", writer=writer)
    cb = MLflowCallback(stores, "integration", parent_run_id=parent, writer=writer)
    out = tmp_path / "out"
    cb.on_stage_start(stage_start(out, epochs=6))
    run_epochs(cb, out, [0, 1], panel_epoch=1)
    run_id = cb.state_dict()["mlflow_run_id"]
    assert not is_placeholder(run_id)

    online = timed_epochs(cb, out, [2])  # the same work with the server up: the machine's own pace
    server.kill()
    outage = timed_epochs(cb, out, [3])
    # one refused connection, then straight to the spool: no per-record retries on top of the epoch's own work
    assert max(outage) < online[0] + 5.0, (online, outage)
    assert writer.pending_records(run_id) > 0

    server.start()
    run_epochs(cb, out, [4, 5])
    cb.on_stage_end(stage_end(out))
    writer.set_terminated(parent, "FINISHED")
    replay_spool(stores)
    assert spool_summary(stores.spool_dir) == {}

    client = make_client(stores)
    for key in KEYS:
        assert steps(client, run_id, key) == [0, 1, 2, 3, 4, 5], key
    assert replay_spool(stores).sent == 0  # a second sync finds nothing
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["model.cascades"] == "2"
    # (system metrics are checked in test_tracking_mlflow; here the monitor's timing around the outage
    # is not deterministic)
    arts = artifact_paths(client, run_id)
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "plots/curves.png"} <= arts
    assert len([a for a in arts if a.startswith("images/reconstruction~brain_acc4_1.h5_3+step+1+")]) == 2
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == ["abc123"]  # no val split in this config
    last = Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path / "dl")))
    assert torch.load(last, weights_only=True)["epoch"] == 5
    assert client.get_run(parent).info.status == "FINISHED"
