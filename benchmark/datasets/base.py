"""The one interface every dataset loader offers.

A loader object is one split of one dataset on disk (`split="train"` or `"test"`, plus
dataset-specific variants). It offers:

- `pairs`: the training pairs (`Pair`: id, ground path, aerial path, location, and for
  VIGOR the pixel offset of the panorama inside its tile);
- `evaluation()`: the retrieval problem (`EvalSplit`): ground queries, the aerial gallery,
  the ground-truth gallery index per query and, for VIGOR, the semi-positives;
- `manifest()`: counts, split and a content hash over the split files and image lists,
  recorded by every run that reads the dataset;
- `check(decode=False)`: a `CheckReport` of missing, unreadable or wrongly sized files;
- a one-line `repr` with counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Pair:
    """One ground/aerial training pair."""

    id: str
    ground: Path
    aerial: Path
    location: tuple[float, float] | None = None  # (lat, lon) or UTM (easting, northing)
    offset: tuple[float, float] | None = None  # VIGOR: (row, col) of the camera in the tile, px


@dataclass
class EvalSplit:
    """A retrieval problem: each query's ground truth is one gallery index."""

    query_ids: list[str]
    queries: list[Path]  # ground images
    gallery_ids: list[str]
    gallery: list[Path]  # aerial images
    gt: np.ndarray  # [Q] int64 gallery index of each query's positive
    semi_positives: np.ndarray | None = None  # [Q, 3] int64 (VIGOR), else None
    query_locations: np.ndarray | None = None  # [Q, 2] metres or degrees, when known
    gallery_locations: np.ndarray | None = None  # [G, 2]
    offsets: np.ndarray | None = None  # [Q, 2] VIGOR pixel offsets of the positive

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class CheckReport:
    """What `check` found. `ok` is False when the split cannot be used as it is."""

    dataset: str
    root: Path
    split: str
    counts: dict[str, int] = field(default_factory=dict)
    missing: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    wrong_size: list[tuple[Path, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # layout-level problems (no split file)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unreadable or self.wrong_size or self.problems)


def hash_files(paths: list[Path], names: list[str]) -> str:
    """sha256 over the bytes of `paths` (split files) and the list `names` (image paths)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    for name in names:
        digest.update(name.encode())
        digest.update(b"\n")
    return digest.hexdigest()


class CrossViewDataset:
    """Base class. Subclasses set `name`, fill `pairs` and implement `evaluation()`."""

    name = "dataset"
    # Every split the loader can read; `benchmark data check` without --split checks
    # them all. `train` is the training split, the others are evaluation splits.
    split_names: tuple[str, ...] = ("train", "test")

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.split = split
        self.pairs: list[Pair] = []

    def evaluation(self) -> EvalSplit:
        """One-to-one retrieval over this split's pairs (CVUSA, CVACT, synthetic)."""
        return EvalSplit(
            query_ids=[p.id for p in self.pairs],
            queries=[p.ground for p in self.pairs],
            gallery_ids=[p.id for p in self.pairs],
            gallery=[p.aerial for p in self.pairs],
            gt=np.arange(len(self.pairs), dtype=np.int64),
            query_locations=_locations(self.pairs),
            gallery_locations=_locations(self.pairs),
        )

    def split_files(self) -> list[Path]:
        """The files that define this split (hashed into the manifest)."""
        return []

    def manifest(self) -> dict:
        ev = self.evaluation()
        images = [str(p.relative_to(self.root)) for p in ev.queries + ev.gallery]
        return {
            "dataset": self.name,
            "split": self.split,
            "root": str(self.root),
            "pairs": len(self.pairs),
            "queries": len(ev.queries),
            "gallery": len(ev.gallery),
            "content_hash": hash_files(self.split_files(), images),
        }

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, pairs={len(self.pairs)}, root='{self.root}')"


def _locations(pairs: list[Pair]) -> np.ndarray | None:
    if not pairs or any(p.location is None for p in pairs):
        return None
    return np.asarray([p.location for p in pairs], dtype=np.float64)
