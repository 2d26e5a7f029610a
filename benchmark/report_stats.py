"""Reports, step 2: the numbers behind the tables: means, stds, intervals, paired deltas.

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

`paired_deltas` pairs every method's run with the baseline run of the same training
dataset and seed, and compares them query by query: ΔR@1 and the exact McNemar test on
the per-query hits (rank < 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gengeo_bench import metrics as M
from gengeo_bench.report_load import (
    DASH,
    METRICS,
    RankStore,
    align,
    method_params,
)


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


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def r1_interval(group: pd.DataFrame, store: RankStore | None) -> tuple[float, float, str]:
    """R@1's 95% interval for one method x setting over its seeds (see the module doc)."""
    logged = [(lo, hi) for lo, hi in zip(group.get("R1_ci_low", [np.nan] * len(group)),
                                          group.get("R1_ci_high", [np.nan] * len(group)), strict=True)]
    all_logged = all(finite(lo) and finite(hi) for lo, hi in logged)
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



def norm(value: Any) -> str:
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
        mask &= column.map(norm) == norm(value)
    return mask, ""


def _similarity(a: pd.Series, b: pd.Series, columns: list[str]) -> int:
    return sum(norm(a[c]) == norm(b[c]) for c in columns)




def paired_deltas(runs: pd.DataFrame, results: pd.DataFrame, store: RankStore | None,
                  baseline: dict[str, Any] | None, methods: list[str]) -> tuple[pd.DataFrame | None, str]:
    """Every method against the baseline run of the same training dataset and seed.

    Returns (one row per method run x test dataset x protocol, "") or (None, why not).
    Of several baseline methods, the one sharing most parameters is the baseline. With
    both runs' ranks artifacts, ΔR@1 is taken on the queries both evaluated (matched by
    query id) with the exact McNemar p-value on their hits; without them, the logged R@1
    and no paired test.
    """
    declared = ", ".join(f"{k}={v}" for k, v in (baseline or {}).items())
    if not baseline:
        return None, "no baseline declared (a `baseline:` key in the matrix file)."
    mask, why = baseline_mask(runs, baseline)
    if mask is None:
        return None, why
    if not mask.any():
        return None, f"no finished run matches the baseline ({declared})."
    if mask.all():
        return None, f"every run matches the baseline ({declared}): nothing to compare."
    similar = ["backbone", "aggregator", "share", "dustbin", "share_backbone", *method_params(runs)]
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
                   "baseline": base["method"], "run_id": run["run_id"],
                   "baseline_run_id": base["run_id"]}
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
        return None, (f"no other run shares a training dataset and seed with a baseline run "
                      f"({declared}).")
    data = pd.DataFrame(rows)[["train_dataset", "test_dataset", "protocol", "method", "baseline",
                               "seed", "R1", "baseline_R1", "delta_R1", "only_method",
                               "only_baseline", "p_value", "queries_paired", "run_id",
                               "baseline_run_id"]]
    return data, ""
