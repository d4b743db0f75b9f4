"""Re-masked validation on real files: never the public pattern, the same masks in every epoch and process,
and the Helper selected on ``val_remasked/leaderboard`` (the Hacker on ``val/leaderboard``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recon.data.dataset import SliceDataset
from recon.data.layout import discover_split
from recon.engine.checkpoint import Checkpoint
from recon.engine.remask import RemaskedDataset, remask
from recon.engine.stage import RemaskConfig, load_stage_config
from recon.engine.trainer import run_stage
from recon.masks import acs_bounds, acs_width, is_public_pattern, public_mask
from tests.recon.engine.test_engine import Recorder

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "experiments" / "tiny"
CHALLENGE_WIDTHS = (320, 322, 338, 356, 368, 370, 372, 386, 388, 392, 396, 480)


def _stage(name: str, data: Path, out: Path, *extra: str):
    return load_stage_config(TINY / f"{name}.yaml", [f"data.root={data}", f"output.dir={out}", "train.panel_every=0",
                                                     *extra])


def _val_dataset(cfg) -> RemaskedDataset:
    pairs = discover_split(Path(cfg.data.root), cfg.data.val_split)
    return RemaskedDataset(SliceDataset(pairs, num_adj_slices=1, load_target=True), cfg)


def mask_digest(data: Path) -> str:
    """sha256 over (file, kind, mask bytes) of every re-masked validation item of the tiny stage."""
    cfg, _ = _stage("hacker_baseline", data, data / "unused")
    ds = _val_dataset(cfg)
    h = hashlib.sha256()
    for i in range(len(ds)):
        item = ds[i]
        h.update(f"{item.fname}|{item.mask_kind}|".encode())
        h.update(item.mask.numpy().astype(np.uint8).tobytes())
    return h.hexdigest()


def test_drawn_masks_are_never_public_and_do_not_touch_global_rng() -> None:
    cfg = RemaskConfig()
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    for width in (*CHALLENGE_WIDTHS, 64, 33):
        for acc in (4, 8):
            for name in (f"brain_acc{acc}_{i}.h5" for i in range(6)):
                for kind in ("equispaced", "random"):
                    mask = remask(name, width, acc, kind, cfg)
                    assert mask.shape == (width,) and not is_public_pattern(mask), (width, acc, name, kind)
                    assert not np.array_equal(mask, public_mask(width, acc))
                    lo, hi = acs_bounds(width, acs_width(width))
                    assert mask[lo:hi].all()  # the ACS block
                    assert np.array_equal(mask, remask(name, width, acc, kind, cfg))  # deterministic
    assert np.array_equal(np.random.get_state()[1], before)
    # another seed gives other masks (the seed is part of the protocol)
    other = RemaskConfig(seed=1)
    assert any(not np.array_equal(remask(f"knee_acc4_{i}.h5", 368, 4, "random", cfg),
                                  remask(f"knee_acc4_{i}.h5", 368, 4, "random", other)) for i in range(3))


def test_remasked_validation_items_on_the_tiny_files(tiny_data: Path) -> None:
    cfg, _ = _stage("hacker_baseline", tiny_data, tiny_data / "unused")
    ds = _val_dataset(cfg)
    assert len(ds) == 2 * len(ds.base)
    kinds = {"equispaced": 0, "random": 0}
    for i in range(len(ds)):
        item = ds[i]
        sample = ds.base[ds.base_index(i)]
        mask = item.mask.numpy()
        assert not is_public_pattern(mask) and not np.array_equal(mask != 0, sample.mask.numpy() != 0)
        assert item.acc == sample.acc and item.expert == f"{sample.anatomy}_acc{sample.acc}"
        kspace = item.masked_kspace.numpy()
        assert np.all(kspace[..., mask == 0] == 0)  # the re-mask, not the file's mask, was applied
        kinds[item.mask_kind] += 1
    assert kinds["equispaced"] == kinds["random"] == len(ds.base)


def test_the_same_masks_in_another_process(tiny_data: Path) -> None:
    code = ("import sys, json; from pathlib import Path; from tests.recon.engine.test_remask import mask_digest; "
            "print(json.dumps(mask_digest(Path(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_data)], capture_output=True, text=True, cwd=REPO,
                         timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == mask_digest(tiny_data)


def test_every_epoch_scores_the_same_remasked_files(tiny_data: Path, tmp_path: Path) -> None:
    """With a learning rate of 1e-30 the float32 weights stay put, so equal re-masked scores mean equal masks."""
    cfg, resolved = _stage("hacker_baseline", tiny_data, tmp_path / "run", "train.epochs=2", "lr.base_lr=1e-30",
                           "optim.weight_decay=0.0", "data.max_train_slices=1")
    rec = Recorder()
    run_stage(cfg, resolved, rec)
    first, second = (e.metrics for e in rec.epochs)
    remasked = sorted(k for k in first if k.startswith("val_remasked/"))
    for key in ("val_remasked/ssim", "val_remasked/leaderboard", "val_remasked/ssim/acc4", "val_remasked/ssim/acc8",
                "val_remasked/ssim/brain_acc4", "val_remasked/ssim/knee_acc8", "val_remasked/slices/equispaced",
                "val_remasked/slices/random", "val_remasked/ssim/random"):
        assert key in remasked, key
    assert all(first[k] == second[k] for k in remasked)
    assert first["val_remasked/slices/equispaced"] == first["val_remasked/slices/random"] == first["val/slices"]
    assert first["val_remasked/ssim"] != first["val/ssim"]  # other masks, other scores


def _train(name: str, data: Path, out: Path) -> tuple[Recorder, Checkpoint]:
    cfg, resolved = _stage(name, data, out, "train.epochs=2", "data.max_train_slices=6")
    rec = Recorder()
    run_stage(cfg, resolved, rec)
    return rec, Checkpoint.load(out, "best")


def test_helper_selected_on_remasked_leaderboard_hacker_on_public(tiny_data: Path, tmp_path: Path) -> None:
    """The same budget (2 epochs x 6 slices) for both; the tiny data decides nothing, the mechanism is tested."""
    figures = {}
    for name, metric in (("hacker_baseline", "val/leaderboard"), ("helper_baseline", "val_remasked/leaderboard")):
        rec, best = _train(name, tiny_data, tmp_path / name)
        values = [e.metrics[metric] for e in rec.epochs]
        assert best.best_metric_name == metric and best.best_metric == pytest.approx(max(values))
        assert best.epoch == best.best_epoch == int(np.argmax(values))
        last = rec.epochs[-1].metrics
        assert last["best_" + metric.replace("/", "_")] == pytest.approx(max(values))
        assert "val/leaderboard" in last and "val_remasked/leaderboard" in last  # both logged for both
        figures[name] = {k: round(rec.epochs[best.best_epoch].metrics[k], 4)
                         for k in ("val/leaderboard", "val_remasked/leaderboard")}
    print("best epochs:", json.dumps(figures))
