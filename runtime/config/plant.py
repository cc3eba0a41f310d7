"""Plant configuration: parsed once, validated into typed objects, never guessed.

`load_config(path)` returns a `Config` or raises `ConfigError` listing every
problem as ``file:line: key.path: what is wrong (what is expected)``. Unknown
keys are errors. Node keys are the docs/design.md field names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationError, create_model, field_validator, model_validator

from vbatt.drivers.registry import driver_specs
from vbatt.opcua_models.config import OpcuaServerConfig
from vbatt.retain.retainer import RetainConfig
from vbatt.config.hierarchy import HierarchyConfig

from vbatt.config.base import NodeId, NonNeg, Strict, field_default, field_keys
from vbatt.kernel.fields import Field as TableField, Role, Scope, fields
from vbatt.drivers.sim.config import ID_PATTERN as _ID, Profile, SimNodeConfig, SimPhysics
from vbatt.config.yamlsrc import ConfigError, Located, format_path, load_yaml, load_yaml_file

__all__ = [
    "Config",
    "ConfigError",
    "NodeConfig",
    "TemplateConfig",
    "CycleConfig",
    "PlantConfig",
    "ProgramEntry",
    "Fleet",
    "SETTINGS",
    "setting_values",
    "load_config",
    "load_config_text",
    "default_config_path",
]


_SPECS = driver_specs()  # the registered drivers (built-in and entry points), read once per process
TEMPLATE_DRIVERS = tuple(name for name, spec in _SPECS.items() if spec.template)

# The node values a config gives (YAML key, range, default), all from the field table.
_CONFIGURED = fields(Scope.NODE, configured=True)
RANGED = tuple(f.yaml for f in _CONFIGURED)

# A node without `driver:` is a simulated one; its model also bounds the values of templates.
NodeConfig = SimNodeConfig


def _range(t):
    return Union[t, Annotated[tuple[t, t], Field(description="[low, high]: uniform random")]]


# Each end of a template range is checked against the table's range by building a NodeConfig (_bounds).
_TemplateValues = create_model("_TemplateValues", __base__=Strict, **{
    f.yaml: (_range(int if f.np_dtype.kind in "iu" else float), field_default(f)) for f in _CONFIGURED})


class TemplateBody(_TemplateValues):
    """`count` nodes named by `id` (a format with `{i}`), values constant or `[low, high]`."""

    count: Annotated[int, Field(ge=1, le=1_000_000)]
    id: Annotated[str, Field(min_length=1)]
    start: Annotated[int, Field(ge=0)] = 0
    seed: int = 0
    driver: Literal[TEMPLATE_DRIVERS] = "sim"  # modbus: served by the embedded fleet, polled over Modbus
    demand_profile: Profile | None = None
    physics: SimPhysics = SimPhysics()

    @field_validator("id")
    @classmethod
    def _has_index(cls, v: str) -> str:
        try:
            a, b = v.format(i=0), v.format(i=1)
        except Exception as exc:  # str.format raises any of KeyError, TypeError, AttributeError ...
            raise ValueError(f"must be a format string using only {{i}}, e.g. 'rack-{{i:04d}}' ({exc})") from None
        if a == b:
            raise ValueError("must contain {i} so that every node gets its own id, e.g. 'rack-{i:04d}'")
        if not _ID.match(a):
            raise ValueError(f"gives ids like {a!r}: an id is 1-64 of the characters A-Z a-z 0-9 _ . : -")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "TemplateBody":
        # Both ends of every range must be a valid node value.
        for end in (0, 1):
            values = {k: (getattr(self, k)[end] if isinstance(getattr(self, k), tuple) else getattr(self, k))
                      for k in RANGED}
            NodeConfig(id="x", **values)
        for k in RANGED:
            v = getattr(self, k)
            if isinstance(v, tuple) and v[0] > v[1]:
                raise ValueError(f"{k}: range [{v[0]}, {v[1]}] has low > high")
        return self


class TemplateConfig(Strict):
    template: TemplateBody


class CycleConfig(Strict):
    cycle_ms: Annotated[float, Field(gt=0, le=60_000)] = 10.0
    spin_us: Annotated[float, Field(ge=0)] = 0.0
    watchdog_overruns: Annotated[int, Field(ge=1)] = 5
    safe_state: Literal["own_battery", "zero"] = "own_battery"
    realtime: bool = True
    fifo_priority: Annotated[int, Field(ge=1, le=99)] = 80
    stats_window: Annotated[int, Field(ge=10, le=1_000_000)] = 1000
    start_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    @model_validator(mode="after")
    def _spin(self) -> "CycleConfig":
        if self.spin_us * 1e-3 >= self.cycle_ms:
            raise ValueError(f"spin_us ({self.spin_us}) must be shorter than the cycle ({self.cycle_ms} ms)")
        return self


# `plant:` takes the configured aggregate fields (main_limit_w) from the table.
_PlantValues = create_model("_PlantValues", __base__=Strict, **field_keys(fields(Scope.AGGREGATE, configured=True)))


class PlantConfig(_PlantValues):
    stale_ms: Annotated[float, Field(gt=0)] = 1000.0
    # docs/design.md §2b: per priority class, how long it must stay served on batteries alone if the main
    # supply fails now (s). The classes must exist in the fleet (checked in `validate`).
    ride_through_s: dict[Annotated[int, Field(ge=0, le=1000)], Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# Built from the driver registry (vbatt.drivers.registry, extended by entry points): each driver's
# `drivers.<name>` section and its node entry, tagged by `driver:`.
DriversConfig = create_model("DriversConfig", __base__=Strict,
                             **{name: (spec.config, spec.config()) for name, spec in _SPECS.items()})
_NODE_TAGS = (*(name for name, spec in _SPECS.items() if spec.node is not None), "template")


def _node_kind(v: Any) -> str:
    if isinstance(v, dict):
        return "template" if "template" in v else str(v.get("driver", "sim"))
    return "template" if isinstance(v, TemplateConfig) else v.driver


NodeEntry = Annotated[
    Union[tuple(Annotated[spec.node, Tag(name)] for name, spec in _SPECS.items() if spec.node is not None)
          + (Annotated[TemplateConfig, Tag("template")],)],
    Discriminator(_node_kind, custom_error_type="invalid_driver",
                  custom_error_message=f"unknown driver (expected {_names(list(_NODE_TAGS[:-1]))}, "
                                       f"or a 'template')"),
]


class ProgramEntry(Strict):
    """A program id and its validated parameters (a pydantic model of the program)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    id: str
    params: Any


class Config(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    cycle: CycleConfig = CycleConfig()
    plant: PlantConfig = PlantConfig()
    drivers: DriversConfig = DriversConfig()
    opcua: OpcuaServerConfig = OpcuaServerConfig()
    retain: RetainConfig = RetainConfig()
    hierarchy: HierarchyConfig = HierarchyConfig()
    nodes: Annotated[list[NodeEntry], Field(min_length=1)]
    programs: list[Any] = ["safe_allocation"]  # replaced by validated ProgramEntry objects
    source: Annotated[str, Field(exclude=True)] = "<string>"


class Fleet:
    """All nodes as arrays (struct of arrays), in image order."""

    def __init__(self, ids: list[str], values: dict[str, np.ndarray], drivers: list[str],
                 profiles: list, physics: list):
        self.ids = ids
        self.values = values
        self.drivers = drivers
        self.profiles = profiles  # per node: profile model or None
        self.physics = physics  # per node: SimPhysics

    def __len__(self) -> int:
        return len(self.ids)


_IDEAL = SimPhysics()
_DTYPES = {f.yaml: f.np_dtype for f in _CONFIGURED}


def build_fleet(cfg: Config, located: Located | None = None) -> Fleet:
    ids: list[str] = []
    cols: dict[str, list] = {k: [] for k in RANGED}
    drivers, profiles, physics = [], [], []
    where: dict[str, str] = {}
    problems: list[str] = []
    for k, entry in enumerate(cfg.nodes):
        loc = located.where(("nodes", k)) if located else cfg.source
        if not isinstance(entry, TemplateConfig):
            batch_ids = [entry.id]
            for f in RANGED:  # nodes of other drivers report these themselves
                cols[f].append(getattr(entry, f, NodeConfig.model_fields[f].default))
            drivers.append(entry.driver)
            profiles.append(getattr(entry, "demand_profile", None))
            physics.append(getattr(entry, "physics", _IDEAL))
        else:
            t = entry.template
            rng = np.random.default_rng(t.seed)
            batch_ids = [t.id.format(i=t.start + i) for i in range(t.count)]
            for f in RANGED:
                v = getattr(t, f)
                if isinstance(v, tuple):
                    arr = (rng.integers(v[0], v[1] + 1, t.count) if _DTYPES[f].kind in "iu"
                           else rng.uniform(v[0], v[1], t.count))
                    cols[f].extend(arr.tolist())
                else:
                    cols[f].extend([v] * t.count)
            drivers.extend([t.driver] * t.count)
            profiles.extend([t.demand_profile] * t.count)
            physics.extend([t.physics] * t.count)
        for nid in batch_ids:
            if nid in where:
                problems.append(f"{loc}: nodes[{k}]: duplicate node id {nid!r} (first defined at {where[nid]})")
            else:
                where[nid] = loc
            ids.append(nid)
        if len(problems) > 20:
            break
    if problems:
        raise ConfigError(problems)
    values = {f: np.asarray(cols[f], dtype=_DTYPES[f]) for f in RANGED}
    return Fleet(ids, values, drivers, profiles, physics)


SETTINGS = fields(role=Role.SETTING, configured=True)  # what a config sets in the image (and reload changes)


def setting_values(cfg: Config, fleet: Fleet) -> dict[TableField, np.ndarray]:
    """The configured operator settings: per node from the fleet, per plant from `plant:`, as image arrays."""
    out = {}
    for f in SETTINGS:
        v = fleet.values[f.name] if f.scope is Scope.NODE else np.asarray([getattr(cfg.plant, f.yaml)])
        out[f] = v.astype(f.np_dtype)
    return out


def _errors(exc: ValidationError, located: Located, prefix: tuple = ()) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(p for p in err["loc"] if not _is_union_tag(p))
        raw = prefix + tuple(err["loc"])
        if len(raw) > 2 and raw[0] == "nodes" and isinstance(raw[1], int) and raw[2] in _NODE_TAGS:
            loc = raw[:2] + tuple(p for p in raw[3:] if not _is_union_tag(p))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        tail = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, (dict, list)) else f" (got {got!r})"
        out.append(f"{located.where(loc)}: {format_path(loc)}: {msg}{tail}{_range_of(loc, err['type'])}")
    return out


_KEYED = {(f.scope, f.yaml): f for f in fields(configured=True)}


def _range_of(loc: tuple, kind: str) -> str:
    """'; the field's range is [lo, hi] unit' after a bound error on a field of the table."""
    if kind not in ("less_than_equal", "greater_than_equal") or not loc or not isinstance(loc[-1], str):
        return ""
    f = _KEYED.get((Scope.AGGREGATE if loc[0] == "plant" else Scope.NODE, loc[-1]))
    if f is None:
        return ""
    unit = f" {f.unit}" if f.unit not in ("", "1") else ""
    return f"; the field's range is [{f.lo:g}, {f.hi:g}]{unit}"


def _is_union_tag(p) -> bool:
    return isinstance(p, str) and (p.startswith("function-") or p.startswith("tuple[")
                                   or p in ("int", "float", "sine", "step", "csv"))


def _parse_programs(raw: Any, located: Located) -> tuple[list[ProgramEntry], list[str]]:
    from vbatt.kernel.program import LIMIT_FIELDS
    from vbatt.programs.registry import program_class, known_programs

    if not isinstance(raw, list) or not raw:
        return [], [f"{located.where(('programs',))}: programs: expected a non-empty list of program ids"]
    entries, problems = [], []
    allocator = None
    for i, item in enumerate(raw):
        path = ("programs", i)
        if isinstance(item, str):
            pid, params = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            pid, params = next(iter(item.items()))
            params = {} if params is None else params
            path = path + (pid,)
        else:
            problems.append(f"{located.where(path)}: {format_path(path)}: expected a program id or "
                            f"'{{id: {{params}}}}' (one key), got {item!r}")
            continue
        try:
            cls = program_class(pid)
        except KeyError:
            problems.append(f"{located.where(path)}: {format_path(path)}: unknown program {pid!r} "
                            f"(expected one of: {', '.join(known_programs())})")
            continue
        if not isinstance(params, dict):
            problems.append(f"{located.where(path)}: {format_path(path)}: expected a mapping of parameters")
            continue
        try:
            entries.append(ProgramEntry(id=pid, params=cls.Params.model_validate(params)))
        except ValidationError as exc:
            problems.extend(_errors(exc, located, path))
            continue
        # The limits are narrowed before the allocating program uses them, in the same cycle.
        writes = set(cls(entries[-1].params, 0).writes)
        if allocator is not None and writes & set(LIMIT_FIELDS):
            problems.append(f"{located.where(path)}: {format_path(path)}: {pid!r} narrows "
                            f"{'/'.join(sorted(writes & set(LIMIT_FIELDS)))} but is listed after {allocator!r}, "
                            f"which allocates from them: list it before {allocator!r}")
        if getattr(cls, "allocates", False) and allocator is None:
            allocator = pid
    return entries, problems


def validate(located: Located) -> tuple[Config, Fleet]:
    data = located.data
    if not isinstance(data, dict):
        raise ConfigError([f"{located.source}:1: expected a mapping with a 'nodes' list at the top level"])
    problems: list[str] = []
    nodes = data.get("nodes")
    if isinstance(nodes, list):
        for i, item in enumerate(nodes):
            if not isinstance(item, dict):
                problems.append(f"{located.where(('nodes', i))}: nodes[{i}]: expected a node (a mapping with "
                                f"an 'id') or a 'template', got {item!r}")
    if "source" in data:
        problems.append(f"{located.where(('source',))}: source: unknown key (check the spelling; "
                        f"see docs/configuration.md)")
    if problems:
        raise ConfigError(problems)
    programs, prog_problems = _parse_programs(data.get("programs", ["safe_allocation"]), located)
    problems += prog_problems
    body = {k: v for k, v in data.items() if k != "programs"}
    try:
        cfg = Config.model_validate(body)
    except ValidationError as exc:
        problems += _errors(exc, located)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    cfg = cfg.model_copy(update={"programs": programs, "source": located.source})
    fleet = build_fleet(cfg, located)
    _check_classes(cfg, fleet, located)
    _check_hierarchy(cfg, fleet, located)
    for name, spec in _SPECS.items():  # e.g. port clashes, here rather than at driver start
        if spec.check is None:
            continue
        try:
            spec.check(cfg, fleet)
        except ValueError as exc:
            problems.append(f"{located.where(('drivers', name))}: drivers.{name}: {exc}")
    if problems:
        raise ConfigError(problems)
    return cfg, fleet


MAX_CLASSES = 64  # the energy program's per-class arrays (docs/design.md §2b); K is small by design


def _check_classes(cfg: Config, fleet: Fleet, located: Located) -> None:
    """ride_through_s names classes that exist; the energy program takes at most MAX_CLASSES classes."""
    present = set(np.unique(fleet.values["priority"]).tolist())
    problems = []
    for k in cfg.plant.ride_through_s:
        if k not in present:
            path = ("plant", "ride_through_s", str(k))
            problems.append(f"{located.where(path)}: {format_path(path)}: no node has priority {k} "
                            f"(classes present: {sorted(present)})")
    energy = any(e.id == "energy" for e in cfg.programs)
    if cfg.plant.ride_through_s and not energy:  # targets without the program would silently do nothing
        path = ("plant", "ride_through_s")
        problems.append(f"{located.where(path)}: {format_path(path)}: ride-through targets need the energy "
                        f"program: add 'energy' to programs, before the allocation (e.g. programs: [forecast, "
                        f"protection, energy, allocation, health])")
    if len(present) > MAX_CLASSES and energy:
        problems.append(f"{located.where(('nodes',))}: nodes: {len(present)} distinct priorities; the energy "
                        f"program takes at most {MAX_CLASSES} classes")
    if problems:
        raise ConfigError(problems)


def _check_hierarchy(cfg: Config, fleet: Fleet, located: Located) -> None:
    """Children are Modbus nodes of this config; a leaf runs `tree` after `allocation` (docs/hierarchy.md)."""
    h = cfg.hierarchy
    problems = []
    for k, cid in enumerate(h.children):
        if cid not in fleet.ids or fleet.drivers[fleet.ids.index(cid)] != "modbus":
            path = ("hierarchy", "children", k)
            problems.append(f"{located.where(path)}: {format_path(path)}: {cid!r} is not a node with "
                            f"'driver: modbus' in this config (a child controller is polled as a node)")
    tls = h.uplink.tls if h.uplink is not None else None
    for key in ("ca", "cert", "key") if tls is not None else ():
        if not Path(getattr(tls, key)).is_file():
            path = ("hierarchy", "uplink", "tls", key)
            problems.append(f"{located.where(path)}: {format_path(path)}: no such file {getattr(tls, key)!r} "
                            f"(a PEM file; `vbatt certs` makes them)")
    ids = [e.id for e in cfg.programs]
    if h.role == "leaf" and not ("allocation" in ids and "tree" in ids and ids.index("tree") > ids.index("allocation")):
        problems.append(f"{located.where(('programs',))}: programs: a leaf of a controller tree (hierarchy.uplink "
                        f"without children) applies the tree's levels: list 'tree' after 'allocation'")
    if h.role == "leaf" and "allocation" in ids:
        # Under the tree's levels the `tree` program replaces the allocation's outputs: a ramp or a restore
        # hysteresis would be kept only in a fallback, not carried across levels (docs/hierarchy.md)
        k = ids.index("allocation")
        ap = cfg.programs[k].params
        for key in ("ramp_w_per_s", "restore_hold_s", "restore_margin"):
            if getattr(ap, key) != 0.0:
                path = ("programs", k, "allocation", key)
                problems.append(f"{located.where(path)}: {format_path(path)}: {getattr(ap, key)!r} on a leaf of a "
                                f"controller tree: the tree's levels do not carry the allocation's ramp or restore "
                                f"hold (they would hold only while the leaf is on its own); expected 0")
    if "tree" in ids and h.role != "leaf":
        problems.append(f"{located.where(('programs',))}: programs: 'tree' runs only on a leaf (hierarchy.uplink "
                        f"and no hierarchy.children)")
    if problems:
        raise ConfigError(problems)


def load_config(path: str | Path) -> tuple[Config, Fleet]:
    return validate(load_yaml_file(path))


def load_config_text(text: str, source: str = "<string>") -> tuple[Config, Fleet]:
    return validate(load_yaml(text, source))


def default_config_path() -> Path:
    return Path(str(resources.files("vbatt") / "default.yaml"))
