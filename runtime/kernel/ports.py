"""Free TCP ports for servers this machine is about to start (tests, the soak, the hierarchy demo).

By default the operating system chooses: bind to port 0, read the port, close. Between that close and
the server's own bind, another process asking the same way can be handed the same port; with one
test process at a time that never happens, with several in parallel it can. So a process may be given
a range of its own in `VBATT_PORTS` ("lo-hi", both inclusive): ports are then taken from that range
only, each checked free by a bind, never the same one twice from this process. The parallel test
workers each get a range below the operating system's ephemeral range (tests/conftest.py), which no
bind to port 0 hands out and no other worker uses, so their choices cannot collide.
"""

from __future__ import annotations

import os
import random
import socket

__all__ = ["ENV", "port_range", "free_port", "free_ports"]

ENV = "VBATT_PORTS"
_cursor: dict[tuple[int, int], int] = {}  # range -> the next port to try in this process


def port_range(value: str | None = None) -> tuple[int, int] | None:
    """The range in `VBATT_PORTS` (or `value`), None when unset; a malformed one is refused by name."""
    text = os.environ.get(ENV, "") if value is None else value
    if not text.strip():
        return None
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected 'lo-hi', two port numbers such as 20000-20999") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"{ENV}={text!r}: expected 1024 <= lo <= hi <= 65535")
    return lo, hi


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1, host: str = "127.0.0.1", *, consecutive: bool = False) -> list[int]:
    """`n` ports free on `host` now; `consecutive`: n ports in a row (p, p+1, ...)."""
    rng = port_range()
    if rng is None:
        return _from_the_system(n, host, consecutive)
    lo, hi = rng
    size = hi - lo + 1
    if n > size:
        raise ValueError(f"{ENV}={lo}-{hi}: {n} ports asked, the range holds {size}")
    # A random first cursor: the processes of one worker (the test and what it starts) begin apart.
    at = _cursor.get(rng, lo + random.randrange(size))
    got: list[int] = []
    for _ in range(size):
        first = lo + (at - lo) % size
        at = first + 1
        if consecutive:
            run = list(range(first, first + n))
            if run[-1] <= hi and all(_bindable(p, host) for p in run):
                _cursor[rng] = first + n
                return run
        elif _bindable(first, host):
            got.append(first)
            if len(got) == n:
                _cursor[rng] = at
                return got
    raise OSError(f"{ENV}={lo}-{hi}: no {n} {'consecutive ' if consecutive else ''}free ports on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _from_the_system(n: int, host: str, consecutive: bool) -> list[int]:
    if not consecutive:
        socks = [socket.socket() for _ in range(n)]
        try:
            for s in socks:  # all held open together, so the n are distinct
                s.bind((host, 0))
            return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
    for _ in range(50):
        base = _from_the_system(1, host, False)[0]
        if base + n - 1 <= 65535 and all(_bindable(base + k, host) for k in range(1, n)):
            return list(range(base, base + n))
    raise OSError(f"no {n} consecutive free ports on {host}")
