"""The synthetic cross-view world: generated on demand, read back as CVUSA or VIGOR.

Paper: none; a procedural ray-cast world of this project (see
`benchmark/synthetic_world.py` for the conventions, and the three modules it names for the
regions, the scene and the cameras). It is
the embedded default that lets every command run on a laptop without a download, and it
is built to tell methods apart: ground and aerial views come from one 2.5-D scene, so
geometry (streets, building heights and gaps, tree positions) links them, while
vehicles, people and clouds exist only on the ground and roofs, yards behind walls and
cloud shadows only from above. Regions (`REGIONS`) differ in street layout, building
height and density, vegetation, palettes, ground-sample distance and camera height, so
training on one region and testing on another shows a transfer gap.

`generate(out, region, pairs, seed)` writes the CVUSA layout (or a VIGOR-like one with
`layout="vigor"`) plus `world.json`; `Synthetic(...)` generates into a cache once and
reads the pairs back.

Layouts written:

- `cvusa`: `bingmap/19/NNNNNNN.jpg` (aerial, north-up, centred on the camera),
  `streetview/panos/NNNNNNN.jpg` (panorama, north at the centre column, azimuth
  clockwise left to right), `streetview/annotations/NNNNNNN.png` (labels 0 sky,
  1 man-made, 2 ground, 3 vegetation), `splits/train-19zl.csv`, `splits/val-19zl.csv`
  (the test split), `split_locations/all.csv` (row id-1: sat_lat, sat_lon, ground_lat,
  ground_lon).
- `vigor`: `<City>/panorama/<panoid>,<lat>,<lon>,.jpg`,
  `<City>/satellite/satellite_<lat>_<lon>.png`, `splits/<City>/satellite_list.txt`,
  `same_area_balanced_train.txt`, `same_area_balanced_test.txt`,
  `pano_label_balanced.txt`. Tiles lie on a lattice with a stride of half a tile, so
  each panorama lies in the central quarter of one tile (its positive) and in three
  more (its semi-positives). A label line has 13 fields: the panorama name, then four
  `(satellite name, d0, d1)` triples, positive first; the panorama sits at pixel
  (row, col) = (size/2 + d0, size/2 - d1) of the tile (VIGOR's convention, in the
  tile's own pixels rather than 640).

One-view masks, in both layouts: every image has a mask in a `masks/` folder beside it,
named like the image with a `.png` suffix (`bingmap/19/masks/0000001.png`,
`streetview/panos/masks/0000001.png`, `<City>/satellite/masks/satellite_<lat>_<lon>.png`,
`<City>/panorama/masks/<panoid>,<lat>,<lon>,.png`): a 1-bit PNG of the image's size, 255
(True) where the pixel shows content only that view has (`mask_path(image)` gives the
path, `Synthetic.mask_paths(pair)` both of a pair's). Panorama: sky and clouds, vehicles
and people; aerial: cloud shadows and the aerial capture's own vehicles
(`world_render` says exactly what and how). `unmatched` (0..1, default 0.5: the world
as it was before the option) sets how much of each pair only one view shows: the
panoramas' vehicles and people (2u times the region's density), the aerial's
cloud-shadow cover (up to u) and, above 0.5, vehicles of the aerial's own.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from gengeo_bench.datasets.base import CheckReport, CrossViewDataset, EvalSplit, Pair
from gengeo_bench.errors import ConfigError, DataError
from gengeo_bench.world_regions import (
    DEFAULT_UNMATCHED,
    REGIONS,
    check_unmatched,
    describe_region,
    get_region,
    region_record,
)

if TYPE_CHECKING:
    from gengeo_bench.synthetic_world import World

# The scene and the cameras (`World`, `render_batch`) are imported where a world is
# generated: importing them loads their compiled numba functions (about 1.4 s), which a
# process that only reads a generated world (every Cell's) does not need.

__all__ = ["REGIONS", "GENERATOR_VERSION", "Synthetic", "describe_region", "generate", "mask_path"]

GENERATOR_VERSION = 1


# the modules whose source defines the rendered world (`synthetic_world` names the others)
SOURCE_MODULES = ("world_regions", "world_scene", "world_render", "synthetic_world")


def _generator_fingerprint() -> str:
    """A hash of the generator's modules (`SOURCE_MODULES` and this writer): a world cached
    by other code is regenerated even when nobody bumped GENERATOR_VERSION. Any edit to one
    of them costs one regeneration (seconds for the quickstart's regions)."""
    folder = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in SOURCE_MODULES:
        digest.update((folder / f"{name}.py").read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


GENERATOR_FINGERPRINT = _generator_fingerprint()
LAYOUTS = ("cvusa", "vigor")
DEFAULT_AERIAL = 128
DEFAULT_PANO = (64, 256)
JPEG_QUALITY = 90
BATCH = 8  # cameras per rendering job (the unit of work of a worker process)

# how many times `generate` has run in this process (tests check the cache with it)
generation_count = 0


# ---------------------------------------------------------------------------------------
# generation


def _check_args(region: str, pairs: int, layout: str, aerial_size: int, pano_size,
                test_fraction: float, unmatched: float = DEFAULT_UNMATCHED) -> None:
    get_region(region)  # ConfigError listing the known regions
    if not 0.0 <= float(unmatched) <= 1.0:
        raise ConfigError(f"synthetic: unmatched must be in [0, 1], got {unmatched}")
    if layout not in LAYOUTS:
        raise ConfigError(f"synthetic: unknown layout '{layout}'; expected one of {list(LAYOUTS)}")
    if int(pairs) < 2:
        raise ConfigError(f"synthetic: pairs must be at least 2, got {pairs}")
    if int(aerial_size) < 8:
        raise ConfigError(f"synthetic: aerial_size must be at least 8, got {aerial_size}")
    if len(tuple(pano_size)) != 2 or min(pano_size) < 4:
        raise ConfigError(f"synthetic: pano_size must be (height, width), got {pano_size}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"synthetic: test_fraction must be in (0, 1), got {test_fraction}")


def camera_positions(world: World, n: int, spacing: float, seed: int) -> np.ndarray:
    """`n` camera positions on the streets, at least `spacing` metres apart ([n, 2])."""
    region = world.region
    pitch = float(np.mean(region.block))
    side = max(np.sqrt(n * pitch * spacing / 1.2), 4 * spacing)
    for attempt in range(12):
        rng = np.random.default_rng([seed, 5, attempt])
        cand = rng.uniform(-side / 2, side / 2, size=(max(40 * n, 2000), 2)).astype(np.float32)
        on_road = np.zeros(len(cand), bool)
        for s in range(0, len(cand), 65536):
            chunk = cand[s:s + 65536]
            on_road[s:s + 65536] = world.sample(chunk[:, 0], chunk[:, 1], colors=False)["road"]
        cand = cand[on_road]
        chosen: list[tuple[float, float]] = []
        grid: dict[tuple[int, int], list[int]] = {}
        s2 = spacing * spacing
        for x, y in cand.tolist():
            gx, gy = int(np.floor(x / spacing)), int(np.floor(y / spacing))
            ok = True
            for ax in (gx - 1, gx, gx + 1):
                for ay in (gy - 1, gy, gy + 1):
                    for m in grid.get((ax, ay), ()):
                        px, py = chosen[m]
                        if (px - x) ** 2 + (py - y) ** 2 < s2:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if ok:
                grid.setdefault((gx, gy), []).append(len(chosen))
                chosen.append((x, y))
                if len(chosen) == n:
                    return np.asarray(chosen, dtype=np.float64)
        side *= 1.5
    raise DataError(f"synthetic: could not place {n} cameras in region '{region.name}'")


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=JPEG_QUALITY)


def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="PNG", compress_level=1)


def mask_path(image: Path | str) -> Path:
    """Where the one-view mask of a synthetic image is: `masks/<stem>.png` beside it."""
    image = Path(image)
    return image.parent / "masks" / f"{image.stem}.png"


def _save_mask(mask: np.ndarray, image: Path) -> None:
    """A boolean mask as a 1-bit PNG (reads back as 0/255 in mode L) at mask_path(image)."""
    path = mask_path(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=bool)).save(path, format="PNG")


def _pair_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _world_record(region: str, seed: int, pairs: int, layout: str, aerial_size: int,
                  pano_size, test_fraction: float, unmatched: float) -> dict:
    from gengeo_bench.synthetic_world import LABELS

    r = get_region(region)
    H, W = pano_size
    return {
        "generator": "gengeo-bench synthetic world",
        "generator_version": GENERATOR_VERSION,
        "generator_fingerprint": GENERATOR_FINGERPRINT,
        "region": region,
        "seed": int(seed),
        "pairs": int(pairs),
        "layout": layout,
        "aerial_size": int(aerial_size),
        "pano_size": [int(H), int(W)],
        "test_fraction": float(test_fraction),
        "unmatched": float(unmatched),
        "tile_m": r.tile_m,
        "gsd_m": r.tile_m / aerial_size,
        "cam_height_m": r.cam_height,
        "origin_latlon": list(r.origin),
        "conventions": {
            "world": "metres, x east, y north; lat = lat0 + y / 111320, "
                     "lon = lon0 + x / (111320 cos lat0)",
            "aerial": "orthographic, north up: row 0 is north, column 0 is west; pixel (r, c) "
                      "covers x = cx + (c + 0.5 - S/2) gsd, y = cy - (r + 0.5 - S/2) gsd",
            "panorama": "equirectangular, square pixels; column c looks at azimuth "
                        "360 c / W - 180 degrees clockwise from north: column 0 south, W/4 west, "
                        "W/2 north (centre), 3W/4 east; row r at elevation V/2 - (r + 0.5) V / H, "
                        "V = 360 H / W degrees, horizon between rows H/2 - 1 and H/2",
            "rotation": "rot90 of the aerial by k (counter-clockwise) matches rolling the "
                        "panorama by -k W/4 columns",
            "labels": {str(k): v for k, v in LABELS.items()},
            "vigor_offsets": "the panorama is at pixel (row, col) = (S/2 + d0, S/2 - d1) of a "
                             "tile of S pixels",
            "masks": "masks/<image stem>.png beside each image: 1-bit, 255 where the pixel "
                     "shows content only that view has (panorama: sky, clouds, vehicles, "
                     "people; aerial: cloud shadows, the aerial capture's vehicles)",
        },
        "region_params": region_record(region),
    }


def generate(
    out: Path | str,
    region: str,
    pairs: int,
    seed: int,
    layout: str = "cvusa",
    aerial_size: int = DEFAULT_AERIAL,
    pano_size: tuple[int, int] = DEFAULT_PANO,
    test_fraction: float = 0.2,
    *,
    city: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    unmatched: float = DEFAULT_UNMATCHED,
) -> Path:
    """Render `pairs` ground/aerial pairs of `region` into `out`; returns `out`.

    Deterministic: the same arguments give byte-identical files, whatever `workers`
    (processes rendering batches of cameras in parallel). `world.json` (written last)
    describes the region, the seed, the sizes and the conventions. `city` names the city
    folder of the VIGOR layout (default: the region's name in CamelCase). `unmatched`
    sets how much of each pair only one view shows (the module docstring).
    """
    global generation_count
    _check_args(region, pairs, layout, aerial_size, pano_size, test_fraction, unmatched)
    unmatched = check_unmatched(unmatched)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = _world(region, seed)
    pano_size = (int(pano_size[0]), int(pano_size[1]))
    record = _world_record(region, seed, pairs, layout, aerial_size, pano_size, test_fraction,
                           unmatched)
    if layout == "cvusa":
        record.update(_generate_cvusa(out, world, pairs, seed, aerial_size, pano_size,
                                      test_fraction, progress, workers, unmatched))
    else:
        record.update(_generate_vigor(out, world, pairs, seed, aerial_size, pano_size,
                                      test_fraction, city, progress, workers, unmatched))
    record["complete"] = True
    (out / "world.json").write_text(json.dumps(record, indent=2) + "\n")
    generation_count += 1
    return out


def _split(n: int, seed: int, test_fraction: float) -> np.ndarray:
    """A boolean mask of the test items (a seeded random share)."""
    n_test = min(max(1, int(round(n * test_fraction))), n - 1)
    perm = np.random.default_rng([seed, 17]).permutation(n)
    test = np.zeros(n, bool)
    test[perm[:n_test]] = True
    return test


@lru_cache(maxsize=4)
def _world(region: str, seed: int) -> World:
    from gengeo_bench.synthetic_world import World

    return World(region, seed)


def _render_job(job: tuple) -> int:
    """Render one batch of cameras and write its files and masks (in a worker process)."""
    from gengeo_bench.synthetic_world import render_batch

    kind, region, seed, cams, seeds, pano_size, aerial_size, paths, unmatched = job
    world = _world(region, seed)
    if kind == "pair":
        panos, aerials = render_batch(world, cams, seeds, pano_size, aerial_size,
                                      unmatched=unmatched, masks=True)
        for (pano, labels, p_mask), (aerial, a_mask), (p_aer, p_pano, p_ann) in zip(
                panos, aerials, paths, strict=True):
            _save_jpeg(aerial, p_aer)
            _save_mask(a_mask, p_aer)
            _save_jpeg(pano, p_pano)
            _save_mask(p_mask, p_pano)
            _save_png(labels, p_ann)
    elif kind == "tile":
        _, aerials = render_batch(world, cams, seeds, None, aerial_size, unmatched=unmatched,
                                  masks=True)
        for (aerial, mask), path in zip(aerials, paths, strict=True):
            _save_png(aerial, path)
            _save_mask(mask, path)
    else:
        panos, _ = render_batch(world, cams, seeds, pano_size, None, unmatched=unmatched,
                                masks=True)
        for (pano, _labels, mask), path in zip(panos, paths, strict=True):
            _save_jpeg(pano, path)
            _save_mask(mask, path)
    return len(cams)


def _run_jobs(jobs: list, workers: int, progress, done: int, total: int) -> int:
    if workers <= 1 or len(jobs) < 2:
        results = map(_render_job, jobs)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        results = pool.map(_render_job, jobs)
    try:
        for n in results:
            done += n
            if progress is not None:
                progress(done, total)
    finally:
        if pool is not None:
            pool.shutdown()
    return done


def _generate_cvusa(out, world, pairs, seed, aerial_size, pano_size, test_fraction,
                    progress, workers, unmatched) -> dict:
    region = world.region
    cams = camera_positions(world, pairs, region.tile_m, seed)
    aer_dir = out / "bingmap" / "19"
    pano_dir = out / "streetview" / "panos"
    ann_dir = out / "streetview" / "annotations"
    for d in (aer_dir, pano_dir, ann_dir, out / "splits", out / "split_locations"):
        d.mkdir(parents=True, exist_ok=True)
    lat, lon = world.latlon(cams[:, 0], cams[:, 1])
    ids = [f"{i + 1:07d}" for i in range(pairs)]
    jobs = []
    for start in range(0, pairs, BATCH):
        index = range(start, min(start + BATCH, pairs))
        paths = [(aer_dir / f"{ids[i]}.jpg", pano_dir / f"{ids[i]}.jpg",
                  ann_dir / f"{ids[i]}.png") for i in index]
        jobs.append(("pair", world.region.name, world.seed, cams[start:index.stop],
                     [_pair_seed(seed, i) for i in index], pano_size, aerial_size, paths,
                     unmatched))
    _run_jobs(jobs, workers, progress, 0, pairs)
    lines = [f"bingmap/19/{pid}.jpg,streetview/panos/{pid}.jpg,streetview/annotations/{pid}.png"
             for pid in ids]
    test = _split(pairs, seed, test_fraction)
    train_lines = [ln for ln, t in zip(lines, test, strict=True) if not t]
    test_lines = [ln for ln, t in zip(lines, test, strict=True) if t]
    (out / "splits" / "train-19zl.csv").write_text("\n".join(train_lines) + "\n")
    (out / "splits" / "val-19zl.csv").write_text("\n".join(test_lines) + "\n")
    rows = [f"{a:.8f},{b:.8f},{a:.8f},{b:.8f}" for a, b in zip(lat, lon, strict=True)]
    (out / "split_locations" / "all.csv").write_text("\n".join(rows) + "\n")
    return {"train": len(train_lines), "test": len(test_lines),
            "extent_m": [float(cams[:, 0].min()), float(cams[:, 1].min()),
                         float(cams[:, 0].max()), float(cams[:, 1].max())]}


def city_name(region: str) -> str:
    return "".join(part.capitalize() for part in region.split("_"))


def _panoid(seed: int, region: str, index: int) -> str:
    digest = hashlib.blake2b(f"{region}:{seed}:{index}".encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


def vigor_tiles(xy: np.ndarray, tile_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice indices of each point's positive tile and of its three semi-positives.

    Tiles are centred on the lattice (a, b) * tile_m / 2. Returns ([n, 4, 2] int lattice
    indices, positive first; [n, 2] offsets in metres from the positive tile's centre).
    """
    stride = tile_m / 2
    a = np.round(xy / stride).astype(np.int64)
    off = xy - a * stride
    sgn = np.where(off >= 0, 1, -1)
    tiles = np.stack([a, a + sgn * [1, 0], a + sgn * [0, 1], a + sgn], axis=1)
    return tiles, off


def _generate_vigor(out, world, pairs, seed, aerial_size, pano_size, test_fraction, city,
                    progress, workers, unmatched) -> dict:
    region = world.region
    city = city or city_name(region.name)
    tile_m = region.tile_m
    gsd = tile_m / aerial_size
    cams = camera_positions(world, pairs, tile_m / 4, seed)
    tiles, _ = vigor_tiles(cams, tile_m)
    unique = sorted({(int(a), int(b)) for a, b in tiles.reshape(-1, 2)})
    stride = tile_m / 2
    pano_dir = out / city / "panorama"
    sat_dir = out / city / "satellite"
    split_dir = out / "splits" / city
    for d in (pano_dir, sat_dir, split_dir):
        d.mkdir(parents=True, exist_ok=True)
    sat_names = {}
    for a, b in unique:
        lat, lon = world.latlon(a * stride, b * stride)
        sat_names[(a, b)] = f"satellite_{float(lat)!r}_{float(lon)!r}.png"
    names = []
    for index, (x, y) in enumerate(cams):
        lat, lon = world.latlon(x, y)
        names.append(f"{_panoid(seed, region.name, index)},{float(lat):.6f},{float(lon):.6f},.jpg")
    jobs = []
    for start in range(0, len(unique), BATCH):
        chunk = unique[start:start + BATCH]
        jobs.append(("tile", region.name, world.seed, [(a * stride, b * stride) for a, b in chunk],
                     [_pair_seed(seed, 10_000_000 + (a & 0xFFFF) * 65536 + (b & 0xFFFF))
                      for a, b in chunk], pano_size, aerial_size,
                     [sat_dir / sat_names[key] for key in chunk], unmatched))
    for start in range(0, pairs, BATCH):
        index = range(start, min(start + BATCH, pairs))
        jobs.append(("pano", region.name, world.seed, cams[start:index.stop],
                     [_pair_seed(seed, i) for i in index], pano_size, aerial_size,
                     [pano_dir / names[i] for i in index], unmatched))
    _run_jobs(jobs, workers, progress, 0, len(unique) + pairs)
    lines = []
    for index, (x, y) in enumerate(cams):
        pano_name = names[index]
        fields = [pano_name]
        for a, b in tiles[index]:
            cx, cy = a * stride, b * stride
            d0 = (cy - y) / gsd  # row = S/2 + d0 (south is down)
            d1 = (cx - x) / gsd  # col = S/2 - d1 (east is right)
            fields += [sat_names[(int(a), int(b))], f"{d0:.1f}", f"{d1:.1f}"]
        lines.append(" ".join(fields))
    test = _split(pairs, seed, test_fraction)
    (split_dir / "satellite_list.txt").write_text("\n".join(sat_names[t] for t in unique) + "\n")
    (split_dir / "same_area_balanced_train.txt").write_text(
        "\n".join(ln for ln, t in zip(lines, test, strict=True) if not t) + "\n")
    (split_dir / "same_area_balanced_test.txt").write_text(
        "\n".join(ln for ln, t in zip(lines, test, strict=True) if t) + "\n")
    (split_dir / "pano_label_balanced.txt").write_text("\n".join(lines) + "\n")
    return {"city": city, "tiles": len(unique), "train": int((~test).sum()),
            "test": int(test.sum()), "tile_stride_m": stride}


# ---------------------------------------------------------------------------------------
# the cache


def cache_root() -> Path:
    """`$GENGEO_CACHE` or ~/.cache/gengeo-bench."""
    env = os.environ.get("GENGEO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gengeo-bench"


def cache_dir(region: str, pairs: int, seed: int, layout: str,
              aerial_size: int = DEFAULT_AERIAL, pano_size=DEFAULT_PANO,
              unmatched: float = DEFAULT_UNMATCHED) -> Path:
    name = f"{region}-{pairs}-{seed}-{layout}"
    if int(aerial_size) != DEFAULT_AERIAL or tuple(pano_size) != DEFAULT_PANO:
        name += f"-a{aerial_size}-p{pano_size[0]}x{pano_size[1]}"
    if float(unmatched) != DEFAULT_UNMATCHED:
        name += f"-u{float(unmatched):g}"
    return cache_root() / "synthetic" / name


def _read_record(root: Path) -> dict | None:
    try:
        record = json.loads((root / "world.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(root: Path, **expect) -> bool:
    """True when `root` holds a finished generation (world.json written last) whose
    record matches `expect` (and the current generator version and code)."""
    record = _read_record(Path(root))
    if not record or record.get("complete") is not True:
        return False
    if (record.get("generator_version") != GENERATOR_VERSION
            or record.get("generator_fingerprint") != GENERATOR_FINGERPRINT):
        return False
    for key, value in expect.items():
        got = record.get(key)
        if key == "pano_size":
            got, value = list(got or []), [int(v) for v in value]
        if got != value:
            return False
    return True


def default_workers(pairs: int) -> int:
    """Processes for a cache generation: `$GENGEO_WORKERS`, else up to 4 cores for
    worlds of 256 pairs or more (the result does not depend on it)."""
    env = os.environ.get("GENGEO_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError as exc:
            raise ConfigError(f"GENGEO_WORKERS must be an integer, got {env!r}") from exc
    return 1 if pairs < 256 else max(1, min(4, os.cpu_count() or 1))


def _remove_stale_temps(target: Path) -> None:
    """Delete temp dirs of this target left by generations whose process has died."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def ensure_generated(target: Path, region: str, pairs: int, seed: int, layout: str,
                     aerial_size: int = DEFAULT_AERIAL, pano_size=DEFAULT_PANO,
                     test_fraction: float = 0.2, unmatched: float = DEFAULT_UNMATCHED) -> Path:
    """Generate into `target` unless a complete, matching generation is already there.

    The world is written into a temporary sibling directory and renamed into place, so
    a killed generation never leaves a directory that looks complete; a stale or
    half-written `target` is replaced. Processes that need the same world at once (several
    workers on one matrix) take turns on a lock file beside it: one generates, the others
    wait and find it complete.
    """
    target = Path(target)
    expect = dict(region=region, pairs=int(pairs), seed=int(seed), layout=layout,
                  aerial_size=int(aerial_size), pano_size=pano_size, unmatched=float(unmatched))
    if is_complete(target, **expect):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if is_complete(target, **expect):  # generated by whoever held the lock before
            return target
        return _generate_into(target, expect, region, pairs, seed, layout, aerial_size, pano_size,
                              test_fraction, unmatched)


def _generate_into(target: Path, expect: dict, region: str, pairs: int, seed: int, layout: str,
                   aerial_size: int, pano_size, test_fraction: float, unmatched: float) -> Path:
    _remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate(tmp, region, pairs, seed, layout, aerial_size, pano_size, test_fraction,
                 workers=default_workers(pairs), unmatched=unmatched)
        if target.exists() and not is_complete(target, **expect):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target, **expect):  # not a concurrent twin: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------
# the dataset


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the split file ({exc})") from exc


def read_cvusa_split(root: Path, split: str) -> list[Pair]:
    """Pairs of a CVUSA-layout split (`train` -> train-19zl.csv, `test` -> val-19zl.csv)."""
    name = {"train": "train-19zl.csv", "test": "val-19zl.csv"}[split]
    path = root / "splits" / name
    locations = {}
    loc_file = root / "split_locations" / "all.csv"
    if loc_file.exists():
        for row, line in enumerate(_read_lines(loc_file)):
            fields = line.split(",")
            locations[row + 1] = (float(fields[2]), float(fields[3]))
    pairs = []
    for n, line in enumerate(_read_lines(path)):
        fields = line.split(",")
        if len(fields) != 3:
            raise DataError(f"{path}:{n + 1}: expected 3 comma-separated fields, got {line!r}")
        pid = Path(fields[0]).stem
        pairs.append(Pair(id=pid, ground=root / fields[1], aerial=root / fields[0],
                          location=locations.get(int(pid)) if pid.isdigit() else None))
    return pairs


def _latlon_from_name(name: str) -> tuple[float, float]:
    if name.startswith("satellite_"):
        lat, lon = name[len("satellite_"):-len(".png")].split("_")
    else:
        _, lat, lon, _ = name.split(",")
    return float(lat), float(lon)


class Synthetic(CrossViewDataset):
    """The procedural world as a dataset; generated into a cache on first use.

    `root=None` generates into `$GENGEO_CACHE` (or ~/.cache/gengeo-bench)
    `/synthetic/<region>-<pairs>-<seed>-<layout>/`, once; an existing complete
    generation is reused. With a `root`, an existing world (or any directory in the same
    layout) is read as it is, and an empty or missing `root` is generated into.

    `unmatched` (0..1, default 0.5) sets how much of each pair only one view shows; a
    world with another value is cached under its own name (`-u<value>`). Each image's
    one-view mask is at `mask_path(image)`: `masks/<stem>.png` beside it (1-bit PNG, 255
    where the pixel shows content only that view has); `mask_paths(pair)` gives a pair's.
    """

    name = "synthetic"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        region: str = "grid_city",
        pairs: Annotated[int, Field(ge=2)] = 2000,
        seed: int = 0,
        layout: Literal["cvusa", "vigor"] = "cvusa",
        aerial_size: Annotated[int, Field(ge=8)] = DEFAULT_AERIAL,
        pano_size: tuple[int, int] = DEFAULT_PANO,
        unmatched: Annotated[float, Field(ge=0.0, le=1.0)] = DEFAULT_UNMATCHED,
    ):
        if split not in ("train", "test"):
            raise ConfigError(f"synthetic: unknown split '{split}'; expected 'train' or 'test'")
        _check_args(region, pairs, layout, aerial_size, pano_size, 0.2, unmatched)
        pano_size = (int(pano_size[0]), int(pano_size[1]))
        if root is None:
            root = ensure_generated(
                cache_dir(region, pairs, seed, layout, aerial_size, pano_size, unmatched),
                region, pairs, seed, layout, aerial_size, pano_size, unmatched=unmatched)
        else:
            root = Path(root).expanduser()
            if _read_record(root) is None and not (root / "splits").is_dir():
                if root.exists() and any(root.iterdir()):
                    raise DataError(
                        f"{root}: neither a synthetic world (no world.json) nor an empty "
                        "directory to generate one into; pass root=None to use the cache")
                ensure_generated(root, region, pairs, seed, layout, aerial_size, pano_size,
                                 unmatched=unmatched)
        super().__init__(root, split)
        record = _read_record(self.root) or {}
        self.region = record.get("region", region)
        self.layout = record.get("layout", layout)
        self.aerial_size = int(record.get("aerial_size", aerial_size))
        self.record = record
        self._eval: EvalSplit | None = None
        if self.layout == "cvusa":
            self.pairs = read_cvusa_split(self.root, split)
        else:
            self._read_vigor()

    # --- VIGOR-like layout
    def _vigor_files(self) -> list[tuple[str, Path]]:
        split_root = self.root / "splits"
        name = f"same_area_balanced_{self.split}.txt"
        cities = sorted(p.name for p in split_root.iterdir() if (p / name).exists())
        if not cities:
            raise DataError(f"{split_root}: no <City>/{name}")
        return [(c, split_root / c / name) for c in cities]

    def _read_vigor(self) -> None:
        S = self.aerial_size
        gallery, gallery_ids, gallery_loc, index = [], [], [], {}
        queries, qids, qloc, gt, semi, offsets, pairs = [], [], [], [], [], [], []
        for city, path in self._vigor_files():
            for name in _read_lines(self.root / "splits" / city / "satellite_list.txt"):
                index[(city, name)] = len(gallery)
                gallery.append(self.root / city / "satellite" / name)
                gallery_ids.append(f"{city}/{name}")
                gallery_loc.append(_latlon_from_name(name))
            for n, line in enumerate(_read_lines(path)):
                f = line.split(" ")
                if len(f) != 13:
                    raise DataError(f"{path}:{n + 1}: expected 13 fields, got {len(f)}")
                sats = [index[(city, f[1 + 3 * m])] for m in range(4)]
                d0, d1 = float(f[2]), float(f[3])
                ground = self.root / city / "panorama" / f[0]
                loc = _latlon_from_name(f[0])
                off = (S / 2 + d0, S / 2 - d1)
                pairs.append(Pair(id=f[0].split(",")[0], ground=ground, aerial=gallery[sats[0]],
                                  location=loc, offset=off))
                queries.append(ground)
                qids.append(pairs[-1].id)
                qloc.append(loc)
                gt.append(sats[0])
                semi.append(sats[1:])
                offsets.append(off)
        self.pairs = pairs
        self._eval = EvalSplit(
            query_ids=qids, queries=queries, gallery_ids=gallery_ids, gallery=gallery,
            gt=np.asarray(gt, np.int64), semi_positives=np.asarray(semi, np.int64).reshape(-1, 3),
            query_locations=np.asarray(qloc, np.float64).reshape(-1, 2),
            gallery_locations=np.asarray(gallery_loc, np.float64).reshape(-1, 2),
            offsets=np.asarray(offsets, np.float64).reshape(-1, 2),
        )

    def mask_paths(self, pair: Pair) -> tuple[Path, Path]:
        """The one-view masks of a pair: (ground, aerial), `mask_path` of each image."""
        return mask_path(pair.ground), mask_path(pair.aerial)

    def evaluation(self) -> EvalSplit:
        if self._eval is not None:
            return self._eval
        return super().evaluation()

    def split_files(self) -> list[Path]:
        if self.layout == "cvusa":
            name = {"train": "train-19zl.csv", "test": "val-19zl.csv"}[self.split]
            return [self.root / "splits" / name]
        return [path for _, path in self._vigor_files()]

    def check(self, decode: bool = False) -> CheckReport:
        """Missing files, and with `decode=True` unreadable or wrongly sized images."""
        report = CheckReport(dataset=self.name, root=self.root, split=self.split)
        ev = self.evaluation()
        files = list(dict.fromkeys(ev.queries + ev.gallery))
        report.counts = {"pairs": len(self.pairs), "queries": len(ev.queries),
                         "gallery": len(ev.gallery)}
        H, W = self.record.get("pano_size", DEFAULT_PANO)
        query_set = set(ev.queries)
        for path in files:
            if not path.exists():
                report.missing.append(path)
                continue
            if decode:
                try:
                    with Image.open(path) as im:
                        im.load()
                        size = im.size
                except OSError as exc:
                    report.unreadable.append((path, str(exc)))
                    continue
                want = (W, H) if path in query_set else (self.aerial_size,) * 2
                if size != tuple(want):
                    report.wrong_size.append((path, size, tuple(want)))
        return report

    def __repr__(self) -> str:
        return (f"Synthetic(region={self.region!r}, layout={self.layout!r}, split={self.split!r}, "
                f"pairs={len(self.pairs)}, root='{self.root}')")
