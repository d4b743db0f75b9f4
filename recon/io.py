"""File helpers shared by every writer and reader: atomic writes and HDF5 open/list.

Atomic write: the content goes to a temporary name in the destination's own folder (same file
system, so the final rename is atomic), is flushed to disk with ``fsync``, and then replaces the
destination with ``os.replace``. A reader therefore sees the old file or the new one, never half
of one; a failed write leaves the destination untouched and removes its temporary file.

The temporary name is ``.<dest name>.<pid>.<random>.tmp``: hidden, and ending in ``.tmp`` so
that no ``*.h5`` / ``*.pt`` / ``*.png`` listing picks it up. The writer creates the file itself,
so the process umask sets its permissions, as for any other file the program writes.

Names that become path components (a stage, study, model or pipeline step name) pass
:func:`safe_component`, so a name taken from a file, the command line or a shared database can never
point outside the folder it is joined to (``../../x``, ``/abs``, ``.hidden``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

import h5py

from recon.errors import InputError

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


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Give a temporary path to write; on success it replaces ``dest`` atomically.

    The destination folder is created if needed. The yielded path does not exist yet: the
    caller creates it (``open(tmp, "w")``, ``torch.save(obj, tmp)``, ``h5py.File(tmp, "w-")``,
    ``fig.savefig(tmp, format="png")``). When the block ends without an exception the file is
    fsynced and renamed onto ``dest``; in every case no temporary file is left behind.

    Args:
        dest: the final file.

    Yields:
        The temporary path, in the same folder as ``dest``.

    Example:
        >>> with atomic_path(out / "best.pt") as tmp:
        ...     torch.save(payload, tmp)
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


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
