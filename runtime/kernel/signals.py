"""How a process learns to stop: SIGTERM always, Ctrl-C only where no supervisor orders the stop.

Ctrl-C in a terminal reaches every process of the foreground group at once. Under `vbatt run` the
supervisor orders the stop (the scan's safe state, then the drivers' last instructions, then the
services), so its children ignore SIGINT: an embedded fleet that stopped on it would be gone before
the drivers' last instructions reach its nodes, and every link would log a refused connection.
A `vbatt fleet` or `vbatt node` of its own stops on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import signal

__all__ = ["ignore_ctrl_c", "stop_on_signals"]


def ignore_ctrl_c() -> None:
    """For a child of the supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM, and on SIGINT unless this process ignores it (a supervised child)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        loop.add_signal_handler(sig, stop.set)
