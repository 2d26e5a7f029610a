"""Matrix files, Cell expansion and ids, and the runner against a real MLflow SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_engine import make_noise_cvusa

from gengeo_bench import tracking
from gengeo_bench.cli import main as cli_main
from gengeo_bench.errors import ConfigError
from gengeo_bench.matrix import load_matrix
from gengeo_bench.runner import run_matrix

REPO = Path(__file__).resolve().parents[1]


def matrix_dict(root: Path, **extra) -> dict:
    data = {
        "name": "tiny",
        "defaults": {"train": {"dataset": "noise", "epochs": 2, "batch_size": 8, "val_fraction": 0.25},
                     "evaluate": {"batch_size": 16}},
        "datasets": {"noise": {"name": "cvusa", "root": str(root)}},
        "axes": {
            "backbone": ["dinov2_tiny"],
            "aggregator": [{"name": "gem"},
                           {"name": "salad", "share": "clusters", "num_clusters": 4,
                            "cluster_dim": 8, "token_dim": 8}],
        },
        "evaluate_on": ["noise"],
        "seeds": [0],
    }
    data.update(extra)
    return data


def write(tmp_path: Path, data: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_noise_cvusa(tmp_path / "cvusa")


# --- schema and expansion ------------------------------------------------------------


@pytest.mark.parametrize("change,expected", [
    ({"extra_key": 1}, r"m.yaml: extra_key: unknown key"),
    ({"seeds": ["zero"]}, r"m.yaml: seeds\[0\]: Input should be a valid integer"),
    ({"axes": {"aggregator": []}}, r"m.yaml: axes.aggregator: empty axis"),
    ({"axes": {"aggregator": [{"name": "salat"}]}},
     r"m.yaml: axes.aggregator\[0\]: .*unknown aggregator 'salat'. Did you mean 'salad'\?"),
    ({"axes": {"aggregator": ["gem", {"name": "salad", "dustbin": "maybe"}]}},
     r"m.yaml: axes.aggregator\[1\]: aggregator 'salad': parameter 'dustbin' = 'maybe'"),
    ({"axes": {"aggregator": [{"name": "gem", "share": "clusters"}]}},
     r"m.yaml: axes.aggregator\[0\].share: share = 'clusters' means nothing for aggregator 'gem'"),
    ({"axes": {"colour": ["red"]}}, r"m.yaml: axes.colour: unknown axis"),
    ({"exclude": [{"backbone": "nope"}]}, r"m.yaml: exclude\[0\]: matches no combination"),
    ({"exclude": [{"lr": 1}]}, r"m.yaml: exclude\[0\].lr: not an axis of this matrix"),
    ({"include": [{"colour": "red"}]}, r"m.yaml: include\[0\].colour: unknown axis"),
    ({"datasets": {"noise": {"name": "cvusa", "root": "${NO_SUCH_ROOT_VAR}"}}},
     r"m.yaml: datasets.noise.root: environment variable NO_SUCH_ROOT_VAR is not set"),
    ({"defaults": {"train": {"epochs": "many"}}},
     r"m.yaml: cell .*: train.epochs: Input should be a valid integer"),
    ({"evaluate_on": ["elsewhere"]}, r"dataset 'elsewhere' is not defined"),
])
def test_schema_errors_name_file_and_field(setup, tmp_path, change, expected):
    data = matrix_dict(setup)
    for key, value in change.items():
        if key == "axes":
            data["axes"].update(value)
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=expected):
        load_matrix(write(tmp_path, data))


def test_malformed_yaml_and_cli_exit_status(setup, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\naxes: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_matrix(bad)
    monkeypatch.setattr(sys, "argv", ["benchmark", "run", "--matrix", str(bad)])
    with pytest.raises(SystemExit) as info:
        cli_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "malformed YAML" in err and "Traceback" not in err


def test_expansion_include_exclude_seeds_and_ids(setup, tmp_path):
    data = matrix_dict(setup, seeds=[0, 1])
    data["axes"]["train.lr"] = [1e-4, 1e-3]
    data["exclude"] = [{"aggregator": "gem", "train.lr": 1e-3}]
    data["include"] = [{"backbone": "resnet_tiny", "aggregator": "gem", "train.lr": 1e-4}]
    matrix = load_matrix(write(tmp_path, data))
    # 1 backbone x 2 aggregators x 2 lr - 1 excluded + 1 included, x 2 seeds
    assert len(matrix.cells) == (2 * 2 - 1 + 1) * 2
    assert len({c.id for c in matrix.cells}) == len(matrix.cells)
    assert all(not (c.values["aggregator"] == {"name": "gem"} and c.values["train.lr"] == 1e-3)
               for c in matrix.cells)
    gem = [c for c in matrix.cells if c.cell.model.backbone.name == "resnet_tiny"]
    assert {c.cell.seed for c in gem} == {0, 1}

    # Ids: stable across key order, blind to paths and workers, sensitive to semantics.
    reordered = dict(reversed(list(data.items())))
    reordered["axes"] = dict(reversed(list(data["axes"].items())))
    again = load_matrix(write(tmp_path, reordered, "r.yaml"))
    assert {c.id for c in again.cells} == {c.id for c in matrix.cells}
    moved = dict(data, datasets={"noise": {"name": "cvusa", "root": "/elsewhere"}})
    moved["defaults"] = {**data["defaults"], "train": {**data["defaults"]["train"], "num_workers": 4}}
    moved_ids = {c.id for c in load_matrix(write(tmp_path, moved, "m2.yaml")).cells}
    assert moved_ids == {c.id for c in matrix.cells}
    changed = dict(data)
    changed["defaults"] = {**data["defaults"], "train": {**data["defaults"]["train"], "epochs": 3}}
    assert not {c.id for c in load_matrix(write(tmp_path, changed, "m3.yaml")).cells} & {
        c.id for c in matrix.cells}


def test_shipped_studies_validate(monkeypatch):
    for var in ("CVUSA_ROOT", "CVACT_ROOT", "VIGOR_ROOT"):
        monkeypatch.setenv(var, "/data/x")
    quick = load_matrix(REPO / "studies" / "quickstart.yaml")
    aggregators = {(c.cell.model.aggregator.name, c.cell.model.aggregator.share,
                    c.cell.model.aggregator.params.get("dustbin")) for c in quick.cells}
    assert {a for a, _, _ in aggregators} == {"gem", "netvlad", "salad"}
    assert {(s, d) for a, s, d in aggregators if a == "salad"} == {
        ("none", True), ("none", False), ("clusters", True), ("clusters", False)}
    assert len(quick.cells[0].cell.targets) == 2  # a transfer pair
    assert len(load_matrix(REPO / "studies" / "ablation.yaml").cells) > 50
    assert load_matrix(REPO / "studies" / "transfer.yaml").cells


# --- the runner on a real MLflow SQLite store ------------------------------------------


def _cell_runs(uri: str, name: str):
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(name)
    return tracking.find_runs(client, exp.experiment_id, "cell")


def test_run_skip_and_rerun(setup, tmp_path):
    path = write(tmp_path, matrix_dict(setup))
    outcomes = run_matrix(path, report=False)
    assert [o.status for o in outcomes] == ["done", "done"]
    uri = tracking.tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = _cell_runs(uri, "tiny")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    run = runs[0]
    assert run.data.tags[tracking.ROLE] == "cell" and run.data.tags[tracking.PARENT]
    assert run.data.params["backbone.name"] == "dinov2_tiny"
    assert "test/noise/R1" in run.data.metrics and "train/loss" in run.data.metrics
    assert "val/noise/R1" in run.data.metrics
    client = tracking.client(uri)
    history = client.get_metric_history(run.info.run_id, "val/noise/R1")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cell.yaml", "manifests.json", "environment.json", "ranks"} <= artifacts
    # The UI search from the README works on these params.
    found = client.search_runs([run.info.experiment_id], "params.aggregator.share = 'clusters'")
    assert len(found) == 1

    again = run_matrix(path, report=False)
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert len(_cell_runs(uri, "tiny")) == 2


def test_a_rerun_keeps_a_report_no_run_changed_since(setup, tmp_path, capsys):
    path = write(tmp_path, matrix_dict(setup))
    run_matrix(path)
    index = tmp_path / "reports" / "tiny" / "index.md"
    written = index.stat().st_mtime_ns
    capsys.readouterr()
    run_matrix(path)  # every Cell skipped, no run changed: the report stands
    assert "up to date" in capsys.readouterr().out and index.stat().st_mtime_ns == written
    client = tracking.client(tracking.tracking_uri(None))
    client.delete_run(_cell_runs(tracking.tracking_uri(None), "tiny")[0].info.run_id)
    run_matrix(path)  # a run went away (and its Cell ran again): rewritten
    assert "up to date" not in capsys.readouterr().out and index.stat().st_mtime_ns > written


def test_keep_going_marks_the_failure_and_runs_the_rest(setup, tmp_path):
    data = matrix_dict(setup)
    data["datasets"]["broken"] = {"name": "cvusa", "root": str(tmp_path / "missing")}
    data["axes"]["train_on"] = ["broken", "noise"]
    data.pop("evaluate_on")
    path = write(tmp_path, data)
    outcomes = run_matrix(path, keep_going=True, report=False)
    assert sorted(o.status for o in outcomes) == ["done", "done", "failed", "failed"]
    failed = [r for r in _cell_runs(tracking.tracking_uri(None), "tiny") if r.info.status == "FAILED"]
    assert len(failed) == 2 and "missing" in failed[0].data.tags[tracking.ERROR]
    # Without --keep-going the first failure stops the matrix.
    stopped = run_matrix(path, report=False)
    assert [o.status for o in stopped][-1] == "failed"


def test_sigkill_mid_matrix_then_rerun_finishes_each_cell_once(setup, tmp_path):
    data = matrix_dict(setup)
    data["defaults"]["train"]["epochs"] = 3
    path = write(tmp_path, data)
    env = {**os.environ, "GENGEO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gengeo_bench", "run", "--matrix", str(path),
                             "--no-report"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the second Cell has written a checkpoint (the first one is finished).
    matrix = load_matrix(path)
    second = tmp_path / "runs" / "tiny" / matrix.cells[1].id / "checkpoint.pt"
    deadline = time.time() + 300
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.exists(), "the run ended before the second Cell checkpointed"
    runs = _cell_runs(tracking.tracking_uri(None), "tiny")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "RUNNING"]

    outcomes = run_matrix(path, report=False)
    assert [o.status for o in outcomes] == ["skipped", "done"]
    runs = _cell_runs(tracking.tracking_uri(None), "tiny")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags[tracking.CELL_ID] for r in runs}) == 2


def test_dry_run_lists_cells_and_creates_nothing(setup, tmp_path, capsys):
    path = write(tmp_path, matrix_dict(setup))
    assert run_matrix(path, dry=True) == []
    out = capsys.readouterr().out
    assert "2 Cells" in out and "0 done, 2 to run" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
