"""``experiments/tiny/final.yaml``: the submission's own training, end to end on the tiny data.

Real stores (sqlite MLflow in the test's SMARTIFY_HOME), real HDF5 files (the session's ``tiny_data``), the
pipeline runner as ``smartify pipeline`` uses it. The records are compared with what ran: the pool size with
the slices of the train and val files read here, the MoE's start with the kept checkpoint file loaded here.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch

from recon.config import load_config
from recon.engine.checkpoint import Checkpoint
from recon.engine.stage import StageConfig
from recon.engine.trainer import ReconStage
from tracking.pipeline.config import load_pipeline
from tracking.pipeline.runner import PipelineRunner
from tracking.registry.versions import get_version_info
from tracking.runs.stores import make_client, resolve_stores

FINAL = Path(__file__).resolve().parents[2] / "experiments" / "tiny" / "final.yaml"


def _slices(folder: Path) -> int:
    total = 0
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as f:
            total += int(f["kspace"].shape[0])
    return total


@pytest.mark.slow
def test_final_pipeline_pools_val_keeps_epoch_and_starts_moe_from_it(tmp_path: Path, tiny_data: Path) -> None:
    workdir = tmp_path / "final"
    cfg, base = load_pipeline(FINAL, {"workdir": str(workdir), "data_root": str(tiny_data), "synth": None})
    stores = resolve_stores()
    result = PipelineRunner(cfg, base, stores=stores, device="cpu").run()

    status = {s.name: s.status for s in result.steps}
    assert all(status[n] == "finished" for n in ("hacker_baseline", "helper_baseline", "hacker_moe",
                                                 "hacker_clutch", "helper_moe", "classifier", "submit")), status
    assert all(status[n] == "promoted" for n in ("promote_hacker", "promote_helper", "promote_classifier")), status
    client = make_client(stores)
    experiment = client.get_experiment_by_name("smartify").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])
            if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id}

    # validation pooled into training: every epoch trains on train + val slices (files counted here)
    train_n, val_n = _slices(tiny_data / "train" / "kspace"), _slices(tiny_data / "val" / "kspace")
    assert val_n > 0
    for stage in ("hacker_baseline", "helper_baseline", "hacker_moe", "hacker_clutch", "helper_moe"):
        history = client.get_metric_history(runs[stage].info.run_id, "train/slices")
        assert history and {m.value for m in history} == {float(train_n + val_n)}, stage
        assert runs[stage].data.params["data.use_val_for_final"].lower() == "true"

    # the baseline keeps the state after 2 of its 3 epochs (the team's epoch 30 of 45), and selects by epoch
    kept = workdir / "hacker_baseline" / "checkpoints" / "epoch_002.pt"
    donor = Checkpoint.load(kept)
    last = Checkpoint.load(workdir / "hacker_baseline", which="last")
    assert donor.epoch == 1 and last.epoch == 2
    assert Checkpoint.load(workdir / "hacker_baseline", which="best").epoch == 2  # select_by last
    assert runs["hacker_baseline"].data.tags["smartify.best_epoch"] == "2"
    assert any(not torch.equal(donor.model[k], last.model[k]) for k in donor.model)  # the choice matters

    # the MoE ran from that file: its run, its config.yaml and the parent run's step param say so
    moe = runs["hacker_moe"]
    assert moe.data.tags["smartify.init_from"] == str(kept)
    assert moe.data.tags["smartify.init_from_run_id"] == runs["hacker_baseline"].info.run_id
    parent = client.get_run(result.parent_run_id).data.params
    assert parent["step/hacker_moe/init_from"] == "hacker_baseline: epoch_002.pt"
    assert parent["step/hacker_clutch/init_from"] == "hacker_moe: best checkpoint"
    assert runs["helper_moe"].data.tags["smartify.init_from"] == str(
        workdir / "helper_baseline" / "checkpoints" / "epoch_002.pt")
    # the weights at MoE start: its logged configuration, initialised as the stage does, equals the kept file
    moe_cfg, resolved = load_config(StageConfig, workdir / "hacker_moe" / "config.yaml")
    assert moe_cfg.init_from == str(kept)
    stage = ReconStage(moe_cfg, resolved)
    stage.init_weights(Checkpoint.load(moe_cfg.init_from))
    for name in stage.model.names:
        state = stage.model.experts[name].state_dict()
        assert all(torch.equal(state[k], donor.model[k]) for k in donor.model), name

    # the clutch: constant learning rate, one epoch after the MoE; the registered Hacker is trained on val
    lrs = [m.value for m in client.get_metric_history(runs["hacker_clutch"].info.run_id, "lr")]
    assert len(lrs) == 1 and lrs[0] == pytest.approx(2e-5)
    hacker = get_version_info("models:/smartify-hacker@champion", stores=stores)
    assert hacker.run_id == runs["hacker_clutch"].info.run_id
    assert "trained_on_val=True" in hacker.val_protocol
    sub = client.get_run(runs["submission"].info.run_id).data.metrics
    assert "submission/remasked/helper/leaderboard" in sub and "submission/hacker/leaderboard" in sub
