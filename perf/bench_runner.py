"""The matrix runner's own overhead per Cell, and the quickstart's wall time.

    python perf/bench_runner.py [--matrix studies/quickstart.yaml] [--only PATTERN]

Runs the matrix in a fresh temporary working directory (new MLflow SQLite store, new
caches except the synthetic world, which is generated once beforehand and not timed),
timing for every Cell the work of `run_cell` (training + evaluation) and everything the
runner does around it (MLflow child run, params, metrics, artifacts, bookkeeping). Prints
per-Cell figures, the overhead ratio, the report's time and the whole wall time, then
runs the same command again to time a fully skipped re-run.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import gengeo_bench.engine as engine

REPO = Path(__file__).resolve().parents[1]


def time_calls(module, name: str) -> list[float]:
    """Replace `module.name` by a wrapper that appends each call's seconds to the list."""
    times: list[float] = []
    real = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    setattr(module, name, timed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default=str(REPO / "studies" / "quickstart.yaml"))
    parser.add_argument("--only", default=None)
    parser.add_argument("--keep", default=None, help="run in this folder and keep it (store, report)")
    args = parser.parse_args()

    from gengeo_bench import report as report_module
    from gengeo_bench import runner
    from gengeo_bench.matrix import load_matrix
    from gengeo_bench.runner import run_matrix

    # run_cell: the Cell's own work; run_one: the runner's whole handling of a Cell
    # (child run, params, run_cell, metrics, artifacts); write_report: the report.
    work_times = time_calls(engine, "run_cell")
    cell_times = time_calls(runner, "run_one")
    report_time = time_calls(report_module, "write_report")
    from gengeo_bench.builders import open_dataset

    matrix_path = Path(args.matrix).resolve()
    # Generate the datasets first (the synthetic world is cached across runs).
    for ref in {k: v for mc in load_matrix(matrix_path).cells
                for k, v in mc.cell.datasets.items()}.values():
        open_dataset(ref, ref.train_split), open_dataset(ref, ref.test_split)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        os.chdir(tmp)
        # Fresh descriptor and feature caches; the already generated world is shared.
        shared = Path(os.environ.get("GENGEO_CACHE", Path.home() / ".cache" / "gengeo-bench"))
        fresh = Path(tmp) / "cache"
        fresh.mkdir()
        (fresh / "synthetic").symlink_to(shared / "synthetic")
        os.environ["GENGEO_CACHE"] = str(fresh)
        start = time.perf_counter()
        outcomes = run_matrix(matrix_path, only=args.only)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        again = run_matrix(matrix_path, only=args.only)
        rerun = time.perf_counter() - start

    print("\nper Cell: runner time (incl. run_cell) | run_cell work | overhead")
    cell_total = sum(cell_times)
    for o, whole, work in zip(outcomes, cell_times, work_times, strict=False):
        print(f"  {o.cell.id}  {whole:7.2f} s | {work:7.2f} s | {whole - work:5.2f} s "
              f"({100 * (whole - work) / work:.1f}%)")
    work = sum(work_times)
    print(f"cells: {len(outcomes)}; work {work:.1f} s; runner overhead {cell_total - work:.1f} s "
          f"= {100 * (cell_total - work) / work:.1f}% of the work "
          f"({(cell_total - work) / max(1, len(outcomes)):.2f} s per Cell)")
    print(f"report: {report_time[0] if report_time else float('nan'):.1f} s; "
          f"whole run wall time {wall:.1f} s (matrix load, MLflow setup, cells, report)")
    print(f"re-run with every Cell finished: {rerun:.1f} s "
          f"({sum(o.status == 'skipped' for o in again)} skipped)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
