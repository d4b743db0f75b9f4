"""Pipelines: a list of stages (train, tune, promote, submit) run as one tracked invocation.

A pipeline file (``experiments/pipeline.yaml``, ``experiments/demo.yaml``) is data::

    name: demo
    workdir: runs/demo              # every step's outputs go to <workdir>/<step name>
    synth: {preset: tiny, seed: 0}  # optional: write a synthetic data set to <workdir>/data first
    data_root: null                 # or an existing data set (real challenge data)
    steps:
      - {name: hacker_baseline, train: tiny/hacker_baseline.yaml}
      - {name: hacker_moe, train: tiny/hacker_moe.yaml, init_from: hacker_baseline, register: true}
      - {name: tune, tune: tiny/tune.yaml, trials: 2}
      - {name: promote_hacker, promote: hacker_moe}
      - {name: submit, submit: true}

Stage and tune paths are relative to the pipeline file. ``init_from`` and ``promote`` name earlier
steps. Every stage run nests under one parent MLflow run; promotion is gated (a refusal is
reported, not forced); the submission uses the registry's ``champion`` aliases.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recon.config import from_dict, load_yaml_layers
from recon.errors import InputError
from recon.io import safe_component
from tracking.runs.callback import parent_run
from tracking.runs.stores import Stores, resolve_stores
from tracking.train import StageTracking, run_tracked_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthSpec:
    """Write a synthetic data set into ``<workdir>/data`` before the steps."""

    preset: str = "tiny"
    seed: int = 0
    grappa: str = "numpy"


@dataclass(frozen=True)
class Step:
    """One step: exactly one of ``train``, ``tune``, ``promote``, ``submit``.

    Attributes:
        name: step name (also the output folder and the MLflow run name).
        train: stage YAML to train.
        set: extra ``dotted.key=value`` overrides for the stage (or the tune base stage).
        init_from: an earlier step's name (its checkpoints) or a path.
        register: register the stage's best model in the Model Registry.
        tune: tune YAML to run (``trials`` trials).
        trials: trials of a tune step.
        promote: an earlier step that registered a version; moves ``alias`` if it is at least as good.
        alias: the alias promoted.
        submit: reconstruct the leaderboard with the ``champion`` models and evaluate.
    """

    name: str
    train: str | None = None
    set: tuple[str, ...] = ()
    init_from: str | None = None
    register: bool = False
    tune: str | None = None
    trials: int = 2
    promote: str | None = None
    alias: str = "champion"
    submit: bool = False

    def validate(self) -> None:
        safe_component(self.name, "step name")  # <workdir>/<step name> and the tune study's name
        actions = [a for a in ("train", "tune", "promote") if getattr(self, a)] + (["submit"] if self.submit else [])
        if len(actions) != 1:
            raise InputError(f"step {self.name!r}: expected exactly one of train, tune, promote, submit; got {actions}")


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file (see the module docstring)."""

    name: str
    steps: tuple[Step, ...]
    experiment: str = "smartify"
    workdir: str = "runs/pipeline"
    data_root: str | None = None
    synth: SynthSpec | None = None

    def validate(self) -> None:
        safe_component(self.name, "pipeline name")  # part of each tune step's study name (a file name)
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise InputError(f"pipeline {self.name!r}: step names must be unique, got {names}")
        if self.synth is None and self.data_root is None:
            raise InputError(f"pipeline {self.name!r}: set data_root or synth")


@dataclass
class StepResult:
    """What a step did, for the summary table."""

    name: str
    action: str
    status: str
    seconds: float
    score: float | None = None
    detail: str = ""
    run_id: str | None = None
    version: str | None = None


@dataclass
class PipelineResult:
    """The whole invocation."""

    name: str
    parent_run_id: str
    steps: list[StepResult] = field(default_factory=list)
    submission: dict[str, Any] | None = None
    seconds: float = 0.0


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[PipelineConfig, Path]:
    """Load and validate a pipeline file; ``overrides`` replace top-level keys (e.g. ``workdir``)."""
    path = Path(path)
    raw = load_yaml_layers(path)
    raw.pop("inherit", None)
    raw.update(overrides or {})
    try:
        cfg = from_dict(PipelineConfig, raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    return cfg, path.parent


class PipelineRunner:
    """Runs a :class:`PipelineConfig` under one parent MLflow run."""

    def __init__(self, cfg: PipelineConfig, base_dir: Path, stores: Stores | None = None,
                 device: str | None = None) -> None:
        self.cfg = cfg
        self.base_dir = base_dir
        self.stores = stores or resolve_stores()
        self.device = device
        self.workdir = Path(cfg.workdir)
        self.data_root = Path(cfg.data_root) if cfg.data_root else self.workdir / "data"
        self.outputs: dict[str, Path] = {}
        self.versions: dict[str, Any] = {}

    # ----------------------------------------------------------------- steps
    def _stage_overrides(self, step: Step) -> list[str]:
        over = [f"data.root={self.data_root}", f"output.dir={self.workdir / step.name}", f"stage.name={step.name}"]
        if self.device:
            over.append(f"train.device={self.device}")
        return over + list(step.set)

    def _resolve_init(self, ref: str | None) -> str | None:
        if ref is None:
            return None
        if ref in self.outputs:
            return str(self.outputs[ref])
        if Path(ref).exists():
            return ref
        raise InputError(f"init_from {ref!r}: neither an earlier step nor an existing path")

    def train(self, step: Step, parent_id: str) -> StepResult:
        """One tracked stage nested under the pipeline run (:func:`tracking.train.run_tracked_stage`)."""
        tracking = StageTracking(self.cfg.experiment, parent_run_id=parent_id, run_name=step.name,
                                 extra_tags={"smartify.pipeline": self.cfg.name})
        outcome = run_tracked_stage(self.base_dir / str(step.train), self._stage_overrides(step),
                                    init_from=self._resolve_init(step.init_from), tracking=tracking,
                                    stores=self.stores, register=step.register,
                                    register_experiment=self.cfg.experiment)
        if outcome.status == "diverged":
            return StepResult(step.name, "train", "diverged", outcome.seconds, detail=outcome.error)
        self.outputs[step.name] = outcome.output_dir
        result = StepResult(step.name, "train", outcome.status, outcome.seconds, outcome.best_metric,
                            run_id=outcome.run_id)
        if outcome.version is not None:
            self.versions[step.name] = outcome.version
            result.version = f"{outcome.version.name} v{outcome.version.version}"
        return result

    def tune(self, step: Step, parent_id: str) -> StepResult:
        """An Optuna study on the pipeline's data (its own study run, tagged with the pipeline)."""
        from tracking.tune.study import TuneOptions, run_tune

        t0 = time.perf_counter()
        over = [f"data.root={self.data_root}"] + ([f"train.device={self.device}"] if self.device else [])
        result = run_tune(TuneOptions(
            tune_file=self.base_dir / str(step.tune), trials=step.trials, overrides=over + list(step.set),
            study=f"{self.cfg.name}-{step.name}", overlay_dir=self.workdir / step.name,
            output_dir=self.workdir / step.name / "trials",
            experiment=self.cfg.experiment,
        ))
        summary = result.summary if result is not None else {}
        counts = ", ".join(f"{k.split('/', 1)[1]} {int(v)}" for k, v in sorted(summary.items())
                           if k.startswith(("trials/", "pruned/")) and v)
        return StepResult(step.name, "tune", "finished", time.perf_counter() - t0, summary.get("best_value"),
                          detail=f"study {result.study if result else '?'}: {counts}")

    def promote(self, step: Step) -> StepResult:
        """Gated promotion of the version an earlier step registered (a refusal is a result, not an error)."""
        from tracking.registry.promotion import promote

        t0 = time.perf_counter()
        info = self.versions.get(str(step.promote))
        if info is None:
            raise InputError(f"step {step.name!r}: step {step.promote!r} registered no model version")
        outcome = promote(info.name, info.version, alias=step.alias, stores=self.stores)
        return StepResult(step.name, "promote", outcome.status, time.perf_counter() - t0, outcome.score,
                          detail=outcome.message, version=f"{info.name} v{info.version} @{step.alias}")

    def submit(self, step: Step, parent_id: str) -> tuple[StepResult, dict[str, Any]]:
        """Reconstruct the leaderboard with the ``champion`` models, evaluate it and the baselines."""
        from tracking.registry.submission import submit

        t0 = time.perf_counter()
        leaderboard = self.data_root / "leaderboard"
        result = submit(leaderboard, self.workdir / step.name, stores=self.stores,
                        experiment=self.cfg.experiment, parent_run_id=parent_id, overwrite=True,
                        device=self.device or "cpu")
        summary = result.to_dict()
        if summary.get("evaluation"):
            from recon.inference.evaluation import evaluate_baselines

            summary["baselines"] = evaluate_baselines(leaderboard)
        score = (summary.get("evaluation") or {}).get("leaderboard")
        return StepResult(step.name, "submit", "finished", time.perf_counter() - t0, score,
                          run_id=summary.get("run_id")), summary

    # ----------------------------------------------------------------- run
    def run(self) -> PipelineResult:
        """The synthetic data if asked, then every step in order under one parent MLflow run."""
        t0 = time.perf_counter()
        if self.cfg.synth is not None and not (self.data_root / "train").is_dir():
            from recon.data.synth import write_dataset

            log.info("writing the %s synthetic data set to %s", self.cfg.synth.preset, self.data_root)
            write_dataset(self.data_root, preset=self.cfg.synth.preset, seed=self.cfg.synth.seed,
                          grappa=self.cfg.synth.grappa, progress=True)
        tags = {"smartify.pipeline": self.cfg.name, "smartify.workdir": str(self.workdir)}
        with parent_run(self.stores, self.cfg.experiment, f"pipeline-{self.cfg.name}", tags) as parent_id:
            result = PipelineResult(self.cfg.name, parent_id)
            for step in self.cfg.steps:
                log.info("pipeline %s: step %s", self.cfg.name, step.name)
                if step.train:
                    result.steps.append(self.train(step, parent_id))
                elif step.tune:
                    result.steps.append(self.tune(step, parent_id))
                elif step.promote:
                    result.steps.append(self.promote(step))
                else:
                    step_result, result.submission = self.submit(step, parent_id)
                    result.steps.append(step_result)
        result.seconds = time.perf_counter() - t0
        return result


def format_summary(result: PipelineResult) -> str:
    """A plain-text table of the steps, the submission scores and how to open the UI."""
    lines = [f"pipeline {result.name}: parent run {result.parent_run_id}, {result.seconds:.0f} s", ""]
    header = f"{'step':<20} {'action':<8} {'status':<10} {'score':>8} {'seconds':>8}  detail"
    lines += [header, "-" * len(header)]
    for s in result.steps:
        score = f"{s.score:.4f}" if isinstance(s.score, float) else "-"
        detail = s.version or s.detail or (f"run {s.run_id}" if s.run_id else "")
        lines.append(f"{s.name:<20} {s.action:<8} {s.status:<10} {score:>8} {s.seconds:>8.1f}  {detail}")
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
    lines += ["", "open the runs: smartify ui   (then browse http://127.0.0.1:5000)"]
    return "\n".join(lines)
