"""Training and evaluation engine: loss, batches, resume, NaN stop, caches, DDP."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gengeo_bench.config import validate_cell
from gengeo_bench.datasets.base import Pair
from gengeo_bench.engine import run_cell
from gengeo_bench.errors import DataError, TrainingError
from gengeo_bench.train import BatchPlan, InfoNCE, gps_neighbours, split_train_val

REPO = Path(__file__).resolve().parents[1]


def make_noise_cvusa(root: Path, n_train: int = 24, n_test: int = 12, seed: int = 0) -> Path:
    """A CVUSA-layout folder whose pairs share a random pattern (learnable, tiny)."""
    rng = np.random.default_rng(seed)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "bingmap" / "19").mkdir(parents=True, exist_ok=True)
    (root / "streetview" / "panos").mkdir(parents=True, exist_ok=True)
    locations = []
    for name, ids in (("train-19zl.csv", range(1, n_train + 1)),
                      ("val-19zl.csv", range(n_train + 1, n_train + n_test + 1))):
        lines = []
        for i in ids:
            pid = f"{i:07d}"
            base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
            aerial = Image.fromarray(base).resize((64, 64), Image.NEAREST)
            pano = Image.fromarray(np.concatenate([base, base[::-1]], axis=1)).resize((128, 64))
            aerial.save(root / "bingmap" / "19" / f"{pid}.jpg")
            pano.save(root / "streetview" / "panos" / f"{pid}.jpg")
            lines.append(f"bingmap/19/{pid}.jpg,streetview/panos/{pid}.jpg,"
                         f"streetview/annotations/{pid}.png")
        (root / "splits" / name).write_text("\n".join(lines) + "\n")
    for i in range(1, n_train + n_test + 1):
        locations.append(f"{40 + i * 1e-3},{-70 + i * 1e-3},{40 + i * 1e-3},{-70 + i * 1e-3}")
    (root / "split_locations").mkdir(exist_ok=True)
    (root / "split_locations" / "all.csv").write_text("\n".join(locations) + "\n")
    return root


def cell_dict(root: Path, **train) -> dict:
    return {
        "name": "t",
        "model": {"backbone": {"name": "dinov2_tiny"},
                  "aggregator": {"name": "salad", "share": "clusters", "num_clusters": 4,
                                 "cluster_dim": 8, "token_dim": 8, "dropout": 0.2}},
        "train": {"dataset": "noise", "epochs": 3, "batch_size": 8, "val_fraction": 0.25,
                  "augment": True, **train},
        "evaluate": {"protocols": ["none"], "batch_size": 16},
        "datasets": {"noise": {"name": "cvusa", "root": str(root)}},
        "seed": 3,
    }


@pytest.fixture()
def noise_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    return make_noise_cvusa(tmp_path / "cvusa")


def test_infonce_matches_closed_form():
    torch.manual_seed(0)
    g = F.normalize(torch.randn(6, 5), dim=1)
    a = F.normalize(torch.randn(6, 5), dim=1)
    loss = InfoNCE(temperature=0.07, label_smoothing=0.1)(g, a)
    logits = g @ a.T / 0.07
    n = 6
    target = torch.full((n, n), 0.1 / n) + torch.eye(n) * 0.9

    def ce(x):
        return -(target * x.log_softmax(dim=1)).sum(dim=1).mean()

    expected = 0.5 * (ce(logits) + ce(logits.T))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert InfoNCE().logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_batch_plan_unique_aerials_and_hard_negatives():
    keys = [f"tile{i // 2}" for i in range(40)]  # every tile shared by two pairs
    plan = BatchPlan(keys, batch_size=8, seed=1)
    batches = plan.batches(0)
    assert len(batches) >= 3
    for b in batches:
        assert len(b) == 8 and len({keys[i] for i in b}) == 8
    assert plan.batches(0) == batches and plan.batches(1) != batches
    pairs = [Pair(str(i), Path("g"), Path(f"a{i}"), location=(40.0, -70.0 + 0.01 * i)) for i in range(40)]
    plan = BatchPlan([str(p.aerial) for p in pairs], batch_size=8, seed=1)
    plan.neighbours = gps_neighbours(pairs)
    for b in plan.batches(0):
        # anchors arrive with their GPS neighbours: the batch is spatially tight
        lons = sorted(pairs[i].location[1] for i in b)
        assert np.min(np.diff(lons)) == pytest.approx(0.01)


def test_split_train_val_is_seeded_and_disjoint():
    pairs = [Pair(str(i), Path("g"), Path("a")) for i in range(20)]
    tr, va = split_train_val(pairs, 0.25, seed=5)
    assert len(va) == 5 and not {p.id for p in tr} & {p.id for p in va}
    assert split_train_val(pairs, 0.25, seed=5)[1] == va


def test_train_then_resume_after_interruption_gives_identical_weights(noise_root, tmp_path):
    cell = validate_cell(cell_dict(noise_root), "test")
    full = run_cell(cell, tmp_path / "full", device="cpu")
    assert full.outcome.epochs_done == 3
    assert {"test/noise/R1", "test/noise/R5", "test/noise/R1pct", "test/noise/R1_ci_low"} <= set(full.metrics)

    def interrupt(metrics, step):
        # 18 training pairs, batches of 8: 2 steps per epoch. Stop inside epoch 3,
        # after its steps but before its checkpoint.
        if step > 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, tmp_path / "cut", device="cpu", log_metrics=interrupt)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert 1 <= saved["epoch"] < 3
    resumed = run_cell(cell, tmp_path / "cut", device="cpu")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed.metrics == full.metrics


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(noise_root, tmp_path, monkeypatch):
    cell = validate_cell(cell_dict(noise_root, epochs=3), "test")
    original = InfoNCE.forward
    state = {"calls": 0}

    def flaky(self, g, a):
        state["calls"] += 1
        loss = original(self, g, a)
        return loss * float("nan") if state["calls"] > 2 else loss  # epoch 2 (2 steps/epoch)

    monkeypatch.setattr(InfoNCE, "forward", flaky)
    with pytest.raises(TrainingError) as info:
        run_cell(cell, tmp_path / "nan", device="cpu")
    message = str(info.value)
    assert "train/loss became nan at epoch 2" in message and "checkpoint.pt (epoch 1)" in message
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_descriptor_cache_hits_and_invalidation(noise_root, tmp_path):
    from gengeo_bench.builders import build_model, open_dataset, preprocessing
    from gengeo_bench.cache import TensorCache
    from gengeo_bench.evaluate import evaluate_split

    cell = validate_cell(cell_dict(noise_root, epochs=0), "test")
    ds = open_dataset(cell.datasets["noise"], "test")
    split, manifest = ds.evaluation(), ds.manifest()["content_hash"]
    model = build_model(cell)
    g_pre, a_pre = preprocessing(cell)
    cache = TensorCache("d", root=tmp_path)

    def run(model=model, protocol="none", g_pre=g_pre, manifest=manifest):
        return evaluate_split(model, split, g_pre, a_pre, protocol, manifest_hash=manifest,
                              descriptor_cache=cache).metrics

    first = run()
    assert (cache.hits, cache.misses) == (0, 2)
    assert run() == first and (cache.hits, cache.misses) == (2, 2)
    run(protocol="fov:180")  # the protocol changes the ground view only
    assert (cache.hits, cache.misses) == (3, 3)
    run(manifest="another")  # a different image list
    assert cache.misses == 5
    from gengeo_bench.transforms import Preprocess

    run(g_pre=Preprocess.from_meta({"patch_size": 14, "image_size": {"ground": [28, 112]}}, "ground"))
    assert cache.misses == 6
    with torch.no_grad():
        next(model.ground_head.parameters()).add_(0.1)
    run(model=model)
    assert cache.misses == 8  # new weights: both views recomputed
    cache.path(next(iter(cache.folder.glob("*.safetensors"))).stem).unlink()  # safe to delete
    run(model=model)
    assert cache.misses == 9


def test_frozen_backbone_features_are_shared_across_aggregators(noise_root, tmp_path):
    from gengeo_bench.evaluate import FeatureBank

    for aggregator in ({"name": "gem"}, {"name": "netvlad", "num_clusters": 4}):
        data = cell_dict(noise_root, epochs=1, augment=False)
        data["model"] = {"backbone": {"name": "dinov2_tiny", "trainable_blocks": 0},
                         "aggregator": aggregator}
        result = run_cell(validate_cell(data, "test"), tmp_path / aggregator["name"], device="cpu")
        assert 0 <= result.metrics["test/noise/R1"] <= 100
    features = list(FeatureBank().cache.folder.glob("*.safetensors"))
    # Training ground + aerial and test ground + aerial, computed by the first Cell and
    # read by the second: 4 entries, not 8.
    assert len(features) == 4


def test_missing_training_files_fail_before_the_first_step(noise_root, tmp_path):
    for i in range(1, 13):
        (noise_root / "bingmap" / "19" / f"{i:07d}.jpg").unlink()
    cell = validate_cell(cell_dict(noise_root), "test")
    with pytest.raises(DataError) as info:
        run_cell(cell, tmp_path / "missing", device="cpu")
    assert "bingmap/19/0000001.jpg" in str(info.value)
    assert not (tmp_path / "missing" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(noise_root, tmp_path):
    """torchrun with 2 gloo processes trains one Cell; only rank 0 writes."""
    import yaml

    cell_file = tmp_path / "cell.yaml"
    cell_file.write_text(yaml.safe_dump(cell_dict(noise_root, epochs=2, batch_size=4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENGEO_CACHE": str(tmp_path / "cache")}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "gengeo_bench",
         "train", str(cell_file), "--workdir", str(tmp_path / "ddp"), "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert (tmp_path / "ddp" / "metrics.json").is_file()


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    g = F.normalize(torch.randn(8, 5), dim=1)
    a = F.normalize(torch.randn(8, 5), dim=1)
    half = slice(rank * 4, rank * 4 + 4)
    loss = InfoNCE(label_smoothing=0.1)(g[half], a[half])
    queue.put((rank, loss.item()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_loss_gathers_negatives_from_every_rank():
    """Under 2 gloo ranks with 4 pairs each, the mean of the ranks' losses equals the
    single-process loss over all 8 pairs: each query saw the global batch."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_gather_worker, args=(2, 29533, queue), nprocs=2, start_method="spawn")
    losses = dict(queue.get() for _ in range(2))
    torch.manual_seed(0)
    g = F.normalize(torch.randn(8, 5), dim=1)
    a = F.normalize(torch.randn(8, 5), dim=1)
    full = InfoNCE(label_smoothing=0.1)(g, a).item()
    assert (losses[0] + losses[1]) / 2 == pytest.approx(full, rel=1e-5)
    local = InfoNCE(label_smoothing=0.1)(g[:4], a[:4]).item()
    assert losses[0] != pytest.approx(local, rel=1e-3)  # not a local-batch loss


def test_chance_r1_is_positives_over_gallery_size(noise_root):
    from gengeo_bench.builders import build_model, open_dataset, preprocessing
    from gengeo_bench.evaluate import evaluate_split

    cell = validate_cell(cell_dict(noise_root, epochs=0), "test")
    split = open_dataset(cell.datasets["noise"], "test").evaluation()
    model = build_model(cell)
    g_pre, a_pre = preprocessing(cell)
    n = len(split.gallery)
    plain = evaluate_split(model, split, g_pre, a_pre, ks=(1,)).metrics
    assert plain["chance_R1"] == pytest.approx(100.0 / n)
    # Query 0 gets two more true positives, the others none: mean of 3/n and 1/n.
    extra = [np.array([1, 2])] + [np.array([], dtype=np.int64)] * (len(split.queries) - 1)
    more = evaluate_split(model, split, g_pre, a_pre, extra_positives=extra, ks=(1,)).metrics
    q = len(split.queries)
    assert more["chance_R1"] == pytest.approx(100.0 * (3 + (q - 1)) / (q * n))
