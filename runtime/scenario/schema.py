"""A scenario file: a plant config exactly as `vbatt run` reads it, plus a `scenario:` section.

`load_scenario(path)` validates both and returns a `Loaded`; every problem is a
`ConfigError` line ``file:line: key.path: what is wrong (what is expected)``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from vbatt.config.plant import Config, Fleet, validate
from vbatt.config.base import NonNeg, Priority, Strict
from vbatt.programs.codes import TRIP_CODES
from vbatt.programs.policies import POLICIES
from vbatt.config.yamlsrc import ConfigError, Located, format_path, load_yaml, load_yaml_file

__all__ = ["Event", "Scenario", "Loaded", "load_scenario", "load_scenario_text", "ACTIONS", "DEFAULT_START_UNIX_S"]

# The wall clock the programs see at t = 0 (forecast seasons follow it): fixed, so runs repeat.
DEFAULT_START_UNIX_S = 1_767_225_600.0  # 2026-01-01T00:00:00Z

Time = Annotated[float, Field(allow_inf_nan=False)]
ACTIONS = ("main_limit_w", "fail", "trip", "reset_trip", "ambient_c", "priority", "capacity_scale")
_UNDOABLE = ("main_limit_w", "fail", "ambient_c", "priority")


class Event(Strict):
    """At `at_s`, one action on `nodes` (ids or glob patterns; default every node).

    `until_s` undoes the action then (the value before it comes back)."""

    at_s: Time
    until_s: Time | None = None
    nodes: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    main_limit_w: NonNeg | None = None  # main supply capacity from now on (0: an outage)
    fail: bool | None = None  # true: the node's link fails (offline; it runs on its own battery); false: back
    trip: str | None = None  # a protection trip latched on the nodes (a TRIP_CODES name)
    reset_trip: bool | None = None  # the operator's trip reset (Op.RESET_TRIP)
    ambient_c: Annotated[float, Field(ge=-60, le=200, allow_inf_nan=False)] | None = None
    priority: Priority | None = None  # the operator's priority change (Op.SET_PRIORITY)
    capacity_scale: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None  # fade: x config

    @field_validator("trip")
    @classmethod
    def _code(cls, v: str | None) -> str | None:
        names = [c.name for c in TRIP_CODES]
        if v is not None and v not in names:
            raise ValueError(f"unknown trip {v!r} (expected one of: {', '.join(names)})")
        return v

    @model_validator(mode="after")
    def _one_action(self) -> "Event":
        given = [a for a in ACTIONS if getattr(self, a) is not None]
        if len(given) != 1:
            raise ValueError(f"an event does exactly one thing: give one of {', '.join(ACTIONS)} "
                             f"(got {', '.join(given) or 'none'})")
        if given[0] == "main_limit_w" and self.nodes is not None:
            raise ValueError("main_limit_w is the plant's, not a node's: drop 'nodes'")
        if self.until_s is not None:
            if given[0] not in _UNDOABLE:
                raise ValueError(f"until_s undoes {', '.join(_UNDOABLE)} only (not {given[0]})")
            if self.until_s <= self.at_s:
                raise ValueError(f"until_s ({self.until_s:g}) must be after at_s ({self.at_s:g})")
        return self

    @property
    def action(self) -> str:
        return next(a for a in ACTIONS if getattr(self, a) is not None)


def _known_policy(v: str) -> str:
    if v not in POLICIES:
        raise ValueError(f"unknown policy {v!r} (expected one of: {', '.join(POLICIES)})")
    return v


PolicyName = Annotated[str, AfterValidator(_known_policy)]


class Scenario(Strict):
    duration_s: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    step_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # default: the cycle period
    seed: int = 0
    start_unix_s: Time = DEFAULT_START_UNIX_S
    targets_s: dict[Priority, NonNeg] = {}  # ride-through target per priority class (vbatt size)
    policies: Annotated[list[PolicyName], Field(min_length=1)] | None = None  # default: all
    events: list[Event] = []


@dataclass
class Loaded:
    """A validated scenario: the plant as `vbatt run` reads it, the scenario, and event targets."""

    cfg: Config
    fleet: Fleet
    scenario: Scenario
    source: str
    step_s: float
    steps: int
    event_nodes: list[np.ndarray]  # per event: node indices it acts on
    located: Located


def _pydantic_errors(exc: ValidationError, located: Located, prefix: tuple) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/simulate.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        tail = ("" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, (dict, list))
                else f" (got {got!r})")
        out.append(f"{located.where(loc)}: {format_path(loc)}: {msg}{tail}")
    return out


def _match(patterns: list[str], ids: list[str], index: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    picked: set[int] = set()
    unknown = []
    for p in patterns:
        if p in index:
            picked.add(index[p])
            continue
        hits = [index[i] for i in fnmatch.filter(ids, p)] if any(c in p for c in "*?[") else []
        if not hits:
            unknown.append(p)
        picked.update(hits)
    return np.array(sorted(picked), dtype=np.int64), unknown


def check(located: Located, cfg: Config, fleet: Fleet, sc: Scenario) -> Loaded:
    """What only the whole file can tell: times against the duration and step, node names."""
    problems = []
    step_s = sc.step_s if sc.step_s is not None else cfg.cycle.cycle_ms / 1000.0
    at = lambda *p: located.where(("scenario", *p))  # noqa: E731
    if step_s > sc.duration_s:
        problems.append(f"{at('step_s')}: scenario.step_s: {step_s:g} s is longer than duration_s "
                        f"({sc.duration_s:g} s) (expected a step <= the duration)")
    steps = max(1, int(math.ceil(sc.duration_s / step_s - 1e-9)))
    if steps > 50_000_000:
        problems.append(f"{at('duration_s')}: scenario: {steps:,} steps of {step_s:g} s "
                        f"(expected at most 50,000,000: a longer step_s)")
    ids = list(fleet.ids)
    index = {nid: i for i, nid in enumerate(ids)}
    every = np.arange(len(ids), dtype=np.int64)
    event_nodes = []
    for k, ev in enumerate(sc.events):
        for key in ("at_s", "until_s"):
            t = getattr(ev, key)
            if t is not None and not (0.0 <= t <= sc.duration_s):
                when = "before the start (0)" if t < 0 else f"after the end ({sc.duration_s:g} s)"
                problems.append(f"{at('events', k, key)}: scenario.events[{k}].{key}: {t:g} s is {when} "
                                f"(expected 0 <= {key} <= duration_s)")
        if ev.nodes is None:
            event_nodes.append(every)
            continue
        picked, unknown = _match(ev.nodes, ids, index)
        for u in unknown:
            problems.append(f"{at('events', k, 'nodes')}: scenario.events[{k}].nodes: unknown node {u!r} "
                            f"(expected a node id of this plant or a pattern matching some, e.g. 'srv-0*')")
        event_nodes.append(picked)
    if problems:
        raise ConfigError(problems)
    return Loaded(cfg, fleet, sc, located.source, step_s, steps, event_nodes, located)


def _validate(located: Located) -> Loaded:
    data = located.data
    if not isinstance(data, dict):
        raise ConfigError([f"{located.source}:1: expected a mapping with 'nodes' and 'scenario' at the top level"])
    if "scenario" not in data:
        raise ConfigError([f"{located.source}:1: scenario: required key is missing (a plant config plus a "
                           f"'scenario:' section with duration_s, see docs/simulate.md)"])
    raw = data["scenario"]
    plant = Located({k: v for k, v in data.items() if k != "scenario"}, located.lines, located.source)
    problems: list[str] = []
    sc = None
    try:
        sc = Scenario.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_errors(exc, located, ("scenario",))
    try:
        cfg, fleet = validate(plant)
    except ConfigError as exc:
        problems = exc.problems + problems
    if problems:
        raise ConfigError(problems)
    return check(located, cfg, fleet, sc)


def load_scenario(path: str | Path) -> Loaded:
    return _validate(load_yaml_file(path))


def load_scenario_text(text: str, source: str = "<string>") -> Loaded:
    return _validate(load_yaml(text, source))
