"""The two studies on real Optuna and MLflow sqlite stores: MoE-augmentation trials from a checkpoint with the p_aug
ramp inside the trial, the model study's OOM-predicted trials, a study that grows, and the report from storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from recon.engine.checkpoint import Checkpoint
from recon.errors import InputError
from recon.events import Callback, EpochEnd, StageStart
from recon.models.promptmr import PromptMR
from tracking.train import run_tracked_stage
from tracking.tune.oom import OOM_PREDICTED, PRUNE_REASON
from tracking.tune.study import TuneOptions, run_tune

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "experiments" / "tiny"
FAST = ("data.max_train_slices=2",)  # the tune files validate on 4 slices: both accelerations, so val/leaderboard


def write_tune(tmp: Path, source: str, name: str | None = None, **changes) -> Path:
    """A tiny tune file with an absolute base, outputs in ``tmp`` and ``changes`` on top."""
    data = yaml.safe_load((TINY / source).read_text())
    data.update({"base": str(TINY / data["base"]), "output_dir": str(tmp / "runs" / "{study}")})
    data.update(changes)
    path = tmp / (name or source)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class FirstStep(Callback):
    """Snapshots the weights of the first network forward of the stage (before any optimizer step) and the
    ``schedule/p_aug`` of every epoch."""

    name = "first-step"

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.p_aug: list[list[float]] = []
        self._handle = None

    def on_stage_start(self, event: StageStart) -> None:
        self.p_aug.append([])

        def hook(module, args):
            if isinstance(module, PromptMR) and self._handle is not None:
                self.weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})
                self._handle.remove()
                self._handle = None

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def on_epoch_end(self, event: EpochEnd) -> None:
        self.p_aug[-1].append(event.metrics["schedule/p_aug"])

    def on_stage_end(self, event) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def baseline(tmp: Path, tiny_data: Path) -> Path:
    """A 1-epoch tiny Hacker baseline; returns its stage folder."""
    folder = tmp / "hacker_baseline"
    run_tracked_stage(TINY / "hacker_baseline.yaml", [f"data.root={tiny_data}", f"output.dir={folder}",
                                                      "train.epochs=1", "train.panel_every=0", *FAST],
                      tracking=None)
    return folder


@pytest.mark.slow  # a tracked pipeline or study of subprocess stages (about a minute)
def test_moe_aug_trials_start_from_the_checkpoint_and_ramp_p_aug(tmp_path, tiny_data, _isolated_tracking):
    folder = baseline(tmp_path, tiny_data)
    donor = Checkpoint.load(folder, which="best")
    tune = write_tune(tmp_path, "tune_moe_aug.yaml", init_from=str(folder))
    probe = FirstStep()
    storage = f"sqlite:///{tmp_path}/optuna.db"
    result = run_tune(TuneOptions(tune_file=tune, storage=storage, overrides=(f"data.root={tiny_data}", *FAST),
                                  overlay_dir=tmp_path / "tuned", extra_callbacks=[probe]))
    study = optuna.load_study(study_name="tiny-moe-aug", storage=storage)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2

    # every trial's first step ran with the checkpoint's weights
    assert len(probe.weights) == 2
    for weights in probe.weights:
        assert weights.keys() == donor.model.keys()
        assert all(torch.equal(weights[k], donor.model[k]) for k in weights)

    # the stage's p_aug ramp (absolute epochs 2..4 of tiny/hacker_moe.yaml) compressed into epochs 2, 3:
    # 0 at the trial's first epoch, the trial's p_max at its last, as the trial runs logged it
    from mlflow.tracking import MlflowClient

    from tracking.runs.stores import resolve_stores

    stores = resolve_stores()
    client = MlflowClient(stores.tracking_uri)
    for t, seen in zip(trials, probe.p_aug):
        run = client.get_run(t.user_attrs["trial_run_id"])
        history = sorted(client.get_metric_history(run.info.run_id, "schedule/p_aug"), key=lambda m: m.step)
        logged = [m.value for m in history]
        assert logged == pytest.approx(seen) and len(logged) == 2
        assert logged[0] == 0.0 and logged[1] == pytest.approx(t.params["p_aug.p_max"])
        assert run.data.params["init_from"] == str(folder)
        assert (run.data.params["p_aug.start"], run.data.params["p_aug.plateau"]) == ("2", "3")

    # the overlay holds the best trial's values, not the compressed epochs
    overlay = yaml.safe_load(result.overlay.read_text())
    best = study.best_trial
    assert result.best_trial == best.number
    assert overlay["p_aug"] == {"p_max": best.params["p_aug.p_max"]}
    assert overlay["mraugment"]["magnitude"] == best.params["mraugment.magnitude"]

    # --report re-draws table, figures and overlay from storage alone (a fresh process, no tune file)
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "tune", "--report", "tiny-moe-aug", "--storage",
                           storage, "--output-dir", str(tmp_path / "report"), "--overlay-dir",
                           str(tmp_path / "report")], capture_output=True, text=True, env=dict(os.environ),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = yaml.safe_load((tmp_path / "report" / "tiny-moe-aug.yaml").read_text())
    assert again == overlay
    assert (tmp_path / "report" / "figures" / "optimization_history.png").stat().st_size > 0
    rows = json.loads((tmp_path / "report" / "trials.json").read_text())
    assert [r["number"] for r in rows] == [0, 1] and rows[best.number]["value"] == pytest.approx(best.value)


def test_model_study_grows_refuses_a_changed_space_and_prunes_oom_fast(tmp_path, tiny_data, capsys):
    tune = write_tune(tmp_path, "tune_model.yaml")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # 1 MiB holds the tiny input but not the network: the memory probe prunes every trial before it trains
    opts = dict(tune_file=tune, storage=storage, overrides=(f"data.root={tiny_data}", *FAST), tracking=False,
                overlay_dir=tmp_path / "tuned", memory_budget="1MiB", trials=2)
    run_tune(TuneOptions(**opts))
    run_tune(TuneOptions(**opts))  # the same command again: 2 more trials in the same study
    study = optuna.load_study(study_name="tiny-size", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials]
    for t in study.trials:
        assert t.state == TrialState.PRUNED and t.user_attrs[PRUNE_REASON] == OOM_PREDICTED
        assert t.intermediate_values == {}
    with capsys.disabled():
        print(f"\noom-predicted trial seconds (from storage): {', '.join(f'{s:.3f}' for s in seconds)}")
    assert max(seconds) < 5.0  # measured well under 1 s; 5 leaves room for a loaded machine

    changed = write_tune(tmp_path, "tune_model.yaml", name="changed.yaml", space={
        "model.reduction": {"type": "categorical", "choices": [1, 2, 4, 8, 16]},
        "model.feature_dim": {"type": "categorical", "choices": [[8, 12, 16], [16, 24, 32]]}})  # the wide one gone
    with pytest.raises(InputError, match=r"study 'tiny-size': search space dimension 'model.feature_dim' changed"):
        run_tune(TuneOptions(**{**opts, "tune_file": changed, "trials": 1}))
    assert len(optuna.load_study(study_name="tiny-size", storage=storage).trials) == 4  # nothing added
    run_tune(TuneOptions(**{**opts, "tune_file": changed, "trials": 1, "study": "tiny-size-2"}))
    assert len(optuna.load_study(study_name="tiny-size-2", storage=storage).trials) == 1

    # the CLI says the same in one line, exit 2
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "tune", str(changed), "--trials", "1", "--storage",
                           storage, "--no-tracking", "--set", f"data.root={tiny_data}"], capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 2
    assert "dimension 'model.feature_dim' changed" in proc.stderr and "--study" in proc.stderr
