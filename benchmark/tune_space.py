"""The search space of a study: entries over dotted Cell paths, conditions, and a trial's Cell.

A space entry (`train.lr: {float: [1e-5, 1e-3], log: true}`, `model.aggregator.name:
{categorical: [gem, salad]}`, with an optional `when:`) becomes a `Param`. Paths are
checked against the Cell schema and the plugins' parameters when the study file is read;
`suggest_cell` writes a trial's values into the base Cell and validates it like any Cell.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import optuna

from gengeo_bench import registry
from gengeo_bench.config import (
    FIXED_KEYS,
    PLUGIN_KINDS,
    Cell,
    EvaluateConfig,
    TrainConfig,
    accepted,
    get_path,
    plugin_section,
    set_path,
    validate_cell,
)
from gengeo_bench.errors import ConfigError

if TYPE_CHECKING:
    from gengeo_bench.tune_study import Study


@dataclass
class Param:
    """One search-space entry: a Cell field path and how to sample it."""

    path: str
    kind: Literal["float", "int", "categorical"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)

    def suggest(self, trial: optuna.trial.BaseTrial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.path, self.choices)

    def active(self, data: dict[str, Any]) -> bool:
        """Whether every `when` condition holds on the Cell built so far."""
        return all(get_path(data, path) in allowed for path, allowed in self.when.items())

    def grid(self) -> list[Any] | None:
        """The finite list of values (GridSampler); None for a continuous range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [self.low + i * self.step for i in range(n + 1)]

    def corners(self) -> list[Any]:
        """Values worth validating up front: every choice, or both ends of the range."""
        if self.kind == "categorical":
            return list(self.choices)
        values = self.grid()
        return [values[0], values[-1]] if values else [self.low, self.high]


def parse_param(path: str, raw: Any, source: str) -> Param:
    where = f"{source}: space.{path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{float: [low, high], log: true}}, "
                          f"{{int: [low, high]}} or {{categorical: [a, b]}}")
    unknown = set(raw) - {"float", "int", "categorical", "log", "step", "when"}
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, ["float", "int", "categorical", "log", "step", "when"], n=1)
        raise ConfigError(f"{where}.{key}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else ""))
    kinds = [k for k in ("float", "int", "categorical") if k in raw]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of float, int or categorical (got "
                          f"{', '.join(kinds) or 'none'}).")
    kind = kinds[0]
    param = Param(path, kind, when=parse_when(raw.get("when"), where))
    log_ = raw.get("log", False)
    if not isinstance(log_, bool):
        raise ConfigError(f"{where}.log: expected true or false (got {log_!r})")
    if kind == "categorical":
        choices = raw["categorical"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.categorical: expected a non-empty list of choices")
        for i, c in enumerate(choices):
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}.categorical[{i}]: choices must be numbers, strings, "
                                  f"booleans or null (got {c!r})")
        if "step" in raw or log_:
            raise ConfigError(f"{where}: step and log apply to float and int ranges, not categorical")
        param.choices = list(choices)
        return param
    bounds = raw[kind]
    number = int if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        bounds = _numbers(bounds)  # YAML reads `1e-5` (no dot) as a string
        if bounds is None or (kind == "int" and not all(float(b).is_integer() for b in bounds)):
            raise ConfigError(f"{where}.{kind}: expected [low, high] as two "
                              f"{'integers' if kind == 'int' else 'numbers'} (got {raw[kind]!r})")
    low, high = (int(b) for b in bounds) if kind == "int" else (float(b) for b in bounds)
    if low >= high:
        raise ConfigError(f"{where}.{kind}: empty range [{low}, {high}]: low must be below high")
    if log_ and low <= 0:
        raise ConfigError(f"{where}.log: a log range needs positive bounds (got low = {low})")
    step = raw.get("step")
    if step is not None:
        ok = isinstance(step, int) if kind == "int" else isinstance(step, (int, float))
        if not ok or isinstance(step, bool) or step <= 0:
            raise ConfigError(f"{where}.step: expected a positive {'integer' if kind == 'int' else 'number'}"
                              f" (got {step!r})")
        if log_ and (kind == "float" or step != 1):
            raise ConfigError(f"{where}: log and step cannot be combined (Optuna samples a log "
                              f"range continuously)")
        if step > high - low:
            raise ConfigError(f"{where}.step: {step} is larger than the range [{low}, {high}]")
    param.low, param.high, param.log, param.step = low, high, log_, step
    return param


def _numbers(bounds: Any) -> list[float] | None:
    if not isinstance(bounds, list) or len(bounds) != 2:
        return None
    try:
        out = [float(b) for b in bounds if not isinstance(b, bool)]
    except (TypeError, ValueError):
        return None
    return out if len(out) == 2 and all(math.isfinite(b) for b in out) else None


def parse_when(raw: Any, where: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}.when: expected a mapping {{field.path: value or [values]}}")
    return {str(k): (list(v) if isinstance(v, list) else [v]) for k, v in raw.items()}


def order_by_dependencies(params: list[Param], source: str) -> list[Param]:
    """File order, except that an entry follows the entries its `when` reads."""
    by_path = {p.path: p for p in params}
    ordered: list[Param] = []
    state: dict[str, str] = {}

    def visit(p: Param, chain: list[str]) -> None:
        if state.get(p.path) == "done":
            return
        if state.get(p.path) == "visiting":
            raise ConfigError(f"{source}: space.{p.path}.when: circular conditions "
                              f"({' -> '.join(chain + [p.path])})")
        state[p.path] = "visiting"
        for cond in p.when:
            if cond in by_path:
                visit(by_path[cond], chain + [p.path])
        state[p.path] = "done"
        ordered.append(p)

    for p in params:
        visit(p, [])
    return ordered


# --- field paths -------------------------------------------------------------------------


def check_path(p: Param, base: dict[str, Any], by_path: dict[str, Param], source: str) -> None:
    """Reject a path that is not a scalar field of a Cell (or a plugin parameter) up front."""
    where = f"{source}: space.{p.path}"
    parts = p.path.split(".")
    top = {"model": "model.backbone.<param>, model.aggregator.<param>, model.share_backbone",
           "train": "train.<field>", "evaluate": "evaluate.<field>",
           "datasets": "datasets.<key>.<field>", "seed": "seed"}

    def unknown(what: str, known: list[str]) -> ConfigError:
        close = difflib.get_close_matches(parts[-1] if len(parts) > 1 else parts[0], known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{where}: {what}.{hint} Known: {', '.join(known)}.")

    if parts[0] not in top:
        raise unknown(f"unknown field '{parts[0]}' (a search path starts with one of "
                      f"{', '.join(top)})", list(top))
    if parts[0] == "seed":
        if len(parts) != 1:
            raise ConfigError(f"{where}: seed has no sub-fields")
        return
    if parts[0] in ("train", "evaluate"):
        model = TrainConfig if parts[0] == "train" else EvaluateConfig
        scalar = [k for k, f in model.model_fields.items()
                  if k not in ("image_size", "targets", "protocols", "dataset")]
        if len(parts) != 2 or parts[1] not in model.model_fields:
            raise unknown(f"unknown field of {parts[0]}", scalar)
        if parts[1] not in scalar:
            raise ConfigError(f"{where}: {parts[1]} is not a scalar field; it cannot be searched")
        return
    if parts[0] == "model":
        if parts[1:] == ["share_backbone"]:
            return
        if len(parts) != 3 or parts[1] not in PLUGIN_KINDS:
            raise unknown("unknown field of model", ["backbone", "aggregator", "share_backbone"])
    else:  # datasets
        if len(parts) != 3:
            raise ConfigError(f"{where}: expected datasets.<key>.<field>")
        if parts[1] not in base.get("datasets", {}):
            raise unknown(f"dataset key '{parts[1]}' is not defined in the base Cell",
                          list(base.get("datasets", {})))
    kind, section = plugin_section(p.path)
    if parts[2] == "name":
        for i, choice in enumerate(p.choices):
            try:
                registry.get(kind, choice)
            except ConfigError as exc:
                raise ConfigError(f"{where}.categorical[{i}]: {exc}") from None
        if p.kind != "categorical":
            raise ConfigError(f"{where}: a plugin name is searched with categorical: [...]")
    if parts[2] in FIXED_KEYS[kind]:
        return
    names = {get_path(base, f"{section}.name")}
    switch = by_path.get(f"{section}.name")
    if switch is not None:
        names |= set(switch.choices)
    known: set[str] = set()
    for name in sorted(n for n in names if isinstance(n, str)):
        known |= accepted(kind, name)
    if parts[2] not in known:
        raise unknown(f"{kind} {' / '.join(repr(n) for n in sorted(map(str, names)))} has no "
                      f"parameter '{parts[2]}'", sorted(known | FIXED_KEYS[kind]))


def corner_assignments(space: list[Param]) -> list[dict[str, Any]]:
    """A few value sets covering every choice and both ends of every range."""
    n = max([len(p.corners()) for p in space] + [2])
    return [{p.path: p.corners()[i % len(p.corners())] for p in space} for i in range(n)]


def suggest_cell(study: Study, trial: optuna.trial.BaseTrial) -> tuple[Cell, dict[str, Any]]:
    """The base Cell with the trial's values written into it, validated like any Cell."""
    data = copy.deepcopy(study.base)
    values: dict[str, Any] = {}
    for p in study.space:
        if p.active(data):
            values[p.path] = p.suggest(trial)
            set_path(data, p.path, values[p.path])
    try:
        cell = validate_cell(data, study.source, "base")
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"{exc} (with space values {shown})") from None
    return cell, values
