"""A procedural 2.5-D cross-view world: one scene, two cameras.

The world lives in three modules, read in this order:

- `world_regions`: the regions and building styles, as data (`REGIONS`, `STYLES`);
- `world_scene`: the scene, a function of world coordinates (`World.sample`): heights,
  tree crowns, colours and classes of any point, from integer hashes of lattice indices;
- `world_render`: the two cameras (`render_batch`, `render_panorama`, `render_aerial`)
  and the masks of content only one view shows.

This module gathers their public names (import them from here) and states the
conventions.

Panorama convention (the CVUSA one): equirectangular with square pixels, W = 4 H by
default, so the vertical field of view is 360 * H / W degrees centred on the horizon.
Column c looks at azimuth ``360 * c / W - 180`` degrees, measured clockwise from north:
column 0 looks south, W/4 west, **W/2 north (the centre column)**, 3W/4 east. Azimuth
grows left to right (clockwise seen from above), so rotating the aerial tile by k x 90
degrees counter-clockwise matches rolling the panorama left by k quarter widths
(``torch.roll(pano, -k * W // 4, dims=-1)`` with ``torch.rot90(aerial, k, (-2, -1))``).
Row r looks at elevation ``V/2 - (r + 0.5) * V / H`` with V = 360 * H / W.

Aerial convention: orthographic, north up: row 0 is north, column 0 is west; pixel
(r, c) of a tile of S pixels centred on (cx, cy) covers x = cx + (c + 0.5 - S/2) gsd,
y = cy - (r + 0.5 - S/2) gsd, gsd = tile_m / S.

Partial correspondence is built in: vehicles, pedestrians and clouds exist only for the
panorama (they are transient), while roof details, yards behind walls, pools, sheds and
cloud shadows are visible only from above, and facades only from the ground. The masks
(`masks=True`) mark the content that exists in one view only; `unmatched` sets how much.

Panorama labels (4 classes, in the spirit of CVUSA's annotations): 0 sky, 1 man-made
(facades, roofs, walls, vehicles, people), 2 ground (roads, pavements, plazas, water,
bare soil), 3 vegetation (trees, hedges, grass, crops).

Regions share one vocabulary (streets, the building styles, parks, plazas, water,
fields, trees) and differ in its proportions, in street layout (grid or organic),
building heights, vegetation, palettes, ground-sample distance and camera height, the
way real datasets differ; so a model trained on one region transfers, with a gap, to
another.
"""

from __future__ import annotations

from gengeo_bench.world_regions import (
    DEFAULT_UNMATCHED,
    REGIONS,
    STYLES,
    Region,
    Style,
    check_unmatched,
    describe_region,
    get_region,
    region_record,
    with_region,
)
from gengeo_bench.world_render import (
    render_aerial,
    render_batch,
    render_panorama,
)
from gengeo_bench.world_scene import (
    BUILT,
    FIELD,
    GROUND,
    LABELS,
    LANDUSES,
    MANMADE,
    PARK,
    PARKING,
    PLAZA,
    SKY,
    TRANSIENT_RANGE,
    VEGETATION,
    WATER,
    Box,
    Capture,
    World,
)

__all__ = [
    "BUILT", "DEFAULT_UNMATCHED", "FIELD", "GROUND", "LABELS", "LANDUSES", "MANMADE", "PARK",
    "PARKING", "PLAZA", "REGIONS", "SKY", "STYLES", "TRANSIENT_RANGE",
    "VEGETATION", "WATER", "Box", "Capture", "Region", "Style", "World", "check_unmatched",
    "describe_region", "get_region", "region_record", "render_aerial", "render_batch",
    "render_panorama", "with_region",
]
