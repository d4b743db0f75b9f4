"""Gated promotion on a real SQLite registry: refuse worse or incomparable versions, accept better, --force."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recon.engine.checkpoint import save_checkpoint
from recon.errors import InputError
from tests.tracking.registry.test_registry import cli_env, save_tiny_checkpoint
from tracking.registry.promotion import promote
from tracking.registry.versions import ModelVersionInfo, get_version_info, register_stage
from tracking.runs.stores import Stores, make_client

NAME = "smartify-helper"
DATA = "d" * 64



@pytest.fixture(scope="module")
def versions(home: Path, stores: Stores) -> dict[str, ModelVersionInfo]:
    """Five helper versions: scores 0.90, 0.85, 0.95, 0.99 (other data), 0.95 (tie with 'better')."""
    plan = {"first": (0.90, DATA), "worse": (0.85, DATA), "better": (0.95, DATA), "other_data": (0.99, "e" * 64),
            "tie": (0.95, DATA)}
    out = {}
    for seed, (key, (score, fingerprint)) in enumerate(plan.items()):
        ckpt = save_tiny_checkpoint(home / "ckpt" / f"{key}.pt", kind="baseline", family="helper", score=score,
                                    seed=100 + seed, stage=f"helper_{key}")
        out[key] = register_stage(ckpt, stores=stores, data_fingerprint=fingerprint)
    return out


def _holder(stores: Stores) -> int:
    return int(make_client(stores).get_model_version_by_alias(NAME, "champion").version)


def _history(stores: Stores) -> list[dict]:
    tags = make_client(stores).get_registered_model(NAME).tags
    keys = sorted(k for k in tags if k.startswith("promotion.champion.history."))
    return [json.loads(tags[k]) for k in keys]


def test_gate_refuses_worse_accepts_better_and_records(versions: dict[str, ModelVersionInfo], stores: Stores) -> None:
    first, worse, better = versions["first"], versions["worse"], versions["better"]

    r1 = promote(NAME, first.version, stores=stores)
    assert r1.status == "promoted" and r1.previous_version is None and _holder(stores) == first.version

    r2 = promote(NAME, worse.version, stores=stores)
    assert r2.status == "refused" and not r2.promoted
    assert "0.8500" in r2.message and "0.9000" in r2.message and "\n" not in r2.message
    assert _holder(stores) == first.version
    assert not any(k.startswith("promotion.") for k in get_version_info(NAME, worse.version, stores=stores).tags)

    r3 = promote(NAME, better.version, stores=stores, reason="beats first on val")
    assert r3.status == "promoted" and r3.previous_version == first.version
    assert _holder(stores) == better.version
    tags = get_version_info(NAME, better.version, stores=stores).tags
    assert tags["promotion.champion.previous_version"] == str(first.version)
    assert tags["promotion.champion.previous_score"] == "0.9000"
    assert tags["promotion.champion.score"] == "0.9500"
    assert tags["promotion.champion.reason"] == "beats first on val"
    assert tags["promotion.champion.forced"] == "false"
    assert tags["promotion.champion.by"] and tags["promotion.champion.at"].endswith("+00:00")
    old = get_version_info(NAME, first.version, stores=stores).tags
    assert old["promotion.champion.replaced_by"] == str(better.version)
    model_tags = make_client(stores).get_registered_model(NAME).tags
    assert model_tags["promotion.champion.version"] == str(better.version)
    history = _history(stores)
    assert [h["version"] for h in history] == [str(first.version), str(better.version)]

    # equal score on the same data promotes (the newer version wins a tie); the same version is a no-op
    tie = promote(NAME, versions["tie"].version, stores=stores)
    assert tie.status == "promoted" and _holder(stores) == versions["tie"].version
    again = promote(NAME, versions["tie"].version, stores=stores)
    assert again.status == "unchanged" and len(_history(stores)) == 3


def test_other_data_refused_unless_forced_with_reason(versions: dict[str, ModelVersionInfo], stores: Stores) -> None:
    if _holder_or_none(stores) is None:
        promote(NAME, versions["first"].version, stores=stores)
    holder = _holder(stores)
    other = versions["other_data"]

    refused = promote(NAME, other.version, stores=stores)
    assert refused.status == "refused" and "other data" in refused.message and "fingerprint" in refused.message
    assert _holder(stores) == holder

    with pytest.raises(InputError, match="--reason"):
        promote(NAME, other.version, force=True, stores=stores)
    with pytest.raises(InputError, match="reserved"):
        promote(NAME, other.version, alias="latest", stores=stores)

    n_before = len(_history(stores))
    forced = promote(NAME, other.version, force=True, reason="re-validated on the new split", stores=stores)
    assert forced.status == "promoted" and forced.forced and _holder(stores) == other.version
    tags = get_version_info(NAME, other.version, stores=stores).tags
    assert tags["promotion.champion.forced"] == "true"
    assert tags["promotion.champion.reason"] == "re-validated on the new split"
    assert "fingerprint" in tags["promotion.champion.overrode"]
    history = _history(stores)
    assert len(history) == n_before + 1 and history[-1]["forced"] == "true"
    assert history[-1]["previous_version"] == str(holder)


def _holder_or_none(stores: Stores) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return _holder(stores)
    except MlflowException:
        return None


def test_promote_cli_exit_codes(tmp_path: Path, home: Path, versions: dict[str, ModelVersionInfo],
                                stores: Stores) -> None:
    """Refusal: exit 1 and one line naming both scores; --force without --reason: exit 2."""
    challenger = versions["worse"]
    make_client(stores).set_registered_model_alias(NAME, "challenger", str(versions["better"].version))
    refused = subprocess.run(
        [sys.executable, "-m", "tracking.cli", "-q", "promote", NAME, str(challenger.version), "--alias", "challenger"],
        capture_output=True, text=True, env=cli_env(home), cwd=tmp_path, timeout=240)
    assert refused.returncode == 1, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "0.8500" in lines[0] and "0.9500" in lines[0] and "refused" in lines[0]
    assert _alias(stores, "challenger") == versions["better"].version

    usage = subprocess.run(
        [sys.executable, "-m", "tracking.cli", "promote", NAME, str(challenger.version), "--alias", "challenger",
         "--force"], capture_output=True, text=True, env=cli_env(home), cwd=tmp_path, timeout=240)
    assert usage.returncode == 2 and "--reason" in usage.stderr
    assert _alias(stores, "challenger") == versions["better"].version


def _alias(stores: Stores, alias: str) -> int:
    return int(make_client(stores).get_model_version_by_alias(NAME, alias).version)


def _info(version: int, score: float | None, fingerprint: str = DATA, protocol: str = "split=val",
          metric: str = "ssim") -> ModelVersionInfo:
    return ModelVersionInfo(NAME, version, "run", "file:///x", metric, score, fingerprint, protocol, "s", "baseline",
                            "helper", 1, (), (), 0, "", {})


def test_refusal_reasons_name_what_differs() -> None:
    from tracking.registry.promotion import refusal

    holder = _info(1, 0.9)
    assert refusal(_info(2, 0.9), holder, "champion") is None
    assert "0.8000 < champion version 1 0.9000" in refusal(_info(2, 0.8), holder, "champion")
    assert "not comparable" in refusal(_info(2, 0.99, metric="accuracy"), holder, "champion")
    assert "no data fingerprint" in refusal(_info(2, 0.99, fingerprint="unknown"), holder, "champion")
    assert "trained_on_val=True" in refusal(_info(2, 0.99, protocol="split=val;trained_on_val=True"),
                                            _info(1, 0.9, protocol="split=val;trained_on_val=False"), "champion")
    assert "no validation score" in refusal(_info(2, None), holder, "champion")


def _helper_checkpoint(path: Path, remasked: float, public: float, seed: int, *overrides: str) -> Path:
    """A Helper best.pt whose config is the tiny Helper stage as resolved, selected on val_remasked/leaderboard."""
    from recon.engine.stage import load_stage_config

    tiny = Path(__file__).resolve().parents[3] / "experiments" / "tiny" / "helper_baseline.yaml"
    _cfg, resolved = load_stage_config(tiny, list(overrides))
    source = save_tiny_checkpoint(path, kind="baseline", family="helper", score=remasked, seed=seed,
                                  stage=path.stem)
    payload = torch.load(source, weights_only=True)
    payload.update(config=resolved, best_metric_name="val_remasked/leaderboard",
                   metrics={"val_remasked/leaderboard": remasked, "val/leaderboard": public})
    return save_checkpoint(path, payload)


def test_helper_promotion_is_gated_on_the_remasked_leaderboard(home: Path, stores: Stores) -> None:
    """Higher val/leaderboard but lower val_remasked/leaderboard is refused; another re-mask protocol too."""
    alias = "robust"
    plan = {"held": (0.80, 0.85, ()), "public_better": (0.78, 0.95, ()), "robust_better": (0.82, 0.70, ()),
            "other_masks": (0.99, 0.99, ("validation.remask.seed=7",))}
    made = {}
    for seed, (key, (remasked, public, extra)) in enumerate(plan.items()):
        ckpt = _helper_checkpoint(home / "remask" / f"{key}.pt", remasked, public, 200 + seed, *extra)
        made[key] = register_stage(ckpt, stores=stores, data_fingerprint=DATA)
    held = made["held"]
    assert held.val_metric == "val_remasked/leaderboard" and held.val_score == pytest.approx(0.80)
    assert held.val_protocol.endswith(";remask=equispaced+random@2025/cf0.08")
    assert promote(NAME, held.version, alias=alias, stores=stores).status == "promoted"

    refused = promote(NAME, made["public_better"].version, alias=alias, stores=stores)
    assert refused.status == "refused" and "val_remasked/leaderboard 0.7800 < robust" in refused.message
    other = promote(NAME, made["other_masks"].version, alias=alias, stores=stores)
    assert other.status == "refused" and "remask=equispaced+random@7/cf0.08" in other.message
    assert _alias(stores, alias) == held.version

    moved = promote(NAME, made["robust_better"].version, alias=alias, stores=stores)
    assert moved.status == "promoted" and "val_remasked/leaderboard 0.8200 >= version" in moved.message
    tags = get_version_info(NAME, made["robust_better"].version, stores=stores).tags
    assert tags[f"promotion.{alias}.metric"] == "val_remasked/leaderboard"
    assert _alias(stores, alias) == made["robust_better"].version


def test_old_short_metric_tags_compare_as_full_names() -> None:
    from tracking.registry.promotion import refusal

    assert refusal(_info(2, 0.95, metric="val/ssim"), _info(1, 0.9, metric="ssim"), "champion") is None
    assert "not comparable" in refusal(_info(2, 0.95, metric="val/leaderboard"), _info(1, 0.9), "champion")
