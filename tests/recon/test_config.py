"""Layered YAML configuration into typed, validated frozen dataclasses."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch
import yaml

from recon.config import (
    apply_overrides,
    dump_yaml,
    flatten,
    from_dict,
    load_config,
    load_yaml_layers,
    parse_overrides,
    to_dict,
)
from recon.augment.mraugment import AnatomyAugConfig
from recon.errors import InputError
from recon.schedules import P_AUG, LRScheduleConfig, RampScheduleConfig


@dataclass(frozen=True)
class DataSection:
    root: Path = Path("data")
    num_adj_slices: int = 1
    accelerations: tuple[int, ...] = (4, 8)
    max_files: Optional[int] = None


@dataclass(frozen=True)
class ExpertSection:
    weight: float = 1.0
    epochs: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSection:
    cascades: int = 8
    feature_dim: tuple[int, ...] = (24, 32, 40)
    use_checkpoint: bool = True
    reduction: int = 2

    def validate(self) -> None:
        if self.cascades < 1:
            raise ValueError(f"cascades must be >= 1, got {self.cascades}")


@dataclass(frozen=True)
class OutputSection:
    dir: Path


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Literal["baseline", "moe", "classifier"]
    output: OutputSection
    seed: int = 430
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    lr: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    p_aug: RampScheduleConfig = P_AUG
    experts: dict[str, ExpertSection] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    family: Optional[Literal["hacker", "helper"]] = None


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def stage_files(tmp_path: Path) -> Path:
    _write(
        tmp_path / "base" / "common.yaml",
        """
        seed: 430
        output: {dir: runs}
        data:
          root: /data/snu
          accelerations: [4, 8]
        model:
          cascades: 8
          feature_dim: [24, 32, 40]
        lr: {kind: step, base_lr: 2e-4}
        """,
    )
    _write(
        tmp_path / "base" / "small.yaml",
        """
        inherit: common.yaml
        model: {cascades: 2}
        """,
    )
    return _write(
        tmp_path / "stage.yaml",
        """
        inherit: [base/common.yaml, base/small.yaml]
        name: hacker_moe
        kind: moe
        data: {num_adj_slices: 1}
        lr: {kind: moe, start_epoch: 30, warmup_epochs: 3, step_start: 45, step_every: 5}
        experts:
          brain_acc4: {weight: 1.0, epochs: [33]}
          knee_acc8: {weight: 0.5}
        """,
    )


# -------------------------------------------------------------------------------- layers


def test_inheritance_merges_base_first(stage_files: Path) -> None:
    sources: dict[str, str] = {}
    data = load_yaml_layers(stage_files, sources)
    assert "inherit" not in data
    assert data["model"] == {"cascades": 2, "feature_dim": [24, 32, 40]}  # small.yaml over common.yaml
    assert data["data"] == {"root": "/data/snu", "accelerations": [4, 8], "num_adj_slices": 1}
    assert data["lr"]["base_lr"] == 2e-4 and isinstance(data["lr"]["base_lr"], float)  # 2e-4 is a float
    assert data["lr"]["kind"] == "moe"
    assert sources["model.cascades"].endswith("small.yaml")
    assert sources["data.root"].endswith("common.yaml")
    assert sources["lr.kind"].endswith("stage.yaml")


def test_inheritance_cycle_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "inherit: b.yaml\nx: 1\n")
    _write(tmp_path / "b.yaml", "inherit: sub/c.yaml\n")
    _write(tmp_path / "sub" / "c.yaml", "inherit: ../a.yaml\n")
    with pytest.raises(InputError, match="cycle") as exc:
        load_yaml_layers(tmp_path / "a.yaml")
    assert "a.yaml" in str(exc.value) and "\n" not in str(exc.value)


def test_diamond_inheritance_is_not_a_cycle(tmp_path: Path) -> None:
    _write(tmp_path / "root.yaml", "x: 1\ny: 1\n")
    _write(tmp_path / "l.yaml", "inherit: root.yaml\nx: 2\n")
    _write(tmp_path / "r.yaml", "inherit: root.yaml\ny: 3\n")
    _write(tmp_path / "top.yaml", "inherit: [l.yaml, r.yaml]\n")
    sources: dict[str, str] = {}
    # Each base is resolved fully, then merged in list order: r.yaml (with root's x: 1) wins.
    assert load_yaml_layers(tmp_path / "top.yaml", sources) == {"x": 1, "y": 3}
    assert sources["x"].endswith("root.yaml") and sources["y"].endswith("r.yaml")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found: .*nope.yaml"):
        load_yaml_layers(tmp_path / "nope.yaml")
    _write(tmp_path / "s.yaml", "inherit: gone.yaml\n")
    with pytest.raises(InputError, match=r"gone\.yaml \(inherited by .*s\.yaml\)"):
        load_yaml_layers(tmp_path / "s.yaml")


def test_bad_yaml_and_bad_top_level(tmp_path: Path) -> None:
    _write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(InputError, match=r"bad\.yaml: invalid YAML \(line"):
        load_yaml_layers(tmp_path / "bad.yaml")
    _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_yaml_layers(tmp_path / "list.yaml")
    _write(tmp_path / "inh.yaml", "inherit: 3\n")
    with pytest.raises(InputError, match="'inherit' must be"):
        load_yaml_layers(tmp_path / "inh.yaml")
    _write(tmp_path / "empty.yaml", "")
    assert load_yaml_layers(tmp_path / "empty.yaml") == {}


# -------------------------------------------------------------------------------- overrides


def test_parse_overrides_types_values() -> None:
    pairs = parse_overrides(
        ["a.b=1", "c=[1,2]", "lr=2e-4", "flag=true", "name=hacker", "q='123'", "n=null", "e=", "m={x: 1}"]
    )
    assert pairs == [
        ("a.b", 1),
        ("c", [1, 2]),
        ("lr", 2e-4),
        ("flag", True),
        ("name", "hacker"),
        ("q", "123"),
        ("n", None),
        ("e", None),
        ("m", {"x": 1}),
    ]
    assert isinstance(pairs[2][1], float)


@pytest.mark.parametrize("item", ["foo", "=3", "a..b=1", ".a=1", "a b=1"])
def test_malformed_override_is_refused(item: str) -> None:
    with pytest.raises(InputError, match="--set"):
        parse_overrides([item])


def test_apply_overrides_creates_merges_and_refuses_walking_through_values() -> None:
    base = {"data": {"root": "/a", "accelerations": [4, 8]}, "seed": 1}
    sources: dict[str, str] = {}
    out = apply_overrides(base, parse_overrides(["data.root=/b", "model.cascades=4", "data={max_files: 3}"]), sources)
    assert out == {"data": {"root": "/b", "accelerations": [4, 8], "max_files": 3}, "seed": 1, "model": {"cascades": 4}}
    assert base["data"]["root"] == "/a"  # input untouched
    assert sources["data.root"] == "--set" and sources["data.max_files"] == "--set"
    with pytest.raises(InputError, match="'seed' is a value"):
        apply_overrides(base, [("seed.x", 1)])


# -------------------------------------------------------------------------------- typed check


def test_load_config_builds_typed_tree(stage_files: Path, tmp_path: Path) -> None:
    cfg, resolved = load_config(Stage, stage_files, ["data.root=/other", "seed=7"])
    assert cfg.data.root == Path("/other") and cfg.output.dir == Path("runs")
    assert cfg.seed == 7 and cfg.kind == "moe" and cfg.model.cascades == 2
    assert cfg.model.feature_dim == (24, 32, 40) and isinstance(cfg.model.feature_dim, tuple)
    assert cfg.experts["brain_acc4"] == ExpertSection(weight=1.0, epochs=(33,))
    assert cfg.experts["knee_acc8"].weight == 0.5 and cfg.experts["knee_acc8"].epochs == ()
    assert cfg.lr.kind == "moe" and cfg.lr.base_lr == 2e-4 and cfg.lr.step_start == 45
    assert cfg.p_aug == P_AUG  # default kept
    assert resolved["data"]["root"] == "/other" and resolved["model"]["feature_dim"] == [24, 32, 40]
    assert resolved["p_aug"] == {"kind": "exp", "start": 33, "plateau": 50, "p_max": 0.5, "decay": 5.0}


def test_typo_is_refused_with_suggestion_and_file(stage_files: Path) -> None:
    text = stage_files.read_text() + "data2: {}\n"
    stage_files.write_text(text.replace("data: {num_adj_slices: 1}", "data: {num_adj_slice: 1}"))
    with pytest.raises(InputError) as exc:
        load_config(Stage, stage_files)
    message = str(exc.value)
    assert "unknown key 'data.num_adj_slice' (did you mean 'data.num_adj_slices'?)" in message
    assert message.startswith(str(stage_files)) and "\n" not in message


def test_typo_from_command_line_names_set(stage_files: Path) -> None:
    with pytest.raises(InputError, match=r"^--set: unknown key 'data.rooot' \(did you mean 'data.root'\?\)$"):
        load_config(Stage, stage_files, ["data.rooot=/x"])


def test_wrong_type_names_key_and_value(stage_files: Path) -> None:
    with pytest.raises(InputError, match=r"--set: data.num_adj_slices: expected int, got str 'five'$"):
        load_config(Stage, stage_files, ["data.num_adj_slices=five"])


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"data": {"num_adj_slices": True}}, "data.num_adj_slices: expected int, got bool True"),
        ({"data": {"num_adj_slices": 2.5}}, "expected int, got float 2.5"),
        ({"model": {"use_checkpoint": 1}}, "model.use_checkpoint: expected bool"),
        ({"model": {"use_checkpoint": "False"}}, "model.use_checkpoint: expected bool"),
        ({"model": {"feature_dim": [24, "x"]}}, r"model.feature_dim\[1\]: expected int"),
        ({"model": {"feature_dim": 24}}, "model.feature_dim: expected a list"),
        ({"model": 3}, "model: expected a mapping"),
        ({"kind": "mo"}, r"kind: expected one of 'baseline', 'moe', 'classifier', got 'mo' \(did you mean 'moe'\?\)"),
        ({"family": "hackr"}, "family: expected one of 'hacker', 'helper'"),
        ({"experts": {"brain_acc4": {"wieght": 1}}}, r"unknown key 'experts.brain_acc4.wieght' \(did you mean"),
        ({"experts": {"brain_acc4": 1}}, "experts.brain_acc4: expected a mapping"),
        ({"loss_weights": {"ssim": "high"}}, "loss_weights.ssim: expected float"),
        ({"lr": {"kind": "moe", "warmup_epochs": 3, "step_start": 2}}, r"^lr\.step_start = 2: must not be before the end of the warm-up"),
        ({"model": {"cascades": 0}}, "model: cascades must be >= 1, got 0"),
        ({"p_aug": {"p_max": 2}}, r"^p_aug\.p_max = 2\.0: must be in \[0, 1\]$"),
        ({"data": {"root": 5}}, "data.root: expected a path"),
        ({"seed": None}, "seed: expected int, got NoneType None"),
    ],
)
def test_bad_values_are_refused(data: dict, pattern: str) -> None:
    full = {"name": "s", "kind": "baseline", "output": {"dir": "o"}, **data}
    with pytest.raises(InputError, match=pattern) as exc:
        from_dict(Stage, full)
    assert "\n" not in str(exc.value)


def test_partial_section_overrides_the_field_default_instance() -> None:
    base = {"name": "s", "kind": "moe", "output": {"dir": "o"}}
    cfg = from_dict(Stage, {**base, "p_aug": {"plateau": 45}})
    assert (cfg.p_aug.kind, cfg.p_aug.start, cfg.p_aug.plateau, cfg.p_aug.p_max) == ("exp", 33, 45, 0.5)
    with pytest.raises(InputError, match=r"^p_aug\.plateau = 50: must be greater than start \(60\)$"):
        from_dict(Stage, {**base, "p_aug": {"start": 60}})


def test_missing_required_key() -> None:
    with pytest.raises(InputError, match="missing required key 'output'"):
        from_dict(Stage, {"name": "s", "kind": "moe"})
    with pytest.raises(InputError, match="missing required key 'output.dir'"):
        from_dict(Stage, {"name": "s", "kind": "moe", "output": {}})


def test_ints_are_accepted_for_floats_and_none_for_optional() -> None:
    cfg = from_dict(
        Stage,
        {"name": "s", "kind": "moe", "output": {"dir": "o"}, "lr": {"base_lr": 1}, "data": {"max_files": None}},
    )
    assert cfg.lr.base_lr == 1.0 and isinstance(cfg.lr.base_lr, float)
    assert cfg.data.max_files is None


def test_schema_bug_is_a_type_error() -> None:
    @dataclass(frozen=True)
    class Odd:
        x: set = field(default_factory=set)  # noqa: RUF012 - deliberately unsupported

    with pytest.raises(TypeError, match="unsupported field type"):
        from_dict(Odd, {"x": [1]})


# -------------------------------------------------------------------------------- back to data


def test_round_trip_to_dict_from_dict(stage_files: Path, tmp_path: Path) -> None:
    cfg, resolved = load_config(Stage, stage_files)
    assert to_dict(cfg) == resolved
    assert from_dict(Stage, resolved) == cfg
    # Through YAML on disk and through a weights_only checkpoint.
    out = dump_yaml(resolved, tmp_path / "run" / "config.yaml")
    assert from_dict(Stage, load_yaml_layers(out)) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    buf = io.BytesIO()
    torch.save({"config": resolved}, buf)
    buf.seek(0)
    assert from_dict(Stage, torch.load(buf, weights_only=True)["config"]) == cfg


def test_to_dict_is_plain_data(stage_files: Path) -> None:
    _, resolved = load_config(Stage, stage_files)
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved
    assert isinstance(resolved["output"]["dir"], str)
    assert isinstance(resolved["data"]["accelerations"], list)


def test_flatten_names_are_stable(stage_files: Path) -> None:
    _, resolved = load_config(Stage, stage_files)
    flat = flatten(resolved)
    assert flat["model.feature_dim"] == "[24, 32, 40]"
    assert flat["data.root"] == "/data/snu"
    assert flat["lr.base_lr"] == 2e-4
    assert flat["experts.brain_acc4.epochs"] == "[33]"
    assert flat["experts.knee_acc8.epochs"] == "[]"
    assert flat["loss_weights"] == "{}"
    assert flat["family"] is None
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in flat.values())
    assert list(flat) == list(flatten(load_config(Stage, stage_files)[1]))  # same order every time
    assert list(flat)[:4] == ["name", "kind", "output.dir", "seed"]
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}


# -------------------------------------------------------------------------------- rule messages


REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny"


def _train_error(stage: Path | str, *overrides: str) -> str:
    """The one stderr line of ``smartify train`` refusing a stage at configuration load (exit code 2)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "tracking.cli", "train", str(stage)]
    for item in overrides:
        argv += ["--set", item]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


def test_cli_names_the_set_key_once_and_its_source() -> None:
    stage = "experiments/tiny/hacker_moe.yaml"
    assert _train_error(stage, "mraugment.magnitude=-1") == (
        "smartify train: error: mraugment.magnitude = -1.0 (from --set): must be a number >= 0"
    )
    assert _train_error(stage, "mraugment.brain.max_scaling=1.5") == (
        "smartify train: error: mraugment.brain.max_scaling = 1.5 (from --set): must be < 1"
    )
    # n_history: 1 comes from experiments/tiny/overlay.yaml; the --set on it is what is named.
    assert _train_error(stage, "model.n_history=5") == (
        "smartify train: error: model.n_history = 5 (from --set): must be 0 or less than num_cascades (2)"
    )


def test_cli_names_the_overlay_file_that_set_a_bad_value(tmp_path: Path) -> None:
    overlay = _write(tmp_path / "overlay.yaml", "mraugment: {magnitude: -2}\n")
    stage = _write(tmp_path / "stage.yaml", f"inherit: [{TINY / 'hacker_moe.yaml'}, overlay.yaml]\n")
    assert _train_error(stage) == (
        f"smartify train: error: mraugment.magnitude = -2.0 (from {overlay}): must be a number >= 0"
    )
    # A --set on the value the overlay set is named as --set.
    assert _train_error(stage, "mraugment.magnitude=-1") == (
        "smartify train: error: mraugment.magnitude = -1.0 (from --set): must be a number >= 0"
    )
    # A rule broken by this overlay names the file that set the blamed value: n_history: 1 is in
    # experiments/tiny/overlay.yaml, which hacker_moe.yaml inherits.
    overlay.write_text("model: {num_cascades: 1}\n")
    assert _train_error(stage) == (
        f"smartify train: error: model.n_history = 1 (from {TINY / 'overlay.yaml'}): "
        "must be 0 or less than num_cascades (1)"
    )


def test_rules_name_defaults_presets_and_given_data() -> None:
    from recon.engine.stage import load_stage_config
    from recon.sections import FieldError

    base = TINY / "hacker_baseline.yaml"
    with pytest.raises(InputError, match=r"^p_aug\.plateau = 1 \(default\): must be greater than start \(5\)$"):
        load_stage_config(base, ["p_aug.kind=exp", "p_aug.start=5"])
    with pytest.raises(InputError, match=r"^model\.reduction = 2 \(from model\.preset 'smartify'\): must be <= 1"):
        load_stage_config(base, ["model.n_feat0=1"])
    _, resolved = load_stage_config(base)
    resolved["data"]["num_workers"] = -1
    with pytest.raises(InputError, match=r"^data\.num_workers = -1 \(from <config>\): must be >= 0$"):
        load_stage_config(data=resolved)
    # Built in code, a section states the rule with its own field name.
    with pytest.raises(FieldError, match=r"^max_scaling must be < 1, got 1\.2$"):
        AnatomyAugConfig(max_scaling=1.2)
