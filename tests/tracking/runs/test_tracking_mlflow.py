"""The MLflow adapter against a real SQLite store in a temp folder, driven by synthetic engine events."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Metric, Param

from recon.events import CheckpointSaved, Divergence, EpochEnd, Panel, StageEnd, StageStart
from tracking.runs.callback import MLflowCallback
from tracking.runs.params import mlflow_key, param_value
from tracking.runs.parent import parent_run
from tracking.runs.spool import is_placeholder, spool_summary
from tracking.runs.stores import (
    Stores,
    default_optuna_storage,
    default_tracking_uri,
    get_or_create_experiment,
    make_client,
    resolve_stores,
    sqlite_uri,
)
from tracking.runs.replay import replay_spool
from tracking.runs.writer import TrackingWriter

CONFIG = {
    "stage": {"name": "hacker_baseline", "kind": "baseline"},
    "model": {"cascades": 2, "chans": [8, 16]},
    "optim": {"lr": 1e-3, "epochs": 5},
    "data": {"root": "/data/x", "accelerations": [4, 8]},
    "seed": 7,
}
GROUPS = ("brain_acc4", "brain_acc8", "knee_acc4", "knee_acc8")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Stores:
    home = tmp_path_factory.mktemp("mlruns")
    uri = sqlite_uri(home / "mlflow.db")
    return Stores(tracking_uri=uri, registry_uri=uri, home=home, artifact_root=home / "artifacts")


@pytest.fixture(scope="module")
def client(stores):
    return make_client(stores)


def stage_start(out: Path, start: int = 0, epochs: int = 3, config=CONFIG, **kw) -> StageStart:
    return StageStart(
        stage="hacker_baseline", kind="baseline", family="hacker", config=config,
        seeds={"global": 7, "mask": 11}, data_root="/data/x",
        data_fingerprint={"files": {"brain_acc4_1.h5": {"shape": [4, 8, 8], "size": 123}}, "digest": "abc123"},
        param_count=12345, device="cpu", determinism={"cudnn.benchmark": False, "deterministic": True},
        start_epoch=start, epochs=epochs, output_dir=out, **kw,
    )


def epoch_end(epoch: int, panels: bool = False) -> EpochEnd:
    rng = np.random.default_rng(epoch)
    metrics = {"train/loss": 1.0 / (epoch + 1), "val/ssim": 0.5 + 0.05 * epoch, "lr": 1e-3 * 0.9 ** epoch,
               "schedule/p_remask": 0.1 * epoch, "schedule/p_aug": 0.05 * epoch, "time/epoch_s": 1.5,
               "throughput/slices_per_s": 40.0, "memory/cpu_rss_peak_mb": 321.0 + epoch,
               "memory/probe_predicted_mb": 300.0, "best_val_ssim": 0.5 + 0.05 * epoch}
    metrics.update({f"val/ssim/{g}": 0.4 + 0.01 * i + 0.05 * epoch for i, g in enumerate(GROUPS)})
    shown = ()
    if panels:
        target = rng.random((16, 16))
        shown = (Panel("brain_acc4_1.h5:3", target, target * 0.5, target * 0.9),)
    return EpochEnd(epoch=epoch, metrics=metrics, panels=shown)


def checkpoint(out: Path, kind: str, epoch: int) -> CheckpointSaved:
    path = out / "checkpoints" / f"{kind}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.full((3,), float(epoch))}, "epoch": epoch}, path)
    return CheckpointSaved(path=path, kind=kind, epoch=epoch, metric=0.5 + 0.05 * epoch)


def run_epochs(cb: MLflowCallback, out: Path, epochs, panel_epoch=None) -> None:
    for e in epochs:
        cb.on_epoch_end(epoch_end(e, panels=e == panel_epoch))
        cb.on_checkpoint(checkpoint(out, "last", e))
        cb.on_checkpoint(checkpoint(out, "best", e))


def stage_end(out: Path, status: str = "finished") -> StageEnd:
    return StageEnd(status=status, best_metric=0.6, best_epoch=2, best_path=out / "checkpoints" / "best.pt",
                    last_path=out / "checkpoints" / "last.pt", output_dir=out)


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_stage_run_has_params_tags_metrics_artifacts_and_plots(stores, client, tmp_path):
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False)
    cb.on_stage_start(stage_start(tmp_path))
    run_epochs(cb, tmp_path, range(3), panel_epoch=1)
    cb.on_stage_end(stage_end(tmp_path))
    run_id = cb.state_dict()["mlflow_run_id"]
    run = client.get_run(run_id)

    p = run.data.params
    assert p["model.cascades"] == "2" and p["optim.lr"] == "0.001" and p["model.chans"] == "[8, 16]"
    assert p["seed.global"] == "7" and p["seed.mask"] == "11"
    assert p["data.root"] == "/data/x" and p["data.fingerprint"] == "abc123" and p["model.param_count"] == "12345"
    t = run.data.tags
    assert t["smartify.stage"] == "hacker_baseline" and t["smartify.family"] == "hacker"
    assert t["smartify.kind"] == "baseline" and t["device"] == "cpu" and t["smartify.status"] == "finished"
    assert t["determinism.cudnn.benchmark"] == "False" and t["determinism.deterministic"] == "True"
    assert len(t["git.commit"]) == 40 and t["git.dirty"] in ("true", "false")
    assert t["version.torch"] == torch.__version__ and t["version.mlflow"] and t["version.optuna"]
    assert run.info.status == "FINISHED" and run.info.run_name == "hacker_baseline"

    for key in ("train/loss", "val/ssim", "val/ssim/knee_acc8", "lr", "schedule/p_remask", "schedule/p_aug",
                "memory/cpu_rss_peak_mb", "memory/probe_predicted_mb", "best_val_ssim", "time/epoch_s",
                "throughput/slices_per_s"):
        assert steps(client, run_id, key) == [0, 1, 2], key
    assert run.data.metrics["memory/cpu_rss_peak_mb"] == 323.0

    arts = artifact_paths(client, run_id)
    assert {"config.yaml", "data_fingerprint.json", "metrics.md", "checkpoints/best.pt", "checkpoints/last.pt",
            "plots/curves.png", "plots/schedules.png"} <= arts
    from recon.engine.memory_meter import METRIC_DOCS

    docs = Path(client.download_artifacts(run_id, "metrics.md", str(tmp_path / "docs"))).read_text()
    assert all(f"`{name}` | {text} |" in docs for name, text in METRIC_DOCS.items())  # run-level documentation
    panels = sorted(a for a in arts if a.startswith("images/"))  # log_image series: one step per panel epoch
    assert len(panels) == 2 and all(a.startswith("images/reconstruction~brain_acc4_1.h5_3+step+1+") for a in panels)
    local = Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path / "dl")))
    assert torch.load(local, weights_only=True)["epoch"] == 2
    cfg = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert "cascades: 2" in cfg.read_text()
    png = Path(client.download_artifacts(run_id, "plots/curves.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.info.artifact_uri.startswith((stores.artifact_root / "unit").as_uri())
    assert spool_summary(stores.spool_dir) == {}


def test_plots_are_redrawn_on_panel_epochs_and_when_the_stage_ends_early(stores, client, tmp_path):
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=5))
    run_id = cb.state_dict()["mlflow_run_id"]
    curves = tmp_path / "plots" / "curves.png"
    cb.on_epoch_end(epoch_end(0))
    assert cb.flush_plots() == 0 and not curves.exists()  # no panels on this epoch: nothing drawn
    cb.on_epoch_end(epoch_end(1, panels=True))
    assert cb.flush_plots() == 0
    after_panels = curves.read_bytes()
    assert "plots/curves.png" in artifact_paths(client, run_id)
    cb.on_epoch_end(epoch_end(2))
    cb.flush_plots()
    assert curves.read_bytes() == after_panels
    cb.on_stage_end(stage_end(tmp_path, status="killed"))  # stopped after epoch 2 of 5
    final = curves.read_bytes()
    assert final != after_panels  # the end of the stage draws epoch 2 as well
    logged = Path(client.download_artifacts(run_id, "plots/curves.png", str(tmp_path / "dl"))).read_bytes()
    assert logged == final
    assert "plots/schedules.png" in artifact_paths(client, run_id)


def test_a_figure_that_fails_in_the_helper_is_an_error_line_and_the_rest_is_logged(stores, client, tmp_path,
                                                                                   caplog):
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=1))
    run_id = cb.state_dict()["mlflow_run_id"]
    bad = Panel("brain_acc4_1.h5:3", np.zeros((16, 16)), np.zeros((8, 8)), np.zeros((16, 16)))
    good = epoch_end(0)
    with caplog.at_level("ERROR", logger="tracking.runs.renderer"):
        cb.on_epoch_end(EpochEnd(epoch=0, metrics=good.metrics, panels=(bad,)))
        cb.on_stage_end(stage_end(tmp_path))
    assert any("plot panel not made" in r.getMessage() and "needs three 2-D arrays" in r.getMessage()
               for r in caplog.records)
    arts = artifact_paths(client, run_id)
    assert {"plots/curves.png", "plots/schedules.png"} <= arts and not any(a.startswith("images/") for a in arts)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_reopens_the_run_without_duplicates_or_new_param_values(stores, client, tmp_path):
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=5))
    run_epochs(cb, tmp_path, range(3))
    state = cb.state_dict()
    cb.on_stage_end(stage_end(tmp_path, status="failed"))  # crash after epoch 2's metrics
    assert client.get_run(state["mlflow_run_id"]).info.status == "FAILED"

    changed = {**CONFIG, "optim": {"lr": 5e-4, "epochs": 5, "warmup": 2}}
    cb2 = MLflowCallback(stores, experiment="unit", system_metrics=False)
    # The last checkpoint was of epoch 1, so the engine replays epoch 2 before 3 and 4.
    cb2.on_stage_start(stage_start(tmp_path, start=2, epochs=5, config=changed, resume_state=state))
    run_epochs(cb2, tmp_path, range(2, 5))
    cb2.on_stage_end(stage_end(tmp_path))

    run_id = state["mlflow_run_id"]
    assert cb2.state_dict() == state
    run = client.get_run(run_id)
    for key in ("train/loss", "val/ssim/brain_acc4", "memory/cpu_rss_peak_mb", "lr"):
        assert steps(client, run_id, key) == [0, 1, 2, 3, 4], key
    epoch2 = [m.value for m in client.get_metric_history(run_id, "memory/cpu_rss_peak_mb") if m.step == 2]
    assert epoch2 == [323.0]
    assert run.data.params["optim.lr"] == "0.001"  # params are immutable: first value kept
    assert run.data.params["optim.warmup"] == "2"  # a new key is logged
    assert run.data.tags["resume.changed_params"] == "optim.lr"
    assert run.data.tags["smartify.resumed_at_epoch"] == "2"
    assert run.info.status == "FINISHED"
    assert "config_resumed_epoch0002.yaml" in artifact_paths(client, run_id)
    assert len(client.search_runs([run.info.experiment_id], f"tags.`smartify.output_dir` = '{tmp_path}'")) == 1


def test_resume_while_offline_then_sync(stores, client, tmp_path):
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False, artifact_checkpoints=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=5))
    run_epochs(cb, tmp_path, range(3))
    cb.on_stage_end(stage_end(tmp_path, status="failed"))
    state = cb.state_dict()

    offline = TrackingWriter(stores, spool_dir=tmp_path / "spool", offline=True)
    changed = {**CONFIG, "optim": {"lr": 5e-4, "epochs": 5}}
    cb2 = MLflowCallback(stores, experiment="unit", system_metrics=False, artifact_checkpoints=False, writer=offline)
    cb2.on_stage_start(stage_start(tmp_path, start=2, epochs=5, config=changed, resume_state=state))
    run_epochs(cb2, tmp_path, range(2, 5))
    cb2.on_stage_end(stage_end(tmp_path))
    run_id = state["mlflow_run_id"]
    assert cb2.state_dict() == state and steps(client, run_id, "train/loss") == [0, 1, 2]

    stats = replay_spool(stores, spool_dir=tmp_path / "spool")
    assert stats.pending == 0 and stats.rejected == 0 and stats.skipped_metrics == len(epoch_end(2).metrics)
    run = client.get_run(run_id)
    assert steps(client, run_id, "train/loss") == [0, 1, 2, 3, 4] and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.tags["resume.changed_params"] == "optim.lr"


def test_pipeline_parent_and_lineage_tags(stores, client, tmp_path):
    writer = TrackingWriter(stores)
    with parent_run(stores, "unit", "pipeline", writer=writer) as parent_id:
        first = MLflowCallback(stores, "unit", parent_run_id=parent_id, system_metrics=False, writer=writer)
        first.on_stage_start(stage_start(tmp_path / "a", epochs=1))
        run_epochs(first, tmp_path / "a", [0])
        first.on_stage_end(stage_end(tmp_path / "a"))
        second = MLflowCallback(stores, "unit", parent_run_id=parent_id, run_name="helper", system_metrics=False,
                                writer=writer, extra_tags={"note": "x"})
        second.on_stage_start(stage_start(tmp_path / "b", epochs=1, init_from=str(tmp_path / "a/checkpoints/best.pt"),
                                          init_from_state=first.state_dict()))
        second.on_stage_end(stage_end(tmp_path / "b"))
    child = client.get_run(second.state_dict()["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["smartify.init_from_run_id"] == first.state_dict()["mlflow_run_id"]
    assert child.data.tags["note"] == "x" and child.info.run_name == "helper"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["smartify.kind"] == "pipeline"


def test_divergence_ends_the_run_failed(stores, client, tmp_path):
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False, artifact_checkpoints=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=2))
    run_epochs(cb, tmp_path, [0])
    cb.on_divergence(Divergence(epoch=1, step=17, reason="loss is nan", loss=float("nan")))
    cb.on_stage_end(stage_end(tmp_path, status="diverged"))
    run = client.get_run(cb.state_dict()["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["smartify.divergence"] == "loss is nan" and run.data.tags["smartify.divergence_step"] == "17"
    assert not any(a.startswith("checkpoints/") for a in artifact_paths(client, run.info.run_id))


def test_long_params_and_odd_names_are_made_valid(stores, client, tmp_path):
    config = {**CONFIG, "notes": "x" * 7000, "odd key!": {"a*b": 1}}
    cb = MLflowCallback(stores, experiment="unit", system_metrics=False, artifact_checkpoints=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=1, config=config))
    cb.on_epoch_end(EpochEnd(epoch=0, metrics={"val/ssim/brain acc4*": 0.5, "val//x/../y": 0.1}))
    cb.on_stage_end(stage_end(tmp_path))
    run = client.get_run(cb.state_dict()["mlflow_run_id"])
    assert len(run.data.params["notes"]) == 6000 and "truncated 7000 chars" in run.data.params["notes"]
    assert run.data.params["odd key_.a_b"] == "1"
    assert run.data.tags["smartify.truncated_params"] == "notes"
    assert set(run.data.metrics) == {"val/ssim/brain acc4_", "val/x/_/y"}
    assert mlflow_key("/a//b/") == "a/b" and param_value([1, 2]) == ("[1,2]", False)


def test_system_metrics_are_logged(stores, client, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cb = MLflowCallback(stores, experiment="unit", artifact_checkpoints=False)
    cb.on_stage_start(stage_start(tmp_path, epochs=2))
    cb.on_epoch_end(epoch_end(0))
    run_id = cb.state_dict()["mlflow_run_id"]
    deadline = time.monotonic() + 20.0  # the monitor samples in a thread; a loaded machine delays it
    while time.monotonic() < deadline and not any(k.startswith("system/cpu") for k in
                                                  client.get_run(run_id).data.metrics):
        time.sleep(0.3)
    cb.on_epoch_end(epoch_end(1))
    cb.on_stage_end(stage_end(tmp_path))
    run = client.get_run(run_id)
    assert run.data.tags["smartify.system_metrics"] == "mlflow"
    assert any(k.startswith("system/cpu") for k in run.data.metrics)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_spools_without_blocking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    stores = Stores(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", tmp_path, None)
    cb = MLflowCallback(stores, experiment="offline", system_metrics=False)
    start = time.monotonic()
    cb.on_stage_start(stage_start(tmp_path / "out"))
    run_epochs(cb, tmp_path / "out", range(3), panel_epoch=1)
    cb.on_stage_end(stage_end(tmp_path / "out"))
    assert time.monotonic() - start < 30  # connection refused, no long retries
    run_id = cb.state_dict()["mlflow_run_id"]
    assert is_placeholder(run_id)
    pending = spool_summary(stores.spool_dir)
    # create_run, params, datasets, config, fingerprint, metric docs, 3 x (metrics, 2 checkpoints, best tags),
    # 2 plots on the panel epoch and 2 after the last epoch, the panel image, end tags, end
    assert pending == {run_id: 6 + 3 * 4 + 2 * 2 + 1 + 2}
    # superseded artifacts keep one spooled file per destination
    files = sorted(p.name.split("-", 1)[1] for p in (stores.spool_dir / f"{run_id}.files").iterdir())
    assert files == sorted(["config.yaml", "data_fingerprint.json", "metrics.md", "curves.png", "schedules.png",
                            "last.pt",
                            "best.pt", "brain_acc4_1.h5_3_epoch0001.png"])


def test_offline_spool_replays_exactly_once(stores, client, tmp_path):
    spool_dir = tmp_path / "spool"
    exp = get_or_create_experiment("replay", stores, client)
    run_id = client.create_run(exp).info.run_id
    client.log_batch(run_id, metrics=[Metric("a", 1.0, 1, 0), Metric("a", 2.0, 2, 1)], params=[Param("p", "1")])

    off = TrackingWriter(stores, spool_dir=spool_dir, offline=True)
    parent = off.create_run("replay", "parent", {"smartify.kind": "pipeline"})
    child = off.create_run("replay", "child", {"mlflow.parentRunId": parent})
    off.log_batch(child, metrics=[("loss", 0.5, 10, 0), ("loss", 0.4, 11, 1)], params={"lr": "0.1"})
    off.log_batch(run_id, metrics=[("a", 2.5, 3, 1), ("a", 3.0, 4, 2)], params={"p": "2", "q": "3"})
    off.log_batch(run_id, metrics=[("a", 3.5, 5, 2)])  # the same step again (engine replayed an epoch)
    for version in ("old", "new"):
        (tmp_path / "notes.txt").write_text(version)
        off.log_artifact(run_id, tmp_path / "notes.txt", "docs", name="notes.txt")
    off.set_terminated(run_id, "FINISHED")
    off.set_terminated(child, "FINISHED")
    assert off.flush().sent == 0 and sum(spool_summary(spool_dir).values()) == 9

    stats = replay_spool(stores, spool_dir=spool_dir)
    assert (stats.created, stats.skipped_metrics, stats.superseded, stats.rejected, stats.pending) == (2, 2, 1, 0, 0)
    assert spool_summary(spool_dir) == {} and not list(spool_dir.glob("*.files"))
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "a"), key=lambda m: m.step)] == [
        (0, 1.0), (1, 2.0), (2, 3.0)]
    run = client.get_run(run_id)
    assert run.data.params == {"p": "1", "q": "3"} and run.data.tags["resume.changed_params"] == "p"
    assert run.info.status == "FINISHED"
    notes = Path(client.download_artifacts(run_id, "docs/notes.txt", str(tmp_path / "dl")))
    assert notes.read_text() == "new"
    real_child = off.resolve(child)
    child_run = client.get_run(real_child)
    assert child_run.data.tags["mlflow.parentRunId"] == off.resolve(parent) and child_run.info.run_name == "child"
    assert steps(client, real_child, "loss") == [0, 1] and child_run.data.params == {"lr": "0.1"}
    assert replay_spool(stores, spool_dir=spool_dir).sent == 0


def test_panel_plot_checks_its_input(tmp_path):
    from tracking.runs.plots import plot_panel

    good = Panel("a", np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 8)))
    assert plot_panel([good], tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one shape"):
        plot_panel([Panel("b", np.zeros((8, 8)), np.zeros((8, 9)), np.zeros((8, 8)))], tmp_path / "q.png")
    with pytest.raises(ValueError, match="no panels"):
        plot_panel([], tmp_path / "r.png")
    assert not (tmp_path / "q.png").exists()


def test_stores_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTIFY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    s = resolve_stores()
    assert s.tracking_uri == default_tracking_uri() == f"sqlite:///{tmp_path}/home/mlflow.db"
    assert s.registry_uri == s.tracking_uri and s.artifact_root == tmp_path / "home" / "artifacts"
    assert default_optuna_storage() == f"sqlite:///{tmp_path}/home/optuna.db" and not s.is_remote
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    s = resolve_stores()
    assert s.is_remote and s.artifact_root is None and s.registry_uri == "http://127.0.0.1:5999"
    assert resolve_stores("sqlite:////x/y.db").tracking_uri == "sqlite:////x/y.db"
    with pytest.raises(ValueError, match="file store"):
        resolve_stores("file:///tmp/mlruns")


def test_experiment_gets_explicit_artifact_location(stores, client):
    exp_id = get_or_create_experiment("located", stores, client)
    assert get_or_create_experiment("located", stores, client) == exp_id
    assert client.get_experiment(exp_id).artifact_location == (stores.artifact_root / "located").as_uri()


def smartify(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracking.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_cli_tracking_info_sync_and_ui_dry_run(tmp_path):
    env = {"SMARTIFY_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": ""}
    info = smartify("tracking", "info", env=env)
    assert info.returncode == 0, info.stderr
    assert f"sqlite:///{tmp_path}/mlflow.db" in info.stdout and "pending records: 0" in info.stdout
    sync = smartify("tracking", "sync", env=env)
    assert sync.returncode == 0, sync.stderr
    assert "sent 0" in sync.stdout and "pending 0" in sync.stdout
    ui = smartify("ui", "--dry-run", "--port", "5077", env=env)
    assert ui.returncode == 0, ui.stderr
    assert "http://127.0.0.1:5077" in ui.stdout and f"sqlite:///{tmp_path}/mlflow.db" in ui.stdout
    assert (tmp_path / "artifacts").as_uri() in ui.stdout


def test_ui_warns_about_a_non_loopback_host(tmp_path, monkeypatch, capsys):
    from tracking.cli import main

    monkeypatch.setenv("SMARTIFY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui", "--dry-run", "--host", "0.0.0.0", "--port", "5078"]) == 0
    out, err = capsys.readouterr()
    assert "warning: --host 0.0.0.0" in err and "--host 0.0.0.0" in out and "open http://127.0.0.1:5078" in out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert main(["ui", "--dry-run"]) == 0
    assert "open it there" in capsys.readouterr().out
