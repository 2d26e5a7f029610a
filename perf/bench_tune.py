"""What Optuna and MLflow cost per trial of `benchmark tune`, against the trial's own work.

Runs the quickstart study (studies/quickstart_hpo.yaml, a budget of --trials trials) in a
fresh folder with SQLite Optuna and MLflow stores, once with one worker process and once
with two worker processes sharing the study. In every worker the real `run_cell` is
timed, and so are the sampler's calls and every MLflow client call. Per trial:

- work: `run_cell` (training + evaluation), less the MLflow logging done inside it;
- overhead: everything else in the worker's trial loop, divided by its trials: waiting
  for the budget lock and counting the budget, Optuna's storage (creating the trial,
  user attributes, intermediate values, telling the result), the sampler, and MLflow
  (child and parent runs, params, per-step metrics, tags, artifacts);
- setup (once per worker, not in the overhead): opening the Optuna storage and the
  MLflow store (a new SQLite MLflow store is migrated: seconds) and experiment.

    python perf/bench_tune.py                 # about 3-4 minutes on 2 CPU cores
    python perf/bench_tune.py --trials 6 --device cuda

The synthetic world is generated into $GENGEO_CACHE on first use (about 20 s, once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def timed(owner, name: str, bucket: dict[str, float]) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket["total"] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def worker(study_file: str, out: str, device: str) -> None:
    """One `benchmark tune` process, instrumented; writes its figures to `out`."""
    import optuna
    from mlflow.tracking import MlflowClient

    from gengeo_bench import tune as tuning

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow_time, sampler_time, setup = {"total": 0.0}, {"total": 0.0}, {"total": 0.0}
    for name in ("create_run", "set_tag", "set_terminated", "log_batch", "log_artifact",
                 "log_artifacts", "log_text", "log_dict", "get_run"):
        timed(MlflowClient, name, mlflow_time)
    for name in ("before_trial", "infer_relative_search_space", "sample_relative",
                 "sample_independent", "after_trial"):
        timed(tuning.PerTrialSeed, name, sampler_time)
    timed(tuning, "open_optuna_study", setup)
    timed(tuning.Tracker, "connect", setup)
    work: list[float] = []
    real_run_cell = tuning.run_cell

    def run_cell(*args, **kwargs):
        before = mlflow_time["total"]
        start = time.perf_counter()
        try:  # a pruned trial raises out of run_cell: its work counts all the same
            return real_run_cell(*args, **kwargs)
        finally:
            work.append(time.perf_counter() - start - (mlflow_time["total"] - before))

    tuning.run_cell = run_cell
    study = tuning.load_study(study_file)
    setup_done = []
    real_connect = tuning.Tracker.connect

    def connect(self):
        real_connect(self)
        setup_done.append(time.perf_counter())

    tuning.Tracker.connect = connect
    outcome = tuning.run_study(study, device=device)
    loop = time.perf_counter() - setup_done[0]  # from the open stores to the budget spent
    Path(out).write_text(json.dumps({
        "ran": outcome.ran, "setup": setup["total"], "loop": loop, "work": work,
        "mlflow": mlflow_time["total"], "sampler": sampler_time["total"]}))


def run(workers: int, trials: int, device: str, base: Path) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench_tune_{workers}w_", dir=base))
    study = yaml.safe_load((REPO / "studies" / "quickstart_hpo.yaml").read_text())
    study["n_trials"] = trials
    study_file = folder / "study.yaml"
    study_file.write_text(yaml.safe_dump(study, sort_keys=False))
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(study_file),
                               str(folder / f"worker{i}.json"), "--device", device],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed:\n{err[-3000:]}")
    return [json.loads((folder / f"worker{i}.json").read_text()) for i in range(workers)]


def report(label: str, results: list[dict]) -> None:
    ran = sum(r["ran"] for r in results)
    work = sum(sum(r["work"]) for r in results)
    overhead = sum(r["loop"] - sum(r["work"]) for r in results)
    mlflow = sum(r["mlflow"] for r in results)
    sampler = sum(r["sampler"] for r in results)
    print(f"{label}: {ran} trials ({' + '.join(str(r['ran']) for r in results)} per worker)")
    setups = ", ".join(f"{r['setup']:.1f} s" for r in results)
    print(f"  setup per worker (open the Optuna storage and the MLflow store): {setups}")
    print(f"  per trial: work {1000 * work / ran:.0f} ms | overhead {1000 * overhead / ran:.0f} ms = "
          f"MLflow {1000 * mlflow / ran:.0f} + sampler {1000 * sampler / ran:.0f} + Optuna storage, "
          f"budget lock and the rest {1000 * (overhead - mlflow - sampler) / ran:.0f} | "
          f"overhead / work {overhead / work:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="the study's budget in each run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("STUDY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.device)
        return
    base = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    print(f"quickstart_hpo study, {args.trials} trials per run, device {args.device}; folders in {base}")
    for workers in (1, 2):
        report(f"{workers} worker(s)", run(workers, args.trials, args.device, base))


if __name__ == "__main__":
    main()
