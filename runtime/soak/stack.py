"""The processes of a soak: node agent fleets, the controller, throw-away OPC UA clients.

Every process is started in a session of its own (its process group = its pid), with its
stdout and stderr in one log file of the work dir, so that the soak can SIGKILL exactly what
it started (one process, or the whole group), sum the RSS of a group, count "Traceback" in
every log, and prove at the end from /proc that nothing it started is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vbatt.kernel.ports import free_port

__all__ = ["Proc", "group_pids", "group_rss_kib", "tracebacks_in", "cli", "run_cli", "free_port"]


def cli(*args: str) -> list[str]:
    """argv of a `vbatt` command run with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "vbatt.cli", *args]


def run_cli(args: list[str], *, stdin: str | None = None, timeout_s: float = 60.0, cwd: Path | None = None) -> str:
    """Run a short `vbatt` command; raises RuntimeError with its output when it fails."""
    r = subprocess.run(cli(*args), input=stdin, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"vbatt {' '.join(args)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a live process, None when gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    if rest[0] == "Z":
        return None
    return int(rest[1]), int(rest[2])


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[1] == pgid:
                out.append(int(d))
    return sorted(out)


def group_rss_kib(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def tracebacks_in(path: Path) -> int:
    try:
        return path.read_text(errors="replace").count("Traceback (most recent call last)")
    except OSError:
        return 0


class Proc:
    """One started process (and its group): start, SIGKILL, graceful stop, always bounded."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path):
        self.name, self.argv, self.log_path, self.cwd = name, argv, log_path, cwd
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self.pgids: list[int] = []  # every group this Proc ever created (leftover check)

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== soak: start #{self.starts + 1} of {self.name} at {time.time():.3f}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.cwd, env=env, start_new_session=True)
        self.starts += 1
        self.pgids.append(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else -1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self, group: bool = False) -> None:
        """SIGKILL the leader (a literal `kill -9 PID`) or its whole group; reaps the leader."""
        if self.popen is None:
            return
        try:
            if group:
                os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                self.popen.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            pass

    def wait_group_gone(self, timeout_s: float) -> list[int]:
        """Wait for every process of the current group to end; returns those still alive."""
        if self.popen is None:
            return []
        deadline = time.monotonic() + timeout_s
        left = group_pids(self.popen.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = group_pids(self.popen.pid)
        return left

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the group; returns the leader's exit code (None if it had to be killed)."""
        if self.popen is None:
            return None
        code = None
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                code = self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            except ProcessLookupError:
                pass
        else:
            code = self.popen.returncode
        self.kill_leftovers()
        return code

    def kill_leftovers(self) -> list[int]:
        """SIGKILL whatever is still alive in any group this Proc created; returns what was found."""
        found = []
        for g in self.pgids:
            pids = group_pids(g)
            found += pids
            if pids:
                try:
                    os.killpg(g, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.popen is not None:
            try:
                self.popen.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        return found
