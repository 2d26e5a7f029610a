"""The engine's own cost: evaluation, training steps and the frozen-backbone feature cache.

    python perf/bench_engine.py [--pairs 256] [--which eval,train,cache]

Each figure is a ratio against a baseline measured in the same run:

- eval:  descriptor extraction through the harness (JPEG decoding, preprocessing,
         DataLoader, inference mode) vs the bare model forward over the same images
         already decoded in memory: images/s and the ratio (target >= 0.85).
- train: training steps through `Trainer` (loss module, AdamW groups, scheduler,
         clipping, logging, checkpoint) vs a bare loop of forward + InfoNCE + backward +
         AdamW step over the same batches from the same DataLoader (target >= 0.9).
- cache: a matrix of 4 aggregator Cells over one frozen backbone, with and without the
         feature cache (target: >= 3x faster with it).

Data: a CVUSA-layout folder of random JPEGs (aerial 224x224, panorama 224x448) written
to a temporary folder. Backbone: DINOv2-S/14 architecture, random init (no download).
Peak RSS growth of the whole process is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gengeo_bench.config import validate_cell


def write_dataset(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "splits").mkdir(parents=True)
    (root / "bingmap" / "19").mkdir(parents=True)
    (root / "streetview" / "panos").mkdir(parents=True)
    lines = []
    for i in range(1, n + 1):
        pid = f"{i:07d}"
        small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
        Image.fromarray(small).resize((224, 224)).save(root / "bingmap" / "19" / f"{pid}.jpg")
        Image.fromarray(np.concatenate([small, small], 1)).resize((448, 224)).save(
            root / "streetview" / "panos" / f"{pid}.jpg")
        lines.append(f"bingmap/19/{pid}.jpg,streetview/panos/{pid}.jpg,streetview/annotations/{pid}.png")
    for name in ("train-19zl.csv", "val-19zl.csv"):
        (root / "splits" / name).write_text("\n".join(lines) + "\n")
    return root


def cell(root: Path, aggregator: dict, trainable_blocks: int | None, epochs: int = 1,
         steps: int | None = None, batch: int = 32) -> dict:
    return {
        "name": "bench",
        "model": {"backbone": {"name": "dinov2_vits14", "pretrained": False,
                               "trainable_blocks": trainable_blocks},
                  "aggregator": aggregator, "share_backbone": True},
        "train": {"dataset": "d", "epochs": epochs, "batch_size": batch, "val_fraction": 0.0,
                  "augment": False, "steps_per_epoch": steps,
                  "image_size": {"ground": [112, 224], "aerial": [112, 112]}},
        "evaluate": {"batch_size": 64},
        "datasets": {"d": {"name": "cvusa", "root": str(root)}},
    }


def bench_eval(root: Path) -> None:
    from gengeo_bench.builders import build_model, open_dataset, preprocessing
    from gengeo_bench.evaluate import embed_images
    from gengeo_bench.protocols import Protocol

    c = validate_cell(cell(root, {"name": "gem"}, 0), "bench")
    model = build_model(c).eval()
    ds = open_dataset(c.datasets["d"], "test")
    _, aerial_pre = preprocessing(c)
    paths = [p.aerial for p in ds.pairs]
    images = torch.stack([aerial_pre(p) for p in paths])

    def bare():
        with torch.inference_mode():
            for start in range(0, len(images), 64):
                model.embed(images[start:start + 64], "aerial")

    def ours(workers: int):
        embed_images(lambda x: model.embed(x, "aerial"), paths, aerial_pre, "aerial",
                     Protocol.parse("none"), torch.device("cpu"), batch_size=64,
                     num_workers=workers)

    bare(), ours(0)  # warm-up
    t_bare = min(_timed(bare) for _ in range(2))
    n = len(paths)
    for workers in (0, 1):
        t_ours = min(_timed(lambda w=workers: ours(w)) for _ in range(2))
        print(f"eval:  bare forward {n / t_bare:7.1f} img/s   harness (decode+preprocess+forward, "
              f"{workers} loader workers) {n / t_ours:7.1f} img/s   ratio {t_bare / t_ours:.3f}")


def bench_train(root: Path, steps: int) -> None:
    from torch.utils.data import DataLoader

    from gengeo_bench.builders import build_model, open_dataset, preprocessing
    from gengeo_bench.imagedata import PairDataset, collate
    from gengeo_bench.train import InfoNCE, Trainer

    c = validate_cell(cell(root, {"name": "gem"}, 2, steps=steps), "bench")
    ds = open_dataset(c.datasets["d"], "train")
    g_pre, a_pre = preprocessing(c)

    def bare():
        model = build_model(c)
        loss_fn = InfoNCE()
        opt = torch.optim.AdamW([p for p in [*model.parameters(), *loss_fn.parameters()]
                                 if p.requires_grad], lr=1e-4)
        data = PairDataset(ds.pairs, g_pre, a_pre, augment=False)
        order = np.random.default_rng(0).permutation(len(ds.pairs))
        batches = [order[i:i + 32].tolist() for i in range(0, 32 * steps, 32)]
        for batch in DataLoader(data, batch_sampler=batches, collate_fn=collate):
            g, a = model(batch["ground"], batch["aerial"])
            loss = loss_fn(g, a)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def ours():
        with tempfile.TemporaryDirectory() as work:
            model = build_model(c)
            Trainer(c, model, ds.pairs, [], g_pre, a_pre, Path(work), torch.device("cpu")).fit()

    t_bare = min(_timed(bare) for _ in range(2))
    t_ours = min(_timed(ours) for _ in range(2))
    print(f"train: bare loop {steps / t_bare:6.2f} steps/s   Trainer {steps / t_ours:6.2f} steps/s   "
          f"ratio {t_bare / t_ours:.3f}  (batch 32, last 2 of 12 blocks train, incl. checkpoint)")


def bench_cache(root: Path) -> None:
    from gengeo_bench.engine import run_cell

    heads = [{"name": "gem"}, {"name": "netvlad", "num_clusters": 8},
             {"name": "salad", "num_clusters": 8, "cluster_dim": 32, "token_dim": 32},
             {"name": "salad", "share": "clusters", "num_clusters": 8, "cluster_dim": 32,
              "token_dim": 32}]
    times = {}
    for use_cache in (False, True):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as work:
            os.environ["GENGEO_CACHE"] = cache
            start = time.perf_counter()
            for i, head in enumerate(heads):
                c = validate_cell(cell(root, head, 0, epochs=2), "bench")
                run_cell(c, Path(work) / str(i), device="cpu", use_cache=use_cache)
            times[use_cache] = time.perf_counter() - start
    print(f"cache: 4 aggregator Cells over a frozen backbone (2 epochs, train + test): "
          f"without cache {times[False]:.1f} s, with {times[True]:.1f} s, "
          f"speed-up {times[False] / times[True]:.2f}x")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--which", default="eval,train,cache")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(Path(tmp) / "cvusa", args.pairs)
        which = args.which.split(",")
        if "eval" in which:
            bench_eval(root)
        if "train" in which:
            bench_train(root, args.steps)
        if "cache" in which:
            bench_cache(root)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {peak:.0f} MiB (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
