"""Time, injected: the scan asks a clock for `now_ns()` and `sleep_until(deadline_ns)`.

`MonotonicClock` sleeps to an absolute CLOCK_MONOTONIC deadline with
clock_nanosleep(TIMER_ABSTIME), so lateness never accumulates into drift; ctypes
releases the GIL for the call. `FakeClock` lets tests move time instead of sleeping.
"""

from __future__ import annotations

import ctypes
import os
import time

__all__ = ["Clock", "MonotonicClock", "FakeClock"]

CLOCK_MONOTONIC = 1
TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Clock:
    def now_ns(self) -> int:
        raise NotImplementedError

    def sleep_until(self, deadline_ns: int) -> None:
        raise NotImplementedError


class MonotonicClock(Clock):
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._nanosleep = libc.clock_nanosleep
        self._nanosleep.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Timespec), ctypes.c_void_p]
        self._nanosleep.restype = ctypes.c_int
        self._ts = _Timespec()
        self._ref = ctypes.byref(self._ts)
        self.now_ns = time.monotonic_ns  # CLOCK_MONOTONIC on Linux

    def sleep_until(self, deadline_ns: int) -> None:
        self._ts.tv_sec, self._ts.tv_nsec = divmod(deadline_ns, 1_000_000_000)
        while True:
            rc = self._nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, self._ref, None)
            if rc == 0:
                return
            if rc != 4:  # EINTR: a signal; the deadline is absolute, so just go back to sleep
                raise OSError(rc, os.strerror(rc))


class FakeClock(Clock):
    """A clock tests move by hand; `sleep_until` jumps to the deadline."""

    def __init__(self, start_ns: int = 1_000_000_000, record: bool = True) -> None:
        self.t = start_ns
        self.record = record
        self.sleeps: list[int] = []  # every deadline slept to, when recording

    def now_ns(self) -> int:
        return self.t

    def sleep_until(self, deadline_ns: int) -> None:
        if self.record:
            self.sleeps.append(deadline_ns)
        self.t = max(self.t, deadline_ns)

    def advance(self, dt_ns: int) -> None:
        self.t += dt_ns
