"""Writers of tiny datasets in the exact on-disk formats of CVUSA, CVACT and VIGOR.

Used by tests/test_datasets.py. Images are small solid-colour files unless a test asks
for the real sizes; each distinct (size, format) is encoded once and copied, so a few
hundred files cost milliseconds.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np

SMALL_GROUND = (32, 8)  # PIL (width, height)
SMALL_AERIAL = (16, 16)
REAL_SIZES = {
    "cvusa": {"ground": (1232, 224), "aerial": (750, 750)},
    "cvact": {"ground": (1664, 832), "aerial": (1200, 1200)},
    "vigor": {"ground": (2048, 1024), "aerial": (640, 640)},
}


@lru_cache(maxsize=32)
def image_bytes(size: tuple[int, int], fmt: str = "JPEG", color: tuple = (90, 140, 60)) -> bytes:
    """An encoded solid-colour image of PIL size (width, height)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.write_bytes(image_bytes(tuple(size), fmt))
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to `keep` of its bytes (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


# ---- CVUSA ----------------------------------------------------------------------------


def cvusa_id(i: int) -> str:
    return f"{i:07d}"


def make_cvusa(
    root: Path,
    train_ids: list[int] = (1, 2, 3, 4, 5, 6),
    test_ids: list[int] = (7, 8, 9, 10),
    real_sizes: bool = False,
    locations: bool = True,
) -> Path:
    """splits/train-19zl.csv + val-19zl.csv, bingmap/19/, streetview/panos/ (and
    streetview/annotations/), split_locations/all.csv with row = id - 1 and ground
    location (lat, lon) = (10 + id, -100 - id), sat location = ground + 0.5."""
    sizes = REAL_SIZES["cvusa"] if real_sizes else {"ground": SMALL_GROUND, "aerial": SMALL_AERIAL}
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name, ids in (("train-19zl.csv", train_ids), ("val-19zl.csv", test_ids)):
        lines = []
        for i in ids:
            pid = cvusa_id(i)
            lines.append(
                f"bingmap/19/{pid}.jpg,streetview/panos/{pid}.jpg,streetview/annotations/{pid}.png"
            )
            write_image(root / "bingmap" / "19" / f"{pid}.jpg", sizes["aerial"])
            write_image(root / "streetview" / "panos" / f"{pid}.jpg", sizes["ground"])
        (root / "splits" / name).write_text("\n".join(lines) + "\n")
    if locations:
        n = max([*train_ids, *test_ids])
        rows = [f"{10 + i + 0.5},{-100 - i + 0.5},{10 + i},{-100 - i}" for i in range(1, n + 1)]
        (root / "split_locations").mkdir(exist_ok=True)
        (root / "split_locations" / "all.csv").write_text("\n".join(rows) + "\n")
    return root


# ---- CVACT ----------------------------------------------------------------------------


def cvact_pano_id(i: int) -> str:
    """A 22-character panoId like the real ones (e.g. 1LqOHPdTiBbRucz-jFOSbQ)."""
    return f"pano{i:04d}-AbCdEfGhIjKl"[:22].ljust(22, "x")


def make_cvact(
    root: Path,
    n: int = 12,
    train: list[int] = (1, 2, 3, 4, 5, 6),
    val: list[int] = (7, 8),
    test: list[int] = (7, 8, 9, 10, 11, 12),
    utm: np.ndarray | None = None,
    cell_ids: bool = False,
    write_images: bool = True,
) -> Path:
    """ACT_data.mat (MATLAB structs, 1-based indices) + ANU_data_small / ANU_data_test.

    Default utm: entry i (1-based) at (1000 * i, 2000 * i) metres. `cell_ids` stores
    panoIds as a MATLAB cell array instead of a char matrix.
    """
    from scipy.io import savemat

    ids = [cvact_pano_id(i) for i in range(1, n + 1)]
    if utm is None:
        utm = np.asarray([[1000.0 * i, 2000.0 * i] for i in range(1, n + 1)])
    if cell_ids:
        pano_ids = np.empty((n, 1), dtype=object)
        for k, pid in enumerate(ids):
            pano_ids[k, 0] = pid
    else:
        pano_ids = np.asarray(ids)  # saved as an n x 22 char matrix, as in the real file

    def column(one_based: list[int]) -> np.ndarray:
        return np.asarray(one_based, dtype=np.float64).reshape(-1, 1)  # MATLAB doubles

    root.mkdir(parents=True, exist_ok=True)
    savemat(
        root / "ACT_data.mat",
        {
            "panoIds": pano_ids,
            "utm": np.asarray(utm, dtype=np.float64),
            "trainSet": {"trainInd": column(train)},
            "valSet": {"valInd": column(val)},
            "valSetAll": {"valInd": column(test)},
        },
    )
    if write_images:
        for folder, indices in (("ANU_data_small", [*train, *val]), ("ANU_data_test", test)):
            for i in indices:
                pid = ids[i - 1]
                write_image(root / folder / "streetview" / f"{pid}_grdView.jpg", SMALL_GROUND)
                write_image(
                    root / folder / "satview_polish" / f"{pid}_satView_polish.jpg", SMALL_AERIAL
                )
    return root


# ---- VIGOR ----------------------------------------------------------------------------

CITY_BASE = {
    "Chicago": (41.87, -87.68),
    "NewYork": (40.73, -73.99),
    "SanFrancisco": (37.77, -122.41),
    "Seattle": (47.61, -122.33),
}


def vigor_tiles(city: str, n: int = 6) -> list[str]:
    lat, lon = CITY_BASE[city]
    return [f"satellite_{lat + 0.001 * k:.10f}_{lon:.10f}.png" for k in range(n)]


def vigor_pano(city: str, k: int) -> str:
    lat, lon = CITY_BASE[city]
    return f"{city[:3]}pano{k:02d}XYZ,{lat + 0.0005 * k:.6f},{lon:.6f},.jpg"


def vigor_line(city: str, k: int, tiles: list[str], shift: float = 0.0) -> str:
    """Label line k: positive tile k % n, semi-positives the next three tiles; deltas
    positive (10k + shift, -(5k) - shift), semi j: (100j, 200j)."""
    n = len(tiles)
    fields = [vigor_pano(city, k)]
    fields += [tiles[k % n], f"{10.0 * k + shift}", f"{-5.0 * k - shift}"]
    for j in (1, 2, 3):
        fields += [tiles[(k + j) % n], f"{100.0 * j}", f"{200.0 * j}"]
    return " ".join(fields)


def vigor_dirs(root: Path, city: str, layout: str) -> tuple[Path, Path, Path]:
    """(panorama folder, satellite folder, splits folder) of a city."""
    if layout == "official":
        return root / city / "panorama", root / city / "satellite", root / "splits" / city
    low = city.lower()  # the reorganised copies use lowercase city folders
    return root / "ground" / low, root / "satellite" / low, root / "splits" / low


def make_vigor(
    root: Path,
    layout: str = "official",
    cities: tuple[str, ...] = ("Chicago", "NewYork", "SanFrancisco", "Seattle"),
    n_tiles: int = 6,
    n_train: int = 3,
    n_test: int = 2,
    corrected_folder: str = "splits",
) -> Path:
    """Per city: n_tiles tiles (satellite_list.txt), label files
    same_area_balanced_train.txt (panos 0..n_train-1), same_area_balanced_test.txt
    (panos n_train..n_train+n_test-1), pano_label_balanced.txt (all of them), and the
    `__corrected` variants of the three (positive deltas shifted by +1.0) in
    `<root>/<corrected_folder>/<City>/`."""
    for city in cities:
        pano_dir, sat_dir, split_dir = vigor_dirs(root, city, layout)
        tiles = vigor_tiles(city, n_tiles)
        for tile in tiles:
            write_image(sat_dir / tile, SMALL_AERIAL)
        split_dir.mkdir(parents=True, exist_ok=True)
        (split_dir / "satellite_list.txt").write_text("\n".join(tiles) + "\n")
        train = list(range(n_train))
        test = list(range(n_train, n_train + n_test))
        for k in train + test:
            write_image(pano_dir / vigor_pano(city, k), SMALL_GROUND)
        corrected_dir = split_dir.parent.parent / corrected_folder / split_dir.name
        corrected_dir.mkdir(parents=True, exist_ok=True)
        if corrected_folder != "splits":
            (corrected_dir / "satellite_list.txt").write_text("\n".join(tiles) + "\n")
        for name, ks in (
            ("same_area_balanced_train", train),
            ("same_area_balanced_test", test),
            ("pano_label_balanced", train + test),
        ):
            (split_dir / f"{name}.txt").write_text(
                "\n".join(vigor_line(city, k, tiles) for k in ks) + "\n"
            )
            (corrected_dir / f"{name}__corrected.txt").write_text(
                "\n".join(vigor_line(city, k, tiles, shift=1.0) for k in ks) + "\n"
            )
    return root
