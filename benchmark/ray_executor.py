"""Ray as the executor: `benchmark run --executor ray` and `benchmark tune --executor ray`.

Ray (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI
2018) does the scheduling; nothing here decides where work goes.

- A matrix: the driver expands it, creates the parent run and submits one Ray task per
  unfinished Cell, asking for `gpus_per_cell` GPUs and `cpus_per_cell` CPUs; Ray places
  each task on a node with that much free. Every task calls `runner.run_one`, the path
  the local executor takes, and logs its child run under the explicit parent id. A task
  lost with its node (or its worker process) is retried by Ray (`MAX_RETRIES`) and
  resumes from its last checkpoint when the runs folder is on shared storage; a Cell
  that raises is FAILED with its error and the others go on; Ctrl-C on the driver
  cancels the tasks and marks their runs KILLED. While it waits, the driver shows which
  Cells are queued, running (on which node), done or failed, with an ETA.
- A study: `--workers N` Optuna workers as Ray tasks, each running `tune.run_study` on
  the study's storage (an RDB such as PostgreSQL, or a journal file on shared storage),
  so trials are counted and claimed exactly as with N `benchmark tune` processes.

Where the nodes live on other machines, runs and artifacts must go through an MLflow
tracking server (`mlflow server` with a database backend and `--artifacts-destination`):
a local SQLite store or a local artifact folder is refused before anything is submitted.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gengeo_bench import progress, tracking
from gengeo_bench.errors import ConfigError

MAX_RETRIES = 3  # Ray's retries of a task whose worker or node died (not of a Cell's own error)
POLL_SECONDS = 2.0
LOCAL_STORES = ("sqlite:", "file:")
SERVER_HINT = (
    "Start an MLflow tracking server on the head machine, e.g. `mlflow server --host 0.0.0.0 "
    "--port 5000 --backend-store-uri postgresql://USER:PW@DBHOST/mlflow "
    "--artifacts-destination /shared/mlartifacts` (or s3://...), and pass --tracking-uri "
    "http://HEAD:5000 (or export MLFLOW_TRACKING_URI). See the README, 'Many machines'.")


def _import_ray():
    # Read when Ray is imported: a local instance binds to 127.0.0.1 (on Linux), and task
    # output reaches the driver's log as it is (not merged across tasks, no colour codes).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not progress.is_terminal():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'gengeo-bench[cluster]'.") from None
    return ray


def remote_hosts(node_addresses: list[str], driver_address: str) -> list[str]:
    """The cluster's node addresses that are not the driver's machine."""
    local = {driver_address, "127.0.0.1", "localhost"}
    return sorted({a for a in node_addresses if a not in local})


def check_store(tracking_uri: str, hosts: list[str]) -> None:
    """A store on this machine's disk cannot take runs from other machines."""
    if not hosts:
        return
    scheme = tracking_uri.split(":", 1)[0] + ":" if ":" in tracking_uri else ""
    if tracking_uri.startswith(LOCAL_STORES) or not scheme or tracking_uri.startswith("/"):
        raise ConfigError(
            f"tracking URI {tracking_uri!r} is a store on this machine, but the Ray cluster has "
            f"nodes on other machines ({', '.join(hosts[:4])}): their Cells could not log there. "
            + SERVER_HINT)


def check_artifact_location(location: str, hosts: list[str], experiment: str) -> None:
    """Artifacts must be proxied by the server (mlflow-artifacts:) or on shared object storage."""
    if not hosts:
        return
    if location.startswith("file:") or location.startswith("/") or "://" not in location and \
            not location.startswith("mlflow-artifacts:"):
        raise ConfigError(
            f"experiment {experiment!r} keeps its artifacts at {location!r}, a path on one "
            f"machine, but the Ray cluster has nodes on other machines ({', '.join(hosts[:4])}). "
            f"Serve artifacts through the tracking server (`mlflow server "
            f"--artifacts-destination ...`) and use an experiment created through it (a new "
            f"matrix name, or delete the old experiment). " + SERVER_HINT)


@dataclass
class Cluster:
    """A connected Ray cluster and what its nodes mean for the tracking store."""

    address: str
    hosts: list[str]  # nodes on other machines
    tracking_uri: str

    def check_artifacts(self, mlclient, experiment_id: str) -> None:
        experiment = mlclient.get_experiment(experiment_id)
        check_artifact_location(experiment.artifact_location, self.hosts, experiment.name)

    # --- a matrix -------------------------------------------------------------------

    def warm_up(self, tracking_uri: str, cells: list, resources) -> None:
        """Start Ray workers importing what a Cell needs while the driver creates the runs.

        A Ray worker's first task pays for importing torch, timm, MLflow and matplotlib
        (about 5 s on a small CPU). One warm-up task per Cell, with the Cells' resources,
        does that on as many workers as can start now; Ray then reuses those workers for
        the Cell tasks (on a warm worker a warm-up returns at once). Nothing waits for the warm-ups, and one
        that fails only costs its Cell the same error later.
        """
        ray = _import_ray()
        task = ray.remote(warm_task)
        options = {"num_cpus": resources.cpus_per_cell, "num_gpus": resources.gpus_per_cell,
                   "max_retries": 0}
        for mc in cells:
            task.options(name=f"warm up for {mc.id}", **options).remote(
                tracking_uri, plugins(mc.cell), resources.cpus_per_cell)

    def run(self, ctx, cells: list, resources) -> list:
        """One Ray task per unfinished Cell; waits for all of them, showing the board."""
        ray = _import_ray()
        from gengeo_bench import runner

        mlclient = tracking.client(ctx.tracking_uri)
        existing = runner.existing_cell_runs(mlclient, ctx.experiment_id)
        outcomes: dict[str, Any] = {}
        todo = []
        for mc in cells:
            run = existing.get(mc.id)
            if run is not None and runner.is_done(run):
                outcomes[mc.id] = runner.Outcome(
                    mc.id, mc.label, "skipped", headline=runner.headline_metric(mc.cell, run.data.metrics),
                    run_id=run.info.run_id, worker=run.data.tags.get(tracking.WORKER, ""))
            else:
                todo.append(mc)
        task = ray.remote(cell_task)
        options = {"num_cpus": resources.cpus_per_cell, "num_gpus": resources.gpus_per_cell,
                   "max_retries": MAX_RETRIES, "retry_exceptions": False}
        payload = asdict(ctx)
        refs = {task.options(name=f"cell {mc.id}", **options).remote(
                    payload, mc.cell.model_dump(mode="json"), resources.cpus_per_cell): mc
                for mc in todo}
        progress.log_line(f"ray: submitted {len(refs)} Cell task(s) to {self.address} "
                          f"({resources.gpus_per_cell:g} GPU, {resources.cpus_per_cell:g} CPU each); "
                          f"{len(cells) - len(todo)} already done")
        board = Board(cells, outcomes, ctx, mlclient)
        pending = dict(refs)
        try:
            with board.live():
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_SECONDS)
                    for ref in ready:
                        mc = pending.pop(ref)
                        outcomes[mc.id] = self._result(ray, ref, mc, ctx, mlclient)
                    board.refresh()
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            self._mark_killed(mlclient, ctx, [pending[r] for r in pending])
            raise
        return [outcomes[mc.id] for mc in cells]

    def _result(self, ray, ref, mc, ctx, mlclient):
        from gengeo_bench import runner

        try:
            return runner.Outcome(**ray.get(ref))
        except ray.exceptions.RayError as exc:  # the task itself died MAX_RETRIES + 1 times
            message = f"Ray task lost: {type(exc).__name__}: {str(exc).splitlines()[0][:500]}"
            run = runner.newest_cell_run(mlclient, ctx.experiment_id, mc.id)
            if run is not None and run.info.status == "RUNNING":
                mlclient.set_tag(run.info.run_id, tracking.ERROR, message)
                mlclient.set_terminated(run.info.run_id, "FAILED")
            return runner.Outcome(mc.id, mc.label, "failed", error=message,
                                  run_id=run.info.run_id if run else "")

    def _mark_killed(self, mlclient, ctx, cells: list) -> None:
        from gengeo_bench import runner

        for mc in cells:
            run = runner.newest_cell_run(mlclient, ctx.experiment_id, mc.id)
            if run is not None and run.info.status == "RUNNING":
                mlclient.set_tag(run.info.run_id, tracking.STOPPED, "driver interrupted (Ctrl-C)")
                mlclient.set_terminated(run.info.run_id, "KILLED")

    # --- a study ---------------------------------------------------------------------

    def tune(self, study, workers: int, n_trials: int | None, timeout: float | None, device: str | None,
             runs_dir: str, resources) -> int:
        """`workers` Optuna workers as Ray tasks on the study's storage; returns trials run."""
        ray = _import_ray()
        if self.hosts and study.storage.startswith("sqlite:"):
            raise ConfigError(
                f"{study.source}: storage {study.storage!r} is a file on this machine, but the Ray "
                f"cluster has nodes on other machines ({', '.join(self.hosts[:4])}). Use a "
                f"PostgreSQL URL (--storage postgresql://USER:PW@DBHOST/optuna) or a journal file "
                f"on shared storage (--storage journal:/shared/optuna.log).")
        task = ray.remote(study_task)
        options = {"num_cpus": resources.cpus_per_cell, "num_gpus": resources.gpus_per_cell,
                   "max_retries": MAX_RETRIES, "retry_exceptions": False}
        refs = [task.options(name=f"study {study.name} worker {i}", **options).remote(
                    study, n_trials, timeout, self.tracking_uri, device, runs_dir,
                    resources.cpus_per_cell) for i in range(workers)]
        progress.log_line(f"ray: {workers} Optuna worker(s) for study {study.name} on {self.address}")
        try:
            return sum(ray.get(refs))
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise


def connect(address: str | None, tracking_uri: str) -> Cluster:
    """Join the cluster at `address` (`auto`, HOST:PORT) or start a local Ray instance (None).

    Checks, before any run is created, that the tracking store can take runs from every
    node.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
        try:
            if address in (None, "", "local"):
                # A private instance for this command only, reachable from this machine only.
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                         **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"--ray-address {address}: cannot join a Ray cluster there ({exc}). "
                              f"Start one with `ray start --head` or omit --ray-address for a "
                              f"local instance.") from None
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    hosts = remote_hosts(nodes, ray.util.get_node_ip_address())
    check_store(tracking_uri, hosts)
    if hosts:
        progress.log_line("ray: nodes on other machines; resuming a Cell after its node is lost "
                          "needs --runs-dir on storage every node shares.")
    return Cluster(address or "a local Ray instance", hosts, tracking_uri)


# --- what runs inside the tasks ------------------------------------------------------


def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def plugins(cell) -> list[tuple[str, str]]:
    """(kind, name) of the plugins a Cell builds: its backbone, aggregator and datasets."""
    parts = {("backbone", cell.model.backbone.name), ("aggregator", cell.model.aggregator.name)}
    return sorted(parts | {("dataset", ref.name) for ref in cell.datasets.values()})


def warm_task(tracking_uri: str, cell_plugins: list[tuple[str, str]], cpus: float) -> None:
    """On a Ray worker: import what a Cell runs (and MLflow's store), before the Cell comes."""
    import matplotlib.figure  # noqa: F401  (the explain figures)

    from gengeo_bench import engine, explain, registry  # noqa: F401

    _set_threads(cpus)
    for kind, name in cell_plugins:
        registry.get(kind, name).load()
    if not tracking_uri.startswith(("http:", "https:")):
        # Most of opening a database store later; opening it now would queue the driver,
        # which is creating it, behind the workers for the store's lock.
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def cell_task(ctx_fields: dict[str, Any], cell_data: dict[str, Any], cpus: float) -> dict[str, Any]:
    """One Cell on a Ray worker: `runner.run_one`, exactly as the local executor runs it."""
    import ray

    from gengeo_bench import runner
    from gengeo_bench.config import Cell

    _set_threads(cpus)
    ctx = runner.Context(**ctx_fields)
    node_id = ray.get_runtime_context().get_node_id()
    address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "?")
    ctx = replace(ctx, tags={**ctx.tags, runner.NODE: f"{address} ({socket.gethostname()})"},
                  scheduled=True)
    if ctx.device is None:
        ctx = replace(ctx, device="cuda" if ray.get_gpu_ids() else "cpu")
    return asdict(runner.run_one(ctx, Cell.model_validate(cell_data)))


def study_task(study, n_trials: int | None, timeout: float | None, tracking_uri: str,
               device: str | None, runs_dir: str, cpus: float) -> int:
    """One Optuna worker on a Ray worker: `tune.run_study`, as `benchmark tune` runs it."""
    import ray

    from gengeo_bench import tune

    _set_threads(cpus)
    if device is None:
        device = "cuda" if ray.get_gpu_ids() else "cpu"
    return tune.run_study(study, n_trials=n_trials, timeout=timeout, tracking_uri=tracking_uri,
                          device=device, runs_dir=runs_dir).ran


# --- the driver's board ----------------------------------------------------------------


class Board:
    """Queued / running (where) / done / failed per Cell, with an ETA, while the driver waits.

    A live table on a terminal; otherwise a plain line whenever the counts change, and
    at most every GENGEO_LOG_EVERY seconds.
    """

    def __init__(self, cells: list, outcomes: dict, ctx, mlclient):
        self.cells, self.outcomes, self.ctx, self.mlclient = cells, outcomes, ctx, mlclient
        self.started = time.time()
        self.running: dict[str, tuple[str, float]] = {}  # cell id -> (node, start time)
        self.last_line, self.last_counts = 0.0, None
        self.view: Live | None = None

    def live(self) -> Live:
        if progress.is_terminal():
            self.view = Live(self.table(), console=progress.console(stderr=True),
                             refresh_per_second=1, transient=False)
            return self.view
        import contextlib

        return contextlib.nullcontext()

    def _poll_running(self) -> None:
        from gengeo_bench import runner

        self.running = {}
        for cell_id, run in runner.existing_cell_runs(self.mlclient, self.ctx.experiment_id).items():
            if run.info.status == "RUNNING" and cell_id not in self.outcomes:
                node = run.data.tags.get(runner.NODE) or run.data.tags.get(tracking.WORKER, "?")
                self.running[cell_id] = (node, (run.info.start_time or 0) / 1000)

    def counts(self) -> dict[str, int]:
        done = sum(o.status in ("done", "skipped", "elsewhere") for o in self.outcomes.values())
        failed = sum(o.status in ("failed", "failed_elsewhere") for o in self.outcomes.values())
        running = len(self.running)
        return {"queued": len(self.cells) - done - failed - running, "running": running,
                "done": done, "failed": failed}

    def eta(self) -> str:
        ran = [o.seconds for o in self.outcomes.values() if o.status == "done" and o.seconds > 0]
        counts = self.counts()
        left = counts["queued"] + counts["running"]
        if not ran or not left:
            return "-"
        parallel = max(1, counts["running"])
        return progress._duration(sum(ran) / len(ran) * left / parallel)

    def table(self) -> Table:
        counts = self.counts()
        table = Table(title=f"{self.ctx.matrix} on Ray: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                      + f"; ETA {self.eta()}", title_justify="left")
        for column in ("cell", "id", "state", "node", "time", "R@1"):
            table.add_column(column)
        now = time.time()
        for mc in self.cells:
            outcome = self.outcomes.get(mc.id)
            if outcome is not None:
                state = outcome.status.replace("_", " ")
                node, seconds = outcome.worker or "-", f"{outcome.seconds:.0f}s"
                r1 = "-" if outcome.headline is None else f"{outcome.headline:.2f}"
            elif mc.id in self.running:
                node, since = self.running[mc.id]
                state, seconds, r1 = "running", f"{now - since:.0f}s", "-"
            else:
                state, node, seconds, r1 = "queued", "-", "-", "-"
            table.add_row(escape(mc.label), mc.id, state, escape(node), seconds, r1)
        return table

    def refresh(self) -> None:
        try:
            self._poll_running()
        except Exception:  # a store hiccup only delays the board
            return
        if self.view is not None:
            self.view.update(self.table())
            return
        counts = self.counts()
        now = time.monotonic()
        if counts != self.last_counts or now - self.last_line >= progress.log_every():
            self.last_counts, self.last_line = counts, now
            where = ", ".join(sorted({node for node, _ in self.running.values()}))
            progress.log_line(f"ray {self.ctx.matrix}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                              + (f" (on {where})" if where else "") + f"; ETA {self.eta()}")

