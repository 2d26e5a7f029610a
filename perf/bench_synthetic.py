"""How fast the synthetic world renders: pairs per second per region, one process.

A pair is one ray-cast panorama, one aerial tile and its label map, each written to disk
(JPEG/PNG) exactly as `generate` writes them (cameras rendered in batches of `BATCH`).
Sizes default to the quickstart's (aerial 128, panorama 64 x 256). Wall time and CPU time
are both printed: on a shared machine the CPU figure is the steadier one.

    .venv/bin/python perf/bench_synthetic.py [--pairs 100] [--aerial 128] [--pano 64 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gengeo_bench.datasets.synthetic import (
    BATCH,
    _pair_seed,
    _save_jpeg,
    _save_png,
    camera_positions,
)
from gengeo_bench.synthetic_world import REGIONS, World, render_batch


def bench(region: str, pairs: int, aerial: int, pano: tuple[int, int], out: Path) -> dict:
    world = World(region, 0)
    t0 = time.perf_counter()
    cams = camera_positions(world, pairs, REGIONS[region].tile_m, seed=0)
    t_place = time.perf_counter() - t0
    render = write = 0.0
    c0 = time.process_time()
    w0 = time.perf_counter()
    for start in range(0, pairs, BATCH):
        index = range(start, min(start + BATCH, pairs))
        t = time.perf_counter()
        panos, aerials = render_batch(world, cams[start:index.stop],
                                      [_pair_seed(0, i) for i in index], pano, aerial)
        t2 = time.perf_counter()
        for i, (pano_img, labels), aerial_img in zip(index, panos, aerials, strict=True):
            _save_jpeg(aerial_img, out / f"{region}-{i}-a.jpg")
            _save_jpeg(pano_img, out / f"{region}-{i}-p.jpg")
            _save_png(labels, out / f"{region}-{i}-l.png")
        write += time.perf_counter() - t2
        render += t2 - t
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    return {"region": region, "pairs": pairs, "pairs_per_s": pairs / wall,
            "cpu_pairs_per_s": pairs / cpu, "render_ms": 1000 * render / pairs,
            "write_ms": 1000 * write / pairs, "place_s": t_place}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--aerial", type=int, default=128)
    parser.add_argument("--pano", type=int, nargs=2, default=(64, 256), metavar=("H", "W"))
    parser.add_argument("--regions", nargs="*", default=list(REGIONS))
    args = parser.parse_args()
    print(f"synthetic world: {args.pairs} pairs per region, aerial {args.aerial}, "
          f"panorama {args.pano[0]}x{args.pano[1]}, 1 process")
    print(f"{'region':<10} {'pairs/s':>8} {'pairs/s(cpu)':>12} {'render ms':>10} "
          f"{'write ms':>9} {'2000 pairs':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for region in args.regions:
            r = bench(region, args.pairs, args.aerial, tuple(args.pano), Path(tmp))
            print(f"{r['region']:<10} {r['pairs_per_s']:>8.1f} {r['cpu_pairs_per_s']:>12.1f} "
                  f"{r['render_ms']:>10.1f} {r['write_ms']:>9.1f} "
                  f"{2000 / r['pairs_per_s']:>10.0f}s")


if __name__ == "__main__":
    main()
