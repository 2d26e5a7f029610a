"""Reports, step 1: finished MLflow cell runs -> one pandas frame with derived columns.

`load_runs` reads the cell runs of one experiment (the newest finished run per cell id)
and adds what the tables group by: backbone, aggregator, share, dustbin, training dataset,
seed and the method's label. `results_long` melts their test metrics into one row per
run x test dataset x protocol. `RankStore` fetches the per-query ranks each run logged as
`ranks/*.npz` artifacts, and `align` lines several evaluations up by query id;
`ExplainStore` fetches what `benchmark run` wrote per Cell under `explain/` (assignment
maps, dustbin numbers, top-k retrieval; see `explain.py`).

Methods are labelled `<backbone> + <aggregator>[<share>, dustbin|no dustbin]` (the share
mode is shown when it is not `none`, except for aggregators with a dustbin, where both are
always shown); when cells with the same label differ in another parameter (`train.lr`,
`share_backbone`, a backbone parameter ...), the differing values are appended, so runs
are only averaged over seeds when nothing else differs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gengeo_bench import tracking
from gengeo_bench.errors import ConfigError

log = logging.getLogger(__name__)

# Logged test metrics the tables summarise; the last two come from `explain.py` (the
# dustbin's mass on one-view patches and their share of the patches), with masked data.
METRICS = ("R1", "R5", "R10", "R1pct", "hit_rate", "chance_R1", "dustbin_on_unmatched",
           "unmatched_base_rate")
SHARE_ORDER = {"none": 0, "clusters": 1, "all": 2}
# Params that never make two cells different *methods*: they are the axes the tables
# are laid out along (seed, training dataset), are already in the label, or describe the
# evaluation rather than the model and its training.
_NOT_METHOD = {"seed", "train.dataset", "train.num_workers", "backbone.name", "aggregator.name",
               "aggregator.share", "aggregator.dustbin"}
_NOT_METHOD_PREFIXES = ("evaluate.", "datasets.")
ARROW = "→"
DASH = "—"



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


def method_params(runs: pd.DataFrame) -> list[str]:
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
    candidates = method_params(runs)
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


def method_sort_key(row: pd.Series) -> tuple:
    dustbin = {True: 0, False: 1}.get(row["dustbin"], 2)
    return (row["backbone"], row["aggregator"], SHARE_ORDER.get(row["share"], 9), dustbin,
            row["variant"])


def method_order(runs: pd.DataFrame) -> list[str]:
    """Methods sorted by backbone, aggregator, share (none, clusters, all), dustbin (on, off)."""
    first = runs.drop_duplicates("method")
    keyed = sorted(((method_sort_key(r), r["method"]) for _, r in first.iterrows()))
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


def download_folder(tracking_uri: str, run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """A run's artifact folder, downloaded under `dst`; None when it has none (or the
    artifact store cannot be reached: the report goes on without it)."""
    import mlflow

    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per run
    try:
        if not tracking.client(tracking_uri).list_artifacts(run_id, artifact_path):
            return None
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=tracking_uri))
    except Exception as exc:  # an unreachable artifact store
        log.warning("run %s: %s artifacts could not be downloaded (%s)", run_id, artifact_path, exc)
        return None
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet


class RankStore:
    """Per-query ranks of runs, downloaded from their `ranks/` artifacts on first use."""

    def __init__(self, tracking_uri: str, workdir: Path):
        self.uri = tracking_uri
        self.workdir = Path(workdir)
        self._dirs: dict[str, Path | None] = {}
        self._arrays: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}

    def _download(self, run_id: str) -> Path | None:
        if run_id not in self._dirs:
            self._dirs[run_id] = download_folder(self.uri, run_id, "ranks", self.workdir / run_id)
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


class ExplainStore:
    """What `benchmark run` wrote per Cell under `explain/<target>/` (explain.json, the
    figures, retrieval.npz), downloaded from the runs' artifacts on first use."""

    def __init__(self, tracking_uri: str, workdir: Path):
        self.uri = tracking_uri
        self.workdir = Path(workdir)
        self._dirs: dict[str, Path | None] = {}

    def folder(self, run_id: str, target: str) -> Path | None:
        """The local copy of one run's `explain/<target>/`, or None."""
        if run_id not in self._dirs:
            self._dirs[run_id] = download_folder(self.uri, run_id, "explain",
                                                 self.workdir / "explain" / run_id)
        root = self._dirs[run_id]
        return root / target if root is not None and (root / target).is_dir() else None

    def summary(self, run_id: str, target: str) -> dict[str, Any] | None:
        """The run's explain.json for one target, or None."""
        folder = self.folder(run_id, target)
        if folder is None or not (folder / "explain.json").is_file():
            return None
        return json.loads((folder / "explain.json").read_text())

    def retrieval(self, run_id: str, target: str):
        """The run's top-k retrieval of one target (`explain.Retrieval`), or None."""
        from gengeo_bench.explain import Retrieval

        folder = self.folder(run_id, target)
        if folder is None or not (folder / "retrieval.npz").is_file():
            return None
        return Retrieval.load(folder / "retrieval.npz")


def _clusters(only: dict[str, list[int]] | None, view: str) -> str | None:
    """`[3, 7]` (the clusters only `view` uses, JSON), or None with share: none (one space
    per view, so no cluster is one view's only)."""
    return None if only is None else json.dumps(only[view])


def explain_rows(runs: pd.DataFrame, results: pd.DataFrame, store: ExplainStore) -> pd.DataFrame:
    """One row per run x test dataset that has an explain.json with cluster assignments:
    what `explain.py` measured (percent), tidy; empty when no run has any."""
    rows = []
    plain = results[results["protocol"] == "none"] if len(results) else results
    by_run = runs.set_index("run_id")
    for r in plain.itertuples():
        summary = store.summary(r.run_id, r.test_dataset)
        numbers = (summary or {}).get("assignments")
        if not numbers:
            continue
        dustbin = numbers.get("dustbin") or {}
        both = (dustbin.get("unmatched") or {}).get("both") or {}
        row = {"run_id": r.run_id, "cell_id": by_run.at[r.run_id, "cell_id"], "method": r.method,
               "train_dataset": r.train_dataset, "test_dataset": r.test_dataset, "seed": r.seed,
               "num_clusters": numbers["num_clusters"], "pairs_measured": numbers.get("pairs_measured"),
               "R1": summary["retrieval"]["R1"],
               "dustbin_share": dustbin.get("mean_share", {}).get("both", np.nan),
               "dustbin_on_unmatched": both.get("dustbin_on_unmatched", np.nan),
               "unmatched_base_rate": both.get("unmatched_base_rate", np.nan),
               "lift": both.get("lift", np.nan),
               "ground_only_clusters": _clusters(numbers["clusters_one_view_only"], "ground"),
               "aerial_only_clusters": _clusters(numbers["clusters_one_view_only"], "aerial"),
               "unused_clusters": json.dumps(numbers["clusters_unused"])}
        for c in dustbin.get("classes") or []:
            row[f"dustbin_on_{c['class']}"] = c["share_of_dustbin_mass"]
            row[f"patches_{c['class']}"] = c["share_of_patches"]
        folder = store.folder(r.run_id, r.test_dataset)
        for name, file in summary.get("figures", {}).items():
            row[f"figure_{name}"] = str(folder / file)
        rows.append(row)
    return pd.DataFrame(rows)
