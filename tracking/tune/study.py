"""Optuna studies over a training stage: storage, sampler, pruner, and a whole ``smartify tune`` invocation.

One study lives in an RDB storage (default ``sqlite:///<home>/optuna.db``; ``postgresql://...`` for many
machines) with heartbeats: a trial whose worker dies is marked FAIL by the next worker after the grace period
and re-queued with the same parameters (``RetryHeartbeatStaleTrialCallback``; the retry carries the system
attributes ``failed_trial`` and ``retry_history``). The study is created once, before any worker optimizes;
every later process loads it, so several processes running the same command share it.

Sampling is explicit: the sampler is re-created for every trial with a seed derived from (study seed, trial
number), so proposals depend on the trial number only, and workers never propose the same start-up points.

An invocation (:func:`run_tune`) is :func:`prepare` (tune file, space, memory budget, storage, study and its
tracking), the trials of this process (:class:`tracking.tune.session.TuneSession`), then :func:`finish`.

Tracking (:class:`tracking.tune.study_runs.StudyTracker`): one MLflow parent run per study (its id is kept in
the study's user attributes), one nested run per trial (params, per-epoch metrics, ``optuna.state``,
``smartify.prune_reason``), and at the end the optimisation-history, intermediate-value and
parameter-importance figures, the trial table and the overlay on the study run. The best trial's values go to
a stage overlay (:func:`tracking.tune.report.write_overlay`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.samplers import BaseSampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from recon.errors import InputError
from recon.events import Callback
from recon.seeding import derive_seed
from tracking.tune.config import TuneConfig, check_storage_url, load_tune_config, parse_bytes, study_name_of
from tracking.tune.memory import (
    MemoryPredictor,
    ProbeInput,
    cap_cuda_memory,
    device_for_probe,
    format_bytes,
    largest_training_input,
)
from tracking.tune.report import (
    format_table,
    importance_evaluator,
    plot_study,
    summary_metrics,
    trial_rows,
    write_overlay,
)
from tracking.tune.session import TuneSession
from tracking.tune.space import SearchSpace, stage_layers
from tracking.tune.stored import check_same_definition, definition_attrs
from tracking.tune.study_runs import StudyTracker

log = logging.getLogger(__name__)

EXPERIMENT = "smartify-tune"


# ----- storage, sampler, pruner, study --------------------------------------------------------------------------
def open_storage(url: str, interval: int, grace_period: int, max_retry: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> RDBStorage:
    """An RDB storage with heartbeats and retry of stale trials.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db``, ``postgresql://user@host/db``).
        interval: heartbeat interval in seconds.
        grace_period: seconds without heartbeat after which a running trial is failed.
        max_retry: times a stale trial is re-queued (0: never).
        on_stale: called with each stale trial after the retry was queued (e.g. to close its tracking run).

    Returns:
        The storage (tables created if missing).
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    # SQLite serialises writers; wait for the lock instead of failing while another worker writes.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d of study %s had no heartbeat for %d s: marked FAIL%s", trial.number,
                    study.study_name, grace_period, ", re-queued" if retry else "")
        if retry is not None:
            retry(study, trial)
        if on_stale is not None:
            on_stale(study, trial)

    from sqlalchemy.exc import IntegrityError, OperationalError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if max_retry > 0 else None
        for attempt in range(3):
            try:
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                                  grace_period=grace_period, heartbeat_stale_trial_callback=stale)
            except (OperationalError, IntegrityError) as exc:
                # Processes started together on a new database race to create its tables; the loser
                # finds them on the next attempt. (--workers creates the study first and avoids this.)
                if attempt == 2:
                    raise
                log.warning("storage not ready (%s); retrying", str(exc).splitlines()[0][:200])
                time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


class TrialSeededSampler(BaseSampler):
    """A sampler re-created before every trial with a seed derived from (study seed, trial number).

    Optuna's samplers draw from one generator per process, so two workers with the same seed propose the same
    start-up points, and a sampler without a seed is not reproducible. Here the draws of trial ``n`` depend on
    ``n`` and the study's history only.

    Args:
        factory: ``factory(seed) -> sampler``.
        seed: the study seed.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._inner = factory(seed % 2**32)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._factory(derive_seed(self._seed, "sampler", trial.number) % 2**32)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):  # noqa: D102 - delegation
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: D102
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: D102
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):  # noqa: D102
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # noqa: D102
        self._inner.reseed_rng()


def make_sampler(cfg: TuneConfig) -> BaseSampler:
    """The configured sampler, seeded per trial (:class:`TrialSeededSampler`)."""
    s = cfg.sampler

    def factory(seed: int) -> BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if s.kind == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                              multivariate=s.multivariate, constant_liar=s.constant_liar)

    return TrialSeededSampler(factory, cfg.seed)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (``none``: never prunes on the metric)."""
    p = cfg.pruner
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps, interval_steps=p.interval_steps)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                       interval_steps=p.interval_steps)


def open_study(storage: RDBStorage, name: str, cfg: TuneConfig, attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create the study or load it (same name, same direction); record ``attrs`` the first time.

    Args:
        storage: the storage.
        name: study name.
        cfg: the tune configuration (direction, sampler, pruner).
        attrs: study user attributes written when absent (the tune file, the space...).

    Returns:
        The study.

    Raises:
        InputError: a study of that name exists with the other direction, or with another search space or
            metric (:func:`tracking.tune.stored.check_same_definition`).
    """
    study = optuna.create_study(storage=storage, study_name=name, direction=cfg.direction, load_if_exists=True,
                                sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    if study.direction.name.lower() != cfg.direction:
        raise InputError(f"study {name!r} exists with direction {study.direction.name.lower()}, "
                         f"the tune file says {cfg.direction}")
    have = study.user_attrs
    check_same_definition(name, have, attrs or {})
    if study.metric_names != [cfg.metric]:  # optuna-dashboard and the figures name the objective
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([cfg.metric])
    for key, value in (attrs or {}).items():
        if key not in have:
            study.set_user_attr(key, value)
    return study


# ----- a whole invocation ---------------------------------------------------------------------------------------
@dataclass
class TuneOptions:
    """One ``smartify tune`` invocation (see :mod:`tracking.commands.tune`).

    Attributes:
        tune_file: the tune YAML.
        trials: trials this process runs (None: the file's ``n_trials``; 0: none, only set up / finish).
        timeout: stop starting trials after this many seconds.
        storage: Optuna storage URL (None: ``sqlite:///<home>/optuna.db``).
        study: study name (None: the file's ``study`` or its name).
        memory_budget: overrides the file's budget (``8GiB``, ``none``).
        overrides: ``--set key=value`` items for the base stage.
        overlay_dir: folder of the overlay (None: ``<repo>/experiments/tuned``).
        tracking: log to MLflow.
        experiment: MLflow experiment.
        finalize: make the figures, the table and the overlay at the end (workers leave it to their parent).
        extra_callbacks: engine callbacks added to every trial.
        output_dir: folder of the trial outputs (None: the file's ``output_dir``; ``{study}`` is expanded).
        parent_run_id: nest the study's MLflow run under this run (e.g. a pipeline run) when it is created.
        run_name: name of a new study run (None: ``study-<study name>``).
        init_from: the checkpoint every trial starts from, replacing the file's ``init_from`` (a pipeline's
            tune step passes an earlier step's folder).
    """

    tune_file: Path
    trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    memory_budget: str | None = None
    overrides: Sequence[str] = ()
    overlay_dir: Path | None = None
    tracking: bool = True
    experiment: str = EXPERIMENT
    finalize: bool = True
    extra_callbacks: list[Callback] = field(default_factory=list)
    output_dir: Path | None = None
    parent_run_id: str | None = None
    run_name: str | None = None
    init_from: str | None = None


@dataclass
class Prepared:
    """A session and its study, ready to optimize."""

    session: TuneSession
    study: optuna.Study
    storage_url: str
    base_path: Path


@dataclass
class TuneResult:
    """What a finished invocation reports.

    Attributes:
        study: study name.
        storage: storage URL (credentials removed).
        rows: :func:`trial_rows` of the whole study.
        table: the rows as text.
        overlay: the overlay file (None when no trial completed).
        figures: figure name -> PNG path.
        summary: :func:`summary_metrics`.
        excluded: search values removed before sampling (``model.reduction``).
        run_id: the study's MLflow run (None without tracking).
        best_trial: the best trial's number (None when no trial completed).
        best_params: the best trial's values by dotted stage key ({} when none).
    """

    study: str
    storage: str
    rows: list[dict[str, Any]]
    table: str
    overlay: Path | None
    figures: dict[str, Path]
    summary: dict[str, float]
    excluded: dict[str, list[Any]]
    run_id: str | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)


def effective_tune(options: TuneOptions) -> tuple[TuneConfig, Path]:
    """The tune configuration as this invocation runs it: what the study run logs as ``tune.*`` params.

    The command's choices replace the file's: ``study`` is the study's name as opened (``--study``, a
    pipeline's ``<pipeline>-<step>``, else the file's), ``n_trials`` the trials this invocation runs
    (``--trials``), ``output_dir`` the trial folder with ``{study}`` expanded and ``memory_budget`` the
    budget applied (``--memory-budget``) and ``init_from`` the checkpoint the trials start from.

    Args:
        options: the invocation.

    Returns:
        The effective configuration and the base stage file.

    Raises:
        InputError: a bad tune file.
    """
    cfg, base_path = load_tune_config(options.tune_file)
    name = study_name_of(cfg, options.tune_file, options.study)
    return dataclasses.replace(
        cfg, study=name, n_trials=cfg.n_trials if options.trials is None else options.trials,
        output_dir=str(options.output_dir or cfg.output_dir).replace("{study}", name),
        memory_budget=cfg.memory_budget if options.memory_budget is None else options.memory_budget,
        init_from=cfg.init_from if options.init_from is None else options.init_from,
    ), base_path


def resolved_tune(options: TuneOptions) -> dict[str, Any]:
    """What ``--print-config`` shows: the effective tune configuration and the base stage it tunes, resolved.

    Nothing is opened: no storage, no tracking store.

    Args:
        options: the invocation.

    Returns:
        ``{"tune": ..., "base_stage": ...}``: the study run's ``tune.*`` params as a tree, and the base stage with
        ``fixed``, ``trial_only`` and ``--set`` applied (before each trial's sampled values and its own keys).

    Raises:
        InputError: a bad tune file, ``--set`` item or base stage.
    """
    from recon.config import to_dict

    cfg, base_path = effective_tune(options)
    _, base = stage_layers(cfg, base_path, options.overrides).build()
    return {"tune": to_dict(cfg), "base_stage": base}


def prepare(options: TuneOptions, create_run: bool = True) -> Prepared:
    """Load the tune file, check the space, open (create once) the study and its MLflow run.

    Args:
        options: the invocation.
        create_run: create/reopen the study's MLflow run (False for workers started by a parent).

    Returns:
        The :class:`Prepared` study.

    Raises:
        InputError: a bad tune file, space, budget, data folder, storage URL or study name.
    """
    from recon.config import flatten, to_dict
    from tracking.runs.stores import default_optuna_storage, redact_uri

    cfg, base_path = effective_tune(options)
    name = str(cfg.study)
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise InputError(f"{options.tune_file}: init_from: no checkpoint or stage folder at {cfg.init_from}")
    url = check_storage_url(options.storage) if options.storage else default_optuna_storage()
    budget = parse_bytes(cfg.memory_budget, "--memory-budget" if options.memory_budget is not None else "memory_budget")
    layers = stage_layers(cfg, base_path, options.overrides)
    space = SearchSpace(cfg.space, layers)
    base, _ = layers.build()
    if cfg.probe_input.given:
        probe = ProbeInput(cfg.probe_input.coils, cfg.probe_input.height, cfg.probe_input.width,
                           base.train.batch_size)
    else:
        probe = largest_training_input(base)
    if cfg.enforce_budget:
        cap_cuda_memory(budget, base)
    tracker: StudyTracker | None = None
    if options.tracking:
        from tracking.runs.stores import resolve_stores

        tracker = StudyTracker(resolve_stores(), options.experiment, space)
    storage = open_storage(url, cfg.heartbeat.interval, cfg.heartbeat.grace_period, cfg.heartbeat.max_retry,
                           on_stale=tracker.close_stale if tracker is not None else None)
    attrs = definition_attrs(options.tune_file, base_path, cfg.metric, space.describe(), space.excluded, cfg.fixed,
                             cfg.output_dir, cfg.importance, cfg.seed)
    study = open_study(storage, name, cfg, attrs)
    if tracker is not None:
        params = {f"tune.{k}": v for k, v in flatten(to_dict(cfg)).items()}
        params.update({"study": name, "storage": redact_uri(url), "base": str(base_path),
                       "memory_budget_bytes": budget, "probe_input": f"{probe.coils}x{probe.height}x{probe.width}",
                       "set": json.dumps(list(options.overrides)), "space.excluded": json.dumps(space.excluded)})
        tracker.open(study, params, create=create_run, parent_run_id=options.parent_run_id,
                     run_name=options.run_name)
    output_root = Path(cfg.output_dir)
    session = TuneSession(cfg, name, layers, space, budget, probe, MemoryPredictor(device_for_probe(cfg, base)),
                          output_root, tracker, list(options.extra_callbacks), base.train.start_epoch)
    log.info("study %s in %s: budget %s, probe input %dx%dx%d, space %s", name, redact_uri(url),
             format_bytes(budget), probe.coils, probe.height, probe.width, space.describe())
    return Prepared(session, study, url, base_path)


def finish(prepared: Prepared, overlay_dir: Path | None = None) -> TuneResult:
    """Figures, trial table and overlay of the whole study; the study run ends with them.

    Args:
        prepared: the prepared study.
        overlay_dir: folder of the overlay (None: ``<repo>/experiments/tuned``).

    Returns:
        The :class:`TuneResult`.
    """
    from tracking.runs.stores import redact_uri, repo_root

    session, study = prepared.session, prepared.study
    cfg, space = session.cfg, session.space
    rows = trial_rows(study, space)
    table = format_table(rows)
    out = session.output_root
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_study(study, out / "figures", cfg.importance, cfg.seed)
    table_path = out / "trials.txt"
    table_path.write_text(table + "\n", encoding="utf-8")
    json_path = out / "trials.json"
    json_path.write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    overlay = None
    tags = {"optuna.study": study.study_name}
    if complete:
        folder = overlay_dir or repo_root(fallback_to_cwd=True) / "experiments" / "tuned"
        overlay = write_overlay(Path(folder) / f"{study.study_name}.yaml", session.layers.base_path,
                                session.layers.fixed, study.best_trial, space, study.study_name, cfg.metric)
        tags.update({"optuna.best_trial": str(study.best_trial.number), "smartify.overlay": str(overlay)})
    else:
        log.warning("study %s: no complete trial yet; no overlay written", study.study_name)
    summary = summary_metrics(study)
    if session.tracker is not None:
        _, name = importance_evaluator(cfg.importance, cfg.seed)
        tags["smartify.importance_evaluator"] = name
        files = [*figures.values(), table_path, json_path, *([overlay] if overlay else [])]
        # the study's trial count as the storage holds it (all invocations), beside this invocation's tune.n_trials
        session.tracker.close({**summary, "trials/total": float(len(study.get_trials(deepcopy=False)))}, tags, files)
    run_id = session.tracker.run_id if session.tracker is not None else None
    best = study.best_trial if complete else None
    return TuneResult(study.study_name, redact_uri(prepared.storage_url), rows, table, overlay, figures, summary,
                      dict(space.excluded), run_id, best.number if best else None,
                      space.decode(best.params) if best else {})


def run_tune(options: TuneOptions) -> TuneResult | None:
    """Prepare the study, run this process's trials, and finish (unless ``options.finalize`` is False).

    Returns:
        The :class:`TuneResult`, or None when not finalizing.
    """
    prepared = prepare(options, create_run=options.finalize)
    n = prepared.session.cfg.n_trials  # the effective count (--trials, else the file's)
    try:
        if n > 0 or options.timeout:
            prepared.session.optimize(prepared.study, n_trials=n or None, timeout=options.timeout)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the study's run ends KILLED where it was opened
        if options.finalize:
            prepared.session.abandon_study_run()
        raise
    return finish(prepared, options.overlay_dir) if options.finalize else None
