"""How fast the synthetic world renders: pairs per second per region, one process.

A pair is one ray-cast panorama, one aerial tile, the panorama's label map and the two
one-view masks, each written to disk (JPEG/PNG) exactly as `generate` writes them
(cameras rendered in batches of `BATCH`). Sizes default to the quickstart's datasets'
former defaults (aerial 128, panorama 64 x 256). CPU time is the figure to read on a
shared machine (wall time is printed too).

The baseline, measured in the same run on the same cameras: the numpy-vectorised
renderer this project used before the compiled one (`benchmark/synthetic_world.py` at
git revision `--baseline-rev`, loaded from the repository's history; images and labels
only, as it had no masks). `--no-baseline` skips it.

    .venv/bin/python perf/bench_synthetic.py [--pairs 96] [--aerial 128] [--pano 64 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gengeo_bench import synthetic_world
from gengeo_bench.datasets.synthetic import (
    BATCH,
    _pair_seed,
    _save_jpeg,
    _save_mask,
    _save_png,
    camera_positions,
)
from gengeo_bench.synthetic_world import REGIONS, World

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "d8d4e49"  # the last revision with the numpy renderer


def load_baseline(rev: str, folder: Path):
    """The renderer module of revision `rev`, imported from a temporary file (or None)."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:benchmark/synthetic_world.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"baseline: cannot read revision {rev} ({exc}); skipped")
        return None
    path = folder / "baseline_world.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_world", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_world"] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def bench(module, region: str, cams, aerial: int, pano: tuple[int, int], out: Path,
          masks: bool) -> dict:
    """Render and write every pair of `cams`; CPU and wall seconds per pair."""
    world = module.World(region, 0)
    module.render_batch(world, cams[:1], [0], pano, aerial)  # first call: any lazy setup
    c0, w0 = time.process_time(), time.perf_counter()
    for start in range(0, len(cams), BATCH):
        index = range(start, min(start + BATCH, len(cams)))
        seeds = [_pair_seed(0, i) for i in index]
        if masks:
            panos, aerials = module.render_batch(world, cams[start:index.stop], seeds, pano, aerial,
                                                 masks=True)
        else:
            panos, aerials = module.render_batch(world, cams[start:index.stop], seeds, pano, aerial)
            panos = [(p, lab, None) for p, lab in panos]
            aerials = [(a, None) for a in aerials]
        for i, (pano_img, labels, p_mask), (aerial_img, a_mask) in zip(index, panos, aerials,
                                                                       strict=True):
            _save_jpeg(aerial_img, out / f"{region}-{i}-a.jpg")
            _save_jpeg(pano_img, out / f"{region}-{i}-p.jpg")
            _save_png(labels, out / f"{region}-{i}-l.png")
            if masks:
                _save_mask(a_mask, out / f"{region}-{i}-a.jpg")
                _save_mask(p_mask, out / f"{region}-{i}-p.jpg")
    cpu = time.process_time() - c0
    wall = time.perf_counter() - w0
    return {"cpu_pairs_per_s": len(cams) / cpu, "pairs_per_s": len(cams) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--aerial", type=int, default=128)
    parser.add_argument("--pano", type=int, nargs=2, default=(64, 256), metavar=("H", "W"))
    parser.add_argument("--regions", nargs="*", default=list(REGIONS))
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    pano = tuple(args.pano)
    print(f"synthetic world: {args.pairs} pairs per region, aerial {args.aerial}, "
          f"panorama {pano[0]}x{pano[1]}, 1 process; pairs/s in CPU time (wall in brackets)")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = None if args.no_baseline else load_baseline(args.baseline_rev, Path(tmp))
        head = f"{'region':<10} {'compiled':>16}"
        if baseline is not None:
            head += f" {'baseline ' + args.baseline_rev:>18} {'speed-up':>9}"
        print(head)
        for region in args.regions:
            cams = camera_positions(World(region, 0), args.pairs, REGIONS[region].tile_m, seed=0)
            new = bench(synthetic_world, region, cams, args.aerial, pano, Path(tmp), masks=True)
            line = (f"{region:<10} {new['cpu_pairs_per_s']:>7.1f} ({new['pairs_per_s']:>5.1f})"
                    f"{'':>2}")
            if baseline is not None:
                old = bench(baseline, region, cams, args.aerial, pano, Path(tmp), masks=False)
                line += (f" {old['cpu_pairs_per_s']:>9.1f} ({old['pairs_per_s']:>5.1f})"
                         f"  {new['cpu_pairs_per_s'] / old['cpu_pairs_per_s']:>7.2f}x")
            print(line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MiB (both renderers in this process)")


if __name__ == "__main__":
    main()
