"""The plugin registry: names in YAML files -> Python objects.

`registry.yaml` at the repository root is the one list of plugins (a wheel carries a
copy inside the package, see `setup.py`). Each entry has a kind
(`backbone`, `aggregator` or `dataset`), a `target` ("module:attr"), default `params`
and `meta` (paper, weight licence, preprocessing contract). Installed third-party
packages add entries through the entry-point group `gengeo_bench.plugins`: each entry
point loads a mapping of the same shape as `registry.yaml` (or a callable returning
one, or a path to such a YAML file).

Parameters are checked against the target's signature and type hints when a config is
loaded (`validate_params`), so a typo or a wrong type is a `ConfigError` naming the
plugin and the parameter, not a crash deep inside a constructor. Parameters listed in
`INJECTED` are passed by the harness and may not be written in YAML: an aggregator's
`in_dim` (from the backbone) and, for the heads that declare it, `patch_grid` (from the
image sizes and the backbone's patch size; see `features.Aggregator`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pydantic
import yaml

from gengeo_bench.errors import ConfigError

KINDS = ("backbone", "aggregator", "dataset")
ENTRY_POINT_GROUP = "gengeo_bench.plugins"
PACKAGE_DIR = Path(__file__).resolve().parent


def _packaged_or_checkout(name: str) -> Path:
    """`name` inside the installed package (a wheel), else at the repository root (a checkout)."""
    inside = PACKAGE_DIR / name
    return inside if inside.exists() else PACKAGE_DIR.parent / name


REGISTRY_FILE = _packaged_or_checkout("registry.yaml")
STUDIES_DIR = _packaged_or_checkout("studies")

# Parameters the harness supplies itself; a YAML file may not set them.
INJECTED = {"aggregator": ("in_dim", "patch_grid"), "backbone": (), "dataset": ()}


@dataclass(frozen=True)
class Entry:
    """One registered plugin."""

    name: str
    kind: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def load(self) -> Any:
        """Import and return the target class or function."""
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"{self.source}: {self.kind} '{self.name}': target '{self.target}' cannot be "
                f"imported ({exc}). Check the 'module:attr' spelling."
            ) from exc


def _entries_from_mapping(mapping: Any, source: str) -> list[Entry]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of kind -> name -> entry")
    entries = []
    for kind, plugins in mapping.items():
        if kind not in KINDS:
            raise ConfigError(f"{source}: unknown kind '{kind}'; expected one of {list(KINDS)}")
        if not isinstance(plugins, dict):
            raise ConfigError(f"{source}: {kind}: expected a mapping of name -> entry")
        for name, spec in plugins.items():
            where = f"{source}: {kind}.{name}"
            if not isinstance(spec, dict) or "target" not in spec:
                raise ConfigError(f"{where}: expected a mapping with a 'target: module:attr'")
            unknown = set(spec) - {"target", "params", "meta"}
            if unknown:
                raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
            if ":" not in str(spec["target"]):
                raise ConfigError(f"{where}.target: expected 'module:attr', got {spec['target']!r}")
            entries.append(
                Entry(
                    name=str(name),
                    kind=kind,
                    target=str(spec["target"]),
                    params=dict(spec.get("params") or {}),
                    meta=dict(spec.get("meta") or {}),
                    source=source,
                )
            )
    return entries


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from exc


def _entry_point_entries() -> list[Entry]:
    entries = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = f"entry point '{ep.name}' ({ep.value})"
        obj = ep.load()
        if callable(obj):
            obj = obj()
        if isinstance(obj, (str, Path)):
            source = f"{obj} (via {source})"
            obj = _load_yaml(Path(obj))
        entries.extend(_entries_from_mapping(obj, source))
    return entries


def collect(extra: list[Entry] | None = None) -> dict[tuple[str, str], Entry]:
    """All entries keyed by (kind, name); a duplicate name is an error naming both sources."""
    entries = _entries_from_mapping(_load_yaml(REGISTRY_FILE), str(REGISTRY_FILE))
    entries += _entry_point_entries()
    entries += extra or []
    table: dict[tuple[str, str], Entry] = {}
    for entry in entries:
        key = (entry.kind, entry.name)
        if key in table:
            raise ConfigError(
                f"duplicate {entry.kind} '{entry.name}': defined in {table[key].source} "
                f"and again in {entry.source}. Rename one of them."
            )
        table[key] = entry
    return table


@lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str], Entry]:
    return collect()


def reload() -> None:
    """Forget the cached registry (after installing a plugin package, in tests)."""
    _table.cache_clear()


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    _check_kind(kind)
    return sorted(name for (k, name) in _table() if k == kind)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind '{kind}'; expected one of {list(KINDS)}")


def get(kind: str, name: str) -> Entry:
    """The entry for `name`; an unknown name lists the known ones and the closest match."""
    _check_kind(kind)
    entry = _table().get((kind, name))
    if entry is None:
        known = names(kind)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(known)}.")
    return entry


def _signature_params(target: Any) -> dict[str, inspect.Parameter]:
    func = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(func).parameters)
    params.pop("self", None)
    return {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def parameter_names(kind: str, name: str) -> set[str]:
    """The keyword parameters plugin `name` accepts (its signature, harness-injected ones included)."""
    return set(_signature_params(get(kind, name).load()))


def _type_hints(target: Any) -> dict[str, Any]:
    """Parameter type hints, `Annotated[...]` value ranges included."""
    func = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to no type checks
        return {}


def signature_defaults(kind: str, name: str) -> dict[str, Any]:
    """Defaults written in the target's signature (injected parameters left out)."""
    target = get(kind, name).load()
    injected = INJECTED.get(kind, ())
    return {k: p.default for k, p in _signature_params(target).items()
            if p.default is not p.empty and k not in injected}


def defaults(kind: str, name: str) -> dict[str, Any]:
    """The values plugin `name` is built with when a config sets nothing (injected ones left out)."""
    return {**signature_defaults(kind, name), **get(kind, name).params}


def validate_params(
    kind: str, name: str, params: dict[str, Any], where: str = "", allow_injected: bool = False
) -> dict[str, Any]:
    """Every keyword plugin `name` is built with: its resolved parameters, each checked.

    The result is the signature's defaults, overridden by the entry's `params` in
    registry.yaml, overridden by `params` (the config file's values), each value checked
    against its type hint (ranges included: `Annotated[int, Field(gt=0)]`) and coerced
    to it. This is what a Cell stores, so its id sees every value that shapes a run.
    `where` prefixes messages (e.g. "studies/x.yaml: axes.aggregator[2]").
    """
    prefix = f"{where}: " if where else ""
    try:
        entry = get(kind, name)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    target = entry.load()
    signature = _signature_params(target)
    hints = _type_hints(target)
    injected = INJECTED.get(kind, ())
    for key in params:
        if key in injected and not allow_injected:
            raise ConfigError(
                f"{prefix}{kind} '{name}': parameter '{key}' is set by the harness "
                f"(from the backbone and the image sizes); remove it from the config."
            )
    merged = {**defaults(kind, name), **params}
    out: dict[str, Any] = {}
    for key, value in merged.items():
        if key not in signature:
            close = difflib.get_close_matches(key, list(signature), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            allowed = ", ".join(k for k in signature if k not in injected)
            raise ConfigError(
                f"{prefix}{kind} '{name}' has no parameter '{key}'.{hint} "
                f"Its parameters are: {allowed}."
            )
        if key in hints:
            try:
                value = pydantic.TypeAdapter(hints[key]).validate_python(value, strict=False)
            except pydantic.ValidationError as exc:
                problem = exc.errors()[0]["msg"]
                raise ConfigError(
                    f"{prefix}{kind} '{name}': parameter '{key}' = {value!r}: {problem} "
                    f"(expected {_type_name(hints[key])})."
                ) from None
        out[key] = value
    missing = [
        k
        for k, p in signature.items()
        if p.default is p.empty and k not in out and (allow_injected or k not in injected)
    ]
    if missing:
        raise ConfigError(f"{prefix}{kind} '{name}': missing required parameter(s) {missing}.")
    return out


def _type_name(hint: Any) -> str:
    """`int`, `float | None`, `int >= 1`: a type hint as a reader writes it."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        bounds = []
        for extra in extras:
            for item in getattr(extra, "metadata", [extra]):
                for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                    if getattr(item, attr, None) is not None:
                        bounds.append(f"{sign} {getattr(item, attr)}")
        return f"{_type_name(base)} {' and '.join(bounds)}".strip()
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build(kind: str, name: str, **params: Any) -> Any:
    """Instantiate plugin `name` of `kind` with its defaults overridden by `params`."""
    entry = get(kind, name)
    full = validate_params(kind, name, params, allow_injected=True)
    return entry.load()(**full)


def meta(kind: str, name: str) -> dict[str, Any]:
    """The metadata record of an entry (paper, licence, preprocessing contract)."""
    return dict(get(kind, name).meta)
