"""Real servers for the scale-out tests, started on 127.0.0.1 and stopped by process id.

- `RayHead`: `ray start --head --block` (a one-node Ray cluster; the test joins it by
  address, as a worker machine would);
- `MlflowServer`: `mlflow server` with a SQLite backend and `--artifacts-destination`
  (artifacts proxied through the server, as on a cluster);
- `Postgres`: a PostgreSQL server from the Debian package (`initdb` + `postgres` on a
  temporary folder); as root it runs as the `postgres` system user, as PostgreSQL
  requires. `make test` installs the package when it is missing.

Each runs in its own process group and is stopped by signalling that group (its
children die with it); a server that fails to come up raises with its log.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_env(**extra: str) -> dict[str, str]:
    """The environment for Ray on this machine: loopback only, no token for a test cluster."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0", **extra}


class Server:
    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None, **popen):
        self.log_path = log
        self.handle = open(log, "w")
        self.proc = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT,
                                     env=env or dict(os.environ), start_new_session=True, **popen)
        self.pid = self.proc.pid

    def wait_until(self, ready, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        log = self.log_path.read_text()[-4000:]
        self.stop()
        raise RuntimeError(f"{what} did not start; its log ({self.log_path}):\n{log}")

    grace = 20.0  # seconds a server gets to stop before SIGKILL

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server's process group, then SIGKILL whatever is left of it."""
        for current in (sig, signal.SIGKILL):
            try:
                os.killpg(self.pid, current)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its children may not be yet.
            time.sleep(0.5)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.handle.close()


class RayHead(Server):
    grace = 5.0  # `ray start --block` leaves its GCS running for long after SIGTERM

    def __init__(self, folder: Path, cpus: int = 2):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(self.port),
             "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
             "--include-dashboard", "false", "--temp-dir", str(folder / "ray")],
            folder / "ray-head.log", env=loopback_env())
        probe = [sys.executable, "-c", f"import ray; ray.init(address='{self.address}'); "
                 "assert ray.cluster_resources().get('CPU')"]
        self.wait_until(lambda: subprocess.run(probe, env=loopback_env(), capture_output=True,
                                               timeout=60).returncode == 0, "ray start --head")


class MlflowServer(Server):
    def __init__(self, folder: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            folder / "mlflow-server.log")
        self.wait_until(lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200,
                        "mlflow server")


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class Postgres(Server):
    def __init__(self, folder: Path):
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL's server programs (initdb, postgres) are not installed: "
                               "`apt-get install postgresql` (make test does this).")
        self.port = free_port()
        as_user: dict = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as `postgres`
            import pwd

            user = pwd.getpwnam("postgres")
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            # pytest's folders are private to root; the server's lives where `postgres` can reach it.
            folder = Path(tempfile.mkdtemp(prefix="gengeo-pg-"))
            os.chown(folder, user.pw_uid, user.pw_gid)
            self.cleanup = folder
        folder.mkdir(parents=True, exist_ok=True)
        data, sockets = folder / "pgdata", folder / "pgsock"
        made = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                               "--auth=trust", "-E", "UTF8"], capture_output=True, text=True,
                              cwd=folder, **as_user)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stdout}{made.stderr}")
        made = subprocess.run(["mkdir", str(sockets)], capture_output=True, **as_user)
        super().__init__(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(sockets), "-c", "fsync=off"],
            folder / "postgres.log", cwd=folder, **as_user)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

        def ready() -> bool:
            import sqlalchemy

            engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect() as conn:
                return conn.execute(sqlalchemy.text("select 1")).scalar() == 1

        self.wait_until(ready, "postgres")

    cleanup: Path | None = None

    def stop(self, sig: int = signal.SIGINT) -> None:  # SIGINT: PostgreSQL's fast shutdown
        super().stop(sig)
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)
