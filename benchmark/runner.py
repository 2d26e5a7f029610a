"""`benchmark run --matrix FILE`: every Cell of a matrix, tracked in MLflow, then the report.

Per invocation one parent run (`gengeo.role = matrix`); per Cell one child run with an
explicit parent id. Re-running the same command:

- skips Cells whose run is FINISHED with test metrics;
- resumes a Cell that was interrupted (killed, crashed, Ctrl-C) from its checkpoint in
  `runs/<matrix>/<cell id>/`, logging into the same MLflow run;
- with `--keep-going`, a Cell that fails is marked FAILED (tag `gengeo.error`) and the
  others still run; without it the first failure stops the matrix (after marking it).

Ctrl-C marks the current Cell KILLED and stops; `kill -9` loses at most the current epoch
(the checkpoint is written every epoch). Nothing finished is ever redone.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gengeo_bench import tracking
from gengeo_bench.errors import BenchmarkError
from gengeo_bench.matrix import Matrix, MatrixCell, differing_values, load_matrix

log = logging.getLogger(__name__)
console = Console()


@dataclass
class Outcome:
    cell: MatrixCell
    status: str  # done | skipped | failed | interrupted
    seconds: float = 0.0
    headline: float | None = None
    error: str = ""
    run_id: str = ""


def headline_metric(cell: MatrixCell, metrics: dict[str, float]) -> float | None:
    """R@1 on the first target without a protocol (the summary's headline)."""
    key = f"test/{cell.cell.targets[0]}/R1"
    return metrics.get(key)


def existing_cell_runs(client, exp_id: str) -> dict[str, object]:
    """The newest run per Cell id in the experiment (any status)."""
    runs = {}
    for run in tracking.find_runs(client, exp_id, "cell"):
        cell_id = run.data.tags.get(tracking.CELL_ID)
        if cell_id and cell_id not in runs:
            runs[cell_id] = run
    return runs


def is_done(run) -> bool:
    return run.info.status == "FINISHED" and any(k.startswith("test/") for k in run.data.metrics)


def dry_run(matrix: Matrix, cells: list[MatrixCell], tracking_uri: str) -> None:
    """Print the Cells, what differs between them and what is already done."""
    done: dict[str, object] = {}
    store_exists = not tracking_uri.startswith("sqlite:///") or Path(
        tracking_uri[len("sqlite:///"):]).is_file()
    if store_exists:  # a dry run never creates a store
        client = tracking.client(tracking_uri)
        found = client.get_experiment_by_name(matrix.name)
        if found is not None:
            done = existing_cell_runs(client, found.experiment_id)
    columns = differing_values(matrix)
    table = Table(title=f"{matrix.name}: {len(cells)} Cells ({matrix.path})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("cell id")
    for column in columns:
        table.add_column(column, overflow="fold")
    table.add_column("status")
    from gengeo_bench.matrix import _label

    for i, mc in enumerate(cells, 1):
        run = done.get(mc.id)
        status = "new" if run is None else ("done" if is_done(run) else
                                            f"resume ({run.info.status.lower()})")
        table.add_row(str(i), mc.id, *[escape(_label(mc.values.get(c))) for c in columns], status)
    console.print(table)
    n_done = sum(1 for mc in cells if mc.id in done and is_done(done[mc.id]))
    console.print(f"{n_done} done, {len(cells) - n_done} to run. Tracking: {tracking_uri}")


def _log_artifacts(client, run_id: str, workdir: Path) -> None:
    for name in ("cell.yaml", "manifests.json", "environment.json", "metrics.json"):
        if (workdir / name).is_file():
            client.log_artifact(run_id, str(workdir / name))
    if (workdir / "ranks").is_dir():
        client.log_artifacts(run_id, str(workdir / "ranks"), artifact_path="ranks")


def run_one(client, exp_id: str, parent_id: str, matrix: Matrix, mc: MatrixCell, previous,
            runs_dir: Path, device: str | None) -> Outcome:
    """Train and evaluate one Cell inside its MLflow child run."""
    from gengeo_bench.engine import run_cell

    cell = mc.cell
    tags = {tracking.ROLE: "cell", tracking.MATRIX: matrix.name, tracking.CELL_ID: cell.id,
            tracking.SEED: str(cell.seed), tracking.PARENT: parent_id,
            "mlflow.runName": cell.name[:250]}
    if previous is not None:  # resume in the same run
        run_id = previous.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "gengeo.resumed_by", parent_id)
    else:
        run_id = client.create_run(exp_id, tags=tags, run_name=cell.name[:250]).info.run_id
    tracking.log_params(client, run_id, tracking.cell_params(cell))
    workdir = runs_dir / matrix.name / cell.id
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "environment.json").write_text(json.dumps(tracking.environment(), indent=2))
    (workdir / "run_id").write_text(run_id)
    start = time.time()
    console.print(f"[bold]{escape(cell.name)}[/bold] ({cell.id}) -> {workdir}")
    try:
        result = run_cell(
            cell, workdir, device=device,
            log_metrics=lambda metrics, step: tracking.log_metrics(client, run_id, metrics, step),
        )
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except Exception as exc:  # one Cell's failure never loses the others
        message = str(exc) if isinstance(exc, BenchmarkError) else f"{type(exc).__name__}: {exc}"
        client.set_tag(run_id, tracking.ERROR, message[:5000])
        (workdir / "error.txt").write_text(traceback.format_exc())
        client.log_artifact(run_id, str(workdir / "error.txt"))
        client.set_terminated(run_id, "FAILED")
        return Outcome(mc, "failed", time.time() - start, error=message, run_id=run_id)
    tracking.log_metrics(client, run_id, result.metrics, step=result.outcome.epochs_done)
    client.set_tag(run_id, "gengeo.best_epoch", str(result.outcome.best_epoch))
    _log_artifacts(client, run_id, workdir)
    client.set_terminated(run_id, "FINISHED")
    return Outcome(mc, "done", time.time() - start, headline_metric(mc, result.metrics), run_id=run_id)


def summary(outcomes: list[Outcome], matrix: Matrix) -> None:
    table = Table(title=f"{matrix.name}: summary", title_justify="left")
    for column in ("cell", "id", "status", "R@1 (first target)", "time"):
        table.add_column(column)
    for o in outcomes:
        value = "-" if o.headline is None else f"{o.headline:.2f}"
        status = {"done": "[green]done", "skipped": "[dim]skipped", "failed": "[red]failed",
                  "interrupted": "[yellow]interrupted"}[o.status]
        table.add_row(escape(o.cell.label), o.cell.id, status, value, f"{o.seconds:.0f}s")
    console.print(table)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    console.print(f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}")
    for o in outcomes:
        if o.status == "failed":
            console.print(f"[red]{escape(o.cell.label)} ({o.cell.id}) failed:[/red] {escape(o.error)}",
                          highlight=False)


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
) -> list[Outcome]:
    """Run (or with `dry`, list) the Cells of a matrix file; returns one Outcome per Cell."""
    matrix = load_matrix(matrix_file)  # every config error surfaces here, before any work
    cells = matrix.select(only)
    uri = tracking.tracking_uri(tracking_uri)
    if dry:
        dry_run(matrix, cells, uri)
        return []
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, matrix.name, uri)
    existing = existing_cell_runs(client, exp_id)
    parent = client.create_run(
        exp_id, run_name=f"{matrix.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={tracking.ROLE: "matrix", tracking.MATRIX: matrix.name,
              "gengeo.matrix_file": str(matrix.path), "gengeo.cells": str(len(cells))},
    ).info.run_id
    client.log_text(parent, matrix.path.read_text(), "matrix.yaml")
    client.log_dict(parent, tracking.environment(), "environment.json")
    outcomes: list[Outcome] = []
    status = "FINISHED"
    try:
        for mc in cells:
            previous = existing.get(mc.id)
            if previous is not None and is_done(previous):
                outcomes.append(Outcome(mc, "skipped", 0.0, headline_metric(mc, previous.data.metrics),
                                        run_id=previous.info.run_id))
                continue
            outcome = run_one(client, exp_id, parent, matrix, mc, previous, Path(runs_dir), device)
            outcomes.append(outcome)
            if outcome.status == "failed" and not keep_going:
                status = "FAILED"
                break
    except KeyboardInterrupt:
        status = "KILLED"
        console.print("[yellow]Interrupted: finished Cells are kept; the same command resumes.")
        summary(outcomes, matrix)
        client.set_terminated(parent, status)
        raise
    summary(outcomes, matrix)
    n_failed = sum(o.status == "failed" for o in outcomes)
    tracking.log_metrics(client, parent, {
        "cells_done": sum(o.status == "done" for o in outcomes),
        "cells_skipped": sum(o.status == "skipped" for o in outcomes),
        "cells_failed": n_failed,
    })
    if report and any(o.status in ("done", "skipped") for o in outcomes):
        from gengeo_bench.report import write_report

        folder = write_report(uri, matrix.name, Path(reports_dir), baseline=baseline_params(matrix),
                              parent_run_id=parent)
        console.print(f"report: {folder / 'index.md'}")
    client.set_terminated(parent, "FAILED" if n_failed else status)
    return outcomes


def baseline_params(matrix: Matrix) -> dict[str, str] | None:
    """The matrix's `baseline:` as flat param filters (`aggregator.share: none`)."""
    if not matrix.baseline:
        return None
    from gengeo_bench.matrix import PLUGIN_AXES, SHORTHANDS

    flat: dict[str, str] = {}
    for axis, value in matrix.baseline.items():
        path = SHORTHANDS.get(axis, axis)
        prefix = path.removeprefix("model.")
        if path in PLUGIN_AXES and isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict):
            flat.update({f"{prefix}.{k}": str(v) for k, v in value.items()})
        else:
            flat[prefix] = str(value)
    return flat
