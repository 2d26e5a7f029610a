"""Preprocessing, paired augmentation and the training PairDataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gengeo_bench.datasets.base import Pair
from gengeo_bench.errors import ConfigError, DataError
from gengeo_bench.imagedata import PairDataset, collate
from gengeo_bench.transforms import (
    AugmentParams,
    PairedAugment,
    Preprocess,
    fit_size,
    flip_pano,
    load_image,
    rng_for,
    rotate_pair,
)

DINO_META = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "patch_size": 14,
    "image_size": {"ground": [322, 644], "aerial": [322, 322]},
}


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: low-frequency noise, upsampled (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((8, 16, 3)) * 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def save(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


# --------------------------------------------------------------------------- sizes


def test_sizes_round_to_patch_multiples():
    assert fit_size([322, 644], 14) == (322, 644)
    assert fit_size([322, 322], 14) == (322, 322)
    h, w = fit_size([300, 600], 14)
    assert (h, w) == (294, 588) and h % 14 == 0 and w % 14 == 0 and w / h == 2.0
    # a height and a panorama aspect (CVUSA 1232x224 -> 5.5:1)
    assert fit_size(224, 14, aspect=1232 / 224) == (224, 1232)
    assert fit_size(300, 14, aspect=2.0) == (294, 588)
    assert fit_size(5, 14) == (14, 14)  # never below one patch
    assert fit_size([224, 448], 16) == (224, 448)


def test_preprocess_from_meta_and_overrides():
    pre = Preprocess.from_meta(DINO_META, "ground")
    assert pre.size == (322, 644) and pre.patch_size == 14
    assert Preprocess.from_meta(DINO_META, "ground", size=[300, 600]).size == (294, 588)
    # a height alone keeps the meta's aspect for that view (2:1 for the panorama)
    assert Preprocess.from_meta(DINO_META, "ground", size=224).size == (224, 448)
    assert Preprocess.from_meta(DINO_META, "aerial", size=384).size == (378, 378)
    assert Preprocess.from_meta(DINO_META, "ground", size=154, aspect=4.0).size == (154, 616)
    with pytest.raises(ConfigError, match="multiples"):
        Preprocess(size=(300, 600), patch_size=14)
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocess(size=(28, 28), interpolation="nearest-ish")
    with pytest.raises(ConfigError, match="crop_rows"):
        Preprocess(size=(28, 28), crop_rows=(0.8, 0.2))


def test_preprocess_from_registry():
    pre = Preprocess.from_registry("dinov2_vitb14", "aerial")
    assert pre.size == (322, 322) and pre.patch_size == 14
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))


def test_describe_and_key_are_stable_and_complete():
    a = Preprocess.from_meta(DINO_META, "ground", crop_rows=(208, 624))
    b = Preprocess.from_meta(DINO_META, "ground", crop_rows=(208, 624))
    assert a.key() == b.key() and a.describe() == b.describe()
    assert a.key().startswith("ground-322x644-")
    d = a.describe()
    for field in ("size", "patch_size", "crop_rows", "interpolation", "draft", "mean", "std"):
        assert field in d
    others = [
        Preprocess.from_meta(DINO_META, "ground"),
        Preprocess.from_meta(DINO_META, "ground", crop_rows=(208, 624), draft=False),
        Preprocess.from_meta(DINO_META, "ground", crop_rows=(208, 624), interpolation="bilinear"),
        Preprocess.from_meta(DINO_META, "ground", crop_rows=(0.25, 0.75)),
        Preprocess.from_meta(DINO_META, "ground", crop_rows=(208, 624), size=[308, 616]),
    ]
    assert len({a.key()} | {o.key() for o in others}) == 1 + len(others)


# --------------------------------------------------------------------------- decoding


def test_draft_decode_matches_full_decode(tmp_path):
    path = save(smooth_image(832, 1664), tmp_path / "pano.jpg", quality=92)
    with Image.open(path) as im:
        im.draft("RGB", (644, 322))
        assert im.size == (832, 416)  # libjpeg decoded at half scale
    fast = load_image(path, (322, 644), draft=True)
    full = load_image(path, (322, 644), draft=False)
    assert fast.shape == full.shape == (3, 322, 644)
    assert fast.dtype == torch.float32 and 0.0 <= fast.min() and fast.max() <= 1.0
    assert (fast - full).abs().mean().item() < 0.01
    # a target larger than any reduced scale: no draft possible, identical result
    big = load_image(path, (700, 1400), draft=True)
    assert torch.equal(big, load_image(path, (700, 1400), draft=False))


def test_normalisation_values(tmp_path):
    array = np.zeros((28, 56, 3), dtype=np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = 255, 128, 0
    path = save(array, tmp_path / "flat.png")
    pre = Preprocess(size=(14, 28), patch_size=14)
    raw = pre.load(path)
    assert raw[0].unique().tolist() == [1.0] and raw[2].unique().tolist() == [0.0]
    assert raw[1].unique().item() == pytest.approx(128 / 255)
    out = pre(path)
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    for c in range(3):
        assert out[c].mean().item() == pytest.approx(expected[c], abs=1e-5)
        assert out[c].std().item() < 1e-5
    assert torch.allclose(pre.denormalize(out), raw, atol=1e-6)


def banded(h: int, w: int) -> np.ndarray:
    """Top quarter red, middle half green, bottom quarter blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 4, :, 0] = 255
    a[h // 4 : 3 * h // 4, :, 1] = 255
    a[3 * h // 4 :, :, 2] = 255
    return a


@pytest.mark.parametrize("crop", [(208, 624), (0.25, 0.75)])
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_crop_rows_middle_half(tmp_path, crop, ext):
    options = {"quality": 95} if ext == "jpg" else {}
    path = save(banded(832, 1664), tmp_path / f"pano.{ext}", **options)
    image = load_image(path, (56, 224), crop_rows=crop)  # jpg: decoded at 1/4 scale, then cropped
    assert image.shape == (3, 56, 224)
    assert image[1].mean().item() > 0.97  # green everywhere
    assert image[0].max().item() < 0.1 and image[2].max().item() < 0.1
    whole = load_image(path, (56, 224))
    assert whole[0, :10].mean().item() > 0.9 and whole[2, -10:].mean().item() > 0.9


def test_crop_rows_outside_image_is_a_data_error(tmp_path):
    path = save(banded(224, 1232), tmp_path / "cvusa.png")
    with pytest.raises(DataError, match="crop rows"):
        load_image(path, (56, 224), crop_rows=(208, 624))


def test_grey_and_rgba_images_become_rgb(tmp_path):
    grey = save(np.full((20, 40), 200, np.uint8), tmp_path / "g.jpg")
    rgba = save(np.full((20, 40, 4), 100, np.uint8), tmp_path / "a.png")
    assert load_image(grey, (14, 28)).shape == (3, 14, 28)
    assert load_image(rgba, (14, 28)).shape == (3, 14, 28)


# --------------------------------------------------------------------------- geometry


S, H, W, R = 64, 8, 128, 20  # aerial side, pano height and width, marker radius


def marker_pair(azimuth: float, north: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A tile with a marker at `azimuth` (clockwise from north, 20 px from the centre) and a
    panorama with a marker in the column of that azimuth."""
    aerial = torch.zeros(3, S, S)
    row = S / 2 - R * math.cos(math.radians(azimuth))
    col = S / 2 + R * math.sin(math.radians(azimuth))
    aerial[:, int(row) - 1 : int(row) + 2, int(col) - 1 : int(col) + 2] = 1.0
    pano = torch.zeros(3, H, W)
    column = int(math.floor((north + azimuth / 360.0) * W)) % W
    pano[:, :, column] = 1.0
    return pano, aerial


def aerial_azimuth(aerial: torch.Tensor) -> float:
    rows, cols = torch.nonzero(aerial[0] > 0.5, as_tuple=True)
    r, c = rows.float().mean().item() + 0.5, cols.float().mean().item() + 0.5
    return math.degrees(math.atan2(c - S / 2, S / 2 - r)) % 360.0


def pano_azimuth(pano: torch.Tensor, north: float) -> float:
    column = int(pano[0].sum(0).argmax())
    return (((column + 0.5) / pano.shape[-1] - north) * 360.0) % 360.0


def angle_gap(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("north", [0.0, 0.5, 0.25, 0.1])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_paired_geometry_keeps_marker_correspondence(north, flip, k):
    aug = PairedAugment(north_column=north)
    tol = 360.0 / W * 1.5 + 2.0
    for azimuth in (30.0, 100.0, 245.0):
        pano, aerial = marker_pair(azimuth, north)
        assert angle_gap(pano_azimuth(pano, north), aerial_azimuth(aerial)) < tol
        p2, a2 = aug.apply(pano, aerial, AugmentParams(flip=flip, k=k))
        assert p2.shape == pano.shape and a2.shape == aerial.shape
        moved = aerial_azimuth(a2)
        assert angle_gap(pano_azimuth(p2, north), moved) < tol
        # and the tile really moved as documented: -k*90 degrees, mirrored first if flipped
        expected = ((-azimuth if flip else azimuth) - 90.0 * k) % 360.0
        assert angle_gap(moved, expected) < 3.0


def test_marker_test_detects_the_wrong_roll_direction():
    pano, aerial = marker_pair(30.0, 0.0)
    wrong_pano = torch.roll(pano, W // 4, dims=-1)  # the opposite of rotate_pair's roll
    right_pano, rotated = rotate_pair(pano, aerial, 1)
    assert angle_gap(pano_azimuth(right_pano, 0.0), aerial_azimuth(rotated)) < 5.0
    assert angle_gap(pano_azimuth(wrong_pano, 0.0), aerial_azimuth(rotated)) > 170.0
    # a plain flip without the north roll is wrong when north is at a quarter of the width
    plain = pano.flip(-1)
    pano_q, _ = marker_pair(30.0, 0.25)
    assert angle_gap(pano_azimuth(pano_q.flip(-1), 0.25), 330.0) > 170.0
    assert angle_gap(pano_azimuth(flip_pano(pano_q, 0.25), 0.25), 330.0) < 5.0
    assert torch.equal(flip_pano(pano, 0.0), plain)


def test_synthetic_world_convention_column_c_samples_360c_over_w_minus_180():
    """benchmark/synthetic_world.py: column c samples azimuth 360 c / W - 180 (north centre).
    Each column's content is its own azimuth; after the paired transform, column c must
    hold what the transformed tile shows at azimuth a_c."""
    width = 64
    az = 360.0 * torch.arange(width) / width - 180.0
    pano = az.expand(1, 2, width).clone()
    exact = PairedAugment(north_column=0.5 + 0.5 / width)
    flipped, _ = exact.apply(pano, torch.zeros(1, 4, 4), AugmentParams(flip=True))
    assert torch.allclose((flipped[0, 0] + az + 180.0) % 360.0, torch.full((width,), 180.0))
    default, _ = PairedAugment().apply(pano, torch.zeros(1, 4, 4), AugmentParams(flip=True))
    step = 360.0 / width
    assert torch.allclose((default[0, 0] + az + step + 180.0) % 360.0, torch.full((width,), 180.0))
    for k in (1, 2, 3):
        rolled, _ = exact.apply(pano, torch.zeros(1, 4, 4), AugmentParams(k=k))
        assert torch.allclose((rolled[0, 0] - az - 90.0 * k) % 360.0, torch.zeros(width))


def test_rotation_needs_a_square_tile():
    with pytest.raises(ConfigError, match="square"):
        rotate_pair(torch.zeros(3, 4, 8), torch.zeros(3, 4, 6), 1)


def test_photometric_jitter_changes_colours_not_geometry():
    pano, aerial = marker_pair(30.0, 0.0)
    pano = pano * 0.6 + 0.2  # background 0.2, marker 0.8
    aerial = aerial * 0.6 + 0.2
    pano[0] *= 0.5  # some colour, so saturation and hue act
    aerial[2] *= 0.7
    params = AugmentParams(
        ground_jitter=(1.2, 0.8, 1.3, 0.05), aerial_jitter=(0.85, 1.15, 0.7, -0.05)
    )
    p2, a2 = PairedAugment().apply(pano, aerial, params)
    assert (p2 - pano).abs().mean() > 0.01 and (a2 - aerial).abs().mean() > 0.01
    assert 0.0 <= p2.min() and p2.max() <= 1.0
    for before, after in ((pano, p2), (aerial, a2)):
        mask = before.mean(0) > 0.4
        grey = after.mean(0)
        threshold = (grey[mask].min() + grey[~mask].max()) / 2
        assert grey[mask].min() > grey[~mask].max()  # same marker, same place
        assert torch.equal(grey > threshold, mask)


def test_jitter_is_independent_per_view():
    aug = PairedAugment(jitter_p=1.0, hue=0.1)
    params = aug.sample(np.random.default_rng(3))
    assert params.ground_jitter is not None and params.aerial_jitter is not None
    assert params.ground_jitter != params.aerial_jitter
    for factors in (params.ground_jitter, params.aerial_jitter):
        assert all(0.85 <= f <= 1.15 for f in factors[:3]) and abs(factors[3]) <= 0.1


def test_sampling_is_seeded_and_covers_all_rotations():
    aug = PairedAugment()
    draws = [aug.sample(rng_for(7, 0, i)) for i in range(200)]
    assert draws == [aug.sample(rng_for(7, 0, i)) for i in range(200)]
    assert {d.k for d in draws} == {0, 1, 2, 3}
    assert 60 < sum(d.flip for d in draws) < 140
    no_rotation = PairedAugment(rotate=False)
    assert {no_rotation.sample(rng_for(1, 0, i)).k for i in range(50)} == {0}


# --------------------------------------------------------------------------- PairDataset


@pytest.fixture()
def pairs(tmp_path) -> list[Pair]:
    out = []
    for i in range(4):
        g = save(smooth_image(64, 128, seed=i), tmp_path / f"g{i}.jpg", quality=90)
        a = save(smooth_image(60, 60, seed=10 + i), tmp_path / f"a{i}.jpg", quality=90)
        out.append(Pair(id=f"p{i}", ground=g, aerial=a))
    return out


TINY = {**DINO_META, "image_size": {"ground": [28, 56], "aerial": [28, 28]}}


def make_pairs_dataset(pairs, seed=0, augment=True, cache_mb=0):
    return PairDataset(
        pairs,
        Preprocess.from_meta(TINY, "ground"),
        Preprocess.from_meta(TINY, "aerial"),
        augment=augment,
        seed=seed,
        cache_mb=cache_mb,
    )


def test_decoded_cache_gives_the_same_tensors_and_decodes_each_file_once(pairs, monkeypatch):
    import gengeo_bench.transforms as transforms

    plain = make_pairs_dataset(pairs, seed=3)
    cached = make_pairs_dataset(pairs, seed=3, cache_mb=1)
    decoded = []
    real = transforms.decode_image
    monkeypatch.setattr(transforms, "decode_image",
                        lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    for epoch in range(3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(pairs)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["ground"], b["ground"]) and torch.equal(a["aerial"], b["aerial"])
    # the plain dataset decodes 2 files per item per epoch, the cached one each file once
    assert len(decoded) == 3 * 2 * len(pairs) + 2 * len(pairs)
    assert cached.decoded_bytes == len(pairs) * (28 * 56 * 3 + 28 * 28 * 3)


def test_decoded_cache_stays_within_its_budget(pairs):
    ds = make_pairs_dataset(pairs, augment=False)
    ds.cache_bytes = 2 * 28 * 56 * 3 + 28 * 28 * 3  # room for 3 of the 8 images, in order
    for i in range(len(pairs)):
        ds[i]
    assert sorted(ds.decoded) == [("aerial", 0), ("ground", 0), ("ground", 1)]
    assert ds.decoded_bytes <= ds.cache_bytes


def test_pair_dataset_is_deterministic_per_seed_epoch_index(pairs):
    ds = make_pairs_dataset(pairs, seed=5)
    first = [ds[i] for i in range(4)]
    assert first[0]["ground"].shape == (3, 28, 56) and first[0]["aerial"].shape == (3, 28, 28)
    again = make_pairs_dataset(pairs, seed=5)
    for i in (3, 1, 0, 2):  # another order, another instance: the same tensors
        assert torch.equal(again[i]["ground"], first[i]["ground"])
        assert torch.equal(again[i]["aerial"], first[i]["aerial"])
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(4)]
    changed = [not torch.equal(first[i]["aerial"], epoch1[i]["aerial"]) for i in range(4)]
    assert any(changed)
    ds.set_epoch(0)
    assert torch.equal(ds[2]["aerial"], first[2]["aerial"])
    other_seed = make_pairs_dataset(pairs, seed=6)
    assert any(not torch.equal(other_seed[i]["aerial"], first[i]["aerial"]) for i in range(4))


def test_pair_dataset_without_augmentation_is_plain_preprocessing(pairs):
    ds = make_pairs_dataset(pairs, augment=False)
    item = ds[1]
    assert torch.equal(item["ground"], ds.ground_pre(pairs[1].ground))
    assert torch.equal(item["aerial"], ds.aerial_pre(pairs[1].aerial))
    batch = collate([ds[0], ds[1]])
    assert batch["ground"].shape == (2, 3, 28, 56)
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 1]


def test_pair_dataset_corrupt_or_missing_file_raises_data_error(pairs, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    broken = list(pairs)
    broken[2] = Pair(id="p2-broken", ground=pairs[2].ground, aerial=bad)
    broken[3] = Pair(id="p3-missing", ground=tmp_path / "nope.jpg", aerial=pairs[3].aerial)
    ds = make_pairs_dataset(broken)
    ds[0]
    with pytest.raises(DataError) as info:
        ds[2]
    assert "corrupt.jpg" in str(info.value) and "p2-broken" in str(info.value)
    with pytest.raises(DataError, match="p3-missing.*nope.jpg"):
        ds[3]


def test_pair_dataset_rejects_rotation_with_non_square_aerial(pairs):
    with pytest.raises(ConfigError, match="square"):
        PairDataset(pairs, Preprocess(size=(28, 56)), Preprocess(size=(28, 42), view="aerial"))
