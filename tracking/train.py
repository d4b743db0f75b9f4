"""One tracked training stage: the wiring shared by ``smartify train``, a pipeline's train step and a tuning trial.

:func:`run_tracked_stage` does, in this order: take the stage configuration (a stage file with ``--set``
items, the configuration stored in the checkpoint a ``resume`` names, or one the caller built) and make it
the configuration as it will run (:func:`effective_stage`: an ``init_from`` given by the caller is written
into it, so the run's params, its ``config.yaml`` and every checkpoint hold the same object); check the
output folder (:mod:`recon.engine.outputs`: a folder holding checkpoints is refused unless resumed in place
or ``overwrite`` is set; a resumed copy writes into itself and starts a new MLflow run); seed the global RNGs once from it; build the callbacks (the console, then the MLflow adapter on rank 0 unless
tracking is off, then the caller's own, in the caller's order); run the stage; and, when asked, register
the best checkpoint in the Model Registry (on rank 0). It returns a :class:`StageOutcome`; a diverged
stage is an outcome with status ``diverged``, or the :class:`~recon.engine.trainer.DivergenceError` itself
when the caller asks for it (a tuning trial turns it into a pruned trial).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from recon.config import to_dict
from recon.engine import distributed
from recon.engine.stage import StageConfig, load_stage_config
from recon.engine.loop import DivergenceError
from recon.engine.outputs import checkpoint_folder, prepare_output_dir, same_folder, written_for
from recon.engine.trainer import run_stage
from recon.errors import InputError
from recon.events import Callback, CallbackList, ConsoleCallback
from recon.seeding import seed_everything
from tracking.runs import RUN_ID_KEY

if TYPE_CHECKING:  # only for annotations: the registry and the MLflow adapter load when used
    from tracking.registry.versions import ModelVersionInfo
    from tracking.runs.stores import Stores

DEFAULT_EXPERIMENT = "smartify"
#: Tag of a run that continues the checkpoint of another run (the checkpoint's folder is a copy).
RESUMED_FROM_TAG = "smartify.resumed_from_run_id"

log = logging.getLogger(__name__)

#: run tags naming the configuration files applied (in order) and the ``--set`` items
CONFIG_FILES_TAG = "smartify.config_files"
OVERRIDES_TAG = "smartify.overrides"
INHERIT_KEY = "inherit"


@dataclass(frozen=True)
class StageTracking:
    """How the stage's MLflow run is made.

    Attributes:
        experiment: MLflow experiment name.
        parent_run_id: nest the stage's run under this run (a pipeline or study run), or None.
        run_name: the run's name (None: the stage name).
        extra_tags: more run tags (e.g. ``smartify.pipeline``).
    """

    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: str | None = None
    run_name: str | None = None
    extra_tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOutcome:
    """What one tracked stage did.

    Attributes:
        status: ``finished``, ``diverged`` (see ``error``) or another status of :class:`recon.events.StageEnd`.
        best_metric: best validation score, or None.
        best_epoch: epoch of the best checkpoint, or None.
        best_path: best checkpoint, or None.
        last_path: last checkpoint, or None.
        output_dir: the stage's output folder.
        run_id: the stage's MLflow run id (from the first callback that reports one), or None.
        version: the registered model version, or None (not asked, no best checkpoint, or not rank 0).
        config: the stage configuration that ran.
        seconds: wall time of the stage itself (without loading, seeding or registration).
        error: the divergence message when ``status`` is ``diverged``, else empty.
    """

    status: str
    best_metric: float | None
    best_epoch: int | None
    best_path: Path | None
    last_path: Path | None
    output_dir: Path
    run_id: str | None
    version: ModelVersionInfo | None
    config: StageConfig
    seconds: float
    error: str = ""


def load_stage(
    config: str | Path | None = None, overrides: Sequence[str] = (), resume: str | Path | None = None,
) -> tuple[StageConfig, dict[str, Any]]:
    """The stage configuration: from the resume checkpoint when ``resume`` is set, else from ``config``.

    Args:
        config: the stage YAML file (ignored with ``resume``: the checkpoint's configuration is the one resumed).
        overrides: ``dotted.key=value`` items applied on top (with ``resume`` too).
        resume: a checkpoint file or stage folder (its ``last.pt``).

    Returns:
        The typed configuration and its resolved plain form.

    Raises:
        InputError: neither a file nor a checkpoint given, or either is invalid.
    """
    if resume is not None:
        cfg, resolved, _ = _load_resumed(resume, overrides)
        return cfg, resolved
    if config is None:
        raise InputError("a stage needs a stage file or a checkpoint to resume")
    return load_stage_config(config, overrides=overrides)


def _load_resumed(
    resume: str | Path, overrides: Sequence[str],
) -> tuple[StageConfig, dict[str, Any], tuple[Path, str | None]]:
    """The resumed configuration, writing into the checkpoint's own folder (see :mod:`recon.engine.outputs`).

    Returns:
        The typed configuration, its resolved form, and ``(folder the checkpoint was written for, its run id)``.
    """
    from recon.engine.checkpoint import Checkpoint

    checkpoint = Checkpoint.load(resume, which="last")
    stored, folder = written_for(checkpoint), checkpoint_folder(resume)
    data = copy.deepcopy(checkpoint.config)
    if not same_folder(stored, folder):  # a copied or moved stage folder continues where it is
        data["output"]["dir"] = str(folder)
    cfg, resolved = load_stage_config(data=data, overrides=overrides)
    return cfg, resolved, (stored, checkpoint.run_id)


def effective_stage(
    stage: tuple[StageConfig, dict[str, Any]], init_from: str | Path | None = None,
) -> tuple[StageConfig, dict[str, Any]]:
    """The stage as it will run: ``init_from`` (when given) replaces the configuration's own.

    The engine logs, writes to ``config.yaml`` and checkpoints the resolved form returned here, so an
    ``init_from`` passed by a pipeline or ``--init-from`` is what every record shows, never the stage file's
    default.

    Args:
        stage: the typed configuration and its resolved plain form.
        init_from: the checkpoint (file or stage folder) the weights start from, or None to keep the
            configuration's ``init_from``.

    Returns:
        The typed configuration and its resolved plain form, both with the effective ``init_from``.
    """
    cfg, resolved = stage
    if init_from is None:
        return cfg, resolved
    cfg = dataclasses.replace(cfg, init_from=str(init_from))
    return cfg, to_dict(cfg)


def config_files(path: str | Path) -> list[str]:
    """The YAML files a stage file applies, in the order they are merged (bases first, the file last).

    Args:
        path: the stage file (already loaded once, so every file in its chain exists and parses).

    Returns:
        The file paths as they are reached from ``path`` (relative paths stay relative to the working folder).
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    bases = data.get(INHERIT_KEY, []) if isinstance(data, dict) else []
    files: list[str] = []
    for rel in [bases] if isinstance(bases, str) else bases:
        base = Path(rel).expanduser()
        files += config_files(base if base.is_absolute() else path.parent / base)
    return [*files, str(path)]


def config_text(resolved: Mapping[str, Any]) -> str:
    """The resolved configuration as YAML, in the form of the run's ``config.yaml`` (``--print-config``)."""
    return yaml.safe_dump(to_dict(resolved), sort_keys=False, default_flow_style=False, allow_unicode=True)


def provenance_tags(config: str | Path | None, overrides: Sequence[str], resume: str | Path | None) -> dict[str, str]:
    """Run tags naming where the configuration came from: its files in merge order and the ``--set`` items.

    Args:
        config: the stage file (None for a configuration built by the caller).
        overrides: the ``--set`` items applied.
        resume: the checkpoint whose stored configuration was resumed (it replaces the files).

    Returns:
        ``smartify.config_files`` (JSON list; ``["checkpoint:<path>"]`` on resume) and ``smartify.overrides``
        (JSON list), each only when there is something to name.
    """
    files = [f"checkpoint:{resume}"] if resume is not None else config_files(config) if config is not None else []
    tags = {CONFIG_FILES_TAG: json.dumps(files)} if files else {}
    if overrides:
        tags[OVERRIDES_TAG] = json.dumps(list(overrides))
    return tags


def stage_callbacks(
    stage_name: str, tracking: StageTracking | None, stores: Stores | None, extra: Sequence[Callback] = (),
) -> tuple[CallbackList, Callback | None]:
    """The console, the MLflow adapter (rank 0 only, unless ``tracking`` is None), then ``extra``.

    Args:
        stage_name: the default run name.
        tracking: how the MLflow run is made, or None for console only.
        stores: tracking stores (None: resolved from the environment).
        extra: the caller's callbacks, appended in order.

    Returns:
        The callback list and the MLflow adapter in it (None when not tracking).
    """
    callbacks: list[Callback] = [ConsoleCallback()]
    tracker = None
    # in a data-parallel run only rank 0 tracks (the engine calls callbacks on rank 0 only)
    if tracking is not None and distributed.context().is_main:
        from tracking.runs.callback import MLflowCallback
        from tracking.runs.stores import resolve_stores

        tracker = MLflowCallback(stores or resolve_stores(), experiment=tracking.experiment,
                                 parent_run_id=tracking.parent_run_id, run_name=tracking.run_name or stage_name,
                                 extra_tags=dict(tracking.extra_tags))
        callbacks.append(tracker)
    return CallbackList([*callbacks, *extra]), tracker


def _run_id(callbacks: Sequence[Callback]) -> str | None:
    for callback in callbacks:
        run_id = callback.state_dict().get(RUN_ID_KEY)
        if run_id:
            return str(run_id)
    return None


def run_tracked_stage(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    stage: tuple[StageConfig, dict[str, Any]] | None = None,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    tracking: StageTracking | None = StageTracking(),
    stores: Stores | None = None,
    callbacks: Sequence[Callback] = (),
    register: bool = False,
    register_experiment: str | None = None,
    raise_divergence: bool = False,
    overwrite: bool = False,
) -> StageOutcome:
    """Load (or take), seed, track, run and optionally register one training stage.

    Args:
        config: the stage YAML file (see :func:`load_stage`).
        overrides: ``dotted.key=value`` items for ``config`` or the resumed configuration.
        stage: an already built ``(config, resolved)`` pair instead of ``config``/``overrides`` (a tuning trial).
        resume: checkpoint file or stage folder to resume exactly; its configuration is used.
        init_from: checkpoint to initialise the weights from (weights only); written into the configuration
            (:func:`effective_stage`) so that what is logged and checkpointed is what ran. Not with ``resume``.
        tracking: how the MLflow run is made; None: console only (``--no-tracking``, or a caller that
            brings its own MLflow callback in ``callbacks``).
        stores: tracking and registry stores (None: resolved from the environment).
        callbacks: more engine callbacks, after the console and the MLflow adapter.
        register: register the best checkpoint after the stage (rank 0 only).
        register_experiment: experiment of a ``register-<stage>`` run when the checkpoint has no run in the
            store (None: the registry's default).
        raise_divergence: re-raise :class:`DivergenceError` instead of returning a ``diverged`` outcome.
        overwrite: delete the checkpoints the output folder already holds (else such a folder is refused,
            see :func:`recon.engine.outputs.prepare_output_dir`).

    Returns:
        The :class:`StageOutcome`.

    Raises:
        DivergenceError: the stage diverged and ``raise_divergence`` is set.
        InputError: a bad configuration, data folder or checkpoint; an output folder that holds checkpoints
            (without ``overwrite``, unless resumed in place);
            both ``resume`` and ``init_from``.
    """
    if resume is not None and init_from is not None:
        raise InputError(f"--resume {resume} and --init-from {init_from}: a resumed stage continues from its own "
                         "checkpoint; give one of them")
    resumed = None
    if stage is None:
        if resume is not None:
            cfg, resolved, resumed = _load_resumed(resume, overrides)
            stage = (cfg, resolved)
        else:
            stage = load_stage(config, overrides)
        if tracking is not None:
            extra = {**provenance_tags(config, overrides, resume), **tracking.extra_tags}
            tracking = dataclasses.replace(tracking, extra_tags=extra)
    cfg, resolved = effective_stage(stage, init_from)
    in_place = resume is not None and same_folder(cfg.output_dir, checkpoint_folder(resume))
    is_main = distributed.context().is_main
    if is_main or not overwrite:  # rank 0 alone deletes
        prepare_output_dir(cfg.output_dir, resume=in_place, overwrite=overwrite)
    if resumed is not None and resumed[1] and not same_folder(resumed[0], cfg.output_dir):
        if is_main:
            then = f"a new MLflow run starts, tagged {RESUMED_FROM_TAG}={resumed[1]}" if tracking is not None else \
                "tracking is off"
            log.warning("resuming into %s, not %s where the checkpoint was written: run %s stays with that "
                        "folder; %s", cfg.output_dir, resumed[0], resumed[1], then)
        if tracking is not None:
            tracking = dataclasses.replace(tracking, extra_tags={**tracking.extra_tags, RESUMED_FROM_TAG: resumed[1]})
    seed_everything(cfg.seed, cfg.deterministic)  # an entry point: the global RNGs are seeded once, here
    callback_list, tracker = stage_callbacks(cfg.stage.name, tracking, stores, callbacks)
    listeners = ([tracker] if tracker is not None else []) + list(callbacks)
    start = time.perf_counter()
    try:
        end = run_stage(cfg, resolved, callback_list, resume=resume)  # init_from is in cfg (effective_stage)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (tracking.cli.Terminated): the CLI's line names the folder
        exc.output_dir = cfg.output_dir
        raise
    except DivergenceError as exc:
        if raise_divergence:
            raise
        return StageOutcome("diverged", None, None, None, None, cfg.output_dir, _run_id(listeners), None, cfg,
                            time.perf_counter() - start, str(exc))
    seconds = time.perf_counter() - start
    run_id = _run_id(listeners)
    version = None
    if register and end.best_path is not None and distributed.context().is_main:
        from tracking.registry.versions import register_stage

        extra = {"experiment": register_experiment} if register_experiment is not None else {}
        version = register_stage(end.best_path, stores=stores, **extra)
    return StageOutcome(end.status, end.best_metric, end.best_epoch, end.best_path, end.last_path, end.output_dir,
                        run_id, version, cfg, seconds)
