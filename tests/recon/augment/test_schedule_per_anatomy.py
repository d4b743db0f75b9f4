"""MRAugment's schedule per anatomy (mraugment.{brain,knee}.schedule) and the magnitude key.

The team ran one augmenter per anatomy, each with its own delay and strength (equal in its runs);
here the stage's ``p_aug`` applies to both unless an anatomy changes ``start``, ``plateau`` or
``p_max``. Each training slice is augmented by its own anatomy's probability, the per-anatomy
probabilities are logged when the schedules differ, and the retired ``mraugment.strength`` key is
refused with a line that names ``mraugment.magnitude``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recon.engine.stage import load_stage_config
from recon.engine.transform import StageTransform
from recon.errors import InputError
from recon.schedules import prob_at

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "experiments" / "tiny"
FAST = ["data.max_train_slices=3", "data.max_val_slices=4", "train.panel_every=0", "train.epochs=1",
        "train.probe_memory=false"]
# p = 1 for knee slices (every knee transform of weight 1 fires), 0 for brain slices
SPLIT = ["mraugment.enabled=true", "p_aug.kind=constant", "p_aug.start=0", "p_aug.p_max=1.0",
         "mraugment.brain.schedule.p_max=0.0"]


def _config(stage: str, *extra: str, data: Path | None = None):
    root = [f"data.root={data}"] if data is not None else []
    return load_stage_config(TINY / f"{stage}.yaml", [*root, *extra])[0]


def test_default_is_one_schedule_for_both_anatomies() -> None:
    for path in (REPO / "experiments" / "hacker_moe.yaml", TINY / "helper_moe.yaml"):
        cfg, _ = load_stage_config(path, [])
        transform = StageTransform(cfg, train=True)
        assert transform.aug_schedules == {"brain": cfg.p_aug, "knee": cfg.p_aug}
        assert not transform.aug_per_anatomy
    cfg, _ = load_stage_config(REPO / "experiments" / "hacker_moe.yaml", [])
    transform = StageTransform(cfg, train=True)
    # the team's values: start 33, plateau 50, p_max 0.5, for brain and knee alike
    assert [round(transform.aug_probability(a, 34), 3) for a in ("brain", "knee")] == [0.128, 0.128]


def test_each_anatomy_gets_its_own_changes() -> None:
    cfg = _config("hacker_moe", "mraugment.brain.schedule.start=3", "mraugment.knee.schedule.p_max=0.25",
                  "mraugment.knee.schedule.plateau=5")
    transform = StageTransform(cfg, train=True)
    brain, knee = transform.aug_schedules["brain"], transform.aug_schedules["knee"]
    assert (brain.start, brain.plateau, brain.p_max) == (3, cfg.p_aug.plateau, cfg.p_aug.p_max) == (3, 4, 0.5)
    assert (knee.start, knee.plateau, knee.p_max) == (cfg.p_aug.start, 5, 0.25) == (2, 5, 0.25)
    assert transform.aug_per_anatomy
    assert transform.aug_probability("brain", 2) == 0.0 and transform.aug_probability("knee", 3) > 0.0
    assert transform.aug_probability("brain", 4) == 0.5 and transform.aug_probability("knee", 5) == 0.25
    assert StageTransform(cfg, train=False).aug_probability("knee", 5) == 0.0  # validation never augments


def test_each_slice_is_augmented_by_its_anatomys_probability(tiny_data: Path) -> None:
    from recon.engine.trainer import ReconStage

    cfg = _config("helper_baseline", *FAST, "data.max_train_slices=40", *SPLIT, data=tiny_data)
    stage = ReconStage(cfg, {})
    transform = StageTransform(cfg, train=True)
    items = [transform(stage.data.train[i], 0, i) for i in range(len(stage.data.train))]
    by_anatomy = {a: [item.augmented for item in items if item.anatomy == a] for a in ("brain", "knee")}
    assert by_anatomy["brain"] and by_anatomy["knee"]
    assert not any(by_anatomy["brain"]) and all(by_anatomy["knee"])


def test_bad_changes_name_the_key() -> None:
    with pytest.raises(InputError, match=r"^mraugment\.brain\.schedule\.p_max = 1\.5 \(from --set\): must be in"):
        _config("hacker_moe", "mraugment.brain.schedule.p_max=1.5")
    with pytest.raises(InputError, match=r"^mraugment\.knee\.schedule\.start = 9 \(from --set\): with p_aug\.plateau "
                                         r"= 4, plateau must be greater than start \(9\)"):
        _config("hacker_moe", "mraugment.knee.schedule.start=9")
    # changes to a schedule that is off would change nothing: refused, not ignored
    with pytest.raises(InputError, match=r"^mraugment\.brain\.schedule\.start = 3 .*p_aug\.kind is 'off'"):
        _config("hacker_baseline", "mraugment.brain.schedule.start=3")


def test_old_strength_key_is_refused_naming_magnitude(tmp_path: Path) -> None:
    overlay = tmp_path / "old.yaml"
    overlay.write_text(f"inherit: [{TINY / 'hacker_moe.yaml'}]\nmraugment: {{strength: 2.0}}\n")
    with pytest.raises(InputError, match=r"unknown key 'mraugment\.strength' \(renamed: use 'mraugment\.magnitude'"):
        load_stage_config(overlay, [])
    proc = subprocess.run([sys.executable, "-m", "tracking.cli", "train", str(TINY / "hacker_moe.yaml"),
                           "--set", "mraugment.strength=2", "--no-tracking"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "mraugment.strength" in lines[0] and "use 'mraugment.magnitude'" in lines[0]
    assert "aug_strength is p_aug.p_max" in lines[0]
    assert _config("hacker_moe", "mraugment.magnitude=2.0").mraugment.magnitude == 2.0


def test_per_anatomy_probabilities_are_logged_when_they_differ(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tracking.runs.stores import resolve_stores
    from tracking.train import StageTracking, run_tracked_stage

    over = [f"data.root={tiny_data}", f"output.dir={tmp_path / 'split'}", *FAST, *SPLIT,
            "mraugment.knee.schedule.p_max=0.75"]
    outcome = run_tracked_stage(TINY / "helper_baseline.yaml", over, tracking=StageTracking("p-aug-test"))
    assert outcome.status == "finished", outcome.error
    metrics = MlflowClient(resolve_stores().tracking_uri).get_run(outcome.run_id).data.metrics
    schedules = StageTransform(outcome.config, train=True).aug_schedules
    assert metrics["schedule/p_aug/brain"] == prob_at(schedules["brain"], 0) == 0.0
    assert metrics["schedule/p_aug/knee"] == prob_at(schedules["knee"], 0) == 0.75
    assert metrics["schedule/p_aug"] == prob_at(outcome.config.p_aug, 0) == 1.0  # the stage's own schedule
