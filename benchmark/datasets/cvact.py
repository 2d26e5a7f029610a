"""CVACT: ACT_small (35,532 train / 8,884 val) and ACT_test (92,802).

Paper: Liu, Li, "Lending Orientation to Neural Networks for Cross-view Geo-localization"
(CVPR 2019).

Layout as distributed::

    <root>/ACT_data.mat                                               MATLAB v5
    <root>/ANU_data_small/streetview/<panoId>_grdView.jpg             1664x832 panorama
    <root>/ANU_data_small/satview_polish/<panoId>_satView_polish.jpg  1200x1200 aerial
    <root>/ANU_data_test/streetview/...   <root>/ANU_data_test/satview_polish/...

`ACT_data.mat` holds `panoIds` (N strings of 22 characters), `utm` (N x 2, metres) and the
structs `trainSet.trainInd`, `valSet.valInd`, `valSetAll.valInd`: (n, 1) arrays of
**1-based** indices into `panoIds` (converted to 0-based here). `split="test"` is
`valSetAll` (92,802 pairs), whose images live under `ANU_data_test/`.

Options:

- `middle_crop=True` records `ground_crop_rows = (208, 624)`: the preprocessing keeps rows
  [208, 624) of the 832-row panorama, the middle half (`ground_crop_fraction = (0.25,
  0.75)` of any resized height); `False` resizes the whole panorama.
- `protocol="within_5m"`: the original CVACT_test protocol, where any gallery tile within
  5 m (UTM) of the query's location counts as correct; `positives_within(metres)` gives
  those gallery indices per query (a KD-tree, not a dense distance matrix). The common
  protocol `one_to_one` counts only the paired tile.

The real distribution lacks one training image: that pair is skipped with a warning and
recorded in the manifest as `skipped_missing`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gengeo_bench.datasets.base import EvalSplit, Pair
from gengeo_bench.datasets.checks import DiskDataset, drop_missing
from gengeo_bench.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# split -> (struct, field, image folder)
SPLITS = {
    "train": ("trainSet", "trainInd", "ANU_data_small"),
    "val": ("valSet", "valInd", "ANU_data_small"),
    "test": ("valSetAll", "valInd", "ANU_data_test"),
}
PROTOCOLS = ("one_to_one", "within_5m")
MIDDLE_CROP_ROWS = (208, 624)
PANORAMA_ROWS = 832
LAYOUT = (
    "A CVACT root holds ACT_data.mat (panoIds, utm, and the structs trainSet.trainInd, "
    "valSet.valInd, valSetAll.valInd with 1-based indices), the train/val images in "
    "ANU_data_small/streetview/<panoId>_grdView.jpg and "
    "ANU_data_small/satview_polish/<panoId>_satView_polish.jpg, and the test (valSetAll) "
    "images in the same two folders under ANU_data_test/."
)


def _struct_field(mat: dict, struct: str, field: str, path: Path) -> np.ndarray:
    """`mat[struct][field][0][0]` as loadmat returns a MATLAB struct field, flattened."""
    if struct not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no variable {struct!r} (found {found}). {LAYOUT}")
    try:
        value = mat[struct][field][0][0]
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: {struct}.{field} cannot be read as a MATLAB struct field "
            f"(mat['{struct}']['{field}'][0][0]: {exc}). {LAYOUT}"
        ) from exc
    return np.asarray(value).reshape(-1)


def _pano_ids(raw: Any, path: Path) -> list[str]:
    """panoIds as a list of str, whether loadmat returned a char array or a cell array."""
    out = []
    for item in np.asarray(raw, dtype=object).reshape(-1):
        while isinstance(item, np.ndarray):
            if item.size != 1:
                item = "".join(str(c) for c in item.reshape(-1))
                break
            item = item.reshape(-1)[0]
        out.append(str(item).strip())
    if not out:
        raise DataError(f"{path}: panoIds is empty. {LAYOUT}")
    return out


def read_act_data(path: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(panoIds, utm [N, 2], 0-based indices of `split`) from ACT_data.mat."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, ...
        raise DataError(
            f"{path}: cannot be read as a MATLAB .mat file ({type(exc).__name__}: {exc}). "
            f"Re-download ACT_data.mat."
        ) from exc
    for key in ("panoIds", "utm"):
        if key not in mat:
            raise DataError(f"{path}: no variable {key!r}. {LAYOUT}")
    ids = _pano_ids(mat["panoIds"], path)
    utm = np.asarray(mat["utm"], dtype=np.float64)
    if utm.ndim != 2 or utm.shape != (len(ids), 2):
        raise DataError(
            f"{path}: utm has shape {utm.shape}, expected ({len(ids)}, 2): one (easting, "
            f"northing) row per entry of panoIds."
        )
    struct, field, _ = SPLITS[split]
    one_based = _struct_field(mat, struct, field, path)
    indices = one_based.astype(np.int64) - 1
    bad = np.flatnonzero((indices < 0) | (indices >= len(ids)))
    if len(bad):
        raise DataError(
            f"{path}: {struct}.{field} holds {len(bad)} index(es) outside 1..{len(ids)} "
            f"(first: {one_based[bad[0]]} at position {bad[0]}); the indices are 1-based "
            f"into panoIds."
        )
    return ids, utm, indices


class CVACT(DiskDataset):
    """CVACT split `train`, `val` (ACT_small) or `test` (ACT_test, valSetAll).

    Pair locations are UTM (easting, northing) in metres. Extra attributes:
    `ground_crop_rows` ((208, 624) with `middle_crop`, else None), `ground_crop_fraction`,
    `protocol`; extra method: `positives_within(metres=5.0)`.
    """

    name = "cvact"
    split_names = tuple(SPLITS)

    def __init__(
        self,
        root: str,
        split: str = "train",
        middle_crop: bool = False,
        protocol: Literal["one_to_one", "within_5m"] = "one_to_one",
    ):
        super().__init__(root, split)
        if split not in SPLITS:
            raise ConfigError(
                f"cvact: split {split!r} is not one of {list(SPLITS)} "
                f"('test' is the 92,802-pair valSetAll under ANU_data_test/)."
            )
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"cvact: protocol {protocol!r} is not one of {list(PROTOCOLS)} (one_to_one: "
                f"only the paired tile is correct; within_5m: any tile within 5 m UTM)."
            )
        self.middle_crop = bool(middle_crop)
        self.protocol = protocol
        self.ground_crop_rows: tuple[int, int] | None = MIDDLE_CROP_ROWS if middle_crop else None
        self.ground_crop_fraction: tuple[float, float] | None = (
            (MIDDLE_CROP_ROWS[0] / PANORAMA_ROWS, MIDDLE_CROP_ROWS[1] / PANORAMA_ROWS)
            if middle_crop
            else None
        )
        if not self.root.is_dir():
            raise DataError(f"CVACT root {self.root} does not exist or is not a folder. {LAYOUT}")
        self.mat_file = self.root / "ACT_data.mat"
        if not self.mat_file.is_file():
            raise DataError(f"CVACT split file {self.mat_file} not found. {LAYOUT}")
        ids, utm, indices = read_act_data(self.mat_file, split)
        folder = self.root / SPLITS[split][2]
        pairs = [
            Pair(
                id=ids[i],
                ground=folder / "streetview" / f"{ids[i]}_grdView.jpg",
                aerial=folder / "satview_polish" / f"{ids[i]}_satView_polish.jpg",
                location=(float(utm[i, 0]), float(utm[i, 1])),
            )
            for i in indices
        ]
        self.pairs, self.skipped_missing = drop_missing(
            pairs,
            lambda p: (p.ground, p.aerial),
            dataset="CVACT",
            root=self.root,
            logger=logger,
            fix=f"Re-extract {SPLITS[split][2]}/ (streetview/ and satview_polish/) into this "
            f"root, or point root at a complete copy.",
        )
        self._positives: dict[float, list[np.ndarray]] = {}

    @property
    def locations(self) -> np.ndarray:
        """[N, 2] UTM (easting, northing) of the kept pairs, metres."""
        return np.asarray([p.location for p in self.pairs], dtype=np.float64).reshape(-1, 2)

    def positives_within(self, metres: float = 5.0) -> list[np.ndarray]:
        """For each query, the sorted gallery indices whose UTM lies within `metres`
        (inclusive) of the query's: the within-5 m protocol of CVACT_test. Always holds
        the query's own tile. Computed with a KD-tree (`scipy.spatial.cKDTree`)."""
        key = float(metres)
        if key not in self._positives:
            from scipy.spatial import cKDTree

            locations = self.locations
            if len(locations) == 0:
                return []
            tree = cKDTree(locations)
            hits = tree.query_ball_point(locations, r=key)
            self._positives[key] = [np.asarray(sorted(h), dtype=np.int64) for h in hits]
        return self._positives[key]

    def evaluation(self) -> EvalSplit:
        """One-to-one ground truth, with UTM locations for the within-5 m protocol."""
        return super().evaluation()

    def split_files(self) -> list[Path]:
        return [self.mat_file]

    def files_by_view(self) -> dict[str, list[Path]]:
        return {
            "ground": [p.ground for p in self.pairs],
            "aerial": [p.aerial for p in self.pairs],
        }

    def options(self) -> dict[str, Any]:
        return {
            "middle_crop": self.middle_crop,
            "ground_crop_rows": list(self.ground_crop_rows) if self.ground_crop_rows else None,
            "protocol": self.protocol,
        }
