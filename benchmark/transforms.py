"""Image preprocessing and paired (ground + aerial) training augmentation.

Preprocessing
-------------
`Preprocess` is the full recipe that turns one image file into a backbone input: the
target size `(h, w)` (sides multiples of the backbone's patch size), an optional row crop
of the panorama (applied to the decoded image *before* resizing), the interpolation, JPEG
reduced-scale decoding, and the backbone's mean/std. Build it from the registry with
`Preprocess.from_registry("dinov2_vitb14", "ground")`, or from a meta record with
`Preprocess.from_meta(meta, view, ...)`. `describe()` lists every choice and `key()` is a
stable short string over them: both go into feature-cache keys and manifests.

`load_image(path, size, crop_rows=None)` returns a float tensor `[3, h, w]` with values in
**0..1, not normalised** (photometric augmentation works on 0..1 colours);
`Preprocess.normalize` applies mean/std afterwards, and calling a `Preprocess` on a path
does both. JPEG files are decoded at a reduced scale when the target allows it: PIL's
`Image.draft("RGB", (w, h))` makes libjpeg decode at the largest 1/2, 1/4 or 1/8 scale
that stays at least as large as the request (for a 1664x832 CVACT panorama and a 644x322
target: a 832x416 decode, ~4x fewer pixels), then the image is resized exactly with an
antialiased PIL filter. `draft=False` gives the full decode.

Panorama convention
-------------------
A panorama is equirectangular: the column position `x` (continuous; pixel `c` covers
`[c, c+1)`) maps to the azimuth `(x / W - north_column) * 360` degrees, **clockwise from
north**: azimuth grows left to right, east lies a quarter-width right of north.
`north_column` is a fraction of the width; the default **0.5 puts north at the centre
column** (south at column 0, west at W/4, east at 3W/4): the CVUSA convention, and the
one `benchmark/synthetic_world.py` renders (its column `c` samples azimuth
`360 c / W - 180`: exactly `north_column = 0.5 + 0.5 / W` for its rendered width W; with
0.5 a flipped panorama sits one column from the exact mirror, 0.56 degrees at 644 columns).
Set it to 0.0 for panoramas that start at north. Aerial tiles are north-up (row 0 north,
east right).

Paired augmentation (`PairedAugment`)
-------------------------------------
- Rotation: the aerial tile is rotated by `k x 90` degrees counter-clockwise (as displayed;
  `torch.rot90(tile, k, dims=(-2, -1))`). After a counter-clockwise quarter turn, the
  content that lay east of the camera (azimuth 90) lies north (azimuth 0): every azimuth
  decreases by 90 degrees. The panorama matches by moving its content `k` quarter-widths to
  the left: `torch.roll(pano, -k * W / 4, dims=-1)`. This does not depend on where north is.
- Flip: the aerial tile is flipped left-right (mirrored about its north-south axis), which
  maps azimuth `a` to `-a`. Flipping the panorama left-right maps column `x` to `W - x`;
  azimuth `-a` is at `2 * north_column * W - x`, so the flipped panorama is rolled by
  `2 * north_column * W` columns (mod W). With north at the centre line (0.5) or at the
  left edge (0.0) the roll is zero and a plain flip of both views is already consistent.
- Photometric jitter: brightness, contrast, saturation and hue factors drawn
  independently for each view, on 0..1 colours, before normalisation.

Every random choice is drawn from an explicit `numpy.random.Generator`; the datasets seed
it from `(seed, epoch, index)` so a batch is reproducible and training can resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from gengeo_bench.errors import ConfigError, DataError

VIEWS = ("ground", "aerial")
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Bumped whenever the decoding/resizing code changes its output: it is part of `key()`.
PREPROCESS_VERSION = 1

Size = tuple[int, int]
CropRows = tuple[float, float] | tuple[int, int]


# --------------------------------------------------------------------------- sizes


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def round_to_patch(value: float, patch: int) -> int:
    """The multiple of `patch` nearest to `value` (at least one patch)."""
    return max(patch, _round_half_up(value / patch) * patch)


def fit_size(
    size: int | Sequence[int], patch: int = 1, aspect: float | None = None
) -> Size:
    """A target `(h, w)` whose sides are multiples of `patch`.

    - `size = [h, w]`: the height is rounded to the nearest multiple, then the width to the
      multiple nearest to `h' * w / h` (aspect kept; when `h` is already a multiple this is
      simply the multiple nearest to `w`): 322x644 stays, 300x600 -> 294x588 for patch 14.
    - `size = h` (an int) with `aspect = w / h` of the source (a panorama's 2:1 or 5.5:1):
      height as above, `width = round(h' * aspect / patch) * patch`.
    - `size = h` without `aspect`: a square `h' x h'`.
    """
    if isinstance(size, (int, np.integer)):
        h, ratio = int(size), (1.0 if aspect is None else float(aspect))
    else:
        if len(size) != 2:
            raise ConfigError(f"image size: expected [height, width] or a height, got {size!r}")
        h, w = (int(s) for s in size)
        if w <= 0:
            raise ConfigError(f"image size: sides must be positive, got {list(size)}")
        ratio = w / h if h > 0 else 0.0
    if h <= 0 or ratio <= 0:
        raise ConfigError(f"image size: sides must be positive, got {size!r}")
    patch = max(1, int(patch))
    hh = round_to_patch(h, patch)
    return hh, round_to_patch(hh * ratio, patch)


def _check_crop_rows(crop_rows: Any) -> CropRows | None:
    if crop_rows is None:
        return None
    if len(crop_rows) != 2:
        raise ConfigError(f"crop_rows: expected [start, stop], got {crop_rows!r}")
    a, b = crop_rows
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (a, b)):
        if not 0 <= a < b:
            raise ConfigError(f"crop_rows: expected 0 <= start < stop rows, got {[a, b]}")
        return int(a), int(b)
    a, b = float(a), float(b)
    if not 0.0 <= a < b <= 1.0:
        raise ConfigError(
            f"crop_rows: fractions must satisfy 0 <= start < stop <= 1, got {[a, b]} "
            "(write integers for rows, e.g. [208, 624])"
        )
    return a, b


def crop_row_range(crop_rows: CropRows | None, height: int) -> tuple[float, float]:
    """The `[start, stop)` rows of an image of `height` rows kept by `crop_rows`.

    Integers are rows of the image as stored on disk; floats are fractions of its height.
    """
    if crop_rows is None:
        return 0.0, float(height)
    a, b = crop_rows
    if isinstance(a, int) and isinstance(b, int):
        return float(a), float(b)
    return a * height, b * height


# --------------------------------------------------------------------------- decoding


def load_image(
    path: str | Path,
    size: Sequence[int],
    crop_rows: CropRows | None = None,
    interpolation: str = "bicubic",
    draft: bool = True,
) -> torch.Tensor:
    """Decode `path` into a float tensor `[3, h, w]` in 0..1 (**not normalised**); see
    `decode_image`."""
    return to_float(decode_image(path, size, crop_rows, interpolation, draft))


def to_float(array: np.ndarray) -> torch.Tensor:
    """A decoded `[h, w, 3]` uint8 image as the float tensor `[3, h, w]` in 0..1."""
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)


def decode_image(
    path: str | Path,
    size: Sequence[int],
    crop_rows: CropRows | None = None,
    interpolation: str = "bicubic",
    draft: bool = True,
) -> np.ndarray:
    """Decode `path` into a uint8 array `[h, w, 3]`.

    `size` is the target `(h, w)`. `crop_rows` keeps rows `[start, stop)` of the stored
    image (integers: rows; floats: fractions of the height) before the resize. JPEG files
    are decoded at a reduced power-of-two scale that stays at least the target size
    (`draft=True`), then resized exactly with an antialiased filter. Any decoding
    problem (missing, truncated, not an image) raises `DataError` naming the path.
    """
    th, tw = int(size[0]), int(size[1])
    try:
        with Image.open(path) as im:
            full_w, full_h = im.size
            r0, r1 = crop_row_range(crop_rows, full_h)
            if r1 > full_h + 1e-6 or r1 - r0 < 1:
                raise DataError(
                    f"{path}: crop rows [{r0:g}, {r1:g}) do not fit an image of "
                    f"{full_w}x{full_h}"
                )
            if draft and im.format in ("JPEG", "MPO"):
                # The decoded crop must stay >= the target: ask for the full image scaled up.
                need_h = math.ceil(th * full_h / (r1 - r0))
                im.draft("RGB", (tw, need_h))
            scale_y = im.size[1] / full_h
            img = im.convert("RGB") if im.mode != "RGB" else im
            img.load()
            if crop_rows is not None:
                # Rows of the (possibly reduced-scale) decode; nothing outside them is used.
                top = _round_half_up(r0 * scale_y)
                bottom = max(top + 1, min(img.size[1], _round_half_up(r1 * scale_y)))
                img = img.crop((0, top, img.size[0], bottom))
            if img.size != (tw, th):
                img = img.resize((tw, th), INTERPOLATIONS[interpolation])
            array = np.array(img, dtype=np.uint8)  # a writable copy
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    return array


# --------------------------------------------------------------------------- Preprocess


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns one file into a backbone input of one view.

    `size` is `(h, w)` with both sides multiples of `patch_size` (checked). Calling the
    object on a path returns the normalised tensor; `load` returns 0..1 colours.
    """

    size: Size
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    patch_size: int = 1
    crop_rows: CropRows | None = None
    interpolation: str = "bicubic"
    draft: bool = True
    view: str = "ground"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop_rows", _check_crop_rows(self.crop_rows))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"preprocess: mean/std need 3 values (std > 0), got {self}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess.interpolation: unknown '{self.interpolation}'; "
                f"expected one of {sorted(INTERPOLATIONS)}"
            )
        if self.view not in VIEWS:
            raise ConfigError(f"preprocess.view: expected one of {list(VIEWS)}, got {self.view!r}")
        h, w = self.size
        p = self.patch_size
        if h <= 0 or w <= 0 or h % p or w % p:
            raise ConfigError(
                f"preprocess: {self.view} size {h}x{w} must be positive multiples of the "
                f"patch size {p}; use fit_size() or Preprocess.from_meta to round them"
            )

    # -- construction

    @classmethod
    def from_meta(
        cls,
        meta: dict[str, Any],
        view: str,
        size: int | Sequence[int] | None = None,
        aspect: float | None = None,
        crop_rows: CropRows | None = None,
        interpolation: str = "bicubic",
        draft: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocess:
        """From a backbone's registry meta (mean, std, patch_size, image_size), with overrides.

        `size` overrides the meta's `image_size[view]`: `[h, w]` or a height, in which case
        the width follows `aspect` (a panorama's w / h after the row crop; default: the
        aspect of the meta's size for that view). Sides are rounded to the patch multiple.
        """
        if view not in VIEWS:
            raise ConfigError(f"preprocess: view must be one of {list(VIEWS)}, got {view!r}")
        patch = int(meta.get("patch_size", 1) or 1)
        default = (meta.get("image_size") or {}).get(view)
        if size is None:
            if default is None:
                raise ConfigError(f"preprocess: the backbone meta has no image_size.{view}")
            size = default
        if isinstance(size, (int, np.integer)) and aspect is None:
            aspect = (default[1] / default[0]) if default else 1.0
        return cls(
            size=fit_size(size, patch, aspect),
            mean=tuple(mean if mean is not None else meta.get("mean", cls.mean)),
            std=tuple(std if std is not None else meta.get("std", cls.std)),
            patch_size=patch,
            crop_rows=crop_rows,
            interpolation=interpolation,
            draft=draft,
            view=view,
        )

    @classmethod
    def from_registry(cls, backbone: str, view: str, **overrides: Any) -> Preprocess:
        """`from_meta` with the meta of registered backbone `backbone`."""
        from gengeo_bench import registry

        return cls.from_meta(registry.meta("backbone", backbone), view, **overrides)

    # -- use

    def load(self, path: str | Path) -> torch.Tensor:
        """`[3, h, w]` float in 0..1 (not normalised)."""
        return load_image(path, self.size, self.crop_rows, self.interpolation, self.draft)

    def decode(self, path: str | Path) -> np.ndarray:
        """`[h, w, 3]` uint8: what `load` returns, before it becomes floats."""
        return decode_image(path, self.size, self.crop_rows, self.interpolation, self.draft)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """`(image - mean) / std` per channel; works on `[3, h, w]` and `[B, 3, h, w]`."""
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device)[:, None, None]
        return image * std + mean

    def __call__(self, path: str | Path) -> torch.Tensor:
        return self.normalize(self.load(path))

    def fit_width(self, image: torch.Tensor) -> torch.Tensor:
        """Resize the width of `image` to the nearest patch multiple (after a FoV crop)."""
        h, w = image.shape[-2:]
        target = round_to_patch(w, self.patch_size)
        if target == w:
            return image
        mode = "bicubic" if self.interpolation != "bilinear" else "bilinear"
        out = torch.nn.functional.interpolate(
            image[None], size=(h, target), mode=mode, align_corners=False, antialias=True
        )
        return out[0]

    def describe(self) -> dict[str, Any]:
        """Every preprocessing choice, JSON-ready (goes into manifests and cache keys)."""
        return {
            "version": PREPROCESS_VERSION,
            "view": self.view,
            "size": list(self.size),
            "patch_size": self.patch_size,
            "crop_rows": None if self.crop_rows is None else list(self.crop_rows),
            "interpolation": self.interpolation,
            "draft": self.draft,
            "mean": list(self.mean),
            "std": list(self.std),
            "value_range": "normalised (x - mean) / std from 0..1 RGB",
        }

    def key(self) -> str:
        """A stable short string: `<view>-<h>x<w>-<hash of describe()>`."""
        blob = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.view}-{self.size[0]}x{self.size[1]}-{digest}"


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the paired augmentation (for logging and tests)."""

    flip: bool = False
    k: int = 0  # aerial rotated k x 90 degrees counter-clockwise; pano rolled -k W/4
    ground_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast,
    aerial_jitter: tuple[float, float, float, float] | None = None  # saturation, hue


def flip_pano(pano: torch.Tensor, north_column: float = 0.5) -> torch.Tensor:
    """Mirror a panorama's azimuths about north (`a -> -a`): flip, then roll north back."""
    width = pano.shape[-1]
    shift = _round_half_up(2.0 * north_column * width) % width
    out = pano.flip(-1)
    return torch.roll(out, shift, dims=-1) if shift else out


def rotate_pair(
    pano: torch.Tensor, aerial: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the aerial tile `k` x 90 degrees counter-clockwise and roll the panorama to match.

    Azimuths decrease by `k` x 90 degrees, so the panorama moves `k` quarter-widths left
    (`round(k * W / 4)` columns: exact when W is a multiple of 4).
    """
    k = int(k) % 4
    if k == 0:
        return pano, aerial
    if aerial.shape[-1] != aerial.shape[-2]:
        raise ConfigError(
            f"augmentation: rotating the aerial tile needs a square tile, got "
            f"{aerial.shape[-2]}x{aerial.shape[-1]}"
        )
    width = pano.shape[-1]
    return (
        torch.roll(pano, -_round_half_up(k * width / 4), dims=-1),
        torch.rot90(aerial, k, dims=(-2, -1)),
    )


def color_jitter(image: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """Brightness, contrast, saturation (multiplicative factors) and hue (shift in
    turns, -0.5..0.5) on a 0..1 image, in that order (torchvision keeps 0..1)."""
    b, c, s, h = factors
    out = image
    if b != 1.0:
        out = TF.adjust_brightness(out, b)
    if c != 1.0:
        out = TF.adjust_contrast(out, c)
    if s != 1.0:
        out = TF.adjust_saturation(out, s)
    if h != 0.0:
        out = TF.adjust_hue(out, h)
    return out


@dataclass(frozen=True)
class PairedAugment:
    """The paired training augmentation (see the module docstring for the geometry).

    `flip_p`: probability of flipping both views; `rotate_p`: probability of a quarter-turn
    rotation, `k` then uniform in {1, 2, 3} (0.75: `k` uniform in {0, 1, 2, 3});
    `rotate=False` turns rotations off; `jitter_p`: probability, per view, of a
    photometric jitter with factors uniform in `[1 - x, 1 + x]` (hue: `[-hue, hue]`).
    `north_column`: where north lies in the panorama, as a fraction of its width (0.5: the
    centre column, as in CVUSA and the synthetic world).
    """

    flip_p: float = 0.5
    rotate: bool = True
    rotate_p: float = 0.75
    jitter_p: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.0
    north_column: float = 0.5

    def sample(self, rng: np.random.Generator) -> AugmentParams:
        """Draw one set of parameters (always the same number of draws from `rng`)."""
        u = rng.random(4)
        k = int(rng.integers(1, 4))  # used when a rotation is drawn
        jit = rng.random((2, 4))
        return AugmentParams(
            flip=bool(u[0] < self.flip_p),
            k=k if (self.rotate and u[1] < self.rotate_p) else 0,
            ground_jitter=self._factors(jit[0]) if u[2] < self.jitter_p else None,
            aerial_jitter=self._factors(jit[1]) if u[3] < self.jitter_p else None,
        )

    def _factors(self, u: np.ndarray) -> tuple[float, float, float, float]:
        return (
            1.0 + self.brightness * (2.0 * float(u[0]) - 1.0),
            1.0 + self.contrast * (2.0 * float(u[1]) - 1.0),
            1.0 + self.saturation * (2.0 * float(u[2]) - 1.0),
            self.hue * (2.0 * float(u[3]) - 1.0),
        )

    def apply(
        self, pano: torch.Tensor, aerial: torch.Tensor, params: AugmentParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply `params` to a (panorama, aerial) pair of 0..1 images `[3, h, w]`."""
        if params.flip:
            pano = flip_pano(pano, self.north_column)
            aerial = aerial.flip(-1)
        pano, aerial = rotate_pair(pano, aerial, params.k)
        if params.ground_jitter is not None:
            pano = color_jitter(pano, params.ground_jitter)
        if params.aerial_jitter is not None:
            aerial = color_jitter(aerial, params.aerial_jitter)
        return pano, aerial

    def __call__(
        self, pano: torch.Tensor, aerial: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(pano, aerial, self.sample(rng))

    def describe(self) -> dict[str, Any]:
        return {
            "flip_p": self.flip_p,
            "rotate": self.rotate,
            "rotate_p": self.rotate_p,
            "jitter_p": self.jitter_p,
            "brightness": self.brightness,
            "contrast": self.contrast,
            "saturation": self.saturation,
            "hue": self.hue,
            "north_column": self.north_column,
        }


def rng_for(*keys: int) -> np.random.Generator:
    """A numpy Generator seeded from a tuple of ints (e.g. seed, epoch, index).

    Independent of call order, process and worker: the same keys give the same stream.
    """
    return np.random.default_rng([int(k) % 2**64 for k in keys])
