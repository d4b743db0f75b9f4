"""The end of a study: the trial table, the figures and the overlay of the best trial.

* :func:`trial_rows` / :func:`format_table`: number, state, value, prune reason, seconds, predicted memory and
  the parameters of every trial (retries name the trial they repeat).
* :func:`plot_study`: optimisation history, intermediate values and parameter importances with
  ``optuna.visualization.matplotlib``. The importance evaluator is fANOVA when scikit-learn is installed (its
  random forest needs it) and PED-ANOVA otherwise (no extra dependency); ``importance`` in the tune file picks.
  Importances need :data:`MIN_TRIALS_FOR_IMPORTANCE` complete trials; with fewer, a note says why there is no
  figure (an importance ranking from two trials is noise).
* :func:`write_overlay`: a stage YAML that inherits the base stage and sets the tuned values, which
  ``smartify train`` runs as it is.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from recon.config import deep_merge, dump_yaml
from recon.io import atomic_path, write_text_atomic
from tracking.tune.memory import format_bytes
from tracking.tune.oom import PRUNE_REASON
from tracking.tune.space import nest

log = logging.getLogger(__name__)

#: complete trials needed before parameter importances are plotted
MIN_TRIALS_FOR_IMPORTANCE = 5
IMPORTANCE_NOTE = "param_importances_note"


class Decoder(Protocol):
    """Turns a trial's Optuna params into stage values (a :class:`tracking.tune.space.SearchSpace`, or the
    space as the storage holds it, :class:`tracking.tune.stored.StoredSpace`)."""

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: D102
        ...


def trial_rows(study: optuna.Study, space: Decoder) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, prune reason, seconds, predicted memory and params."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        attrs = t.user_attrs
        reason = attrs.get(PRUNE_REASON) or ("error" if attrs.get("error") else "")
        if t.state == TrialState.FAIL and not reason:
            reason = "stale" if "error" not in attrs else "error"
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "reason": reason,
                     "seconds": seconds, "predicted_bytes": attrs.get("predicted_bytes"),
                     "retry_of": t.system_attrs.get("failed_trial"), "params": space.decode(t.params)})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The trial table as fixed-width text."""
    head = f"{'#':>4} {'state':<8} {'value':>8} {'reason':<13} {'sec':>6} {'predicted':>10}  params"
    lines = [head, "-" * len(head)]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        sec = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        pred = format_bytes(r["predicted_bytes"]) if r["predicted_bytes"] is not None else "-"
        params = ", ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in r["params"].items())
        retry = f" (retry of {r['retry_of']})" if r["retry_of"] is not None else ""
        lines.append(f"{r['number']:>4} {r['state']:<8} {value:>8} {r['reason'] or '-':<13} {sec:>6} {pred:>10}  "
                     f"{params}{retry}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


def importance_evaluator(kind: str, seed: int):
    """``(evaluator, name)``: fANOVA (needs scikit-learn), PED-ANOVA (no extra dependency) or MDI (scikit-learn)."""
    if kind == "auto":
        try:
            import sklearn  # noqa: F401
            kind = "fanova"
        except ImportError:
            kind = "ped-anova"
    imp = optuna.importance
    if kind == "fanova":
        return imp.FanovaImportanceEvaluator(seed=seed % 2**32), "fanova"
    if kind == "mdi":
        return imp.MeanDecreaseImpurityImportanceEvaluator(seed=seed % 2**32), "mdi"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return imp.PedAnovaImportanceEvaluator(), "ped-anova"


def importance_note(study: optuna.Study) -> str | None:
    """Why the study has no importance figure (too few complete trials), or None when it can have one."""
    complete = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if complete >= MIN_TRIALS_FOR_IMPORTANCE:
        return None
    return (f"study {study.study_name}: parameter importances not computed: {complete} complete trial(s), "
            f"at least {MIN_TRIALS_FOR_IMPORTANCE} are needed for a ranking that is more than noise")


def plot_study(study: optuna.Study, folder: Path, importance: str = "auto", seed: int = 0) -> dict[str, Path]:
    """Optimisation history, intermediate values and parameter importances as PNG files.

    A figure that cannot be made (no complete trial yet, one parameter value only...) is skipped with a log line.
    With fewer than :data:`MIN_TRIALS_FOR_IMPORTANCE` complete trials the importances are replaced by a text
    note (``param_importances_note.txt``) saying so.

    Returns:
        Figure name -> path (the note's path under :data:`IMPORTANCE_NOTE`).
    """
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    evaluator, name = importance_evaluator(importance, seed)
    metric = (study.metric_names or ["objective"])[0]
    makers = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, target_name=metric),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
        f"param_importances_{name}": lambda: ovm.plot_param_importances(study, evaluator=evaluator,
                                                                        target_name=metric),
    }
    labels = {  # (title, x label, y label): what each axis is, in which unit
        "optimization_history": (f"study {study.study_name}: {metric} per trial", "trial number",
                                 f"{metric} (a trial's value: its best epoch)"),
        "intermediate_values": (f"study {study.study_name}: {metric} per epoch of each trial",
                                "epoch of the trial (0 = its first)", f"{metric} at that epoch"),
        f"param_importances_{name}": (f"study {study.study_name}: parameter importances ({name})",
                                      f"importance for {metric} (relative, no unit)", "parameter"),
    }
    out: dict[str, Path] = {}
    note = importance_note(study)
    if note is not None:
        log.warning("%s", note)
        del makers[f"param_importances_{name}"]
        out[IMPORTANCE_NOTE] = folder / f"{IMPORTANCE_NOTE}.txt"
        write_text_atomic(out[IMPORTANCE_NOTE], note + "\n")
    for key, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
            ax = axes if hasattr(axes, "figure") else axes.flat[0]
            fig = ax.figure
            title, xlabel, ylabel = labels[key]
            ax.set_title(title, fontsize=11, loc="left")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            path = folder / f"{key}.png"
            try:
                with atomic_path(path) as tmp:
                    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            finally:
                plt.close(fig)
            out[key] = path
        except Exception as exc:  # a figure never costs the study; the reason is logged
            log.warning("figure %s not made: %s", key, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return out


def write_overlay(path: Path, base_path: Path, fixed: Mapping[str, Any], best: FrozenTrial, space: Decoder,
                  study: str, metric: str) -> Path:
    """Write the best trial's values as a stage overlay that ``smartify train`` runs directly.

    The file inherits the base stage (relative path), sets the tune file's ``fixed`` keys and the tuned keys, and
    sends outputs to ``runs/tuned/<study>/{stage}`` so the base stage's own runs are not overwritten.

    Args:
        path: the overlay file.
        base_path: the base stage YAML.
        fixed: the tune file's ``fixed`` items (dotted keys).
        best: the best trial.
        space: decodes the trial's params.
        study: the study name.
        metric: the objective's name.

    Returns:
        The path written (atomically).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    base, folder = Path(base_path).resolve(), path.parent.resolve()
    # relative inside one tree (experiments/tuned -> ../hacker_baseline.yaml), absolute across unrelated folders
    try:
        shared = Path(os.path.commonpath([base, folder]))
    except ValueError:  # another drive
        shared = Path(base.anchor)
    inherit = os.path.relpath(base, folder) if shared != Path(shared.anchor) else str(base)
    values = space.decode(best.params)
    body = deep_merge(nest(dict(fixed)), nest(values))
    body = {"inherit": inherit, **body, "output": {"dir": f"runs/tuned/{study}/{{stage}}"}}
    header = (f"# Tuned by `smartify tune` (study {study}): best trial {best.number}, {metric} = {best.value:.6g}.\n"
              f"# Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}. Train with:\n"
              f"#   smartify train {path}\n")
    return dump_yaml(body, path, header=header)


def summary_metrics(study: optuna.Study) -> dict[str, float]:
    """Counts per state and prune reason, and the best value."""
    trials = study.get_trials(deepcopy=False)
    out: dict[str, float] = {f"trials/{s.name.lower()}": 0.0 for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                       TrialState.FAIL)}
    for t in trials:
        key = f"trials/{t.state.name.lower()}"
        out[key] = out.get(key, 0.0) + 1
        reason = t.user_attrs.get(PRUNE_REASON)
        if t.state == TrialState.PRUNED and reason:
            out[f"pruned/{reason}"] = out.get(f"pruned/{reason}", 0.0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        out["best_value"] = float(study.best_value)
    return out


