"""From a validated config to what the processes need: programs, partitions, the image spec."""

from __future__ import annotations

from vbatt.drivers.registry import known_drivers
from vbatt.programs.registry import program_class

from vbatt.config.plant import Config, ConfigError, Fleet
from vbatt.kernel.image import ImageSpec
from vbatt.kernel.program import CTX_SPEC, Program
from vbatt.kernel.stats import stats_specs

__all__ = ["build_programs", "partition", "image_spec"]


def build_programs(cfg: Config, n_nodes: int, *, configure: bool = True) -> list[Program]:
    """configure=False: programs on their own (a scratch image, e.g. the compile warm-up)."""
    progs = [program_class(e.id)(e.params, n_nodes) for e in cfg.programs]
    if configure:
        for p in progs:
            p.configure(cfg)
    return progs


def partition(cfg: Config, fleet: Fleet) -> list[tuple[int, int, str]]:
    """Contiguous node ranges of one driver kind each, one per I/O process."""
    runs: list[tuple[int, int, str]] = []
    for i, kind in enumerate(fleet.drivers):
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], i + 1, kind)
        else:
            runs.append((i, i + 1, kind))
    unknown = sorted({k for _, _, k in runs} - set(known_drivers()))
    if unknown:
        raise ConfigError([f"{cfg.source}: unknown driver(s) {unknown} (expected one of {known_drivers()})"])
    out: list[tuple[int, int, str]] = []
    for a, b, kind in runs:
        section = getattr(cfg.drivers, kind, None)
        procs = getattr(section, "processes", 1)
        split = getattr(section, "split", None)  # a driver that cuts its nodes where it must (mqtt: by edge node)
        if split is not None:
            try:
                out += [(s, e, kind) for s, e in split(cfg, fleet, a, b)]
            except ValueError as exc:
                raise ConfigError([f"{cfg.source}: drivers.{kind}.processes: {exc}"]) from None
            continue
        procs = max(1, min(procs, b - a))
        step = -(-(b - a) // procs)
        out += [(s, min(s + step, b), kind) for s in range(a, b, step)]
    return out


def image_spec(cfg: Config, fleet: Fleet, programs: list[Program], parts: list[tuple[int, int, str]]) -> ImageSpec:
    memory = [CTX_SPEC, *stats_specs(cfg.cycle.stats_window, len(programs) + 2)]
    published = []
    seen: set[str] = set()
    for p in programs:
        if p.id in seen:
            raise ConfigError([f"{cfg.source}: programs: {p.id!r} is listed twice (each program runs once per cycle)"])
        seen.add(p.id)
        for local, spec in zip(p.memory(), p.memory_specs()):
            (published if local.name in p.published else memory).append(spec)
    return ImageSpec(n_nodes=len(fleet), partitions=tuple((a, b) for a, b, _ in parts),
                     memory=tuple(memory), node_ids=tuple(fleet.ids), published=tuple(published))
