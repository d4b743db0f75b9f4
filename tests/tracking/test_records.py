"""The records of a small real pipeline hold what ran: read back with a fresh MlflowClient and Optuna storage.

One pipeline (baseline 1 epoch, MoE 1 epoch initialised from the baseline step, a 2-trial study of 1 epoch per
trial, a promotion) runs from the CLI on a real sqlite store. Each logged value is compared with what the stage
or the study actually used: the checkpoint on disk, the Optuna storage, the folders the steps wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny"
FAST = ["data.max_train_slices=2", "data.max_val_slices=2", "train.panel_every=0", "train.probe_memory=false"]


def _pipeline(tmp_path: Path, data: Path) -> Path:
    tune = tmp_path / "tune.yaml"  # the tiny study, 1 epoch per trial (paths absolute: the file is elsewhere)
    tune.write_text(yaml.safe_dump({"inherit": str(TINY / "tune.yaml"), "base": str(TINY / "hacker_baseline.yaml"),
                                    "epochs_per_trial": 1, "importance": "mdi"}))
    pipeline = {
        "name": "records",
        "workdir": str(tmp_path / "work"),
        "data_root": str(data),
        "steps": [
            {"name": "base", "train": str(TINY / "hacker_baseline.yaml"), "set": FAST + ["train.epochs=1"]},
            {"name": "moe", "train": str(TINY / "hacker_moe.yaml"), "init_from": "base", "register": True,
             "set": FAST + ["train.epochs=3"]},  # the tiny MoE starts at epoch 2: one epoch
            {"name": "search", "tune": str(tune), "trials": 2},
            {"name": "promote_moe", "promote": "moe"},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # a tracked pipeline or study of subprocess stages (about a minute)
def test_pipeline_records_hold_what_ran(tiny_data, tmp_path, _isolated_tracking):
    import optuna
    from mlflow.tracking import MlflowClient

    from recon.engine.checkpoint import load_checkpoint
    from tracking.runs.stores import default_optuna_storage, resolve_stores

    path = _pipeline(tmp_path, tiny_data)
    work = tmp_path / "work"

    # --print-config: the configurations as they will run, and nothing written anywhere
    printed = _cli("pipeline", str(path), "--print-config").stdout
    docs = {text.splitlines()[0].split()[2].rstrip(":"): text for text in printed.split("---\n")}
    assert set(docs) == {"records", "base", "moe", "search"}
    assert yaml.safe_load(docs["moe"])["init_from"] == str(work / "base")
    assert yaml.safe_load(docs["search"])["tune"]["study"] == "records-search"
    assert not any(_isolated_tracking.iterdir()) and not work.exists()

    _cli("pipeline", str(path), "--run-name", "records-parent")

    stores = resolve_stores()
    client = MlflowClient(stores.tracking_uri, stores.registry_uri)
    runs = client.search_runs([client.get_experiment_by_name("smartify").experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("smartify.kind") == "pipeline"]
    assert parent.info.run_name == "records-parent"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"base", "moe", "study-records-search", "promote_moe"}

    # the MoE stage: init_from is the baseline step's real folder, in the params, config.yaml and checkpoint
    base, moe = children["base"], children["moe"]
    base_dir = Path(base.data.tags["smartify.output_dir"])
    assert (base_dir / "checkpoints").is_dir() and base_dir == work / "base"
    checkpoint = load_checkpoint(work / "moe", which="best")
    assert moe.data.params["init_from"] == str(base_dir) == checkpoint["config"]["init_from"]
    assert moe.data.tags["smartify.init_from"] == str(base_dir)
    assert moe.data.tags["smartify.init_from_run_id"] == base.info.run_id
    assert moe.data.params["data.root"] == str(tiny_data) == checkpoint["config"]["data"]["root"]
    assert moe.data.params["output.dir"] == str(work / "moe") == str(Path(checkpoint["path"]).parents[1])
    logged = Path(client.download_artifacts(moe.info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(logged.read_text()) == checkpoint["config"]
    assert logged.read_text() == docs["moe"].split("\n", 1)[1]  # --print-config printed exactly what was logged
    files = yaml.safe_load(moe.data.tags["smartify.config_files"])
    assert files[-1] == str(TINY / "hacker_moe.yaml") and str(TINY / "overlay.yaml") in files

    # the study run: its study name and trial count are the storage's
    study_run = children["study-records-search"]
    study = optuna.load_study(study_name=study_run.data.params["study"], storage=default_optuna_storage())
    assert study.study_name == study_run.data.params["tune.study"] == "records-search"
    assert int(study_run.data.params["tune.n_trials"]) == len(study.trials) == 2
    assert study_run.data.metrics["trials/total"] == 2
    assert int(study_run.data.params["tune.epochs_per_trial"]) == 1
    assert study_run.data.params["tune.output_dir"] == str(work / "search" / "trials")
    assert study.user_attrs["mlflow_run_id"] == study_run.info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert len(trials) == 2

    # the promotion decision nests under the parent with the version the MoE step registered
    decision = children["promote_moe"]
    version = client.get_model_version_by_alias(decision.data.params["promotion.model"], "champion")
    assert decision.data.params["promotion.status"] == "promoted"
    assert decision.data.params["promotion.version"] == str(version.version)
    assert version.run_id == moe.info.run_id

    # the parent: one status param and a seconds metric per step, the scores, the table and the pipeline
    params, metrics = parent.data.params, parent.data.metrics
    for name in ("base", "moe", "search", "promote_moe"):
        assert params[f"step/{name}/status"] in ("finished", "promoted"), name
        assert metrics[f"step/{name}/seconds"] > 0
        assert params[f"step/{name}/run_id"] == children[{"search": "study-records-search"}.get(name, name)].info.run_id
    assert abs(metrics["step/moe/score"] - float(checkpoint["best_metric"])) < 1e-9
    assert abs(metrics["step/search/score"] - study.best_value) < 1e-9
    assert params["pipeline.data_root"] == str(tiny_data) and params["pipeline.workdir"] == str(work)
    assert params["pipeline.file"] == str(path)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pipeline.yaml", "steps.md", "summary.txt", "source"} <= artifacts
    table = Path(client.download_artifacts(parent.info.run_id, "steps.md", str(tmp_path / "p"))).read_text()
    assert all(f"| {name} |" in table for name in ("base", "moe", "search", "promote_moe"))
    assert parent.data.tags["mlflow.note.content"].strip() == table.strip()
    ran = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "pipeline.yaml",
                                                        str(tmp_path / "q"))).read_text())
    assert ran["data_root"] == str(tiny_data) and [s["name"] for s in ran["steps"]] == [
        "base", "moe", "search", "promote_moe"]


def test_print_config_refuses_an_unknown_init_from_in_one_line(tmp_path, _isolated_tracking):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "data_root": str(tmp_path), "steps": [
        {"name": "moe", "train": str(TINY / "hacker_moe.yaml"), "init_from": "nope"}]}))
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "pipeline", str(path), "--print-config"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("smartify pipeline: error: step 'moe': init_from 'nope': neither an earlier "
                                   "train step nor an existing path")
    assert not any(_isolated_tracking.iterdir())
