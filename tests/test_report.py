"""Reports from a real MLflow SQLite store: tables against known values, figures, index, logging."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param

from gengeo_bench import matrix, metrics, report, report_load, report_stats, report_tables, tracking
from gengeo_bench.errors import ConfigError

EXPERIMENT = "ablation_test"
Q = 40  # queries per test set
K_MAX = 10
TESTS = ("cvact", "cvusa")
PROTOCOLS = ("none", "fov90")
SALAD_NONE = "dinov2_tiny + salad[none, dustbin]"
SALAD_CLUSTERS = "dinov2_tiny + salad[clusters, dustbin]"
SALAD_NO_DUSTBIN = "dinov2_tiny + salad[clusters, no dustbin]"
GEM = "resnet_tiny + gem"

# (backbone, aggregator, share, logged dustbin (None: not logged), train dataset, seed, p):
# p = per-query chance of rank 0 (the better the method, the larger).
CELLS = [
    ("dinov2_tiny", "salad", "none", None, "cvusa", 0, 0.45),
    ("dinov2_tiny", "salad", "none", None, "cvusa", 1, 0.40),
    ("dinov2_tiny", "salad", "none", None, "cvact", 0, 0.35),
    ("dinov2_tiny", "salad", "clusters", "True", "cvusa", 0, 0.70),
    ("dinov2_tiny", "salad", "clusters", "True", "cvusa", 1, 0.65),
    ("dinov2_tiny", "salad", "clusters", "True", "cvact", 0, 0.60),
    ("dinov2_tiny", "salad", "clusters", "False", "cvusa", 0, 0.55),
    ("resnet_tiny", "gem", "none", None, "cvusa", 0, 0.20),
]
STALE = 3  # an older run of CELLS[3] with worse numbers: the newest must win
LABELS = [SALAD_NONE] * 3 + [SALAD_CLUSTERS] * 3 + [SALAD_NO_DUSTBIN, GEM]
IDS = np.array([f"q{i:02d}" for i in range(Q)])


def _ranks(rng: np.random.Generator, p: float) -> np.ndarray:
    return np.where(rng.random(Q) < p, 0, rng.integers(1, K_MAX + 1, Q))


def _cell_id(spec) -> str:
    return "-".join(str(x) for x in spec[:6])


def _params(spec) -> dict[str, str]:
    backbone, aggregator, share, dustbin, train, seed, _ = spec
    params = {"backbone.name": backbone, "aggregator.name": aggregator, "aggregator.share": share,
              "share_backbone": "True", "train.dataset": train, "train.lr": "0.0001",
              "evaluate.on": '["cvusa", "cvact"]', "evaluate.protocols": '["none", "fov:90"]',
              "datasets.cvusa.name": "cvusa", "datasets.cvact.name": "cvact", "seed": str(seed)}
    if dustbin is not None:
        params["aggregator.dustbin"] = dustbin
    return params


def _log_cell(client, exp_id, parent, spec, ranks_by_key, start, tmp, status="FINISHED",
              shuffle=False, params=None, cell_id=None):
    tags = {tracking.ROLE: "cell", tracking.CELL_ID: cell_id or _cell_id(spec), tracking.SEED: str(spec[5]),
            tracking.MATRIX: EXPERIMENT, tracking.PARENT: parent}
    run = client.create_run(exp_id, start_time=start, tags=tags)
    run_id = run.info.run_id
    values = {}
    folder = tmp / run_id / "ranks"
    folder.mkdir(parents=True)
    for (test, protocol), ranks in ranks_by_key.items():
        prefix = f"test/{test}" if protocol == "none" else f"test/{test}/{protocol}"
        for k in (1, 5, 10):
            values[f"{prefix}/R{k}"] = metrics.recall_at(ranks, k)
            lo, hi = metrics.bootstrap_ci(ranks < k)
            values[f"{prefix}/R{k}_ci_low"], values[f"{prefix}/R{k}_ci_high"] = lo, hi
        values[f"{prefix}/queries_evaluated"] = values[f"{prefix}/queries_total"] = float(Q)
        order = np.random.default_rng(7).permutation(Q) if shuffle else np.arange(Q)
        np.savez_compressed(folder / (prefix.replace("/", "__") + ".npz"), ranks=ranks[order],
                            query_index=order, query_ids=IDS[order])
    batch = [Metric(key, value, start, 0) for key, value in values.items()]
    batch += [Metric("train/loss", 2.0 - 0.1 * step, start, step) for step in range(5)]
    batch += [Metric(f"val/{spec[4]}/R1", 10.0 * epoch + spec[6], start, epoch) for epoch in range(3)]
    params = [Param(k, v) for k, v in {**_params(spec), **(params or {})}.items()]
    client.log_batch(run_id, metrics=batch, params=params)  # one transaction: a fast fixture
    client.log_artifacts(run_id, str(folder), artifact_path="ranks")
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with a parent run and the cells above (plus a stale and a failed run)."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, EXPERIMENT, uri)
    parent = client.create_run(exp_id, tags={tracking.ROLE: "matrix", tracking.MATRIX: EXPERIMENT})
    parent_id = parent.info.run_id
    rng = np.random.default_rng(0)
    now = int(time.time() * 1000)
    truth: dict = {}
    stale = CELLS[STALE]
    _log_cell(client, exp_id, parent_id, stale,
              {(t, p): np.full(Q, K_MAX) for t in TESTS for p in PROTOCOLS}, now - 10_000, tmp)
    for i, spec in enumerate(CELLS):
        ranks = {(t, p): _ranks(rng, spec[6] * (0.5 if p == "fov90" else 1.0))
                 for t in TESTS for p in PROTOCOLS}
        truth[i] = ranks
        _log_cell(client, exp_id, parent_id, spec, ranks, now + 1000 * i, tmp, shuffle=i % 2 == 1)
    failed = ("resnet_tiny", "gem", "none", None, "cvact", 0, 0.9)
    _log_cell(client, exp_id, parent_id, failed,
              {(t, p): _ranks(rng, 0.9) for t in TESTS for p in PROTOCOLS}, now + 20_000, tmp,
              status="FAILED")
    # A second experiment with a single cell: most tables have nothing to compare.
    small_id = tracking.experiment_id(client, "single", uri)
    _log_cell(client, small_id, "", CELLS[0], {("cvusa", "none"): _ranks(rng, 0.5)}, now, tmp)
    # Two gem cells that differ in the learning rate, and a third that differs from the
    # first only in what it evaluates on (same method: the newer one counts).
    lrs_id = tracking.experiment_id(client, "lrs", uri)
    gem = CELLS[7]
    for i, (lr, on) in enumerate((("0.001", '["cvusa"]'), ("0.01", '["cvusa"]'),
                                  ("0.001", '["cvusa", "cvact"]'))):
        _log_cell(client, lrs_id, "", gem, {("cvusa", "none"): np.full(Q, i)}, now + i, tmp,
                  params={"train.lr": lr, "evaluate.on": on}, cell_id=f"lr{i}")
    client.set_terminated(parent_id)
    baseline = {"aggregator.name": "salad", "aggregator.share": "none"}
    out = report.write_report(uri, EXPERIMENT, tmp / "reports", baseline=baseline,
                              parent_run_id=parent_id)
    return {"uri": uri, "client": client, "parent": parent_id, "truth": truth, "out": out,
            "tmp": tmp}


def _r1(truth, i, test, protocol="none"):
    return metrics.recall_at(truth[i][(test, protocol)], 1)


def _csv(store, name):
    return pd.read_csv(store["out"] / f"{name}.csv")


def test_load_runs_derived_columns_newest_wins_and_failed_left_out(store):
    runs = report_load.load_runs(store["uri"], EXPERIMENT)
    assert len(runs) == len(CELLS)
    assert sorted(runs["method"]) == sorted(LABELS)
    row = runs.set_index("cell_id").loc[_cell_id(CELLS[0])]
    assert (row["backbone"], row["aggregator"], row["share"]) == ("dinov2_tiny", "salad", "none")
    assert row["dustbin"] is True  # not logged: SALAD's registry default
    assert row["train_dataset"] == "cvusa" and row["seed"] == 0
    gem = runs.set_index("cell_id").loc[_cell_id(CELLS[7])]
    assert gem["dustbin"] is None and gem["method"] == GEM
    assert runs.set_index("cell_id").loc[_cell_id(CELLS[6]), "dustbin"] is False
    # The stale run of CELLS[3] logged R1 = 0 everywhere; the newest one is kept.
    newest = runs.set_index("cell_id").loc[_cell_id(CELLS[3]), "metrics.test/cvact/R1"]
    assert newest == pytest.approx(_r1(store["truth"], 3, "cvact")) and newest > 0
    assert "cvact" not in set(runs.loc[runs["backbone"] == "resnet_tiny", "train_dataset"])


def test_method_label_names_other_differing_params(store):
    runs = report_load.load_runs(store["uri"], "lrs")
    assert len(runs) == 3
    assert sorted(set(runs["method"])) == [f"{GEM} (train.lr=0.001)", f"{GEM} (train.lr=0.01)"]
    assert set(runs["aggregator_label"]) == {"gem (train.lr=0.001)", "gem (train.lr=0.01)"}
    results = report_load.results_long(runs)
    assert len(results) == 2  # the two lr=0.001 cells are one method: the newer one counts
    newest = results.set_index("method").loc[f"{GEM} (train.lr=0.001)", "R1"]
    assert newest == 0.0  # its ranks are all 2 (the older one's are all 0)
    assert report_load.aggregator_label("salad", "clusters", False) == "salad[clusters, no dustbin]"
    assert report_load.aggregator_label("netvlad", "all", None) == "netvlad[all]"
    assert report_load.aggregator_label("gem", "none", None) == "gem"


def test_transfer_table_means_stds_and_intervals(store):
    truth = store["truth"]
    data = _csv(store, "transfer").set_index(["method", "train_dataset", "test_dataset"])
    # two seeds: mean and sample std of the two R@1
    for test in TESTS:
        r = [_r1(truth, 0, test), _r1(truth, 1, test)]
        row = data.loc[(SALAD_NONE, "cvusa", test)]
        assert row["R1_mean"] == pytest.approx(np.mean(r))
        assert row["R1_std"] == pytest.approx(np.std(r, ddof=1))
        assert row["n_seeds"] == 2
        assert row["R1_ci_source"] == "query bootstrap of seed-averaged hits"
        hits = np.stack([truth[i][(test, "none")] < 1 for i in (0, 1)])
        lo, hi = report_stats.seed_bootstrap_ci(hits)
        assert (row["R1_ci_low"], row["R1_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert lo <= row["R1_mean"] <= hi
    # one seed: no std, the logged interval
    row = data.loc[(SALAD_CLUSTERS, "cvact", "cvusa")]
    assert row["R1_mean"] == pytest.approx(_r1(truth, 5, "cvusa"))
    assert np.isnan(row["R1_std"]) and row["n_seeds"] == 1
    lo, hi = metrics.bootstrap_ci(truth[5][("cvusa", "none")] < 1)
    assert (row["R1_ci_low"], row["R1_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    # only rows that were run: gem was trained on cvusa only (its cvact run failed)
    assert (GEM, "cvact", "cvusa") not in data.index and (GEM, "cvusa", "cvact") in data.index
    md = (store["out"] / "transfer.md").read_text()
    mean, std = np.mean([_r1(truth, 0, "cvact"), _r1(truth, 1, "cvact")]), np.std(
        [_r1(truth, 0, "cvact"), _r1(truth, 1, "cvact")], ddof=1)
    assert f"{mean:.2f} ± {std:.2f} [" in md
    assert "| method | train \\ test | cvact | cvusa |" in md


def test_seed_interval_does_not_shrink_for_duplicated_seeds():
    rng = np.random.default_rng(3)
    hits = rng.random(400) < 0.6
    one = report_stats.seed_bootstrap_ci(hits[None])
    same = report_stats.seed_bootstrap_ci(np.stack([hits, hits, hits]))
    pooled = metrics.bootstrap_ci(np.concatenate([hits, hits, hits]))
    width = one[1] - one[0]
    assert (same[1] - same[0]) == pytest.approx(width, rel=0.15)
    assert (pooled[1] - pooled[0]) < 0.75 * width  # what pooling as independent queries gives
    ref = metrics.bootstrap_ci(hits)
    assert one == (pytest.approx(ref[0], abs=1.5), pytest.approx(ref[1], abs=1.5))


def test_ablation_table_rows_and_columns(store):
    data = _csv(store, "ablation")
    rows = list(dict.fromkeys(zip(data["backbone"], data["aggregator"], data["share"],
                                  data["dustbin"], strict=True)))
    assert rows == [("dinov2_tiny", "salad", "none", "on"), ("dinov2_tiny", "salad", "clusters", "on"),
                    ("dinov2_tiny", "salad", "clusters", "off")]
    md = (store["out"] / "ablation.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| backbone"))
    assert header == ("| backbone | aggregator | share | dustbin | cvact→cvact | cvact→cvusa "
                      "| cvusa→cvact | cvusa→cvusa |")
    off = data[(data["dustbin"] == "off") & (data["test_dataset"] == "cvact")]
    assert len(off) == 1 and off["R1_mean"].iloc[0] == pytest.approx(_r1(store["truth"], 6, "cvact"))
    no_cvact_training = [line for line in md if "| off |" in line][0]
    assert no_cvact_training.count("—") == 2  # the no-dustbin cell was only trained on cvusa


def test_backbone_aggregator_table(store):
    data = _csv(store, "backbone_aggregator")
    sub = data[(data["train_dataset"] == "cvusa") & (data["test_dataset"] == "cvusa")]
    got = {(b, a): v for b, a, v in zip(sub["backbone"], sub["aggregator"], sub["R1_mean"], strict=True)}
    assert got[("resnet_tiny", "gem")] == pytest.approx(_r1(store["truth"], 7, "cvusa"))
    assert got[("dinov2_tiny", "salad[clusters, no dustbin]")] == pytest.approx(
        _r1(store["truth"], 6, "cvusa"))
    assert len(got) == 4
    md = (store["out"] / "backbone_aggregator.md").read_text()
    assert ("| train → test | backbone | gem | salad[none, dustbin] | salad[clusters, dustbin] "
            "| salad[clusters, no dustbin] |") in md


def test_robustness_table(store):
    data = _csv(store, "robustness")
    assert set(data["protocol"]) == {"none", "fov90"}
    row = data[(data["method"] == GEM) & (data["protocol"] == "fov90")
               & (data["train_dataset"] == "cvusa") & (data["test_dataset"] == "cvact")]
    assert row["R1_mean"].iloc[0] == pytest.approx(_r1(store["truth"], 7, "cvact", "fov90"))
    md = (store["out"] / "robustness.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| train"))
    methods = " | ".join([SALAD_NONE, SALAD_CLUSTERS, SALAD_NO_DUSTBIN, GEM])
    assert header == f"| train → test | protocol | {methods} |"
    protocols = [line.split("|")[2].strip() for line in md if line.startswith("| cvusa→cvact")]
    assert protocols == ["none", "fov90"]


def test_baseline_matches_the_dustbin_default(store):
    runs = report_load.load_runs(store["uri"], EXPERIMENT)
    mask, why = report_stats.baseline_mask(runs, {"aggregator.name": "salad", "aggregator.share": "none",
                                            "aggregator.dustbin": "True"})
    assert not why and sorted(runs.loc[mask, "method"]) == [SALAD_NONE] * 3  # dustbin not logged
    mask, _ = report_stats.baseline_mask(runs, {"aggregator.dustbin": "false"})
    assert list(runs.loc[mask, "method"]) == [SALAD_NO_DUSTBIN]


def test_deltas_match_direct_mcnemar(store):
    truth = store["truth"]
    data = _csv(store, "deltas").set_index(["method", "train_dataset", "seed", "test_dataset",
                                            "protocol"])
    assert set(data.reset_index()["method"]) == {SALAD_CLUSTERS, SALAD_NO_DUSTBIN, GEM}
    assert set(data["baseline"]) == {SALAD_NONE}
    # (method cell, its baseline cell) on the same training dataset and seed
    for mine, base in ((3, 0), (4, 1), (5, 2), (6, 0), (7, 0)):
        spec = CELLS[mine]
        for test in TESTS:
            for protocol in PROTOCOLS:
                a, b = truth[mine][(test, protocol)], truth[base][(test, protocol)]
                row = data.loc[(LABELS[mine], spec[4], spec[5], test, protocol)]
                assert row["delta_R1"] == pytest.approx(metrics.recall_at(a, 1) - metrics.recall_at(b, 1))
                direct = metrics.mcnemar(a < 1, b < 1)
                assert row["p_value"] == pytest.approx(direct["p_value"])
                assert (row["only_method"], row["only_baseline"]) == (direct["only_a"], direct["only_b"])
                assert row["queries_paired"] == Q


def test_csv_round_trips_the_markdown_numbers(store):
    data = _csv(store, "results")
    md = (store["out"] / "results.md").read_text()
    for r in data.itertuples():
        assert report_tables.fmt(r.R1_mean, r.R1_std, r.R1_ci_low, r.R1_ci_high) in md
    again = pd.read_csv(store["out"] / "results.csv")
    again.to_csv(store["tmp"] / "again.csv", index=False)
    pd.testing.assert_frame_equal(pd.read_csv(store["tmp"] / "again.csv"), data)
    runs = _csv(store, "runs")
    assert len(runs) == len(CELLS) * len(TESTS) * len(PROTOCOLS)
    tex = (store["out"] / "transfer.tex").read_text()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "dinov2\\_tiny" in tex


def test_figures_are_valid_pngs(store):
    from PIL import Image

    names = {p.name for p in (store["out"] / "figures").glob("*.png")}
    assert {"transfer.png", "ablation.png", "backbone_aggregator.png", "robustness.png",
            "deltas.png", "recall_at_k_cvact.png", "recall_at_k_cvusa.png",
            "training_curves.png"} <= names
    for name in names:
        path = store["out"] / "figures" / name
        assert path.stat().st_size > 1000
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"


def test_index_links_every_file(store):
    out = store["out"]
    text = (out / "index.md").read_text()
    links = set(re.findall(r"\]\(([^)]+)\)", text))
    for link in links:
        assert (out / link).is_file(), link
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"index.md"}
    assert files <= links
    assert EXPERIMENT in text and store["uri"] in text and f"{len(CELLS)} finished cells" in text


def test_report_logged_to_parent_run(store):
    client = store["client"]
    listed = {a.path for a in client.list_artifacts(store["parent"], "report")}
    assert {"report/index.md", "report/transfer.csv", "report/figures"} <= listed
    figures = {a.path for a in client.list_artifacts(store["parent"], "report/figures")}
    assert "report/figures/transfer.png" in figures


def test_single_cell_experiment_skips_tables_with_reasons(store):
    out = report.write_report(store["uri"], "single", store["tmp"] / "reports",
                              baseline={"aggregator.name": "salad"})
    text = (out / "index.md").read_text()
    for title in ("Cross-dataset transfer", "Sharing x dustbin", "Backbone x aggregator",
                  "Robustness protocols", "Deltas against the baseline"):
        assert re.search(rf"\*\*{re.escape(title)}[^*]*\*\*: skipped: \S", text), title
    assert (out / "results.csv").is_file() and not (out / "transfer.csv").exists()
    data = pd.read_csv(out / "results.csv")
    assert len(data) == 1 and data["R1_ci_source"].iloc[0] == "logged (query bootstrap)"


def test_unknown_baseline_key_is_explained(store):
    out = report.write_report(store["uri"], "single", store["tmp"] / "reports_b",
                              baseline={"aggregator.shared": "none"})
    assert "baseline key 'aggregator.shared' is not a logged param" in (out / "index.md").read_text()


def test_unknown_experiment_and_no_finished_runs(store):
    with pytest.raises(ConfigError, match="no experiment named 'nope'.*benchmark run"):
        report_load.load_runs(store["uri"], "nope")
    client = store["client"]
    exp_id = tracking.experiment_id(client, "empty", store["uri"])
    run = client.create_run(exp_id, tags={tracking.ROLE: "cell", tracking.CELL_ID: "x"})
    client.set_terminated(run.info.run_id, "FAILED")
    with pytest.raises(ConfigError, match="no finished cell runs"):
        report.write_report(store["uri"], "empty", store["tmp"] / "reports")


def test_baseline_params_from_axis_style():
    assert matrix.baseline_params({"aggregator": {"name": "salad", "share": "none"}}) == {
        "aggregator.name": "salad", "aggregator.share": "none"}
    assert matrix.baseline_params({"backbone": "dinov2_tiny", "aggregator.dustbin": False,
                                   "train": {"lr": 0.001}}) == {
        "backbone.name": "dinov2_tiny", "aggregator.dustbin": "False", "train.lr": "0.001"}
    assert matrix.baseline_params({"model": {"aggregator": "gem"}}) == {"aggregator.name": "gem"}
    assert matrix.baseline_params({"train_on": "city", "share_backbone": False}) == {
        "train.dataset": "city", "share_backbone": "False"}
    assert matrix.baseline_params(yaml.safe_load(
        "{aggregator: {name: salad, share: none, dustbin: true}}")) == {
        "aggregator.name": "salad", "aggregator.share": "none", "aggregator.dustbin": "True"}
    with pytest.raises(ConfigError, match="expected a mapping"):
        matrix.baseline_params(["salad"])


def test_report_command_reads_name_and_baseline(tmp_path, monkeypatch):
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({"name": "abl", "baseline": {
        "aggregator": {"name": "salad", "share": "none"}}}))
    calls = []
    monkeypatch.setattr(report, "write_report",
                        lambda *a, **k: calls.append((a, k)) or Path("x"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert report.report_command_impl(str(matrix), None, "out", None) == Path("x")
    (uri, experiment, reports_dir), kwargs = calls[0]
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and experiment == "abl"
    assert reports_dir == Path("out")
    assert kwargs["baseline"] == {"aggregator.name": "salad", "aggregator.share": "none"}
    report.report_command_impl(None, "other", "out", "sqlite:///x.db")
    assert calls[1][0][:2] == ("sqlite:///x.db", "other") and calls[1][1]["baseline"] is None
    with pytest.raises(ConfigError, match="matrix file .* or --experiment"):
        report.report_command_impl(None, None, "out", None)
    (tmp_path / "bad.yaml").write_text("axes: {}\n")
    with pytest.raises(ConfigError, match="name: required"):
        report.report_command_impl(str(tmp_path / "bad.yaml"), None, "out", None)
