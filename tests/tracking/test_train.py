"""The one tracked-stage function (tracking.train) and the train command's rank arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon.engine.loop import DivergenceError
from recon.events import Callback, Divergence, EpochEnd
from tracking.runs import RUN_ID_KEY
from tracking.train import StageTracking, run_tracked_stage

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny"
FAST = ["data.max_train_slices=2", "data.max_val_slices=4", "train.panel_every=0", "train.epochs=1"]


def _overrides(data: Path, out: Path) -> list[str]:
    return [f"data.root={data}", f"output.dir={out}", *FAST]


class _Diverge(Callback):
    """Reports a divergence at the end of the first epoch, as a trial's reporter does on a NaN metric."""

    def on_epoch_end(self, event: EpochEnd) -> None:
        raise DivergenceError(Divergence(event.epoch, -1, "non-finite val/ssim", float("nan")))


def test_rank_argv_repeats_every_option_explicitly() -> None:
    from tracking.cli import build_parser
    from tracking.commands.train import rank_argv

    parser = build_parser()
    args = parser.parse_args(["-q", "train", "cfg.yaml", "--set", "a=1", "--set", "b=-2", "--resume", "runs/r",
                              "--init-from", "runs/x", "--no-tracking", "--experiment", "e",
                              "--parent-run-id", "p1", "--register", "--overwrite", "--nproc", "3",
                              "--run-name", "n1"])
    # a new train option must be added to rank_argv as well: this list fails until it is
    assert set(vars(args)) == {"verbose", "quiet", "command", "config", "overrides", "resume", "init_from",
                               "no_tracking", "experiment", "parent_run_id", "register", "overwrite", "nproc",
                               "func", "run_name", "print_config"}  # --print-config exits before any rank starts
    argv = rank_argv(args)
    assert "--nproc" not in " ".join(argv) and argv[:3] == ["-q", "train", "cfg.yaml"]
    again = vars(parser.parse_args(argv))
    assert {k: v for k, v in again.items() if k != "func"} == {**{k: v for k, v in vars(args).items()
                                                                  if k != "func"}, "nproc": 1}
    plain = rank_argv(parser.parse_args(["train", "cfg.yaml"]))
    assert plain == ["train", "cfg.yaml"]  # defaults are not repeated


def test_tracked_stage_logs_one_run_and_returns_its_outcome(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tracking.runs.stores import resolve_stores

    out = tmp_path / "stage"
    outcome = run_tracked_stage(TINY / "hacker_baseline.yaml", _overrides(tiny_data, out),
                                tracking=StageTracking("train-test", run_name="named", extra_tags={"k": "v"}))
    assert outcome.status == "finished" and outcome.error == ""
    assert outcome.output_dir == out and outcome.best_path == out / "checkpoints" / "best.pt"
    assert outcome.config.stage.name == "hacker_baseline" and outcome.version is None
    assert outcome.best_epoch == 0 and isinstance(outcome.best_metric, float) and outcome.seconds > 0
    stores = resolve_stores()
    run = MlflowClient(stores.tracking_uri).get_run(outcome.run_id)
    assert run.info.run_name == "named" and run.data.tags["k"] == "v"
    stored = torch.load(outcome.last_path, weights_only=True)["tracking"]
    assert stored[RUN_ID_KEY] == outcome.run_id  # the key a --resume reads the run back from


def test_untracked_stage_and_divergence(tiny_data: Path, tmp_path: Path) -> None:
    over = _overrides(tiny_data, tmp_path / "diverged")
    outcome = run_tracked_stage(TINY / "hacker_baseline.yaml", over, tracking=None, callbacks=[_Diverge()])
    assert outcome.status == "diverged" and "non-finite val/ssim" in outcome.error
    assert outcome.run_id is None and outcome.best_path is None and outcome.output_dir == tmp_path / "diverged"
    with pytest.raises(DivergenceError):
        run_tracked_stage(TINY / "hacker_baseline.yaml", over, tracking=None, callbacks=[_Diverge()],
                          raise_divergence=True)


def test_resume_takes_the_checkpoint_configuration(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    first = run_tracked_stage(TINY / "hacker_baseline.yaml", _overrides(tiny_data, out), tracking=None)
    again = run_tracked_stage(None, ["train.epochs=2"], resume=out, tracking=None)
    assert first.status == again.status == "finished"
    assert again.config.data.root == str(tiny_data) and again.config.train.epochs == 2
    assert torch.load(again.last_path, weights_only=True)["epoch"] == 1
