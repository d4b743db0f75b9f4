"""The tune file: which stage is tuned, how long a trial trains, the sampler, pruner, budget and search space.

A tune file (``experiments/tune.yaml``) is YAML read into :class:`TuneConfig` with the strict loader of
:mod:`recon.config` (unknown keys and wrong types are refused with their key path)::

    base: hacker_moe.yaml             # stage YAML, relative to the tune file
    init_from: runs/hacker_baseline   # every trial starts from this checkpoint (weights only)
    epochs_per_trial: 5
    compress_schedule: true           # the stage's p_aug ramp squeezed into the trial's epochs
    metric: val/leaderboard
    memory_budget: 8GiB               # or 8GB, 512MiB, a byte count, or "none"
    fixed:                            # the setting tuned under; carried into the overlay
      mraugment.enabled: true
    trial_only:                       # knobs of the short trial runs only (not in the overlay)
      train.panel_every: 0
    space:
      mraugment.magnitude: {type: float, low: 0.5, high: 2.0}
      model.reduction: {type: categorical, choices: [1, 2, 4, 8, 16]}

This module is the schema and its loading only; what the ``space`` keys mean for the stage (their check against
the base stage, the filtering of ``model.reduction``, sampling) is :mod:`tracking.tune.space`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recon.config import from_dict, load_yaml_layers
from recon.errors import InputError
from recon.io import safe_component

#: keys a trial sets itself; a search space or ``fixed`` block may not touch them
TRIAL_KEYS = ("train.epochs", "train.start_epoch", "output.dir", "seed", "model.seed", "init_from")
#: keys a trial also sets with ``compress_schedule``
SCHEDULE_KEYS = ("p_aug.start", "p_aug.plateau")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int | float | None, key: str = "memory_budget") -> int | None:
    """A memory size in bytes: ``8GiB``, ``8GB`` (10^9), ``512MiB``, ``8G`` (binary), a number, or ``none``.

    Args:
        value: the size; ``None``, ``"none"``, ``"off"`` and 0 mean "no budget".
        key: name used in the error message.

    Returns:
        Bytes, or None for no budget.

    Raises:
        InputError: not a size.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return None
    if isinstance(value, bool):
        raise InputError(f"{key}: expected a memory size such as 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise InputError(f"{key}: expected a memory size such as 8GiB, 8GB or 512MiB, got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size < 0:
        raise InputError(f"{key}: expected a size >= 0, got {value!r}")
    return size or None


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension.

    Attributes:
        type: ``float``, ``int`` or ``categorical``.
        low: lower bound (float/int).
        high: upper bound (float/int), inclusive.
        log: sample on a log scale (float/int).
        step: discretisation step (float/int; not with ``log``).
        choices: the values (categorical); scalars, or lists such as widths.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def validate(self) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical: expected a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical: 'low', 'high', 'log' and 'step' do not apply")
            return
        if self.choices is not None:
            raise ValueError(f"{self.type}: 'choices' only applies to categorical")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type}: expected 'low' and 'high'")
        if not self.low <= self.high:
            raise ValueError(f"{self.type}: expected low <= high, got {self.low} > {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"{self.type}: log scale needs low > 0 and no step")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"{self.type}: expected step > 0, got {self.step}")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"int: '{name}' must be a whole number, got {value}")


@dataclass(frozen=True)
class SamplerConfig:
    """The Optuna sampler. Its seed is the study ``seed``; every trial's draws derive from (seed, trial number).

    Attributes:
        kind: ``tpe`` or ``random``.
        n_startup_trials: random trials before TPE models the results.
        multivariate: TPE's joint model of the parameters.
        constant_liar: TPE avoids proposing what running trials already test (several workers).
    """

    kind: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = 10
    multivariate: bool = False
    constant_liar: bool = True


@dataclass(frozen=True)
class PrunerConfig:
    """Pruning on the per-epoch metric (steps are epochs since the trial's first epoch).

    Attributes:
        kind: ``median``, ``percentile`` or ``none``.
        n_startup_trials: trials that finish before pruning starts.
        n_warmup_steps: epochs of each trial that are never pruned.
        interval_steps: check every N epochs.
        percentile: for ``percentile``: prune below this percentile (maximize) of the other trials.
    """

    kind: Literal["median", "percentile", "none"] = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    percentile: float = 50.0

    def validate(self) -> None:
        if min(self.n_startup_trials, self.n_warmup_steps) < 0 or self.interval_steps < 1:
            raise ValueError("expected n_startup_trials >= 0, n_warmup_steps >= 0 and interval_steps >= 1")
        if not 0.0 < self.percentile < 100.0:
            raise ValueError(f"percentile: expected a value in (0, 100), got {self.percentile}")


@dataclass(frozen=True)
class ProbeInputConfig:
    """The training input the memory probe uses: all unset means the largest k-space of the training data.

    Attributes:
        coils: coils C.
        height: k-space rows H.
        width: k-space columns W.
    """

    coils: int | None = None
    height: int | None = None
    width: int | None = None

    def validate(self) -> None:
        values = (self.coils, self.height, self.width)
        if any(v is not None for v in values) and not all(v is not None and v >= 1 for v in values):
            raise ValueError("set all of coils, height and width (>= 1), or none of them")

    @property
    def given(self) -> bool:
        """True when the input is set explicitly."""
        return self.coils is not None


@dataclass(frozen=True)
class HeartbeatConfig:
    """Liveness of running trials in the RDB storage.

    A trial whose worker stopped sending heartbeats for ``grace_period`` seconds is marked FAIL by the next
    worker that starts a trial, and re-queued with the same parameters up to ``max_retry`` times.

    Attributes:
        interval: seconds between heartbeats.
        grace_period: seconds of silence after which a running trial is stale.
        max_retry: retries of a stale trial (0: none).
    """

    interval: int = 60
    grace_period: int = 120
    max_retry: int = 3

    def validate(self) -> None:
        if self.interval < 1 or self.grace_period <= self.interval or self.max_retry < 0:
            raise ValueError("expected interval >= 1, grace_period > interval and max_retry >= 0")


@dataclass(frozen=True)
class TuneConfig:
    """A tuning study (see the module docstring).

    Attributes:
        base: the stage YAML tuned, relative to the tune file.
        study: study name (default: the tune file's name).
        seed: study seed: sampler draws and (with ``seed_per_trial``) trial seeds derive from it.
        seed_per_trial: give each trial its own stage and model seed derived from (seed, trial number); False
            keeps the base stage's seeds for every trial (same data order and initialisation).
        n_trials: trials per invocation unless ``--trials`` says otherwise.
        epochs_per_trial: epochs a trial trains, from the base stage's ``train.start_epoch``.
        init_from: a checkpoint (file or stage folder) every trial starts from; None trains from scratch.
            Keys that change the architecture (``model.*``) cannot be tuned then. A pipeline's tune step
            replaces it with its own ``init_from``.
        compress_schedule: squeeze the base stage's MRAugment probability schedule (``p_aug``, in absolute
            epochs: the team's ramp from 33 to its plateau at 50) into the trial: ``p_aug.start`` becomes the
            trial's first epoch and ``p_aug.plateau`` its last, so p rises from 0 to ``p_max`` inside the
            trial with the stage's shape (``kind``, ``decay``). Needs ``epochs_per_trial >= 2`` and a base
            ``p_aug.kind`` of ``exp`` or ``ramp``.
        direction: ``maximize`` or ``minimize`` the metric.
        metric: the per-epoch validation metric reported to the pruner; the trial's value is its best epoch
            (``val/leaderboard``: the challenge score on the public masks; ``val_remasked/leaderboard`` for the
            Helper family).
        memory_budget: the GPU memory a trial may use (``8GiB``; ``none``: no check).
        probe_input: the input size the memory probe uses.
        probe_device: ``auto`` (the training device), ``cpu`` (meta-device estimate) or ``cuda`` (measured step).
        enforce_budget: on CUDA, cap the process's allocator at the budget, so a trial that exceeds it fails with
            a real out-of-memory error as on an 8 GB card.
        sampler: the sampler.
        pruner: the pruner.
        heartbeat: heartbeat and retry of trials whose worker died.
        importance: evaluator of the parameter-importance figure: ``auto`` (fANOVA when scikit-learn is
            installed, else PED-ANOVA), ``fanova``, ``ped-anova`` or ``mdi``.
        fixed: dotted keys set for every trial and written into the overlay (the setting tuned under).
        trial_only: dotted keys set for trial runs only (data caps, panels...), not in the overlay.
        output_dir: trial outputs, ``{study}`` expanded; each trial writes ``trial_NNNN/`` inside.
        keep_checkpoints: keep each trial's checkpoints (else deleted when the trial ends).
        space: dotted stage key -> :class:`ParamSpec`.
    """

    base: str
    study: str | None = None
    seed: int = 430
    seed_per_trial: bool = True
    n_trials: int = 20
    epochs_per_trial: int = 3
    init_from: str | None = None
    compress_schedule: bool = False
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str = "val/leaderboard"
    memory_budget: str | int | None = "8GiB"
    probe_input: ProbeInputConfig = field(default_factory=ProbeInputConfig)
    probe_device: Literal["auto", "cpu", "cuda"] = "auto"
    enforce_budget: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    importance: Literal["auto", "fanova", "ped-anova", "mdi"] = "auto"
    fixed: dict[str, Any] = field(default_factory=dict)
    trial_only: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/tune/{study}"
    keep_checkpoints: bool = False
    space: dict[str, ParamSpec] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs_per_trial < 1 or self.n_trials < 0 or self.seed < 0:
            raise ValueError("expected epochs_per_trial >= 1, n_trials >= 0 and seed >= 0")
        if not self.space:
            raise ValueError("space: expected at least one dimension")
        owned = TRIAL_KEYS + (SCHEDULE_KEYS if self.compress_schedule else ())
        for section in ("space", "fixed"):
            for key in getattr(self, section):
                if key in owned:
                    raise ValueError(f"{section}.{key}: set by each trial itself; cannot be {section}")
        if self.compress_schedule and self.epochs_per_trial < 2:
            raise ValueError("compress_schedule: needs epochs_per_trial >= 2 (a ramp from 0 to p_max)")
        both = sorted(set(self.space) & (set(self.fixed) | set(self.trial_only)))
        if both:
            raise ValueError(f"space.{both[0]}: also set in fixed/trial_only")
        if self.init_from and any(key.startswith("model.") for key in self.space):
            raise ValueError("space: model.* keys change the architecture; they cannot be tuned with init_from")
        parse_bytes(self.memory_budget)


def load_tune_config(path: str | Path) -> tuple[TuneConfig, Path]:
    """Read a tune file.

    Args:
        path: the tune YAML (may ``inherit`` another tune file).

    Returns:
        ``(config, base stage path)``; the base path is resolved against the tune file's folder.

    Raises:
        InputError: a missing file, an unknown key, a wrong type or a bad value (one line).
    """
    path = Path(path)
    sources: dict[str, str] = {}
    raw = load_yaml_layers(path, sources=sources)
    cfg = from_dict(TuneConfig, raw, sources=sources)
    base = Path(cfg.base).expanduser()
    if not base.is_absolute():
        base = path.parent / base
    if not base.is_file():
        raise InputError(f"{path}: base: stage file not found: {base}")
    return cfg, base


def study_name_of(cfg: TuneConfig, path: str | Path, given: str | None = None) -> str:
    """The study name: ``given`` (``--study``), else ``study`` from the file, else the tune file's stem.

    The name becomes the overlay's file name and the trial folder (``{study}``), and a name given on the
    command line may come from a shared storage, so it must be a file-name component.

    Args:
        cfg: the tune configuration.
        path: the tune file.
        given: the name from the command line, if any.

    Returns:
        The study name.

    Raises:
        InputError: the name is not a file-name component (see :func:`recon.io.safe_component`).
    """
    if given is not None:
        return safe_component(given, "--study")
    if cfg.study:
        return safe_component(cfg.study, f"{path}: study")
    return safe_component(Path(path).stem, f"{path}: study name (the file's name)")


#: Storage URLs ``smartify tune --storage`` takes (SQLAlchemy URLs of Optuna's RDB storage).
STORAGE_EXAMPLES = ("sqlite:///path/optuna.db", "postgresql+psycopg://user@host:5432/db",
                    "mysql+pymysql://user@host/db")


def check_storage_url(url: str, key: str = "--storage") -> str:
    """Refuse an Optuna storage URL that SQLAlchemy cannot use, before anything is opened or written.

    Args:
        url: the storage URL.
        key: how the message names it.

    Returns:
        ``url``, unchanged.

    Raises:
        InputError: ``<key> '<url>' (credentials removed): <why>; expected sqlite:///..., ...``; a known
            database whose driver is not installed is named as such.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from tracking.runs.stores import redact_uri

    shown = redact_uri(url)
    expected = "expected " + ", ".join(STORAGE_EXAMPLES)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # a subclass of ArgumentError: first
        scheme = url.split(":", 1)[0]
        raise InputError(f"{key} {shown!r}: unknown database scheme {scheme!r}; {expected}") from None
    except ArgumentError:
        raise InputError(f"{key} {shown!r}: not a database URL; {expected}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise InputError(f"{key} {shown!r}: the driver for {parsed.drivername} is not installed "
                         f"({exc.name or exc}); {expected}") from None
    return url
