"""`vbatt soak --duration S`: the fault-injection soak of the whole stack (runtime/soak/harness.py, docs/soak.md)."""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["add_command", "render"]


def render(rep: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"vbatt soak: seed {rep['seed']}, {rep['duration_s']:g} s, {rep['nodes']} nodes "
                    f"({rep['agent_processes']} agent processes)", show_lines=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("", justify="left")
    mem = rep["memory_rss_mib"]
    rows = [
        ("cycles run", f"{rep['cycles']:,}", f"{rep['controller_incarnations']} controller incarnations"),
        ("overruns", f"{rep['overruns']:,}", ""),
        ("worst wake latency", f"{rep['worst_wake_latency_us']:,} µs", f"last run p99 {rep['wake_p99_us_last_run']} µs"),
        ("faults injected / detected", f"{rep['faults_injected']} / {rep['faults_detected']}",
         "all detected" if rep["faults_injected"] == rep["faults_detected"] else "[red]NOT all detected[/]"),
    ]
    from vbatt.soak.harness import MUST_BE_ZERO

    for k in MUST_BE_ZERO:
        v = rep[k]
        rows.append((k.replace("_", " ") + " (must be 0)", str(v), "[green]ok[/]" if v == 0 else "[red]FAIL[/]"))
    rows += [
        ("instruction windows checked", f"{rep['instruction_windows_checked']:,}",
         f"lease expiries while healthy: {rep['lease_expiries_while_healthy']}"),
        ("controller RSS start / end", f"{mem['start']} / {mem['end']} MiB", "all processes of the controller"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)
    k = Table(title="faults per kind (times in s; detection = injection until the controller shows it)")
    for col in ("kind", "injected", "detected", "detect p50", "detect max", "recover p50", "recover max",
                "not recovered", "other fault code"):
        k.add_column(col, justify="left" if col == "kind" else "right")
    for kind, v in rep["per_kind"].items():
        k.add_row(kind, str(v["injected"]), str(v["detected"]), *(str(v[x]) if v[x] is not None else "-" for x in
                  ("detect_p50_s", "detect_max_s", "recover_p50_s", "recover_max_s")), str(v["not_recovered"]),
                  str(v["other_fault_code"]))
    console.print(k)
    if rep["tracebacks"] or rep["soak_errors"]:
        console.print(f"tracebacks: {rep['tracebacks']} soak errors: {rep['soak_errors']}", markup=False)
    console.print(("[bold green]PASS[/]" if rep["ok"] else "[bold red]FAIL[/]") + f"  (work dir {rep['workdir']})")


def cmd_soak(args) -> int:
    from rich.console import Console

    from vbatt.cli.main import EXIT_FAIL, EXIT_OK, EXIT_USAGE, err
    from vbatt.soak.harness import SoakOptions, run_soak

    if args.duration <= 0 or args.nodes < 1 or args.group_size < 1:
        err.print("[bold red]usage error:[/] --duration must be > 0, --nodes and --group-size >= 1")
        return EXIT_USAGE
    opts = SoakOptions(duration_s=args.duration, nodes=args.nodes, seed=args.seed, workdir=args.workdir,
                       keep=args.keep, group_size=args.group_size, every_kind=args.every_kind)
    out = Console(highlight=False, width=max(120, Console().width))
    logging.getLogger("vbatt.soak.harness").setLevel(logging.INFO if args.verbose else logging.WARNING)
    for noisy in ("asyncua", "pymodbus"):  # their reconnect chatter is expected while faults are injected
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    def interrupted(*_args) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the same orderly path as Ctrl-C

    # Ctrl-C and SIGTERM both end the soak through its clean-up (even if started with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        rep = run_soak(opts)
    except KeyboardInterrupt:
        err.print("vbatt soak: interrupted; every process it started was stopped")
        return EXIT_FAIL
    except (RuntimeError, OSError, TimeoutError) as exc:
        err.print(f"[bold red]vbatt soak failed:[/] {exc}", markup=True)
        return EXIT_FAIL
    render(rep, out)
    if args.report_json:
        from vbatt.kernel.snapshot import write_json

        write_json(args.report_json, rep)
    return EXIT_OK if rep["ok"] else EXIT_FAIL


def add_command(sub) -> None:
    s = sub.add_parser("soak", help="fault-injection soak of the whole stack (fleet, controller, OPC UA)",
                       description="Run node agents, the controller and an OPC UA client on 127.0.0.1, inject "
                                   "faults at random (seeded), and report what the controller detected and "
                                   "whether anything was lost. Exit 0 only when every must-be-0 figure is 0 "
                                   "and every injected fault was detected.")
    s.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of fault injection")
    s.add_argument("--nodes", type=int, default=20, metavar="N")
    s.add_argument("--seed", type=int, default=None, help="reproduce a run (printed in the report)")
    s.add_argument("--group-size", type=int, default=5, metavar="K", help="nodes per agent process")
    s.add_argument("--workdir", metavar="DIR", help="keep configs, logs, retain and OPC UA state here")
    s.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    s.add_argument("--every-kind", action="store_true",
                   help="go on past --duration (up to twice it) until every fault kind was injected once")
    s.add_argument("--report-json", metavar="FILE", help="write the report as JSON")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_soak)
