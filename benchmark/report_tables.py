"""Reports, step 3: the tables, each as tidy numbers (CSV) and formatted (Markdown, LaTeX).

Each builder takes the per-setting summary (`report_stats.summarise`) and returns a
`Table`: `data` holds the numbers in tidy form (one row per value; means, stds and bounds
as separate columns: read it back with pandas), `display` the formatted wide table for
Markdown and LaTeX (which needs `booktabs`), `heatmap` a numeric frame for its figure.
A table whose runs do not vary along its axes comes back with `skipped` saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gengeo_bench.report_load import (
    ARROW,
    DASH,
    METRICS,
    SHARE_ORDER,
    RankStore,
    method_sort_key,
    protocol_sort_key,
)
from gengeo_bench.report_stats import finite, paired_deltas


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
    if not finite(mean):
        return DASH
    text = f"{float(mean):.2f}"
    if finite(std):
        text += f" ± {float(std):.2f}"
    if finite(lo) and finite(hi):
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
                  "R@1 of a random ranking (positives / gallery size); with one-view masks, "
                  "dustbin_on_unmatched is the share of the dustbin's mass on patches only one "
                  "view shows, against those patches' share of the image (base), measured on a "
                  "few test pairs (explain.py).")
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
        if f"{name}_mean" not in data or name == "unmatched_base_rate":  # shown with the next
            continue
        if name == "R1":
            display[name] = [fmt(r.R1_mean, r.R1_std, r.R1_ci_low, r.R1_ci_high)
                             for r in data.itertuples()]
        elif name == "dustbin_on_unmatched":
            base = data.get("unmatched_base_rate_mean", pd.Series(float("nan"), index=data.index))
            display[name] = [fmt(m, s) + (f" (base {b:.2f})" if finite(m) and finite(b) else "")
                             for m, s, b in zip(data[f"{name}_mean"], data[f"{name}_std"], base,
                                                strict=True)]
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
    cells = _setting_cells(data)
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
        ((method_sort_key(r)[1:], r["aggregator_label"]) for _, r in first.iterrows()))]
    data = none[["train_dataset", "test_dataset", "backbone", "aggregator_label", "n_seeds",
                 "R1_mean", "R1_std"]].rename(columns={"aggregator_label": "aggregator"})
    data = _ordered(data, {"train_dataset": None, "test_dataset": None, "backbone": None,
                           "aggregator": agg_order})
    cells = _setting_cells(data)
    display = _wide(cells, ["setting", "backbone"], "aggregator", "cell", agg_order)
    table.display = _ordered(display, {"setting": None, "backbone": None}).rename(
        columns={"setting": "train " + ARROW + " test"})
    table.data = data
    table.heatmap = _heat(cells, {"setting": None, "backbone": None}, {"aggregator": agg_order},
                          "R1_mean")
    return table


def _setting_cells(data: pd.DataFrame) -> pd.DataFrame:
    """`data` with a `setting` column (train -> test) and a `cell` column (mean ± std R@1)."""
    return data.assign(setting=[setting(a, b) for a, b in
                                zip(data["train_dataset"], data["test_dataset"], strict=True)],
                       cell=[fmt(m, s) for m, s in zip(data["R1_mean"], data["R1_std"], strict=True)])


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
    cells = _setting_cells(data)
    display = _wide(cells, ["setting", "protocol"], "method", "cell", methods)
    table.display = _ordered(display, {"setting": None, "protocol": protocol_sort_key}).rename(
        columns={"setting": "train " + ARROW + " test"})
    table.data = data
    table.heatmap = _heat(cells, {"method": methods},
                          {"setting": None, "protocol": protocol_sort_key}, "R1_mean")
    return table



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
    data, why = paired_deltas(runs, results, store, baseline, methods)
    if data is None:
        table.skipped = why
        return table
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
            DASH if not finite(a) else f"{int(a)} / {int(b)}"
            for a, b in zip(data["only_method"], data["only_baseline"], strict=True)],
        "McNemar p": data["p_value"].map(lambda p: f"{p:.3g}" if finite(p) else DASH),
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


def _cluster_list(value: Any) -> str:
    """`3 7` from the CSV's `[3, 7]`; a dash for none; n/a when it does not apply (share: none)."""
    if not isinstance(value, str):
        return "n/a"
    clusters = json.loads(value)
    return " ".join(map(str, clusters)) if clusters else DASH


def inside_table(inside: pd.DataFrame, methods: list[str]) -> Table:
    """What `benchmark run` measured inside each Cell with cluster assignments (explain.py)."""
    table = Table("inside", "Inside the models: clusters and the dustbin",
                  "Per Cell with cluster assignments, on a few test pairs (pairs column): the "
                  "dustbin's share of the mass (SALAD's marginals fix it at (n - m) / n); with "
                  "one-view masks, the share of the dustbin's mass on one-view patches (a patch "
                  "is one-view when more than half its pixels are masked) against those patches' "
                  "share (base) and their ratio (lift); with annotations, the dustbin's mass per "
                  "class (of the ground patches) against the class's share of the patches; "
                  "clusters whose strongest patches come from one view only (a failure of "
                  "alignment) and clusters no patch prefers. Percent.")
    if inside.empty:
        table.skipped = ("no run has explain artifacts with cluster assignments (aggregators "
                         "with clusters, run by `benchmark run`).")
        return table
    classes = [c[len("dustbin_on_"):] for c in inside.columns
               if c.startswith("dustbin_on_") and c != "dustbin_on_unmatched"]
    data = _ordered(inside.drop(columns=[c for c in inside.columns if c.startswith("figure_")]),
                    {"method": methods, "train_dataset": None, "test_dataset": None, "seed": None})
    display = pd.DataFrame({
        "method": data["method"],
        "train " + ARROW + " test": [setting(a, b) for a, b in
                                     zip(data["train_dataset"], data["test_dataset"], strict=True)],
        "seed": data["seed"].astype(str), "pairs": data["pairs_measured"].astype(str),
        "R@1": data["R1"].map(fmt),
        "dustbin share": data["dustbin_share"].map(fmt),
        "dustbin on one-view (base, lift)": [
            DASH if not finite(on) else f"{on:.2f} ({base:.2f}, {lift:.2f}x)"
            for on, base, lift in zip(data["dustbin_on_unmatched"], data["unmatched_base_rate"],
                                      data["lift"], strict=True)],
        **{f"dustbin on {c} (patches)": [
            DASH if not finite(on) else f"{on:.2f} ({share:.2f})"
            for on, share in zip(data[f"dustbin_on_{c}"], data[f"patches_{c}"], strict=True)]
           for c in classes},
        "ground-only clusters": data["ground_only_clusters"].map(_cluster_list),
        "aerial-only clusters": data["aerial_only_clusters"].map(_cluster_list),
        "unused clusters": data["unused_clusters"].map(_cluster_list),
    })
    table.data, table.display = data, display
    return table
