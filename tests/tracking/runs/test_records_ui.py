"""Standard MLflow fields, datasets, run descriptions, images and the UI's URL, read back with a fresh client."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from recon.config import flatten, to_dict
from recon.data.layout import data_fingerprint, discover_split
from recon.events import EpochEnd, Panel, StageEnd, StageStart
from tracking.commands.ui import runs_url
from tracking.runs.callback import MLflowCallback
from tracking.runs.params import param_value
from tracking.runs.parent import parent_run
from tracking.runs.environment import source_name
from tracking.runs.stores import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    Stores,
    get_or_create_experiment,
    make_client,
    sqlite_uri,
)
from tracking.runs.replay import replay_spool
from tracking.runs.writer import TrackingWriter

TINY = Path(__file__).resolve().parents[3] / "experiments" / "tiny"
CONFIG = {
    "stage": {"name": "helper_baseline", "kind": "baseline", "description": "Helper baseline: mask augmentation."},
    "data": {"root": "/data/x", "train_splits": ["train"], "val_split": "val"},
    "model": {"cascades": 2, "chans": [8, 16]},
    "classifier": {"epochs": 3, "batch_size": 4},
    "classifier_model": {"width": 8},
    "moe": {"experts": ["brain_acc4"], "route_acc_from": "mask"},
    "train": {"epochs": 2, "max_train_slices": None},
    "init_from": None,
    "seed": 7,
}
FINGERPRINT = {"n_files": 3, "n_slices": 12, "bytes": 999, "digest": "d" * 64, "val_digest": "v" * 64}


def _stores(home: Path) -> Stores:
    uri = sqlite_uri(home / "mlflow.db")
    return Stores(tracking_uri=uri, registry_uri=uri, home=home, artifact_root=home / "artifacts")


def _start(out: Path, kind: str = "baseline", config: dict = CONFIG) -> StageStart:
    return StageStart(stage=config["stage"]["name"], kind=kind, family="helper", config=config, seeds={"stage": 7},
                      data_root="/data/x", data_fingerprint=FINGERPRINT, param_count=10, device="cpu",
                      determinism={}, start_epoch=0, epochs=2, output_dir=out)


def _panel(epoch: int, **kw) -> Panel:
    target = np.random.default_rng(epoch).random((16, 16))
    return Panel("brain_acc4_1.h5:3", target, target * 0.5, target * 0.9, **kw)


def test_stage_run_has_standard_fields_datasets_description_and_used_params(tmp_path):
    stores = _stores(tmp_path / "home")
    cb = MLflowCallback(stores, experiment="records", system_metrics=False, artifact_checkpoints=False)
    cb.on_stage_start(_start(tmp_path / "out"))
    for epoch in range(2):
        cb.on_epoch_end(EpochEnd(epoch, {"train/loss": 1.0 / (epoch + 1)}, panels=(_panel(epoch),)))
    cb.on_stage_end(StageEnd("finished", 0.5, 1, None, None, tmp_path / "out"))

    client = MlflowClient(stores.tracking_uri)  # fresh: what a user reads
    run = client.get_run(cb.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == source_name() and "/" not in tags["mlflow.source.name"]
    assert tags["mlflow.note.content"] == CONFIG["stage"]["description"]
    assert not any(k.startswith(("classifier.", "classifier_model.")) for k in params), sorted(params)
    assert params["moe.route_acc_from"] == "mask"  # a baseline reads it (routing of the per-expert scores)
    assert "None" not in params.values() and "init_from" not in params and "train.max_train_slices" not in params
    assert "stage.description" not in params and params["model.cascades"] == "2"

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"].digest == params["data.fingerprint"][:36] == FINGERPRINT["digest"][:36]
    assert inputs["validation"].digest == params["data.val_fingerprint"][:36]
    assert json.loads(inputs["training"].source) == {"uri": "/data/x/train"}
    assert json.loads(inputs["validation"].source) == {"uri": "/data/x/val"} and inputs["validation"].name == "val"
    assert json.loads(inputs["training"].profile)["n_slices"] == 12

    images = sorted(a.path for a in client.list_artifacts(cb.run_id, "images"))
    for step in (0, 1):  # one full-size PNG and one compressed preview per epoch, in the one series
        series = [p for p in images if p.startswith(f"images/reconstruction~brain_acc4_1.h5_3+step+{step}+")]
        assert sorted(Path(p).suffix for p in series) == [".png", ".webp"], images
    assert len(images) == 4 and tags["mlflow.loggedImages"] == "True"
    assert not [a for a in client.list_artifacts(cb.run_id, "plots") if a.path.endswith("panels")]


def test_classifier_run_logs_no_reconstruction_sections(tmp_path):
    stores = _stores(tmp_path / "home")
    config = {**CONFIG, "stage": {"name": "classifier", "kind": "classifier", "description": ""}}
    cb = MLflowCallback(stores, experiment="records", system_metrics=False, artifact_checkpoints=False)
    cb.on_stage_start(_start(tmp_path / "out", kind="classifier", config=config))
    cb.on_stage_end(StageEnd("finished", None, None, None, None, tmp_path / "out"))
    run = MlflowClient(stores.tracking_uri).get_run(cb.run_id)
    assert params_sections(run.data.params) == {"classifier", "classifier_model", "data", "seed", "model",
                                                "stage", "train"}
    assert "mlflow.note.content" not in run.data.tags  # no description: no empty one
    # "model" is only the stage's own parameter count, not the reconstruction network's section
    assert [k for k in run.data.params if k.startswith("model.")] == ["model.param_count"]


def params_sections(params: dict[str, str]) -> set[str]:
    return {k.split(".", 1)[0] for k in params}


def test_every_created_run_has_user_and_source_and_the_experiment_is_model_training(tmp_path):
    stores = _stores(tmp_path / "home")
    writer = TrackingWriter(stores)
    with parent_run(stores, "kinds", "pipeline-x", writer=writer) as parent:
        child = writer.create_run("kinds", "trial-record", {"mlflow.parentRunId": parent})
        writer.set_terminated(child, "FINISHED")
    client = MlflowClient(stores.tracking_uri)
    for run_id in (parent, child):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"] == source_name(), tags
    exp = client.get_experiment_by_name("kinds")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    # an experiment made elsewhere without the kind gets it (the UI would otherwise guess)
    other = client.create_experiment("made-by-hand", artifact_location=(tmp_path / "a").as_uri())
    assert get_or_create_experiment("made-by-hand", stores, client) == other
    assert MlflowClient(stores.tracking_uri).get_experiment(other).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_source_name_is_the_smartify_command():
    assert source_name(["/x/bin/smartify", "train", "a.yaml"]) == "smartify train"
    assert source_name(["/repo/tracking/cli.py", "-q"]) == "smartify"
    assert source_name(["/usr/bin/pytest", "tests"]) == "pytest"


def test_spooled_inputs_and_images_are_replayed_once(tmp_path):
    stores = _stores(tmp_path / "home")
    offline = TrackingWriter(stores, offline=True)
    cb = MLflowCallback(stores, experiment="spooled", system_metrics=False, artifact_checkpoints=False,
                        writer=offline)
    cb.on_stage_start(_start(tmp_path / "out"))
    cb.on_epoch_end(EpochEnd(0, {"train/loss": 1.0}, panels=(_panel(0),)))
    cb.on_epoch_end(EpochEnd(0, {"train/loss": 1.0}, panels=(_panel(0),)))  # same step again: replaces it
    cb.on_stage_end(StageEnd("finished", 0.5, 0, None, None, tmp_path / "out"))
    assert replay_spool(stores).created == 1
    assert replay_spool(stores).sent == 0
    client = make_client(stores)
    (run,) = client.search_runs([client.get_experiment_by_name("spooled").experiment_id])
    assert len(run.inputs.dataset_inputs) == 2
    assert len(client.list_artifacts(run.info.run_id, "images")) == 2  # one image at step 0 (png + preview)
    # a second send of the same inputs does not add rows (MLflow keeps one per data set and run)
    TrackingWriter(stores).log_inputs(run.info.run_id, [{"name": "val", "digest": "v" * 36, "source_type": "local",
                                                         "source": '{"uri": "/data/x/val"}', "profile": None,
                                                         "context": "validation"}])
    assert len(client.get_run(run.info.run_id).inputs.dataset_inputs) == 2


def test_panel_title_and_relative_error_work_with_and_without_values(tmp_path):
    from tracking.runs.plots import panel_title, plot_panel

    assert panel_title(_panel(0)) == "brain_acc4_1.h5:3, SSIM n/a"
    assert panel_title(_panel(0, ssim=0.91234, max_value=2.0)) == "brain_acc4_1.h5:3, SSIM 0.9123"
    for i, panel in enumerate((_panel(0), _panel(0, ssim=0.9, max_value=2.0), _panel(0, max_value=math.inf))):
        assert plot_panel([panel], tmp_path / f"p{i}.png", "t").read_bytes()[:4] == b"\x89PNG"


def test_runs_url_opens_the_runs_table():
    assert runs_url("http://127.0.0.1:5000", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert runs_url("http://h:1/", None) == "http://h:1/#/experiments?workflowType=machine_learning"


def test_ui_dry_run_prints_the_runs_table_of_the_experiment(tmp_path):
    home = tmp_path / "home"
    stores = _stores(home)
    exp_id = get_or_create_experiment("smartify", stores, make_client(stores))
    env = {**os.environ, "SMARTIFY_HOME": str(home), "MLFLOW_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": ""}
    cmd = [sys.executable, "-m", "tracking.cli", "ui", "--dry-run", "--port", "5079"]
    ui = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ui.returncode == 0, ui.stderr
    assert f"open http://127.0.0.1:5079/#/experiments/{exp_id}/runs?workflowType=machine_learning\n" in ui.stdout
    missing = subprocess.run([*cmd, "--experiment", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert "experiment 'nope' has no runs yet" in missing.stdout
    assert "open http://127.0.0.1:5079/#/experiments?workflowType=machine_learning" in missing.stdout


def _study(n_complete: int) -> optuna.Study:
    study = optuna.create_study(study_name="few", direction="maximize")
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["val/ssim"])
    for i in range(n_complete):
        study.add_trial(optuna.trial.create_trial(params={"x": float(i), "y": float(i % 2)},
                                                  distributions={"x": optuna.distributions.FloatDistribution(0, 9),
                                                                 "y": optuna.distributions.FloatDistribution(0, 1)},
                                                  value=0.1 * i))
    return study


def test_importances_need_enough_complete_trials(tmp_path):
    from tracking.tune.report import IMPORTANCE_NOTE, MIN_TRIALS_FOR_IMPORTANCE, plot_study

    few = plot_study(_study(2), tmp_path / "few", importance="ped-anova")
    assert IMPORTANCE_NOTE in few and not any(k.startswith("param_importances_ped") for k in few)
    assert f"2 complete trial(s), at least {MIN_TRIALS_FOR_IMPORTANCE}" in few[IMPORTANCE_NOTE].read_text()
    enough = plot_study(_study(MIN_TRIALS_FOR_IMPORTANCE + 1), tmp_path / "enough", importance="ped-anova")
    assert IMPORTANCE_NOTE not in enough and enough["param_importances_ped-anova"].read_bytes()[:4] == b"\x89PNG"


def test_open_study_names_the_objective(tmp_path):
    from optuna.storages import RDBStorage

    from tracking.tune.config import TuneConfig
    from tracking.tune.study import open_study

    storage = RDBStorage(sqlite_uri(tmp_path / "optuna.db"))
    cfg = TuneConfig(base="stage.yaml")
    open_study(storage, "named", cfg)
    assert optuna.load_study(study_name="named", storage=sqlite_uri(tmp_path / "optuna.db")).metric_names == \
        [cfg.metric]


def test_real_stage_records_what_ran(tiny_data: Path, tmp_path: Path) -> None:
    """A tiny real stage: params equal the configuration that ran, datasets carry the data's own fingerprints."""
    from tracking.runs.stores import resolve_stores
    from tracking.train import StageTracking, run_tracked_stage

    out = tmp_path / "stage"
    over = [f"data.root={tiny_data}", f"output.dir={out}", "data.max_train_slices=2", "data.max_val_slices=2",
            "train.epochs=2", "train.panel_every=1", "train.panel_slices=1"]
    outcome = run_tracked_stage(TINY / "helper_baseline.yaml", over, tracking=StageTracking("records-real"))
    assert outcome.status == "finished"
    ran = outcome.config
    run = MlflowClient(resolve_stores().tracking_uri).get_run(outcome.run_id)
    params, tags = run.data.params, run.data.tags
    used = {k: v for k, v in flatten(to_dict(ran)).items()
            if v is not None and not k.startswith(("classifier.", "classifier_model.")) and k != "stage.description"}
    assert {k: params.get(k) for k in used} == {k: param_value(v)[0] for k, v in used.items()}
    assert not [k for k in params if k.startswith("classifier")] and "None" not in params.values()
    assert tags.get("mlflow.note.content", "") == ran.stage.description.strip()

    train = [p for s in ran.data.train_splits for p in discover_split(tiny_data, s)]
    val = discover_split(tiny_data, ran.data.val_split)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert inputs["training"].digest == data_fingerprint(train + val)["digest"][:36]  # all the stage reads
    assert inputs["validation"].digest == data_fingerprint(val)["digest"][:36]
    images = [a.path for a in MlflowClient(resolve_stores().tracking_uri).list_artifacts(outcome.run_id, "images")]
    assert {p.split("+step+")[1].split("+")[0] for p in images} == {"0", "1"}, images
