"""What a stage run records as params and datasets: the flattened configuration it uses, MLflow-safe names
and values, and its training/validation data as dataset inputs.

The stage's resolved configuration is the one source: :func:`stage_params` drops the sections a stage of its
kind never reads and ``None`` values (``config.yaml`` keeps everything); :func:`stage_datasets` names the data
by the fingerprints the engine computed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from recon.config import flatten
from recon.events import StageStart

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_KEY = 250  # MLflow's limit on a param, tag or metric name
#: config sections a stage kind never reads (their params would only be noise); config.yaml keeps everything
UNUSED_SECTIONS = {
    "baseline": ("classifier", "classifier_model"),
    "moe": ("classifier", "classifier_model"),
    "classifier": ("model", "mask_aug", "p_mask", "mraugment", "p_aug", "loss", "moe"),
}
#: config keys logged otherwise than as a param (the description is the run's description)
NOT_PARAMS = ("stage.description",)
MAX_DIGEST = 36  # MLflow's limit on a dataset digest


def stage_params(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The flattened configuration a stage of ``kind`` uses: no unused section, no ``None`` value.

    Args:
        kind: ``baseline``, ``moe`` or ``classifier`` (another kind keeps every section).
        config: the resolved configuration (nested).

    Returns:
        Dotted key -> value.
    """
    unused = UNUSED_SECTIONS.get(kind, ())
    return {k: v for k, v in flatten(config).items()
            if v is not None and k.split(".", 1)[0] not in unused and k not in NOT_PARAMS}


def stage_datasets(event: StageStart) -> list[dict[str, str]]:
    """The training and validation data of a stage as MLflow dataset inputs (see ``TrackingWriter.log_inputs``).

    The digests are the stage's data fingerprints (``data.fingerprint``, ``data.val_fingerprint``), cut to
    MLflow's 36 characters; the training digest is the one of the training files alone when the engine gives
    it (``train_digest``), else the fingerprint of all data the stage reads.
    """
    data = event.config.get("data") or {}
    root = Path(str(data.get("root") or event.data_root))
    fp = event.data_fingerprint
    out = []
    train_splits = [str(s) for s in data.get("train_splits") or []]
    train_digest = fp.get("train_digest") or fp.get("digest")
    if train_digest:
        profile = {k: fp[k] for k in ("n_files", "n_slices", "bytes") if k in fp}
        profile["covers"] = "training splits" if fp.get("train_digest") else "all data the stage reads"
        source = root / train_splits[0] if len(train_splits) == 1 else root
        out.append({"name": "+".join(train_splits) or root.name, "digest": str(train_digest)[:MAX_DIGEST],
                    "source_type": "local", "source": json.dumps({"uri": str(source)}),
                    "profile": json.dumps({**profile, "splits": train_splits}), "context": "training"})
    val_split = data.get("val_split")
    if fp.get("val_digest") and val_split:
        out.append({"name": str(val_split), "digest": str(fp["val_digest"])[:MAX_DIGEST], "source_type": "local",
                    "source": json.dumps({"uri": str(root / str(val_split))}), "profile": None,
                    "context": "validation"})
    return out


def mlflow_key(name: str) -> str:
    """A valid MLflow param/metric/tag name: allowed characters only, a clean relative path, <= 250 chars."""
    cleaned = re.sub(r"[^/\w.\- :]", "_", str(name))
    parts = [("_" if p in (".", "..") else p) for p in cleaned.split("/") if p]
    return ("/".join(parts) or "_")[:MAX_KEY]


def param_value(value: Any) -> tuple[str, bool]:
    """A param's text (lists and dicts as compact JSON) and whether it had to be truncated."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str) \
        if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) <= MAX_PARAM_VALUE:
        return text, False
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    marker = f"...[truncated {len(text)} chars, sha256 {digest}; see config.yaml]"
    return text[: MAX_PARAM_VALUE - len(marker)] + marker, True
