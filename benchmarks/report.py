"""Turn pytest-benchmark's JSON into benchmarks/REPORT.md with tables and PNG plots.

    pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results.json
    python -m benchmarks.report [--results benchmarks/results.json] [--out benchmarks/REPORT.md]
                                [--baseline FILE | --no-baseline]

What the report reads (the conventions are spelled out in benchmarks/conftest.py):

* every benchmark: one table per `group` (min / median / mean / max / stddev,
  in a unit chosen per group, ops/s, rounds) and, when a baseline exists, the
  median's ratio to it (by default the results.json of the last commit, so a
  slowdown shows up in review next to the number);
* ``extra_info["n"]``: the time-against-N plot (log-log), one line per group,
  test function and remaining parameters;
* ``extra_info["solver"]`` (or a ``solver`` parameter, or "highs" in the name)
  with ``n``: the allocator-against-HiGHS plot and ratio table;
* latency in µs under keys ending ``_us`` (samples list or p50/p99/p99.9/max
  summary) and ``_hist_us`` (``[[upper_edge_us, count], ...]``): a percentile
  table and one histogram plot per metric;
* ``machine_info`` (pytest-benchmark's, plus ``machine_info["vbatt"]`` from
  conftest.py): the machine section.

It works on any subset of the suite and lists the expected areas that produced
no result. Plots go to benchmarks/plots/ (matplotlib, Agg backend: no display).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["main", "build_report", "EXPECTED"]

HERE = Path(__file__).resolve().parent

# (area, how to recognise its benchmarks: file name or a regex over group/name)
EXPECTED: tuple[tuple[str, str], ...] = (
    ("scan: cycle cost and wake latency", "bench_scan.py"),
    ("programs: compute time against N", "bench_programs.py"),
    ("allocator against HiGHS", "solver-pairs"),
    ("Modbus polling", "bench_modbus.py"),
    ("OPC UA server updates", "bench_opcua.py"),
    ("OPC UA client driver", "bench_opcua_client.py"),
    ("startup", r"re:startup"),
    ("retentive state", "bench_retain.py"),
)

UNITS = ((1e-6, "ns", 1e9), (1e-3, "µs", 1e6), (1.0, "ms", 1e3), (math.inf, "s", 1.0))
PERCENTILES = ("p50", "p99", "p99.9", "max")


# -- reading ------------------------------------------------------------------------
def _file_of(b: dict) -> str:
    return Path(b["fullname"].split("::", 1)[0]).name


def _base(b: dict) -> str:
    return b["name"].split("[", 1)[0]


def _unit(seconds: float) -> tuple[str, float]:
    for limit, name, scale in UNITS:
        if seconds < limit:
            return name, scale
    return "s", 1.0


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:,.{max(0, digits - 1 - mag)}f}"


def _time(seconds: float) -> str:
    unit, scale = _unit(seconds)
    return f"{_fmt(seconds * scale)} {unit}"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "x"


def _label(b: dict, drop: tuple = ()) -> str:
    params = {k: v for k, v in (b.get("params") or {}).items() if k not in drop}
    if not params:
        return b["name"]
    return _base(b) + "[" + ", ".join(f"{k}={v}" for k, v in params.items()) + "]"


def latency_metrics(b: dict) -> dict[str, dict]:
    """metric -> {"summary": {p50, p99, p99.9, max, count, mean} | None, "hist": [[edge, count]] | None,
    "samples": [...] | None} for one benchmark."""
    out: dict[str, dict] = defaultdict(lambda: {"summary": None, "hist": None, "samples": None})
    for key, v in (b.get("extra_info") or {}).items():
        if key.endswith("_hist_us") and isinstance(v, list):
            out[key[: -len("_hist_us")]]["hist"] = v
        elif key.endswith("_us") and isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out[key[: -len("_us")]]["samples"] = v
            out[key[: -len("_us")]]["summary"] = _summarize(v)
        elif key.endswith("_us") and isinstance(v, dict) and any(p in v for p in PERCENTILES):
            out[key[: -len("_us")]]["summary"] = v
    # `wake_latency_us` and `wake_latency_hist_us` are one metric; the lead's bench uses `wake_latency`.
    return dict(out)


def _summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:  # "higher" method: never better than a measured sample
        return s[min(n - 1, math.ceil(p * (n - 1)))]

    return {"count": n, "p50": q(0.5), "p99": q(0.99), "p99.9": q(0.999), "max": s[-1], "mean": sum(s) / n}


def solver_of(b: dict) -> str | None:
    ex, params = b.get("extra_info") or {}, b.get("params") or {}
    if ex.get("solver"):
        return str(ex["solver"])
    if params.get("solver"):
        return str(params["solver"])
    return "highs" if "highs" in b["name"].lower() else None


def solver_pairs(benchmarks: list[dict]) -> dict[str, dict[int, dict[str, dict]]]:
    """problem -> n -> solver -> benchmark, for problems where two or more solvers ran."""
    found: dict[str, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    named_highs = {(b["group"], (b.get("extra_info") or {}).get("n")) for b in benchmarks
                   if solver_of(b) == "highs" and not (b.get("extra_info") or {}).get("solver")
                   and not (b.get("params") or {}).get("solver")}
    for b in benchmarks:
        ex = b.get("extra_info") or {}
        n = ex.get("n")
        if not isinstance(n, (int, float)):
            continue
        solver = solver_of(b)
        if solver is None and (b["group"], n) in named_highs:
            solver = _base(b).removeprefix("test_")  # the group's other benchmark: the allocator side
        if solver is None:
            continue
        problem = str(ex.get("problem") or b.get("group") or "")
        found[problem][int(n)][solver] = b
    return {p: dict(byn) for p, byn in found.items()
            if len({s for d in byn.values() for s in d}) >= 2}


def scaling_series(benchmarks: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for b in benchmarks:
        n = (b.get("extra_info") or {}).get("n")
        if not isinstance(n, (int, float)) or isinstance(n, bool):
            continue
        drop = tuple(k for k, v in (b.get("params") or {}).items() if v == n or k in ("n", "solver"))
        rest = _label(b, drop)
        solver = solver_of(b)
        key = f"{b.get('group') or _file_of(b)}: {rest.split('[')[0] if rest == b['name'] else rest}"
        if solver:
            key += f" ({solver})"
        series[key].append((int(n), b["stats"]["median"]))
    return {k: sorted(v) for k, v in series.items()}


def coverage(benchmarks: list[dict], bench_dir: Path) -> list[tuple[str, str, int]]:
    rows = []
    pairs = solver_pairs(benchmarks)
    for area, rule in EXPECTED:
        if rule == "solver-pairs":
            count = (sum(len(d) for byn in pairs.values() for d in byn.values())
                     + sum(1 for b in benchmarks if "highs_s" in b.get("extra_info", {})))
            where = "extra_info['solver'] pairs or ['highs_s']"
        elif rule.startswith("re:"):
            rx = re.compile(rule[3:], re.I)
            count = sum(1 for b in benchmarks if rx.search(f"{b.get('group')} {b['name']}"))
            where = f"group/name matching /{rule[3:]}/"
        else:
            count = sum(1 for b in benchmarks if _file_of(b) == rule)
            where = rule + ("" if (bench_dir / rule).exists() else " (file not in the tree)")
        rows.append((area, where, count))
    return rows


# -- plots --------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _buckets(m: dict):
    """(upper edges, counts) of one latency metric, from its histogram or its raw samples."""
    import numpy as np

    if m["hist"]:
        return (np.array([float(e) for e, _ in m["hist"]]), np.array([int(c) for _, c in m["hist"]], dtype=float))
    if m["samples"]:
        s = np.sort(np.asarray(m["samples"], dtype=float))
        edges, counts = np.unique(s, return_counts=True)
        return edges, counts.astype(float)
    return None


def plot_latency(metric: str, entries: list[tuple[str, dict]], path: Path) -> bool:
    """Left: histogram re-binned to 8 bins per octave (fraction of samples, so runs of
    different length compare); right: exceedance P(latency > x), where the tail shows."""
    import numpy as np

    data = [(label, b) for label, m in entries if (b := _buckets(m)) is not None and b[1].sum() > 0]
    if not data:
        return False
    lo = max(min(float(b[0].min()) for _, b in data), 1e-3) / 1.1
    hi = max(float(b[0].max()) for _, b in data) * 1.1
    grid = np.geomspace(lo, hi, max(2, int(math.ceil(math.log2(hi / lo) * 8)) + 1))
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, (edges, counts) in data:
        total = counts.sum()
        binned = np.zeros(len(grid) - 1)
        idx = np.clip(np.searchsorted(grid, edges, side="left") - 1, 0, len(binned) - 1)
        np.add.at(binned, idx, counts)
        ax.stairs(binned / total, grid, label=label)
        order = np.argsort(edges)
        e, c = edges[order], counts[order]
        exceed = 1.0 - np.cumsum(c) / total
        keep = exceed > 0
        ax2.step(np.r_[e[0], e[keep]], np.r_[1.0, exceed[keep]], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"{metric} (µs)")
    ax.set_ylabel("fraction of samples")
    ax.set_title(f"{metric}: histogram")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel(f"{metric} (µs)")
    ax2.set_ylabel("P(latency > x)")
    ax2.set_title(f"{metric}: tail")
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_lines(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (nodes)")
    ax.set_ylabel("median time per call (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report -------------------------------------------------------------------------------
def _machine(data: dict) -> list[str]:
    mi = data.get("machine_info") or {}
    v = mi.get("vbatt") or {}
    cpu = mi.get("cpu") or {}
    versions = v.get("versions") or {}
    rows = [
        ("CPU", f"{v.get('cpu_model') or cpu.get('brand_raw') or mi.get('processor') or '?'}"
                f" ({cpu.get('hz_actual_friendly', '?')})"),
        ("cores", f"{v.get('cores_online', cpu.get('count', '?'))} online, {v.get('cores_usable', '?')} usable"),
        ("memory", f"{v['memory_gib']} GiB" if v.get("memory_gib") else "?"),
        ("kernel", f"{mi.get('system', '?')} {v.get('kernel') or mi.get('release', '?')}"),
        ("Python", f"{mi.get('python_implementation', '')} {mi.get('python_version', '?')} ({mi.get('python_compiler', '')})"),
        ("load average at start", ", ".join(map(str, v["loadavg_at_start"])) if v.get("loadavg_at_start") else "?"),
    ]
    rows += [(name, ver) for name, ver in versions.items()]
    ci = data.get("commit_info") or {}
    rows.append(("commit", f"{ci.get('id', '?')[:12]}{' (dirty tree)' if ci.get('dirty') else ''}"
                           f" on {ci.get('branch', '?')}"))
    rows.append(("run at", data.get("datetime", "?")))
    out = ["| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows]
    if not v:
        out.append("\n(machine_info has no `vbatt` section: the run did not use benchmarks/conftest.py)")
    return out


def _baseline(args_baseline: str | None, results: Path) -> tuple[dict[str, float], str]:
    """fullname -> median of a previous run, and where it came from."""
    text = None
    if args_baseline:
        p = Path(args_baseline)
        text, origin = (p.read_text(), str(p)) if p.exists() else (None, "")
    else:
        try:
            rel = results.resolve().relative_to(HERE.parent)
            text = subprocess.run(["git", "show", f"HEAD:{rel.as_posix()}"], cwd=HERE.parent, capture_output=True,
                                  text=True, timeout=20, check=True).stdout
            origin = f"git HEAD:{rel.as_posix()}"
        except (subprocess.SubprocessError, ValueError, OSError):
            text = None
    if not text:
        return {}, ""
    try:
        old = json.loads(text)
        return {b["fullname"]: b["stats"]["median"] for b in old.get("benchmarks", [])}, origin
    except (ValueError, KeyError, TypeError):
        return {}, ""


def build_report(data: dict, out_md: Path, plots_dir: Path, bench_dir: Path,
                 baseline: dict[str, float] | None = None, baseline_origin: str = "") -> str:
    benchmarks = [b for b in data.get("benchmarks", []) if "stats" in b]
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):  # plots of benchmarks that no longer ran must not linger
        old.unlink()
    rel = lambda p: p.relative_to(out_md.parent).as_posix() if p.is_relative_to(out_md.parent) else str(p)  # noqa: E731
    baseline = baseline or {}
    md = ["# vbatt benchmark report", "",
          f"Written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} by `python -m benchmarks.report` from "
          f"the results of `make bench` ({len(benchmarks)} benchmarks). Times are per call; lower is better. "
          "Compare figures within one run: the machine is shared and noisy.", "",
          "## Machine", ""] + _machine(data) + [""]

    md += ["## Coverage", "", "| area | source | benchmarks |", "|---|---|---|"]
    cov = coverage(benchmarks, bench_dir)
    md += [f"| {a} | {w} | {n if n else '**missing**'} |" for a, w, n in cov]
    ran_files = {_file_of(b) for b in benchmarks}
    silent = sorted(p.name for p in bench_dir.glob("bench_*.py") if p.name not in ran_files)
    missing = [a for a, _, n in cov if not n]
    md += ["", f"Missing: {', '.join(missing)}." if missing else "Every expected area produced results."]
    if silent:
        md.append(f"Benchmark files in the tree without results in this run (failed, skipped or deselected): "
                  f"{', '.join(silent)}.")
    md.append("")

    # tables per group
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b.get("group") or _file_of(b)].append(b)
    md += ["## Results by group", ""]
    if baseline:
        md += [f"`vs base`: median of this run / median of the baseline ({baseline_origin}); "
               "> 1 is slower. ⚠ marks more than 1.3×.", ""]
    for g in sorted(groups):
        rows = sorted(groups[g], key=lambda b: ((b.get("extra_info") or {}).get("n") or 0, b["name"]))
        head = "| benchmark | unit | min | median | mean | max | stddev | ops/s | rounds |"
        sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        if baseline:
            head += " vs base |"
            sep += "---:|"
        md += [f"### {g}", "", head, sep]
        for b in rows:
            s = b["stats"]
            unit, scale = _unit(s["median"])  # per row: one group can span 1 µs .. 1 s
            line = (f"| {b['name']} | {unit} | {_fmt(s['min'] * scale)} | {_fmt(s['median'] * scale)} | "
                    f"{_fmt(s['mean'] * scale)} | {_fmt(s['max'] * scale)} | {_fmt(s['stddev'] * scale)} | "
                    f"{_fmt(s['ops'])} | {s['rounds']} |")
            if baseline:
                old = baseline.get(b["fullname"])
                r = s["median"] / old if old else None
                line += (f" {_fmt(r)}×{' ⚠' if r and r > 1.3 else ''} |" if r else " new |")
            md.append(line)
        md.append("")

    # latency
    by_metric: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for b in benchmarks:
        for metric, m in latency_metrics(b).items():
            by_metric[metric].append((f"{b.get('group')}: {b['name']}" if b.get("group") else b["name"], m))
    md += ["## Latency", ""]
    if not by_metric:
        md += ["No benchmark attached latency samples (`extra_info[\"<metric>_us\"]`).", ""]
    else:
        md += ["| metric | benchmark | count | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for metric in sorted(by_metric):
            for label, m in by_metric[metric]:
                s = m["summary"] or {}
                md.append(f"| {metric} | {label} | {s.get('count', '–')} | " +
                          " | ".join(_fmt(s.get(p)) if isinstance(s.get(p), (int, float)) else "–"
                                     for p in PERCENTILES) + " |")
        md.append("")
        for metric in sorted(by_metric):
            png = plots_dir / f"latency_{_slug(metric)}.png"
            if plot_latency(metric, by_metric[metric], png):
                md += [f"![{metric} histogram]({rel(png)})", ""]

    # scaling
    series = scaling_series(benchmarks)
    md += ["## Compute time against N", ""]
    if not series:
        md += ["No benchmark set `extra_info[\"n\"]`.", ""]
    else:
        png = plots_dir / "time_vs_n.png"
        plot_lines(series, png, "median time per call against N (log-log)")
        ns = sorted({n for pts in series.values() for n, _ in pts})
        md += [f"![time against N]({rel(png)})", "",
               "| series | " + " | ".join(f"N={n:,}" for n in ns) + " | slope (log-log) |",
               "|---|" + "---:|" * (len(ns) + 1)]
        for label, pts in sorted(series.items()):
            d = dict(pts)
            slope = "–"
            if len(pts) >= 2 and pts[0][1] > 0 and pts[-1][0] > pts[0][0]:
                slope = _fmt(math.log(pts[-1][1] / pts[0][1]) / math.log(pts[-1][0] / pts[0][0]))
            md.append(f"| {label} | " + " | ".join(_time(d[n]) if n in d else "–" for n in ns)
                      + f" | {slope} |")
        md += ["", "Slope 1 is linear in N; below 1 means fixed costs dominate at these sizes.", ""]

    # allocator vs HiGHS
    pairs = solver_pairs(benchmarks)
    md += ["## Allocator against HiGHS", ""]
    inline = sorted((b for b in benchmarks if "highs_s" in b.get("extra_info", {})),
                    key=lambda b: b["extra_info"].get("n", 0) or int(re.sub(r"\D", "", b["name"]) or 0))
    if inline:
        # one benchmark per N timing ours, with HiGHS timed once on the same instance (extra_info)
        md += ["| benchmark | ours (best of 5) | HiGHS | HiGHS status | HiGHS / ours |", "|---|---:|---:|---|---:|"]
        for b in inline:
            e = b["extra_info"]
            low = "" if e.get("highs_status") == "Optimal" else " (lower bound: not solved)"
            md.append(f"| {b['name']} | {_time(e['ours_s'])} | {_time(e['highs_s'])} | {e.get('highs_status', '?')} "
                      f"| {_fmt(e['ratio'])}×{low} |")
        md.append("")
    if not pairs and not inline:
        md += ["No paired solver benchmarks (`extra_info[\"solver\"]` with `extra_info[\"n\"]`) in this run.", ""]
    else:
        for problem, byn in sorted(pairs.items()):
            solvers = sorted({s for d in byn.values() for s in d}, key=lambda s: (s == "highs", s))
            png = plots_dir / f"solvers_{_slug(problem)}.png"
            plot_lines({s: sorted((n, d[s]["stats"]["median"]) for n, d in byn.items() if s in d) for s in solvers},
                       png, f"{problem}: median time per solve against N")
            ref = solvers[0]
            md += [f"### {problem}", "", f"![{problem}]({rel(png)})", "",
                   "| N | " + " | ".join(solvers) + " | " +
                   " | ".join(f"{s} / {ref}" for s in solvers[1:]) + " |",
                   "|---:|" + "---:|" * (2 * len(solvers) - 1)]
            for n in sorted(byn):
                d = byn[n]
                t = {s: d[s]["stats"]["median"] for s in solvers if s in d}
                cells = [_time(t[s]) if s in t else "–" for s in solvers]
                ratios = [_fmt(t[s] / t[ref]) + "×" if s in t and ref in t else "–" for s in solvers[1:]]
                md.append(f"| {n:,} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
            md.append("")

    text = "\n".join(md).rstrip() + "\n"
    out_md.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(HERE / "results.json"))
    ap.add_argument("--out", default=str(HERE / "REPORT.md"))
    ap.add_argument("--plots", default=None, help="directory for the PNGs (default: plots/ beside --out)")
    ap.add_argument("--baseline", default=None, help="an older results.json (default: the one in git HEAD)")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args(argv)
    results = Path(args.results)
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"{results}: not found; run `pytest benchmarks --benchmark-enable --benchmark-json={results}` first",
              file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{results}: not a pytest-benchmark JSON file ({exc})", file=sys.stderr)
        return 2
    out = Path(args.out)
    base, origin = ({}, "") if args.no_baseline else _baseline(args.baseline, results)
    build_report(data, out, Path(args.plots) if args.plots else out.parent / "plots", HERE, base, origin)
    print(f"wrote {out} ({len(data.get('benchmarks', []))} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
