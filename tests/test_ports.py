"""Free ports (runtime/kernel/ports.py): from the system, or from a range of this process's own
(`VBATT_PORTS`, what each parallel test worker gets), checked free with real sockets."""

from __future__ import annotations

import socket

import pytest

from vbatt.kernel import ports


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen(1)
    return s


def test_ports_from_a_range_stay_in_it_are_distinct_and_skip_a_taken_one(monkeypatch):
    lo = ports.free_ports(12, consecutive=True)[0]  # twelve ports free now, in a row
    hi = lo + 11
    monkeypatch.setenv(ports.ENV, f"{lo}-{hi}")
    monkeypatch.setattr(ports, "_cursor", {})
    taken = _listen(lo + 5)
    try:
        got = [ports.free_port() for _ in range(6)] + ports.free_ports(3)
        assert len(set(got)) == 9 and all(lo <= p <= hi for p in got) and lo + 5 not in got
        held = [_listen(p) for p in got]  # every one really was free
        for s in held:
            s.close()
    finally:
        taken.close()


def test_consecutive_ports_from_a_range_and_a_range_too_small_or_too_full(monkeypatch):
    lo = ports.free_ports(8, consecutive=True)[0]
    monkeypatch.setenv(ports.ENV, f"{lo}-{lo + 7}")
    monkeypatch.setattr(ports, "_cursor", {})
    run = ports.free_ports(5, consecutive=True)
    assert run == list(range(run[0], run[0] + 5)) and lo <= run[0] and run[-1] <= lo + 7
    with pytest.raises(ValueError, match="9 ports asked, the range holds 8"):
        ports.free_ports(9, consecutive=True)
    taken = _listen(lo + 4)  # no 5 in a row are free in lo .. lo+7 any more
    try:
        with pytest.raises(OSError, match=f"VBATT_PORTS={lo}-{lo + 7}: no 5 consecutive free ports"):
            ports.free_ports(5, consecutive=True)
    finally:
        taken.close()


def test_without_a_range_the_system_chooses_distinct_free_ports(monkeypatch):
    monkeypatch.delenv(ports.ENV, raising=False)
    got = ports.free_ports(5)
    assert len(set(got)) == 5
    run = ports.free_ports(3, consecutive=True)
    assert run == [run[0], run[0] + 1, run[0] + 2]


@pytest.mark.parametrize("value, says", [("20000", "expected 'lo-hi'"), ("a-b", "expected 'lo-hi'"),
                                         ("30000-20000", "1024 <= lo <= hi <= 65535"),
                                         ("80-90", "1024 <= lo <= hi <= 65535")])
def test_a_malformed_range_is_refused_by_name(monkeypatch, value, says):
    monkeypatch.setenv(ports.ENV, value)
    with pytest.raises(ValueError, match=says) as e:
        ports.free_port()
    assert str(e.value).startswith(f"VBATT_PORTS={value!r}")
