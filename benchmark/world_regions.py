"""The synthetic world's regions and building styles, as data.

A `Region` is a named distribution of scenes: street layout (grid or organic), block
sizes, land-use and building-style proportions, vegetation, transients (vehicles,
people, clouds), lighting, palettes, ground-sample distance and camera height. A `Style`
says how the lots of a built block are divided and built on. Regions share one
vocabulary (`STYLES`, parks, plazas, water, fields, trees) and differ in its
proportions, the way real datasets differ, so a model trained on one region transfers,
with a gap, to another. Nothing here computes anything: `world_scene.World` reads these
numbers. Lengths are metres, colours 0-255 RGB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from gengeo_bench.errors import ConfigError

# How much of each pair only one view shows, 0..1, beside a region's own proportions
# (`world_render` says what it scales); 0.5 is the world as it was before the option.
DEFAULT_UNMATCHED = 0.5


def check_unmatched(unmatched: float) -> float:
    unmatched = float(unmatched)
    if not 0.0 <= unmatched <= 1.0:
        raise ValueError(f"unmatched must be in [0, 1], got {unmatched}")
    return unmatched

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


def with_region(region: str | Region, **overrides) -> Region:
    """A copy of a region with some parameters changed (experiments, tests)."""
    base = get_region(region) if isinstance(region, str) else region
    return replace(base, **overrides)
