"""The files of a registered version, written from a stage checkpoint, and the hashes that identify them.

A version's files are artifacts of the stage's MLflow run, under
``registry/<name>/<stage>-e<epoch>-<digest12>/`` (:func:`export_version_files`)::

    weights.pt           a smartify checkpoint stripped to weights + configs: no optimizer, no RNG
    config.yaml          the resolved stage configuration (for people; weights.pt carries it too)
    model_config.json    the network configuration
    smartify-model.json  format, kind, stage, epoch, experts, score, sha256 of weights.pt, loader

:func:`weights_digest` hashes the tensors themselves (independent of the file format), :func:`file_sha256`
the file; the first makes registration idempotent, the second lets the loader (:mod:`tracking.registry.loader`)
refuse a corrupt copy. :func:`validation_score` and :func:`validation_protocol` read what the weights scored,
and on what, from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from recon.engine.checkpoint import Checkpoint, legacy_select_metric, save_checkpoint
from recon.engine.stage import RemaskConfig
from recon.sections import from_dict

ARTIFACT_FORMAT = "smartify.registered/1"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"
DESCRIPTION_FILE = "smartify-model.json"


def validation_score(checkpoint: Checkpoint) -> tuple[str, float | None]:
    """The validation score of exactly these weights, on the metric the stage selected with.

    The metric is the checkpoint's ``best_metric_name`` (``val/leaderboard``,
    ``val_remasked/leaderboard``...; files from before it: ``val/ssim``, the classifier's
    ``val/accuracy``). The score is ``best_metric`` when the checkpoint is the best epoch
    (``best.pt``); otherwise the epoch's own value of that metric from ``metrics`` (a ``last.pt``
    whose epoch was not the best).

    Args:
        checkpoint: a loaded checkpoint.

    Returns:
        ``(metric, score)``; score None when unknown.
    """
    metric = checkpoint.best_metric_name or legacy_select_metric(checkpoint.kind)
    best, best_epoch = checkpoint.best_metric, checkpoint.best_epoch
    if best is not None and (best_epoch is None or int(best_epoch) == checkpoint.epoch):
        value = float(best)
        return metric, value if value > float("-inf") else None
    own = checkpoint.metrics.get(metric)
    return metric, float(own) if own is not None else None


def validation_protocol(checkpoint: Checkpoint) -> str:
    """What the validation score was computed on, beyond the data itself.

    Args:
        checkpoint: a loaded checkpoint.

    Returns:
        e.g. ``split=val;max_slices=None;trained_on_val=False;remask=equispaced+random@2025/cf0.08``
        (``remask=off`` for a stage without re-masked validation, or from before it existed); the
        classifier: its own ``val_split``.
    """
    config = checkpoint.config or {}
    data = config.get("data") or {}
    if checkpoint.kind == "classifier":
        split = (config.get("classifier") or {}).get("val_split", data.get("val_split"))
        return f"split={split}"
    # a stage that trained on its validation split (use_val_for_final) has a score that is not comparable
    trained_on_val = bool(data.get("use_val_for_final", False))
    remask = (config.get("validation") or {}).get("remask")
    protocol = from_dict(RemaskConfig, remask, "validation.remask").protocol() if remask is not None else "off"
    return (f"split={data.get('val_split')};max_slices={data.get('max_val_slices')};"
            f"trained_on_val={trained_on_val};remask={protocol}")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and values; independent of file format).

    Args:
        state: the weights.

    Returns:
        sha256 hex digest.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{state[key].dtype}|{tuple(state[key].shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_version_files(checkpoint: Checkpoint, folder: str | Path) -> dict[str, Any]:
    """Write the files of a registered version (see module docstring) into ``folder``.

    Args:
        checkpoint: a loaded checkpoint (its optimizer state and RNG streams are not kept).
        folder: destination (created).

    Returns:
        The description written to ``smartify-model.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = save_checkpoint(folder / WEIGHTS_FILE, checkpoint.exported())
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(checkpoint.config, sort_keys=False))
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(checkpoint.model_config, indent=2, default=list) + "\n")
    metric, score = validation_score(checkpoint)
    description = {
        "format": ARTIFACT_FORMAT,
        "loader": "tracking.registry.loader.load_version (torch.load weights_only=True, "
                  "recon.engine.checkpoint.build_model)",
        "kind": checkpoint.kind, "stage": checkpoint.stage, "family": checkpoint.family,
        "epoch": checkpoint.epoch, "experts": list(checkpoint.experts),
        "val_metric": metric, "val_score": score,
        "weights_file": WEIGHTS_FILE, "weights_sha256": file_sha256(weights),
        "weights_digest": weights_digest(checkpoint.model),
        "versions": dict(checkpoint.versions or {}),
    }
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description
