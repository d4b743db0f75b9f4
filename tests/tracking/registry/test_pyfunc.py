"""Registered versions as standard MLflow models, on a real SQLite store in a temp folder.

``mlflow.pyfunc.load_model`` (fresh process) against ``smartify reconstruct``; the signature and
its enforcement; the logged model's links; pickled code refused by every loading path;
``smartify models serve`` (``mlflow models serve``) answering one request; ``smartify models upgrade`` of a
version registered before pyfunc models; ``smartify tracking info``'s artifact root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from recon.data.names import EXPERTS
from recon.engine.checkpoint import Checkpoint, save_checkpoint
from recon.errors import InputError
from recon.models.experts import MixtureOfExperts
from tests.services import free_port, wait_gone
from tests.tracking.registry.test_registry import cli_env, save_tiny_checkpoint, tiny_config
from tracking.registry.artifact import DESCRIPTION_FILE, WEIGHTS_FILE, export_version_files, file_sha256
from tracking.registry.loader import load_version
from tracking.registry.versions import register_stage
from tracking.runs.stores import Stores, make_client

ADJ = 3  # adjacent slices of the test model: neighbours must be taken as smartify reconstruct takes them


def _moe_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny Hacker MoE with 3 adjacent slices (random weights)."""
    cfg = tiny_config(seed).replace(num_adj_slices=ADJ)
    model = MixtureOfExperts(cfg)
    return save_checkpoint(path, {
        "kind": "moe", "stage": "hacker_moe", "family": "hacker", "epoch": 2,
        "config": {"data": {"root": "data", "num_adj_slices": ADJ, "val_split": "val", "max_val_slices": None}},
        "model_config": cfg.to_dict(), "experts": list(EXPERTS), "model": model.state_dict(),
        "best_metric": 0.5, "best_epoch": 2, "metrics": {"val/ssim": 0.5},
    })


def _env(home: Path) -> dict[str, str]:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = cli_env(home)
    # mlflow models serve runs `uvicorn` from PATH: this interpreter's scripts folder first
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": path}


def _folder(stores: Stores, name: str, version: int) -> Path:
    return Path(make_client(stores).get_model_version_download_uri(name, str(version)).removeprefix("file://"))


def _request(kspace_file: Path) -> dict[str, np.ndarray]:
    with h5py.File(kspace_file, "r") as f:
        kspace, mask = f["kspace"][()], np.asarray(f["mask"][()], dtype=np.float32)
    return {"kspace": np.stack([kspace.real, kspace.imag], axis=-1).astype(np.float32), "mask": mask}


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory, stores: Stores):
    """A registered Hacker MoE with alias ``champion``; returns ``(checkpoint file, version info)``."""
    ckpt = _moe_checkpoint(tmp_path_factory.mktemp("pyfunc") / "hacker_moe" / "checkpoints" / "best.pt")
    info = register_stage(ckpt, stores=stores)
    make_client(stores).set_registered_model_alias(info.name, "champion", str(info.version))
    return ckpt, info


def test_pyfunc_in_fresh_process_equals_smartify_reconstruct(
    tmp_path: Path, home: Path, tiny_data: Path, champion
) -> None:
    ckpt, info = champion
    out = tmp_path / "recon"
    done = subprocess.run(
        [sys.executable, "-m", "tracking.cli", "reconstruct", "--hacker", str(ckpt), "--helper", str(ckpt),
         "--anatomy-from-filename", "--data", str(tiny_data / "leaderboard"), "--out", str(out), "--workers", "0",
         "--no-eval", "--json"], capture_output=True, text=True, env=cli_env(home), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    files = {"acc4/brain_test1.h5": "brain", "acc8/knee_test2.h5": "knee"}
    code = (
        "import sys, json, h5py, numpy as np, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/smartify-hacker@champion')\n"
        "for rel, anatomy in json.loads(sys.argv[1]).items():\n"
        "    with h5py.File(sys.argv[2] + '/' + rel.replace('/', '/kspace/'), 'r') as f:\n"
        "        k, mask = f['kspace'][()], f['mask'][()].astype(np.float32)\n"
        "    x = {'kspace': np.stack([k.real, k.imag], -1).astype(np.float32), 'mask': mask}\n"
        "    y = m.predict(x, params={'anatomy': anatomy, 'crop': 64})\n"
        "    np.save(sys.argv[3] + '/' + rel.replace('/', '_') + '.npy', y)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(files), str(tiny_data / "leaderboard"),
                           str(tmp_path)], capture_output=True, text=True, env=_env(home), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in files:
        with h5py.File(out / rel, "r") as f:
            expected = f["reconstruction"][()]
        got = np.load(tmp_path / (rel.replace("/", "_") + ".npy"))
        assert got.dtype == np.float32 and got.shape == expected.shape == (expected.shape[0], 64, 64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        assert float(np.abs(expected).max()) > 0


def test_logged_model_signature_example_and_links(stores: Stores, champion) -> None:
    import mlflow

    _, info = champion
    client = make_client(stores)
    model_id = info.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == info.run_id and logged.status.to_proto() == 2  # READY
    assert {"name": info.name, "version": str(info.version)} in json.loads(logged.tags["mlflow.modelVersions"])
    assert model_id in [o.model_id for o in client.get_run(info.run_id).outputs.model_outputs]

    mlflow.set_tracking_uri(stores.tracking_uri)
    mlflow.set_registry_uri(stores.registry_uri)
    model = mlflow.pyfunc.load_model(f"models:/{info.name}@champion")
    assert model.metadata.flavors["python_function"]["loader_module"] == "tracking.registry.pyfunc"
    assert "data" not in model.metadata.flavors["python_function"]  # MLflow passes the version folder
    sig = model.metadata.signature
    assert [(s.name, s.shape) for s in sig.inputs.inputs] == [("kspace", (-1, -1, -1, -1, 2)), ("mask", (-1,))]
    assert {p.name: p.default for p in sig.params.params} == {"anatomy": "", "crop": 384, "batch_size": 4}
    # the stored input example is a request the model answers
    example = model.input_example
    example_params = model.metadata.load_input_example_params(str(_folder(stores, info.name, info.version)))
    assert example_params == {"anatomy": "brain", "crop": 32, "batch_size": 1}
    y = model.predict(example, params=example_params)
    assert y.shape == (1, 32, 32) and y.dtype == np.float32 and np.isfinite(y).all()

    good = {"kspace": np.zeros((1, 2, 32, 32, 2), np.float32), "mask": np.ones(32, np.float32)}
    with pytest.raises(Exception, match="kspace") as wrong_rank:
        model.predict({**good, "kspace": np.zeros((1, 2, 32, 32), np.float32)}, params={"anatomy": "brain"})
    assert "shape" in str(wrong_rank.value)
    with pytest.raises(Exception, match="mask"):
        model.predict({**good, "mask": np.ones((1, 32), np.float32)}, params={"anatomy": "brain"})
    with pytest.raises(InputError, match="param 'anatomy' must be brain or knee"):
        model.predict(good, params={"crop": 32})  # a mixture of experts needs the anatomy


class _Payload:
    """Pickles to a call of ``print``: what a checkpoint with pickled code runs under ``weights_only=False``."""

    def __reduce__(self):
        return (print, ("x",))


def test_pickled_code_is_refused_by_every_loading_path(tmp_path: Path, stores: Stores, capfd) -> None:
    import mlflow

    info = register_stage(save_tiny_checkpoint(tmp_path / "best.pt", kind="baseline", seed=11,
                                               stage="hacker_pickled"), stores=stores)
    folder = _folder(stores, info.name, info.version)
    weights = folder / WEIGHTS_FILE
    payload = torch.load(weights, weights_only=True)
    payload["metrics"] = {"val/ssim": _Payload()}
    torch.save(payload, weights)
    # the hashes are updated too, so that weights_only=True is what refuses it
    description = json.loads((folder / DESCRIPTION_FILE).read_text())
    description["weights_sha256"] = file_sha256(weights)
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description))
    make_client(stores).set_model_version_tag(info.name, str(info.version), "weights_sha256", file_sha256(weights))

    mlflow.set_tracking_uri(stores.tracking_uri)
    mlflow.set_registry_uri(stores.registry_uri)
    with pytest.raises(InputError, match="refused: it holds pickled code") as by_pyfunc:
        mlflow.pyfunc.load_model(info.uri)
    with pytest.raises(InputError, match="refused: it holds pickled code") as by_loader:
        load_version(info.uri, stores=stores)
    with pytest.raises(InputError, match="refused: it holds pickled code"):
        register_stage(weights, stores=stores)
    for error in (by_pyfunc.value, by_loader.value):
        assert "\n" not in str(error)
    assert "x" not in capfd.readouterr().out.split()  # print never ran

    weights.write_bytes(weights.read_bytes()[:-8] + b"01234567")  # an altered copy: the hash check refuses it
    with pytest.raises(InputError, match="weights_sha256"):
        mlflow.pyfunc.load_model(info.uri)


def test_tracking_info_shows_the_artifact_root_in_use(home: Path, stores: Stores, champion) -> None:
    done = subprocess.run([sys.executable, "-m", "tracking.cli", "tracking", "info"], capture_output=True,
                          text=True, env=cli_env(home), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    location = make_client(stores).get_experiment_by_name("smartify").artifact_location
    assert f"experiment smartify artifact location: {location}" in done.stdout.splitlines()


@pytest.mark.integration
@pytest.mark.slow
def test_smartify_models_serve_answers_with_the_reconstruction(home: Path, stores: Stores, tiny_data: Path,
                                                              champion) -> None:
    import mlflow

    mlflow.set_tracking_uri(stores.tracking_uri)
    mlflow.set_registry_uri(stores.registry_uri)
    request = _request(tiny_data / "leaderboard" / "acc4" / "kspace" / "knee_test1.h5")
    params = {"anatomy": "knee", "crop": 64}
    expected = mlflow.pyfunc.load_model("models:/smartify-hacker@champion").predict(request, params=params)

    port = free_port()
    log = open(home / "serve.log", "wb")
    env = cli_env(home)  # the command itself puts this interpreter's scripts folder (uvicorn) on PATH
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracking.cli", "models", "serve", "smartify-hacker@champion", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "smartify models serve did not answer /ping"
                time.sleep(0.5)
        body = json.dumps({"inputs": {k: v.tolist() for k, v in request.items()}, "params": params}).encode()
        post = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as reply:
            answer = np.asarray(json.loads(reply.read())["predictions"], dtype=np.float32)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the server's process group, by its PID
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if wait_gone(proc.pid, 30):
                break
        proc.wait(timeout=30)
        log.close()
    assert answer.shape == expected.shape
    np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_models_upgrade_makes_an_old_version_load_as_pyfunc_with_the_champions_output(
    tmp_path: Path, home: Path, stores: Stores, tiny_data: Path, champion
) -> None:
    import mlflow

    # a version as registered before pyfunc models: the files under the run's artifacts, no MLmodel
    client = make_client(stores)
    checkpoint = Checkpoint.load(_moe_checkpoint(tmp_path / "hacker_moe" / "best.pt"))  # the champion's weights
    description = export_version_files(checkpoint, tmp_path / "files")
    run = client.create_run(client.get_experiment_by_name("smartify").experiment_id)
    client.log_artifacts(run.info.run_id, str(tmp_path / "files"), "registry/smartify-old/v1")
    client.create_registered_model("smartify-old")
    client.create_model_version("smartify-old", f"{run.info.artifact_uri}/registry/smartify-old/v1",
                                run.info.run_id, tags={"kind": "moe", "weights_sha256": description["weights_sha256"]})
    mlflow.set_tracking_uri(stores.tracking_uri)
    mlflow.set_registry_uri(stores.registry_uri)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match='Could not find an "MLmodel"'):
        mlflow.pyfunc.load_model("models:/smartify-old/1")  # no MLmodel yet

    def upgrade() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tracking.cli", "models", "upgrade", "smartify-old", "1"],
                              capture_output=True, text=True, env=cli_env(home), timeout=300)

    first, second = upgrade(), upgrade()
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip().startswith("models:/smartify-old/1: added MLmodel (pyfunc")
    assert second.returncode == 0 and second.stdout.strip() == "models:/smartify-old/1: already has an MLmodel"
    request = _request(tiny_data / "leaderboard" / "acc8" / "kspace" / "knee_test2.h5")
    params = {"anatomy": "knee", "crop": 64}
    got = mlflow.pyfunc.load_model("models:/smartify-old/1").predict(request, params=params)
    expected = mlflow.pyfunc.load_model("models:/smartify-hacker@champion").predict(request, params=params)
    np.testing.assert_array_equal(got, expected)
    assert float(np.abs(expected).max()) > 0
