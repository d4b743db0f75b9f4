"""The stage configuration: one typed schema for every training stage, loaded from YAML.

A stage file in ``experiments/`` inherits ``base.yaml`` (``inherit: base.yaml``) and sets what
differs. Every choice the team's scripts made implicitly is a key here, with the team's value as
the default: seeds, the target rule, schedules, the exclusion of the public mask pattern, the
validation split. ``--set dotted.key=value`` overrides any key; unknown keys and wrong types are
refused with the key's path.

The ``model`` section accepts ``preset: smartify | promptmr-plus`` plus any field of
:class:`recon.models.config.PromptMRConfig`; the preset is expanded before validation, so the
resolved configuration (saved with every checkpoint) lists every model field.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from recon.augment.mask_aug import MaskAugConfig
from recon.augment.mraugment import MRAugmentConfig
from recon.models.classifier import ClassifierConfig
from recon.config import apply_overrides, from_dict, load_yaml_layers, parse_overrides, record_sources, to_dict
from recon.data.names import EXPERTS
from recon.errors import InputError
from recon.io import COMPONENT_RULE, is_safe_component
from recon.losses import LossConfig
from recon.models.config import PRESETS, PromptMRConfig
from recon.schedules import LRScheduleConfig, RampScheduleConfig
from recon.sections import DEFAULT_SOURCE, FieldError, Section


@dataclass(frozen=True)
class StageInfo(Section):
    """What the stage is.

    A stage file must set ``name`` and ``kind`` (itself or through a file it inherits; ``base.yaml``
    does not): :func:`load_stage_config` refuses it otherwise. The defaults here serve configurations
    built in code only.

    Attributes:
        name: stage name (run name, registry lineage), e.g. ``hacker_baseline``.
        kind: ``baseline`` (one PromptMR+), ``moe`` (4 experts) or ``classifier``.
        family: ``hacker`` (public mask pattern), ``helper`` (mask augmentation) or ``none``.
        description: free text shown in the tracking UI.
    """

    name: str = "stage"
    kind: Literal["baseline", "moe", "classifier"] = "baseline"
    family: Literal["hacker", "helper", "none"] = "none"
    description: str = ""

    def validate(self) -> None:
        """Check the values (see :meth:`recon.sections.Section.validate`): the name becomes a folder."""
        self.require(is_safe_component(self.name), "name", COMPONENT_RULE)


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the data is and how it is read.

    Attributes:
        root: data set root holding the split folders (``train``, ``val``...).
        train_splits: split folders trained on.
        val_split: held-out split validated on every epoch.
        use_val_for_final: also train on ``val_split``, shuffled together with the train splits
            (never a second sequential pass; validation is then not held out, and is tagged so).
        num_adj_slices: adjacent slices per sample (odd; must equal ``model.num_adj_slices``).
        num_workers: DataLoader workers (each opens HDF5 lazily, seeds per worker).
        max_train_slices: cap on training slices per epoch (None: all), a smoke-test knob.
        max_val_slices: cap on validation slices (None: all).
    """

    root: str = "data/snu"
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    use_val_for_final: bool = False
    num_adj_slices: int = 1
    num_workers: int = 0
    max_train_slices: int | None = None
    max_val_slices: int | None = None

    def validate(self) -> None:
        """Check the values (see :meth:`recon.sections.Section.validate`)."""
        self.require(self.num_adj_slices >= 1 and self.num_adj_slices % 2 == 1, "num_adj_slices",
                     "must be an odd number >= 1")
        self.require(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW settings (the learning rate itself comes from the ``lr`` schedule)."""

    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip_norm: float | None = None


@dataclass(frozen=True)
class TrainConfig(Section):
    """The epoch loop.

    Attributes:
        start_epoch: first absolute epoch of the stage (the MoE stage starts at 30).
        epochs: exclusive end epoch (absolute): the stage trains ``start_epoch..epochs-1``.
        batch_size: slices per step (1 as the team; >1 needs equal shapes).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        amp: bfloat16/float16 autocast on CUDA.
        panel_every: reconstruction panels every N epochs (0: never).
        panel_slices: fixed validation slices in a panel.
        stuck_steps: consecutive steps with loss >= 1 - 1e-4 that count as divergence.
        progress: tqdm progress bars.
        probe_memory: run the memory probe at stage start and log its estimate every epoch
            (``memory/probe_predicted_mb``); the tuner switches it off because it has probed already.
        select_metric: the validation metric that picks the ``best`` checkpoint (higher is better), e.g.
            ``val/leaderboard`` or ``val_remasked/leaderboard``; ``auto`` (see :func:`auto_select_metric`):
            ``val/accuracy`` for the classifier, ``val_remasked/leaderboard`` for a Helper (with
            re-masking on), else ``val/leaderboard``. A leaderboard that the scored validation slices
            cannot report (no acc4 or no acc8 under ``data.max_val_slices``) is replaced by the same
            pass's ``/ssim`` with a warning (:func:`recon.engine.trainer._resolve_select_metric`).
        select_by: ``metric``: the ``best`` checkpoint is the epoch with the highest ``select_metric``;
            ``last``: it is the last epoch trained (selection by epoch, for a stage that trains on its
            validation split, ``data.use_val_for_final``); ``best_metric`` is then that epoch's
            ``select_metric``, reported, not chosen on.
        keep_epochs: counts of completed epochs whose checkpoint is kept as ``checkpoints/epoch_NNN.pt``
            (the team's ``model_epoch{e+1}in{N}.pt``: ``30`` is the state after 0-based epoch 29, where
            the MoE stage starting at epoch 30 continues); a pipeline step starts from one with
            ``init_from_epoch``.
    """

    start_epoch: int = 0
    epochs: int = 45
    batch_size: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False
    panel_every: int = 5
    panel_slices: int = 2
    stuck_steps: int = 50
    progress: bool = True
    probe_memory: bool = True
    select_metric: str = "auto"
    select_by: Literal["metric", "last"] = "metric"
    keep_epochs: tuple[int, ...] = ()

    def validate(self) -> None:
        """Check the values (see :meth:`recon.sections.Section.validate`)."""
        name = self.select_metric
        self.require(name == "auto" or name == "val/accuracy" or _SELECTABLE.match(name) is not None,
                     "select_metric", "must be auto, val/accuracy or a val/ or val_remasked/ SSIM metric "
                     "(ssim, leaderboard, ssim/acc4, ssim/brain_acc8...)")
        self.require(self.epochs > self.start_epoch, "epochs",
                     f"must be greater than train.start_epoch ({self.start_epoch})")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(all(self.start_epoch < n <= self.epochs for n in self.keep_epochs), "keep_epochs",
                     f"must be completed-epoch counts in {self.start_epoch + 1}..{self.epochs}")


#: selectable reconstruction metrics: ``val[_remasked]/ssim``, ``.../leaderboard``, ``.../ssim/<group>``
_SELECTABLE = re.compile(r"^val(_remasked)?/(ssim|leaderboard|ssim/acc\d+|ssim/(brain|knee)_acc\d+)$")
REMASK_KINDS = ("equispaced", "random")


@dataclass(frozen=True)
class RemaskConfig(Section):
    """Re-masked validation (:mod:`recon.engine.remask`): the validation files scored again under masks
    that are not the public pattern, logged as ``val_remasked/...``.

    Attributes:
        enabled: run the re-masked pass every epoch (reconstruction stages).
        kinds: ``equispaced`` (a start other than ``(W // 2) % acc``) and/or ``random`` (columns kept
            with probability ``1 / acc``); each at the file's acceleration, with a centred ACS block.
        seed: the validation seed; a mask's seed is derived from it, the file name and the kind.
        center_fraction: ACS width as a fraction of W (the public pattern's 0.08).
    """

    enabled: bool = True
    kinds: tuple[Literal["equispaced", "random"], ...] = REMASK_KINDS
    seed: int = 2025
    center_fraction: float = 0.08

    def validate(self) -> None:
        """Check the values (see :meth:`recon.sections.Section.validate`)."""
        self.require(not self.enabled or len(self.kinds) > 0, "kinds", "must name at least one kind when enabled")
        self.require(len(set(self.kinds)) == len(self.kinds), "kinds", "must not repeat a kind")
        self.require(0.0 < self.center_fraction <= 1.0, "center_fraction", "must be in (0, 1]")

    def protocol(self) -> str:
        """What decides the re-masked score, as one token (``off`` or ``equispaced+random@2025/cf0.08``)."""
        if not self.enabled:
            return "off"
        return f"{'+'.join(self.kinds)}@{self.seed}/cf{self.center_fraction:g}"


@dataclass(frozen=True)
class ValidationConfig(Section):
    """What validation scores besides the files' own masks."""

    remask: RemaskConfig = field(default_factory=RemaskConfig)


@dataclass(frozen=True)
class MoEConfig(Section):
    """The 4-expert stage.

    Attributes:
        experts: expert names in the team's order.
        route_acc_from: ``mask``: the acceleration of the (possibly augmented) mask, as the team;
            ``file``: the file's acceleration.
    """

    experts: tuple[str, ...] = EXPERTS
    route_acc_from: Literal["mask", "file"] = "mask"


@dataclass(frozen=True)
class ClassifierTrainConfig(Section):
    """The classifier stage (docs/pipeline.md 4.6).

    Attributes:
        train_split: split trained on (the team trained on ``val``).
        val_split: split validated on (the team validated on ``train``).
        image_key: the image dataset classified.
        batch_size: slices per step.
        weight_penalty: coefficient of the squared-L2 parameter penalty (the README's "Lasso").
        loss: ``bce`` (the team's BCE-with-logits on one-hot targets) or ``ce`` (cross-entropy).
        select: best checkpoint by the lowest ``val_loss`` (the team) or the highest ``val_accuracy``.
    """

    train_split: str = "val"
    val_split: str = "train"
    image_key: str = "image_grappa"
    batch_size: int = 16
    weight_penalty: float = 1e-6
    loss: Literal["bce", "ce"] = "bce"
    select: Literal["val_loss", "val_accuracy"] = "val_loss"


@dataclass(frozen=True)
class OutputConfig(Section):
    """Where the stage writes (``{stage}`` expands to the stage name)."""

    dir: str = "runs/{stage}"


# The source named in messages for values of a configuration given as data (e.g. a checkpoint's).
GIVEN_SOURCE = "<config>"


def _default_lr() -> LRScheduleConfig:
    return LRScheduleConfig()


@dataclass(frozen=True)
class StageConfig(Section):
    """A whole training stage. See the module docstring; YAML keys mirror these fields."""

    stage: StageInfo = field(default_factory=StageInfo)
    seed: int = 430
    deterministic: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: PromptMRConfig = field(default_factory=lambda: PromptMRConfig.preset("smartify"))
    classifier_model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr: LRScheduleConfig = field(default_factory=_default_lr)
    mask_aug: MaskAugConfig = field(default_factory=MaskAugConfig)
    p_mask: RampScheduleConfig = field(default_factory=RampScheduleConfig)
    mraugment: MRAugmentConfig = field(default_factory=MRAugmentConfig)
    p_aug: RampScheduleConfig = field(default_factory=RampScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    init_from: str | None = None

    def validate(self) -> None:
        """Check the sections against each other (see :meth:`recon.sections.Section.validate`)."""
        self.require(self.stage.kind == "classifier" or self.data.num_adj_slices == self.model.num_adj_slices,
                     "data.num_adj_slices", f"must equal model.num_adj_slices ({self.model.num_adj_slices})")
        for anatomy in ("brain", "knee"):
            try:
                self.mraugment.schedule_for(anatomy, self.p_aug)
            except FieldError as exc:
                raise FieldError(f"mraugment.{exc.field}", exc.message, exc.value) from None
        name = self.train.select_metric
        if self.stage.kind == "classifier":
            self.require(name in ("auto", "val/accuracy"), "train.select_metric",
                         "must be auto or val/accuracy for the classifier stage")
        else:
            self.require(name != "val/accuracy", "train.select_metric",
                         "val/accuracy is the classifier's; a reconstruction stage selects on an SSIM metric")
            self.require(not name.startswith("val_remasked/") or self.validation.remask.enabled,
                         "train.select_metric", f"{name} needs validation.remask.enabled: true")
        if self.stage.kind == "moe":
            unknown = [e for e in self.moe.experts if e not in EXPERTS]
            self.require(not unknown, "moe.experts",
                         f"must name experts from {', '.join(EXPERTS)} (unknown: {', '.join(unknown)})")

    @property
    def output_dir(self) -> Path:
        """The stage's output folder with ``{stage}`` expanded."""
        return expand_output_dir(self.output.dir, self.stage.name)


def auto_select_metric(cfg: StageConfig) -> str:
    """The metric ``train.select_metric: auto`` stands for, before looking at the data.

    ``val/accuracy`` for the classifier; ``val_remasked/leaderboard`` for a Helper (the masks it is
    trained for are not the public pattern) when re-masking is on; ``val/leaderboard`` otherwise.
    An explicit ``select_metric`` is returned as it is.
    """
    if cfg.train.select_metric != "auto":
        return cfg.train.select_metric
    if cfg.stage.kind == "classifier":
        return "val/accuracy"
    if cfg.stage.family == "helper" and cfg.validation.remask.enabled:
        return "val_remasked/leaderboard"
    return "val/leaderboard"


def expand_output_dir(template: str, stage: str) -> Path:
    """An ``output.dir`` value with ``{stage}`` replaced by the stage name."""
    return Path(template.replace("{stage}", stage))


#: Keys every stage must set in its file (or a file it inherits, or ``--set``): no default stands in.
REQUIRED_KEYS = ("stage.name", "stage.kind")


def _require_stage_keys(raw: dict[str, Any], origin: str) -> None:
    """Refuse a stage whose layers do not set :data:`REQUIRED_KEYS` (an empty file would train the defaults)."""
    stage = raw.get("stage")
    for key in REQUIRED_KEYS:
        name = key.split(".", 1)[1]
        if not isinstance(stage, dict) or stage.get(name) is None:
            raise InputError(f"{origin}: {key} is not set: a stage file must name its stage and kind "
                             "(stage.name, stage.kind) or inherit a file that does")


def _expand_model_preset(data: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """Replace ``model.preset`` by the preset's fields; those not set by a file are sourced to the preset."""
    model = data.get("model")
    if model is None:
        return data
    if not isinstance(model, dict):
        raise InputError(f"{sources.get('model', DEFAULT_SOURCE)}: model: expected a mapping, "
                         f"got {type(model).__name__}")
    model = dict(model)
    preset = model.pop("preset", "smartify")
    if not isinstance(preset, str) or preset not in PRESETS:
        origin = sources.get("model.preset", DEFAULT_SOURCE)
        raise InputError(f"model.preset = {preset!r} (from {origin}): must be one of {', '.join(PRESETS)}")
    base = PromptMRConfig.preset(preset).to_dict()
    for key in base:
        if key not in model:
            sources[f"model.{key}"] = f"model.preset {preset!r}"
    base.update(model)
    data = dict(data)
    data["model"] = base
    return data


#: keys renamed since a configuration was stored in a checkpoint: old dotted key -> new
RENAMED_KEYS = {"mraugment.strength": "mraugment.magnitude"}
#: settings added since, with the value that reproduces what a stage stored without them ran with
ADDED_DEFAULTS = {"classifier.loss": "ce", "classifier.select": "val_accuracy"}


def upgrade_stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A configuration stored by an earlier smartify (a checkpoint's), in today's keys, meaning what it ran.

    Renamed keys (:data:`RENAMED_KEYS`) take their new name; a setting added since (:data:`ADDED_DEFAULTS`)
    takes the value that reproduces the old behaviour, so ``--resume`` of an old checkpoint continues the
    stage as it was trained. A configuration written by this version passes unchanged.

    Args:
        data: the stored, fully resolved configuration (not modified).

    Returns:
        A deep copy in today's keys.
    """
    raw = copy.deepcopy(data)
    for old, new in RENAMED_KEYS.items():
        (osec, okey), (nsec, nkey) = old.split(".", 1), new.split(".", 1)
        section = raw.get(osec)
        if isinstance(section, dict) and okey in section:
            raw.setdefault(nsec, {})[nkey] = section.pop(okey)
    for dotted, value in ADDED_DEFAULTS.items():
        sec, key = dotted.split(".", 1)
        if isinstance(raw.get(sec), dict) and key not in raw[sec]:
            raw[sec][key] = value
    return raw


def load_stage_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: dict[str, Any] | None = None,
) -> tuple[StageConfig, dict[str, Any]]:
    """Load a stage: YAML layers (``inherit``), ``--set`` overrides, model preset, validation.

    Args:
        path: the stage YAML file (or None with ``data``).
        overrides: ``dotted.key=value`` strings.
        data: an already-merged mapping to start from instead of a file.

    Returns:
        The typed configuration and its fully resolved plain form (what checkpoints store).

    Raises:
        InputError: a problem in the files, the overrides or a value (one line naming the key and
            the file, ``--set`` or ``<config>`` that set it); ``stage.name`` or ``stage.kind`` set
            by none of them.
    """
    sources: dict[str, str] = {}
    if data is not None:
        raw = upgrade_stored_config(data)
        record_sources(raw, GIVEN_SOURCE, sources)
    else:
        raw = load_yaml_layers(path, sources=sources)
    raw.pop("inherit", None)
    raw = apply_overrides(raw, parse_overrides(list(overrides)), sources=sources)
    _require_stage_keys(raw, GIVEN_SOURCE if data is not None else str(path))
    raw = _expand_model_preset(raw, sources)
    cfg = from_dict(StageConfig, raw, sources=sources)
    return cfg, to_dict(cfg)
