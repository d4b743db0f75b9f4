"""A tune step's best trial flowing into a later train step (``overlay_from``), and the links both runs keep.

A tune step writes its best trial as an overlay (``<workdir>/<tune step>/<study>.yaml``, see
:func:`tracking.tune.report.write_overlay`): the tune file's ``fixed`` items and the tuned values. A train
step with ``overlay_from: <tune step>`` applies those items to its own stage, after the stage file and before
its ``set`` items (:func:`overlay_items`); the overlay's ``inherit`` (the study's base stage) and ``output``
(a folder for a stand-alone run) are not taken: the step keeps its own stage file and folder.

Records (:class:`TunedFrom`): the stage run carries the params ``tune.study``, ``tune.trial`` and
``tune.overlay`` and the tags ``smartify.tune_study``, ``smartify.tune_trial`` and ``smartify.tune_run_id``
(the study's MLflow run); the study run carries ``smartify.used_by``, the comma-separated ids of the stage
runs that used its overlay (kept across invocations: new ids are added to the tag's value).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recon.errors import InputError
from recon.sections import flatten

USED_BY_TAG = "smartify.used_by"
#: overlay keys a train step does not take: the study's base stage and its stand-alone output folder
SKIPPED = ("inherit", "output")


def _value_text(value: Any) -> str:
    """A value as ``--set`` text that YAML reads back to the same value (floats exactly)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        # YAML 1.1 reads 1e-05 as a string; 1.0e-05 is a float
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
    return json.dumps(value)


def overlay_items(path: Path) -> dict[str, Any]:
    """The dotted items of an overlay that a train step applies.

    Args:
        path: the overlay YAML a tune step wrote.

    Returns:
        Dotted key -> value, without :data:`SKIPPED` keys.

    Raises:
        InputError: the file is missing or not a mapping.
    """
    if not path.is_file():
        raise InputError(f"overlay {path}: no such file")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InputError(f"overlay {path}: expected a mapping of stage keys")
    return {k: v for k, v in flatten(data).items() if k.split(".", 1)[0] not in SKIPPED}


def overrides_of(items: dict[str, Any]) -> list[str]:
    """``dotted.key=value`` strings of overlay items (what the stage run's provenance shows)."""
    return [f"{key}={_value_text(value)}" for key, value in items.items()]


@dataclass(frozen=True)
class TunedFrom:
    """Where a train step's tuned values came from.

    Attributes:
        step: the tune step.
        study: the study name.
        trial: the best trial's number.
        overlay: the overlay file.
        run_id: the study's MLflow run (None without tracking).
        items: the items applied.
    """

    step: str
    study: str
    trial: int
    overlay: Path
    run_id: str | None
    items: dict[str, Any]

    def tags(self) -> dict[str, str]:
        """Tags of the stage run (set when it starts)."""
        tags = {"smartify.tune_study": self.study, "smartify.tune_trial": str(self.trial)}
        if self.run_id:
            tags["smartify.tune_run_id"] = self.run_id
        return tags

    def params(self) -> dict[str, str]:
        """Params of the stage run."""
        return {"tune.study": self.study, "tune.trial": str(self.trial), "tune.overlay": str(self.overlay)}

    def describe(self) -> str:
        """One line: study, trial and the values applied."""
        values = ", ".join(f"{k}={_short(v)}" for k, v in self.items.items())
        return f"study {self.study} trial {self.trial}: {values}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


def link_study_run(writer: Any, study_run_id: str, stage_run_id: str) -> None:
    """Add ``stage_run_id`` to the study run's :data:`USED_BY_TAG` (earlier ids are kept).

    Args:
        writer: the :class:`tracking.runs.writer.TrackingWriter`.
        study_run_id: the study's MLflow run.
        stage_run_id: the stage run that used the study's overlay.
    """
    used: list[str] = []
    real = writer.resolve(study_run_id)
    if real is not None:
        ok, run = writer.call(writer.client.get_run, real)
        if ok and run is not None:
            used = [r for r in run.data.tags.get(USED_BY_TAG, "").split(",") if r]
    if stage_run_id not in used:
        used.append(stage_run_id)
    writer.log_batch(study_run_id, tags={USED_BY_TAG: ",".join(used)})
