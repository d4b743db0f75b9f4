"""Real services for integration tests: a private PostgreSQL cluster and an ``mlflow server``.

Helpers, not tests. Everything listens on 127.0.0.1 at a free port, lives in its own temporary
folder and is stopped by the PID it was started with. PostgreSQL refuses to run as root: under
root (CI) the cluster runs as an unprivileged user (``$SMARTIFY_PG_USER``, else ``postgres``,
else ``nobody``) through ``subprocess``'s ``user=``/``group=`` switch, in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN_ENV = "SMARTIFY_PG_BIN"
PG_USER_ENV = "SMARTIFY_PG_USER"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited; True if it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def pg_bin_dir() -> Path | None:
    """Folder with ``initdb``/``pg_ctl``: ``$SMARTIFY_PG_BIN``, the PATH, then ``/usr/lib/postgresql/*/bin``."""
    env = os.environ.get(PG_BIN_ENV)
    candidates = [Path(env)] if env else []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)

    def version(path: str) -> int:
        part = Path(path).parent.name
        return int(part) if part.isdigit() else -1

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    names = [os.environ[PG_USER_ENV]] if os.environ.get(PG_USER_ENV) else ["postgres", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of the users {names} exists; set ${PG_USER_ENV}")


class PostgresCluster:
    """A throw-away PostgreSQL cluster: ``initdb`` into a temporary folder, ``pg_ctl start`` on 127.0.0.1.

    Password authentication over TCP (a random password), trust only on the Unix socket in the
    cluster's own folder (mode 0700). Databases are created with :meth:`create_database`.

    Args:
        bin_dir: folder with ``initdb``, ``pg_ctl`` (default: :func:`pg_bin_dir`).
        user: database superuser name.
    """

    def __init__(self, bin_dir: Path | None = None, user: str = "smartify") -> None:
        found = bin_dir or pg_bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found")
        self.bin = found
        self.user = user
        self.password = secrets.token_hex(12)
        self.port = 0
        self.pid: int | None = None
        self.account = _service_user()
        self.folder = Path(tempfile.mkdtemp(prefix="smartify-pg-"))
        if self.account is not None:
            os.chown(self.folder, self.account.pw_uid, self.account.pw_gid)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"

    # ---- process helpers ----------------------------------------------------------------------

    def _run(self, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
        kwargs: dict = {}
        if self.account is not None:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "HOME": str(self.folder)}
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.folder,
                              **kwargs)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def _write_private(self, path: Path, text: str) -> None:
        path.write_text(text)
        os.chmod(path, 0o600)
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "PostgresCluster":
        """``initdb`` (once) and ``pg_ctl start -w`` on a free port; returns self."""
        if self.pid is not None:
            return self
        if not self.data.exists():
            pwfile = self.folder / "pwfile"
            self._write_private(pwfile, self.password + "\n")
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                       "--no-sync"], timeout=timeout)
            pwfile.unlink()
        for attempt in range(3):
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                           "-t", str(int(timeout)), "-o", options, "start"], timeout=timeout + 10)
                break
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}") from None
        self.pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return self

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server log (for failure messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def url(self, database: str = "postgres", driver: str = "psycopg") -> str:
        """SQLAlchemy URL of a database: ``postgresql+psycopg://user:password@127.0.0.1:port/db``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (over TCP, with psycopg); returns its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the postmaster by PID: fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL."""
        if self.pid is None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            if wait_gone(self.pid, wait):
                break
        self.pid = None

    def cleanup(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a database backend and proxied artifacts.

    Args:
        backend_uri: ``--backend-store-uri`` (``postgresql+psycopg://...`` or ``sqlite:///...``).
        artifacts_dir: ``--artifacts-destination`` folder (the server stores and serves artifacts).
        log_file: where the server's output goes (default: next to the artifacts folder).
    """

    def __init__(self, backend_uri: str, artifacts_dir: Path, log_file: Path | None = None) -> None:
        self.backend_uri = backend_uri
        self.artifacts_dir = Path(artifacts_dir)
        self.log_file = log_file or self.artifacts_dir.parent / "mlflow-server.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the server's main process (leader of its own process group)."""
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        """The ``mlflow server`` command line."""
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts_dir),
                "--workers", "1"]

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        """Start the server (same port on a restart) and wait until ``/health`` answers; returns self."""
        if self.proc is not None:
            return self
        self.port = self.port or free_port()
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:]
                self.proc = None
                raise RuntimeError(f"mlflow server exited: {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (server, gunicorn/uvicorn workers), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        try:  # workers left in the group
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
