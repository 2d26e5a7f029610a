"""The synthetic world's scene: a function of world coordinates, compiled with numba.

Every query point (metres; x east, y north) gets a height-field top (ground 0, buildings,
walls, hedges), an optional tree crown interval [low, high] (crowns float over their
trunks, so a ray can pass beneath them), colours, a side texture and semantic classes.
Nothing is stored: streets, blocks, lots, buildings and trees come from integer hashes of
lattice indices, so any point of an unbounded world is evaluated in isolation.

How a point is evaluated, top to bottom in `_sample`:

1. the point moves into the street-lattice frame (`_to_q`: a rotation, plus a warp for
   organic street layouts);
2. the two street lines on either side along each lattice axis (`_cell`) say whether the
   point is on a road, a sidewalk or inside a block;
3. a block's hash draws its land use (`LANDUSES`) and, when built, its building style
   (`world_regions.STYLES`); the land-use function (`_built`, `_park`, ...) fills in the
   point's outputs;
4. street trees, then the transients of a capture (vehicles, people: `Capture`), then
   the extra `Box`es, go on top.

The functions are plain scalar code compiled by numba, each with its argument types
declared (so it compiles once, when this module is first imported on a machine: about
10 s; `cache=True` then loads it from `__pycache__` in well under a second). They read
the region from `S`, one float64 vector with named slots that `World` writes (the slot
constants below: `SIDEWALK`, `C_ROAD`, the style records `ST_*`, ...), and write a
point's outputs into row n of an output array (columns `F_H`, `F_TOP`, ...).

Speed (perf/bench_synthetic.py): a point costs 150-400 ns. Compiled scalar code is not
much faster per point than the numpy vectorised form it replaced; the renderer saves by
evaluating fewer points (a ray stops at its last open row) and by cheap shading.

What exists for one view only (the masks of `world_render`): transients are present at
one capture; `Capture.ground=True` (the panorama's) puts vehicles and people on the
streets, and an aerial capture can have its own vehicles. The `F_ONLY` column marks the
points whose visible top or side is such content, or a `Box` of one view only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit, typeof, types

from gengeo_bench.world_regions import STYLES, Region, get_region

SKY, MANMADE, GROUND, VEGETATION = 0, 1, 2, 3
LABELS = {SKY: "sky", MANMADE: "man-made", GROUND: "ground", VEGETATION: "vegetation"}

# land use of a block
BUILT, PARK, PLAZA, WATER, FIELD, PARKING = range(6)
LANDUSES = ("built", "park", "plaza", "water", "field", "parking")

# vehicles and people are placed only this close to the panorama's camera (metres)
TRANSIENT_RANGE = 70.0

# side texture of a vertical surface hit by a ray
TEX_PLAIN, TEX_WINDOWS, TEX_VEHICLE = 0, 1, 2

# which views see an extra box
BOX_BOTH, BOX_GROUND_ONLY, BOX_AIR_ONLY = 0, 1, 2

# Argument types, declared with each compiled function: each then compiles exactly once
# (undeclared, numba compiles one version per literal argument: every salt, slot and
# True/False, which multiplies the first run's compile time).
INT, FLOAT, BOOL = types.int64, types.float64, types.boolean
VEC = types.float64[::1]  # the parameter vector, the memo
OUT = types.float64[:, ::1]  # output rows
RGB = types.UniTuple(types.float64, 3)

_M32 = 0xFFFFFFFF  # hashes are uint32 values held in int64 (products wrap, then masked)


# ---------------------------------------------------------------------------------------
# hashing and noise


@njit((INT,), cache=True)
def _mix(h):
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


@njit(cache=True)
def hash_ints(seed, a, b=0, c=0, d=0, e=0, f=0, g=0):
    """A well-mixed 32-bit hash of up to seven integer keys and a seed (missing keys: 0)."""
    acc = (np.int64(seed) * 0x2545F491) & 0x7FFFFFFF
    acc += (np.int64(a) * 0x9E3779B1 + np.int64(b) * 0x85EBCA77 + np.int64(c) * 0xC2B2AE3D
            + np.int64(d) * 0x27D4EB2F + np.int64(e) * 0x165667B1 + np.int64(f) * 0xD3A2646C
            + np.int64(g) * 0xFD7046C5)
    return _mix(acc & _M32)


@njit((INT, INT), cache=True)
def unit(h, salt):
    """A float in [0, 1) drawn from hash `h` and a salt (independent per salt)."""
    a = (salt * 0x9E3779B1 + 0x7F4A7C15) & _M32
    m = (((salt + 1) * 0x85EBCA6B) & _M32) | 1
    v = ((h ^ a) * m) & _M32
    v ^= v >> 15
    return (v >> 8) * (1.0 / 16777216.0)


@njit((INT, FLOAT, FLOAT), cache=True)
def value_noise(seed, x, y):
    """Smooth value noise in [0, 1) on a unit lattice."""
    xf = math.floor(x)
    yf = math.floor(y)
    fx = x - xf
    fy = y - yf
    sx = fx * fx * (3.0 - 2.0 * fx)
    sy = fy * fy * (3.0 - 2.0 * fy)
    c00 = unit(hash_ints(seed, xf, yf), 0)
    c10 = unit(hash_ints(seed, xf + 1, yf), 0)
    c01 = unit(hash_ints(seed, xf, yf + 1), 0)
    c11 = unit(hash_ints(seed, xf + 1, yf + 1), 0)
    a = c00 + (c10 - c00) * sx
    b = c01 + (c11 - c01) * sx
    return a + (b - a) * sy


@njit((FLOAT, FLOAT, FLOAT), cache=True)
def _lerp(lo, hi, u):
    return lo + (hi - lo) * u


@njit((INT, INT), cache=True)
def _gauss(h, salt):
    """Roughly standard normal (Irwin-Hall of 3)."""
    return (unit(h, salt) + unit(h, salt + 1) + unit(h, salt + 2) - 1.5) * 2.0


# colours are (r, g, b) tuples of floats in [0, 1] inside the compiled code


@njit((RGB, FLOAT), cache=True)
def _scale(c, f):
    return (c[0] * f, c[1] * f, c[2] * f)


@njit((RGB, RGB, FLOAT), cache=True)
def _blend(a, b, t):
    """a * (1 - t) + b * t."""
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


@njit((OUT, INT, INT, RGB), cache=True)
def _put(out, n, field, c):
    out[n, field] = c[0]
    out[n, field + 1] = c[1]
    out[n, field + 2] = c[2]


@njit((OUT, INT, INT), cache=True)
def _get(out, n, field):
    return (out[n, field], out[n, field + 1], out[n, field + 2])


# ---------------------------------------------------------------------------------------
# the compiled scene's inputs and outputs


# The region, its building styles and the extra boxes reach the compiled code as one
# float64 vector S with named slots (a tuple or a record of arrays would be a new numba
# type, so a new compilation, per region, and numba counts references to each array
# passed at every call, which costs more than the scene's arithmetic). `World` writes S.
# A range (lo, hi) takes two slots, a colour three; a table is an (offset, count) pair
# pointing at its records further down in S.


class _Slots:
    """Hands out consecutive slot numbers: `take(size)` returns the first of `size`."""

    def __init__(self) -> None:
        self.size = 0

    def take(self, size: int = 1) -> int:
        at = self.size
        self.size += size
        return at


_s = _Slots()
SEED = _s.take()
PROCEDURAL = _s.take()  # 1: the procedural scene, 0: a flat paved plane
COS, SIN = _s.take(), _s.take()  # the street lattice's rotation
BLOCK = _s.take(2)  # mean block pitch along each lattice axis
BLOCK_JITTER = _s.take()
ROAD_HALF = _s.take(2)
AVENUE_EVERY = _s.take()
SIDEWALK = _s.take()
MARKING_PROB = _s.take()
CROSSINGS = _s.take()
DISTRICT_SCALE = _s.take()
STREET_TREE_PROB = _s.take()
STREET_TREE_SPACING = _s.take()
PARK_TREE_DENSITY = _s.take()
FIELD_TREE_DENSITY = _s.take()
TREE_LATTICE = _s.take(2)
CROWN_RADIUS = _s.take(2)
TREE_HEIGHT = _s.take(2)
CONIFER_PROB = _s.take()
C_ROAD, C_MARKING, C_SIDEWALK, C_WATER, C_POOL = (_s.take(3) for _ in range(5))
C_PATH, C_SOIL, C_TRUNK, C_STONE, C_GLASS, C_HEDGE, C_SOLAR = (_s.take(3) for _ in range(7))
# palettes: tables of colours (3 values per record)
P_GRASS, P_PLAZA, P_FIELD, P_TREES, P_CONIFERS, P_WALL, P_VEHICLES = (
    _s.take(2) for _ in range(7))
WARP = _s.take(2)  # records: axis, amplitude, kx, ky, phase
LANDUSE = _s.take(2)  # records: cumulative probability, land-use code
STYLE_TABLE = _s.take(2)  # records: the ST_ slots below
BOX_TABLE = _s.take(2)  # records: the BOX_ slots below
HEADER_SIZE = _s.size

_st = _Slots()  # a building style's record (world_regions.Style)
ST_CDF = _st.take()  # cumulative probability of the styles up to this one
ST_LOT_WIDTH = _st.take()
ST_LOT_DEPTH_MIN = _st.take()
ST_BUILD_PROB = _st.take()
ST_LAWN_PROB = _st.take()
ST_SETBACK_FRONT = _st.take(2)
ST_SETBACK_SIDE = _st.take(2)
ST_SETBACK_BACK = _st.take(2)
ST_HEIGHT_MEDIAN = _st.take()
ST_HEIGHT_SIGMA = _st.take()
ST_HEIGHT_RANGE = _st.take(2)
ST_DISTRICT_AMP = _st.take()
ST_FLOOR_HEIGHT = _st.take(2)
ST_PITCHED_PROB = _st.take()
ST_WALL_PROB = _st.take()
ST_HEDGE_PROB = _st.take()
ST_WALL_HEIGHT = _st.take(2)
ST_HEDGE_HEIGHT = _st.take(2)
ST_POOL_PROB = _st.take()
ST_SHED_PROB = _st.take()
ST_SHED_SIZE = _st.take(2)
ST_SHED_HEIGHT = _st.take(2)
ST_YARD_TREE_DENSITY = _st.take()
ST_ROOF = _st.take(2)  # palettes (tables), in the region's tint
ST_FACADE = _st.take(2)
STYLE_SIZE = _st.size

_bx = _Slots()  # an extra box's record
BOX_RECT = _bx.take(4)  # x0, y0, x1, y1
BOX_HEIGHT = _bx.take()
BOX_FACADE = _bx.take(3)
BOX_ROOF = _bx.take(3)
BOX_KIND = _bx.take()  # BOX_BOTH, BOX_GROUND_ONLY or BOX_AIR_ONLY
BOX_SIZE = _bx.size


# A small cache carried from one point to the next (neighbouring points along a ray or a
# tile row mostly share their street cells and block): the last cell per lattice axis
# (line index, lo, hi, half width at lo, at hi) and the last block (i, j, hash, land use,
# district field, style record). It saves work only: no result depends on it.
M_CELL = 0  # 5 slots per axis
M_BLOCK = 10
MEMO_SIZE = 16


@njit((), cache=True)
def new_memo():
    return np.full(MEMO_SIZE, np.nan)


# sin(2 pi t / 4096) at t = 0..4096: the street warp's sinusoids, by linear interpolation
# (error below 3e-7 of the amplitude, 4x cheaper than math.sin)
_SINE = np.sin(np.arange(4097) * (2 * np.pi / 4096))


@njit((FLOAT,), cache=True)
def _sin(a):
    t = a * (4096 / (2 * np.pi))
    k = math.floor(t)
    f = t - k
    i = int(k) & 4095
    return _SINE[i] + (_SINE[i + 1] - _SINE[i]) * f


@njit((VEC, INT, FLOAT), cache=True)
def _range(S, at, u):
    """The range (lo, hi) at slot `at`, interpolated at u."""
    return S[at] + (S[at + 1] - S[at]) * u


@njit((VEC, INT), cache=True)
def _colour(S, at):
    return (S[at], S[at + 1], S[at + 2])


@njit((VEC, INT), cache=True)
def _table(S, at):
    """The offset and record count of the table at slot `at`."""
    return int(S[at]), int(S[at + 1])


@njit((VEC, INT, FLOAT), cache=True)
def _pick(S, palette, u):
    """A colour of the palette table at slot `palette`, by u in [0, 1)."""
    offset, count = _table(S, palette)
    return _colour(S, offset + 3 * min(int(u * count), count - 1))


@njit((VEC, FLOAT), cache=True)
def _landuse(S, u):
    offset, count = _table(S, LANDUSE)
    for k in range(count):
        if u < S[offset + 2 * k] or k == count - 1:
            return int(S[offset + 2 * k + 1])
    return BUILT


@njit((VEC, FLOAT), cache=True)
def _style(S, u):
    """The offset of the style record drawn by u."""
    offset, count = _table(S, STYLE_TABLE)
    for k in range(count):
        if u < S[offset + k * STYLE_SIZE + ST_CDF] or k == count - 1:
            return offset + k * STYLE_SIZE
    return offset


class Capture(NamedTuple):
    """The transients of one capture: vehicles and people present when it was taken.

    `ground=True` is a panorama's capture (points it sees get its vehicles and people);
    `False` an aerial tile's (vehicles only). Vehicles and people are drawn from `seed`
    within `reach` metres of the camera (in the lattice frame: `cam_qx`, `cam_qy`), and
    none closer than `clear` (the camera is not inside a car).
    """

    seed: int = 0
    cam_qx: float = 0.0
    cam_qy: float = 0.0
    vehicle_prob: float = 0.0
    pedestrian_prob: float = 0.0
    reach: float = TRANSIENT_RANGE
    clear: float = 7.0
    ground: bool = True


NO_CAPTURE = Capture()


# The scene's outputs: one row per point, one column per field (`World.sample` returns
# them as a dict of named arrays). F_H height-field top; F_CLO/F_CHI crown interval
# (+inf/-inf where none); F_TOP_CLS, F_SIDE_CLS (LABELS); F_ROAD; F_ONLY (the point shows
# content of one view only); with colours: F_TOP, F_SIDE, F_CROWN (r, g, b in [0, 1]),
# F_TEX (side texture), F_FLOOR (window storey or vehicle height), F_ALONG (coordinate
# along a facade), F_NX, F_NY (world-frame facade normal), F_SHADE (crown shading).
F_H, F_CLO, F_CHI, F_TOP_CLS, F_SIDE_CLS, F_ROAD, F_ONLY = range(7)
F_TOP, F_SIDE, F_CROWN = 7, 10, 13
F_TEX, F_FLOOR, F_ALONG, F_NX, F_NY, F_SHADE = range(16, 22)
N_GEOMETRY, N_FIELDS = 7, 22
FIELDS = {"h": F_H, "clo": F_CLO, "chi": F_CHI, "top_cls": F_TOP_CLS, "side_cls": F_SIDE_CLS,
          "road": F_ROAD, "only": F_ONLY, "top": F_TOP, "side": F_SIDE, "crown": F_CROWN,
          "tex": F_TEX, "floor": F_FLOOR, "along": F_ALONG, "nx": F_NX, "ny": F_NY,
          "shade": F_SHADE}


@njit((INT, BOOL), cache=True)
def new_out(n, colors):
    """The output rows of n points (geometry only without `colors`)."""
    return np.zeros((n, N_FIELDS if colors else N_GEOMETRY))


class Point(NamedTuple):
    """A point in its street block: lattice frame, block indices and block-local coordinates."""

    qx: float
    qy: float
    i: int  # street-line indices below the point along each lattice axis
    j: int
    x_lo: float  # the lines' positions: the block spans [x_lo, x_lo + W] x [y_lo, y_lo + H]
    y_lo: float
    W: float
    H: float
    u: float  # qx - x_lo, qy - y_lo
    v: float
    hwW: float  # half widths of the four streets around the block
    hwE: float
    hwS: float
    hwN: float
    up: float  # coordinates inside the block's interior (past road and sidewalk)
    vp: float
    Wi: float
    Hi: float
    hb: int  # the block's hash
    fuzz: float


POINT = typeof(Point(0.0, 0.0, 0, 0, *([0.0] * 14), 0, 0.0))
CAPTURE = typeof(NO_CAPTURE)


# ---------------------------------------------------------------------------------------
# frames and street lattice


@njit((VEC, FLOAT, FLOAT), cache=True)
def _to_q(S, x, y):
    """World (x east, y north) -> the street lattice frame (rotated, warped)."""
    qx0 = S[COS] * x - S[SIN] * y
    qy0 = S[SIN] * x + S[COS] * y
    qx, qy = qx0, qy0
    offset, count = _table(S, WARP)
    for w in range(offset, offset + 5 * count, 5):
        d = S[w + 1] * _sin(S[w + 2] * qx0 + S[w + 3] * qy0 + S[w + 4])
        if S[w] == 0:
            qx += d
        else:
            qy += d
    return qx, qy


@njit((VEC, FLOAT, FLOAT), cache=True)
def _q_to_world_dir(S, nx, ny):
    """Rotate a direction from the lattice frame back to the world (ignores the warp)."""
    return S[COS] * nx + S[SIN] * ny, -S[SIN] * nx + S[COS] * ny


@njit((VEC, INT, INT), cache=True)
def _edge(S, axis, i):
    pitch = S[BLOCK + axis]
    jit = unit(hash_ints(int(S[SEED]), 101 + axis, i), 0) - 0.5
    return i * pitch + jit * S[BLOCK_JITTER] * pitch


@njit((VEC, INT, INT), cache=True)
def _half_width(S, axis, i):
    hw = _range(S, ROAD_HALF, unit(hash_ints(int(S[SEED]), 111 + axis, i), 0))
    if int(S[AVENUE_EVERY]) > 0 and i % int(S[AVENUE_EVERY]) == 0:
        hw *= 1.5
    return hw


@njit((VEC, VEC, INT, FLOAT), cache=True)
def _cell(S, memo, axis, q):
    """The street line below q, the two lines' positions and their half widths."""
    m = M_CELL + 5 * axis
    if memo[m + 1] <= q < memo[m + 2]:  # the last point's cell
        return int(memo[m]), memo[m + 1], memo[m + 2], memo[m + 3], memo[m + 4]
    i = int(math.floor(q / S[BLOCK + axis]))
    lo = _edge(S, axis, i)
    hi = _edge(S, axis, i + 1)
    if q < lo:  # the jitter moved the line past q (it moves less than half a pitch)
        i -= 1
        hi = lo
        lo = _edge(S, axis, i)
    elif q >= hi:
        i += 1
        lo = hi
        hi = _edge(S, axis, i + 1)
    hw_lo, hw_hi = _half_width(S, axis, i), _half_width(S, axis, i + 1)
    memo[m], memo[m + 1], memo[m + 2], memo[m + 3], memo[m + 4] = i, lo, hi, hw_lo, hw_hi
    return i, lo, hi, hw_lo, hw_hi


@njit((FLOAT, FLOAT, FLOAT, FLOAT, FLOAT, FLOAT), cache=True)
def _lot(up, vp, Wi, Hi, lw_block, depth_min):
    """Block-interior coords -> lot index, row and lot-local (s, t_front) coords.

    Lots line the block's long sides (two rows when the block is deep enough), each about
    `lw_block` wide; `t_front` is the distance from the lot's street front.
    """
    long_x = Wi >= Hi
    s, t, L, D = (up, vp, Wi, Hi) if long_x else (vp, up, Hi, Wi)
    tworow = D >= 2.0 * depth_min
    dp = D * 0.5 if tworow else D
    row = 1 if (tworow and t >= dp) else 0
    t_f = D - t if row == 1 else t
    nl = max(math.floor(L / lw_block + 0.5), 1.0)
    lwk = L / nl
    k = min(max(math.floor(s / lwk), 0.0), nl - 1)
    return int(k), row, s - k * lwk, t_f, lwk, dp, long_x


# ---------------------------------------------------------------------------------------
# trees


@njit((VEC, INT, FLOAT), cache=True)
def _tree_params(S, th, rmax):
    radius = min(_range(S, CROWN_RADIUS, unit(th, 30)), rmax)
    ht = max(_range(S, TREE_HEIGHT, unit(th, 31)), radius * 2.0 + 2.6)
    conifer = unit(th, 32) < S[CONIFER_PROB]
    return radius, ht, conifer


@njit((VEC, FLOAT, FLOAT, INT), cache=True)
def _lattice_tree(S, qx, qy, lat_n):
    """The candidate tree of area-tree lattice `lat_n` in the point's lattice cell."""
    g = S[TREE_LATTICE + lat_n]
    off = 0.37 * (lat_n + 1) * g
    ga = math.floor((qx - off) / g)
    gb = math.floor((qy - off) / g)
    th = hash_ints(int(S[SEED]), ga, gb, 300 + lat_n)
    tcx = (ga + 0.5 + (unit(th, 1) - 0.5) * 0.3) * g + off
    tcy = (gb + 0.5 + (unit(th, 2) - 0.5) * 0.3) * g + off
    radius, ht, conifer = _tree_params(S, th, g * 0.35)
    return th, tcx, tcy, radius, ht, conifer


@njit((VEC, OUT, INT, FLOAT, FLOAT, FLOAT, FLOAT, INT, BOOL, FLOAT, BOOL), cache=True)
def _add_tree(S, out, n, dx, dy, ht, radius, th, conifer, fuzz, colors):
    """Merge one tree (dx, dy = point - trunk) into the outputs at n."""
    rho2 = dx * dx + dy * dy
    tr_r = max(0.22, fuzz * 0.5)  # a coarse ray step must not jump over the trunk
    r2 = radius * radius
    if rho2 < r2:
        hb = max(ht - 2.0 * radius * (0.8 + 0.4 * unit(th, 40)), 2.4)
        rho = math.sqrt(rho2)
        rel = math.sqrt(max(1.0 - rho2 / r2, 0.0))
        hc = (ht + hb) * 0.5
        half = (ht - hb) * 0.5
        if conifer:  # a cone
            hi = ht - (ht - hb) * rho / radius
            lo = hb
        else:  # an ellipsoid, flatter below
            hi = hc + half * rel
            lo = hc - half * rel * 0.7
        newer = hi > out[n, F_CHI]
        out[n, F_CLO] = min(out[n, F_CLO], lo)
        out[n, F_CHI] = max(out[n, F_CHI], hi)
        if colors and newer:
            if conifer:
                base = _pick(S, P_CONIFERS, unit(th, 41))
            else:
                base = _pick(S, P_TREES, unit(th, 41))
            base = _scale(base, 0.85 + 0.3 * unit(th, 42))
            _put(out, n, F_CROWN, base)
            out[n, F_SHADE] = 0.75 + 0.25 * rel
    if rho2 < tr_r * tr_r:
        hb = max(ht - 2.0 * radius * (0.8 + 0.4 * unit(th, 40)), 2.4)
        out[n, F_H] = max(out[n, F_H], (ht + hb) * 0.5)
        out[n, F_SIDE_CLS] = VEGETATION
        if colors:
            _put(out, n, F_SIDE, _colour(S, C_TRUNK))
            out[n, F_TEX] = TEX_PLAIN


@njit((VEC, POINT, INT, FLOAT), cache=True)
def _area_tree(S, P, lat_n, density):
    """The candidate area tree of lattice `lat_n`: (present in the block?, its values)."""
    th, tcx, tcy, radius, ht, conifer = _lattice_tree(S, P.qx, P.qy, lat_n)
    tu = P.up + (tcx - P.qx)  # the trunk in block-interior coordinates
    tv = P.vp + (tcy - P.qy)
    ok = (unit(th, 3) < density and radius < tu < P.Wi - radius
          and radius < tv < P.Hi - radius)
    return ok, th, tcx, tcy, radius, ht, conifer, tu, tv


# ---------------------------------------------------------------------------------------
# land uses (each fills in the outputs of one point)


@njit((VEC, INT, POINT, FLOAT, OUT, INT, BOOL), cache=True)
def _built(S, st, P, district, out, n, colors):
    seed = int(S[SEED])
    lw_block = S[st + ST_LOT_WIDTH] * (0.75 + 0.5 * unit(P.hb, 2))
    k, row, s_lot, t_f, lwk, dp, long_x = _lot(P.up, P.vp, P.Wi, P.Hi, lw_block, S[st + ST_LOT_DEPTH_MIN])
    hl = hash_ints(seed, P.i, P.j, k, row, 5)
    sd = _range(S, st + ST_SETBACK_SIDE, unit(hl, 2))
    bx0, bx1 = sd, lwk - sd
    by0 = _range(S, st + ST_SETBACK_FRONT, unit(hl, 3))
    by1 = dp - _range(S, st + ST_SETBACK_BACK, unit(hl, 4))
    has_b = unit(hl, 1) < S[st + ST_BUILD_PROB] and bx1 - bx0 > 4 and by1 - by0 > 4
    in_b = has_b and bx0 <= s_lot < bx1 and by0 <= t_f < by1
    dmod = 1.0 + S[st + ST_DISTRICT_AMP] * (2.0 * district - 1.0)
    bh = S[st + ST_HEIGHT_MEDIAN] * dmod * math.exp(S[st + ST_HEIGHT_SIGMA] * _gauss(hl, 10))
    bh = min(max(bh, S[st + ST_HEIGHT_RANGE]), S[st + ST_HEIGHT_RANGE + 1])
    pitched = unit(hl, 14) < S[st + ST_PITCHED_PROB] and bh < 12
    if (bx1 - bx0) >= (by1 - by0):
        ridge_d = min(t_f - by0, by1 - t_f)
    else:
        ridge_d = min(s_lot - bx0, bx1 - s_lot)
    roof_h = bh + (0.45 + 0.35 * unit(hl, 15)) * max(ridge_d, 0.0) if pitched else bh
    lawn = unit(hl, 49) < S[st + ST_LAWN_PROB]
    in_drive = bx1 - 3.6 <= s_lot < bx1 - 0.4
    drive = has_b and lawn and by0 > 3 and t_f < by0 and in_drive
    pool = False
    if S[st + ST_POOL_PROB] > 0:
        pool_w = _lerp(4.0, 8.0, unit(hl, 20))
        pool = (has_b and unit(hl, 21) < S[st + ST_POOL_PROB] and dp - by1 > 6
                and by1 + 2 < t_f < dp - 2.5 and bx0 + 0.5 < s_lot < bx0 + 0.5 + pool_w)
    shed_s = _range(S, st + ST_SHED_SIZE, unit(hl, 22))
    shed_t = shed_s * (0.6 + 0.5 * unit(hl, 23))
    has_shed = has_b and unit(hl, 24) < S[st + ST_SHED_PROB] and dp - by1 > shed_t + 3
    shed = (has_shed and lwk - 1.5 - shed_s < s_lot < lwk - 1.5
            and dp - 1.5 - shed_t < t_f < dp - 1.5)
    enclosure = unit(hl, 26)
    has_wall = enclosure < S[st + ST_WALL_PROB]
    has_hedge = not has_wall and enclosure < S[st + ST_WALL_PROB] + S[st + ST_HEDGE_PROB]
    thick = max(0.45 if has_wall else 0.9, P.fuzz)  # fuzz: a coarse ray step sees it
    edge_d = min(min(s_lot, lwk - s_lot), min(t_f, dp - t_f))
    gate = t_f < thick and (in_drive or not has_b)
    fence = (has_wall or has_hedge) and edge_d < thick and not gate
    h = 0.0
    if in_b:
        h = roof_h
    if shed:
        h = _range(S, st + ST_SHED_HEIGHT, unit(hl, 25))
    if fence:
        h = _range(S, st + (ST_WALL_HEIGHT if has_wall else ST_HEDGE_HEIGHT), unit(hl, 27))
    out[n, F_H] = h
    top_cls = VEGETATION if (lawn and not drive and not pool) else GROUND
    if in_b or shed or (fence and has_wall):
        top_cls = MANMADE
    if fence and has_hedge:
        top_cls = VEGETATION
    out[n, F_TOP_CLS] = top_cls
    out[n, F_SIDE_CLS] = VEGETATION if (fence and has_hedge) else MANMADE

    if colors:
        # tops: yards, driveways, pools, roofs with details (seen only from above)
        if lawn:
            top = _scale(_pick(S, P_GRASS, unit(hl, 50)), 0.9 + 0.2 * unit(hl, 51))
        else:
            top = _scale(_pick(S, P_PLAZA, unit(hl, 50)), 0.8)
        if drive:
            top = _scale(_colour(S, C_SIDEWALK), 0.92)
        if pool:
            top = _colour(S, C_POOL)
        if in_b:
            roof = _scale(_pick(S, st + ST_ROOF, unit(hl, 52)), 0.9 + 0.2 * unit(hl, 53))
            bs = s_lot - bx0
            bt = t_f - by0
            rim_d = min(min(bs, bx1 - s_lot), min(bt, by1 - t_f))
            cell_h = hash_ints(seed, P.i, P.j, k, row, math.floor(bs / 3.5), math.floor(bt / 3.5))
            in_cell = 1.0 < bs % 3.5 < 2.6 and 1.0 < bt % 3.5 < 2.6
            if not pitched and rim_d < 0.6:  # a parapet
                roof = _scale(roof, 1.25)
            if not pitched and in_cell and unit(cell_h, 0) < 0.18 and rim_d > 1.5:  # plant
                roof = (0.78, 0.78, 0.78)
            if in_cell and unit(cell_h, 1) < 0.25 and unit(hl, 54) < 0.3 and rim_d > 1.0:
                roof = _colour(S, C_SOLAR)
            top = roof
        shed_rgb = _pick(S, st + ST_ROOF, unit(hl, 55))
        wall_rgb = _pick(S, P_WALL, unit(hl, 56))
        if shed:
            top = shed_rgb
        if fence and has_wall:
            top = wall_rgb
        if fence and has_hedge:
            top = _colour(S, C_HEDGE)
        _put(out, n, F_TOP, top)
        # sides: facades with windows, sheds, walls, hedges
        side = _scale(_pick(S, st + ST_FACADE, unit(hl, 60)), 0.9 + 0.2 * unit(hl, 61))
        if shed:
            side = _blend(side, shed_rgb, 0.6)
        if fence and has_wall:
            side = wall_rgb
        if fence and has_hedge:
            side = _colour(S, C_HEDGE)
        _put(out, n, F_SIDE, side)
        out[n, F_TEX] = TEX_WINDOWS if in_b else TEX_PLAIN
        out[n, F_FLOOR] = _range(S, st + ST_FLOOR_HEIGHT, unit(hl, 62)) if in_b else 0.0
        # the nearest face of the building's footprint gives the facade's normal
        d0, d1, d2, d3 = s_lot - bx0, bx1 - s_lot, t_f - by0, by1 - t_f
        face = 0
        if d1 < d0:
            face, d0 = 1, d1
        if d2 < d0:
            face, d0 = 2, d2
        if d3 < d0:
            face = 3
        out[n, F_ALONG] = t_f if face < 2 else s_lot
        ns = -1.0 if face == 0 else (1.0 if face == 1 else 0.0)
        nt = -1.0 if face == 2 else (1.0 if face == 3 else 0.0)
        if row == 1:
            nt = -nt
        nx, ny = _q_to_world_dir(S, ns if long_x else nt, nt if long_x else ns)
        out[n, F_NX] = nx
        out[n, F_NY] = ny

    # yard trees: the whole crown inside this lot and clear of the buildings
    if S[st + ST_YARD_TREE_DENSITY] > 0 and not in_b and not shed:
        for lat_n in range(2):
            th, tcx, tcy, radius, ht, conifer = _lattice_tree(S, P.qx, P.qy, lat_n)
            tu = P.up + (tcx - P.qx)
            tv = P.vp + (tcy - P.qy)
            tk, trow, ts, tt, _, _, _ = _lot(tu, tv, P.Wi, P.Hi, lw_block, S[st + ST_LOT_DEPTH_MIN])
            margin = radius + 0.6
            ok = (unit(th, 3) < S[st + ST_YARD_TREE_DENSITY] and tk == k and trow == row
                  and radius + 0.5 < ts < lwk - radius - 0.5
                  and radius + 0.5 < tt < dp - radius - 0.5)
            ok = ok and (not has_b or ts < bx0 - margin or ts > bx1 + margin
                         or tt < by0 - margin or tt > by1 + margin)
            ok = ok and (not has_shed or tt < dp - 2.5 - shed_t - radius)
            if ok:
                _add_tree(S, out, n, P.qx - tcx, P.qy - tcy, ht, radius, th, conifer, P.fuzz,
                          colors)


@njit((VEC, POINT, OUT, INT, BOOL), cache=True)
def _park(S, P, out, n, colors):
    Wi, Hi, up, vp = P.Wi, P.Hi, P.up, P.vp
    cx, cy = Wi * 0.5, Hi * 0.5
    diag = 1.0 / math.sqrt(Wi * Wi + Hi * Hi)
    path = (abs(vp * Wi - up * Hi) * diag < 1.2
            or abs(vp * Wi - (Wi - up) * Hi) * diag < 1.2)
    has_pond = unit(P.hb, 6) < 0.45
    pond = has_pond and ((up - cx) / (0.28 * Wi)) ** 2 + ((vp - cy) / (0.24 * Hi)) ** 2 < 1
    out[n, F_TOP_CLS] = GROUND if (path or pond) else VEGETATION
    if colors:
        top = _pick(S, P_GRASS, unit(P.hb, 57))
        if path:
            top = _colour(S, C_PATH)
        if pond:
            top = _colour(S, C_WATER)
        _put(out, n, F_TOP, top)
    for lat_n in range(2):
        ok, th, tcx, tcy, radius, ht, conifer, tu, tv = _area_tree(S, P, lat_n,
                                                                   S[PARK_TREE_DENSITY])
        ell = ((tu - cx) / (0.28 * Wi)) ** 2 + ((tv - cy) / (0.24 * Hi)) ** 2
        if ok and (not has_pond or ell > 1.6):
            _add_tree(S, out, n, P.qx - tcx, P.qy - tcy, ht, radius, th, conifer, P.fuzz, colors)


@njit((VEC, POINT, OUT, INT, BOOL), cache=True)
def _plaza(S, P, out, n, colors):
    up, vp = P.up, P.vp
    cx, cy = P.Wi * 0.5, P.Hi * 0.5
    rho = math.sqrt((up - cx) ** 2 + (vp - cy) ** 2)
    monument = unit(P.hb, 7) < 0.5
    fountain = not monument and rho < 4.5
    rim = not monument and 4.5 <= rho < 5.1
    half = 1.0 + 1.5 * unit(P.hb, 8)
    obelisk = monument and abs(up - cx) < half and abs(vp - cy) < half
    h = 0.6 if rim else 0.0
    if obelisk:
        h = _lerp(10.0, 26.0, unit(P.hb, 9))
    out[n, F_H] = h
    out[n, F_TOP_CLS] = MANMADE if (rim or obelisk) else GROUND
    if colors:
        pav = _pick(S, P_PLAZA, unit(P.hb, 58))
        checker = (math.floor(up / 3.0) + math.floor(vp / 3.0)) % 2 == 0
        top = pav if checker else _scale(pav, 0.86)
        if fountain:
            top = _colour(S, C_WATER)
        if rim or obelisk:
            top = _colour(S, C_STONE)
        _put(out, n, F_TOP, top)
        _put(out, n, F_SIDE, _colour(S, C_STONE))
    for lat_n in range(2):
        ok, th, tcx, tcy, radius, ht, conifer, tu, tv = _area_tree(S, P, lat_n, 0.25)
        if ok and math.sqrt((tu - cx) ** 2 + (tv - cy) ** 2) > radius + 8:
            _add_tree(S, out, n, P.qx - tcx, P.qy - tcy, ht, radius, th, conifer, P.fuzz, colors)


@njit((VEC, POINT, OUT, INT, BOOL), cache=True)
def _parking(S, P, out, n, colors):
    if colors:
        m17 = P.vp % 17.0
        stall = P.up % 2.7 < 0.16 and (1.0 < m17 < 6.5 or 10.5 < m17 < 16.0)
        _put(out, n, F_TOP, _colour(S, C_MARKING) if stall else _scale(_colour(S, C_ROAD), 0.9))
    for lat_n in range(2):
        ok, th, tcx, tcy, radius, ht, conifer, tu, tv = _area_tree(S, P, lat_n, 0.05)
        if ok:
            _add_tree(S, out, n, P.qx - tcx, P.qy - tcy, ht, radius, th, conifer, P.fuzz, colors)


@njit((VEC, POINT, OUT, INT, BOOL), cache=True)
def _fields(S, P, out, n, colors):
    up, vp = P.up, P.vp
    nfu = 1 + int(unit(P.hb, 10) * 3)
    nfv = 1 + int(unit(P.hb, 11) * 2)
    fw = P.Wi / nfu
    fh = P.Hi / nfv
    fa = min(max(math.floor(up / fw), 0.0), nfu - 1.0)
    fb = min(max(math.floor(vp / fh), 0.0), nfv - 1.0)
    fu = up - fa * fw
    fv = vp - fb * fh
    hf = hash_ints(int(S[SEED]), P.i, P.j, fa, fb, 13)
    f_edge = min(min(fu, fw - fu), min(fv, fh - fv))
    track = f_edge < 1.0
    hedge = unit(hf, 3) < 0.3 and not track and f_edge < 1.0 + max(0.8, P.fuzz)
    out[n, F_H] = _lerp(0.9, 1.7, unit(hf, 4)) if hedge else 0.0
    out[n, F_TOP_CLS] = GROUND if track else VEGETATION
    out[n, F_SIDE_CLS] = VEGETATION
    if colors:
        f_a = _pick(S, P_FIELD, unit(hf, 5))
        f_b = _pick(S, P_FIELD, unit(hf, 6))
        period = _lerp(2.5, 6.0, unit(hf, 7))
        stripe_q = fu if unit(hf, 8) < 0.5 else fv
        stripes = stripe_q % period < period * 0.5 and unit(hf, 9) < 0.7
        top = f_a if stripes else _blend(f_a, f_b, 0.45)
        if track:
            top = _scale(_colour(S, C_SOIL), 1.2)
        if hedge:
            top = _colour(S, C_HEDGE)
        _put(out, n, F_TOP, top)
        _put(out, n, F_SIDE, _colour(S, C_HEDGE))
    if S[FIELD_TREE_DENSITY] > 0:  # trees along the field edges, inside the field
        for lat_n in range(2):
            ok, th, tcx, tcy, radius, ht, conifer, tu, tv = _area_tree(S, P, lat_n,
                                                                       S[FIELD_TREE_DENSITY])
            tfa = min(max(math.floor(tu / fw), 0.0), nfu - 1.0)
            tfb = min(max(math.floor(tv / fh), 0.0), nfv - 1.0)
            tfu = tu - tfa * fw
            tfv = tv - tfb * fh
            e = min(min(tfu, fw - tfu), min(tfv, fh - tfv))
            if ok and tfa == fa and tfb == fb and radius + 1.2 < e < radius + 3.5:
                _add_tree(S, out, n, P.qx - tcx, P.qy - tcy, ht, radius, th, conifer, P.fuzz,
                          colors)


@njit((VEC, POINT, INT, OUT, INT, BOOL), cache=True)
def _street_trees(S, P, lu, out, n, colors):
    """Trees along the sidewalks, on each block's side of its nearest streets."""
    if lu == WATER or lu == FIELD:
        return
    sw = S[SIDEWALK]
    spacing = S[STREET_TREE_SPACING]
    reach = S[CROWN_RADIUS + 1] + 0.3
    for axis in range(2):
        if axis == 0:  # the street along q_y at the block's west or east edge
            near = P.u < P.W * 0.5
            c_dist = P.u if near else P.W - P.u
            hw = P.hwW if near else P.hwE
        else:
            near = P.v < P.H * 0.5
            c_dist = P.v if near else P.H - P.v
            hw = P.hwS if near else P.hwN
        if c_dist >= hw + sw + reach:
            continue
        if axis == 0:
            line = P.i if near else P.i + 1
            across = P.hwW + sw * 0.5 if near else P.W - P.hwE - sw * 0.5
            along_q, a_lo, pa, pc = P.qy, P.y_lo, P.v, P.u
            lo_lim, hi_lim = P.hwS + sw, P.H - P.hwN - sw
        else:
            line = P.j if near else P.j + 1
            across = P.hwS + sw * 0.5 if near else P.H - P.hwN - sw * 0.5
            along_q, a_lo, pa, pc = P.qx, P.x_lo, P.u, P.v
            lo_lim, hi_lim = P.hwW + sw, P.W - P.hwE - sw
        slot = math.floor(along_q / spacing + 0.5)
        th = hash_ints(int(S[SEED]), axis, line, slot, near, 400)
        radius, ht, conifer = _tree_params(S, th, hw + sw * 0.5 - 0.3)
        conifer = conifer and unit(th, 33) < 0.2
        ta = slot * spacing - a_lo
        if (unit(th, 3) < S[STREET_TREE_PROB] and ta - radius > lo_lim
                and ta + radius < hi_lim):
            _add_tree(S, out, n, pc - across, pa - ta, ht, radius, th, conifer, P.fuzz, colors)


@njit((VEC, CAPTURE, POINT, BOOL, BOOL, OUT, INT, BOOL), cache=True)
def _transients(S, C, P, road, walk, out, n, colors):
    """Vehicles (a driving and a kerb lane) and pedestrians of capture C, in the lattice frame."""
    sw = S[SIDEWALK]
    u, v, W, H = P.u, P.v, P.W, P.H
    dE, dN = W - u, H - v
    # the point's nearest street edge: 0 west, 1 east, 2 south, 3 north
    e, best = 0, u - P.hwW
    if dE - P.hwE < best:
        e, best = 1, dE - P.hwE
    if v - P.hwS < best:
        e, best = 2, v - P.hwS
    if dN - P.hwN < best:
        e = 3
    y_axis = e >= 2  # a street along q_x (on a y lattice line)
    side = e % 2
    c = (u, dE, v, dN)[e]  # distance from the street's centre line
    hw = (P.hwW, P.hwE, P.hwS, P.hwN)[e]
    line = (P.i, P.i + 1, P.j, P.j + 1)[e]
    along = u if y_axis else v
    a_lo = P.hwW if y_axis else P.hwS
    a_hi = W - P.hwE if y_axis else H - P.hwN
    blk = P.i if y_axis else P.j
    crossing = (u < P.hwW or dE < P.hwE) and (v < P.hwS or dN < P.hwN)
    veh_h = 0.0
    rgb = (0.0, 0.0, 0.0)
    vehicle = False
    if C.vehicle_prob > 0 and road and not crossing:
        drive = abs(c - 1.8) < 1.2  # the driving lane ~1.8 m from the centre line
        lane_c = 1.8 if drive else hw - 1.15  # else the parking lane at the kerb
        slot = math.floor(along / 7.5)
        th = hash_ints(C.seed, y_axis, line, blk, side, drive, slot)
        kind = unit(th, 1)  # car, van or bus
        length = 4.4 if kind < 0.8 else (5.0 if kind < 0.95 else 6.6)
        height = 1.5 if kind < 0.8 else (2.0 if kind < 0.95 else 3.1)
        width = 1.8 if kind < 0.95 else 2.3
        ac = (slot + 0.5) * 7.5 + (unit(th, 2) - 0.5) * 1.0
        cross_q = lane_c if side == 0 else (H if y_axis else W) - lane_c
        ccx = P.x_lo + (ac if y_axis else cross_q)
        ccy = P.y_lo + (cross_q if y_axis else ac)
        clear = (ccx - C.cam_qx) ** 2 + (ccy - C.cam_qy) ** 2 > C.clear * C.clear
        prob = C.vehicle_prob * (1.0 if drive else 0.7)
        if ((drive or hw >= 4.6) and clear and unit(th, 3) < prob
                and abs(along - ac) < length * 0.5 and abs(c - lane_c) < width * 0.5
                and ac - length * 0.5 > a_lo + 1.0 and ac + length * 0.5 < a_hi - 1.0):
            veh_h = height
            vehicle = True
            rgb = _pick(S, P_VEHICLES, unit(th, 4))
    if C.pedestrian_prob > 0 and walk and hw <= c < hw + sw:
        slot = math.floor(along / 2.5)
        th = hash_ints(C.seed, y_axis, line, blk, side, slot, 9)
        pa = (slot + 0.5) * 2.5 + (unit(th, 2) - 0.5) * 1.2
        pc = hw + sw * (0.25 + 0.5 * unit(th, 5))
        if unit(th, 3) < C.pedestrian_prob and (along - pa) ** 2 + (c - pc) ** 2 < 0.09:
            veh_h = 1.55 + 0.35 * unit(th, 6)
            rgb = _scale(_pick(S, P_VEHICLES, unit(th, 7)), 0.8)
    if veh_h <= 0:
        return
    out[n, F_H] = max(out[n, F_H], veh_h)
    out[n, F_TOP_CLS] = MANMADE
    out[n, F_SIDE_CLS] = MANMADE
    out[n, F_ONLY] = 1.0
    if colors:
        _put(out, n, F_TOP, rgb)
        _put(out, n, F_SIDE, rgb)
        out[n, F_TEX] = TEX_VEHICLE if vehicle else TEX_PLAIN
        out[n, F_FLOOR] = veh_h


@njit((VEC, FLOAT, FLOAT, BOOL, OUT, INT, BOOL), cache=True)
def _boxes(S, x, y, ground_view, out, n, colors):
    """The extra boxes over whatever the scene put at (x, y); later boxes win."""
    offset, count = _table(S, BOX_TABLE)
    for b in range(offset, offset + BOX_SIZE * count, BOX_SIZE):
        kind = int(S[b + BOX_KIND])
        if (kind == BOX_GROUND_ONLY and not ground_view) or (kind == BOX_AIR_ONLY and ground_view):
            continue
        x0, y0, x1, y1 = S[b + BOX_RECT], S[b + BOX_RECT + 1], S[b + BOX_RECT + 2], S[b + BOX_RECT + 3]
        if not (x0 <= x < x1 and y0 <= y < y1):
            continue
        out[n, F_H] = S[b + BOX_HEIGHT]
        out[n, F_TOP_CLS] = MANMADE
        out[n, F_SIDE_CLS] = MANMADE
        out[n, F_CLO] = np.inf
        out[n, F_CHI] = -np.inf
        out[n, F_ONLY] = 0.0 if kind == BOX_BOTH else 1.0
        if colors:
            _put(out, n, F_TOP, _colour(S, b + BOX_ROOF))
            _put(out, n, F_SIDE, _colour(S, b + BOX_FACADE))
            out[n, F_TEX] = TEX_PLAIN
            # the normal of the nearest face
            d0, d1, d2, d3 = x - x0, x1 - x, y - y0, y1 - y
            nx, ny, best = -1.0, 0.0, d0
            if d1 < best:
                nx, ny, best = 1.0, 0.0, d1
            if d2 < best:
                nx, ny, best = 0.0, -1.0, d2
            if d3 < best:
                nx, ny = 0.0, 1.0
            out[n, F_NX] = nx
            out[n, F_NY] = ny


# ---------------------------------------------------------------------------------------
# the scene function


@njit((VEC, VEC, FLOAT, FLOAT, FLOAT, CAPTURE, BOOL, OUT, INT), cache=True)
def _procedural(S, memo, x, y, fuzz, C, colors, out, n):
    seed = int(S[SEED])
    qx, qy = _to_q(S, x, y)
    i, x_lo, x_hi, hwW, hwE = _cell(S, memo, 0, qx)
    j, y_lo, y_hi, hwS, hwN = _cell(S, memo, 1, qy)
    u, v = qx - x_lo, qy - y_lo
    W, H = x_hi - x_lo, y_hi - y_lo
    dE, dN = W - u, H - v
    on_xs = u < hwW or dE < hwE  # on a street along q_y (an x lattice line)
    on_ys = v < hwS or dN < hwN
    road = on_xs or on_ys
    sw = S[SIDEWALK]
    walk = not road and (u < hwW + sw or dE < hwE + sw or v < hwS + sw or dN < hwN + sw)
    mb = M_BLOCK
    if memo[mb] != i or memo[mb + 1] != j:
        hb = hash_ints(seed, i, j)
        memo[mb], memo[mb + 1], memo[mb + 2] = i, j, hb
        memo[mb + 3] = _landuse(S, unit(hb, 1))
        memo[mb + 4] = np.nan  # the district field and style: when a built point asks
    hb = int(memo[mb + 2])
    lu = int(memo[mb + 3])
    P = Point(qx, qy, i, j, x_lo, y_lo, W, H, u, v, hwW, hwE, hwS, hwN,
              u - hwW - sw, v - hwS - sw, W - hwW - hwE - 2 * sw, H - hwS - hwN - 2 * sw, hb, fuzz)
    out[n, F_ROAD] = 1.0 if road else 0.0
    if colors:
        top = _colour(S, C_SIDEWALK) if walk else _colour(S, C_ROAD)
        if road and S[MARKING_PROB] > 0:
            mp = S[MARKING_PROB]
            dash_y = qy % 9.0 < 4.0
            dash_x = qx % 9.0 < 4.0
            centre = False
            if on_xs and not on_ys and dash_y:
                centre = ((u < 0.14 and unit(hash_ints(seed, 121, i), 0) < mp)
                          or (dE < 0.14 and unit(hash_ints(seed, 121, i + 1), 0) < mp))
            if on_ys and not on_xs and dash_x:
                centre = ((v < 0.14 and unit(hash_ints(seed, 122, j), 0) < mp)
                          or (dN < 0.14 and unit(hash_ints(seed, 122, j + 1), 0) < mp))
            if S[CROSSINGS] > 0:  # zebra crossings where a street meets another
                zx = (on_xs and (hwS <= v < hwS + 3.0 or hwN <= dN < hwN + 3.0)
                      and u % 1.2 < 0.6)
                zy = (on_ys and (hwW <= u < hwW + 3.0 or hwE <= dE < hwE + 3.0)
                      and v % 1.2 < 0.6)
                centre = centre or zx or zy
            if centre:
                top = _colour(S, C_MARKING)
        _put(out, n, F_TOP, top)
    if not road and not walk:
        if lu == BUILT:
            # the slow district field at the block's centre modulates building heights
            if np.isnan(memo[mb + 4]):
                scale = S[DISTRICT_SCALE]
                memo[mb + 4] = value_noise(seed + 31, (x_lo + x_hi) * 0.5 / scale,
                                           (y_lo + y_hi) * 0.5 / scale)
                memo[mb + 5] = _style(S, unit(hb, 12))
            district = memo[mb + 4]
            st = int(memo[mb + 5])
            _built(S, st, P, district, out, n, colors)
        elif lu == PARK:
            _park(S, P, out, n, colors)
        elif lu == PLAZA:
            _plaza(S, P, out, n, colors)
        elif lu == WATER:
            if colors:
                _put(out, n, F_TOP, _colour(S, C_WATER))
        elif lu == PARKING:
            _parking(S, P, out, n, colors)
        elif lu == FIELD:
            _fields(S, P, out, n, colors)
    if S[STREET_TREE_PROB] > 0:
        _street_trees(S, P, lu, out, n, colors)
    if ((C.vehicle_prob > 0 or C.pedestrian_prob > 0) and (road or walk)
            and (qx - C.cam_qx) ** 2 + (qy - C.cam_qy) ** 2 < C.reach * C.reach):
        _transients(S, C, P, road, walk, out, n, colors)
    if colors:
        grain = unit(hash_ints(seed, math.floor(qx * 2), math.floor(qy * 2), 77), 0)
        _put(out, n, F_TOP, _scale(_get(out, n, F_TOP), 0.93 + 0.14 * grain))


@njit((VEC, VEC, FLOAT, FLOAT, FLOAT, CAPTURE, BOOL, OUT, INT), cache=True)
def _sample(S, memo, x, y, fuzz, C, colors, out, n):
    """Evaluate the scene at (x, y) into the outputs at index n.

    `fuzz` (metres) thickens thin walls and trunks so that a coarse ray step does not jump
    over them. `C` is the capture the point is seen in: its transients, and whether it
    is a ground view (ground-only boxes) or an aerial one (air-only boxes).
    """
    out[n, F_H] = 0.0
    out[n, F_CLO] = np.inf
    out[n, F_CHI] = -np.inf
    out[n, F_TOP_CLS] = GROUND
    out[n, F_SIDE_CLS] = MANMADE
    out[n, F_ROAD] = 0.0
    out[n, F_ONLY] = 0.0
    if colors:
        _put(out, n, F_TOP, (0.0, 0.0, 0.0))
        _put(out, n, F_SIDE, (0.0, 0.0, 0.0))
        _put(out, n, F_CROWN, (0.0, 0.0, 0.0))
        out[n, F_TEX] = TEX_PLAIN
        out[n, F_FLOOR] = 0.0
        out[n, F_ALONG] = 0.0
        out[n, F_NX] = 0.0
        out[n, F_NY] = 0.0
        out[n, F_SHADE] = 1.0
    if S[PROCEDURAL] > 0:
        _procedural(S, memo, x, y, fuzz, C, colors, out, n)
    else:  # a flat paved plane (for tests and figures with boxes)
        out[n, F_ROAD] = 1.0
        if colors:
            _put(out, n, F_TOP, _colour(S, C_SIDEWALK))
            _put(out, n, F_SIDE, _colour(S, C_STONE))
            out[n, F_NY] = 1.0
    if S[BOX_TABLE + 1] > 0:
        _boxes(S, x, y, C.ground, out, n, colors)


@njit((VEC, VEC, VEC, VEC, CAPTURE, BOOL, OUT), cache=True)
def _sample_points(S, x, y, fuzz, C, colors, out):
    memo = new_memo()
    for n in range(x.size):
        _sample(S, memo, x[n], y[n], fuzz[n], C, colors, out, n)


# ---------------------------------------------------------------------------------------
# the world


@dataclass(frozen=True)
class Box:
    """An extra axis-aligned box in world coordinates (tests, figures).

    `ground_only` boxes behave like vehicles: the panorama sees them, the aerial does not;
    `air_only` boxes the other way round. Either is content of one view only (masks).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    height: float
    facade: tuple[int, int, int]
    roof: tuple[int, int, int]
    ground_only: bool = False
    air_only: bool = False


def _rgb01(rgb) -> list[float]:
    return [float(c) / 255.0 for c in rgb]


class _Params:
    """Writes the parameter vector S: the header's slots, then tables appended after it."""

    def __init__(self) -> None:
        self.header = np.full(HEADER_SIZE, np.nan)
        self.tail: list[float] = []

    def set(self, slot: int, *values: float) -> None:
        self.header[slot:slot + len(values)] = values

    def table(self, slot: int, records: list[list[float]]) -> None:
        """Append `records` (equal lengths) and point the table at `slot` to them."""
        self.set(slot, HEADER_SIZE + len(self.tail), len(records))
        for record in records:
            self.tail.extend(float(v) for v in record)

    def palette(self, slot: int, colours) -> None:
        self.table(slot, [_rgb01(rgb) for rgb in colours] or [[0.0, 0.0, 0.0]])

    def vector(self) -> np.ndarray:
        if np.isnan(self.header).any():
            raise AssertionError(f"unset parameter slots {np.flatnonzero(np.isnan(self.header))}")
        return np.concatenate([self.header, np.asarray(self.tail, dtype=np.float64)])


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
        warp = []
        # organic warp: three sinusoids per axis with random directions and phases
        if r.organic > 0:
            for axis in range(2):
                for n in range(3):
                    direction = rng.uniform(0, 2 * math.pi)
                    k = 2 * math.pi / (r.warp_scale * (1.0, 0.61, 0.37)[n])
                    amp = min(r.organic * (1.0, 0.45, 0.2)[n], 0.3 / k)  # keep it one-to-one
                    warp.append([axis, amp, k * math.cos(direction), k * math.sin(direction),
                                 rng.uniform(0, 6.3)])
        # a gentle large-scale bend: the grid stays straight over a few blocks, but its
        # orientation drifts across the region
        if r.bend > 0:
            for axis in range(2):
                direction = rng.uniform(0, 2 * math.pi)
                k = 2 * math.pi / r.bend_scale
                warp.append([axis, min(r.bend, 0.35 / k), k * math.cos(direction),
                             k * math.sin(direction), rng.uniform(0, 6.3)])
        w = _Params()
        w.set(SEED, self.seed)
        w.set(PROCEDURAL, float(bool(procedural)))
        w.set(COS, math.cos(angle))
        w.set(SIN, math.sin(angle))
        w.set(BLOCK, *r.block)
        w.set(BLOCK_JITTER, r.block_jitter)
        w.set(ROAD_HALF, *r.road_half)
        w.set(AVENUE_EVERY, r.avenue_every)
        w.set(SIDEWALK, r.sidewalk)
        w.set(MARKING_PROB, r.marking_prob)
        w.set(CROSSINGS, float(bool(r.crossings)))
        w.set(DISTRICT_SCALE, r.district_scale)
        w.set(STREET_TREE_PROB, r.street_tree_prob)
        w.set(STREET_TREE_SPACING, r.street_tree_spacing)
        w.set(PARK_TREE_DENSITY, r.park_tree_density)
        w.set(FIELD_TREE_DENSITY, r.field_tree_density)
        w.set(TREE_LATTICE, *r.tree_lattice)
        w.set(CROWN_RADIUS, *r.crown_radius)
        w.set(TREE_HEIGHT, *r.tree_height)
        w.set(CONIFER_PROB, r.conifer_prob)
        for slot, rgb in ((C_ROAD, r.road), (C_MARKING, r.marking), (C_SIDEWALK, r.sidewalk_rgb),
                          (C_WATER, r.water), (C_POOL, r.pool_rgb), (C_PATH, (176, 160, 128)),
                          (C_SOIL, (120, 96, 70)), (C_TRUNK, (80, 62, 46)),
                          (C_STONE, (200, 196, 186)), (C_GLASS, (40, 52, 66)),
                          (C_HEDGE, (52, 90, 44)), (C_SOLAR, (38, 48, 78))):
            w.set(slot, *_rgb01(rgb))
        for slot, colours in ((P_GRASS, r.grass), (P_PLAZA, r.plaza), (P_FIELD, r.field_rgb),
                              (P_TREES, r.trees), (P_CONIFERS, r.conifers),
                              (P_WALL, r.wall_rgb), (P_VEHICLES, r.vehicles)):
            w.palette(slot, colours)
        w.table(WARP, warp)
        lu_cdf = np.cumsum(list(r.landuse.values())) / sum(r.landuse.values())
        w.table(LANDUSE, [[c, LANDUSES.index(k)] for c, k in zip(lu_cdf, r.landuse, strict=True)])
        names = [k for k, weight in r.styles.items() if weight > 0]
        cdf = np.cumsum([r.styles[k] for k in names]) / sum(r.styles[k] for k in names)
        # the styles' palettes go into tables first; the style records point at them
        palettes = []
        for k in names:
            for colours in (STYLES[k].roof, STYLES[k].facade):
                palettes.append((HEADER_SIZE + len(w.tail), len(colours)))
                w.tail.extend(v for rgb in self._tinted(colours) for v in rgb)
        records = []
        for n, k in enumerate(names):
            st = STYLES[k]
            records.append([
                cdf[n], st.lot_width, st.lot_depth_min, st.build_prob, st.lawn_prob,
                *st.setback_front, *st.setback_side, *st.setback_back, st.height_median,
                st.height_sigma, *st.height_range, st.district_amp, *st.floor_height,
                st.pitched_prob, st.wall_prob, st.hedge_prob, *st.wall_height,
                *st.hedge_height, st.pool_prob, st.shed_prob, *st.shed_size, *st.shed_height,
                st.yard_tree_density, *palettes[2 * n], *palettes[2 * n + 1]])
            assert len(records[-1]) == STYLE_SIZE
        w.table(STYLE_TABLE, records)
        w.table(BOX_TABLE, [[b.x0, b.y0, b.x1, b.y1, b.height, *_rgb01(b.facade), *_rgb01(b.roof),
                             BOX_GROUND_ONLY if b.ground_only else
                             BOX_AIR_ONLY if b.air_only else BOX_BOTH] for b in self.boxes])
        self.params = w.vector()

    def _tinted(self, colours) -> np.ndarray:
        """A building palette in the region's tint (gains and saturation): [k, 3] in [0, 1]."""
        gain = np.asarray(self.region.tint[:3], np.float64)
        pal = np.asarray(colours, dtype=np.float64).reshape(-1, 3) / 255.0
        grey = pal.mean(axis=1, keepdims=True)
        return np.clip((grey + (pal - grey) * self.region.tint[3]) * gain, 0.0, 1.0)

    def to_q(self, x: float, y: float) -> tuple[float, float]:
        """World (x east, y north) -> the street lattice frame (rotated, warped)."""
        return _to_q(self.params, float(x), float(y))

    def latlon(self, x, y):
        lat0, lon0 = self.region.origin
        lat = lat0 + np.asarray(y, dtype=np.float64) / 111_320.0
        lon = lon0 + np.asarray(x, dtype=np.float64) / (111_320.0 * math.cos(math.radians(lat0)))
        return lat, lon

    def sample(self, x, y, *, colors: bool = True, capture: Capture | None = None,
               fuzz=0.0, ground_view: bool | None = None) -> dict:
        """Evaluate the scene at points (x, y) (arrays, metres): a dict of arrays named as
        in FIELDS (`h`, `chi`, `road`, `top` [n, 3], ...).

        `capture` adds its transients (vehicles, people); `ground_view` (default: the
        capture's, else False: seen from above) says which one-view boxes are there.
        """
        x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        fuzz = np.ascontiguousarray(np.broadcast_to(np.asarray(fuzz, np.float64), x.shape))
        capture = capture or NO_CAPTURE._replace(ground=False)
        if ground_view is not None:
            capture = capture._replace(ground=bool(ground_view))
        out = new_out(x.size, colors)
        _sample_points(self.params, x, y, fuzz, capture, colors, out)
        result = {}
        for name, col in FIELDS.items():
            if col >= out.shape[1]:
                continue
            if name in ("top", "side", "crown"):
                result[name] = out[:, col:col + 3].astype(np.float32)
            elif name in ("top_cls", "side_cls", "tex"):
                result[name] = out[:, col].astype(np.uint8)
            elif name in ("road", "only"):
                result[name] = out[:, col] > 0.5
            else:
                result[name] = out[:, col].astype(np.float32)
        return result
