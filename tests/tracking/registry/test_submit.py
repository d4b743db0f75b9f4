"""Submission from the registry on the tiny synthetic leaderboard: the run names the versions it used.

The registry is a real SQLite store in a temp folder; the models are tiny random-init checkpoints
registered and promoted to ``champion`` here. The leaderboard comes from the session's
``tiny_data`` fixture (public masks everywhere, so every slice goes to the Hacker).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recon.errors import InputError
from recon.inference.evaluation import evaluate_folder
from tests.tracking.registry.test_registry import cli_env, save_tiny_checkpoint
from tracking.registry.promotion import promote
from tracking.registry.versions import ModelVersionInfo, register_stage
from tracking.runs.stores import Stores, make_client
from tracking.registry.submission import submit




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
        "routing.json", "manifest.json", "reconstruction.json", "versions.json", "evaluation.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    written = {str(p.relative_to(out)): _sha256(p) for p in sorted(out.glob("*/*.h5"))}
    assert manifest["sha256"] == written and manifest["files"] == len(written) == 8
    routing = json.loads((folder / "routing.json").read_text())
    assert routing["total_slices"] == result.recon.slices


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
