"""MLflow runs of an Optuna study: one parent run per study, one nested run per trial.

The study run's id is kept in the study's user attributes (``mlflow_run_id``), so every process that works on
the study nests its trials under the same run. A trial that trains gets its run from
:class:`tracking.runs.callback.MLflowCallback` (params, per-epoch metrics, plots); the run's end is held back
until Optuna knows the trial's state, then it carries ``optuna.state``, ``smartify.prune_reason``,
``optuna.value`` and ends FINISHED (complete), KILLED (pruned) or FAILED. A trial that never trained (predicted
OOM, a bad configuration) gets a short run with its params and tags. Optuna's own (deprecated) MLflow
integration is not used: everything goes through :class:`tracking.runs.writer.TrackingWriter`, so a dead tracking
server never stops the study.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from recon.events import Callback, StageEnd
from tracking.runs import RUN_ID_KEY
from tracking.tune.oom import PRUNE_REASON
from tracking.tune.space import SearchSpace

log = logging.getLogger(__name__)

RUN_ID_ATTR = RUN_ID_KEY
TRIAL_RUN_ATTR = "trial_run_id"


class _TrialRun(Callback):
    """The trial's MLflow callback, with the stage end held back until the trial's outcome is known."""

    name = "mlflow"

    def __init__(self, inner: Callback, trial: optuna.trial.Trial) -> None:
        self.inner = inner
        self.trial = trial
        self.end: StageEnd | None = None

    def on_stage_start(self, event) -> None:
        self.inner.on_stage_start(event)
        run_id = getattr(self.inner, "run_id", None)
        if run_id:
            self.trial.set_user_attr(TRIAL_RUN_ATTR, run_id)

    def on_epoch_end(self, event) -> None:
        self.inner.on_epoch_end(event)

    def on_checkpoint(self, event) -> None:
        self.inner.on_checkpoint(event)

    def on_divergence(self, event) -> None:
        self.inner.on_divergence(event)

    def on_stage_end(self, event: StageEnd) -> None:
        self.end = event

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()


_RUN_STATUS = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "killed", TrialState.FAIL: "failed"}


class StudyTracker:
    """MLflow runs of a study: a parent run per study and a nested run per trial.

    Args:
        stores: tracking stores.
        experiment: MLflow experiment.
        space: the search space (to decode trial params).
    """

    def __init__(self, stores, experiment: str, space: SearchSpace) -> None:
        from tracking.runs.writer import TrackingWriter

        self.stores = stores
        self.experiment = experiment
        self.space = space
        self.writer = TrackingWriter(stores)
        self.run_id: str | None = None
        self._runs: dict[int, _TrialRun] = {}
        self._study: str = ""

    def open(self, study: optuna.Study, params: dict[str, Any], create: bool = True,
             parent_run_id: str | None = None, run_name: str | None = None) -> str | None:
        """Use the study's run, creating it the first time; reopen it when ``create``.

        Args:
            study: the study.
            params: params of a new study run.
            create: create (or reopen) the run; False for workers, which only nest their trials under it.
            parent_run_id: nest a new study run under this run (a pipeline).
            run_name: name of a new study run (None: ``study-<study name>``).

        Returns:
            The study run's id (None when there is none and ``create`` is False).
        """
        from tracking.runs.params import param_value
        from tracking.runs.parent import start_parent_run

        self._study = study.study_name
        run_id = study.user_attrs.get(RUN_ID_ATTR)
        if run_id and not self._exists(run_id):
            log.warning("study %s: its MLflow run %s is not in %s; a new study run is made", study.study_name,
                        run_id, self.stores.describe()["tracking_uri"])
            run_id = None
        if run_id:
            if create:
                self.writer.reopen(run_id)
        elif create:
            tags = {"smartify.kind": "study", "optuna.study": study.study_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run_id = start_parent_run(self.stores, self.experiment, run_name or f"study-{study.study_name}", tags,
                                      self.writer)
            study.set_user_attr(RUN_ID_ATTR, run_id)
            self.writer.log_batch(run_id, params={k: param_value(v)[0] for k, v in params.items()})
        self.run_id = run_id
        return run_id

    def _exists(self, run_id: str) -> bool:
        """False only when the tracking store answers that the run does not exist (unknown counts as present)."""
        from mlflow.exceptions import MlflowException

        real = self.writer.resolve(run_id)
        if real is None:
            return True  # a placeholder still in the spool
        try:
            ok, run = self.writer.call(self.writer.client.get_run, real)
        except MlflowException:
            return False
        return not ok or run.info.lifecycle_stage != "deleted"

    def trial_callback(self, trial: optuna.trial.Trial) -> Callback:
        """The engine callback logging ``trial`` as a nested run."""
        from tracking.runs.callback import MLflowCallback

        tags = {"optuna.study": self._study, "optuna.trial_number": str(trial.number), "smartify.tune_trial": "true"}
        inner = MLflowCallback(self.stores, self.experiment, parent_run_id=self.run_id,
                               run_name=f"{self._study}-trial-{trial.number:04d}", artifact_checkpoints=False,
                               system_metrics=False, extra_tags=tags, writer=self.writer)
        run = _TrialRun(inner, trial)
        self._runs[trial.number] = run
        return run

    def on_trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback: state, prune reason and value on the trial's run, then end it."""
        from tracking.runs.params import param_value

        run = self._runs.pop(trial.number, None)
        attrs = trial.user_attrs
        tags = {"optuna.state": trial.state.name, "optuna.study": study.study_name,
                "optuna.trial_number": str(trial.number)}
        for key in (PRUNE_REASON, "error", "divergence", "prediction_source"):
            if attrs.get(key) is not None:
                tags[f"smartify.{key}"] = str(attrs[key])[:5000]
        if "failed_trial" in trial.system_attrs:
            tags["optuna.retry_of"] = str(trial.system_attrs["failed_trial"])
        if trial.value is not None:
            tags["optuna.value"] = f"{trial.value:.6g}"
        metrics = []
        if attrs.get("predicted_bytes") is not None:
            metrics.append(("memory/probe_predicted_mb", attrs["predicted_bytes"] / 2**20, _now_ms(), 0))
        inner = getattr(run, "inner", None)
        run_id = getattr(inner, "run_id", None)
        if run_id is None:  # no stage started (predicted OOM, bad configuration): a run for the record
            run_id = self.writer.create_run(self.experiment, f"{study.study_name}-trial-{trial.number:04d}",
                                            {**tags, "mlflow.parentRunId": self.run_id or "",
                                             "smartify.tune_trial": "true"})
            params = {k: param_value(v)[0] for k, v in self.space.decode(trial.params).items()}
            self.writer.log_batch(run_id, metrics=metrics, params=params)
            self.writer.set_terminated(run_id, _RUN_STATUS.get(trial.state, "failed").upper())
            return
        self.writer.log_batch(run_id, metrics=metrics, tags=tags)
        end = run.end or StageEnd("failed", None, None, None, None, Path("."))
        status = _RUN_STATUS.get(trial.state, "failed")
        inner.on_stage_end(StageEnd(status, end.best_metric, end.best_epoch, end.best_path, end.last_path,
                                    end.output_dir))

    def close_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """End the run of a trial whose worker died (KILLED)."""
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        if run_id:
            self.writer.log_batch(run_id, tags={"optuna.state": "FAIL", "smartify.stale": "true"})
            self.writer.set_terminated(run_id, "KILLED")

    def close(self, summary: dict[str, float], tags: dict[str, str], files: Sequence[Path]) -> None:
        """Summary metrics, tags and artifacts on the study run; end it FINISHED."""
        if self.run_id is None:
            return
        rows = [(k, float(v), _now_ms(), 0) for k, v in summary.items()]
        self.writer.log_batch(self.run_id, metrics=rows, tags=tags)
        for path in files:
            self.writer.log_artifact(self.run_id, path, "study")
        self.writer.set_terminated(self.run_id, "FINISHED")
        self.writer.flush()


def _now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)

