"""A whole pipeline (train, register, gated promotion, submission) from the CLI on a real sqlite store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny"
FAST = ["data.max_train_slices=2", "data.max_val_slices=4", "train.panel_every=0"]


@pytest.mark.slow  # a tracked pipeline or study of subprocess stages (about a minute)
def test_pipeline_trains_registers_promotes_and_submits(tiny_data, tmp_path, _isolated_tracking):
    pipeline = {
        "name": "ci",
        "workdir": str(tmp_path / "work"),
        "data_root": str(tiny_data),
        "steps": [
            {"name": "hacker_baseline", "train": str(TINY / "hacker_baseline.yaml"), "set": FAST + ["train.epochs=1"]},
            {"name": "hacker_moe", "train": str(TINY / "hacker_moe.yaml"), "init_from": "hacker_baseline",
             "register": True, "set": FAST + ["train.epochs=3"]},
            {"name": "helper", "train": str(TINY / "helper_baseline.yaml"), "register": True,
             "set": FAST + ["train.epochs=1"]},
            {"name": "classifier", "train": str(TINY / "classifier.yaml"), "register": True,
             "set": ["train.epochs=1", "classifier_model.arch=resnet18"]},
            {"name": "promote_hacker", "promote": "hacker_moe"},
            {"name": "promote_helper", "promote": "helper"},
            {"name": "promote_classifier", "promote": "classifier"},
            {"name": "submit", "submit": True},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "pipeline", str(path)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "submission (leaderboard SSIM on synthetic data)" in out and "zero-filled" in out
    assert (tmp_path / "work" / "submit" / "acc4").is_dir()

    from mlflow.tracking import MlflowClient

    from tracking.runs.stores import resolve_stores

    stores = resolve_stores()
    client = MlflowClient(stores.tracking_uri, stores.registry_uri)
    runs = client.search_runs([client.get_experiment_by_name("smartify").experiment_id])
    parents = [r for r in runs if r.data.tags.get("smartify.kind") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = {r.info.run_name for r in children}
    assert names == {"hacker_baseline", "hacker_moe", "helper", "classifier", "promote_hacker", "promote_helper",
                     "promote_classifier", "submission"}
    for name in ("smartify-hacker", "smartify-helper", "smartify-classifier"):
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    submission = next(r for r in children if r.info.run_name == "submission")
    assert "leaderboard" in " ".join(submission.data.metrics)

    # the parent holds the scores the summary printed: the submission's and the baselines'
    printed = {label: [float(x) for x in found.groups()] for label, found in (
        (label, re.search(rf"^  {re.escape(label)}\s+acc4 ([\d.]+)\s+acc8 ([\d.]+)\s+leaderboard ([\d.]+)", out, re.M))
        for label in ("model", "zero-filled", "GRAPPA")) if found}
    assert set(printed) == {"model", "zero-filled", "GRAPPA"}, out
    metrics = parents[0].data.metrics
    for label, prefix in (("model", "submission"), ("zero-filled", "baseline/zero_filled"), ("GRAPPA", "baseline/grappa")):
        logged = [metrics[f"{prefix}/{name}"] for name in ("ssim/acc4", "ssim/acc8", "leaderboard")]
        assert all(abs(a - b) < 5e-5 for a, b in zip(logged, printed[label])), (label, logged, printed[label])
    assert metrics["step/submit/score"] == metrics["submission/leaderboard"]
    assert all(parents[0].data.params[f"step/{step['name']}/status"] for step in pipeline["steps"])


@pytest.mark.slow  # a tracked pipeline or study of subprocess stages (about a minute)
def test_tuned_overlay_flows_into_the_moe_stage(tiny_data, tmp_path, _isolated_tracking):
    fast = ["data.max_train_slices=2", "train.panel_every=0"]
    pipeline = {
        "name": "ci",
        "workdir": str(tmp_path / "work"),
        "data_root": str(tiny_data),
        "steps": [
            {"name": "hacker_baseline", "train": str(TINY / "hacker_baseline.yaml"), "set": FAST + ["train.epochs=1"]},
            {"name": "tune_moe_aug", "tune": str(TINY / "tune_moe_aug.yaml"), "init_from": "hacker_baseline",
             "trials": 2, "set": ["data.max_train_slices=2"]},
            {"name": "hacker_moe", "train": str(TINY / "hacker_moe.yaml"), "init_from": "hacker_baseline",
             "overlay_from": "tune_moe_aug", "set": fast + ["train.epochs=3"]},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "pipeline", str(path)], capture_output=True,
                          text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    lines = out.splitlines()
    first = {name: next(i for i, line in enumerate(lines) if line.startswith(name)) for name in
             ("hacker_baseline", "tune_moe_aug", "hacker_moe")}
    assert first["hacker_baseline"] < first["tune_moe_aug"] < first["hacker_moe"]  # the summary's step order

    import optuna
    from mlflow.tracking import MlflowClient

    from tracking.runs.stores import default_optuna_storage, resolve_stores

    study = optuna.load_study(study_name="ci-tune_moe_aug", storage=default_optuna_storage())
    best = study.best_trial
    assert len(study.trials) == 2 and f"hacker_moe <- study ci-tune_moe_aug trial {best.number}:" in out
    stores = resolve_stores()
    client = MlflowClient(stores.tracking_uri, stores.registry_uri)
    runs = client.search_runs([client.get_experiment_by_name("smartify").experiment_id])
    moe = next(r for r in runs if r.info.run_name == "hacker_moe")
    study_run = next(r for r in runs if r.data.tags.get("smartify.kind") == "study")
    # the MoE run trained with the best trial's values: its logged params are the trial's, read back
    for key, value in best.params.items():
        assert float(moe.data.params[key]) == value, key
    assert moe.data.params["tune.study"] == "ci-tune_moe_aug"
    assert moe.data.params["tune.trial"] == str(best.number)
    assert moe.data.params["tune.overlay"] == str(tmp_path / "work" / "tune_moe_aug" / "ci-tune_moe_aug.yaml")
    assert moe.data.tags["smartify.tune_run_id"] == study_run.info.run_id
    assert client.get_run(study_run.info.run_id).data.tags["smartify.used_by"] == moe.info.run_id
    # the MoE stage keeps its own p_aug epochs (the overlay carries p_max, not the trial's compressed ramp)
    assert (moe.data.params["p_aug.start"], moe.data.params["p_aug.plateau"]) == ("2", "4")
    # the trials started from the pipeline's baseline
    trial_runs = [r for r in runs if r.data.tags.get("smartify.tune_trial") == "true"]
    assert len(trial_runs) == 2
    assert {r.data.params["init_from"] for r in trial_runs} == {str(tmp_path / "work" / "hacker_baseline")}
