"""The parent run of one invocation (a pipeline, a study): stage and trial runs nest under it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from tracking.runs.callback import stop_reason
from tracking.runs.environment import environment_tags
from tracking.runs.stores import Stores
from tracking.runs.writer import TrackingWriter


def start_parent_run(
    stores: Stores, experiment: str, name: str, tags: dict[str, str] | None = None,
    writer: TrackingWriter | None = None,
) -> str:
    """Create the parent run of one pipeline invocation; stage runs nest under it.

    Args:
        stores: tracking stores.
        experiment: experiment name.
        name: run name (e.g. the pipeline or study name).
        tags: extra tags.
        writer: a writer to share with the stage callbacks (one is made if None).

    Returns:
        The run id (a ``local-`` placeholder while the server is unreachable).
    """
    writer = writer or TrackingWriter(stores)
    all_tags = {**environment_tags(), "smartify.kind": "pipeline", **(tags or {})}
    return writer.create_run(experiment, name, all_tags)


@contextmanager
def parent_run(
    stores: Stores, experiment: str, name: str, tags: dict[str, str] | None = None,
    writer: TrackingWriter | None = None,
) -> Iterator[str]:
    """Context manager around :func:`start_parent_run`: FINISHED on success, KILLED on Ctrl-C, else FAILED."""
    writer = writer or TrackingWriter(stores)
    run_id = start_parent_run(stores, experiment, name, tags, writer)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        writer.log_batch(run_id, tags={"smartify.stopped_by": stop_reason() or "SIGINT"})
        raise
    finally:
        writer.set_terminated(run_id, status)
        writer.flush()
