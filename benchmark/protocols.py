"""Robustness protocols: seeded perturbations of the evaluation images.

Every perturbation is drawn from a generator seeded by `(protocol seed, stream, item
index)`, so it depends only on the item, never on batch order, worker count or the
method being evaluated: every method sees exactly the same perturbed test set.

Protocols and their names (the name goes into metric keys, e.g. `test/cvact/fov90/R1`):

| spec string                | dict                                    | name               |
|----------------------------|-----------------------------------------|--------------------|
| `none`                     | `{type: none}`                          | `none`             |
| `fov:90`                   | `{type: fov, fov: 90}`                  | `fov90`            |
| `fov:90:known`             | `{type: fov, fov: 90, known: true}`     | `fov90_known`      |
| `misalign:shift=20,rot=10` | `{type: misalign, shift: 20, rot: 10}`  | `misalign_s20_r10` |
| `misalign:shift=12px`      | `{type: misalign, shift: 12, unit: px}` | `misalign_s12px_r0`|

A seed other than the default 0 is written `fov:90:seed=3` / `misalign:shift=20,seed=3`
(or `seed: 3`) and appended to the name (`fov90_seed3`).

- **Limited field of view, unknown orientation** (`fov:<deg>`): query `i`'s panorama is
  rolled by `round(u * W)` columns, `u` uniform in [0, 1) from the generator of
  `(seed, i)` (a fraction of the width: the same azimuth offset at any resolution), then
  the first `round(W * fov / 360)` columns are kept. The aerial tile stays north-up.
- **Known orientation** (`fov:<deg>:known`): no random roll; the kept field of view is
  centred on north: the panorama is rolled by `round(fov_width / 2 - north_column * W)`
  columns, so the column that starts at north becomes column `round(fov_width / 2)` of the
  kept ones (azimuths -fov/2..+fov/2, within half a column). `north_column` (a fraction of
  the width, dict key `north_column`) defaults to 0.5, the centre column, as in CVUSA and
  the synthetic world (see `benchmark.transforms` for the panorama convention).
- **Aerial misalignment** (`misalign:shift=<s>,rot=<r>`): gallery item `j`'s tile is
  translated by `(dx, dy)`, each uniform in [-s, s], and rotated by an angle uniform in
  [-r, r] degrees, from the generator of `(seed, j)`. `s` is a **percentage of the tile
  side** (resolution-independent: `shift=20` moves a 322-px tile by up to 64 px) unless
  written with `px` (pixels of the preprocessed tile). The tile keeps its size; the
  uncovered border is filled by reflection (no black corners for a model to key on).

Protocols act on preprocessed 0..1 (or normalised) tensors `[3, h, w]`; the FoV crop
returns a narrower image whose width the evaluation dataset rounds to the patch multiple.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gengeo_bench.errors import ConfigError

KINDS = ("none", "fov", "misalign")
_STREAM = {"fov": 1, "misalign": 2}  # keeps the two kinds' draws independent

ACCEPTED = (
    "accepted protocol forms: 'none'; 'fov:<degrees>' (unknown orientation, e.g. fov:90); "
    "'fov:<degrees>:known' (orientation known); 'misalign:shift=<percent of side>[px],"
    "rot=<degrees>' (e.g. misalign:shift=20,rot=10); an optional seed as ':seed=<n>' "
    "(fov) or ',seed=<n>' (misalign); or a dict {type: none|fov|misalign, fov, known, "
    "shift, unit: pct|px, rot, seed}"
)


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Protocol:
    """One robustness protocol. Build with `Protocol.parse(spec)` or the constructor."""

    kind: str = "none"
    fov: float = 360.0
    known: bool = False
    shift: float = 0.0
    unit: str = "pct"  # shift unit: "pct" of the tile side or "px"
    rot: float = 0.0
    seed: int = 0
    north_column: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown protocol '{self.kind}'; {ACCEPTED}")
        if self.kind == "fov" and not 0.0 < self.fov <= 360.0:
            raise ConfigError(f"protocol fov: field of view must be in (0, 360], got {self.fov}")
        if self.shift < 0 or self.rot < 0:
            raise ConfigError(
                f"protocol misalign: shift and rot must be >= 0 (they are ranges: each draw is "
                f"uniform in [-x, x]), got shift={self.shift:g}, rot={self.rot:g}"
            )
        if self.unit not in ("pct", "px"):
            raise ConfigError(f"protocol misalign: unit must be 'pct' or 'px', got {self.unit!r}")

    # -- naming and parsing

    @property
    def name(self) -> str:
        """Stable name used in metric keys (`none`, `fov90`, `fov90_known`, `misalign_s20_r10`)."""
        if self.kind == "none":
            return "none"
        if self.kind == "fov":
            name = f"fov{_num(self.fov)}" + ("_known" if self.known else "")
        else:
            unit = "px" if self.unit == "px" else ""
            name = f"misalign_s{_num(self.shift)}{unit}_r{_num(self.rot)}"
        return name + (f"_seed{self.seed}" if self.seed else "")

    def describe(self) -> dict[str, Any]:
        """Every parameter, JSON-ready (manifests and cache keys)."""
        out: dict[str, Any] = {"type": self.kind, "name": self.name}
        if self.kind == "fov":
            out.update(fov=self.fov, known=self.known, seed=self.seed,
                       north_column=self.north_column)
        elif self.kind == "misalign":
            out.update(shift=self.shift, unit=self.unit, rot=self.rot, seed=self.seed)
        return out

    @classmethod
    def parse(cls, spec: str | dict | Protocol | None) -> Protocol:
        """From a string (`fov:90`, `fov:90:known`, `misalign:shift=20,rot=10`), a dict
        (`{type: fov, fov: 90}`), a `Protocol`, or None (= `none`)."""
        if spec is None:
            return cls()
        if isinstance(spec, Protocol):
            return spec
        if isinstance(spec, dict):
            return cls._from_dict(spec)
        if not isinstance(spec, str):
            raise ConfigError(f"protocol: expected a string or a mapping, got {spec!r}; {ACCEPTED}")
        return cls._from_string(spec)

    @classmethod
    def _from_string(cls, spec: str) -> Protocol:
        text = spec.strip().lower()
        head, _, rest = text.partition(":")
        try:
            if head == "none" and not rest:
                return cls()
            if head == "fov" and rest:
                parts = rest.split(":")
                fov = float(parts[0])
                known, seed = False, 0
                for part in parts[1:]:
                    if part == "known":
                        known = True
                    elif part.startswith("seed="):
                        seed = int(part[5:])
                    else:
                        raise ValueError(part)
                return cls(kind="fov", fov=fov, known=known, seed=seed)
            if head == "misalign" and rest:
                values: dict[str, Any] = {}
                for item in rest.split(","):
                    key, eq, value = (s.strip() for s in item.partition("="))
                    if not eq or key in values:
                        raise ValueError(item)
                    values[key] = value
                return cls._misalign(values)
        except ConfigError:
            raise
        except (ValueError, TypeError):
            pass
        raise ConfigError(f"unknown protocol '{spec}'; {ACCEPTED}") from None

    @classmethod
    def _misalign(cls, values: dict[str, Any]) -> Protocol:
        unknown = set(values) - {"shift", "rot", "seed", "unit"}
        if unknown or not ({"shift", "rot"} & set(values)):
            raise ValueError(values)
        shift = values.get("shift", 0)
        unit = str(values.get("unit", "pct"))
        if isinstance(shift, str):
            match = re.fullmatch(r"([0-9.eE+-]+)\s*(px|%)?", shift)
            if not match:
                raise ValueError(shift)
            shift = match.group(1)
            if match.group(2) == "px":
                unit = "px"
        return cls(
            kind="misalign",
            shift=float(shift),
            unit=unit,
            rot=float(values.get("rot", 0)),
            seed=int(values.get("seed", 0)),
        )

    @classmethod
    def _from_dict(cls, spec: dict) -> Protocol:
        spec = dict(spec)
        kind = str(spec.pop("type", spec.pop("kind", ""))).lower()
        spec.pop("name", None)  # describe() output round-trips
        allowed = {
            "none": set(),
            "fov": {"fov", "known", "seed", "north_column"},
            "misalign": {"shift", "rot", "seed", "unit"},
        }
        if kind not in allowed or set(spec) - allowed[kind]:
            raise ConfigError(f"unknown protocol {spec | {'type': kind}!r}; {ACCEPTED}")
        try:
            if kind == "none":
                return cls()
            if kind == "fov":
                if "fov" not in spec:
                    raise ValueError("fov")
                return cls(
                    kind="fov",
                    fov=float(spec["fov"]),
                    known=bool(spec.get("known", False)),
                    seed=int(spec.get("seed", 0)),
                    north_column=float(spec.get("north_column", 0.5)),
                )
            return cls._misalign(spec)
        except ConfigError:
            raise
        except (ValueError, TypeError):
            raise ConfigError(f"unknown protocol {spec | {'type': kind}!r}; {ACCEPTED}") from None

    # -- seeded draws

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**64, _STREAM[self.kind], int(index)])

    def affects(self, view: str) -> bool:
        """Whether this protocol changes images of `view` ("ground" or "aerial")."""
        return (self.kind == "fov" and view == "ground") or (
            self.kind == "misalign" and view == "aerial"
        )

    def fov_width(self, width: int) -> int:
        """Columns kept of a panorama `width` wide: `round(W * fov / 360)` (at least 1)."""
        return max(1, int(math.floor(width * self.fov / 360.0 + 0.5)))

    def ground_roll(self, index: int, width: int) -> int:
        """Columns by which query `index`'s panorama is rolled (`torch.roll` shift) before
        the first `fov_width` columns are kept."""
        if self.known:
            north = self.north_column * width
            return int(math.floor(self.fov_width(width) / 2.0 - north + 0.5)) % width
        u = float(self._rng(index).random())
        return int(math.floor(u * width + 0.5)) % width

    def aerial_params(self, index: int) -> tuple[float, float, float]:
        """`(dx, dy, angle)` for gallery item `index`: shift in the protocol's unit (percent
        of the side or pixels; +x right, +y down) and rotation in degrees (+ = counter-
        clockwise as displayed)."""
        u = self._rng(index).random(3) * 2.0 - 1.0
        return float(u[0] * self.shift), float(u[1] * self.shift), float(u[2] * self.rot)

    # -- application

    def apply_ground(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """The query panorama as this protocol shows it (`[..., h, w']`)."""
        if self.kind != "fov":
            return image
        width = image.shape[-1]
        rolled = torch.roll(image, self.ground_roll(index, width), dims=-1)
        return rolled[..., : self.fov_width(width)].contiguous()

    def apply_aerial(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """The gallery tile as this protocol shows it (same size; reflection border)."""
        if self.kind != "misalign":
            return image
        dx, dy, angle = self.aerial_params(index)
        h, w = image.shape[-2:]
        if self.unit == "pct":
            dx, dy = dx / 100.0 * w, dy / 100.0 * h
        return shift_rotate(image, dx, dy, angle)

    def apply(self, image: torch.Tensor, index: int, view: str) -> torch.Tensor:
        if view == "ground":
            return self.apply_ground(image, index)
        if view == "aerial":
            return self.apply_aerial(image, index)
        raise ConfigError(f"protocol: view must be 'ground' or 'aerial', got {view!r}")


def shift_rotate(image: torch.Tensor, dx: float, dy: float, angle: float) -> torch.Tensor:
    """Move the content of `image` `[C, h, w]` by `(dx, dy)` pixels (+x right, +y down) and
    rotate it by `angle` degrees counter-clockwise about the centre; reflection padding."""
    if dx == 0 and dy == 0 and angle == 0:
        return image
    h, w = image.shape[-2:]
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    # Output pixel p (normalised coordinates, y down) samples input R^-1 (p - d), with R the
    # counter-clockwise-on-screen rotation; in y-down coordinates R = [[c, s], [-s, c]].
    tx, ty = 2.0 * dx / w, 2.0 * dy / h
    # inverse rotation [[c, -s], [s, c]] in pixel units (aspect-correct for non-square tiles)
    theta = torch.tensor(
        [
            [cos, -sin * h / w, -(cos * tx - sin * h / w * ty)],
            [sin * w / h, cos, -(sin * w / h * tx + cos * ty)],
        ],
        dtype=torch.float32,
    )
    x = image[None].float()
    grid = F.affine_grid(theta[None], list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out[0].to(image.dtype)


def parse_protocols(specs: Any) -> list[Protocol]:
    """A list of protocols from a string, a dict, or a list of them (names must be unique)."""
    if specs is None:
        return [Protocol()]
    if isinstance(specs, (str, dict, Protocol)):
        specs = [specs]
    out = [Protocol.parse(s) for s in specs]
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"protocols: duplicate protocol(s) {dupes}")
    return out
