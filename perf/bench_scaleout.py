"""What scaling out costs and buys: the Ray executor and plain workers against the local runner.

A matrix of 8 tiny Cells (resnet_tiny, a 120-pair synthetic world, 4 epochs, one torch
thread each) runs, each time on a fresh MLflow store and runs folder (the world is
generated once beforehand and not timed):

- `local`: one `benchmark run` process (the baseline);
- `ray x1`: `--executor ray` on a running 1-CPU Ray cluster (`ray start --head`, started
  before the clock, stopped after): one Cell at a time, so (wall - local wall) / 8 is the executor's
  overhead per Cell (driver connection, task start, result collection);
- `ray x2`: the same on a 2-CPU cluster, two Cells at once; wall(x1) / wall(x2) is the
  speed-up from the second worker;
- `2 plain workers`: two `benchmark run` processes on one store (claims), against `local`.

Each configuration runs `--repeat` times (default 3), interleaved, and the smallest wall
counts: start-up here is mostly reading torch's, MLflow's and Ray's files, and how long
that takes varies by tens of seconds with what the machine's page cache holds. Besides
the wall of the whole command, each run's Cell span is read from its MLflow store (first
Cell run's start to last Cell run's end): the Cells alone, without the command's start-up
(imports, the matrix checks, the store) and exit, which no executor can split.

Peak memory: the largest resident set of any one process of a run (the driver, a
worker or a Ray task).

    .venv/bin/python perf/bench_scaleout.py [--cells 8] [--epochs 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from servers import RayHead, loopback_env  # noqa: E402  (the tests' real-server helpers)

AGGREGATORS = ["gem", {"name": "gem", "whiten": 16}, {"name": "netvlad", "num_clusters": 4},
               {"name": "netvlad", "num_clusters": 8},
               {"name": "salad", "num_clusters": 4, "cluster_dim": 8, "token_dim": 8},
               {"name": "salad", "num_clusters": 4, "cluster_dim": 8, "token_dim": 8, "dustbin": False},
               {"name": "salad", "num_clusters": 4, "cluster_dim": 16, "token_dim": 16},
               {"name": "salad", "num_clusters": 4, "cluster_dim": 16, "token_dim": 16, "dustbin": False}]


def matrix(folder: Path, cells: int, epochs: int) -> Path:
    data = {
        "name": "scaleout",
        "defaults": {"model": {"share_backbone": False},
                     "train": {"epochs": epochs, "batch_size": 16, "val_fraction": 0.2},
                     "evaluate": {"batch_size": 64}},
        "datasets": {"city": {"name": "synthetic", "region": "grid_city", "pairs": 120, "seed": 0}},
        "axes": {"backbone": ["resnet_tiny"], "aggregator": AGGREGATORS[:cells], "train_on": ["city"]},
    }
    path = folder / "scaleout.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(name: str, commands: list[list[str]], env: dict[str, str], root: Path) -> tuple[float, float]:
    """Start the commands together in a fresh folder; (wall seconds until all have finished,
    seconds from the first Cell run's start to the last one's end in that folder's store)."""
    folder = Path(tempfile.mkdtemp(prefix=name.replace(" ", "_") + "-", dir=root))
    start = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=folder, env=env, stdout=open(folder / f"{i}.log", "w"),
                              stderr=subprocess.STDOUT) for i, c in enumerate(commands)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"{name}: exit codes {codes}; logs in {folder}")
    return wall, cell_span(folder / "mlflow.db")


def cell_span(store: Path) -> float:
    with sqlite3.connect(store) as db:  # MLflow's own tables: runs and their tags
        first, last = db.execute(
            "SELECT MIN(start_time), MAX(end_time) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
            "WHERE tags.key = 'gengeo.role' AND tags.value = 'cell'").fetchone()
    return (last - first) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each configuration; the fastest counts")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    env = loopback_env(GENGEO_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", GENGEO_WAIT_SECONDS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    path = matrix(root, args.cells, args.epochs)
    benchmark = [sys.executable, "-m", "gengeo_bench"]
    # The world is generated (and imports warmed) by a run of one Cell, untimed.
    warm, _ = run("warm", [[*benchmark, "run", "--matrix", str(path), "--only", "*gem|city*",
                            "--device", "cpu", "--no-report"]], env, root)
    print(f"warm-up (world generation + one Cell): {warm:.1f} s")

    common = ["run", "--matrix", str(path), "--device", "cpu", "--no-report"]
    ray = [*common, "--cpus-per-cell", "1", "--executor", "ray", "--ray-address"]
    configs = {"local": ([*benchmark, *common], 1, None), "ray x1": ([*benchmark, *ray], 1, 1),
               "ray x2": ([*benchmark, *ray], 1, 2), "2 plain workers": ([*benchmark, *common], 2, None)}
    walls: dict[str, list[float]] = {name: [] for name in configs}
    spans: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(args.repeat):
        for name, (command, processes, ray_cpus) in configs.items():
            # one Ray cluster at a time, started before the clock, so none idles beside a run
            head = RayHead(root / f"ray-{i}-{ray_cpus}", cpus=ray_cpus) if ray_cpus else None
            try:
                full = [*command, head.address] if head else command
                wall, span = run(name, [full] * processes, env, root)
            finally:
                if head:
                    head.stop()
            walls[name].append(wall)
            spans[name].append(span)
            print(f"  round {i + 1}: {name:<16} {wall:6.1f} s wall, Cells {span:5.1f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    n = args.cells
    wall = {name: min(values) for name, values in walls.items()}
    span = {name: min(values) for name, values in spans.items()}
    print(f"\n{n} Cells, resnet_tiny, 120-pair world, {args.epochs} epochs, 1 thread per Cell "
          f"({os.cpu_count()} CPUs; fastest of {args.repeat}; load average {os.getloadavg()[0]:.2f})")
    for name in configs:
        print(f"  {name:<16} {wall[name]:7.1f} s wall ({wall[name] / n:5.2f} s per Cell), "
              f"Cells {span[name]:5.1f} s")
    print(f"Ray executor overhead per Cell (ray x1 - local) / {n}: "
          f"{(wall['ray x1'] - wall['local']) / n:+.2f} s wall, "
          f"{(span['ray x1'] - span['local']) / n:+.2f} s in the Cells   (goal <= 2 s)")
    print(f"second Ray worker: ray x1 / ray x2 = {wall['ray x1'] / wall['ray x2']:.2f}x wall, "
          f"{span['ray x1'] / span['ray x2']:.2f}x Cells   (goal >= 1.6x on 2 cores)")
    print(f"two plain workers on one store: local / 2 workers = "
          f"{wall['local'] / wall['2 plain workers']:.2f}x wall, "
          f"{span['local'] / span['2 plain workers']:.2f}x Cells")
    print(f"peak RSS of one process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
