"""Real-time setup of the scan process: ask the OS for what it will grant, say what it did.

Timer slack 1 ns (prctl), SCHED_FIFO, mlockall; each is optional and reported. After its last cycle the
scan leaves them (`leave_realtime`).
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["RealtimeReport", "setup_realtime", "leave_realtime", "set_parent_death_signal"]

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29
MCL_CURRENT, MCL_FUTURE = 1, 2


class RealtimeReport(dict):
    def summary(self) -> str:
        return ", ".join(f"{k}={'yes' if v is True else ('no' if v is False else v)}" for k, v in self.items())


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def setup_realtime(fifo_priority: int | None, lock_memory: bool = True) -> RealtimeReport:
    libc = _libc()
    rep = RealtimeReport()
    rep["timer_slack_1ns"] = libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    if fifo_priority is not None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo_priority))
            rep["sched_fifo"] = fifo_priority
        except (PermissionError, OSError) as exc:
            rep["sched_fifo"] = False
            log.warning("SCHED_FIFO not granted (%s): the scan runs under the normal scheduler", exc)
    else:
        rep["sched_fifo"] = False
    if lock_memory:
        ok = libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0
        rep["mlockall"] = ok
        if not ok:
            log.warning("mlockall not granted (%s): page faults may add latency", os.strerror(ctypes.get_errno()))
    else:
        rep["mlockall"] = False
    return rep


def leave_realtime() -> None:
    """Back to the normal scheduler, memory unlocked: after its last cycle the scan only exits, and the teardown
    of its interpreter (a few hundred ms of CPU) must not hold a core at real-time priority while the drivers
    hand the nodes back."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass
    _libc().munlockall()


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies: no orphans."""
    _libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
