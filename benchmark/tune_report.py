"""A study's report and its best Cell: `benchmark tune --report` and `--export-best`.

`reports/<study>/`: best.md / best.json (the best trial, its values and metrics),
trials.csv / trials.md (one row per trial), and Optuna's figures as PNG (optimisation
history, importances, parallel coordinates, slices). `export_best` writes the best
trial's Cell as YAML that `benchmark train` reads.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from gengeo_bench.errors import ConfigError
from gengeo_bench.tune_space import suggest_cell
from gengeo_bench.tune_study import CELL_ID, ERROR, METRIC_NAMES, METRICS, RUN_ID, WORKDIR, Study


def best_trial(optuna_study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if not optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return optuna_study.best_trial


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(optuna_study: optuna.Study):
    """One row per trial: number, state, value, duration, sampled values, metrics, run ids."""
    import pandas as pd

    rows = []
    for t in optuna_study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        pruned = t.state == TrialState.PRUNED and t.intermediate_values
        pruned_at = max(t.intermediate_values) if pruned else None
        row = {"number": t.number, "state": t.state.name, "value": t.value,
               "duration_s": None if duration is None else round(duration, 2)}
        row.update(t.params)
        row.update({k: v for k, v in (t.user_attrs.get(METRICS) or {}).items()
                    if k.endswith(tuple(f"/{m}" for m in METRIC_NAMES))})
        row.update({"pruned_at_epoch": pruned_at, "cell_id": t.user_attrs.get(CELL_ID),
                    "retry_of": t.system_attrs.get("failed_trial"),
                    "mlflow_run_id": t.user_attrs.get(RUN_ID), "error": t.user_attrs.get(ERROR)})
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df) -> str:
    """The trial table as Markdown: numbers shortened, missing values blank."""
    from gengeo_bench.report_tables import to_markdown

    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt(v)

    return to_markdown(df.astype(object).map(cell))


def write_report(study: Study, optuna_study: optuna.Study, out_dir: str | Path | None = None
                 ) -> tuple[Path, dict[str, str]]:
    """best.md/json, trials.csv/md and Optuna's matplotlib figures in reports/<study>/."""
    out = Path(out_dir) if out_dir else Path("reports") / study.name
    out.mkdir(parents=True, exist_ok=True)
    df = trials_table(optuna_study)
    df.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(f"# {study.name}: trials\n\n"
                                   + (markdown_table(df) if len(df) else "(none)\n"))
    best = best_trial(optuna_study)
    counts: dict[str, int] = {}
    for t in optuna_study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    record: dict[str, Any] = {"study": study.name, "objective": study.metric, "direction": study.direction,
                              "trials": counts, "budget": study.n_trials}
    if best is not None:
        record.update({"best_trial": best.number, "value": best.value, "params": best.params,
                       "metrics": best.user_attrs.get(METRICS, {}), "cell_id": best.user_attrs.get(CELL_ID),
                       "workdir": best.user_attrs.get(WORKDIR),
                       "mlflow_run_id": best.user_attrs.get(RUN_ID)})
    (out / "best.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    skipped = write_figures(optuna_study, out)
    md = [f"# {study.name}", "",
          f"Objective: `{study.metric}` ({study.direction}); trials: "
          + (", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "none")
          + f" (budget {study.n_trials}).", ""]
    if best is None:
        md.append("No trial has completed yet.")
    else:
        md += [f"Best: trial {best.number}, value **{best.value:.2f}**, Cell `{record['cell_id']}` "
               f"(`{record['workdir']}`).", "", "| parameter | value |", "|---|---|"]
        md += [f"| `{k}` | {fmt(v)} |" for k, v in best.params.items()]
        metrics = record["metrics"]
        if metrics:
            md += ["", "| metric | value |", "|---|---|"]
            md += [f"| `{k}` | {v:.2f} |" for k, v in sorted(metrics.items())
                   if k.endswith(tuple(f"/{m}" for m in METRIC_NAMES))]
    figures = ", ".join(f"[{p.stem}]({p.name})" for p in sorted(out.glob("*.png")))
    md += ["", "Figures: " + (figures or "none")]
    md += [f"- no {name}: {why}" for name, why in skipped.items()]
    (out / "best.md").write_text("\n".join(md) + "\n")
    return out, skipped


def write_figures(optuna_study: optuna.Study, out: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn is skipped with a reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = {k for t in complete for k in t.params}
    plots = {"optimization_history": (ovm.plot_optimization_history, 1, 0),
             "param_importances": (ovm.plot_param_importances, 2, 1),
             "parallel_coordinate": (ovm.plot_parallel_coordinate, 1, 1),
             "slice": (ovm.plot_slice, 1, 1)}
    skipped = {}
    for name, (plot, min_trials, min_params) in plots.items():
        if len(complete) < min_trials or len(params) < min_params:
            skipped[name] = (f"needs {min_trials} completed trial(s) and {min_params} searched "
                             f"parameter(s); the study has {len(complete)} and {len(params)}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(optuna_study)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            first.figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(first.figure)
        except Exception as exc:  # e.g. importances on values that never vary
            skipped[name] = f"{type(exc).__name__}: {exc}"
            plt.close("all")
    return skipped


def export_best(study: Study, optuna_study: optuna.Study, path: str | Path) -> Path:
    """The best trial's Cell as YAML that `benchmark train` reads, rebuilt from its values."""
    best = best_trial(optuna_study)
    if best is None:
        raise ConfigError(f"study {study.name!r} has no completed trial yet; nothing to export.")
    cell, _ = suggest_cell(study, optuna.trial.FixedTrial(best.params, best.number))
    recorded = best.user_attrs.get(CELL_ID)
    if recorded and recorded != cell.id:
        raise ConfigError(
            f"{study.source}: the base Cell changed since trial {best.number} ran (its Cell was "
            f"{recorded}, the file now gives {cell.id}); the trial's own Cell is "
            f"{Path(best.user_attrs.get(WORKDIR, '.')) / 'cell.yaml'}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = cell.model_copy(update={"name": f"{study.name}-trial{best.number}"})
    path.write_text(f"# best trial {best.number} of study {study.name} ({study.metric} = "
                    f"{best.value:.2f})\n" + cell.to_yaml())
    return path
