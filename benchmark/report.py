"""Reports: finished MLflow cell runs -> tables (Markdown, CSV, LaTeX) and seaborn figures.

`benchmark report` and the end of `benchmark run` call `write_report`, which reads the
cell runs of one experiment (newest finished run per cell id), and writes
`reports/<experiment>/`:

| file             | what it holds                                                            |
|------------------|--------------------------------------------------------------------------|
| `runs.csv`       | one row per run x test dataset x protocol: every logged test metric      |
| `results.*`      | per method x training dataset x test dataset x protocol: R1/R5/R10/R1pct/ |
|                  | hit_rate as mean ± std over seeds, R@1's 95% interval, and chance_R1     |
|                  | (the R@1 of a random ranking: positives / gallery size)                  |
| `transfer.*`     | rows (method, training dataset), columns test dataset: R@1 (CVUSA->CVACT) |
| `ablation.*`     | sharing (none/clusters/all) x dustbin (on/off) per backbone and aggregator |
| `backbone_aggregator.*` | backbone x aggregator (label with share/dustbin), per train->test  |
| `robustness.*`   | protocol (none, fov360 ... fov70, misalign ...) x method, per train->test  |
| `deltas.*`       | ΔR@1 of every method against the declared baseline, same training        |
|                  | dataset and seed, with the exact McNemar p-value on per-query hits        |
| `inside.*`       | per Cell with cluster assignments (what `benchmark run` measured with    |
|                  | explain.py): the dustbin's share, its mass on one-view patches against   |
|                  | their share, per annotation class, clusters used by one view only        |
| `figures/*.png`  | heatmaps of the tables, R@K curves per test dataset, training curves,    |
|                  | each Cell's assignment maps and cluster usage (`inside_*`), a gallery of |
|                  | the discordant queries of each deltas row (`discordant_*`)               |
| `index.md`       | links to all of the above; says why a table was skipped                  |

Each table is written three ways: `<name>.csv` holds the *numbers* in tidy form (one row
per value, means, stds and bounds as separate columns: read it back with pandas);
`<name>.md` and `<name>.tex` hold the formatted wide table (LaTeX needs `booktabs`).
A table is skipped, with a line in `index.md`, when the runs do not vary along its axes.

Numbers are percent; how the means, stds and intervals are computed is in `report_stats`.

The work is split along its seams, one module per step, each read top to bottom:
`report_load` (MLflow runs -> pandas, ranks artifacts), `report_stats` (means, stds,
intervals, paired deltas), `report_tables` (the tables and their Markdown/CSV/LaTeX
writers), `report_figures` (heatmaps, R@K and training curves); this module writes the
folder and its index, and holds `benchmark report`.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from gengeo_bench import tracking
from gengeo_bench.errors import ConfigError
from gengeo_bench.matrix import baseline_params
from gengeo_bench.report_figures import (
    discordant_galleries,
    heatmap_figure,
    inside_figures,
    recall_curves,
    safe_name,
    training_curves,
)
from gengeo_bench.report_load import (
    ExplainStore,
    RankStore,
    explain_rows,
    load_runs,
    method_order,
    results_long,
)
from gengeo_bench.report_stats import summarise
from gengeo_bench.report_tables import (
    Table,
    ablation_table,
    backbone_aggregator_table,
    deltas_table,
    inside_table,
    results_table,
    robustness_table,
    transfer_table,
    write_table,
)

log = logging.getLogger(__name__)


TABLE_NAMES = ("runs", "results", "transfer", "ablation", "backbone_aggregator", "robustness",
               "deltas", "inside")


def _clean(folder: Path) -> None:
    """Remove what an earlier report wrote here, so no stale table outlives its data."""
    for name in TABLE_NAMES:
        for ext in ("md", "csv", "tex"):
            (folder / f"{name}.{ext}").unlink(missing_ok=True)
    figures = folder / "figures"
    if figures.is_dir():
        for png in figures.glob("*.png"):
            png.unlink()
    (folder / "index.md").unlink(missing_ok=True)


def write_report(
    tracking_uri: str,
    experiment: str,
    reports_dir: Path = Path("reports"),
    baseline: dict | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Write tables and figures of `experiment` to `reports_dir/<experiment>/`; return it.

    `baseline`: flat param values naming the baseline cells (`{"aggregator.name": "salad",
    "aggregator.share": "none"}`) for the deltas table. With `parent_run_id`, the folder is
    also logged to that run as artifacts under `report/`.
    """
    runs = load_runs(tracking_uri, experiment)
    folder = Path(reports_dir) / safe_name(experiment)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    _clean(folder)
    methods = method_order(runs)
    results = results_long(runs)
    with tempfile.TemporaryDirectory(prefix="gengeo-report-") as tmp:
        store = RankStore(tracking_uri, Path(tmp))
        explained = ExplainStore(tracking_uri, Path(tmp))
        summary = summarise(results, store) if len(results) else pd.DataFrame()
        inside = explain_rows(runs, results, explained)
        deltas = deltas_table(runs, results, store, baseline, methods)
        tables = [results_table(summary, methods), transfer_table(summary, methods),
                  ablation_table(summary), backbone_aggregator_table(summary, methods),
                  robustness_table(summary, methods), deltas, inside_table(inside, methods)]
        written: dict[str, list[str]] = {}
        figures: list[tuple[str, str]] = []
        for table in tables:
            if table.display is None:
                continue
            written[table.name] = write_table(table, folder)
            if heatmap_figure(table, folder / f"figures/{table.name}.png"):
                figures.append((f"{table.title}: heatmap", f"figures/{table.name}.png"))
        if len(results):
            results.to_csv(folder / "runs.csv", index=False)
            figures.extend(recall_curves(results, store, methods, folder))
        curves = training_curves(runs, tracking_uri, methods, folder)
        if curves:
            figures.append(curves)
        figures.extend(inside_figures(inside, folder))
        galleries, notes = discordant_galleries(deltas.data, explained, folder, tracking_uri)
        figures.extend(galleries)
    index = _index(experiment, tracking_uri, runs, methods, tables, written, figures,
                   baseline, has_runs_csv=len(results) > 0, notes=notes)
    (folder / "index.md").write_text(index, encoding="utf-8")
    if parent_run_id:
        tracking.client(tracking_uri).log_artifacts(parent_run_id, str(folder), artifact_path="report")
    log.info("report written to %s", folder)
    return folder


def _index(experiment: str, tracking_uri: str, runs: pd.DataFrame, methods: list[str],
           tables: list[Table], written: dict[str, list[str]], figures: list[tuple[str, str]],
           baseline: dict | None, has_runs_csv: bool, notes: list[str] = ()) -> str:
    seeds = sorted(runs["seed"].unique())
    trains = sorted(runs["train_dataset"].unique())
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Report: {experiment}", "",
        f"- experiment: `{experiment}`",
        f"- tracking URI: `{tracking_uri}`",
        f"- runs: {len(runs)} finished cells (newest per cell id): {len(methods)} methods, "
        f"training datasets {', '.join(trains)}, seeds {', '.join(str(s) for s in seeds)}",
        f"- generated: {now}",
        "- baseline: " + (", ".join(f"`{k}={v}`" for k, v in baseline.items()) if baseline
                          else "none declared"),
        "- numbers are percent; mean ± std over seeds (std only with more than one seed); "
        "[95% interval of R@1]: one seed, the logged query bootstrap; several seeds, a "
        "bootstrap over queries of the seed-averaged hits from the ranks artifacts (the mean "
        "of the seeds' logged bounds when those are missing); each CSV's `R1_ci_source` says "
        "which",
        "- each table: `.md` (formatted), `.csv` (tidy numbers), `.tex` (LaTeX, needs booktabs)",
        "", "## Methods", "",
    ]
    lines += [f"- {m}" for m in methods]
    lines += ["", "## Tables", ""]
    if has_runs_csv:
        lines.append("- **Per-run results** (one row per run x test dataset x protocol): "
                     "[csv](runs.csv)")
    for table in tables:
        if table.name in written:
            links = " · ".join(f"[{f.rsplit('.', 1)[1]}]({f})" for f in written[table.name])
            lines.append(f"- **{table.title}**: {links}. {table.description}")
        else:
            lines.append(f"- **{table.title}**: skipped: {table.skipped}")
    lines += ["", "## Figures", ""]
    if not figures:
        lines.append("No figures (no test results, ranks artifacts or metric histories).")
    for title, path in figures:
        lines += [f"### {title}", "", f"[{path}]({path})", "", f"![{title}]({path})", ""]
    if notes:
        lines += ["## Discordant queries without a gallery", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


# --- `benchmark report` ----------------------------------------------------------------------


def report_command_impl(matrix: str | None, experiment: str | None, reports_dir: str,
                        tracking_uri: str | None) -> Path:
    """`benchmark report [MATRIX] [--experiment NAME]`: the experiment name and baseline
    come from the matrix file (`name:`, `baseline:`); `--experiment` names it directly."""
    from gengeo_bench.config import read_yaml, study_file

    baseline: dict[str, str] = {}
    if matrix:
        matrix = str(study_file(matrix))  # a path, or the name of a shipped study
        data = read_yaml(matrix)
        if not isinstance(data, dict) or not data.get("name"):
            raise ConfigError(f"{matrix}: name: required field is missing (the experiment name).")
        experiment = experiment or str(data["name"])
        baseline = baseline_params(data.get("baseline"), f"{matrix}: baseline")
    if not experiment:
        raise ConfigError("benchmark report: give a matrix file (studies/<name>.yaml) or "
                          "--experiment <name>.")
    return write_report(tracking.tracking_uri(tracking_uri), experiment, Path(reports_dir),
                        baseline=baseline or None)
