"""The synthetic data generator: layout, file contents, the mask rule, determinism, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from recon.data.layout import discover_leaderboard, discover_pairs, validate_pair
from recon.data.synth import (CHALLENGE_WIDTHS, PRESETS, VolumeModel, plan_jobs, resolve_preset, scaled_widths,
                              volume_rng, write_dataset, write_volume)
from recon.errors import InputError
from recon.fft import center_crop, ifft2c_np, rss
from recon.masks import acs_bounds, acs_width, public_mask
from tracking.cli import main

THRESHOLDS = {"brain": 5e-5, "knee": 2e-5}


def _h5_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.h5"))


def _morph(mask: np.ndarray, erode: bool, iterations: int) -> np.ndarray:
    """3x3 erosion/dilation where out-of-image pixels are neutral (OpenCV's default border)."""
    for _ in range(iterations):
        padded = np.pad(mask, 1, constant_values=erode)
        views = [padded[i:i + mask.shape[0], j:j + mask.shape[1]] for i in range(3) for j in range(3)]
        mask = np.logical_and.reduce(views) if erode else np.logical_or.reduce(views)
    return mask


def _evaluator_foreground(target: np.ndarray, threshold: float) -> np.ndarray:
    mask = _morph(target > threshold, True, 1)
    mask = _morph(mask, False, 15)
    return _morph(mask, True, 14)


def test_layout_names_and_counts(tiny_data: Path) -> None:
    preset = PRESETS["tiny"]
    train = sorted(p.name for p in (tiny_data / "train" / "kspace").glob("*.h5"))
    expected = sorted(f"{a}_acc{acc}_{i}.h5" for a in ("brain", "knee") for acc in (4, 8)
                      for i in range(1, preset.n_train + 1))
    assert train == expected
    val = sorted(p.name for p in (tiny_data / "val" / "image").glob("*.h5"))
    assert val == sorted(f"{a}_acc{acc}_{preset.n_train + 1}.h5" for a in ("brain", "knee") for acc in (4, 8))
    for acc in ("acc4", "acc8"):
        for sub in ("kspace", "image"):
            names = sorted(p.name for p in (tiny_data / "leaderboard" / acc / sub).glob("*.h5"))
            assert names == ["brain_test1.h5", "brain_test2.h5", "knee_test1.h5", "knee_test2.h5"]
    assert len(_h5_files(tiny_data)) == 2 * len(plan_jobs(preset)) == 40
    # atomic writes leave no temp files behind
    assert [p for p in tiny_data.rglob("*") if p.is_file() and p.suffix != ".h5"] == [tiny_data / "synth.json"]


def test_file_contents_keys_shapes_dtypes(tiny_data: Path) -> None:
    pairs = discover_pairs(tiny_data / "train")
    for pair in pairs:
        assert validate_pair(pair, image_keys=("image_label", "image_input", "image_grappa")) in (3, 4)
        with h5py.File(pair.kspace) as kf, h5py.File(pair.image) as imf:
            s, c, h, w = kf["kspace"].shape
            assert kf["kspace"].dtype == np.complex64 and (c, h, w) == (8, 64, 64)
            assert kf["mask"].dtype == np.float32 and kf["mask"].shape == (w,)
            for key in ("image_label", "image_input", "image_grappa"):
                assert imf[key].dtype == np.float32 and imf[key].shape == (s, 64, 64)


def test_mask_rule_in_written_files(tiny_data: Path) -> None:
    pairs = discover_pairs(tiny_data / "train") + [p for v in discover_leaderboard(tiny_data / "leaderboard").values()
                                                   for p in v]
    for pair in pairs:
        with h5py.File(pair.kspace) as f:
            mask = f["mask"][()]
        width = mask.shape[0]
        assert np.array_equal(mask, public_mask(width, pair.acc))
        # the rule written out: ACS block of round(0.08 W) centred columns + every acc-th from (W//2) % acc
        lo, hi = acs_bounds(width, acs_width(width))
        rule = np.zeros(width, dtype=bool)
        rule[lo:hi] = True
        rule[(width // 2) % pair.acc::pair.acc] = True
        assert np.array_equal(mask != 0, rule)
        assert mask[width // 2] == 1


def test_attrs_max_equals_label_max(tiny_data: Path) -> None:
    for path in _h5_files(tiny_data):
        if path.parent.name != "image":
            continue
        with h5py.File(path) as f:
            label = f["image_label"][()]
            assert f.attrs["max"] == label.max()
            assert 1e-4 <= f.attrs["max"] <= 6e-4


def test_images_are_rss_of_the_kspace(tiny_data: Path) -> None:
    name = "knee_acc8_1.h5"
    with h5py.File(tiny_data / "train" / "kspace" / name) as kf, h5py.File(tiny_data / "train" / "image" / name) as imf:
        kspace, mask = kf["kspace"][()], kf["mask"][()]
        label, zero_filled, grappa = imf["image_label"][()], imf["image_input"][()], imf["image_grappa"][()]
    np.testing.assert_allclose(label, center_crop(rss(ifft2c_np(kspace)), 64, 64), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(zero_filled, center_crop(rss(ifft2c_np(kspace * mask)), 64, 64), rtol=1e-4, atol=1e-9)
    assert not np.allclose(zero_filled, label, rtol=0.05)
    assert not np.allclose(grappa, zero_filled, rtol=0.05)


def test_foreground_survives_evaluator_thresholds(tiny_data: Path) -> None:
    for path in (tiny_data / "train" / "image").glob("*.h5"):
        anatomy = path.name.split("_")[0]
        with h5py.File(path) as f:
            label = f["image_label"][()]
        for target in label:
            raw = (target > THRESHOLDS[anatomy]).mean()
            assert 0.15 < raw < 0.9, (path.name, raw)  # a real object, and real background
            fg = _evaluator_foreground(target, THRESHOLDS[anatomy])
            # at 64x64 the 15 dilations may cover the whole image (a knee fills it top to bottom);
            # what matters is that the object is inside the evaluated region
            assert fg.mean() > 0.2 and fg[_morph(target > THRESHOLDS[anatomy], True, 1)].all(), path.name


def test_brain_and_knee_look_different(tiny_data: Path) -> None:
    """The knee (a leg) runs through the top and bottom rows; the brain (a head) does not."""
    for path in (tiny_data / "train" / "image").glob("*.h5"):
        anatomy = path.name.split("_")[0]
        with h5py.File(path) as f:
            label = f["image_label"][()]
        edge_rows = (label[:, [0, -1], :] > 0.05 * label.max()).mean()
        if anatomy == "knee":
            assert edge_rows > 0.3, path.name
        else:
            assert edge_rows < 0.15, path.name


def test_adjacent_slices_are_continuous(tiny_data: Path) -> None:
    with h5py.File(tiny_data / "train" / "image" / "brain_acc4_1.h5") as f:
        a = f["image_label"][()]
    with h5py.File(tiny_data / "train" / "image" / "brain_acc4_2.h5") as f:
        other = f["image_label"][()]

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])

    neighbours = [corr(a[s], a[s + 1]) for s in range(a.shape[0] - 1)]
    assert min(neighbours) > 0.85
    assert min(neighbours) > corr(a[0], other[0])
    assert not np.allclose(a[0], a[1])


def test_determinism_and_per_volume_seeding(tiny_data: Path, tmp_path: Path) -> None:
    """Same seed: the same bytes, even with fewer volumes written; another seed: other data."""
    small = dict(n_train=1, n_val=0, n_leaderboard=1)
    write_dataset(tmp_path / "a", "tiny", seed=0, **small)
    write_dataset(tmp_path / "b", "tiny", seed=1, **small)
    for rel in ("train/kspace/brain_acc4_1.h5", "train/image/knee_acc8_1.h5", "leaderboard/acc8/image/knee_test1.h5"):
        with h5py.File(tiny_data / rel) as ref, h5py.File(tmp_path / "a" / rel) as same, \
                h5py.File(tmp_path / "b" / rel) as other:
            key = "kspace" if "kspace" in ref else "image_label"
            assert np.array_equal(ref[key][()], same[key][()])
            assert ref[key].shape != other[key].shape or not np.allclose(ref[key][()], other[key][()])
        assert (tiny_data / rel).read_bytes() == (tmp_path / "a" / rel).read_bytes()  # byte for byte
    assert not (tmp_path / "a" / "val").exists() or not any((tmp_path / "a" / "val").rglob("*.h5"))


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    job = plan_jobs(PRESETS["tiny"])[0]

    def boom() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_volume(tmp_path, job, PRESETS["tiny"], seed=0, grappa="none", on_slice=boom)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    write_volume(tmp_path, job, PRESETS["tiny"], seed=0, grappa="none")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [job.name, job.name]


def test_grappa_none_omits_the_key(tmp_path: Path) -> None:
    summary = write_dataset(tmp_path, "tiny", seed=2, grappa="none", n_train=1, n_val=0, n_leaderboard=0)
    assert summary["volumes"] == 4 and summary["files"] == 8 and summary["grappa"] == "none"
    with h5py.File(tmp_path / "train" / "image" / "brain_acc4_1.h5") as f:
        assert "image_grappa" not in f and "image_input" in f


def test_bad_options_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown synth preset 'huge'"):
        resolve_preset("huge")
    with pytest.raises(InputError, match="unknown synth option"):
        resolve_preset("tiny", coils=4)
    with pytest.raises(InputError, match="slices"):
        resolve_preset("tiny", min_slices=5, max_slices=2)
    with pytest.raises(InputError, match="grappa mode"):
        write_dataset(tmp_path, "tiny", grappa="pygrappa")
    assert not any(tmp_path.iterdir())


def test_presets_have_the_documented_sizes() -> None:
    tiny, small, full = PRESETS["tiny"], PRESETS["small"], PRESETS["full"]
    assert tiny.shape("brain") == tiny.shape("knee") == (8, 64, 64) and tiny.crop == 64 and tiny.widths == ()
    assert small.crop == 96 and small.brain_coils == 16 and small.brain_height == small.knee_height == 2 * 96
    # full: 2x read-out oversampling of the 384-row image for both anatomies, the challenge's widths
    assert full.brain_height == full.knee_height == 2 * full.crop == 768 and full.crop == 384
    assert full.widths == CHALLENGE_WIDTHS == (320, 322, 338, 356, 368, 370, 372, 386, 388, 392, 396, 480)
    # small: the same widths at its 96-pixel crop (W / crop as in the data, below and above the crop)
    assert small.widths == scaled_widths(96) == (80, 81, 85, 89, 92, 93, 97, 98, 99, 120)


@pytest.mark.parametrize("name", ["small", "full"])
def test_small_and_full_volumes_draw_mixed_widths(name: str, tmp_path: Path) -> None:
    """Each volume's width comes from the preset's list, mixed within one data set (draws only, one file written)."""
    preset = PRESETS[name]
    jobs = plan_jobs(preset)
    widths = [VolumeModel(volume_rng(0, job.key), job.anatomy, job.acc, preset).width for job in jobs]
    assert set(widths) <= set(preset.widths)
    assert len(set(widths)) >= 4
    assert min(widths) < preset.crop < max(widths)  # narrower than the image and wider, as in the data
    assert {w % 2 for w in widths} == {0, 1} or name == "full"  # small: even and odd W
    assert {acs_width(w) % 2 for w in widths} == {0, 1}  # odd and even ACS blocks
    if name == "small":  # one real file: its shapes and mask follow the drawn width
        job = jobs[0]
        write_volume(tmp_path, job, preset, seed=0, grappa="none")
        with h5py.File(tmp_path / job.folder / "kspace" / job.name) as kf:
            _, c, h, w = kf["kspace"].shape
            assert (c, h, w) == (16, 192, widths[0]) and np.array_equal(kf["mask"][()], public_mask(w, job.acc))
        with h5py.File(tmp_path / job.folder / "image" / job.name) as imf:
            assert imf["image_label"].shape[1:] == (96, 96)


@pytest.mark.slow
def test_a_mixed_width_data_set_trains_and_validates(tmp_path: Path) -> None:
    """Two widths (below and above the crop, one odd, with an odd ACS block) through one epoch and validation."""
    from recon.engine.stage import load_stage_config
    from recon.engine.trainer import run_stage
    from tests.recon.engine.test_engine import EXPERIMENTS, Recorder

    root = tmp_path / "mixed"
    write_dataset(root, "tiny", seed=4, widths=(60, 67))
    widths = {}
    for pair in discover_pairs(root / "train") + discover_pairs(root / "val"):
        with h5py.File(pair.kspace) as f:
            widths[pair.kspace.name] = f["kspace"].shape[-1]
    assert set(widths.values()) == {60, 67} and acs_width(67) % 2 == 1
    cfg, resolved = load_stage_config(EXPERIMENTS / "tiny" / "helper_baseline.yaml", [
        f"data.root={root}", f"output.dir={tmp_path / 'run'}", "train.epochs=1", "train.panel_every=0",
        "train.probe_memory=false", "p_mask.kind=constant", "p_mask.start=0", "p_mask.p_max=1.0"])
    rec = Recorder()
    end = run_stage(cfg, resolved, rec)
    metrics = rec.epochs[0].metrics
    assert end.status == "finished" and np.isfinite(metrics["train/loss"])
    assert 0.0 < metrics["val/ssim"] <= 1.0
    val_slices = 0
    for pair in discover_pairs(root / "val"):
        with h5py.File(pair.kspace) as f:
            val_slices += f["kspace"].shape[0]
    assert metrics["val/slices"] == min(val_slices, cfg.data.max_val_slices or val_slices)
    assert {f"val/ssim/{a}_acc{acc}" for a in ("brain", "knee") for acc in (4, 8)} <= set(metrics)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracking.cli", "synth", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_and_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    done = _cli(str(out), "--grappa", "none", "--seed", "3")  # a real process, as a user runs it
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and "40 files" in line and "slices" in line and str(out) in line
    assert len(_h5_files(out)) == 40
    # the refusal, in-process (same entry point, no second interpreter start-up)
    assert main(["synth", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and str(out) in err
    assert len(_h5_files(out)) == 40
    # --overwrite replaces the data set: the old seed-3 files are gone, a stray extra file too
    (out / "train" / "kspace" / "brain_acc4_9.h5").write_bytes(b"")
    assert main(["synth", str(out), "--overwrite", "--grappa", "none", "--seed", "4", "--no-progress"]) == 0
    assert len(_h5_files(out)) == 40 and not (out / "train" / "kspace" / "brain_acc4_9.h5").exists()
