"""Where a stage writes, and what it may replace there: the one output-folder policy.

A stage's results are its checkpoints, ``<output.dir>/checkpoints/{best,last}.pt``. No command
replaces them without being told:

- a fresh stage refuses a folder that already holds checkpoints (one line naming the folder,
  ``--resume`` and ``--overwrite``); an empty or missing folder, or one with only an earlier
  ``config.yaml`` (a stage stopped before its first epoch), is used as it is;
- ``--overwrite`` deletes the folder's ``checkpoints/`` when the stage starts, then trains into it;
- ``--resume CKPT`` continues in the folder the checkpoint lives in (:func:`checkpoint_folder`),
  whatever ``output.dir`` the checkpoint was written for. When that differs (the folder is a copy,
  or was moved), the tracking run the checkpoint names belongs to the other folder: the resumed
  stage does not reopen it (:func:`resume_tracking` drops its id) and a new run starts instead,
  tagged with the original run's id by the tracking side.

Paths are compared after ``Path.resolve`` (relative paths against the current folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from recon.engine.checkpoint import Checkpoint, resolve_checkpoint
from recon.engine.stage import expand_output_dir
from recon.errors import InputError
from recon.events import RUN_ID_KEY

#: The folder of a stage output that holds its checkpoints.
CHECKPOINTS = "checkpoints"


def stage_checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint files a stage folder holds (``checkpoints/*.pt``, temporary files excluded).

    Args:
        path: a stage output folder (it need not exist).

    Returns:
        The files, sorted by name; empty when there are none.
    """
    folder = Path(path) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.pt") if not p.name.startswith("."))


def prepare_output_dir(path: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Check (and with ``overwrite`` clear) a stage's output folder before the stage starts.

    Args:
        path: the stage's output folder.
        resume: the stage continues the checkpoint found in this very folder (its checkpoints
            are expected and kept).
        overwrite: the user asked to replace the folder's results: its ``checkpoints/`` is
            deleted here.

    Returns:
        The folder (not created here; the stage creates it when it writes).

    Raises:
        InputError: ``path`` is a file; ``resume`` and ``overwrite`` are both set; or the folder
            holds checkpoints and neither is set.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output.dir {path}: is a file, expected a folder for the stage's checkpoints")
    if resume and overwrite:
        raise InputError(f"{path}: --resume continues the checkpoints in this folder and --overwrite deletes "
                         "them; give one of the two")
    found = stage_checkpoints(path)
    if not found or resume:
        return path
    if not overwrite:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{path}: already holds a stage's checkpoints ({CHECKPOINTS}/{names}); continue that "
                         f"stage with --resume {path}, replace its results with --overwrite, or set another "
                         "output.dir")
    shutil.rmtree(path / CHECKPOINTS)
    return path


def checkpoint_folder(resume: str | Path) -> Path:
    """The stage folder a ``--resume`` continues in: where the given checkpoint lives.

    Args:
        resume: a checkpoint file or a stage folder (its ``last.pt``), as for ``--resume``.

    Returns:
        The folder above ``checkpoints/`` for a file inside a ``checkpoints`` folder, else the file's folder.
    """
    file = resolve_checkpoint(resume, "last")
    return file.parent.parent if file.parent.name == CHECKPOINTS else file.parent


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two folder paths name the same folder (compared resolved)."""
    return Path(a).resolve() == Path(b).resolve()


def written_for(checkpoint: Checkpoint) -> Path:
    """The output folder the checkpoint was written for (its configuration's ``output.dir``, expanded).

    Raises:
        InputError: the checkpoint's configuration has no ``output.dir`` or ``stage.name``.
    """
    config = checkpoint.config
    try:
        return expand_output_dir(str(config["output"]["dir"]), str(config["stage"]["name"]))
    except (KeyError, TypeError) as exc:
        raise InputError(f"{checkpoint.source}: key 'config' lacks output.dir or stage.name") from exc


def resume_tracking(checkpoint: Checkpoint, out_dir: str | Path) -> dict[str, Any]:
    """The listeners' state a stage resumed into ``out_dir`` hands on (see the module docstring).

    Args:
        checkpoint: the checkpoint resumed.
        out_dir: the folder the resumed stage writes.

    Returns:
        The checkpoint's tracking state, without the run id when the checkpoint was written for
        another folder (that run belongs to it).
    """
    state = dict(checkpoint.tracking)
    if not same_folder(written_for(checkpoint), out_dir):
        state.pop(RUN_ID_KEY, None)
    return state
