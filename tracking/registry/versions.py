"""The model registry: a stage's best weights as a version of ``smartify-{hacker,helper,classifier}``.

Registered names: a Hacker stage (``family: hacker``, baseline or MoE) becomes a version of
``smartify-hacker``, a Helper stage one of ``smartify-helper``, the slice classifier one of
``smartify-classifier``. A version of a reconstruction model holds either one PromptMR+ (baseline)
or the four experts (MoE) in a single state dict; its files are :mod:`tracking.registry.artifact`, and
:mod:`tracking.registry.loader` loads them back.

This module registers a checkpoint (:func:`register_stage`) and reads versions back as
:class:`ModelVersionInfo` (:func:`get_version_info`, :func:`list_versions`). Tags on a model version:
``val_metric`` (the metric the stage selected its best checkpoint on: ``val/leaderboard``,
``val_remasked/leaderboard``, ``val/accuracy``...; versions registered before: ``ssim`` | ``accuracy``), ``val_score``,
``data_fingerprint`` (digest of the validation split, from the run's ``data.val_fingerprint`` param, or of
all its data, ``data.fingerprint``, for runs that lack it),
``val_protocol`` (validation split, slice cap, whether the stage trained on it, the re-masking protocol), ``stage``,
``kind``, ``family``, ``epoch``, ``experts``, ``weights_digest`` (content hash of the tensors),
``weights_sha256`` (file hash), ``checkpoint`` (the file registered).

Registration is idempotent per training run: the same weights (same ``weights_digest``) from the
same training run (tag ``training_run``, the checkpoint's MLflow run id, or ``none``) return the
version already registered instead of a duplicate; a re-run that happens to reproduce the weights
bit for bit is a new run, hence a new version with its own lineage. The artifact folder name
contains the digest, so a later, better ``best.pt`` of the same stage never overwrites the files of
an earlier version.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recon.engine.checkpoint import Checkpoint, build_model
from recon.errors import InputError
from recon.io import safe_component
from tracking.registry.artifact import validation_protocol, validation_score, weights_digest
from tracking.registry.client import registry_client
from tracking.registry.pyfunc import log_version_model, register_logged_model
from tracking.runs.stores import Stores, get_or_create_experiment, redact_uri, resolve_stores

log = logging.getLogger(__name__)

#: Registered model name per stage family (the classifier has no family).
NAMES = {"hacker": "smartify-hacker", "helper": "smartify-helper", "classifier": "smartify-classifier"}
DESCRIPTIONS = {
    "smartify-hacker": "Hacker system: PromptMR+ (one model or four experts) for slices whose mask is the "
    "public equispaced pattern.",
    "smartify-helper": "Helper system: PromptMR+ (one model or four experts) for every other mask.",
    "smartify-classifier": "Brain/knee slice classifier that picks the expert of each file.",
}
#: Params of a stage run holding data fingerprint digests (written by tracking.runs.callback): the
#: validation split's alone (preferred: promotion compares scores on it), else the whole data set's.
VAL_FINGERPRINT_PARAM = "data.val_fingerprint"
FINGERPRINT_PARAM = "data.fingerprint"
DEFAULT_EXPERIMENT = "smartify"
UNKNOWN = "unknown"
#: Error codes of a lookup whose answer is "there is no such version or alias" (an alias that does not
#: exist is INVALID_PARAMETER_VALUE in MLflow 3).
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version, as smartify reads its tags.

    Attributes:
        name: registered model name.
        version: version number.
        run_id: MLflow run that holds the artifacts (the stage's run, or a ``register-<stage>`` run).
        source: artifact URI of the version's folder.
        val_metric: the selection metric, e.g. ``val/leaderboard`` (``ssim``/``accuracy`` on old versions).
        val_score: validation score of these weights (None if the version lacks the tag).
        data_fingerprint: digest of the stage's data, or ``unknown``.
        val_protocol: validation split, slice cap and whether the stage trained on that split, e.g.
            ``split=val;max_slices=None;trained_on_val=False;remask=equispaced+random@2025/cf0.08``.
        stage, kind, family, epoch: from the checkpoint.
        experts: expert names (MoE), else empty.
        aliases: aliases pointing at this version.
        created_ms: creation time (ms since the epoch).
        description: the version's description.
        tags: every tag of the version.
    """

    name: str
    version: int
    run_id: str | None
    source: str
    val_metric: str
    val_score: float | None
    data_fingerprint: str
    val_protocol: str
    stage: str
    kind: str
    family: str
    epoch: int | None
    experts: tuple[str, ...]
    aliases: tuple[str, ...]
    created_ms: int
    description: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        score = f"{self.val_score:.4f}" if self.val_score is not None else "unknown"
        return f"{self.name} version {self.version} ({self.val_metric} {score}, {self.stage} epoch {self.epoch})"

    @classmethod
    def from_mlflow(cls, mv: Any, aliases: tuple[str, ...] = ()) -> "ModelVersionInfo":
        """Build from an ``mlflow.entities.model_registry.ModelVersion``."""
        tags = dict(mv.tags or {})
        score = tags.get("val_score")
        epoch = tags.get("epoch")
        return cls(
            name=mv.name, version=int(mv.version), run_id=mv.run_id, source=mv.source,
            val_metric=tags.get("val_metric", UNKNOWN),
            val_score=float(score) if score not in (None, "", "None") else None,
            data_fingerprint=tags.get("data_fingerprint", UNKNOWN), val_protocol=tags.get("val_protocol", UNKNOWN),
            stage=tags.get("stage", ""), kind=tags.get("kind", ""), family=tags.get("family", ""),
            epoch=int(epoch) if epoch not in (None, "", "None") else None,
            experts=tuple(e for e in tags.get("experts", "").split(",") if e),
            aliases=tuple(sorted(set(aliases) | set(getattr(mv, "aliases", None) or ()))),
            created_ms=int(mv.creation_timestamp or 0), description=mv.description or "", tags=tags,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), with ``uri``."""
        out = asdict(self)
        out["experts"] = list(self.experts)
        out["aliases"] = list(self.aliases)
        out["uri"] = self.uri
        return out


# --------------------------------------------------------------------------- registration
def registered_name(checkpoint: Checkpoint, name: str | None = None) -> str:
    """The registered model name for a checkpoint.

    Args:
        checkpoint: a loaded checkpoint.
        name: explicit name (wins).

    Returns:
        ``smartify-hacker`` / ``smartify-helper`` for reconstruction stages of that family,
        ``smartify-classifier`` for the classifier, or ``name``.

    Raises:
        InputError: ``name`` is not a file-name component (it names the artifact folder).
    """
    if name is not None:
        return safe_component(name, "model name")
    if checkpoint.kind == "classifier":
        return NAMES["classifier"]
    family = checkpoint.family
    if family not in ("hacker", "helper"):
        raise InputError(
            f"{checkpoint.source}: key 'family' is {family!r}; expected hacker or helper "
            "(or pass --name)"
        )
    return NAMES[family]


def _run_for(client, checkpoint: Checkpoint, stores: Stores, experiment: str) -> tuple[str, str | None]:
    """The MLflow run that will hold the version's artifacts, and the data fingerprint it records.

    The stage's own run when the checkpoint names one that exists in this store; a placeholder id
    (the run is still in the local spool) is resolved through the spool's mapping or refused. A
    checkpoint without a run (trained without tracking, or with another store) gets a new run
    ``register-<stage>`` tagged with the run id the checkpoint named.
    """
    from mlflow.exceptions import MlflowException

    from tracking.runs.spool import Spool, is_placeholder

    source = checkpoint.source
    run_id = checkpoint.run_id
    if run_id and is_placeholder(run_id):
        real = Spool(stores.spool_dir).mapping().get(run_id)
        if real is None:
            raise InputError(
                f"{source}: its MLflow run {run_id} exists only in the local spool; run 'smartify tracking sync' first"
            )
        run_id = real
    if run_id:
        try:
            run = client.get_run(run_id)
            params = run.data.params
            return run.info.run_id, params.get(VAL_FINGERPRINT_PARAM) or params.get(FINGERPRINT_PARAM)
        except MlflowException as exc:
            log.warning("%s: run %s not found in %s (%s); creating a registration run", source, run_id,
                        redact_uri(stores.tracking_uri), exc.error_code)
    experiment_id = get_or_create_experiment(experiment, stores, client)
    from tracking.runs.environment import environment_tags  # user, source, git and versions, as on every run

    tags = {**environment_tags(), "smartify.kind": "registration", "smartify.stage": str(checkpoint.stage),
            "smartify.checkpoint": str(source)}
    if run_id:
        tags["smartify.checkpoint_run_id"] = str(run_id)
    run = client.create_run(experiment_id, run_name=f"register-{checkpoint.stage}", tags=tags)
    metric, score = validation_score(checkpoint)
    client.log_param(run.info.run_id, "epoch", checkpoint.epoch)
    if score is not None:
        client.log_metric(run.info.run_id, metric, score)
    client.set_terminated(run.info.run_id)
    return run.info.run_id, None


def _training_run(checkpoint: Checkpoint) -> str:
    return checkpoint.run_id or "none"


def _existing_version(client, name: str, digest: str, training_run: str):
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        if tags.get("weights_digest") == digest and tags.get("training_run", "none") == training_run:
            return mv
    return None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=DESCRIPTIONS.get(name, ""), tags={"smartify": "true"})
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def register_stage(
    checkpoint_path: str | Path,
    stores: Stores | None = None,
    name: str | None = None,
    which: str = "best",
    data_fingerprint: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> ModelVersionInfo:
    """Register a stage's checkpoint as a new version (or return the version that has these weights).

    Args:
        checkpoint_path: a ``.pt`` file or a stage folder (its ``checkpoints/<which>.pt``).
        stores: tracking stores (default: :func:`tracking.runs.stores.resolve_stores`).
        name: registered model name (default from the checkpoint, see :func:`registered_name`).
        which: ``best`` or ``last`` for a folder.
        data_fingerprint: digest of the data the stage validated on; default: the stage run's
            ``data.fingerprint`` param, else ``unknown`` (promotion then needs ``--force``).
        experiment: experiment of the ``register-<stage>`` run made when the checkpoint has no run.

    Returns:
        The registered version.
    """
    if name is not None:
        safe_component(name, "model name")  # before anything is read or written
    stores = stores or resolve_stores()
    checkpoint = Checkpoint.load(checkpoint_path, which)
    model_name = registered_name(checkpoint, name)
    build_model(checkpoint)  # refuse weights that do not rebuild before anything is written
    client = registry_client(stores)
    digest = weights_digest(checkpoint.model)
    _ensure_registered_model(client, model_name)
    existing = _existing_version(client, model_name, digest, _training_run(checkpoint))
    if existing is not None:
        log.info("%s: these weights are already %s version %s", checkpoint.source, model_name, existing.version)
        return get_version_info(model_name, version=int(existing.version), stores=stores)
    run_id, run_fingerprint = _run_for(client, checkpoint, stores, experiment)
    fingerprint = data_fingerprint or run_fingerprint or UNKNOWN
    metric, score = validation_score(checkpoint)
    stage = str(checkpoint.stage or "stage")
    # the version's files are an MLflow 3 logged model of the run (MLmodel: pyfunc, smartify's loader)
    model_id, _, description = log_version_model(client, checkpoint, run_id, model_name)
    experts = list(checkpoint.experts)
    tags = {
        "val_metric": metric, "val_score": repr(score) if score is not None else "None",
        "data_fingerprint": fingerprint, "val_protocol": validation_protocol(checkpoint),
        "stage": stage, "kind": checkpoint.kind, "family": str(checkpoint.family or "none"),
        "epoch": str(checkpoint.epoch), "experts": ",".join(experts),
        "weights_digest": digest, "weights_sha256": description["weights_sha256"],
        "training_run": _training_run(checkpoint),
        "checkpoint": checkpoint.source,
    }
    score_text = f"{score:.4f}" if score is not None else "unknown"
    text = (f"{stage} epoch {checkpoint.epoch}: {metric} {score_text}; {checkpoint.kind}"
            + (f" ({', '.join(experts)})" if experts else ""))
    mv = register_logged_model(client, model_name, model_id, run_id, tags, text)
    client.set_tag(run_id, f"registry.{model_name}", str(mv.version))
    log.info("registered %s version %s from %s (%s %s)", model_name, mv.version, checkpoint.source, metric,
             score_text)
    return get_version_info(model_name, version=int(mv.version), stores=stores)


# --------------------------------------------------------------------------- lookup
def parse_model_ref(
    uri_or_name: str, version: int | str | None = None, alias: str | None = None
) -> tuple[str, int | None, str | None]:
    """Split a model reference into ``(name, version, alias)``; exactly one of the last two is set.

    Args:
        uri_or_name: ``models:/name/3``, ``models:/name@champion`` or a plain name.
        version: version when ``uri_or_name`` is a name.
        alias: alias when ``uri_or_name`` is a name.

    Returns:
        ``(name, version or None, alias or None)``.
    """
    if uri_or_name.startswith("models:/"):
        match = _URI.match(uri_or_name)
        if match is None:
            raise InputError(f"model URI {uri_or_name!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        if version is not None or alias is not None:
            raise InputError(f"model URI {uri_or_name!r} already names a version or alias")
        v = match.group("version")
        return match.group("name"), int(v) if v else None, match.group("alias")
    if (version is None) == (alias is None):
        raise InputError(f"model {uri_or_name!r}: give exactly one of a version or an alias")
    if version is not None:
        try:
            return uri_or_name, int(version), None
        except ValueError:
            raise InputError(f"model {uri_or_name!r}: version must be an integer, got {version!r}") from None
    return uri_or_name, None, str(alias)


def _model_version(client, name: str, version: int | None, alias: str | None):
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in _ABSENT:  # the registry answered with another failure: say which
            first = (str(exc).strip().splitlines() or [exc.error_code])[0]
            raise InputError(f"registered model {name!r} in {redact_uri(client.stores.registry_uri)}: "
                             f"{first[:300]} ({exc.error_code})") from None
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise InputError(f"registered model {name!r}: no {what} ({exc.error_code})") from None


def _aliases(client, name: str) -> dict[int, tuple[str, ...]]:
    """Aliases of a registered model, by version."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:
        return {}
    out: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        out.setdefault(int(version), []).append(alias)
    return {v: tuple(sorted(a)) for v, a in out.items()}


def get_version_info(
    uri_or_name: str, version: int | str | None = None, alias: str | None = None, stores: Stores | None = None
) -> ModelVersionInfo:
    """Look up a version by URI, by name and version, or by name and alias.

    Args:
        uri_or_name: ``models:/name/3``, ``models:/name@alias`` or a name.
        version: with a name.
        alias: with a name.
        stores: tracking stores (default: resolved).

    Returns:
        The version's information (with every alias that points at it).
    """
    name, number, alias = parse_model_ref(uri_or_name, version, alias)
    client = registry_client(stores or resolve_stores())
    mv = _model_version(client, name, number, alias)
    return ModelVersionInfo.from_mlflow(mv, _aliases(client, name).get(int(mv.version), ()))


def list_versions(name: str | None = None, stores: Stores | None = None) -> list[ModelVersionInfo]:
    """Every version (of one registered model, or of all), sorted by name then version.

    Args:
        name: a registered model name, or None for all.
        stores: tracking stores (default: resolved).

    Returns:
        The versions.
    """
    client = registry_client(stores or resolve_stores())
    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    out: list[ModelVersionInfo] = []
    for model_name in names:
        aliases = _aliases(client, model_name)
        for mv in client.search_model_versions(f"name='{model_name}'"):
            out.append(ModelVersionInfo.from_mlflow(mv, aliases.get(int(mv.version), ())))
    return sorted(out, key=lambda i: (i.name, i.version))
