"""Hyperparameter studies with Optuna: a trial is a Cell whose values came from a sampler.

A study file (`tune_study.py`) names a base Cell and a search space over its fields
(`tune_space.py`); every trial copies the base, writes the sampled values into it,
validates the result with `validate_cell` (the schema `benchmark train` reads) and
trains it with `run_cell`, the one path every command takes, inside the same tracked
lifecycle as a matrix Cell (`tracking.cell_run`). Nothing here trains or evaluates by
itself. `tune_report.py` writes the report and exports the best Cell.

Running a study:

- Budget: without `--n-trials`, a process runs trials until the study holds `n_trials`
  trials (running, waiting and finished ones; a trial replaced by its retry counts once).
  Checking the budget and creating the trial happen under one lock (a file lock beside a
  SQLite or journal storage, an advisory lock on PostgreSQL), so several workers never
  overshoot it. `--n-trials N` runs N more trials in this process, Optuna's meaning.
- Workers that die: on RDB storages (SQLite, PostgreSQL) each running trial sends a
  heartbeat; a trial whose worker stopped beating is failed and re-queued with the same
  values (Optuna's `RetryHeartbeatStaleTrialCallback`). On one machine a trial whose
  worker process is gone is re-queued at once (also for journal storages, which have no
  heartbeat), and a trial interrupted with Ctrl-C is re-queued too. A retry trains in
  the original trial's work directory, so it resumes from the last finished epoch.
- Many workers: several `benchmark tune` processes on one storage, or
  `--executor ray --workers N` (N of them as Ray tasks, `ray_executor.py`), run exactly
  this loop (`run_study`).
- Sampler seeds: each trial's sampler is seeded from (seed, trial number), so several
  workers sharing one seed do not propose the same values, and a study is reproducible
  trial by trial.

Each trial runs in `runs/<study>/trial-<number>` and is one MLflow child run (tags
`gengeo.role=trial`, `gengeo.study`, `gengeo.trial`, `gengeo.cell_id`, `gengeo.seed`)
under one parent run (`gengeo.role=study`) per `benchmark tune` invocation. Pruned trials
end KILLED in MLflow, crashed ones FAILED with the message in tag `gengeo.error`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from gengeo_bench import tracking
from gengeo_bench.engine import run_cell
from gengeo_bench.errors import ConfigError
from gengeo_bench.tune_report import best_trial, export_best, fmt, write_report
from gengeo_bench.tune_space import suggest_cell
from gengeo_bench.tune_study import (
    CELL_ID,
    ERROR,
    METRICS,
    RUN_ID,
    SPACE_HASH,
    WORKDIR,
    WORKER,
    Study,
    load_study,
    make_pruner,
    make_sampler,
)

log = logging.getLogger(__name__)


# --- storage and the budget lock ----------------------------------------------------------


def retry_callback(max_retry: int | None) -> Callable:
    cls = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
           or optuna.storages.RetryFailedTrialCallback)  # Optuna < 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry, inherit_intermediate_values=True)


def open_storage(study: Study) -> optuna.storages.BaseStorage:
    """`journal:<file>` -> JournalStorage; anything else is an RDB URL with heartbeats."""
    url = study.storage
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            if url.startswith("journal:"):
                from optuna.storages import journal

                backend = getattr(journal, "JournalFileBackend", None) or optuna.storages.JournalFileStorage
                path = Path(url[len("journal:"):]).expanduser()
                path.parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(backend(str(path)))
            hb = study.heartbeat
            stale = "heartbeat_stale_trial_callback"  # Optuna >= 4.9; failed_trial_callback before
            if stale not in inspect.signature(optuna.storages.RDBStorage).parameters:
                stale = "failed_trial_callback"
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=hb.interval,
                grace_period=hb.grace_period or 2 * hb.interval, **{stale: retry_callback(hb.max_retry)})
    except ConfigError:
        raise
    except Exception as exc:  # bad URL, missing driver, unreachable server
        raise ConfigError(f"{study.source}: storage {url!r} cannot be opened: {exc}") from None


def open_optuna_study(study: Study) -> optuna.Study:
    storage = open_storage(study)
    try:
        optuna_study = optuna.create_study(
            study_name=study.name, storage=storage, sampler=make_sampler(study),
            pruner=make_pruner(study), direction=study.direction, load_if_exists=True)
    except ValueError as exc:  # e.g. a stored study with another direction
        raise ConfigError(f"{study.source}: study {study.name!r} in {study.storage}: {exc}") from None
    stored = optuna_study.user_attrs.get(SPACE_HASH)
    if stored is None:
        optuna_study.set_user_attr(SPACE_HASH, study.space_hash)
    elif stored != study.space_hash:
        log.warning("%s: the base Cell, space or objective changed since study %r started; its "
                    "earlier trials were sampled from the old ones.", study.source, study.name)
    return optuna_study


class BudgetLock:
    """Makes "count the trials, then create one" atomic among workers sharing a storage.

    A file lock beside a SQLite database or journal file (one machine), a session advisory
    lock on PostgreSQL (many machines); other URLs get no lock, and simultaneous workers
    may then overshoot the budget by a trial or two.
    """

    def __init__(self, url: str, name: str):
        self.path: Path | None = None
        self.pg_url: str | None = None
        self.key = int(hashlib.sha256(f"gengeo.tune:{name}".encode()).hexdigest()[:15], 16)
        self.held = None
        if url.startswith("sqlite:///") and ":memory:" not in url:
            self.path = Path(url[len("sqlite:///"):].split("?")[0] + ".budget-lock")
        elif url.startswith("journal:"):
            self.path = Path(url[len("journal:"):] + ".budget-lock")  # not Optuna's .lock
        elif url.startswith("postgresql"):
            self.pg_url = url

    def acquire(self) -> None:
        if self.path is not None:
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock
                return
            handle = open(self.path, "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self.held = handle
        elif self.pg_url is not None:
            import sqlalchemy

            engine = sqlalchemy.create_engine(self.pg_url, poolclass=sqlalchemy.pool.NullPool)
            conn = engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self.held = conn

    def release(self) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        if self.path is not None:
            import fcntl

            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
        else:
            import sqlalchemy

            held.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            held.close()


def budget_used(optuna_study: optuna.Study) -> int:
    """Trials that count against `n_trials`: all of them, except failed ones that were re-queued."""
    trials = optuna_study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_dead_local_trials(optuna_study: optuna.Study, max_retry: int | None) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this machine is gone."""
    host = socket.gethostname()
    requeued = []
    for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, _, pid = str(t.user_attrs.get(WORKER, "")).rpartition(":")
        if owner != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            optuna_study.tell(t.number, state=TrialState.FAIL)
        except Exception:  # another worker got there first
            continue
        retry_callback(max_retry)(optuna_study, t)
        requeued.append(t.number)
        log.warning("trial %d: its worker (%s) is gone; re-queued with the same values", t.number,
                    t.user_attrs[WORKER])
    return requeued


# --- one trial ---------------------------------------------------------------------------


def objective_value(study: Study, result) -> float:
    if study.metric.startswith("val/"):
        scores = [r["val_R1"] for r in result.outcome.history if r.get("val_R1") is not None]
        if not scores:
            raise RuntimeError(f"{study.metric}: no epoch reported a validation R@1")
        return float(max(scores))
    if study.metric not in result.metrics:
        raise RuntimeError(f"{study.metric} is not among the trial's metrics "
                           f"({', '.join(sorted(result.metrics)) or 'none'})")
    return float(result.metrics[study.metric])


@dataclass
class Tracker:
    """MLflow side of one `benchmark tune` invocation: a parent run, created lazily."""

    study: Study
    uri: str
    mlclient: Any = None
    experiment: str | None = None
    parent: str | None = None

    def connect(self) -> None:
        """Open the store (a new SQLite store is created and migrated) and the experiment."""
        if self.experiment is not None:
            return
        self.mlclient = tracking.client(self.uri)
        try:
            self.experiment = tracking.experiment_id(self.mlclient, self.study.name, self.uri)
        except Exception:  # another worker created it a moment ago
            time.sleep(1.0)
            self.experiment = tracking.experiment_id(self.mlclient, self.study.name, self.uri)

    def start(self) -> str:
        """The parent run of this invocation (created on first use); returns its id."""
        if self.parent is not None:
            return self.parent
        self.connect()
        run = self.mlclient.create_run(
            self.experiment, run_name=f"{self.study.name} ({tracking.worker_id()})",
            tags={tracking.ROLE: "study", tracking.STUDY: self.study.name,
                  tracking.WORKER: tracking.worker_id()})
        self.parent = run.info.run_id
        tracking.log_params(self.mlclient, self.parent, {
            "objective.metric": self.study.metric, "objective.direction": self.study.direction,
            "sampler.name": self.study.sampler.name, "pruner.name": self.study.pruner.name,
            "n_trials": str(self.study.n_trials), "space": ", ".join(p.path for p in self.study.space)})
        self.mlclient.log_text(self.parent, self.study.text, "study.yaml")
        self.mlclient.log_dict(self.parent, tracking.environment(), "environment.json")
        return self.parent

    def end(self, status: str) -> None:
        if self.parent is not None:
            self.mlclient.set_terminated(self.parent, status)


def make_objective(study: Study, optuna_study: optuna.Study, tracker: Tracker, device: str | None,
                   lock: BudgetLock, runs_dir: Path) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        lock.release()  # the trial exists now; other workers may count and create theirs
        workdir = trial.user_attrs.get(WORKDIR)  # a retry resumes in its original trial's folder
        resumed = workdir is not None
        workdir = Path(workdir or runs_dir / study.name / f"trial-{trial.number}")
        trial.set_user_attr(WORKDIR, str(workdir))
        trial.set_user_attr(WORKER, tracking.worker_id())
        try:
            cell, values = suggest_cell(study, trial)
        except ConfigError as exc:
            trial.set_user_attr(ERROR, str(exc)[:5000])
            raise
        trial.set_user_attr(CELL_ID, cell.id)
        tags = {tracking.ROLE: "trial", tracking.STUDY: study.name, tracking.TRIAL: str(trial.number),
                tracking.PARENT: tracker.start(), "gengeo.sampled": json.dumps(values)}
        if resumed:
            tags["gengeo.resumed_from"] = str(workdir)

        def on_epoch(record: dict[str, Any]) -> None:
            score = record.get("val_R1")
            if score is None:
                return
            trial.report(float(score), int(record["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} (val R@1 {score:.2f})")

        try:
            with tracking.cell_run(tracker.mlclient, tracker.experiment, cell, workdir, tags,
                                   stop_on=(optuna.TrialPruned,),
                                   run_name=f"trial-{trial.number}") as run:
                trial.set_user_attr(RUN_ID, run.run_id)
                result = run_cell(cell, workdir, device=device, log_metrics=run.log_metrics,
                                  on_epoch=on_epoch)
                value = objective_value(study, result)
                run.log_metrics({"objective": value}, step=result.outcome.epochs_done)
                run.finish(result)
        except KeyboardInterrupt:
            frozen = next(t for t in optuna_study.get_trials(deepcopy=False) if t.number == trial.number)
            retry_callback(None)(optuna_study, frozen)  # the next `benchmark tune` resumes it
            raise
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # Optuna records FAIL and the study goes on
            trial.set_user_attr(ERROR, tracking.error_message(exc)[:5000])
            raise
        history = result.outcome.history
        best_val = max((r["val_R1"] for r in history if r.get("val_R1") is not None), default=None)
        summary = {**result.metrics, **({f"val/{cell.train.dataset}/R1": best_val}
                                        if best_val is not None else {})}
        trial.set_user_attr(METRICS, {k: float(v) for k, v in summary.items()})
        trial.set_user_attr("gengeo.best_epoch", result.outcome.best_epoch)
        return value

    return objective


# --- running a study ---------------------------------------------------------------------


@dataclass
class TuneOutcome:
    study: Study
    optuna_study: optuna.Study
    ran: int
    report_dir: Path | None = None
    exported: Path | None = None
    skipped_figures: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.optuna_study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def lines(self) -> list[str]:
        counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(self.counts().items())) or "no trials"
        out = [f"study {self.study.name}: ran {self.ran} trial(s) here; the study has {counts} "
               f"(budget {self.study.n_trials}, storage {self.study.storage})"]
        best = best_trial(self.optuna_study)
        if best is not None:
            out.append(f"best: trial {best.number}, {self.study.metric} = {best.value:.2f}, "
                       + ", ".join(f"{k}={fmt(v)}" for k, v in best.params.items()))
        if self.report_dir:
            out.append(f"report: {self.report_dir}")
            out += [f"  (no {name}: {why})" for name, why in self.skipped_figures.items()]
        if self.exported:
            out.append(f"best Cell: {self.exported}  (benchmark train {self.exported})")
        return out


def run_study(study: Study, n_trials: int | None = None, timeout: float | None = None,
              tracking_uri: str | None = None, device: str | None = None,
              runs_dir: str | Path = "runs") -> TuneOutcome:
    """Run trials until the budget (or `n_trials` more, or `timeout` seconds) is reached."""
    tracker = Tracker(study, tracking.tracking_uri(tracking_uri))
    lock = BudgetLock(study.storage, study.name)
    lock.acquire()  # workers starting together: one creates the storage and the MLflow store
    try:
        optuna_study = open_optuna_study(study)
        if n_trials != 0:
            tracker.connect()
    finally:
        lock.release()
    objective = make_objective(study, optuna_study, tracker, device, lock, Path(runs_dir).resolve())
    timeout = timeout if timeout is not None else study.timeout
    start, ran, status = time.monotonic(), 0, "FINISHED"
    try:
        while True:
            if n_trials is not None and ran >= n_trials:
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                break
            if getattr(optuna_study.sampler, "is_exhausted", lambda s: False)(optuna_study):
                break
            requeue_dead_local_trials(optuna_study, study.heartbeat.max_retry)
            lock.acquire()
            try:
                if n_trials is None:
                    _fail_stale(optuna_study)  # a dead worker's trial is re-queued, not counted twice
                    waiting = optuna_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                    if budget_used(optuna_study) >= study.n_trials and not waiting:
                        break
                optuna_study.optimize(objective, n_trials=1, catch=(Exception,))
            finally:
                lock.release()
            ran += 1
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
    return TuneOutcome(study, optuna_study, ran)


def _fail_stale(optuna_study: optuna.Study) -> None:
    """Fail (and re-queue) trials whose heartbeat stopped, before they are counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(optuna_study)


def tune(study_file: str | Path, n_trials: int | None = None, timeout: float | None = None,
         storage: str | None = None, tracking_uri: str | None = None, device: str | None = None,
         report: bool = False, export: str | Path | None = None, executor: str = "local",
         workers: int = 1, ray_address: str | None = None, gpus_per_worker: float = 0.0,
         cpus_per_worker: float = 1.0, runs_dir: str | Path = "runs") -> TuneOutcome:
    """`benchmark tune`: validate the study file, run trials (here or as Ray tasks), report, export.

    With `executor="ray"`, `workers` Optuna workers run as Ray tasks, each exactly what one
    `benchmark tune` process runs (`run_study`), on the study's shared storage; `n_trials`
    then counts per worker.
    """
    study = load_study(study_file, storage=storage)
    if executor == "ray":
        from gengeo_bench import ray_executor
        from gengeo_bench.matrix import Resources

        uri = tracking.tracking_uri(tracking_uri)
        cluster = ray_executor.connect(ray_address, uri)
        resources = Resources(gpus_per_cell=gpus_per_worker, cpus_per_cell=cpus_per_worker)
        ran = cluster.tune(study, workers, n_trials, timeout, device, str(Path(runs_dir).resolve()),
                           resources)
        outcome = TuneOutcome(study, open_optuna_study(study), ran)
    elif executor == "local":
        outcome = run_study(study, n_trials=n_trials, timeout=timeout, tracking_uri=tracking_uri,
                            device=device, runs_dir=runs_dir)
    else:
        raise ConfigError(f"--executor {executor!r}: expected local or ray.")
    if report:
        outcome.report_dir, outcome.skipped_figures = write_report(study, outcome.optuna_study)
    if export:
        outcome.exported = export_best(study, outcome.optuna_study, export)
    return outcome
