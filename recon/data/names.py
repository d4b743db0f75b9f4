"""File names of the SNU challenge layout, and what they tell (anatomy, acceleration, index).

Train/val files are ``{brain,knee}_acc{4,8}_{N}.h5``; leaderboard files are ``{brain,knee}_test{N}.h5``
(no underscore before the number; the acceleration comes from the ``acc4``/``acc8`` folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from recon.errors import InputError

ANATOMIES = ("brain", "knee")
# The expert order of the team's MixtureOfPromptMR and of the Broker's one-hot label.
EXPERTS = ("brain_acc4", "brain_acc8", "knee_acc4", "knee_acc8")

_TRAIN_RE = re.compile(r"^(brain|knee)_acc(\d+)_(\d+)\.h5$")
_TEST_RE = re.compile(r"^(brain|knee)_test(\d+)\.h5$")


@dataclass(frozen=True)
class FileInfo:
    """What a challenge file name says.

    Attributes:
        name: the bare file name, e.g. ``brain_acc4_12.h5``.
        anatomy: ``"brain"`` or ``"knee"``.
        acc: acceleration from the name, or None for leaderboard names (it is in the folder).
        index: the volume number.
        leaderboard: True for ``*_testN.h5`` names.
    """

    name: str
    anatomy: str
    acc: int | None
    index: int
    leaderboard: bool


def parse_name(path: str | Path) -> FileInfo:
    """Parse a challenge file name.

    Args:
        path: a file name or path; only the last component is read.

    Returns:
        The parsed :class:`FileInfo`.

    Raises:
        InputError: the name matches neither ``{brain,knee}_acc{A}_{N}.h5`` nor ``{brain,knee}_test{N}.h5``.
    """
    name = Path(path).name
    match = _TRAIN_RE.match(name)
    if match:
        return FileInfo(name, match.group(1), int(match.group(2)), int(match.group(3)), False)
    match = _TEST_RE.match(name)
    if match:
        return FileInfo(name, match.group(1), None, int(match.group(2)), True)
    raise InputError(
        f"{path}: unknown file name pattern; expected {{brain,knee}}_acc{{4,8}}_{{N}}.h5 or {{brain,knee}}_test{{N}}.h5"
    )


def expert_name(anatomy: str, acc: int) -> str:
    """Expert key ``{anatomy}_acc{acc}``, validated against :data:`EXPERTS`."""
    name = f"{anatomy}_acc{acc}"
    if name not in EXPERTS:
        raise ValueError(f"no expert for anatomy={anatomy!r}, acc={acc}; experts are {', '.join(EXPERTS)}")
    return name


def sort_key(path: str | Path) -> tuple[int, int, int]:
    """Order brain before knee, then by acceleration and number (the evaluator's order)."""
    info = parse_name(path)
    return (ANATOMIES.index(info.anatomy), info.acc or 0, info.index)
