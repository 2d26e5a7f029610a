"""The matrix on many workers: claims, takeover, the Ray executor, a tracking server, Optuna on PostgreSQL.

Real parts only: `benchmark run` processes on one SQLite store, a Ray cluster started
with `ray start --head --block` on 127.0.0.1, an `mlflow server` process and a PostgreSQL
server (tests/servers.py), each stopped by its process id. The matrix is tiny
(resnet_tiny on a 120-pair synthetic world, 2 epochs), so a Cell takes seconds; workers
are killed with SIGKILL by the pid their claim records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from servers import MlflowServer, Postgres, RayHead, loopback_env

from gengeo_bench import ray_executor, runner, tracking
from gengeo_bench.claims import Claim
from gengeo_bench.config import validate_cell
from gengeo_bench.errors import ConfigError

WORLD = {"name": "synthetic", "region": "grid_city", "pairs": 120, "seed": 0}
CELLS_OF_THREE = ["gem", {"name": "netvlad", "num_clusters": 4},
                  {"name": "salad", "num_clusters": 4, "cluster_dim": 8, "token_dim": 8}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: the synthetic world is generated once."""
    return tmp_path_factory.mktemp("cache")


def write_matrix(folder: Path, name: str, aggregators: list, epochs: int = 2, **extra) -> Path:
    data = {
        "name": name,
        "defaults": {"model": {"share_backbone": False},
                     "train": {"epochs": epochs, "batch_size": 16, "val_fraction": 0.2},
                     "evaluate": {"batch_size": 64}},
        "datasets": {"city": dict(WORLD)},
        "axes": {"backbone": ["resnet_tiny"], "aggregator": aggregators, "train_on": ["city"]},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def worker_env(cache: Path, **extra: str) -> dict[str, str]:
    env = loopback_env(GENGEO_CACHE=str(cache), OMP_NUM_THREADS="1", GENGEO_LOG_EVERY="5",
                       GENGEO_WAIT_SECONDS="1", **extra)
    # mlflow.set_tracking_uri (called in this process by earlier tests) exports the URI
    # for subprocesses; a worker must find its own store from its folder instead.
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_run(folder: Path, matrix: Path, cache: Path, *args: str, log: str = "worker.log",
              **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "gengeo_bench", "run", "--matrix", str(matrix), "--device", "cpu",
               *args]
    return subprocess.Popen(command, cwd=folder, env=worker_env(cache, **env), start_new_session=True,
                            stdout=open(folder / log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, folder: Path, log: str, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return (folder / log).read_text()


def cell_runs(uri: str, experiment: str) -> dict[str, list]:
    """Cell id -> every child run of that Cell (any status)."""
    mlclient = tracking.client(uri)
    found = mlclient.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for run in tracking.find_runs(mlclient, found.experiment_id, "cell"):
        out.setdefault(run.data.tags[tracking.CELL_ID], []).append(run)
    return out


def wait_for_checkpoint(runs: Path, timeout: float = 300) -> Path:
    """The work folder of the first Cell that has finished an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(runs.glob("*/*/checkpoint.pt"))
        if found:
            return found[0].parent
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint under {runs} after {timeout} s")


def claim_pid(workdir: Path) -> int:
    return int(json.loads((workdir / "claim.lock").read_text())["pid"])


# --- claims ---------------------------------------------------------------------------


def test_a_claim_excludes_other_processes_until_its_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from gengeo_bench.claims import Claim; "
        f"c = Claim(Path({str(tmp_path)!r})); assert c.acquire('them'); print('held', flush=True); "
        "time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    claim = Claim(tmp_path)
    assert not claim.acquire("me")
    info = claim.holder()
    assert info["worker"] == "them" and info["pid"] == holder.pid
    holder.kill()
    holder.wait()
    assert claim.holder() is None
    assert claim.acquire("me")
    assert claim.holder()["worker"] == "me"  # this process's own claim is read, never probed
    assert claim.acquire_probe() is False
    claim.release()
    assert claim.acquire_probe() is True


def test_dry_run_shows_cells_other_workers_hold(tmp_path, monkeypatch, capsys):
    from gengeo_bench.cli import main as cli_main
    from gengeo_bench.matrix import load_matrix

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_matrix(tmp_path, "held", CELLS_OF_THREE[:2])
    cell_id = load_matrix(path).cells[1].id
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from gengeo_bench.claims import Claim; "
        f"c = Claim(Path({str(tmp_path / 'runs' / 'held' / cell_id)!r})); assert c.acquire('gpu-box:77'); "
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(sys, "argv", ["benchmark", "run", "--matrix", str(path), "--dry-run"])
        cli_main()
    finally:
        holder.kill()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if cell_id in line)
    assert "running (gpu-box:77)" in row
    assert "new" in next(line for line in out.splitlines() if load_matrix(path).cells[0].id in line)
    assert not (tmp_path / "mlflow.db").exists()  # a dry run creates no store


def test_a_matrix_file_may_say_what_a_cell_asks_of_a_cluster(tmp_path):
    from gengeo_bench.matrix import load_matrix

    path = write_matrix(tmp_path, "res", ["gem"], resources={"gpus_per_cell": 1, "cpus_per_cell": 8})
    matrix = load_matrix(path)
    assert (matrix.resources.gpus_per_cell, matrix.resources.cpus_per_cell) == (1, 8)
    plain = load_matrix(write_matrix(tmp_path, "plain", ["gem"]))
    assert matrix.cells[0].id == plain.cells[0].id  # where a Cell runs is not what it is
    for bad, field in (({"gpus_per_cell": -1}, "gpus_per_cell"), ({"cpus_per_cell": 0}, "cpus_per_cell"),
                       ({"gpu": 1}, "gpu")):
        with pytest.raises(ConfigError, match=rf"res.yaml: resources.{field}"):
            load_matrix(write_matrix(tmp_path, "res", ["gem"], resources=bad))


# --- plain workers on one store -----------------------------------------------------------


@pytest.mark.slow
def test_two_workers_on_a_fresh_store_run_every_cell_once(tmp_path, cache):
    matrix = write_matrix(tmp_path, "two", CELLS_OF_THREE)
    workers = [start_run(tmp_path, matrix, cache, log=f"w{i}.log") for i in range(2)]
    logs = [finish(w, tmp_path, f"w{i}.log") for i, w in enumerate(workers)]
    assert [w.returncode for w in workers] == [0, 0], logs
    runs = cell_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "two")
    assert len(runs) == 3
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in runs.values()), runs
    ran_by = {r[0].data.tags[tracking.WORKER] for r in runs.values()}
    assert len(ran_by) == 2  # both workers trained something
    for log in logs:  # each summary says what it ran and what the other ran
        assert "done by another" in log and "this worker ran" in log
    assert len(list((tmp_path / "runs" / "two").iterdir())) == 3


@pytest.mark.slow
def test_workers_option_splits_the_cells_under_one_parent_run(tmp_path, cache):
    """`--workers 2`: one command, two processes, every Cell once, one parent, one report."""
    # Cells long enough (8 epochs, ~10 s) that the second worker starts before the first is done
    matrix = write_matrix(tmp_path, "duo", CELLS_OF_THREE, epochs=8)
    log = finish(start_run(tmp_path, matrix, cache, "--workers", "2", log="duo.log"), tmp_path, "duo.log")
    assert "2 workers on this machine, 1 CPU thread(s) each" in log, log
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = cell_runs(uri, "duo")
    assert len(runs) == 3 and all(len(r) == 1 and r[0].info.status == "FINISHED"
                                  for r in runs.values()), runs
    assert len({r[0].data.tags[tracking.WORKER] for r in runs.values()}) == 2  # both trained
    mlclient = tracking.client(uri)
    parents = tracking.find_runs(mlclient, mlclient.get_experiment_by_name("duo").experiment_id, "matrix")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r[0].data.tags[tracking.PARENT] for r in runs.values()} == {parents[0].info.run_id}
    assert log.count("summary") == 1 and "this worker ran" in log and "done by another" in log
    assert (tmp_path / "reports" / "duo" / "index.md").is_file()


def test_workers_need_the_local_executor(tmp_path):
    with pytest.raises(ConfigError, match="--workers 2"):
        runner.run_matrix(write_matrix(tmp_path, "w", ["gem"]), executor="ray", workers=2)


@pytest.mark.slow
def test_a_worker_killed_mid_cell_is_taken_over_and_resumes(tmp_path, cache):
    matrix = write_matrix(tmp_path, "takeover", CELLS_OF_THREE[:2], epochs=12)
    first = start_run(tmp_path, matrix, cache, log="first.log")
    workdir = wait_for_checkpoint(tmp_path / "runs")
    assert claim_pid(workdir) == first.pid
    second = start_run(tmp_path, matrix, cache, log="second.log")
    time.sleep(3)  # the second worker has seen the held Cell and waits for it
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log = finish(second, tmp_path, "second.log")
    assert second.returncode == 0, log
    assert f"({workdir.name}): resuming" in log
    runs = cell_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "takeover")
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in runs.values()), runs
    taken = runs[workdir.name][0]
    assert taken.data.tags[tracking.WORKER].endswith(f":{second.pid}")
    epochs = [m.step for m in tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
              .get_metric_history(taken.info.run_id, "val/city/R1")]
    assert sorted(set(epochs)) == list(range(1, 13))  # one run holds the whole history


def test_a_cell_beating_on_another_host_is_left_alone_until_it_stops(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("GENGEO_CACHE", str(cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlclient = tracking.client(uri)
    experiment = tracking.experiment_id(mlclient, "beat", uri)
    cell = validate_cell({"name": "c", "model": {"backbone": {"name": "resnet_tiny"},
                                                 "aggregator": {"name": "gem"}},
                          "train": {"dataset": "city", "epochs": 1, "batch_size": 16},
                          "datasets": {"city": dict(WORLD)}}, "test")
    run = mlclient.create_run(experiment, tags={
        tracking.ROLE: "cell", tracking.CELL_ID: cell.id, tracking.WORKER: "other-host:4242",
        runner.HEARTBEAT: f"{time.time():.0f}"})
    ctx = runner.Context(uri, experiment, "parent", "beat", str(tmp_path / "runs"), "cpu")
    outcome = runner.run_one(ctx, cell)
    assert outcome.status == "running" and outcome.worker == "other-host:4242"
    assert len(cell_runs(uri, "beat")[cell.id]) == 1  # nothing new was created
    mlclient.set_tag(run.info.run_id, runner.HEARTBEAT, f"{time.time() - 10 * runner.HEARTBEAT_GRACE:.0f}")
    outcome = runner.run_one(ctx, cell)  # silent for long: its worker is dead; take it over
    assert outcome.status == "done" and outcome.run_id == run.info.run_id
    assert mlclient.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_cell_failed_by_another_worker_in_this_invocation_is_not_retried(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlclient = tracking.client(uri)
    experiment = tracking.experiment_id(mlclient, "failed", uri)
    cell = validate_cell({"name": "c", "model": {"backbone": {"name": "resnet_tiny"},
                                                 "aggregator": {"name": "gem"}},
                          "train": {"dataset": "city", "epochs": 1},
                          "datasets": {"city": dict(WORLD)}}, "test")
    ctx = runner.Context(uri, experiment, "parent", "failed", str(tmp_path / "runs"), "cpu")
    run = mlclient.create_run(experiment, tags={tracking.ROLE: "cell", tracking.CELL_ID: cell.id,
                                                tracking.WORKER: "host:1", tracking.ERROR: "boom"})
    mlclient.set_terminated(run.info.run_id, "FAILED")
    outcome = runner.run_one(ctx, cell)
    assert (outcome.status, outcome.error, outcome.worker) == ("failed_elsewhere", "boom", "host:1")


# --- checks before anything is submitted to a cluster ----------------------------------------


def test_a_local_store_with_nodes_on_other_machines_is_refused():
    assert ray_executor.remote_hosts(["127.0.0.1", "10.0.0.5"], "10.0.0.4") == ["10.0.0.5"]
    assert ray_executor.remote_hosts(["10.0.0.4", "127.0.0.1"], "10.0.0.4") == []
    for uri in ("sqlite:///mlflow.db", "file:///data/mlruns", "/data/mlruns"):
        with pytest.raises(ConfigError, match=r"store on this machine.*10.0.0.5.*mlflow server"):
            ray_executor.check_store(uri, ["10.0.0.5"])
        ray_executor.check_store(uri, [])  # a one-machine cluster may use it
    ray_executor.check_store("http://head:5000", ["10.0.0.5"])
    for location in ("file:///home/me/mlartifacts/m", "/home/me/mlartifacts"):
        with pytest.raises(ConfigError, match=r"artifacts at .*a path on one machine"):
            ray_executor.check_artifact_location(location, ["10.0.0.5"], "m")
    ray_executor.check_artifact_location("mlflow-artifacts:/1", ["10.0.0.5"], "m")
    ray_executor.check_artifact_location("s3://bucket/mlflow/1", ["10.0.0.5"], "m")


# --- the Ray executor on a real cluster, through a real tracking server ------------------------


def test_a_warm_up_task_imports_what_its_cell_runs(tmp_path):
    matrix = write_matrix(tmp_path, "warm", ["gem"])
    cell = runner.load_matrix(matrix).cells[0].cell
    assert ray_executor.plugins(cell) == [("aggregator", "gem"), ("backbone", "resnet_tiny"),
                                          ("dataset", "synthetic")]
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    # In a fresh interpreter, as on a Ray worker that has imported nothing yet.
    code = (f"import sys, torch; from gengeo_bench import ray_executor; "
            f"ray_executor.warm_task({uri!r}, {ray_executor.plugins(cell)!r}, 1); "
            f"print(torch.get_num_threads(), *sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=worker_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    threads, *modules = out.stdout.split()
    assert threads == "1"
    for module in ("gengeo_bench.engine", "gengeo_bench.explain", "matplotlib.figure",
                   "gengeo_bench.datasets.synthetic", "gengeo_bench.backbones.resnet",
                   "gengeo_bench.aggregators.gem", "mlflow.store.tracking.sqlalchemy_store"):
        assert module in modules
    assert not (tmp_path / "fresh.db").exists()  # left for the driver to create


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("ray-head"), cpus=2)
    yield head
    head.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.mark.slow
def test_ray_executor_runs_each_cell_once_through_a_tracking_server(tmp_path, cache, ray_head,
                                                                    mlflow_server):
    matrix = write_matrix(
        tmp_path, "onray", CELLS_OF_THREE[:2], epochs=10,
        include=[{"backbone": "resnet_tiny", "aggregator": "gem", "train_on": "atlantis"}],  # fails later
    )
    data = yaml.safe_load(matrix.read_text())
    data["datasets"]["atlantis"] = {**WORLD, "region": "atlantis"}
    matrix.write_text(yaml.safe_dump(data, sort_keys=False))
    driver = start_run(tmp_path, matrix, cache, "--executor", "ray", "--ray-address", ray_head.address,
                       "--cpus-per-cell", "1", "--tracking-uri", mlflow_server.uri, log="driver.log")
    workdir = wait_for_checkpoint(tmp_path / "runs")
    killed = claim_pid(workdir)
    os.kill(killed, signal.SIGKILL)  # the task's worker process: Ray retries the task
    log = finish(driver, tmp_path, "driver.log")
    assert driver.returncode == 1, log  # one Cell failed; the others went on
    runs = cell_runs(mlflow_server.uri, "onray")
    assert len(runs) == 3 and all(len(r) == 1 for r in runs.values()), runs
    status = {cell_id: r[0].info.status for cell_id, r in runs.items()}
    assert sorted(status.values()) == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r[0] for r in runs.values() if r[0].info.status == "FAILED")
    assert "atlantis" in failed.data.tags[tracking.ERROR]
    resumed = runs[workdir.name][0]
    assert resumed.info.status == "FINISHED"
    assert not resumed.data.tags[tracking.WORKER].endswith(f":{killed}")  # the retry finished it
    assert resumed.data.tags[runner.NODE].startswith("127.0.0.1")
    mlclient = tracking.client(mlflow_server.uri)
    assert mlclient.get_experiment_by_name("onray").artifact_location.startswith("mlflow-artifacts:")
    cell_yaml = Path(mlclient.download_artifacts(resumed.info.run_id, "cell.yaml", str(tmp_path)))
    assert validate_cell(yaml.safe_load(cell_yaml.read_text()), "artifact").id == workdir.name
    index = (tmp_path / "reports" / "onray" / "index.md").read_text()
    results = (tmp_path / "reports" / "onray" / "results.md").read_text()
    assert "results" in index and "gem" in results and "netvlad" in results
    assert "ray onray:" in log and "queued" in log  # the board, as plain lines in a log


@pytest.mark.slow
def test_ctrl_c_on_the_ray_driver_cancels_tasks_and_marks_their_runs_killed(tmp_path, cache, ray_head):
    matrix = write_matrix(tmp_path, "interrupted", ["gem"], epochs=200)
    driver = start_run(tmp_path, matrix, cache, "--executor", "ray", "--ray-address", ray_head.address,
                       log="driver.log")
    workdir = wait_for_checkpoint(tmp_path / "runs")
    worker = claim_pid(workdir)
    os.kill(driver.pid, signal.SIGINT)
    log = finish(driver, tmp_path, "driver.log", timeout=120)
    assert driver.returncode == 130, log
    runs = cell_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "interrupted")
    (run,) = runs[workdir.name]
    assert run.info.status == "KILLED" and "Ctrl-C" in run.data.tags[tracking.STOPPED]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Claim(workdir).holder() is not None:
        time.sleep(0.5)
    assert Claim(workdir).holder() is None  # the task's process is gone
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


# --- Optuna on PostgreSQL: two processes, and workers as Ray tasks ------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    server = Postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


def write_study(folder: Path, name: str, n_trials: int) -> Path:
    study = {
        "name": name,
        "base": {"name": name, "model": {"backbone": {"name": "resnet_tiny"}, "aggregator": {"name": "gem"},
                                         "share_backbone": False},
                 "train": {"dataset": "city", "epochs": 1, "batch_size": 16, "val_fraction": 0.2},
                 "evaluate": {"batch_size": 64}, "datasets": {"city": dict(WORLD)}},
        "space": {"train.lr": {"float": [1.0e-4, 1.0e-2], "log": True}},
        "objective": {"metric": "val/city/R1"},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": n_trials,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def check_study(url: str, name: str, n_trials: int, mlflow_uri: str) -> None:
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert len(trials) == n_trials  # the budget is not overshot
    assert all(t.state == TrialState.COMPLETE for t in trials)
    mlclient = tracking.client(mlflow_uri)
    children = tracking.find_runs(mlclient, mlclient.get_experiment_by_name(name).experiment_id, "trial")
    assert sorted(int(r.data.tags[tracking.TRIAL]) for r in children) == list(range(n_trials))
    assert all(r.info.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_two_tune_processes_share_a_postgres_study(tmp_path, cache, postgres):
    study = write_study(tmp_path, "pg_two", n_trials=4)
    command = [sys.executable, "-m", "gengeo_bench", "tune", "--study", str(study), "--device", "cpu",
               "--storage", postgres.url]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=worker_env(cache), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    check_study(postgres.url, "pg_two", 4, f"sqlite:///{tmp_path / 'mlflow.db'}")
    ran = [int(o.split("ran ")[1].split(" trial")[0]) for o in outputs]
    assert sum(ran) == 4


@pytest.mark.slow
def test_tune_workers_as_ray_tasks_on_postgres(tmp_path, cache, postgres, ray_head, mlflow_server):
    study = write_study(tmp_path, "pg_ray", n_trials=4)
    proc = subprocess.run(
        [sys.executable, "-m", "gengeo_bench", "tune", "--study", str(study), "--device", "cpu",
         "--storage", postgres.url, "--executor", "ray", "--workers", "2", "--ray-address",
         ray_head.address, "--tracking-uri", mlflow_server.uri, "--report"],
        cwd=tmp_path, env=worker_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ran 4 trial(s)" in proc.stdout
    check_study(postgres.url, "pg_ray", 4, mlflow_server.uri)
    assert (tmp_path / "reports" / "pg_ray" / "best.md").is_file()
