"""The MLflow side of the engine's events: one MLflow run per stage, nested under a pipeline run.

:class:`MLflowCallback` implements :class:`recon.events.Callback`. A stage logs its flattened
configuration (the sections its kind uses, no ``None`` values), seeds, data set and model size as
params once; the stage's description as the run description; the training and validation data as
MLflow datasets (digest = the data fingerprint); environment, git and lineage as tags; one
``log_batch`` per epoch with ``step=epoch``; the resolved config, the data fingerprint, the
best/last checkpoints and plots as artifacts, reconstruction panels as image series with one step
per epoch (``MlflowClient.log_image``). The PNG plots (``plots/curves.png``, ``plots/schedules.png``) are
redrawn only on the epochs that carry panels (every ``train.panel_every`` epochs), after the stage's last epoch
and when the stage ends with epochs they do not show yet; the metrics themselves are logged every epoch and
charted live by the MLflow UI. Figures are drawn in a helper process (:mod:`tracking.runs.renderer`, about
1-2 s of matplotlib per redraw) and logged by the training thread at its next event; the end of the stage
waits for them. The run id is stored in every checkpoint
(:meth:`MLflowCallback.state_dict`), so ``--resume`` reopens the same run: steps the run already
has are not logged again and params keep their first value (a changed one is listed in the tag
``resume.changed_params``). Every write goes through :class:`tracking.runs.writer.TrackingWriter`, so a
dead tracking server never stops training.

No event handler raises: a failure in one (a tracking store that is full, a bug here) is logged once per
handler and training goes on; the stage's end prints one line with the records that were lost. A stage
that ends while a ``KeyboardInterrupt`` propagates (Ctrl-C, or SIGTERM translated by ``tracking.cli``)
ends its run KILLED, with the tag ``smartify.stopped_by`` (``SIGINT`` or ``SIGTERM``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from recon.config import dump_yaml
from recon.engine.memory_meter import METRIC_DOCS
from recon.events import Callback, CheckpointSaved, Divergence, EpochEnd, StageEnd, StageStart
from tracking.runs import RUN_ID_KEY
from tracking.runs.environment import environment_tags, git_state
from tracking.runs.failures import first_line
from tracking.runs.params import mlflow_key, param_value, stage_datasets, stage_params
from tracking.runs.renderer import END_TIMEOUT_S, PlotJobs
from tracking.runs.stores import Stores, resolve_stores
from tracking.runs.transport import MAX_TAG_VALUE
from tracking.runs.replay import CHANGED_PARAMS_TAG
from tracking.runs.writer import TrackingWriter

log = logging.getLogger(__name__)

STATUS = {"finished": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "killed": "KILLED", "interrupted": "KILLED"}
CURVE_PREFIXES = ("train/", "val/", "best_")
DESCRIPTION_TAG = "mlflow.note.content"
PANEL_KEY = "reconstruction"


def metric_docs() -> str:
    """The run-level documentation of the memory metrics (``metrics.md``), from their one definition."""
    rows = [f"| `{name}` | {text} |" for name, text in METRIC_DOCS.items()]
    return "\n".join(["# Memory metrics of this run", "", "| metric | meaning |", "|---|---|", *rows,
                      "", "Every metric and its unit: README, section \"Metric names\"."]) + "\n"


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _safe(handler: _Handler) -> _Handler:
    """Run an event handler so that an ``Exception`` in it is logged (once per handler), never raised."""

    @functools.wraps(handler)
    def run(self: "MLflowCallback", *args: Any) -> Any:
        try:
            return handler(self, *args)
        except Exception as exc:
            self.writer.failures.warn(f"callback {handler.__name__}", "tracking: %s failed (%s); training goes on",
                                      handler.__name__, first_line(exc), exc_info=True)
            self.writer.failures.lost(handler.__name__, exc)
            return {} if handler.__name__ == "state_dict" else None

    return run  # type: ignore[return-value]


def stop_reason() -> str | None:
    """``SIGTERM``/``SIGINT`` while a ``KeyboardInterrupt`` (or ``tracking.cli.Terminated``) is handled or
    propagating in this thread, else None: the run then ends KILLED."""
    exc = sys.exc_info()[1]
    if not isinstance(exc, KeyboardInterrupt):
        return None
    return str(getattr(exc, "signal_name", "SIGINT"))


class MLflowCallback(Callback):
    """One MLflow run per stage (see module docstring).

    Args:
        stores: tracking stores (resolved from the environment if None).
        experiment: experiment name.
        parent_run_id: pipeline run to nest under.
        run_name: run name (default: the stage name).
        artifact_checkpoints: upload best/last checkpoints (``checkpoints/best.pt``, ``last.pt``).
        system_metrics: MLflow's system metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py).
        panel_every: log reconstruction panels on epochs divisible by this (when the event has panels).
        extra_tags: more run tags.
        writer: the tracking writer (one is made if None); share it with the parent run.
    """

    name = "mlflow"

    def __init__(
        self,
        stores: Stores | None = None,
        experiment: str = "smartify",
        parent_run_id: str | None = None,
        run_name: str | None = None,
        artifact_checkpoints: bool = True,
        system_metrics: bool = True,
        panel_every: int = 1,
        extra_tags: dict[str, str] | None = None,
        writer: TrackingWriter | None = None,
    ) -> None:
        if panel_every < 1:
            raise ValueError(f"panel_every must be >= 1, got {panel_every}")
        self.stores = stores or resolve_stores()
        self.writer = writer or TrackingWriter(self.stores)
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.run_name = run_name
        self.artifact_checkpoints = artifact_checkpoints
        self.system_metrics = system_metrics
        self.panel_every = panel_every
        self.extra_tags = dict(extra_tags or {})
        self.run_id: str | None = None
        self._stage: StageStart | None = None
        self._history: dict[str, list[tuple[int, float]]] = {}
        self._plotted_epoch: int | None = None  # the last epoch the PNG plots show
        self._figures = PlotJobs()
        self._last_step: dict[str, int] | None = {}
        self._divergence: Divergence | None = None
        self._monitor = None

    # ---- events -------------------------------------------------------------------------------

    @_safe
    def on_stage_start(self, event: StageStart) -> None:
        self._stage = event
        self._history, self._last_step, self._divergence, self._plotted_epoch = {}, {}, None, None
        params, truncated = self._params(event)
        tags = self._tags(event)
        if truncated:
            tags["smartify.truncated_params"] = ",".join(truncated)[:MAX_TAG_VALUE]
        resume_id = event.resume_state.get(RUN_ID_KEY)
        if resume_id and self._resume(str(resume_id), event, params):
            return
        if resume_id:
            tags["smartify.resumed_from_run_id"] = str(resume_id)
        self.run_id = self.writer.create_run(self.experiment, self.run_name or event.stage, tags)
        self.writer.log_batch(self.run_id, params=params)
        self.writer.log_inputs(self.run_id, stage_datasets(event))
        self._log_config(event.config, "config.yaml")
        self._log_text(json.dumps(event.data_fingerprint, indent=1, sort_keys=True, default=str),
                       "data_fingerprint.json")
        self._log_text(metric_docs(), "metrics.md")
        self._start_monitor(resume=False)
        log.info("mlflow run %s (%s) for stage %s", self.run_id, self.stores.describe()["tracking_uri"], event.stage)

    @_safe
    def on_epoch_end(self, event: EpochEnd) -> None:
        if self.run_id is None:
            return  # on_stage_start failed (and said so)
        self._figures.collect()  # figures finished since the last event
        if self._last_step is None and self.writer.online:
            self._load_run_state()  # resumed while the server was down: learn what it already has
        timestamp = int(time.time() * 1000)
        rows = []
        for name, value in event.metrics.items():
            key = mlflow_key(name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                log.warning("metric %s=%r is not a number; not logged", name, value)
                continue
            if self._last_step and event.epoch <= self._last_step.get(key, -1):
                continue  # the run has this step already (resumed after the metrics were logged)
            rows.append((key, value, timestamp, event.epoch))
            self._history.setdefault(key, []).append((event.epoch, value))
        if len(rows) < len(event.metrics):
            log.info("epoch %d: %d metric(s) already in run %s, not logged again",
                     event.epoch, len(event.metrics) - len(rows), self.run_id)
        sent = self.writer.log_batch(self.run_id, metrics=rows) if rows else False
        last = self._stage is not None and event.epoch >= self._stage.epochs - 1
        if event.panels or last:
            self._plots(event.epoch, event)
        if sent and self.system_metrics and self._monitor_dead():
            self._start_monitor(resume=True)  # the server answered just now

    @_safe
    def on_checkpoint(self, event: CheckpointSaved) -> None:
        if self.run_id is None:
            return
        self._figures.collect()
        if self.artifact_checkpoints:
            self.writer.log_artifact(self.run_id, event.path, "checkpoints", name=f"{event.kind}.pt")
        if event.kind == "best":
            tags = {"smartify.best_epoch": str(event.epoch)}
            if event.metric is not None:
                tags["smartify.best_metric"] = f"{event.metric:.6g}"
            self.writer.log_batch(self.run_id, tags=tags)

    @_safe
    def on_divergence(self, event: Divergence) -> None:
        self._divergence = event
        if self.run_id is not None:
            self.writer.log_batch(self.run_id, tags={
                "smartify.divergence": event.reason[:MAX_TAG_VALUE], "smartify.divergence_epoch": str(event.epoch),
                "smartify.divergence_step": str(event.step), "smartify.divergence_loss": repr(event.loss),
            })

    @_safe
    def on_stage_end(self, event: StageEnd) -> None:
        try:
            if self.run_id is not None:
                try:
                    newest = max((step for points in self._history.values() for step, _ in points), default=None)
                    if newest is not None and (self._plotted_epoch is None or newest > self._plotted_epoch):
                        self._plots(newest, None)  # stopped early, or no panels since: the plots catch up
                    self.flush_plots()
                finally:
                    self._end_run(event)
        finally:
            lost = self.writer.failures.take_summary()
            if lost:
                log.warning("%s", lost)

    def _end_run(self, event: StageEnd) -> None:
        status = STATUS.get(event.status, "FAILED")
        if self._divergence is not None and status == "FINISHED":
            status = "FAILED"
        tags = {"smartify.status": event.status}
        stopped_by = stop_reason()
        if stopped_by is not None:
            status, tags["smartify.status"], tags["smartify.stopped_by"] = "KILLED", "killed", stopped_by
        if event.best_metric is not None:
            tags["smartify.best_metric"] = f"{event.best_metric:.6g}"
            tags["smartify.best_epoch"] = str(event.best_epoch)
        self.writer.log_batch(self.run_id, tags=tags)
        try:
            self._stop_monitor()
        finally:
            self.writer.set_terminated(self.run_id, status)
        self.writer.flush(force=self.writer.pending_records(self.run_id) > 0)
        left = self.writer.pending_records(self.run_id)
        if left:
            log.warning("%d tracking record(s) of run %s are spooled in %s; run `smartify tracking sync` "
                        "when the server is back", left, self.run_id, self.writer.spool.dir)

    def flush_plots(self, timeout: float = END_TIMEOUT_S) -> int:
        """Wait for the figures asked for so far and log them (the stage's end does this).

        Args:
            timeout: seconds in all; figures not drawn by then are dropped with an error line.

        Returns:
            Figures dropped (0 when all were logged or failed with their own error line).
        """
        return self._figures.collect(wait=True, timeout=timeout)

    @_safe
    def state_dict(self) -> dict[str, Any]:
        if self.run_id is None:
            return {}
        return {RUN_ID_KEY: self.writer.resolve(self.run_id) or self.run_id}

    # ---- helpers ------------------------------------------------------------------------------

    def _params(self, event: StageStart) -> tuple[dict[str, str], list[str]]:
        flat = {mlflow_key(k): v for k, v in stage_params(event.kind, event.config).items()}
        digest = event.data_fingerprint.get("digest") or hashlib.sha256(
            json.dumps(event.data_fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        ours = {**{mlflow_key(f"seed.{k}"): v for k, v in event.seeds.items()},
                "data.root": event.data_root, "data.fingerprint": digest, "model.param_count": event.param_count}
        if event.data_fingerprint.get("val_digest"):
            # the digest of the validation split alone: what promotion compares scores on
            ours["data.val_fingerprint"] = event.data_fingerprint["val_digest"]
        for key in sorted(set(flat) & set(ours)):
            if str(flat[key]) != str(ours[key]):
                log.debug("param %s: config value %r replaced by the stage's %r", key, flat[key], ours[key])
        params, truncated = {}, []
        for key, value in {**flat, **ours}.items():
            params[key], cut = param_value(value)
            if cut:
                truncated.append(key)
        return params, truncated

    def _tags(self, event: StageStart) -> dict[str, str]:
        tags = {**environment_tags(), "smartify.stage": event.stage, "smartify.kind": event.kind,
                "smartify.family": event.family or "none", "device": event.device,
                "smartify.output_dir": str(event.output_dir)}
        tags.update({mlflow_key(f"determinism.{k}"): str(v) for k, v in event.determinism.items()})
        description = str((event.config.get("stage") or {}).get("description") or "").strip()
        if description:
            tags[DESCRIPTION_TAG] = description
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if event.init_from:
            tags["smartify.init_from"] = str(event.init_from)
        if event.init_from_state.get(RUN_ID_KEY):
            tags["smartify.init_from_run_id"] = str(event.init_from_state[RUN_ID_KEY])
        tags.update(self.extra_tags)
        return {k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}

    def _resume(self, resume_id: str, event: StageStart, params: dict[str, str]) -> bool:
        """Reopen the run of the checkpoint; False when the server says it does not exist."""
        from mlflow.exceptions import MlflowException

        self.writer.flush()  # what an earlier invocation spooled goes first
        real = self.writer.resolve(resume_id)
        self.run_id = resume_id
        self._last_step = None  # unknown until the server answers; the spool replay dedups meanwhile
        if real is not None:
            try:
                ok, run = self.writer.call(self.writer.client.get_run, real)
            except MlflowException as exc:
                log.warning("run %s of the checkpoint not found in %s (%s); starting a new run",
                            resume_id, self.stores.describe()["tracking_uri"], exc)
                self.run_id = None
                return False
            if ok and run.info.lifecycle_stage == "deleted":
                log.warning("run %s of the checkpoint is deleted; starting a new run", resume_id)
                self.run_id = None
                return False
            if ok:
                have = run.data.params
                changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
                if changed:
                    log.warning("resumed run %s: params changed since first logged, kept the first values: %s",
                                real, changed)
                    before = [k for k in run.data.tags.get(CHANGED_PARAMS_TAG, "").split(",") if k]
                    self.writer.log_batch(real, tags={
                        CHANGED_PARAMS_TAG: ",".join(sorted(set(before) | set(changed)))[:MAX_TAG_VALUE]})
                    self._log_config(event.config, f"config_resumed_epoch{event.start_epoch:04d}.yaml")
                params = {k: v for k, v in params.items() if k not in have}
                self._load_run_state()
        if params:
            self.writer.log_batch(self.run_id, params=params)  # new keys only (the replay drops known ones)
        commit, dirty = git_state()
        self.writer.reopen(self.run_id)
        self.writer.log_batch(self.run_id, tags={
            "smartify.resumed_at_epoch": str(event.start_epoch), "resume.git.commit": commit, "resume.git.dirty": dirty})
        self._start_monitor(resume=True)
        log.info("resumed mlflow run %s at epoch %d", self.run_id, event.start_epoch)
        return True

    def _load_run_state(self) -> None:
        """Last logged step and history of every training metric of the run (one request per key)."""
        real = self.writer.resolve(self.run_id) if self.run_id else None
        ok, run = self.writer.call(self.writer.client.get_run, real) if real else (False, None)
        if not ok:
            self._last_step = None
            return
        last, history = {}, {}
        for key in run.data.metrics:
            if key.startswith("system/"):
                continue
            ok, points = self.writer.call(self.writer.client.get_metric_history, real, key)
            if not ok:
                self._last_step = None
                return
            history[key] = sorted((int(m.step), float(m.value)) for m in points)
            last[key] = max((s for s, _ in history[key]), default=-1)
        for key, points in history.items():
            merged = dict(points)
            merged.update(dict(self._history.get(key, [])))
            self._history[key] = sorted(merged.items())
        self._last_step = last

    def _log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="smartify-mlflow-") as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.writer.log_artifact(self.run_id, path)

    def _log_config(self, config: dict[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="smartify-mlflow-") as tmp:
            self.writer.log_artifact(self.run_id, dump_yaml(config, Path(tmp) / name))

    def _plots(self, epoch: int, event: EpochEnd | None) -> None:
        """Ask for the curves and schedules (history up to ``epoch``) and ``event``'s panels, if any."""
        stage = self._stage
        self._plotted_epoch = epoch
        folder = Path(stage.output_dir) / "plots" if stage else Path(tempfile.mkdtemp(prefix="smartify-plots-"))
        title = f"{stage.stage if stage else ''} (run {self.run_id})"
        run_id = self.run_id

        def artifact(png: Path) -> None:
            self.writer.log_artifact(run_id, png, "plots")

        try:
            # submit pickles its arguments at once: the history may grow afterwards
            curves = {k: v for k, v in self._history.items() if k.startswith(CURVE_PREFIXES)}
            self._figures.submit("curves", artifact, curves, folder / "curves.png", title)
            self._figures.submit("schedules", artifact, self._history, folder / "schedules.png", title=title)
            if event is not None and event.panels and event.epoch % self.panel_every == 0:
                for panel in event.panels:  # one image series per slice: the run page's step slider is the epoch
                    name = re.sub(r"[^A-Za-z0-9_.\- ]", "_", panel.name)

                    def image(png: Path, key: str = f"{PANEL_KEY}/{name}", step: int = event.epoch) -> None:
                        self.writer.log_image(run_id, png, key, step)

                    png = folder / "panels" / f"{name}_epoch{event.epoch:04d}.png"
                    self._figures.submit("panel", image, [panel], png, f"{stage.stage if stage else ''} epoch {event.epoch}")
        except (ValueError, OSError, RuntimeError) as exc:
            # A plot must never cost the training run; the error stays visible in the log.
            log.error("epoch %d: plots not made: %s", epoch, exc)

    def _start_monitor(self, resume: bool) -> None:
        real = self.writer.resolve(self.run_id) if self.run_id else None
        if not self.system_metrics or real is None or not self.writer.online:
            return
        self._stop_monitor()
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(real, resume_logging=resume, tracking_uri=self.stores.tracking_uri)
            self._monitor.start()
        except Exception as exc:  # psutil missing, no permission...: system metrics are optional
            log.warning("system metrics not logged: %s", exc)
            self._monitor = None
            return
        self.writer.log_batch(self.run_id, tags={"smartify.system_metrics": "mlflow"})

    def _monitor_dead(self) -> bool:
        # MLflow's monitor stops for good when the server does not answer; it is restarted once it does.
        thread = getattr(self._monitor, "_process", None)
        return not (thread is not None and thread.is_alive())

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

