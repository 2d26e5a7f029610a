"""Evaluation: descriptors of queries and gallery, exact retrieval, metrics with coverage.

`evaluate_split(model, split, ...)` embeds the ground queries (with the protocol's
field-of-view crop) and the aerial gallery (with the protocol's misalignment), in
inference mode (autocast on GPU), then computes the metrics of `benchmark.metrics`.
Descriptors are cached under a key of (model weights, preprocessing, dataset manifest,
protocol), so re-evaluating an unchanged model costs nothing. With a frozen backbone the
backbone's patch features are cached instead (`FeatureBank`), shared by every aggregator
trained on top of it.

Images that cannot be read are excluded and the coverage is reported with the metrics
(`queries_evaluated`, `queries_total`), never silently dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from gengeo_bench import metrics as M
from gengeo_bench.cache import TensorCache, stable_hash, state_dict_hash
from gengeo_bench.datasets.base import EvalSplit
from gengeo_bench.imagedata import ImageDataset, collate, coverage_report
from gengeo_bench.model import CrossViewModel
from gengeo_bench.progress import progress_bar
from gengeo_bench.protocols import Protocol
from gengeo_bench.transforms import Preprocess

log = logging.getLogger(__name__)


def autocast(device: torch.device | str, amp: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it (fp16 otherwise); nothing on CPU or amp=off."""
    device = torch.device(device)
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cuda", dtype=torch.bfloat16)


def iterate_images(
    paths: Sequence[Path],
    pre: Preprocess,
    view: str,
    protocol: Protocol,
    batch_size: int,
    num_workers: int = 0,
    description: str = "",
):
    """Yield batches `{"image", "index", "ok"}` of one view's images, with a progress bar."""
    dataset = ImageDataset(paths, pre, protocol=protocol, view=view)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    with progress_bar(description or f"{view} images", total=len(loader), final_line=False) as advance:
        for batch in loader:
            yield batch
            advance()


@torch.inference_mode()
def embed_images(
    fn: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]],
    paths: Sequence[Path],
    pre: Preprocess,
    view: str,
    protocol: Protocol,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: str = "auto",
    description: str = "",
) -> dict[str, torch.Tensor]:
    """Apply `fn` to every image; returns the outputs stacked (float32, CPU) and `ok`."""
    outputs: dict[str, list[torch.Tensor]] = {}
    ok = []
    for batch in iterate_images(paths, pre, view, protocol, batch_size, num_workers, description):
        with autocast(device, amp):
            out = fn(batch["image"].to(device, non_blocking=True))
        if isinstance(out, torch.Tensor):
            out = {"out": out}
        for key, value in out.items():
            outputs.setdefault(key, []).append(value.float().cpu())
        ok.append(batch["ok"])
    result = {key: torch.cat(values) for key, values in outputs.items()}
    result["ok"] = torch.cat(ok) if ok else torch.zeros(0, dtype=torch.bool)
    return result


def view_protocol(protocol: Protocol, view: str) -> dict[str, Any] | None:
    """The part of a protocol that changes this view's images (cache keys ignore the rest:
    a field-of-view protocol reuses the gallery of the plain evaluation)."""
    return protocol.describe() if protocol.affects(view) else None


@dataclass
class FeatureBank:
    """Cached patch features of a frozen backbone for one image list (one view).

    The key covers the backbone's weights, the preprocessing, the image list (dataset
    manifest) and the protocol, so any change recomputes. Stored in float16.
    """

    cache: TensorCache = field(default_factory=lambda: TensorCache("features"))

    def features(
        self,
        backbone: torch.nn.Module,
        backbone_key: str,
        paths: Sequence[Path],
        pre: Preprocess,
        view: str,
        protocol: Protocol,
        device: torch.device,
        batch_size: int,
        num_workers: int = 0,
        manifest_hash: str = "",
    ) -> dict[str, torch.Tensor]:
        key = stable_hash({
            "backbone": backbone_key,
            "pre": pre.describe(),
            "view": view,
            "protocol": view_protocol(protocol, view),
            "images": manifest_hash or stable_hash([str(p) for p in paths]),
        })

        def compute() -> dict[str, torch.Tensor]:
            def fn(images: torch.Tensor) -> dict[str, torch.Tensor]:
                feats = backbone(images)
                out = {"patches": feats.patches.half()}
                if feats.cls is not None:
                    out["cls"] = feats.cls.half()
                return out

            return embed_images(fn, paths, pre, view, protocol, device, batch_size, num_workers,
                                description=f"{view} features (frozen backbone, cached)")

        return self.cache.get_or_compute(key, compute)


def backbone_key(model: CrossViewModel, view: str) -> str:
    backbone, _ = model.branch(view)
    return f"{type(backbone).__name__}-{state_dict_hash(backbone)}"


@torch.inference_mode()
def heads_on_features(model: CrossViewModel, view: str, feats: dict[str, torch.Tensor],
                      device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """One view's (L2-normalised) descriptors from cached backbone features."""
    from gengeo_bench.features import Features

    out = []
    for start in range(0, len(feats["patches"]), batch_size):
        patches = feats["patches"][start:start + batch_size].to(device).float()
        cls = feats.get("cls")
        cls = None if cls is None else cls[start:start + batch_size].to(device).float()
        out.append(model.aggregate(Features(patches, cls), view).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.out_dim)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    ranks: np.ndarray  # per evaluated query (censored at k_max)
    query_index: np.ndarray  # which queries were evaluated (indices into the split)
    coverage: str
    extra: dict[str, Any] = field(default_factory=dict)


def describe_view(
    model: CrossViewModel,
    split: EvalSplit,
    view: str,
    pre: Preprocess,
    protocol: Protocol,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    manifest_hash: str,
    feature_bank: FeatureBank | None,
    descriptor_cache: TensorCache | None,
    amp: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors and ok flags of the queries (ground) or the gallery (aerial)."""
    paths = split.queries if view == "ground" else split.gallery
    backbone, _ = model.branch(view)
    key = ""
    if descriptor_cache is not None:
        key = stable_hash({
            "model": state_dict_hash(model),
            "view": view,
            "pre": pre.describe(),
            "protocol": view_protocol(protocol, view),
            "images": manifest_hash or stable_hash([str(p) for p in paths]),
        })
        cached = descriptor_cache.get(key)
        if cached is not None:
            return cached["descriptors"], cached["ok"].bool()
    if feature_bank is not None and not any(p.requires_grad for p in backbone.parameters()):
        feats = feature_bank.features(backbone, backbone_key(model, view), paths, pre, view,
                                      protocol, device, batch_size, num_workers, manifest_hash)
        descriptors, ok = heads_on_features(model, view, feats, device), feats["ok"].bool()
    else:
        out = embed_images(lambda x: model.embed(x, view), paths, pre, view, protocol, device,
                           batch_size, num_workers, amp, description=f"{view} descriptors")
        descriptors, ok = out["out"], out["ok"].bool()
    if descriptor_cache is not None:
        descriptor_cache.put(key, {"descriptors": descriptors, "ok": ok.to(torch.uint8)})
    return descriptors, ok


def evaluate_split(
    model: CrossViewModel,
    split: EvalSplit,
    ground_pre: Preprocess,
    aerial_pre: Preprocess,
    protocol: Protocol | str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    manifest_hash: str = "",
    extra_positives: Sequence[np.ndarray] | None = None,
    feature_bank: FeatureBank | None = None,
    descriptor_cache: TensorCache | None = None,
    ks: Sequence[int] = (1, 5, 10),
    amp: str = "auto",
    return_descriptors: bool = False,
) -> EvalResult:
    """Metrics of `model` on one retrieval problem under one protocol."""
    device = torch.device(device)
    protocol = Protocol.parse(protocol)
    was_training = model.training
    model.eval()
    try:
        args = (device, batch_size, num_workers, manifest_hash, feature_bank, descriptor_cache, amp)
        q_desc, q_ok = describe_view(model, split, "ground", ground_pre, protocol, *args)
        g_desc, g_ok = describe_view(model, split, "aerial", aerial_pre, protocol, *args)
    finally:
        model.train(was_training)
    q_ok, g_ok = q_ok.numpy().astype(bool), g_ok.numpy().astype(bool)
    gt = np.asarray(split.gt, dtype=np.int64)
    # A query is evaluated when its own image and its positive's image were readable.
    evaluated = q_ok & g_ok[gt]
    coverage = coverage_report(q_ok, split.queries, "queries")
    if not g_ok.all():
        coverage += "; " + coverage_report(g_ok, split.gallery, "gallery images")
    if not evaluated.all():
        log.warning("evaluation coverage: %s", coverage)
    # Unreadable gallery items are left out of the gallery (their zero descriptor must
    # not compete); indices are remapped accordingly.
    keep = np.flatnonzero(g_ok)
    remap = np.full(len(g_ok), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    rows = np.flatnonzero(evaluated)
    semi = None
    if split.semi_positives is not None:
        semi = remap[np.asarray(split.semi_positives)[rows]]
    extra = None
    if extra_positives is not None:
        extra = [remap[np.asarray(extra_positives[r], dtype=np.int64)] for r in rows]
        extra = [e[e >= 0] for e in extra]
    result = M.retrieval_metrics(
        q_desc.numpy()[rows], g_desc.numpy()[keep], remap[gt[rows]], ks=ks,
        semi_positives=semi, extra_positives=extra, device=str(device), return_ranks=True,
    )
    ranks = result.pop("ranks")
    result.pop("top", None)
    semi_hit = result.pop("semi_hit", None)
    values = {k: float(v) for k, v in result.items()}
    for k in ks:
        lo, hi = M.bootstrap_ci(ranks < k)
        values[f"R{k}_ci_low"], values[f"R{k}_ci_high"] = lo, hi
    # R@1 of a random ranking: each query's share of true positives in the gallery.
    positives = np.ones(len(rows)) if extra is None else 1.0 + np.array([len(e) for e in extra])
    values["chance_R1"] = float(100.0 * np.mean(positives / max(len(keep), 1))) if len(rows) else 0.0
    values["queries_evaluated"] = float(len(rows))
    values["queries_total"] = float(len(q_ok))
    extra_out: dict[str, Any] = {"semi_hit": semi_hit} if semi_hit is not None else {}
    if return_descriptors:
        extra_out["query_descriptors"] = q_desc.numpy()
        extra_out["gallery_descriptors"] = g_desc.numpy()
    return EvalResult(values, ranks, rows, coverage, extra_out)
