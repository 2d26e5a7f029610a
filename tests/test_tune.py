"""Optuna studies: study files, trials as Cells, MLflow children, pruning, failures, workers.

Every test runs on a real SQLite Optuna storage and a real MLflow SQLite store in
tmp_path. The MLflow store is migrated once per session and copied (migrating a new
SQLite store takes seconds). The end-to-end tests run the real engine on a tiny
learnable CVUSA-layout folder; the pruning, crash and retry tests replace `run_cell` with
a fake that reports chosen per-epoch values through the same `on_epoch` hook.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_engine import cell_dict, make_noise_cvusa

from gengeo_bench import tracking
from gengeo_bench import tune as tuning
from gengeo_bench.config import load_cell
from gengeo_bench.engine import CellResult
from gengeo_bench.errors import ConfigError
from gengeo_bench.train import TrainOutcome

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    tracking.client(f"sqlite:///{path}")
    return path


@pytest.fixture()
def work(tmp_path, monkeypatch, mlflow_template):
    """cwd = tmp_path with an empty MLflow store, a private cache and a tiny dataset."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    make_noise_cvusa(tmp_path / "cvusa", n_train=24, n_test=8)
    return tmp_path


def write_study(dir_: Path, name: str = "tiny", **fields) -> Path:
    base = cell_dict(dir_ / "cvusa", epochs=1, steps_per_epoch=2, batch_size=8)
    base["evaluate"]["batch_size"] = 32
    study = {
        "name": name,
        "base": base,
        "space": {"train.lr": {"float": [1.0e-5, 1.0e-3], "log": True},
                  "model.aggregator.num_clusters": {"categorical": [2, 4]}},
        "objective": {"metric": "val/noise/R1"},
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": 3,
        **fields,
    }
    path = dir_ / f"{name}_hpo.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def mlflow_runs(name: str, role: str, uri: str | None = None) -> list:
    uri = uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else tracking.find_runs(client, exp.experiment_id, role)


def storage_study(name: str = "tiny", url: str = "sqlite:///optuna.db") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


# --- end to end on the real engine -----------------------------------------------------


@pytest.mark.slow
def test_study_runs_trials_as_mlflow_children_resumes_reports_and_exports(work):
    path = write_study(work)
    first = tuning.tune(path, n_trials=2, device="cpu")
    assert first.ran == 2
    study = storage_study()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2

    children = mlflow_runs("tiny", "trial")
    parents = mlflow_runs("tiny", "study")
    assert len(children) == 2 and len(parents) == 1
    for run in children:
        trial = study.trials[int(run.data.tags[tracking.TRIAL])]
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.PARENT] == parents[0].info.run_id
        assert run.data.tags[tracking.STUDY] == "tiny"
        assert run.data.tags[tracking.CELL_ID] == trial.user_attrs[tuning.CELL_ID]
        assert run.data.tags[tracking.SEED] == "3"
        # params are the flattened Cell, holding the sampled values
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        clusters = trial.params["model.aggregator.num_clusters"]
        assert run.data.params["aggregator.num_clusters"] == str(clusters)
        assert run.data.params["backbone.name"] == "dinov2_tiny"
        assert {"val/noise/R1", "test/noise/R1", "train/loss", "objective"} <= set(run.data.metrics)
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        assert (work / "runs" / "tiny" / f"trial-{trial.number}" / "best.pt").is_file()

    # Again without --n-trials: continues to the study's total (3), then reports and exports.
    second = tuning.tune(path, device="cpu", report=True, export=work / "best.yaml")
    assert second.ran == 1
    assert len(storage_study().trials) == 3
    assert len(mlflow_runs("tiny", "trial")) == 3 and len(mlflow_runs("tiny", "study")) == 2
    assert tuning.tune(path, device="cpu").ran == 0  # the budget is spent

    report = work / "reports" / "tiny"
    for name in ("best.md", "best.json", "trials.csv", "trials.md", "optimization_history.png",
                 "parallel_coordinate.png", "slice.png"):
        assert (report / name).is_file(), name
    best = storage_study().best_trial
    assert f"trial {best.number}" in (report / "best.md").read_text()
    assert "train.lr" in (report / "trials.csv").read_text().splitlines()[0]

    exported = load_cell(work / "best.yaml")  # what `benchmark train best.yaml` reads
    assert exported.id == best.user_attrs[tuning.CELL_ID]
    assert exported.train.lr == pytest.approx(best.params["train.lr"])


@pytest.mark.slow
def test_two_worker_processes_share_one_study_without_running_a_trial_twice(work):
    path = write_study(work, n_trials=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENGEO_CACHE": str(work / "cache")}
    command = [sys.executable, "-m", "gengeo_bench", "tune", "--study", str(path), "--device", "cpu"]
    workers = [subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = storage_study().trials
    assert len(trials) == 3, outputs  # the budget is not overshot
    assert all(t.state == TrialState.COMPLETE for t in trials)
    children = mlflow_runs("tiny", "trial")
    numbers = sorted(int(r.data.tags[tracking.TRIAL]) for r in children)
    assert numbers == [0, 1, 2]  # every trial ran exactly once
    assert len({t.user_attrs[tuning.WORKDIR] for t in trials}) == 3


# --- pruning, crashes, retries (a fake engine behind the same on_epoch hook) ------------


def fake_engine(monkeypatch, scores: dict[int, list[float] | BaseException], calls: list | None = None):
    """run_cell stand-in: the trial in runs/.../trial-N reports scores[N] as its per-epoch
    val R@1 (or raises); `calls` collects the work folders it was given."""

    def run_cell(cell, workdir, device=None, log_metrics=None, resume=True, use_cache=True,
                 on_epoch=None):
        number = int(Path(workdir).name.split("-")[1])
        if calls is not None:
            calls.append(Path(workdir).name)
        plan = scores.get(number, [50.0, 50.0, 50.0])
        if isinstance(plan, BaseException):
            raise plan
        history = []
        for epoch, score in enumerate(plan, start=1):
            history.append({"epoch": epoch, "train_loss": 1.0, "val_R1": score})
            log_metrics({"train/loss": 1.0}, epoch)
            log_metrics({f"val/{cell.train.dataset}/R1": score}, epoch)
            on_epoch(history[-1])
        best = max(range(len(plan)), key=lambda i: plan[i])
        outcome = TrainOutcome(len(plan), best + 1, plan[best], history)
        return CellResult(cell.id, {f"test/{cell.train.dataset}/R1": plan[best] / 2}, outcome)

    monkeypatch.setattr(tuning, "run_cell", run_cell)


def test_pruner_stops_a_bad_trial_and_a_crash_is_recorded_while_the_study_goes_on(work, monkeypatch):
    path = write_study(work, n_trials=5, pruner={"name": "median", "n_startup_trials": 2,
                                                 "n_warmup_steps": 0})
    fake_engine(monkeypatch, {0: [40.0, 50.0, 60.0], 1: [40.0, 50.0, 60.0], 2: [1.0, 2.0, 3.0],
                              3: RuntimeError("boom: CUDA fell over"), 4: [45.0, 55.0, 65.0]})
    outcome = tuning.tune(path)
    trials = storage_study().trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.FAIL, TrialState.COMPLETE]
    assert outcome.ran == 5
    assert trials[2].intermediate_values == {1: 1.0}  # stopped after its first epoch
    assert trials[0].value == 60.0  # the objective is the best val R@1 over epochs
    assert "boom" in trials[3].user_attrs[tuning.ERROR]

    runs = {int(r.data.tags[tracking.TRIAL]): r for r in mlflow_runs("tiny", "trial")}
    assert [runs[n].info.status for n in range(5)] == ["FINISHED", "FINISHED", "KILLED", "FAILED",
                                                      "FINISHED"]
    assert "boom: CUDA fell over" in runs[3].data.tags[tracking.ERROR]
    assert tracking.ERROR not in runs[2].data.tags
    assert runs[0].data.metrics["val/noise/R1"] == 60.0  # the last logged epoch


def test_trial_of_a_dead_worker_is_requeued_and_resumes_in_its_folder(work, monkeypatch):
    path = write_study(work, n_trials=2)
    study = tuning.load_study(path)
    optuna_study = tuning.open_optuna_study(study)
    # A worker on this machine created trial 0 and died.
    orphan = optuna_study.ask()
    tuning.suggest_cell(study, orphan)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan.set_user_attr(tuning.WORKDIR, str(work / "runs" / "tiny" / "trial-0"))
    orphan.set_user_attr(tuning.WORKER, f"{socket.gethostname()}:{gone.pid}")
    calls: list = []
    fake_engine(monkeypatch, {}, calls)
    tuning.tune(path)
    trials = storage_study().trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the retry has the orphan's values
    assert calls == ["trial-0", "trial-2"]  # ... and trains in the orphan's folder (resumes)
    assert trials[1].user_attrs[tuning.WORKDIR].endswith("trial-0")
    assert tuning.budget_used(storage_study()) == 2


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes_the_interrupted_trial(work, monkeypatch):
    path = write_study(work, n_trials=2)
    calls: list = []
    fake_engine(monkeypatch, {1: KeyboardInterrupt()}, calls)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(path)
    runs = {int(r.data.tags[tracking.TRIAL]): r for r in mlflow_runs("tiny", "trial")}
    assert runs[1].info.status == "KILLED"
    assert mlflow_runs("tiny", "study")[0].info.status == "KILLED"
    assert [t.state for t in storage_study().trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                                         TrialState.WAITING]
    fake_engine(monkeypatch, {}, calls)
    assert tuning.tune(path).ran == 1  # the re-queued trial, and the budget (2) is spent
    trials = storage_study().trials
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == trials[1].params
    assert calls == ["trial-0", "trial-1", "trial-1"]


def test_stale_heartbeat_trial_from_another_machine_is_retried(work, monkeypatch):
    path = write_study(work, n_trials=1, heartbeat={"interval": 1, "grace_period": 1})
    study = tuning.load_study(path)
    optuna_study = tuning.open_optuna_study(study)
    orphan = optuna_study.ask()
    tuning.suggest_cell(study, orphan)
    orphan.set_user_attr(tuning.WORKER, "elsewhere:1")
    optuna_study._storage.record_heartbeat(orphan._trial_id)
    import time

    time.sleep(2.1)
    fake_engine(monkeypatch, {})
    tuning.tune(path)
    trials = storage_study().trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params


def test_journal_storage_and_n_trials_override(work, monkeypatch):
    fake_engine(monkeypatch, {})
    path = write_study(work, n_trials=1, storage="journal:studies.log")
    assert tuning.tune(path, n_trials=2).ran == 2  # --n-trials: N more, past the file's total
    study = storage_study("tiny", optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / "studies.log"))))
    assert len(study.trials) == 2
    # different values in each trial although every trial's sampler has the same base seed
    assert study.trials[0].params != study.trials[1].params


# --- the study file ---------------------------------------------------------------------


@pytest.mark.parametrize("space, expected", [
    ({"modle.lr": {"float": [0.1, 0.2]}}, "space.modle.lr: unknown field 'modle'"),
    ({"train.lrr": {"float": [0.1, 0.2]}}, "space.train.lrr: unknown field of train. Did you mean 'lr'"),
    ({"model.aggregator.num_cluster": {"categorical": [2]}},
     "space.model.aggregator.num_cluster: aggregator 'salad' has no parameter 'num_cluster'. "
     "Did you mean 'num_clusters'"),
    ({"model.aggregator.name": {"categorical": ["salad", "vlad"]}},
     "space.model.aggregator.name.categorical[1]: unknown aggregator 'vlad'"),
    ({"datasets.other.root": {"categorical": ["/x"]}}, "dataset key 'other' is not defined"),
    ({"train.lr": {"float": [1.0e-3, 1.0e-5]}}, "space.train.lr.float: empty range"),
    ({"train.lr": {"float": [0.0, 1.0e-3], "log": True}}, "space.train.lr.log: a log range needs positive"),
    ({"train.batch_size": {"int": [8, 8]}}, "space.train.batch_size.int: empty range"),
    ({"model.aggregator.num_clusters": {"categorical": []}},
     "space.model.aggregator.num_clusters.categorical: expected a non-empty list"),
    ({"train.lr": {"uniform": [0.1, 0.2]}}, "space.train.lr.uniform: unknown key"),
    ({"train.lr": [0.1, 0.2]}, "space.train.lr: expected a mapping"),
    ({"train.epochs": {"int": [0, 4], "when": {"train.nope": 1}}},
     "space.train.epochs.when.train.nope: this field is neither searched"),
    ({"train.batch_size": {"int": [1, 8]}},
     "base: train.batch_size: Input should be greater than or equal to 2"),
    ({"model.aggregator.num_clusters": {"categorical": [2, "many"]}}, "parameter 'num_clusters' = 'many'"),
])
def test_search_space_errors_name_the_file_and_the_field(work, space, expected):
    path = write_study(work, space=space)
    with pytest.raises(ConfigError) as err:
        tuning.load_study(path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("fields, expected", [
    ({"objective": {"metric": "test/cvact/R1"}}, "objective.metric: 'test/cvact/R1' is not evaluated"),
    ({"objective": {"metric": "val/noise/R5"}}, "objective.metric: the validation metric is val/noise/R1"),
    ({"objective": {"metric": "val/noise/R1", "direction": "minimize"}}, "pruner.name: pruners read"),
    ({"sampler": {"name": "tpe", "n_startup_trial": 3}}, "sampler.n_startup_trial: TPESampler has no option"),
    ({"sampler": {"name": "grid"}}, "space.train.lr: the grid sampler needs a finite list"),
    ({"pruner": {"name": "median", "warmup": 1}}, "pruner.warmup: MedianPruner has no option"),
    ({"n_trials": 0}, "n_trials: Input should be greater than or equal to 1"),
    ({"nam": "x"}, "nam: unknown key"),
])
def test_study_file_errors(work, fields, expected):
    if fields.get("objective", {}).get("direction") == "minimize":
        fields["pruner"] = {"name": "median"}
    path = write_study(work, **fields)
    with pytest.raises(ConfigError) as err:
        tuning.load_study(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_conditional_space_switches_plugins(work):
    space = {"model.aggregator.name": {"categorical": ["gem", "salad"]},
             "model.aggregator.num_clusters": {"categorical": [2, 4],
                                               "when": {"model.aggregator.name": "salad"}},
             "model.aggregator.share": {"categorical": ["none", "all"]}}
    study = tuning.load_study(write_study(work, space=space))
    assert [p.path for p in study.space][0] == "model.aggregator.name"
    gem, values = tuning.suggest_cell(study, optuna.trial.FixedTrial(
        {"model.aggregator.name": "gem", "model.aggregator.num_clusters": 4,
         "model.aggregator.share": "all"}))
    # salad's parameters are dropped; gem's own defaults are filled in
    assert gem.model.aggregator.name == "gem"
    assert gem.model.aggregator.params == {"p": 3.0, "eps": 1e-6, "whiten": None}
    assert "model.aggregator.num_clusters" not in values
    salad, values = tuning.suggest_cell(study, optuna.trial.FixedTrial(
        {"model.aggregator.name": "salad", "model.aggregator.num_clusters": 4,
         "model.aggregator.share": "none"}))
    assert salad.model.aggregator.params["num_clusters"] == 4 and values["model.aggregator.num_clusters"] == 4
    assert salad.model.aggregator.params["cluster_dim"] == 8  # kept from the base


def test_base_picked_from_a_matrix_file(work):
    matrix = {
        "name": "m",
        "defaults": {"train": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 2}},
        "datasets": {"noise": {"name": "cvusa", "root": str(work / "cvusa")}},
        "axes": {"backbone": [{"name": "dinov2_tiny"}],
                 "aggregator": [{"name": "gem"},
                                {"name": "salad", "num_clusters": 4, "cluster_dim": 8, "token_dim": 8}],
                 "train_on": ["noise"]},
    }
    (work / "m.yaml").write_text(yaml.safe_dump(matrix))
    path = write_study(work, base={"matrix": str(work / "m.yaml"), "select": {"aggregator": "salad"}})
    study = tuning.load_study(path)
    assert study.base["model"]["aggregator"]["name"] == "salad"
    path = write_study(work, base={"matrix": str(work / "m.yaml"), "select": {"aggregator": "netvlad"}})
    with pytest.raises(ConfigError, match="base.select: no Cell"):
        tuning.load_study(path)


def test_shipped_studies_validate(monkeypatch):
    quick = tuning.load_study(REPO / "studies" / "quickstart_hpo.yaml")
    assert quick.metric == "val/city/R1" and quick.n_trials >= 4
    monkeypatch.setenv("CVUSA_ROOT", "/data/CVUSA")
    monkeypatch.setenv("CVACT_ROOT", "/data/CVACT")
    salad = tuning.load_study(REPO / "studies" / "salad_hpo.yaml")
    assert salad.metric == "test/cvact/R1"
    assert {p.path for p in salad.space} == {"train.lr", "train.temperature",
                                             "model.aggregator.num_clusters",
                                             "model.backbone.trainable_blocks"}


def test_cli_unset_environment_variable_is_exit_2_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CVUSA_ROOT", "CVACT_ROOT")}
    proc = subprocess.run([sys.executable, "-m", "gengeo_bench", "tune", "--study",
                           str(REPO / "studies" / "salad_hpo.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "environment variable CVUSA_ROOT is not set" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists()  # nothing started


def test_current_optuna_and_mlflow_releases_are_supported():
    """Optuna 5 (September 2026) and MLflow 3 are what a fresh install takes."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted = {Requirement(r).name: Requirement(r) for r in metadata.requires("gengeo-bench")
              if "extra ==" not in r}
    assert "5.0.0" in wanted["optuna"].specifier and "3.17.2" in wanted["mlflow"].specifier
    assert metadata.version("optuna") in wanted["optuna"].specifier
    assert metadata.version("mlflow") in wanted["mlflow"].specifier
