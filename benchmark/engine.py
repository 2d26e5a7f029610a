"""One Cell, end to end: train once, then evaluate on every target under every protocol.

`run_cell` is the single path every command takes (`benchmark train`, the matrix runner,
the tuner): it returns the test metrics under their MLflow names
(`test/<dataset>[/<protocol>]/R1` ...), saves per-query ranks beside the checkpoint, and
reports each epoch's `train/loss` and `val/<dataset>/R1` through `log_metrics`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gengeo_bench.builders import (
    build_model,
    check_dataset,
    default_device,
    descriptor_cache,
    load_weights,
    open_dataset,
    preprocessing,
)
from gengeo_bench.cache import stable_hash
from gengeo_bench.config import Cell
from gengeo_bench.evaluate import EvalResult, FeatureBank, embed_images, evaluate_split
from gengeo_bench.model import CrossViewModel
from gengeo_bench.protocols import Protocol
from gengeo_bench.train import MetricLogger, Trainer, TrainOutcome, split_train_val

log = logging.getLogger(__name__)

HEADLINE = ("R1", "R5", "R10", "R1pct", "hit_rate")


@dataclass
class CellResult:
    cell_id: str
    metrics: dict[str, float]
    outcome: TrainOutcome
    ranks: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)
    coverage: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None


def metric_prefix(dataset_key: str, protocol: Protocol) -> str:
    return f"test/{dataset_key}" if protocol.name == "none" else f"test/{dataset_key}/{protocol.name}"


def initialise_heads(model: CrossViewModel, pairs: list, ground_pre, aerial_pre,
                     device: torch.device, n_images: int = 64, seed: int = 0) -> None:
    """Data-dependent head initialisation (NetVLAD's k-means centroids) on training images."""
    head = model.ground_head
    if not hasattr(head, "initialise") or not pairs:
        return
    rng = np.random.default_rng(seed)
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:n_images]]
    none = Protocol.parse("none")
    local = {}
    for view, pre in (("ground", ground_pre), ("aerial", aerial_pre)):
        backbone, _ = model.branch(view)
        paths = [p.ground if view == "ground" else p.aerial for p in chosen]
        out = embed_images(lambda x, b=backbone: {"patches": b(x).patches}, paths, pre, view,
                           none, device, batch_size=16, description=f"{view} features for init")
        patches = out["patches"]  # [N, C, h, w]
        local[view] = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    if model.share in ("clusters", "all"):
        model.ground_head.initialise(torch.cat([local["ground"], local["aerial"]]))
    else:
        model.ground_head.initialise(local["ground"])
        model.aerial_head.initialise(local["aerial"])


def evaluate_targets(
    cell: Cell,
    model: CrossViewModel,
    device: torch.device,
    workdir: Path | None,
    feature_bank: FeatureBank | None,
    use_cache: bool = True,
) -> tuple[dict[str, float], dict[str, Path], dict[str, dict], dict[str, str]]:
    """Evaluate on every target x protocol; returns metrics, rank files, manifests, coverage."""
    metrics: dict[str, float] = {}
    rank_files: dict[str, Path] = {}
    manifests: dict[str, dict] = {}
    coverage: dict[str, str] = {}
    cache = descriptor_cache() if use_cache else None
    for key in cell.targets:
        ref = cell.datasets[key]
        dataset = open_dataset(ref, ref.test_split)
        check_dataset(dataset)
        manifest = dataset.manifest()
        manifests[key] = manifest
        ground_pre, aerial_pre = preprocessing(cell, dataset)
        split = dataset.evaluation()
        extra = None
        if getattr(dataset, "protocol", None) == "within_5m":
            extra = dataset.positives_within(5.0)
        for spec in cell.evaluate.protocols:
            protocol = Protocol.parse(spec)
            result: EvalResult = evaluate_split(
                model, split, ground_pre, aerial_pre, protocol, device,
                batch_size=cell.evaluate.batch_size, num_workers=cell.evaluate.num_workers,
                manifest_hash=stable_hash(manifest), extra_positives=extra,
                feature_bank=feature_bank, descriptor_cache=cache, amp=cell.train.amp,
            )
            prefix = metric_prefix(key, protocol)
            metrics.update({f"{prefix}/{name}": value for name, value in result.metrics.items()})
            coverage[prefix] = result.coverage
            if workdir is not None:
                path = workdir / "ranks" / (prefix.replace("/", "__") + ".npz")
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(
                    path, ranks=result.ranks, query_index=result.query_index,
                    query_ids=np.asarray([split.query_ids[i] for i in result.query_index]),
                    **{k: v for k, v in result.extra.items() if k == "semi_hit"},
                )
                rank_files[prefix] = path
            log.info("%s: %s (%s)", prefix,
                     ", ".join(f"{k} {result.metrics[k]:.2f}" for k in HEADLINE if k in result.metrics),
                     result.coverage)
    return metrics, rank_files, manifests, coverage


def run_cell(
    cell: Cell,
    workdir: Path,
    device: torch.device | str | None = None,
    log_metrics: MetricLogger | None = None,
    resume: bool = True,
    use_cache: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> CellResult:
    """Train `cell` in `workdir` (resuming from its checkpoint) and evaluate every target."""
    device = torch.device(device) if device is not None else default_device()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cell.yaml").write_text(cell.to_yaml())

    ref = cell.datasets[cell.train.dataset]
    train_set = open_dataset(ref, ref.train_split)
    check_dataset(train_set)
    ground_pre, aerial_pre = preprocessing(cell, train_set)
    model = build_model(cell)
    train_pairs, val_pairs = split_train_val(train_set.pairs, cell.train.val_fraction, cell.seed)
    resuming = resume and (workdir / "checkpoint.pt").is_file()
    if not resuming and cell.train.epochs > 0:
        initialise_heads(model.to(device), train_pairs, ground_pre, aerial_pre, device, seed=cell.seed)
    bank = FeatureBank() if use_cache else None
    trainer = Trainer(cell, model, train_pairs, val_pairs, ground_pre, aerial_pre, workdir, device,
                      log_metrics=log_metrics, feature_bank=bank, val_name=cell.train.dataset)
    if on_epoch is not None:
        trainer.on_epoch = on_epoch
    outcome = trainer.fit(resume=resume)
    if trainer.rank != 0:
        return CellResult(cell.id, {}, outcome, workdir=workdir)
    load_weights(model, trainer.best_path)
    model.to(device)
    metrics, ranks, manifests, coverage = evaluate_targets(cell, model, device, workdir, bank, use_cache)
    manifests[f"train:{cell.train.dataset}"] = train_set.manifest()
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (workdir / "manifests.json").write_text(json.dumps(manifests, indent=2, sort_keys=True))
    return CellResult(cell.id, metrics, outcome, ranks, manifests, coverage, workdir)
