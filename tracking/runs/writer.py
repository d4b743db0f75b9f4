"""Every tracking write goes through here, so that an unreachable server never stops training.

:class:`TrackingWriter` sends each record (run creation, params/tags/metrics batch, artifact, run
status) with MLflow's short HTTP retries (:func:`tracking.runs.stores.apply_http_defaults`). On a
transient failure (connection refused, timeout, HTTP 5xx/429, a locked database) the record goes
to the local spool (:mod:`tracking.runs.spool`) and the writer stays offline for a while (5 s,
doubling up to 60 s): later writes go straight to the spool without touching the network. After
that window, pending records are replayed in order before anything new is sent; ``smartify
tracking sync`` calls :func:`replay_spool`. The replay (:mod:`tracking.runs.replay`) uses the writer's
public methods only.

Idempotence: metric rows keep their ``(key, value, timestamp, step)``; before a spooled batch is
replayed, the ``(key, step)`` pairs the run already has are dropped, so nothing is logged twice even
when a batch reached the server before its reply was lost. Params are only sent when absent (MLflow
params are immutable; changed values are listed in the tag ``resume.changed_params``). Artifacts and
tags overwrite. A run that cannot be created (server down at stage start) gets a placeholder id
``local-<hex>``; the real run is created at replay and the spool's ``runs.json`` maps one to the other.
MLflow itself deduplicates dataset inputs; an image is not replayed when its series has that step. Every
run created here has MLflow's user and source tags (:func:`tracking.runs.environment.source_tags`).

No write raises. A record the store refuses for good (HTTP 4xx, an artifact store that is full) is listed,
with the reason, in ``<run>.rejected.jsonl`` and counted as lost; a record that cannot even be spooled
(the spool's disk is full) is counted as lost too. Each kind of failure is logged once
(:class:`tracking.runs.failures.FailureLog`); the end of a stage prints one line with the lost counts.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from tracking.runs.environment import source_tags
from tracking.runs.failures import FailureLog, first_line, is_store_full
from tracking.runs.replay import Replayer, ReplayStats
from tracking.runs.spool import PLACEHOLDER_PREFIX, Spool, is_placeholder
from tracking.runs.stores import Stores, get_or_create_experiment, make_client, redact_uri
from tracking.runs.transport import MetricRow, is_refused, is_transient, send_record

log = logging.getLogger(__name__)

#: tags whose value is a run id (a placeholder there is replaced by the real id)
RUN_ID_TAGS = ("mlflow.parentRunId", "smartify.init_from_run_id", "smartify.resumed_from_run_id")


def _now_ms() -> int:
    return int(time.time() * 1000)


class TrackingWriter:
    """Sends tracking records to MLflow, spooling what cannot be sent now (see module docstring).

    Args:
        stores: where to track.
        spool_dir: spool folder (default ``stores.spool_dir``).
        client: an ``MlflowClient`` for ``stores`` (made lazily if None).
        retry_after: seconds without network attempts after a first failure (doubles per failure).
        max_retry_after: upper bound of that window.
        offline: never contact the server; everything is spooled for a later ``smartify tracking sync``
            (e.g. compute nodes without access to the tracking server).
    """

    def __init__(
        self,
        stores: Stores,
        spool_dir: str | Path | None = None,
        client=None,
        retry_after: float = 5.0,
        max_retry_after: float = 60.0,
        offline: bool = False,
    ) -> None:
        self.stores = stores
        self.offline = offline
        self.spool = Spool(spool_dir or stores.spool_dir)
        self._client = client
        self._uri = redact_uri(stores.tracking_uri)
        self._retry_after = retry_after
        self._max_retry_after = max_retry_after
        self._backoff = retry_after
        self._offline_until = 0.0
        self._known: dict[str, str] = {}
        self._spooled_artifacts: dict[tuple[str, str], Path] = {}
        self.failures = FailureLog()

    @property
    def client(self) -> Any:
        """The MLflow client (created on first use)."""
        if self._client is None:
            self._client = make_client(self.stores)
        return self._client

    @property
    def uri(self) -> str:
        """The tracking URI this writer sends to, credentials removed (also stamped on spooled records)."""
        return self._uri

    @property
    def online(self) -> bool:
        """False while the writer waits after a failure (records go straight to the spool), or when offline."""
        return not self.offline and time.monotonic() >= self._offline_until

    def resolve(self, run_id: str) -> str | None:
        """The server's id of ``run_id`` (itself unless a placeholder); None if not created yet."""
        if not is_placeholder(run_id):
            return run_id
        if run_id not in self._known:
            real = self.spool.mapping().get(run_id)
            if real is None:
                return None
            self._known[run_id] = real
        return self._known[run_id]

    def note_failure(self, exc: BaseException) -> None:
        """A transient failure: stay offline for the current window, then double it (up to the maximum).

        Args:
            exc: the error of the failed call (its first line is logged).
        """
        self.failures.warn("unreachable", "tracking server %s unreachable (%s); spooling to %s, next attempt in %.0f s",
                           self._uri, first_line(exc), self.spool.dir, self._backoff)
        self._offline_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._max_retry_after)

    def note_success(self) -> None:
        """The server answered: online again, and the next failure starts with the shortest window."""
        self._offline_until = 0.0
        self._backoff = self._retry_after

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """Run a read-only client call unless offline; returns ``(ok, result)``, never raises on transient errors."""
        if not self.online:
            return False, None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self.note_failure(exc)
            return False, None
        self.note_success()
        return True, result

    # ---- writes -------------------------------------------------------------------------------

    def create_run(self, experiment: str, run_name: str | None, tags: dict[str, str],
                   start_time: int | None = None) -> str:
        """Create a run; returns its id, or a placeholder id when the server is unreachable.

        Args:
            experiment: experiment name (created if missing).
            run_name: the run's display name.
            tags: run tags (values that are placeholder run ids are resolved at send time).
            start_time: milliseconds since the epoch (now if None).

        Returns:
            The run id (``local-...`` when it will be created at replay time).
        """
        tags = {**source_tags(), **tags}  # "User" and "Source" in the UI, for every run smartify creates
        record = {"op": "create_run", "experiment": experiment, "run_name": run_name, "tags": dict(tags),
                  "start_time": start_time or _now_ms()}
        if self.online:
            if self.resolve_tags(record) is None:
                self.flush()  # the parent run may be creatable now
            try:
                resolved = self.resolve_tags(record)
                if resolved is not None and self.online:
                    return self.create_from_record(resolved)
            except Exception as exc:  # never out of the writer: the record is spooled, a replay retries it
                if is_transient(exc):
                    self.note_failure(exc)
                else:
                    self.failures.warn("create_run", "tracking: run %s not created in %s (%s); spooled",
                                       run_name, self._uri, first_line(exc), exc_info=not is_refused(exc))
        placeholder = PLACEHOLDER_PREFIX + uuid.uuid4().hex
        self._spool(placeholder, record)
        log.warning("run for %s not created yet (%s); local id %s", run_name,
                    "offline" if self.offline else "server unreachable", placeholder)
        return placeholder

    def log_batch(self, run_id: str, metrics: Sequence[MetricRow] = (), params: dict[str, str] | None = None,
                  tags: dict[str, str] | None = None) -> bool:
        """Log metrics ``(key, value, timestamp_ms, step)``, params and tags; True if sent now."""
        record = {"op": "log_batch", "metrics": [list(m) for m in metrics], "params": dict(params or {}),
                  "tags": dict(tags or {})}
        return self._write(run_id, record)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None,
                     name: str | None = None) -> bool:
        """Upload a file as ``<artifact_path>/<name>`` (overwrites); True if sent now."""
        name = name or Path(local_path).name
        record = {"op": "log_artifact", "artifact_path": artifact_path, "name": name}
        return self._write(run_id, record, file=Path(local_path))

    def log_inputs(self, run_id: str, datasets: Sequence[dict[str, str]]) -> bool:
        """Log the data sets a run used (the UI's "Dataset" column); True if sent now.

        Args:
            run_id: the run.
            datasets: per data set ``name``, ``digest`` (<= 36 chars), ``source_type`` (``local``), ``source``
                (JSON ``{"uri": ...}``), ``profile`` (JSON or None), ``context`` (``training``, ``validation``).
        """
        return self._write(run_id, {"op": "log_inputs", "datasets": [dict(d) for d in datasets]})

    def log_image(self, run_id: str, png: str | Path, key: str, step: int) -> bool:
        """Log a PNG as step ``step`` of the image series ``key`` (``MlflowClient.log_image``); True if sent now.

        The UI shows a series as one image with a step slider. A spooled image replaces an earlier spooled
        image of the same series and step.
        """
        record = {"op": "log_image", "key": key, "step": int(step), "timestamp": _now_ms(),
                  "artifact_path": "images", "name": f"{key}+step+{int(step)}"}
        return self._write(run_id, record, file=Path(png))

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> bool:
        """End a run with ``FINISHED``, ``FAILED`` or ``KILLED``; True if sent now."""
        return self._write(run_id, {"op": "set_terminated", "status": status, "end_time": end_time or _now_ms()})

    def reopen(self, run_id: str) -> bool:
        """Mark a resumed run RUNNING again; True if sent now."""
        return self._write(run_id, {"op": "reopen"})

    def flush(self, force: bool = False) -> ReplayStats:
        """Replay pending records of this tracking URI (skipped while offline unless ``force``); never raises."""
        try:
            if self.offline or (not self.online and not force):
                return ReplayStats(pending=self.pending_records())
            self._offline_until = 0.0
            return Replayer(self).run()
        except Exception as exc:  # a replay that fails leaves the records in the spool for `tracking sync`
            self.failures.warn("replay", "tracking: replaying the spool %s failed (%s); the records stay there",
                               self.spool.dir, first_line(exc), exc_info=not is_refused(exc))
            return ReplayStats()

    def pending_records(self, run_id: str | None = None) -> int:
        """Records waiting in the spool (for one run, or all)."""
        keys = [run_id] if run_id else self.spool.keys()
        return sum(len(self.spool.pending(k)) for k in keys)

    # ---- for the replay -----------------------------------------------------------------------

    def resolve_tags(self, record: dict[str, Any],
                     resolve: Callable[[str], str | None] | None = None) -> dict[str, Any] | None:
        """The record with placeholder run ids in its tags replaced by real ones.

        Args:
            record: a spooled or new record (``create_run``, ``log_batch``...).
            resolve: maps a placeholder to its real id or None (default :meth:`resolve`).

        Returns:
            The record with resolved tags, or None while one of the runs it names is not created yet.
        """
        tags = dict(record.get("tags", {}))
        for k in RUN_ID_TAGS:
            if k in tags and is_placeholder(str(tags[k])):
                tags[k] = (resolve or self.resolve)(str(tags[k]))
                if tags[k] is None:
                    return None
        return {**record, "tags": tags} if "tags" in record else record

    def create_from_record(self, record: dict[str, Any]) -> str:
        """Create the run of a ``create_run`` record on the server now (no spooling).

        Args:
            record: the record, its tags already resolved (:meth:`resolve_tags`).

        Returns:
            The new run's id.

        Raises:
            Exception: whatever the MLflow client raises (the caller tells transient from refused).
        """
        experiment_id = get_or_create_experiment(record["experiment"], self.stores, self.client)
        run = self.client.create_run(
            experiment_id, start_time=record["start_time"], tags=record["tags"], run_name=record["run_name"]
        )
        self.note_success()
        return run.info.run_id

    def map_placeholder(self, placeholder: str, real: str) -> None:
        """Record that the placeholder run ``placeholder`` was created as ``real`` (in the spool and here)."""
        self.spool.set_mapping(placeholder, real)
        self._known[placeholder] = real

    # ---- internals ----------------------------------------------------------------------------

    def _write(self, key: str, record: dict[str, Any], file: Path | None = None) -> bool:
        """Send or spool one record; never raises (see the module docstring)."""
        try:
            return self._send(key, record, file)
        except Exception as exc:  # a bug here or in a client: the record is spooled for `tracking sync`
            self.failures.warn("error", "tracking: %s for %s failed unexpectedly (%s); spooled",
                               record["op"], key, first_line(exc), exc_info=True)
            self._spool(key, record, file)
            return False

    def _send(self, key: str, record: dict[str, Any], file: Path | None) -> bool:
        if file is not None and not file.is_file():
            self.failures.warn("missing file", "tracking: artifact %s does not exist; not logged", file)
            self.failures.lost(record["op"], f"{file} does not exist")
            return False
        blocked = self.spool.has_pending(key) or self.resolve(key) is None
        if blocked or not self.online:
            self._spool(key, record, file)
            if blocked and self.online:
                self.flush()
            return False
        try:
            resolved = self.resolve_tags(record)
            if resolved is None:
                self._spool(key, record, file)
                return False
            send_record(self.client, self.resolve(key), resolved, file)
        except Exception as exc:
            if is_transient(exc):
                self.note_failure(exc)
                self._spool(key, record, file)
                return False
            if not is_refused(exc):
                raise
            self._reject(key, record, exc)
            return False
        self.note_success()
        return True

    def _reject(self, key: str, record: dict[str, Any], exc: BaseException) -> None:
        """A record the store refused (or an artifact a full store cannot take): listed aside, counted lost."""
        self.failures.warn("store full" if is_store_full(exc) else f"refused {record['op']}",
                           "tracking: %s not stored by %s (%s); training goes on, the record is listed in %s",
                           record["op"], self._uri, first_line(exc), self.spool.dir / f"{key}.rejected.jsonl")
        self.failures.lost(record["op"], exc)
        try:
            self.spool.reject(key, {**record, "run": key, "uri": self._uri, "t": _now_ms()}, str(exc))
        except OSError as spool_exc:
            self.failures.warn("spool", "tracking: could not write the spool %s (%s)", self.spool.dir, spool_exc)

    def _spool(self, key: str, record: dict[str, Any], file: Path | None = None) -> None:
        record = {**record, "run": key, "uri": self._uri, "t": _now_ms()}
        try:
            if file is not None:
                dest = (key, f"{record['artifact_path'] or ''}/{record['name']}")
                record["file"] = self.spool.store_file(key, file)
                previous = self._spooled_artifacts.get(dest)
                if previous is not None:
                    previous.unlink(missing_ok=True)  # superseded: only the latest version is uploaded
                self._spooled_artifacts[dest] = self.spool.dir / record["file"]
            self.spool.append(key, record)
        except OSError as exc:
            self.failures.warn("spool", "tracking: could not write the spool %s (%s); records are lost",
                               self.spool.dir, first_line(exc))
            self.failures.lost(record["op"], exc)
