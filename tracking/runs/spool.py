"""The on-disk spool: tracking records that could not reach the server yet, kept in order for a replay.

This module only reads and writes files (no MLflow); :mod:`tracking.runs.writer` decides what goes here
and replays it. Folder layout (``<home>/spool``), one key per run id: ``<key>.jsonl`` (records, appended
under an flock), ``<key>.done`` (byte offset replayed so far), ``<key>.files/`` (hard links or copies of
spooled artifacts), ``<key>.rejected.jsonl`` (records the server refused for good, with the reason) and
``runs.json`` (placeholder run id -> real run id). A run that could not be created while the server was
unreachable has a placeholder id ``local-<hex>`` until the replay creates it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from recon.io import write_text_atomic

PLACEHOLDER_PREFIX = "local-"


def is_placeholder(run_id: str) -> bool:
    """True for a run id made locally while the server was unreachable."""
    return run_id.startswith(PLACEHOLDER_PREFIX)


class Spool:
    """The on-disk spool folder (see the module docstring for the layout)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def _path(self, key: str, suffix: str) -> Path:
        return self.dir / f"{key}{suffix}"

    def append(self, key: str, record: dict[str, Any]) -> None:
        """Append one record to ``<key>.jsonl`` (under an exclusive flock); a failed write leaves no torn line.

        Raises:
            OSError: the record could not be written (e.g. no space left on the spool's disk).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        path = self._path(key, ".jsonl")
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A replayer may have compacted (unlinked) the file between open and lock.
                if path.exists() and os.fstat(fd).st_ino == os.stat(path).st_ino:
                    size = os.fstat(fd).st_size
                    try:
                        if os.write(fd, line) != len(line):
                            raise OSError(errno.ENOSPC, "short write", str(path))
                    except OSError:
                        os.ftruncate(fd, size)  # the partial line would corrupt the next record
                        raise
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
        write_text_atomic(self._path(key, ".done"), str(offset))

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
        """Keep a copy of ``src`` for a later upload; returns its path relative to the spool folder.

        Raises:
            OSError: no link and no copy could be made (a partial copy is removed).
        """
        folder = self._path(key, ".files")
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{uuid.uuid4().hex[:12]}-{Path(src).name}"
        try:
            os.link(src, dst)  # free, and immune to the engine replacing the file later
        except OSError:
            try:
                shutil.copy2(src, dst)
            except BaseException:
                dst.unlink(missing_ok=True)
                raise
        return str(dst.relative_to(self.dir))

    def reject(self, key: str, record: dict[str, Any], reason: str) -> None:
        """Keep a record the server refused, with the reason, out of the replay queue (the folder is made)."""
        self.dir.mkdir(parents=True, exist_ok=True)
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
            write_text_atomic(self.dir / "runs.json", json.dumps(table, indent=1, sort_keys=True))
        finally:
            os.close(fd)


def spool_summary(spool_dir: str | Path) -> dict[str, int]:
    """Pending record count per spool key (empty when nothing waits)."""
    spool = Spool(spool_dir)
    return {k: n for k in spool.keys() if (n := len(spool.pending(k)))}
