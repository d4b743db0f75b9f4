"""Every tracking write goes through here, so that an unreachable server never stops training.

:class:`TrackingWriter` sends each record (run creation, params/tags/metrics batch, artifact, run
status) with MLflow's short HTTP retries (:func:`tracking.runs.stores.apply_http_defaults`). On a
transient failure (connection refused, timeout, HTTP 5xx/429, a locked database) the record goes
to a local spool and the writer stays offline for a while (5 s, doubling up to 60 s): later writes
go straight to the spool without touching the network. After that window, pending records are
replayed in order before anything new is sent; ``smartify tracking sync`` calls :func:`replay_spool`.

Spool folder (``<home>/spool``), one key per run id: ``<key>.jsonl`` (records, appended under an
flock), ``<key>.done`` (byte offset replayed so far), ``<key>.files/`` (hard links or copies of
spooled artifacts), ``<key>.rejected.jsonl`` (records the server refused for good, with the reason)
and ``runs.json`` (placeholder run id -> real run id).

Idempotence: metric rows keep their ``(key, value, timestamp, step)``; before a spooled batch is
replayed, the ``(key, step)`` pairs the run already has are dropped, so nothing is logged twice even
when a batch reached the server before its reply was lost. Params are only sent when absent (MLflow
params are immutable; changed values are listed in the tag ``resume.changed_params``). Artifacts and
tags overwrite. A run that cannot be created (server down at stage start) gets a placeholder id
``local-<hex>``; the real run is created at replay and ``runs.json`` maps one to the other.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tracking.runs.stores import Stores, get_or_create_experiment, make_client, redact_uri

log = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "local-"
#: tags whose value is a run id (a placeholder there is replaced by the real id)
RUN_ID_TAGS = ("mlflow.parentRunId", "smartify.init_from_run_id", "smartify.resumed_from_run_id")
CHANGED_PARAMS_TAG = "resume.changed_params"
MAX_METRICS_PER_CALL = 800  # MLflow: at most 1000 entities per batch, 100 params and 100 tags
MAX_PARAMS_TAGS_PER_CALL = 100
MAX_TAG_VALUE = 8000

MetricRow = Sequence[Any]  # (key, value, timestamp_ms, step)


def is_placeholder(run_id: str) -> bool:
    """True for a run id made locally while the server was unreachable."""
    return run_id.startswith(PLACEHOLDER_PREFIX)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed tracking call is worth retrying later (server down or overloaded).

    Args:
        exc: the exception raised by an MLflow client call.

    Returns:
        True for connection errors, timeouts, HTTP 5xx/429 and database lock errors; False for
        requests the server refused on their merits (HTTP 4xx), which would fail again.
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 500
        return status >= 500 or status == 429
    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        return False
    return isinstance(exc, OperationalError)


def is_refused(exc: BaseException) -> bool:
    """Whether a non-transient failure is the record's fault (refused, bad local file), not a bug here."""
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (MlflowException, requests.HTTPError, OSError, ValueError)) and not is_transient(exc)


class _Blocked(Exception):
    """A record refers to a placeholder run that does not exist on the server yet."""


@dataclass
class ReplayStats:
    """What a replay did.

    Attributes:
        runs: spool keys looked at.
        sent: records applied on the server.
        created: placeholder runs created.
        skipped_metrics: metric values already on the server (not sent again).
        superseded: spooled artifacts replaced by a later version of the same artifact.
        rejected: records the server refused (kept in ``<key>.rejected.jsonl``).
        pending: records still waiting (server unreachable, or another process replaying).
        elsewhere: spool keys that belong to another tracking URI (left alone).
    """

    runs: int = 0
    sent: int = 0
    created: int = 0
    skipped_metrics: int = 0
    superseded: int = 0
    rejected: int = 0
    pending: int = 0
    elsewhere: int = 0


class Spool:
    """The on-disk spool folder (see the module docstring for the layout)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def _path(self, key: str, suffix: str) -> Path:
        return self.dir / f"{key}{suffix}"

    def append(self, key: str, record: dict[str, Any]) -> None:
        """Append one record to ``<key>.jsonl`` (under an exclusive flock)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        path = self._path(key, ".jsonl")
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A replayer may have compacted (unlinked) the file between open and lock.
                if path.exists() and os.fstat(fd).st_ino == os.stat(path).st_ino:
                    os.write(fd, line)
                    return
            finally:
                os.close(fd)

    def done_offset(self, key: str) -> int:
        """Byte offset of ``<key>.jsonl`` up to which records were replayed."""
        try:
            return int(self._path(key, ".done").read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def has_pending(self, key: str) -> bool:
        """True when ``key`` has records not replayed yet."""
        try:
            size = self._path(key, ".jsonl").stat().st_size
        except FileNotFoundError:
            return False
        return size > self.done_offset(key)

    def pending(self, key: str) -> list[tuple[int, dict[str, Any]]]:
        """Records not replayed yet, each with the byte offset just after it (complete lines only)."""
        try:
            data = self._path(key, ".jsonl").read_bytes()
        except FileNotFoundError:
            return []
        offset = self.done_offset(key)
        out = []
        while offset < len(data):
            end = data.find(b"\n", offset)
            if end < 0:
                break  # a line being written right now
            try:
                record = json.loads(data[offset:end])
            except ValueError:  # a torn write (crash mid-line): kept as a rejected record by the replay
                record = {"op": "corrupt", "raw": data[offset:end].decode(errors="replace")}
            out.append((end + 1, record))
            offset = end + 1
        return out

    def mark_done(self, key: str, offset: int) -> None:
        """Record (atomically) that everything before ``offset`` was replayed."""
        _atomic_write(self._path(key, ".done"), str(offset))

    def keys(self) -> list[str]:
        """Spool keys with a record file, least recently modified first."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.glob("*.jsonl"):
            try:
                found.append((path.stat().st_mtime, path.name[: -len(".jsonl")]))
            except FileNotFoundError:  # compacted meanwhile
                continue
        return [key for _, key in sorted(found) if not key.endswith(".rejected")]

    def store_file(self, key: str, src: str | Path) -> str:
        """Keep a copy of ``src`` for a later upload; returns its path relative to the spool folder."""
        folder = self._path(key, ".files")
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{uuid.uuid4().hex[:12]}-{Path(src).name}"
        try:
            os.link(src, dst)  # free, and immune to the engine replacing the file later
        except OSError:
            shutil.copy2(src, dst)
        return str(dst.relative_to(self.dir))

    def reject(self, key: str, record: dict[str, Any], reason: str) -> None:
        """Keep a record the server refused, with the reason, out of the replay queue."""
        with open(self._path(key, ".rejected.jsonl"), "a") as f:
            f.write(json.dumps({"reason": reason, "record": record}) + "\n")

    @contextmanager
    def replay_lock(self, key: str) -> Iterator[bool]:
        """Non-blocking exclusive lock for replaying ``key``; yields False when another process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def compact(self, key: str) -> bool:
        """Remove a key's files once every record was replayed (checked under the append lock)."""
        path = self._path(key, ".jsonl")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size != self.done_offset(key):
                return False
            # .done first: a crash in between means an idempotent replay, never a stale offset.
            self._path(key, ".done").unlink(missing_ok=True)
            path.unlink()
            shutil.rmtree(self._path(key, ".files"), ignore_errors=True)
            self._path(key, ".lock").unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def mapping(self) -> dict[str, str]:
        """Placeholder run id -> real run id."""
        try:
            return json.loads((self.dir / "runs.json").read_text())
        except FileNotFoundError:
            return {}

    def set_mapping(self, placeholder: str, real: str) -> None:
        """Record the real id of a placeholder run (atomically, under a folder lock)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".runs.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            table = self.mapping()
            table[placeholder] = real
            _atomic_write(self.dir / "runs.json", json.dumps(table, indent=1, sort_keys=True))
        finally:
            os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now_ms() -> int:
    return int(time.time() * 1000)


def _batches(metrics: Sequence[MetricRow], params: dict[str, str], tags: dict[str, str]):
    """Split into MLflow-sized ``log_batch`` calls (a usual epoch is one call); yields nothing when empty."""
    from mlflow.entities import Metric, Param, RunTag

    m = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in metrics]
    p = [Param(k, str(v)) for k, v in params.items()]
    t = [RunTag(k, str(v)) for k, v in tags.items()]
    calls = max(-(-len(m) // MAX_METRICS_PER_CALL), -(-len(p) // MAX_PARAMS_TAGS_PER_CALL),
                -(-len(t) // MAX_PARAMS_TAGS_PER_CALL))
    for i in range(calls):
        yield (
            m[i * MAX_METRICS_PER_CALL:(i + 1) * MAX_METRICS_PER_CALL],
            p[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL],
            t[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL],
        )


def _send_record(client, run_id: str, rec: dict[str, Any], file: Path | None) -> None:
    """Apply one log_batch / log_artifact / set_terminated record to an existing run."""
    op = rec["op"]
    if op == "log_batch":
        for metrics, params, tags in _batches(rec["metrics"], rec["params"], rec["tags"]):
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    elif op == "log_artifact":
        upload_artifact(client, run_id, file, rec["artifact_path"], rec["name"])
    elif op == "set_terminated":
        client.set_terminated(run_id, rec["status"], end_time=rec["end_time"])
    elif op == "reopen":
        client.update_run(run_id, status="RUNNING")
    else:
        raise ValueError(f"unknown tracking record op {op!r}")


def upload_artifact(client, run_id: str, local_path: str | Path, artifact_path: str | None, name: str) -> None:
    """Upload one file as ``<artifact_path>/<name>`` (overwriting), whatever the local file is called."""
    local_path = Path(local_path)
    if local_path.name == name:
        client.log_artifact(run_id, str(local_path), artifact_path)
        return
    with tempfile.TemporaryDirectory(prefix="smartify-upload-") as tmp:
        link = Path(tmp) / name
        link.symlink_to(local_path.resolve())
        client.log_artifact(run_id, str(link), artifact_path)


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

    @property
    def client(self):
        """The MLflow client (created on first use)."""
        if self._client is None:
            self._client = make_client(self.stores)
        return self._client

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

    def _went_offline(self, exc: BaseException) -> None:
        log.warning(
            "tracking server %s unreachable (%s); spooling to %s, next attempt in %.0f s",
            self._uri, str(exc).splitlines()[0][:200], self.spool.dir, self._backoff,
        )
        self._offline_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._max_retry_after)

    def _went_online(self) -> None:
        self._offline_until = 0.0
        self._backoff = self._retry_after

    def call(self, fn, *args, **kwargs) -> tuple[bool, Any]:
        """Run a read-only client call unless offline; returns ``(ok, result)``, never raises on transient errors."""
        if not self.online:
            return False, None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._went_offline(exc)
            return False, None
        self._went_online()
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
        record = {"op": "create_run", "experiment": experiment, "run_name": run_name, "tags": dict(tags),
                  "start_time": start_time or _now_ms()}
        if self.online:
            if self._resolved_tags(record) is None:
                self.flush()  # the parent run may be creatable now
            try:
                resolved = self._resolved_tags(record)
                if resolved is not None and self.online:
                    return self._create(resolved)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._went_offline(exc)
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

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> bool:
        """End a run with ``FINISHED``, ``FAILED`` or ``KILLED``; True if sent now."""
        return self._write(run_id, {"op": "set_terminated", "status": status, "end_time": end_time or _now_ms()})

    def reopen(self, run_id: str) -> bool:
        """Mark a resumed run RUNNING again; True if sent now."""
        return self._write(run_id, {"op": "reopen"})

    def flush(self, force: bool = False) -> ReplayStats:
        """Replay pending records of this tracking URI (skipped while offline unless ``force``)."""
        if self.offline:
            return ReplayStats(pending=self.pending_records())
        if not self.online:
            if not force:
                return ReplayStats(pending=self.pending_records())
            self._offline_until = 0.0
        return _Replayer(self).run()

    def pending_records(self, run_id: str | None = None) -> int:
        """Records waiting in the spool (for one run, or all)."""
        keys = [run_id] if run_id else self.spool.keys()
        return sum(len(self.spool.pending(k)) for k in keys)

    # ---- internals ----------------------------------------------------------------------------

    def _resolved_tags(self, record: dict[str, Any], resolve=None) -> dict[str, Any] | None:
        """The record with placeholder run ids in tags replaced, or None if one is not created yet."""
        tags = dict(record.get("tags", {}))
        for k in RUN_ID_TAGS:
            if k in tags and is_placeholder(str(tags[k])):
                tags[k] = (resolve or self.resolve)(str(tags[k]))
                if tags[k] is None:
                    return None
        return {**record, "tags": tags} if "tags" in record else record

    def _create(self, record: dict[str, Any]) -> str:
        experiment_id = get_or_create_experiment(record["experiment"], self.stores, self.client)
        run = self.client.create_run(
            experiment_id, start_time=record["start_time"], tags=record["tags"], run_name=record["run_name"]
        )
        self._went_online()
        return run.info.run_id

    def _write(self, key: str, record: dict[str, Any], file: Path | None = None) -> bool:
        if file is not None and not file.is_file():
            log.error("artifact %s does not exist; not logged", file)
            return False
        blocked = self.spool.has_pending(key) or self.resolve(key) is None
        if blocked or not self.online:
            self._spool(key, record, file)
            if blocked and self.online:
                self.flush()
            return False
        try:
            resolved = self._resolved_tags(record)
            if resolved is None:
                self._spool(key, record, file)
                return False
            _send_record(self.client, self.resolve(key), resolved, file)
        except Exception as exc:
            if is_refused(exc):
                log.error("tracking record refused by %s (%s): %s", self._uri, record["op"], exc)
                self.spool.reject(key, record, str(exc))
                return False
            if not is_transient(exc):
                raise
            self._went_offline(exc)
            self._spool(key, record, file)
            return False
        self._went_online()
        return True

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
            log.error("could not spool tracking record %s for %s: %s (record lost)", record["op"], key, exc)


class _Replayer:
    """Replays spooled records in order (one pass over every key of the writer's tracking URI)."""

    def __init__(self, writer: TrackingWriter) -> None:
        self.w = writer
        self.stats = ReplayStats()
        self._active: set[str] = set()
        self._steps: dict[tuple[str, str], set[int]] = {}
        self._run_data: dict[str, Any] = {}

    def run(self) -> ReplayStats:
        for key in self.w.spool.keys():
            self._replay_key(key)
        return self.stats

    def _replay_key(self, key: str) -> None:
        if key in self._active:
            return
        self._active.add(key)
        spool = self.w.spool
        with spool.replay_lock(key) as locked:
            records = spool.pending(key)
            if not records:
                if locked:
                    spool.compact(key)
                return
            self.stats.runs += 1
            if not locked:
                self.stats.pending += len(records)
                return
            if any(r.get("uri", self.w._uri) != self.w._uri for _, r in records):
                self.stats.elsewhere += 1
                return
            latest = {}
            for i, (_, rec) in enumerate(records):
                if rec["op"] == "log_artifact":
                    latest[(rec["artifact_path"], rec["name"])] = i
            for i, (end, rec) in enumerate(records):
                if not self.w.online:
                    self.stats.pending += len(records) - i
                    return
                try:
                    self._apply(key, rec, superseded=rec["op"] == "log_artifact"
                                and latest[(rec["artifact_path"], rec["name"])] != i)
                except _Blocked:
                    self.stats.pending += len(records) - i
                    return
                except Exception as exc:
                    if is_transient(exc):
                        self.w._went_offline(exc)
                        self.stats.pending += len(records) - i
                        return
                    if not is_refused(exc):
                        raise
                    log.error("spooled %s for %s refused: %s", rec["op"], key, exc)
                    spool.reject(key, rec, str(exc))
                    self.stats.rejected += 1
                spool.mark_done(key, end)
            spool.compact(key)

    def _real_id(self, run_id: str) -> str:
        real = self.w.resolve(run_id)
        if real is None:
            self._replay_key(run_id)  # its create_run record is in its own spool file
            real = self.w.resolve(run_id)
        if real is None:
            raise _Blocked(run_id)
        return real

    def _apply(self, key: str, rec: dict[str, Any], superseded: bool) -> None:
        op = rec["op"]
        if op == "create_run":
            if self.w.resolve(key) is not None:
                return  # created by an earlier replay that stopped before marking it done
            real = self.w._create(self.w._resolved_tags(rec, self._real_id))
            self.w.spool.set_mapping(key, real)
            self.w._known[key] = real
            self.stats.created, self.stats.sent = self.stats.created + 1, self.stats.sent + 1
            log.info("created run %s for local id %s", real, key)
            return
        run_id = self._real_id(key)
        file = None
        if op == "log_batch":
            metrics = [row for row in rec["metrics"] if int(row[3]) not in self._existing_steps(run_id, row[0])]
            self.stats.skipped_metrics += len(rec["metrics"]) - len(metrics)
            rec = {**self.w._resolved_tags(rec, self._real_id), "metrics": metrics,
                   "params": self._new_params(run_id, rec["params"])}
        elif op == "log_artifact":
            if superseded:
                self.stats.superseded += 1
                return
            file = self.w.spool.dir / rec["file"]
            if not file.is_file():
                raise ValueError(f"spooled file {file} is missing")
        _send_record(self.w.client, run_id, rec, file)
        for row in rec.get("metrics", ()):
            self._steps[(run_id, row[0])].add(int(row[3]))
        self.stats.sent += 1
        self.w._went_online()

    def _existing_steps(self, run_id: str, key: str) -> set[int]:
        if (run_id, key) not in self._steps:
            history = self.w.client.get_metric_history(run_id, key)
            self._steps[(run_id, key)] = {int(m.step) for m in history}
        return self._steps[(run_id, key)]

    def _new_params(self, run_id: str, params: dict[str, str]) -> dict[str, str]:
        """Params the run does not have yet; changed values are reported in a tag, not sent."""
        if not params:
            return {}
        if run_id not in self._run_data:
            data = self.w.client.get_run(run_id).data
            self._run_data[run_id] = (dict(data.params), dict(data.tags))
        have, tags = self._run_data[run_id]
        new = {k: str(v) for k, v in params.items() if k not in have}
        changed = sorted(k for k, v in params.items() if k in have and have[k] != str(v))
        if changed:
            log.warning("run %s: params changed since first logged, kept the first values: %s", run_id, changed)
            before = [k for k in tags.get(CHANGED_PARAMS_TAG, "").split(",") if k]
            value = ",".join(sorted(set(before) | set(changed)))[:MAX_TAG_VALUE]
            self.w.client.set_tag(run_id, CHANGED_PARAMS_TAG, value)
            tags[CHANGED_PARAMS_TAG] = value
        have.update(new)
        return new


def replay_spool(stores: Stores, spool_dir: str | Path | None = None, client=None) -> ReplayStats:
    """Replay every pending spooled record for ``stores``' tracking URI (``smartify tracking sync``).

    Args:
        stores: the tracking stores to replay to.
        spool_dir: spool folder (default ``stores.spool_dir``).
        client: an ``MlflowClient`` (made if None).

    Returns:
        The replay's counts.
    """
    writer = TrackingWriter(stores, spool_dir=spool_dir, client=client)
    return writer.flush(force=True)


def spool_summary(spool_dir: str | Path) -> dict[str, int]:
    """Pending record count per spool key (empty when nothing waits)."""
    spool = Spool(spool_dir)
    return {k: n for k in spool.keys() if (n := len(spool.pending(k)))}
