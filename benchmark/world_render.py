"""The synthetic world's two cameras: the ray-cast panorama and the aerial tile, and masks.

Both look at the one scene function of `world_scene`; each view is rendered by a numba
kernel that walks its pixels (`_cast_panorama`, `_render_tile`), then the camera
response (`_photometric`) is applied.

- The **aerial** tile is orthographic, north-up (row 0 is north, column 0 is west),
  centred on a point, `tile_m` metres on a side, with Lambert shading from the height
  field, cast shadows (the raster is padded on the sun's side so that things outside
  the tile cast shadows into it) and cloud shadows.
- The **panorama** is ray-cast from a camera `cam_height` metres above the ground: each
  column is an azimuth, each row an elevation. Each column marches outwards over sample
  distances that grow with the distance (about 1.45 columns apart), evaluating the
  scene's heights; the first sample that reaches a row's ray is what that row sees, and
  a column stops as soon as every row is hit. Only the hit points are then evaluated
  with colours; with the aerial tile of the same centre at hand, ground hits inside it
  take the tile's colours.

Masks: with each view, a boolean map of the pixels that show content only that view
has. Panorama: the sky (clouds included) and the transients of its capture (vehicles,
people, ground-only boxes). Aerial: the content of its own capture (its vehicles,
air-only boxes) and cloud shadows (shadow at least half its full strength). Surfaces the
other camera merely does not see from where it stands (roofs, facades, yards behind
walls) are in both worlds and are not masked.

`unmatched` (0..1, default `DEFAULT_UNMATCHED` = 0.5: the world as it was before the
option) sets how much of each pair only one view shows: the panorama's vehicles and
people are scaled by 2u (none at 0, twice the region's density at 1), the aerial's
cloud-shadow cover is drawn from U(0, u), and above 0.5 the aerial gets vehicles of its
own at (2u - 1) times the region's density. Every draw is the same at every u and
presence tests are thresholds, so the masked share grows monotonically with u. The sky's
share is set by the geometry (building heights, camera height) and does not change.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numba import njit, typeof, types

from gengeo_bench.world_regions import DEFAULT_UNMATCHED, check_unmatched
from gengeo_bench.world_scene import (
    BOOL,
    C_GLASS,
    CAPTURE,
    F_ALONG,
    F_CHI,
    F_CLO,
    F_CROWN,
    F_FLOOR,
    F_H,
    F_NX,
    F_NY,
    F_ONLY,
    F_SHADE,
    F_SIDE,
    F_SIDE_CLS,
    F_TEX,
    F_TOP,
    F_TOP_CLS,
    FLOAT,
    GROUND,
    INT,
    OUT,
    SEED,
    SKY,
    TEX_VEHICLE,
    TEX_WINDOWS,
    TRANSIENT_RANGE,
    VEC,
    VEGETATION,
    Capture,
    World,
    _colour,
    _get,
    _put,
    _sample,
    _scale,
    hash_ints,
    new_memo,
    new_out,
    unit,
    value_noise,
)

# what a panorama pixel shows
_NONE, _GROUND_HIT, _SIDE, _TOP, _CROWN = 0, 1, 2, 3, 4


@lru_cache(maxsize=16)
def _ray_geometry(H: int, W: int, view_m: float):
    """Column directions, sample distances and steps, row elevations of a panorama."""
    theta = 2 * np.pi * np.arange(W) / W - np.pi  # azimuth, clockwise from north
    col_angle = 2 * np.pi / W
    d = [0.4]
    while d[-1] < view_m:
        d.append(d[-1] + max(0.35, d[-1] * col_angle * 1.45))
    dist = np.asarray(d, dtype=np.float64)
    step = np.diff(np.concatenate([[0.15], dist]))
    V = 2 * np.pi * H / W
    phi = V / 2 - (np.arange(H) + 0.5) * V / H
    return np.sin(theta), np.cos(theta), dist, step, phi, np.tan(phi)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *tags])


def _rgb(rgb) -> tuple[float, float, float]:
    return tuple(float(c) / 255.0 for c in rgb)


class _PanoLight(NamedTuple):
    """One panorama capture's lighting, sky and haze (colours in [0, 1])."""

    seed: int  # the capture's seed (leaf texture)
    sun_x: float  # the sun's azimuth as a unit vector (east, north)
    sun_y: float
    sun_el: float  # radians
    cloud_cover: float
    cloud_seed: int
    fog_m: float
    haze: tuple
    sky_top: tuple
    sky_horizon: tuple
    void: tuple  # ground beyond the view distance


class _TileLight(NamedTuple):
    """One aerial capture's sun and cloud shadows."""

    sun_x: float
    sun_y: float
    sun_el: float
    cloud_cover: float
    cloud_seed: int
    pad_m: float  # the raster's margin on the sun's side


_NO_TILE = np.zeros((0, 0, 6))


PANO_LIGHT = typeof(_PanoLight(0, *([0.0] * 4), 0, 0.0, *([(0.0, 0.0, 0.0)] * 4)))
TILE_LIGHT = typeof(_TileLight(*([0.0] * 4), 0, 0.0))
IMAGE = types.float64[:, :, ::1]


# ---------------------------------------------------------------------------------------
# the panorama


@njit((VEC, VEC, FLOAT, FLOAT, FLOAT, CAPTURE, FLOAT, FLOAT, VEC, VEC, VEC, OUT, types.int64[::1]),
      cache=True)
def _first_hits(S, memo, cx, cy, cam, C, dx, dy, dist, step, neg_tan, geo, first):
    """March one column: `first[r]` = the first sample whose surface reaches row r (-1: none).

    A row r is reached at sample k when the height field's top there is at or above the
    row's ray (rows r >= rA) or the row's ray passes through a tree crown (rU <= r <= rL).
    """
    H = neg_tan.size
    first[:] = -1
    n_open = H
    floor_row = H  # rows at or below it are hit already
    for k in range(dist.size):
        d = dist[k]
        _sample(S, memo, cx + dx * d, cy + dy * d, step[k] * 0.6, C, False, geo, k)
        r_a = np.searchsorted(neg_tan, -(geo[k, F_H] - cam) / d)
        for r in range(r_a, floor_row):
            if first[r] < 0:
                first[r] = k
                n_open -= 1
        floor_row = min(floor_row, r_a)
        if geo[k, F_CHI] > -np.inf:
            r_u = np.searchsorted(neg_tan, -(geo[k, F_CHI] - cam) / d)
            r_l = np.searchsorted(neg_tan, -(geo[k, F_CLO] - cam) / d, side="right") - 1
            for r in range(r_u, min(r_l + 1, floor_row)):
                if first[r] < 0:
                    first[r] = k
                    n_open -= 1
        if n_open == 0:
            break


@njit((FLOAT, FLOAT, PANO_LIGHT, BOOL), cache=True)
def _sky(phi, theta, L, clean):
    """The sky's colour at elevation phi and azimuth theta, with clouds on a plane above."""
    t = math.sqrt(min(max(phi / (math.pi / 2), 0.0), 1.0))
    hor, top = L.sky_horizon, L.sky_top
    sky = (hor[0] + (top[0] - hor[0]) * t, hor[1] + (top[1] - hor[1]) * t,
           hor[2] + (top[2] - hor[2]) * t)
    if clean:
        return sky
    tphi = max(math.tan(max(phi, 0.02)), 0.02)  # clouds shrink towards the horizon
    cxp = math.sin(theta) / tphi * 1.2
    cyp = math.cos(theta) / tphi * 1.2
    cs = L.cloud_seed
    cloud = (value_noise(cs, cxp + 50.0, cyp + 50.0) * 0.65
             + value_noise(cs + 1, cxp * 3.1, cyp * 3.1) * 0.35)
    cloud = min(max((cloud - (1.0 - L.cloud_cover)) / 0.18, 0.0), 1.0)
    grey = 0.95 - 0.25 * value_noise(cs + 2, cxp * 2.0, cyp * 2.0)
    return (sky[0] * (1 - cloud) + grey * cloud, sky[1] * (1 - cloud) + grey * cloud,
            sky[2] * (1 - cloud) + grey * cloud)


@njit((VEC, FLOAT, FLOAT, FLOAT, CAPTURE, VEC, VEC, VEC, VEC, VEC, VEC, PANO_LIGHT, BOOL, IMAGE,
       FLOAT, FLOAT, FLOAT, IMAGE, types.uint8[:, ::1], types.boolean[:, ::1]), cache=True)
def _cast_panorama(S, cx, cy, cam, C, dirx, diry, dist, step, phi, tan_phi, L, clean,
                   tile, tile_cx, tile_cy, tile_gsd, img, lab, mask):
    """Render the panorama at (cx, cy) into img [H, W, 3], lab [H, W] and mask [H, W]."""
    H, W, D = tan_phi.size, dirx.size, dist.size
    neg_tan = -tan_phi  # increasing with the row index
    geo = new_out(D, False)
    memo = new_memo()
    col = new_out(D + H, True)  # colours: slot k for sample k, D + r for row r's ground
    first = np.empty(H, np.int64)
    coloured = np.empty(D, np.bool_)
    kinds = np.empty(H, np.int64)
    slots = np.empty(H, np.int64)
    reach = np.empty(H)
    S_t = tile.shape[0]
    for c in range(W):
        dx, dy = dirx[c], diry[c]
        _first_hits(S, memo, cx, cy, cam, C, dx, dy, dist, step, neg_tan, geo, first)
        coloured[:] = False
        # what each row sees, and where its colour comes from
        for r in range(H):
            k = first[r]
            kinds[r] = _NONE
            if k < 0:
                continue
            h_at, d_at = geo[k, F_H], dist[k]
            in_crown = False
            if geo[k, F_CHI] > -np.inf:
                r_u = np.searchsorted(neg_tan, -(geo[k, F_CHI] - cam) / d_at)
                r_l = np.searchsorted(neg_tan, -(geo[k, F_CLO] - cam) / d_at, side="right") - 1
                r_a = np.searchsorted(neg_tan, -(h_at - cam) / d_at)
                in_crown = r_u <= r <= r_l and (r < r_a or geo[k, F_CHI] > h_at)
            z_at = cam + d_at * tan_phi[r]
            reach[r] = d_at
            if in_crown:
                kinds[r] = _CROWN
            elif h_at < 0.05 and tan_phi[r] < 0:
                kinds[r] = _GROUND_HIT
            elif z_at < h_at - 0.12:
                kinds[r] = _SIDE
            else:
                kinds[r] = _TOP
            if kinds[r] == _GROUND_HIT:
                # the exact ground point of the ray (the samples are coarse)
                d_g = cam / max(-tan_phi[r], 1e-6)
                reach[r] = d_g
                gx, gy = cx + dx * d_g, cy + dy * d_g
                slots[r] = D + r
                tc = math.floor((gx - tile_cx) / tile_gsd + S_t / 2)
                tr = math.floor((tile_cy - gy) / tile_gsd + S_t / 2)
                if (S_t > 0 and 0 <= tc < S_t and 0 <= tr < S_t and tile[tr, tc, 3] < 0.05
                        and tile[tr, tc, 5] == 0):
                    # inside the tile on plain ground: the tile's colour and class
                    _put(col, D + r, F_TOP, (tile[tr, tc, 0], tile[tr, tc, 1], tile[tr, tc, 2]))
                    col[D + r, F_TOP_CLS] = tile[tr, tc, 4]
                    col[D + r, F_ONLY] = 0.0
                else:
                    _sample(S, memo, gx, gy, 0.0, C, True, col, D + r)
            else:
                slots[r] = k
                if not coloured[k]:
                    _sample(S, memo, cx + dx * d_at, cy + dy * d_at, step[k] * 0.6, C, True, col,
                            k)
                    coloured[k] = True
        # colours
        theta = 2 * np.pi * c / W - np.pi
        for r in range(H):
            kind = kinds[r]
            s = slots[r]
            only = False
            if kind == _NONE:
                if tan_phi[r] >= 0:
                    rgb = _sky(phi[r], theta, L, clean)
                    lab[r, c] = SKY
                    only = True
                else:  # ground beyond the view distance: in the haze
                    rgb = L.void
                    lab[r, c] = GROUND
            elif kind == _GROUND_HIT:
                rgb = _get(col, s, F_TOP)
                lab[r, c] = int(col[s, F_TOP_CLS])
                only = col[s, F_ONLY] > 0.5
            elif kind == _TOP:  # tops seen from the side (pitched roofs, car roofs, walls)
                rgb = _scale(_get(col, s, F_TOP), 0.92)
                lab[r, c] = int(col[s, F_TOP_CLS])
                only = col[s, F_ONLY] > 0.5
            elif kind == _SIDE:  # facades with windows, vehicles with a window band
                rgb = _get(col, s, F_SIDE)
                z = cam + dist[s] * tan_phi[r]
                tex, fl = int(col[s, F_TEX]), col[s, F_FLOOR]
                glass = _colour(S, C_GLASS)
                if tex == TEX_WINDOWS and z > 1.0:
                    f = max(fl, 1.0)
                    fz = (z % f) / f
                    fa = (col[s, F_ALONG] % 3.0) / 3.0
                    if 0.3 < fz < 0.8 and 0.2 < fa < 0.8:
                        rgb = (rgb[0] * 0.25 + glass[0] * 0.75,
                               rgb[1] * 0.25 + glass[1] * 0.75,
                               rgb[2] * 0.25 + glass[2] * 0.75)
                if tex == TEX_VEHICLE and fl * 0.55 < z < fl * 0.92:
                    rgb = glass
                if tex == TEX_VEHICLE and z < 0.35:  # tyres
                    rgb = (0.08, 0.08, 0.08)
                if not clean:
                    ndot = col[s, F_NX] * L.sun_x + col[s, F_NY] * L.sun_y
                    rgb = _scale(rgb, 0.72 + 0.38 * math.cos(L.sun_el) * max(ndot, 0.0))
                lab[r, c] = int(col[s, F_SIDE_CLS])
                only = col[s, F_ONLY] > 0.5
            else:  # _CROWN
                rgb = _get(col, s, F_CROWN)
                if not clean:
                    leaf = unit(hash_ints(L.seed, c, r), 3)
                    rgb = _scale(rgb, col[s, F_SHADE] * (0.8 + 0.35 * leaf))
                lab[r, c] = VEGETATION
            if kind != _NONE and not clean:
                fog = 1.0 - math.exp(-reach[r] / L.fog_m)  # distance haze
                sun = 0.8 + 0.25 * math.sin(L.sun_el)
                rgb = ((rgb[0] * (1 - fog) + L.haze[0] * fog) * sun,
                       (rgb[1] * (1 - fog) + L.haze[1] * fog) * sun,
                       (rgb[2] * (1 - fog) + L.haze[2] * fog) * sun)
            img[r, c, 0] = rgb[0]
            img[r, c, 1] = rgb[1]
            img[r, c, 2] = rgb[2]
            mask[r, c] = only


# ---------------------------------------------------------------------------------------
# the aerial tile


@njit((VEC, FLOAT, FLOAT, FLOAT, INT, INT, INT, INT, INT, CAPTURE, TILE_LIGHT, BOOL, IMAGE, IMAGE,
       types.boolean[:, ::1]), cache=True)
def _render_tile(S, cx, cy, gsd, size, left, top, right, bottom, C, L, clean, img, raw, mask):
    """Render the aerial tile into img [size, size, 3], raw [size, size, 6] (top colour,
    height, class, one-view flag: the panorama reuses them) and mask [size, size]."""
    rows, cols = size + top + bottom, size + left + right
    heights = np.zeros((rows, cols))  # the visible top (crown or height field), padded
    out = new_out(size * size, True)
    memo = new_memo()
    for r in range(size):
        for c in range(size):
            n = r * size + c
            x = cx + (c + 0.5 - size / 2) * gsd
            y = cy - (r + 0.5 - size / 2) * gsd
            _sample(S, memo, x, y, gsd * 0.5, C, True, out, n)
            heights[top + r, left + c] = max(out[n, F_H], out[n, F_CHI])
    if rows > size or cols > size:
        # the margin casts shadows only: heights on every other pixel
        coarse = new_out(1, False)
        for pr in range(0, rows, 2):
            for pc in range(0, cols, 2):
                if top <= pr < top + size and left <= pc < left + size:
                    if pr + 1 < top + size and pc + 1 < left + size:
                        continue  # all four pixels in the tile
                x = cx + (pc - left + 0.5 - size / 2) * gsd
                y = cy - (pr - top + 0.5 - size / 2) * gsd
                _sample(S, memo, x, y, gsd, C, False, coarse, 0)
                hc = max(coarse[0, F_H], coarse[0, F_CHI])
                for rr in range(pr, min(pr + 2, rows)):
                    for cc in range(pc, min(pc + 2, cols)):
                        if not (top <= rr < top + size and left <= cc < left + size):
                            heights[rr, cc] = hc
    # cast shadows: march towards the sun over the padded heights
    tan_el = math.tan(L.sun_el)
    steps = int(min(L.pad_m, heights.max() / max(tan_el, 1e-3)) / gsd)
    stride = max(1, steps // 24)
    marches = np.arange(stride, steps + 1, stride)  # the steps, as pixel offsets and drops
    march_r = np.empty(marches.size, np.int64)
    march_c = np.empty(marches.size, np.int64)
    for m in range(marches.size):
        march_r[m] = int(round(-marches[m] * L.sun_y))
        march_c[m] = int(round(marches[m] * L.sun_x))
    march_drop = marches * gsd * tan_el
    sun = (L.sun_x * math.cos(L.sun_el), L.sun_y * math.cos(L.sun_el), math.sin(L.sun_el))
    for r in range(size):
        for c in range(size):
            n = r * size + c
            crown_top = out[n, F_CHI] > out[n, F_H]
            rgb = _get(out, n, F_CROWN) if crown_top else _get(out, n, F_TOP)
            only = out[n, F_ONLY] > 0.5 and not crown_top
            raw[r, c, 0], raw[r, c, 1], raw[r, c, 2] = _get(out, n, F_TOP)
            raw[r, c, 3] = out[n, F_H]
            raw[r, c, 4] = out[n, F_TOP_CLS]
            raw[r, c, 5] = out[n, F_ONLY]
            if not clean:
                x = cx + (c + 0.5 - size / 2) * gsd
                y = cy - (r + 0.5 - size / 2) * gsd
                if crown_top:  # leaf texture
                    leaf = unit(hash_ints(int(S[SEED]), math.floor(x / 0.8), math.floor(y / 0.8), 5), 0)
                    rgb = _scale(rgb, 0.8 + 0.35 * leaf)
                # Lambert shading from the height field (central differences inside,
                # one-sided at the raster's edge, as numpy.gradient)
                pr, pc = top + r, left + c
                c0, c1 = max(pc - 1, 0), min(pc + 1, cols - 1)
                r0, r1 = max(pr - 1, 0), min(pr + 1, rows - 1)
                gx = (heights[pr, c1] - heights[pr, c0]) / ((c1 - c0) * gsd)
                gy = -(heights[r1, pc] - heights[r0, pc]) / ((r1 - r0) * gsd)  # rows go south
                gx = min(max(gx, -2.5), 2.5)
                gy = min(max(gy, -2.5), 2.5)
                nz = 1.0 / math.sqrt(gx * gx + gy * gy + 1.0)
                lam = min(max((-gx * sun[0] - gy * sun[1] + sun[2]) * nz / sun[2], 0.0), 1.4)
                shadow = False
                base = heights[pr, pc] + 0.15
                for m in range(marches.size):
                    sr, sc = pr + march_r[m], pc + march_c[m]
                    if (0 <= sr < rows and 0 <= sc < cols
                            and heights[sr, sc] - march_drop[m] > base):
                        shadow = True
                        break
                rgb = _scale(rgb, 0.5 if shadow else 0.42 + 0.58 * lam)
                # cloud shadows: seen only from above
                cl = value_noise(L.cloud_seed, x / 90.0, y / 90.0)
                cshadow = min(max((cl - (1.0 - L.cloud_cover)) / 0.15, 0.0), 1.0)
                rgb = _scale(rgb, 1.0 - 0.35 * cshadow)
                only = only or cshadow >= 0.5
            img[r, c, 0] = rgb[0]
            img[r, c, 1] = rgb[1]
            img[r, c, 2] = rgb[2]
            mask[r, c] = only


# ---------------------------------------------------------------------------------------
# the camera response


@njit((IMAGE, BOOL, VEC, FLOAT, FLOAT, FLOAT, INT, FLOAT), cache=True)
def _to_u8(img, respond, gain, sat, contrast, gamma, noise_seed, noise_sd):
    """The image as uint8; with `respond`, after the capture's camera response first:
    saturation, contrast, gamma, white balance and sensor noise."""
    H, W = img.shape[0], img.shape[1]
    out = np.empty((H, W, 3), np.uint8)
    if respond:
        total = 0.0
        for r in range(H):
            for c in range(W):
                grey = (img[r, c, 0] + img[r, c, 1] + img[r, c, 2]) / 3.0
                for k in range(3):
                    img[r, c, k] = grey + (img[r, c, k] - grey) * sat
                    total += img[r, c, k]
        mean = total / (H * W * 3)
        # x ** gamma by a table on [0, 2] (linear interpolation; 1/4 of a grey level at worst)
        lut = (np.arange(2050) / 1024.0) ** gamma
        state = (noise_seed & 0xFFFFFFFF) | 1  # xorshift32: sensor noise, cheap and seeded
    for r in range(H):
        for c in range(W):
            for k in range(3):
                v = img[r, c, k]
                if respond:
                    v = max(mean + (v - mean) * contrast, 0.0) * 1024.0
                    if v < 2048.0:
                        i = int(v)
                        v = lut[i] + (lut[i + 1] - lut[i]) * (v - i)
                    else:
                        v = (v / 1024.0) ** gamma
                    v *= gain[k]
                    # triangular noise: the sum of two uniform bytes
                    state ^= (state << 13) & 0xFFFFFFFF
                    state ^= state >> 17
                    state ^= (state << 5) & 0xFFFFFFFF
                    v += ((state & 0xFF) + ((state >> 8) & 0xFF) - 255) * noise_sd
                out[r, c, k] = int(min(max(v, 0.0), 1.0) * 255.0 + 0.5)
    return out


def _image(img: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """`img` (float, in [0, 1]) as uint8, after a camera response drawn from `rng` (none
    when it is None: clean renders)."""
    if rng is None:
        return _to_u8(img, False, np.ones(3), 1.0, 1.0, 1.0, 0, 0.0)
    gain = rng.normal(1.0, 0.14) * rng.normal(1.0, 0.06, size=3)
    sat = max(0.3, rng.normal(1.0, 0.22))
    contrast = max(0.5, rng.normal(1.0, 0.1))
    gamma = float(np.exp(rng.normal(0.0, 0.12)))
    noise_seed = int(rng.integers(2**31))
    return _to_u8(img, True, gain, sat, contrast, gamma, noise_seed, 0.02 / 104.5)  # sd ~0.02


# ---------------------------------------------------------------------------------------
# one view at a time


def _panorama(world: World, x: float, y: float, size, seed: int, transients: bool, clean: bool,
              unmatched: float, tile: tuple | None):
    R = world.region
    H, W = size
    dirx, diry, dist, step, phi, tan_phi = _ray_geometry(H, W, float(R.view_m))
    rng = _rng(seed, 11)
    # the capture's transients (drawn also when off, so the lighting does not move)
    capture_seed = int(rng.integers(2**31))
    vehicles = R.vehicle_prob * float(rng.uniform(0.5, 1.5)) * 2 * unmatched
    people = R.pedestrian_prob * float(rng.uniform(0.5, 1.5)) * 2 * unmatched
    qx, qy = world.to_q(x, y)
    capture = Capture(seed=capture_seed, cam_qx=float(qx), cam_qy=float(qy),
                      vehicle_prob=float(vehicles if transients else 0.0),
                      pedestrian_prob=float(people if transients else 0.0),
                      reach=TRANSIENT_RANGE, clear=7.0, ground=True)
    sun_az = float(rng.uniform(0, 2 * np.pi))
    sun_el = math.radians(float(rng.uniform(*R.sun_elevation)))
    cloud_cover = float(rng.uniform(*R.cloud_cover))
    cloud_seed = int(rng.integers(2**31))
    haze = _rgb(R.haze)
    road_grass = np.mean(np.vstack([[R.road], np.asarray(R.grass).reshape(-1, 3)]), axis=0) / 255
    light = _PanoLight(seed=int(seed), sun_x=math.sin(sun_az), sun_y=math.cos(sun_az),
                       sun_el=sun_el, cloud_cover=cloud_cover, cloud_seed=cloud_seed,
                       fog_m=float(R.fog_m), haze=haze, sky_top=_rgb(R.sky_top),
                       sky_horizon=_rgb(R.sky_horizon),
                       void=tuple(float(v) * 0.5 + h * 0.5 for v, h in zip(road_grass, haze,
                                                                           strict=True)))
    raw, tile_cx, tile_cy, tile_gsd = tile if tile is not None else (_NO_TILE, 0.0, 0.0, 1.0)
    img = np.empty((H, W, 3))
    lab = np.empty((H, W), np.uint8)
    mask = np.empty((H, W), np.bool_)
    _cast_panorama(world.params, float(x), float(y), float(R.cam_height), capture, dirx, diry,
                   dist, step, phi, tan_phi, light, clean, raw, float(tile_cx), float(tile_cy),
                   float(tile_gsd), img, lab, mask)
    return _image(img, None if clean else _rng(seed, 12)), lab, mask


def _aerial(world: World, cx: float, cy: float, size: int, seed: int, tile_m: float | None,
            clean: bool, unmatched: float):
    R = world.region
    gsd = float(tile_m or R.tile_m) / size
    rng = _rng(seed, 21)
    sun_az = float(rng.uniform(0, 2 * np.pi))
    sun_el = math.radians(float(rng.uniform(*R.sun_elevation)))
    cloud_seed = int(rng.integers(2**31))
    cloud_cover = float(rng.uniform(0.0, 1.0)) * unmatched  # U(0, 0.5) at the default
    capture_seed = int(rng.integers(2**31))
    vehicles = R.vehicle_prob * max(0.0, 2 * unmatched - 1)
    capture = Capture(seed=capture_seed, cam_qx=0.0, cam_qy=0.0, vehicle_prob=float(vehicles),
                      pedestrian_prob=0.0, reach=math.inf, clear=0.0, ground=False)
    # pad the raster on the sun's side so shadows of things outside the tile fall in
    pad_m = 0.0 if clean else min(24.0, 30.0 / math.tan(sun_el))
    pad = int(math.ceil(pad_m / gsd))
    sx, sy = math.sin(sun_az), math.cos(sun_az)
    light = _TileLight(sun_x=sx, sun_y=sy, sun_el=sun_el, cloud_cover=cloud_cover,
                       cloud_seed=cloud_seed, pad_m=pad_m)
    img = np.empty((size, size, 3))
    raw = np.empty((size, size, 6))
    mask = np.empty((size, size), np.bool_)
    _render_tile(world.params, float(cx), float(cy), gsd, int(size),
                 pad if sx < 0 else 0, pad if sy > 0 else 0, pad if sx > 0 else 0,
                 pad if sy < 0 else 0, capture, light, clean, img, raw, mask)
    return _image(img, None if clean else _rng(seed, 22)), mask, (raw, float(cx), float(cy), gsd)


# ---------------------------------------------------------------------------------------
# the public entry points


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
    unmatched: float = DEFAULT_UNMATCHED,
    masks: bool = False,
) -> tuple[list[tuple], list]:
    """Render panoramas at `cams` and aerial tiles centred on `aerial_centres` (default:
    the same points; each tile then lends its ground colours to its panorama).

    `pano_size=None` or `aerial_size=None` skips that view. Returns ([(panorama, labels)],
    [aerial]); with `masks=True`, ([(panorama, labels, mask)], [(aerial, mask)]), the masks
    boolean (True: content only this view shows, see the module docstring). `seeds`
    draw each pair's capture conditions; a camera's result does not depend on the rest.
    """
    unmatched = check_unmatched(unmatched)
    cams = [(float(x), float(y)) for x, y in cams]
    seeds = [int(s) for s in seeds]
    centres = cams if aerial_centres is None else [(float(x), float(y))
                                                   for x, y in aerial_centres]
    shared = bool(pano_size) and bool(aerial_size) and aerial_centres is None
    panos, tiles, raws = [], [], []
    if aerial_size:
        for (x, y), seed in zip(centres, seeds, strict=True):
            img, mask, raw = _aerial(world, x, y, int(aerial_size), seed, tile_m, clean, unmatched)
            tiles.append((img, mask) if masks else img)
            raws.append(raw)
    if pano_size:
        size = (int(pano_size[0]), int(pano_size[1]))
        for n, ((x, y), seed) in enumerate(zip(cams, seeds, strict=True)):
            img, labels, mask = _panorama(world, x, y, size, seed, transients, clean, unmatched,
                                          raws[n] if shared else None)
            panos.append((img, labels, mask) if masks else (img, labels))
    return panos, tiles


def render_panorama(
    world: World,
    x: float,
    y: float,
    size: tuple[int, int] = (64, 256),
    seed: int = 0,
    *,
    transients: bool = True,
    clean: bool = False,
    unmatched: float = DEFAULT_UNMATCHED,
    masks: bool = False,
) -> tuple[np.ndarray, ...]:
    """Ray-cast the panorama seen from (x, y). Returns (H x W x 3 uint8, H x W labels),
    and the H x W boolean mask with `masks=True`.

    `seed` draws the capture conditions (vehicles, people, clouds, sun, camera
    response). `clean=True` turns off haze, clouds, shading and noise (for tests).
    """
    panos, _ = render_batch(world, [(x, y)], [seed], size, None, transients=transients,
                            clean=clean, unmatched=unmatched, masks=masks)
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
    unmatched: float = DEFAULT_UNMATCHED,
    masks: bool = False,
):
    """The orthographic north-up tile centred on (cx, cy): size x size x 3 uint8 (and the
    boolean mask with `masks=True`).

    Pixel (row, col) covers the point x = cx + (col + 0.5 - size/2) * gsd,
    y = cy - (row + 0.5 - size/2) * gsd with gsd = tile_m / size.
    """
    _, tiles = render_batch(world, [(cx, cy)], [seed], None, size, tile_m=tile_m, clean=clean,
                            unmatched=unmatched, masks=masks)
    return tiles[0]
