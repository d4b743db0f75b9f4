"""Shared test fixtures: the tiny synthetic data set, written once per test session."""

from __future__ import annotations

import os

# before anything imports mlflow or matplotlib
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
# tiny tensors gain nothing from threads, and OpenMP threads on a loaded 2-core machine cost ~50x;
# subprocesses (CLI tests, torchrun) inherit this
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from recon.data.synth import write_dataset  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules with the most ``slow``/``integration`` tests first, each module's tests together.

    ``pytest -n 2 --dist loadfile`` (the README's command) hands out whole modules in this order, so the
    long ones start at once instead of leaving one worker alone with them at the end. The order of the
    tests inside a module is kept.
    """
    weight: dict[str, int] = {}  # in order of first appearance
    for item in items:
        heavy = item.get_closest_marker("slow") or item.get_closest_marker("integration")
        weight[item.path] = weight.get(item.path, 0) + (1 if heavy else 0)
    first = {path: i for i, path in enumerate(weight)}
    items.sort(key=lambda it: (-weight[it.path], first[it.path]))  # a stable sort keeps each module's order


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the tiny synthetic data set (seed 0, numpy GRAPPA), written once per session.

    Layout: ``train/`` (2 volumes per anatomy and acceleration), ``val/`` (1 each), and
    ``leaderboard/{acc4,acc8}/`` (2 brain + 2 knee each); 8 coils, 64x64 k-space, crop 64,
    3-4 slices per volume. Treat it as read-only: copy files before changing them.
    """
    root = tmp_path_factory.mktemp("tiny_data")
    write_dataset(root, preset="tiny", seed=0, grappa="numpy")
    return root


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test tracks into its own store, never the checkout's ``mlruns/`` or a user's server.

    Tests that need a particular store set ``SMARTIFY_HOME`` or ``MLFLOW_TRACKING_URI`` themselves.
    """
    home = tmp_path_factory.mktemp("smartify_home")
    monkeypatch.setenv("SMARTIFY_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A tracking home shared by the tests of one module (registry, promotion, submission)."""
    return tmp_path_factory.mktemp(f"{request.module.__name__}_home")


@pytest.fixture(scope="module")
def stores(home: Path):
    """Embedded stores under ``home``: what ``SMARTIFY_HOME=home`` resolves to (sqlite + artifact folder)."""
    from tracking.runs.stores import Stores

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return Stores(tracking_uri=uri, registry_uri=uri, home=home, artifact_root=home / "artifacts")


@pytest.fixture(autouse=True)
def _restore_global_state():
    """A test that runs a tracked stage or a trial in-process seeds like an entry point (``seed_everything``):
    the global RNGs and torch's determinism flags. Put them back so later tests see what they assume."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]
