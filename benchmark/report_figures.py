"""Reports, step 4: the figures (seaborn on matplotlib's Agg backend, never pyplot).

Heatmaps of the tables, R@K curves per test dataset from the ranks artifacts, and the
training curves (train/loss per step, val R@1 per epoch) from the runs' metric histories.
One colour per method, the same in every figure.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gengeo_bench import tracking
from gengeo_bench.explain_figures import gallery_figure
from gengeo_bench.report_load import ExplainStore, RankStore
from gengeo_bench.report_tables import Table


def safe_name(name: str) -> str:
    """A file or folder name from any label (experiment, dataset)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


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
        name = f"figures/recall_at_k_{safe_name(test)}.png"
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


def inside_figures(inside: pd.DataFrame, folder: Path) -> list[tuple[str, str]]:
    """Each Cell's assignment maps and cluster usage (from its explain artifacts), on its
    training dataset's test split when it was evaluated there, else on its first target."""
    import shutil

    out = []
    if inside.empty:
        return out
    for _, group in inside.groupby("run_id", sort=False):
        home = group[group["test_dataset"] == group["train_dataset"]]
        r = (home if len(home) else group).iloc[0]
        for kind, what in (("assignments", "assignment maps"), ("cluster_usage", "cluster usage")):
            source = r.get(f"figure_{kind}")
            if not isinstance(source, str) or not Path(source).is_file():
                continue
            name = (f"figures/inside_{safe_name(r['method'])}_{safe_name(r['train_dataset'])}_s"
                    f"{r['seed']}_{safe_name(r['test_dataset'])}_{kind}.png")
            shutil.copyfile(source, folder / name)
            out.append((f"Inside {r['method']} (trained on {r['train_dataset']}, seed {r['seed']}, "
                        f"test on {r['test_dataset']}): {what}", name))
    return out


def discordant_galleries(deltas: pd.DataFrame | None, store: ExplainStore, folder: Path,
                         tracking_uri: str, per_side: int = 3) -> tuple[list[tuple[str, str]], list[str]]:
    """A gallery per row of the deltas table (plain protocol): queries the method finds at
    rank 0 and the baseline does not, and the reverse, each with both retrievals. Each is
    also logged to the method's run (`explain/discordant/`). Returns the figures and notes
    on the rows that got none."""
    from gengeo_bench.explain import discordant_rows

    figures, notes = [], []
    if deltas is None or deltas.empty:
        return figures, notes
    plain = deltas[deltas["protocol"] == "none"]
    if not any(store.folder(run_id, test) is not None for run_id, test in
               zip(plain["run_id"], plain["test_dataset"], strict=True)):
        return figures, ["no method run has explain artifacts (explain/<test>/retrieval.npz: "
                         "`benchmark run` writes them), so no discordant query has a gallery."]
    mlclient = tracking.client(tracking_uri)
    for r in plain.itertuples():
        where = f"{r.method} vs {r.baseline} ({r.train_dataset} → {r.test_dataset}, seed {r.seed})"
        a = store.retrieval(r.run_id, r.test_dataset)
        b = store.retrieval(r.baseline_run_id, r.test_dataset)
        if a is None or b is None:
            notes.append(f"{where}: no retrieval artifacts (explain/{r.test_dataset}/retrieval.npz) "
                         f"for {'the method' if a is None else 'the baseline'}.")
            continue
        rows, only_method, only_baseline = discordant_rows(a, b, r.method, r.baseline, per_side)
        if not rows:
            notes.append(f"{where}: no discordant queries.")
            continue
        missing = [p for row in rows for p in [row.query, *(t.path for t in row.tiles), row.gt.path]
                   if not p.is_file()]
        if missing:
            notes.append(f"{where}: the images are not on this machine ({missing[0]} ...).")
            continue
        name = (f"figures/discordant_{safe_name(r.method)}_vs_{safe_name(r.baseline)}_"
                f"{safe_name(r.train_dataset)}_{safe_name(r.test_dataset)}_s{r.seed}.png")
        title = (f"{where}: {only_method} queries only the method finds at rank 0, {only_baseline} "
                 f"only the baseline; up to {per_side} of each, both retrievals")
        gallery_figure(rows, title, folder / name)
        mlclient.log_artifact(r.run_id, str(folder / name), artifact_path="explain/discordant")
        figures.append((f"Discordant queries: {where}", name))
    return figures, notes
