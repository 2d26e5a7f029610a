"""A procedural 2.5-D cross-view world: one scene, two cameras.

The scene is a *function* of world coordinates (metres; x east, y north): every query
point gets a height-field top (ground 0, buildings, walls, hedges), an optional tree
crown interval [low, high] (crowns float over their trunks, so a ray can pass beneath
them), materials and semantic classes. Nothing is stored: streets, blocks, lots,
buildings and trees come from integer hashes of lattice indices, so any point of an
unbounded world is evaluated in isolation, in numpy, vectorised over many points.

Two cameras look at the same function:

- the **aerial** tile is orthographic, north-up (row 0 is north, column 0 is west),
  centred on a point, `tile_m` metres on a side, with Lambert shading from the height
  field, cast shadows and cloud shadows;
- the **panorama** is ray-cast from a camera `cam_height` metres above the ground: each
  column is an azimuth, each row an elevation; along every ray the first surface hit
  wins (height field or crown), so what a building hides is not in the panorama.

Panorama convention (the CVUSA one): equirectangular with square pixels, W = 4 H by
default, so the vertical field of view is 360 * H / W degrees centred on the horizon.
Column c looks at azimuth ``360 * c / W - 180`` degrees, measured clockwise from north:
column 0 looks south, W/4 west, **W/2 north (the centre column)**, 3W/4 east. Azimuth
grows left to right (clockwise seen from above), so rotating the aerial tile by k x 90
degrees counter-clockwise matches rolling the panorama left by k quarter widths
(``torch.roll(pano, -k * W // 4, dims=-1)`` with ``torch.rot90(aerial, k, (-2, -1))``).
Row r looks at elevation ``V/2 - (r + 0.5) * V / H`` with V = 360 * H / W.

Partial correspondence is built in: vehicles, pedestrians and clouds exist only for the
panorama (they are transient), while roof details, yards behind walls, pools, sheds and
cloud shadows are visible only from above, and facades only from the ground.

Panorama labels (4 classes, in the spirit of CVUSA's annotations): 0 sky, 1 man-made
(facades, roofs, walls, vehicles, people), 2 ground (roads, pavements, plazas, water,
bare soil), 3 vegetation (trees, hedges, grass, crops).

Regions (`REGIONS`) share one vocabulary (streets, the building `STYLES`, parks, plazas,
water, fields, trees) and differ in its proportions, in street layout (grid or organic),
building heights, vegetation, palettes, ground-sample distance and camera height, the way
real datasets differ; so a model trained on one region transfers, with a gap, to another.

Speed: `render_batch` renders many cameras with four scene evaluations in all (near ray
samples, far ray samples for the columns still open, the aerial tiles, the first hits),
and the panorama's ground inside its own aerial tile takes the tile's colours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from gengeo_bench.errors import ConfigError

SKY, MANMADE, GROUND, VEGETATION = 0, 1, 2, 3
LABELS = {SKY: "sky", MANMADE: "man-made", GROUND: "ground", VEGETATION: "vegetation"}

# land use of a block
BUILT, PARK, PLAZA, WATER, FIELD, PARKING = range(6)
LANDUSES = ("built", "park", "plaza", "water", "field", "parking")

# vehicles and people are placed only this close to the camera (metres)
TRANSIENT_RANGE = 70.0

# side texture of a vertical surface hit by a ray
TEX_PLAIN, TEX_WINDOWS, TEX_VEHICLE = 0, 1, 2

# ---------------------------------------------------------------------------------------
# hashing and noise (uint32 arithmetic wraps silently on arrays)

_MIX1 = np.uint32(0x7FEB352D)
_MIX2 = np.uint32(0x846CA68B)
_PRIMES = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5)


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * _MIX1
    h = h ^ (h >> np.uint32(15))
    h = h * _MIX2
    return h ^ (h >> np.uint32(16))


def hash_ints(seed: int, *keys) -> np.ndarray:
    """A well-mixed uint32 hash of integer-valued arrays (broadcast together) and a seed."""
    acc = (np.asarray(seed, dtype=np.int64) * 0x2545F491) & 0x7FFFFFFF
    for n, key in enumerate(keys):
        acc = acc + np.asarray(key, dtype=np.int64) * np.int64(_PRIMES[n % len(_PRIMES)])
    with np.errstate(over="ignore"):
        return _mix((np.asarray(acc) & 0xFFFFFFFF).astype(np.uint32))


def unit(h: np.ndarray, salt: int) -> np.ndarray:
    """A float32 in [0, 1) drawn from hash `h` and a salt (independent per salt)."""
    a = np.uint32((salt * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF)
    m = np.uint32(((salt + 1) * 0x85EBCA6B) & 0xFFFFFFFF | 1)
    with np.errstate(over="ignore"):
        v = (h ^ a) * m
    v = v ^ (v >> np.uint32(15))
    return (v >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def value_noise(seed: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1) on a unit lattice."""
    xf = np.floor(x)
    yf = np.floor(y)
    xi = xf.astype(np.int64)
    yi = yf.astype(np.int64)
    fx = (x - xf).astype(np.float32)
    fy = (y - yf).astype(np.float32)
    sx = fx * fx * (3 - 2 * fx)
    sy = fy * fy * (3 - 2 * fy)
    c00 = unit(hash_ints(seed, xi, yi), 0)
    c10 = unit(hash_ints(seed, xi + 1, yi), 0)
    c01 = unit(hash_ints(seed, xi, yi + 1), 0)
    c11 = unit(hash_ints(seed, xi + 1, yi + 1), 0)
    a = c00 + (c10 - c00) * sx
    b = c01 + (c11 - c01) * sx
    return a + (b - a) * sy


def _lerp(lo_hi, u):
    return np.float32(lo_hi[0]) + np.float32(lo_hi[1] - lo_hi[0]) * u


def _pick(palette: np.ndarray, u: np.ndarray) -> np.ndarray:
    idx = np.minimum((u * len(palette)).astype(np.int64), len(palette) - 1)
    return palette[idx]


def _gauss(h: np.ndarray, salt: int) -> np.ndarray:
    """Roughly standard normal (Irwin-Hall of 3)."""
    return (unit(h, salt) + unit(h, salt + 1) + unit(h, salt + 2) - 1.5) * np.float32(2.0)


# ---------------------------------------------------------------------------------------
# building styles and regions


def _rgb(*colours) -> tuple:
    return tuple(tuple(int(c) for c in col) for col in colours)


@dataclass(frozen=True)
class Style:
    """How the lots of a built block are divided and built on. Lengths in metres."""

    lot_width: float
    lot_depth_min: float  # blocks deeper than 2x this get two rows of lots
    build_prob: float
    lawn_prob: float  # share of yards that are lawns (else paved)
    setback_front: tuple[float, float]
    setback_side: tuple[float, float]
    setback_back: tuple[float, float]
    height_median: float
    height_sigma: float
    height_range: tuple[float, float]
    district_amp: float  # 0..1: how much the slow district field changes heights
    floor_height: tuple[float, float]
    pitched_prob: float
    wall_prob: float
    hedge_prob: float
    wall_height: tuple[float, float]
    hedge_height: tuple[float, float]
    pool_prob: float
    shed_prob: float
    shed_size: tuple[float, float]
    shed_height: tuple[float, float]
    yard_tree_density: float
    roof: tuple
    facade: tuple


STYLES: dict[str, Style] = {
    "tower": Style(  # dense mid- and high-rise blocks
        lot_width=17.0, lot_depth_min=14.0, build_prob=0.9, lawn_prob=0.2,
        setback_front=(0.0, 1.0), setback_side=(0.0, 1.2), setback_back=(0.0, 8.0),
        height_median=24.0, height_sigma=0.55, height_range=(8.0, 110.0), district_amp=0.6,
        floor_height=(3.0, 3.9), pitched_prob=0.0, wall_prob=0.06, hedge_prob=0.0,
        wall_height=(2.8, 3.4), hedge_height=(1.2, 1.8), pool_prob=0.0, shed_prob=0.15,
        shed_size=(3.0, 6.0), shed_height=(3.0, 5.0), yard_tree_density=0.15,
        roof=_rgb((95, 95, 100), (125, 122, 118), (70, 72, 78), (150, 145, 135), (55, 55, 58),
                  (160, 160, 165), (110, 100, 95), (135, 140, 150)),
        facade=_rgb((150, 72, 55), (125, 92, 72), (195, 180, 155), (160, 160, 158),
                    (95, 115, 135), (210, 208, 200), (175, 120, 90), (110, 110, 115),
                    (185, 160, 120)),
    ),
    "rowhouse": Style(  # terraces with back gardens
        lot_width=8.0, lot_depth_min=14.0, build_prob=0.95, lawn_prob=0.8,
        setback_front=(2.0, 4.0), setback_side=(0.0, 0.3), setback_back=(6.0, 12.0),
        height_median=10.0, height_sigma=0.2, height_range=(6.0, 16.0), district_amp=0.0,
        floor_height=(2.9, 3.4), pitched_prob=0.3, wall_prob=0.3, hedge_prob=0.1,
        wall_height=(2.4, 3.0), hedge_height=(1.2, 2.0), pool_prob=0.0, shed_prob=0.2,
        shed_size=(2.5, 4.0), shed_height=(2.2, 3.0), yard_tree_density=0.35,
        roof=_rgb((95, 95, 100), (150, 88, 66), (70, 72, 78), (125, 122, 118)),
        facade=_rgb((150, 72, 55), (125, 92, 72), (110, 70, 60), (190, 170, 140),
                    (170, 110, 80), (220, 215, 200)),
    ),
    "house": Style(  # detached houses with gardens
        lot_width=22.0, lot_depth_min=18.0, build_prob=0.9, lawn_prob=0.95,
        setback_front=(5.0, 9.0), setback_side=(2.0, 4.5), setback_back=(6.0, 12.0),
        height_median=4.5, height_sigma=0.25, height_range=(3.0, 8.0), district_amp=0.2,
        floor_height=(2.8, 3.2), pitched_prob=0.85, wall_prob=0.12, hedge_prob=0.35,
        wall_height=(2.4, 3.0), hedge_height=(1.4, 2.6), pool_prob=0.35, shed_prob=0.4,
        shed_size=(2.5, 4.5), shed_height=(2.2, 3.0), yard_tree_density=0.4,
        roof=_rgb((170, 88, 62), (110, 82, 66), (82, 82, 88), (150, 62, 50), (92, 106, 96),
                  (160, 142, 112), (60, 60, 66), (130, 112, 100)),
        facade=_rgb((228, 224, 212), (218, 202, 165), (172, 192, 204), (222, 202, 132),
                    (162, 178, 142), (165, 88, 66), (200, 185, 170), (240, 240, 235)),
    ),
    "commercial": Style(  # low flat-roofed stores with car parks in front
        lot_width=38.0, lot_depth_min=18.0, build_prob=0.9, lawn_prob=0.15,
        setback_front=(10.0, 18.0), setback_side=(3.0, 6.0), setback_back=(3.0, 6.0),
        height_median=8.0, height_sigma=0.3, height_range=(4.0, 15.0), district_amp=0.2,
        floor_height=(3.2, 4.0), pitched_prob=0.0, wall_prob=0.0, hedge_prob=0.1,
        wall_height=(2.4, 3.0), hedge_height=(1.2, 1.8), pool_prob=0.0, shed_prob=0.1,
        shed_size=(3.0, 5.0), shed_height=(2.5, 3.5), yard_tree_density=0.1,
        roof=_rgb((95, 95, 100), (125, 122, 118), (150, 145, 135), (160, 160, 165)),
        facade=_rgb((195, 180, 155), (160, 160, 158), (95, 115, 135), (210, 208, 200),
                    (175, 120, 90)),
    ),
    "farm": Style(  # farmhouses with barns on large plots
        lot_width=55.0, lot_depth_min=40.0, build_prob=0.55, lawn_prob=0.9,
        setback_front=(8.0, 18.0), setback_side=(12.0, 20.0), setback_back=(14.0, 24.0),
        height_median=6.0, height_sigma=0.2, height_range=(4.0, 9.0), district_amp=0.1,
        floor_height=(2.8, 3.2), pitched_prob=0.75, wall_prob=0.0, hedge_prob=0.3,
        wall_height=(1.5, 2.0), hedge_height=(1.6, 2.8), pool_prob=0.05, shed_prob=0.75,
        shed_size=(8.0, 16.0), shed_height=(5.0, 8.0), yard_tree_density=0.35,
        roof=_rgb((150, 155, 160), (140, 52, 42), (128, 82, 52), (82, 110, 82),
                  (100, 100, 105)),
        facade=_rgb((232, 230, 222), (165, 55, 45), (150, 150, 145), (200, 185, 150)),
    ),
}


@dataclass(frozen=True)
class Region:
    """A named distribution of scenes. Lengths in metres, colours 0-255 RGB.

    Regions share one vocabulary (streets, building `STYLES`, parks, water, fields,
    trees) and differ in its proportions, in layout, heights, vegetation, palettes,
    ground-sample distance and camera height, as real datasets do.
    """

    name: str
    description: str
    origin: tuple[float, float]  # (lat, lon) of world (0, 0)
    tile_m: float  # side of an aerial tile; gsd = tile_m / aerial_size
    cam_height: float
    view_m: float  # rays stop here
    fog_m: float  # distance haze scale
    # street layout
    organic: float  # 0 = straight grid; > 0 = warp amplitude in metres
    warp_scale: float  # wavelength of the warp
    block: tuple[float, float]  # mean block pitch along the two grid axes
    block_jitter: float  # fraction of the pitch by which street lines move (< 0.4)
    road_half: tuple[float, float]  # half width of a street (range)
    avenue_every: int  # every k-th street line is 1.5x wider (0: none)
    sidewalk: float
    marking_prob: float  # share of streets with a dashed centre line
    crossings: bool  # zebra crossings at intersections
    landuse: dict[str, float]  # probabilities of a block's land use (LANDUSES)
    styles: dict[str, float]  # probabilities of a built block's style (STYLES)
    district_scale: float  # wavelength of the slow building-height modulation
    tint: tuple[float, float, float, float]  # building colours: r, g, b gains, saturation
    # vegetation
    street_tree_prob: float
    street_tree_spacing: float
    park_tree_density: float
    field_tree_density: float
    tree_lattice: tuple[float, float]
    crown_radius: tuple[float, float]
    tree_height: tuple[float, float]
    conifer_prob: float
    # transients (panorama only)
    vehicle_prob: float
    pedestrian_prob: float
    cloud_cover: tuple[float, float]
    # lighting
    sun_elevation: tuple[float, float]  # degrees
    # palettes
    road: tuple = (70, 70, 72)
    marking: tuple = (225, 225, 215)
    sidewalk_rgb: tuple = (170, 168, 160)
    grass: tuple = ()
    plaza: tuple = ()
    water: tuple = (50, 80, 100)
    field_rgb: tuple = ()
    trees: tuple = ()
    conifers: tuple = ()
    wall_rgb: tuple = ()
    pool_rgb: tuple = (70, 170, 200)
    sky_top: tuple = (95, 140, 200)
    sky_horizon: tuple = (190, 205, 220)
    haze: tuple = (185, 195, 205)
    vehicles: tuple = ()
    # a gentle large-scale bend of the street grid (metres, wavelength): the grid stays
    # straight over a few blocks but its orientation drifts across the region
    bend: float = 0.0
    bend_scale: float = 2500.0

    def gsd(self, aerial_size: int) -> float:
        return self.tile_m / aerial_size


_VEHICLES = _rgb(
    (200, 30, 30), (230, 230, 230), (20, 20, 25), (120, 125, 130), (30, 60, 140),
    (180, 180, 185), (240, 200, 40), (60, 90, 60), (110, 20, 30), (245, 245, 240),
)

REGIONS: dict[str, Region] = {
    "grid_city": Region(
        name="grid_city",
        description="Manhattan-like grid of straight streets and avenues, mostly tall dense "
        "blocks with some terraces and stores, grey palette, street trees, small parks",
        origin=(40.7400, -73.9900),
        tile_m=64.0,
        cam_height=2.5,
        view_m=150.0,
        fog_m=420.0,
        organic=0.0,
        warp_scale=1.0,
        block=(130.0, 72.0),
        block_jitter=0.3,
        road_half=(5.0, 6.5),
        avenue_every=3,
        sidewalk=3.5,
        marking_prob=1.0,
        crossings=True,
        landuse={"built": 0.71, "park": 0.12, "plaza": 0.06, "water": 0.03, "parking": 0.05,
                 "field": 0.03},
        styles={"tower": 0.46, "rowhouse": 0.25, "commercial": 0.14, "house": 0.15},
        district_scale=700.0,
        tint=(0.97, 0.97, 1.0, 0.75),
        street_tree_prob=0.6,
        street_tree_spacing=9.0,
        park_tree_density=0.55,
        field_tree_density=0.0,
        tree_lattice=(7.0, 10.0),
        crown_radius=(1.6, 3.2),
        tree_height=(6.0, 11.0),
        conifer_prob=0.0,
        vehicle_prob=0.4,
        pedestrian_prob=0.15,
        cloud_cover=(0.1, 0.6),
        sun_elevation=(40.0, 65.0),
        road=(72, 72, 76),
        marking=(230, 220, 160),
        sidewalk_rgb=(168, 165, 158),
        grass=_rgb((80, 118, 58), (92, 125, 62), (74, 108, 55)),
        plaza=_rgb((178, 168, 150), (150, 146, 138), (190, 185, 175), (160, 140, 120)),
        water=(48, 72, 92),
        field_rgb=_rgb((120, 140, 80), (140, 120, 90)),
        trees=_rgb((58, 92, 44), (72, 108, 50), (50, 80, 40), (88, 110, 52)),
        conifers=_rgb((40, 70, 45),),
        wall_rgb=_rgb((140, 130, 120), (110, 100, 95), (170, 165, 155)),
        sky_top=(100, 140, 195),
        sky_horizon=(195, 205, 215),
        haze=(190, 195, 200),
        vehicles=_VEHICLES,
        bend=140.0,
        bend_scale=2600.0,
    ),
    "suburb": Region(
        name="suburb",
        description="curving residential streets, mostly low detached houses with pitched "
        "roofs, lawns, hedges and pools, some stores and terraces, many trees; warm palette",
        origin=(33.7800, -84.3300),
        tile_m=76.0,
        cam_height=2.2,
        view_m=160.0,
        fog_m=600.0,
        organic=26.0,
        warp_scale=260.0,
        block=(100.0, 64.0),
        block_jitter=0.35,
        road_half=(3.6, 4.6),
        avenue_every=0,
        sidewalk=1.8,
        marking_prob=0.6,
        crossings=False,
        landuse={"built": 0.78, "park": 0.1, "plaza": 0.02, "water": 0.03, "parking": 0.02,
                 "field": 0.05},
        styles={"house": 0.6, "commercial": 0.15, "rowhouse": 0.15, "tower": 0.1},
        district_scale=500.0,
        tint=(1.03, 1.0, 0.95, 1.1),
        street_tree_prob=0.55,
        street_tree_spacing=11.0,
        park_tree_density=0.65,
        field_tree_density=0.3,
        tree_lattice=(8.0, 11.5),
        crown_radius=(2.0, 3.9),
        tree_height=(6.0, 14.0),
        conifer_prob=0.25,
        vehicle_prob=0.18,
        pedestrian_prob=0.04,
        cloud_cover=(0.0, 0.5),
        sun_elevation=(35.0, 70.0),
        road=(86, 86, 88),
        marking=(230, 230, 225),
        sidewalk_rgb=(192, 187, 176),
        grass=_rgb((95, 142, 58), (110, 150, 64), (84, 128, 54), (120, 140, 70)),
        plaza=_rgb((196, 184, 160), (170, 160, 150)),
        water=(56, 96, 112),
        field_rgb=_rgb((120, 150, 70), (150, 130, 90), (170, 160, 100)),
        trees=_rgb((62, 104, 46), (84, 124, 54), (50, 88, 42), (110, 120, 55), (70, 96, 40)),
        conifers=_rgb((38, 70, 46), (46, 80, 52)),
        wall_rgb=_rgb((215, 205, 185), (180, 150, 120), (200, 200, 195)),
        pool_rgb=(70, 175, 205),
        sky_top=(80, 135, 210),
        sky_horizon=(180, 205, 230),
        haze=(185, 200, 215),
        vehicles=_VEHICLES,
    ),
    "rural": Region(
        name="rural",
        description="sparse winding country roads through striped crop fields, pastures, "
        "hedgerows, woodland and ponds; farmsteads with barns and small villages",
        origin=(41.9000, -93.6000),
        tile_m=90.0,
        cam_height=2.0,
        view_m=190.0,
        fog_m=900.0,
        organic=45.0,
        warp_scale=520.0,
        block=(190.0, 140.0),
        block_jitter=0.35,
        road_half=(2.7, 3.4),
        avenue_every=0,
        sidewalk=2.2,
        marking_prob=0.7,
        crossings=False,
        landuse={"field": 0.38, "built": 0.42, "park": 0.12, "water": 0.05, "parking": 0.03},
        styles={"farm": 0.3, "house": 0.4, "rowhouse": 0.15, "commercial": 0.15},
        district_scale=1000.0,
        tint=(1.0, 0.98, 0.94, 0.95),
        street_tree_prob=0.4,
        street_tree_spacing=14.0,
        park_tree_density=0.85,
        field_tree_density=0.5,
        tree_lattice=(9.0, 13.0),
        crown_radius=(2.4, 4.4),
        tree_height=(8.0, 16.0),
        conifer_prob=0.4,
        vehicle_prob=0.05,
        pedestrian_prob=0.0,
        cloud_cover=(0.2, 0.8),
        sun_elevation=(30.0, 60.0),
        road=(100, 96, 88),
        marking=(220, 210, 150),
        sidewalk_rgb=(150, 132, 102),
        grass=_rgb((118, 148, 78), (132, 150, 84), (104, 136, 70)),
        plaza=_rgb((160, 150, 130),),
        water=(58, 88, 98),
        field_rgb=_rgb(
            (200, 180, 110), (112, 152, 62), (132, 100, 70), (122, 150, 80), (172, 162, 100),
            (90, 130, 55), (160, 120, 80),
        ),
        trees=_rgb((52, 84, 40), (66, 98, 46), (84, 104, 50), (46, 74, 38)),
        conifers=_rgb((34, 62, 42), (42, 72, 48)),
        wall_rgb=_rgb((150, 140, 120),),
        pool_rgb=(70, 160, 190),
        sky_top=(85, 130, 195),
        sky_horizon=(200, 212, 225),
        haze=(200, 208, 215),
        vehicles=_VEHICLES,
    ),
}


def get_region(name: str) -> Region:
    if name not in REGIONS:
        raise ConfigError(
            f"unknown synthetic region '{name}'; known regions: {', '.join(sorted(REGIONS))}"
        )
    return REGIONS[name]


def describe_region(name: str) -> str:
    """A few lines describing a region (for `benchmark list` and documentation)."""
    r = get_region(name)
    layout = "straight grid" if r.organic == 0 else f"organic (warp {r.organic:g} m)"
    landuse = ", ".join(f"{k} {v:.0%}" for k, v in r.landuse.items())
    styles = ", ".join(f"{k} {v:.0%}" for k, v in r.styles.items())
    median = sum(STYLES[k].height_median * w for k, w in r.styles.items()) / sum(r.styles.values())
    return "\n".join(
        [
            f"{r.name}: {r.description}",
            f"  streets: {layout}, blocks ~{r.block[0]:g} x {r.block[1]:g} m, "
            f"road width {2 * r.road_half[0]:g}-{2 * r.road_half[1]:g} m",
            f"  land use: {landuse}",
            f"  buildings: {styles} (mean median height {median:.0f} m)",
            f"  trees: street {r.street_tree_prob:.0%}, park {r.park_tree_density:g}, "
            f"conifers {r.conifer_prob:.0%}",
            f"  aerial tile {r.tile_m:g} m ({r.gsd(128):.3f} m/px at 128 px), "
            f"camera height {r.cam_height:g} m, view distance {r.view_m:g} m",
            f"  origin lat/lon {r.origin[0]:.4f}, {r.origin[1]:.4f}",
        ]
    )


def region_record(name: str) -> dict:
    """The region's parameters (and its building styles') as a JSON-able dict."""
    r = get_region(name)
    record = asdict(r)
    record["style_params"] = {k: asdict(STYLES[k]) for k in r.styles}
    return record


# ---------------------------------------------------------------------------------------
# the scene


@dataclass(frozen=True)
class Box:
    """An extra axis-aligned box in world coordinates (tests, figures).

    `ground_only` boxes behave like vehicles: the panorama sees them, the aerial does not.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    height: float
    facade: tuple[int, int, int]
    roof: tuple[int, int, int]
    ground_only: bool = False


@dataclass(frozen=True)
class Transients:
    """Things present only at the panorama's capture time: vehicles, pedestrians.

    Each field is a scalar or one value per sampled point (a batch of cameras).
    """

    seed: object  # int or int64 array
    cam_qx: object  # the camera in the world's street-lattice frame
    cam_qy: object
    vehicle_prob: object
    pedestrian_prob: object


def _pal(colours) -> np.ndarray:
    return np.asarray(colours, dtype=np.float32).reshape(-1, 3) / np.float32(255.0)


class World:
    """One region's scene for one seed. `sample` evaluates it at arbitrary points."""

    def __init__(
        self,
        region: Region | str,
        seed: int = 0,
        *,
        procedural: bool = True,
        boxes: tuple[Box, ...] | list[Box] = (),
    ):
        self.region = get_region(region) if isinstance(region, str) else region
        self.seed = int(seed)
        self.procedural = procedural
        self.boxes = tuple(boxes)
        r = self.region
        rng = np.random.default_rng([self.seed, 7919])
        angle = float(rng.uniform(0, math.pi / 2))
        self.cos = np.float32(math.cos(angle))
        self.sin = np.float32(math.sin(angle))
        # organic warp: three sinusoids per axis with random directions and phases
        self.warp = []
        if r.organic > 0:
            for axis in range(2):
                for n in range(3):
                    direction = rng.uniform(0, 2 * math.pi)
                    wavelength = r.warp_scale * (1.0, 0.61, 0.37)[n]
                    k = 2 * math.pi / wavelength
                    amp = r.organic * (1.0, 0.45, 0.2)[n]
                    amp = min(amp, 0.3 / k)  # keep the warp one-to-one
                    self.warp.append(
                        (axis, np.float32(amp), np.float32(k * math.cos(direction)),
                         np.float32(k * math.sin(direction)), np.float32(rng.uniform(0, 6.3)))
                    )
        if r.bend > 0:
            for axis in range(2):
                direction = rng.uniform(0, 2 * math.pi)
                k = 2 * math.pi / r.bend_scale
                self.warp.append(
                    (axis, np.float32(min(r.bend, 0.35 / k)), np.float32(k * math.cos(direction)),
                     np.float32(k * math.sin(direction)), np.float32(rng.uniform(0, 6.3)))
                )
        names = list(r.landuse)
        probs = np.asarray([r.landuse[k] for k in names], dtype=np.float64)
        self._lu_cdf = np.cumsum(probs / probs.sum()).astype(np.float32)
        self._lu_codes = np.asarray([LANDUSES.index(k) for k in names], dtype=np.int64)
        self.p_grass = _pal(r.grass)
        self.p_plaza = _pal(r.plaza)
        # building styles of this region, with their palettes in the region's tint
        names = [k for k, w in r.styles.items() if w > 0]
        weights = np.asarray([r.styles[k] for k in names], dtype=np.float64)
        self._style_cdf = np.cumsum(weights / weights.sum()).astype(np.float32)
        self.styles = [(STYLES[k], {"roof": self._tinted(STYLES[k].roof),
                                    "facade": self._tinted(STYLES[k].facade)}) for k in names]
        self.p_field = _pal(r.field_rgb)
        self.p_trees = _pal(r.trees)
        self.p_conifers = _pal(r.conifers)
        self.p_wall = _pal(r.wall_rgb)
        self.p_vehicles = _pal(r.vehicles)
        self.c_road = _pal(r.road)[0]
        self.c_marking = _pal(r.marking)[0]
        self.c_sidewalk = _pal(r.sidewalk_rgb)[0]
        self.c_water = _pal(r.water)[0]
        self.c_pool = _pal(r.pool_rgb)[0]
        self.c_path = _pal((176, 160, 128))[0]
        self.c_soil = _pal((120, 96, 70))[0]
        self.c_trunk = _pal((80, 62, 46))[0]
        self.c_stone = _pal((200, 196, 186))[0]
        self.c_glass = _pal((40, 52, 66))[0]
        self.c_hedge = _pal((52, 90, 44))[0]

    def _tinted(self, colours) -> np.ndarray:
        gain = np.asarray(self.region.tint[:3], np.float32)
        pal = _pal(colours)
        grey = pal.mean(axis=1, keepdims=True)
        pal = grey + (pal - grey) * np.float32(self.region.tint[3])
        return np.clip(pal * gain, 0.0, 1.0).astype(np.float32)

    # --- frames -------------------------------------------------------------------------

    def to_q(self, x, y):
        """World (x east, y north) -> the street lattice frame (rotated, warped)."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        qx0 = self.cos * x - self.sin * y
        qy0 = self.sin * x + self.cos * y
        qx, qy = qx0, qy0
        for axis, amp, kx, ky, phase in self.warp:
            d = amp * np.sin(kx * qx0 + ky * qy0 + phase)
            if axis == 0:
                qx = qx + d
            else:
                qy = qy + d
        return qx, qy

    def q_to_world_dir(self, nx, ny):
        """Rotate a direction from the lattice frame back to the world (ignores warp)."""
        return self.cos * nx + self.sin * ny, -self.sin * nx + self.cos * ny

    def latlon(self, x, y):
        lat0, lon0 = self.region.origin
        lat = lat0 + np.asarray(y, dtype=np.float64) / 111_320.0
        lon = lon0 + np.asarray(x, dtype=np.float64) / (111_320.0 * math.cos(math.radians(lat0)))
        return lat, lon

    def _edge(self, axis: int, i):
        pitch = self.region.block[axis]
        jit = unit(hash_ints(self.seed, 101 + axis, i), 0) - np.float32(0.5)
        return (i * pitch).astype(np.float32) + jit * np.float32(self.region.block_jitter * pitch)

    def _cell(self, axis: int, q):
        """Street-line index below each q, the two lines' positions and half widths.

        Lines are hashed once per distinct index (a small table), then gathered.
        Returns (i, lo, hi, half width at lo, half width at hi, table index, table base,
        line positions of the table).
        """
        pitch = self.region.block[axis]
        i0 = np.floor(q / np.float32(pitch)).astype(np.int64)
        base = int(i0.min()) - 1 if i0.size else 0
        ids = np.arange(base, (int(i0.max()) if i0.size else 0) + 3)
        E = self._edge(axis, ids)
        HW = self._half_width(axis, ids)
        k = i0 - base
        k = k - (q < E[k])
        k = k + (q >= E[k + 1])
        return k + base, E[k], E[k + 1], HW[k], HW[k + 1], k, base, E

    def _half_width(self, axis: int, i):
        r = self.region
        hw = _lerp(r.road_half, unit(hash_ints(self.seed, 111 + axis, i), 0))
        if r.avenue_every:
            hw = np.where(i % r.avenue_every == 0, hw * np.float32(1.5), hw)
        return hw

    # --- the scene function -------------------------------------------------------------

    def sample(self, x, y, *, colors: bool = True, transients: Transients | None = None,
               fuzz=0.0, ground_view=None) -> dict:
        """Evaluate the scene at points (x, y) (1-D arrays, metres).

        Returns a dict of arrays: `h` (height-field top), `clo`/`chi` (crown interval,
        +inf/-inf where none), `top_cls`, `side_cls`, `road` (bool), and with
        `colors=True`: `top`, `side`, `crown` (N x 3 float in [0, 1]), `tex` (side
        texture), `floor` (window storey height), `along` (coordinate along a facade),
        `nx`, `ny` (world-frame facade normal), `shade` (crown/leaf texture factor).
        `fuzz` (metres, scalar or per point) thickens thin walls and trunks so that a
        coarse ray step does not jump over them. `ground_view` (a bool, or one per point;
        default: whether `transients` is given) marks points seen by a panorama: only
        those get the `transients` (vehicles, people) and the ground-only extra boxes.
        """
        x = np.asarray(x, dtype=np.float32).ravel()
        y = np.asarray(y, dtype=np.float32).ravel()
        n = x.size
        fuzz = np.broadcast_to(np.asarray(fuzz, dtype=np.float32), (n,))
        if ground_view is None:
            ground_view = transients is not None
        ground_view = np.broadcast_to(np.asarray(ground_view, dtype=bool), (n,))
        if self.procedural:
            out = self._procedural(x, y, colors, transients, fuzz, ground_view)
        else:
            out = self._flat(x, y, colors)
        if self.boxes:
            self._apply_boxes(out, x, y, colors, ground_view)
        return out

    def _flat(self, x, y, colors):
        n = x.size
        out = {
            "h": np.zeros(n, np.float32),
            "clo": np.full(n, np.inf, np.float32),
            "chi": np.full(n, -np.inf, np.float32),
            "top_cls": np.full(n, GROUND, np.uint8),
            "side_cls": np.full(n, MANMADE, np.uint8),
            "road": np.ones(n, bool),
        }
        if colors:
            out.update(
                top=np.broadcast_to(self.c_sidewalk, (n, 3)).copy(),
                side=np.broadcast_to(self.c_stone, (n, 3)).copy(),
                crown=np.zeros((n, 3), np.float32),
                tex=np.zeros(n, np.uint8),
                floor=np.zeros(n, np.float32),
                along=np.zeros(n, np.float32),
                nx=np.zeros(n, np.float32),
                ny=np.ones(n, np.float32),
                shade=np.ones(n, np.float32),
            )
        return out

    def _apply_boxes(self, out, x, y, colors, ground_view):
        for box in self.boxes:
            if box.ground_only and not ground_view.any():
                continue
            inside = (x >= box.x0) & (x < box.x1) & (y >= box.y0) & (y < box.y1)
            if box.ground_only:
                inside &= ground_view
            if not inside.any():
                continue
            out["h"][inside] = box.height
            out["top_cls"][inside] = MANMADE
            out["side_cls"][inside] = MANMADE
            out["clo"][inside] = np.inf
            out["chi"][inside] = -np.inf
            if colors:
                out["top"][inside] = _pal(box.roof)[0]
                out["side"][inside] = _pal(box.facade)[0]
                out["tex"][inside] = TEX_PLAIN
                # normal of the nearest face
                d = np.stack([x - box.x0, box.x1 - x, y - box.y0, box.y1 - y])[:, inside]
                face = d.argmin(0)
                out["nx"][inside] = np.array([-1, 1, 0, 0], np.float32)[face]
                out["ny"][inside] = np.array([0, 0, -1, 1], np.float32)[face]

    @staticmethod
    def _lot(up, vp, Wi, Hi, lw_block, depth_min):
        """Block-interior coords -> lot index, row and lot-local (s, t_front) coords.

        Lots line the block's long sides (two rows when the block is deep enough), each
        `lw` wide; `t_front` is the distance from the lot's street front.
        """
        long_x = Wi >= Hi
        s = np.where(long_x, up, vp)
        t = np.where(long_x, vp, up)
        L = np.where(long_x, Wi, Hi)
        D = np.where(long_x, Hi, Wi)
        tworow = D >= np.float32(2 * depth_min)
        dp = np.where(tworow, D * np.float32(0.5), D)
        row = (tworow & (t >= dp)).astype(np.int64)
        t_f = np.where(row == 1, D - t, t)
        nl = np.maximum(np.round(L / lw_block), 1)
        lwk = L / nl
        k = np.clip(np.floor(s / lwk), 0, nl - 1)
        s_lot = s - k * lwk
        return k.astype(np.int64), row, s_lot, t_f, lwk, dp, long_x

    def _lattice_tree(self, qx, qy, lat_n):
        """The candidate tree of area-tree lattice `lat_n` for each point."""
        R = self.region
        f32 = np.float32
        g = f32(R.tree_lattice[lat_n])
        off = f32(0.37 * (lat_n + 1)) * g
        ga = np.floor((qx - off) / g)
        gb = np.floor((qy - off) / g)
        th = hash_ints(self.seed, ga, gb, 300 + lat_n)
        tcx = (ga + f32(0.5) + (unit(th, 1) - f32(0.5)) * f32(0.3)) * g + off
        tcy = (gb + f32(0.5) + (unit(th, 2) - f32(0.5)) * f32(0.3)) * g + off
        radius, ht, conifer = self._tree_params(th, g * f32(0.35))
        return th, tcx, tcy, radius, ht, conifer

    def _tree_params(self, th, rmax):
        R = self.region
        radius = np.minimum(_lerp(R.crown_radius, unit(th, 30)), rmax)
        ht = _lerp(R.tree_height, unit(th, 31))
        ht = np.maximum(ht, radius * np.float32(2.0) + np.float32(2.6))
        conifer = unit(th, 32) < np.float32(R.conifer_prob)
        return radius, ht, conifer

    def _add_trees(self, o, idx, dx, dy, present, ht, radius, th, conifer, fuzz):
        """Merge candidate trees (dx, dy = point - trunk) into the outputs at `idx`."""
        f32 = np.float32
        rho2 = dx * dx + dy * dy
        tr_r = np.maximum(f32(0.22), fuzz * f32(0.5))
        m = present & ((rho2 < radius * radius) | (rho2 < tr_r * tr_r))
        if not m.any():
            return
        sel = np.nonzero(m)[0]
        rho2, ht, radius, th, conifer = rho2[sel], ht[sel], radius[sel], th[sel], conifer[sel]
        gi = idx[sel]
        r2 = radius * radius
        inside = rho2 < r2
        hb_ = np.maximum(ht - f32(2.0) * radius * (f32(0.8) + f32(0.4) * unit(th, 40)), f32(2.4))
        rho = np.sqrt(rho2)
        rel = np.sqrt(np.maximum(f32(1.0) - rho2 / r2, f32(0.0)))
        hc = (ht + hb_) * f32(0.5)
        half = (ht - hb_) * f32(0.5)
        hi = np.where(conifer, ht - (ht - hb_) * rho / radius, hc + half * rel)
        lo = np.where(conifer, hb_, hc - half * rel * f32(0.7))
        ci = gi[inside]
        newer = hi[inside] > o.chi[ci]
        o.clo[ci] = np.minimum(o.clo[ci], lo[inside])
        o.chi[ci] = np.maximum(o.chi[ci], hi[inside])
        trunk = rho2 < tr_r[sel] ** 2
        ti = gi[trunk]
        o.h[ti] = np.maximum(o.h[ti], hc[trunk])
        o.side_cls[ti] = VEGETATION
        if o.colors:
            o.side[ti] = self.c_trunk
            o.tex[ti] = TEX_PLAIN
            t_in = th[inside]
            base = np.where(conifer[inside][:, None], _pick(self.p_conifers, unit(t_in, 41)),
                            _pick(self.p_trees, unit(t_in, 41)))
            base = base * (f32(0.85) + f32(0.3) * unit(t_in, 42))[:, None]
            o.crown[ci[newer]] = base[newer]
            o.shade[ci[newer]] = (f32(0.75) + f32(0.25) * rel[inside])[newer]

    def _procedural(self, x, y, colors, tr, fuzz, ground_view):
        R = self.region
        seed = self.seed
        n = x.size
        f32 = np.float32
        qx, qy = self.to_q(x, y)
        i, x_lo, x_hi, hwW, hwE, ki, bi, EX = self._cell(0, qx)
        j, y_lo, y_hi, hwS, hwN, kj, bj, EY = self._cell(1, qy)
        u = qx - x_lo
        v = qy - y_lo
        W = x_hi - x_lo
        H = y_hi - y_lo
        dE = W - u
        dN = H - v
        on_xs = (u < hwW) | (dE < hwE)  # a street along q_y (on an x lattice line)
        on_ys = (v < hwS) | (dN < hwN)
        road = on_xs | on_ys
        sw = f32(R.sidewalk)
        walk = ~road & ((u < hwW + sw) | (dE < hwE + sw) | (v < hwS + sw) | (dN < hwN + sw))
        interior = ~(road | walk)
        # per-block values: hashed once per block in a small table, then gathered
        ni = int(ki.max()) + 1 if n else 1
        nj = int(kj.max()) + 1 if n else 1
        HB = hash_ints(seed, np.arange(bi, bi + ni)[:, None], np.arange(bj, bj + nj)[None, :])
        LU = self._lu_codes[np.minimum(np.searchsorted(self._lu_cdf, unit(HB, 1), side="right"),
                                       len(self._lu_cdf) - 1)]
        hb = HB[ki, kj]
        lu = LU[ki, kj]
        P = _Pts(qx=qx, qy=qy, i=i, j=j, x_lo=x_lo, y_lo=y_lo, W=W, H=H, hwW=hwW, hwE=hwE,
                 hwS=hwS, hwN=hwN, u=u, v=v, hb=hb, lu=lu, fuzz=fuzz)
        P.up = u - hwW - sw
        P.vp = v - hwS - sw
        P.Wi = W - hwW - hwE - 2 * sw
        P.Hi = H - hwS - hwN - 2 * sw
        o = _Out(n, colors)
        o.road = road
        if colors:
            o.top[:] = self.c_road
            o.top[walk] = self.c_sidewalk
            if R.marking_prob > 0:
                dash_y = np.mod(qy, f32(9.0)) < 4.0
                dash_x = np.mod(qx, f32(9.0)) < 4.0
                mp = f32(R.marking_prob)
                mark_w = unit(hash_ints(seed, 121, i), 0) < mp
                mark_e = unit(hash_ints(seed, 121, i + 1), 0) < mp
                mark_s = unit(hash_ints(seed, 122, j), 0) < mp
                mark_n = unit(hash_ints(seed, 122, j + 1), 0) < mp
                centre = (on_xs & ~on_ys & (((u < 0.14) & mark_w) | ((dE < 0.14) & mark_e))
                          & dash_y) | \
                    (on_ys & ~on_xs & (((v < 0.14) & mark_s) | ((dN < 0.14) & mark_n)) & dash_x)
                if R.crossings:
                    zx = on_xs & (((v >= hwS) & (v < hwS + 3.0)) |
                                  ((dN >= hwN) & (dN < hwN + 3.0))) & (np.mod(u, 1.2) < 0.6)
                    zy = on_ys & (((u >= hwW) & (u < hwW + 3.0)) |
                                  ((dE >= hwE) & (dE < hwE + 3.0))) & (np.mod(v, 1.2) < 0.6)
                    centre |= zx | zy
                o.top[centre] = self.c_marking
        built = interior & (lu == BUILT)
        if built.any():
            # the slow district field at each block's centre
            scale = f32(R.district_scale)
            DIST = value_noise(seed + 31, ((EX[:ni] + EX[1:ni + 1]) * f32(0.5) / scale)[:, None],
                               ((EY[:nj] + EY[1:nj + 1]) * f32(0.5) / scale)[None, :])
            P.district = DIST[ki, kj]
            ST = np.minimum(np.searchsorted(self._style_cdf, unit(HB, 12), side="right"),
                            len(self.styles) - 1)
            style = ST[ki, kj]
            for code, (st, pal) in enumerate(self.styles):
                idx = np.nonzero(built & (style == code))[0]
                if idx.size:
                    self._built(idx, P.take(idx), o, st, pal)
        for code, fn in ((PARK, self._park), (PLAZA, self._plaza), (WATER, self._water),
                         (PARKING, self._parking), (FIELD, self._fields)):
            idx = np.nonzero(interior & (lu == code))[0]
            if idx.size:
                fn(idx, P.take(idx), o)
        if R.street_tree_prob > 0:
            self._street_trees(P, o, interior, walk, road)
        if tr is not None and (np.any(np.asarray(tr.vehicle_prob) > 0) or
                               np.any(np.asarray(tr.pedestrian_prob) > 0)):
            # vehicles and people farther than TRANSIENT_RANGE are below a pixel: skip them
            near = (qx - np.asarray(tr.cam_qx, f32)) ** 2 + (qy - np.asarray(tr.cam_qy, f32)) ** 2
            idx = np.nonzero((road | walk) & ground_view & (near < f32(TRANSIENT_RANGE ** 2)))[0]
            if idx.size:
                sub = Transients(**{k: _subset(v, idx, n) for k, v in vars(tr).items()})
                self._transients(sub, idx, P.take(idx), road[idx], walk[idx], o)
        if colors:
            grain = unit(hash_ints(seed, np.floor(qx * 2), np.floor(qy * 2), 77), 0)
            o.top *= (f32(0.93) + f32(0.14) * grain)[:, None]
        return o.as_dict()

    # --- land uses (each evaluated on its own points) ------------------------------------

    def _built(self, idx, P, o, R: Style, pal):
        seed = self.seed
        f32 = np.float32
        lw_block = f32(R.lot_width) * (f32(0.75) + f32(0.5) * unit(P.hb, 2))
        k, row, s_lot, t_f, lwk, dp, long_x = self._lot(P.up, P.vp, P.Wi, P.Hi, lw_block,
                                                   R.lot_depth_min)
        hl = hash_ints(seed, P.i, P.j, k, row, 5)
        sd = _lerp(R.setback_side, unit(hl, 2))
        bx0, bx1 = sd, lwk - sd
        by0 = _lerp(R.setback_front, unit(hl, 3))
        by1 = dp - _lerp(R.setback_back, unit(hl, 4))
        has_b = (unit(hl, 1) < f32(R.build_prob)) & (bx1 - bx0 > 4) & (by1 - by0 > 4)
        in_b = has_b & (s_lot >= bx0) & (s_lot < bx1) & (t_f >= by0) & (t_f < by1)
        dmod = f32(1.0) + f32(R.district_amp) * (f32(2.0) * P.district - f32(1.0))
        bh = np.clip(f32(R.height_median) * dmod * np.exp(f32(R.height_sigma) * _gauss(hl, 10)),
                     R.height_range[0], R.height_range[1]).astype(f32)
        pitched = (unit(hl, 14) < f32(R.pitched_prob)) & (bh < 12)
        wide = (bx1 - bx0) >= (by1 - by0)
        ridge_d = np.where(wide, np.minimum(t_f - by0, by1 - t_f),
                           np.minimum(s_lot - bx0, bx1 - s_lot))
        roof_h = np.where(pitched, bh + (f32(0.45) + f32(0.35) * unit(hl, 15)) *
                          np.maximum(ridge_d, 0), bh)
        lawn = unit(hl, 49) < f32(R.lawn_prob)
        drive = has_b & lawn & (by0 > 3) & (t_f < by0) & (s_lot >= bx1 - 3.6) & \
            (s_lot < bx1 - 0.4)
        pool = np.zeros(idx.size, bool)
        if R.pool_prob > 0:
            pool_w = _lerp((4.0, 8.0), unit(hl, 20))
            pool = has_b & (unit(hl, 21) < f32(R.pool_prob)) & (dp - by1 > 6) & \
                (t_f > by1 + 2) & (t_f < dp - 2.5) & (s_lot > bx0 + 0.5) & \
                (s_lot < bx0 + 0.5 + pool_w)
        shed_s = _lerp(R.shed_size, unit(hl, 22))
        shed_t = shed_s * (f32(0.6) + f32(0.5) * unit(hl, 23))
        has_shed = has_b & (unit(hl, 24) < f32(R.shed_prob)) & (dp - by1 > shed_t + 3)
        shed = has_shed & (s_lot > lwk - 1.5 - shed_s) & (s_lot < lwk - 1.5) & \
            (t_f > dp - 1.5 - shed_t) & (t_f < dp - 1.5)
        enclosure = unit(hl, 26)
        has_wall = enclosure < f32(R.wall_prob)
        has_hedge = ~has_wall & (enclosure < f32(R.wall_prob + R.hedge_prob))
        thick = np.maximum(np.where(has_wall, f32(0.45), f32(0.9)), P.fuzz)
        edge_d = np.minimum(np.minimum(s_lot, lwk - s_lot), np.minimum(t_f, dp - t_f))
        gate = (t_f < thick) & (((s_lot >= bx1 - 3.6) & (s_lot < bx1 - 0.4)) | ~has_b)
        fence = (has_wall | has_hedge) & (edge_d < thick) & ~gate
        wall_h = np.where(has_wall, _lerp(R.wall_height, unit(hl, 27)),
                          _lerp(R.hedge_height, unit(hl, 27)))
        h = np.zeros(idx.size, f32)
        h = np.where(in_b, roof_h, h)
        h = np.where(shed, _lerp(R.shed_height, unit(hl, 25)), h)
        h = np.where(fence, wall_h, h)
        o.h[idx] = h
        top_cls = np.where(lawn & ~drive & ~pool, VEGETATION, GROUND).astype(np.uint8)
        top_cls[in_b | shed | (fence & has_wall)] = MANMADE
        top_cls[fence & has_hedge] = VEGETATION
        o.top_cls[idx] = top_cls
        o.side_cls[idx] = np.where(fence & has_hedge, VEGETATION, MANMADE)

        # yard trees: the whole crown inside this lot and clear of the buildings
        cand = ~in_b & ~shed
        if R.yard_tree_density > 0 and cand.any():
            c = np.nonzero(cand)[0]
            for lat_n in range(len(self.region.tree_lattice)):
                th, tcx, tcy, radius, ht, conifer = self._lattice_tree(P.qx[c], P.qy[c], lat_n)
                tu = P.up[c] + (tcx - P.qx[c])
                tv = P.vp[c] + (tcy - P.qy[c])
                tk, trow, ts, tt, _, _, _ = self._lot(tu, tv, P.Wi[c], P.Hi[c], lw_block[c],
                                                      R.lot_depth_min)
                margin = radius + f32(0.6)
                ok = (unit(th, 3) < f32(R.yard_tree_density)) & (tk == k[c]) & \
                    (trow == row[c]) & (ts > radius + 0.5) & (ts < lwk[c] - radius - 0.5) & \
                    (tt > radius + 0.5) & (tt < dp[c] - radius - 0.5)
                ok &= ~has_b[c] | (ts < bx0[c] - margin) | (ts > bx1[c] + margin) | \
                    (tt < by0[c] - margin) | (tt > by1[c] + margin)
                ok &= ~has_shed[c] | (tt < dp[c] - 2.5 - shed_t[c] - radius)
                self._add_trees(o, idx[c], P.qx[c] - tcx, P.qy[c] - tcy, ok, ht, radius, th,
                                conifer, P.fuzz[c])
        if not o.colors:
            return
        # tops: yards, driveways, pools, roofs with details (seen only from above)
        grass = _pick(self.p_grass, unit(hl, 50)) * (f32(0.9) + f32(0.2) * unit(hl, 51))[:, None]
        paved = _pick(self.p_plaza, unit(hl, 50)) * f32(0.8)
        top = np.where(lawn[:, None], grass, paved)
        top[drive] = self.c_sidewalk * f32(0.92)
        top[pool] = self.c_pool
        roof = _pick(pal["roof"], unit(hl, 52)) * (f32(0.9) + f32(0.2) * unit(hl, 53))[:, None]
        bs = s_lot - bx0
        bt = t_f - by0
        rim_d = np.minimum(np.minimum(bs, bx1 - s_lot), np.minimum(bt, by1 - t_f))
        cell_h = hash_ints(seed, P.i, P.j, k, row, np.floor(bs / 3.5), np.floor(bt / 3.5))
        in_cell = (np.mod(bs, 3.5) > 1.0) & (np.mod(bs, 3.5) < 2.6) & \
            (np.mod(bt, 3.5) > 1.0) & (np.mod(bt, 3.5) < 2.6)
        roof[~pitched & (rim_d < 0.6)] *= f32(1.25)
        roof[~pitched & in_cell & (unit(cell_h, 0) < 0.18) & (rim_d > 1.5)] = f32(0.78)
        roof[in_cell & (unit(cell_h, 1) < 0.25) & (unit(hl, 54) < 0.3) & (rim_d > 1.0)] = \
            _pal((38, 48, 78))[0]
        top[in_b] = roof[in_b]
        shed_rgb = _pick(pal["roof"], unit(hl, 55))
        top[shed] = shed_rgb[shed]
        wall_rgb = _pick(self.p_wall, unit(hl, 56))
        top[fence & has_wall] = wall_rgb[fence & has_wall]
        top[fence & has_hedge] = self.c_hedge
        o.top[idx] = top
        # sides: facades with windows, sheds, walls, hedges
        side = _pick(pal["facade"], unit(hl, 60)) * (f32(0.9) + f32(0.2) * unit(hl, 61))[:, None]
        side[shed] = (shed_rgb * f32(0.6) + side * f32(0.4))[shed]
        side[fence & has_wall] = wall_rgb[fence & has_wall]
        side[fence & has_hedge] = self.c_hedge
        o.side[idx] = side
        o.tex[idx] = np.where(in_b, TEX_WINDOWS, TEX_PLAIN)
        o.floor[idx] = np.where(in_b, _lerp(R.floor_height, unit(hl, 62)), f32(0))
        dists = np.stack([s_lot - bx0, bx1 - s_lot, t_f - by0, by1 - t_f])
        face = dists.argmin(0)
        o.along[idx] = np.where(face < 2, t_f, s_lot)
        ns = np.array([-1, 1, 0, 0], f32)[face]
        nt = np.array([0, 0, -1, 1], f32)[face]
        nt = np.where(row == 1, -nt, nt)
        nx, ny = self.q_to_world_dir(np.where(long_x, ns, nt), np.where(long_x, nt, ns))
        o.nx[idx] = nx
        o.ny[idx] = ny

    def _area_trees(self, idx, P, o, density, keep):
        """Area trees on points `idx` whose crowns pass `keep(tu, tv, radius, th)`."""
        R = self.region
        f32 = np.float32
        for lat_n in range(len(R.tree_lattice)):
            th, tcx, tcy, radius, ht, conifer = self._lattice_tree(P.qx, P.qy, lat_n)
            tu = P.up + (tcx - P.qx)
            tv = P.vp + (tcy - P.qy)
            ok = (unit(th, 3) < f32(density)) & (tu > radius) & (tu < P.Wi - radius) & \
                (tv > radius) & (tv < P.Hi - radius)
            ok &= keep(tu, tv, radius, th)
            self._add_trees(o, idx, P.qx - tcx, P.qy - tcy, ok, ht, radius, th, conifer,
                            P.fuzz)

    def _park(self, idx, P, o):
        f32 = np.float32
        up, vp, Wi, Hi = P.up, P.vp, P.Wi, P.Hi
        cx, cy = Wi * f32(0.5), Hi * f32(0.5)
        diag = f32(1.0) / np.sqrt(Wi * Wi + Hi * Hi)
        path = (np.abs(vp * Wi - up * Hi) * diag < 1.2) | \
            (np.abs(vp * Wi - (Wi - up) * Hi) * diag < 1.2)
        has_pond = unit(P.hb, 6) < f32(0.45)
        pond = has_pond & (((up - cx) / (f32(0.28) * Wi)) ** 2 +
                           ((vp - cy) / (f32(0.24) * Hi)) ** 2 < 1)
        o.top_cls[idx] = np.where(path | pond, GROUND, VEGETATION)

        def keep(tu, tv, radius, th):
            ell = ((tu - cx) / (f32(0.28) * Wi)) ** 2 + ((tv - cy) / (f32(0.24) * Hi)) ** 2
            return ~has_pond | (ell > 1.6)

        self._area_trees(idx, P, o, self.region.park_tree_density, keep)
        if o.colors:
            top = _pick(self.p_grass, unit(P.hb, 57))
            top[path] = self.c_path
            top[pond] = self.c_water
            o.top[idx] = top

    def _plaza(self, idx, P, o):
        f32 = np.float32
        up, vp, Wi, Hi = P.up, P.vp, P.Wi, P.Hi
        cx, cy = Wi * f32(0.5), Hi * f32(0.5)
        rho = np.sqrt((up - cx) ** 2 + (vp - cy) ** 2)
        monument = unit(P.hb, 7) < f32(0.5)
        fountain = ~monument & (rho < 4.5)
        rim = ~monument & (rho >= 4.5) & (rho < 5.1)
        half = f32(1.0) + f32(1.5) * unit(P.hb, 8)
        obelisk = monument & (np.abs(up - cx) < half) & (np.abs(vp - cy) < half)
        h = np.where(rim, f32(0.6), f32(0.0))
        o.h[idx] = np.where(obelisk, _lerp((10.0, 26.0), unit(P.hb, 9)), h)
        o.top_cls[idx] = np.where(rim | obelisk, MANMADE, GROUND)
        self._area_trees(idx, P, o, 0.25, lambda tu, tv, r, th:
                         np.sqrt((tu - cx) ** 2 + (tv - cy) ** 2) > r + 8)
        if o.colors:
            checker = (np.floor(up / 3.0) + np.floor(vp / 3.0)).astype(np.int64) % 2 == 0
            pav = _pick(self.p_plaza, unit(P.hb, 58))
            top = np.where(checker[:, None], pav, pav * f32(0.86))
            top[fountain] = self.c_water
            top[rim | obelisk] = self.c_stone
            o.top[idx] = top
            o.side[idx] = self.c_stone

    def _water(self, idx, P, o):
        if o.colors:
            o.top[idx] = self.c_water

    def _parking(self, idx, P, o):
        up, vp = P.up, P.vp
        self._area_trees(idx, P, o, 0.05, lambda tu, tv, r, th: True)
        if o.colors:
            m17 = np.mod(vp, 17.0)
            stall = (np.mod(up, 2.7) < 0.16) & (((m17 > 1.0) & (m17 < 6.5)) |
                                                ((m17 > 10.5) & (m17 < 16.0)))
            top = np.empty((idx.size, 3), np.float32)
            top[:] = self.c_road * np.float32(0.9)
            top[stall] = self.c_marking
            o.top[idx] = top

    def _fields(self, idx, P, o):
        R = self.region
        f32 = np.float32
        up, vp, Wi, Hi = P.up, P.vp, P.Wi, P.Hi
        nfu = 1 + (unit(P.hb, 10) * 3).astype(np.int64)
        nfv = 1 + (unit(P.hb, 11) * 2).astype(np.int64)
        fw = Wi / nfu
        fh = Hi / nfv
        fa = np.clip(np.floor(up / fw), 0, nfu - 1)
        fb = np.clip(np.floor(vp / fh), 0, nfv - 1)
        fu = up - fa * fw
        fv = vp - fb * fh
        hf = hash_ints(self.seed, P.i, P.j, fa, fb, 13)
        f_edge = np.minimum(np.minimum(fu, fw - fu), np.minimum(fv, fh - fv))
        track = f_edge < 1.0
        hedge = (unit(hf, 3) < f32(0.3)) & ~track & (f_edge < 1.0 + np.maximum(f32(0.8), P.fuzz))
        o.h[idx] = np.where(hedge, _lerp((0.9, 1.7), unit(hf, 4)), f32(0))
        o.top_cls[idx] = np.where(track, GROUND, VEGETATION)
        o.side_cls[idx] = VEGETATION

        def keep(tu, tv, radius, th):
            tfa = np.clip(np.floor(tu / fw), 0, nfu - 1)
            tfb = np.clip(np.floor(tv / fh), 0, nfv - 1)
            tfu = tu - tfa * fw
            tfv = tv - tfb * fh
            e = np.minimum(np.minimum(tfu, fw - tfu), np.minimum(tfv, fh - tfv))
            return (tfa == fa) & (tfb == fb) & (e > radius + 1.2) & (e < radius + 3.5)

        if R.field_tree_density > 0:
            self._area_trees(idx, P, o, R.field_tree_density, keep)
        if o.colors:
            f_a = _pick(self.p_field, unit(hf, 5))
            f_b = _pick(self.p_field, unit(hf, 6))
            period = _lerp((2.5, 6.0), unit(hf, 7))
            stripe_q = np.where(unit(hf, 8) < 0.5, fu, fv)
            stripes = (np.mod(stripe_q, period) < period * f32(0.5)) & (unit(hf, 9) < 0.7)
            top = np.where(stripes[:, None], f_a, f_a * f32(0.55) + f_b * f32(0.45))
            top[track] = self.c_soil * f32(1.2)
            top[hedge] = self.c_hedge
            o.top[idx] = top
            o.side[idx] = self.c_hedge

    def _street_trees(self, P, o, interior, walk, road):
        """Trees along the sidewalks, on each block's side of its nearest streets."""
        R = self.region
        f32 = np.float32
        sw = f32(R.sidewalk)
        S = f32(R.street_tree_spacing)
        reach = f32(R.crown_radius[1] + 0.3)
        lu_ok = (P.lu != WATER) & (P.lu != FIELD)
        for axis in range(2):
            if axis == 0:  # the street along q_y at the block's west or east edge
                near = P.u < P.W * f32(0.5)
                c_dist = np.where(near, P.u, P.W - P.u)
                hw = np.where(near, P.hwW, P.hwE)
            else:
                near = P.v < P.H * f32(0.5)
                c_dist = np.where(near, P.v, P.H - P.v)
                hw = np.where(near, P.hwS, P.hwN)
            cand = np.nonzero(lu_ok & (c_dist < hw + sw + reach))[0]
            if not cand.size:
                continue
            Q = P.take(cand)
            near = near[cand]
            hw = hw[cand]
            if axis == 0:
                line = np.where(near, Q.i, Q.i + 1)
                across = np.where(near, Q.hwW + sw * f32(0.5), Q.W - Q.hwE - sw * f32(0.5))
                along_q, a_lo, pa, pc = Q.qy, Q.y_lo, Q.v, Q.u
                lo_lim, hi_lim = Q.hwS + sw, Q.H - Q.hwN - sw
            else:
                line = np.where(near, Q.j, Q.j + 1)
                across = np.where(near, Q.hwS + sw * f32(0.5), Q.H - Q.hwN - sw * f32(0.5))
                along_q, a_lo, pa, pc = Q.qx, Q.x_lo, Q.u, Q.v
                lo_lim, hi_lim = Q.hwW + sw, Q.W - Q.hwE - sw
            slot = np.round(along_q / S)
            th = hash_ints(self.seed, axis, line, slot, near, 400)
            cap = hw + sw * f32(0.5) - f32(0.3)
            radius, ht, conifer = self._tree_params(th, cap)
            conifer = conifer & (unit(th, 33) < 0.2)
            ta = slot * S - a_lo
            present = (unit(th, 3) < f32(R.street_tree_prob)) & \
                (ta - radius > lo_lim) & (ta + radius < hi_lim)
            self._add_trees(o, cand, pc - across, pa - ta, present, ht, radius, th, conifer,
                            Q.fuzz)

    def _transients(self, tr, idx, P, road, walk, o):
        """Vehicles (a driving and a kerb lane) and pedestrians, in the lattice frame."""
        f32 = np.float32
        sw = f32(self.region.sidewalk)
        u, v, W, H = P.u, P.v, P.W, P.H
        hwW, hwE, hwS, hwN = P.hwW, P.hwE, P.hwS, P.hwN
        veh_h = np.zeros(idx.size, f32)
        veh_rgb = np.zeros((idx.size, 3), f32)
        veh_kind = np.zeros(idx.size, bool)  # True: vehicle (window band), False: person
        cam_qx, cam_qy = np.asarray(tr.cam_qx, f32), np.asarray(tr.cam_qy, f32)
        veh_p = np.asarray(tr.vehicle_prob, f32)
        ped_p = np.asarray(tr.pedestrian_prob, f32)
        dE, dN = W - u, H - v
        # each point's nearest street edge: 0 west, 1 east, 2 south, 3 north
        e = np.stack([u - hwW, dE - hwE, v - hwS, dN - hwN]).argmin(0)
        y_axis = e >= 2  # a street along q_x (on a y lattice line)
        side = e % 2
        c = np.choose(e, [u, dE, v, dN])  # distance from the street's centre line
        hw = np.choose(e, [hwW, hwE, hwS, hwN])
        along = np.where(y_axis, u, v)
        a_lo = np.where(y_axis, hwW, hwS)
        a_hi = np.where(y_axis, W - hwE, H - hwN)
        line = np.choose(e, [P.i, P.i + 1, P.j, P.j + 1])
        blk = np.where(y_axis, P.i, P.j)
        crossing = ((u < hwW) | (dE < hwE)) & ((v < hwS) | (dN < hwN))
        mine = road & ~crossing
        if np.any(veh_p > 0) and mine.any():
            # a driving lane ~1.8 m from the centre line, a parking lane at the kerb
            drive = np.abs(c - f32(1.8)) < 1.2
            lane_c = np.where(drive, f32(1.8), hw - f32(1.15))
            ok_lane = drive | (hw >= 4.6)
            slot = np.floor(along / f32(7.5))
            th = hash_ints(tr.seed, y_axis, line, blk, side, drive, slot)
            kind = unit(th, 1)
            length = np.where(kind < 0.8, f32(4.4), np.where(kind < 0.95, f32(5.0), f32(6.6)))
            height = np.where(kind < 0.8, f32(1.5), np.where(kind < 0.95, f32(2.0), f32(3.1)))
            width = np.where(kind < 0.95, f32(1.8), f32(2.3))
            ac = (slot + f32(0.5)) * f32(7.5) + (unit(th, 2) - f32(0.5)) * f32(1.0)
            cross_q = np.where(side == 0, lane_c, np.where(y_axis, H, W) - lane_c)
            ccx = P.x_lo + np.where(y_axis, ac, cross_q)
            ccy = P.y_lo + np.where(y_axis, cross_q, ac)
            far = (ccx - cam_qx) ** 2 + (ccy - cam_qy) ** 2 > f32(7.0 ** 2)
            prob = veh_p * np.where(drive, f32(1.0), f32(0.7))
            hit = mine & ok_lane & far & (unit(th, 3) < prob) & \
                (np.abs(along - ac) < length * f32(0.5)) & \
                (np.abs(c - lane_c) < width * f32(0.5)) & \
                (ac - length * f32(0.5) > a_lo + 1.0) & (ac + length * f32(0.5) < a_hi - 1.0)
            veh_h = np.where(hit, height, veh_h)
            veh_kind |= hit
            if o.colors:
                veh_rgb[hit] = _pick(self.p_vehicles, unit(th[hit], 4))
        if np.any(ped_p > 0):
            mine_w = walk & (c >= hw) & (c < hw + sw)
            if mine_w.any():
                slot = np.floor(along / f32(2.5))
                th = hash_ints(tr.seed, y_axis, line, blk, side, slot, 9)
                pa = (slot + f32(0.5)) * f32(2.5) + (unit(th, 2) - f32(0.5)) * f32(1.2)
                pc = hw + sw * (f32(0.25) + f32(0.5) * unit(th, 5))
                hit = mine_w & (unit(th, 3) < ped_p) & \
                    ((along - pa) ** 2 + (c - pc) ** 2 < f32(0.3 ** 2))
                veh_h = np.where(hit, f32(1.55) + f32(0.35) * unit(th, 6), veh_h)
                if o.colors:
                    veh_rgb[hit] = _pick(self.p_vehicles, unit(th[hit], 7)) * f32(0.8)
        m = veh_h > 0
        if not m.any():
            return
        gi = idx[m]
        o.h[gi] = np.maximum(o.h[gi], veh_h[m])
        o.top_cls[gi] = MANMADE
        o.side_cls[gi] = MANMADE
        if o.colors:
            o.top[gi] = veh_rgb[m]
            o.side[gi] = veh_rgb[m]
            o.tex[gi] = np.where(veh_kind[m], TEX_VEHICLE, TEX_PLAIN)
            o.floor[gi] = veh_h[m]


def _subset(value, idx, n):
    """`value[idx]` for a per-point array of length n; scalars pass through."""
    value = np.asarray(value)
    return value[idx] if value.ndim and value.shape[0] == n else value


class _Pts:
    """A bag of per-point arrays; `take(idx)` is a lazy subset (arrays gathered on use)."""

    def __init__(self, _parent=None, _idx=None, **arrays):
        self.__dict__["_parent"] = _parent
        self.__dict__["_idx"] = _idx
        self.__dict__.update(arrays)

    def __getattr__(self, name):
        parent = self.__dict__["_parent"]
        if parent is None or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(parent, name)[self.__dict__["_idx"]]
        self.__dict__[name] = value
        return value

    def take(self, idx):
        return _Pts(_parent=self, _idx=idx)


class _Out:
    """The scene's outputs at n points, filled in place by the land-use functions."""

    def __init__(self, n: int, colors: bool):
        f32 = np.float32
        self.colors = colors
        self.h = np.zeros(n, f32)
        self.clo = np.full(n, np.inf, f32)
        self.chi = np.full(n, -np.inf, f32)
        self.top_cls = np.full(n, GROUND, np.uint8)
        self.side_cls = np.full(n, MANMADE, np.uint8)
        self.road = np.zeros(n, bool)
        if colors:
            self.top = np.zeros((n, 3), f32)
            self.side = np.zeros((n, 3), f32)
            self.crown = np.zeros((n, 3), f32)
            self.tex = np.zeros(n, np.uint8)
            self.floor = np.zeros(n, f32)
            self.along = np.zeros(n, f32)
            self.nx = np.zeros(n, f32)
            self.ny = np.zeros(n, f32)
            self.shade = np.ones(n, f32)

    def as_dict(self) -> dict:
        return {k: a for k, a in self.__dict__.items() if k != "colors"}


# ---------------------------------------------------------------------------------------
# cameras


@lru_cache(maxsize=16)
def _ray_geometry(H: int, W: int, view_m: float):
    """Column directions, sample distances and row elevations of a panorama."""
    theta = 2 * np.pi * np.arange(W) / W - np.pi  # azimuth, clockwise from north
    dirx = np.sin(theta).astype(np.float32)
    diry = np.cos(theta).astype(np.float32)
    col_angle = 2 * np.pi / W
    d = [0.4]
    while d[-1] < view_m:
        d.append(d[-1] + max(0.35, d[-1] * col_angle * 1.45))
    dist = np.asarray(d, dtype=np.float32)
    step = np.diff(np.concatenate([[0.15], dist])).astype(np.float32)
    V = 2 * np.pi * H / W
    phi = V / 2 - (np.arange(H) + 0.5) * V / H
    tan_phi = np.tan(phi).astype(np.float32)
    return dirx, diry, dist, step, phi.astype(np.float32), tan_phi


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *tags])


def _photometric(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Per-view exposure, white balance, saturation and sensor noise."""
    gain = rng.normal(1.0, 0.14 * strength) * rng.normal(1.0, 0.06 * strength, size=3)
    grey = img.mean(axis=-1, keepdims=True)
    sat = max(0.3, rng.normal(1.0, 0.22 * strength))
    img = grey + (img - grey) * np.float32(sat)
    mean = np.float32(img.mean())
    img = mean + (img - mean) * np.float32(max(0.5, rng.normal(1.0, 0.1 * strength)))
    img = np.clip(img, 0.0, None) ** np.float32(np.exp(rng.normal(0.0, 0.12 * strength)))
    img = img * gain.astype(np.float32)
    # sensor noise: triangular, sd ~0.02 (cheaper than normal draws)
    noise = rng.integers(-64, 65, size=img.shape, dtype=np.int16)
    noise += rng.integers(-64, 65, size=img.shape, dtype=np.int16)
    img = img + noise.astype(np.float32) * np.float32(0.02 * strength / 52.3)
    return img


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class _Batch:
    """Points of several cameras, evaluated together in one `World.sample` call.

    `World.sample` costs a few milliseconds of fixed numpy overhead per call; rendering
    a batch of pairs with three calls in all amortises it.
    """

    def __init__(self):
        self.parts: list[tuple] = []
        self.n = 0

    def add(self, x, y, fuzz, ground: bool, tr: Transients | None = None) -> slice:
        x = np.asarray(x, np.float32).ravel()
        y = np.asarray(y, np.float32).ravel()
        fuzz = np.asarray(fuzz, np.float32)
        fuzz = fuzz.ravel() if fuzz.size == x.size else np.full(x.size, fuzz, np.float32)
        self.parts.append((x, y, fuzz, ground, tr))
        sl = slice(self.n, self.n + x.size)
        self.n += x.size
        return sl

    def run(self, world: World, colors: bool) -> dict | None:
        if self.n == 0:
            return None
        x = np.concatenate([p[0] for p in self.parts])
        y = np.concatenate([p[1] for p in self.parts])
        fuzz = np.concatenate([p[2] for p in self.parts])
        ground = np.concatenate([np.full(p[0].size, p[3]) for p in self.parts])
        tr = None
        if any(p[4] is not None for p in self.parts):
            def per_point(attr, default):
                return np.concatenate([np.full(p[0].size, getattr(p[4], attr) if p[4] else default)
                                       for p in self.parts])
            tr = Transients(seed=per_point("seed", 0).astype(np.int64),
                            cam_qx=per_point("cam_qx", 0.0).astype(np.float32),
                            cam_qy=per_point("cam_qy", 0.0).astype(np.float32),
                            vehicle_prob=per_point("vehicle_prob", 0.0).astype(np.float32),
                            pedestrian_prob=per_point("pedestrian_prob", 0.0).astype(np.float32))
        return world.sample(x, y, colors=colors, transients=tr, fuzz=fuzz, ground_view=ground)


def _part(out: dict, sl: slice) -> dict:
    return {k: v[sl] for k, v in out.items()}


class _Pano:
    """One panorama in the making: geometry passes, then the hits, then the colours."""

    def __init__(self, world: World, x: float, y: float, size, seed: int, transients: bool,
                 clean: bool):
        R = world.region
        self.world, self.x, self.y, self.seed, self.clean = world, x, y, seed, clean
        self.H, self.W = size
        (self.dirx, self.diry, self.dist, self.step, self.phi,
         self.tan_phi) = _ray_geometry(self.H, self.W, float(R.view_m))
        self.D = self.dist.size
        self.cam = np.float32(R.cam_height)
        self.rng = _rng(seed, 11)
        self.tr = None
        if transients:
            cq = world.to_q(np.float32([x]), np.float32([y]))
            self.tr = Transients(
                seed=int(self.rng.integers(2**31)),
                cam_qx=float(cq[0][0]),
                cam_qy=float(cq[1][0]),
                vehicle_prob=R.vehicle_prob * float(self.rng.uniform(0.5, 1.5)),
                pedestrian_prob=R.pedestrian_prob * float(self.rng.uniform(0.5, 1.5)),
            )
        f32 = np.float32
        self.hgt = np.zeros((self.W, self.D), f32)
        self.chi = np.full((self.W, self.D), -np.inf, f32)
        self.clo = np.full((self.W, self.D), np.inf, f32)
        self.split = int(np.searchsorted(self.dist, min(30.0, R.view_m)))
        self.todo = np.arange(self.W)

    def add_samples(self, batch: _Batch, near: bool) -> None:
        """Ray samples: near ones first; columns that a near surface already closes up
        to the top row need no far samples."""
        k0, k1 = (0, self.split) if near else (self.split, self.D)
        self.k_range = (k0, k1)
        self.sl = None
        if self.todo.size == 0 or k1 <= k0:
            return
        f32 = np.float32
        px = f32(self.x) + self.dirx[self.todo, None] * self.dist[None, k0:k1]
        py = f32(self.y) + self.diry[self.todo, None] * self.dist[None, k0:k1]
        fz = np.broadcast_to(self.step[None, k0:k1] * f32(0.6), px.shape)
        self.sl = batch.add(px, py, fz, True, self.tr)

    def take_samples(self, out: dict | None) -> None:
        if self.sl is None:
            return
        k0, k1 = self.k_range
        g = _part(out, self.sl)
        shape = (self.todo.size, k1 - k0)
        self.hgt[self.todo, k0:k1] = g["h"].reshape(shape)
        self.chi[self.todo, k0:k1] = g["chi"].reshape(shape)
        self.clo[self.todo, k0:k1] = g["clo"].reshape(shape)
        if k0 == 0:
            tan_top = ((self.hgt[:, :k1] - self.cam) / self.dist[None, :k1]).max(axis=1)
            self.todo = np.nonzero(tan_top < self.tan_phi[0])[0]

    def add_hits(self, batch: _Batch, tile: _Aerial | None = None) -> None:
        """The first surface along every ray; queue its full attributes.

        With the aerial `tile` of the same centre already evaluated, ground hits inside
        it take their colour from the tile's nearest pixel instead of a new evaluation.
        """
        f32 = np.float32
        Hh, Ww, D, cam = self.H, self.W, self.D, self.cam
        dist, tan_phi, hgt, chi = self.dist, self.tan_phi, self.hgt, self.chi
        neg_tan = -tan_phi  # increasing with the row index
        tanA = (hgt - cam) / dist[None, :]
        rA = np.searchsorted(neg_tan, -tanA.ravel(), side="left").reshape(Ww, D)
        has_crown = np.isfinite(chi)
        tan_hi = np.where(has_crown, (chi - cam) / dist[None, :], -np.inf)
        tan_lo = np.where(has_crown, (self.clo - cam) / dist[None, :], np.inf)
        rU = np.searchsorted(neg_tan, -tan_hi.ravel(), side="left").reshape(Ww, D)
        rL = (np.searchsorted(neg_tan, -tan_lo.ravel(), side="right") - 1).reshape(Ww, D)
        # a row r is hit at sample k if r >= rA (height field) or rU <= r <= rL (crown);
        # in small unsigned ints, rU <= r <= rL is (r - rU) <= (rL - rU) with wrap-around
        dt = np.uint8 if Hh < 250 else np.uint16
        none = rL < rU
        span = np.where(none, 0, rL - rU).astype(dt)
        rU8 = np.where(none, np.iinfo(dt).max, rU).astype(dt)
        rA8 = np.minimum(rA, np.iinfo(dt).max).astype(dt)
        rows = np.arange(Hh, dtype=dt)[None, :, None]
        hit = rows >= rA8[:, None, :]
        hit |= (rows - rU8[:, None, :]) <= span[:, None, :]
        kk = hit.argmax(axis=2)  # (W, H): the first sample hit along each ray
        any_hit = np.take_along_axis(hit, kk[:, :, None], axis=2)[:, :, 0]
        del hit
        cols = np.arange(Ww)[:, None]
        rr = np.arange(Hh)[None, :]
        flat = cols * D + kk
        in_span = any_hit & (rr >= rU[cols, kk]) & (rr <= rL[cols, kk])
        in_crown = in_span & ((rr < rA[cols, kk]) | (chi[cols, kk] > hgt[cols, kk]))
        hf_hit = any_hit & ~in_crown
        h_at = hgt[cols, kk]
        d_at = dist[kk]
        z_at = cam + d_at * tan_phi[None, :]
        ground = hf_hit & (h_at < 0.05) & (tan_phi[None, :] < 0)
        side = hf_hit & ~ground & (z_at < h_at - 0.12)
        top = hf_hit & ~ground & ~side
        d_ground = np.where(ground, cam / np.maximum(-tan_phi[None, :], 1e-6), 0).astype(f32)
        gx = f32(self.x) + self.dirx[:, None] * d_ground
        gy = f32(self.y) + self.diry[:, None] * d_ground
        # full attributes at the exact ground points and at the hit samples
        obj = (hf_hit & ~ground) | in_crown
        obj_flat = np.unique(flat[obj])
        oc, ok_ = np.divmod(obj_flat, D)
        gx, gy = gx[ground], gy[ground]
        self.g_known = np.zeros(gx.size, bool)
        if tile is not None:
            S, gsd = tile.size, tile.gsd
            tc = np.floor((gx - f32(tile.cx)) / f32(gsd) + f32(S / 2)).astype(np.int64)
            tr_ = np.floor((f32(tile.cy) - gy) / f32(gsd) + f32(S / 2)).astype(np.int64)
            inside = (tc >= 0) & (tc < S) & (tr_ >= 0) & (tr_ < S)
            tc, tr_ = np.where(inside, tc, 0), np.where(inside, tr_, 0)
            self.g_known = inside & (tile.raw["h"][tr_, tc] < 0.05)
            self.g_top = tile.raw["top"][tr_[self.g_known], tc[self.g_known]]
            self.g_cls = tile.raw["top_cls"][tr_[self.g_known], tc[self.g_known]]
        todo = ~self.g_known
        n_eval = int(todo.sum())
        qx = np.concatenate([gx[todo], f32(self.x) + self.dirx[oc] * dist[ok_]])
        qy = np.concatenate([gy[todo], f32(self.y) + self.diry[oc] * dist[ok_]])
        qfuzz = np.concatenate([np.zeros(n_eval, f32), self.step[ok_] * f32(0.6)])
        self.sl = batch.add(qx, qy, qfuzz, True, self.tr)
        lookup = np.full(Ww * D, -1, np.int64)
        lookup[obj_flat] = np.arange(obj_flat.size) + n_eval
        self.obj_idx = lookup[flat]
        self.n_eval = n_eval
        self.masks = (any_hit, ground, side, top, in_crown)
        self.z_at = z_at
        self.dist_px = np.where(ground, d_ground, d_at).astype(f32)

    def finish(self, out: dict) -> tuple[np.ndarray, np.ndarray]:
        f32 = np.float32
        world, R, rng, clean = self.world, self.world.region, self.rng, self.clean
        full = _part(out, self.sl)
        any_hit, ground, side, top, in_crown = self.masks
        obj_idx, z_at, phi, tan_phi = self.obj_idx, self.z_at, self.phi, self.tan_phi
        Hh, Ww = self.H, self.W
        img = np.zeros((Ww, Hh, 3), f32)
        lab = np.zeros((Ww, Hh), np.uint8)
        # lighting for this capture
        sun_az = float(rng.uniform(0, 2 * np.pi))
        sun_el = math.radians(float(rng.uniform(*R.sun_elevation)))
        sun_x, sun_y = math.sin(sun_az), math.cos(sun_az)
        # ground
        g_top = np.empty((self.g_known.size, 3), f32)
        g_cls = np.empty(self.g_known.size, np.uint8)
        g_top[~self.g_known] = full["top"][:self.n_eval]
        g_cls[~self.g_known] = full["top_cls"][:self.n_eval]
        if self.g_known.any():
            g_top[self.g_known] = self.g_top
            g_cls[self.g_known] = self.g_cls
        img[ground] = g_top
        lab[ground] = g_cls
        # tops seen from the side (pitched roofs, car roofs, low walls)
        ti = obj_idx[top]
        img[top] = full["top"][ti] * f32(0.92)
        lab[top] = full["top_cls"][ti]
        # vertical faces: facades with windows, vehicles with a window band
        si = obj_idx[side]
        col = full["side"][si].copy()
        zs = z_at[side]
        tex = full["tex"][si]
        fl = full["floor"][si]
        win = (tex == TEX_WINDOWS) & (zs > 1.0)
        fz = np.mod(zs, np.maximum(fl, 1.0)) / np.maximum(fl, 1.0)
        fa = np.mod(full["along"][si], 3.0) / 3.0
        win &= (fz > 0.3) & (fz < 0.8) & (fa > 0.2) & (fa < 0.8)
        col[win] = col[win] * f32(0.25) + world.c_glass * f32(0.75)
        col[(tex == TEX_VEHICLE) & (zs > fl * 0.55) & (zs < fl * 0.92)] = world.c_glass
        col[(tex == TEX_VEHICLE) & (zs < 0.35)] = f32(0.08)
        if not clean:
            ndot = full["nx"][si] * sun_x + full["ny"][si] * sun_y
            col *= (f32(0.72) + f32(0.38 * math.cos(sun_el)) * np.clip(ndot, 0, 1))[:, None]
        img[side] = col
        lab[side] = full["side_cls"][si]
        # crowns
        ci = obj_idx[in_crown]
        ccol = full["crown"][ci]
        if not clean:
            cc, cr = np.nonzero(in_crown)
            leaf = unit(hash_ints(self.seed, cc, cr), 3)
            ccol = ccol * (full["shade"][ci] * (f32(0.8) + f32(0.35) * leaf))[:, None]
        img[in_crown] = ccol
        lab[in_crown] = VEGETATION
        # sky, with clouds on a plane above the camera (they shrink towards the horizon)
        sky_top = _pal(R.sky_top)[0]
        sky_hor = _pal(R.sky_horizon)[0]
        haze = _pal(R.haze)[0]
        none = ~any_hit
        below = none & (tan_phi[None, :] < 0)
        above = none & ~below
        ac, ar = np.nonzero(above)
        t = np.sqrt(np.clip(phi[ar] / f32(np.pi / 2), 0, 1))[:, None]
        sky = sky_hor[None, :] + (sky_top - sky_hor)[None, :] * t
        if not clean and ac.size:
            cover = float(rng.uniform(*R.cloud_cover))
            tphi = np.maximum(np.tan(np.maximum(phi[ar], 0.02)), 0.02)
            theta = 2 * np.pi * ac / Ww - np.pi
            cxp = (np.sin(theta) / tphi).astype(f32) * f32(1.2)
            cyp = (np.cos(theta) / tphi).astype(f32) * f32(1.2)
            cs = int(rng.integers(2**31))
            cloud = value_noise(cs, cxp + 50.0, cyp + 50.0) * 0.65 + \
                value_noise(cs + 1, cxp * 3.1, cyp * 3.1) * 0.35
            cloud = np.clip((cloud - (1.0 - cover)) / 0.18, 0, 1).astype(f32)
            cloud_col = f32(0.95) - f32(0.25) * value_noise(cs + 2, cxp * 2.0, cyp * 2.0)
            sky = sky * (1 - cloud[:, None]) + (cloud_col * cloud)[:, None]
        img[ac, ar] = sky
        lab[above] = SKY
        img[below] = np.mean(np.stack([world.c_road, *world.p_grass]), axis=0) * 0.5 + haze * 0.5
        lab[below] = GROUND
        if not clean:
            fog = 1.0 - np.exp(-self.dist_px / f32(R.fog_m))
            fog[none] = 0.0
            img = img * (1 - fog[:, :, None]) + haze[None, None, :] * fog[:, :, None]
            img[any_hit] *= f32(0.8 + 0.25 * math.sin(sun_el))
            img = _photometric(img, _rng(self.seed, 12), 1.0)
        return _to_u8(img.transpose(1, 0, 2)), lab.T.copy()


class _Aerial:
    """One aerial tile in the making: heights in a sun-side margin, colours in the tile."""

    def __init__(self, world: World, cx: float, cy: float, size: int, seed: int,
                 tile_m: float | None, clean: bool):
        R = world.region
        self.world, self.size, self.seed, self.clean = world, size, seed, clean
        self.cx, self.cy = cx, cy
        self.gsd = gsd = float(tile_m or R.tile_m) / size
        self.rng = _rng(seed, 21)
        sun_az = float(self.rng.uniform(0, 2 * np.pi))
        self.sun_el = math.radians(float(self.rng.uniform(*R.sun_elevation)))
        # pad the raster on the sun's side so shadows of things outside the tile fall in
        self.pad_m = 0.0 if clean else min(24.0, 30.0 / math.tan(self.sun_el))
        pad = int(math.ceil(self.pad_m / gsd))
        self.sx, self.sy = math.sin(sun_az), math.cos(sun_az)
        self.left = pad if self.sx < 0 else 0
        right = pad if self.sx > 0 else 0
        self.top = pad if self.sy > 0 else 0
        bot = pad if self.sy < 0 else 0
        f32 = np.float32
        cols = np.arange(-self.left, size + right, dtype=f32)
        rows = np.arange(-self.top, size + bot, dtype=f32)
        X = f32(cx) + (cols[None, :] + f32(0.5) - f32(size / 2)) * f32(gsd)
        Y = f32(cy) - (rows[:, None] + f32(0.5) - f32(size / 2)) * f32(gsd)
        self.X, self.Y = np.broadcast_arrays(X, Y)
        self.in_tile = np.zeros(self.X.shape, bool)
        self.in_tile[self.top:self.top + size, self.left:self.left + size] = True
        self.sl_margin = None

    def add_margin(self, batch: _Batch) -> None:
        """Heights in the margin, on every other pixel (they only cast shadows)."""
        if not self.in_tile.all():
            self.coarse = ~self.in_tile[::2, ::2]
            self.sl_margin = batch.add(self.X[::2, ::2][self.coarse], self.Y[::2, ::2][self.coarse],
                                       self.gsd, False)

    def take_margin(self, out: dict | None) -> None:
        self.margin = None
        if self.sl_margin is not None:
            m = _part(out, self.sl_margin)
            shape = self.coarse.shape
            h = np.zeros(shape, np.float32)
            chi = np.full(shape, -np.inf, np.float32)
            h[self.coarse] = m["h"]
            chi[self.coarse] = m["chi"]
            rows, cols = self.X.shape
            out_ = ~self.in_tile
            self.margin = {k: np.repeat(np.repeat(a, 2, 0), 2, 1)[:rows, :cols][out_]
                           for k, a in (("h", h), ("chi", chi))}

    def add_tile(self, batch: _Batch) -> None:
        self.sl_tile = batch.add(self.X[self.in_tile], self.Y[self.in_tile], self.gsd * 0.5,
                                 False)

    def take_tile(self, out: dict) -> None:
        """Keep the tile's raw attributes (also used for the panorama's ground)."""
        s = _part(out, self.sl_tile)
        S = self.size
        self.raw = {"h": s["h"].reshape(S, S), "top": s["top"].reshape(S, S, 3),
                    "top_cls": s["top_cls"].reshape(S, S)}
        self.s = s

    def finish(self) -> np.ndarray:
        f32 = np.float32
        s = self.s
        X, Y, in_tile, gsd, size = self.X, self.Y, self.in_tile, self.gsd, self.size
        shape = X.shape
        h = np.zeros(shape, f32)
        chi = np.full(shape, -np.inf, f32)
        h[in_tile] = s["h"]
        chi[in_tile] = s["chi"]
        if self.margin is not None:
            h[~in_tile] = self.margin["h"]
            chi[~in_tile] = self.margin["chi"]
        crown_top = chi > h
        Ht = np.where(crown_top, chi, h).astype(f32)
        col = np.zeros((*shape, 3), f32)
        col[in_tile] = np.where(crown_top[in_tile][:, None], s["crown"], s["top"])
        if not self.clean:
            sx, sy, sun_el = self.sx, self.sy, self.sun_el
            # leaf texture on crowns
            leafy = crown_top & in_tile
            leaf = unit(hash_ints(self.world.seed, np.floor(X[leafy] / 0.8),
                                  np.floor(Y[leafy] / 0.8), 5), 0)
            col[leafy] *= (f32(0.8) + f32(0.35) * leaf)[:, None]
            # Lambert shading from the height field
            gy_, gx_ = np.gradient(Ht, f32(gsd))
            gx_ = np.clip(gx_, -2.5, 2.5)
            gy_ = np.clip(-gy_, -2.5, 2.5)  # rows grow southwards
            nz = 1.0 / np.sqrt(gx_ * gx_ + gy_ * gy_ + 1.0)
            sun = np.array([sx * math.cos(sun_el), sy * math.cos(sun_el), math.sin(sun_el)], f32)
            lam = np.clip((-gx_ * sun[0] - gy_ * sun[1] + sun[2]) * nz / sun[2], 0.0, 1.4)
            # cast shadows: march towards the sun over the padded height field
            shadow = np.zeros(shape, bool)
            tan_el = math.tan(sun_el)
            steps = int(min(self.pad_m, float(Ht.max()) / max(tan_el, 1e-3)) / gsd)
            stride = max(1, steps // 24)
            base = Ht + f32(0.15)
            for st in range(stride, steps + 1, stride):
                dc = int(round(st * sx))
                dr = int(round(-st * sy))
                r0, r1 = max(0, -dr), min(shape[0], shape[0] - dr)
                c0, c1 = max(0, -dc), min(shape[1], shape[1] - dc)
                if r1 <= r0 or c1 <= c0:
                    continue
                shadow[r0:r1, c0:c1] |= (Ht[r0 + dr:r1 + dr, c0 + dc:c1 + dc] -
                                         f32(st * gsd * tan_el)) > base[r0:r1, c0:c1]
            light = np.where(shadow, f32(0.5), f32(0.42) + f32(0.58) * lam)
            col = (col * light[:, :, None])[self.top:self.top + size, self.left:self.left + size]
            # cloud shadows (seen only from above)
            cs = int(self.rng.integers(2**31))
            Xt = X[self.top:self.top + size, self.left:self.left + size]
            Yt = Y[self.top:self.top + size, self.left:self.left + size]
            cl = value_noise(cs, Xt / f32(90.0), Yt / f32(90.0))
            cover = float(self.rng.uniform(0.0, 0.5))
            cshadow = np.clip((cl - (1.0 - cover)) / 0.15, 0, 1).astype(f32)
            col = col * (1.0 - 0.35 * cshadow)[:, :, None]
        else:
            col = col[self.top:self.top + size, self.left:self.left + size]
        if not self.clean:
            col = _photometric(col, _rng(self.seed, 22), 1.0)
        return _to_u8(col)


def render_batch(
    world: World,
    cams,
    seeds,
    pano_size: tuple[int, int] | None = (64, 256),
    aerial_size: int | None = 128,
    *,
    aerial_centres=None,
    tile_m: float | None = None,
    transients: bool = True,
    clean: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Render panoramas at `cams` and aerial tiles centred on `aerial_centres` (default:
    the same points) in three scene evaluations for the whole batch.

    `pano_size=None` or `aerial_size=None` skips that view. Returns ([(panorama, labels)],
    [aerial]). The result of each camera does not depend on the rest of the batch.
    """
    cams = [(float(x), float(y)) for x, y in cams]
    seeds = [int(s) for s in seeds]
    centres = cams if aerial_centres is None else [(float(x), float(y))
                                                   for x, y in aerial_centres]
    panos = [_Pano(world, x, y, pano_size, s, transients, clean)
             for (x, y), s in zip(cams, seeds, strict=True)] if pano_size else []
    tiles = [_Aerial(world, x, y, aerial_size, s, tile_m, clean)
             for (x, y), s in zip(centres, seeds, strict=True)] if aerial_size else []
    first = _Batch()
    for p in panos:
        p.add_samples(first, near=True)
    for a in tiles:
        a.add_margin(first)
    out = first.run(world, colors=False)
    for p in panos:
        p.take_samples(out)
    for a in tiles:
        a.take_margin(out)
    far = _Batch()
    for p in panos:
        p.add_samples(far, near=False)
    out = far.run(world, colors=False)
    for p in panos:
        p.take_samples(out)
    # the tiles first when they share the panoramas' centres: their ground serves both
    shared = bool(panos) and bool(tiles) and aerial_centres is None
    if shared:
        batch = _Batch()
        for a in tiles:
            a.add_tile(batch)
        out = batch.run(world, colors=True)
        for a in tiles:
            a.take_tile(out)
    last = _Batch()
    for n, p in enumerate(panos):
        p.add_hits(last, tiles[n] if shared else None)
    if not shared:
        for a in tiles:
            a.add_tile(last)
    out = last.run(world, colors=True)
    if not shared:
        for a in tiles:
            a.take_tile(out)
    return [p.finish(out) for p in panos], [a.finish() for a in tiles]


def render_panorama(
    world: World,
    x: float,
    y: float,
    size: tuple[int, int] = (64, 256),
    seed: int = 0,
    *,
    transients: bool = True,
    clean: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the panorama seen from (x, y). Returns (H x W x 3 uint8, H x W labels).

    `seed` draws the capture conditions (vehicles, people, clouds, sun, camera
    response). `clean=True` turns off haze, clouds, shading and noise (for tests).
    """
    panos, _ = render_batch(world, [(x, y)], [seed], size, None, transients=transients,
                            clean=clean)
    return panos[0]


def render_aerial(
    world: World,
    cx: float,
    cy: float,
    size: int = 128,
    seed: int = 0,
    *,
    tile_m: float | None = None,
    clean: bool = False,
) -> np.ndarray:
    """The orthographic north-up tile centred on (cx, cy): size x size x 3 uint8.

    Pixel (row, col) covers the point x = cx + (col + 0.5 - size/2) * gsd,
    y = cy - (row + 0.5 - size/2) * gsd with gsd = tile_m / size.
    """
    _, tiles = render_batch(world, [(cx, cy)], [seed], None, size, tile_m=tile_m, clean=clean)
    return tiles[0]


def with_region(region: str | Region, **overrides) -> Region:
    """A copy of a region with some parameters changed (experiments, tests)."""
    base = get_region(region) if isinstance(region, str) else region
    return replace(base, **overrides)
