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
| `figures/*.png`  | heatmaps of the tables, R@K curves per test dataset, training curves     |
| `index.md`       | links to all of the above; says why a table was skipped                  |

Each table is written three ways: `<name>.csv` holds the *numbers* in tidy form (one row
per value, means, stds and bounds as separate columns: read it back with pandas);
`<name>.md` and `<name>.tex` hold the formatted wide table (LaTeX needs `booktabs`).
A table is skipped, with a line in `index.md`, when the runs do not vary along its axes.

Numbers are percent. "mean ± std" is over seeds (the std only with more than one seed).
The 95% interval of R@1 is a bootstrap over test queries:

- one seed: the interval logged with the run (`test/.../R1_ci_low/_ci_high`, a percentile
  bootstrap of the per-query hits); recomputed from the ranks artifact if not logged;
- several seeds: the per-query hits of every seed (matched by query id) are averaged over
  seeds, and the *queries* are resampled (each keeps its hits in every seed). This is the
  interval of the seed-averaged R@1 under test-set sampling. Pooling the seeds' hits as if
  they were independent queries would shrink it by up to sqrt(#seeds) although seeds of one
  method mostly agree query by query. Seed-to-seed (training) spread is the ± std column.
  Without ranks artifacts for every seed, or when the seeds evaluated different queries,
  the seeds' logged bounds are averaged instead; the CSV's `R1_ci_source` says which.

Methods are labelled `<backbone> + <aggregator>[<share>, dustbin|no dustbin]` (the share
mode is shown when it is not `none`, except for aggregators with a dustbin, where both are
always shown); when cells with the same label differ in another parameter (`train.lr`,
`share_backbone`, a backbone parameter ...), the differing values are appended, so runs
are only averaged over seeds when nothing else differs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gengeo_bench import metrics as M
from gengeo_bench import tracking
from gengeo_bench.errors import ConfigError
from gengeo_bench.matrix import baseline_params

log = logging.getLogger(__name__)

METRICS = ("R1", "R5", "R10", "R1pct", "hit_rate", "chance_R1")
SHARE_ORDER = {"none": 0, "clusters": 1, "all": 2}
# Params that never make two cells different *methods*: they are the axes the tables
# are laid out along (seed, training dataset), are already in the label, or describe the
# evaluation rather than the model and its training.
_NOT_METHOD = {"seed", "train.dataset", "train.num_workers", "backbone.name", "aggregator.name",
               "aggregator.share", "aggregator.dustbin"}
_NOT_METHOD_PREFIXES = ("evaluate.", "datasets.")
ARROW = "→"
DASH = "—"


# --- loading -------------------------------------------------------------------------------


def _registry_default(aggregator: str, key: str) -> Any:
    from gengeo_bench import registry

    try:
        return registry.defaults("aggregator", aggregator).get(key)
    except ConfigError:  # a plugin that is not installed here
        return None


def _dustbin(aggregator: str, value: Any) -> bool | None:
    """The logged value, else the aggregator's default (runs logged before Cells held their
    resolved values), else None (no dustbin)."""
    if isinstance(value, str) and value.strip():
        return value.strip().lower() in ("true", "1", "yes", "on")
    default = _registry_default(aggregator, "dustbin")
    return None if default is None else bool(default)


def aggregator_label(aggregator: str, share: str, dustbin: bool | None) -> str:
    """`salad[clusters, dustbin]`, `salad[none, no dustbin]`, `gem`, `netvlad[all]`."""
    parts = []
    if share != "none" or dustbin is not None:
        parts.append(share)
    if dustbin is not None:
        parts.append("dustbin" if dustbin else "no dustbin")
    return f"{aggregator}[{', '.join(parts)}]" if parts else aggregator


def _column(runs: pd.DataFrame, key: str, default: Any = None) -> pd.Series:
    col = f"params.{key}"
    if col in runs:
        return runs[col].astype(object).where(runs[col].notna(), default)
    return pd.Series([default] * len(runs), index=runs.index, dtype=object)


def _method_params(runs: pd.DataFrame) -> list[str]:
    """Param columns that can make two cells with the same label different methods."""
    out = []
    for col in runs.columns:
        if not col.startswith("params."):
            continue
        key = col[len("params."):]
        if key in _NOT_METHOD or key.startswith(_NOT_METHOD_PREFIXES):
            continue
        out.append(col)
    return out


def _seed(tag: Any, param: Any) -> int:
    for value in (tag, param):
        try:
            return int(str(value))
        except (TypeError, ValueError):
            continue
    return 0


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """Finished cell runs of `experiment`, newest per cell id, with derived columns.

    The frame is `mlflow.search_runs`' (`run_id`, `start_time`, `params.*`, `metrics.*`,
    `tags.*`) plus `cell_id`, `backbone`, `aggregator`, `share`, `dustbin` (True/False, or
    None for aggregators without one), `share_backbone`, `train_dataset`, `seed`,
    `aggregator_label`, `variant` (the differing other params, usually "") and `method`.
    """
    import mlflow

    mlclient = tracking.client(tracking_uri)
    found = mlclient.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        known = sorted(e.name for e in mlclient.search_experiments())
        raise ConfigError(
            f"no experiment named '{experiment}' at {tracking_uri} (experiments there: "
            f"{', '.join(known) or 'none'}). Run the matrix first (`benchmark run "
            f"studies/<matrix>.yaml`), or point --tracking-uri at the store that holds it."
        )
    runs = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string=f"tags.`{tracking.ROLE}` = 'cell' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="pandas",
    )
    if len(runs):
        runs = runs[runs["status"] == "FINISHED"]
    if runs.empty:
        raise ConfigError(
            f"experiment '{experiment}' at {tracking_uri} has no finished cell runs. Run "
            f"(or finish) its matrix first: `benchmark run studies/<matrix>.yaml`."
        )
    runs = runs.sort_values("start_time", ascending=False, kind="stable")
    cell_tag = f"tags.{tracking.CELL_ID}"
    cell_id = runs[cell_tag] if cell_tag in runs else pd.Series(np.nan, index=runs.index)
    runs = runs.assign(cell_id=cell_id.astype(object).where(cell_id.notna(), runs["run_id"]))
    runs = runs.drop_duplicates("cell_id", keep="first").reset_index(drop=True)

    backbone = _column(runs, "backbone.name", "?").astype(str)
    aggregator = _column(runs, "aggregator.name", "?").astype(str)
    share = _column(runs, "aggregator.share", "none").astype(str)
    dustbin_raw = _column(runs, "aggregator.dustbin")
    dustbin = [_dustbin(a, v) for a, v in zip(aggregator, dustbin_raw, strict=True)]
    seed_tag = runs[f"tags.{tracking.SEED}"] if f"tags.{tracking.SEED}" in runs else [None] * len(runs)
    seeds = [_seed(t, p) for t, p in zip(seed_tag, _column(runs, "seed"), strict=True)]
    runs = runs.assign(
        backbone=backbone.values, aggregator=aggregator.values, share=share.values,
        dustbin=pd.Series(dustbin, index=runs.index, dtype=object),
        share_backbone=_column(runs, "share_backbone", "True").astype(str).values,
        train_dataset=_column(runs, "train.dataset", "?").astype(str).values,
        seed=seeds,
    )
    labels = [aggregator_label(a, s, d) for a, s, d in
              zip(runs["aggregator"], runs["share"], runs["dustbin"], strict=True)]
    runs["aggregator_label"] = labels
    base = runs["backbone"] + " + " + runs["aggregator_label"]
    variant = pd.Series("", index=runs.index, dtype=object)
    candidates = _method_params(runs)
    for _, group in runs.groupby(base, sort=False):
        varying = [c for c in candidates if group[c].astype(object).fillna("∅").nunique() > 1]
        for idx in group.index:
            variant[idx] = ", ".join(
                f"{c[len('params.'):]}={'unset' if pd.isna(runs.at[idx, c]) else runs.at[idx, c]}"
                for c in varying)
    runs["variant"] = variant.values
    suffix = variant.map(lambda v: f" ({v})" if v else "")
    runs["method"] = (base + suffix).values
    runs["aggregator_label"] = (runs["aggregator_label"] + suffix).values
    return runs


def _method_sort_key(row: pd.Series) -> tuple:
    dustbin = {True: 0, False: 1}.get(row["dustbin"], 2)
    return (row["backbone"], row["aggregator"], SHARE_ORDER.get(row["share"], 9), dustbin,
            row["variant"])


def method_order(runs: pd.DataFrame) -> list[str]:
    """Methods sorted by backbone, aggregator, share (none, clusters, all), dustbin (on, off)."""
    first = runs.drop_duplicates("method")
    keyed = sorted(((_method_sort_key(r), r["method"]) for _, r in first.iterrows()))
    return [m for _, m in keyed]


def protocol_sort_key(name: str) -> tuple:
    """none, fov360, fov180, fov90, fov90_known, fov70, misalign_..., others."""
    if name == "none":
        return (0, 0.0, "")
    match = re.fullmatch(r"fov([0-9.]+)(.*)", name)
    if match:
        return (1, -float(match.group(1)), match.group(2))
    return (2 if name.startswith("misalign") else 3, 0.0, name)


RUN_COLUMNS = ["run_id", "cell_id", "method", "backbone", "aggregator", "aggregator_label",
               "share", "dustbin", "variant", "train_dataset", "seed"]


def results_long(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run x test dataset x protocol with the logged test metrics as columns.

    Of several runs of the same method, training dataset, seed, test dataset and protocol
    (cells that differ only in what they evaluate on), the newest one is kept.
    """
    keys = [c for c in runs.columns if c.startswith("metrics.test/")]
    columns = RUN_COLUMNS + ["test_dataset", "protocol"]
    if not keys:
        return pd.DataFrame(columns=columns)
    long = runs[["run_id", *keys]].melt(id_vars="run_id", var_name="key", value_name="value")
    long = long.dropna(subset=["value"])
    parts = long["key"].str[len("metrics.test/"):].str.split("/")
    long = long.assign(
        test_dataset=parts.str[0],
        protocol=[p[1] if len(p) == 3 else "none" for p in parts],
        metric=parts.str[-1],
    )
    long = long[parts.str.len().isin([2, 3])]
    wide = long.pivot_table(index=["run_id", "test_dataset", "protocol"], columns="metric",
                            values="value", aggfunc="first").reset_index()
    wide.columns.name = None
    order = pd.DataFrame({"run_id": runs["run_id"], "_order": np.arange(len(runs))})  # newest first
    out = runs[RUN_COLUMNS].merge(wide, on="run_id").merge(order, on="run_id")
    out = out.sort_values("_order", kind="stable").drop_duplicates(
        ["method", "train_dataset", "seed", "test_dataset", "protocol"], keep="first")
    return out.drop(columns="_order").reset_index(drop=True)


# --- ranks artifacts -----------------------------------------------------------------------


def ranks_file(test_dataset: str, protocol: str) -> str:
    """`ranks/test__cvusa.npz`, `ranks/test__cvusa__fov90.npz` (the engine's names)."""
    prefix = f"test/{test_dataset}" + ("" if protocol == "none" else f"/{protocol}")
    return prefix.replace("/", "__") + ".npz"


class RankStore:
    """Per-query ranks of runs, downloaded from their `ranks/` artifacts on first use."""

    def __init__(self, tracking_uri: str, workdir: Path):
        self.uri = tracking_uri
        self.workdir = Path(workdir)
        self._dirs: dict[str, Path | None] = {}
        self._arrays: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}

    def _download(self, run_id: str) -> Path | None:
        if run_id not in self._dirs:
            import mlflow

            self._dirs[run_id] = None
            quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per run
            try:
                listed = tracking.client(self.uri).list_artifacts(run_id, "ranks")
                if listed:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path="ranks", dst_path=str(self.workdir / run_id),
                        tracking_uri=self.uri)
                    self._dirs[run_id] = Path(local)
            except Exception as exc:  # an unreachable artifact store: report without ranks
                log.warning("run %s: ranks artifacts could not be downloaded (%s)", run_id, exc)
            finally:
                if quiet is None:
                    os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
                else:
                    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
        return self._dirs[run_id]

    def get(self, run_id: str, test_dataset: str, protocol: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(query ids as strings, ranks) of one evaluation, or None without the artifact."""
        name = ranks_file(test_dataset, protocol)
        if (run_id, name) not in self._arrays:
            folder = self._download(run_id)
            value = None
            if folder is not None and (folder / name).is_file():
                with np.load(folder / name, allow_pickle=False) as data:
                    ranks = np.asarray(data["ranks"])
                    ids = data["query_ids"] if "query_ids" in data else data["query_index"]
                    value = (np.asarray(ids).astype(str), ranks)
            self._arrays[(run_id, name)] = value
        return self._arrays[(run_id, name)]


def align(*pairs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ranks of several evaluations restricted to their common query ids, in one order."""
    common = reduce(np.intersect1d, [ids for ids, _ in pairs])
    out = []
    for ids, ranks in pairs:
        _, _, where = np.intersect1d(common, ids, return_indices=True)
        out.append(ranks[where])
    return common, out


# --- statistics ----------------------------------------------------------------------------


def seed_bootstrap_ci(hits: np.ndarray, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile interval (percent) of the seed-averaged hit rate, resampling queries.

    `hits` `[S, Q]`: 0/1 hits of S seeds on the same Q queries. A query's seed-averaged hit
    takes one of S + 1 values; resampling Q queries with replacement draws a multinomial
    over those values (for S = 1 this is `metrics.bootstrap_ci`'s binomial draw).
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[1] == 0:
        return float("nan"), float("nan")
    n_seeds, n_queries = hits.shape
    counts = np.bincount(hits.sum(axis=0), minlength=n_seeds + 1)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_queries, counts / n_queries, size=n_boot)
    means = draws @ (np.arange(n_seeds + 1) / n_seeds) / n_queries
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(100.0 * lo), float(100.0 * hi)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def r1_interval(group: pd.DataFrame, store: RankStore | None) -> tuple[float, float, str]:
    """R@1's 95% interval for one method x setting over its seeds (see the module doc)."""
    logged = [(lo, hi) for lo, hi in zip(group.get("R1_ci_low", [np.nan] * len(group)),
                                          group.get("R1_ci_high", [np.nan] * len(group)), strict=True)]
    all_logged = all(_finite(lo) and _finite(hi) for lo, hi in logged)
    arrays = []
    if store is not None:
        arrays = [store.get(r.run_id, r.test_dataset, r.protocol) for r in group.itertuples()]
    have_ranks = bool(arrays) and all(a is not None for a in arrays)
    if len(group) == 1:
        if all_logged:
            return float(logged[0][0]), float(logged[0][1]), "logged (query bootstrap)"
        if have_ranks:
            lo, hi = M.bootstrap_ci(arrays[0][1] < 1)
            return lo, hi, "query bootstrap (ranks artifact)"
        return float("nan"), float("nan"), "none"
    if have_ranks:
        common, ranks = align(*arrays)
        if len(common) and all(len(common) == len(a[0]) for a in arrays):
            lo, hi = seed_bootstrap_ci(np.stack([r < 1 for r in ranks]))
            return lo, hi, "query bootstrap of seed-averaged hits"
    if all_logged:
        return (float(np.mean([lo for lo, _ in logged])), float(np.mean([hi for _, hi in logged])),
                "mean of the seeds' logged bounds")
    return float("nan"), float("nan"), "none"


def summarise(results: pd.DataFrame, store: RankStore | None) -> pd.DataFrame:
    """Per method x training dataset x test dataset x protocol: mean/std over seeds, R@1 CI."""
    rows = []
    attrs = ["backbone", "aggregator", "aggregator_label", "share", "dustbin", "variant"]
    for (method, train, test, protocol), group in results.groupby(
            ["method", "train_dataset", "test_dataset", "protocol"], sort=False):
        first = group.iloc[0]
        row: dict[str, Any] = {"method": method, **{a: first[a] for a in attrs},
                               "train_dataset": train, "test_dataset": test, "protocol": protocol,
                               "n_seeds": len(group),
                               "seeds": " ".join(str(s) for s in sorted(group["seed"]))}
        for name in METRICS:
            if name in group and group[name].notna().any():
                values = group[name].dropna().astype(float)
                row[f"{name}_mean"] = float(values.mean())
                row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        lo, hi, source = r1_interval(group, store)
        row.update(R1_ci_low=lo, R1_ci_high=hi, R1_ci_source=source)
        rows.append(row)
    return pd.DataFrame(rows)


# --- tables --------------------------------------------------------------------------------


@dataclass
class Table:
    name: str
    title: str
    description: str
    data: pd.DataFrame | None = None  # tidy numbers -> CSV
    display: pd.DataFrame | None = None  # formatted wide table -> Markdown, LaTeX
    skipped: str = ""
    heatmap: pd.DataFrame | None = None  # numeric, rows x columns as labels
    heatmap_center: float | None = None  # a diverging scale around this value (deltas)


def _heat(frame: pd.DataFrame, rows: dict[str, Any], cols: dict[str, Any],
          value: str) -> pd.DataFrame:
    """A numeric rows x columns frame for a heatmap: row labels join the `rows` columns with
    " | ", column labels join `cols` with a line break; both in `_ordered` order; a value
    repeated (over seeds) is averaged."""
    def labels(f: pd.DataFrame, names: list[str], sep: str) -> pd.Series:
        return f[names].astype(str).agg(sep.join, axis=1)

    row_names, col_names = list(rows), list(cols)
    row_order = labels(_ordered(frame.drop_duplicates(row_names), rows), row_names, " | ")
    col_order = labels(_ordered(frame.drop_duplicates(col_names), cols), col_names, "\n")
    long = pd.DataFrame({"row": labels(frame, row_names, " | "),
                         "col": labels(frame, col_names, "\n"), "value": frame[value].astype(float)})
    wide = long.pivot_table(index="row", columns="col", values="value", aggfunc="mean")
    wide = wide.reindex(index=list(row_order), columns=list(col_order))
    wide.index.name = " | ".join(n.replace("_dataset", "") for n in row_names)
    wide.columns.name = " / ".join(n.replace("_dataset", "") for n in col_names)
    return wide


def fmt(mean: Any, std: Any = None, lo: Any = None, hi: Any = None) -> str:
    """`52.30 ± 1.20 [49.80, 54.90]`; the std only when finite, the bounds only when given."""
    if not _finite(mean):
        return DASH
    text = f"{float(mean):.2f}"
    if _finite(std):
        text += f" ± {float(std):.2f}"
    if _finite(lo) and _finite(hi):
        text += f" [{float(lo):.2f}, {float(hi):.2f}]"
    return text


def dustbin_text(value: Any) -> str:
    return {True: "on", False: "off"}.get(value, "n/a")


def setting(train: str, test: str) -> str:
    return f"{train}{ARROW}{test}"


def _ordered(frame: pd.DataFrame, keys: dict[str, Any]) -> pd.DataFrame:
    """Sort rows by the given columns, each with a list order or a key function."""
    def key(col: pd.Series) -> pd.Series:
        spec = keys.get(col.name)
        if isinstance(spec, list):
            rank = {v: i for i, v in enumerate(spec)}
            return col.map(lambda v: rank.get(v, len(rank)))
        if callable(spec):
            return col.map(spec)
        return col
    return frame.sort_values(list(keys), key=key, kind="stable").reset_index(drop=True)


def _wide(data: pd.DataFrame, index: list[str], columns: str, cell: str,
          column_order: list[str]) -> pd.DataFrame:
    wide = data.pivot(index=index, columns=columns, values=cell)
    wide = wide.reindex(columns=[c for c in column_order if c in wide.columns]).fillna(DASH)
    wide.columns.name = None
    return wide.reset_index()


def results_table(summary: pd.DataFrame, methods: list[str]) -> Table:
    table = Table("results", "Results",
                  "Every metric per method, training dataset, test dataset and protocol: "
                  "mean ± std over seeds; R@1 with its 95% bootstrap interval; chance_R1 is the "
                  "R@1 of a random ranking (positives / gallery size).")
    if summary.empty:
        table.skipped = "no run logged test metrics (test/<dataset>/R1 ...)."
        return table
    cols = ["method", "train_dataset", "test_dataset", "protocol", "n_seeds", "seeds"]
    numeric = [c for c in summary.columns if c.endswith(("_mean", "_std", "_ci_low", "_ci_high"))]
    data = _ordered(summary[cols + numeric + ["R1_ci_source"]],
                    {"method": methods, "train_dataset": None, "test_dataset": None,
                     "protocol": protocol_sort_key})
    display = data[["method", "train_dataset", "test_dataset", "protocol", "n_seeds"]].rename(
        columns={"train_dataset": "train", "test_dataset": "test", "n_seeds": "seeds"})
    for name in METRICS:
        if f"{name}_mean" not in data:
            continue
        if name == "R1":
            display[name] = [fmt(r.R1_mean, r.R1_std, r.R1_ci_low, r.R1_ci_high)
                             for r in data.itertuples()]
        else:
            display[name] = [fmt(m, s) for m, s in zip(data[f"{name}_mean"], data[f"{name}_std"],
                                                       strict=True)]
    table.data, table.display = data, display
    return table


def transfer_table(summary: pd.DataFrame, methods: list[str]) -> Table:
    table = Table("transfer", "Cross-dataset transfer (R@1)",
                  "Rows: method and training dataset; columns: test dataset. R@1 as mean ± std "
                  "over seeds [95% bootstrap interval]; the diagonal is in-domain.")
    none = summary[summary["protocol"] == "none"] if not summary.empty else summary
    pairs = none[["train_dataset", "test_dataset"]].drop_duplicates() if len(none) else none
    if len(pairs) <= 1:
        only = f" ({setting(*pairs.iloc[0])})" if len(pairs) else ""
        table.skipped = f"every run trains and tests on the same pair of datasets{only}."
        return table
    data = _ordered(none[["method", "train_dataset", "test_dataset", "n_seeds", "seeds", "R1_mean",
                          "R1_std", "R1_ci_low", "R1_ci_high", "R1_ci_source"]],
                    {"method": methods, "train_dataset": None, "test_dataset": None})
    tests = sorted(data["test_dataset"].unique())
    cells = data.assign(cell=[fmt(r.R1_mean, r.R1_std, r.R1_ci_low, r.R1_ci_high)
                              for r in data.itertuples()])
    display = _wide(cells, ["method", "train_dataset"], "test_dataset", "cell", tests)
    display = _ordered(display, {"method": methods, "train_dataset": None})
    table.display = display.rename(columns={"train_dataset": "train \\ test"})
    table.data = data
    table.heatmap = _heat(data, {"method": methods, "train_dataset": None},
                          {"test_dataset": None}, "R1_mean")
    return table


def ablation_table(summary: pd.DataFrame) -> Table:
    table = Table("ablation", "Sharing x dustbin ablation (R@1)",
                  "Per backbone and aggregator: the aggregator's sharing across the two views "
                  "(none / clusters / all) and SALAD's dustbin (on / off); columns: training "
                  f"{ARROW} test dataset. R@1 as mean ± std over seeds. Only combinations that "
                  "were run appear.")
    none = summary[summary["protocol"] == "none"] if not summary.empty else summary
    if none.empty:
        table.skipped = "no test results."
        return table
    none = none.assign(dustbin_text=none["dustbin"].map(dustbin_text),
                       aggregator_variant=none["aggregator"]
                       + none["variant"].map(lambda v: f" ({v})" if v else ""),
                       setting=[setting(a, b) for a, b in
                                zip(none["train_dataset"], none["test_dataset"], strict=True)])
    groups = none.groupby(["backbone", "aggregator_variant"])[["share", "dustbin_text"]]
    varied = [key for key, g in groups if len(g.drop_duplicates()) > 1]
    if not varied:
        table.skipped = ("no backbone and aggregator was run with more than one sharing / "
                         "dustbin setting.")
        return table
    keep = pd.Series([k in varied for k in zip(none["backbone"], none["aggregator_variant"],
                                               strict=True)], index=none.index)
    sub = none[keep]
    settings = sorted(sub["setting"].unique())
    order = {"share": lambda s: SHARE_ORDER.get(s, 9), "dustbin": ["on", "off", "n/a"]}
    data = sub[["backbone", "aggregator_variant", "share", "dustbin_text", "train_dataset",
                "test_dataset", "n_seeds", "R1_mean", "R1_std"]].rename(
        columns={"aggregator_variant": "aggregator", "dustbin_text": "dustbin"})
    data = _ordered(data, {"backbone": None, "aggregator": None, **order,
                           "train_dataset": None, "test_dataset": None})
    cells = data.assign(setting=[setting(a, b) for a, b in
                                 zip(data["train_dataset"], data["test_dataset"], strict=True)],
                        cell=[fmt(m, s) for m, s in zip(data["R1_mean"], data["R1_std"], strict=True)])
    index = ["backbone", "aggregator", "share", "dustbin"]
    table.display = _ordered(_wide(cells, index, "setting", "cell", settings),
                             {"backbone": None, "aggregator": None, **order})
    table.data = data
    table.heatmap = _heat(cells.assign(dustbin="dustbin " + cells["dustbin"]),
                          {"backbone": None, "aggregator": None, "share": order["share"],
                           "dustbin": [f"dustbin {d}" for d in order["dustbin"]]},
                          {"setting": None}, "R1_mean")
    return table


def backbone_aggregator_table(summary: pd.DataFrame, methods: list[str]) -> Table:
    table = Table("backbone_aggregator", "Backbone x aggregator (R@1)",
                  f"Per training {ARROW} test dataset: rows backbone, columns aggregator (with its "
                  "sharing mode and dustbin). R@1 as mean ± std over seeds.")
    none = summary[summary["protocol"] == "none"] if not summary.empty else summary
    if none.empty:
        table.skipped = "no test results."
        return table
    if none["backbone"].nunique() < 2 and none["aggregator_label"].nunique() < 2:
        table.skipped = (f"a single backbone and aggregator ({none['backbone'].iloc[0]} + "
                         f"{none['aggregator_label'].iloc[0]}).")
        return table
    first = summary.drop_duplicates("aggregator_label")
    agg_order = [label for _, label in sorted(
        ((_method_sort_key(r)[1:], r["aggregator_label"]) for _, r in first.iterrows()))]
    data = none[["train_dataset", "test_dataset", "backbone", "aggregator_label", "n_seeds",
                 "R1_mean", "R1_std"]].rename(columns={"aggregator_label": "aggregator"})
    data = _ordered(data, {"train_dataset": None, "test_dataset": None, "backbone": None,
                           "aggregator": agg_order})
    cells = data.assign(setting=[setting(a, b) for a, b in
                                 zip(data["train_dataset"], data["test_dataset"], strict=True)],
                        cell=[fmt(m, s) for m, s in zip(data["R1_mean"], data["R1_std"], strict=True)])
    display = _wide(cells, ["setting", "backbone"], "aggregator", "cell", agg_order)
    table.display = _ordered(display, {"setting": None, "backbone": None}).rename(
        columns={"setting": "train " + ARROW + " test"})
    table.data = data
    table.heatmap = _heat(cells, {"setting": None, "backbone": None}, {"aggregator": agg_order},
                          "R1_mean")
    return table


def robustness_table(summary: pd.DataFrame, methods: list[str]) -> Table:
    table = Table("robustness", "Robustness protocols (R@1)",
                  f"Per training {ARROW} test dataset: rows protocol (none = the plain test set; "
                  "fovN = N-degree field of view with unknown orientation, _known = known "
                  "orientation; misalign_sX_rY = aerial shift up to X% of the side and rotation "
                  "up to Y degrees), columns method. R@1 as mean ± std over seeds.")
    if summary.empty or set(summary["protocol"]) <= {"none"}:
        table.skipped = "every run was evaluated without a robustness protocol (protocols: [none])."
        return table
    data = summary[["train_dataset", "test_dataset", "protocol", "method", "n_seeds", "R1_mean",
                    "R1_std"]]
    data = _ordered(data, {"train_dataset": None, "test_dataset": None,
                           "protocol": protocol_sort_key, "method": methods})
    cells = data.assign(setting=[setting(a, b) for a, b in
                                 zip(data["train_dataset"], data["test_dataset"], strict=True)],
                        cell=[fmt(m, s) for m, s in zip(data["R1_mean"], data["R1_std"], strict=True)])
    display = _wide(cells, ["setting", "protocol"], "method", "cell", methods)
    table.display = _ordered(display, {"setting": None, "protocol": protocol_sort_key}).rename(
        columns={"setting": "train " + ARROW + " test"})
    table.data = data
    table.heatmap = _heat(cells, {"method": methods},
                          {"setting": None, "protocol": protocol_sort_key}, "R1_mean")
    return table


def _norm(value: Any) -> str:
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false", "none", "null") else text


def baseline_mask(runs: pd.DataFrame, baseline: dict[str, Any]) -> tuple[pd.Series | None, str]:
    """Which runs are the baseline; (None, why) when a key is not a logged param."""
    mask = pd.Series(True, index=runs.index)
    for key, value in baseline.items():
        if key == "aggregator.dustbin":
            column = runs["dustbin"].map(lambda d: DASH if d is None else str(d))
        elif f"params.{key}" in runs:
            column = runs[f"params.{key}"].astype(object).fillna(DASH)
        else:
            known = sorted(c[len("params."):] for c in runs.columns if c.startswith("params."))
            return None, (f"baseline key '{key}' is not a logged param of these runs "
                          f"(params: {', '.join(known)}).")
        mask &= column.map(_norm) == _norm(value)
    return mask, ""


def _similarity(a: pd.Series, b: pd.Series, columns: list[str]) -> int:
    return sum(_norm(a[c]) == _norm(b[c]) for c in columns)


def deltas_table(runs: pd.DataFrame, results: pd.DataFrame, store: RankStore | None,
                 baseline: dict[str, Any] | None, methods: list[str]) -> Table:
    declared = ", ".join(f"{k}={v}" for k, v in (baseline or {}).items())
    table = Table("deltas", "Deltas against the baseline (R@1)",
                  f"Baseline: {declared or 'none declared'}. Each method against the baseline "
                  "run with the same training dataset and seed (of several baseline methods, "
                  "the one sharing most parameters), per test dataset and protocol: ΔR@1 = "
                  "method − baseline, on the queries both evaluated (matched by query id), and "
                  "the exact McNemar p-value on their per-query hits (rank < 1); only_method / "
                  "only_baseline count the discordant queries.")
    if not baseline:
        table.skipped = "no baseline declared (a `baseline:` key in the matrix file)."
        return table
    mask, why = baseline_mask(runs, baseline)
    if mask is None:
        table.skipped = why
        return table
    if not mask.any():
        table.skipped = f"no finished run matches the baseline ({declared})."
        return table
    if mask.all():
        table.skipped = f"every run matches the baseline ({declared}): nothing to compare."
        return table
    similar = ["backbone", "aggregator", "share", "dustbin", "share_backbone",
               *_method_params(runs)]
    base_runs, others = runs[mask], runs[~mask]
    by_run = {run_id: g for run_id, g in results.groupby("run_id")}
    rows = []
    for _, run in others.iterrows():
        candidates = base_runs[(base_runs["train_dataset"] == run["train_dataset"])
                               & (base_runs["seed"] == run["seed"])]
        if candidates.empty or run["run_id"] not in by_run:
            continue
        scores = [(-_similarity(run, b, similar), methods.index(b["method"])
                   if b["method"] in methods else 0, i) for i, b in candidates.iterrows()]
        base = candidates.loc[min(scores)[2]]
        if base["run_id"] not in by_run:
            continue
        mine = by_run[run["run_id"]].set_index(["test_dataset", "protocol"])
        theirs = by_run[base["run_id"]].set_index(["test_dataset", "protocol"])
        for test, protocol in mine.index.intersection(theirs.index):
            row = {"train_dataset": run["train_dataset"], "test_dataset": test,
                   "protocol": protocol, "seed": int(run["seed"]), "method": run["method"],
                   "baseline": base["method"]}
            a = store.get(run["run_id"], test, protocol) if store else None
            b = store.get(base["run_id"], test, protocol) if store else None
            if a is not None and b is not None:
                common, (ra, rb) = align(a, b)
                test_ = M.mcnemar(ra < 1, rb < 1)
                row.update(R1=M.recall_at(ra, 1), baseline_R1=M.recall_at(rb, 1),
                           only_method=test_["only_a"], only_baseline=test_["only_b"],
                           p_value=test_["p_value"], queries_paired=len(common))
            else:  # no ranks: the logged R@1, no paired test
                row.update(R1=float(mine.loc[(test, protocol), "R1"]),
                           baseline_R1=float(theirs.loc[(test, protocol), "R1"]),
                           only_method=np.nan, only_baseline=np.nan, p_value=np.nan,
                           queries_paired=0)
            row["delta_R1"] = row["R1"] - row["baseline_R1"]
            rows.append(row)
    if not rows:
        table.skipped = (f"no other run shares a training dataset and seed with a baseline run "
                         f"({declared}).")
        return table
    data = pd.DataFrame(rows)[["train_dataset", "test_dataset", "protocol", "method", "baseline",
                               "seed", "R1", "baseline_R1", "delta_R1", "only_method",
                               "only_baseline", "p_value", "queries_paired"]]
    data = _ordered(data, {"train_dataset": None, "test_dataset": None,
                           "protocol": protocol_sort_key, "method": methods, "seed": None})
    display = pd.DataFrame({
        "train " + ARROW + " test": [setting(a, b) for a, b in
                                     zip(data["train_dataset"], data["test_dataset"], strict=True)],
        "protocol": data["protocol"], "method": data["method"], "baseline": data["baseline"],
        "seed": data["seed"].astype(str),
        "R@1": data["R1"].map(lambda v: f"{v:.2f}"),
        "baseline R@1": data["baseline_R1"].map(lambda v: f"{v:.2f}"),
        "ΔR@1": data["delta_R1"].map(lambda v: f"{v:+.2f}"),
        "only method / only baseline": [
            DASH if not _finite(a) else f"{int(a)} / {int(b)}"
            for a, b in zip(data["only_method"], data["only_baseline"], strict=True)],
        "McNemar p": data["p_value"].map(lambda p: f"{p:.3g}" if _finite(p) else DASH),
    })
    table.data, table.display = data, display
    table.heatmap_center = 0.0
    # The heatmap shows the mean over seeds.
    table.heatmap = _heat(data.assign(setting=display["train " + ARROW + " test"]),
                          {"method": methods}, {"setting": None, "protocol": protocol_sort_key},
                          "delta_R1")
    return table


# --- writing tables ------------------------------------------------------------------------


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no dependency on tabulate)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", ARROW: r"$\to$", "Δ": r"$\Delta$", "−": "-", DASH: "--", "∅": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(frame: pd.DataFrame, caption: str, label: str) -> str:
    text = frame.to_latex(index=False, escape=True, caption=latex_escape(caption), label=label,
                          column_format="l" * len(frame.columns))
    for char, replacement in _LATEX_UNICODE.items():
        text = text.replace(char, replacement)
    return text


def write_table(table: Table, folder: Path) -> list[str]:
    """`<name>.md`, `<name>.csv`, `<name>.tex` in `folder`; returns their file names."""
    md = f"# {table.title}\n\n{table.description}\n\n{to_markdown(table.display)}"
    (folder / f"{table.name}.md").write_text(md, encoding="utf-8")
    table.data.to_csv(folder / f"{table.name}.csv", index=False)
    (folder / f"{table.name}.tex").write_text(
        to_latex(table.display, f"{table.title}. {table.description}", f"tab:{table.name}"),
        encoding="utf-8")
    return [f"{table.name}.md", f"{table.name}.csv", f"{table.name}.tex"]


# --- figures -------------------------------------------------------------------------------


def _figure(n_panels: int, panel_w: float, panel_h: float, ncols: int | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def heatmap_figure(table: Table, path: Path) -> bool:
    """The table's heatmap (annotated; R@1, or ΔR@1 on a diverging scale) as one panel.

    One panel per figure on purpose: seaborn draws the whole figure for every heatmap it
    adds, so panels would cost quadratic time.
    """
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frame = table.heatmap
    if frame is None or not frame.size or not frame.notna().any().any():
        return False
    label_w = max(len(str(i)) for i in frame.index) * 0.075
    col_w = max(1.0, max(len(line) for c in frame.columns for line in str(c).split("\n")) * 0.08)
    fig = Figure(figsize=(2.5 + label_w + col_w * frame.shape[1], 1.6 + 0.42 * frame.shape[0]))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values = frame.to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    kwargs: dict[str, Any] = {"cmap": "viridis", "vmin": float(values.min()),
                              "vmax": float(values.max())}
    if table.heatmap_center is not None:
        bound = float(max(abs(values.min()), abs(values.max()), 1e-9))
        kwargs = {"cmap": "RdBu", "center": table.heatmap_center, "vmin": -bound, "vmax": bound}
    sns.heatmap(frame, annot=True, fmt=".1f", ax=ax, linewidths=0.5,
                cbar_kws={"label": "ΔR@1" if table.heatmap_center is not None else "R@1",
                          "shrink": 0.8}, **kwargs)
    ax.set_title(table.title + (" (mean over seeds)" if table.heatmap_center is None else
                                " (mean ΔR@1 over seeds)"), fontsize="medium")
    ax.tick_params(axis="x", labelrotation=0)
    ax.tick_params(axis="y", labelrotation=0)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def _palette(methods: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every panel and figure."""
    import seaborn as sns

    colours = sns.color_palette("tab10" if len(methods) <= 10 else "husl", len(methods))
    return dict(zip(methods, colours, strict=True))


def recall_curves(results: pd.DataFrame, store: RankStore, methods: list[str],
                  folder: Path) -> list[tuple[str, str]]:
    """`recall_at_k_<test>.png`: R@K for K = 1..k_max from the ranks, per training dataset."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    out = []
    plain = results[results["protocol"] == "none"]
    for test, group in plain.groupby("test_dataset", sort=True):
        curves = []
        for r in group.itertuples():
            found = store.get(r.run_id, test, "none")
            if found is None or not len(found[1]):
                continue
            ranks = found[1]
            k_max = max(int(ranks.max()), 1)
            hits = np.cumsum(np.bincount(np.clip(ranks, 0, k_max), minlength=k_max + 1))
            k = np.arange(1, k_max + 1)
            curves.append(pd.DataFrame({"K": k, "recall": 100.0 * hits[k - 1] / len(ranks),
                                        "method": r.method, "train": r.train_dataset,
                                        "seed": r.seed}))
        if not curves:
            continue
        data = pd.concat(curves, ignore_index=True)
        # Every curve runs to the largest K any method's ranks reach (its R@K stays exact).
        k_top = int(data["K"].max())
        filled = []
        for _, c in data.groupby(["method", "train", "seed"], sort=False):
            last = c.iloc[-1]
            extra = np.arange(int(last["K"]) + 1, k_top + 1)
            if len(extra):
                c = pd.concat([c, pd.DataFrame({"K": extra, "recall": 100.0, "method": last["method"],
                                                "train": last["train"], "seed": last["seed"]})])
            filled.append(c)
        data = pd.concat(filled, ignore_index=True)
        trains = sorted(data["train"].unique())
        palette = _palette(methods)
        fig, axes = _figure(len(trains), 6.0, 4.0, ncols=min(len(trains), 2))
        for ax, train in zip(axes, trains, strict=True):
            panel = data[data["train"] == train]
            sns.lineplot(data=panel, x="K", y="recall", hue="method", palette=palette,
                         hue_order=[m for m in methods if m in set(panel["method"])],
                         errorbar="sd", ax=ax)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if k_top > 20:
                ax.set_xscale("log")
            ax.set_title(f"trained on {train}, tested on {test}")
            ax.set_ylabel("R@K (%)")
            ax.legend(fontsize="x-small")
        fig.suptitle(f"R@K on {test} (mean over seeds, band = ± std)")
        name = f"figures/recall_at_k_{_safe(test)}.png"
        fig.savefig(folder / name, dpi=100)
        out.append((f"R@K curves, test on {test}", name))
    return out


def training_curves(runs: pd.DataFrame, tracking_uri: str, methods: list[str],
                    folder: Path) -> tuple[str, str] | None:
    """`training_curves.png`: train/loss per step and val R@1 per epoch, one line per cell."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    mlclient = tracking.client(tracking_uri)
    val_keys = sorted(c[len("metrics."):] for c in runs.columns
                      if c.startswith("metrics.val/") and c.endswith("/R1"))
    series: dict[str, list[pd.DataFrame]] = {"loss": [], "val": []}
    for r in runs.itertuples():
        for kind, keys in (("loss", ["train/loss"]), ("val", val_keys)):
            for key in keys:
                history = mlclient.get_metric_history(r.run_id, key)
                if not history:
                    continue
                series[kind].append(pd.DataFrame({
                    "step": [h.step for h in history], "value": [h.value for h in history],
                    "method": r.method, "train": r.train_dataset, "run": r.run_id,
                    "seed": r.seed, "val": key.split("/")[1]}))
    if not series["loss"] and not series["val"]:
        return None
    trains = sorted(runs["train_dataset"].unique())
    palette = _palette(methods)
    fig, axes = _figure(2 * len(trains), 5.5, 3.6, ncols=2)
    for i, train in enumerate(trains):
        for j, (kind, ylabel, xlabel) in enumerate((("loss", "train/loss", "step"),
                                                    ("val", "val R@1 (%)", "epoch"))):
            ax = axes[2 * i + j]
            frames = [f for f in series[kind] if f["train"].iloc[0] == train]
            if not frames:
                ax.set_visible(False)
                continue
            data = pd.concat(frames, ignore_index=True)
            style = "val" if kind == "val" and data["val"].nunique() > 1 else None
            sns.lineplot(data=data, x="step", y="value", hue="method", palette=palette,
                         hue_order=[m for m in methods if m in set(data["method"])],
                         units="run", estimator=None, style=style, ax=ax,
                         marker="o" if kind == "val" else None)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"trained on {train}: {ylabel} (one line per cell)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize="x-small")
    fig.savefig(folder / "figures/training_curves.png", dpi=100)
    return ("Training curves", "figures/training_curves.png")


# --- the report ----------------------------------------------------------------------------

TABLE_NAMES = ("runs", "results", "transfer", "ablation", "backbone_aggregator", "robustness",
               "deltas")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


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
    folder = Path(reports_dir) / _safe(experiment)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    _clean(folder)
    methods = method_order(runs)
    results = results_long(runs)
    with tempfile.TemporaryDirectory(prefix="gengeo-report-") as tmp:
        store = RankStore(tracking_uri, Path(tmp))
        summary = summarise(results, store) if len(results) else pd.DataFrame()
        tables = [results_table(summary, methods), transfer_table(summary, methods),
                  ablation_table(summary), backbone_aggregator_table(summary, methods),
                  robustness_table(summary, methods),
                  deltas_table(runs, results, store, baseline, methods)]
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
    index = _index(experiment, tracking_uri, runs, methods, tables, written, figures,
                   baseline, has_runs_csv=len(results) > 0)
    (folder / "index.md").write_text(index, encoding="utf-8")
    if parent_run_id:
        tracking.client(tracking_uri).log_artifacts(parent_run_id, str(folder), artifact_path="report")
    log.info("report written to %s", folder)
    return folder


def _index(experiment: str, tracking_uri: str, runs: pd.DataFrame, methods: list[str],
           tables: list[Table], written: dict[str, list[str]], figures: list[tuple[str, str]],
           baseline: dict | None, has_runs_csv: bool) -> str:
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
    return "\n".join(lines).rstrip() + "\n"


# --- `benchmark report` ----------------------------------------------------------------------


def report_command_impl(matrix: str | None, experiment: str | None, reports_dir: str,
                        tracking_uri: str | None) -> Path:
    """`benchmark report [MATRIX] [--experiment NAME]`: the experiment name and baseline
    come from the matrix file (`name:`, `baseline:`); `--experiment` names it directly."""
    from gengeo_bench.config import read_yaml

    baseline: dict[str, str] = {}
    if matrix:
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
