"""One tracking record on its way to MLflow: batching to MLflow's limits, sending, and which failures to retry.

:mod:`tracking.runs.writer` decides when a record is sent or spooled; this module only knows how a record
becomes client calls (:func:`send_record`) and how to tell a server that is down (:func:`is_transient`,
retry later) from a record the server refused (:func:`is_refused`, keep it aside).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

MAX_METRICS_PER_CALL = 800  # MLflow: at most 1000 entities per batch, 100 params and 100 tags
MAX_PARAMS_TAGS_PER_CALL = 100
MAX_TAG_VALUE = 8000

MetricRow = Sequence[Any]  # (key, value, timestamp_ms, step)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed tracking call is worth retrying later (server down or overloaded).

    Args:
        exc: the exception raised by an MLflow client call.

    Returns:
        True for connection errors, timeouts, HTTP 5xx/429 and database lock errors; False for
        requests the server refused on their merits (HTTP 4xx), which would fail again.
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 500
        return status >= 500 or status == 429
    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        return False
    return isinstance(exc, OperationalError)


def is_refused(exc: BaseException) -> bool:
    """Whether a non-transient failure is the record's fault (refused, bad local file), not a bug here."""
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (MlflowException, requests.HTTPError, OSError, ValueError)) and not is_transient(exc)


def _batches(metrics: Sequence[MetricRow], params: dict[str, str],
             tags: dict[str, str]) -> Iterator[tuple[list, list, list]]:
    """Split into MLflow-sized ``log_batch`` calls (a usual epoch is one call); yields nothing when empty."""
    from mlflow.entities import Metric, Param, RunTag

    m = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in metrics]
    p = [Param(k, str(v)) for k, v in params.items()]
    t = [RunTag(k, str(v)) for k, v in tags.items()]
    calls = max(-(-len(m) // MAX_METRICS_PER_CALL), -(-len(p) // MAX_PARAMS_TAGS_PER_CALL),
                -(-len(t) // MAX_PARAMS_TAGS_PER_CALL))
    for i in range(calls):
        yield (
            m[i * MAX_METRICS_PER_CALL:(i + 1) * MAX_METRICS_PER_CALL],
            p[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL],
            t[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL],
        )


def send_record(client: Any, run_id: str, rec: dict[str, Any], file: Path | None) -> None:
    """Apply one ``log_batch``, ``log_artifact``, ``log_inputs``, ``log_image``, ``set_terminated`` or ``reopen``
    record to an existing run.

    Args:
        client: an ``MlflowClient``.
        run_id: the run's real id.
        rec: the record.
        file: the local file of a ``log_artifact`` record (None otherwise).

    Raises:
        ValueError: an unknown record op.
    """
    op = rec["op"]
    if op == "log_batch":
        for metrics, params, tags in _batches(rec["metrics"], rec["params"], rec["tags"]):
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    elif op == "log_artifact":
        upload_artifact(client, run_id, file, rec["artifact_path"], rec["name"])
    elif op == "set_terminated":
        client.set_terminated(run_id, rec["status"], end_time=rec["end_time"])
    elif op == "reopen":
        client.update_run(run_id, status="RUNNING")
    elif op == "log_inputs":
        client.log_inputs(run_id, datasets=dataset_inputs(rec["datasets"]))
    elif op == "log_image":
        upload_image(client, run_id, file, rec["key"], rec["step"], rec["timestamp"])
    else:
        raise ValueError(f"unknown tracking record op {op!r}")


def upload_artifact(client: Any, run_id: str, local_path: str | Path, artifact_path: str | None, name: str) -> None:
    """Upload one file as ``<artifact_path>/<name>`` (overwriting), whatever the local file is called."""
    local_path = Path(local_path)
    if local_path.name == name:
        client.log_artifact(run_id, str(local_path), artifact_path)
        return
    with tempfile.TemporaryDirectory(prefix="smartify-upload-") as tmp:
        link = Path(tmp) / name
        link.symlink_to(local_path.resolve())
        client.log_artifact(run_id, str(link), artifact_path)


def dataset_inputs(datasets: Sequence[dict[str, Any]]) -> list[Any]:
    """MLflow ``DatasetInput`` entities from plain dicts (``name``, ``digest``, ``source_type``, ``source``,
    ``profile``, ``context``), as a ``log_inputs`` record stores them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d.get("profile")),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in datasets]


def upload_image(client: Any, run_id: str, png: Path, key: str, step: int, timestamp: int) -> None:
    """Log a PNG file as step ``step`` of the image series ``key`` (the run page's image slider)."""
    from PIL import Image

    with Image.open(png) as image:
        image.load()
        client.log_image(run_id, image.convert("RGB"), key=key, step=int(step), timestamp=int(timestamp),
                         synchronous=True)


def image_logged(client: Any, run_id: str, key: str, step: int) -> bool:
    """Whether the run has an image of series ``key`` at ``step`` already (MLflow names them
    ``images/<key with ~ for />+step+<step>+timestamp+...``)."""
    prefix = f"images/{key.replace('/', '~')}+step+{int(step)}+"
    return any(a.path.startswith(prefix) for a in client.list_artifacts(run_id, "images"))
