"""Study files: what a hyperparameter study searches, for what objective, with which budget.

`benchmark tune --study FILE` reads one of these; `load_study` validates it completely
before anything runs (`tune_space.py` holds the search space entries, `tune.py` runs the
study, `tune_report.py` reports it).

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
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from gengeo_bench.config import (
    Cell,
    Strict,
    get_path,
    interpolate_env,
    pydantic_error,
    read_yaml,
    study_file,
    validate_cell,
)
from gengeo_bench.engine import metric_prefix
from gengeo_bench.errors import ConfigError
from gengeo_bench.protocols import Protocol
from gengeo_bench.tune_space import (
    Param,
    check_path,
    corner_assignments,
    order_by_dependencies,
    parse_param,
    suggest_cell,
)

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



# --- samplers and pruners ------------------------------------------------------------------


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
