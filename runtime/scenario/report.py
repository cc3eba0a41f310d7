"""`--report DIR`: report.md (metrics per policy, the scenario, the machine, the speed) and PNG plots.

matplotlib with the Agg backend (no display); imported only when a report is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vbatt.scenario.metrics import series
from vbatt.scenario.record import SERVED_TOL
from vbatt.scenario.runner import RunResult
from vbatt.scenario.schema import Loaded

__all__ = ["write_report", "PLOTS"]

PLOTS = ("ride_through.png", "served.png", "soc.png", "shed.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _hours(t) -> tuple[np.ndarray, str]:
    t = np.asarray(t, dtype=float)
    end = t[-1] if t.size else 0.0
    if end >= 3 * 3600:
        return t / 3600.0, "time (h)"
    if end >= 180:
        return t / 60.0, "time (min)"
    return t, "time (s)"


def _colors(classes: list[int]):
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    k = max(1, len(classes) - 1)
    return {c: cmap(j / k * 0.9) for j, c in enumerate(classes)}


def _fmt_s(x) -> str:
    if x is None:
        return "never"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.0f} s"


def plot_ride_through(results: list[RunResult], metrics: dict, path: Path) -> None:
    plt = _plt()
    classes = results[0].classes
    col = _colors(classes)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(classes))
    for j, c in enumerate(classes):
        vals = [metrics[r.policy]["classes"][str(c)]["ride_through_s"] / 3600.0 for r in results]
        xs = np.arange(len(results)) + (j - (len(classes) - 1) / 2) * width
        ax.bar(xs, vals, width, color=col[c], label=f"class {c}")
        tg = [metrics[r.policy]["classes"][str(c)]["target_s"] for r in results]
        if any(tg) and results[0].drop_k >= 0:  # the class's ride-through target over its bar
            ax.hlines([t / 3600.0 for t in tg], xs - width / 2, xs + width / 2, color="k", lw=2,
                      label="target (plant.ride_through_s)" if j == 0 else None)
    end_h = (results[0].steps - max(results[0].drop_k, 0)) * results[0].step_s / 3600.0
    ax.axhline(end_h, color="k", lw=0.8, ls=":", label="end of scenario")
    ax.set_xticks(np.arange(len(results)), [r.policy for r in results])
    if results[0].drop_k >= 0:
        ax.set_ylabel("ride-through after the main supply drop (h)")
        ax.set_title("How long each priority class stays fully served (0 = most critical)")
    else:  # no outage: the targets do not apply, the bars are the time to the first shed
        ax.set_ylabel("fully served from the start (h)")
        ax.set_title("No main supply drop: how long each class stays fully served from the start")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_served(results: list[RunResult], path: Path) -> None:
    plt = _plt()
    classes = results[0].classes
    col = _colors(classes)
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.8 * len(results)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        s = series(r)
        t, unit = _hours(s["t_s"])
        stack = [s["c"]["served_w"][:, c] / 1000.0 for c in classes]
        ax.stackplot(t, *stack, colors=[col[c] for c in classes], labels=[f"class {c} served" for c in classes],
                     step="post")
        ax.step(t, s["f"]["demand_w"] / 1000.0, where="post", color="k", lw=1.0, label="demand")
        ax.step(t, s["f"]["main_limit_w"] / 1000.0, where="post", color="tab:red", lw=1.0, ls="--",
                label="main supply limit")
        ax.step(t, s["f"]["main_w"] / 1000.0, where="post", color="tab:orange", lw=1.0, ls=":",
                label="main supply used (the rest: batteries)")
        ax.set_ylabel("power (kW)")
        ax.set_title(f"{r.policy}: load served per class")
        ax.set_ylim(bottom=0)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel(unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soc(results: list[RunResult], path: Path) -> None:
    plt = _plt()
    classes = results[0].classes
    col = _colors(classes)
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        s = series(r)
        t, unit = _hours(s["t_s"])
        for c in classes:
            lo, hi, mean = s["c"]["soc_min"][:, c], s["c"]["soc_max"][:, c], s["c"]["soc_mean"][:, c]
            if not np.isfinite(mean).any():
                continue
            ax.fill_between(t, lo, hi, color=col[c], alpha=0.25, step="post", lw=0)
            ax.step(t, mean, where="post", color=col[c], lw=1.2, label=f"class {c} (band: min-max)")
        ax.axhline(r.soc_min, color="tab:red", lw=0.8, ls=":", label="soc_min (reserve)")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("SoC")
        ax.set_title(f"{r.policy}: state of charge per class")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel(unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shed(results: list[RunResult], metrics: dict, path: Path) -> None:
    plt = _plt()
    classes = results[0].classes
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 0.9 + (0.35 * len(classes) + 0.9) * len(results)),
                             sharex=True, squeeze=False, layout="constrained")
    mesh = None
    for ax, r in zip(axes[:, 0], results):
        s = series(r)
        t, unit = _hours(s["t_s"])
        step = (t[1] - t[0]) if t.size > 1 else 1.0
        edges = np.append(t, t[-1] + step)
        dem = np.stack([s["c"]["demand_w"][:, c] for c in classes])
        shed = np.stack([s["c"]["shed_w"][:, c] for c in classes])
        frac = np.where(dem > 0, shed / np.where(dem > 0, dem, 1.0), 0.0)
        mesh = ax.pcolormesh(edges, np.arange(len(classes) + 1) - 0.5, frac, cmap="Reds", vmin=0, vmax=1,
                             shading="flat")
        for j, c in enumerate(classes):
            first = metrics[r.policy]["classes"][str(c)]["first_shed_s"]
            if first is not None:
                ft, _ = _hours([0.0, first, s["t_s"][-1]])
                ax.plot([ft[1]], [j], marker="|", color="k", ms=14, mew=2)
        ax.set_yticks(range(len(classes)), [f"class {c}" for c in classes])
        ax.invert_yaxis()
        ax.set_title(f"{r.policy}: load shed (share of the class's demand; | = first shed)")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="shed share", shrink=0.8)
    axes[-1, 0].set_xlabel(unit)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runtime(results: list[RunResult], path: Path) -> bool:
    with_rt = [r for r in results if r.rec.has_runtime]
    if not with_rt:
        return False
    plt = _plt()
    classes = results[0].classes
    col = _colors(classes)
    fig, axes = plt.subplots(len(with_rt), 1, figsize=(10, 2.6 * len(with_rt)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], with_rt):
        s = series(r)
        t, unit = _hours(s["t_s"])
        drop_s = r.drop_k * r.step_s if r.drop_k >= 0 else None
        styles = ("-", "--", "-.", ":")
        for j, c in enumerate(classes):
            # classes with the same runtime coincide: wider lines first, dashes on top keep each visible
            ax.step(t, s["c"]["runtime_s"][:, c] / 3600.0, where="post", color=col[c], ls=styles[j % 4],
                    lw=2.6 - 1.6 * j / max(1, len(classes) - 1), label=f"class {c}")
            tg = r.targets_s.get(c, 0.0)
            if tg > 0 and drop_s is not None:  # what is left of the target after the drop
                left = np.clip(tg - (np.asarray(s["t_s"]) - drop_s), 0.0, tg) / 3600.0
                ax.plot(t, np.where(np.asarray(s["t_s"]) >= drop_s, left, np.nan), color=col[c], lw=0.8,
                        alpha=0.6, ls=(0, (1, 2)), label=f"class {c} target left")
        if drop_s is not None:
            ax.axvline(_hours([0.0, drop_s, s["t_s"][-1]])[0][1], color="tab:red", lw=0.8, ls="--",
                       label="main supply lost")
        ax.set_ylabel("runtime remaining (h)")
        ax.set_title(f"{r.policy}: runtime remaining per class if the main supply failed now "
                     f"(the energy program's estimate under its rule)", fontsize=10)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel(unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _class_table(loaded: Loaded, classes: list[int]) -> list[str]:
    v = loaded.fleet.values
    rows = ["| class | nodes | capacity (kWh) | demand at t=0 (kW) | max discharge (kW) |", "|---|---|---|---|---|"]
    for c in classes:
        m = v["priority"] == c
        rows.append(f"| {c} | {int(m.sum())} | {v['capacity_wh'][m].sum() / 1000:.1f} | "
                    f"{v['demand_w'][m].sum() / 1000:.2f} | {v['max_discharge_w'][m].sum() / 1000:.2f} |")
    return rows


def write_report(out: Path, loaded: Loaded, results: list[RunResult], metrics: dict, scenario_path: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plot_ride_through(results, metrics["policies"], out / "ride_through.png")
    plot_served(results, out / "served.png")
    plot_soc(results, out / "soc.png")
    plot_shed(results, metrics["policies"], out / "shed.png")
    files = [out / p for p in PLOTS]
    if plot_runtime(results, out / "runtime.png"):
        files.append(out / "runtime.png")
    sim, mach, sc = metrics["sim"], metrics["machine"], loaded.scenario
    classes = results[0].classes
    lines = [f"# Simulation: {Path(scenario_path).name}", "",
             f"Scenario `{scenario_path}`: {sim['nodes']:,} nodes, {_fmt_s(sim['duration_s'])} in steps of "
             f"{sim['step_s']:g} s ({sim['steps']:,} steps), seed {sc.seed}, main supply limit at the start "
             f"{loaded.cfg.plant.main_limit_w / 1000:g} kW, programs "
             f"{' -> '.join(e.id for e in loaded.cfg.programs)}.", ""]
    lines += _class_table(loaded, classes) + [""]
    if sc.events:
        lines += ["Events:", ""]
        for ev in sc.events:
            what = ev.action
            val = getattr(ev, what)
            nodes = "all nodes" if ev.nodes is None else ", ".join(ev.nodes[:5]) + (" ..." if len(ev.nodes) > 5 else "")
            until = f" until {_fmt_s(ev.until_s)}" if ev.until_s is not None else ""
            target = "" if what == "main_limit_w" else f" on {nodes}"
            lines.append(f"- at {_fmt_s(ev.at_s) if ev.at_s else '0 s'}{until}: {what} = {val}{target}")
        lines.append("")
    lines += ["## Outcome per policy", "",
              "Ride-through: from the first main supply drop until the class is no longer fully served "
              f"(shed <= {SERVED_TOL:g} x demand); the rest of the scenario when that never happens. "
              "First shed: the first time any load of the class was shed.", ""]
    for r in results:
        m = metrics["policies"][r.policy]
        lines += [f"### {r.policy}", "",
                  "| class | first shed | ride-through | target | met | served (kWh) | demand (kWh) | shed (kWh) "
                  "| served |", "|---|---|---|---|---|---|---|---|---|"]
        for c in classes:
            x = m["classes"][str(c)]
            met = {True: "yes", False: "**no**", None: "-"}[x["target_met"]]
            lines.append(f"| {c} | {_fmt_s(x['first_shed_s'])} | {_fmt_s(x['ride_through_s'])}"
                         f"{'' if not x['never_shed_after_drop'] else ' (to the end)'} | "
                         f"{_fmt_s(x['target_s']) if x['target_s'] else '-'} | {met} | {x['served_wh'] / 1000:.2f} | "
                         f"{x['demand_wh'] / 1000:.2f} | {x['shed_wh'] / 1000:.2f} | "
                         f"{100 * x['served_fraction']:.1f} % |")
        lines.append("")
        cr, rs = m["critical"], m["reserve"]
        if cr and cr["pooled_bound_s"]:
            lines += [f"Class {cr['class']} against its pooled-energy bound (usable energy at the drop "
                      f"{cr['usable_at_drop_wh'] / 1000:.1f} kWh / its demand {cr['demand_at_drop_w'] / 1000:.2f} kW = "
                      f"{_fmt_s(cr['pooled_bound_s'])}): {_fmt_s(cr['ride_through_s'])}, "
                      f"{100 * cr['fraction_of_bound']:.1f} %.", ""]
        if m["energy_alarms"]:
            lines += ["Energy alarms at the drop (RIDE_THROUGH_SHORT): " + "; ".join(m["energy_alarms"]) + ".", ""]
        if rs["whole_margin_min_wh"] is not None:
            prog = rs["program_margin_min_wh"]
            lines += [f"Reserve margin, minimum while the main supply was on: usable energy above the whole "
                      f"reserve at the demand that came {rs['whole_margin_min_wh'] / 1000:.2f} kWh"
                      + ("" if prog is None else f"; the energy program's own (pooled energy above its reserve) "
                                                 f"{prog / 1000:.2f} kWh") + ".", ""]
    lines += ["## Fleet", "",
              "| policy | battery discharge (kWh) | peak main (kW) | max SoC spread | stranded at first shed (kWh) "
              "| setpoint reversals | wall (s) | speed (x real time) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = metrics["policies"][r.policy]
        f = m["fleet"]
        stranded = "-" if f["stranded_wh"] is None else f"{f['stranded_wh'] / 1000:.2f}"
        lines.append(f"| {r.policy} | {f['battery_wh'] / 1000:.2f} | {f['peak_main_w'] / 1000:.2f} | "
                     f"{f['soc_spread_max']:.3f} | {stranded} | {f['setpoint_reversals']:,} | {m['wall_s']:.2f} | "
                     f"{m['speed_x']:,.0f} |")
    lines += ["", "## Plots", ""]
    captions = {"ride_through.png": "Ride-through per class and policy",
                "served.png": "Load served per class (stacked), demand, the main supply limit and what was used of it",
                "soc.png": "State of charge per class: mean, band min-max",
                "shed.png": "When and how much of each class was shed",
                "runtime.png": "Runtime remaining per class if the main supply failed now (the energy program's "
                              "estimate), and what is left of each target after the drop"}
    for f in files:
        lines += [f"![{captions[f.name]}]({f.name})", ""]
    lines += ["## Machine", "",
              f"{mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, numpy {mach['numpy']}, "
              f"numba {mach['numba']} ({mach['system']}). Simulation wall time {sim['wall_s']:.2f} s for "
              f"{len(results)} run(s) (compile time of the first run included).", ""]
    (out / "report.md").write_text("\n".join(lines))
    return [out / "report.md", *files]

