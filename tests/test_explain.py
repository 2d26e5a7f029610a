"""`benchmark explain`: assignment maps, the dustbin measured against masks and annotations,
retrieval galleries; on hand-built heads whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.colors import to_rgb
from PIL import Image

from gengeo_bench import explain, explain_figures
from gengeo_bench.builders import build_model, preprocessing
from gengeo_bench.cli import cli
from gengeo_bench.config import validate_cell
from gengeo_bench.engine import evaluate_targets
from gengeo_bench.explain_figures import FOUND, MISSED, ViewSample
from gengeo_bench.features import Features
from gengeo_bench.imagedata import ImageDataset
from gengeo_bench.protocols import Protocol
from gengeo_bench.registry import build

N_TEST = 8
# The model sees panoramas at 64 x 256 and tiles at 128 x 128; resnet_tiny's stride of 32
# makes 2 x 8 ground and 4 x 4 aerial patches: n = 16 for both views.
IMAGE_SIZE = {"ground": [64, 256], "aerial": [128, 128]}
M = 4  # SALAD clusters: the dustbin's share is (16 - 4) / 16 = 75%
# One-view masks, as stored (ground 64 x 256 = the model's size; aerial 64 x 64, half the
# model's): ground rows < 32 and columns < 96 (patches (0, 0..2), fully) plus columns
# 96..107 (37.5% of patch (0, 3): not one-view); aerial columns < 25 (patch column 0
# fully, column 1 at 9/16 = 56%: one-view).
GROUND_ONE_VIEW = np.zeros((2, 8), bool)
GROUND_ONE_VIEW[0, :3] = True
AERIAL_ONE_VIEW = np.zeros((4, 4), bool)
AERIAL_ONE_VIEW[:, :2] = True


def write_dataset(root: Path, n_train: int = 6, n_test: int = N_TEST, masks: bool = True,
                  annotations: bool = True, seed: int = 0) -> Path:
    """A CVUSA-layout folder with patterned pairs, CVUSA's annotations (top half sky, bottom
    left road, bottom right vegetation) and one-view masks beside the images."""
    rng = np.random.default_rng(seed)
    for folder in ("splits", "bingmap/19/masks", "streetview/panos/masks", "streetview/annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labels = np.zeros((64, 256), np.uint8)
    labels[32:, :128] = 2
    labels[32:, 128:] = 3
    ground_mask = np.zeros((64, 256), np.uint8)
    ground_mask[:32, :108] = 255
    aerial_mask = np.zeros((64, 64), np.uint8)
    aerial_mask[:, :25] = 255
    for name, ids in (("train-19zl.csv", range(1, n_train + 1)),
                      ("val-19zl.csv", range(n_train + 1, n_train + n_test + 1))):
        lines = []
        for i in ids:
            pid = f"{i:07d}"
            base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(base).resize((64, 64), Image.NEAREST).save(root / f"bingmap/19/{pid}.jpg")
            pano = np.concatenate([base, base[::-1]], axis=1)
            Image.fromarray(pano).resize((256, 64)).save(root / f"streetview/panos/{pid}.jpg")
            if annotations:
                Image.fromarray(labels).save(root / f"streetview/annotations/{pid}.png")
            if masks:
                Image.fromarray(ground_mask).save(root / f"streetview/panos/masks/{pid}.png")
                Image.fromarray(aerial_mask).save(root / f"bingmap/19/masks/{pid}.png")
            lines.append(f"bingmap/19/{pid}.jpg,streetview/panos/{pid}.jpg,"
                         f"streetview/annotations/{pid}.png")
        (root / "splits" / name).write_text("\n".join(lines) + "\n")
    return root


def cell_for(root: Path, aggregator: dict) -> object:
    return validate_cell({
        "name": "x",
        "model": {"backbone": {"name": "resnet_tiny"}, "aggregator": aggregator,
                  "share_backbone": False},
        "train": {"dataset": "d", "epochs": 0, "image_size": IMAGE_SIZE, "augment": False},
        "evaluate": {"batch_size": 8},
        "datasets": {"d": {"name": "cvusa", "root": str(root)}},
        "seed": 0,
    }, "test")


SALAD = {"name": "salad", "share": "clusters", "dustbin": True, "num_clusters": M,
         "cluster_dim": 4, "token_dim": 4, "dropout": 0.0}


def save_checkpoint(path: Path, cell, model) -> Path:
    torch.save({"model": model.state_dict(), "cell_yaml": cell.to_yaml()}, path)
    return path


def run_explain(*args: str) -> None:
    result = CliRunner().invoke(cli, ["explain", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    return write_dataset(tmp_path / "cvusa")


# --- the numbers, on hand-made assignments ------------------------------------------------


def test_unmatched_numbers_known_values():
    dustbin = np.array([0.9, 0.9, 0.1, 0.1, 0.5])
    one_view = np.array([True, True, False, False, False])
    got = explain.unmatched_numbers(dustbin, one_view)
    assert got["dustbin_on_unmatched"] == pytest.approx(100 * 1.8 / 2.5)
    assert got["unmatched_base_rate"] == pytest.approx(40.0)
    assert got["lift"] == pytest.approx(1.8 / 2.5 / 0.4)
    assert got["dustbin_share_of_one_view_patches"] == pytest.approx(90.0)
    assert got["dustbin_share_of_other_patches"] == pytest.approx(100 * 0.7 / 3)
    assert (got["patches"], got["one_view_patches"]) == (5, 2)


def test_num_clusters_finds_the_dustbin_column():
    salad = build("aggregator", "salad", in_dim=8, num_clusters=4, cluster_dim=4, token_dim=4)
    netvlad = build("aggregator", "netvlad", in_dim=8, num_clusters=4)
    assert explain.num_clusters(salad, 5) == (4, True)
    assert explain.num_clusters(netvlad, 4) == (4, False)
    assert explain.has_assignments(salad) and explain.has_assignments(netvlad)
    assert not explain.has_assignments(build("aggregator", "gem", in_dim=8))


def _salad_sending(marked: np.ndarray) -> tuple[torch.nn.Module, Features]:
    """A SALAD whose cluster scores are -10 on the `marked` patches of a 4 x 4 map (channel 0
    carries the mark), 0 elsewhere: those patches have nowhere to go but the dustbin."""
    head = build("aggregator", "salad", in_dim=2, num_clusters=M, cluster_dim=2, token_dim=2,
                 dropout=0.0, sinkhorn_iters=50)
    with torch.no_grad():
        first, last = head.score[0], head.score[3]
        for layer in (first, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, 0] = 1.0
        last.weight[:, 0] = -10.0
    patches = torch.zeros(1, 2, 4, 4)
    patches[0, 0] = torch.from_numpy(marked.astype(np.float32))
    return head.eval(), Features(patches)


def test_salad_dustbin_takes_the_patches_its_clusters_reject():
    marked = np.zeros((4, 4), bool)
    marked[:2] = True  # 8 of 16 patches: the base rate is 50%
    head, feats = _salad_sending(marked)
    with torch.no_grad():
        assign = head.assignments(feats)[0].reshape(4, 4, M + 1).numpy()
    image = np.zeros((64, 64, 3))
    sample = ViewSample("aerial", Path("a.png"), 0, image, assign,
                        one_view=np.repeat(np.repeat(marked, 16, 0), 16, 1).astype(float),
                        one_view_share=marked.astype(float))
    numbers = explain.measure([(sample, sample)], M, True, ())
    unmatched = numbers["dustbin"]["unmatched"]["aerial"]
    # The dustbin holds 16 - 4 = 12: all 8 marked patches' mass, 4 of the others'.
    assert numbers["dustbin"]["mean_share"]["aerial"] == pytest.approx(75.0, abs=0.01)
    assert unmatched["unmatched_base_rate"] == pytest.approx(50.0)
    assert unmatched["dustbin_on_unmatched"] == pytest.approx(100 * 8 / 12, abs=0.1)
    assert unmatched["dustbin_share_of_one_view_patches"] == pytest.approx(100.0, abs=0.1)


def test_netvlad_known_assignments_in_the_maps():
    head = build("aggregator", "netvlad", in_dim=3, num_clusters=3, alpha=50.0)
    with torch.no_grad():
        head.centroids.copy_(torch.eye(3))
        head._set_assign_from_centroids()
    layout = np.array([[0, 1, 2, 2], [1, 1, 0, 2], [2, 0, 0, 1]])
    patches = torch.from_numpy(np.eye(3, dtype=np.float32)[layout]).permute(2, 0, 1)[None]
    with torch.no_grad():
        assign = head.assignments(Features(patches))[0].reshape(3, 4, 3).numpy()
    sample = ViewSample("ground", Path("g.jpg"), 0, np.full((30, 40, 3), 0.5), assign)
    np.testing.assert_array_equal(sample.strongest(3), layout)
    fig = explain_figures._figure(4, 3)
    ax = fig.subplots()
    colours = explain_figures.palette(3)
    explain_figures._draw_clusters(ax, sample, 3, colours)
    overlay = ax.get_images()[1].get_array()
    np.testing.assert_allclose(overlay[..., :3], colours[layout])
    usage = explain.cluster_usage([sample], 3)
    assert usage == pytest.approx([100 * 4 / 12, 100 * 4 / 12, 100 * 4 / 12])


def test_cluster_used_by_one_view_only_is_reported():
    assign_g = np.zeros((1, 2, 3))
    assign_g[0, :, 0] = 1.0  # the ground uses cluster 0 only
    assign_a = np.zeros((1, 2, 3))
    assign_a[0, 0, 0] = assign_a[0, 1, 1] = 1.0  # the aerial view 0 and 1
    g = ViewSample("ground", Path("g"), 0, np.zeros((2, 4, 3)), assign_g)
    a = ViewSample("aerial", Path("a"), 0, np.zeros((2, 4, 3)), assign_a)
    numbers = explain.measure([(g, a)], 3, False, ())
    assert numbers["cluster_usage"] == {"ground": [100.0, 0.0, 0.0], "aerial": [50.0, 50.0, 0.0]}
    assert numbers["clusters_one_view_only"] == {"ground": [], "aerial": [1]}
    assert numbers["clusters_unused"] == [2] and "dustbin" not in numbers


def _retrieval(ranks: list[int]) -> explain.Retrieval:
    """Query q's positive is tile q; the top-5 lists hold it at position `rank` when < 5."""
    n = len(ranks)
    top = np.zeros((n, 5), np.int64)
    for q, rank in enumerate(ranks):
        others = [g for g in range(100) if g != q][:5]
        row = others[:5]
        if rank < 5:
            row = others[:rank] + [q] + others[rank:4]
        top[q] = row
    return explain.Retrieval([f"q{q}" for q in range(n)], [f"t{g}" for g in range(100)],
                             [f"/q{q}.jpg" for q in range(n)], [f"/t{g}.jpg" for g in range(100)],
                             np.arange(n), top, np.linspace(0.9, 0.5, 5)[None].repeat(n, 0),
                             np.asarray(ranks), np.full(n, 0.4))


def test_gallery_frame_is_green_exactly_when_rank_below_5(tmp_path):
    ranks = [0, 3, 4, 5, 12]
    retrieval = _retrieval(ranks)
    rows = [retrieval.row(q) for q in range(len(ranks))]
    assert [r.frame for r in rows] == [FOUND, FOUND, FOUND, MISSED, MISSED]
    assert [r.gt_slot for r in rows] == [0, 3, 4, None, None]
    for i in range(100):
        Image.new("RGB", (8, 8), (i, 90, 90)).save(tmp_path / f"t{i}.jpg")
    for q in range(len(ranks)):
        Image.new("RGB", (32, 8), (200, 9, 9)).save(tmp_path / f"q{q}.jpg")
    for row in rows:
        row.query = tmp_path / row.query.name
        row.gt.path = tmp_path / row.gt.path.name
        for tile in row.tiles:
            tile.path = tmp_path / tile.path.name
    canvas, panels = explain_figures.gallery_canvas(rows)
    fig = explain_figures.gallery_figure(rows, "test", tmp_path / "g.png")
    (ax,) = fig.axes  # one image, the captions written on it where its panels are
    assert [t.get_text() for t in ax.texts] == [p.caption for p in panels]
    png = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    top, left = png.shape[0] - canvas.shape[0], (png.shape[1] - canvas.shape[1]) // 2
    grey = np.round(np.asarray(to_rgb(explain_figures._GREY)) * 255)
    for i, row in enumerate(rows):
        line = [p for p in panels if p.row == i]
        assert [p.kind for p in line] == ["query"] + ["tile"] * 5 + ["gt"] * (row.gt_slot is None)
        query = line[0].box
        px = explain_figures.GALLERY_PX
        assert (query[2] - query[0], query[3] - query[1]) == (4 * px, px)  # the 32 x 8 query, 4:1
        framed = line[1 + row.gt_slot] if row.gt_slot is not None else line[-1]
        assert (framed.frame, framed.frame_width) == (row.frame, explain_figures._WIDE)
        assert ax.texts[panels.index(framed)].get_color() == (
            row.frame if row.gt_slot is None else "black")
        x0, y0, x1, y1 = framed.box
        # The middle of the frame's top edge: green or red, in the canvas and the saved PNG.
        y, x = y0 - 1 - framed.frame_width // 2, (x0 + x1) // 2
        want = np.round(np.asarray(to_rgb(row.frame)) * 255)
        np.testing.assert_array_equal(canvas[y, x], want)
        np.testing.assert_allclose(png[top + y, left + x], want, atol=2)
        np.testing.assert_allclose(canvas[(y0 + y1) // 2, x], (i, 90, 90), atol=4)  # tile t{i}
        other = line[2 if row.gt_slot == 0 else 1].box  # a tile that is not the ground truth
        np.testing.assert_allclose(png[top + other[1] - 1, left + (other[0] + other[2]) // 2], grey,
                                   atol=2)
    assert (tmp_path / "g.png").stat().st_size > 5000


def test_mask_planes_follow_the_image_under_a_protocol(data_root, tmp_path):
    """The one-view mask goes through the image's geometry: an image painted like its mask
    reads, after the protocol's roll and crop, like the mask's planes."""
    cell = cell_for(data_root, SALAD)
    ground_pre, _ = preprocessing(cell)
    painted = tmp_path / "painted.png"
    mask = np.asarray(Image.open(data_root / "streetview/panos/masks/0000007.png"))
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(painted)
    protocol = Protocol.parse("fov:180")
    for index in (0, 3):
        image = ImageDataset([painted] * 4, ground_pre, protocol=protocol, view="ground")[index]["image"]
        brightness = ground_pre.denormalize(image).mean(dim=0)
        planes = explain.label_planes(explain.read_mask(painted), ground_pre, protocol, index, "ground")
        assert planes.shape[-2:] == brightness.shape == (64, 128)
        assert (planes[0] - brightness).abs().max().item() < 0.02
    assert explain.mask_path(data_root / "streetview/panos/0000007.jpg") == (
        data_root / "streetview/panos/masks/0000007.png")
    assert explain.mask_path(tmp_path / "painted.png") is None
    Image.fromarray(mask > 0).save(tmp_path / "masks.png")  # a 1-bit mask reads as 0 / 255
    np.testing.assert_array_equal(explain.read_mask(tmp_path / "masks.png")[0], mask > 0)


# --- the command, end to end ------------------------------------------------------------------


@pytest.mark.parametrize("dust_bin", [30.0, -30.0])
def test_explain_salad_dustbin_share_and_known_base_rates(data_root, tmp_path, dust_bin):
    cell = cell_for(data_root, SALAD)
    model = build_model(cell).eval()
    with torch.no_grad():
        model.ground_head.dust_bin.fill_(dust_bin)  # shared with the aerial head
    checkpoint = save_checkpoint(tmp_path / "best.pt", cell, model)
    out = tmp_path / "explain"
    run_explain("--checkpoint", str(checkpoint), "--dataset", "cvusa", "--root", str(data_root),
                "--pairs", "2", "--out", str(out))
    summary = json.loads((out / "explain.json").read_text())
    numbers = summary["assignments"]
    dustbin = numbers["dustbin"]
    # SALAD's marginals: whatever its score, the dustbin takes (n - m) / n of the mass.
    for view in ("ground", "aerial", "both"):
        assert dustbin["mean_share"][view] == pytest.approx(100 * (16 - M) / 16, abs=0.05)
    assert dustbin["marginal_share"] == {"ground": 75.0, "aerial": 75.0}
    unmatched = dustbin["unmatched"]
    assert unmatched["ground"]["unmatched_base_rate"] == pytest.approx(100 * 3 / 16)
    assert unmatched["aerial"]["unmatched_base_rate"] == pytest.approx(50.0)
    assert unmatched["both"]["unmatched_base_rate"] == pytest.approx(100 * 11 / 32)
    classes = {c["class"]: c["share_of_patches"] for c in dustbin["classes"]}
    assert classes == pytest.approx({"sky": 50.0, "building": 0.0, "road": 25.0, "vegetation": 25.0})
    assert numbers["pairs_measured"] == N_TEST and len(numbers["pairs_drawn"]) == 2
    # The dustbin's mass on one-view patches, computed here from the head itself.
    split_pre = preprocessing(cell)
    on, total = 0.0, 0.0
    for view, pre, paths, flags in (
            ("ground", split_pre[0], sorted((data_root / "streetview/panos").glob("*.jpg"))[-N_TEST:],
             GROUND_ONE_VIEW),
            ("aerial", split_pre[1], sorted((data_root / "bingmap/19").glob("*.jpg"))[-N_TEST:],
             AERIAL_ONE_VIEW)):
        backbone, head = model.branch(view)
        images = torch.stack([pre(p) for p in paths])
        with torch.no_grad():
            bins = head.assignments(backbone(images))[..., -1].reshape(N_TEST, *flags.shape).numpy()
        on += float(bins[:, flags].sum())
        total += float(bins.sum())
    assert unmatched["both"]["dustbin_on_unmatched"] == pytest.approx(100 * on / total, rel=1e-4)
    # R@1 as `benchmark evaluate` measures it.
    metrics, *_ = evaluate_targets(cell, model, torch.device("cpu"), None, None, use_cache=False)
    assert summary["retrieval"]["R1"] == pytest.approx(metrics["test/d/R1"])
    for name in summary["figures"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 400
    assert {"assignments", "cluster_usage"} <= set(summary["figures"])


def test_explain_gem_gets_galleries_and_a_note(data_root, tmp_path):
    cell = cell_for(data_root, {"name": "gem"})
    checkpoint = save_checkpoint(tmp_path / "best.pt", cell, build_model(cell))
    out = tmp_path / "explain"
    run_explain("--checkpoint", str(checkpoint), "--dataset", "cvusa", "--root", str(data_root),
                "--out", str(out))
    summary = json.loads((out / "explain.json").read_text())
    assert summary["assignments"] is None and "declares no cluster assignments" in summary["note"]
    assert not (out / "assignments.png").exists()
    shown = set(summary["figures"])
    assert shown and shown <= {"gallery_successes", "gallery_failures"}
    retrieval = explain.Retrieval.load(out / "retrieval.npz")
    found = retrieval.ranks == 0
    assert ("gallery_successes" in shown) == found.any()
    assert ("gallery_failures" in shown) == (~found).any()
    # The top-1 tile of a query found at rank 0 is its positive.
    assert np.all(retrieval.top[found, 0] == retrieval.gt[found])


def test_explain_without_masks_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    root = write_dataset(tmp_path / "plain", masks=False, annotations=False)
    cell = cell_for(root, SALAD)
    checkpoint = save_checkpoint(tmp_path / "best.pt", cell, build_model(cell))
    summary = explain.explain(checkpoint, "cvusa", tmp_path / "out", root=str(root), device="cpu")
    dustbin = summary["assignments"]["dustbin"]
    assert dustbin["unmatched"] is None and "no one-view masks" in dustbin["unmatched_note"]
    assert "classes" not in dustbin
    assert explain.cell_metrics("d", summary) == {"test/d/dustbin_share": dustbin["mean_share"]["both"]}


# --- benchmark run and the report -----------------------------------------------------------


def test_run_logs_explain_artifacts_and_the_report_shows_them(data_root, tmp_path, monkeypatch):
    import pandas as pd
    import yaml

    from gengeo_bench import tracking
    from gengeo_bench.runner import run_matrix

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    salad = {k: v for k, v in SALAD.items() if k != "share"}
    matrix = {
        "name": "inside",
        "defaults": {"model": {"share_backbone": False},
                     "train": {"dataset": "d", "epochs": 1, "batch_size": 4, "val_fraction": 0.25,
                               "image_size": IMAGE_SIZE, "augment": False},
                     "evaluate": {"batch_size": 8}},
        "datasets": {"d": {"name": "cvusa", "root": str(data_root)}},
        "axes": {"backbone": ["resnet_tiny"],
                 "aggregator": [{**salad, "share": "clusters"}, {**salad, "share": "none"}]},
        "evaluate_on": ["d"],
        "seeds": [0],
        "baseline": {"aggregator": {"name": "salad", "share": "none"}},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix))
    outcomes = run_matrix(tmp_path / "m.yaml", reports_dir=tmp_path / "reports")
    assert [o.status for o in outcomes] == ["done", "done"]
    mlclient = tracking.client(tracking.tracking_uri())
    for o in outcomes:
        listed = {a.path for a in mlclient.list_artifacts(o.run_id, "explain/d")}
        assert {f"explain/d/{n}" for n in ("assignments.png", "cluster_usage.png", "explain.json",
                                           "retrieval.npz")} <= listed
        local = Path(mlclient.download_artifacts(o.run_id, "explain/d/explain.json",
                                                 str(tmp_path / o.run_id)))
        both = json.loads(local.read_text())["assignments"]["dustbin"]["unmatched"]["both"]
        logged = mlclient.get_run(o.run_id).data.metrics
        assert logged["test/d/dustbin_on_unmatched"] == pytest.approx(both["dustbin_on_unmatched"])
        assert logged["test/d/unmatched_base_rate"] == pytest.approx(100 * 11 / 32)
        assert logged["test/d/dustbin_share"] == pytest.approx(75.0, abs=0.05)
    out = tmp_path / "reports" / "inside"
    results = pd.read_csv(out / "results.csv")
    plain = results[results["protocol"] == "none"]
    assert plain["unmatched_base_rate_mean"].tolist() == pytest.approx([100 * 11 / 32] * 2)
    header = (out / "results.md").read_text().split("\n")[4]
    assert "| dustbin_on_unmatched |" in header and "(base 34.38)" in (out / "results.md").read_text()
    inside = pd.read_csv(out / "inside.csv")
    assert len(inside) == 2 and inside["patches_sky"].tolist() == pytest.approx([50.0, 50.0])
    assert inside["dustbin_share"].tolist() == pytest.approx([75.0, 75.0], abs=0.05)
    # share: none has one cluster space per view: no cluster is "one view's only".
    only = dict(zip(inside["method"], inside["ground_only_clusters"], strict=True))
    assert pd.isna(only["resnet_tiny + salad[none, dustbin]"])
    assert isinstance(json.loads(only["resnet_tiny + salad[clusters, dustbin]"]), list)
    assert "| n/a |" in (out / "inside.md").read_text()
    figures = {p.name for p in (out / "figures").glob("inside_*.png")}
    assert len(figures) == 4 and sum(n.endswith("_assignments.png") for n in figures) == 2
    deltas = pd.read_csv(out / "deltas.csv")
    row = deltas[deltas["protocol"] == "none"].iloc[0]
    galleries = list((out / "figures").glob("discordant_*.png"))
    discordant = int(row["only_method"]) + int(row["only_baseline"])
    assert len(galleries) == (1 if discordant else 0)
    index = (out / "index.md").read_text()
    if discordant:
        logged = {a.path for a in mlclient.list_artifacts(row["run_id"], "explain/discordant")}
        assert logged == {f"explain/discordant/{galleries[0].name}"}
        assert f"{int(row['only_method'])} queries only the method finds" in index
    else:
        assert "no discordant queries" in index


def test_dustbin_with_nothing_left_is_strict_json(data_root, tmp_path):
    """As many clusters as patches: SALAD's dustbin gets no mass, its shares are null (not
    NaN) in explain.json, and no metric is logged for them."""
    cell = cell_for(data_root, {**SALAD, "num_clusters": 16})
    checkpoint = save_checkpoint(tmp_path / "best.pt", cell, build_model(cell))
    summary = explain.explain(checkpoint, "cvusa", tmp_path / "out", root=str(data_root), device="cpu")

    def no_nan(text):
        raise AssertionError(f"{text} in explain.json")

    written = json.loads((tmp_path / "out" / "explain.json").read_text(), parse_constant=no_nan)
    dustbin = written["assignments"]["dustbin"]
    assert dustbin["marginal_share"] == {"ground": 0.0, "aerial": 0.0}
    assert dustbin["mean_share"]["both"] == pytest.approx(0.0, abs=1e-6)
    assert dustbin["unmatched"]["both"]["dustbin_on_unmatched"] is None
    assert dustbin["unmatched"]["both"]["unmatched_base_rate"] == pytest.approx(100 * 11 / 32)
    assert explain.cell_metrics("d", summary) == {
        "test/d/dustbin_share": pytest.approx(0.0, abs=1e-6),
        "test/d/unmatched_base_rate": pytest.approx(100 * 11 / 32)}


def test_explain_reads_the_synthetic_worlds_masks(tmp_path, monkeypatch):
    """The world's own masks (`Synthetic.mask_paths`) are the ones explain reads, and the
    world's `unmatched` option moves the share of one-view patches the way it says."""
    from gengeo_bench.builders import open_dataset

    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    base = {}
    for unmatched in (0.0, 1.0):
        cell = validate_cell({
            "name": "x",
            "model": {"backbone": {"name": "resnet_tiny"}, "aggregator": SALAD, "share_backbone": False},
            "train": {"dataset": "d", "epochs": 0, "image_size": IMAGE_SIZE},
            "evaluate": {"batch_size": 8},
            "datasets": {"d": {"name": "synthetic", "region": "suburb", "pairs": 30,
                               "unmatched": unmatched}},
        }, "test")
        dataset = open_dataset(cell.datasets["d"], "test")
        for pair in dataset.pairs:
            assert (explain.mask_path(pair.ground), explain.mask_path(pair.aerial)) == \
                dataset.mask_paths(pair)
        summary = explain.explain_target(cell, build_model(cell).eval(), "d", tmp_path / str(unmatched),
                                         torch.device("cpu"))
        both = summary["assignments"]["dustbin"]["unmatched"]["both"]
        assert both["patches"] == 32 * len(dataset.pairs)
        base[unmatched] = both["unmatched_base_rate"]
    assert 0.0 <= base[0.0] < base[1.0] <= 100.0
