"""Look inside a model: where its aggregator puts patches, what its dustbin takes, what it retrieves.

GenGeo's two claims are about where features go: the cluster space shared by both views
aligns what the ground and the aerial view have in common, and SALAD's dustbin absorbs
what only one view shows. `benchmark explain` (and `benchmark run`, for every Cell)
measures both on a few test pairs and draws them, into one folder:

| file                     | what it shows                                                  |
|--------------------------|----------------------------------------------------------------|
| `assignments.png`        | per pair, the panorama and its aerial tile as the model saw    |
|                          | them, each patch coloured by its strongest cluster (one        |
|                          | palette for both views), and the dustbin's share per patch     |
| `cluster_usage.png`      | per view, the share of patches whose strongest cluster is k    |
| `gallery_successes.png`  | queries found at rank 0, with their top-5 aerial tiles         |
| `gallery_failures.png`   | queries not found at rank 0; the ground truth framed green     |
|                          | when it is in the top 5 (rank < 5), red (after them) otherwise |
| `retrieval.npz`          | every query's top-5 gallery indices, scores and rank           |
| `explain.json`           | the numbers below and the figures' file names                  |

Heads declare assignments through the aggregator contract's optional method
`assignments(features) -> [B, n_patches, m (+1 dustbin, last)]`, each row summing to 1
(`features.HasAssignments`): SALAD gives its Sinkhorn transport plan, NetVLAD its soft
assignment. A head without it (GeM) gets the galleries and a note instead of maps.

Cluster usage counts, per view, the patches whose strongest cluster (the dustbin left
out) is k. SALAD's marginals make every cluster's *mass* the same in every image, so mass
would show nothing; the strongest cluster shows which clusters describe which content.
A cluster used by one view only is a failure of alignment (`clusters_one_view_only`).
With `share: none` each view has its own clusters, and index k means nothing across views.

The dustbin, measured. SALAD gives every patch a mass of 1 and every cluster a mass of 1
in total, so with n patches and m clusters the dustbin takes n - m of the n: a share
(n - m) / n of every image (`marginal_share`), whatever its learned score (Sinkhorn's row
scaling cancels a constant row). That holds once Sinkhorn has converged; SALAD's few
iterations (3) fit the rows only approximately, so the measured `mean_share` may differ
a little. Training decides *where* that mass comes from:

- one-view masks (the synthetic world writes `masks/<image stem>.png` beside each image,
  255 = content only that view shows): a patch counts as one-view when more than half of
  its pixels are masked (`ONE_VIEW`); `dustbin_on_unmatched` is the share of the
  dustbin's mass on one-view patches, `unmatched_base_rate` the share of patches that are
  one-view. A dustbin that filters partial correspondence puts clearly more mass there
  than the base rate (`lift` = the ratio).
- CVUSA's annotations (`streetview/annotations/<id>.png`, one of 4 classes per panorama
  pixel): a patch takes its majority class, and each class gets its share of the patches
  and of the dustbin's mass.

Numbers are percent, over `MEASURE_PAIRS` test pairs (the maps show the first `pairs`).
Images appear as the model saw them: preprocessed, and under the protocol.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gengeo_bench import explain_figures as figures
from gengeo_bench import progress
from gengeo_bench.builders import (
    EVAL_KEY,
    build_model,
    checkpoint_model,
    default_device,
    descriptor_cache,
    load_weights,
    open_dataset,
    preprocessing,
)
from gengeo_bench.cache import stable_hash
from gengeo_bench.config import Cell
from gengeo_bench.datasets.base import EvalSplit
from gengeo_bench.evaluate import evaluate_split
from gengeo_bench.explain_figures import GalleryRow, GalleryTile, ViewSample
from gengeo_bench.imagedata import ImageDataset
from gengeo_bench.metrics import topk_search
from gengeo_bench.model import CrossViewModel
from gengeo_bench.protocols import Protocol
from gengeo_bench.transforms import Preprocess, crop_row_range

TOP_K = figures.TOP_K  # tiles per gallery row; the frame is green when rank < TOP_K
MAP_PAIRS = 4  # pairs drawn in the assignment maps (`--pairs`)
MEASURE_PAIRS = 32  # pairs the numbers are measured on (at least `pairs`)
GALLERY_ROWS = 4  # queries per gallery
ONE_VIEW = figures.ONE_VIEW  # a patch is one-view when more than this share is masked
# Annotation classes in label order. CVUSA: the 4 classes of Zhai et al. (CVPR 2017), the
# ids as their code (viibridges/crossnet) reads them and the sample panoramas show them.
# The synthetic world: benchmark/world_scene.py's LABELS.
CLASS_NAMES = {"cvusa": ("sky", "building", "road", "vegetation"),
               "synthetic": ("sky", "man-made", "ground", "vegetation")}
FIGURES = {"assignments": "assignments.png", "cluster_usage": "cluster_usage.png",
           "gallery_successes": "gallery_successes.png", "gallery_failures": "gallery_failures.png"}


# --- what a head declares ----------------------------------------------------------------


def has_assignments(head: torch.nn.Module) -> bool:
    """Whether the head implements the contract's optional `assignments` method."""
    return callable(getattr(head, "assignments", None))


def num_clusters(head: torch.nn.Module, columns: int) -> tuple[int, bool]:
    """(m, whether the last of `columns` assignment columns is a dustbin).

    The contract puts a dustbin in one column more than `num_clusters`; a head without a
    `num_clusters` attribute has a dustbin when it says so (`dustbin = True`).
    """
    m = getattr(head, "num_clusters", None)
    if isinstance(m, int):
        return m, columns == m + 1
    dustbin = bool(getattr(head, "dustbin", False))
    return columns - int(dustbin), dustbin


# --- one-view masks and annotations --------------------------------------------------------


def mask_path(image: Path) -> Path | None:
    """The one-view mask of an image, when it has one: `masks/<stem>.png` beside it (the
    synthetic world's rule; 255, or a 1-bit True, where only this view has content)."""
    path = Path(image).parent / "masks" / f"{Path(image).stem}.png"
    return path if path.is_file() else None


def annotation_path(ground: Path) -> Path | None:
    """A CVUSA-layout panorama's label image: `streetview/annotations/<id>.png`."""
    ground = Path(ground)
    if ground.parent.name != "panos":
        return None
    path = ground.parent.parent / "annotations" / f"{ground.stem}.png"
    return path if path.is_file() else None


def read_mask(path: Path) -> np.ndarray:
    """`[1, H, W]` bool: the pixels a one-view mask marks (255; anything above 127)."""
    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) > 127)[None]


def read_labels(path: Path, n: int) -> np.ndarray:
    """`[n, H, W]` bool: one plane per label 0..n-1 of a label image."""
    with Image.open(path) as im:
        labels = np.asarray(im.convert("L"))
    return np.stack([labels == k for k in range(n)])


def label_planes(planes: np.ndarray, pre: Preprocess, protocol: Protocol, index: int,
                 view: str) -> torch.Tensor:
    """`[C, H, W]` float: the share of each model-input pixel that each plane covers.

    Label planes at the image's stored size go through the image's own geometry: the
    same row crop, a resize to the model's input size (antialiased, so a pixel's value is
    an area share) and the protocol's crop or shift of this image (`index` seeds it, as
    in evaluation).
    """
    r0, r1 = crop_row_range(pre.crop_rows, planes.shape[1])
    x = torch.from_numpy(planes[:, int(math.floor(r0 + 0.5)):int(math.floor(r1 + 0.5))]).float()
    x = F.interpolate(x[None], size=pre.size, mode="bilinear", antialias=True, align_corners=False)[0]
    if protocol.affects(view):
        x = protocol.apply(x, index, view)
        if view == "ground":
            x = pre.fit_width(x)
    return x.clamp(0.0, 1.0)


def patch_shares(planes: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """`[C, h, w]`: each plane's mean over each patch of the grid."""
    return F.adaptive_avg_pool2d(planes[None], grid)[0].numpy()


# --- running the heads on a few pairs --------------------------------------------------------


@torch.inference_mode()
def sample_view(model: CrossViewModel, view: str, paths: list[Path], indices: list[int],
                pre: Preprocess, protocol: Protocol, device: torch.device,
                classes: int = 0) -> list[ViewSample]:
    """The images `indices` of `paths` as the model sees them, with their assignments.

    `classes` > 0: the ground view's annotations, when there are any, give each patch
    its majority class among `range(classes)`.
    """
    backbone, head = model.branch(view)
    images = ImageDataset(paths, pre, protocol=protocol, view=view)
    batch = torch.stack([images[i]["image"] for i in indices])
    features = backbone(batch.to(device))
    grid = tuple(features.patches.shape[-2:])
    assign = head.assignments(features).float().cpu().numpy() if has_assignments(head) else None
    out = []
    for j, i in enumerate(indices):
        sample = ViewSample(view=view, path=Path(paths[i]), index=i,
                            image=pre.denormalize(batch[j]).clamp(0, 1).permute(1, 2, 0).numpy(),
                            assign=None if assign is None else assign[j].reshape(*grid, -1))
        mask = mask_path(paths[i])
        if mask is not None:
            planes = label_planes(read_mask(mask), pre, protocol, i, view)
            sample.one_view = planes[0].numpy()
            sample.one_view_share = patch_shares(planes, grid)[0]
        labels = annotation_path(paths[i]) if view == "ground" and classes else None
        if labels is not None:
            planes = label_planes(read_labels(labels, classes), pre, protocol, i, view)
            shares = patch_shares(planes, grid)
            sample.classes = shares.argmax(axis=0)
        out.append(sample)
    return out


def cluster_usage(samples: list[ViewSample], m: int) -> list[float]:
    """Percent of the patches whose strongest cluster (the dustbin left out) is k, per k."""
    strongest = np.concatenate([s.assign[..., :m].argmax(axis=-1).ravel() for s in samples])
    return (100.0 * np.bincount(strongest, minlength=m) / max(len(strongest), 1)).tolist()


def unmatched_numbers(dustbin: np.ndarray, one_view: np.ndarray) -> dict[str, float]:
    """The dustbin's mass on one-view patches against their share of the patches.

    `dustbin` `[N]`: each patch's dustbin share; `one_view` `[N]` bool. Percent.
    """
    total = float(dustbin.sum())
    base = 100.0 * float(one_view.mean()) if len(one_view) else float("nan")
    on = 100.0 * float(dustbin[one_view].sum()) / total if total > 0 else float("nan")
    return {"dustbin_on_unmatched": on, "unmatched_base_rate": base,
            "lift": on / base if base > 0 else float("nan"),
            "dustbin_share_of_one_view_patches": 100.0 * float(dustbin[one_view].mean())
            if one_view.any() else float("nan"),
            "dustbin_share_of_other_patches": 100.0 * float(dustbin[~one_view].mean())
            if (~one_view).any() else float("nan"),
            "patches": int(len(one_view)), "one_view_patches": int(one_view.sum())}


def class_numbers(dustbin: np.ndarray, classes: np.ndarray, names: tuple[str, ...]) -> list[dict]:
    """Per annotation class: its share of the patches and of the dustbin's mass (percent)."""
    total = float(dustbin.sum())
    out = []
    for k, name in enumerate(names):
        chosen = classes == k
        out.append({"class": name, "label": k, "patches": int(chosen.sum()),
                    "share_of_patches": 100.0 * float(chosen.mean()),
                    "share_of_dustbin_mass": 100.0 * float(dustbin[chosen].sum()) / total
                    if total > 0 else float("nan"),
                    "mean_dustbin_share": 100.0 * float(dustbin[chosen].mean())
                    if chosen.any() else float("nan")})
    return out


def measure(pairs: list[tuple[ViewSample, ViewSample]], m: int, dustbin: bool,
            class_names: tuple[str, ...]) -> dict[str, Any]:
    """Cluster usage per view and, with a dustbin, where its mass goes (see the module doc)."""
    views = {"ground": [g for g, _ in pairs], "aerial": [a for _, a in pairs]}
    usage = {view: cluster_usage(samples, m) for view, samples in views.items()}
    used = {view: {k for k, u in enumerate(values) if u > 0} for view, values in usage.items()}
    out: dict[str, Any] = {
        "num_clusters": m,
        "cluster_usage": usage,
        "usage_rule": "percent of patches whose strongest cluster (dustbin left out) is k",
        "clusters_one_view_only": {"ground": sorted(used["ground"] - used["aerial"]),
                                   "aerial": sorted(used["aerial"] - used["ground"])},
        "clusters_unused": sorted(set(range(m)) - used["ground"] - used["aerial"]),
    }
    if not dustbin:
        return out
    share: dict[str, Any] = {}
    unmatched: dict[str, Any] = {}
    for view, samples in (*views.items(), ("both", views["ground"] + views["aerial"])):
        bins = np.concatenate([s.assign[..., -1].ravel() for s in samples])
        share[view] = 100.0 * float(bins.mean())
        if all(s.one_view_share is not None for s in samples):
            flags = np.concatenate([(s.one_view_share > ONE_VIEW).ravel() for s in samples])
            unmatched[view] = unmatched_numbers(bins, flags)
    grids = {view: samples[0].assign.shape[0] * samples[0].assign.shape[1]
             for view, samples in views.items()}
    out["dustbin"] = {
        "mean_share": share,
        "marginal_share": {view: 100.0 * (n - m) / n for view, n in grids.items()},
        "marginal_rule": "SALAD's marginals: n patches of mass 1, m clusters of mass 1, the "
                         "dustbin the other n - m: a share (n - m) / n, exact once Sinkhorn has "
                         "converged (mean_share is measured after the head's iterations)",
        "unmatched": unmatched or None,
        "unmatched_rule": (f"a patch is one-view when more than {ONE_VIEW:.0%} of its pixels are "
                           "masked (255 in masks/<name>); dustbin_on_unmatched = share of the "
                           "dustbin's mass on one-view patches; unmatched_base_rate = share of "
                           "the patches that are one-view"),
    }
    if not unmatched:
        out["dustbin"]["unmatched_note"] = ("no one-view masks beside these images (masks/ "
                                            "folder, same names): nothing to measure against")
    ground = views["ground"]
    if class_names and all(s.classes is not None for s in ground):
        bins = np.concatenate([s.assign[..., -1].ravel() for s in ground])
        labels = np.concatenate([s.classes.ravel() for s in ground])
        out["dustbin"]["classes"] = class_numbers(bins, labels, class_names)
        out["dustbin"]["classes_rule"] = ("ground patches, each of its majority annotation class "
                                          "(streetview/annotations/<id>.png)")
    return out


# --- retrieval -------------------------------------------------------------------------------


@dataclass
class Retrieval:
    """Every query's top-k gallery items (`-1` pads a short gallery) and its rank (`-1`:
    not evaluated: its image or its positive's could not be read)."""

    query_ids: list[str]
    gallery_ids: list[str]
    queries: list[str]  # image paths
    gallery: list[str]
    gt: np.ndarray  # [Q] the positive's gallery index
    top: np.ndarray  # [Q, k]
    scores: np.ndarray  # [Q, k]
    ranks: np.ndarray  # [Q]
    gt_scores: np.ndarray  # [Q] the query's similarity to its positive
    positives: list[list[int]] | None = None  # further correct tiles (CVACT within 5 m)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, query_ids=np.asarray(self.query_ids),
                            gallery_ids=np.asarray(self.gallery_ids),
                            queries=np.asarray(self.queries), gallery=np.asarray(self.gallery),
                            gt=self.gt, top=self.top, scores=self.scores, ranks=self.ranks,
                            gt_scores=self.gt_scores)

    @classmethod
    def load(cls, path: Path) -> Retrieval:
        with np.load(path, allow_pickle=False) as data:
            return cls(*(data[k].tolist() for k in ("query_ids", "gallery_ids", "queries", "gallery")),
                       gt=data["gt"], top=data["top"], scores=data["scores"], ranks=data["ranks"],
                       gt_scores=data["gt_scores"])

    def row(self, q: int, label: str = "") -> GalleryRow:
        """Query `q` with its top-k tiles, the positives marked, for a gallery figure."""
        correct = {int(self.gt[q]), *(self.positives[q] if self.positives else [])}
        tiles = [GalleryTile(Path(self.gallery[g]), self.gallery_ids[g], float(s), g in correct)
                 for g, s in zip(self.top[q].tolist(), self.scores[q].tolist(), strict=True) if g >= 0]
        gt = int(self.gt[q])
        return GalleryRow(Path(self.queries[q]), self.query_ids[q], int(self.ranks[q]), tiles,
                          GalleryTile(Path(self.gallery[gt]), self.gallery_ids[gt],
                                      float(self.gt_scores[q]), True),
                          label=label)


def retrieve(cell: Cell, model: CrossViewModel, key: str, protocol: Protocol,
             device: torch.device) -> Retrieval:
    """Top-k retrieval of one target's test split, through the evaluation path (its
    descriptor cache: after a Cell's evaluation this costs no forward pass)."""
    ref = cell.datasets[key]
    dataset = open_dataset(ref, ref.test_split)
    ground_pre, aerial_pre = preprocessing(cell, dataset)
    split = dataset.evaluation()
    extra = dataset.positives_within(5.0) if getattr(dataset, "protocol", None) == "within_5m" else None
    result = evaluate_split(model, split, ground_pre, aerial_pre, protocol, device,
                            batch_size=cell.evaluate.batch_size,
                            manifest_hash=stable_hash(dataset.manifest()),
                            extra_positives=extra, descriptor_cache=descriptor_cache(),
                            amp=cell.train.amp, return_descriptors=True)
    queries = result.extra["query_descriptors"]
    gallery = result.extra["gallery_descriptors"]
    # An unreadable gallery image has a zero descriptor; evaluation leaves it out, so do we.
    keep = np.flatnonzero(np.linalg.norm(gallery, axis=1) > 0)
    top = np.full((len(queries), TOP_K), -1, dtype=np.int64)
    scores = np.full((len(queries), TOP_K), np.nan, dtype=np.float32)
    for start, s, idx in topk_search(queries, gallery[keep], TOP_K, device=str(device)):
        top[start:start + len(idx), :idx.shape[1]] = keep[idx]
        scores[start:start + len(idx), :idx.shape[1]] = s
    ranks = np.full(len(queries), -1, dtype=np.int64)
    ranks[result.query_index] = result.ranks
    gt = np.asarray(split.gt, dtype=np.int64)
    gt_scores = np.einsum("qd,qd->q", queries, gallery[gt]).astype(np.float32)
    return Retrieval(list(split.query_ids), list(split.gallery_ids), [str(p) for p in split.queries],
                     [str(p) for p in split.gallery], gt, top, scores, ranks, gt_scores,
                     positives=None if extra is None else [list(map(int, e)) for e in extra])


def pick(candidates: np.ndarray, n: int, seed: int) -> list[int]:
    """`n` of `candidates` at random (seeded), in index order."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
    return sorted(int(c) for c in chosen)


def discordant_rows(method: Retrieval, baseline: Retrieval, label_method: str, label_baseline: str,
                    per_side: int = 3, seed: int = 0) -> tuple[list[GalleryRow], int, int]:
    """Gallery rows of the queries one model finds at rank 0 and the other does not.

    Queries are matched by id. Up to `per_side` of each kind, drawn at random (seeded):
    each query gives two rows, the method's retrieval then the baseline's. Returns the
    rows and how many queries of each kind there are (method only, baseline only).
    """
    ids = {q: i for i, q in enumerate(baseline.query_ids)}
    pairs = [(i, ids[q]) for i, q in enumerate(method.query_ids) if q in ids]
    pairs = [(a, b) for a, b in pairs if method.ranks[a] >= 0 and baseline.ranks[b] >= 0]
    only_method = [k for k, (a, b) in enumerate(pairs) if method.ranks[a] == 0 < baseline.ranks[b]]
    only_baseline = [k for k, (a, b) in enumerate(pairs) if baseline.ranks[b] == 0 < method.ranks[a]]
    rows = []
    for kind, chosen in (("method right, baseline wrong", only_method),
                         ("baseline right, method wrong", only_baseline)):
        for k in pick(np.asarray(chosen, dtype=np.int64), per_side, seed):
            a, b = pairs[k]
            rows.append(method.row(a, f"{kind}\nmethod: {label_method}"))
            rows.append(baseline.row(b, f"{kind}\nbaseline: {label_baseline}"))
    return rows, len(only_method), len(only_baseline)


# --- one target ------------------------------------------------------------------------------


def method_label(cell: Cell) -> str:
    """`resnet_small + salad[clusters, dustbin]`, as the report labels methods."""
    from gengeo_bench.report_load import aggregator_label

    agg = cell.model.aggregator
    dustbin = agg.params.get("dustbin")
    return f"{cell.model.backbone.name} + {aggregator_label(agg.name, agg.share, dustbin)}"


def explain_target(cell: Cell, model: CrossViewModel, key: str, out: Path, device: torch.device,
                   protocol: str = "none", pairs: int = MAP_PAIRS, seed: int = 0,
                   dataset_label: str | None = None) -> dict[str, Any]:
    """Figures, `retrieval.npz` and `explain.json` of one target into `out`; returns the json.

    `model` is in eval mode on `device`. Pairs are drawn at random (seeded) among the
    queries that were evaluated.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label = dataset_label or key
    proto = Protocol.parse(protocol)
    ref = cell.datasets[key]
    dataset = open_dataset(ref, ref.test_split)
    split: EvalSplit = dataset.evaluation()
    ground_pre, aerial_pre = preprocessing(cell, dataset)
    retrieval = retrieve(cell, model, key, proto, device)
    retrieval.save(out / "retrieval.npz")
    evaluated = np.flatnonzero(retrieval.ranks >= 0)
    method = method_label(cell)
    where = f"{label} ({ref.test_split}{'' if proto.name == 'none' else ', ' + proto.name})"
    summary: dict[str, Any] = {
        "method": method, "cell_id": cell.id, "dataset": label, "split": ref.test_split,
        "protocol": proto.name, "aggregator": cell.model.aggregator.name,
        "share": cell.model.aggregator.share, "units": "percent",
        "retrieval": {"queries": int(len(evaluated)), "gallery": len(split.gallery),
                      "R1": 100.0 * float(np.mean(retrieval.ranks[evaluated] < 1)),
                      f"R{TOP_K}": 100.0 * float(np.mean(retrieval.ranks[evaluated] < TOP_K))},
        "figures": {},
    }
    found = evaluated[retrieval.ranks[evaluated] == 0]
    missed = evaluated[retrieval.ranks[evaluated] > 0]
    for name, chosen, what in (("gallery_successes", found, "found at rank 0"),
                               ("gallery_failures", missed, "not found at rank 0")):
        rows = [retrieval.row(q) for q in pick(chosen, GALLERY_ROWS, seed)]
        if proto.affects("ground"):  # show the part of the panorama the model saw
            queries = ImageDataset(split.queries, ground_pre, protocol=proto, view="ground")
            for row, q in zip(rows, pick(chosen, GALLERY_ROWS, seed), strict=True):
                image = ground_pre.denormalize(queries[q]["image"]).clamp(0, 1)
                row.query_image = image.permute(1, 2, 0).numpy()
        if rows:
            figures.gallery_figure(rows, f"{method} on {where}: {len(rows)} random queries {what} "
                                   f"(of {len(chosen)})", out / FIGURES[name])
            summary["figures"][name] = FIGURES[name]
    _, head = model.branch("ground")
    if not has_assignments(head):
        summary["assignments"] = None
        summary["note"] = (f"aggregator '{cell.model.aggregator.name}' declares no cluster "
                           "assignments (the aggregator contract's optional `assignments` method): "
                           "no assignment maps, cluster usage or dustbin numbers; galleries only.")
    else:
        chosen = pick(evaluated, max(pairs, MEASURE_PAIRS), seed)
        # The maps show the first `pairs` of the measured pairs (drawn first, then the rest).
        order = pick(np.asarray(chosen), pairs, seed + 1)
        chosen = order + [c for c in chosen if c not in order]
        names = CLASS_NAMES.get(ref.name, ())
        ground = sample_view(model, "ground", split.queries, chosen, ground_pre, proto, device,
                             classes=len(names))
        aerial = sample_view(model, "aerial", split.gallery, [int(split.gt[q]) for q in chosen],
                             aerial_pre, proto, device)
        samples = list(zip(ground, aerial, strict=True))
        m, dustbin = num_clusters(head, ground[0].assign.shape[-1])
        numbers = measure(samples, m, dustbin, names)
        if cell.model.aggregator.share == "none":  # index k is not one cluster across views
            numbers["clusters_one_view_only"] = None
            numbers["clusters_one_view_only_note"] = ("share: none: each view has its own "
                                                      "clusters, so none is one view's only")
        numbers["pairs_measured"] = len(samples)
        numbers["pairs_drawn"] = [split.query_ids[q] for q in order]
        summary["assignments"] = numbers
        shared = cell.model.aggregator.share != "none"
        note = ("one cluster space for both views (share: " + cell.model.aggregator.share + "): "
                "the same colour is the same cluster" if shared else
                "share: none: each view has its own clusters, so a colour means nothing across views")
        figures.assignment_figure(samples[:len(order)], m, dustbin,
                                  f"{method} on {where}: patch assignments", note,
                                  out / FIGURES["assignments"], numbers)
        figures.usage_figure(numbers, f"{method} on {where}: cluster usage over "
                             f"{len(samples)} pairs", note, out / FIGURES["cluster_usage"])
        summary["figures"]["assignments"] = FIGURES["assignments"]
        summary["figures"]["cluster_usage"] = FIGURES["cluster_usage"]
    summary = _json_ready(summary)
    (out / "explain.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def _json_ready(value: Any) -> Any:
    """The same structure with NaN (a share of nothing: no mask, an empty dustbin) as None,
    so explain.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def explain(checkpoint: str | Path, dataset: str, out: str | Path, root: str | None = None,
            split: str = "test", options: tuple[str, ...] = (), protocol: str = "none",
            pairs: int = MAP_PAIRS, device: str | None = None, batch_size: int = 64) -> dict[str, Any]:
    """`benchmark explain`: a checkpoint on one dataset split (rebuilt as `benchmark evaluate`
    rebuilds it); returns what `explain.json` holds."""
    cell, model = checkpoint_model(checkpoint, dataset, root, split, options, (protocol,), batch_size)
    dev = torch.device(device) if device else default_device()
    model.to(dev).eval()
    return explain_target(cell, model, EVAL_KEY, Path(out), dev, protocol, pairs, dataset_label=dataset)


def cell_metrics(key: str, summary: dict[str, Any]) -> dict[str, float]:
    """The dustbin numbers of one target as MLflow metrics (`test/<key>/dustbin_share` ...)."""
    dustbin = (summary.get("assignments") or {}).get("dustbin")
    if not dustbin:
        return {}
    out = {f"test/{key}/dustbin_share": dustbin["mean_share"]["both"]}
    both = (dustbin.get("unmatched") or {}).get("both")
    if both:
        out[f"test/{key}/dustbin_on_unmatched"] = both["dustbin_on_unmatched"]
        out[f"test/{key}/unmatched_base_rate"] = both["unmatched_base_rate"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def explain_cell(cell: Cell, workdir: Path, device: str | torch.device | None = None) -> dict[str, float]:
    """After a Cell's run: `workdir/explain/<target>/` for every target (plain protocol, a
    few pairs), from its best checkpoint; returns the dustbin numbers as metrics.

    Inspection never fails a trained Cell: an error is logged, and what was written stays.
    """
    folder = Path(workdir) / "explain"
    shutil.rmtree(folder, ignore_errors=True)  # nothing stale from an earlier run
    metrics: dict[str, float] = {}
    try:
        dev = torch.device(device) if device else default_device()
        model = build_model(cell)
        load_weights(model, Path(workdir) / "best.pt")
        model.to(dev).eval()
        for key in cell.targets:
            summary = explain_target(cell, model, key, folder / key, dev)
            metrics.update(cell_metrics(key, summary))
    except Exception as exc:  # a figure or a measurement must not lose the Cell
        progress.log_line(f"warning: {cell.name} ({cell.id}): explain failed, the Cell's results "
                          f"stand: {type(exc).__name__}: {exc}")
    return metrics
