"""Plant configuration: parsed once, validated into typed objects, never guessed.

`load_config(path)` returns a `Config` or raises `ConfigError` listing every
problem as ``file:line: key.path: what is wrong (what is expected)``. Unknown
keys are errors. Node keys are the DESIGN.md field names.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from vbatt.drivers.modbus_config import ModbusDriverConfig, ModbusNodeConfig, modbus_endpoints
from vbatt.drivers.opcua_client_config import OpcuaClientDriverConfig, OpcuaNodeConfig
from vbatt.opcua_models.config import OpcuaServerConfig
from vbatt.retainer import RetainConfig

from .configbase import NodeId, NonNeg, Priority, Strict
from .yamlsrc import ConfigError, Located, format_path, load_yaml, load_yaml_file

__all__ = [
    "Config",
    "ConfigError",
    "NodeConfig",
    "TemplateConfig",
    "CycleConfig",
    "PlantConfig",
    "ProgramEntry",
    "Fleet",
    "load_config",
    "load_config_text",
    "default_config_path",
]


Soc = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Temp = Annotated[float, Field(ge=-60, le=200, allow_inf_nan=False)]


# -- demand profiles (simulated nodes) -----------------------------------------
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class SineProfile(Strict):
    kind: Literal["sine"]
    amplitude_w: NonNeg
    period_s: Annotated[float, Field(gt=0)]
    noise_w: NonNeg = 0.0
    phase_s: float = 0.0


class StepProfile(Strict):
    kind: Literal["step"]
    at_s: NonNeg
    to_w: NonNeg


class CsvProfile(Strict):
    """A trace: one demand value (W) per line, `dt_s` apart, looped."""

    kind: Literal["csv"]
    path: str
    dt_s: Annotated[float, Field(gt=0)] = 1.0
    column: int = 0

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        try:
            ok = Path(v).is_file()
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"no such file: {v} (expected a CSV trace, one value per line)")
        return v


Profile = Annotated[Union[SineProfile, StepProfile, CsvProfile], Field(discriminator="kind")]


# -- nodes -----------------------------------------------------------------------
class SimPhysics(Strict):
    """Parameters of the simulated battery; the defaults make an ideal battery."""

    ocv_empty_v: Annotated[float, Field(gt=0)] = 48.0
    ocv_full_v: Annotated[float, Field(gt=0)] = 48.0
    resistance_ohm: NonNeg = 0.0
    charge_efficiency: Annotated[float, Field(gt=0, le=1)] = 1.0
    discharge_efficiency: Annotated[float, Field(gt=0, le=1)] = 1.0
    ambient_c: Temp = 25.0
    # thermal model on only when a thermal resistance is given
    thermal_resistance_k_per_w: Annotated[float, Field(gt=0)] | None = None
    thermal_capacity_j_per_k: Annotated[float, Field(gt=0)] = 20000.0

    @model_validator(mode="after")
    def _ocv(self) -> "SimPhysics":
        if self.ocv_full_v < self.ocv_empty_v:
            raise ValueError("ocv_full_v must be >= ocv_empty_v")
        return self


class NodeConfig(Strict):
    """One node. For a simulated node the values are its physics and initial state."""

    id: NodeId
    driver: Literal["sim"] = "sim"
    priority: Priority = 0
    demand_w: NonNeg = 0.0
    demand_profile: Profile | None = None
    max_discharge_w: NonNeg = 0.0
    max_charge_w: NonNeg = 0.0
    capacity_wh: NonNeg = 0.0
    soc: Soc = 0.5
    temperature_c: Temp = 25.0
    link_max_w: NonNeg = 0.0
    physics: SimPhysics = SimPhysics()


RANGED = ("priority", "demand_w", "max_discharge_w", "max_charge_w", "capacity_wh", "soc",
          "temperature_c", "link_max_w")


def _range(t):
    return Union[t, Annotated[tuple[t, t], Field(description="[low, high]: uniform random")]]


class TemplateBody(Strict):
    """`count` nodes named by `id` (a format with `{i}`), values constant or `[low, high]`."""

    count: Annotated[int, Field(ge=1, le=1_000_000)]
    id: Annotated[str, Field(min_length=1)]
    start: Annotated[int, Field(ge=0)] = 0
    seed: int = 0
    driver: Literal["sim", "modbus"] = "sim"  # modbus: served by the embedded fleet, polled over Modbus
    priority: _range(int) = 0
    demand_w: _range(float) = 0.0
    demand_profile: Profile | None = None
    max_discharge_w: _range(float) = 0.0
    max_charge_w: _range(float) = 0.0
    capacity_wh: _range(float) = 0.0
    soc: _range(float) = 0.5
    temperature_c: _range(float) = 25.0
    link_max_w: _range(float) = 0.0
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


class PlantConfig(Strict):
    main_limit_w: NonNeg = 0.0
    stale_ms: Annotated[float, Field(gt=0)] = 1000.0
    # DESIGN §2b: per priority class, how long it must stay served on batteries alone if the main
    # supply fails now (s). The classes must exist in the fleet (checked in `validate`).
    ride_through_s: dict[Annotated[int, Field(ge=0, le=1000)], Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}


class SimDriverConfig(Strict):
    period_ms: Annotated[float, Field(gt=0)] = 10.0
    processes: Annotated[int, Field(ge=1, le=64)] = 1


class DriversConfig(Strict):
    sim: SimDriverConfig = SimDriverConfig()
    modbus: ModbusDriverConfig = ModbusDriverConfig()
    opcua: OpcuaClientDriverConfig = OpcuaClientDriverConfig()


def _node_kind(v: Any) -> str:
    if isinstance(v, dict):
        return "template" if "template" in v else str(v.get("driver", "sim"))
    return "template" if isinstance(v, TemplateConfig) else v.driver


NodeEntry = Annotated[
    Union[
        Annotated[NodeConfig, Tag("sim")],
        Annotated[TemplateConfig, Tag("template")],
        Annotated[ModbusNodeConfig, Tag("modbus")],
        Annotated[OpcuaNodeConfig, Tag("opcua")],
    ],
    Discriminator(_node_kind, custom_error_type="invalid_driver",
                  custom_error_message="unknown driver (expected sim, modbus or opcua, or a 'template')"),
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
                    arr = (rng.integers(v[0], v[1] + 1, t.count) if f == "priority"
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
    values = {f: np.asarray(cols[f], dtype=np.int64 if f == "priority" else np.float64) for f in RANGED}
    return Fleet(ids, values, drivers, profiles, physics)


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
        out.append(f"{located.where(loc)}: {format_path(loc)}: {msg}{tail}")
    return out


_NODE_TAGS = ("sim", "template", "modbus", "opcua")


def _is_union_tag(p) -> bool:
    return isinstance(p, str) and (p.startswith("function-") or p.startswith("tuple[")
                                   or p in ("int", "float", "sine", "step", "csv"))


def _parse_programs(raw: Any, located: Located) -> tuple[list[ProgramEntry], list[str]]:
    from vbatt.programs.registry import program_class, known_programs

    if not isinstance(raw, list) or not raw:
        return [], [f"{located.where(('programs',))}: programs: expected a non-empty list of program ids"]
    entries, problems = [], []
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
    try:
        modbus_endpoints(cfg, fleet)  # port clashes and overflows, here rather than at driver start
    except ValueError as exc:
        raise ConfigError([f"{located.where(('drivers', 'modbus'))}: drivers.modbus: {exc}"]) from None
    return cfg, fleet


MAX_CLASSES = 64  # the energy program's per-class arrays (DESIGN §2b); K is small by design


def _check_classes(cfg: Config, fleet: Fleet, located: Located) -> None:
    """ride_through_s names classes that exist; the energy program takes at most MAX_CLASSES classes."""
    present = set(np.unique(fleet.values["priority"]).tolist())
    problems = []
    for k in cfg.plant.ride_through_s:
        if k not in present:
            path = ("plant", "ride_through_s", str(k))
            problems.append(f"{located.where(path)}: {format_path(path)}: no node has priority {k} "
                            f"(classes present: {sorted(present)})")
    if len(present) > MAX_CLASSES and any(e.id == "energy" for e in cfg.programs):
        problems.append(f"{located.where(('nodes',))}: nodes: {len(present)} distinct priorities; the energy "
                        f"program takes at most {MAX_CLASSES} classes")
    if problems:
        raise ConfigError(problems)


def load_config(path: str | Path) -> tuple[Config, Fleet]:
    return validate(load_yaml_file(path))


def load_config_text(text: str, source: str = "<string>") -> tuple[Config, Fleet]:
    return validate(load_yaml(text, source))


def default_config_path() -> Path:
    return Path(str(resources.files("vbatt") / "default.yaml"))
