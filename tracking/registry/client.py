"""The registry's MLflow client: a server that cannot be reached is said so, never read as "not found".

MLflow wraps a refused connection or a timeout in a plain ``MlflowException`` (error code
``INTERNAL_ERROR``, the ``requests`` error as its context), the same type it raises for a missing
version or alias. Code that catches ``MlflowException`` to mean "absent" would then report an
empty registry while the server is down. :func:`registry_client` returns a client whose calls turn
such failures into :class:`ServerUnreachable` (an :class:`recon.errors.InputError`, so the CLI prints
one line and exits 2) before any caller can mistake them for an answer; every other
``MlflowException`` passes through unchanged.

The message names the server with credentials removed (:func:`tracking.runs.stores.redact_uri`) and
how it failed (connection refused, timed out, host not found). MLflow's HTTP retries are kept short by
:func:`tracking.runs.stores.apply_http_defaults` (set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` to fail at
once).
"""

from __future__ import annotations

import contextlib
import functools
import socket
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from recon.errors import InputError
from tracking.runs.stores import Stores, make_client, redact_uri


class ServerUnreachable(InputError):
    """The tracking or registry server did not answer (refused, timed out, unknown host).

    Args:
        uri: the server's URI (redacted before it is shown).
        how: what failed, e.g. ``connection refused``.
    """

    def __init__(self, uri: str, how: str) -> None:
        self.uri = redact_uri(uri)
        self.how = how
        super().__init__(f"tracking server {self.uri} is unreachable ({how}); start it, or point "
                         "MLFLOW_TRACKING_URI at one that runs")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (cycle-safe)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def connection_failure(exc: BaseException) -> str | None:
    """How a call failed to reach its server, or None when the server answered.

    Args:
        exc: an exception from an MLflow client call.

    Returns:
        ``connection refused``, ``timed out``, ``host not found``, ``connection failed`` or None.
    """
    import requests

    reached_network = False
    for item in _chain(exc):
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, (socket.timeout, TimeoutError, requests.exceptions.Timeout)):
            return "timed out"
        if isinstance(item, socket.gaierror):
            return "host not found"
        if isinstance(item, requests.exceptions.ConnectionError):
            reached_network = True
    return "connection failed" if reached_network else None


def _server_of(stores: Stores, exc: BaseException) -> str:
    """The store URI the failed request went to (the registry's when it is another server)."""
    text = str(exc)
    for uri in (stores.registry_uri, stores.tracking_uri):
        host = urlsplit(uri).hostname
        if host and host in text:
            return uri
    return stores.tracking_uri


@contextlib.contextmanager
def translated(stores: Stores) -> Iterator[None]:
    """Turn connection failures raised inside the block into :class:`ServerUnreachable`.

    Args:
        stores: the stores the block talks to (for the URI in the message).

    Raises:
        ServerUnreachable: the block failed because the server could not be reached.
    """
    try:
        yield
    except ServerUnreachable:
        raise
    except Exception as exc:
        how = connection_failure(exc)
        if how is None:
            raise
        raise ServerUnreachable(_server_of(stores, exc), how) from None


class RegistryClient:
    """An ``MlflowClient`` whose every call goes through :func:`translated`.

    Args:
        stores: the resolved stores.

    Attributes:
        stores: the stores it talks to.
    """

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self._client = make_client(stores)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with translated(self.stores):
                return attr(*args, **kwargs)

        return call


def registry_client(stores: Stores) -> RegistryClient:
    """The client for registry calls (lookups, registration, promotion, submission).

    Args:
        stores: the resolved stores.

    Returns:
        A :class:`RegistryClient` (same methods as ``mlflow.MlflowClient``).
    """
    return RegistryClient(stores)


def guarded(stores: Stores, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``func`` (e.g. ``mlflow.artifacts.download_artifacts``) inside :func:`translated`."""
    with translated(stores):
        return func(*args, **kwargs)
