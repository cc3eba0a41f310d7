"""`vbatt simulate` and `vbatt size`. Exit codes: 0 ok, 2 bad scenario or usage."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from vbatt.programs.policies import POLICIES, POLICY_DROPS
from vbatt.config.yamlsrc import ConfigError

__all__ = ["add_command", "cmd_simulate", "cmd_size"]

EXIT_OK, EXIT_USAGE = 0, 2
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _config_error(exc: ConfigError) -> int:
    _err.print(f"[bold red]scenario error[/] ({len(exc.problems)} problem{'s' * (len(exc.problems) > 1)}):")
    for line in exc.problems:
        _err.print(f"  {line}", markup=False)
    return EXIT_USAGE


def _usage(msg: str) -> int:
    _err.print(f"[bold red]usage error:[/] {msg}", markup=True)
    return EXIT_USAGE


def _policies(args, loaded) -> list[str]:
    ids = {e.id for e in loaded.cfg.programs}
    # by default, a policy that leaves out programs this plant does not run is the same as vbatt: not run
    default = [p for p in POLICIES if not POLICY_DROPS.get(p) or ids & set(POLICY_DROPS[p])]
    chosen = args.policy or loaded.scenario.policies or default
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r} (expected one of: {', '.join(POLICIES)})")
    return list(dict.fromkeys(chosen))


def _fmt_s(x) -> str:
    if x is None:
        return "never"
    return f"{x / 3600:.2f} h" if x >= 3600 else (f"{x / 60:.1f} min" if x >= 60 else f"{x:.0f} s")


def _met(x: dict) -> str:
    if x["target_met"] is None or not x["target_s"]:
        return ""
    return f" (target {_fmt_s(x['target_s'])} {'met' if x['target_met'] else 'MISSED'})"


def cmd_simulate(args) -> int:
    from vbatt.scenario.metrics import machine, policy_metrics, sim_metrics
    from vbatt.scenario.runner import pipeline, simulate
    from vbatt.scenario.schema import load_scenario

    try:
        loaded = load_scenario(args.scenario)
        policies = _policies(args, loaded)
        for p in policies:
            pipeline(loaded, p)  # a policy the plant cannot take is a config error before anything runs
    except ConfigError as exc:
        return _config_error(exc)
    except ValueError as exc:
        return _usage(str(exc))
    if args.points < 2:
        return _usage("--points must be >= 2")
    out = Console(highlight=False, soft_wrap=True)
    results = []
    for p in policies:
        try:
            r = simulate(loaded, p, points=args.points)
        except ConfigError as exc:
            return _config_error(exc)
        results.append(r)
        if not args.quiet:
            m = policy_metrics(r)
            cls = "  ".join(f"class {c}: ride-through {_fmt_s(x['ride_through_s'])}, "
                            f"first shed {_fmt_s(x['first_shed_s'])}{_met(x)}"
                            for c, x in m["classes"].items())
            out.print(f"{p:>12}: {cls}  ({r.steps * r.step_s / r.wall_s:,.0f}x real time)", markup=False)
    metrics = {"sim": sim_metrics(results), "policies": {r.policy: policy_metrics(r) for r in results},
               "machine": machine(), "scenario": str(args.scenario)}
    if args.metrics_json:
        Path(args.metrics_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=1))
    if args.report:
        from vbatt.scenario.report import write_report

        files = write_report(Path(args.report), loaded, results, metrics, str(args.scenario))
        if not args.quiet:
            out.print(f"report: {files[0]} ({len(files) - 1} plots)", markup=False)
    return EXIT_OK


def cmd_size(args) -> int:
    from vbatt.scenario.schema import load_scenario
    from vbatt.scenario.sizing import parse_targets, size, worst_start

    try:
        loaded = load_scenario(args.scenario)
        if args.step is not None:
            if not args.step > 0:
                return _usage("--step must be > 0")
            loaded.step_s = args.step
            loaded.steps = max(1, int(-(-loaded.scenario.duration_s // args.step)))
        targets = (parse_targets(args.targets) if args.targets else
                   dict(loaded.scenario.targets_s) or dict(loaded.cfg.plant.ride_through_s))
        if not targets:
            return _usage("no ride-through targets: give --targets 0=14400,1=1800,..., scenario.targets_s "
                          "or plant.ride_through_s")
        policies = args.policy or ["vbatt", "isolated"]
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            return _usage(f"unknown policy {unknown[0]!r} (expected one of: {', '.join(POLICIES)})")
        classes = set(int(c) for c in loaded.fleet.values["priority"])
        missing = sorted(set(targets) - classes)
        if missing:
            return _usage(f"--targets: class {missing[0]} has no nodes in this plant (classes: {sorted(classes)})")
        if targets != loaded.cfg.plant.ride_through_s:
            # the energy program plans for the targets being sized for, not the configured ones
            plant = loaded.cfg.plant.model_copy(update={"ride_through_s": dict(targets)})
            loaded.cfg = loaded.cfg.model_copy(update={"plant": plant})
    except ConfigError as exc:
        return _config_error(exc)
    except ValueError as exc:
        return _usage(str(exc))
    if not 0 < args.tolerance < 0.5:
        return _usage("--tolerance must be between 0 and 0.5 (a relative precision, e.g. 0.01)")
    out = Console(highlight=False, soft_wrap=True)
    t0 = worst_start(loaded, targets)
    base_wh = float(loaded.fleet.values["capacity_wh"].sum())
    if not args.quiet:
        out.print(f"targets {', '.join(f'class {c}: {_fmt_s(t)}' for c, t in sorted(targets.items()))}; "
                  f"outage from t = {_fmt_s(t0) if t0 else '0 s'} (the worst moment of the demand); "
                  f"configured capacity {base_wh / 1000:,.1f} kWh", markup=False)
    progress = None if args.quiet else (lambda p, s, ok: out.print(f"  {p}: scale {s:.4g} -> "
                                                                     f"{'meets' if ok else 'misses'}", markup=False))
    results = {}
    for p in dict.fromkeys(policies):
        try:
            results[p] = size(loaded, p, targets, t0_s=t0, tolerance=args.tolerance, on_run=progress)
        except ConfigError as exc:
            return _config_error(exc)
    doc = {"targets_s": {str(c): t for c, t in sorted(targets.items())}, "outage_start_s": t0,
           "configured_capacity_wh": base_wh, "tolerance": args.tolerance, "step_s": loaded.step_s,
           "policies": {p: {"scale": r.scale, "capacity_wh": r.capacity_wh, "runs": r.runs,
                            "ride_through_s": r.ride_through_s} for p, r in results.items()}}
    pooled, alone = results.get("vbatt"), results.get("isolated")
    if pooled and alone and pooled.capacity_wh is not None and alone.capacity_wh is not None:
        doc["saving_wh"] = alone.capacity_wh - pooled.capacity_wh
        doc["saving_fraction"] = doc["saving_wh"] / alone.capacity_wh if alone.capacity_wh > 0 else 0.0
    for p, r in results.items():
        if r.scale is None:
            out.print(f"{p:>12}: targets unreachable up to {1024:g}x the configured capacity "
                      f"(power limits do not scale)", markup=False)
        else:
            out.print(f"{p:>12}: capacity x {r.scale:.4g} = {r.capacity_wh / 1000:,.1f} kWh ({r.runs} runs)",
                      markup=False)
    if "saving_wh" in doc:
        out.print(f"{'saving':>12}: {doc['saving_wh'] / 1000:,.1f} kWh ({100 * doc['saving_fraction']:.1f} % of "
                  f"isolated's need) with the batteries pooled", markup=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return EXIT_OK


def add_command(sub) -> None:
    s = sub.add_parser("simulate", help="run policies on a scenario in simulated time, with metrics and plots",
                       description="Run the configured programs (and reference policies) over a scenario file "
                                   "(a plant config plus a 'scenario:' section) faster than real time: "
                                   "no sleeping, no processes, no sockets. See docs/simulate.md.")
    s.add_argument("scenario", help="scenario YAML")
    s.add_argument("--report", metavar="DIR", help="write report.md and PNG plots into DIR")
    s.add_argument("--metrics-json", metavar="FILE", help="write the metrics as JSON")
    s.add_argument("--policy", action="extend", nargs="+", metavar="NAME",
                   help=f"policies to run (default: all of {', '.join(POLICIES)})")
    s.add_argument("--points", type=int, default=2000, help="points per plotted series (default: %(default)s)")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    s.set_defaults(func=cmd_simulate)

    z = sub.add_parser("size", help="the least battery capacity for the ride-through targets, pooled vs isolated",
                       description="Bisection on one scale factor of every node's capacity_wh: the smallest at "
                                   "which every class meets its ride-through target for an outage at the worst "
                                   "moment of the scenario's demand, for vbatt (pooled) and isolated.")
    z.add_argument("scenario", help="scenario YAML")
    z.add_argument("--targets", metavar="C=S,...", help="ride-through target per class in seconds, "
                   "e.g. 0=14400,1=1800,2=600 (default: scenario.targets_s, else plant.ride_through_s)")
    z.add_argument("--policy", action="extend", nargs="+", metavar="NAME",
                   help="policies to size (default: vbatt, isolated)")
    z.add_argument("--tolerance", type=float, default=0.01,
                   help="relative precision of the scale (default: %(default)s)")
    z.add_argument("--step", type=float, metavar="S", help="step of the sizing runs (default: the scenario's)")
    z.add_argument("--json", metavar="FILE", help="write the result as JSON")
    z.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    z.set_defaults(func=cmd_size)

