"""Submission from the registry: reconstruct the leaderboard with the ``champion`` versions, tracked.

:func:`submit` resolves the three model references (by default ``models:/smartify-hacker@champion``,
``models:/smartify-helper@champion`` and ``models:/smartify-classifier@champion``) to concrete
versions *once*, before anything is loaded, so an alias that moves during a submission cannot mix
versions; it then loads those versions (:func:`tracking.registry.loader.load_version`, weights only) and
runs the same inference as ``smartify reconstruct``
(:func:`recon.inference.reconstruct.reconstruct_leaderboard`). When the data folder holds
``image_label`` for every file, the output is scored with the official metric
(:func:`recon.inference.evaluation.evaluate_folder`).

Everything goes to one MLflow run named ``submission`` (tag ``smartify.kind=submission``):

* params: per role (``hacker``, ``helper``, ``classifier``) the reference asked for and what it
  resolved to: ``<role>.uri``, ``.name``, ``.version``, ``.run_id``, ``.source``, ``.stage``,
  ``.epoch``, ``.val_score``, ``.weights_digest`` (``classifier = none`` without a classifier);
  the data folder, its fingerprint digest, device, budget, anatomy source;
* tags: ``smartify.models`` (``name/version`` of each role), ``lineage.<role>``
  (``models:/name/version``), ``lineage.<role>.run_id``, the budget verdict;
* metrics: ``submission/ssim/acc4``, ``submission/ssim/acc8``, ``submission/ssim/<anatomy>_acc<N>`` and
  ``submission/leaderboard`` (the challenge score, the mean of acc4 and acc8; when labels exist; the same
  names as a stage's ``val/...``), ``time/total_s`` (the clock starts before the models are fetched), ``time/setup_s``,
  ``time/seconds_per_slice``, ``time/budget_fraction``, ``routing/hacker_ratio``, ``slices``,
  ``files``, ``within_budget``;
* artifacts under ``submission/``: ``routing.json``, ``manifest.json`` (file names and sha256),
  ``reconstruction.json`` (timings per file, systems), ``evaluation.json``, ``versions.json``;
* with ``robustness`` (the default when labels exist): the Hacker, the Helper and the Broker each scored
  on the public leaderboard and on re-masked copies of it (:mod:`tracking.registry.robustness`):
  metrics ``submission/<system>/...`` and ``submission/remasked/<system>/<kind>/...``, artifacts
  ``submission/robustness.md`` (the table to read) and ``submission/robustness.json``; params
  ``robustness`` (``on``/``off``) and ``robustness.protocol``.

``device="auto"`` (the default) runs on CUDA where present, else on the CPU; the device used is a param.

The run starts before loading and ends ``FINISHED``, or ``FAILED`` with the error as a tag when
anything raises (the exception is re-raised).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recon.data.layout import LEADERBOARD_ACCS, data_fingerprint, discover_pairs
from recon.errors import InputError
from recon.inference.device import resolve_device
from recon.inference.reconstruct import CHALLENGE_BUDGET_S, ReconResult, reconstruct_leaderboard
from recon.engine.checkpoint import Checkpoint
from recon.engine.stage import RemaskConfig
from recon.inference.evaluation import labels_available
from recon.inference.systems import ReconSystem, adjacent_slices
from tracking.registry.loader import load_version
from tracking.registry.versions import ModelVersionInfo, get_version_info
from tracking.runs.stores import Stores, get_or_create_experiment, make_client, resolve_stores

if TYPE_CHECKING:
    from tracking.registry.robustness import Robustness

log = logging.getLogger(__name__)

DEFAULT_HACKER = "models:/smartify-hacker@champion"
DEFAULT_HELPER = "models:/smartify-helper@champion"
DEFAULT_CLASSIFIER = "models:/smartify-classifier@champion"
ROLES = ("hacker", "helper", "classifier")
_RECON_KINDS = ("baseline", "moe")


@dataclass
class SubmissionResult:
    """What :func:`submit` did.

    Attributes:
        run_id: the ``submission`` run.
        versions: role -> the version used (``classifier`` None without one).
        requested: role -> the reference asked for (e.g. ``models:/smartify-hacker@champion``).
        recon: the reconstruction result (routing, timings, manifest).
        evaluation: the official scores, or None without labels.
        robustness: every system on the public and re-masked leaderboards, or None when not measured.
    """

    run_id: str
    versions: dict[str, ModelVersionInfo | None]
    requested: dict[str, str | None]
    recon: ReconResult
    evaluation: dict[str, Any] | None
    robustness: "Robustness | None" = None

    @property
    def within_budget(self) -> bool:
        """Whether the reconstruction finished inside the time budget."""
        return self.recon.within_budget

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {
            "run_id": self.run_id,
            "versions": {r: (v.to_dict() if v else None) for r, v in self.versions.items()},
            "requested": dict(self.requested),
            "reconstruction": self.recon.to_dict(),
            "evaluation": self.evaluation,
            "robustness": self.robustness.to_dict() if self.robustness is not None else None,
        }


def leaderboard_fingerprint(data_dir: str | Path) -> str:
    """sha256 digest of the leaderboard's files (names, shapes, attrs; see ``data_fingerprint``)."""
    data_dir = Path(data_dir)
    pairs = [p for acc in LEADERBOARD_ACCS if (data_dir / acc).is_dir()
             for p in discover_pairs(data_dir / acc, require_image=False)]
    return str(data_fingerprint(pairs)["digest"])


def _resolve(role: str, ref: str, stores: Stores) -> ModelVersionInfo:
    """A reference resolved to one concrete version, with its kind checked for the role."""
    try:
        info = get_version_info(ref, stores=stores)
    except InputError as exc:
        hint = " (or --classifier none --anatomy-from-filename)" if role == "classifier" else ""
        raise InputError(f"--{role} {ref}: {exc}{hint}") from None
    wanted = ("classifier",) if role == "classifier" else _RECON_KINDS
    if info.kind not in wanted:
        raise InputError(f"--{role} {ref}: resolves to {info.uri}, a {info.kind or 'unknown'} model; "
                         f"expected {' or '.join(wanted)}")
    return info


def _params(role: str, requested: str | None, info: ModelVersionInfo | None) -> dict[str, str]:
    if info is None:
        return {role: "none"}
    return {
        f"{role}.uri": str(requested), f"{role}.name": info.name, f"{role}.version": str(info.version),
        f"{role}.run_id": str(info.run_id), f"{role}.source": info.source, f"{role}.stage": info.stage,
        f"{role}.epoch": str(info.epoch), f"{role}.val_score": str(info.val_score),
        f"{role}.weights_digest": info.tags.get("weights_digest", "unknown"),
    }


def _system(role: str, info: ModelVersionInfo, stores: Stores) -> ReconSystem:
    module, payload = load_version(info.uri, stores=stores)
    return ReconSystem(module, adjacent_slices(Checkpoint.from_payload(payload)), role, info.uri, info.epoch)


def _log_json(client, run_id: str, folder: Path, name: str, obj: Any) -> None:
    path = folder / name
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    client.log_artifact(run_id, str(path), "submission")


def submit(
    data_dir: str | Path,
    out_dir: str | Path,
    hacker: str = DEFAULT_HACKER,
    helper: str = DEFAULT_HELPER,
    classifier: str | None = DEFAULT_CLASSIFIER,
    anatomy_from_filename: bool = False,
    stores: Stores | None = None,
    experiment: str = "smartify",
    parent_run_id: str | None = None,
    budget_s: float = CHALLENGE_BUDGET_S,
    overwrite: bool = False,
    device: str = "auto",
    amp: bool = False,
    batch_size: int = 4,
    num_workers: int = 2,
    progress: bool = False,
    evaluate: bool = True,
    robustness: bool | None = None,
) -> SubmissionResult:
    """Reconstruct a leaderboard folder with registered versions and log a ``submission`` run.

    Args:
        data_dir: leaderboard folder (``{acc4,acc8}/kspace``, optionally ``image``).
        out_dir: output folder (``{acc4,acc8}/<name>.h5``).
        hacker: model reference of the Hacker system (``models:/name@alias`` or ``models:/name/N``).
        helper: the same for the Helper system.
        classifier: the same for the classifier, or None to take the anatomy from file names
            (requires ``anatomy_from_filename``).
        anatomy_from_filename: take each file's anatomy from its name (ignored with a classifier).
        stores: tracking stores (default: resolved).
        experiment: experiment of the ``submission`` run.
        parent_run_id: nest the run under this run.
        budget_s: time budget in seconds.
        overwrite: allow an output folder that already holds ``.h5`` files.
        device: torch device, or ``auto`` (CUDA where present, else CPU).
        amp: float16 autocast on CUDA.
        batch_size: slices per forward pass.
        num_workers: DataLoader workers.
        progress: show a progress bar.
        evaluate: score the output when labels exist.
        robustness: also score each system on the public and re-masked leaderboards (about three more
            reconstructions, outside the budget); None: when labels exist and ``evaluate``. True without
            labels is an error.

    Returns:
        The :class:`SubmissionResult`.
    """
    clock = time.perf_counter()
    if classifier is None and not anatomy_from_filename:
        raise InputError("no anatomy source: give a classifier model (--classifier) or --anatomy-from-filename")
    if budget_s <= 0:
        raise InputError(f"budget must be > 0 s, got {budget_s}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data folder not found (expected {{acc4,acc8}}/kspace/*.h5)")
    device = resolve_device(device)
    if robustness is None:
        robustness = evaluate and labels_available(data_dir)
    elif robustness and not (evaluate and labels_available(data_dir)):
        raise InputError(f"{data_dir}: robustness needs evaluation and image_label in every "
                         "{acc4,acc8}/image file (use --no-robustness)")
    stores = stores or resolve_stores()
    requested: dict[str, str | None] = {"hacker": hacker, "helper": helper, "classifier": classifier}
    versions: dict[str, ModelVersionInfo | None] = {
        role: (_resolve(role, ref, stores) if ref is not None else None) for role, ref in requested.items()
    }
    client = make_client(stores)
    experiment_id = get_or_create_experiment(experiment, stores, client)
    used = [v for v in versions.values() if v is not None]
    from tracking.runs.environment import environment_tags  # user, source, git and versions, as on every run

    tags = {
        **environment_tags(),
        "smartify.kind": "submission",
        "smartify.models": ",".join(f"{v.name}/{v.version}" for v in used),
        **{f"lineage.{role}": v.uri for role, v in versions.items() if v is not None},
        **{f"lineage.{role}.run_id": str(v.run_id) for role, v in versions.items() if v is not None},
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name="submission", tags=tags)
    run_id = run.info.run_id
    log.info("submission run %s: %s", run_id, tags["smartify.models"])
    try:
        params = {"data_dir": str(data_dir.resolve()), "out_dir": str(out_dir.resolve()),
                  "data.fingerprint": leaderboard_fingerprint(data_dir), "device": device, "amp": str(amp),
                  "budget_s": str(float(budget_s)), "batch_size": str(batch_size), "num_workers": str(num_workers),
                  "anatomy_source": "classifier" if classifier is not None else "filename",
                  "robustness": "on" if robustness else "off"}
        if robustness:
            params["robustness.protocol"] = RemaskConfig().protocol()
        for role in ROLES:
            params.update(_params(role, requested[role], versions[role]))
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        assert versions["hacker"] is not None and versions["helper"] is not None
        hacker_system = _system("hacker", versions["hacker"], stores)
        helper_system = _system("helper", versions["helper"], stores)
        classifier_module = None
        if versions["classifier"] is not None:
            classifier_module, _ = load_version(versions["classifier"].uri, stores=stores)
        settings = dict(anatomy_from_filename=anatomy_from_filename, device=device, amp=amp, batch_size=batch_size,
                        num_workers=num_workers, budget_s=budget_s, progress=progress)
        recon = reconstruct_leaderboard(data_dir, out_dir, hacker_system, helper_system, classifier=classifier_module,
                                        overwrite=overwrite, clock_start=clock, **settings)
        evaluation = evaluate_folder_if_labelled(data_dir, out_dir, device) if evaluate else None
        _log_outcome(client, run_id, recon, evaluation, versions)
        rob = None
        if robustness and evaluation is not None:
            from tracking.registry.robustness import measure

            rob = measure(data_dir, recon, evaluation, hacker_system, helper_system, settings,
                          classifier=classifier_module)
            _log_robustness(client, run_id, rob)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (tracking.cli.Terminated): every output file is whole
        client.set_tag(run_id, "smartify.stopped_by", str(getattr(exc, "signal_name", "SIGINT")))
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        client.set_tag(run_id, "smartify.error", f"{type(exc).__name__}: {first}"[:1000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return SubmissionResult(run_id, versions, requested, recon, evaluation, rob)


def evaluate_folder_if_labelled(data_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, Any] | None:
    """The official scores of ``out_dir`` when ``data_dir`` has labels, else None."""
    from recon.inference.evaluation import evaluate_folder

    if not labels_available(data_dir):
        log.info("%s: no image_label for every file; the submission is not scored", data_dir)
        return None
    return evaluate_folder(data_dir, out_dir, device=device)


def _log_outcome(client, run_id: str, recon: ReconResult, evaluation: dict[str, Any] | None,
                 versions: dict[str, ModelVersionInfo | None]) -> None:
    """Metrics, verdict tags and the JSON artifacts of a finished reconstruction."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {
        "time/total_s": recon.total_s, "time/setup_s": recon.setup_s,
        "time/seconds_per_slice": recon.seconds_per_slice, "time/budget_fraction": recon.total_s / recon.budget_s,
        "routing/hacker_ratio": recon.routing.hacker_ratio, "slices": float(recon.slices),
        "files": float(len(recon.files)), "within_budget": float(recon.within_budget),
    }
    if evaluation is not None:
        values.update({"submission/ssim/acc4": evaluation["acc4"], "submission/ssim/acc8": evaluation["acc8"],
                       "submission/leaderboard": evaluation["leaderboard"]})
        values.update({f"submission/ssim/{group}": v for group, v in evaluation.get("groups", {}).items()})
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    client.set_tag(run_id, "submission.verdict", recon.verdict)
    manifest = {"out_dir": recon.out_dir, "files": len(recon.files), "sha256": recon.manifest}
    with tempfile.TemporaryDirectory(prefix="smartify-submission-") as tmp:
        folder = Path(tmp)
        _log_json(client, run_id, folder, "routing.json", recon.routing.to_dict())
        _log_json(client, run_id, folder, "manifest.json", manifest)
        _log_json(client, run_id, folder, "reconstruction.json", recon.to_dict())
        _log_json(client, run_id, folder, "versions.json",
                  {r: (v.to_dict() if v else None) for r, v in versions.items()})
        if evaluation is not None:
            _log_json(client, run_id, folder, "evaluation.json", evaluation)


def _log_robustness(client, run_id: str, rob: "Robustness") -> None:
    """The robustness metrics and the ``robustness.md``/``.json`` artifacts."""
    from mlflow.entities import Metric

    from tracking.registry.robustness import markdown, metrics

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics(rob).items()])
    with tempfile.TemporaryDirectory(prefix="smartify-submission-") as tmp:
        folder = Path(tmp)
        (folder / "robustness.md").write_text(markdown(rob))
        client.log_artifact(run_id, str(folder / "robustness.md"), "submission")
        _log_json(client, run_id, folder, "robustness.json", rob.to_dict())
