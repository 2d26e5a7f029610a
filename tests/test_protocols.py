"""Robustness protocols and the evaluation ImageDataset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from gengeo_bench.errors import ConfigError
from gengeo_bench.imagedata import ImageDataset, collate, coverage_report
from gengeo_bench.protocols import Protocol, parse_protocols, shift_rotate
from gengeo_bench.transforms import Preprocess

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, name",
    [
        ("none", "none"),
        (None, "none"),
        ("fov:90", "fov90"),
        ("FoV:70", "fov70"),
        ("fov:90:known", "fov90_known"),
        ("fov:180:seed=3", "fov180_seed3"),
        ("misalign:shift=20,rot=10", "misalign_s20_r10"),
        ("misalign:rot=5", "misalign_s0_r5"),
        ("misalign:shift=12px", "misalign_s12px_r0"),
        ("misalign:shift=2.5,rot=0,seed=1", "misalign_s2.5_r0_seed1"),
        ({"type": "fov", "fov": 90}, "fov90"),
        ({"type": "fov", "fov": 90, "known": True}, "fov90_known"),
        ({"type": "misalign", "shift": 20, "rot": 10}, "misalign_s20_r10"),
        ({"type": "misalign", "shift": 12, "unit": "px"}, "misalign_s12px_r0"),
        ({"type": "none"}, "none"),
    ],
)
def test_protocol_names_parse(spec, name):
    protocol = Protocol.parse(spec)
    assert protocol.name == name
    assert Protocol.parse(protocol.describe()) == protocol  # describe() round-trips
    assert protocol.describe()["name"] == name


@pytest.mark.parametrize(
    "spec",
    ["fov", "fov:abc", "fov:90:unknown", "rotate:90", "misalign", "misalign:shift",
     "misalign:zoom=2", "none:1", {"type": "fov"}, {"type": "blur", "sigma": 2},
     {"type": "fov", "fov": 90, "zoom": 1}, 42],
)
def test_unknown_protocols_list_accepted_forms(spec):
    with pytest.raises(ConfigError) as info:
        Protocol.parse(spec)
    message = str(info.value)
    for form in ("'none'", "fov:<degrees>", "fov:<degrees>:known", "misalign:shift="):
        assert form in message


@pytest.mark.parametrize(
    "spec, problem",
    [("fov:0", "field of view"), ("fov:400", "field of view"),
     ("misalign:shift=-3", "must be >= 0"), ({"type": "misalign", "shift": 5, "unit": "cm"},
                                             "unit must be")],
)
def test_out_of_range_protocol_values_say_what_is_wrong(spec, problem):
    with pytest.raises(ConfigError, match=problem):
        Protocol.parse(spec)


def test_parse_protocols_list_and_duplicates():
    names = [p.name for p in parse_protocols(["none", "fov:90", {"type": "fov", "fov": 180}])]
    assert names == ["none", "fov90", "fov180"]
    with pytest.raises(ConfigError, match="duplicate"):
        parse_protocols(["fov:90", {"type": "fov", "fov": 90}])


# --------------------------------------------------------------------------- FoV


def test_fov_roll_depends_only_on_seed_and_query_index():
    protocol = Protocol.parse("fov:90")
    forward = [protocol.ground_roll(i, 644) for i in range(50)]
    backward = [Protocol.parse("fov:90").ground_roll(i, 644) for i in reversed(range(50))]
    assert forward == backward[::-1]
    assert len(set(forward)) > 30 and all(0 <= s < 644 for s in forward)
    # the same azimuth offset at another resolution, and for another FoV (same seed)
    assert abs(protocol.ground_roll(7, 1288) - 2 * forward[7]) <= 1
    assert Protocol.parse("fov:180").ground_roll(7, 644) == forward[7]
    reseeded = [Protocol.parse("fov:90:seed=1").ground_roll(i, 644) for i in range(50)]
    assert reseeded != forward


@pytest.mark.parametrize("fov, width", [(360, 644), (180, 644), (90, 644), (70, 644), (90, 1232)])
def test_fov_width_and_content(fov, width):
    protocol = Protocol.parse(f"fov:{fov}")
    assert protocol.fov_width(width) == round(width * fov / 360)
    pano = torch.arange(width, dtype=torch.float32).expand(3, 4, width).clone()
    out = protocol.apply_ground(pano, index=11)
    assert out.shape == (3, 4, round(width * fov / 360))
    shift = protocol.ground_roll(11, width)
    assert torch.equal(out, torch.roll(pano, shift, dims=-1)[..., : out.shape[-1]])
    assert torch.equal(protocol.apply_ground(pano, index=11), out)
    assert torch.equal(protocol.apply_aerial(pano, index=11), pano)  # aerial stays north-up


def test_known_orientation_is_centred_on_north():
    width = 644
    pano = torch.zeros(3, 4, width)
    pano[..., width // 2] = 1.0  # north: the centre column (default convention)
    protocol = Protocol.parse("fov:90:known")
    a, b = protocol.apply_ground(pano, 0), protocol.apply_ground(pano, 99)
    assert torch.equal(a, b)  # no random roll
    # the column that starts at north lands at round(161 / 2) = 81: azimuths -81..+80 columns
    assert a.shape[-1] == 161 and int(a[0, 0].argmax()) == 81
    starts_at_north = Protocol(kind="fov", fov=90, known=True, north_column=0.0)
    pano_0 = torch.zeros(3, 4, width)
    pano_0[..., 0] = 1.0
    assert int(starts_at_north.apply_ground(pano_0, 0)[0, 0].argmax()) == 81
    assert Protocol.parse({"type": "fov", "fov": 90, "known": True, "north_column": 0.0}) == (
        starts_at_north
    )


# --------------------------------------------------------------------------- misalignment


def test_misalignment_is_deterministic_per_gallery_index():
    protocol = Protocol.parse("misalign:shift=20,rot=10")
    params = [protocol.aerial_params(j) for j in range(40)]
    fresh = Protocol.parse("misalign:shift=20,rot=10")
    assert params == [fresh.aerial_params(j) for j in reversed(range(40))][::-1]
    assert len(set(params)) == 40
    assert all(abs(dx) <= 20 and abs(dy) <= 20 and abs(a) <= 10 for dx, dy, a in params)
    tile = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0))
    out = protocol.apply_aerial(tile, 5)
    assert out.shape == tile.shape and torch.equal(out, protocol.apply_aerial(tile, 5))
    assert not torch.equal(out, protocol.apply_aerial(tile, 6))
    assert torch.equal(protocol.apply_ground(tile, 5), tile)


def test_shift_rotate_moves_content_as_documented():
    tile = torch.zeros(1, 41, 41)
    tile[0, 20, 30] = 1.0  # 10 px east of the centre
    moved = shift_rotate(tile, 5.0, 0.0, 0.0)
    assert divmod(int(moved[0].argmax()), 41) == (20, 35)
    moved = shift_rotate(tile, 0.0, -4.0, 0.0)
    assert divmod(int(moved[0].argmax()), 41) == (16, 30)
    turned = shift_rotate(tile, 0.0, 0.0, 90.0)  # counter-clockwise: east -> north
    assert divmod(int(turned[0].argmax()), 41) == (10, 20)
    pct = Protocol(kind="misalign", shift=10.0)
    dx, dy, _ = pct.aerial_params(0)
    expected = shift_rotate(tile, dx / 100 * 41, dy / 100 * 41, 0.0)
    assert torch.allclose(pct.apply_aerial(tile, 0), expected)


# --------------------------------------------------------------------------- ImageDataset


def write_jpegs(tmp_path, n=3, size=(64, 128)):
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = Image.fromarray((rng.random((4, 8, 3)) * 255).astype(np.uint8))
        path = tmp_path / f"img{i}.jpg"
        small.resize((size[1], size[0]), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def test_image_dataset_truncated_jpeg_is_reported_not_fatal(tmp_path, caplog):
    paths = write_jpegs(tmp_path)
    data = paths[1].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    paths.insert(1, truncated)
    pre = Preprocess(size=(28, 56), patch_size=14)
    ds = ImageDataset(paths, pre, view="ground")
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert [it["ok"] for it in items] == [True, False, True, True]
    assert torch.count_nonzero(items[1]["image"]) == 0 and items[1]["image"].shape == (3, 28, 56)
    assert any("truncated.jpg" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert list(ds.unreadable) == [1] and "truncated.jpg" in ds.unreadable[1]
    batch = collate(items)
    assert batch["ok"].dtype == torch.bool and batch["ok"].tolist() == [True, False, True, True]
    assert batch["image"].shape == (4, 3, 28, 56)
    report = coverage_report(batch["ok"], ds.paths)
    assert report.startswith("queries evaluated: 3 / 4; 1 unreadable: ")
    assert str(truncated) in report


def test_image_dataset_applies_protocol_and_keeps_patch_multiples(tmp_path):
    paths = write_jpegs(tmp_path, n=2, size=(160, 320))
    ground = Preprocess(size=(56, 112), patch_size=14)
    ds = ImageDataset(paths, ground, protocol="fov:90", view="ground")
    item = ds[0]
    assert item["ok"] and item["image"].shape == (3, 56, 28)  # 112 * 90/360 = 28
    again = ImageDataset(paths, ground, protocol="fov:70", view="ground")[1]["image"]
    assert again.shape == (3, 56, 28)  # round(112 * 70 / 360) = 22 -> rounded to 28
    plain = ImageDataset(paths, ground, view="ground")[0]["image"]
    assert plain.shape == (3, 56, 112)
    aerial = Preprocess(size=(56, 56), patch_size=14, view="aerial")
    ds_a = ImageDataset(paths, aerial, protocol="misalign:shift=20,rot=10", view="aerial")
    tile = ds_a[1]["image"]
    assert tile.shape == (3, 56, 56)
    assert torch.equal(tile, ds_a[1]["image"])
    assert not torch.equal(tile, ImageDataset(paths, aerial, view="aerial")[1]["image"])
    # a ground-view protocol leaves the aerial gallery untouched
    untouched = ImageDataset(paths, aerial, protocol="fov:90", view="aerial")[1]["image"]
    assert torch.equal(untouched, ImageDataset(paths, aerial, view="aerial")[1]["image"])
