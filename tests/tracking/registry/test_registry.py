"""The model registry on a real SQLite store in a temp folder: register, list, load (also in a fresh process).

Checkpoints are tiny random-init PromptMR+ models (or a ResNet18 classifier) written with
``save_checkpoint``; their validation scores are set by hand. ``save_tiny_checkpoint`` and ``cli_env``
are shared with ``test_promotion.py`` and ``test_submit.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recon.engine.checkpoint import save_checkpoint
from recon.models.classifier import ClassifierConfig, SliceClassifier
from recon.data.names import EXPERTS
from recon.errors import InputError
from recon.models.experts import MixtureOfExperts
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR
from tracking.registry.artifact import WEIGHTS_FILE, weights_digest
from tracking.registry.loader import load_version
from tracking.registry.versions import get_version_info, list_versions, parse_model_ref, register_stage
from tracking.runs.stores import Stores, get_or_create_experiment, make_client

REPO = Path(__file__).resolve().parents[3]


def tiny_config(seed: int = 0) -> PromptMRConfig:
    """A PromptMR+ small enough to build in milliseconds."""
    return PromptMRConfig.preset(
        "smartify", num_cascades=1, n_feat0=4, feature_dim=(4, 4, 4), prompt_dim=(2, 2, 2), sens_n_feat0=2,
        sens_feature_dim=(2, 2, 2), sens_prompt_dim=(2, 2, 2), prompt_size=(4, 4, 2), reduction=1, n_history=0,
        use_checkpoint=False, sens_use_checkpoint=False, sens_per_coil=False, seed=seed,
    )


def save_tiny_checkpoint(
    path: Path, kind: str = "moe", family: str | None = "hacker", score: float = 0.9, seed: int = 0,
    run_id: str | None = None, stage: str | None = None,
) -> Path:
    """Write a best.pt with random weights (``seed``) and a hand-made validation score."""
    if kind == "classifier":
        ccfg = ClassifierConfig(arch="resnet18", seed=seed)
        model: torch.nn.Module = SliceClassifier(ccfg)
        model_config, experts = ccfg.to_dict(), []
        config = {"data": {"root": "data"}, "classifier": {"val_split": "val"}}
    else:
        cfg = tiny_config(seed)
        model = MixtureOfExperts(cfg) if kind == "moe" else PromptMR(cfg)
        model_config, experts = cfg.to_dict(), list(EXPERTS) if kind == "moe" else []
        config = {"data": {"root": "data", "num_adj_slices": 1, "val_split": "val", "max_val_slices": None}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return save_checkpoint(path, {
        "kind": kind, "stage": stage or f"{family or 'classifier'}_{kind}", "family": family, "epoch": 4,
        "config": config, "model_config": model_config, "experts": experts, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "best_metric": score, "best_epoch": 4,
        "metrics": {"val/ssim" if kind != "classifier" else "val/accuracy": score},
        "rng": {"torch": torch.random.get_rng_state()},
        "tracking": {"mlflow_run_id": run_id} if run_id else {},
    })



def cli_env(home: Path) -> dict[str, str]:
    """Environment for a ``smartify`` subprocess that uses the store under ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(SMARTIFY_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(REPO))
    return env



def _version_folder(stores: Stores, info) -> Path:
    """The local folder that holds a version's files (its download URI, a file URI in these tests)."""
    uri = make_client(stores).get_model_version_download_uri(info.name, str(info.version))
    return Path(uri.removeprefix("file://"))


def _stage_run(stores: Stores, fingerprint: str) -> str:
    """A run as the training callback leaves it: param data.fingerprint."""
    client = make_client(stores)
    run = client.create_run(get_or_create_experiment("smartify", stores, client), run_name="hacker_moe")
    client.log_param(run.info.run_id, "data.fingerprint", fingerprint)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_register_under_stage_run_and_load_in_fresh_process(tmp_path: Path, home: Path, stores: Stores) -> None:
    run_id = _stage_run(stores, "f" * 64)
    ckpt = save_tiny_checkpoint(tmp_path / "hacker_moe" / "checkpoints" / "best.pt", score=0.912, run_id=run_id)
    original = torch.load(ckpt, weights_only=True)

    info = register_stage(tmp_path / "hacker_moe", stores=stores)  # a stage folder resolves to best.pt

    assert info.source.startswith("models:/m-")  # an MLflow 3 logged model of the stage run
    folder = _version_folder(stores, info)
    assert folder.is_relative_to((home / "artifacts").resolve())
    assert (info.name, info.run_id, info.kind, info.stage, info.epoch) == (
        "smartify-hacker", run_id, "moe", "hacker_moe", 4)
    assert info.val_metric == "val/ssim" and info.val_score == pytest.approx(0.912)
    assert info.data_fingerprint == "f" * 64
    assert info.val_protocol == "split=val;max_slices=None;trained_on_val=False;remask=off"  # no validation.remask
    assert info.experts == EXPERTS
    assert info.tags["weights_digest"] == weights_digest(original["model"])
    client = make_client(stores)
    assert client.get_run(run_id).data.tags["registry.smartify-hacker"] == str(info.version)
    # the stored files: stripped of optimizer and RNG state, readable with weights_only=True
    files = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "model_config.json", "smartify-model.json", WEIGHTS_FILE, "MLmodel"} <= files
    stored = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    assert stored["optimizer"] is None and "rng" not in stored
    assert stored["config"] == original["config"]

    # a fresh interpreter loads the version through the registry alone
    code = (
        "import json, sys; from tracking.registry.loader import load_version; "
        "from tracking.registry.artifact import weights_digest; "
        f"m, p = load_version('models:/smartify-hacker/{info.version}'); "
        "print(json.dumps({'cls': type(m).__name__, 'digest': weights_digest(m.state_dict()), "
        "'experts': list(m.names), 'training': m.training, 'uri': p['registry']['uri']}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(home),
                          cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"cls": "MixtureOfExperts", "digest": weights_digest(original["model"]), "experts": list(EXPERTS),
                   "training": False, "uri": f"models:/smartify-hacker/{info.version}"}


def test_the_same_weights_from_another_training_run_are_a_new_version(tmp_path: Path, stores: Stores) -> None:
    # a re-run (e.g. the demo again) may reproduce the weights bit for bit; it is still a new run
    first = register_stage(save_tiny_checkpoint(tmp_path / "a.pt", kind="baseline", family="hacker", score=0.7,
                                                seed=11, stage="hacker_baseline", run_id="run-one"), stores=stores)
    second = register_stage(save_tiny_checkpoint(tmp_path / "b.pt", kind="baseline", family="hacker", score=0.7,
                                                 seed=11, stage="hacker_baseline", run_id="run-two"), stores=stores)
    assert second.version == first.version + 1
    assert first.tags["weights_digest"] == second.tags["weights_digest"]
    assert (first.tags["training_run"], second.tags["training_run"]) == ("run-one", "run-two")


def test_registration_without_run_is_idempotent(tmp_path: Path, stores: Stores) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", kind="baseline", family="helper", score=0.8, seed=3,
                                stage="helper_baseline")
    first = register_stage(ckpt, stores=stores)
    again = register_stage(ckpt, stores=stores)

    assert first.name == "smartify-helper" and first.kind == "baseline" and first.experts == ()
    assert again.version == first.version  # same weights, same version
    assert len(list_versions("smartify-helper", stores)) == 1
    assert first.data_fingerprint == "unknown"
    run = make_client(stores).get_run(first.run_id)
    assert run.info.run_name == "register-helper_baseline"
    assert run.data.tags["smartify.kind"] == "registration"

    # an explicit fingerprint and name; new weights give a new version
    other = save_tiny_checkpoint(tmp_path / "other.pt", kind="baseline", family="helper", score=0.81, seed=4)
    second = register_stage(other, stores=stores, name="smartify-helper", data_fingerprint="abc")
    assert second.version == first.version + 1 and second.data_fingerprint == "abc"


def test_alias_uri_loads_and_classifier_name(tmp_path: Path, stores: Stores) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "cls.pt", kind="classifier", family=None, score=0.99, seed=1)
    info = register_stage(ckpt, stores=stores)
    assert info.name == "smartify-classifier" and info.val_metric == "val/accuracy"
    make_client(stores).set_registered_model_alias(info.name, "champion", str(info.version))

    module, payload = load_version("models:/smartify-classifier@champion", stores=stores)

    assert isinstance(module, SliceClassifier) and not module.training
    assert weights_digest(module.state_dict()) == weights_digest(torch.load(ckpt, weights_only=True)["model"])
    assert payload["registry"]["version"] == info.version and payload["registry"]["aliases"] == ["champion"]
    assert get_version_info("smartify-classifier", alias="champion", stores=stores).version == info.version
    with pytest.raises(InputError, match="no alias 'nobody'"):
        load_version("models:/smartify-classifier@nobody", stores=stores)


def test_model_refs_are_parsed_strictly() -> None:
    assert parse_model_ref("models:/smartify-hacker/3") == ("smartify-hacker", 3, None)
    assert parse_model_ref("models:/smartify-hacker@champion") == ("smartify-hacker", None, "champion")
    assert parse_model_ref("smartify-helper", version="2") == ("smartify-helper", 2, None)
    for bad in ("models:/x", "models:/x/y", "runs:/abc/model"):
        with pytest.raises(InputError):
            parse_model_ref(bad)
    with pytest.raises(InputError, match="exactly one"):
        parse_model_ref("smartify-helper")


def test_corrupt_copy_and_mismatched_config_are_refused(tmp_path: Path, stores: Stores) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", kind="baseline", family="hacker", seed=7,
                                stage="hacker_baseline")
    info = register_stage(ckpt, stores=stores)
    weights = _version_folder(stores, info) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(InputError, match="weights_sha256"):
        load_version(info.uri, stores=stores)

    payload = torch.load(ckpt, weights_only=True)
    payload["model_config"] = tiny_config().replace(n_feat0=6).to_dict()
    bad = save_checkpoint(tmp_path / "bad.pt", payload)
    before = len(list_versions("smartify-hacker", stores))
    with pytest.raises(InputError, match="does not match the weights"):
        register_stage(bad, stores=stores)
    assert len(list_versions("smartify-hacker", stores)) == before


def test_models_cli_registers_and_lists(
    tmp_path: Path, home: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tracking.cli import main

    monkeypatch.setenv("SMARTIFY_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", kind="baseline", family="hacker", score=0.5, seed=11,
                                stage="cli_stage")
    assert main(["-q", "models", "register", str(ckpt)]) == 0
    registered = capsys.readouterr().out
    version = get_version_info(registered.split(":", 2)[0] + ":" + registered.split(":", 2)[1], stores=stores)
    assert version.stage == "cli_stage" and version.val_score == pytest.approx(0.5)
    make_client(stores).set_registered_model_alias("smartify-hacker", "champion", str(version.version))

    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "models", "list", "--name", "smartify-hacker"],
                          capture_output=True, text=True, env=cli_env(home), cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["NAME", "VERSION", "ALIASES", "METRIC", "SCORE"]
    row = next(line.split() for line in lines[1:] if "cli_stage" in line)
    assert row[:5] == ["smartify-hacker", str(version.version), "champion", "val/ssim", "0.5000"]
    assert len(lines) - 1 == len(list_versions("smartify-hacker", stores))
