"""Registered versions as standard MLflow models: the pyfunc flavour, loaded by smartify's own code.

A registered version's folder holds smartify's files (:mod:`tracking.registry.artifact`) and, next to
them, an ``MLmodel`` whose pyfunc flavour names this module as its ``loader_module`` and no ``data``
entry, so MLflow calls :func:`_load_pyfunc` with the folder itself. Nothing executable is stored:
the code is the installed ``smartify`` package; the loader checks ``weights.pt`` against the
sha256 in ``smartify-model.json``, reads it with ``torch.load(weights_only=True)`` and rebuilds the
network from its configuration, as :func:`tracking.registry.loader.load_version` does.

Layouts (the signature; MLflow refuses other dtypes and ranks):

* Hacker / Helper, inputs ``kspace: float32 (S, C, H, W, 2)`` (consecutive slices of one volume,
  multi-coil k-space with real and imaginary parts last, unmasked or masked) and
  ``mask: float32 (W,)`` (the file's column mask, 0/1); params ``anatomy`` (``brain`` or
  ``knee``; required by a mixture of experts, which runs the expert ``{anatomy}_acc{acc}``, the
  acceleration read from the mask), ``crop`` (output size, default 384) and ``batch_size``
  (slices per forward pass, default 4). Output ``float32 (S, crop, crop)``: the magnitude images,
  centre-cropped, exactly as ``smartify reconstruct`` computes them (k-space times the mask,
  ACS width detected from the mask, neighbours of a slice taken from the request and clamped at
  its edges as within a file).
* Classifier, input ``image: float32 (S, H, W)`` (``image_grappa`` slices of one file); outputs
  ``logits: float32 (2,)``, summed over the slices ([brain, knee]), and ``anatomy: str (1,)``, their
  argmax: the file's decision, as ``smartify reconstruct`` makes it (:func:`recon.models.classifier.classify_volume`).

:func:`write_model_files` writes the ``MLmodel`` (signature, input example, requirements) into a
folder; :func:`log_version_model` makes an MLflow 3 logged model of a checkpoint, linked to its
run, that :func:`tracking.registry.versions.register_stage` registers. The load-time
``model_config`` key ``device`` (default ``cpu``) places the network.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.engine.checkpoint import Checkpoint, build_model
from recon.errors import InputError
from recon.fft import center_crop
from recon.inference.systems import ReconBatch, ReconSystem, adjacent_slices
from recon.data.names import expert_name
from recon.masks import infer_acc, public_mask
from tracking.registry.artifact import DESCRIPTION_FILE, WEIGHTS_FILE, export_version_files, file_sha256

log = logging.getLogger(__name__)

LOADER_MODULE = "tracking.registry.pyfunc"
MLMODEL_FILE = "MLmodel"
DEFAULT_CROP = 384
DEFAULT_BATCH = 4
ANATOMIES = ("brain", "knee")
#: Size of the input example (a valid, small request: 2 coils, 32 x 32 k-space, the public acc4 mask).
_EXAMPLE_SHAPE = (1, 2, 32, 32)


# --------------------------------------------------------------------------- signature and example
def signature(kind: str) -> Any:
    """The MLflow signature of a version of this kind.

    Args:
        kind: ``baseline``, ``moe`` or ``classifier``.

    Returns:
        A ``mlflow.models.ModelSignature`` with tensor specs (and params for reconstruction).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    f32 = np.dtype(np.float32)
    if kind == "classifier":
        return ModelSignature(
            inputs=Schema([TensorSpec(f32, (-1, -1, -1), "image")]),
            outputs=Schema([TensorSpec(f32, (2,), "logits"), TensorSpec(np.dtype(str), (1,), "anatomy")]),
        )
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, -1, -1, -1, 2), "kspace"), TensorSpec(f32, (-1,), "mask")]),
        outputs=Schema([TensorSpec(f32, (-1, -1, -1), "reconstruction")]),
        params=ParamSchema([ParamSpec("anatomy", "string", ""), ParamSpec("crop", "long", DEFAULT_CROP),
                            ParamSpec("batch_size", "long", DEFAULT_BATCH)]),
    )


def input_example(kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | dict[str, np.ndarray]:
    """A small request the model answers (random k-space, fixed seed), for the model page and tests.

    Args:
        kind: ``baseline``, ``moe`` or ``classifier``.

    Returns:
        ``(inputs, params)`` for reconstruction, ``inputs`` for the classifier.
    """
    rng = np.random.default_rng(0)
    s, c, h, w = _EXAMPLE_SHAPE
    if kind == "classifier":
        return {"image": rng.random((s, h, w), dtype=np.float32)}
    kspace = (rng.standard_normal((s, c, h, w, 2)) * 1e-3).astype(np.float32)
    params = {"anatomy": "brain", "crop": h, "batch_size": 1}
    return {"kspace": kspace, "mask": public_mask(w, 4).astype(np.float32)}, params


def _requirements() -> list[str]:
    from importlib import metadata

    out = []
    for name in ("smartify", "torch", "mlflow"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def write_model_files(folder: str | Path, kind: str, weights_sha256: str, model: Any | None = None) -> None:
    """Write ``MLmodel`` (pyfunc flavour, loader :data:`LOADER_MODULE`), requirements and the input example.

    Args:
        folder: a folder that does not exist yet (MLflow creates it); smartify's files go next.
        kind: the checkpoint's kind (picks the signature).
        weights_sha256: recorded in the ``MLmodel`` metadata.
        model: an ``mlflow.models.Model`` carrying the logged model's ids, or None.
    """
    import mlflow

    mlflow.pyfunc.save_model(
        path=str(folder), loader_module=LOADER_MODULE, signature=signature(kind), input_example=input_example(kind),
        pip_requirements=_requirements(), mlflow_model=model,
        metadata={"smartify.format": "smartify.registered/1", "smartify.weights_sha256": weights_sha256,
                  "smartify.kind": kind},
    )


def log_version_model(client: Any, checkpoint: Checkpoint, run_id: str, name: str) -> tuple[str, str, dict[str, Any]]:
    """Log a checkpoint as an MLflow 3 logged model of ``run_id``: smartify's files plus the ``MLmodel``.

    Args:
        client: an ``MlflowClient`` of the store.
        checkpoint: the loaded checkpoint.
        run_id: the run the model comes from (its experiment holds the model).
        name: the logged model's name (the registered name).

    Returns:
        ``(model_id, artifact_location, description)``: the finalized model and the contents of
        ``smartify-model.json``.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, model_type=checkpoint.kind,
        params={"stage": str(checkpoint.stage), "epoch": str(checkpoint.epoch), "kind": checkpoint.kind},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="smartify-pyfunc-") as tmp:
            folder = Path(tmp) / "model"
            description = export_version_files(checkpoint, Path(tmp) / "files")
            meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                         model_id=logged.model_id)
            write_model_files(folder, checkpoint.kind, description["weights_sha256"], meta)
            for path in (Path(tmp) / "files").iterdir():
                path.rename(folder / path.name)
            client.log_model_artifacts(logged.model_id, str(folder))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(checkpoint.epoch))])
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id, logged.artifact_location, description


def register_logged_model(
    client: Any, name: str, model_id: str, run_id: str, tags: dict[str, str], description: str
) -> Any:
    """Register a logged model as a new version of ``name`` and link the two both ways.

    The version's source is ``models:/<model_id>`` (MLflow resolves it to the model's artifacts);
    the model gets the ``mlflow.modelVersions`` tag, as ``mlflow.register_model`` leaves it.

    Args:
        client: an ``MlflowClient`` of the store.
        name: registered model name (exists).
        model_id: the logged model.
        run_id: the training run.
        tags: tags of the version.
        description: its description.

    Returns:
        The ``ModelVersion``.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    # the sqlite registry store looks the logged model up through the global tracking URI
    with _use_tracking_uri(client.tracking_uri):
        mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                         description=description, model_id=model_id)
    entry = {"name": name, "version": str(mv.version)}
    known = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if entry not in known:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(known + [entry])})
    return mv


def upgrade_version(info: Any, stores: Any) -> str:
    """Add the ``MLmodel`` (and requirements, input example) to a version registered before pyfunc models.

    The version's files stay as they are (MLflow cannot repoint a version); the ``MLmodel`` goes into
    the same folder of its run, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` find it.
    ``weights.pt`` is checked against the version's ``weights_sha256`` tag and read with
    ``weights_only=True`` first.

    Args:
        info: the version (:class:`tracking.registry.versions.ModelVersionInfo`).
        stores: its tracking stores.

    Returns:
        What was done, one line.
    """
    from tracking.registry.loader import download_version
    from tracking.runs.stores import make_client

    client = make_client(stores)
    if info.source.startswith("models:/"):
        return f"{info.uri}: already an MLflow model ({info.source})"
    run_uri = client.get_run(info.run_id).info.artifact_uri.rstrip("/") if info.run_id else ""
    if not run_uri or not info.source.startswith(run_uri + "/"):
        raise InputError(f"{info.uri}: source {info.source} is not inside its run's artifacts; re-register instead")
    with tempfile.TemporaryDirectory(prefix="smartify-upgrade-") as tmp:
        local = download_version(info, tmp, stores)
        if (local / MLMODEL_FILE).is_file():
            return f"{info.uri}: already has an {MLMODEL_FILE}"
        checkpoint = Checkpoint.load(local / WEIGHTS_FILE)
        build_model(checkpoint)
        folder = Path(tmp) / "mlmodel"
        write_model_files(folder, checkpoint.kind, file_sha256(local / WEIGHTS_FILE))
        client.log_artifacts(info.run_id, str(folder), info.source[len(run_uri) + 1:])
    return f"{info.uri}: added {MLMODEL_FILE} (pyfunc, loader {LOADER_MODULE}) to {info.source}"


# --------------------------------------------------------------------------- loading (called by MLflow)
def _checked_checkpoint(folder: Path) -> Checkpoint:
    """``weights.pt`` of a version folder, hash-checked and read with ``weights_only=True``."""
    weights, described = folder / WEIGHTS_FILE, folder / DESCRIPTION_FILE
    if not weights.is_file() or not described.is_file():
        raise InputError(f"{folder}: no {WEIGHTS_FILE} and {DESCRIPTION_FILE} (not a smartify registered model)")
    expected = json.loads(described.read_text()).get("weights_sha256")
    if not expected or file_sha256(weights) != expected:
        raise InputError(f"{weights}: does not match weights_sha256 in {DESCRIPTION_FILE} (corrupt or altered copy)")
    return Checkpoint.load(weights)  # torch.load(weights_only=True): pickled code is refused


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> "ReconModel | ClassifierModel":
    """MLflow's entry point: the model in ``data_path`` (the version folder), ready to predict.

    Args:
        data_path: the downloaded version folder.
        model_config: optional ``{"device": "cuda"}``.

    Returns:
        A :class:`ReconModel` or :class:`ClassifierModel`.
    """
    folder = Path(data_path)
    device = torch.device(str((model_config or {}).get("device", "cpu")))
    checkpoint = _checked_checkpoint(folder)
    module = build_model(checkpoint)
    label = f"{checkpoint.stage} epoch {checkpoint.epoch}"
    if checkpoint.kind == "classifier":
        return ClassifierModel(module.to(device).eval(), label)
    system = ReconSystem(module, adjacent_slices(checkpoint), str(checkpoint.family or "system"), label,
                         checkpoint.epoch)
    return ReconModel(system.to(device))


def _param(params: dict[str, Any] | None, key: str, default: Any) -> Any:
    value = (params or {}).get(key, default)
    return default if value is None else value


class ReconModel:
    """A Hacker or Helper system behind MLflow's ``predict`` (layouts in the module docstring).

    Args:
        system: the loaded system.
    """

    def __init__(self, system: ReconSystem) -> None:
        self.system = system

    def _expert(self, anatomy: str, mask: np.ndarray) -> str:
        acc = infer_acc(mask)
        if self.system.is_moe:
            if anatomy not in ANATOMIES:
                raise InputError(f"{self.system.source}: param 'anatomy' must be brain or knee for a mixture of "
                                 f"experts ({', '.join(self.system.experts or ())}), got {anatomy!r}")
            expert = expert_name(anatomy, acc)
            self.system.check_expert(expert)
            return expert
        if anatomy and anatomy not in ANATOMIES:
            raise InputError(f"param 'anatomy' must be brain, knee or empty, got {anatomy!r}")
        return expert_name(anatomy or "brain", acc)  # a single model ignores the expert name

    def predict(self, model_input: dict[str, np.ndarray], params: dict[str, Any] | None = None) -> np.ndarray:
        """Reconstruct the slices of one request.

        Args:
            model_input: ``kspace`` float32 ``(S, C, H, W, 2)`` and ``mask`` float32 ``(W,)``.
            params: ``anatomy``, ``crop``, ``batch_size`` (see the module docstring).

        Returns:
            float32 ``(S, crop, crop)``.
        """
        if not isinstance(model_input, dict) or set(model_input) != {"kspace", "mask"}:
            got = sorted(model_input) if isinstance(model_input, dict) else type(model_input).__name__
            raise InputError(f"inputs must be 'kspace' (S, C, H, W, 2) and 'mask' (W,), got {got}")
        raw = np.asarray(model_input["kspace"], dtype=np.float32)
        mask = np.asarray(model_input["mask"], dtype=np.float32)
        if raw.ndim != 5 or raw.shape[-1] != 2 or mask.ndim != 1 or mask.shape[0] != raw.shape[3]:
            raise InputError(f"kspace must be (S, C, H, W, 2) and mask (W,) with the same W; got {raw.shape} and "
                             f"{mask.shape}")
        if not (np.all(np.isfinite(raw)) and np.isin(mask, (0.0, 1.0)).all()):
            raise InputError("kspace must be finite and mask 0/1")
        crop, batch = int(_param(params, "crop", DEFAULT_CROP)), int(_param(params, "batch_size", DEFAULT_BATCH))
        if crop < 1 or batch < 1:
            raise InputError(f"params crop and batch_size must be >= 1, got {crop} and {batch}")
        expert = self._expert(str(_param(params, "anatomy", "")), mask)
        device = self.system.device
        kspace = torch.view_as_complex(torch.from_numpy(np.ascontiguousarray(raw)))
        m = torch.from_numpy(mask)
        num, half = kspace.shape[0], self.system.num_adj_slices // 2
        out = np.zeros((num, crop, crop), dtype=np.float32)
        for start in range(0, num, batch):
            rows = range(start, min(start + batch, num))
            windows = [[min(max(i + d, 0), num - 1) for d in range(-half, half + 1)] for i in rows]
            block = torch.stack([kspace[w] for w in windows]).to(device)
            masks = m.expand(len(windows), -1).contiguous().to(device)
            masked = block * masks[:, None, None, None, :].to(block.dtype)
            nlf = torch.full((len(windows),), -1, dtype=torch.long, device=device)
            image = self.system.reconstruct(ReconBatch(masked, masks, nlf), expert)
            out[start:start + len(windows)] = center_crop(image.float(), crop, crop).cpu().numpy()
        return out


class ClassifierModel:
    """The brain/knee slice classifier behind MLflow's ``predict``.

    Args:
        module: the ``SliceClassifier`` in eval mode.
        source: a label for messages.
    """

    def __init__(self, module: torch.nn.Module, source: str) -> None:
        self.module = module
        self.source = source

    @torch.no_grad()
    def predict(self, model_input: dict[str, np.ndarray], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Classify the slices of one file.

        Args:
            model_input: ``image`` float32 ``(S, H, W)``.
            params: unused.

        Returns:
            ``{"logits": float32 (2,), "anatomy": array([decision])}``: the logits summed over the
            slices ([brain, knee]) and their argmax, as ``smartify reconstruct`` decides a file.
        """
        from recon.models.classifier import classify_volume

        image = np.asarray(model_input["image"] if isinstance(model_input, dict) else model_input, np.float32)
        if image.ndim != 3 or image.shape[0] < 1 or not np.all(np.isfinite(image)):
            raise InputError(f"image must be finite float32 (S, H, W) with S >= 1, got shape {image.shape}")
        device = next(self.module.parameters()).device
        anatomy, logits = classify_volume(self.module, torch.from_numpy(image)[:, None].to(device))
        return {"logits": logits.numpy().astype(np.float32), "anatomy": np.array([anatomy])}
