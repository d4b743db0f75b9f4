"""The Broker: which system (Hacker or Helper) and which expert reconstructs a slice.

The team's inference (``test_final.forward``) sends a slice to the **Hacker** system when its
column mask is *exactly* the public pattern for its width and acceleration (ACS ``round(0.08 W)``,
every ``acc``-th column from ``(W // 2) % acc``), and to the **Helper** system otherwise. Inside a
system, the expert is ``{anatomy}_acc{acc}``: the anatomy is a per-file decision (classifier vote
over ``image_grappa`` slices, or the file name when the caller asks for it explicitly) and the
acceleration is inferred from the mask's sampled fraction, never from the folder name.

:class:`Router` applies that rule and counts every decision; :class:`RoutingReport` is what the
command line prints (Hacker ratio, slices per system and per expert, per-file anatomy decisions).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from recon.data.names import EXPERTS, expert_name
from recon.masks import infer_acc, is_public_pattern

SYSTEMS = ("hacker", "helper")
ANATOMY_SOURCES = ("classifier", "filename")


def route_slice(mask: np.ndarray) -> tuple[str, int]:
    """The Broker's rule for one slice.

    Args:
        mask: the slice's column mask, ``(W,)`` with values 0/1.

    Returns:
        ``("hacker" | "helper", acc)``: Hacker when the mask is exactly the public pattern for its
        width and inferred acceleration, and that acceleration (4 or 8).
    """
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise ValueError(f"a column mask must be 1-D (W,), got shape {mask.shape}")
    system = "hacker" if is_public_pattern(mask) else "helper"
    return system, infer_acc(mask)


@dataclass
class FileDecision:
    """How one file was routed.

    Attributes:
        file: ``<acc folder>/<name>`` as in the data set.
        anatomy: the anatomy used to pick the expert.
        source: ``classifier`` or ``filename``.
        name_anatomy: the anatomy the file name states (for comparison).
        logits: the classifier's logits summed over slices ([brain, knee]), or None.
        folder_acc: acceleration from the folder name, or None.
        slices: slices routed so far.
        systems: slices per system for this file.
        experts: slices per expert for this file.
    """

    file: str
    anatomy: str
    source: str
    name_anatomy: str
    logits: list[float] | None = None
    folder_acc: int | None = None
    slices: int = 0
    systems: dict[str, int] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)

    @property
    def agrees_with_name(self) -> bool:
        """Whether the anatomy used equals the one the file name states."""
        return self.anatomy == self.name_anatomy


@dataclass
class RoutingReport:
    """Counts of every routing decision of a reconstruction run.

    Attributes:
        total_slices: slices routed.
        hacker_ratio: Hacker slices / total slices (the team's ``tea_bagging`` figure; 0 when empty).
        slices_per_system: ``{"hacker": n, "helper": n}``.
        slices_per_expert: ``{"hacker/brain_acc4": n, ...}`` for every system/expert pair.
        anatomy_source: ``classifier`` or ``filename``.
        files: one :class:`FileDecision` per file, in routing order.
        acc_mismatches: files whose mask acceleration differs from their folder's.
    """

    total_slices: int
    hacker_ratio: float
    slices_per_system: dict[str, int]
    slices_per_expert: dict[str, int]
    anatomy_source: str
    files: list[FileDecision]
    acc_mismatches: list[str]

    @property
    def name_disagreements(self) -> list[str]:
        """Files whose anatomy decision differs from the anatomy in their name."""
        return [f.file for f in self.files if not f.agrees_with_name]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {
            "total_slices": self.total_slices,
            "hacker_ratio": self.hacker_ratio,
            "slices_per_system": dict(self.slices_per_system),
            "slices_per_expert": dict(self.slices_per_expert),
            "anatomy_source": self.anatomy_source,
            "name_disagreements": self.name_disagreements,
            "acc_mismatches": list(self.acc_mismatches),
            "files": [dict(asdict(f), agrees_with_name=f.agrees_with_name) for f in self.files],
        }

    def format(self) -> str:
        """A readable multi-line summary (per-file lines only for the notable files)."""
        systems = ", ".join(f"{name} {self.slices_per_system.get(name, 0)}" for name in SYSTEMS)
        lines = [
            f"routing: {len(self.files)} files, {self.total_slices} slices; "
            f"Hacker ratio {self.hacker_ratio:.3f} ({systems}); anatomy from {self.anatomy_source}"
        ]
        for key, count in self.slices_per_expert.items():
            if count:
                lines.append(f"  {key:<20s} {count:6d} slices")
        decided = Counter(f.anatomy for f in self.files)
        summary = ", ".join(f"{decided.get(a, 0)} {a}" for a in ("brain", "knee"))
        lines.append(f"  files by anatomy ({self.anatomy_source}): {summary}")
        if self.anatomy_source == "classifier":
            wrong = self.name_disagreements
            lines.append(f"  classifier disagrees with the file name on {len(wrong)} file(s)")
            for name in wrong:
                decision = next(f for f in self.files if f.file == name)
                logits = ", ".join(f"{v:.3g}" for v in decision.logits or [])
                lines.append(f"    {name}: classified {decision.anatomy} (logits [{logits}])")
        for name in self.acc_mismatches:
            lines.append(f"  note: {name}: mask acceleration differs from its folder")
        return "\n".join(lines)


class Router:
    """Applies :func:`route_slice` and the per-file anatomy decisions, counting everything.

    Args:
        anatomy_source: ``classifier`` or ``filename`` (reported; the caller makes the decisions).
    """

    def __init__(self, anatomy_source: str) -> None:
        if anatomy_source not in ANATOMY_SOURCES:
            raise ValueError(f"anatomy_source must be one of {ANATOMY_SOURCES}, got {anatomy_source!r}")
        self.anatomy_source = anatomy_source
        self._files: dict[str, FileDecision] = {}
        self._systems: Counter[str] = Counter()
        self._experts: Counter[str] = Counter()
        self._acc_mismatches: list[str] = []

    def decide_file(
        self,
        file: str,
        anatomy: str,
        name_anatomy: str,
        logits: list[float] | None = None,
        folder_acc: int | None = None,
    ) -> FileDecision:
        """Record the anatomy decision of one file (once per file).

        Args:
            file: ``<acc folder>/<name>``.
            anatomy: ``brain`` or ``knee``, the anatomy used for routing.
            name_anatomy: the anatomy the file name states.
            logits: the classifier's summed logits, when a classifier decided.
            folder_acc: acceleration the folder states (compared with the mask's).

        Returns:
            The new decision record.
        """
        if file in self._files:
            raise ValueError(f"{file}: anatomy already decided")
        if anatomy not in ("brain", "knee"):
            raise ValueError(f"{file}: anatomy must be brain or knee, got {anatomy!r}")
        decision = FileDecision(file, anatomy, self.anatomy_source, name_anatomy, logits, folder_acc)
        self._files[file] = decision
        return decision

    def route(self, file: str, mask: np.ndarray) -> tuple[str, str]:
        """Route one slice of ``file`` (whose anatomy was decided) and count it.

        Args:
            file: ``<acc folder>/<name>``, previously passed to :meth:`decide_file`.
            mask: the slice's column mask ``(W,)``.

        Returns:
            ``(system, expert)``, e.g. ``("hacker", "brain_acc4")``.
        """
        decision = self._files.get(file)
        if decision is None:
            raise ValueError(f"{file}: route() before decide_file()")
        system, acc = route_slice(mask)
        expert = expert_name(decision.anatomy, acc)
        if decision.folder_acc is not None and decision.folder_acc != acc and file not in self._acc_mismatches:
            self._acc_mismatches.append(file)
        decision.slices += 1
        decision.systems[system] = decision.systems.get(system, 0) + 1
        decision.experts[expert] = decision.experts.get(expert, 0) + 1
        self._systems[system] += 1
        self._experts[f"{system}/{expert}"] += 1
        return system, expert

    def report(self) -> RoutingReport:
        """The counts so far."""
        total = sum(self._systems.values())
        return RoutingReport(
            total_slices=total,
            hacker_ratio=self._systems["hacker"] / total if total else 0.0,
            slices_per_system={name: self._systems[name] for name in SYSTEMS},
            slices_per_expert={f"{s}/{e}": self._experts[f"{s}/{e}"] for s in SYSTEMS for e in EXPERTS},
            anatomy_source=self.anatomy_source,
            files=list(self._files.values()),
            acc_mismatches=list(self._acc_mismatches),
        )
