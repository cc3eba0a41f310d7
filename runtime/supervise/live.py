"""The live terminal view of a run: refreshes in place, never scrolls."""

from __future__ import annotations

from rich.columns import Columns
from rich.console import Group
from rich.table import Table
from rich.text import Text

from vbatt.kernel.fields import AGGREGATES, Field
from vbatt.kernel.image import Ctl, Mode, ProcessImage, ScanState
from vbatt.kernel.stats import phases, summarize

__all__ = ["render", "aggregate_cells", "class_table"]

_STATE = {ScanState.INIT: "starting", ScanState.WAITING: "waiting for inputs", ScanState.RUNNING: "running",
          ScanState.DONE: "done", ScanState.FAILED: "FAILED"}


def _w(x: float) -> str:
    return f"{x / 1e3:,.1f} kW" if abs(x) >= 1e4 else f"{x:,.0f} W"


# How a value of each unit of the field table reads on a terminal.
_FORMAT = {
    "W": _w,
    "Wh": lambda x: f"{x / 1e3:,.2f} kWh",
    "1": lambda x: f"{x * 100:.1f} %",
    "": lambda x: f"{x:,.0f}",
}


def _label(f: Field) -> str:
    """The field's name without its unit suffix, in words: main_limit_w -> 'main limit'."""
    base = f.name[: -len(f.unit) - 1] if f.unit and f.name.endswith("_" + f.unit.lower()) else f.name
    return base.replace("_", " ")


def aggregate_cells(agg: dict[str, float]) -> list[tuple[str, str]]:
    """(label, value) of every aggregate field, in table order, formatted by its unit."""
    return [(_label(f), _FORMAT[f.unit](agg[f.name]) if agg[f.name] == agg[f.name] else "-") for f in AGGREGATES]


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} s"


def class_table(rows: list[dict]) -> Table:
    """Per priority class (the energy program's `class_rows`): demand, reserve, target, runtime, reachable."""
    t = Table(title="priority classes (runtime if the main supply failed now)", title_justify="left", expand=False)
    t.add_column("class")
    for col in ("demand", "reserve", "target", "runtime", "reachable"):
        t.add_column(col, justify="right")
    for r in rows:
        ok = r["reachable"]
        t.add_row(str(r["priority"]), _w(r["demand_w"]), _FORMAT["Wh"](r["reserve_wh"]),
                  _s(r["target_s"]) if r["target_s"] else "none", _s(r["runtime_s"]),
                  "yes" if ok else "[bold red]NO[/]")
    return t


def render(img: ProcessImage, period_ms: float, title: str = "vbatt", phase_names: list[str] = (),
           warnings: list[str] = (), log_path: str = "", classes: list[dict] = ()) -> Group:
    """classes: the rows of `vbatt.programs.energy.class_rows` when the energy program runs."""
    c = img.ctl
    mode = "RUN" if c[Ctl.MODE] == Mode.RUN else "STOP"
    flags = []
    if c[Ctl.WATCHDOG]:
        flags.append("[bold red]WATCHDOG[/]")
    if c[Ctl.SAFE_STATE]:
        flags.append("[yellow]safe state[/]")
    head = Text.from_markup(
        f"[bold]{title}[/]  {_STATE.get(int(c[Ctl.STATE]), '?')}  mode [bold]{mode}[/]  {img.spec.n_nodes:,} nodes  "
        f"cycle {int(c[Ctl.CYCLES]):,} @ {period_ms:g} ms  overruns {int(c[Ctl.OVERRUNS]):,}  "
        f"FIFO {int(c[Ctl.RT_FIFO]) or 'no'}  mlock {'yes' if c[Ctl.RT_MLOCK] else 'no'}  " + " ".join(flags))
    s = summarize(img.mem)
    t = Table(title="cycle timing (µs)", title_justify="left", expand=False)
    t.add_column("metric")
    for col in ("p50", "p99", "p99.9", "max", "window p99", "window max"):
        t.add_column(col, justify="right")
    for key, label in (("exec_us", "execution"), ("wake_us", "wake latency"), ("jitter_us", "period jitter")):
        r, w = s[key]["run"], s[key]["window"]
        t.add_row(label, *(f"{r.get(q, 0):,.1f}" for q in ("p50", "p99", "p99.9", "max")),
                  f"{w.get('p99', 0):,.1f}", f"{w.get('max', 0):,.1f}")
    ph = Table(title="phases (µs)", title_justify="left", expand=False)
    ph.add_column("phase")
    for col in ("last", "mean", "max"):
        ph.add_column(col, justify="right")
    for name, v in phases(img.mem, list(phase_names)).items():
        ph.add_row(name, f"{v['last']:,.1f}", f"{v['mean']:,.1f}", f"{v['max']:,.1f}")
    g = Table(title="virtual battery", title_justify="left", show_header=False, expand=False)
    for _ in range(2):
        g.add_column()
        g.add_column(justify="right")
    cells = aggregate_cells({k: float(v[0]) for k, v in img.agg.items()})
    for k in range(0, len(cells), 2):  # two per row, in table order
        g.add_row(*cells[k], *(cells[k + 1] if k + 1 < len(cells) else ("", "")))
    parts = [head, Columns([t, ph]), g]
    if classes:
        parts.append(class_table(list(classes)))
    if log_path:
        parts.append(Text(f"latest warnings ({log_path}):" if warnings else f"log: {log_path}", style="dim"))
        parts += [Text(w, style="yellow", overflow="ellipsis", no_wrap=True) for w in warnings]
    parts.append(Text("Ctrl-C stops: outputs to the safe state, statistics written.", style="dim"))
    return Group(*parts)
