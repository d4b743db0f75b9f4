"""Optuna tuning on real SQLite storages in temp folders: OOM prediction and pruning, divergence, workers, retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from recon.engine.stage import load_stage_config
from recon.errors import InputError
from recon.events import Callback, EpochEnd
from tracking.tune.oom import CATCH, OOM, OOM_PREDICTED, PRUNE_REASON, guard_objective
from tracking.tune.study import TuneOptions, make_sampler, run_tune
from tracking.tune.config import load_tune_config, parse_bytes
from tracking.tune.space import SearchSpace, stage_layers, valid_reductions

ROOT = Path(__file__).resolve().parents[3]
TINY_TUNE = ROOT / "experiments" / "tiny" / "tune.yaml"
TINY_BASE = ROOT / "experiments" / "tiny" / "hacker_baseline.yaml"
FAST = ("data.max_train_slices=2", "data.max_val_slices=2")


def write_tune(tmp: Path, name: str = "tune.yaml", **changes) -> Path:
    """The tiny tune file with an absolute base, outputs in ``tmp`` and ``changes`` on top."""
    data = yaml.safe_load(TINY_TUNE.read_text())
    data.update({"base": str(TINY_BASE), "output_dir": str(tmp / "runs" / "{study}")})
    data.update(changes)
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def options(tmp: Path, tiny_data: Path, tune: Path, *extra: str, **kw) -> TuneOptions:
    base = dict(tune_file=tune, storage=f"sqlite:///{tmp}/optuna.db", overrides=(f"data.root={tiny_data}", *FAST,
                                                                                 *extra),
                overlay_dir=tmp / "tuned", tracking=False)
    base.update(kw)
    return TuneOptions(**base)


def load(tmp: Path, name: str = "tiny-tune") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")


class Worker:
    """``smartify ARGS`` in a subprocess, its output in a file (a full pipe would block it)."""

    def __init__(self, *args: str, cwd: Path, name: str) -> None:
        self.log = cwd / f"{name}.log"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "tracking.cli", *args], cwd=cwd, env=dict(os.environ),
                                         stdout=fh, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return self.log.read_text()


# ----- configuration ------------------------------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("7.5 GiB") == int(7.5 * 2**30)
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(1024) == 1024
    assert parse_bytes("none") is None and parse_bytes(None) is None
    with pytest.raises(InputError, match="memory_budget"):
        parse_bytes("8 apples")


def test_valid_reductions_follow_the_model_widths():
    cfg, _ = load_stage_config(TINY_BASE)
    # the tiny sensitivity net is 4 channels wide at its narrowest: 8 and 16 would give 0-channel layers
    assert valid_reductions(cfg.model, [1, 2, 3, 4, 8, 16]) == [1, 2, 3, 4]
    assert valid_reductions(cfg.model.replace(use_ca=False), [8, 16]) == [8, 16]


def test_space_never_proposes_an_invalid_reduction(tmp_path, tiny_data):
    tune = write_tune(tmp_path, space={
        "model.reduction": {"type": "categorical", "choices": [1, 2, 4, 8, 16]},
        # a narrow width choice in the space lowers the limit below the base model's
        "model.feature_dim": {"type": "categorical", "choices": [[2, 12, 16], [8, 12, 16]]},
    })
    cfg, base = load_tune_config(tune)
    space = SearchSpace(cfg.space, stage_layers(cfg, base, [f"data.root={tiny_data}"]))
    assert space.excluded == {"model.reduction": [4, 8, 16]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: float(space.sample(t)["model.reduction"]), n_trials=30)
    proposed = {t.params["model.reduction"] for t in study.trials}
    assert proposed == {1, 2}
    # list choices go to Optuna as JSON strings and come back as lists
    assert space.decode(study.trials[0].params)["model.feature_dim"] in ([2, 12, 16], [8, 12, 16])


def test_bad_tune_files_fail_before_any_trial(tmp_path, tiny_data):
    def check(match: str, *extra: str, **changes) -> None:
        tune = write_tune(tmp_path, **changes)
        cfg, base = load_tune_config(tune)
        with pytest.raises(InputError, match=match):
            SearchSpace(cfg.space, stage_layers(cfg, base, [f"data.root={tiny_data}", *extra]))

    check("mraugment.strenght", space={"mraugment.strenght": {"type": "float", "low": 0.5, "high": 1.0}})
    check("space.mraugment.magnitude=10.0", space={"mraugment.magnitude": {"type": "float", "low": 0.5, "high": 10}})
    check("none of", space={"model.reduction": {"type": "categorical", "choices": [32, 64]}})
    check("--set p_aug.p_max: this key is in the search space", "p_aug.p_max=0.3")
    check("--set output.dir: each trial sets it", "output.dir=/tmp/x")
    with pytest.raises(InputError, match="set by each trial"):
        load_tune_config(write_tune(tmp_path, space={"train.epochs": {"type": "int", "low": 1, "high": 3}}))
    with pytest.raises(InputError, match="low <= high"):
        load_tune_config(write_tune(tmp_path, space={"p_aug.p_max": {"type": "float", "low": 0.9, "high": 0.1}}))


def test_sampler_draws_depend_on_study_seed_and_trial_number_only():
    from tracking.tune.config import ParamSpec, TuneConfig

    def params(seed: int, n: int) -> list[dict]:
        cfg = TuneConfig(base="x.yaml", seed=seed, space={"a": ParamSpec("float", 0.0, 1.0)})
        study = optuna.create_study(sampler=make_sampler(cfg))
        study.optimize(lambda t: t.suggest_float("a", 0.0, 1.0), n_trials=n)
        return [t.params for t in study.trials]

    first = params(430, 3)
    assert params(430, 3) == first  # reproducible
    assert params(430, 1) == first[:1]  # trial 0 draws the same whatever comes after
    assert params(431, 3) != first


# ----- OOM, divergence, errors --------------------------------------------------------------------------------
def test_moe_prediction_adds_the_idle_experts_weights_and_optimizer_state(tiny_data):
    from tracking.tune.memory import MemoryPredictor, ProbeInput

    base, _ = load_stage_config(TINY_BASE, [f"data.root={tiny_data}"])
    moe, _ = load_stage_config(ROOT / "experiments" / "tiny" / "hacker_moe.yaml", [f"data.root={tiny_data}"])
    predictor = MemoryPredictor("cpu")
    inp = ProbeInput(8, 64, 64)
    single = predictor.predict(base, inp)
    mixture = predictor.predict(moe, inp)
    assert (single.source, mixture.source) == ("probe", "cache")  # same network, probed once
    per_expert = single.details["params_bytes"] + single.details["optimizer_bytes"]
    assert mixture.predicted_bytes - single.predicted_bytes == 3 * per_expert > 0


def test_tiny_budget_prunes_every_trial_before_training(tmp_path, tiny_data):
    tune = write_tune(tmp_path)
    result = run_tune(options(tmp_path, tiny_data, tune, trials=5, memory_budget="1KiB"))
    study = load(tmp_path)
    assert len(study.trials) == 5
    for t in study.trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs[PRUNE_REASON] == OOM_PREDICTED
        assert t.user_attrs["budget_bytes"] == 1024 < t.user_attrs["predicted_bytes"]
        assert t.user_attrs["prediction_source"] == "input-bound"  # the input alone exceeds it: no probe run
        assert t.intermediate_values == {}  # no epoch trained
    assert not (tmp_path / "runs" / "tiny-tune" / "trial_0000").exists()
    assert result.overlay is None and result.summary["pruned/oom-predicted"] == 5
    assert all(r["seconds"] is not None for r in result.rows)


def test_probe_prediction_prunes_above_the_budget(tmp_path, tiny_data):
    # 1 MiB holds the tiny input (256 KiB) but not the network: the memory probe decides
    tune = write_tune(tmp_path, space={"p_aug.p_max": {"type": "float", "low": 0.1, "high": 0.9},
                                       "model.reduction": {"type": "categorical", "choices": [2, 4]}})
    run_tune(options(tmp_path, tiny_data, tune, trials=3, memory_budget="1MiB"))
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert {t.user_attrs["prediction_source"] for t in trials} <= {"probe", "cache"}
    assert "cache" in {t.user_attrs["prediction_source"] for t in trials}  # a repeated model is not probed again
    assert all(t.user_attrs["predicted_bytes"] > 2**20 for t in trials)


def test_a_real_oom_is_pruned_memory_is_freed_and_the_next_trial_runs(tmp_path):
    refs: list[weakref.ref] = []

    def objective(trial: optuna.Trial) -> float:
        if refs:
            assert refs[0]() is None, "the first trial's model is still alive"
        model = torch.nn.Linear(64, 64)
        model.cycle = [model]  # a reference cycle, as real training graphs have: only a collection frees it
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(2, 64)).sum().backward()
        optimizer.step()
        refs.append(weakref.ref(model))
        if trial.number == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 1.0

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="oom")
    study.optimize(guard_objective(objective), n_trials=2, catch=CATCH)  # no gc_after_trial: the guard frees
    first, second = study.trials
    assert first.state == TrialState.PRUNED and first.user_attrs[PRUNE_REASON] == OOM
    assert "CUDA out of memory" in first.user_attrs["error"]
    assert second.state == TrialState.COMPLETE and second.value == 1.0


class OOMOnce(Callback):
    """Raises an out-of-memory error at the end of the first epoch of the first stage it sees."""

    def __init__(self) -> None:
        self.raised = False

    def on_epoch_end(self, event: EpochEnd) -> None:
        if not self.raised:
            self.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory (test)")


def test_oom_inside_training_prunes_and_the_study_goes_on(tmp_path, tiny_data):
    tune = write_tune(tmp_path, epochs_per_trial=1, space={"p_aug.p_max": {"type": "float", "low": 0.1, "high": 0.9}})
    result = run_tune(options(tmp_path, tiny_data, tune, trials=2, memory_budget="none",
                              extra_callbacks=[OOMOnce()]))
    first, second = load(tmp_path).trials
    assert first.state == TrialState.PRUNED and first.user_attrs[PRUNE_REASON] == OOM
    assert second.state == TrialState.COMPLETE and 0.0 < second.value <= 1.0
    assert result.overlay is not None and result.overlay.is_file()


def test_divergence_prunes_with_its_reason(tmp_path, tiny_data):
    tune = write_tune(tmp_path, epochs_per_trial=1, space={"p_aug.p_max": {"type": "float", "low": 0.1, "high": 0.9}})
    run_tune(options(tmp_path, tiny_data, tune, "lr.base_lr=1000", trials=1, memory_budget="none"))
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[PRUNE_REASON] == "diverged"
    assert "non-finite" in trial.user_attrs["divergence"]


def test_other_errors_fail_the_trial_and_the_study_goes_on(tmp_path):
    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            raise KeyError("no such thing")
        return 0.5

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="errors")
    study.optimize(guard_objective(objective), n_trials=2, catch=CATCH)
    first, second = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["error"] == "KeyError: 'no such thing'"
    assert PRUNE_REASON not in first.user_attrs
    assert second.state == TrialState.COMPLETE


# ----- workers and retries (real processes) -------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, tiny_data):
    tune = write_tune(tmp_path)
    common = ["tune", str(tune), "--storage", f"sqlite:///{tmp_path}/optuna.db", "--memory-budget", "1KiB",
              "--no-tracking", "--overlay-dir", str(tmp_path / "tuned"), "--set", f"data.root={tiny_data}"]
    # the study is created before the workers start (as --workers does), then two processes run at once
    first = Worker(*common, "--trials", "0", cwd=tmp_path, name="create")
    assert first.wait(timeout=120) == 0, first.output
    workers = [Worker(*common, "--trials", "4", cwd=tmp_path, name=f"w{i}") for i in range(2)]
    for w in workers:
        assert w.wait(timeout=180) == 0, w.output
    # and --workers K does the same from one command
    pool = Worker(*common, "--trials", "3", "--workers", "2", cwd=tmp_path, name="pool")
    assert pool.wait(timeout=180) == 0, pool.output
    trials = load(tmp_path).trials
    assert sorted(t.number for t in trials) == list(range(11))  # none lost, none duplicated
    assert all(t.state == TrialState.PRUNED and t.user_attrs[PRUNE_REASON] == OOM_PREDICTED for t in trials)
    assert "  10 PRUNED" in pool.output  # the parent prints the whole study


@pytest.mark.slow
def test_a_killed_worker_has_its_trial_retried(tmp_path, tiny_data):
    beat = {"interval": 1, "grace_period": 2, "max_retry": 1}
    space = {"p_aug.p_max": {"type": "float", "low": 0.1, "high": 0.9}}
    long = write_tune(tmp_path, "long.yaml", epochs_per_trial=200, heartbeat=beat, space=space, memory_budget="none")
    short = write_tune(tmp_path, "short.yaml", epochs_per_trial=1, heartbeat=beat, space=space, memory_budget="none")
    common = ["--storage", f"sqlite:///{tmp_path}/optuna.db", "--study", "retry", "--no-tracking",
              "--overlay-dir", str(tmp_path / "tuned"), "--set", f"data.root={tiny_data}",
              "--set", "data.max_train_slices=1", "--set", "data.max_val_slices=1"]
    create = Worker("tune", str(short), "--trials", "0", *common, cwd=tmp_path, name="create")
    assert create.wait(timeout=120) == 0, create.output
    worker = Worker("tune", str(long), "--trials", "1", *common, cwd=tmp_path, name="killed")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # until the trial is mid-training (an epoch reported)
        time.sleep(0.5)
        running = [t for t in load(tmp_path, "retry").trials if t.state == TrialState.RUNNING]
        if running and running[0].intermediate_values:
            break
    else:
        worker.proc.kill()
        pytest.fail("the first worker never reported an epoch:\n" + worker.output[-3000:])
    worker.proc.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    time.sleep(beat["grace_period"] + 1.5)
    second = Worker("tune", str(short), "--trials", "1", *common, cwd=tmp_path, name="second")
    assert second.wait(timeout=180) == 0, second.output
    killed, retried = load(tmp_path, "retry").trials
    assert killed.state == TrialState.FAIL
    assert retried.state == TrialState.COMPLETE
    assert retried.system_attrs["failed_trial"] == killed.number
    assert retried.system_attrs["retry_history"] == [killed.number]
    assert retried.params == killed.params
    assert retried.user_attrs["origin_trial"] == killed.number  # same seeds as the trial it repeats
    assert retried.user_attrs["seed"] == killed.user_attrs["seed"]
    assert "(retry of 0)" in second.output


# ----- the whole command, tracked -----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_study_tracks_trials_and_writes_a_trainable_overlay(tmp_path, tiny_data):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    env = dict(os.environ, SMARTIFY_HOME=str(home))
    tune = write_tune(tmp_path, epochs_per_trial=1, n_trials=2)
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "tune", str(tune), "--overlay-dir",
                           str(tmp_path / "tuned"), "--set", f"data.root={tiny_data}", "--set",
                           "data.max_train_slices=2", "--set", "data.max_val_slices=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny-tune", storage=f"sqlite:///{home}/optuna.db")  # the default storage
    assert len(study.trials) == 2
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete, proc.stdout
    overlay = tmp_path / "tuned" / "tiny-tune.yaml"
    assert f"overlay: {overlay}" in proc.stdout
    cfg, _ = load_stage_config(overlay, [f"data.root={tiny_data}"])
    best = study.best_trial.params
    assert cfg.stage.name == "hacker_baseline" and cfg.mraugment.enabled
    assert cfg.model.reduction == best["model.reduction"]
    assert cfg.p_aug.p_max == pytest.approx(best["p_aug.p_max"])
    assert list(cfg.model.feature_dim) == yaml.safe_load(best["model.feature_dim"])
    assert cfg.output.dir == "runs/tuned/tiny-tune/{stage}"
    assert cfg.train.epochs == 2  # the base stage's, not the trial's

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("smartify-tune")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("smartify.kind") == "study"]
    assert parent.info.run_id == study.user_attrs["mlflow_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1"]
    for run in children:
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        assert run.data.tags["optuna.state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and "val/ssim" in run.data.metrics
            assert float(run.data.params["p_aug.p_max"]) == pytest.approx(trial.params["p_aug.p_max"])
        else:
            assert run.data.tags["smartify.prune_reason"] == trial.user_attrs[PRUNE_REASON]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/intermediate_values.png", "study/tiny-tune.yaml",
            "study/trials.txt"} <= artifacts
    # two trials are too few for importances: a note replaces the figure
    assert "study/param_importances_note.txt" in artifacts
    assert not any(p.startswith("study/param_importances_") and p.endswith(".png") for p in artifacts)
    assert parent.data.metrics["trials/complete"] == len(complete)
