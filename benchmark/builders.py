"""From a Cell to the objects a run needs: datasets, preprocessing, the model, caches.

`engine.run_cell`, `benchmark evaluate` and the benchmarks under perf/ build what they
need here, so a Cell means the same thing on every path; `train.py` holds training only.
A checkpoint records its Cell (`cell_yaml`): `checkpoint_model` rebuilds the model from it
and points its evaluation at one dataset split (`benchmark evaluate`, `benchmark explain`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from gengeo_bench import registry
from gengeo_bench.cache import TensorCache
from gengeo_bench.config import Cell, DatasetRef, parse_options, validate_cell
from gengeo_bench.datasets.base import CrossViewDataset
from gengeo_bench.errors import ConfigError, DataError
from gengeo_bench.model import CrossViewModel
from gengeo_bench.transforms import Preprocess


def open_dataset(ref: DatasetRef, split: str) -> CrossViewDataset:
    """The registry's loader for one split of a dataset reference."""
    params = {**ref.params, "split": split}
    if ref.root is not None:
        params["root"] = ref.root
    return registry.build("dataset", ref.name, **params)


def check_dataset(dataset: CrossViewDataset) -> None:
    """The cheap part of `benchmark data check` (files exist), before the first step."""
    from gengeo_bench.datasets import checks

    report = checks.check_dataset(dataset, decode=False, size_check=False)
    skipped = getattr(dataset, "skipped_missing", [])
    if not checks.is_usable(report, skipped):
        raise DataError(f"{dataset!r} is not usable: " + " ".join(checks.summary_lines(report, skipped))
                        + f" Run `benchmark data check --dataset {dataset.name} --root {dataset.root}`"
                        " for the full report.")


def build_model(cell: Cell) -> CrossViewModel:
    """The Cell's model, initialised from its seed, for its preprocessed image sizes."""
    ground, aerial = preprocessing(cell)
    torch.manual_seed(cell.seed)
    m = cell.model
    return CrossViewModel(
        m.backbone.name, m.aggregator.name,
        backbone_params=m.backbone.params,
        aggregator_params=m.aggregator.params,
        share_backbone=m.share_backbone,
        share=m.aggregator.share,
        image_size={"ground": ground.size, "aerial": aerial.size},
    )


def preprocessing(cell: Cell, dataset: CrossViewDataset | None = None) -> tuple[Preprocess, Preprocess]:
    """Ground and aerial preprocessing from the backbone's registry contract + the Cell."""
    meta = registry.meta("backbone", cell.model.backbone.name)
    sizes = cell.train.image_size
    crop = getattr(dataset, "ground_crop_rows", None) if dataset is not None else None
    ground = Preprocess.from_meta(meta, "ground", size=sizes.ground if sizes else None,
                                  crop_rows=crop)
    aerial = Preprocess.from_meta(meta, "aerial", size=sizes.aerial if sizes else None)
    return ground, aerial


def default_device() -> torch.device:
    """The local GPU (this rank's under torchrun) when there is one, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def load_weights(model: CrossViewModel, path: Path) -> dict[str, Any]:
    """Load a `best.pt` / `checkpoint.pt` (weights_only) into `model`; returns the record."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return state


def descriptor_cache() -> TensorCache:
    """The cache of evaluation descriptors (see cache.py for its keys)."""
    return TensorCache("descriptors")


# The dataset key of the one target a re-targeted checkpoint is evaluated on.
EVAL_KEY = "_eval"


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Cell a checkpoint was trained as, as a dict; the checkpoint's whole record)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "cell_yaml" not in state:
        raise ConfigError(f"{path}: not a GenGeo Bench checkpoint (no cell_yaml record); for a "
                          f"released Sample4Geo checkpoint: benchmark evaluate --format sample4geo.")
    return yaml.safe_load(state["cell_yaml"]), state


def retarget_cell(data: dict[str, Any], dataset: str, root: str | None = None, split: str = "test",
                  options: tuple[str, ...] = (), protocols: tuple[str, ...] = ("none",),
                  batch_size: int = 64) -> Cell:
    """The Cell `data`, evaluated on one split of one dataset instead of its own targets.

    The dataset becomes the only target, under the key `EVAL_KEY`; `options` are loader
    options as `KEY=VALUE` strings (values read as YAML: `pairs=300`, `corrected=true`).
    """
    params = parse_options(options, "dataset", dataset)
    data = dict(data)
    data["datasets"] = {**data.get("datasets", {}), EVAL_KEY: DatasetRef(
        name=dataset, root=root, test_split=split, train_split=split, **params).model_dump()}
    data["evaluate"] = {**data.get("evaluate", {}), "targets": [EVAL_KEY],
                        "protocols": list(protocols), "batch_size": batch_size}
    return validate_cell(data, "--dataset/--option/--protocol")


def checkpoint_model(checkpoint: str | Path, dataset: str, root: str | None = None,
                     split: str = "test", options: tuple[str, ...] = (),
                     protocols: tuple[str, ...] = ("none",),
                     batch_size: int = 64) -> tuple[Cell, CrossViewModel]:
    """A checkpoint's Cell re-targeted to one dataset split (`retarget_cell`), and its
    model with the checkpoint's weights (on the CPU)."""
    data, state = read_checkpoint(checkpoint)
    cell = retarget_cell(data, dataset, root, split, options, protocols, batch_size)
    model = build_model(cell)
    model.load_state_dict(state["model"])
    return cell, model
