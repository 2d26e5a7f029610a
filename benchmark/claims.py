"""Claims: at most one worker runs a Cell at a time, however many share a matrix.

Several `benchmark run` processes (one per GPU, on one machine or many) and the tasks of
the Ray executor all work through the same Cells. Before a worker touches a Cell it
takes the Cell's claim: an exclusive POSIX lock (`fcntl.lockf`) on `claim.lock` in the
Cell's work directory, held until the Cell ends. The operating system (or, on NFS, the
file server) holds the lock for the worker's process, so:

- a Cell claimed by a live worker cannot be claimed by another: it is skipped and
  looked at again later;
- when a worker dies (killed, crashed, its machine lost), its lock is released with it:
  the next worker that tries the Cell claims it and resumes it from its checkpoint;
- a claim is taken before the tracking store is read, and the Cell's MLflow run is
  marked FINISHED before the claim is released, so the store read under a claim is the
  truth about that Cell.

Across machines the runs folder must be shared storage (NFS, Lustre, a cluster file
system): it holds the checkpoints a takeover resumes from, and the claims. While a Cell
runs, its worker also writes a heartbeat into the Cell's MLflow run (tag
`gengeo.heartbeat`); a worker that claims a Cell whose run still beats on another host
knows the runs folder is not shared and leaves the Cell alone (see `runner.run_one`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gengeo_bench.errors import ConfigError

CLAIM_FILE = "claim.lock"
# Claims this process holds. POSIX locks belong to the process, and closing *any* handle
# on a locked file drops the lock: never probe a file this process holds.
_HELD: set[Path] = set()


class Claim:
    """The exclusive right to run the Cell whose work directory is `workdir`."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / CLAIM_FILE
        self.handle = None

    def acquire(self, worker: str) -> bool:
        """Take the claim without waiting; False when another live worker holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise ConfigError(
                f"{self.path}: the runs folder does not support file locks ({exc}); workers claim "
                f"Cells with them. Put --runs-dir on a local disk or a file system with locks "
                f"(NFSv4, Lustre)."
            ) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"worker": worker, "host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.time()}))
        handle.flush()
        self.handle = handle
        _HELD.add(self.path.resolve())
        return True

    def release(self) -> None:
        if self.handle is not None:
            fcntl.lockf(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            _HELD.discard(self.path.resolve())

    def holder(self) -> dict[str, Any] | None:
        """Who holds the claim now (`worker`, `host`, `pid`, `since`), or None when it is free."""
        if self.handle is not None or self.path.resolve() in _HELD:
            return json.loads(self.path.read_text())
        if not self.path.is_file():
            return None
        if self.acquire_probe():
            return None
        try:
            return json.loads(self.path.read_text() or "{}") or {"worker": "unknown"}
        except json.JSONDecodeError:
            return {"worker": "unknown"}

    def acquire_probe(self) -> bool:
        """True when nobody holds the claim (tested by taking and dropping it at once)."""
        if self.path.resolve() in _HELD:
            return False
        with open(self.path, "a+") as handle:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            fcntl.lockf(handle, fcntl.LOCK_UN)
            return True

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Heartbeat:
    """Calls `beat()` every `interval` seconds on a daemon thread while a Cell runs."""

    def __init__(self, beat: Callable[[], None], interval: float):
        self.beat, self.interval = beat, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="gengeo-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a missed beat is harmless; the next one may get through
                pass

    def __enter__(self) -> Heartbeat:
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
