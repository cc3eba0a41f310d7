"""The `vbatt` command. Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage."""

from __future__ import annotations

import argparse
import collections
import importlib
import logging
import os
import sys
from pathlib import Path

from rich.console import Console

from vbatt.config.plant import ConfigError, default_config_path, load_config

__all__ = ["main", "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Modules that add a subcommand: each has `add_command(subparsers)` setting `func`.
COMMAND_MODULES: tuple[str, ...] = (
    "vbatt.cli.node",
    "vbatt.cli.opcua",
    "vbatt.cli.soak",
    "vbatt.scenario.cli",  # simulate, size
)

err = Console(stderr=True, highlight=False, soft_wrap=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 too; say it our way
        self.print_usage(sys.stderr)
        err.print(f"[bold red]usage error:[/] {message}")
        raise SystemExit(EXIT_USAGE)


def _load(path: str | None):
    p = path or str(default_config_path())
    return load_config(p), p


def _report_config_error(exc: ConfigError) -> int:
    if len(exc.problems) == 1:  # one line: a script or a log reader gets the whole reason from one line
        err.print("[bold red]configuration error:[/] ", end="")
        err.print(exc.problems[0], markup=False)
        return EXIT_USAGE
    err.print(f"[bold red]configuration error[/] ({len(exc.problems)} problems):")
    for line in exc.problems:
        err.print(f"  {line}", markup=False)
    return EXIT_USAGE


def cmd_check(args) -> int:
    try:
        (cfg, fleet), path = _load(args.config)
        from vbatt.config.plan import build_programs, image_spec, partition

        programs = build_programs(cfg, len(fleet))
        spec = image_spec(cfg, fleet, programs, partition(cfg, fleet))
    except ConfigError as exc:
        return _report_config_error(exc)
    size = spec.regions()[1]
    print(f"{path}: ok: {len(fleet):,} nodes, cycle {cfg.cycle.cycle_ms:g} ms, "
          f"programs {' -> '.join(p.id for p in programs)}, image {size / 2**20:.1f} MiB")
    return EXIT_OK


def cmd_run(args) -> int:
    from vbatt.kernel.snapshot import run_stats, snapshot, write_json
    from vbatt.supervise.supervisor import Supervisor

    try:
        (cfg, fleet), path = _load(args.config)
        sup = Supervisor(cfg, fleet, max_cycles=args.cycles, duration_s=args.duration,
                         log_level=logging.INFO if args.verbose else logging.WARNING, cold=args.cold)
    except ConfigError as exc:
        return _report_config_error(exc)
    out = Console(highlight=False, soft_wrap=True)
    live_view = out.is_terminal and not args.quiet
    tail = None
    if live_view:
        tail = _LogTail(Path(args.log))
        # fd 2 goes to the log file (children inherit it, logging writes there); sys.stderr and
        # the console keep the terminal for what a person must see (e.g. a first-start password)
        sys.stderr = err.file = tail.redirect_stderr()
    sup.install_signals()
    img = sup.start()
    if sup.restart_line:
        out.print(f"vbatt: {sup.restart_line}", markup=False)
    reason = "?"
    try:
        if live_view:
            from rich.live import Live

            from vbatt.supervise.live import render

            from vbatt.programs.energy import class_rows

            def view():
                return render(img, cfg.cycle.cycle_ms, path, sup.phase_names, tail.recent(), str(tail.path),
                              classes=class_rows(img.mem))

            with Live(view(), console=out, refresh_per_second=4, transient=False) as live:
                reason = sup.wait(on_tick=lambda: live.update(view()))
        else:
            reason = sup.wait()
    finally:
        sup.stop()
        failed = sup.scan_failed or reason.startswith("scan process failed")
        stats = run_stats(img, cfg.cycle.cycle_ms, sup.phase_names)
        if args.stats_json:
            write_json(args.stats_json, stats)
        if args.snapshot:
            from vbatt.programs.energy import class_rows

            snap = snapshot(img, img.read_last_cycle())
            # per priority class (docs/energy.md), from the energy program's memory (empty without it),
            # written by the last cycle: the scan has stopped, so it is read whole
            snap["classes"] = class_rows(img.mem)
            h = getattr(cfg, "hierarchy", None)
            if h is not None and h.children and h.status_file:
                # a controller over children: its classes are those of its whole subtree, which its
                # hierarchy link computes from the children's energy offers (docs/hierarchy.md)
                import json as _json

                try:
                    snap["classes"] = _json.loads(Path(h.status_file).read_text())["classes"]
                except (OSError, ValueError, KeyError):
                    pass
            write_json(args.snapshot, snap)
        sup.close()
    w = stats["wake_us"]["run"]
    summary = (f"vbatt: {reason}: {stats['cycles']:,} cycles, {stats['overruns']} overruns, "
               f"wake latency p50 {w['p50']:.1f} µs p99 {w['p99']:.1f} µs max {w['max']:.1f} µs, "
               f"exec p99 {stats['exec_us']['run']['p99']:.1f} µs")
    (err if failed else out).print(summary, markup=False)
    if tail is not None:
        out.print(f"vbatt: log in {tail.path}", markup=False)
    return EXIT_FAIL if failed else EXIT_OK


class _LogTail:
    """While the live view runs, fd 2 (this process's and every child's) goes to a log file;
    the view shows its newest warnings."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.lines: collections.deque[str] = collections.deque(maxlen=5)

    def redirect_stderr(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = os.dup(2)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.pos = os.fstat(fd).st_size
        os.dup2(fd, 2)
        os.close(fd)
        return os.fdopen(keep, "w", buffering=1)

    def recent(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                chunk = fh.read(1 << 20)
        except OSError:
            return list(self.lines)
        cut = chunk.rfind(b"\n") + 1
        self.pos += cut
        for line in chunk[:cut].decode("utf-8", "replace").splitlines():
            if any(w in line for w in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")):
                self.lines.append(line[:200])
        return list(self.lines)


def cmd_reload(args) -> int:
    from vbatt.supervise.reload import running_supervisors, send

    try:
        load_config(args.config)  # errors with file:line here, before bothering the controller
    except ConfigError as exc:
        return _report_config_error(exc)
    pids = [args.pid] if args.pid else running_supervisors()
    if len(pids) != 1:
        err.print(f"[bold red]error:[/] {'no running controller found' if not pids else f'several controllers run ({pids})'}"
                  f"; name one with --pid")
        return EXIT_FAIL
    try:
        answer = send(pids[0], args.config)
    except ProcessLookupError:
        err.print(f"[bold red]error:[/] no process {pids[0]}: is the controller running?")
        return EXIT_FAIL
    (Console(highlight=False, soft_wrap=True) if answer["ok"] else err).print(
        f"vbatt reload: {answer['message']}", markup=False)
    if answer["ok"]:
        return EXIT_OK
    return EXIT_FAIL if answer["message"].startswith(("no answer", "the scan")) else EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vbatt", description="PLC-style runtime that turns battery-backed devices into one virtual battery.")
    p.add_argument("--version", action="version", version=f"vbatt {__import__('vbatt').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    r = sub.add_parser("run", help="run the controller (default: the embedded simulated fleet)",
                       description="Run the scan, the drivers and the servers until Ctrl-C, SIGTERM, "
                                   "--cycles or --duration.")
    r.add_argument("config", nargs="?", help="plant YAML (default: the config shipped inside the package)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--cycles", type=int, metavar="N", help="stop after N cycles")
    g.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    r.add_argument("--stats-json", metavar="FILE", help="write cycle statistics as JSON on exit")
    r.add_argument("--snapshot", metavar="FILE", help="write the final process image as JSON on exit")
    r.add_argument("--cold", action="store_true",
                   help="cold restart: restore operator settings only, not trips, alarms and program state")
    r.add_argument("-q", "--quiet", action="store_true", help="no live view: logs stay on stderr")
    r.add_argument("--log", metavar="FILE", default="var/log/vbatt.log",
                   help="with the live view, where the logs of every process go (default: %(default)s)")
    r.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate a config and exit", description="Validate a plant YAML; "
                       "print every problem with file, line and key path.")
    c.add_argument("config", help="plant YAML")
    c.set_defaults(func=cmd_check)

    rl = sub.add_parser("reload", help="apply changed parameters and priorities to a running controller",
                        description="Validate CONFIG and apply it to the running `vbatt run` between two cycles: "
                                    "node priorities, plant.main_limit_w and program parameters. A change that "
                                    "needs a restart (node list, cycle, drivers, program list) is refused whole.")
    rl.add_argument("config", help="the new plant YAML")
    rl.add_argument("--pid", type=int, help="process id of the `vbatt run` to change (default: the only one)")
    rl.set_defaults(func=cmd_reload)

    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cycles", None) is not None and args.cycles < 1:
        err.print("[bold red]usage error:[/] --cycles must be >= 1")
        return EXIT_USAGE
    if getattr(args, "duration", None) is not None and args.duration <= 0:
        err.print("[bold red]usage error:[/] --duration must be > 0")
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
