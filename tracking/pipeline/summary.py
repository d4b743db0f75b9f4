"""What a pipeline run did: step results, the printed summary table and the scores its parent run logs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepResult:
    """What a step did, for the summary table (``table``: a tune step's trial table)."""

    name: str
    action: str
    status: str
    seconds: float
    score: float | None = None
    detail: str = ""
    run_id: str | None = None
    version: str | None = None
    table: str = ""


@dataclass
class PipelineResult:
    """The whole invocation."""

    name: str
    parent_run_id: str
    steps: list[StepResult] = field(default_factory=list)
    submission: dict[str, Any] | None = None
    seconds: float = 0.0


def score_metrics(submission: dict[str, Any]) -> dict[str, float]:
    """The parent run's final scores: ``submission/<name>`` and ``baseline/<method>/<name>``.

    ``<name>`` is ``ssim/acc4``, ``ssim/acc8`` or ``leaderboard`` (the mean of the two).

    Args:
        submission: the submit step's summary (its ``evaluation`` and ``baselines``).

    Returns:
        Metric name -> value (empty without an evaluation).
    """
    names = {"acc4": "ssim/acc4", "acc8": "ssim/acc8", "leaderboard": "leaderboard"}
    out: dict[str, float] = {}
    sources = [("submission", submission.get("evaluation") or {})]
    sources += [(f"baseline/{method}", scores or {}) for method, scores in (submission.get("baselines") or {}).items()]
    for prefix, scores in sources:
        for key, name in names.items():
            value = scores.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{prefix}/{name}"] = float(value)
    return out


def format_steps_markdown(result: PipelineResult) -> str:
    """The step table as Markdown (the parent run's ``steps.md`` and description)."""
    lines = [f"pipeline **{result.name}**, {result.seconds:.0f} s", "",
             "| step | action | status | score | seconds | run | detail |", "|---|---|---|---|---|---|---|"]
    for s in result.steps:
        score = f"{s.score:.4f}" if isinstance(s.score, float) else "-"
        detail = (s.version or s.detail or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {s.name} | {s.action} | {s.status} | {score} | {s.seconds:.1f} | {s.run_id or '-'} | "
                     f"{detail} |")
    return "\n".join(lines)


def format_summary(result: PipelineResult) -> str:
    """A plain-text table of the steps, the submission scores and how to open the UI."""
    lines = [f"pipeline {result.name}: parent run {result.parent_run_id}, {result.seconds:.0f} s", ""]
    header = f"{'step':<20} {'action':<8} {'status':<10} {'score':>8} {'seconds':>8}  detail"
    lines += [header, "-" * len(header)]
    for s in result.steps:
        score = f"{s.score:.4f}" if isinstance(s.score, float) else "-"
        detail = s.version or s.detail or (f"run {s.run_id}" if s.run_id else "")
        lines.append(f"{s.name:<20} {s.action:<8} {s.status:<10} {score:>8} {s.seconds:>8.1f}  {detail}")
    for s in result.steps:  # each study's trials, then the values that reached the stages
        if s.table:
            lines += ["", f"trials of {s.name} ({s.detail}):", *[f"  {row}" for row in s.table.splitlines()]]
    tuned = [s for s in result.steps if s.action == "train" and s.detail.startswith("tuned: ")]
    if tuned:
        lines += ["", "tuned values used:"]
        lines += [f"  {s.name} <- {s.detail[len('tuned: '):]}" for s in tuned]
    sub = result.submission or {}
    evaluation = sub.get("evaluation") or {}
    if evaluation:
        lines += ["", "submission (leaderboard SSIM on synthetic data):"]
        lines.append(f"  model        acc4 {evaluation.get('acc4', float('nan')):.4f}  "
                     f"acc8 {evaluation.get('acc8', float('nan')):.4f}  "
                     f"leaderboard {evaluation.get('leaderboard', float('nan')):.4f}")
        for key, label in (("zero_filled", "zero-filled"), ("grappa", "GRAPPA")):
            base = (sub.get("baselines") or {}).get(key)
            if base:
                lines.append(f"  {label:<12} acc4 {base['acc4']:.4f}  acc8 {base['acc8']:.4f}  "
                             f"leaderboard {base['leaderboard']:.4f}")
    recon = sub.get("reconstruction") or {}
    if recon:
        routing = recon.get("routing") or {}
        lines.append(f"  routing: hacker ratio {routing.get('hacker_ratio')}, slices per expert "
                     f"{routing.get('slices_per_expert')}")
        lines.append(f"  reconstruction: {recon['total_s']:.1f} s, {recon['seconds_per_slice']:.3f} s/slice; "
                     f"{recon['verdict']}")
    for role, version in (sub.get("versions") or {}).items():
        if version:
            lines.append(f"  {role}: {version.get('name')} version {version.get('version')}")
    from tracking.commands.ui import ui_hint  # the runs table of the parent run's experiment

    lines += ["", ui_hint(result.parent_run_id)]
    return "\n".join(lines)
