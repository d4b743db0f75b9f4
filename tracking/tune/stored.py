"""A study as its storage holds it: its definition in the user attributes, growing it, and its report.

When a study is created, its definition goes into the study's user attributes (:func:`definition_attrs`):
the tune file, the base stage, the metric, the ``fixed`` items, the search space after filtering (``space``,
JSON), the trial folder and the figure settings. Two things follow from that:

* A study can grow: ``smartify tune FILE --trials N`` on an existing study adds N trials. A tune file whose
  space (or metric) differs from the stored one is refused (:func:`check_same_definition`) with one line
  naming the first dimension that changed, since trials drawn from two spaces are not one search; a new
  ``--study`` name starts a new study instead.
* ``smartify tune --report STUDY`` (:func:`report_study`) re-draws the figures, the trial table and the
  overlay from the storage alone, without training and without the tune file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState

from recon.errors import InputError

log = logging.getLogger(__name__)

#: the user attributes compared when a study is opened again: a change is refused
COMPARED = ("space", "metric")


def definition_attrs(tune_file: Path, base_path: Path, metric: str, space: Mapping[str, Any],
                     excluded: Mapping[str, Any], fixed: Mapping[str, Any], output_dir: str, importance: str,
                     seed: int) -> dict[str, Any]:
    """The study's definition as user attributes (JSON strings for the nested values).

    Args:
        tune_file: the tune YAML.
        base_path: the base stage YAML.
        metric: the objective.
        space: :meth:`tracking.tune.space.SearchSpace.describe` (after filtering).
        excluded: values removed from the space before sampling.
        fixed: the tune file's ``fixed`` items.
        output_dir: the trial folder (``{study}`` expanded).
        importance: the importance evaluator setting.
        seed: the study seed.

    Returns:
        Attribute name -> value.
    """
    return {"tune_file": str(tune_file), "base": str(base_path), "metric": metric,
            "space": json.dumps(dict(space), sort_keys=True), "excluded": json.dumps(dict(excluded)),
            "fixed": json.dumps(dict(fixed), sort_keys=True), "output_dir": str(output_dir),
            "importance": importance, "seed": int(seed)}


def space_change(stored: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """The first dimension that differs between two space descriptions, as a phrase; None when equal."""
    for key in sorted(set(stored) | set(given)):
        if key not in given:
            return f"dimension {key!r} is in the study but not in the tune file"
        if key not in stored:
            return f"dimension {key!r} is in the tune file but not in the study"
        if stored[key] != given[key]:
            return f"dimension {key!r} changed: study {json.dumps(stored[key], sort_keys=True)}, tune file " \
                   f"{json.dumps(given[key], sort_keys=True)}"
    return None


def check_same_definition(name: str, stored: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Refuse to add trials to a study whose stored space or metric differs from the tune file's.

    Args:
        name: the study.
        stored: the study's user attributes.
        given: :func:`definition_attrs` of this invocation.

    Raises:
        InputError: one line naming the dimension (or the metric) that changed.
    """
    hint = "keep the study's space to add trials to it, or give a new --study name"
    if "metric" in stored and stored["metric"] != given.get("metric"):
        raise InputError(f"study {name!r}: metric changed: study {stored['metric']!r}, tune file "
                         f"{given.get('metric')!r}; {hint}")
    if "space" in stored:
        change = space_change(json.loads(stored["space"]), json.loads(given["space"]))
        if change:
            raise InputError(f"study {name!r}: search space {change}; {hint}")


class StoredSpace:
    """The search space as the study's ``space`` attribute describes it: enough to decode trial params.

    Categorical choices that are lists (``model.feature_dim``) were offered to Optuna as JSON strings.

    Args:
        description: ``key -> {"type": ..., "choices": [...]}`` (:meth:`SearchSpace.describe`).
    """

    def __init__(self, description: Mapping[str, Any]) -> None:
        self.description = dict(description)
        self.encoded = {key for key, info in self.description.items()
                        if info.get("choices") and all(isinstance(c, list) for c in info["choices"])}

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Stage values of a trial's Optuna params."""
        return {k: json.loads(v) if k in self.encoded and isinstance(v, str) else v for k, v in params.items()}


def load_stored_study(name: str, url: str) -> optuna.Study:
    """Load a study that must exist.

    Raises:
        InputError: no study of that name in the storage (the names it holds are listed).
    """
    from tracking.runs.stores import redact_uri

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise InputError(f"--storage {redact_uri(url)}: no such database file")
    names = optuna.get_all_study_names(storage=url)
    if name not in names:
        raise InputError(f"--report {name}: no such study in {redact_uri(url)} (it holds: "
                         f"{', '.join(sorted(names)) or 'none'})")
    return optuna.load_study(study_name=name, storage=url)


def report_study(name: str, url: str, output_dir: Path | None = None, overlay_dir: Path | None = None) -> Any:
    """Figures, trial table and overlay of a stored study, from the storage alone (no training).

    Args:
        name: the study.
        url: the Optuna storage URL.
        output_dir: folder of ``figures/``, ``trials.txt`` and ``trials.json`` (None: the study's trial folder).
        overlay_dir: folder of the overlay (None: ``<repo>/experiments/tuned``).

    Returns:
        A :class:`tracking.tune.study.TuneResult` (``run_id`` is the study's MLflow run, if it has one).

    Raises:
        InputError: no such study, or a study made before its definition was stored.
    """
    from tracking.runs.stores import redact_uri, repo_root
    from tracking.tune.report import format_table, plot_study, summary_metrics, trial_rows, write_overlay
    from tracking.tune.study import TuneResult
    from tracking.tune.study_runs import RUN_ID_ATTR

    study = load_stored_study(name, url)
    attrs = study.user_attrs
    missing = [key for key in ("space", "base", "metric") if key not in attrs]
    if missing:
        raise InputError(f"--report {name}: the study's definition is not stored (no {', '.join(missing)} "
                         "user attribute); run the tune file with --trials 0 to report it")
    space = StoredSpace(json.loads(attrs["space"]))
    out = Path(output_dir or attrs.get("output_dir") or f"runs/tune/{name}")
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, space)
    table = format_table(rows)
    figures = plot_study(study, out / "figures", str(attrs.get("importance", "auto")), int(attrs.get("seed", 0)))
    (out / "trials.txt").write_text(table + "\n", encoding="utf-8")
    (out / "trials.json").write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    overlay = None
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        folder = overlay_dir or repo_root(fallback_to_cwd=True) / "experiments" / "tuned"
        fixed = json.loads(attrs.get("fixed", "{}"))
        overlay = write_overlay(Path(folder) / f"{name}.yaml", Path(attrs["base"]), fixed, study.best_trial, space,
                                name, str(attrs["metric"]))
    else:
        log.warning("study %s: no complete trial; no overlay written", name)
    excluded = json.loads(attrs.get("excluded", "{}"))
    return TuneResult(name, redact_uri(url), rows, table, overlay, figures, summary_metrics(study), excluded,
                      attrs.get(RUN_ID_ATTR))
