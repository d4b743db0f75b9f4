"""One tracked training stage: the wiring shared by ``smartify train``, a pipeline's train step and a tuning trial.

:func:`run_tracked_stage` does, in this order: take the stage configuration (a stage file with ``--set``
items, the configuration stored in the checkpoint a ``resume`` names, or one the caller built); seed the
global RNGs once from it; build the callbacks (the console, then the MLflow adapter on rank 0 unless
tracking is off, then the caller's own, in the caller's order); run the stage; and, when asked, register
the best checkpoint in the Model Registry (on rank 0). It returns a :class:`StageOutcome`; a diverged
stage is an outcome with status ``diverged``, or the :class:`~recon.engine.trainer.DivergenceError` itself
when the caller asks for it (a tuning trial turns it into a pruned trial).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from recon.engine import distributed
from recon.engine.stage import StageConfig, load_stage_config
from recon.engine.trainer import DivergenceError, run_stage
from recon.errors import InputError
from recon.events import Callback, CallbackList, ConsoleCallback
from recon.seeding import seed_everything
from tracking.runs import RUN_ID_KEY

if TYPE_CHECKING:  # only for annotations: the registry and the MLflow adapter load when used
    from tracking.registry.versions import ModelVersionInfo
    from tracking.runs.stores import Stores

DEFAULT_EXPERIMENT = "smartify"


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
        from recon.engine.checkpoint import load_checkpoint

        stored = load_checkpoint(resume, which="last")["config"]
        return load_stage_config(data=stored, overrides=overrides)
    if config is None:
        raise InputError("a stage needs a stage file or a checkpoint to resume")
    return load_stage_config(config, overrides=overrides)


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
) -> StageOutcome:
    """Load (or take), seed, track, run and optionally register one training stage.

    Args:
        config: the stage YAML file (see :func:`load_stage`).
        overrides: ``dotted.key=value`` items for ``config`` or the resumed configuration.
        stage: an already built ``(config, resolved)`` pair instead of ``config``/``overrides`` (a tuning trial).
        resume: checkpoint file or stage folder to resume exactly; its configuration is used.
        init_from: checkpoint to initialise the weights from (weights only).
        tracking: how the MLflow run is made; None: console only (``--no-tracking``, or a caller that
            brings its own MLflow callback in ``callbacks``).
        stores: tracking and registry stores (None: resolved from the environment).
        callbacks: more engine callbacks, after the console and the MLflow adapter.
        register: register the best checkpoint after the stage (rank 0 only).
        register_experiment: experiment of a ``register-<stage>`` run when the checkpoint has no run in the
            store (None: the registry's default).
        raise_divergence: re-raise :class:`DivergenceError` instead of returning a ``diverged`` outcome.

    Returns:
        The :class:`StageOutcome`.

    Raises:
        DivergenceError: the stage diverged and ``raise_divergence`` is set.
        InputError: a bad configuration, data folder or checkpoint.
    """
    cfg, resolved = stage if stage is not None else load_stage(config, overrides, resume)
    seed_everything(cfg.seed, cfg.deterministic)  # an entry point: the global RNGs are seeded once, here
    callback_list, tracker = stage_callbacks(cfg.stage.name, tracking, stores, callbacks)
    listeners = ([tracker] if tracker is not None else []) + list(callbacks)
    start = time.perf_counter()
    try:
        end = run_stage(cfg, resolved, callback_list, resume=resume, init_from=init_from)
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
