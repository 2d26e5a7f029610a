"""Hyperparameter studies with Optuna: a trial is a Cell whose values came from a sampler.

A study file (`studies/*_hpo.yaml`) names a base Cell and a search space over its fields;
every trial copies the base, writes the sampled values into it, validates the result with
`validate_cell` (the schema `benchmark train` reads) and trains it with `run_cell`, the
one path every command takes. Nothing here trains or evaluates by itself.

Study file schema::

    name: salad_hpo                  # Optuna study, MLflow experiment, runs/ and reports/ folder
    base: {<an inline Cell>}         # or {matrix: studies/x.yaml, select: {axis: value, ...}}
    space:                           # dotted Cell field paths
      train.lr: {float: [1.0e-5, 1.0e-3], log: true}
      train.batch_size: {int: [8, 32], step: 8}
      model.aggregator.name: {categorical: [gem, salad]}
      model.aggregator.num_clusters: {categorical: [4, 8], when: {model.aggregator.name: salad}}
    objective: {metric: val/cvusa/R1, direction: maximize}   # or test/<dataset>[/<protocol>]/R1 ...
    sampler: {name: tpe, seed: 0}    # tpe | random | grid; other keys go to the Optuna sampler
    pruner: {name: median}           # median | successive_halving | hyperband | none (+ options)
    n_trials: 20                     # the study's TOTAL budget (COMPLETE + PRUNED + FAIL)
    timeout: null                    # seconds per `benchmark tune` process
    storage: sqlite:///optuna.db     # | journal:optuna.log | postgresql://user:pw@host/db
    heartbeat: {interval: 60, grace_period: 120, max_retry: 3}   # RDB storages

Rules worth knowing:

- `val/<train dataset>/R1` is the best validation R@1 over epochs (a held-out part of the
  training split); `test/...` metrics are read after the test evaluation. The per-epoch
  validation R@1 is reported to Optuna, so pruners stop bad trials early (the pruner needs
  `direction: maximize`, the sense of R@1).
- `when: {path: value | [values]}` makes an entry conditional on a value of the base or
  of another entry (entries are sampled after the ones they depend on). When an entry
  switches a plugin (`model.aggregator.name`, `model.backbone.name`,
  `datasets.<key>.name`), base parameters of the old plugin that the chosen one does not
  accept are dropped; all other parameters must be valid for the plugin chosen.
- Paths are checked against the Cell schema before anything runs, and a few combinations
  (every categorical choice, the low and high ends of every range) are built through
  `validate_cell`; every trial's Cell is validated again.
- Budget: without `--n-trials`, a process runs trials until the study holds `n_trials`
  trials (running, waiting and finished ones; a trial replaced by its retry counts once).
  Checking the budget and creating the trial happen under one lock (a file lock beside a
  SQLite or journal storage, an advisory lock on PostgreSQL), so several workers never
  overshoot it. `--n-trials N` runs N more trials in this process, Optuna's meaning.
- Workers that die: on RDB storages (SQLite, PostgreSQL) each running trial sends a
  heartbeat; a trial whose worker stopped beating is failed and re-queued with the same
  values (Optuna's `RetryHeartbeatStaleTrialCallback`). On one machine a trial whose
  worker process is gone is re-queued at once (also for journal storages, which have no
  heartbeat), and a trial interrupted with Ctrl-C is re-queued too. A retry trains in
  the original trial's work directory, so it resumes from the last finished epoch.
- Sampler seeds: each trial's sampler is seeded from (seed, trial number), so several
  workers sharing one seed do not propose the same values, and a study is reproducible
  trial by trial.

Each trial runs in `runs/<study>/trial-<number>` and is one MLflow child run (tags
`gengeo.role=trial`, `gengeo.study`, `gengeo.trial`, `gengeo.cell_id`, `gengeo.seed`)
under one parent run (`gengeo.role=study`) per `benchmark tune` invocation. Pruned trials
end KILLED in MLflow, crashed ones FAILED with the message in tag `gengeo.error`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import pydantic
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field

from gengeo_bench import registry, tracking
from gengeo_bench.config import (
    FIXED_KEYS,
    PLUGIN_KINDS,
    Cell,
    EvaluateConfig,
    Strict,
    TrainConfig,
    accepted,
    get_path,
    interpolate_env,
    plugin_section,
    pydantic_error,
    read_yaml,
    set_path,
    study_file,
    validate_cell,
)
from gengeo_bench.engine import metric_prefix, run_cell
from gengeo_bench.errors import ConfigError
from gengeo_bench.protocols import Protocol

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
METRIC_NAMES = ("R1", "R5", "R10", "R1pct", "hit_rate")
# user attributes a trial carries in Optuna
WORKDIR, WORKER, CELL_ID, RUN_ID, METRICS, ERROR = (
    "gengeo.workdir", "gengeo.worker", "gengeo.cell_id", "gengeo.mlflow_run_id", "gengeo.metrics",
    "gengeo.error")
SPACE_HASH = "gengeo.space_hash"  # study user attribute: what the study file searched


# --- the study file ----------------------------------------------------------------------


class ObjectiveSpec(Strict):
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int | None = 0


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"


class HeartbeatSpec(Strict):
    interval: int = Field(60, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(None, ge=1, description="default: 2 x interval")
    max_retry: int | None = Field(3, ge=0, description="retries of a trial whose worker died")


class StudyFile(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: dict[str, Any]
    space: dict[str, Any] = Field(min_length=1)
    objective: ObjectiveSpec
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    n_trials: int = Field(ge=1, description="the study's total budget")
    timeout: float | None = Field(None, gt=0, description="seconds per process")
    storage: str = DEFAULT_STORAGE
    heartbeat: HeartbeatSpec = Field(default_factory=HeartbeatSpec)


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


@dataclass
class Study:
    """A validated study file, ready to run."""

    source: str
    name: str
    base: dict[str, Any]
    space: list[Param]  # dependency order: an entry comes after those its `when` reads
    metric: str
    direction: str
    sampler: SamplerSpec
    pruner: PrunerSpec
    n_trials: int
    timeout: float | None
    storage: str
    heartbeat: HeartbeatSpec
    text: str = ""  # the study file as read (logged with every run; workers elsewhere lack the file)

    @property
    def space_hash(self) -> str:
        content = {"base": self.base, "space": [p.__dict__ for p in self.space], "metric": self.metric}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_study(path: str | Path, storage: str | None = None) -> Study:
    """Read and validate a study file; every problem is a ConfigError naming file and field."""
    path = study_file(path)
    source = str(path)
    data = interpolate_env(read_yaml(path), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level: expected a mapping (name, base, space, objective, ...)")
    try:
        spec = StudyFile.model_validate(data)
    except pydantic.ValidationError as exc:
        raise pydantic_error(exc, source) from None
    base = resolve_base(spec.base, source)
    base_cell = validate_cell(base, source, "base")
    params = [parse_param(path, raw, source) for path, raw in spec.space.items()]
    by_path = {p.path: p for p in params}
    for p in params:
        check_path(p, base, by_path, source)
        for cond in p.when:
            if cond == p.path:
                raise ConfigError(f"{source}: space.{p.path}.when: an entry cannot depend on itself.")
            if cond not in by_path and get_path(base, cond, missing=KeyError) is KeyError:
                raise ConfigError(
                    f"{source}: space.{p.path}.when.{cond}: this field is neither searched "
                    f"(under space) nor written in the base Cell."
                )
    study = Study(source, spec.name, base, order_by_dependencies(params, source),
                  spec.objective.metric, spec.objective.direction, spec.sampler, spec.pruner,
                  spec.n_trials, spec.timeout, storage or spec.storage, spec.heartbeat,
                  text=Path(path).read_text())
    check_objective(study, base_cell)
    make_sampler(study)  # option errors surface now, not at the first trial
    make_pruner(study)
    for values in corner_assignments(study.space):
        suggest_cell(study, optuna.trial.FixedTrial(values))
    return study


def resolve_base(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The base Cell as a plain dict: inline, or one Cell of a matrix picked by axis values."""
    if "matrix" not in raw:
        return copy.deepcopy(raw)
    extra = set(raw) - {"matrix", "select"}
    if extra:
        raise ConfigError(f"{source}: base.{sorted(extra)[0]}: unknown key (a matrix base has "
                          f"`matrix` and `select`).")
    select = raw.get("select") or {}
    if not isinstance(select, dict):
        raise ConfigError(f"{source}: base.select: expected a mapping of axis name to value.")
    from gengeo_bench.matrix import load_matrix

    matrix = load_matrix(raw["matrix"])
    entries = [(c.values, c.cell) if hasattr(c, "values") else tuple(c) for c in matrix.cells]
    found = [cell for axes, cell in entries
             if all(k in axes and _same(axes[k], v) for k, v in select.items())]
    if len(found) != 1:
        listing = "; ".join(", ".join(f"{k}={v}" for k, v in axes.items()) for axes, _ in entries[:8])
        what = "no Cell" if not found else f"{len(found)} Cells"
        raise ConfigError(
            f"{source}: base.select: {what} of {raw['matrix']} match {select} (select must pick "
            f"exactly one; its Cells: {listing}{' ...' if len(entries) > 8 else ''})."
        )
    return found[0].model_dump(mode="json")


def _same(axis_value: Any, wanted: Any) -> bool:
    """An axis value matches `wanted` exactly, by plugin name, or as a superset of a mapping."""
    if axis_value == wanted or str(axis_value) == str(wanted):
        return True
    if isinstance(axis_value, dict):
        if isinstance(wanted, dict):
            return all(k in axis_value and _same(axis_value[k], v) for k, v in wanted.items())
        return axis_value.get("name") == wanted
    return False


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


def check_objective(study: Study, base: Cell) -> None:
    where = f"{study.source}: objective.metric"
    parts = study.metric.split("/")
    if len(parts) < 3 or parts[0] not in ("val", "test") or parts[-1] not in METRIC_NAMES:
        raise ConfigError(f"{where}: expected val/<train dataset>/R1 or test/<dataset>[/<protocol>]/"
                          f"<{'|'.join(METRIC_NAMES)}> (got {study.metric!r})")
    if parts[0] == "val":
        if study.metric != f"val/{base.train.dataset}/R1":
            raise ConfigError(f"{where}: the validation metric is val/{base.train.dataset}/R1 (R@1 "
                              f"on the held-out part of the training dataset; got {study.metric!r})")
        if base.train.val_fraction <= 0:
            raise ConfigError(f"{study.source}: base.train.val_fraction: a val/ objective needs a "
                              f"validation part (val_fraction > 0)")
    else:
        prefixes = [metric_prefix(k, Protocol.parse(p)) for k in base.targets
                    for p in base.evaluate.protocols]
        if "/".join(parts[:-1]) not in prefixes:
            raise ConfigError(f"{where}: {study.metric!r} is not evaluated by the base Cell; it "
                              f"evaluates {', '.join(f'{x}/<metric>' for x in prefixes)}")
    if study.direction == "minimize" and study.pruner.name != "none":
        raise ConfigError(f"{study.source}: pruner.name: pruners read the per-epoch validation R@1, "
                          f"which is maximised; use direction: maximize or pruner: {{name: none}}")


def corner_assignments(space: list[Param]) -> list[dict[str, Any]]:
    """A few value sets covering every choice and both ends of every range."""
    n = max([len(p.corners()) for p in space] + [2])
    return [{p.path: p.corners()[i % len(p.corners())] for p in space} for i in range(n)]


# --- samplers, pruners, storage ----------------------------------------------------------


def _build(kind: str, cls: type, options: dict[str, Any], where: str) -> Any:
    known = set(inspect.signature(cls).parameters)
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"{where}.{key}: {cls.__name__} has no option '{key}'"
                              + (f" (did you mean '{close[0]}'?)" if close else "")
                              + f". Its options: {', '.join(sorted(known))}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {cls.__name__}({options}): {exc}") from None


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    options = dict(study.sampler.model_extra or {})
    where = f"{study.source}: sampler"
    name = study.sampler.name
    if name == "grid":
        grid = {}
        for p in study.space:
            values = p.grid()
            if values is None:
                raise ConfigError(f"{study.source}: space.{p.path}: the grid sampler needs a finite "
                                  f"list; give the float range a step or make it categorical")
            grid[p.path] = values
        options["search_space"] = grid
    cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
           "grid": optuna.samplers.GridSampler}[name]
    if "seed" in options:
        raise ConfigError(f"{where}.seed: given twice")
    if study.sampler.seed is None:
        return _build("sampler", cls, options, where)
    _build("sampler", cls, {**options, "seed": study.sampler.seed}, where)
    return PerTrialSeed(lambda seed: _build("sampler", cls, {**options, "seed": seed}, where),
                        study.sampler.seed)


class PerTrialSeed(optuna.samplers.BaseSampler):
    """Delegates to a sampler seeded from (seed, trial number), made afresh for each trial.

    Optuna's samplers keep their history in the storage, so a fresh one per trial loses
    nothing; it makes each trial's values reproducible and keeps two workers started
    with the same study file (the same seed) from proposing the same values.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed = make, seed
        self.inner = make(seed)

    def before_trial(self, study, trial) -> None:
        self.inner = self.make((self.seed * 1_000_003 + trial.number) % 2**32)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def is_exhausted(self, study) -> bool:
        return bool(getattr(self.inner, "is_exhausted", lambda s: False)(study))


def make_pruner(study: Study) -> optuna.pruners.BasePruner:
    cls = {"median": optuna.pruners.MedianPruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}[study.pruner.name]
    return _build("pruner", cls, dict(study.pruner.model_extra or {}), f"{study.source}: pruner")


def retry_callback(max_retry: int | None) -> Callable:
    cls = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
           or optuna.storages.RetryFailedTrialCallback)  # Optuna < 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry, inherit_intermediate_values=True)


def open_storage(study: Study) -> optuna.storages.BaseStorage:
    """`journal:<file>` -> JournalStorage; anything else is an RDB URL with heartbeats."""
    url = study.storage
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            if url.startswith("journal:"):
                from optuna.storages import journal

                backend = getattr(journal, "JournalFileBackend", None) or optuna.storages.JournalFileStorage
                path = Path(url[len("journal:"):]).expanduser()
                path.parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(backend(str(path)))
            hb = study.heartbeat
            stale = "heartbeat_stale_trial_callback"  # Optuna >= 4.9; failed_trial_callback before
            if stale not in inspect.signature(optuna.storages.RDBStorage).parameters:
                stale = "failed_trial_callback"
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=hb.interval,
                grace_period=hb.grace_period or 2 * hb.interval, **{stale: retry_callback(hb.max_retry)})
    except ConfigError:
        raise
    except Exception as exc:  # bad URL, missing driver, unreachable server
        raise ConfigError(f"{study.source}: storage {url!r} cannot be opened: {exc}") from None


def open_optuna_study(study: Study) -> optuna.Study:
    storage = open_storage(study)
    try:
        optuna_study = optuna.create_study(
            study_name=study.name, storage=storage, sampler=make_sampler(study),
            pruner=make_pruner(study), direction=study.direction, load_if_exists=True)
    except ValueError as exc:  # e.g. a stored study with another direction
        raise ConfigError(f"{study.source}: study {study.name!r} in {study.storage}: {exc}") from None
    stored = optuna_study.user_attrs.get(SPACE_HASH)
    if stored is None:
        optuna_study.set_user_attr(SPACE_HASH, study.space_hash)
    elif stored != study.space_hash:
        log.warning("%s: the base Cell, space or objective changed since study %r started; its "
                    "earlier trials were sampled from the old ones.", study.source, study.name)
    return optuna_study


class BudgetLock:
    """Makes "count the trials, then create one" atomic among workers sharing a storage.

    A file lock beside a SQLite database or journal file (one machine), a session advisory
    lock on PostgreSQL (many machines); other URLs get no lock, and simultaneous workers
    may then overshoot the budget by a trial or two.
    """

    def __init__(self, url: str, name: str):
        self.path: Path | None = None
        self.pg_url: str | None = None
        self.key = int(hashlib.sha256(f"gengeo.tune:{name}".encode()).hexdigest()[:15], 16)
        self.held = None
        if url.startswith("sqlite:///") and ":memory:" not in url:
            self.path = Path(url[len("sqlite:///"):].split("?")[0] + ".budget-lock")
        elif url.startswith("journal:"):
            self.path = Path(url[len("journal:"):] + ".budget-lock")  # not Optuna's .lock
        elif url.startswith("postgresql"):
            self.pg_url = url

    def acquire(self) -> None:
        if self.path is not None:
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock
                return
            handle = open(self.path, "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self.held = handle
        elif self.pg_url is not None:
            import sqlalchemy

            engine = sqlalchemy.create_engine(self.pg_url, poolclass=sqlalchemy.pool.NullPool)
            conn = engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self.held = conn

    def release(self) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        if self.path is not None:
            import fcntl

            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
        else:
            import sqlalchemy

            held.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            held.close()


def budget_used(optuna_study: optuna.Study) -> int:
    """Trials that count against `n_trials`: all of them, except failed ones that were re-queued."""
    trials = optuna_study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_dead_local_trials(optuna_study: optuna.Study, max_retry: int | None) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this machine is gone."""
    host = socket.gethostname()
    requeued = []
    for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, _, pid = str(t.user_attrs.get(WORKER, "")).rpartition(":")
        if owner != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            optuna_study.tell(t.number, state=TrialState.FAIL)
        except Exception:  # another worker got there first
            continue
        retry_callback(max_retry)(optuna_study, t)
        requeued.append(t.number)
        log.warning("trial %d: its worker (%s) is gone; re-queued with the same values", t.number,
                    t.user_attrs[WORKER])
    return requeued


# --- one trial ---------------------------------------------------------------------------


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


def objective_value(study: Study, result) -> float:
    if study.metric.startswith("val/"):
        scores = [r["val_R1"] for r in result.outcome.history if r.get("val_R1") is not None]
        if not scores:
            raise RuntimeError(f"{study.metric}: no epoch reported a validation R@1")
        return float(max(scores))
    if study.metric not in result.metrics:
        raise RuntimeError(f"{study.metric} is not among the trial's metrics "
                           f"({', '.join(sorted(result.metrics)) or 'none'})")
    return float(result.metrics[study.metric])


@dataclass
class Tracker:
    """MLflow side of one `benchmark tune` invocation: a parent run, created lazily."""

    study: Study
    uri: str
    mlclient: Any = None
    experiment: str | None = None
    parent: str | None = None

    def connect(self) -> None:
        """Open the store (a new SQLite store is created and migrated) and the experiment."""
        if self.experiment is not None:
            return
        self.mlclient = tracking.client(self.uri)
        try:
            self.experiment = tracking.experiment_id(self.mlclient, self.study.name, self.uri)
        except Exception:  # another worker created it a moment ago
            time.sleep(1.0)
            self.experiment = tracking.experiment_id(self.mlclient, self.study.name, self.uri)

    def start(self) -> str:
        """The parent run of this invocation (created on first use); returns its id."""
        if self.parent is not None:
            return self.parent
        self.connect()
        run = self.mlclient.create_run(
            self.experiment, run_name=f"{self.study.name} ({tracking.worker_id()})",
            tags={tracking.ROLE: "study", tracking.STUDY: self.study.name,
                  tracking.WORKER: tracking.worker_id()})
        self.parent = run.info.run_id
        tracking.log_params(self.mlclient, self.parent, {
            "objective.metric": self.study.metric, "objective.direction": self.study.direction,
            "sampler.name": self.study.sampler.name, "pruner.name": self.study.pruner.name,
            "n_trials": str(self.study.n_trials), "space": ", ".join(p.path for p in self.study.space)})
        self.mlclient.log_text(self.parent, self.study.text, "study.yaml")
        self.mlclient.log_dict(self.parent, tracking.environment(), "environment.json")
        return self.parent

    def end(self, status: str) -> None:
        if self.parent is not None:
            self.mlclient.set_terminated(self.parent, status)


def make_objective(study: Study, optuna_study: optuna.Study, tracker: Tracker, device: str | None,
                   lock: BudgetLock, runs_dir: Path) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        lock.release()  # the trial exists now; other workers may count and create theirs
        workdir = trial.user_attrs.get(WORKDIR)  # a retry resumes in its original trial's folder
        resumed = workdir is not None
        workdir = Path(workdir or runs_dir / study.name / f"trial-{trial.number}")
        trial.set_user_attr(WORKDIR, str(workdir))
        trial.set_user_attr(WORKER, tracking.worker_id())
        try:
            cell, values = suggest_cell(study, trial)
        except ConfigError as exc:
            trial.set_user_attr(ERROR, str(exc)[:5000])
            raise
        trial.set_user_attr(CELL_ID, cell.id)
        tags = {tracking.ROLE: "trial", tracking.STUDY: study.name, tracking.TRIAL: str(trial.number),
                tracking.PARENT: tracker.start(), "gengeo.sampled": json.dumps(values)}
        if resumed:
            tags["gengeo.resumed_from"] = str(workdir)

        def on_epoch(record: dict[str, Any]) -> None:
            score = record.get("val_R1")
            if score is None:
                return
            trial.report(float(score), int(record["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} (val R@1 {score:.2f})")

        try:
            with tracking.cell_run(tracker.mlclient, tracker.experiment, cell, workdir, tags,
                                   stop_on=(optuna.TrialPruned,),
                                   run_name=f"trial-{trial.number}") as run:
                trial.set_user_attr(RUN_ID, run.run_id)
                result = run_cell(cell, workdir, device=device, log_metrics=run.log_metrics,
                                  on_epoch=on_epoch)
                value = objective_value(study, result)
                run.log_metrics({"objective": value}, step=result.outcome.epochs_done)
                run.finish(result)
        except KeyboardInterrupt:
            frozen = next(t for t in optuna_study.get_trials(deepcopy=False) if t.number == trial.number)
            retry_callback(None)(optuna_study, frozen)  # the next `benchmark tune` resumes it
            raise
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # Optuna records FAIL and the study goes on
            trial.set_user_attr(ERROR, tracking.error_message(exc)[:5000])
            raise
        history = result.outcome.history
        best_val = max((r["val_R1"] for r in history if r.get("val_R1") is not None), default=None)
        summary = {**result.metrics, **({f"val/{cell.train.dataset}/R1": best_val}
                                        if best_val is not None else {})}
        trial.set_user_attr(METRICS, {k: float(v) for k, v in summary.items()})
        trial.set_user_attr("gengeo.best_epoch", result.outcome.best_epoch)
        return value

    return objective


# --- running a study ---------------------------------------------------------------------


@dataclass
class TuneOutcome:
    study: Study
    optuna_study: optuna.Study
    ran: int
    report_dir: Path | None = None
    exported: Path | None = None
    skipped_figures: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.optuna_study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def lines(self) -> list[str]:
        counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(self.counts().items())) or "no trials"
        out = [f"study {self.study.name}: ran {self.ran} trial(s) here; the study has {counts} "
               f"(budget {self.study.n_trials}, storage {self.study.storage})"]
        best = best_trial(self.optuna_study)
        if best is not None:
            out.append(f"best: trial {best.number}, {self.study.metric} = {best.value:.2f}, "
                       + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
        if self.report_dir:
            out.append(f"report: {self.report_dir}")
            out += [f"  (no {name}: {why})" for name, why in self.skipped_figures.items()]
        if self.exported:
            out.append(f"best Cell: {self.exported}  (benchmark train {self.exported})")
        return out


def best_trial(optuna_study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if not optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return optuna_study.best_trial


def run_study(study: Study, n_trials: int | None = None, timeout: float | None = None,
              tracking_uri: str | None = None, device: str | None = None,
              runs_dir: str | Path = "runs") -> TuneOutcome:
    """Run trials until the budget (or `n_trials` more, or `timeout` seconds) is reached."""
    tracker = Tracker(study, tracking.tracking_uri(tracking_uri))
    lock = BudgetLock(study.storage, study.name)
    lock.acquire()  # workers starting together: one creates the storage and the MLflow store
    try:
        optuna_study = open_optuna_study(study)
        if n_trials != 0:
            tracker.connect()
    finally:
        lock.release()
    objective = make_objective(study, optuna_study, tracker, device, lock, Path(runs_dir).resolve())
    timeout = timeout if timeout is not None else study.timeout
    start, ran, status = time.monotonic(), 0, "FINISHED"
    try:
        while True:
            if n_trials is not None and ran >= n_trials:
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                break
            if getattr(optuna_study.sampler, "is_exhausted", lambda s: False)(optuna_study):
                break
            requeue_dead_local_trials(optuna_study, study.heartbeat.max_retry)
            lock.acquire()
            try:
                if n_trials is None:
                    _fail_stale(optuna_study)  # a dead worker's trial is re-queued, not counted twice
                    waiting = optuna_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                    if budget_used(optuna_study) >= study.n_trials and not waiting:
                        break
                optuna_study.optimize(objective, n_trials=1, catch=(Exception,))
            finally:
                lock.release()
            ran += 1
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
    return TuneOutcome(study, optuna_study, ran)


def _fail_stale(optuna_study: optuna.Study) -> None:
    """Fail (and re-queue) trials whose heartbeat stopped, before they are counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(optuna_study)


# --- report and export -------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(optuna_study: optuna.Study):
    """One row per trial: number, state, value, duration, sampled values, metrics, run ids."""
    import pandas as pd

    rows = []
    for t in optuna_study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        pruned = t.state == TrialState.PRUNED and t.intermediate_values
        pruned_at = max(t.intermediate_values) if pruned else None
        row = {"number": t.number, "state": t.state.name, "value": t.value,
               "duration_s": None if duration is None else round(duration, 2)}
        row.update(t.params)
        row.update({k: v for k, v in (t.user_attrs.get(METRICS) or {}).items()
                    if k.endswith(tuple(f"/{m}" for m in METRIC_NAMES))})
        row.update({"pruned_at_epoch": pruned_at, "cell_id": t.user_attrs.get(CELL_ID),
                    "retry_of": t.system_attrs.get("failed_trial"),
                    "mlflow_run_id": t.user_attrs.get(RUN_ID), "error": t.user_attrs.get(ERROR)})
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df) -> str:
    """The trial table as Markdown: numbers shortened, missing values blank."""
    from gengeo_bench.report import to_markdown

    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else _fmt(v)

    return to_markdown(df.astype(object).map(cell))


def write_report(study: Study, optuna_study: optuna.Study, out_dir: str | Path | None = None
                 ) -> tuple[Path, dict[str, str]]:
    """best.md/json, trials.csv/md and Optuna's matplotlib figures in reports/<study>/."""
    out = Path(out_dir) if out_dir else Path("reports") / study.name
    out.mkdir(parents=True, exist_ok=True)
    df = trials_table(optuna_study)
    df.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(f"# {study.name}: trials\n\n"
                                   + (markdown_table(df) if len(df) else "(none)\n"))
    best = best_trial(optuna_study)
    counts: dict[str, int] = {}
    for t in optuna_study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    record: dict[str, Any] = {"study": study.name, "objective": study.metric, "direction": study.direction,
                              "trials": counts, "budget": study.n_trials}
    if best is not None:
        record.update({"best_trial": best.number, "value": best.value, "params": best.params,
                       "metrics": best.user_attrs.get(METRICS, {}), "cell_id": best.user_attrs.get(CELL_ID),
                       "workdir": best.user_attrs.get(WORKDIR),
                       "mlflow_run_id": best.user_attrs.get(RUN_ID)})
    (out / "best.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    skipped = write_figures(optuna_study, out)
    md = [f"# {study.name}", "",
          f"Objective: `{study.metric}` ({study.direction}); trials: "
          + (", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "none")
          + f" (budget {study.n_trials}).", ""]
    if best is None:
        md.append("No trial has completed yet.")
    else:
        md += [f"Best: trial {best.number}, value **{best.value:.2f}**, Cell `{record['cell_id']}` "
               f"(`{record['workdir']}`).", "", "| parameter | value |", "|---|---|"]
        md += [f"| `{k}` | {_fmt(v)} |" for k, v in best.params.items()]
        metrics = record["metrics"]
        if metrics:
            md += ["", "| metric | value |", "|---|---|"]
            md += [f"| `{k}` | {v:.2f} |" for k, v in sorted(metrics.items())
                   if k.endswith(tuple(f"/{m}" for m in METRIC_NAMES))]
    figures = ", ".join(f"[{p.stem}]({p.name})" for p in sorted(out.glob("*.png")))
    md += ["", "Figures: " + (figures or "none")]
    md += [f"- no {name}: {why}" for name, why in skipped.items()]
    (out / "best.md").write_text("\n".join(md) + "\n")
    return out, skipped


def write_figures(optuna_study: optuna.Study, out: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn is skipped with a reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = {k for t in complete for k in t.params}
    plots = {"optimization_history": (ovm.plot_optimization_history, 1, 0),
             "param_importances": (ovm.plot_param_importances, 2, 1),
             "parallel_coordinate": (ovm.plot_parallel_coordinate, 1, 1),
             "slice": (ovm.plot_slice, 1, 1)}
    skipped = {}
    for name, (plot, min_trials, min_params) in plots.items():
        if len(complete) < min_trials or len(params) < min_params:
            skipped[name] = (f"needs {min_trials} completed trial(s) and {min_params} searched "
                             f"parameter(s); the study has {len(complete)} and {len(params)}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(optuna_study)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            first.figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(first.figure)
        except Exception as exc:  # e.g. importances on values that never vary
            skipped[name] = f"{type(exc).__name__}: {exc}"
            plt.close("all")
    return skipped


def export_best(study: Study, optuna_study: optuna.Study, path: str | Path) -> Path:
    """The best trial's Cell as YAML that `benchmark train` reads, rebuilt from its values."""
    best = best_trial(optuna_study)
    if best is None:
        raise ConfigError(f"study {study.name!r} has no completed trial yet; nothing to export.")
    cell, _ = suggest_cell(study, optuna.trial.FixedTrial(best.params, best.number))
    recorded = best.user_attrs.get(CELL_ID)
    if recorded and recorded != cell.id:
        raise ConfigError(
            f"{study.source}: the base Cell changed since trial {best.number} ran (its Cell was "
            f"{recorded}, the file now gives {cell.id}); the trial's own Cell is "
            f"{Path(best.user_attrs.get(WORKDIR, '.')) / 'cell.yaml'}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = cell.model_copy(update={"name": f"{study.name}-trial{best.number}"})
    path.write_text(f"# best trial {best.number} of study {study.name} ({study.metric} = "
                    f"{best.value:.2f})\n" + cell.to_yaml())
    return path


def tune(study_file: str | Path, n_trials: int | None = None, timeout: float | None = None,
         storage: str | None = None, tracking_uri: str | None = None, device: str | None = None,
         report: bool = False, export: str | Path | None = None, executor: str = "local",
         workers: int = 1, ray_address: str | None = None, gpus_per_worker: float = 0.0,
         cpus_per_worker: float = 1.0, runs_dir: str | Path = "runs") -> TuneOutcome:
    """`benchmark tune`: validate the study file, run trials (here or as Ray tasks), report, export.

    With `executor="ray"`, `workers` Optuna workers run as Ray tasks, each exactly what one
    `benchmark tune` process runs (`run_study`), on the study's shared storage; `n_trials`
    then counts per worker.
    """
    study = load_study(study_file, storage=storage)
    if executor == "ray":
        from gengeo_bench import ray_executor
        from gengeo_bench.matrix import Resources

        uri = tracking.tracking_uri(tracking_uri)
        cluster = ray_executor.connect(ray_address, uri)
        resources = Resources(gpus_per_cell=gpus_per_worker, cpus_per_cell=cpus_per_worker)
        ran = cluster.tune(study, workers, n_trials, timeout, device, str(Path(runs_dir).resolve()),
                           resources)
        outcome = TuneOutcome(study, open_optuna_study(study), ran)
    elif executor == "local":
        outcome = run_study(study, n_trials=n_trials, timeout=timeout, tracking_uri=tracking_uri,
                            device=device, runs_dir=runs_dir)
    else:
        raise ConfigError(f"--executor {executor!r}: expected local or ray.")
    if report:
        outcome.report_dir, outcome.skipped_figures = write_report(study, outcome.optuna_study)
    if export:
        outcome.exported = export_best(study, outcome.optuna_study, export)
    return outcome
