"""A pipeline file: its steps, validation, loading, and the workdir a run writes into."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recon.config import from_dict, load_yaml_layers
from recon.errors import InputError
from recon.io import safe_component

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthSpec:
    """Write a synthetic data set into ``<workdir>/data`` before the steps."""

    preset: str = "tiny"
    seed: int = 0
    grappa: str = "numpy"


@dataclass(frozen=True)
class Step:
    """One step: exactly one of ``train``, ``tune``, ``promote``, ``submit``.

    Attributes:
        name: step name (also the output folder and the MLflow run name).
        train: stage YAML to train.
        set: extra ``dotted.key=value`` overrides for the stage (or the tune base stage).
        init_from: an earlier train step's name (its checkpoints) or a path; on a tune step, the checkpoint
            every trial starts from (replaces the tune file's ``init_from``).
        overlay_from: an earlier tune step: its best trial's overlay is applied to this train step's stage
            (after the stage file, before ``set``).
        init_from_epoch: start from that step's ``checkpoints/epoch_NNN.pt`` (kept by its
            ``train.keep_epochs``) instead of its best checkpoint, e.g. 30 for the team's
            ``model_epoch30in45.pt``; None: the best checkpoint.
        register: register the stage's best model in the Model Registry.
        tune: tune YAML to run (``trials`` trials).
        trials: trials of a tune step.
        promote: an earlier step that registered a version; moves ``alias`` if it is at least as good.
        alias: the alias promoted.
        submit: reconstruct the leaderboard with the ``champion`` models and evaluate.
    """

    name: str
    train: str | None = None
    set: tuple[str, ...] = ()
    init_from: str | None = None
    overlay_from: str | None = None
    init_from_epoch: int | None = None
    register: bool = False
    tune: str | None = None
    trials: int = 2
    promote: str | None = None
    alias: str = "champion"
    submit: bool = False

    def validate(self) -> None:
        safe_component(self.name, "step name")  # <workdir>/<step name> and the tune study's name
        actions = [a for a in ("train", "tune", "promote") if getattr(self, a)] + (["submit"] if self.submit else [])
        if len(actions) != 1:
            raise InputError(f"step {self.name!r}: expected exactly one of train, tune, promote, submit; got {actions}")
        if self.overlay_from is not None and not self.train:
            raise InputError(f"step {self.name!r}: overlay_from applies to a train step")
        if self.init_from_epoch is not None and (self.init_from is None or self.init_from_epoch < 1):
            raise InputError(f"step {self.name!r}: init_from_epoch = {self.init_from_epoch}: expected an epoch count "
                             ">= 1 with init_from naming the step (or stage folder) that kept it")


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file (see the module docstring)."""

    name: str
    steps: tuple[Step, ...]
    experiment: str = "smartify"
    workdir: str = "runs/pipeline"
    data_root: str | None = None
    synth: SynthSpec | None = None

    def validate(self) -> None:
        safe_component(self.name, "pipeline name")  # part of each tune step's study name (a file name)
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise InputError(f"pipeline {self.name!r}: step names must be unique, got {names}")
        for i, step in enumerate(self.steps):
            tunes = [s.name for s in self.steps[:i] if s.tune]
            if step.overlay_from is not None and step.overlay_from not in tunes:
                raise InputError(f"step {step.name!r}: overlay_from {step.overlay_from!r} is not an earlier tune "
                                 f"step (earlier tune steps: {', '.join(tunes) or 'none'})")
        if self.synth is None and self.data_root is None:
            raise InputError(f"pipeline {self.name!r}: set data_root or synth")


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[PipelineConfig, Path]:
    """Load and validate a pipeline file; ``overrides`` replace top-level keys (e.g. ``workdir``).

    Args:
        path: the pipeline YAML.
        overrides: top-level keys replaced (``--set workdir=...``).

    Returns:
        The configuration and the folder its stage and tune paths are relative to.

    Raises:
        InputError: a bad file or value (one line naming the file).
    """
    path = Path(path)
    raw = load_yaml_layers(path)
    raw.pop("inherit", None)
    raw.update(overrides or {})
    try:
        cfg = from_dict(PipelineConfig, raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    return cfg, path.parent


#: The folder of a workdir that holds the synthesised data set (not a result).
DATA_FOLDER = "data"


def holds_results(folder: Path) -> bool:
    """Whether a workdir holds an earlier invocation's results (any entry besides ``data/``)."""
    return folder.is_dir() and any(entry.name != DATA_FOLDER for entry in folder.iterdir())


def choose_workdir(workdir: str | Path, overwrite: bool = False) -> Path:
    """The folder an invocation writes into (see the module docstring).

    Args:
        workdir: the pipeline's ``workdir``.
        overwrite: use ``workdir`` even when it holds results.

    Returns:
        ``workdir`` when it holds no results or ``overwrite`` is set, else the first ``<workdir>-N``
        (N = 2, 3, ...) that holds none.
    """
    workdir = Path(workdir)
    if overwrite or not holds_results(workdir):
        return workdir
    base = workdir if workdir.name else workdir.resolve()
    number = 2
    while holds_results(base.with_name(f"{base.name}-{number}")):
        number += 1
    return base.with_name(f"{base.name}-{number}")
