"""Where tracking data lives: the embedded store inside the checkout, or any MLflow server.

Embedded default (nothing to start, nothing to configure)::

    <home>/mlflow.db        tracking and model registry (``sqlite:///<home>/mlflow.db``)
    <home>/artifacts/       run artifacts (``file://`` URIs, set explicitly per experiment)
    <home>/optuna.db        Optuna studies
    <home>/spool/           records that could not reach the tracking server yet

``<home>`` is ``<repo>/mlruns`` (the checkout that contains this package) or ``$SMARTIFY_HOME``.
MLflow 3 refuses the plain file store for tracking, hence SQLite; artifacts stay plain files.

``MLFLOW_TRACKING_URI`` and ``MLFLOW_REGISTRY_URI`` switch to a real server (or database); explicit
arguments win over both. Short HTTP retries are the default here (see :func:`apply_http_defaults`)
so that a dead server costs an epoch a couple of seconds, not minutes: what could not be sent goes
to the spool (:mod:`tracking.runs.spool`) and is replayed later.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from recon.errors import InputError

log = logging.getLogger(__name__)

HOME_ENV = "SMARTIFY_HOME"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"

#: MLflow's own HTTP client settings and the values used unless the user set them. MLflow's defaults
#: (7 retries with backoff factor 2, 120 s timeout) would stall training for minutes on a dead server.
#: One immediate retry (urllib3 does not sleep before the first one); whatever still fails is spooled
#: and replayed, so a refused connection costs milliseconds and a hung server at most 2 x the timeout.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

_REMOTE_SCHEMES = ("http", "https", "databricks")

#: The experiment tag that tells the MLflow 3 UI what an experiment is for, and the value for model training.
#: With it the experiment opens on its runs table (workflow "machine learning"), not on the GenAI traces overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


@dataclass(frozen=True)
class Stores:
    """Resolved tracking locations.

    Attributes:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://host:port``...).
        registry_uri: MLflow model registry URI.
        home: the local smartify folder (spool, embedded databases).
        artifact_root: folder for run artifacts when the client writes them itself (database
            backends); None when a tracking server stores (proxies) artifacts.
    """

    tracking_uri: str
    registry_uri: str
    home: Path
    artifact_root: Path | None

    @property
    def is_remote(self) -> bool:
        """True when tracking goes through an HTTP server (which may be unreachable)."""
        return uri_scheme(self.tracking_uri) in _REMOTE_SCHEMES

    @property
    def spool_dir(self) -> Path:
        """Default folder of the local spool."""
        return self.home / "spool"

    def describe(self) -> dict[str, str]:
        """Plain-text summary (credentials removed) for logs and ``smartify tracking info``."""
        return {
            "tracking_uri": redact_uri(self.tracking_uri),
            "registry_uri": redact_uri(self.registry_uri),
            "home": str(self.home),
            "artifact_root": str(self.artifact_root) if self.artifact_root else "(kept by the tracking server)",
            "spool": str(self.spool_dir),
        }


def repo_root(fallback_to_cwd: bool = False) -> Path:
    """The source checkout that contains this package.

    Args:
        fallback_to_cwd: return the current directory when the package is not inside a checkout
            (e.g. installed from a wheel) instead of raising.

    Returns:
        The checkout's root folder.

    Raises:
        InputError: not inside a checkout and ``fallback_to_cwd`` is False.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.cfg").is_file() and (root / "recon").is_dir():
        return root
    if fallback_to_cwd:
        return Path.cwd()
    raise InputError(f"{root}: not a smartify checkout; set ${HOME_ENV} to a folder for tracking data")


def smartify_home() -> Path:
    """``$SMARTIFY_HOME`` if set, else ``<repo>/mlruns``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return repo_root() / "mlruns"


def sqlite_uri(path: Path) -> str:
    """SQLAlchemy URI of a SQLite file (absolute path, hence four slashes)."""
    return f"sqlite:///{Path(path).resolve()}"


def default_tracking_uri() -> str:
    """``sqlite:///<home>/mlflow.db``."""
    return sqlite_uri(smartify_home() / "mlflow.db")


def default_optuna_storage() -> str:
    """``sqlite:///<home>/optuna.db`` (Optuna RDB storage URL)."""
    return sqlite_uri(smartify_home() / "optuna.db")


def uri_scheme(uri: str) -> str:
    """Lower-case scheme of a URI (``sqlite``, ``postgresql``, ``http``...); '' for a bare path."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme.split("+", 1)[0]


def redact_uri(uri: str) -> str:
    """The URI without user name and password (safe to print or store)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def resolve_stores(tracking_uri: str | None = None, registry_uri: str | None = None) -> Stores:
    """Resolve the tracking locations: explicit arguments, then environment, then the embedded store.

    Args:
        tracking_uri: explicit tracking URI (wins over ``MLFLOW_TRACKING_URI``).
        registry_uri: explicit registry URI (wins over ``MLFLOW_REGISTRY_URI``); defaults to the
            tracking URI.

    Returns:
        The resolved :class:`Stores`.

    Raises:
        InputError: a URI that MLflow 3 cannot use for tracking (a plain folder or ``file:`` URI).
    """
    home = smartify_home()
    tracking = tracking_uri or os.environ.get(TRACKING_ENV) or sqlite_uri(home / "mlflow.db")
    registry = registry_uri or os.environ.get(REGISTRY_ENV) or tracking
    if uri_scheme(tracking) in ("", "file"):
        raise InputError(
            f"tracking URI {tracking!r}: the file store is not supported by MLflow 3; "
            "expected sqlite:///path.db, another database URI or http(s)://host:port"
        )
    remote = uri_scheme(tracking) in _REMOTE_SCHEMES
    return Stores(tracking, registry, home, None if remote else home / "artifacts")


def apply_http_defaults() -> dict[str, str]:
    """Set MLflow's HTTP retry and timeout variables to short values unless the user set them.

    Returns:
        The values in force afterwards, by variable name.
    """
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in HTTP_DEFAULTS}


def ensure_local_dirs(stores: Stores) -> None:
    """Create the home folder, the SQLite file's folder and the artifact root where they are local."""
    stores.home.mkdir(parents=True, exist_ok=True)
    for uri in (stores.tracking_uri, stores.registry_uri):
        if uri_scheme(uri) == "sqlite":
            db_path = uri.split(":///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    if stores.artifact_root is not None:
        stores.artifact_root.mkdir(parents=True, exist_ok=True)


def make_client(stores: Stores):
    """An ``MlflowClient`` bound to these stores (explicit URIs, no global state).

    Args:
        stores: the resolved stores.

    Returns:
        ``mlflow.MlflowClient``.
    """
    from mlflow import MlflowClient

    apply_http_defaults()
    ensure_local_dirs(stores)
    return MlflowClient(tracking_uri=stores.tracking_uri, registry_uri=stores.registry_uri)


def experiment_artifact_location(name: str, stores: Stores) -> str | None:
    """File URI for a new experiment's artifacts, or None when the server chooses (proxied artifacts)."""
    if stores.artifact_root is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "experiment"
    return (stores.artifact_root / slug).resolve().as_uri()


def get_or_create_experiment(name: str, stores: Stores, client=None) -> str:
    """The id of experiment ``name``, creating it (with an explicit artifact location) if needed.

    The experiment is tagged as model training (:data:`EXPERIMENT_KIND_TAG`), also when it exists without
    the tag, so the MLflow UI opens it on the runs table.

    Args:
        name: experiment name.
        stores: the resolved stores.
        client: an ``MlflowClient`` for these stores (one is made if None).

    Returns:
        The experiment id.
    """
    from mlflow.exceptions import MlflowException

    client = client or make_client(stores)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise InputError(f"experiment {name!r} is deleted in {redact_uri(stores.tracking_uri)}; restore or rename it")
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before smartify set the kind: the UI would guess it
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=experiment_artifact_location(name, stores),
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except MlflowException as exc:
        # Another process created it between the lookup and the creation.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        log.debug("experiment %s created concurrently (%s)", name, exc)
        return found.experiment_id
