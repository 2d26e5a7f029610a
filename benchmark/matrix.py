"""Matrix files: one YAML describes a whole study; expanding it gives the Cells.

```yaml
name: quickstart                  # the MLflow experiment and reports/<name>/
defaults:                         # a partial Cell every Cell starts from
  train: {epochs: 2, batch_size: 32}
  evaluate: {batch_size: 64}
datasets:                         # name -> loader, root (${ENV_VAR} allowed), options
  city: {name: synthetic, region: grid_city, pairs: 1200}
  cvusa: {name: cvusa, root: ${CVUSA_ROOT}}
axes:                             # the product of these lists is the matrix
  backbone: [dinov2_tiny, {name: resnet_tiny}]
  aggregator: [gem, {name: salad, share: clusters, dustbin: true}]
  train_on: [city, cvusa]         # short for train.dataset; any dotted Cell path works too
include: [...]                    # extra combinations: {axis: value, ...}
exclude: [...]                    # drop combinations matching every given {axis: value}
evaluate_on: [city, cvusa]        # targets (default: the training dataset)
protocols: [none, "fov:90"]       # robustness protocols
seeds: [0, 1]                     # a Cell per seed
baseline: {aggregator: {name: salad, share: none}}   # report deltas against this
```

Axis shorthands: `backbone` -> `model.backbone`, `aggregator` -> `model.aggregator`,
`share_backbone` -> `model.share_backbone`, `train_on` -> `train.dataset`; a plugin axis
value may be a bare name. Everything is validated before any work starts; errors name
the file and the field path (`studies/x.yaml: axes.aggregator[2].dustbin: ...`).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from gengeo_bench import registry
from gengeo_bench.config import (
    Cell,
    interpolate_env,
    pydantic_error,
    read_yaml,
    set_path,
    study_file,
    validate_cell,
)
from gengeo_bench.errors import ConfigError
from gengeo_bench.model import check_share
from gengeo_bench.tracking import flatten

SHORTHANDS = {
    "backbone": "model.backbone",
    "aggregator": "model.aggregator",
    "share_backbone": "model.share_backbone",
    "train_on": "train.dataset",
}
PLUGIN_AXES = {"model.backbone": "backbone", "model.aggregator": "aggregator"}


class Resources(BaseModel):
    """What one Cell asks of a Ray cluster (`--gpus-per-cell`, `--cpus-per-cell` override it).

    Not part of a Cell's id: where a Cell runs does not change its numbers.
    """

    model_config = ConfigDict(extra="forbid")
    gpus_per_cell: float = Field(0.0, ge=0, description="GPUs per Cell task (fractions share a GPU)")
    cpus_per_cell: float = Field(1.0, gt=0, description="CPUs per Cell task (its torch threads)")


class MatrixFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    defaults: dict[str, Any] = Field(default_factory=dict)
    datasets: dict[str, dict[str, Any]]
    axes: dict[str, list[Any]]
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    evaluate_on: list[str] = Field(default_factory=list)
    protocols: list[str] = Field(default_factory=lambda: ["none"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    baseline: dict[str, Any] | None = None
    resources: Resources = Field(default_factory=Resources)


@dataclass
class MatrixCell:
    """A Cell and the axis values that produced it."""

    values: dict[str, Any]
    cell: Cell

    @property
    def id(self) -> str:
        return self.cell.id

    @property
    def label(self) -> str:
        return self.cell.name


@dataclass
class Matrix:
    name: str
    path: Path
    cells: list[MatrixCell]
    axes: dict[str, list[Any]]
    baseline: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)

    def baseline_params(self) -> dict[str, str] | None:
        """The `baseline:` as flat MLflow param filters, or None when the file names none."""
        return baseline_params(self.baseline, f"{self.path}: baseline") or None

    def select(self, pattern: str | None) -> list[MatrixCell]:
        """Cells whose label or id matches a glob pattern (`--only`)."""
        if not pattern:
            return list(self.cells)
        return [c for c in self.cells
                if fnmatch.fnmatch(c.label, pattern) or c.id.startswith(pattern)
                or fnmatch.fnmatch(c.label, f"*{pattern}*")]


def _normalise_value(path: str, value: Any) -> Any:
    """A bare plugin name is shorthand for {name: ...}."""
    if path in PLUGIN_AXES and isinstance(value, str):
        return {"name": value}
    return value


def axis_label(value: Any) -> str:
    if isinstance(value, dict):
        name = value.get("name", "")
        rest = [f"{k}={v}" if not isinstance(v, bool) else (k if v else f"no_{k}")
                for k, v in value.items() if k != "name"]
        return f"{name}[{','.join(rest)}]" if rest else str(name)
    return str(value)


def _matches(values: dict[str, Any], rule: dict[str, Any]) -> bool:
    """Every key of `rule` matches: dicts as subsets, bare names against {name: ...}."""
    for axis, wanted in rule.items():
        have = values.get(axis)
        path = SHORTHANDS.get(axis, axis)
        wanted = _normalise_value(path, wanted)
        have = _normalise_value(path, have)
        if isinstance(wanted, dict) and isinstance(have, dict):
            if any(have.get(k) != v for k, v in wanted.items()):
                return False
        elif have != wanted:
            return False
    return True


def _check_plugin_values(source: str, axis: str, path: str, values: list[Any]) -> None:
    kind = PLUGIN_AXES.get(path)
    if kind is None:
        return
    for i, value in enumerate(values):
        where = f"{source}: axes.{axis}[{i}]"
        value = _normalise_value(path, value)
        if not isinstance(value, dict) or "name" not in value:
            raise ConfigError(f"{where}: expected a {kind} name or a mapping with 'name'")
        params = {k: v for k, v in value.items() if k not in ("name", "share")}
        registry.validate_params(kind, value["name"], params, where=where)
        if kind == "aggregator" and "share" in value:
            check_share(value["name"], value["share"], where=f"{where}.share")


def load_matrix(path: str | Path) -> Matrix:
    """Parse, validate and expand a matrix file; every Cell is checked before returning."""
    path = study_file(path)
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = interpolate_env(raw, source)
    try:
        spec = MatrixFile.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise pydantic_error(exc, source) from None

    axes: dict[str, list[Any]] = {}
    for axis, values in spec.axes.items():
        if not values:
            raise ConfigError(f"{source}: axes.{axis}: empty axis: give at least one value")
        dotted = SHORTHANDS.get(axis, axis)
        if dotted.split(".")[0] not in Cell.model_fields:
            raise ConfigError(
                f"{source}: axes.{axis}: unknown axis; use {', '.join(SHORTHANDS)} or a dotted "
                f"Cell path such as train.lr or model.aggregator.num_clusters"
            )
        _check_plugin_values(source, axis, dotted, values)
        axes[axis] = values
    for i, rule in enumerate(spec.include):
        for axis in rule:
            if axis not in axes and SHORTHANDS.get(axis, axis).split(".")[0] not in Cell.model_fields:
                raise ConfigError(f"{source}: include[{i}].{axis}: unknown axis")
    for i, rule in enumerate(spec.exclude):
        for axis in rule:
            if axis not in axes:
                raise ConfigError(
                    f"{source}: exclude[{i}].{axis}: not an axis of this matrix "
                    f"(axes: {', '.join(axes)})"
                )
        if not any(_matches(dict(zip(axes, combo, strict=True)), rule)
                   for combo in itertools.product(*axes.values())):
            raise ConfigError(f"{source}: exclude[{i}]: matches no combination of the axes")

    combos = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    combos = [c for c in combos if not any(_matches(c, rule) for rule in spec.exclude)]
    combos += [dict(rule) for rule in spec.include]

    cells: list[MatrixCell] = []
    seen: dict[str, str] = {}  # Cell id -> the label that produced it
    for combo in combos:
        for seed in spec.seeds:
            data = copy.deepcopy(spec.defaults)
            data.setdefault("train", {})
            data.setdefault("evaluate", {})
            data["datasets"] = copy.deepcopy(spec.datasets)
            if spec.evaluate_on:
                data["evaluate"]["targets"] = list(spec.evaluate_on)
            data["evaluate"].setdefault("protocols", list(spec.protocols))
            for axis, value in combo.items():
                dotted = SHORTHANDS.get(axis, axis)
                set_path(data, dotted, copy.deepcopy(_normalise_value(dotted, value)))
            # A Cell carries only the datasets it reads, so adding a dataset to the matrix
            # does not change the ids of Cells that never touch it.
            used = {data["train"].get("dataset"), *data["evaluate"].get("targets", [])}
            data["datasets"] = {k: v for k, v in data["datasets"].items() if k in used}
            data["seed"] = seed
            label = "|".join(axis_label(v) for v in combo.values()) + f"|seed{seed}"
            data["name"] = label
            cell = validate_cell(data, source, prefix=f"cell {label}")
            if cell.id in seen:
                raise ConfigError(
                    f"{source}: '{seen[cell.id]}' and '{label}' resolve to the same Cell "
                    f"({cell.id}): once registry defaults are filled in, their values are equal "
                    f"(one spells out a default, or an include repeats a combination of the "
                    f"axes). Remove one of them."
                )
            seen[cell.id] = label
            cells.append(MatrixCell({**combo, "seed": seed}, cell))
    if not cells:
        raise ConfigError(f"{source}: the matrix has no Cells left after exclude")
    baseline_params(spec.baseline, f"{source}: baseline")  # a malformed baseline fails now
    return Matrix(spec.name, path, cells, axes, spec.baseline, raw, spec.resources)


def differing_values(matrix: Matrix) -> list[str]:
    """The axes whose value changes between Cells (what the dry run shows)."""
    keys = list(matrix.cells[0].values)
    return [k for k in keys if len({axis_label(c.values.get(k)) for c in matrix.cells}) > 1]


def baseline_params(raw: Any, source: str = "baseline") -> dict[str, str]:
    """A matrix file's `baseline:` as flat param keys.

    `{aggregator: {name: salad, share: none}}` -> `{"aggregator.name": "salad",
    "aggregator.share": "none"}`; `{backbone: dinov2_tiny}` -> `{"backbone.name":
    "dinov2_tiny"}`; `train_on: city` -> `{"train.dataset": "city"}` (the matrix's axis
    shorthands); flat keys (`aggregator.share: none`) and other keys are kept; a `model.`
    prefix is dropped (model fields are lifted in the logged params).
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of param values, e.g. "
                          f"{{aggregator: {{name: salad, share: none}}}}, got {raw!r}")
    out: dict[str, str] = {}
    for key, value in raw.items():
        key = SHORTHANDS.get(str(key), str(key))
        if key.startswith("model."):
            key = key[len("model."):]
        if key == "model" and isinstance(value, dict):
            out.update(baseline_params(value, source))
            continue
        if key in ("backbone", "aggregator") and not isinstance(value, dict):
            value = {"name": value}
        if isinstance(value, dict):
            out.update(flatten(value, key))
        elif isinstance(value, bool):
            out[key] = str(value)
        else:
            out[key] = flatten(value, key)[key]
    return out
