"""Self-describing checkpoints: one typed record, atomic writes, safe loads, models rebuilt from their config.

A stage writes ``<output.dir>/checkpoints/{last,best}.pt``. In memory a checkpoint is a
:class:`Checkpoint`; on disk it is a plain dictionary (``Checkpoint.to_payload``) that loads with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts only). The dictionary's
keys are the field names of :class:`Checkpoint`, plus::

    format       "smartify.checkpoint/1"

and a reader adds ``path`` (the file it was read from; never stored). Files written before the typed
record existed have the same keys and load unchanged.

Loading never falls back: a file that is missing, not a checkpoint, or whose weights do not fit its
configuration raises :class:`recon.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from recon import __version__
from recon.errors import InputError
from recon.events import RUN_ID_KEY
from recon.io import atomic_path

FORMAT = "smartify.checkpoint/1"
KINDS = ("baseline", "moe", "classifier")
#: Key of the format marker in a checkpoint file.
FORMAT_KEY = "format"
#: Key a reader adds to the dictionary: the file it came from (not stored in the file).
PATH_KEY = "path"
#: Keys every checkpoint file has.
REQUIRED = ("kind", "config", "model_config", "model", "epoch")
UNNAMED = "<checkpoint>"
_VERSIONS = "versions"  # the field filled in on save
#: What best-checkpoint selection used before checkpoints named their metric (by kind; others: val/ssim).
LEGACY_SELECT_METRIC = {"classifier": "val/accuracy"}


def legacy_select_metric(kind: str) -> str:
    """The metric of ``best_metric`` in a file written before ``best_metric_name`` existed."""
    return LEGACY_SELECT_METRIC.get(kind, "val/ssim")


@dataclass(frozen=True, eq=False)  # tensors have no plain equality
class Checkpoint:
    """One checkpoint: what a stage saves after an epoch, and what a reader gets back.

    The field names are the keys of the stored dictionary (in this order).

    Attributes:
        kind: ``baseline``, ``moe`` or ``classifier``.
        stage: stage name, or None.
        family: ``hacker`` / ``helper`` for reconstruction stages (``none`` when unset), None for the
            classifier.
        epoch: last completed epoch (absolute, 0-based).
        config: the fully resolved stage configuration (nested plain data).
        model_config: the network's configuration (``PromptMRConfig.to_dict()``, or the classifier's).
        experts: expert names in order (moe), else empty.
        model: the state dict (moe: one state dict of the ``MixtureOfExperts`` module).
        optimizer: optimizer state dict (one for all experts), or None in exported weights.
        best_metric: best validation score so far (``-inf`` before any), or None when unknown.
        best_epoch: the epoch of ``best_metric``, or None.
        best_metric_name: the metric ``best_metric`` is (the stage's ``train.select_metric`` as
            resolved, e.g. ``val/leaderboard``). Files written before this field: the metric selection
            used then, ``val/ssim`` (``val/accuracy`` for the classifier), see :data:`LEGACY_SELECT_METRIC`.
        metrics: the epoch's metrics.
        rng: the RNG streams (:func:`recon.seeding.capture_rng_state`), or None (exported weights:
            then the key is not written).
        tracking: the callbacks' resume state (e.g. the tracking run id under :data:`RUN_ID_KEY`).
        versions: ``torch`` and ``smartify`` versions that wrote the file; None: filled in on save.
        path: the file the checkpoint was read from (not stored), or None.
    """

    kind: str
    stage: str | None
    family: str | None
    epoch: int
    config: dict[str, Any]
    model_config: dict[str, Any]
    experts: tuple[str, ...]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    best_metric_name: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    tracking: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] | None = None
    path: str | None = None

    @property
    def source(self) -> str:
        """The file name for messages (``<checkpoint>`` when not read from a file)."""
        return self.path or UNNAMED

    @property
    def run_id(self) -> str | None:
        """The tracking run id the checkpoint names, or None."""
        value = self.tracking.get(RUN_ID_KEY)
        return str(value) if value else None

    def exported(self) -> Checkpoint:
        """The same weights without optimizer state and RNG streams (what a registered version keeps)."""
        return replace(self, optimizer=None, rng=None)

    def to_payload(self) -> dict[str, Any]:
        """The dictionary written to disk (see the module docstring).

        Returns:
            Plain data and tensors only; ``format`` and ``versions`` filled in.
        """
        payload: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == PATH_KEY or (f.name == "rng" and value is None):
                continue
            if f.name == _VERSIONS:
                payload[FORMAT_KEY] = FORMAT
                value = value if value is not None else _versions()
            payload[f.name] = list(value) if f.name == "experts" else value
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], path: str | Path | None = None) -> Checkpoint:
        """Read a checkpoint dictionary (today's files and those written before this class).

        Args:
            payload: the stored dictionary (e.g. from :func:`load_checkpoint`).
            path: the file it came from; default: its ``path`` entry, if any.

        Returns:
            The checkpoint; keys missing from older or hand-made files take the field defaults.

        Raises:
            InputError: a required key is missing or ``kind`` is unknown.
        """
        source = str(path) if path is not None else payload.get(PATH_KEY)
        _check_keys(payload, source or UNNAMED)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in payload and f.name != PATH_KEY:
                values[f.name] = payload[f.name]
        values["epoch"] = int(values["epoch"])
        values["experts"] = tuple(values.get("experts") or ())
        values["metrics"] = dict(values.get("metrics") or {})
        values["tracking"] = dict(values.get("tracking") or {})
        values.setdefault("stage", None)
        values.setdefault("family", None)
        if values.get("best_metric_name") is None:
            values["best_metric_name"] = legacy_select_metric(str(values["kind"]))
        return cls(**values, path=source)

    @classmethod
    def load(cls, path: str | Path, which: str = "best", map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load and check a checkpoint file (see :func:`load_checkpoint`).

        Args:
            path: file or stage folder (see :func:`resolve_checkpoint`).
            which: ``best`` or ``last`` for folders.
            map_location: device for the tensors.

        Returns:
            The typed checkpoint, with :attr:`path` set.
        """
        return cls.from_payload(load_checkpoint(path, which, map_location))


def _versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "smartify": __version__}  # TorchVersion is not weights_only-safe


def _check_keys(payload: Mapping[str, Any], source: str) -> None:
    for key in REQUIRED:
        if key not in payload:
            raise InputError(f"{source}: checkpoint lacks key {key!r}")
    if payload["kind"] not in KINDS:
        raise InputError(f"{source}: key 'kind' is {payload['kind']!r}, expected one of {', '.join(KINDS)}")


def save_checkpoint(path: str | Path, checkpoint: Checkpoint | Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically (see :func:`recon.io.atomic_path`).

    Args:
        path: destination file.
        checkpoint: a :class:`Checkpoint`, or a checkpoint dictionary (written as given, with
            ``format`` set and ``versions`` filled in when absent).

    Returns:
        The destination path.
    """
    path = Path(path)
    if isinstance(checkpoint, Checkpoint):
        payload = checkpoint.to_payload()
    else:
        payload = dict(checkpoint)
        payload[FORMAT_KEY] = FORMAT
        payload.setdefault(_VERSIONS, _versions())
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """Resolve a checkpoint file from a file path or a stage folder.

    Args:
        path: a ``.pt`` file, a stage output folder (``<dir>/checkpoints/<which>.pt``) or its
            ``checkpoints`` folder.
        which: ``best`` or ``last`` when ``path`` is a folder.

    Returns:
        The checkpoint file.
    """
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoints" / f"{which}.pt", path / f"{which}.pt"):
        if candidate.is_file():
            return candidate
    raise InputError(f"{path}: no checkpoint found (expected a .pt file or a folder with checkpoints/{which}.pt)")


def load_checkpoint(path: str | Path, which: str = "best", map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint with ``weights_only=True`` (no pickled code runs).

    Args:
        path: file or stage folder (see :func:`resolve_checkpoint`).
        which: ``best`` or ``last`` for folders.
        map_location: device for the tensors.

    Returns:
        The stored dictionary as it is in the file, with ``"path"`` added (:meth:`Checkpoint.load`
        gives the typed record).
    """
    file = resolve_checkpoint(path, which)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise _refusal(file, exc) from None
    if not isinstance(payload, dict) or payload.get(FORMAT_KEY) != FORMAT:
        raise InputError(f"{file}: not a smartify checkpoint (key 'format' is not {FORMAT!r})")
    _check_keys(payload, str(file))
    payload[PATH_KEY] = str(file)
    return payload


def _refusal(file: Path, exc: Exception) -> InputError:
    """One line for a file ``torch.load(weights_only=True)`` would not read.

    torch's own message advises retrying with ``weights_only=False`` (which runs any code the file
    holds) or allowlisting the class; neither is repeated: the line says why the file is refused.
    """
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return InputError(f"{file}: refused: it holds pickled code (a reference to {found.group(1)}), not only "
                          "tensors and plain data; smartify never loads such a file")
    if "Weights only load failed" in text:
        stop = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = stop.group(1).strip() if stop else type(exc).__name__
        return InputError(f"{file}: refused: not only tensors and plain data (the safe unpickler stopped at: "
                          f"{detail[:200]}); smartify never loads such a file")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return InputError(f"{file}: cannot be read as a smartify checkpoint ({first})")


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, turning any mismatch into one clear line.

    Args:
        module: the freshly built module.
        state: the weights.
        source: file name for the message.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise InputError(f"{source}: configuration does not match the weights: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def build_model(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the module a checkpoint describes and load its weights (strict, no fallback).

    Args:
        checkpoint: a loaded checkpoint.

    Returns:
        ``PromptMR`` (baseline), ``MixtureOfExperts`` (moe) or ``SliceClassifier`` (classifier), in
        eval mode on the CPU.
    """
    source, kind = checkpoint.source, checkpoint.kind
    try:
        if kind == "classifier":
            from recon.models.classifier import ClassifierConfig, SliceClassifier

            module: nn.Module = SliceClassifier(ClassifierConfig.from_dict(checkpoint.model_config))
        else:
            from recon.models.experts import MixtureOfExperts
            from recon.models.config import PromptMRConfig
            from recon.models.promptmr import PromptMR

            cfg = PromptMRConfig.from_dict(checkpoint.model_config)
            module = MixtureOfExperts(cfg, checkpoint.experts) if kind == "moe" else PromptMR(cfg)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: key 'model_config' is not a valid {kind} configuration ({exc})") from exc
    load_state_strict(module, checkpoint.model, source)
    return module.eval()
