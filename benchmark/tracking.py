"""MLflow tracking: where runs go and how they are tagged, named and found again.

The default store is MLflow's SQLite backend in the working directory
(`sqlite:///mlflow.db`, artifacts in `mlartifacts/` beside it); `MLFLOW_TRACKING_URI` or
`--tracking-uri` points elsewhere (another database, an MLflow server).

Conventions every command shares (runner, tuner, report):

- one experiment per matrix or study name;
- a parent run per invocation (tag `gengeo.role` = `matrix` or `study`), one child run
  per Cell (`cell`) or trial (`trial`) with `mlflow.parentRunId` set explicitly;
- tags `gengeo.matrix` / `gengeo.study`, `gengeo.cell_id`, `gengeo.seed`, `gengeo.trial`;
- params: the flattened resolved Cell (`backbone.name`, `aggregator.share`,
  `train.lr`, `datasets.cvusa.name`, `seed`, ...), so the UI can search
  `params.aggregator.share = 'clusters'`;
- metrics: `train/loss` per step, `val/<dataset>/R1` per epoch,
  `test/<dataset>[/<protocol>]/{R1,R5,R10,R1pct,hit_rate}` and their `_ci_low/_ci_high`;
- artifacts: `cell.yaml`, `manifests.json`, `environment.json`, `ranks/*.npz`, and from
  `benchmark run` `explain/<target>/` (assignment maps, galleries, explain.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
import traceback
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from gengeo_bench.errors import BenchmarkError, ConfigError

ROLE, MATRIX, STUDY, CELL_ID, SEED, TRIAL = (
    "gengeo.role", "gengeo.matrix", "gengeo.study", "gengeo.cell_id", "gengeo.seed", "gengeo.trial")
PARENT = "mlflow.parentRunId"
ERROR = "gengeo.error"
WORKER = "gengeo.worker"
STOPPED = "gengeo.stopped"
# What a finished Cell run keeps beside its metrics (files of the Cell's work directory).
ARTIFACT_FILES = ("cell.yaml", "manifests.json", "environment.json", "metrics.json")


def tracking_uri(cli_value: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if cli_value:
        return cli_value
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise creating a SQLite store among processes (a lock file beside it).

    MLflow creates and migrates an empty SQLite database on first use; two processes
    doing so at once break the migration (`alembic_version`). Server and other database
    URIs need no lock: their server serialises.
    """
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        yield
        return
    import fcntl

    path = Path(uri[len("sqlite:///"):].split("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def client(uri: str):
    """An MlflowClient on `uri`; a SQLite store is created and migrated here, one process at a time."""
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # Alembic prints a page of migration lines when a new SQLite store is created.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    try:
        with store_lock(uri):
            mlclient = MlflowClient(tracking_uri=uri)
            if uri.startswith("sqlite:///"):
                mlclient.search_experiments(max_results=1)  # create the store under the lock
            return mlclient
    except Exception as exc:  # a malformed URI or an unreachable server
        raise ConfigError(f"tracking URI {uri!r} cannot be used: {exc}") from exc


def experiment_id(mlclient, name: str, uri: str) -> str:
    """The experiment called `name`, created (artifacts beside a SQLite store) if needed.

    Several workers may start at once: whoever creates it first wins and the others
    read it back.
    """
    from mlflow.exceptions import MlflowException

    for _ in range(5):
        found = mlclient.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                mlclient.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
        try:
            with store_lock(uri):
                if mlclient.get_experiment_by_name(name) is None:
                    return mlclient.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by another worker between the two calls
            time.sleep(0.5)
    raise ConfigError(f"experiment {name!r} at {uri} could not be created or read.")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} (MLflow params are strings, max 6,000 chars)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
        out[prefix] = text[:6000]
    return out


def cell_params(cell) -> dict[str, str]:
    """The Cell's resolved config as flat params; model fields are lifted to the top level."""
    data = cell.model_dump(mode="json")
    model = data.pop("model")
    data.pop("name", None)
    return flatten({**model, **data})


def environment() -> dict[str, Any]:
    """Package versions, Python, platform and git commit: logged with every run."""
    packages = {}
    for name in ("gengeo-bench", "torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu",
                 "mlflow", "optuna", "numpy", "pandas", "pydantic"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    return {
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def log_metrics(mlclient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    for start in range(0, len(batch), 500):  # MLflow's log_batch limit is 1,000 metrics
        mlclient.log_batch(run_id, metrics=batch[start:start + 500])


def log_params(mlclient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = mlclient.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 90):  # log_batch takes at most 100 params
        mlclient.log_batch(run_id, params=fresh[start:start + 90])


def find_runs(mlclient, exp_id: str, role: str, extra_filter: str = "") -> list:
    """All runs of one role in an experiment (any status), newest first."""
    query = f"tags.`{ROLE}` = '{role}'" + (f" and {extra_filter}" if extra_filter else "")
    runs, token = [], None
    while True:
        page = mlclient.search_runs([exp_id], filter_string=query, max_results=1000,
                                    order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def worker_id() -> str:
    """`host:pid`: who runs a Cell (tags, claims, summaries)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def error_message(exc: BaseException) -> str:
    """A user-facing error as it is; anything else with its type."""
    return str(exc) if isinstance(exc, BenchmarkError) else f"{type(exc).__name__}: {exc}"


class CellRun:
    """The MLflow run of one Cell while it trains: where its metrics go."""

    def __init__(self, mlclient, run_id: str, workdir: Path):
        self.mlclient, self.run_id, self.workdir = mlclient, run_id, workdir

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.mlclient, self.run_id, metrics, step)

    def finish(self, result) -> None:
        """The final test metrics, the best epoch and the Cell's files; then FINISHED."""
        self.log_metrics(result.metrics, step=result.outcome.epochs_done)
        self.mlclient.set_tag(self.run_id, "gengeo.best_epoch", str(result.outcome.best_epoch))
        for name in ARTIFACT_FILES:
            if (self.workdir / name).is_file():
                self.mlclient.log_artifact(self.run_id, str(self.workdir / name))
        if (self.workdir / "ranks").is_dir():
            self.mlclient.log_artifacts(self.run_id, str(self.workdir / "ranks"), artifact_path="ranks")
        if (self.workdir / "explain").is_dir():
            self.mlclient.log_artifacts(self.run_id, str(self.workdir / "explain"), artifact_path="explain")
        self.mlclient.set_terminated(self.run_id, "FINISHED")


@contextlib.contextmanager
def cell_run(
    mlclient,
    experiment: str,
    cell,
    workdir: Path,
    tags: dict[str, str],
    resume_run_id: str | None = None,
    stop_on: tuple[type[BaseException], ...] = (),
    run_name: str | None = None,
) -> Iterator[CellRun]:
    """One lifecycle for a tracked Cell, shared by the matrix runner and the tuner.

    Creates the child run (or reopens `resume_run_id`, a run a killed worker left
    RUNNING), logs the Cell's resolved values as params, writes `environment.json` and
    `run_id` into `workdir`, and yields a `CellRun`; the caller trains and calls
    `finish(result)`. On the way out:

    - `KeyboardInterrupt`: KILLED, re-raised;
    - an exception in `stop_on` (an Optuna prune): KILLED with tag `gengeo.stopped`, re-raised;
    - any other exception: FAILED with tag `gengeo.error` and `error.txt` (the traceback)
      as an artifact, re-raised, so one Cell's failure is recorded before the caller
      decides whether the others go on.
    """
    run_name = (run_name or cell.name)[:250]
    base = {CELL_ID: cell.id, SEED: str(cell.seed), WORKER: worker_id(), "mlflow.runName": run_name,
            **tags}
    if resume_run_id is not None:
        run_id = resume_run_id
        mlclient.update_run(run_id, status="RUNNING")
        for key, value in base.items():
            if key not in (PARENT, "mlflow.runName"):  # a resumed run keeps its first parent
                mlclient.set_tag(run_id, key, value)
        if PARENT in tags:
            mlclient.set_tag(run_id, "gengeo.resumed_by", tags[PARENT])
    else:
        run_id = mlclient.create_run(experiment, tags=base, run_name=run_name).info.run_id
    log_params(mlclient, run_id, cell_params(cell))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "environment.json").write_text(json.dumps(environment(), indent=2))
    (workdir / "run_id").write_text(run_id)
    run = CellRun(mlclient, run_id, workdir)
    try:
        yield run
    except KeyboardInterrupt:
        mlclient.set_tag(run_id, STOPPED, "interrupted (Ctrl-C)")
        mlclient.set_terminated(run_id, "KILLED")
        raise
    except stop_on as exc:
        mlclient.set_tag(run_id, STOPPED, str(exc)[:5000])
        mlclient.set_terminated(run_id, "KILLED")
        raise
    except Exception as exc:
        mlclient.set_tag(run_id, ERROR, error_message(exc)[:5000])
        (workdir / "error.txt").write_text(traceback.format_exc())
        mlclient.log_artifact(run_id, str(workdir / "error.txt"))
        mlclient.set_terminated(run_id, "FAILED")
        raise
