"""The synthetic cross-view world: layouts, determinism, geometry and the cache."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gengeo_bench.datasets import synthetic as syn
from gengeo_bench.datasets.base import Pair
from gengeo_bench.errors import ConfigError
from gengeo_bench.synthetic_world import (
    GROUND,
    MANMADE,
    REGIONS,
    SKY,
    STYLES,
    Box,
    World,
    describe_region,
    render_aerial,
    render_batch,
    render_panorama,
)

SMALL = dict(aerial_size=32, pano_size=(16, 64))


@pytest.fixture(scope="module")
def cvusa_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cvusa") / "world"
    return syn.generate(out, "suburb", 20, seed=3, test_fraction=0.25, **SMALL)


@pytest.fixture(scope="module")
def vigor_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vigor") / "world"
    return syn.generate(out, "grid_city", 16, seed=1, layout="vigor", **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- regions ---------------------------------------------------------------------------


def test_regions_are_named_and_described():
    assert {"grid_city", "suburb", "rural"} <= set(REGIONS)
    for name in REGIONS:
        text = describe_region(name)
        assert text.startswith(name) and "camera height" in text
    # regions differ in what the brief asks them to differ in
    city, suburb, rural = REGIONS["grid_city"], REGIONS["suburb"], REGIONS["rural"]
    assert city.organic == 0 and suburb.organic > 0 and rural.organic > 0

    def mean_height(region):
        return sum(STYLES[k].height_median * w for k, w in region.styles.items())

    assert mean_height(city) > 1.8 * mean_height(suburb) > 1.8 * 4.0
    assert city.styles["tower"] >= 0.4 and suburb.styles["house"] >= 0.5
    assert rural.landuse["field"] > 5 * max(city.landuse["field"], suburb.landuse["field"])
    assert len({city.tile_m, suburb.tile_m, rural.tile_m}) == 3
    assert len({city.cam_height, suburb.cam_height, rural.cam_height}) == 3


def test_unknown_region_is_a_config_error_listing_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        syn.Synthetic(root=tmp_path / "x", region="atlantis", pairs=4)
    for name in REGIONS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="grid_city"):
        syn.generate(tmp_path / "y", "atlantis", 4, 0)
    with pytest.raises(ConfigError, match="layout"):
        syn.generate(tmp_path / "z", "suburb", 4, 0, layout="kitti")


# --- determinism -----------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, cvusa_world):
    again = syn.generate(tmp_path / "again", "suburb", 20, seed=3, test_fraction=0.25, **SMALL)
    a, b = _files(cvusa_world), _files(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    parallel = syn.generate(tmp_path / "parallel", "suburb", 20, seed=3, test_fraction=0.25,
                            workers=2, **SMALL)
    assert _files(parallel) == a  # worker processes do not change a byte
    other = _files(syn.generate(tmp_path / "other", "suburb", 20, seed=4, test_fraction=0.25,
                                **SMALL))
    for sub in ("bingmap/19/0000001.jpg", "streetview/panos/0000001.jpg"):
        assert other[sub] != a[sub]


# --- the CVUSA layout ------------------------------------------------------------------


def test_cvusa_layout_and_split_lines(cvusa_world):
    root = cvusa_world
    pattern = re.compile(
        r"^bingmap/19/(\d{7})\.jpg,streetview/panos/\1\.jpg,streetview/annotations/\1\.png$")
    ids = []
    for name in ("train-19zl.csv", "val-19zl.csv"):
        lines = (root / "splits" / name).read_text().splitlines()
        assert lines
        for line in lines:
            m = pattern.match(line)
            assert m, line
            assert len(line.split(",")) == 3
            ids.append(int(m.group(1)))
            for field in line.split(","):
                assert (root / field).is_file()
    assert sorted(ids) == list(range(1, 21))  # every id exactly once across the splits
    n_test = len((root / "splits" / "val-19zl.csv").read_text().splitlines())
    assert n_test == 5
    pano = Image.open(root / "streetview/panos/0000001.jpg")
    aerial = Image.open(root / "bingmap/19/0000001.jpg")
    labels = Image.open(root / "streetview/annotations/0000001.png")
    assert pano.size == (64, 16) and aerial.size == (32, 32)
    assert labels.mode == "L" and labels.size == (64, 16)
    values = np.unique(np.asarray(labels))
    assert set(values.tolist()) <= {0, 1, 2, 3} and SKY in values and GROUND in values


def test_split_locations_rows(cvusa_world):
    rows = (cvusa_world / "split_locations" / "all.csv").read_text().splitlines()
    assert len(rows) == 20
    lat0, lon0 = REGIONS["suburb"].origin
    for row in rows:
        sat_lat, sat_lon, g_lat, g_lon = (float(v) for v in row.split(","))
        assert (sat_lat, sat_lon) == (g_lat, g_lon)  # tiles are centred on the camera
        assert abs(sat_lat - lat0) < 0.1 and abs(sat_lon - lon0) < 0.1
    coords = {tuple(r.split(",")[:2]) for r in rows}
    assert len(coords) == 20
    record = json.loads((cvusa_world / "world.json").read_text())
    assert record["complete"] is True and record["region"] == "suburb" and record["seed"] == 3
    assert record["pano_size"] == [16, 64] and record["aerial_size"] == 32
    assert "north" in record["conventions"]["panorama"]


def test_cameras_are_spread_out_on_the_streets():
    world = World("grid_city", 0)
    cams = syn.camera_positions(world, 50, REGIONS["grid_city"].tile_m, seed=0)
    assert world.sample(cams[:, 0], cams[:, 1], colors=False)["road"].all()
    d = np.sqrt(((cams[:, None] - cams[None]) ** 2).sum(-1)) + np.eye(50) * 1e9
    assert d.min() >= REGIONS["grid_city"].tile_m - 1e-3


# --- the VIGOR-like layout -------------------------------------------------------------


def test_vigor_layout_labels(vigor_world):
    root = vigor_world
    city = "GridCity"
    S = 32
    gsd = REGIONS["grid_city"].tile_m / S
    sats = set((root / "splits" / city / "satellite_list.txt").read_text().split())
    for name in sats:
        assert re.match(r"^satellite_-?\d+\.\d+_-?\d+\.\d+\.png$", name)
        assert (root / city / "satellite" / name).is_file()
    lines = (root / "splits" / city / "pano_label_balanced.txt").read_text().splitlines()
    train = (root / "splits" / city / "same_area_balanced_train.txt").read_text().splitlines()
    test = (root / "splits" / city / "same_area_balanced_test.txt").read_text().splitlines()
    assert len(lines) == 16 and sorted(train + test) == sorted(lines)
    for line in lines:
        f = line.split(" ")
        assert len(f) == 13
        pano = f[0]
        assert re.match(r"^[A-Za-z0-9_-]{22},-?\d+\.\d{6},-?\d+\.\d{6},\.jpg$", pano)
        assert (root / city / "panorama" / pano).is_file()
        p_lat, p_lon = float(pano.split(",")[1]), float(pano.split(",")[2])
        names = [f[1 + 3 * m] for m in range(4)]
        assert len(set(names)) == 4 and set(names) <= sats
        for m, name in enumerate(names):
            d0, d1 = float(f[2 + 3 * m]), float(f[3 + 3 * m])
            row, col = S / 2 + d0, S / 2 - d1
            assert 0 <= row < S and 0 <= col < S  # every listed tile contains the panorama
            if m == 0:  # the positive: central quarter
                assert abs(d0) <= S / 4 + 0.1 and abs(d1) <= S / 4 + 0.1
            # the offsets agree with the names' coordinates (north up, east right)
            t_lat, t_lon = (float(v) for v in name[len("satellite_"):-4].split("_"))
            north_m = (t_lat - p_lat) * 111_320
            east_m = (p_lon - t_lon) * 111_320 * math.cos(math.radians(t_lat))
            assert abs(d0 - north_m / gsd) < 0.6  # tile centre north of the camera: row > S/2
            assert abs(-d1 - east_m / gsd) < 0.6


def test_vigor_dataset_reads_semi_positives(vigor_world):
    ds = syn.Synthetic(root=vigor_world, split="test", layout="vigor", **SMALL)
    ev = ds.evaluation()
    assert len(ev) == len(ds.pairs) > 0
    assert ev.semi_positives.shape == (len(ev), 3)
    assert not (ev.semi_positives == ev.gt[:, None]).any()
    assert ev.offsets.shape == (len(ev), 2)
    assert (np.abs(ev.offsets - 16) <= 8.1).all()
    assert len(ev.gallery) == len(set(ev.gallery))
    assert all(p.exists() for p in ev.gallery)


# --- geometry: the panorama is the view from the tile centre ---------------------------


def _bearing_box(bearing_deg, dist, half, height, facade, roof=(90, 90, 90), ground_only=False):
    cx = dist * math.sin(math.radians(bearing_deg))
    cy = dist * math.cos(math.radians(bearing_deg))
    return Box(cx - half, cy - half, cx + half, cy + half, height, facade, roof, ground_only)


def _entry_distance(bearing_deg, dist, half):
    """Where the ray at `bearing_deg` enters the box centred `dist` away (slab method)."""
    d = (math.sin(math.radians(bearing_deg)), math.cos(math.radians(bearing_deg)))
    c = (dist * d[0], dist * d[1])
    t = 0.0
    for ca, da in zip(c, d, strict=True):
        if abs(da) > 1e-9:
            t = max(t, min((ca - half) / da, (ca + half) / da))
    return t


def _colour_mask(img, rgb, tol=6):
    return (np.abs(img.astype(int) - np.asarray(rgb)).max(-1) <= tol)


@pytest.mark.parametrize("bearing", [0.0, 45.0, 90.0, 200.0, 300.0])
def test_building_appears_at_its_bearing_and_angular_height(bearing):
    H, W = 64, 256
    region = REGIONS["grid_city"]
    cam = region.cam_height
    dist, half, height = 30.0, 3.0, 25.0
    facade = (250, 20, 200)
    world = World(region, 0, procedural=False, boxes=[_bearing_box(bearing, dist, half, height,
                                                                   facade)])
    pano, labels = render_panorama(world, 0.0, 0.0, (H, W), seed=0, transients=False, clean=True)
    mask = _colour_mask(pano, facade)
    assert mask.any()
    cols = np.nonzero(mask.any(0))[0]
    # azimuth 0 (north) at the centre column, clockwise to the right; wrap around
    expected_col = ((bearing + 180.0) % 360.0) / 360.0 * W
    centre = math.degrees(math.atan2(np.sin(cols / W * 2 * np.pi - np.pi).mean(),
                                     np.cos(cols / W * 2 * np.pi - np.pi).mean()))
    got_col = (centre + 180.0) / 360.0 * W
    assert abs((got_col - expected_col + W / 2) % W - W / 2) <= 1.5
    # the angular half-width seen from the camera (at least that of the near face)
    width_deg = len(cols) * 360.0 / W
    near = math.degrees(2 * math.atan(half / (dist - half)))
    assert near - 3 <= width_deg <= near * 1.45 + 3
    # angular height of the top edge at the box's centre column
    c = int(round(expected_col)) % W
    top_row = np.nonzero(mask[:, c])[0].min()
    face_dist = _entry_distance(bearing, dist, half)
    elev = math.degrees(math.atan((height - cam) / face_dist))
    V = 360.0 * H / W
    expected_row = (V / 2 - elev) / (V / H) - 0.5
    assert abs(top_row - expected_row) <= 2.0
    assert (labels[mask] == MANMADE).all()


def test_a_lower_building_behind_is_occluded_and_visible_alone():
    H, W = 64, 256
    front = _bearing_box(60.0, 20.0, 4.0, 30.0, (250, 20, 200))
    behind = _bearing_box(60.0, 45.0, 2.0, 12.0, (20, 240, 60))
    region = REGIONS["suburb"]
    both = World(region, 0, procedural=False, boxes=[front, behind])
    alone = World(region, 0, procedural=False, boxes=[behind])
    pano_both, _ = render_panorama(both, 0.0, 0.0, (H, W), transients=False, clean=True)
    pano_alone, _ = render_panorama(alone, 0.0, 0.0, (H, W), transients=False, clean=True)
    green = (20, 240, 60)
    assert _colour_mask(pano_alone, green).sum() >= 6
    assert _colour_mask(pano_both, green).sum() == 0


def test_building_appears_at_the_right_aerial_pixels():
    S = 64
    region = REGIONS["grid_city"]
    gsd = region.tile_m / S
    roof = (10, 200, 250)
    box = Box(5.0, -12.0, 17.0, 3.0, 20.0, (200, 200, 200), roof)
    world = World(region, 0, procedural=False, boxes=[box])
    aerial = render_aerial(world, 0.0, 0.0, S, clean=True)
    got = _colour_mask(aerial, roof)
    rows, cols = np.mgrid[0:S, 0:S]
    x = (cols + 0.5 - S / 2) * gsd
    y = -(rows + 0.5 - S / 2) * gsd
    want = (x >= box.x0) & (x < box.x1) & (y >= box.y0) & (y < box.y1)
    assert want.sum() > 50
    assert (got == want).all()


def test_ground_only_objects_never_appear_from_above():
    region = REGIONS["suburb"]
    without = World(region, 5)
    x, y = syn.camera_positions(without, 1, 50.0, seed=0)[0]
    car = _bearing_box(135.0, 5.0, 1.0, 1.6, (255, 0, 255), (255, 0, 255), ground_only=True)
    car = Box(car.x0 + x, car.y0 + y, car.x1 + x, car.y1 + y, car.height, car.facade, car.roof,
              True)
    with_car = World(region, 5, boxes=[car])
    pano, labels = render_panorama(with_car, x, y, (64, 256), transients=False, clean=True)
    magenta = _colour_mask(pano, (255, 0, 255))
    assert magenta.sum() >= 4 and (labels[magenta] == MANMADE).all()
    cols = np.nonzero(magenta.any(0))[0]
    assert abs(cols.mean() - (135 + 180) / 360 * 256) < 3
    a1 = render_aerial(with_car, x, y, 64, seed=2)
    a2 = render_aerial(without, x, y, 64, seed=2)
    assert np.array_equal(a1, a2)
    assert _colour_mask(render_aerial(with_car, x, y, 64, clean=True), (255, 0, 255)).sum() == 0


def test_procedural_vehicles_are_on_the_ground_view_only():
    world = World("grid_city", 0)
    cams = syn.camera_positions(world, 6, 60.0, seed=0)
    found = 0
    for n, (x, y) in enumerate(cams):
        _, lab_t = render_panorama(world, x, y, (32, 128), seed=n, transients=True, clean=True)
        _, lab_n = render_panorama(world, x, y, (32, 128), seed=n, transients=False, clean=True)
        # vehicles only add man-made pixels below the horizon where the road was
        changed = lab_t != lab_n
        found += int((changed & (lab_t == MANMADE)).sum())
    assert found > 0
    # the scene seen from above has no transients at all: road points have no height
    xs, ys = np.meshgrid(np.linspace(-300, 300, 200), np.linspace(-300, 300, 200))
    s = world.sample(xs.ravel(), ys.ravel(), colors=False)
    assert (s["h"][s["road"]] == 0).all()


def test_a_batch_renders_each_camera_as_if_alone():
    world = World("suburb", 1)
    cams = syn.camera_positions(world, 3, 60.0, seed=0)
    panos, aerials = render_batch(world, cams, [11, 12, 13], (32, 128), 48)
    (alone,), (alone_aerial,) = render_batch(world, cams[1:2], [12], (32, 128), 48)
    assert np.array_equal(panos[1][0], alone[0]) and np.array_equal(panos[1][1], alone[1])
    assert np.array_equal(aerials[1], alone_aerial)
    assert np.array_equal(render_aerial(world, *cams[1], 48, seed=12), alone_aerial)
    # the panorama's ground taken from its aerial tile agrees with the exact ray cast
    _, labels = render_panorama(world, *cams[1], (32, 128), seed=12)
    assert (labels == alone[1]).mean() > 0.97


# --- the dataset and its cache ---------------------------------------------------------


def test_dataset_reads_pairs_and_splits(cvusa_world):
    train = syn.Synthetic(root=cvusa_world, split="train", region="suburb", **SMALL)
    test = syn.Synthetic(root=cvusa_world, split="test", region="suburb", **SMALL)
    assert len(train) == 15 and len(test) == 5
    assert not {p.id for p in train.pairs} & {p.id for p in test.pairs}
    p = train.pairs[0]
    assert isinstance(p, Pair) and re.match(r"^\d{7}$", p.id)
    assert p.ground.is_file() and p.aerial.is_file() and len(p.location) == 2
    ev = test.evaluation()
    assert np.array_equal(ev.gt, np.arange(5)) and ev.query_locations.shape == (5, 2)
    assert test.check(decode=True).ok
    assert "suburb" in repr(test) and "pairs=5" in repr(test)
    assert test.manifest()["pairs"] == 5


def test_cache_is_generated_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path))
    before = syn.generation_count
    ds = syn.Synthetic(region="rural", pairs=6, seed=2, **SMALL)
    assert syn.generation_count == before + 1
    target = syn.cache_dir("rural", 6, 2, "cvusa", **SMALL)
    assert ds.root == target and target.parent == tmp_path / "synthetic"
    mtime = (target / "world.json").stat().st_mtime_ns
    again = syn.Synthetic(region="rural", pairs=6, seed=2, split="test", **SMALL)
    assert syn.generation_count == before + 1
    assert (target / "world.json").stat().st_mtime_ns == mtime
    assert len(ds) + len(again) == 6
    assert not list(target.parent.glob(".*tmp*"))  # no temp dir left behind


def test_partial_generation_is_not_mistaken_for_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path))
    target = syn.cache_dir("suburb", 5, 0, "cvusa", **SMALL)
    # a killed generation's temp dir and a half-written target without world.json
    tmp = target.parent / f".{target.name}.tmp-999999-deadbeef"
    (tmp / "splits").mkdir(parents=True)
    (tmp / "splits" / "train-19zl.csv").write_text("bingmap/19/0000001.jpg,x,y\n")
    (target / "splits").mkdir(parents=True)
    (target / "splits" / "train-19zl.csv").write_text("bingmap/19/0000001.jpg,x,y\n")
    before = syn.generation_count
    ds = syn.Synthetic(region="suburb", pairs=5, seed=0, **SMALL)
    assert syn.generation_count == before + 1
    assert syn.is_complete(target) and all(p.ground.is_file() for p in ds.pairs)
    assert not tmp.exists()  # the dead process's temp dir was cleaned up
    # a world.json that says "not complete" or comes from another version is redone too
    record = json.loads((target / "world.json").read_text())
    record["generator_version"] = -1
    (target / "world.json").write_text(json.dumps(record))
    syn.Synthetic(region="suburb", pairs=5, seed=0, **SMALL)
    assert syn.generation_count == before + 2
    # ... and so is one rendered by other code under the same version number
    record = json.loads((target / "world.json").read_text())
    assert record["generator_fingerprint"] == syn.GENERATOR_FINGERPRINT
    record["generator_fingerprint"] = "0" * 16
    (target / "world.json").write_text(json.dumps(record))
    syn.Synthetic(region="suburb", pairs=5, seed=0, **SMALL)
    assert syn.generation_count == before + 3
    syn.Synthetic(region="suburb", pairs=5, seed=0, **SMALL)
    assert syn.generation_count == before + 3  # and then reused


# --- one-view masks and the unmatched knob ---------------------------------------------


def test_panorama_mask_marks_the_sky_and_a_ground_only_object():
    H, W = 64, 256
    region = REGIONS["grid_city"]
    colour = (250, 20, 200)
    car = _bearing_box(90.0, 10.0, 1.0, 1.6, colour, colour, ground_only=True)
    for ground_only in (True, False):
        box = Box(car.x0, car.y0, car.x1, car.y1, car.height, colour, colour, ground_only)
        world = World(region, 0, procedural=False, boxes=[box])
        pano, labels, mask = render_panorama(world, 0.0, 0.0, (H, W), transients=False,
                                             clean=True, masks=True)
        seen = labels == MANMADE  # its sides and its top: nothing else is man-made here
        assert seen.sum() >= 20 and _colour_mask(pano, colour)[seen].mean() > 0.5
        cols = np.nonzero(seen.any(0))[0]
        assert abs(cols.mean() - 0.75 * W) < 2  # east: three quarters across
        sky = np.zeros((H, W), bool)
        sky[: H // 2] = True  # rows above the horizon see nothing in a flat world
        assert (labels[sky] == SKY).all()
        assert np.array_equal(mask, sky | seen) if ground_only else np.array_equal(mask, sky)


def test_aerial_mask_marks_an_air_only_object_the_panorama_does_not_see():
    S = 64
    region = REGIONS["suburb"]
    gsd = region.tile_m / S
    tarp, roof, facade = (10, 200, 250), (240, 200, 10), (200, 60, 60)
    air = Box(-12.0, 4.0, -2.0, 15.0, 0.3, tarp, tarp, air_only=True)
    both = Box(5.0, -12.0, 17.0, 3.0, 6.0, facade, roof)
    world = World(region, 0, procedural=False, boxes=[air, both])
    aerial, mask = render_aerial(world, 0.0, 0.0, S, clean=True, masks=True)
    rows, cols = np.mgrid[0:S, 0:S]
    x = (cols + 0.5 - S / 2) * gsd
    y = -(rows + 0.5 - S / 2) * gsd
    footprint = (x >= air.x0) & (x < air.x1) & (y >= air.y0) & (y < air.y1)
    assert footprint.sum() > 50
    assert np.array_equal(_colour_mask(aerial, tarp), footprint)
    assert np.array_equal(mask, footprint)  # the box both views see is not masked
    assert _colour_mask(aerial, roof).sum() > 50
    pano, _, p_mask = render_panorama(world, 0.0, 0.0, (64, 256), transients=False, clean=True,
                                      masks=True)
    assert _colour_mask(pano, tarp).sum() == 0 and _colour_mask(pano, facade).sum() > 0
    assert not p_mask[32:].any()  # below the horizon: only ground and the shared box


def test_unmatched_grows_the_masked_share_monotonically():
    world = World("grid_city", 2)
    cams = syn.camera_positions(world, 4, 60.0, seed=1)
    seeds = [21, 22, 23, 24]
    shares, previous = [], None
    for u in (0.0, 0.25, 0.5, 0.75, 1.0):
        panos, tiles = render_batch(world, cams, seeds, (32, 128), 48, unmatched=u, masks=True)
        masks = ([m for _, _, m in panos], [m for _, m in tiles])
        if u == 0.0:
            # nothing one view only has but the panorama's sky
            assert all(np.array_equal(m, lab == SKY) for (_, lab, m) in panos)
            assert not any(m.any() for m in masks[1])
        if previous is not None:  # every masked pixel stays masked: the knob only adds
            for now, before in zip(masks[0] + masks[1], previous[0] + previous[1], strict=True):
                assert (now | before).sum() == now.sum()
        shares.append([np.mean(masks[0]), np.mean(masks[1])])
        previous = masks
    shares = np.asarray(shares)
    assert (np.diff(shares, axis=0) >= 0).all()
    assert shares[-1, 0] > shares[0, 0] and shares[-1, 1] > shares[0, 1] + 0.01


def test_masks_are_written_beside_the_images_in_both_layouts(cvusa_world, vigor_world):
    ds = syn.Synthetic(root=cvusa_world, split="train", region="suburb", **SMALL)
    for pair in ds.pairs:
        ground_mask, aerial_mask = ds.mask_paths(pair)
        assert ground_mask == pair.ground.parent / "masks" / f"{pair.id}.png"
        assert aerial_mask == syn.mask_path(pair.aerial) and aerial_mask.is_file()
        with Image.open(ground_mask) as im:
            assert im.mode == "1" and im.size == (64, 16)
            mask = np.asarray(im.convert("L"))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        labels = np.asarray(Image.open(cvusa_world / "streetview/annotations" / f"{pair.id}.png"))
        assert ((labels == SKY) <= (mask == 255)).all()  # the sky is always one-view
        with Image.open(aerial_mask) as im:
            assert im.size == (32, 32)
    vigor = syn.Synthetic(root=vigor_world, split="test", layout="vigor", **SMALL)
    ev = vigor.evaluation()
    for path in ev.queries + ev.gallery:
        assert syn.mask_path(path).is_file()


def test_unmatched_is_a_validated_dataset_option_with_its_own_cache(tmp_path, monkeypatch):
    from gengeo_bench import registry

    with pytest.raises(ConfigError, match="unmatched"):
        registry.validate_params("dataset", "synthetic", {"split": "train", "unmatched": 1.5})
    assert registry.validate_params("dataset", "synthetic", {"split": "train"})["unmatched"] == 0.5
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path))
    default = syn.cache_dir("suburb", 6, 0, "cvusa", **SMALL)
    assert syn.cache_dir("suburb", 6, 0, "cvusa", **SMALL, unmatched=0.5) == default
    other = syn.Synthetic(region="suburb", pairs=6, seed=0, unmatched=1.0, **SMALL)
    assert other.root == syn.cache_dir("suburb", 6, 0, "cvusa", **SMALL, unmatched=1.0) != default
    assert other.record["unmatched"] == 1.0


def _generate_counting(target: str, log: str) -> None:
    """In a fresh process: ensure a small world at `target`, logging each real generation."""
    import os
    import time

    real = syn.generate

    def counting(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(3)  # long enough for the other processes to arrive while this one works
        return real(*args, **kwargs)

    syn.generate = counting
    syn.ensure_generated(Path(target), "suburb", 12, 0, "cvusa", 32, (16, 64))


def test_processes_needing_one_world_at_once_generate_it_once(tmp_path):
    import multiprocessing

    target, log = tmp_path / "world", tmp_path / "generations.log"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_generate_counting, args=(str(target), str(log)))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(log.read_text().split()) == 1  # one generated, two waited and found it
    assert syn.is_complete(target, region="suburb", pairs=12, seed=0, layout="cvusa", aerial_size=32,
                           pano_size=(16, 64), unmatched=syn.DEFAULT_UNMATCHED)
    assert not list(tmp_path.glob(".world.tmp-*"))


def test_reading_a_generated_world_does_not_load_the_renderer(cvusa_world):
    # The scene and the cameras load compiled numba code when imported (about 1.4 s): a
    # process that only reads a world (every Cell's) must not pay for it.
    code = ("import sys; from gengeo_bench.datasets.synthetic import Synthetic; "
            f"d = Synthetic(root={str(cvusa_world)!r}, split='test', region='suburb', pairs=20, "
            "seed=3, aerial_size=32, pano_size=(16, 64)); "
            "print(len(d.pairs), *sorted(m for m in sys.modules "
            "if m.startswith(('numba', 'gengeo_bench.world'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, *modules = out.stdout.split()
    assert int(count) == 5 and modules == ["gengeo_bench.world_regions"]
