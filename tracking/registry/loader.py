"""Loading a registered version safely: download, check the file hash, ``weights_only=True``, rebuild.

Why state dicts read by our own loader, and not MLflow's pytorch flavour or a pyfunc model:
``mlflow.pytorch.log_model`` pickles the whole ``nn.Module`` by default, so loading needs
``torch.load(weights_only=False)`` (arbitrary code runs) and the class at the same import path
(the ``ModuleNotFoundError`` of mlflow #9514 / #832). A "models from code" pyfunc avoids the pickle
but executes a Python file stored in the artifact store at load time, and its ``predict``
(DataFrame / ndarray in, out) does not fit k-space batches with masks and expert routing. Here a
version is only tensors and plain data (:mod:`tracking.registry.artifact`); :func:`load_version` downloads
it, checks the file hash against the version tag, loads it with ``torch.load(weights_only=True)`` and rebuilds
the module from its configuration with :func:`recon.engine.checkpoint.build_model` (strict: a configuration
that does not fit the weights is an error, never a fresh model). The cost: no ``mlflow models serve``; the
loader is this checkout's code, whose version is recorded in ``smartify-model.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recon.engine.checkpoint import PATH_KEY, Checkpoint, build_model, load_checkpoint
from recon.errors import InputError
from tracking.registry.artifact import WEIGHTS_FILE, file_sha256
from tracking.registry.client import guarded, registry_client
from tracking.registry.versions import ModelVersionInfo, get_version_info
from tracking.runs.stores import Stores, resolve_stores

log = logging.getLogger(__name__)


def download_version(info: ModelVersionInfo, dst: str | Path, stores: Stores | None = None) -> Path:
    """Download a version's files into ``dst`` and check ``weights.pt`` against the version's tag.

    Args:
        info: the version.
        dst: an existing, empty folder.
        stores: tracking stores (default: resolved).

    Returns:
        The folder that holds ``weights.pt``.
    """
    import mlflow

    stores = stores or resolve_stores()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # the storage location: a version registered from models:/<model_id> names its logged model's artifacts
    location = registry_client(stores).get_model_version_download_uri(info.name, str(info.version))
    local = Path(guarded(stores, mlflow.artifacts.download_artifacts,
                         artifact_uri=location, dst_path=str(dst), tracking_uri=stores.tracking_uri))
    weights = local / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"{info.uri}: {info.source} has no {WEIGHTS_FILE} (not a smartify registered version)")
    expected = info.tags.get("weights_sha256")
    if expected and file_sha256(weights) != expected:
        raise InputError(f"{info.uri}: {WEIGHTS_FILE} does not match the version's weights_sha256 tag (corrupt copy?)")
    return local


def load_version(
    uri_or_name: str,
    version: int | str | None = None,
    alias: str | None = None,
    stores: Stores | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a registered version: download, verify, ``weights_only=True`` load, rebuild from config.

    Args:
        uri_or_name: ``models:/name@alias``, ``models:/name/3`` or a name (with version or alias).
        version: with a name.
        alias: with a name.
        stores: tracking stores (default: resolved).
        map_location: device for the tensors.

    Returns:
        ``(module, payload)``: the module in eval mode on the CPU (``PromptMR``,
        ``MixtureOfExperts`` or ``SliceClassifier``) and the checkpoint dictionary, with
        ``payload["registry"]`` = :meth:`ModelVersionInfo.to_dict` and ``payload["path"]`` = the URI.
    """
    stores = stores or resolve_stores()
    info = get_version_info(uri_or_name, version, alias, stores)
    tmp = tempfile.mkdtemp(prefix="smartify-model-")
    try:
        local = download_version(info, tmp, stores)
        payload = load_checkpoint(local / WEIGHTS_FILE, map_location=map_location)
        payload[PATH_KEY] = info.uri
        module = build_model(Checkpoint.from_payload(payload))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload["registry"] = info.to_dict()
    log.info("loaded %s (%s, stage %s, epoch %s)", info.uri, info.kind, info.stage, info.epoch)
    return module, payload
