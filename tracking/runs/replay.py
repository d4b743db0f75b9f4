"""The replay of the spool: records that could not reach the tracking server, sent in order once it answers.

:class:`Replayer` makes one pass over every spool key of a writer's tracking URI, through the public methods
of :class:`tracking.runs.writer.TrackingWriter` only. Idempotence: before a spooled batch is replayed, the
``(key, step)`` pairs the run already has are dropped; params are only sent when absent (changed values are
listed in the tag ``resume.changed_params``); of several spooled versions of one artifact only the latest
is uploaded. :func:`replay_spool` is ``smartify tracking sync``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracking.runs.transport import MAX_TAG_VALUE, image_logged, is_refused, is_transient, send_record

if TYPE_CHECKING:
    from tracking.runs.stores import Stores
    from tracking.runs.writer import TrackingWriter

log = logging.getLogger("tracking.runs.writer")

CHANGED_PARAMS_TAG = "resume.changed_params"


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



class Replayer:
    """Replays spooled records in order (one pass over every key of the writer's tracking URI).

    It works through the writer's public methods only (:meth:`TrackingWriter.resolve_tags`,
    :meth:`~TrackingWriter.create_from_record`, :meth:`~TrackingWriter.map_placeholder`,
    :meth:`~TrackingWriter.note_failure`...).

    Args:
        writer: the writer whose spool and client are used.
    """

    def __init__(self, writer: TrackingWriter) -> None:
        self.w = writer
        self.stats = ReplayStats()
        self._active: set[str] = set()
        self._steps: dict[tuple[str, str], set[int]] = {}
        self._run_data: dict[str, Any] = {}

    def run(self) -> ReplayStats:
        """One pass over every spool key; returns what it did."""
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
            if any(r.get("uri", self.w.uri) != self.w.uri for _, r in records):
                self.stats.elsewhere += 1
                return
            latest = {}
            for i, (_, rec) in enumerate(records):
                if rec["op"] in ("log_artifact", "log_image"):
                    latest[(rec["artifact_path"], rec["name"])] = i
            for i, (end, rec) in enumerate(records):
                if not self.w.online:
                    self.stats.pending += len(records) - i
                    return
                try:
                    self._apply(key, rec, superseded=rec["op"] in ("log_artifact", "log_image")
                                and latest[(rec["artifact_path"], rec["name"])] != i)
                except _Blocked:
                    self.stats.pending += len(records) - i
                    return
                except Exception as exc:
                    if is_transient(exc):
                        self.w.note_failure(exc)
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
            real = self.w.create_from_record(self.w.resolve_tags(rec, self._real_id))
            self.w.map_placeholder(key, real)
            self.stats.created, self.stats.sent = self.stats.created + 1, self.stats.sent + 1
            log.info("created run %s for local id %s", real, key)
            return
        run_id = self._real_id(key)
        file = None
        if op == "log_batch":
            metrics = [row for row in rec["metrics"] if int(row[3]) not in self._existing_steps(run_id, row[0])]
            self.stats.skipped_metrics += len(rec["metrics"]) - len(metrics)
            rec = {**self.w.resolve_tags(rec, self._real_id), "metrics": metrics,
                   "params": self._new_params(run_id, rec["params"])}
        elif op in ("log_artifact", "log_image"):
            if superseded or (op == "log_image" and image_logged(self.w.client, run_id, rec["key"], rec["step"])):
                self.stats.superseded += 1
                return
            file = self.w.spool.dir / rec["file"]
            if not file.is_file():
                raise ValueError(f"spooled file {file} is missing")
        send_record(self.w.client, run_id, rec, file)
        for row in rec.get("metrics", ()):
            self._steps[(run_id, row[0])].add(int(row[3]))
        self.stats.sent += 1
        self.w.note_success()

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


def replay_spool(stores: Stores, spool_dir: str | Path | None = None, client: Any = None) -> ReplayStats:
    """Replay every pending spooled record for ``stores``' tracking URI (``smartify tracking sync``).

    Args:
        stores: the tracking stores to replay to.
        spool_dir: spool folder (default ``stores.spool_dir``).
        client: an ``MlflowClient`` (made if None).

    Returns:
        The replay's counts.
    """
    from tracking.runs.writer import TrackingWriter

    return Replayer(TrackingWriter(stores, spool_dir=spool_dir, client=client)).run()
