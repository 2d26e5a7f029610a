"""VIGOR: cross-view retrieval beyond one-to-one (4 US cities, 90,618 aerial tiles).

Paper: Zhu, Yang, Chen, "VIGOR: Cross-View Image Geo-localization beyond One-to-one
Retrieval" (CVPR 2021).

Two layouts are accepted (detected; city folder names are matched case-insensitively)::

    official                                        reorganised
    <root>/<City>/panorama/<panoid>,<lat>,<lon>,.jpg   <root>/ground/<city>/<pano file>
    <root>/<City>/satellite/satellite_<lat>_<lon>.png  <root>/satellite/<city>/<tile file>
    <root>/splits/<City>/...                           <root>/splits/<city>/...

Split files per city (`<root>/splits/<City>/`; the label-corrected files, named with
`__corrected`, may also sit in `<root>/splits__corrected/<City>/`):

- `satellite_list.txt`: one tile file name per line; the gallery is every tile of the
  split's cities (90,618 same-area, 46,563 cross-area test);
- `same_area_balanced_train.txt` / `same_area_balanced_test.txt` (same-area: all four
  cities), `pano_label_balanced.txt` (cross-area: train on NewYork + Seattle, test on
  Chicago + SanFrancisco), and their `__corrected` variants.

A label line has 13 space-separated fields: the panorama file name, then four triples
`(sat_name, d0, d1)`; the first is the **positive**, the next three are
**semi-positives**. The panorama lies in its 640-px tile at (row, col) =
(320 + d0, 320 - d1): `Pair.offset` and `EvalSplit.offsets` hold (row, col); the raw
(d0, d1) are kept in `deltas`. A pair's location is the (lat, lon) in its file name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gengeo_bench.datasets.base import EvalSplit, Pair
from gengeo_bench.datasets.checks import DiskDataset, FileIndex, drop_missing
from gengeo_bench.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
# mode -> split -> default cities
MODE_CITIES = {
    "same_area": {"train": CITIES, "test": CITIES},
    "cross_area": {"train": ("NewYork", "Seattle"), "test": ("Chicago", "SanFrancisco")},
}
LABEL_FILES = {
    ("same_area", "train"): "same_area_balanced_train",
    ("same_area", "test"): "same_area_balanced_test",
    ("cross_area", "train"): "pano_label_balanced",
    ("cross_area", "test"): "pano_label_balanced",
}
TILE = 640
FIELDS = 13
LAYOUT = (
    "A VIGOR root holds either <City>/panorama/<panoid>,<lat>,<lon>,.jpg and "
    "<City>/satellite/satellite_<lat>_<lon>.png for City in Chicago, NewYork, SanFrancisco, "
    "Seattle (official layout), or ground/<city>/ and satellite/<city>/ (reorganised layout), "
    "plus splits/<City>/satellite_list.txt and the label files same_area_balanced_train.txt, "
    "same_area_balanced_test.txt, pano_label_balanced.txt (and their __corrected variants)."
)
_PANO = re.compile(r"^(?P<id>[^,]+),(?P<lat>-?[0-9.]+),(?P<lon>-?[0-9.]+),\.jpg$")
_TILE = re.compile(r"^satellite_(?P<lat>-?[0-9.]+)_(?P<lon>-?[0-9.]+)\.png$")


@dataclass(frozen=True)
class Label:
    """One parsed label line."""

    pano: str  # file name
    pano_id: str
    location: tuple[float, float]  # (lat, lon) from the file name
    tiles: tuple[str, str, str, str]  # positive, then 3 semi-positives
    deltas: tuple[tuple[float, float], ...]  # (d0, d1) per tile
    line: int


def parse_pano_name(name: str) -> tuple[str, float, float] | None:
    """(panoid, lat, lon) from `<panoid>,<lat>,<lon>,.jpg`, or None."""
    match = _PANO.match(name)
    if not match:
        return None
    return match.group("id"), float(match.group("lat")), float(match.group("lon"))


def parse_tile_name(name: str) -> tuple[float, float] | None:
    """(lat, lon) from `satellite_<lat>_<lon>.png`, or None."""
    match = _TILE.match(name)
    return (float(match.group("lat")), float(match.group("lon"))) if match else None


def read_label_file(path: Path) -> list[Label]:
    """Every line of a VIGOR label file; a malformed line is a DataError with its number."""
    labels = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            fields = raw.split()
            if not fields:
                continue
            where = f"{path}: line {number}"
            if len(fields) != FIELDS:
                raise DataError(
                    f"{where}: expected {FIELDS} space-separated fields (the panorama file "
                    f"name, then 4 triples 'satellite_<lat>_<lon>.png d0 d1': the positive "
                    f"and 3 semi-positives), found {len(fields)}: {raw.strip()[:160]!r}."
                )
            parsed = parse_pano_name(fields[0])
            if parsed is None:
                raise DataError(
                    f"{where}: the first field {fields[0]!r} should be a panorama file name "
                    f"'<panoid>,<lat>,<lon>,.jpg'."
                )
            tiles, deltas = [], []
            for k in range(4):
                sat, d0, d1 = fields[1 + 3 * k : 4 + 3 * k]
                if not sat.endswith(".png"):
                    raise DataError(
                        f"{where}: field {2 + 3 * k} {sat!r} should be a tile file name "
                        f"'satellite_<lat>_<lon>.png' (triple {k + 1} of 4)."
                    )
                try:
                    delta = (float(d0), float(d1))
                except ValueError:
                    raise DataError(
                        f"{where}: fields {3 + 3 * k} and {4 + 3 * k} ({d0!r}, {d1!r}) should "
                        f"be the numbers d0 d1 of triple {k + 1} (pixel offsets in the tile)."
                    ) from None
                tiles.append(sat)
                deltas.append(delta)
            labels.append(
                Label(
                    pano=fields[0],
                    pano_id=parsed[0],
                    location=(parsed[1], parsed[2]),
                    tiles=tuple(tiles),
                    deltas=tuple(deltas),
                    line=number,
                )
            )
    return labels


def read_satellite_list(path: Path) -> list[str]:
    """Tile file names, one per line."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def offset_of(d0: float, d1: float) -> tuple[float, float]:
    """(row, col) of the panorama in its 640-px tile: (320 + d0, 320 - d1)."""
    return (TILE / 2 + d0, TILE / 2 - d1)


def _child(folder: Path | None, name: str) -> Path | None:
    """`folder/name`, matching `name` case-insensitively; None when absent."""
    if folder is None:
        return None
    exact = folder / name
    if exact.is_dir():
        return exact
    if not folder.is_dir():
        return None
    for entry in folder.iterdir():
        if entry.name.lower() == name.lower() and entry.is_dir():
            return entry
    return None


class VIGOR(DiskDataset):
    """VIGOR split `train` or `test`, `mode` same_area or cross_area.

    `corrected=True` reads the label-corrected `__corrected` files. `cities` restricts the
    split to some of its cities (case-insensitive names). `evaluation()` gives gallery =
    every tile of those cities, gt = the positive's gallery index, semi_positives
    [Q, 3] gallery indices, offsets [Q, 2] (row, col). Extra attributes: `deltas` [N, 2]
    raw (d0, d1) of each pair's positive, `layout` ("official" or "reorganised").
    """

    name = "vigor"
    split_names = ("train", "test")  # in either mode
    tile_size = TILE  # offsets are pixels of the 640x640 tile as distributed

    def __init__(
        self,
        root: str,
        split: str = "train",
        mode: Literal["same_area", "cross_area"] = "same_area",
        corrected: bool = False,
        cities: list[str] | None = None,
    ):
        super().__init__(root, split)
        if mode not in MODE_CITIES:
            raise ConfigError(
                f"vigor: mode {mode!r} is not one of {list(MODE_CITIES)} (same_area: train and "
                f"test on all four cities; cross_area: train on NewYork + Seattle, test on "
                f"Chicago + SanFrancisco)."
            )
        if split not in MODE_CITIES[mode]:
            raise ConfigError(f"vigor: split {split!r} is not one of ['train', 'test'].")
        self.mode = mode
        self.corrected = bool(corrected)
        self.cities = self._select_cities(cities)
        if not self.root.is_dir():
            raise DataError(f"VIGOR root {self.root} does not exist or is not a folder. {LAYOUT}")
        self.layout = self._detect_layout()

        index = FileIndex()
        self.label_files: list[Path] = []
        self.satellite_lists: list[Path] = []
        self.gallery: list[Path] = []
        self.gallery_ids: list[str] = []
        gallery_index: dict[tuple[str, str], int] = {}
        records: list[tuple[Pair, tuple[str, str, str, str], tuple[float, float], str]] = []
        for city in self.cities:
            pano_dir, sat_dir = self._image_dirs(city)
            sat_list = self._split_file(city, "satellite_list.txt")
            label_file = self._split_file(
                city, LABEL_FILES[(mode, split)] + ("__corrected" if corrected else "") + ".txt"
            )
            self.satellite_lists.append(sat_list)
            self.label_files.append(label_file)
            for tile in read_satellite_list(sat_list):
                if (city, tile) not in gallery_index:
                    gallery_index[(city, tile)] = len(self.gallery)
                    self.gallery.append(sat_dir / tile)
                    self.gallery_ids.append(Path(tile).stem)
            for label in read_label_file(label_file):
                for tile in label.tiles:
                    if (city, tile) not in gallery_index:
                        raise DataError(
                            f"{label_file}: line {label.line}: tile {tile} is not listed in "
                            f"{sat_list}; the label and satellite-list files should come from "
                            f"the same VIGOR release."
                        )
                d0, d1 = label.deltas[0]
                pair = Pair(
                    id=label.pano_id,
                    ground=pano_dir / label.pano,
                    aerial=sat_dir / label.tiles[0],
                    location=label.location,
                    offset=offset_of(d0, d1),
                )
                records.append((pair, label.tiles, (d0, d1), city))
        if not records:
            raise DataError(
                f"VIGOR at {self.root}: the label files {[str(p) for p in self.label_files]} "
                f"hold no lines. {LAYOUT}"
            )
        kept, self.skipped_missing = drop_missing(
            records,
            lambda r: (r[0].ground, r[0].aerial),
            dataset="VIGOR",
            root=self.root,
            logger=logger,
            fix="Re-extract the panorama/ and satellite/ folders of each city into this root, "
            "or point root at a complete copy.",
            index=index,
            extra_files=self.gallery,
        )
        # Drop missing gallery tiles, then map tiles to their (new) gallery indices.
        missing = set(self.skipped_missing)
        keep_tiles = [i for i, g in enumerate(self.gallery) if g not in missing]
        remap = {old: new for new, old in enumerate(keep_tiles)}
        old_index = gallery_index
        self.gallery = [self.gallery[i] for i in keep_tiles]
        self.gallery_ids = [self.gallery_ids[i] for i in keep_tiles]
        self._gallery_index = {k: remap[v] for k, v in old_index.items() if v in remap}
        self.pairs = [r[0] for r in kept]
        self.deltas = np.asarray([r[2] for r in kept], dtype=np.float64).reshape(-1, 2)
        tiles_of = [(r[3], r[1]) for r in kept]
        self.gt = np.asarray(
            [self._gallery_index[(city, tiles[0])] for city, tiles in tiles_of], dtype=np.int64
        )
        # A semi-positive whose tile is missing on disk is -1.
        semi = [[self._gallery_index.get((c, t), -1) for t in tiles[1:]] for c, tiles in tiles_of]
        self.semi_positives = np.asarray(semi, dtype=np.int64).reshape(-1, 3)

    def _select_cities(self, cities: list[str] | None) -> list[str]:
        allowed = MODE_CITIES[self.mode][self.split]
        if cities is None:
            return list(allowed)
        if isinstance(cities, str):
            cities = [c for c in cities.split(",") if c.strip()]
        chosen = []
        for name in cities:
            match = next((c for c in CITIES if c.lower() == str(name).strip().lower()), None)
            if match is None:
                raise ConfigError(
                    f"vigor: unknown city {name!r}; VIGOR's cities are {list(CITIES)}."
                )
            if match not in allowed:
                raise ConfigError(
                    f"vigor: city {match} is not part of the {self.mode} {self.split} split, "
                    f"whose cities are {list(allowed)} (cross-area trains on NewYork + Seattle "
                    f"and tests on Chicago + SanFrancisco)."
                )
            if match not in chosen:
                chosen.append(match)
        if not chosen:
            raise ConfigError("vigor: cities is empty; leave it unset for all cities of the split.")
        return chosen

    def _detect_layout(self) -> str:
        ground, satellite = _child(self.root, "ground"), _child(self.root, "satellite")
        if ground is not None and satellite is not None:
            return "reorganised"
        if any(
            (c := _child(self.root, city)) is not None and _child(c, "panorama") is not None
            for city in CITIES
        ):
            return "official"
        raise DataError(
            f"VIGOR root {self.root} has neither <City>/panorama/ folders (official layout) "
            f"nor ground/ and satellite/ folders (reorganised layout). {LAYOUT}"
        )

    def _image_dirs(self, city: str) -> tuple[Path, Path]:
        """(panorama folder, satellite folder) of a city in the detected layout."""
        if self.layout == "reorganised":
            ground = _child(_child(self.root, "ground"), city)
            sat = _child(_child(self.root, "satellite"), city)
            expected = (
                f"{self.root}/ground/{city} and {self.root}/satellite/{city} (any letter case)"
            )
        else:
            city_dir = _child(self.root, city)
            ground, sat = _child(city_dir, "panorama"), _child(city_dir, "satellite")
            expected = f"{self.root}/{city}/panorama and {self.root}/{city}/satellite"
        if ground is None or sat is None:
            raise DataError(
                f"VIGOR ({self.layout} layout) at {self.root}: the image folders of {city} are "
                f"missing; expected {expected}. {LAYOUT}"
            )
        return ground, sat

    def _split_file(self, city: str, name: str) -> Path:
        """`splits/<City>/<name>` (city matched case-insensitively); corrected label files
        are also looked up in `splits__corrected/<City>/`."""
        folders = ["splits"]
        if self.corrected:
            folders = ["splits__corrected", "splits"]
        tried = []
        for folder in folders:
            base = _child(self.root, folder)
            city_dir = _child(base, city)
            candidate = (city_dir or self.root / folder / city) / name
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
        raise DataError(
            f"VIGOR split file not found: expected {' or '.join(tried)} (the {self.mode} "
            f"{self.split} split{' with corrected labels' if self.corrected else ''} of {city}). "
            f"{LAYOUT}"
        )

    def evaluation(self) -> EvalSplit:
        """Queries = the split's panoramas; gallery = every tile of its cities."""
        tile_locations = [parse_tile_name(g.name) for g in self.gallery]
        gallery_locations = (
            np.asarray(tile_locations, dtype=np.float64).reshape(-1, 2)
            if all(loc is not None for loc in tile_locations)
            else None
        )
        return EvalSplit(
            query_ids=[p.id for p in self.pairs],
            queries=[p.ground for p in self.pairs],
            gallery_ids=list(self.gallery_ids),
            gallery=list(self.gallery),
            gt=self.gt.copy(),
            semi_positives=self.semi_positives.copy(),
            query_locations=np.asarray([p.location for p in self.pairs], dtype=np.float64).reshape(
                -1, 2
            ),
            gallery_locations=gallery_locations,
            offsets=np.asarray([p.offset for p in self.pairs], dtype=np.float64).reshape(-1, 2),
        )

    def split_files(self) -> list[Path]:
        return self.label_files + self.satellite_lists

    def files_by_view(self) -> dict[str, list[Path]]:
        return {"ground": [p.ground for p in self.pairs], "aerial": list(self.gallery)}

    def options(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "corrected": self.corrected,
            "cities": list(self.cities),
            "layout": self.layout,
        }

    def __repr__(self) -> str:
        skipped = f", skipped_missing={len(self.skipped_missing)}" if self.skipped_missing else ""
        return (
            f"VIGOR(split={self.split!r}, mode={self.mode!r}, corrected={self.corrected}, "
            f"cities={self.cities}, queries={len(self.pairs)}, gallery={len(self.gallery)}"
            f"{skipped}, layout={self.layout!r}, root='{self.root}')"
        )
