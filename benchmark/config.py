"""The Cell: one fully resolved unit of work (model, recipe, data, evaluation, seed).

The runner expands a matrix into Cells, the tuner samples Cells, `benchmark train`
reads one Cell from a YAML file; all of them validate through `load_cell` /
`validate_cell` here, so a typo is a `ConfigError` naming the file and the field
before any work starts.

A Cell's id is a hash of its *semantic* content: what changes the numbers. Paths
(dataset roots), worker counts and devices are left out, so moving a dataset or running
on another machine keeps the id (and a finished Cell is not re-run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from gengeo_bench import registry
from gengeo_bench.errors import BenchmarkError, ConfigError
from gengeo_bench.model import check_share

# Fields that do not change results: left out of the Cell id.
NON_SEMANTIC = {("train", "num_workers"), ("train", "image_cache_mb"), ("evaluate", "num_workers"),
                ("evaluate", "batch_size")}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginRef(BaseModel):
    """`{name: ..., <param>: value, ...}`: a registry name and its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AggregatorRef(PluginRef):
    share: Literal["none", "clusters", "all"] = "none"


class ModelConfig(Strict):
    backbone: PluginRef
    aggregator: AggregatorRef
    share_backbone: bool = True


class DatasetRef(BaseModel):
    """A dataset as a run sees it: loader name, root on disk and loader options."""

    model_config = ConfigDict(extra="allow")
    name: str
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ImageSize(Strict):
    ground: tuple[int, int]
    aerial: tuple[int, int]


class TrainConfig(Strict):
    dataset: str
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-4, gt=0, description="backbone learning rate")
    head_lr: float = Field(1e-3, gt=0, description="aggregator (and temperature) learning rate")
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.07, gt=0, description="initial InfoNCE temperature")
    learn_temperature: bool = True
    grad_clip: float | None = Field(1.0, gt=0)
    sampler: Literal["random", "gps", "similarity"] = "random"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    augment: bool = True
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    image_size: ImageSize | None = None
    steps_per_epoch: int | None = Field(None, ge=1, description="cap (quick runs)")
    num_workers: int = Field(0, ge=0)
    image_cache_mb: int = Field(
        1024, ge=0, description="decoded training images kept in memory (per process; 0: none)")


class EvaluateConfig(Strict):
    targets: list[str] = Field(default_factory=list, description="dataset keys; [] = the training one")
    protocols: list[str] = Field(default_factory=lambda: ["none"])
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)


class Cell(Strict):
    name: str = "cell"
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    datasets: dict[str, DatasetRef]
    seed: int = 0

    @property
    def targets(self) -> list[str]:
        return self.evaluate.targets or [self.train.dataset]

    def semantic(self) -> dict[str, Any]:
        """The content that defines the Cell's results (no paths, workers, devices)."""
        data = self.model_dump(mode="json")
        data.pop("name")
        for section, key in NON_SEMANTIC:
            data[section].pop(key, None)
        for ref in data["datasets"].values():
            ref.pop("root", None)
        return data

    @property
    def id(self) -> str:
        canonical = json.dumps(self.semantic(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- dotted paths into a Cell (matrix axes, search spaces) ---------------------------

PLUGIN_KINDS = {"backbone": "backbone", "aggregator": "aggregator"}
# Keys of a plugin reference that are not the plugin's own parameters.
FIXED_KEYS = {"aggregator": {"name", "share"}, "backbone": {"name"},
              "dataset": set(DatasetRef.model_fields)}


def get_path(data: dict[str, Any], path: str, missing: Any = None) -> Any:
    """The value at a dotted path (`train.lr`), or `missing`."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def plugin_section(path: str) -> tuple[str, str] | None:
    """('aggregator', 'model.aggregator') when `path` is a field of a plugin reference."""
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "model" and parts[1] in PLUGIN_KINDS:
        return PLUGIN_KINDS[parts[1]], f"model.{parts[1]}"
    if len(parts) == 3 and parts[0] == "datasets":
        return "dataset", f"datasets.{parts[1]}"
    return None


def accepted(kind: str, name: str) -> set[str]:
    """Parameter names the plugin accepts (its signature, less harness-injected ones)."""
    return registry.parameter_names(kind, name) - set(registry.INJECTED.get(kind, ()))


def _drop_foreign(kind: str, ref: dict[str, Any], old: Any, new: Any) -> None:
    """Switching plugin `old` -> `new`: drop `old`'s parameters that `new` does not accept.

    A key that `old` does not accept either (a typo) stays, so validation reports it.
    """
    if old is None or old == new or not isinstance(old, str) or not isinstance(new, str):
        return
    keep, known = accepted(kind, new), accepted(kind, old)
    for key in [k for k in ref if k not in FIXED_KEYS[kind] and k not in keep and k in known]:
        del ref[key]


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Write `value` at a dotted Cell path (a matrix axis, a search-space entry).

    A mapping written onto a mapping is merged into it (an axis value `{name: salad,
    dustbin: false}` on the defaults' aggregator); when that switches the plugin (a new
    `name`), the old plugin's parameters that the new one does not accept are dropped.
    """
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a mapping")
    last = parts[-1]
    section = plugin_section(dotted)
    if section and last == "name":  # `model.aggregator.name: salad`
        _drop_foreign(section[0], node, node.get("name"), value)
        node[last] = value
        return
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        kind = PLUGIN_KINDS.get(last) if parts[:-1] == ["model"] else (
            "dataset" if parts[:-1] == ["datasets"] else None)
        merged = dict(node[last])
        if kind:
            _drop_foreign(kind, merged, merged.get("name"), value.get("name", merged.get("name")))
        node[last] = {**merged, **value}
    else:
        node[last] = value


# --- KEY=VALUE options on the command line -------------------------------------------


def parse_options(items: tuple[str, ...] | list[str], kind: str, name: str) -> dict[str, Any]:
    """`--option key=value` strings for plugin `name` -> {key: value}.

    Values are read as YAML (`pairs=300`, `corrected=true`, `cities=[Chicago, Seattle]`).
    For a parameter whose type is a list or a tuple, a plain `a,b` or a single `a` is the
    list `['a', 'b']` / `['a']` (`pano_size=64,256`). Types and ranges are then checked like a file's values.
    """
    lists = _list_params(kind, name)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected key=value (e.g. --option protocol=within_5m).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if key in lists and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[key] = value
    return out


def _list_params(kind: str, name: str) -> set[str]:
    """Parameters of plugin `name` whose type hint accepts a list or a tuple."""
    import typing

    hints = registry._type_hints(registry.get(kind, name).load())
    out = set()
    for key, hint in hints.items():
        options = (hint, *typing.get_args(hint))
        if any(h in (list, tuple) or typing.get_origin(h) in (list, tuple) for h in options):
            out.add(key)
    return out


# --- loading -------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(value: Any, source: str, path: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; a missing variable is an error."""
    if isinstance(value, dict):
        return {k: interpolate_env(v, source, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{source}: {path}: environment variable {name} is not set "
                f"(export {name}=... or write ${{{name}:-default}})."
            )
        return _ENV.sub(substitute, value)
    return value


def study_file(path: str | Path) -> Path:
    """A matrix or study file: the path itself, or a study shipped with the package by name.

    `benchmark run --matrix quickstart` finds `studies/quickstart.yaml` from any folder,
    also when the package is installed from a wheel.
    """
    path = Path(path)
    if path.is_file():
        return path
    shipped = registry.STUDIES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file() or (
            path.parts[:1] == ("studies",) and len(path.parts) == 2 and shipped.is_file()):
        return shipped
    names = ", ".join(sorted(p.stem for p in registry.STUDIES_DIR.glob("*.yaml")))
    raise ConfigError(f"{path}: file not found (studies shipped with the package, usable by "
                      f"name: {names or 'none'}).")


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; malformed YAML or a missing file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def pydantic_error(exc: pydantic.ValidationError, source: str, prefix: str = "") -> ConfigError:
    """The first validation problem as 'file: field.path: what is expected'."""
    lines = []
    for err in exc.errors()[:3]:
        loc = format_loc(err["loc"])
        path = f"{prefix}: {loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{source}: {path}: {msg}" + (f" (got {err['input']!r})"
                     if err["type"] not in ("missing", "extra_forbidden") else ""))
    return ConfigError("; ".join(lines))


def validate_cell(data: Any, source: str, prefix: str = "") -> Cell:
    """A Cell from a plain dict, every plugin name and parameter checked and resolved.

    The Cell that comes back holds its resolved values: each plugin's parameters are its
    signature's defaults, overridden by its registry.yaml entry, overridden by the file's
    values. So `{name: salad}` and `{name: salad, dropout: 0.3}` (the default) are one
    Cell with one id, and changing a default in registry.yaml changes the ids of the
    Cells it reaches. Problems are ConfigErrors naming `source` and the field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping")
    try:
        cell = Cell.model_validate(data)
    except pydantic.ValidationError as exc:
        raise pydantic_error(exc, source, prefix) from None
    at = f"{prefix}: " if prefix else ""
    m = cell.model
    backbone = registry.validate_params("backbone", m.backbone.name, m.backbone.params,
                                        where=f"{source}: {at}model.backbone")
    aggregator = registry.validate_params("aggregator", m.aggregator.name, m.aggregator.params,
                                          where=f"{source}: {at}model.aggregator")
    check_share(m.aggregator.name, m.aggregator.share, where=f"{source}: {at}model.aggregator.share")
    for key in [cell.train.dataset, *cell.evaluate.targets]:
        if key not in cell.datasets:
            raise ConfigError(
                f"{source}: {at}train.dataset / evaluate.targets: dataset '{key}' is not defined "
                f"under datasets (defined: {', '.join(cell.datasets) or 'none'})."
            )
    datasets = {}
    for key, ref in cell.datasets.items():
        given = {"split": ref.train_split, **ref.params}
        if ref.root is not None:
            given["root"] = ref.root
        options = registry.validate_params("dataset", ref.name, given,
                                           where=f"{source}: {at}datasets.{key}")
        options = {k: v for k, v in options.items() if k not in ("split", "root")}
        datasets[key] = DatasetRef(name=ref.name, root=ref.root, train_split=ref.train_split,
                                   test_split=ref.test_split, **options)
    from gengeo_bench.protocols import Protocol

    for i, text in enumerate(cell.evaluate.protocols):
        try:
            Protocol.parse(text)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {at}evaluate.protocols[{i}]: {exc}") from None
    model = ModelConfig(
        backbone=PluginRef(name=m.backbone.name, **backbone),
        aggregator=AggregatorRef(name=m.aggregator.name, share=m.aggregator.share, **aggregator),
        share_backbone=m.share_backbone,
    )
    sizes = view_sizes(m.backbone.name, cell.train.image_size)
    problem = model_problem(model.model_dump_json(), tuple(sorted(sizes.items())))
    if problem:
        raise ConfigError(f"{source}: {at}model: {problem}")
    if "patch_grid" in registry.parameter_names("aggregator", m.aggregator.name):
        for i, text in enumerate(cell.evaluate.protocols):
            protocol = Protocol.parse(text)
            if protocol.kind == "fov" and protocol.fov < 360:
                raise ConfigError(
                    f"{source}: {at}evaluate.protocols[{i}]: aggregator '{m.aggregator.name}' is "
                    f"built for one patch grid (it declares patch_grid), and '{protocol.name}' "
                    f"narrows the panorama, hence its grid, at evaluation. Evaluate it without "
                    f"fov protocols, or use an aggregator that takes any grid."
                )
    elif "ground" in sizes:  # a narrowed panorama has fewer patches: the head must still work
        from gengeo_bench.transforms import round_to_patch

        patch = int(registry.meta("backbone", m.backbone.name).get("patch_size", 1))
        h, w = sizes["ground"]
        for i, text in enumerate(cell.evaluate.protocols):
            protocol = Protocol.parse(text)
            if protocol.kind == "fov" and protocol.fov < 360:
                narrow = {**sizes, "ground": (h, round_to_patch(protocol.fov_width(w), patch))}
                problem = model_problem(model.model_dump_json(), tuple(sorted(narrow.items())))
                if problem:
                    raise ConfigError(f"{source}: {at}evaluate.protocols[{i}] ({protocol.name}, "
                                      f"panorama {h}x{narrow['ground'][1]}): {problem}")
    return cell.model_copy(update={"model": model, "datasets": datasets})


def view_sizes(backbone: str, image_size: ImageSize | None) -> dict[str, tuple[int, int]]:
    """Each view's preprocessed `(height, width)`, as `builders.preprocessing` makes it.

    `image_size` is the Cell's `train.image_size` (None: the backbone's registry sizes);
    a view with neither is left out.
    """
    from gengeo_bench.transforms import Preprocess

    meta = registry.meta("backbone", backbone)
    sizes = {}
    for view in ("ground", "aerial"):
        given = getattr(image_size, view) if image_size is not None else None
        if given is None and view not in (meta.get("image_size") or {}):
            continue
        sizes[view] = tuple(Preprocess.from_meta(meta, view, size=given).size)
    return sizes


@lru_cache(maxsize=512)
def model_problem(model_json: str, image_size: tuple = ()) -> str | None:
    """Why the model section cannot be built, or None: every constructor check, before work.

    The model is built on PyTorch's meta device (no memory, no weights: `pretrained` and
    `weights` are switched off), so checks that need the architecture (e.g.
    `trainable_blocks` against the block count) run when the file is read, not after the
    data is ready. `image_size` holds `(view, (height, width))` pairs (see `view_sizes`):
    the patch grids that heads declaring `patch_grid` are built for. Cached: a matrix
    builds each distinct model section once.
    """
    import torch

    from gengeo_bench.model import CrossViewModel

    spec = ModelConfig.model_validate_json(model_json)
    offline = {k: v for k, v in (("pretrained", False), ("weights", None))
               if k in spec.backbone.params}
    logging.disable(logging.WARNING)  # e.g. open_clip's "no pretrained weights": switched off here
    try:
        with torch.device("meta"):
            CrossViewModel(spec.backbone.name, spec.aggregator.name,
                           backbone_params={**spec.backbone.params, **offline},
                           aggregator_params=spec.aggregator.params,
                           share_backbone=spec.share_backbone, share=spec.aggregator.share,
                           image_size=dict(image_size) or None)
    except BenchmarkError as exc:
        return str(exc)
    finally:
        logging.disable(logging.NOTSET)
    return None


def load_cell(path: str | Path) -> Cell:
    """Read and validate a Cell YAML file (`benchmark train CELL.yaml`)."""
    data = interpolate_env(read_yaml(path), str(path))
    return validate_cell(data, str(path))
