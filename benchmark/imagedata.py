"""Torch datasets over image files: training pairs and evaluation images.

- `PairDataset(pairs, ground_pre, aerial_pre, augment, seed)`: one item per training
  `Pair`, `{"ground", "aerial", "index"}`, normalised tensors. With `augment=True` the
  paired augmentation (`benchmark.transforms.PairedAugment`) is drawn from a generator
  seeded by `(seed, epoch, index)`: call `set_epoch(epoch)` before each epoch. Item `i` of
  epoch `e` is the same tensor in any process, worker or batch order, so a resumed run
  reproduces the batches. (With `persistent_workers=True` the workers keep the epoch they
  were started with: leave persistent workers off, or rebuild the DataLoader per epoch.)
  A file that is missing or cannot be decoded raises `DataError` naming the path and the
  pair id: a training run stops with a clear message instead of training on less data.
  `cache_mb` keeps decoded images (uint8, at the model's input size) in memory up to that
  many MiB, so a small dataset is decoded once, not once per epoch; the tensors are the
  same either way (augmentation comes after). Each DataLoader worker has its own cache,
  and with workers, non-persistent, it lasts one epoch: it pays off with `num_workers: 0`.
- `ImageDataset(paths, pre, protocol=None, view="ground")`: evaluation images,
  `{"image", "index", "ok"}`. A file that cannot be decoded is logged
  (`logging.warning` with its path), recorded in `unreadable` (in this process), and the
  item is a zero image with `ok=False`: the evaluation engine excludes those items and
  reports the coverage (`coverage_report`), so a long evaluation neither crashes nor
  silently shrinks the test set. With DataLoader workers, rely on the batches' `ok` and
  `index` (each worker has its own copy of `unreadable`).
- `collate(items)`: stacks tensors, turns ints into an int64 tensor and bools (`ok`) into
  a bool tensor, and keeps anything else as a list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gengeo_bench.datasets.base import Pair
from gengeo_bench.errors import ConfigError, DataError
from gengeo_bench.protocols import Protocol
from gengeo_bench.transforms import PairedAugment, Preprocess, rng_for, to_float

log = logging.getLogger(__name__)


class PairDataset(Dataset):
    """Training pairs -> `{"ground": [3,hg,wg], "aerial": [3,ha,wa], "index": int}`."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        ground_pre: Preprocess,
        aerial_pre: Preprocess,
        augment: bool = True,
        seed: int = 0,
        augmentation: PairedAugment | None = None,
        cache_mb: int = 0,
    ):
        self.pairs = list(pairs)
        self.cache_bytes = int(cache_mb) * 2**20
        self.decoded: dict[tuple[str, int], np.ndarray] = {}
        self.decoded_bytes = 0
        self.ground_pre = ground_pre
        self.aerial_pre = aerial_pre
        self.augment = bool(augment)
        self.seed = int(seed)
        self.augmentation = augmentation if augmentation is not None else PairedAugment()
        self.epoch = 0
        if self.augment and self.augmentation.rotate and self.augmentation.rotate_p > 0:
            h, w = aerial_pre.size
            if h != w:
                raise ConfigError(
                    f"augmentation: quarter-turn rotations need a square aerial size, got "
                    f"{h}x{w}; set rotate: false or use a square aerial size"
                )

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, view: str, index: int) -> torch.Tensor:
        pair = self.pairs[index]
        pre, path = (self.ground_pre, pair.ground) if view == "ground" else (self.aerial_pre, pair.aerial)
        array = self.decoded.get((view, index))
        if array is None:
            try:
                array = pre.decode(path)
            except DataError as exc:
                raise DataError(f"training pair '{pair.id}': {exc}") from exc
            if self.decoded_bytes + array.nbytes <= self.cache_bytes:
                self.decoded[(view, index)] = array
                self.decoded_bytes += array.nbytes
        return to_float(array)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ground = self._load("ground", index)
        aerial = self._load("aerial", index)
        if self.augment:
            rng = rng_for(self.seed, self.epoch, index)
            ground, aerial = self.augmentation(ground, aerial, rng)
        return {
            "ground": self.ground_pre.normalize(ground),
            "aerial": self.aerial_pre.normalize(aerial),
            "index": int(index),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "ground": self.ground_pre.describe(),
            "aerial": self.aerial_pre.describe(),
            "augment": self.augmentation.describe() if self.augment else None,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return (
            f"PairDataset(pairs={len(self)}, ground={self.ground_pre.size}, "
            f"aerial={self.aerial_pre.size}, augment={self.augment}, seed={self.seed})"
        )


class ImageDataset(Dataset):
    """Evaluation images of one view -> `{"image": [3,h,w], "index": int, "ok": bool}`."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        pre: Preprocess,
        protocol: Protocol | str | dict | None = None,
        view: str = "ground",
    ):
        if view not in ("ground", "aerial"):
            raise ConfigError(f"ImageDataset: view must be 'ground' or 'aerial', got {view!r}")
        self.paths = [Path(p) for p in paths]
        self.pre = pre
        self.protocol = Protocol.parse(protocol)
        self.view = view
        self.unreadable: dict[int, str] = {}  # index -> reason (this process only)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        ok = True
        try:
            image = self.pre.load(path)
        except DataError as exc:
            ok = False
            self.unreadable[int(index)] = str(exc)
            log.warning("unreadable %s image #%d, excluded from evaluation: %s",
                        self.view, index, exc)
            image = torch.zeros(3, *self.pre.size)
        if self.protocol.affects(self.view):
            image = self.protocol.apply(image, index, self.view)
            if self.view == "ground":
                image = self.pre.fit_width(image)
        image = self.pre.normalize(image) if ok else torch.zeros_like(image)
        return {"image": image, "index": int(index), "ok": ok}

    def __repr__(self) -> str:
        return (
            f"ImageDataset(view={self.view!r}, images={len(self)}, size={self.pre.size}, "
            f"protocol={self.protocol.name!r})"
        )


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of item dicts: tensors -> stacked, bools -> bool tensor, ints -> int64
    tensor, anything else -> list."""
    if not items:
        return {}
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, np.bool_)):
            out[key] = torch.tensor([bool(v) for v in values], dtype=torch.bool)
        elif isinstance(first, (int, np.integer)):
            out[key] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        else:
            out[key] = values
    return out


def coverage_report(
    ok: Sequence[bool] | np.ndarray | torch.Tensor,
    paths: Sequence[str | Path],
    what: str = "queries",
    show: int = 5,
) -> str:
    """`"queries evaluated: 8,883 / 8,884; 1 unreadable: <path>"` from per-item `ok` flags."""
    flags = np.asarray(ok.cpu() if isinstance(ok, torch.Tensor) else ok, dtype=bool)
    bad = [str(paths[i]) for i in np.flatnonzero(~flags)]
    text = f"{what} evaluated: {int(flags.sum()):,} / {len(flags):,}"
    if bad:
        more = f" (and {len(bad) - show} more)" if len(bad) > show else ""
        text += f"; {len(bad):,} unreadable: " + ", ".join(bad[:show]) + more
    return text
