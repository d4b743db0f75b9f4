"""Submission from the registry on the tiny synthetic leaderboard: the run names the versions it used.

The registry is a real SQLite store in a temp folder; the models are tiny random-init checkpoints
registered and promoted to ``champion`` here. The leaderboard comes from the session's
``tiny_data`` fixture (public masks everywhere, so every slice goes to the Hacker); the robustness
tables are recomputed here from re-masked copies written afresh.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import h5py
import numpy as np
import torch

from recon.data.layout import discover_leaderboard
from recon.engine.stage import RemaskConfig
from recon.errors import InputError
from recon.inference.evaluation import evaluate_folder, write_remasked_leaderboard
from recon.inference.reconstruct import reconstruct_leaderboard
from recon.masks import is_public_pattern
from tests.tracking.registry.test_registry import cli_env, save_tiny_checkpoint
from tracking.registry.promotion import promote
from tracking.registry.versions import ModelVersionInfo, register_stage
from tracking.runs.stores import Stores, make_client
from tracking.registry.submission import _system, submit




@pytest.fixture(scope="module")
def registered(home: Path, stores: Stores) -> dict[str, ModelVersionInfo]:
    """Champions of the three names, plus a second Hacker version that is not the champion."""
    specs = {
        "hacker": ("moe", "hacker", 0.91, 1), "helper": ("baseline", "helper", 0.90, 2),
        "classifier": ("classifier", None, 0.99, 3), "hacker_v2": ("baseline", "hacker", 0.80, 4),
    }
    out = {}
    for key, (kind, family, score, seed) in specs.items():
        ckpt = save_tiny_checkpoint(home / "ckpt" / f"{key}.pt", kind=kind, family=family, score=score, seed=seed,
                                    stage=f"{key}_{kind}")
        out[key] = register_stage(ckpt, stores=stores, data_fingerprint="a" * 64)
        if key != "hacker_v2":
            assert promote(out[key].name, out[key].version, stores=stores).status == "promoted"
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submission_logs_champion_versions_scores_and_manifest(
    tmp_path: Path, tiny_data: Path, registered: dict[str, ModelVersionInfo], stores: Stores
) -> None:
    leaderboard, out = tiny_data / "leaderboard", tmp_path / "submission"

    result = submit(leaderboard, out, stores=stores, num_workers=0, batch_size=2)

    for role in ("hacker", "helper", "classifier"):
        assert result.versions[role].uri == registered[role].uri
    client = make_client(stores)
    run = client.get_run(result.run_id)
    assert run.info.run_name == "submission" and run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    for role in ("hacker", "helper", "classifier"):
        info = registered[role]
        assert params[f"{role}.name"] == info.name and params[f"{role}.version"] == str(info.version)
        assert params[f"{role}.run_id"] == info.run_id and params[f"{role}.source"] == info.source
        assert params[f"{role}.uri"] == f"models:/{info.name}@champion"
        assert tags[f"lineage.{role}"] == info.uri
    assert tags["smartify.kind"] == "submission"
    assert tags["smartify.models"] == ",".join(f"{registered[r].name}/{registered[r].version}"
                                               for r in ("hacker", "helper", "classifier"))
    assert params["anatomy_source"] == "classifier"

    # scores equal the official evaluation of the written folder
    expected = evaluate_folder(leaderboard, out)
    assert metrics["submission/leaderboard"] == pytest.approx(expected["leaderboard"])
    assert metrics["submission/ssim/acc4"] == pytest.approx(expected["acc4"])
    assert metrics["submission/ssim/acc8"] == pytest.approx(expected["acc8"])
    assert expected["groups"]  # per anatomy x acceleration, under the stage runs' group names
    for group, value in expected["groups"].items():
        assert metrics[f"submission/ssim/{group}"] == pytest.approx(value)
    assert not any(k.startswith("leaderboard/") for k in metrics)
    assert metrics["routing/hacker_ratio"] == pytest.approx(1.0)
    assert metrics["within_budget"] == 1.0 and 0 < metrics["time/total_s"] < 3600
    assert metrics["slices"] == result.recon.slices > 0

    # the manifest names every written file with its checksum
    folder = Path(client.download_artifacts(result.run_id, "submission", str(tmp_path / "art")))
    assert {p.name for p in folder.iterdir()} == {
        "routing.json", "manifest.json", "reconstruction.json", "versions.json", "evaluation.json",
        "robustness.md", "robustness.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    written = {str(p.relative_to(out)): _sha256(p) for p in sorted(out.glob("*/*.h5"))}
    assert manifest["sha256"] == written and manifest["files"] == len(written) == 8
    routing = json.loads((folder / "routing.json").read_text())
    assert routing["total_slices"] == result.recon.slices

    # robustness (on by default with labels): the Broker's public score is the submission's own
    assert params["robustness"] == "on" and params["robustness.protocol"] == RemaskConfig().protocol()
    assert params["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert metrics["submission/broker/leaderboard"] == metrics["submission/leaderboard"]
    # the Broker sent every public slice to the Hacker, so the Hacker's public score is that reconstruction
    assert metrics["submission/hacker/leaderboard"] == metrics["submission/leaderboard"]
    table = (folder / "robustness.md").read_text()
    assert "| Broker (submitted) |" in table and "| Hacker |" in table and "| Helper |" in table
    assert f"{metrics['submission/remasked/helper/leaderboard']:.4f}" in table


def _reconstruct_and_score(data: Path, out: Path, hacker, helper) -> tuple[dict, float]:
    recon = reconstruct_leaderboard(data, out, hacker, helper, anatomy_from_filename=True, num_workers=0,
                                    batch_size=2)
    return evaluate_folder(data, out), recon.routing.hacker_ratio


def test_robustness_scores_every_system_on_public_and_remasked_leaderboards(
    tmp_path: Path, tiny_data: Path, registered: dict[str, ModelVersionInfo], stores: Stores
) -> None:
    leaderboard = tiny_data / "leaderboard"
    result = submit(leaderboard, tmp_path / "sub", classifier=None, anatomy_from_filename=True, stores=stores,
                    num_workers=0, batch_size=2, device="cpu")
    metrics = make_client(stores).get_run(result.run_id).data.metrics

    # recompute every cell independently: the registered versions loaded afresh, the copies written afresh
    hacker = _system("hacker", registered["hacker"], stores)
    helper = _system("helper", registered["helper"], stores)
    public_helper, _ = _reconstruct_and_score(leaderboard, tmp_path / "public_helper", helper, helper)
    assert metrics["submission/helper/leaderboard"] == pytest.approx(public_helper["leaderboard"])
    assert metrics["submission/helper/ssim/acc8"] == pytest.approx(public_helper["acc8"])
    assert metrics["submission/helper/leaderboard"] != metrics["submission/hacker/leaderboard"]
    means = {"hacker": [], "helper": [], "broker": []}
    for kind in ("equispaced", "random"):
        data = tmp_path / "remasked" / kind
        kept = write_remasked_leaderboard(leaderboard, data, kind)
        for pair in discover_leaderboard(data).get("acc4", []) + discover_leaderboard(data).get("acc8", []):
            with h5py.File(pair.kspace) as f:  # never the public pattern; the k-space is the original
                mask = np.asarray(f["mask"][()]).reshape(-1)
                assert not is_public_pattern(mask)
                with h5py.File(leaderboard / pair.kspace.relative_to(data)) as g:
                    assert np.array_equal(f["kspace"][0], g["kspace"][0])
        again = write_remasked_leaderboard(leaderboard, tmp_path / "again" / kind, kind)
        assert again == kept  # deterministic per (file, kind)
        broker, ratio = _reconstruct_and_score(data, tmp_path / kind / "broker", hacker, helper)
        only_hacker, _ = _reconstruct_and_score(data, tmp_path / kind / "hacker", hacker, hacker)
        assert ratio == 0.0 == metrics[f"routing/remasked/{kind}/hacker_ratio"]
        for system, ev in (("broker", broker), ("helper", broker), ("hacker", only_hacker)):
            name = f"submission/remasked/{system}/{kind}"
            assert metrics[f"{name}/leaderboard"] == pytest.approx(ev["leaderboard"]), name
            assert metrics[f"{name}/ssim/acc4"] == pytest.approx(ev["acc4"]), name
            means[system].append(ev["leaderboard"])
    for system, values in means.items():
        assert metrics[f"submission/remasked/{system}/leaderboard"] == pytest.approx(sum(values) / 2)
    # the budget verdict is the submission's own reconstruction, not the extra ones
    assert metrics["time/total_s"] == pytest.approx(result.recon.total_s) and metrics["time/robustness_s"] > 0

    # --no-robustness: none of it
    off = submit(leaderboard, tmp_path / "off", classifier=None, anatomy_from_filename=True, stores=stores,
                 num_workers=0, robustness=False)
    run = make_client(stores).get_run(off.run_id)
    assert run.data.params["robustness"] == "off" and off.robustness is None
    assert not any(k.startswith("submission/remasked/") for k in run.data.metrics)
    with pytest.raises(InputError, match="robustness needs evaluation"):
        submit(leaderboard, tmp_path / "bad", classifier=None, anatomy_from_filename=True, stores=stores,
               evaluate=False, robustness=True)


def test_overrides_and_bad_reference(
    tmp_path: Path, tiny_data: Path, registered: dict[str, ModelVersionInfo], stores: Stores
) -> None:
    v2 = registered["hacker_v2"]
    out = tmp_path / "out"
    with pytest.raises(InputError, match="nobody"):
        submit(tiny_data / "leaderboard", out, classifier="models:/smartify-classifier@nobody", stores=stores)
    with pytest.raises(InputError, match="expected baseline or moe"):
        submit(tiny_data / "leaderboard", out, hacker=registered["classifier"].uri, stores=stores)
    assert not out.exists()  # nothing written before the references resolve

    result = submit(tiny_data / "leaderboard", out, hacker=v2.uri, classifier=None, anatomy_from_filename=True,
                    stores=stores, num_workers=0, evaluate=False)
    params = make_client(stores).get_run(result.run_id).data.params
    assert params["hacker.version"] == str(v2.version) and params["hacker.uri"] == v2.uri
    assert params["classifier"] == "none" and params["anatomy_source"] == "filename"
    assert result.evaluation is None


def test_submit_cli(tmp_path: Path, home: Path, tiny_data: Path, registered: dict[str, ModelVersionInfo],
                    stores: Stores) -> None:
    out = tmp_path / "cli_out"
    proc = subprocess.run(
        [sys.executable, "-m", "tracking.cli", "-q", "submit", "--data", str(tiny_data / "leaderboard"),
         "--out", str(out), "--anatomy-from-filename", "--workers", "0", "--no-eval", "--json"],
        capture_output=True, text=True, env={**cli_env(home), "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    run = make_client(stores).get_run(report["run_id"])
    assert run.data.params["hacker.version"] == str(registered["hacker"].version)
    assert run.data.params["classifier"] == "none"  # --anatomy-from-filename without --classifier
    files = [f["file"] for f in report["reconstruction"]["files"]]
    acc4 = sorted(name.split("/", 1)[1] for name in files if name.startswith("acc4/"))
    assert sorted(p.name for p in (out / "acc4").glob("*.h5")) == acc4 and len(acc4) == 4
