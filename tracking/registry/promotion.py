"""Gated promotion: move an alias (``champion``) to a version only when it is at least as good.

A registered version carries its validation score and what that score was measured on (see
:mod:`tracking.registry.versions`): ``val_metric``, ``val_score``, ``data_fingerprint`` and ``val_protocol``.
:func:`promote` moves the alias when, against the version that holds it now,

1. both scores use the same metric (the stage's ``train.select_metric``: ``val/leaderboard`` for
   a Hacker, ``val_remasked/leaderboard`` for a Helper; the tags ``ssim``/``accuracy`` of versions
   registered before are ``val/ssim``/``val/accuracy``),
2. both were measured on the same data (equal, known ``data_fingerprint``) with the same
   validation protocol (split, slice cap, trained on it or not, re-masking kinds and seed), and
3. the candidate's score is at least the holder's (ties promote: a newer version of equal score
   is preferred).

A version that fails a check is refused with one line naming both versions and scores (or the
mismatch). ``force=True`` with a non-empty reason overrides any refusal; the check it overrode is
recorded. The first holder of an alias needs no comparison.

Each move is recorded as tags:

* on the promoted version and on the registered model: ``promotion.<alias>.by`` (user),
  ``.at`` (UTC ISO time), ``.previous_version``, ``.previous_score``, ``.score``, ``.metric`` (what
  both scores are), ``.reason``,
  ``.forced`` and, when forced, ``.overrode`` (the refusal it overrode);
* on the registered model, append-only: ``promotion.<alias>.history.<NNNN>``, one compact JSON
  object per move (numbered from 0001, never rewritten);
* on the version that lost the alias: ``promotion.<alias>.replaced_by`` and ``.replaced_at``.

The alias moves first and the tags follow, so a crash in between leaves the move made and its
record short, never a record of a move that did not happen.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from recon.errors import InputError
from tracking.registry.versions import UNKNOWN, ModelVersionInfo, get_version_info
from tracking.registry.client import registry_client
from tracking.runs.stores import Stores, resolve_stores

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "champion"
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# MLflow limits tag values (5000 characters on older servers); a reason is a sentence, not an essay.
_MAX_REASON = 1000


@dataclass(frozen=True)
class PromotionResult:
    """The outcome of one :func:`promote` call.

    Attributes:
        name: registered model.
        alias: the alias.
        version: the candidate version.
        status: ``promoted``, ``unchanged`` (it already held the alias) or ``refused``.
        message: one line for people.
        score: the candidate's validation score.
        previous_version: the version that held the alias before (None if none).
        previous_score: its score.
        forced: True when ``force`` overrode a refusal.
        reason: the reason given.
        by: user.
        at: UTC time (ISO 8601).
    """

    name: str
    alias: str
    version: int
    status: str
    message: str
    score: float | None
    previous_version: int | None
    previous_score: float | None
    forced: bool
    reason: str | None
    by: str
    at: str

    @property
    def promoted(self) -> bool:
        """True when the alias now points at the candidate (moved or already there)."""
        return self.status in ("promoted", "unchanged")

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def current_user() -> str:
    """The user name for the record (``getpass``; ``unknown`` where the system has none)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry and no LOGNAME/USER in some containers
        return os.environ.get("USER") or UNKNOWN


def _fmt(score: float | None) -> str:
    return f"{score:.4f}" if score is not None else "unknown"


#: ``val_metric`` tags of versions registered before the tag held the metric's full name
_LEGACY_METRICS = {"ssim": "val/ssim", "accuracy": "val/accuracy"}


def metric_name(info: ModelVersionInfo) -> str:
    """The full name of the metric a version's ``val_score`` is (old short tags mapped)."""
    return _LEGACY_METRICS.get(info.val_metric, info.val_metric)


def refusal(candidate: ModelVersionInfo, holder: ModelVersionInfo, alias: str) -> str | None:
    """Why ``candidate`` may not take ``alias`` from ``holder``, or None when it may.

    Args:
        candidate: the version to promote.
        holder: the version that holds the alias.
        alias: the alias (for the message).

    Returns:
        One line naming both versions and what differs, or None.
    """
    cand = f"version {candidate.version}"
    held = f"{alias} version {holder.version}"
    metric = metric_name(candidate)
    if metric != metric_name(holder):
        return f"{cand} is scored by {metric}, {held} by {metric_name(holder)}; not comparable"
    if UNKNOWN in (candidate.data_fingerprint, holder.data_fingerprint):
        which = cand if candidate.data_fingerprint == UNKNOWN else held
        return f"{which} has no data fingerprint, so the validation data cannot be shown to be the same"
    if candidate.data_fingerprint != holder.data_fingerprint:
        return (f"{cand} was validated on other data than {held} (fingerprint "
                f"{candidate.data_fingerprint[:12]} vs {holder.data_fingerprint[:12]})")
    if candidate.val_protocol != holder.val_protocol:
        return f"{cand} was validated as {candidate.val_protocol}, {held} as {holder.val_protocol}; not comparable"
    if candidate.val_score is None or holder.val_score is None:
        which = cand if candidate.val_score is None else held
        return f"{which} has no validation score"
    if candidate.val_score < holder.val_score:
        return f"{cand} {metric} {_fmt(candidate.val_score)} < {held} {_fmt(holder.val_score)}"
    return None


def _holder(client, name: str, alias: str, stores: Stores) -> ModelVersionInfo | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None
    return get_version_info(name, version=int(version), stores=stores)


def _history_index(client, name: str, prefix: str) -> int:
    tags = client.get_registered_model(name).tags or {}
    numbers = [int(k[len(prefix):]) for k in tags if k.startswith(prefix) and k[len(prefix):].isdigit()]
    return max(numbers, default=0) + 1


def promote(
    name: str,
    version: int | str,
    alias: str = DEFAULT_ALIAS,
    force: bool = False,
    reason: str | None = None,
    stores: Stores | None = None,
) -> PromotionResult:
    """Move ``alias`` of registered model ``name`` to ``version`` if it is at least as good.

    Args:
        name: registered model name (e.g. ``smartify-hacker``).
        version: the candidate version.
        alias: the alias to move.
        force: override a refusal; needs ``reason``.
        reason: why (required with ``force``, recorded always).
        stores: tracking stores (default: resolved).

    Returns:
        The result; ``status == "refused"`` leaves the alias and all tags unchanged.

    Raises:
        InputError: unknown model/version, bad alias, or ``force`` without a reason.
    """
    if not _ALIAS.match(alias or "") or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise InputError(
            f"alias {alias!r}: expected letters, digits, '_' or '-', not starting with a digit "
            "('latest' and v<N> are reserved by MLflow)"
        )
    reason = (reason or "").strip() or None
    if force and reason is None:
        raise InputError("--force needs --reason TEXT (the override is recorded)")
    if reason is not None and len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    stores = stores or resolve_stores()
    client = registry_client(stores)
    candidate = get_version_info(name, version=version, stores=stores)
    holder = _holder(client, name, alias, stores)
    by, at = current_user(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    common = dict(name=name, alias=alias, version=candidate.version, score=candidate.val_score,
                  previous_version=holder.version if holder else None,
                  previous_score=holder.val_score if holder else None, reason=reason, by=by, at=at)
    if holder is not None and holder.version == candidate.version:
        message = f"{name} version {candidate.version} already holds alias {alias!r}"
        return PromotionResult(status="unchanged", message=message, forced=False, **common)
    why_not = refusal(candidate, holder, alias) if holder is not None else None
    if why_not is not None and not force:
        message = f"refused: {name} {why_not} (use --force --reason TEXT to override)"
        log.info(message)
        return PromotionResult(status="refused", message=message, forced=False, **common)

    client.set_registered_model_alias(name, alias, str(candidate.version))
    prefix = f"promotion.{alias}"
    record = {
        "by": by, "at": at, "version": str(candidate.version), "score": _fmt(candidate.val_score),
        "previous_version": str(holder.version) if holder else "none",
        "previous_score": _fmt(holder.val_score) if holder else "none",
        "reason": reason or "", "forced": str(bool(force and why_not)).lower(), "metric": metric_name(candidate),
    }
    if force and why_not:
        record["overrode"] = why_not
    for key, value in record.items():
        if key == "version":
            continue
        client.set_model_version_tag(name, str(candidate.version), f"{prefix}.{key}", value)
        client.set_registered_model_tag(name, f"{prefix}.{key}", value)
    client.set_registered_model_tag(name, f"{prefix}.version", str(candidate.version))
    history = f"{prefix}.history."
    number = _history_index(client, name, history)
    client.set_registered_model_tag(name, f"{history}{number:04d}", json.dumps(record, separators=(",", ":")))
    if holder is not None:
        client.set_model_version_tag(name, str(holder.version), f"{prefix}.replaced_by", str(candidate.version))
        client.set_model_version_tag(name, str(holder.version), f"{prefix}.replaced_at", at)
    forced = bool(force and why_not)
    metric = metric_name(candidate)
    if holder is None:
        message = (f"{name} version {candidate.version} is now {alias!r} (first holder, "
                   f"{metric} {_fmt(candidate.val_score)})")
    elif forced:
        message = f"{name} version {candidate.version} forced to {alias!r} over version {holder.version}: {why_not}"
    else:
        message = (f"{name} version {candidate.version} is now {alias!r}: {metric} "
                   f"{_fmt(candidate.val_score)} >= version {holder.version} {_fmt(holder.val_score)}")
    log.info(message)
    return PromotionResult(status="promoted", message=message, forced=forced, **common)


def record_decision(
    result: PromotionResult,
    stores: Stores,
    experiment: str,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Record one promotion decision as a short MLflow run (nested under ``parent_run_id``, e.g. a pipeline's).

    The run's params are the decision (``promotion.model``, ``.version``, ``.alias``, ``.status``,
    ``.previous_version``, ``.forced``, ``.by``, ``.at``), its metrics the two scores (``promotion/score``,
    ``promotion/previous_score``, when known) and its description the one-line message; it ends FINISHED
    whether the alias moved or not (a refusal is a decision, not a failure).

    Args:
        result: the decision.
        stores: tracking stores.
        experiment: MLflow experiment.
        parent_run_id: nest under this run.
        run_name: the run's name (None: ``promote-<model>-v<version>``).
        extra_tags: more tags.

    Returns:
        The run id (a ``local-`` placeholder while the server is unreachable).
    """
    from tracking.runs.writer import TrackingWriter

    writer = TrackingWriter(stores)
    tags = {"smartify.kind": "promotion", "mlflow.note.content": result.message, **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = writer.create_run(experiment, run_name or f"promote-{result.name}-v{result.version}", tags)
    params = {"promotion.model": result.name, "promotion.version": str(result.version),
              "promotion.alias": result.alias, "promotion.status": result.status,
              "promotion.previous_version": str(result.previous_version or "none"),
              "promotion.forced": str(result.forced).lower(), "promotion.by": result.by, "promotion.at": result.at}
    if result.reason:
        params["promotion.reason"] = result.reason
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    metrics = [(f"promotion/{key}", float(value), now, 0)
               for key, value in (("score", result.score), ("previous_score", result.previous_score))
               if value is not None]
    writer.log_batch(run_id, metrics=metrics, params=params)
    writer.set_terminated(run_id, "FINISHED")
    writer.flush()
    return writer.resolve(run_id) or run_id
