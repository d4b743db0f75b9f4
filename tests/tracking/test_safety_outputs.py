"""No command overwrites a stage's results silently (issue 13, items 1, 2 and 6).

Real subprocesses of ``smartify``, the tiny stages for one epoch, a real sqlite store (``SMARTIFY_HOME``
of the autouse fixture, inherited by the subprocesses) where tracking is the point.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recon.engine.stage import load_stage_config
from recon.errors import InputError
from recon.events import RUN_ID_KEY

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny"
STAGE = TINY / "hacker_baseline.yaml"
FAST = ["data.max_train_slices=2", "data.max_val_slices=4", "train.panel_every=0", "train.epochs=1"]


def _smartify(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracking.cli", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ), cwd=cwd, timeout=900)


def _train(data: Path, out: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    sets = [f"--set={item}" for item in (f"data.root={data}", f"output.dir={out}", *FAST)]
    return _smartify("train", STAGE, *sets, *extra)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted((folder / "checkpoints").glob("*.pt"))}


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ item 6: a stage file names its stage


@pytest.mark.parametrize(("text", "key"), [
    ("", "stage.name"),
    (f"inherit: {REPO / 'experiments' / 'base.yaml'}\n", "stage.name"),
    ("stage: {name: mine}\n", "stage.kind"),
])
def test_a_stage_file_must_set_its_name_and_kind(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_stage_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key} is not set") and "\n" not in message
    # a file that sets both through --set (as a pipeline step's name) is complete
    cfg, _ = load_stage_config(path, ["stage.name=mine", "stage.kind=moe"])
    assert (cfg.stage.name, cfg.stage.kind) == ("mine", "moe")


def test_an_empty_stage_file_is_refused_by_train(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    proc = _smartify("train", path, "--no-tracking", cwd=tmp_path)
    assert proc.returncode == 2
    assert _error_line(proc) == (f"smartify train: error: {path}: stage.name is not set: a stage file must name "
                                 "its stage and kind (stage.name, stage.kind) or inherit a file that does")
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


# ------------------------------------------------------------------ item 1: refuse, or --overwrite


def test_train_refuses_a_folder_holding_checkpoints_and_overwrite_replaces_them(tiny_data: Path,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "stage"
    first = _train(tiny_data, out, "--no-tracking")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digests(out)
    assert set(before) == {"best.pt", "last.pt"}

    again = _train(tiny_data, out, "--no-tracking", "--set=seed=1")
    assert again.returncode == 2
    line = _error_line(again)
    assert line.startswith(f"smartify train: error: {out}: already holds a stage's checkpoints")
    assert f"--resume {out}" in line and "--overwrite" in line
    assert _digests(out) == before and _temp_files(out) == []

    replaced = _train(tiny_data, out, "--no-tracking", "--set=seed=1", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    after = _digests(out)
    assert set(after) == {"best.pt", "last.pt"} and after["best.pt"] != before["best.pt"]
    assert after["last.pt"] != before["last.pt"] and _temp_files(out) == []
    for name in after:  # both files are the new stage's (seed 1), none is left from the old one
        assert torch.load(out / "checkpoints" / name, weights_only=True)["config"]["seed"] == 1


# ------------------------------------------------------------------ item 2: resume of a copy


@pytest.mark.slow  # three tracked subprocess stages
def test_resuming_a_copy_writes_into_the_copy_under_a_new_run(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tracking.runs.stores import resolve_stores
    from tracking.train import RESUMED_FROM_TAG

    original, copy = tmp_path / "original", tmp_path / "copy"
    first = _train(tiny_data, original)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(original, copy)
    digests = _digests(original)
    run_a = torch.load(original / "checkpoints" / "last.pt", weights_only=True)["tracking"][RUN_ID_KEY]
    client = MlflowClient(resolve_stores().tracking_uri)
    before = client.get_run(run_a)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_a, key)]
               for key in before.data.metrics}

    resumed = _smartify("train", STAGE, "--resume", copy, "--set=train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming into {copy}, not {original}" in resumed.stderr

    # the copy holds the resumed epoch, the original is untouched
    assert _digests(original) == digests and _temp_files(original) == [] and _temp_files(copy) == []
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["config"]["output"]["dir"] == str(copy)
    run_b = last["tracking"][RUN_ID_KEY]
    assert run_b != run_a

    new = client.get_run(run_b)
    assert new.data.tags[RESUMED_FROM_TAG] == run_a and new.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_b, "val/ssim")] == [1]
    after = client.get_run(run_a)
    assert after.info.status == before.info.status and after.info.end_time == before.info.end_time
    assert {key: [(m.step, m.value) for m in client.get_metric_history(run_a, key)]
            for key in after.data.metrics} == history
    assert "smartify.resumed_at_epoch" not in after.data.tags

    # resuming the copy again continues its own run, in place
    again = _smartify("train", STAGE, "--resume", copy, "--set=train.epochs=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming into" not in again.stderr
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["tracking"][RUN_ID_KEY] == run_b
    assert [m.step for m in client.get_metric_history(run_b, "val/ssim")] == [1, 2]


def test_resume_and_overwrite_exclude_each_other(tiny_data: Path, tmp_path: Path) -> None:
    from recon.engine.checkpoint import Checkpoint, save_checkpoint
    from tracking.train import run_tracked_stage

    out = tmp_path / "stage"
    cfg, resolved = load_stage_config(STAGE, [f"data.root={tiny_data}", f"output.dir={out}"])
    model = {"w": torch.zeros(1)}
    save_checkpoint(out / "checkpoints" / "last.pt", Checkpoint("baseline", cfg.stage.name, "hacker", 0, resolved,
                                                                 {}, (), model))
    digest = _digests(out)
    with pytest.raises(InputError, match=r"--resume continues the checkpoints in this folder and --overwrite"):
        run_tracked_stage(resume=out, overwrite=True, tracking=None)
    assert _digests(out) == digest


# ------------------------------------------------------------------ pipelines: a re-run is a new workdir


@pytest.mark.slow  # a tracked pipeline or study of subprocess stages (about a minute)
def test_a_pipeline_rerun_writes_a_new_numbered_workdir(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tracking.runs.stores import resolve_stores

    work = tmp_path / "work"
    pipeline = tmp_path / "one.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "one", "workdir": str(work), "data_root": str(tiny_data),
                                        "steps": [{"name": "base", "train": str(STAGE), "set": FAST}]}))
    first = _smartify("pipeline", pipeline)
    assert first.returncode == 0, first.stderr[-3000:]
    digests = _digests(work / "base")
    assert set(digests) == {"best.pt", "last.pt"}

    second = _smartify("pipeline", pipeline)
    assert second.returncode == 0, second.stderr[-3000:]
    moved = tmp_path / "work-2"
    assert f"{work} holds an earlier run's results; writing this run to {moved}" in second.stderr
    assert _digests(work / "base") == digests and set(_digests(moved / "base")) == {"best.pt", "last.pt"}
    assert _temp_files(work) == [] and _temp_files(moved) == []

    client = MlflowClient(resolve_stores().tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("smartify").experiment_id],
                              "tags.`smartify.kind` = 'pipeline'", order_by=["attributes.start_time ASC"])
    assert [r.data.params["workdir"] for r in runs] == [str(work), str(moved)]
    for run in runs:  # each stage run nests under its own invocation and names its own folder
        child = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert [c.data.params["output.dir"] for c in child] == [str(Path(run.data.params["workdir"]) / "base")]


def test_workdir_choice_and_shared_synthetic_data(tmp_path: Path) -> None:
    from tracking.pipeline.config import choose_workdir, load_pipeline
    from tracking.pipeline.runner import PipelineRunner
    from tracking.runs.stores import resolve_stores

    work = tmp_path / "demo"
    assert choose_workdir(work) == work  # missing
    (work / "data" / "train").mkdir(parents=True)
    assert choose_workdir(work) == work  # the data set alone is not a result
    (work / "hacker_baseline").mkdir()
    assert choose_workdir(work) == tmp_path / "demo-2"
    assert choose_workdir(work, overwrite=True) == work
    (tmp_path / "demo-2" / "submit").mkdir(parents=True)
    (tmp_path / "demo-3").mkdir()  # empty: free
    assert choose_workdir(work) == tmp_path / "demo-3"

    cfg, base = load_pipeline(REPO / "experiments" / "demo.yaml", {"workdir": str(work)})
    runner = PipelineRunner(cfg, base, stores=resolve_stores())  # not run: where it writes
    assert runner.workdir == tmp_path / "demo-3" and runner.data_root == work / "data"
    assert PipelineRunner(cfg, base, stores=resolve_stores(), overwrite=True).workdir == work
