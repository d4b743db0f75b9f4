"""SIGTERM (``timeout``, SLURM preemption, Kubernetes) ends a command like Ctrl-C (issue 13, item 4).

Real subprocesses of the CLI and real sqlite stores: the signal is sent mid-training, then the exit code,
the one stderr line, the run's status (a fresh ``MlflowClient``) and the checkpoints are checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny"
SLICES = ["--set", "data.max_train_slices=2", "--set", "data.max_val_slices=2", "--set", "train.panel_every=0"]


def _start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, err = cwd / "stdout.log", cwd / "stderr.log"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "tracking.cli", *args], cwd=cwd, env=dict(os.environ),
                                stdout=fo, stderr=fe, text=True)
    return proc, out, err


def _terminate_when(proc: subprocess.Popen, ready: Callable[[], bool], err: Path, timeout: float = 300) -> int:
    """Poll ``ready`` until it holds, then send SIGTERM; returns the exit code."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("never got to the point to terminate:\n" + err.read_text()[-3000:])
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("still running 120 s after SIGTERM:\n" + err.read_text()[-3000:])


def _client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def test_sigterm_during_training_kills_the_run_and_keeps_the_checkpoints(tiny_data: Path, tmp_path: Path,
                                                                         _isolated_tracking: Path) -> None:
    out = tmp_path / "stage"
    last = out / "checkpoints" / "last.pt"
    proc, _, err = _start(["train", str(TINY / "hacker_baseline.yaml"), "--set", f"data.root={tiny_data}",
                           "--set", f"output.dir={out}", "--set", "train.epochs=200", *SLICES], tmp_path)
    code = _terminate_when(proc, last.is_file, err)
    stderr = err.read_text()
    assert code == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "SIGTERM" in line]
    assert lines == [f"smartify train: terminated (SIGTERM); checkpoints in {out / 'checkpoints'}; "
                     f"resume with --resume {out}"], stderr[-3000:]
    assert "Traceback" not in stderr
    ckpt = torch.load(last, weights_only=True)
    assert 0 <= ckpt["epoch"] < 199
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left"
    client = _client(_isolated_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("smartify").experiment_id])
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert run.data.tags["smartify.stopped_by"] == "SIGTERM"
    assert run.info.run_id == ckpt["tracking"]["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/ssim")]
    assert max(steps) >= ckpt["epoch"]  # every epoch of the checkpoint was logged before the signal


@pytest.mark.slow
def test_sigterm_to_the_nproc_launcher_stops_the_ranks_and_exits_143(tiny_data: Path, tmp_path: Path,
                                                                     _isolated_tracking: Path) -> None:
    out = tmp_path / "stage"
    last = out / "checkpoints" / "last.pt"
    proc, _, err = _start(["train", str(TINY / "hacker_baseline.yaml"), "--nproc", "2",
                           "--set", f"data.root={tiny_data}", "--set", f"output.dir={out}", "--set", "train.epochs=200",
                           "--set", "train.batch_size=1", *SLICES], tmp_path)
    code = _terminate_when(proc, last.is_file, err)
    stderr = err.read_text()
    assert code == 143, stderr[-3000:]  # not 130: the launcher says which signal ended it
    assert [line for line in stderr.splitlines() if line.startswith("smartify train: terminated (SIGTERM)")], \
        stderr[-3000:]
    launched = next(line for line in stderr.splitlines() if "launched 2 ranks (pids" in line)
    pids = [int(x) for x in launched.split("(pids [", 1)[1].split("]", 1)[0].split(",")]
    for pid in pids:  # stopped and reaped by the launcher before it exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    client = _client(_isolated_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("smartify").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["smartify.stopped_by"] == "SIGTERM"
    assert run.info.run_id == torch.load(last, weights_only=True)["tracking"]["mlflow_run_id"]


@pytest.mark.slow
def test_sigterm_in_a_tune_worker_fails_the_trial_and_kills_the_runs(tiny_data: Path, tmp_path: Path,
                                                                    _isolated_tracking: Path) -> None:
    data = yaml.safe_load((TINY / "tune.yaml").read_text())
    data.update({"base": str(TINY / "hacker_baseline.yaml"), "output_dir": str(tmp_path / "runs" / "{study}"),
                 "epochs_per_trial": 200, "n_trials": 2, "memory_budget": "none",
                 "space": {"p_aug.p_max": {"type": "float", "low": 0.1, "high": 0.9}}})
    tune = tmp_path / "tune.yaml"
    tune.write_text(yaml.safe_dump(data, sort_keys=False))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc, _, err = _start(["tune", str(tune), "--storage", storage, "--study", "sigterm", "--overlay-dir",
                           str(tmp_path / "tuned"), "--set", f"data.root={tiny_data}", *SLICES], tmp_path)

    def first_epoch_reported() -> bool:
        try:
            trials = optuna.load_study(study_name="sigterm", storage=storage).trials
        except KeyError:  # not created yet
            return False
        return any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)

    code = _terminate_when(proc, first_epoch_reported, err)
    stderr = err.read_text()
    assert code == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "SIGTERM" in line]
    assert lines == ["smartify tune: terminated (SIGTERM); trial 0 marked FAIL (retried by the next worker); "
                     "study sigterm: run the same command to go on"], stderr[-3000:]
    study = optuna.load_study(study_name="sigterm", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # the second trial never started
    client = _client(_isolated_tracking)
    runs = client.search_runs([client.get_experiment_by_name("smartify-tune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("smartify.kind") == "study"]
    (trial_run,) = [r for r in runs if r.data.tags.get("optuna.trial_number") == "0"]
    assert parent.info.run_id == study.user_attrs["mlflow_run_id"]
    assert parent.info.status == "KILLED" and trial_run.info.status == "KILLED"
    assert trial_run.data.tags["optuna.state"] == "FAIL"
    assert trial_run.data.tags["smartify.stopped_by"] == parent.data.tags["smartify.stopped_by"] == "SIGTERM"
    assert not list((tmp_path / "tuned").glob("*.yaml")), "no overlay from an abandoned study"


def test_a_sigterm_swallowed_inside_a_finalizer_is_sent_again() -> None:
    code = """if True:
        import os, signal, time
        from tracking.cli import Terminated, sigterm_as_exception

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**5):  # the handler runs in here, where Python drops its exception
                    pass

        try:
            with sigterm_as_exception():
                Finalized()
                time.sleep(20)
            print("not terminated")
        except Terminated:
            print("terminated")
    """
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "terminated", done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr
    assert time.monotonic() - start < 15
