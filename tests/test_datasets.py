"""The CVUSA, CVACT and VIGOR loaders on fixtures written in their exact on-disk formats,
the shared checks, and the `benchmark data` commands.

Real files from ../shared/real-samples are read when that folder exists (it is never
copied into the repository); those tests are skipped, with a reason, without it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import (
    SMALL_AERIAL,
    SMALL_GROUND,
    cvact_pano_id,
    make_cvact,
    make_cvusa,
    make_vigor,
    truncate,
    vigor_pano,
    vigor_tiles,
    write_image,
)

from gengeo_bench import registry
from gengeo_bench.datasets import checks
from gengeo_bench.datasets.cvact import CVACT
from gengeo_bench.datasets.cvusa import CVUSA, read_split_csv
from gengeo_bench.datasets.vigor import VIGOR, read_label_file, read_satellite_list
from gengeo_bench.errors import ConfigError, DataError

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-samples"
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real samples not present at {REAL} (optional test material)"
)
SMALL = {"ground": (SMALL_GROUND[1], SMALL_GROUND[0]), "aerial": (SMALL_AERIAL[1], SMALL_AERIAL[0])}


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the `benchmark` console entry point (errors -> exit 2) and capture its output."""
    from gengeo_bench import cli, data_cli

    for console in (cli.console, cli.err_console, data_cli.console, data_cli.err_console):
        monkeypatch.setattr(console, "_width", 4000)  # no wrapping inside paths
    monkeypatch.setattr(sys, "argv", ["benchmark", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- CVUSA ----------------------------------------------------------------------------


def test_cvusa_counts_ids_paths_locations(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    train = CVUSA(str(root), split="train")
    test = CVUSA(str(root), split="test")
    assert len(train) == 6 and len(test) == 4
    assert [p.id for p in test.pairs] == ["0000007", "0000008", "0000009", "0000010"]
    first = test.pairs[0]
    assert first.aerial == root / "bingmap" / "19" / "0000007.jpg"
    assert first.ground == root / "streetview" / "panos" / "0000007.jpg"
    # all.csv row id - 1, columns sat_lat, sat_lon, ground_lat, ground_lon: ground kept
    assert first.location == (17.0, -107.0)
    ev = test.evaluation()
    assert ev.gt.tolist() == [0, 1, 2, 3]
    assert ev.query_ids == ev.gallery_ids
    assert ev.query_locations.shape == (4, 2) and ev.query_locations[3].tolist() == [20.0, -110.0]
    assert ev.semi_positives is None


def test_cvusa_without_locations_and_explicit_split_file(tmp_path):
    root = make_cvusa(tmp_path / "cvusa", locations=False)
    lines = (root / "splits" / "train-19zl.csv").read_text().splitlines()
    (root / "splits" / "mine.csv").write_text("\n".join(lines[2:4]) + "\n")
    ds = CVUSA(str(root), split="train", splits="mine.csv")
    assert [p.id for p in ds.pairs] == ["0000003", "0000004"]
    assert ds.pairs[0].location is None and ds.evaluation().query_locations is None
    assert ds.split_file == root / "splits" / "mine.csv"


def test_cvusa_through_registry(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    ds = registry.build("dataset", "cvusa", root=str(root), split="test")
    assert isinstance(ds, CVUSA) and len(ds) == 4
    with pytest.raises(ConfigError, match="split 'val' is not one of"):
        CVUSA(str(root), split="val")


def test_cvusa_missing_split_file_and_root(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    (root / "splits" / "val-19zl.csv").unlink()
    with pytest.raises(DataError) as err:
        CVUSA(str(root), split="test")
    message = str(err.value)
    assert f"{root / 'splits' / 'val-19zl.csv'} not found" in message
    assert "Found in" in message and "train-19zl.csv" in message and "bingmap/19/" in message
    with pytest.raises(DataError, match="does not exist"):
        CVUSA(str(tmp_path / "nowhere"), split="train")


def test_cvusa_malformed_line_names_file_and_line(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    path = root / "splits" / "train-19zl.csv"
    lines = path.read_text().splitlines()
    lines[2] = "bingmap/19/0000003.jpg;streetview/panos/0000003.jpg"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        CVUSA(str(root), split="train")
    assert f"{path}: line 3: expected 3 comma-separated fields" in str(err.value)


def test_cvusa_missing_file_skipped_with_warning_and_manifest(tmp_path, caplog):
    root = make_cvusa(tmp_path / "cvusa", train_ids=list(range(1, 11)), test_ids=[11])
    (root / "streetview" / "panos" / "0000004.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        ds = CVUSA(str(root), split="train")
    assert len(ds) == 9 and "0000004" not in [p.id for p in ds.pairs]
    assert "1 missing image file(s), skipping 1 pair(s)" in caplog.text
    assert "0000004.jpg" in caplog.text
    assert ds.manifest()["skipped_missing"] == ["streetview/panos/0000004.jpg"]
    assert "skipped_missing=1" in repr(ds)
    report = ds.check(sizes=SMALL)
    assert report.missing == [root / "streetview" / "panos" / "0000004.jpg"]
    assert checks.is_usable(report, ds.skipped_missing)


def test_cvusa_too_many_missing_is_an_error(tmp_path):
    root = make_cvusa(tmp_path / "cvusa", train_ids=list(range(1, 11)), test_ids=[11])
    for i in (2, 5, 7):
        (root / "bingmap" / "19" / f"000000{i}.jpg").unlink()
    with pytest.raises(DataError) as err:
        CVUSA(str(root), split="train")
    message = str(err.value)
    assert f"CVUSA at {root}: 3 of 20 image files" in message
    assert "bingmap/19/0000002.jpg" in message and "Re-extract" in message


def test_missing_tolerance_rule():
    assert checks.missing_tolerated(0, 5)
    assert checks.missing_tolerated(1, 20)  # always one, while something is left
    assert not checks.missing_tolerated(2, 20)  # > 1 %
    assert checks.missing_tolerated(10, 71_000)
    assert not checks.missing_tolerated(11, 71_000)  # > 10 files
    assert not checks.missing_tolerated(1, 1)


def test_cvusa_manifest_hash_tracks_split_file(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    before = CVUSA(str(root), split="train").manifest()
    assert before["pairs"] == 6 and before["split"] == "train" and before["dataset"] == "cvusa"
    assert before["options"] == {"splits": "19zl"}
    assert CVUSA(str(root), split="train").manifest()["content_hash"] == before["content_hash"]
    path = root / "splits" / "train-19zl.csv"
    path.write_text("\n".join(reversed(path.read_text().splitlines())) + "\n")
    after = CVUSA(str(root), split="train").manifest()
    assert after["pairs"] == 6 and after["content_hash"] != before["content_hash"]


def test_cvusa_repr(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    text = repr(CVUSA(str(root), split="test"))
    assert text == f"CVUSA(split='test', pairs=4, splits='19zl', root='{root}')"


def test_check_decode_catches_truncated_jpeg(tmp_path):
    root = make_cvusa(tmp_path / "cvusa")
    bad = root / "bingmap" / "19" / "0000008.jpg"
    from PIL import Image

    Image.effect_noise((64, 64), 60).convert("RGB").save(bad, quality=95)  # real entropy
    truncate(bad, 0.5)
    ds = CVUSA(str(root), split="test")
    quick = ds.check(sizes={"ground": SMALL["ground"], "aerial": (64, 64)}, size_check=False)
    assert quick.unreadable == []  # a header read does not see the truncation
    full = ds.check(decode=True, size_check=False)
    assert [p for p, _ in full.unreadable] == [bad]
    assert "truncated" in full.unreadable[0][1]
    assert full.counts["decoded"] == 8 and not full.ok
    assert any("truncated" in line for line in checks.summary_lines(full))


def test_check_sizes_against_registry_and_override(tmp_path):
    root = make_cvusa(tmp_path / "cvusa", train_ids=[1, 2], test_ids=[3, 4], real_sizes=True)
    ds = CVUSA(str(root), split="test")
    assert checks.expected_sizes("cvusa") == {"ground": (224, 1232), "aerial": (750, 750)}
    assert ds.check(decode=True).ok
    wrong = root / "streetview" / "panos" / "0000004.jpg"
    write_image(wrong, (1200, 224))
    report = ds.check()
    assert report.wrong_size == [(wrong, (224, 1232), (224, 1200))]
    assert not checks.is_usable(report)
    assert ds.check(size_check=False).ok
    small = CVUSA(str(make_cvusa(tmp_path / "small")), split="test")
    assert not small.check().ok  # tiny images are the wrong size for CVUSA...
    assert small.check(sizes=SMALL).ok  # ...unless the expected sizes are overridden


# ---- CVACT ----------------------------------------------------------------------------


def test_cvact_splits_one_based_indices_and_folders(tmp_path):
    root = make_cvact(
        tmp_path / "cvact", train=[1, 3, 5, 6], val=[2, 4], test=[7, 8, 9, 10, 11, 12]
    )
    train = CVACT(str(root), split="train")
    # 1-based trainInd [1, 3, 5, 6] -> panoIds[0], [2], [4], [5]
    assert [p.id for p in train.pairs] == [cvact_pano_id(i) for i in (1, 3, 5, 6)]
    assert len(cvact_pano_id(1)) == 22
    assert train.pairs[1].location == (3000.0, 6000.0)  # utm row 2 (0-based)
    assert train.pairs[0].ground == (
        root / "ANU_data_small" / "streetview" / f"{cvact_pano_id(1)}_grdView.jpg"
    )
    assert train.pairs[0].aerial == (
        root / "ANU_data_small" / "satview_polish" / f"{cvact_pano_id(1)}_satView_polish.jpg"
    )
    val = CVACT(str(root), split="val")
    assert [p.id for p in val.pairs] == [cvact_pano_id(2), cvact_pano_id(4)]
    test = CVACT(str(root), split="test")
    assert len(test) == 6 and test.pairs[0].ground.parts[-3] == "ANU_data_test"
    ev = test.evaluation()
    assert ev.gt.tolist() == list(range(6))
    assert ev.gallery_locations[0].tolist() == [7000.0, 14000.0]
    assert test.ground_crop_rows is None and test.protocol == "one_to_one"
    assert repr(test).startswith("CVACT(split='test', pairs=6, middle_crop=False")


def test_cvact_cell_array_pano_ids(tmp_path):
    root = make_cvact(tmp_path / "cvact", cell_ids=True)
    ds = CVACT(str(root), split="val")
    assert [p.id for p in ds.pairs] == [cvact_pano_id(7), cvact_pano_id(8)]


def test_cvact_middle_crop_recorded(tmp_path):
    root = make_cvact(tmp_path / "cvact")
    ds = registry.build("dataset", "cvact", root=str(root), split="val", middle_crop=True)
    assert ds.ground_crop_rows == (208, 624)
    assert ds.ground_crop_fraction == (0.25, 0.75)
    manifest = ds.manifest()
    assert manifest["options"]["middle_crop"] is True
    assert manifest["options"]["ground_crop_rows"] == [208, 624]


def test_cvact_within_5m_positives_kdtree(tmp_path):
    utm = np.zeros((8, 2))
    utm[:6] = [[0, 0], [3, 0], [0, 4.9], [5, 0], [10, 0], [100, 100]]
    utm[6:] = [[500, 500], [600, 600]]
    root = make_cvact(
        tmp_path / "cvact", n=8, train=[7, 8], val=[7], test=[1, 2, 3, 4, 5, 6], utm=utm
    )
    ds = CVACT(str(root), split="test", protocol="within_5m")
    ev = ds.evaluation()
    assert ev.query_locations.tolist() == utm[:6].tolist()
    positives = ds.positives_within()
    expected = [[0, 1, 2, 3], [0, 1, 3], [0, 2], [0, 1, 3, 4], [3, 4], [5]]
    assert [p.tolist() for p in positives] == expected  # 5.0 m inclusive
    assert all(p.dtype == np.int64 for p in positives)
    assert [p.tolist() for p in ds.positives_within(metres=1.0)] == [[i] for i in range(6)]
    assert ds.manifest()["options"]["protocol"] == "within_5m"
    with pytest.raises(ConfigError, match="protocol 'within5'"):
        CVACT(str(root), split="test", protocol="within5")


def test_cvact_one_missing_training_pair_is_skipped(tmp_path, caplog):
    root = make_cvact(tmp_path / "cvact", n=24, train=list(range(1, 21)), val=[21], test=[22])
    gone = root / "ANU_data_small" / "streetview" / f"{cvact_pano_id(9)}_grdView.jpg"
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="gengeo_bench.datasets.cvact"):
        ds = CVACT(str(root), split="train")
    assert len(ds) == 19 and cvact_pano_id(9) not in [p.id for p in ds.pairs]
    assert f"{cvact_pano_id(9)}_grdView.jpg" in caplog.text
    assert ds.manifest()["skipped_missing"] == [
        f"ANU_data_small/streetview/{cvact_pano_id(9)}_grdView.jpg"
    ]


def test_cvact_errors(tmp_path):
    root = make_cvact(tmp_path / "cvact")
    for name in ("ANU_data_test/streetview", "ANU_data_test/satview_polish"):
        shutil.rmtree(root / name)
    with pytest.raises(DataError) as err:
        CVACT(str(root), split="test")
    assert "12 of 12 image files" in str(err.value) and str(root) in str(err.value)
    (tmp_path / "cvact-empty").mkdir()
    with pytest.raises(DataError, match=r"cvact-empty/ACT_data\.mat not found"):
        CVACT(str(tmp_path / "cvact-empty"), split="train")
    bad = make_cvact(tmp_path / "bad", n=4, train=[1, 5], val=[1], test=[2], write_images=False)
    with pytest.raises(DataError, match=r"trainSet\.trainInd holds 1 index\(es\) outside 1\.\.4"):
        CVACT(str(bad), split="train")
    zero = make_cvact(tmp_path / "zero", n=4, train=[0, 1], val=[1], test=[2], write_images=False)
    with pytest.raises(DataError, match="1-based"):
        CVACT(str(zero), split="train")


# ---- VIGOR ----------------------------------------------------------------------------


def test_vigor_same_area_test_official_layout(tmp_path):
    root = make_vigor(tmp_path / "vigor")
    ds = VIGOR(str(root), split="test")
    assert ds.layout == "official" and ds.cities == [
        "Chicago",
        "NewYork",
        "SanFrancisco",
        "Seattle",
    ]
    assert len(ds) == 8  # 2 test panoramas per city
    ev = ds.evaluation()
    assert len(ev.gallery) == 24  # every tile of the four cities
    assert ev.gallery[0] == root / "Chicago" / "satellite" / vigor_tiles("Chicago")[0]
    assert ev.gallery[6] == root / "NewYork" / "satellite" / vigor_tiles("NewYork")[0]
    # query 0: Chicago pano 3 -> positive tile 3, semi-positives tiles 4, 5, 0
    assert ev.query_ids[0] == "Chipano03XYZ"
    assert ev.queries[0] == root / "Chicago" / "panorama" / vigor_pano("Chicago", 3)
    assert ev.gt.tolist() == [3, 4, 9, 10, 15, 16, 21, 22]
    assert ev.semi_positives.shape == (8, 3)
    assert ev.semi_positives[0].tolist() == [4, 5, 0]
    assert ev.semi_positives[3].tolist() == [11, 6, 7]  # NewYork pano 4: tiles 5, 0, 1
    # positive deltas (d0, d1) = (10k, -5k): (row, col) = (320 + d0, 320 - d1)
    assert ds.deltas[0].tolist() == [30.0, -15.0]
    assert ev.offsets[0].tolist() == [350.0, 335.0]
    assert ev.offsets[1].tolist() == [360.0, 340.0]
    assert ds.pairs[0].offset == (350.0, 335.0)
    assert ds.pairs[0].aerial == ev.gallery[3]
    assert ev.query_locations[0].tolist() == [41.87 + 0.0015, -87.68]
    assert np.allclose(ev.gallery_locations[1], [41.871, -87.68])


def test_vigor_reorganised_lowercase_layout_matches_official(tmp_path):
    official = VIGOR(str(make_vigor(tmp_path / "a")), split="test")
    reorganised = VIGOR(str(make_vigor(tmp_path / "b", layout="reorganised")), split="test")
    assert reorganised.layout == "reorganised"
    a, b = official.evaluation(), reorganised.evaluation()
    assert a.query_ids == b.query_ids and a.gallery_ids == b.gallery_ids
    assert np.array_equal(a.gt, b.gt) and np.array_equal(a.semi_positives, b.semi_positives)
    assert np.array_equal(a.offsets, b.offsets)
    assert b.queries[0] == tmp_path / "b" / "ground" / "chicago" / vigor_pano("Chicago", 3)
    assert b.gallery[0] == tmp_path / "b" / "satellite" / "chicago" / vigor_tiles("Chicago")[0]


def test_vigor_corrected_labels(tmp_path):
    root = make_vigor(tmp_path / "vigor", cities=("Chicago",))
    ds = VIGOR(str(root), split="test", corrected=True, cities=["chicago"])
    assert ds.label_files == [
        root / "splits" / "Chicago" / "same_area_balanced_test__corrected.txt"
    ]
    assert ds.deltas[0].tolist() == [31.0, -16.0]  # corrected file: shifted by 1
    assert ds.evaluation().offsets[0].tolist() == [351.0, 336.0]
    other = make_vigor(tmp_path / "v2", cities=("Chicago",), corrected_folder="splits__corrected")
    ds2 = VIGOR(str(other), split="train", corrected=True, cities=["Chicago"])
    assert ds2.label_files[0].parts[-3:] == (
        "splits__corrected",
        "Chicago",
        "same_area_balanced_train__corrected.txt",
    )
    assert len(ds2) == 3 and ds2.deltas[1].tolist() == [11.0, -6.0]


def test_vigor_cross_area(tmp_path):
    root = make_vigor(tmp_path / "vigor")
    test = registry.build("dataset", "vigor", root=str(root), split="test", mode="cross_area")
    assert test.cities == ["Chicago", "SanFrancisco"]
    ev = test.evaluation()
    assert len(test) == 10 and len(ev.gallery) == 12  # pano_label_balanced: 5 per city
    assert [p.parts[-3] for p in ev.gallery[::6]] == ["Chicago", "SanFrancisco"]
    assert ev.gt.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    train = VIGOR(str(root), split="train", mode="cross_area")
    assert train.cities == ["NewYork", "Seattle"] and len(train) == 10
    assert all("pano_label_balanced.txt" == p.name for p in train.label_files)
    assert "mode='cross_area'" in repr(train) and "queries=10, gallery=12" in repr(train)
    with pytest.raises(ConfigError, match="not part of the cross_area train split"):
        VIGOR(str(root), split="train", mode="cross_area", cities=["Chicago"])
    with pytest.raises(ConfigError, match="unknown city 'Paris'"):
        VIGOR(str(root), split="train", cities=["Paris"])


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda f: f[:12], "expected 13 space-separated fields"),
        (lambda f: [f[0], f[1], "abc", *f[3:]], "should be the numbers d0 d1 of triple 1"),
        (lambda f: ["no-commas.jpg", *f[1:]], "'<panoid>,<lat>,<lon>,.jpg'"),
        (lambda f: [*f[:4], "satellite_1_2.jpg", *f[5:]], "should be a tile file name"),
    ],
)
def test_vigor_malformed_line(tmp_path, mutate, expected):
    root = make_vigor(tmp_path / "vigor", cities=("Chicago",))
    path = root / "splits" / "Chicago" / "same_area_balanced_train.txt"
    lines = path.read_text().splitlines()
    lines[1] = " ".join(mutate(lines[1].split()))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        VIGOR(str(root), split="train", cities=["Chicago"])
    assert f"{path}: line 2: " in str(err.value) and expected in str(err.value)


def test_vigor_tile_not_in_satellite_list(tmp_path):
    root = make_vigor(tmp_path / "vigor", cities=("Chicago",))
    sat_list = root / "splits" / "Chicago" / "satellite_list.txt"
    sat_list.write_text("\n".join(vigor_tiles("Chicago")[:5]) + "\n")
    with pytest.raises(DataError, match=r"line 1: tile satellite_\S+ is not listed in"):
        VIGOR(str(root), split="test", cities=["Chicago"])


def test_vigor_missing_split_file_and_layout(tmp_path):
    root = make_vigor(tmp_path / "vigor", cities=("Chicago", "SanFrancisco"))
    path = root / "splits" / "SanFrancisco" / "pano_label_balanced.txt"
    path.unlink()
    with pytest.raises(DataError) as err:
        VIGOR(str(root), split="test", mode="cross_area")
    assert f"expected {path}" in str(err.value) and "satellite_list.txt" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither <City>/panorama/"):
        VIGOR(str(tmp_path / "empty"), split="test")


def test_vigor_missing_semi_positive_tile(tmp_path, caplog):
    root = make_vigor(tmp_path / "vigor", cities=("Chicago",), n_tiles=60, n_train=3, n_test=40)
    (root / "Chicago" / "satellite" / vigor_tiles("Chicago", 60)[5]).unlink()
    with caplog.at_level(logging.WARNING):
        ds = VIGOR(str(root), split="test", cities=["Chicago"])
    ev = ds.evaluation()
    # Tile 5 is gone: the query whose positive it is (pano 5) is skipped; the gallery
    # shrinks by one; semi-positives pointing at it become -1.
    assert len(ds) == 39 and "Chipano05XYZ" not in ev.query_ids
    assert len(ev.gallery) == 59
    assert ev.semi_positives[0].tolist() == [4, -1, 5]  # pano 3: tiles 4, 5 (gone), 6
    assert ev.gt[0] == 3 and ev.gt[2] == 5  # pano 6 -> tile 6, now at index 5
    assert ds.manifest()["skipped_missing"] == [
        f"Chicago/satellite/{vigor_tiles('Chicago', 60)[5]}"
    ]
    assert "skipping 1 pair(s)" in caplog.text


# ---- the `benchmark data` commands ------------------------------------------------------


def test_cli_check_usable_exit_0(tmp_path, monkeypatch, capsys):
    root = make_cvusa(tmp_path / "cvusa", train_ids=[1], test_ids=[2, 3], real_sizes=True)
    code, out, _ = run_cli(
        ["data", "check", "--dataset", "cvusa", "--root", str(root), "--split", "test"],
        monkeypatch,
        capsys,
    )
    assert code == 0
    assert "usable: 2 pairs" in out and "content hash:" in out
    assert "│ pairs " in out and "│     2 │" in out


def test_cli_check_missing_files_exit_2(tmp_path, monkeypatch, capsys):
    root = make_cvusa(tmp_path / "cvusa")
    for i in (7, 8):
        (root / "streetview" / "panos" / f"000000{i}.jpg").unlink()
    code, _, err = run_cli(
        ["data", "check", "-d", "cvusa", "-r", str(root), "-s", "test"], monkeypatch, capsys
    )
    assert code == 2
    assert f"CVUSA at {root}: 2 of 8 image files referenced by the split are missing" in err
    assert "streetview/panos/0000007.jpg" in err and "Re-extract" in err


def test_cli_check_without_split_checks_every_split(tmp_path, monkeypatch, capsys):
    # A tolerated gap (1 of 8 test files) that the training split never shows.
    root = make_cvusa(tmp_path / "cvusa", real_sizes=True)
    (root / "bingmap" / "19" / "0000009.jpg").unlink()
    code, out, err = run_cli(["data", "check", "-d", "cvusa", "-r", str(root)], monkeypatch, capsys)
    assert code == 2
    assert "cvusa split train" in out and "cvusa split test" in out
    assert f"cvusa at {root}: split test is not usable as it is" in err
    assert "bingmap/19/0000009.jpg" in err and "comparable with published numbers" in err
    assert "--allow-missing-eval" in err and "split train" not in err
    code, out, err = run_cli(
        ["data", "check", "-d", "cvusa", "-r", str(root), "--allow-missing-eval"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "1 missing file(s), their pairs skipped" in out and "bingmap/19/0000009.jpg" in out
    assert "not comparable with published numbers" in out
    assert "usable: train 6 pairs, test 3 pairs." in out


def test_cli_check_missing_training_file_only_is_a_warning(tmp_path, monkeypatch, capsys):
    root = make_cvusa(tmp_path / "cvusa", real_sizes=True)
    (root / "streetview" / "panos" / "0000004.jpg").unlink()
    code, out, err = run_cli(["data", "check", "-d", "cvusa", "-r", str(root)], monkeypatch, capsys)
    assert code == 0, err
    assert "cvusa split test" in out
    assert "warning: 1 missing file(s), their pairs skipped" in out
    assert "streetview/panos/0000004.jpg" in out
    assert "usable: train 5 pairs, test 4 pairs." in out


def test_cli_check_one_evaluation_split_with_a_missing_file(tmp_path, monkeypatch, capsys):
    root = make_cvusa(tmp_path / "cvusa", real_sizes=True)
    (root / "streetview" / "panos" / "0000008.jpg").unlink()
    args = ["data", "check", "-d", "cvusa", "-r", str(root), "-s", "test"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "streetview/panos/0000008.jpg" in err and "comparable" in err
    code, out, _ = run_cli([*args, "--allow-missing-eval"], monkeypatch, capsys)
    assert code == 0 and "usable: 3 pairs." in out
    code, out, _ = run_cli([*args[:-1], "train"], monkeypatch, capsys)
    assert code == 0 and "usable: 6 pairs." in out


def test_cli_check_every_cvact_split_and_load_errors_per_split(tmp_path, monkeypatch, capsys):
    root = make_cvact(tmp_path / "cvact")
    args = ["data", "check", "-d", "cvact", "-r", str(root), "--no-size-check"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert all(f"cvact split {s} at" in out for s in ("train", "val", "test"))
    code, _, err = run_cli(["data", "check", "-d", "cvusa", "-r", str(tmp_path / "x")],
                           monkeypatch, capsys)
    # One failure shared by every split is reported once, naming the splits.
    assert code == 2 and err.count("does not exist") == 1 and "splits train, test:" in err


def test_cli_check_decode_truncated_exit_2(tmp_path, monkeypatch, capsys):
    root = make_cvusa(tmp_path / "cvusa")
    bad = root / "streetview" / "panos" / "0000009.jpg"
    from PIL import Image

    Image.effect_noise((256, 64), 60).convert("RGB").save(bad, quality=95)
    truncate(bad, 0.6)  # the header survives, the image data does not
    args = ["data", "check", "-d", "cvusa", "-r", str(root), "-s", "test", "--no-size-check"]
    code, out, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "usable: 4 pairs" in out
    code, out, err = run_cli([*args, "--decode"], monkeypatch, capsys)
    assert code == 2
    assert "1 unreadable or truncated image(s): streetview/panos/0000009.jpg" in out
    assert "is not usable as it is" in err and "Re-extract or re-download" in err


def test_cli_check_wrong_size_and_errors(tmp_path, monkeypatch, capsys):
    root = make_cvusa(tmp_path / "cvusa")
    code, out, err = run_cli(
        ["data", "check", "-d", "cvusa", "-r", str(root), "-s", "test"], monkeypatch, capsys
    )
    assert code == 2 and "image(s) of the wrong size" in out and "--no-size-check" in err
    code, _, err = run_cli(
        ["data", "check", "-d", "cvusa", "-r", str(tmp_path / "x")], monkeypatch, capsys
    )
    assert code == 2 and f"CVUSA root {tmp_path / 'x'} does not exist" in err
    code, _, err = run_cli(["data", "check", "-d", "cvusaa", "-r", str(root)], monkeypatch, capsys)
    assert code == 2 and "Did you mean 'cvusa'?" in err
    code, _, err = run_cli(
        ["data", "check", "-d", "cvusa", "-r", str(root), "-o", "splits"], monkeypatch, capsys
    )
    assert code == 2 and "expected key=value" in err


def test_cli_check_vigor_options(tmp_path, monkeypatch, capsys):
    root = make_vigor(tmp_path / "vigor")
    args = [
        "data",
        "check",
        "-d",
        "vigor",
        "-r",
        str(root),
        "-s",
        "test",
        "--no-size-check",
        "-o",
        "mode=cross_area",
        "-o",
        "cities=[chicago]",
        "-o",
        "corrected=true",
    ]
    code, out, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0, out
    assert "usable: 5 pairs" in out and "cities=['Chicago']" in out and "corrected=True" in out


def test_cli_show_writes_png(tmp_path, monkeypatch, capsys):
    root = make_vigor(tmp_path / "vigor", cities=("Seattle",))
    out_png = tmp_path / "figs" / "pairs.png"
    code, out, _ = run_cli(
        [
            "data",
            "show",
            "-d",
            "vigor",
            "-r",
            str(root),
            "-s",
            "train",
            "-o",
            "cities=Seattle",
            "--out",
            str(out_png),
            "--n",
            "2",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0 and f"wrote {out_png}" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_synth_calls_generate_lazily(tmp_path, monkeypatch, capsys):
    calls = []

    def generate(out, region, pairs, seed, layout="cvusa"):
        calls.append((out, region, pairs, seed, layout))
        return out

    fake = types.ModuleType("gengeo_bench.datasets.synthetic")
    fake.generate = generate
    monkeypatch.setitem(sys.modules, "gengeo_bench.datasets.synthetic", fake)
    code, out, _ = run_cli(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--region",
            "alpine",
            "--pairs",
            "7",
            "--seed",
            "3",
            "--layout",
            "vigor",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0 and calls == [(tmp_path / "s", "alpine", 7, 3, "vigor")]
    assert "wrote 7 vigor-layout pairs" in out


def test_cli_help_texts(monkeypatch, capsys):
    for command, words in (
        ([], "check"),
        (["check"], "--allow-missing-eval"),
        (["show"], "ground image above its aerial tile"),
        (["synth"], "--layout"),
    ):
        code, out, _ = run_cli(["data", *command, "--help"], monkeypatch, capsys)
        assert code == 0 and words in out


# ---- real samples (../shared/real-samples; never copied into the repository) -----------


@needs_real
def test_real_cvusa_check_reports_5_pairs(monkeypatch, capsys):
    root = REAL / "cvusa"
    code, out, _ = run_cli(
        ["data", "check", "-d", "cvusa", "-r", str(root), "-s", "test"], monkeypatch, capsys
    )
    assert code == 0 and "usable: 5 pairs" in out
    ds = CVUSA(str(root), split="test")
    assert [p.id for p in ds.pairs] == [f"000000{i}" for i in range(1, 6)]
    assert ds.check(decode=True).ok  # real images at the registry's sizes


@needs_real
def test_real_cvusa_split_files_parse():
    train = read_split_csv(REAL / "cvusa-splits" / "train-19zl.csv")
    test = read_split_csv(REAL / "cvusa-splits" / "val-19zl.csv")
    assert (len(train), len(test)) == (34_769, 8_841)  # the de-duplicated splits
    assert train[0] == ("0041073", "bingmap/19/0041073.jpg", "streetview/panos/0041073.jpg")
    assert not {r[0] for r in train} & {r[0] for r in test}


@needs_real
def test_real_vigor_chicago_label_files_parse():
    folder = REAL / "vigor-splits" / "Chicago"
    labels = read_label_file(folder / "same_area_balanced_test__corrected.txt")
    tiles = set(read_satellite_list(folder / "satellite_list.txt"))
    assert len(labels) == 12_739 and len(tiles) == 22_308
    assert all(t in tiles for label in labels for t in label.tiles)


@needs_real
def test_real_vigor_chicago_through_loader(tmp_path):
    """The real Chicago corrected test labels and satellite list, in a VIGOR layout whose
    images this test generates. For speed the label file copy is truncated to its first
    50 lines and the satellite list to the tiles those lines reference plus 20 others."""
    folder = REAL / "vigor-splits" / "Chicago"
    lines = (folder / "same_area_balanced_test__corrected.txt").read_text().splitlines()[:50]
    all_tiles = read_satellite_list(folder / "satellite_list.txt")
    used = {f for line in lines for f in line.split()[1::3]}
    others = [t for t in all_tiles if t not in used][:20]
    kept_tiles = [t for t in all_tiles if t in used] + others
    root = tmp_path / "VIGOR"
    (root / "splits" / "Chicago").mkdir(parents=True)
    (root / "splits" / "Chicago" / "same_area_balanced_test__corrected.txt").write_text(
        "\n".join(lines) + "\n"
    )
    (root / "splits" / "Chicago" / "satellite_list.txt").write_text("\n".join(kept_tiles) + "\n")
    for tile in kept_tiles:
        write_image(root / "Chicago" / "satellite" / tile, SMALL_AERIAL)
    for line in lines:
        write_image(root / "Chicago" / "panorama" / line.split()[0], SMALL_GROUND)

    ds = VIGOR(str(root), split="test", corrected=True, cities=["Chicago"])
    ev = ds.evaluation()
    assert len(ds) == 50 and len(ev.gallery) == len(kept_tiles) == len(used) + 20
    assert ev.query_ids[0] == "L-1poX8YZAmBZVLMqBu-4w"
    assert ev.gallery[ev.gt[0]].name == "satellite_41.877971796211014_-87.68943505304125.png"
    assert ds.deltas[0].tolist() == [23.0, -29.0]
    assert ev.offsets[0].tolist() == [343.0, 349.0]  # (320 + 23, 320 + 29)
    assert [ev.gallery[i].name for i in ev.semi_positives[0]] == [
        "satellite_41.877971796211014_-87.68899446364951.png",
        "satellite_41.877643723758375_-87.68943505304125.png",
        "satellite_41.877643723758375_-87.68899446364951.png",
    ]
    assert ev.query_locations[0].tolist() == [41.877949, -87.689396]
    assert (ev.semi_positives >= 0).all() and (ev.gt >= 0).all()
    assert ds.check(sizes=SMALL).ok
