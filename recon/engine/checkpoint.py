"""Self-describing checkpoints: atomic writes, safe loads, models rebuilt from their own config.

A stage writes ``<output.dir>/checkpoints/{last,best}.pt``. Every file is a plain dictionary that
loads with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts only)::

    format       "smartify.checkpoint/1"
    kind         "baseline" | "moe" | "classifier"
    stage        stage name;   family: "hacker" | "helper" | None
    epoch        last completed epoch (absolute, 0-based)
    config       the fully resolved stage configuration (nested dict)
    model_config the network's configuration (PromptMRConfig.to_dict(), or the classifier's)
    experts      expert names in order (moe), else []
    model        the state dict (moe: one state dict of the MixtureOfExperts module)
    optimizer    optimizer state dict (one for all experts), or None in exported weights
    best_metric, best_epoch, metrics (the epoch's metrics), rng (RNG streams), tracking (e.g. the
    MLflow run id), versions (torch, smartify)

Loading never falls back: a file that is missing, not a checkpoint, or whose weights do not fit its
configuration raises :class:`recon.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recon import __version__
from recon.errors import InputError
from recon.io import atomic_path

FORMAT = "smartify.checkpoint/1"
KINDS = ("baseline", "moe", "classifier")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (see :func:`recon.io.atomic_path`).

    Args:
        path: destination file.
        payload: the checkpoint dictionary (see module docstring); ``format`` and ``versions``
            are filled in.

    Returns:
        The destination path.
    """
    path = Path(path)
    payload = dict(payload)
    payload["format"] = FORMAT
    payload.setdefault("versions", {"torch": str(torch.__version__), "smartify": __version__})  # TorchVersion is not weights_only-safe
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
        The checkpoint dictionary, with ``"path"`` added.
    """
    file = resolve_checkpoint(path, which)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise _refusal(file, exc) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{file}: not a smartify checkpoint (key 'format' is not {FORMAT!r})")
    for key in ("kind", "config", "model_config", "model", "epoch"):
        if key not in payload:
            raise InputError(f"{file}: checkpoint lacks key {key!r}")
    if payload["kind"] not in KINDS:
        raise InputError(f"{file}: key 'kind' is {payload['kind']!r}, expected one of {', '.join(KINDS)}")
    payload["path"] = str(file)
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


def build_model(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the module a checkpoint describes and load its weights (strict, no fallback).

    Args:
        payload: a dictionary from :func:`load_checkpoint`.

    Returns:
        ``PromptMR`` (baseline), ``MixtureOfExperts`` (moe) or ``SliceClassifier`` (classifier), in
        eval mode on the CPU.
    """
    source = payload.get("path", "<checkpoint>")
    kind = payload["kind"]
    try:
        if kind == "classifier":
            from recon.models.classifier import ClassifierConfig, SliceClassifier

            module: nn.Module = SliceClassifier(ClassifierConfig.from_dict(payload["model_config"]))
        else:
            from recon.models.experts import MixtureOfExperts
            from recon.models.config import PromptMRConfig
            from recon.models.promptmr import PromptMR

            cfg = PromptMRConfig.from_dict(payload["model_config"])
            module = MixtureOfExperts(cfg, payload.get("experts") or ()) if kind == "moe" else PromptMR(cfg)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: key 'model_config' is not a valid {kind} configuration ({exc})") from exc
    load_state_strict(module, payload["model"], source)
    return module.eval()
