"""The pipeline runner: a list of stages (train, tune, promote, submit) run as one tracked invocation.

A pipeline file (``experiments/pipeline.yaml``, ``experiments/demo.yaml``) is data::

    name: demo
    workdir: runs/demo              # every step's outputs go to <workdir>/<step name>
    synth: {preset: tiny, seed: 0}  # optional: write a synthetic data set to <workdir>/data first
    data_root: null                 # or an existing data set (real challenge data)
    steps:
      - {name: hacker_baseline, train: tiny/hacker_baseline.yaml}
      - {name: tune_moe_aug, tune: tiny/tune_moe_aug.yaml, init_from: hacker_baseline, trials: 2}
      - {name: hacker_moe, train: tiny/hacker_moe.yaml, init_from: hacker_baseline, overlay_from: tune_moe_aug,
         register: true}
      - {name: promote_hacker, promote: hacker_moe}
      - {name: submit, submit: true}

Stage and tune paths are relative to the pipeline file. ``init_from`` and ``promote`` name earlier
steps (a tune step's ``init_from`` is the checkpoint its trials start from); ``overlay_from`` names an
earlier tune step whose best trial's values the stage trains with (:mod:`tracking.pipeline.overlay`).
Promotion is gated (a refusal is reported, not forced); the submission uses the registry's
``champion`` aliases.

Records: every step's run (stage, study, promotion decision, submission) nests under one parent MLflow
run. The parent holds the pipeline as it ran (``pipeline.yaml``, its file as ``source/``), a
``pipeline.*`` param per top-level key, per step ``step/<name>/status`` and ``step/<name>/action`` params
and ``step/<name>/score`` and ``step/<name>/seconds`` metrics, the step table (``steps.md``, also the
run's description) and the printed summary (``summary.txt``), and the final scores:
``submission/ssim/acc4``, ``submission/ssim/acc8``, ``submission/leaderboard`` and the same under
``baseline/zero_filled/`` and ``baseline/grappa/``.

What a stage logs is what it ran: :meth:`PipelineRunner.stage_config` builds each stage's configuration
with the pipeline's data root, output folder and the earlier step's folder as ``init_from`` already in it;
``--print-config`` prints the same objects (:meth:`PipelineRunner.resolved_documents`).

Re-runs never replace results (:func:`choose_workdir`): when ``workdir`` already holds results (anything
besides its ``data/`` folder), the invocation writes into the first free numbered folder beside it
(``runs/demo-2``, ``runs/demo-3``, ...), says so, and logs the folder used as the parent run's ``workdir``
param; ``overwrite`` writes into ``workdir`` itself and replaces each stage's checkpoints. The data set
a pipeline synthesises stays in ``<workdir>/data`` of the named workdir, written once and shared by
the numbered folders.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from recon.config import dump_yaml, to_dict
from recon.engine.stage import StageConfig
from recon.errors import InputError
from tracking.pipeline.config import DATA_FOLDER, PipelineConfig, Step, choose_workdir
from tracking.pipeline.overlay import TunedFrom, link_study_run, overlay_items, overrides_of
from tracking.pipeline.summary import PipelineResult, StepResult, format_steps_markdown, format_summary, score_metrics
from tracking.runs.params import param_value
from tracking.runs.parent import parent_run
from tracking.runs.stores import Stores, resolve_stores
from tracking.runs.writer import TrackingWriter
from tracking.train import StageTracking, effective_stage, load_stage, provenance_tags, run_tracked_stage

log = logging.getLogger(__name__)



class PipelineRunner:
    """Runs a :class:`PipelineConfig` under one parent MLflow run.

    Args:
        cfg: the pipeline.
        base_dir: the folder stage and tune paths are relative to (the pipeline file's).
        stores: tracking stores (None: resolved from the environment when first needed).
        device: device for every stage (None: each stage's own).
        overwrite: write into ``cfg.workdir`` even when it holds results, replacing each stage's checkpoints
            (else a numbered workdir is chosen, see :func:`choose_workdir`).
        run_name: the parent run's name (None: ``pipeline-<name>``).
        source: the pipeline file, logged on the parent run (None: not logged).
    """

    def __init__(self, cfg: PipelineConfig, base_dir: Path, stores: Stores | None = None,
                 device: str | None = None, overwrite: bool = False, run_name: str | None = None,
                 source: Path | None = None) -> None:
        self.cfg = cfg
        self.base_dir = base_dir
        self._stores = stores
        self.device = device
        self.run_name = run_name or f"pipeline-{cfg.name}"
        self.source = source
        self.overwrite = overwrite
        self.workdir = choose_workdir(cfg.workdir, overwrite)
        # synthesised data stay in the named workdir: a re-run in a numbered one reuses them
        self.data_root = Path(cfg.data_root) if cfg.data_root else Path(cfg.workdir) / DATA_FOLDER
        self.outputs: dict[str, Path] = {}
        self.versions: dict[str, Any] = {}
        self.tunes: dict[str, Any] = {}  # tune step -> its TuneResult

    @property
    def stores(self) -> Stores:
        """The tracking stores (resolved on first use, so ``--print-config`` never touches them)."""
        if self._stores is None:
            self._stores = resolve_stores()
        return self._stores

    # ----------------------------------------------------------------- configurations
    def _stage_overrides(self, step: Step, planned: bool = False) -> list[str]:
        """The step's overrides: the tuned overlay's items, the pipeline's own keys, then ``set``."""
        tuned = self.tuned_from(step, planned)
        over = overrides_of(tuned.items) if tuned is not None else []
        over += [f"data.root={self.data_root}", f"output.dir={self.workdir / step.name}", f"stage.name={step.name}"]
        if self.device:
            over.append(f"train.device={self.device}")
        return over + list(step.set)

    def tuned_from(self, step: Step, planned: bool = False) -> TunedFrom | None:
        """The overlay ``step.overlay_from`` names, once its tune step ran (None without ``overlay_from``).

        Args:
            step: a train step.
            planned: before running (``--print-config``): None when the tune step has not written its overlay.

        Raises:
            InputError: the tune step completed no trial (so it wrote no overlay).
        """
        ref = step.overlay_from
        if ref is None:
            return None
        result = self.tunes.get(ref)
        if result is None:
            if planned:
                return None
            raise InputError(f"step {step.name!r}: overlay_from {ref!r}: that tune step has not run")
        if result.overlay is None or result.best_trial is None:
            raise InputError(f"step {step.name!r}: overlay_from {ref!r}: study {result.study} completed no trial, "
                             "so there is no overlay to train with")
        return TunedFrom(ref, result.study, int(result.best_trial), Path(result.overlay), result.run_id,
                         overlay_items(Path(result.overlay)))

    def _resolve_init(self, step: Step, planned: bool = False) -> str | None:
        """The folder ``step.init_from`` means: an earlier train step's output folder, or an existing path.

        Args:
            step: the step.
            planned: resolve before running (``--print-config``): an earlier step's folder need not exist yet.

        Raises:
            InputError: neither an earlier train step nor an existing path, or the step made no checkpoint.
        """
        ref = step.init_from
        if ref is None:
            return None
        earlier = [s.name for s in self.cfg.steps[: self.cfg.steps.index(step)] if s.train]
        if ref in earlier:
            if planned:
                return self._init_file(step, self.workdir / ref, planned)  # that step's output.dir
            if ref not in self.outputs:
                raise InputError(f"step {step.name!r}: init_from {ref!r} made no checkpoint (see its status)")
            return self._init_file(step, Path(self.outputs[ref]), planned)
        if Path(ref).exists():
            return self._init_file(step, Path(ref), planned) if step.init_from_epoch is not None else ref
        raise InputError(f"step {step.name!r}: init_from {ref!r}: neither an earlier train step nor an existing path")

    @staticmethod
    def _init_file(step: Step, folder: Path, planned: bool) -> str:
        """The folder itself (its best checkpoint), or its ``checkpoints/epoch_NNN.pt`` for ``init_from_epoch``."""
        if step.init_from_epoch is None:
            return str(folder)
        path = folder / "checkpoints" / f"epoch_{step.init_from_epoch:03d}.pt"
        if not planned and not path.is_file():
            raise InputError(f"step {step.name!r}: init_from_epoch {step.init_from_epoch}: {path} not found; the "
                             f"{step.init_from!r} stage keeps it with train.keep_epochs: [{step.init_from_epoch}]")
        return str(path)

    @staticmethod
    def init_choice(step: Step) -> str:
        """What a train step starts from, for the parent run's ``step/<name>/init_from`` param."""
        if step.init_from is None:
            return "none (initialised from scratch)"
        which = "best checkpoint" if step.init_from_epoch is None else f"epoch_{step.init_from_epoch:03d}.pt"
        return f"{step.init_from}: {which}"

    def stage_config(self, step: Step, planned: bool = False) -> tuple[StageConfig, dict[str, Any]]:
        """The stage of a train step as it runs: the pipeline's overrides and ``init_from`` written into it.

        Args:
            step: a train step.
            planned: see :meth:`_resolve_init`.

        Returns:
            The typed configuration and the resolved form the stage run logs and checkpoints.
        """
        stage = load_stage(self.base_dir / str(step.train), self._stage_overrides(step, planned))
        return effective_stage(stage, self._resolve_init(step, planned))

    def tune_options(self, step: Step, parent_id: str | None, planned: bool = False) -> Any:
        """The :class:`tracking.tune.study.TuneOptions` of a tune step (its ``init_from`` resolved)."""
        from tracking.tune.study import TuneOptions

        over = [f"data.root={self.data_root}"] + ([f"train.device={self.device}"] if self.device else [])
        return TuneOptions(
            tune_file=self.base_dir / str(step.tune), trials=step.trials, overrides=over + list(step.set),
            study=f"{self.cfg.name}-{step.name}", overlay_dir=self.workdir / step.name,
            output_dir=self.workdir / step.name / "trials", experiment=self.cfg.experiment,
            parent_run_id=parent_id, init_from=self._resolve_init(step, planned),
        )

    def resolved(self) -> dict[str, Any]:
        """The pipeline as it runs: the file with the ``--set`` keys, and the data root it uses."""
        return {**to_dict(self.cfg), "data_root": str(self.data_root)}

    def resolved_documents(self) -> list[tuple[str, dict[str, Any]]]:
        """What ``--print-config`` prints: the pipeline, then each train and tune step's configuration.

        Returns:
            ``(title, configuration)`` pairs: the parent run's ``pipeline.yaml``, each stage run's
            ``config.yaml`` and each study's effective tune configuration with its base stage.

        Raises:
            InputError: a bad stage or tune file, ``set`` item or ``init_from``.
        """
        from tracking.tune.study import resolved_tune

        docs = [(f"pipeline {self.cfg.name} (the parent run's pipeline.yaml)", self.resolved())]
        for step in self.cfg.steps:
            if step.train:
                note = f"; the best trial of {step.overlay_from} is applied when it has run" \
                    if step.overlay_from else ""
                docs.append((f"step {step.name}: train {self.base_dir / step.train} (the stage run's config.yaml"
                             f"{note})", self.stage_config(step, planned=True)[1]))
            elif step.tune:
                docs.append((f"step {step.name}: tune {self.base_dir / step.tune} (the study run's tune.* params)",
                             resolved_tune(self.tune_options(step, None, planned=True))))
        return docs

    # ----------------------------------------------------------------- steps
    def train(self, step: Step, parent_id: str) -> StepResult:
        """One tracked stage nested under the pipeline run (:func:`tracking.train.run_tracked_stage`)."""
        tuned = self.tuned_from(step)
        tags = {"smartify.pipeline": self.cfg.name, **provenance_tags(self.base_dir / str(step.train),
                                                                       self._stage_overrides(step), None)}
        if tuned is not None:
            tags.update(tuned.tags())
        tracking = StageTracking(self.cfg.experiment, parent_run_id=parent_id, run_name=step.name, extra_tags=tags)
        outcome = run_tracked_stage(stage=self.stage_config(step), tracking=tracking, stores=self.stores,
                                    register=step.register, register_experiment=self.cfg.experiment,
                                    overwrite=self.overwrite)
        if tuned is not None and outcome.run_id:
            writer = TrackingWriter(self.stores)
            writer.log_batch(outcome.run_id, params=tuned.params())
            if tuned.run_id:
                link_study_run(writer, tuned.run_id, outcome.run_id)
            writer.flush()
        if outcome.status == "diverged":
            return StepResult(step.name, "train", "diverged", outcome.seconds, detail=outcome.error,
                              run_id=outcome.run_id)
        self.outputs[step.name] = outcome.output_dir
        result = StepResult(step.name, "train", outcome.status, outcome.seconds, outcome.best_metric,
                            run_id=outcome.run_id, detail=f"tuned: {tuned.describe()}" if tuned else "")
        if outcome.version is not None:
            self.versions[step.name] = outcome.version
            result.version = f"{outcome.version.name} v{outcome.version.version}"
        return result

    def tune(self, step: Step, parent_id: str) -> StepResult:
        """An Optuna study on the pipeline's data; its study run nests under the pipeline run."""
        from tracking.tune.study import run_tune

        t0 = time.perf_counter()
        result = run_tune(self.tune_options(step, parent_id))
        if result is not None:
            self.tunes[step.name] = result
        summary = result.summary if result is not None else {}
        counts = ", ".join(f"{k.split('/', 1)[1]} {int(v)}" for k, v in sorted(summary.items())
                           if k.startswith(("trials/", "pruned/")) and v)
        best = f"; best trial {result.best_trial}" if result is not None and result.best_trial is not None else ""
        return StepResult(step.name, "tune", "finished", time.perf_counter() - t0, summary.get("best_value"),
                          detail=f"study {result.study if result else '?'}: {counts}{best}",
                          run_id=result.run_id if result else None, table=result.table if result else "")

    def promote(self, step: Step, parent_id: str) -> StepResult:
        """Gated promotion of the version an earlier step registered (a refusal is a result, not an error).

        The decision is recorded as a run nested under the pipeline run (:func:`record_decision`).
        """
        from tracking.registry.promotion import promote, record_decision

        t0 = time.perf_counter()
        info = self.versions.get(str(step.promote))
        if info is None:
            raise InputError(f"step {step.name!r}: step {step.promote!r} registered no model version")
        outcome = promote(info.name, info.version, alias=step.alias, stores=self.stores)
        run_id = record_decision(outcome, self.stores, self.cfg.experiment, parent_run_id=parent_id,
                                 run_name=step.name, extra_tags={"smartify.pipeline": self.cfg.name})
        return StepResult(step.name, "promote", outcome.status, time.perf_counter() - t0, outcome.score,
                          detail=outcome.message, run_id=run_id, version=f"{info.name} v{info.version} @{step.alias}")

    def submit(self, step: Step, parent_id: str) -> tuple[StepResult, dict[str, Any]]:
        """Reconstruct the leaderboard with the ``champion`` models, evaluate it and the baselines."""
        from tracking.registry.submission import submit

        t0 = time.perf_counter()
        leaderboard = self.data_root / "leaderboard"
        result = submit(leaderboard, self.workdir / step.name, stores=self.stores,
                        experiment=self.cfg.experiment, parent_run_id=parent_id, overwrite=True,
                        device=self.device or "auto")
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
        if self.workdir != Path(self.cfg.workdir):
            log.warning("pipeline %s: %s holds an earlier run's results; writing this run to %s "
                        "(--overwrite replaces them instead)", self.cfg.name, self.cfg.workdir, self.workdir)
        tags = {"smartify.pipeline": self.cfg.name, "smartify.workdir": str(self.workdir)}
        writer = TrackingWriter(self.stores)
        with parent_run(self.stores, self.cfg.experiment, self.run_name, tags, writer) as parent_id:
            writer.log_batch(parent_id, params={"workdir": str(self.workdir), "data_root": str(self.data_root)})
            result = PipelineResult(self.cfg.name, parent_id)
            self._log_pipeline(writer, parent_id)
            try:
                for step in self.cfg.steps:
                    log.info("pipeline %s: step %s", self.cfg.name, step.name)
                    if step.train:
                        writer.log_batch(parent_id, params={f"step/{step.name}/init_from": self.init_choice(step)})
                        result.steps.append(self.train(step, parent_id))
                    elif step.tune:
                        result.steps.append(self.tune(step, parent_id))
                    elif step.promote:
                        result.steps.append(self.promote(step, parent_id))
                    else:
                        step_result, result.submission = self.submit(step, parent_id)
                        result.steps.append(step_result)
                    self._log_step(writer, parent_id, result.steps[-1])
            finally:  # the table of the steps that ran, also when one raised
                result.seconds = time.perf_counter() - t0
                self._log_summary(writer, parent_id, result)
        return result

    # ----------------------------------------------------------------- the parent run's record
    def _log_pipeline(self, writer: TrackingWriter, run_id: str) -> None:
        """``pipeline.*`` params, the pipeline as it runs (``pipeline.yaml``) and its file (``source/``)."""
        resolved = self.resolved()
        params = {f"pipeline.{k}": v for k, v in resolved.items() if k not in ("steps", "synth")}
        params.update({f"pipeline.synth.{k}": v for k, v in (resolved.get("synth") or {}).items()})
        params.update({"pipeline.steps": len(self.cfg.steps), "pipeline.run_name": self.run_name,
                       "pipeline.device": self.device or "per stage"})
        if self.source is not None:
            params["pipeline.file"] = str(self.source)
        writer.log_batch(run_id, params={k: param_value(v)[0] for k, v in params.items()})
        with tempfile.TemporaryDirectory(prefix="smartify-pipeline-") as tmp:
            header = f"# pipeline {self.cfg.name} as it ran (from {self.source or 'a built configuration'})\n"
            writer.log_artifact(run_id, dump_yaml(resolved, Path(tmp) / "pipeline.yaml", header=header))
        if self.source is not None and Path(self.source).is_file():
            writer.log_artifact(run_id, self.source, "source")

    @staticmethod
    def _log_step(writer: TrackingWriter, run_id: str, step: StepResult) -> None:
        """``step/<name>/status`` and ``/action`` params, ``/score`` and ``/seconds`` metrics."""
        now = int(time.time() * 1000)
        metrics = [(f"step/{step.name}/seconds", float(step.seconds), now, 0)]
        if isinstance(step.score, (int, float)) and math.isfinite(step.score):
            metrics.append((f"step/{step.name}/score", float(step.score), now, 0))
        params = {f"step/{step.name}/status": step.status, f"step/{step.name}/action": step.action}
        if step.run_id:
            params[f"step/{step.name}/run_id"] = step.run_id
        writer.log_batch(run_id, metrics=metrics, params=params)

    def _log_summary(self, writer: TrackingWriter, run_id: str, result: PipelineResult) -> None:
        """Final scores as metrics, ``steps.md`` (also the run's description) and ``summary.txt``."""
        now = int(time.time() * 1000)
        metrics = [(name, value, now, 0) for name, value in score_metrics(result.submission or {}).items()]
        metrics.append(("pipeline/seconds", float(result.seconds), now, 0))
        table = format_steps_markdown(result)
        writer.log_batch(run_id, metrics=metrics, tags={"mlflow.note.content": table})
        with tempfile.TemporaryDirectory(prefix="smartify-pipeline-") as tmp:
            for name, text in (("steps.md", table), ("summary.txt", format_summary(result))):
                path = Path(tmp) / name
                path.write_text(text + "\n", encoding="utf-8")
                writer.log_artifact(run_id, path)
