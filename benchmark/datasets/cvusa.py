"""CVUSA, the "CVUSA subset" of cross-view pairs (35,532 train / 8,884 test).

Papers: Workman, Souvenir, Jacobs, "Wide-Area Image Geolocalization with Aerial Reference
Imagery" (ICCV 2015); the subset and its split files: Zhai, Bessinger, Workman, Jacobs,
"Predicting Ground-Level Scene Layout from Aerial Imagery" (CVPR 2017).

Layout as distributed::

    <root>/splits/train-19zl.csv            train split (no header, 3 fields per line)
    <root>/splits/val-19zl.csv              the test split
    <root>/bingmap/19/NNNNNNN.jpg           aerial tiles, 750x750
    <root>/streetview/panos/NNNNNNN.jpg     panoramas, 1232x224
    <root>/split_locations/all.csv          optional: row = id - 1, columns
                                            sat_lat, sat_lon, ground_lat, ground_lon

A split line reads `bingmap/19/0041073.jpg,streetview/panos/0041073.jpg,
streetview/annotations/0041073.png`; the pair id is the 7-digit number. The de-duplicated
split files (34,769 / 8,841 lines) have the same format: pass their file name as
`splits` (e.g. `splits="train-19zl_dedup.csv"`). Evaluation is one-to-one: query i's
positive is gallery item i.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from gengeo_bench.datasets.base import Pair
from gengeo_bench.datasets.checks import DiskDataset, drop_missing
from gengeo_bench.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLITS = {"train": "train", "test": "val"}
LAYOUT = (
    "A CVUSA root holds splits/train-19zl.csv and splits/val-19zl.csv (3 comma-separated "
    "fields per line, no header: bingmap/19/NNNNNNN.jpg,streetview/panos/NNNNNNN.jpg,"
    "streetview/annotations/NNNNNNN.png), the aerial tiles in bingmap/19/ (750x750) and the "
    "panoramas in streetview/panos/ (1232x224); point root at the folder that contains splits/."
)
_ID = re.compile(r"(\d+)")


def read_split_csv(path: Path) -> list[tuple[str, str, str]]:
    """(id, aerial relative path, ground relative path) per line of a CVUSA split file.

    A malformed line is a `DataError` naming the file, the line number and the format.
    """
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 3:
                raise DataError(
                    f"{path}: line {number}: expected 3 comma-separated fields "
                    f"(bingmap/19/NNNNNNN.jpg,streetview/panos/NNNNNNN.jpg,"
                    f"streetview/annotations/NNNNNNN.png), found {len(fields)}: {line[:120]!r}."
                )
            aerial, ground = fields[0], fields[1]
            match = _ID.fullmatch(Path(aerial).stem)
            if not match:
                raise DataError(
                    f"{path}: line {number}: the aerial path {aerial!r} should end in the "
                    f"7-digit pair id (bingmap/19/NNNNNNN.jpg)."
                )
            rows.append((match.group(1), aerial, ground))
    return rows


class CVUSA(DiskDataset):
    """CVUSA split `train` (train-19zl.csv) or `test` (val-19zl.csv).

    `splits` is the split-file suffix ("19zl" reads splits/train-19zl.csv and
    splits/val-19zl.csv) or an explicit file name under `<root>/splits/` (or a path).
    Pair locations are (ground_lat, ground_lon) from split_locations/all.csv when present.
    """

    name = "cvusa"
    split_names = tuple(SPLITS)

    def __init__(self, root: str, split: str = "train", splits: str = "19zl"):
        super().__init__(root, split)
        if split not in SPLITS:
            raise ConfigError(
                f"cvusa: split {split!r} is not one of {sorted(SPLITS)} "
                f"('test' reads splits/val-{splits}.csv)."
            )
        self.splits = splits
        if not self.root.is_dir():
            raise DataError(f"CVUSA root {self.root} does not exist or is not a folder. {LAYOUT}")
        self.split_file = self._split_path()
        rows = read_split_csv(self.split_file)
        if not rows:
            raise DataError(f"{self.split_file}: the split file is empty. {LAYOUT}")
        self.locations_file = self.root / "split_locations" / "all.csv"
        locations = self._read_locations(rows) if self.locations_file.is_file() else None
        pairs = [
            Pair(
                id=pid,
                ground=self.root / ground,
                aerial=self.root / aerial,
                location=None if locations is None else locations[i],
            )
            for i, (pid, aerial, ground) in enumerate(rows)
        ]
        self.pairs, self.skipped_missing = drop_missing(
            pairs,
            lambda p: (p.ground, p.aerial),
            dataset="CVUSA",
            root=self.root,
            logger=logger,
            fix="Re-extract the CVUSA archive (bingmap/19/ and streetview/panos/) into this "
            "root, or point root at a complete copy.",
        )

    def _split_path(self) -> Path:
        if self.splits.endswith(".csv"):
            explicit = Path(self.splits)
            path = explicit if explicit.is_absolute() else self.root / "splits" / explicit
        else:
            path = self.root / "splits" / f"{SPLITS[self.split]}-{self.splits}.csv"
        if not path.is_file():
            folder = self.root / "splits"
            found = sorted(p.name for p in folder.glob("*.csv")) if folder.is_dir() else []
            seen = f"Found in {folder}: {', '.join(found)}." if found else f"{folder} has no .csv."
            raise DataError(
                f"CVUSA split file {path} not found (split 'train' reads "
                f"splits/train-{self.splits}.csv, split 'test' reads splits/val-{self.splits}.csv;"
                f" an explicit file name can be given as splits=...). {seen} {LAYOUT}"
            )
        return path

    def _read_locations(self, rows: list[tuple[str, str, str]]) -> list[tuple[float, float]]:
        try:
            table = np.loadtxt(self.locations_file, delimiter=",", usecols=(0, 1, 2, 3), ndmin=2)
        except (ValueError, IndexError) as exc:
            raise DataError(
                f"{self.locations_file}: expected comma-separated numbers, no header, columns "
                f"sat_lat, sat_lon, ground_lat, ground_lon ({exc})."
            ) from exc
        out = []
        for pid, _, _ in rows:
            row = int(pid) - 1
            if not 0 <= row < len(table):
                raise DataError(
                    f"{self.locations_file}: has {len(table)} rows but pair {pid} needs row "
                    f"{row + 1} (row = id - 1). Use the all.csv that came with this split."
                )
            out.append((float(table[row, 2]), float(table[row, 3])))
        return out

    def split_files(self) -> list[Path]:
        files = [self.split_file]
        if self.locations_file.is_file():
            files.append(self.locations_file)
        return files

    def files_by_view(self) -> dict[str, list[Path]]:
        return {
            "ground": [p.ground for p in self.pairs],
            "aerial": [p.aerial for p in self.pairs],
        }

    def options(self) -> dict[str, Any]:
        return {"splits": self.splits}
