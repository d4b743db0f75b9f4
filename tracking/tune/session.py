"""One trial of a study: its stage, its training with per-epoch reports to the pruner, and its guard.

A trial samples the search space (:mod:`tracking.tune.space`), builds its stage (the base stage, ``fixed``,
``trial_only``, ``--set``, the sampled values, then its own epochs, output folder and seeds), predicts its
peak memory (:mod:`tracking.tune.memory`) and trains ``epochs_per_trial`` epochs, reporting the metric every
epoch to the pruner. :func:`tracking.tune.oom.guard_objective` turns predicted and real OOM and divergence into
PRUNED trials with a ``prune_reason``, and records other errors.

With ``seed_per_trial`` each trial's stage and model seeds derive from (study seed, original trial number)
(a retried trial keeps the seeds of the trial it repeats). The objective never draws from global RNGs; it
seeds them once per trial at its start, as the ``train`` entry point does.

The stage itself runs through the one tracked-stage function, :func:`tracking.train.run_tracked_stage`.

Ctrl-C or SIGTERM (``tracking.cli.Terminated``) during a trial: Optuna marks the trial FAIL (a later
worker retries it), the trial's MLflow run ends KILLED, and :meth:`TuneSession.abandon_study_run` ends
the study's run KILLED in the process that owns it; the exception then goes on to the CLI (exit 143).
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from recon.engine.stage import StageConfig
from recon.engine.loop import DivergenceError
from recon.errors import InputError
from recon.events import Callback, Divergence, EpochEnd
from recon.seeding import derive_seed
from tracking.tune.config import TuneConfig
from tracking.tune.memory import MemoryPrediction, MemoryPredictor, ProbeInput, release_memory
from tracking.tune.oom import CATCH, guard_objective
from tracking.tune.space import SearchSpace, StageLayers, compressed_schedule
from tracking.train import run_tracked_stage
from tracking.tune.study_runs import StudyTracker

#: trial user attribute: the number of the trial whose seeds this one uses (itself, or the trial it retries)
ORIGIN_ATTR = "origin_trial"


class _Reporter(Callback):
    """Reports the metric of every epoch to the trial and asks the pruner (last in the callback list)."""

    name = "optuna"

    def __init__(self, trial: optuna.trial.Trial, metric: str, start_epoch: int, maximize: bool) -> None:
        self.trial, self.metric, self.start_epoch, self.maximize = trial, metric, start_epoch, maximize
        self.values: list[float] = []

    def on_epoch_end(self, event: EpochEnd) -> None:
        if self.metric not in event.metrics:
            group = self.metric.split("/", 1)[0] + "/"
            have = sorted(k for k in event.metrics if k.startswith(group)) or sorted(event.metrics)
            raise InputError(f"metric {self.metric!r} is not reported by the stage (it reports: {', '.join(have)})")
        value = float(event.metrics[self.metric])
        if not math.isfinite(value):
            raise DivergenceError(Divergence(event.epoch, -1, f"non-finite {self.metric}", value))
        step = event.epoch - self.start_epoch
        self.trial.report(value, step)
        self.values.append(value)
        self.trial.set_user_attr("epochs_done", step + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {event.epoch}: {self.metric}={value:.5g}")

    def best(self) -> float | None:
        if not self.values:
            return None
        return max(self.values) if self.maximize else min(self.values)


@dataclass
class TuneSession:
    """Everything a worker needs to run trials of one study.

    Attributes:
        cfg: the tune configuration.
        study_name: the study.
        layers: the base stage with ``fixed``, ``trial_only`` and ``--set``.
        space: the prepared search space.
        budget_bytes: memory budget (None: no prediction check).
        probe_input: the largest training input.
        predictor: the memory predictor (cached per model configuration).
        output_root: folder of the trial outputs.
        tracker: MLflow tracking, or None.
        extra_callbacks: more engine callbacks for every trial (tests, custom reporting).
        start_epoch: the base stage's first epoch (a trial trains ``epochs_per_trial`` from there).
    """

    cfg: TuneConfig
    study_name: str
    layers: StageLayers
    space: SearchSpace
    budget_bytes: int | None
    probe_input: ProbeInput
    predictor: MemoryPredictor
    output_root: Path
    tracker: StudyTracker | None = None
    extra_callbacks: list[Callback] = field(default_factory=list)
    start_epoch: int = 0
    current_trial: int | None = field(default=None, init=False)

    def trial_dir(self, number: int) -> Path:
        """The output folder of trial ``number``."""
        return self.output_root / f"trial_{number:04d}"

    def trial_stage(self, trial: optuna.trial.Trial) -> tuple[StageConfig, dict[str, Any], dict[str, Any]]:
        """The trial's stage: sampled values, then its epochs, folder, start point, seeds and p_aug ramp.

        Returns:
            ``(config, resolved config, sampled values by dotted key)``.
        """
        params = self.space.sample(trial)
        origin = trial.user_attrs.get(ORIGIN_ATTR)
        if origin is None:
            origin = trial.number
            trial.set_user_attr(ORIGIN_ATTR, origin)
        items = list(params.items()) + [
            ("train.epochs", self.start_epoch + self.cfg.epochs_per_trial),
            ("output.dir", str(self.trial_dir(trial.number))),
            ("init_from", self.cfg.init_from),
        ]
        if self.cfg.compress_schedule:
            items += compressed_schedule(self.start_epoch, self.cfg.epochs_per_trial)
        if self.cfg.seed_per_trial:
            items += [("seed", derive_seed(self.cfg.seed, "trial", int(origin), "stage") % 2**31),
                      ("model.seed", derive_seed(self.cfg.seed, "trial", int(origin), "model") % 2**31)]
        cfg, resolved = self.layers.build(items)
        return cfg, resolved, params

    def predict(self, trial: optuna.trial.Trial) -> MemoryPrediction:
        """The trial's predicted peak memory (no training)."""
        cfg, _, _ = self.trial_stage(trial)
        inp = ProbeInput(self.probe_input.coils, self.probe_input.height, self.probe_input.width,
                         cfg.train.batch_size)
        return self.predictor.predict(cfg, inp, self.budget_bytes)

    def train(self, trial: optuna.trial.Trial) -> float:
        """Train the trial's stage; returns the best epoch's metric."""
        self.current_trial = trial.number
        cfg, resolved, _ = self.trial_stage(trial)
        trial.set_user_attr("seed", cfg.seed)
        reporter = _Reporter(trial, self.cfg.metric, cfg.train.start_epoch, self.cfg.direction == "maximize")
        own = [self.tracker.trial_callback(trial)] if self.tracker is not None else []
        # the trial is an entry point: the tracked stage seeds the global RNGs once; the trial's own MLflow
        # callback (a nested run of the study) replaces the stage's default tracking
        run_tracked_stage(stage=(cfg, resolved), tracking=None, callbacks=[*own, *self.extra_callbacks, reporter],
                          raise_divergence=True)
        value = reporter.best()
        if value is None:
            raise RuntimeError(f"trial {trial.number}: the stage reported no epoch")
        return value

    def after_trial(self, trial: optuna.trial.Trial) -> None:
        """Delete the trial's checkpoints unless they are kept."""
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(self.trial_dir(trial.number) / "checkpoints", ignore_errors=True)

    def objective(self) -> Callable[[optuna.trial.Trial], float]:
        """The guarded objective (prediction, OOM, divergence, errors)."""
        return guard_objective(self.train, predict=self.predict, budget_bytes=self.budget_bytes,
                               after_trial=self.after_trial)

    def optimize(self, study: optuna.Study, n_trials: int | None, timeout: float | None) -> None:
        """Run trials of ``study`` in this process until ``n_trials`` or ``timeout``."""
        callbacks = [self.tracker.on_trial_done] if self.tracker is not None else []
        # gc_after_trial is not needed: the guard collects (and empties the CUDA cache) after every trial that
        # trained, once the trial's exception and frames are gone
        try:
            study.optimize(self.objective(), n_trials=n_trials, timeout=timeout, catch=CATCH, callbacks=callbacks,
                           gc_after_trial=False)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: Optuna has marked the trial in progress FAIL
            self._abandon_trial(study, exc)
            raise
        release_memory()

    def _abandon_trial(self, study: optuna.Study, exc: KeyboardInterrupt) -> None:
        """End the MLflow run of the trial that was stopped (KILLED) and say what became of it."""
        number, self.current_trial = self.current_trial, None
        exc.output_dir = None  # the trial's folder is no --resume point: the study retries the trial
        exc.detail = f"study {self.study_name}: run the same command to go on"
        if number is None:
            return
        exc.detail = f"trial {number} marked FAIL (retried by the next worker); " + exc.detail
        if self.tracker is None:
            return
        stopped = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if stopped and stopped[0].state.is_finished():
            self.tracker.on_trial_done(study, stopped[0])  # the stage's run ends KILLED (a KeyboardInterrupt)

    def abandon_study_run(self) -> None:
        """End the study's MLflow run KILLED (the process that created it calls this on Ctrl-C or SIGTERM)."""
        tracker = self.tracker
        if tracker is None or tracker.run_id is None:
            return
        exc = sys.exc_info()[1]
        tracker.writer.log_batch(tracker.run_id, tags={
            "smartify.stopped_by": str(getattr(exc, "signal_name", "SIGINT"))})
        tracker.writer.set_terminated(tracker.run_id, "KILLED")
        tracker.writer.flush()
