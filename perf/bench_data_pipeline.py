"""Throughput of the training data pipeline, against a plain PIL loop, in one run.

    .venv/bin/python perf/bench_data_pipeline.py                    # CVACT sizes (default)
    .venv/bin/python perf/bench_data_pipeline.py --dataset cvusa    # CVUSA sizes
    .venv/bin/python perf/bench_data_pipeline.py --pairs 400 --workers 4 --batch 32

It writes `--pairs` random-content JPEG pairs at the real datasets' sizes (CVACT:
panoramas 1664x832 and aerial tiles 1200x1200; CVUSA: 1232x224 and 750x750; photo-like
multi-scale noise at quality 90, so the files weigh about what real ones do) and measures:

- `ours`: `benchmark.imagedata.PairDataset` with the paired augmentation (flip, k x 90
  rotation + panorama roll, per-view colour jitter), JPEG reduced-scale decoding and
  normalisation, at DINOv2-B/14 training sizes (ground 322x644, aerial 322x322), through a
  `torch.utils.data.DataLoader` with `--workers` workers; also with 0 workers (one core);
- `plain`: a plain single-process loop over the same files: PIL decode (no draft), resize
  to the same sizes with the same filter, to tensor, normalise (no augmentation).

Each pipeline runs one untimed warm-up pass first (page cache, code paths); then
`--repeats` timed passes of the three pipelines, interleaved so that a change of load on a
shared machine hits all of them alike; a timed DataLoader pass includes its worker
start-up. Prints the best and median pairs/s, the ratio of the bests, and the peak
resident memory of the main process (per phase) and of the worker processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gengeo_bench.datasets.base import Pair
from gengeo_bench.imagedata import PairDataset, collate
from gengeo_bench.transforms import INTERPOLATIONS, Preprocess

SIZES = {  # (width, height) on disk
    "cvact": {"ground": (1664, 832), "aerial": (1200, 1200)},
    "cvusa": {"ground": (1232, 224), "aerial": (750, 750)},
}
DINO_B14 = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "patch_size": 14,
    "image_size": {"ground": [322, 644], "aerial": [322, 322]},
}


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Multi-scale noise (roughly 1/f, like natural images) in RGB, uint8."""
    out = np.zeros((height, width, 3), dtype=np.float32)
    for cells, amplitude in ((4, 90.0), (16, 45.0), (64, 25.0), (256, 12.0)):
        side = max(width, height)
        ch, cw = max(2, cells * height // side), max(2, cells * width // side)
        small = Image.fromarray((rng.random((ch, cw, 3)) * 255).astype(np.uint8))
        layer = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        out += (layer - 127.5) / 127.5 * amplitude
    out += rng.normal(0.0, 4.0, size=out.shape).astype(np.float32)
    return Image.fromarray(np.clip(out + 127.5, 0, 255).astype(np.uint8))


def make_files(root: Path, dataset: str, n: int, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    pairs = []
    sizes = SIZES[dataset]
    for i in range(n):
        ground, aerial = root / f"{i:05d}_grdView.jpg", root / f"{i:05d}_satView.jpg"
        if not ground.exists():
            photo_like(*sizes["ground"], rng).save(ground, quality=90)
        if not aerial.exists():
            photo_like(*sizes["aerial"], rng).save(aerial, quality=90)
        pairs.append(Pair(id=f"{i:05d}", ground=ground, aerial=aerial))
    return pairs


def plain_loop(pairs: list[Pair], ground: Preprocess, aerial: Preprocess) -> int:
    """Decode (no draft), resize, to tensor, normalise: the baseline, one process."""
    done = 0
    filt = INTERPOLATIONS[ground.interpolation]
    for pair in pairs:
        for path, pre in ((pair.ground, ground), (pair.aerial, aerial)):
            with Image.open(path) as im:
                img = im.convert("RGB").resize((pre.size[1], pre.size[0]), filt)
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
            pre.normalize(x)
        done += 1
    return done


def ours(dataset: PairDataset, workers: int, batch: int, epoch: int) -> int:
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
        generator=torch.Generator().manual_seed(epoch),
    )
    done = 0
    for item in loader:
        done += item["ground"].shape[0]
    return done


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds incl. workers, items)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    n = fn(*args)
    return time.perf_counter() - start, cpu_seconds() - cpu, n


def children_peak_mib() -> float:
    """Largest peak RSS among finished child processes (the DataLoader workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # Linux: KiB


def rss_mib(field: str = "VmHWM") -> float:
    """This process's current (`VmRSS`) or peak (`VmHWM`) resident memory, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each phase gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(SIZES), default="cvact")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (and reuse) the JPEGs; default: a temp dir")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per pipeline (interleaved); best and median shown")
    parser.add_argument("--skip-single", action="store_true",
                        help="skip the 0-worker measurement of ours")
    args = parser.parse_args()

    torch.set_num_threads(1)  # each DataLoader worker does the same
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        pairs = make_files(root, args.dataset, args.pairs)
        size_mb = sum(p.ground.stat().st_size + p.aerial.stat().st_size for p in pairs) / 2**20
        dims = {view: "x".join(map(str, wh)) for view, wh in SIZES[args.dataset].items()}
        print(f"{args.pairs} {args.dataset} pairs ({dims['ground']} + {dims['aerial']} JPEG, "
              f"{size_mb:.0f} MiB) ready in {time.perf_counter() - t0:.1f}s in {root}")
        print(f"cpus available: {len(os.sched_getaffinity(0))}, load average: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        ground = Preprocess.from_meta(DINO_B14, "ground")
        aerial = Preprocess.from_meta(DINO_B14, "aerial")
        data = PairDataset(pairs, ground, aerial, augment=True, seed=0)
        print(f"targets: ground {ground.size}, aerial {aerial.size}, {ground.interpolation}, "
              f"draft={ground.draft}; augment {data.augmentation.describe()}")

        reset_peak()
        base = rss_mib("VmRSS")

        plain_loop(pairs[: max(1, len(pairs) // 10)], ground, aerial)  # warm-up
        runs: dict[str, list[float]] = {"plain": []}
        per_cpu: dict[str, list[float]] = {"plain": []}
        workers_of = {"plain": 1, "ours": args.workers, "ours-0w": 0}
        labels = ["ours"] + ([] if args.skip_single else ["ours-0w"])
        overall_peak = plain_peak = rss_mib()
        for repeat in range(args.repeats):  # interleaved, so load changes hit all alike
            seconds, cpu, n = timed(plain_loop, pairs, ground, aerial)
            runs["plain"].append(n / seconds)
            per_cpu["plain"].append(n / cpu)
            if repeat == 0:  # before our pipeline ever ran in this process
                plain_peak = rss_mib()
                for label in labels:
                    ours(data, workers_of[label], args.batch, epoch=100)  # warm-up
                    runs[label], per_cpu[label] = [], []
            for label in labels:
                seconds, cpu, n = timed(ours, data, workers_of[label], args.batch, 1 + repeat)
                runs[label].append(n / seconds)
                per_cpu[label].append(n / cpu)
            overall_peak = max(overall_peak, rss_mib())

        names = {
            "plain": "plain PIL loop (1 process, no draft/aug)",
            "ours": f"ours: PairDataset+augment, {args.workers} workers",
            "ours-0w": "ours: PairDataset+augment, in-process",
        }
        best_plain = max(runs["plain"])
        best_cpu_plain = max(per_cpu["plain"])
        print(f"\npairs/s over {args.repeats} interleaved passes of {args.pairs} pairs: wall "
              f"clock (best, median, ratio of bests) and per CPU-second (all processes; "
              f"less sensitive to other load on the machine)")
        print(f"{'pipeline':<44} {'best':>7} {'median':>7} {'vs plain':>9}   "
              f"{'per CPU-s':>9} {'vs plain':>9}")
        for label, rates in runs.items():
            cpu_rate = max(per_cpu[label])
            print(f"{names[label]:<44} {max(rates):7.1f} {float(np.median(rates)):7.1f} "
                  f"{max(rates) / best_plain:8.2f}x   {cpu_rate:9.1f} "
                  f"{cpu_rate / best_cpu_plain:8.2f}x")
        print(f"\npeak RSS (MiB): main process {base:.0f} before the loops (importing torch "
              f"alone maps ~0.7 GiB); {plain_peak:.0f} after the plain loop; "
              f"{overall_peak:.0f} over the whole run (ours: batches received from the "
              f"workers); largest DataLoader worker {children_peak_mib():.0f}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
