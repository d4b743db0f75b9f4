"""The search space over a stage: the base stage as layered data, the dimensions, a trial's values applied.

:class:`StageLayers` is the base stage as plain data: its YAML layers, then the tune file's ``fixed`` and
``trial_only`` items and the command's ``--set`` items. A trial's stage is that data with the trial's own
``(dotted key, value)`` items put on last (:meth:`StageLayers.build`), read back through the stage schema.

:class:`SearchSpace` prepares the tune file's ``space``. Every key is a dotted key of the stage schema
(:class:`recon.engine.stage.StageConfig`). Each dimension's extreme values are checked against the base stage
when the space is built, so a bad key or an impossible bound fails before the first trial. ``model.reduction``
choices that would create zero-channel attention layers for some reachable widths are removed before sampling
(:func:`valid_reductions`), so the search never proposes them. Categorical choices that are lists
(``model.feature_dim``) are offered to Optuna as JSON strings (Optuna choices must be scalars) and decoded back
for the stage.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from recon.config import apply_overrides, load_yaml_layers, parse_overrides, to_dict
from recon.engine.stage import StageConfig, load_stage_config
from recon.errors import InputError
from recon.models.config import PromptMRConfig
from tracking.tune.config import ParamSpec, TuneConfig

log = logging.getLogger(__name__)

REDUCTION_KEY = "model.reduction"
#: most combinations of the other model dimensions' extremes checked when filtering reductions
_MAX_COMBOS = 4096


# ----- the base stage as data ---------------------------------------------------------------------------------
def _pairs(items: Mapping[str, Any], section: str) -> list[tuple[str, Any]]:
    out = []
    for key, value in items.items():
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise InputError(f"{section}.{key}: invalid dotted key")
        out.append((key, value))
    return out


@dataclass(frozen=True)
class StageLayers:
    """The base stage and every layer a trial puts on it, as plain data (no sampled values yet).

    Attributes:
        base_path: the stage YAML.
        raw: the stage file's merged layers with ``fixed``, ``trial_only`` and the ``--set`` items applied.
        fixed: the tune file's ``fixed`` items (also written into the overlay).
    """

    base_path: Path
    raw: dict[str, Any]
    fixed: dict[str, Any]

    def build(self, pairs: Iterable[tuple[str, Any]] = ()) -> tuple[StageConfig, dict[str, Any]]:
        """The typed stage with extra ``(dotted key, value)`` items applied last.

        Raises:
            InputError: the result is not a valid stage.
        """
        raw = apply_overrides(self.raw, list(pairs))
        return load_stage_config(data=raw)


def stage_layers(cfg: TuneConfig, base_path: Path, cli_overrides: Sequence[str] = ()) -> StageLayers:
    """Assemble the base stage: its YAML layers, then ``fixed``, ``trial_only`` and the command's ``--set``.

    Args:
        cfg: the tune configuration.
        base_path: the stage YAML (from :func:`load_tune_config`).
        cli_overrides: ``--set key=value`` strings (they may not name a searched key).

    Returns:
        The :class:`StageLayers`; its :meth:`StageLayers.build` with no extra items is checked here.

    Raises:
        InputError: a ``--set`` key is searched, or the assembled stage is invalid.
    """
    cli = parse_overrides(list(cli_overrides))
    owned = {"train.epochs": "epochs_per_trial", "output.dir": "output_dir", "init_from": "init_from"}
    if cfg.seed_per_trial:
        owned.update({"seed": "seed", "model.seed": "seed"})
    if cfg.compress_schedule:
        owned.update({"p_aug.start": "compress_schedule", "p_aug.plateau": "compress_schedule"})
    for key, _ in cli:
        if key in cfg.space:
            raise InputError(f"--set {key}: this key is in the search space of the tune file")
        if key in owned:
            raise InputError(f"--set {key}: each trial sets it; use '{owned[key]}' in the tune file")
    raw = load_yaml_layers(base_path)
    raw.pop("inherit", None)
    raw = apply_overrides(raw, _pairs(cfg.fixed, "fixed") + _pairs(cfg.trial_only, "trial_only") + cli)
    layers = StageLayers(base_path, raw, dict(cfg.fixed))
    base, _ = layers.build()
    if cfg.compress_schedule and base.p_aug.kind not in ("exp", "ramp"):
        raise InputError(f"compress_schedule: the base stage {base_path} has p_aug.kind {base.p_aug.kind!r}; "
                         "expected exp or ramp (a schedule to compress)")
    return layers


def compressed_schedule(start_epoch: int, epochs: int) -> list[tuple[str, int]]:
    """The ``p_aug`` items of a trial whose schedule is compressed (``compress_schedule`` in the tune file).

    The stage's ramp (absolute epochs, e.g. 0 before 33, p_max from 50) is moved into the trial's epochs
    ``start_epoch .. start_epoch + epochs - 1``: p is 0 at the first and ``p_max`` at the last, with the
    stage's ``kind`` and ``decay`` in between (the ramp's formula depends on ``(t - start) / (plateau -
    start)`` only, so its shape is kept).

    Args:
        start_epoch: the trial's first (absolute) epoch.
        epochs: epochs the trial trains (>= 2).

    Returns:
        ``[("p_aug.start", first), ("p_aug.plateau", last)]``.
    """
    return [("p_aug.start", start_epoch), ("p_aug.plateau", start_epoch + epochs - 1)]


# ----- reductions ---------------------------------------------------------------------------------------------
def valid_reductions(model: PromptMRConfig, candidates: Iterable[int]) -> list[int]:
    """The channel-attention reductions that give no zero-channel layer for this model's widths.

    The model configuration's own validation decides (``PromptMRConfig`` refuses a reduction above the narrowest
    width of a network with channel attention), so this stays in step with the model.

    Args:
        model: the model configuration (its widths and ``use_ca`` switches count).
        candidates: reductions to check.

    Returns:
        The valid candidates, in the given order.
    """
    out = []
    for r in candidates:
        if isinstance(r, bool) or not isinstance(r, int):
            continue
        try:
            model.replace(reduction=r)
        except InputError:
            continue
        out.append(r)
    return out


# ----- the search space ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One prepared dimension: Optuna-facing choices (JSON strings for list choices) and decoding."""

    key: str
    spec: ParamSpec
    choices: tuple[Any, ...] | None = None
    encoded: bool = False

    def extremes(self) -> list[Any]:
        """Stage values at the edges of the dimension (every choice for a categorical)."""
        if self.spec.type == "categorical":
            return [self.decode(c) for c in self.choices or ()]
        cast = int if self.spec.type == "int" else float
        return [cast(self.spec.low), cast(self.spec.high)]

    def decode(self, value: Any) -> Any:
        """The stage value of an Optuna value."""
        return json.loads(value) if self.encoded else value

    def suggest(self, trial: Any) -> Any:
        """Draw (or, within a trial, repeat) this dimension's value; returns the stage value."""
        s = self.spec
        if s.type == "float":
            return trial.suggest_float(self.key, s.low, s.high, log=s.log, step=s.step)
        if s.type == "int":
            step = int(s.step) if s.step is not None else 1
            return trial.suggest_int(self.key, int(s.low), int(s.high), log=s.log, step=step)
        return self.decode(trial.suggest_categorical(self.key, list(self.choices or ())))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


class SearchSpace:
    """The prepared search space: checked against the base stage, reductions filtered.

    Args:
        specs: dotted key -> :class:`ParamSpec` (the tune file's ``space``).
        layers: the base stage (see :func:`stage_layers`).

    Raises:
        InputError: a key that is not in the stage schema, an extreme value the stage refuses, choices that are
            not all lists or all scalars, or no valid ``model.reduction`` left.
    """

    def __init__(self, specs: Mapping[str, ParamSpec], layers: StageLayers) -> None:
        self.layers = layers
        self.excluded: dict[str, list[Any]] = {}
        dims = []
        for key, spec in specs.items():
            choices, encoded = None, False
            if spec.type == "categorical":
                values = list(spec.choices or ())
                if all(_scalar(v) for v in values):
                    choices = tuple(values)
                elif all(isinstance(v, (list, tuple)) for v in values):
                    choices, encoded = tuple(json.dumps(list(v)) for v in values), True
                else:
                    raise InputError(f"space.{key}.choices: expected all scalars or all lists, got {values!r}")
            dims.append(Dimension(key, spec, choices, encoded))
        self.dims = self._filter_reductions(dims)
        self._check(self.dims)

    # -- checks --
    def _check(self, dims: list[Dimension]) -> None:
        for dim in dims:
            for value in dim.extremes():
                try:
                    self.layers.build([(dim.key, value)])
                except InputError as exc:
                    raise InputError(f"space.{dim.key}={value!r}: {exc}") from None
        # the corners where all dimensions sit at their low (first) or high (last) values together
        for pick in (0, -1):
            corner = [(dim.key, dim.extremes()[pick]) for dim in dims]
            try:
                self.layers.build(corner)
            except InputError as exc:
                where = "low" if pick == 0 else "high"
                raise InputError(f"space: all dimensions at their {where} end give an invalid stage: {exc}") from None

    def _filter_reductions(self, dims: list[Dimension]) -> list[Dimension]:
        red = next((d for d in dims if d.key == REDUCTION_KEY), None)
        if red is None:
            return dims
        if red.spec.type != "categorical" or red.encoded:
            raise InputError(f"space.{REDUCTION_KEY}: expected a categorical of integers (invalid values are removed)")
        others = [d for d in dims if d.key.startswith("model.") and d is not red]
        combos = list(itertools.islice(itertools.product(*[d.extremes() for d in others]), _MAX_COMBOS))
        base_cfg, _ = self.layers.build()
        models = []
        for combo in combos:
            items = [(d.key, v) for d, v in zip(others, combo)] + [(REDUCTION_KEY, 1)]
            try:
                models.append(self.layers.build(items)[0].model)
            except InputError as exc:
                raise InputError(f"space: model values {dict(items[:-1])!r} give an invalid model: {exc}") from None
        kept = [r for r in red.choices or () if all(valid_reductions(m, [r]) for m in models or [base_cfg.model])]
        dropped = [r for r in red.choices or () if r not in kept]
        if dropped:
            self.excluded[REDUCTION_KEY] = dropped
            log.warning("space.%s: %s removed (zero-channel attention layers for some widths); searching %s",
                        REDUCTION_KEY, dropped, kept)
        if not kept:
            raise InputError(f"space.{REDUCTION_KEY}: none of {list(red.choices or ())} is valid for the model widths")
        return [Dimension(d.key, d.spec, tuple(kept)) if d is red else d for d in dims]

    # -- use --
    @property
    def keys(self) -> list[str]:
        """The dotted keys searched."""
        return [d.key for d in self.dims]

    def sample(self, trial: Any) -> dict[str, Any]:
        """Suggest every dimension for ``trial`` (repeat calls in one trial return the same values).

        Args:
            trial: an ``optuna.Trial`` (anything with ``suggest_float/int/categorical``).

        Returns:
            Dotted key -> stage value.
        """
        return {d.key: d.suggest(trial) for d in self.dims}

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Stage values of a finished trial's ``params`` (Optuna values)."""
        by_key = {d.key: d for d in self.dims}
        return {k: by_key[k].decode(v) if k in by_key else v for k, v in params.items()}

    def describe(self) -> dict[str, Any]:
        """Plain summary for logging: key -> the distribution after filtering."""
        out: dict[str, Any] = {}
        for d in self.dims:
            info = {k: v for k, v in to_dict(d.spec).items() if v not in (None, False)}
            if d.choices is not None:
                info["choices"] = [d.decode(c) for c in d.choices]
            out[d.key] = info
        return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (later keys win)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out

