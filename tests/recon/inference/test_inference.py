"""Inference: the Broker's routing, leaderboard reconstruction, and the ``smartify reconstruct`` CLI.

The leaderboard here is written by the test itself (real HDF5 files in the challenge layout) so
that each file's mask can be chosen: public-pattern files go to the Hacker system, files with a
shifted equispaced mask to the Helper. The systems are tiny random-init PromptMR+ checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from recon.engine.checkpoint import save_checkpoint
from recon.models.classifier import ClassifierConfig, SliceClassifier
from recon.data.names import EXPERTS
from recon.errors import InputError
from recon.models.experts import MixtureOfExperts
from recon.fft import center_crop, fft2c_np
from recon.inference.broker import Router, route_slice
from recon.inference.reconstruct import reconstruct_leaderboard
from recon.inference.systems import load_classifier, load_system
from recon.masks import equispaced_mask, public_mask, public_start
from recon.models.config import PromptMRConfig
from recon.models.promptmr import PromptMR

H, CROP = 32, 16
WIDTH = {"brain": 28, "knee": 24}
COILS = {"brain": 2, "knee": 3}
# (acc folder, name, slices, public pattern?)
FILES = [
    ("acc4", "brain_test1.h5", 3, True),
    ("acc4", "brain_test2.h5", 2, False),
    ("acc4", "knee_test1.h5", 4, True),
    ("acc4", "knee_test2.h5", 2, False),
    ("acc8", "brain_test1.h5", 2, False),
    ("acc8", "knee_test1.h5", 3, True),
]
EXPECTED = {  # system/expert -> slices, with the anatomy from the file names
    "hacker/brain_acc4": 3, "helper/brain_acc4": 2, "hacker/knee_acc4": 4,
    "helper/knee_acc4": 2, "helper/brain_acc8": 2, "hacker/knee_acc8": 3,
}


def _shifted_mask(width: int, acc: int) -> np.ndarray:
    return equispaced_mask(width, acc, (public_start(width, acc) + 1) % acc)


def write_leaderboard(root: Path, seed: int = 0) -> Path:
    """Write the FILES above in the challenge layout; returns the leaderboard root."""
    rng = np.random.default_rng(seed)
    for acc_dir, name, slices, public in FILES:
        anatomy = name.split("_")[0]
        acc, width, coils = int(acc_dir[3:]), WIDTH[anatomy], COILS[anatomy]
        yy, xx = np.mgrid[-1:1:H * 1j, -1:1:width * 1j]
        body = ((xx / 0.6) ** 2 + (yy / 0.4) ** 2 < 1).astype(np.float32)
        images = body[None, None] * (1 + 0.3 * rng.standard_normal((slices, coils, H, width)))
        images = (images * 1e-4).astype(np.complex64)
        kspace = fft2c_np(images).astype(np.complex64)
        mask = public_mask(width, acc) if public else _shifted_mask(width, acc)
        label = center_crop(np.sqrt((np.abs(images) ** 2).sum(axis=1)), CROP, CROP).astype(np.float32)
        for sub in ("kspace", "image"):
            (root / acc_dir / sub).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / acc_dir / "kspace" / name, "w") as f:
            f["kspace"] = kspace
            f["mask"] = mask
        with h5py.File(root / acc_dir / "image" / name, "w") as f:
            f["image_label"] = label
            f["image_input"] = label
            f["image_grappa"] = label
            f.attrs["max"] = float(label.max())
    return root


def tiny_config(num_adj_slices: int = 1, seed: int = 0) -> PromptMRConfig:
    return PromptMRConfig.preset(
        "smartify", num_cascades=2, num_adj_slices=num_adj_slices, n_feat0=4, feature_dim=(4, 6, 8),
        prompt_dim=(2, 2, 2), sens_n_feat0=2, sens_feature_dim=(2, 4, 4), sens_prompt_dim=(2, 2, 2),
        prompt_size=(4, 4, 2), reduction=1, n_history=1, use_checkpoint=False, sens_use_checkpoint=False,
        sens_per_coil=False, seed=seed,
    )


def save_system(folder: Path, kind: str, num_adj_slices: int = 1, seed: int = 0) -> Path:
    cfg = tiny_config(num_adj_slices, seed)
    module = MixtureOfExperts(cfg) if kind == "moe" else PromptMR(cfg)
    save_checkpoint(folder / "checkpoints" / "best.pt", {
        "kind": kind, "stage": f"tiny_{kind}", "family": None, "epoch": 0,
        "config": {"data": {"num_adj_slices": num_adj_slices}}, "model_config": cfg.to_dict(),
        "experts": list(EXPERTS) if kind == "moe" else [], "model": module.state_dict(), "optimizer": None,
    })
    return folder


def save_constant_classifier(folder: Path, anatomy: str) -> Path:
    """A classifier whose logits ignore the input: always ``anatomy``."""
    cfg = ClassifierConfig(arch="resnet18")
    model = SliceClassifier(cfg)
    with torch.no_grad():
        model.net.fc.weight.zero_()
        model.net.fc.bias.copy_(torch.tensor([1.0, 0.0] if anatomy == "brain" else [0.0, 1.0]))
    save_checkpoint(folder / "checkpoints" / "best.pt", {
        "kind": "classifier", "stage": "tiny_classifier", "family": None, "epoch": 0, "config": {},
        "model_config": cfg.to_dict(), "experts": [], "model": model.state_dict(), "optimizer": None,
    })
    return folder



@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inference")
    return {
        "data": write_leaderboard(root / "leaderboard"),
        "hacker": save_system(root / "hacker", "moe", num_adj_slices=1, seed=1),
        "helper": save_system(root / "helper", "baseline", num_adj_slices=3, seed=2),
        "brain_classifier": save_constant_classifier(root / "classifier_brain", "brain"),
        "root": root,
    }


def h5_outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("**/*") if p.is_file()) if out.exists() else []


# ---- the Broker -----------------------------------------------------------------------------------

def test_route_slice_public_vs_shifted():
    for width in (320, 368, 396, 28):
        for acc in (4, 8):
            assert route_slice(public_mask(width, acc)) == ("hacker", acc)
            assert route_slice(_shifted_mask(width, acc)) == ("helper", acc)
    with pytest.raises(ValueError):
        route_slice(np.ones((2, 8)))


def test_router_counts_and_report():
    router = Router("filename")
    router.decide_file("acc4/brain_test1.h5", "brain", "brain", folder_acc=4)
    router.decide_file("acc8/knee_test1.h5", "knee", "knee", folder_acc=8)
    for _ in range(3):
        assert router.route("acc4/brain_test1.h5", public_mask(396, 4)) == ("hacker", "brain_acc4")
    # a file in acc8/ whose mask is acc4: the acceleration comes from the mask, noted in the report
    assert router.route("acc8/knee_test1.h5", _shifted_mask(368, 4)) == ("helper", "knee_acc4")
    report = router.report()
    assert report.total_slices == 4 and report.hacker_ratio == 0.75
    assert report.slices_per_system == {"hacker": 3, "helper": 1}
    assert report.slices_per_expert["hacker/brain_acc4"] == 3 and report.slices_per_expert["helper/knee_acc4"] == 1
    assert sum(report.slices_per_expert.values()) == 4
    assert report.acc_mismatches == ["acc8/knee_test1.h5"]
    text = report.format()
    assert "Hacker ratio 0.750" in text and "hacker/brain_acc4" in text
    assert json.loads(json.dumps(report.to_dict()))["files"][0]["slices"] == 3
    with pytest.raises(ValueError):
        router.route("acc4/unknown.h5", public_mask(396, 4))


# ---- reconstruction -------------------------------------------------------------------------------

def test_reconstruct_routes_each_slice_and_writes_challenge_files(env, tmp_path):
    hacker = load_system(env["hacker"], name="hacker")
    helper = load_system(env["helper"], name="helper")
    assert hacker.is_moe and hacker.num_adj_slices == 1
    assert not helper.is_moe and helper.num_adj_slices == 3
    out = tmp_path / "out"
    result = reconstruct_leaderboard(env["data"], out, hacker, helper, anatomy_from_filename=True,
                                     batch_size=2, num_workers=1)
    report = result.routing
    assert {k: v for k, v in report.slices_per_expert.items() if v} == EXPECTED
    assert report.slices_per_system == {"hacker": 10, "helper": 6}
    assert report.hacker_ratio == pytest.approx(10 / 16)
    assert report.anatomy_source == "filename" and report.name_disagreements == []
    assert result.slices == 16 and result.within_budget and result.verdict == "within budget"
    # outputs: same names, key, dtype, shape; nothing else in the folder
    assert h5_outputs(out) == sorted(f"{a}/{n}" for a, n, _, _ in FILES)
    for acc_dir, name, slices, _ in FILES:
        with h5py.File(out / acc_dir / name, "r") as f:
            assert list(f.keys()) == ["reconstruction"]
            assert f["reconstruction"].dtype == np.float32
            assert f["reconstruction"].shape == (slices, CROP, CROP)
            assert np.all(np.isfinite(f["reconstruction"][()]))
    assert set(result.manifest) == {f"{a}/{n}" for a, n, _, _ in FILES}
    assert all(len(d) == 64 for d in result.manifest.values())

    # the Hacker file equals its expert run directly on the masked k-space (batch of 2 + 1)
    with h5py.File(env["data"] / "acc4" / "kspace" / "brain_test1.h5", "r") as f:
        kspace, mask = torch.from_numpy(f["kspace"][()]), torch.from_numpy(f["mask"][()])
    expert = hacker.module.expert("brain_acc4")
    with torch.no_grad():
        direct_hacker = expert((kspace * mask)[:, None], mask[None].expand(3, -1), -1).image
    with h5py.File(out / "acc4" / "brain_test1.h5", "r") as f:
        np.testing.assert_allclose(f["reconstruction"][()], center_crop(direct_hacker, CROP, CROP).numpy(),
                                   rtol=1e-4, atol=1e-9)
    # the Helper (3 adjacent slices) sees slices [0, 0, 1] for slice 0 (clamped at the edge)
    with h5py.File(env["data"] / "acc4" / "kspace" / "knee_test2.h5", "r") as f:
        kspace, mask = torch.from_numpy(f["kspace"][()]), torch.from_numpy(f["mask"][()])
    with torch.no_grad():
        direct = helper.module((kspace[[0, 0, 1]] * mask)[None], mask[None], -1).image
    with h5py.File(out / "acc4" / "knee_test2.h5", "r") as f:
        np.testing.assert_allclose(f["reconstruction"][0], center_crop(direct, CROP, CROP)[0].numpy(),
                                   rtol=1e-4, atol=1e-9)

    # an output folder with results is refused, and left untouched
    before = {p: p.stat().st_mtime_ns for p in out.glob("**/*.h5")}
    with pytest.raises(InputError, match="already holds 6"):
        reconstruct_leaderboard(env["data"], out, hacker, helper, anatomy_from_filename=True, num_workers=0)
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/*.h5")} == before
    # with overwrite it runs again, and gives the same files (deterministic, batch size independent)
    again = reconstruct_leaderboard(env["data"], out, hacker, helper, anatomy_from_filename=True,
                                    batch_size=4, num_workers=0, overwrite=True, budget_s=1e-6)
    assert again.verdict == "OVER BUDGET" and not again.within_budget
    assert again.routing.slices_per_expert == report.slices_per_expert
    with h5py.File(out / "acc4" / "brain_test1.h5", "r") as f:
        np.testing.assert_allclose(f["reconstruction"][()], center_crop(direct_hacker, CROP, CROP).numpy(),
                                   rtol=1e-4, atol=1e-9)


def test_classifier_decides_anatomy(env, tmp_path):
    hacker = load_system(env["hacker"], name="hacker")
    helper = load_system(env["helper"], name="helper")
    classifier = load_classifier(env["brain_classifier"])
    result = reconstruct_leaderboard(env["data"], tmp_path / "out", hacker, helper, classifier=classifier,
                                     num_workers=0)
    report = result.routing
    assert report.anatomy_source == "classifier"
    # the classifier says brain for every file, so knee files go to the brain experts
    assert {k: v for k, v in report.slices_per_expert.items() if v} == {
        "hacker/brain_acc4": 7, "helper/brain_acc4": 4, "helper/brain_acc8": 2, "hacker/brain_acc8": 3,
    }
    assert sorted(report.name_disagreements) == ["acc4/knee_test1.h5", "acc4/knee_test2.h5", "acc8/knee_test1.h5"]
    decision = next(f for f in report.files if f.file == "acc4/knee_test1.h5")
    assert decision.logits is not None and decision.logits[0] > decision.logits[1]
    assert "classifier disagrees with the file name on 3 file(s)" in report.format()


def test_synthetic_leaderboard_with_shifted_masks_is_routed_and_scored(env, tiny_data, tmp_path):
    """The synthetic data set's leaderboard (public masks), with one file per folder re-masked."""
    from recon.inference.evaluation import evaluate_folder

    data = tmp_path / "leaderboard"
    shutil.copytree(tiny_data / "leaderboard", data)
    expected: dict[str, int] = {}
    for acc_dir in ("acc4", "acc8"):
        files = sorted((data / acc_dir / "kspace").glob("*.h5"))
        assert files
        for i, path in enumerate(files):
            with h5py.File(path, "a") as f:
                slices, width = f["kspace"].shape[0], f["kspace"].shape[-1]
                if i == 0:  # the first file gets a shifted mask: Helper
                    del f["mask"]
                    f["mask"] = _shifted_mask(width, int(acc_dir[3:]))
            key = f"{'helper' if i == 0 else 'hacker'}/{path.name.split('_')[0]}_{acc_dir}"
            expected[key] = expected.get(key, 0) + slices
    hacker = load_system(env["hacker"], name="hacker")
    helper = load_system(env["helper"], name="helper")
    out = tmp_path / "out"
    result = reconstruct_leaderboard(data, out, hacker, helper, anatomy_from_filename=True, num_workers=0)
    assert {k: v for k, v in result.routing.slices_per_expert.items() if v} == expected
    scores = evaluate_folder(data, out)  # checks names, key, float32 and the image_label shape
    assert 0.0 < scores["leaderboard"] <= 1.0
    assert sum(scores["slices"].values()) == result.slices == sum(expected.values())


def test_anatomy_source_must_be_explicit(env, tmp_path):
    hacker = load_system(env["hacker"], name="hacker")
    helper = load_system(env["helper"], name="helper")
    with pytest.raises(InputError, match="no anatomy source"):
        reconstruct_leaderboard(env["data"], tmp_path / "out", hacker, helper)
    with pytest.raises(InputError, match="two anatomy sources"):
        reconstruct_leaderboard(env["data"], tmp_path / "out", hacker, helper, anatomy_from_filename=True,
                                classifier=load_classifier(env["brain_classifier"]))
    assert not (tmp_path / "out").exists()


# ---- the CLI --------------------------------------------------------------------------------------

def smartify(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tracking.cli", "-q", "reconstruct", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_reconstructs_and_evaluates(env, tmp_path):
    out = tmp_path / "out"
    proc = smartify("--hacker", env["hacker"], "--helper", env["helper"], "--anatomy-from-filename",
                    "--data", env["data"], "--out", out, "--workers", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert {k: v for k, v in obj["routing"]["slices_per_expert"].items() if v} == EXPECTED
    assert obj["verdict"] == "within budget" and obj["slices"] == 16
    assert 0.0 < obj["evaluation"]["leaderboard"] <= 1.0
    assert obj["evaluation"]["slices"] == {"acc4": 11, "acc8": 5}
    assert h5_outputs(out) == sorted(f"{a}/{n}" for a, n, _, _ in FILES)


def _bad_case(env: dict[str, Path], case: str, root: Path) -> list[str | Path]:
    data = root / "leaderboard"
    shutil.copytree(env["data"], data)
    args: list[str | Path] = ["--hacker", env["hacker"], "--helper", env["helper"], "--anatomy-from-filename",
                              "--data", data, "--out", root / "out", "--workers", "0"]
    if case == "missing kspace":
        (data / "acc4" / "kspace" / "brain_test2.h5").unlink()
    elif case == "missing image":
        (data / "acc8" / "image" / "knee_test1.h5").unlink()
    elif case == "unknown name":
        for sub in ("kspace", "image"):
            (data / "acc4" / sub / "knee_test2.h5").rename(data / "acc4" / sub / "ankle_test2.h5")
    elif case == "mask width":
        with h5py.File(data / "acc8" / "kspace" / "knee_test1.h5", "a") as f:
            del f["mask"]
            f["mask"] = public_mask(WIDTH["knee"] + 2, 8)
    elif case == "checkpoint mismatch":
        payload = torch.load(env["helper"] / "checkpoints" / "best.pt", weights_only=True)
        payload["model_config"]["n_feat0"] = 6
        save_checkpoint(root / "bad_helper" / "checkpoints" / "best.pt", payload)
        args[3] = root / "bad_helper"
    elif case == "no anatomy source":
        args.remove("--anatomy-from-filename")
    elif case == "two anatomy sources":
        args += ["--classifier", env["brain_classifier"]]
    elif case == "no cuda":
        args += ["--device", "cuda"]
    return args


BAD_CASES = {
    "missing kspace": "unpaired file",
    "missing image": "unpaired file",
    "unknown name": "unknown file name pattern",
    "mask width": "'mask' has width 26",
    "checkpoint mismatch": "configuration does not match the weights",
    "no anatomy source": "no anatomy source",
    "two anatomy sources": "not both",
}
if not torch.cuda.is_available():
    BAD_CASES["no cuda"] = "CUDA is not available"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_cli_bad_input_is_one_line_exit_2_nothing_written(env, tmp_path, case):
    proc = smartify(*_bad_case(env, case, tmp_path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smartify reconstruct: error:"), proc.stderr
    assert BAD_CASES[case] in lines[0]
    assert h5_outputs(tmp_path / "out") == []


def test_cli_refuses_an_output_folder_with_results(env, tmp_path):
    out = tmp_path / "out"
    (out / "acc4").mkdir(parents=True)
    stale = out / "acc4" / "brain_test1.h5"
    stale.write_bytes(b"previous result")
    args = ["--hacker", env["hacker"], "--helper", env["helper"], "--anatomy-from-filename",
            "--data", env["data"], "--out", out, "--workers", "0", "--no-eval"]
    proc = smartify(*args)
    assert proc.returncode == 2 and "already holds 1 .h5" in proc.stderr
    assert stale.read_bytes() == b"previous result" and h5_outputs(out) == ["acc4/brain_test1.h5"]
    proc = smartify(*args, "--overwrite", "--budget-s", "0.000001")
    assert proc.returncode == 1, proc.stderr  # over budget
    assert "OVER BUDGET" in proc.stdout and "Hacker ratio 0.625" in proc.stdout
    with h5py.File(stale, "r") as f:
        assert f["reconstruction"].shape == (3, CROP, CROP)
