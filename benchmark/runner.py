"""`benchmark run --matrix FILE`: every Cell of a matrix, tracked in MLflow, then the report.

Per invocation one parent run (`gengeo.role = matrix`); per Cell one child run with an
explicit parent id. Every Cell goes through `run_one`, whichever executor runs it:

- `--executor local` (the default): this process works through the Cells one after the
  other. Several such processes (one per GPU, on one machine or many) may share a
  matrix and its store: each Cell is claimed before it starts (`claims.py`), so no Cell
  runs twice; a Cell claimed by a live worker is skipped and looked at again until it is
  finished, and a Cell whose worker died is taken over and resumes from its checkpoint.
- `--executor ray`: one Ray task per unfinished Cell (`ray_executor.py`), each calling
  `run_one` on the node Ray chose.

Running the same command again skips Cells whose run is FINISHED, resumes interrupted
ones from `runs/<matrix>/<cell id>/` in the same MLflow run, and retries failed ones.
With `--keep-going` a failing Cell is marked FAILED (tag `gengeo.error`) and the others
still run; without it the first failure stops this worker (after marking it). Ctrl-C
marks the current Cell KILLED; `kill -9` loses at most the current epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from gengeo_bench import progress, tracking
from gengeo_bench.claims import Claim, Heartbeat
from gengeo_bench.config import Cell
from gengeo_bench.errors import ConfigError
from gengeo_bench.matrix import Matrix, MatrixCell, axis_label, differing_values, load_matrix

console = progress.console()

HEARTBEAT = "gengeo.heartbeat"
NODE = "gengeo.node"  # the Ray node a Cell runs on
# How often a running Cell says it is alive; the silence after which a RUNNING run on
# another host counts as dead; how often a worker looks again at Cells others hold.
HEARTBEAT_SECONDS = float(os.environ.get("GENGEO_HEARTBEAT_SECONDS", "30"))
HEARTBEAT_GRACE = 4 * HEARTBEAT_SECONDS
WAIT_SECONDS = float(os.environ.get("GENGEO_WAIT_SECONDS", "10"))

# Outcome.status values, as the summary shows them.
STATUS_TEXT = {
    "done": "[green]done", "skipped": "[dim]skipped (done before)", "elsewhere": "done by another",
    "running": "[yellow]running elsewhere", "failed": "[red]failed",
    "failed_elsewhere": "[red]failed (another worker)", "interrupted": "[yellow]interrupted",
}


@dataclass
class Outcome:
    """What became of one Cell in this invocation (serialisable: Ray tasks return it)."""

    cell_id: str
    label: str
    status: str  # a key of STATUS_TEXT
    seconds: float = 0.0
    headline: float | None = None
    error: str = ""
    run_id: str = ""
    worker: str = ""  # who ran it (this worker, another, or the claim's holder)


@dataclass
class Context:
    """Everything `run_one` needs besides the Cell; plain values, so it travels to Ray tasks."""

    tracking_uri: str
    experiment_id: str
    parent_id: str
    matrix: str
    runs_dir: str
    device: str | None = None
    started: float = field(default_factory=time.time)  # this invocation's start (epoch seconds)
    tags: dict[str, str] = field(default_factory=dict)  # extra tags on each child run (node)
    # True inside a Ray task: Ray never runs one task twice at once, so a RUNNING run whose
    # heartbeat is fresh belongs to this task's lost previous attempt, not to a live worker.
    scheduled: bool = False

    def workdir(self, cell: Cell) -> Path:
        return Path(self.runs_dir) / self.matrix / cell.id


def headline_metric(cell: Cell, metrics: dict[str, float]) -> float | None:
    """R@1 on the first target without a protocol (the summary's headline)."""
    return metrics.get(f"test/{cell.targets[0]}/R1")


def is_done(run) -> bool:
    return run.info.status == "FINISHED" and any(k.startswith("test/") for k in run.data.metrics)


def newest_cell_run(mlclient, experiment_id: str, cell_id: str):
    """The newest MLflow run of one Cell (any status), or None."""
    runs = tracking.find_runs(mlclient, experiment_id, "cell",
                              f"tags.`{tracking.CELL_ID}` = '{cell_id}'")
    return runs[0] if runs else None


def existing_cell_runs(mlclient, experiment_id: str) -> dict[str, Any]:
    """The newest run per Cell id in the experiment (any status)."""
    runs: dict[str, Any] = {}
    for run in tracking.find_runs(mlclient, experiment_id, "cell"):
        cell_id = run.data.tags.get(tracking.CELL_ID)
        if cell_id and cell_id not in runs:
            runs[cell_id] = run
    return runs


def _beats_elsewhere(run) -> bool:
    """A RUNNING run whose worker, on another host, sent a heartbeat within the grace period."""
    if run.info.status != "RUNNING":
        return False
    worker = run.data.tags.get(tracking.WORKER, "")
    if worker.rpartition(":")[0] == socket.gethostname():
        return False  # same host: its process is gone, or we would not hold the claim
    try:
        return time.time() - float(run.data.tags.get(HEARTBEAT, "0")) < HEARTBEAT_GRACE
    except ValueError:
        return False


def run_one(ctx: Context, cell: Cell) -> Outcome:
    """Claim one Cell and, unless it is done or failed elsewhere, train and evaluate it.

    The one path every executor takes. Returns an Outcome for every ending except Ctrl-C
    (re-raised after the run is marked KILLED): a Cell's failure is recorded, never raised.
    """
    from gengeo_bench.engine import run_cell
    from gengeo_bench.explain import explain_cell

    mlclient = tracking.client(ctx.tracking_uri)
    me = tracking.worker_id()
    claim = Claim(ctx.workdir(cell))
    if not claim.acquire(me):
        holder = claim.holder() or {}
        return Outcome(cell.id, cell.name, "running", worker=str(holder.get("worker", "another worker")))
    try:
        previous = newest_cell_run(mlclient, ctx.experiment_id, cell.id)
        if previous is not None:
            by = previous.data.tags.get(tracking.WORKER, "")
            ended = (previous.info.end_time or 0) / 1000
            if is_done(previous):
                status = "elsewhere" if ended >= ctx.started and by != me else "skipped"
                took = max(0.0, ended - previous.info.start_time / 1000) if status == "elsewhere" else 0.0
                return Outcome(cell.id, cell.name, status, took,
                               headline_metric(cell, previous.data.metrics),
                               run_id=previous.info.run_id, worker=by)
            if previous.info.status in ("FAILED", "KILLED") and ended >= ctx.started and by != me:
                return Outcome(cell.id, cell.name, "failed_elsewhere",
                               error=previous.data.tags.get(tracking.ERROR, ""),
                               run_id=previous.info.run_id, worker=by)
            if not ctx.scheduled and _beats_elsewhere(previous):
                progress.log_line(
                    f"warning: {cell.name} ({cell.id}) is running on {by} (heartbeat within "
                    f"{HEARTBEAT_GRACE:.0f} s) although its claim in {claim.path} was free here: the "
                    f"runs folder is not shared between the workers' machines. Put --runs-dir on "
                    f"shared storage; this worker leaves the Cell alone.")
                return Outcome(cell.id, cell.name, "running", worker=by)
        resume = previous.info.run_id if previous is not None else None
        return _train(ctx, cell, mlclient, resume, run_cell, explain_cell)
    finally:
        claim.release()


def _train(ctx: Context, cell: Cell, mlclient, resume: str | None, run_cell, explain_cell) -> Outcome:
    workdir = ctx.workdir(cell)
    tags = {tracking.ROLE: "cell", tracking.MATRIX: ctx.matrix, tracking.PARENT: ctx.parent_id,
            **ctx.tags}
    start = time.time()
    node = ctx.tags.get(NODE)
    where = tracking.worker_id() + (f" on node {node}" if node else "")
    progress.log_line(f"{cell.name} ({cell.id}): {'resuming' if resume else 'starting'} on {where} "
                      f"-> {workdir}")
    try:
        with tracking.cell_run(mlclient, ctx.experiment_id, cell, workdir, tags,
                               resume_run_id=resume) as run:
            beat = lambda: mlclient.set_tag(run.run_id, HEARTBEAT, f"{time.time():.0f}")  # noqa: E731
            with Heartbeat(beat, HEARTBEAT_SECONDS):
                result = run_cell(cell, workdir, device=ctx.device, log_metrics=run.log_metrics)
                # Assignment maps, dustbin numbers, galleries (workdir/explain/); never fails.
                result.metrics.update(explain_cell(cell, workdir, ctx.device))
            run.finish(result)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded as FAILED by cell_run; the caller decides what goes on
        message = tracking.error_message(exc)
        progress.log_line(f"{cell.name} ({cell.id}): failed after {time.time() - start:.0f} s: {message}")
        run_id = (workdir / "run_id").read_text() if (workdir / "run_id").is_file() else ""
        return Outcome(cell.id, cell.name, "failed", time.time() - start, error=message, run_id=run_id,
                       worker=tracking.worker_id())
    headline = headline_metric(cell, result.metrics)
    shown = "-" if headline is None else f"{headline:.2f}"
    progress.log_line(f"{cell.name} ({cell.id}): done in {time.time() - start:.0f} s, "
                      f"R@1 {cell.targets[0]} {shown}")
    return Outcome(cell.id, cell.name, "done", time.time() - start, headline, run_id=run.run_id,
                   worker=tracking.worker_id())


# --- the local executor ------------------------------------------------------------------


def run_local(ctx: Context, cells: list[MatrixCell], keep_going: bool, wait: bool,
              poll: float = WAIT_SECONDS) -> list[Outcome]:
    """Work through the Cells here; with `wait`, stay until Cells held by others are settled.

    A Cell another worker holds is looked at again every `poll` seconds: once its worker
    finishes it counts as done by another; if its worker dies, this one takes it over.
    """
    outcomes: dict[str, Outcome] = {}
    pending = list(cells)
    announced = 0.0
    while pending:
        held = []
        for mc in pending:
            outcome = run_one(ctx, mc.cell)
            if outcome.status == "running":
                held.append(mc)
                outcomes[mc.id] = outcome
                continue
            outcomes[mc.id] = outcome
            if outcome.status == "failed" and not keep_going:
                return [outcomes[c.id] for c in cells if c.id in outcomes]
        pending = held
        if not pending or not wait:
            break
        if time.monotonic() - announced > 60:
            announced = time.monotonic()
            names = ", ".join(f"{mc.label} ({outcomes[mc.id].worker})" for mc in pending[:4])
            progress.log_line(f"waiting for {len(pending)} Cell(s) other workers hold: {names}"
                              + (" ..." if len(pending) > 4 else ""))
        time.sleep(poll)
    return [outcomes[c.id] for c in cells if c.id in outcomes]


# --- the driver --------------------------------------------------------------------------


def dry_run(matrix: Matrix, cells: list[MatrixCell], tracking_uri: str, runs_dir: str) -> None:
    """Print the Cells, what differs between them and what is done or running elsewhere."""
    done: dict[str, Any] = {}
    store_exists = not tracking_uri.startswith("sqlite:///") or Path(
        tracking_uri[len("sqlite:///"):]).is_file()
    if store_exists:  # a dry run never creates a store
        mlclient = tracking.client(tracking_uri)
        found = mlclient.get_experiment_by_name(matrix.name)
        if found is not None:
            done = existing_cell_runs(mlclient, found.experiment_id)
    columns = differing_values(matrix)
    table = Table(title=f"{matrix.name}: {len(cells)} Cells ({matrix.path})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("cell id")
    for column in columns:
        table.add_column(column, overflow="fold")
    table.add_column("status")
    for i, mc in enumerate(cells, 1):
        run = done.get(mc.id)
        holder = Claim(Path(runs_dir) / matrix.name / mc.id).holder()
        if run is not None and is_done(run):
            status = "done"
        elif holder is not None:
            status = f"running ({holder.get('worker', '?')})"
        elif run is not None:
            status = f"resume ({run.info.status.lower()})"
        else:
            status = "new"
        table.add_row(str(i), mc.id, *[escape(axis_label(mc.values.get(c))) for c in columns], status)
    console.print(table)
    n_done = sum(1 for mc in cells if mc.id in done and is_done(done[mc.id]))
    console.print(f"{n_done} done, {len(cells) - n_done} to run. Tracking: {tracking_uri}")


def summary(outcomes: list[Outcome], matrix: Matrix) -> None:
    table = Table(title=f"{matrix.name}: summary ({tracking.worker_id()})", title_justify="left")
    for column in ("cell", "id", "status", "by", "R@1 (first target)", "time"):
        table.add_column(column)
    me = tracking.worker_id()
    for o in outcomes:
        value = "-" if o.headline is None else f"{o.headline:.2f}"
        by = "here" if o.worker == me else (o.worker or "-")
        table.add_row(escape(o.label), o.cell_id, STATUS_TEXT[o.status], escape(by), value,
                      f"{o.seconds:.0f}s")
    console.print(table)
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUS_TEXT}
    shown = ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in counts.items() if n)
    console.print(f"this worker ran {counts['done'] + counts['failed']} Cell(s); {shown}")
    for o in outcomes:
        if o.status in ("failed", "failed_elsewhere"):
            console.print(f"[red]{escape(o.label)} ({o.cell_id}) failed:[/red] {escape(o.error)}")


def run_matrix(
    matrix_file: str | Path,
    tracking_uri: str | None = None,
    reports_dir: str | Path = "reports",
    runs_dir: str | Path = "runs",
    dry: bool = False,
    keep_going: bool = False,
    only: str | None = None,
    device: str | None = None,
    report: bool = True,
    executor: str = "local",
    wait: bool = True,
    ray_address: str | None = None,
    gpus_per_cell: float | None = None,
    cpus_per_cell: float | None = None,
    workers: int = 1,
    join_parent: str | None = None,
) -> list[Outcome]:
    """Run (or with `dry`, list) the Cells of a matrix file; returns one Outcome per Cell.

    `workers` > 1 (local executor): this process and `workers - 1` more started here share
    the Cells through their claims, the CPU threads split between them; this one waits for
    the others and writes the report. `join_parent`: such a started worker (its Cells'
    runs go under that parent run; no summary, no report).
    """
    matrix = load_matrix(matrix_file)  # every config error surfaces here, before any work
    cells = matrix.select(only)
    uri = tracking.tracking_uri(tracking_uri)
    runs_dir = str(Path(runs_dir).resolve())
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor!r}: expected local or ray.")
    if workers < 1 or (workers > 1 and executor != "local"):
        raise ConfigError(f"--workers {workers}: expected 1 or more, with --executor local "
                          f"(with Ray, --cpus-per-cell and --gpus-per-cell place the Cells).")
    if dry:
        dry_run(matrix, cells, uri, runs_dir)
        return []
    if join_parent:
        mlclient = tracking.client(uri)
        experiment = tracking.experiment_id(mlclient, matrix.name, uri)
        ctx = Context(uri, experiment, join_parent, matrix.name, runs_dir, device)
        return run_local(ctx, cells, keep_going, wait)
    cluster = None
    resources = matrix.resources.model_copy(update={
        k: v for k, v in (("gpus_per_cell", gpus_per_cell), ("cpus_per_cell", cpus_per_cell))
        if v is not None})
    if executor == "ray":  # connect (and check the store suits the cluster) before creating runs
        from gengeo_bench import ray_executor

        cluster = ray_executor.connect(ray_address, uri)
        cluster.warm_up(uri, cells, resources)
    mlclient = tracking.client(uri)
    experiment = tracking.experiment_id(mlclient, matrix.name, uri)
    if cluster is not None:
        cluster.check_artifacts(mlclient, experiment)
    parent = mlclient.create_run(
        experiment, run_name=f"{matrix.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={tracking.ROLE: "matrix", tracking.MATRIX: matrix.name, tracking.WORKER: tracking.worker_id(),
              "gengeo.matrix_file": str(matrix.path), "gengeo.cells": str(len(cells)),
              "gengeo.executor": executor},
    ).info.run_id
    mlclient.log_text(parent, matrix.path.read_text(), "matrix.yaml")
    mlclient.log_dict(parent, tracking.environment(), "environment.json")
    ctx = Context(uri, experiment, parent, matrix.name, runs_dir, device)
    status = "FINISHED"
    helpers: list[subprocess.Popen] = []
    try:
        if cluster is not None:
            outcomes = cluster.run(ctx, cells, resources)
        else:
            if workers > 1:
                done = existing_cell_runs(mlclient, experiment)
                left = sum(1 for mc in cells if not (mc.id in done and is_done(done[mc.id])))
                if min(workers, left) > 1:  # no helper for a matrix that is done (a re-run)
                    helpers = start_workers(min(workers, left), matrix.path, uri, runs_dir, parent,
                                            only, keep_going, device)
            # this worker looks at the others' Cells often: they are all on this machine
            outcomes = run_local(ctx, cells, keep_going, wait, poll=2.0 if helpers else WAIT_SECONDS)
            if any(p.wait() != 0 for p in helpers):
                status = "FAILED"
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted: finished Cells are kept; the same command resumes.")
        mlclient.set_terminated(parent, "KILLED")
        raise
    finally:
        # On Ctrl-C the terminal's SIGINT reached the helpers too: give them time to mark
        # their runs KILLED. On an error here they stop as well (their Cells resume later).
        for p in helpers:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.terminate()
    summary(outcomes, matrix)
    n_failed = sum(o.status == "failed" for o in outcomes)
    if workers > 1:  # the workers started here are this command's own
        n_failed += sum(o.status == "failed_elsewhere" for o in outcomes)
    tracking.log_metrics(mlclient, parent, {
        "cells_done": sum(o.status == "done" for o in outcomes),
        "cells_skipped": sum(o.status in ("skipped", "elsewhere") for o in outcomes),
        "cells_failed": n_failed,
    })
    if report and any(o.status in ("done", "skipped", "elsewhere") for o in outcomes):
        folder = Path(reports_dir) / matrix.name
        runs = runs_fingerprint(mlclient, experiment, matrix)
        if (folder / "index.md").is_file() and _read(folder / RUNS_FINGERPRINT) == runs:
            console.print(f"report: {folder / 'index.md'} (up to date: no run changed since it was "
                          f"written; `benchmark report` rewrites it)")
        else:
            folder = write_report_locked(uri, matrix, Path(reports_dir), parent)
            (folder / RUNS_FINGERPRINT).write_text(runs)
            console.print(f"report: {folder / 'index.md'}")
    mlclient.set_terminated(parent, "FAILED" if n_failed else status)
    return outcomes


def start_workers(workers: int, matrix_path: Path, uri: str, runs_dir: str, parent: str,
                  only: str | None, keep_going: bool, device: str | None) -> list[subprocess.Popen]:
    """`workers - 1` more `benchmark run` processes on this matrix under `parent`, with this
    one's CPU threads split between all of them; plain progress lines, as their output
    interleaves with this one's."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["GENGEO_PROGRESS"] = "0"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "gengeo_bench", "run", "--matrix", str(matrix_path),
               "--tracking-uri", uri, "--runs-dir", runs_dir, "--join-run", parent, "--no-wait"]
    command += (["--only", only] if only else []) + (["--keep-going"] if keep_going else [])
    command += ["--device", device] if device else []
    progress.log_line(f"{workers} workers on this machine, {threads} CPU thread(s) each")
    return [subprocess.Popen(command, env=env) for _ in range(workers - 1)]


RUNS_FINGERPRINT = ".runs.json"  # beside a report: the runs it was written from


def runs_fingerprint(mlclient, experiment_id: str, matrix: Matrix) -> str:
    """Every Cell run of the experiment (id, status, end) and the baseline, as JSON text."""
    import json

    runs = sorted((r.info.run_id, r.info.status, r.info.end_time or 0)
                  for r in tracking.find_runs(mlclient, experiment_id, "cell"))
    return json.dumps({"runs": runs, "baseline": matrix.baseline_params()}, sort_keys=True)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def write_report_locked(uri: str, matrix: Matrix, reports_dir: Path, parent: str) -> Path:
    """The report, written by one worker at a time (workers that end together take turns)."""
    from gengeo_bench.report import write_report

    reports_dir.mkdir(parents=True, exist_ok=True)
    with open(reports_dir / f".{matrix.name}.lock", "a") as handle, contextlib.ExitStack() as stack:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        stack.callback(fcntl.lockf, handle, fcntl.LOCK_UN)
        return write_report(uri, matrix.name, reports_dir, baseline=matrix.baseline_params(),
                            parent_run_id=parent)
