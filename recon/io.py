"""File helpers shared by every writer and reader: atomic writes and HDF5 open/list.

Atomic write: the content goes to a temporary name in the destination's own folder (same file
system, so the final rename is atomic), is flushed to disk with ``fsync``, and then replaces the
destination with ``os.replace``. A reader therefore sees the old file or the new one, never half
of one; a failed write leaves the destination untouched and removes its temporary file.

The temporary name is ``.<dest name>.<pid>.<random>.tmp``: hidden, and ending in ``.tmp`` so
that no ``*.h5`` / ``*.pt`` / ``*.png`` listing picks it up. The writer creates the file itself,
so the process umask sets its permissions, as for any other file the program writes.

A full file system is reported as one :class:`recon.errors.StorageError` naming the destination
and "no space left on device", whichever writer failed: an ``OSError`` with ``errno`` ENOSPC
anywhere in the exception chain, or a writer that hides the errno (``torch.save`` raises a
``RuntimeError`` from ``inline_container.cc``) while the destination's file system has less than
:data:`FULL_BELOW_BYTES` free, measured before the temporary file is removed.

Names that become path components (a stage, study, model or pipeline step name) pass
:func:`safe_component`, so a name taken from a file, the command line or a shared database can never
point outside the folder it is joined to (``../../x``, ``/abs``, ``.hidden``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import h5py

from recon.errors import InputError, StorageError

# a write that failed while less than this is free on the destination's file system ran out of space
FULL_BELOW_BYTES = 1 << 20
_ENOSPC_TEXT = os.strerror(errno.ENOSPC).lower()  # "no space left on device"
# what torch.save's C++ writer says when a write fails (it keeps no errno)
_TORCH_WRITE_MARKERS = ("inline_container.cc", "pytorchstreamwriter", "file write failed", "iostream error")

#: The longest name accepted as one path component (file systems allow 255 bytes; a suffix is added).
MAX_COMPONENT = 100
#: What a name used as a path component must be (the message of every refusal).
COMPONENT_RULE = (f"must be a file-name component: letters, digits, '.', '_' or '-', not starting with '.', "
                  f"at most {MAX_COMPONENT} characters")
_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def is_safe_component(value: object) -> bool:
    """Whether ``value`` is a string that :func:`safe_component` accepts.

    Args:
        value: the candidate name.

    Returns:
        True for a non-empty string of ``[A-Za-z0-9._-]`` that does not start with ``.`` and has at
        most :data:`MAX_COMPONENT` characters (so never ``..``, a separator or an absolute path).
    """
    return isinstance(value, str) and len(value) <= MAX_COMPONENT and _COMPONENT.fullmatch(value) is not None


def safe_component(value: object, what: str) -> str:
    """Return ``value`` if it is safe as one file-name component, else refuse it.

    Args:
        value: a name that will be joined to a folder (study, stage, model, step...).
        what: how the message names it, e.g. ``"--study"`` or ``"model name"``.

    Returns:
        ``value``, unchanged.

    Raises:
        InputError: ``<what> '<value>': must be a file-name component: ...``.
    """
    if not is_safe_component(value):
        raise InputError(f"{what} {value!r}: {COMPONENT_RULE}")
    return str(value)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during (each once)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend((item.__cause__, item.__context__))


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_no_space(exc: BaseException, folder: str | os.PathLike[str]) -> bool:
    """Whether a failed write into ``folder`` failed because its file system is full.

    Args:
        exc: the exception the writer raised.
        folder: the folder written into (its free space is checked for errno-less failures).

    Returns:
        True for ``errno.ENOSPC`` (or its text) anywhere in the exception chain, or for a
        torch writer failure while ``folder`` has less than :data:`FULL_BELOW_BYTES` free.
    """
    chain = list(_chain(exc))
    for item in chain:
        if isinstance(item, OSError) and item.errno == errno.ENOSPC:
            return True
        if _ENOSPC_TEXT in str(item).lower():
            return True
    torch_failure = any(
        isinstance(item, RuntimeError) and any(m in str(item).lower() for m in _TORCH_WRITE_MARKERS) for item in chain
    )
    if not torch_failure:
        return False
    free = _free_bytes(Path(folder))
    return free is not None and free < FULL_BELOW_BYTES


def _storage_error(dest: Path) -> StorageError:
    return StorageError(
        f"{dest}: not written: no space left on device (free some space in {dest.parent}; "
        "any previous file is unchanged)",
        path=str(dest),
    )


def _release(exc: BaseException) -> None:
    """Drop the tracebacks of a failed write: their frames hold the writer, whose open file keeps
    the deleted temporary file's blocks allocated (the disk would stay full until a GC pass)."""
    for item in _chain(exc):
        item.__traceback__ = None


class _AtomicPath:
    """The context manager of :func:`atomic_path` (a class, so no frame of it keeps a traceback)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def __enter__(self) -> Path:
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _storage_error(self.dest) from None
            raise
        return self.tmp

    def _commit(self) -> None:
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.dest)

    def _is_full(self, exc: BaseException) -> bool:
        # measured while the temporary file still holds its blocks: removing it frees them
        full = isinstance(exc, Exception) and not isinstance(exc, StorageError) and is_no_space(exc, self.dest.parent)
        if full:
            _release(exc)
        self.tmp.unlink(missing_ok=True)
        return full

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        del tb
        if exc is None:
            try:
                self._commit()
            except Exception as err:
                if self._is_full(err):
                    raise _storage_error(self.dest) from None
                raise
            finally:
                self.tmp.unlink(missing_ok=True)
            return False
        if self._is_full(exc):
            raise _storage_error(self.dest) from None
        return False


def atomic_path(dest: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Path]:
    """Give a temporary path to write; on success it replaces ``dest`` atomically.

    The destination folder is created if needed. The yielded path does not exist yet: the
    caller creates it (``open(tmp, "w")``, ``torch.save(obj, tmp)``, ``h5py.File(tmp, "w-")``,
    ``fig.savefig(tmp, format="png")``). When the block ends without an exception the file is
    fsynced and renamed onto ``dest``; in every case no temporary file is left behind.

    Args:
        dest: the final file.

    Returns:
        A context manager whose value is the temporary path, in the same folder as ``dest``.

    Raises:
        StorageError: the write failed because the file system is full (see :func:`is_no_space`);
            one line naming ``dest``. Other failures propagate unchanged.

    Example:
        >>> with atomic_path(out / "best.pt") as tmp:
        ...     torch.save(payload, tmp)
    """
    return _AtomicPath(Path(dest))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_path`).

    Args:
        path: destination file; its folder is created if needed.
        text: the content.

    Returns:
        The destination path.
    """
    dest = Path(path)
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return dest


def open_h5(path: str | os.PathLike[str]) -> h5py.File:
    """Open an HDF5 file read-only, turning failures into a one-line :class:`InputError`.

    Args:
        path: the ``.h5`` file.

    Returns:
        The open file (use it as a context manager).

    Raises:
        InputError: ``<path>: file not found`` or ``<path>: not a readable HDF5 file (<reason>)``.
    """
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable HDF5 file ({reason})") from None


def list_h5(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``*.h5`` files directly in ``folder``, sorted by name (temporary files excluded).

    Args:
        folder: an existing folder.

    Returns:
        The file paths, sorted by file name.
    """
    return sorted((p for p in Path(folder).glob("*.h5") if p.is_file()), key=lambda p: p.name)
