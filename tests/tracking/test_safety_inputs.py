"""Hostile inputs through the real CLI (issue 13, items 10-13): one line, exit 2, nothing written.

* a tracking server that does not answer is named (URL without credentials) as unreachable, never read
  as an empty registry (``models list``, ``models register``, ``promote``, ``submit``);
* an Optuna storage URL SQLAlchemy cannot use is refused with the supported forms;
* names that become path components (study, stage, model, pipeline step) are refused when they are not
  file-name components, and no file appears anywhere around the folders given;
* a checkpoint that holds pickled code is refused as such by every loading path (``train --resume``,
  ``reconstruct``, the registry loader through ``submit`` and in-process), without torch's advice to
  load it unsafely, and nothing in it runs.

Every command runs as ``python -m tracking.cli`` in a subprocess against a real SQLite store under the
test's ``SMARTIFY_HOME``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recon.errors import InputError
from tests.tracking.registry.test_registry import save_tiny_checkpoint
from tracking.registry.artifact import WEIGHTS_FILE, file_sha256

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny"
#: what torch's refusal says and smartify must never repeat
UNSAFE_ADVICE = "weights_only=False"
#: printed by the crafted pickle if it were ever executed
MARKER = "PICKLED-CODE-RAN"


class PickledCode:
    """An object whose unpickling would call ``print(MARKER)`` (harmless, and visible if it runs)."""

    def __reduce__(self):
        return (print, (MARKER,))


def smartify(*argv: str, home: Path, cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``smartify -q ARGV`` in a subprocess using the store under ``home``."""
    full = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    full.update(SMARTIFY_HOME=str(home), PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "tracking.cli", "-q", *argv], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a refused command (asserting exit 2 and nothing else on stderr)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"smartify {command}: error: "), lines[0]
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder`` (recursively)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def free_port() -> int:
    """A loopback port nothing listens on (bound and released; nothing is started on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def crafted_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint that is valid in every key but also carries a pickled call (``print``)."""
    clean = save_tiny_checkpoint(path.with_name("clean-" + path.name), kind="baseline", family="hacker", seed=seed,
                                 stage="hacker_baseline")
    payload = torch.load(clean, weights_only=True)
    payload["note"] = PickledCode()
    torch.save(payload, path)
    clean.unlink()
    return path


# --------------------------------------------------------------------------- item 10: server down
@pytest.mark.parametrize("command", ["models list", "models register", "promote", "submit"])
def test_unreachable_server_is_named_not_read_as_empty(command: str, tmp_path: Path, tiny_data: Path) -> None:
    port = free_port()
    env = {"MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    out = tmp_path / "out"
    argv = {
        "models list": ["models", "list"],
        "models register": ["models", "register", str(save_tiny_checkpoint(tmp_path / "best.pt", kind="baseline"))],
        "promote": ["promote", "smartify-hacker", "1"],
        "submit": ["submit", "--data", str(tiny_data / "leaderboard"), "--out", str(out), "--classifier", "none",
                   "--anatomy-from-filename"],
    }[command]
    proc = smartify(*argv, home=tmp_path / "home", cwd=tmp_path, env=env)
    line = one_error_line(proc, command.split()[0])
    assert f"tracking server http://127.0.0.1:{port} is unreachable (connection refused)" in line
    assert "s3cret" not in line and "alice" not in line
    assert "no version" not in line and "no alias" not in line
    assert not out.exists()


# --------------------------------------------------------------------------- item 11: storage URL
@pytest.mark.parametrize(("url", "why"), [("bogus://x", "unknown database scheme 'bogus'"),
                                          ("not a url", "not a database URL")])
def test_tune_storage_url_refused_with_supported_forms(url: str, why: str, tmp_path: Path, tiny_data: Path) -> None:
    home = tmp_path / "home"
    proc = smartify("tune", str(TINY / "tune.yaml"), "--storage", url, "--set", f"data.root={tiny_data}",
                    "--overlay-dir", str(tmp_path / "overlay"), "--output-dir", str(tmp_path / "trials"),
                    home=home, cwd=tmp_path)
    line = one_error_line(proc, "tune")
    assert line == (f"smartify tune: error: --storage {url!r}: {why}; expected sqlite:///path/optuna.db, "
                    "postgresql+psycopg://user@host:5432/db, mysql+pymysql://user@host/db")
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- item 13: path traversal
RULE = "must be a file-name component: letters, digits, '.', '_' or '-', not starting with '.', at most 100 characters"


def _traversal_case(case: str, tmp: Path, data: Path) -> tuple[list[str], str, str]:
    """(argv, command, expected message) of one traversal attempt; every output folder lies in ``tmp/a/b/c``."""
    deep = tmp / "a" / "b" / "c"
    if case == "tune --study":
        return (["tune", str(TINY / "tune.yaml"), "--study", "../../../escaped", "--set", f"data.root={data}",
                 "--overlay-dir", str(deep / "overlay"), "--output-dir", str(deep / "trials" / "{study}")],
                "tune", f"--study '../../../escaped': {RULE}")
    if case == "tune file study":
        tune = tmp / "tune.yaml"
        tune.write_text(f"inherit: {TINY / 'tune.yaml'}\nbase: {TINY / 'hacker_baseline.yaml'}\n"
                        "study: ../../../escaped\n")
        return (["tune", str(tune), "--set", f"data.root={data}", "--overlay-dir", str(deep / "overlay"),
                 "--output-dir", str(deep / "trials" / "{study}")],
                "tune", f"{tune}: study '../../../escaped': {RULE}")
    if case == "train --set stage.name":
        return (["train", str(TINY / "hacker_baseline.yaml"), "--set", f"data.root={data}", "--set",
                 "stage.name=../../escaped", "--set", f"output.dir={deep}/{{stage}}", "--set", "train.epochs=1"],
                "train", f"stage.name = '../../escaped' (from --set): {RULE}")
    if case == "stage file name":
        stage = tmp / "stage.yaml"
        stage.write_text(f"inherit: {TINY / 'hacker_baseline.yaml'}\nstage:\n  name: ../../escaped\n"
                         f"output:\n  dir: {deep}/{{stage}}\n")
        return (["train", str(stage), "--set", f"data.root={data}", "--set", "train.epochs=1"],
                "train", f"stage.name = '../../escaped' (from {stage}): {RULE}")
    if case == "models register --name":
        ckpt = save_tiny_checkpoint(tmp / "ckpt" / "best.pt", kind="baseline")
        return (["models", "register", str(ckpt), "--name", "../../evil"], "models", f"model name '../../evil': {RULE}")
    if case == "pipeline step name":
        pipeline = tmp / "pipeline.yaml"
        pipeline.write_text(f"name: demo\nworkdir: {deep}\ndata_root: {data}\nsteps:\n"
                            f"  - {{name: ../../escaped, train: {TINY / 'hacker_baseline.yaml'}}}\n")
        return (["pipeline", str(pipeline)], "pipeline",
                f"{pipeline}: steps[0]: step name '../../escaped': {RULE}")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["tune --study", "tune file study", "train --set stage.name", "stage file name",
                                  "models register --name", "pipeline step name"])
def test_names_that_become_paths_must_be_file_name_components(case: str, tmp_path: Path, tiny_data: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv, command, expected = _traversal_case(case, work, tiny_data)
    inputs = files_under(work)
    home = tmp_path / "home"
    proc = smartify(*argv, home=home, cwd=work)
    line = one_error_line(proc, command)
    assert line == f"smartify {command}: error: {expected}"
    # nothing written: no new file in or around the folders given, no tracking data, no study, no version
    assert files_under(work) == inputs
    assert not (work / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["work"], ["home", "work"])
    assert not home.exists() or files_under(home) == []


# --------------------------------------------------------------------------- item 12: pickled code
def _check_refusal(text: str, path: Path) -> None:
    assert f"{path}: refused: it holds pickled code (a reference to print), not only tensors and plain data" in text
    assert UNSAFE_ADVICE not in text and "add_safe_globals" not in text
    assert MARKER not in text


@pytest.mark.parametrize("command", ["train --resume", "reconstruct --hacker"])
def test_checkpoint_with_pickled_code_is_refused_by_the_cli(command: str, tmp_path: Path, tiny_data: Path) -> None:
    evil = crafted_checkpoint(tmp_path / "evil" / "last.pt")
    before = file_sha256(evil)
    out = tmp_path / "out"
    if command == "train --resume":
        argv = ["train", str(TINY / "hacker_baseline.yaml"), "--resume", str(evil), "--set", f"data.root={tiny_data}",
                "--set", f"output.dir={out}", "--set", "train.epochs=1"]
    else:
        helper = save_tiny_checkpoint(tmp_path / "helper" / "best.pt", kind="baseline", family="helper")
        argv = ["reconstruct", "--hacker", str(evil), "--helper", str(helper), "--anatomy-from-filename",
                "--data", str(tiny_data / "leaderboard"), "--out", str(out), "--workers", "0"]
    proc = smartify(*argv, home=tmp_path / "home", cwd=tmp_path)
    line = one_error_line(proc, command.split()[0])
    _check_refusal(line, evil)
    assert MARKER not in proc.stdout
    assert not out.exists()
    assert file_sha256(evil) == before


def test_registry_loader_refuses_pickled_code(tmp_path: Path, home: Path, stores, tiny_data: Path) -> None:
    from mlflow import MlflowClient

    from tracking.registry.loader import load_version
    from tracking.registry.versions import register_stage

    info = register_stage(save_tiny_checkpoint(tmp_path / "best.pt", kind="baseline", seed=3), stores=stores)
    # the stored weights replaced by a crafted file whose hash is put in the tag: only the unpickler can refuse it
    client = MlflowClient(stores.tracking_uri, stores.registry_uri)
    location = client.get_model_version_download_uri(info.name, str(info.version))  # the version's files
    weights = Path(location.removeprefix("file://")) / WEIGHTS_FILE
    assert weights.is_file()
    crafted_checkpoint(weights, seed=3)
    client.set_model_version_tag(info.name, str(info.version), "weights_sha256", file_sha256(weights))

    with pytest.raises(InputError) as caught:
        load_version(info.uri, stores=stores)
    assert "refused: it holds pickled code (a reference to print)" in str(caught.value)
    assert UNSAFE_ADVICE not in str(caught.value)

    out = tmp_path / "out"
    proc = smartify("submit", "--data", str(tiny_data / "leaderboard"), "--out", str(out), "--hacker", info.uri,
                    "--helper", info.uri, "--classifier", "none", "--anatomy-from-filename", "--workers", "0",
                    home=home, cwd=tmp_path)
    line = one_error_line(proc, "submit")
    assert "refused: it holds pickled code (a reference to print)" in line
    assert UNSAFE_ADVICE not in line and MARKER not in proc.stdout
    assert not out.exists()
    # the submission run records the refusal and ends FAILED (read back with a fresh client)
    client = MlflowClient(stores.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("smartify").experiment_id],
                              "tags.`smartify.kind` = 'submission'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "holds pickled code" in runs[0].data.tags["smartify.error"]


@pytest.mark.parametrize("value", ["..", ".", ".hidden", "../x", "a/b", "/abs", "a\\b", "", "a b", "x\n",
                                   "é", "x" * 101, None, 3])
def test_safe_component_refuses_anything_but_one_plain_name(value) -> None:
    from recon.io import safe_component

    with pytest.raises(InputError) as caught:
        safe_component(value, "--study")
    assert str(caught.value) == f"--study {value!r}: {RULE}"


@pytest.mark.parametrize("value", ["tiny-tune", "hacker_baseline", "smartify-hacker", "v1.2", "_x", "x" * 100])
def test_safe_component_keeps_plain_names(value: str) -> None:
    from recon.io import safe_component

    assert safe_component(value, "--study") == value
