"""A UPS served by a NUT `upsd` (network protocol, RFC 9271): battery.charge, battery.voltage, ups.load, ...

The UPS reports; it does not take power setpoints (read-only backend). Demand
is `ups.load` (% of `ups.realpower.nominal`, or of the configured nominal) or
`ups.realpower` where the driver has it; capacity comes from
`battery.runtime` × demand when the config gives none.
"""

from __future__ import annotations

import socket

import numpy as np

from vbatt.drivers.node.backends import Backend, BackendError

__all__ = ["NutBackend", "NutClient"]


class NutClient:
    """Minimal blocking client of the NUT network protocol, with a timeout on every call."""

    def __init__(self, host: str, port: int, timeout_s: float = 1.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            try:
                self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            except OSError as exc:
                raise BackendError(f"upsd {self.host}:{self.port}: cannot connect ({exc})") from None
            self.buf = b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BackendError(f"upsd {self.host}:{self.port}: connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace").strip()

    def list_vars(self, ups: str) -> dict[str, str]:
        s = self._connect()
        try:
            s.sendall(f"LIST VAR {ups}\n".encode())
            first = self._line()
            if first.startswith("ERR"):
                raise BackendError(f"upsd: LIST VAR {ups}: {first}")
            if first != f"BEGIN LIST VAR {ups}":
                raise BackendError(f"upsd: unexpected reply {first!r}")
            out = {}
            while True:
                line = self._line()
                if line == f"END LIST VAR {ups}":
                    return out
                parts = line.split(" ", 3)
                if len(parts) == 4 and parts[0] == "VAR":
                    out[parts[2]] = parts[3].strip('"')
        except (OSError, BackendError) as exc:
            self.close()
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"upsd {self.host}:{self.port}: {exc}") from None


class NutBackend(Backend):
    kind = "nut"
    controllable = False

    def __init__(self, host: str, port: int, ups: str, *, nominal_w: float | None, capacity_wh: float | None,
                 max_discharge_w: float, max_charge_w: float, link_max_w: float, ambient_c: float = 25.0,
                 timeout_s: float = 1.0) -> None:
        super().__init__(1)
        self.client = NutClient(host, port, timeout_s)
        self.ups = ups
        self.nominal_w, self.capacity_wh = nominal_w, capacity_wh
        self.limits = (max_discharge_w, max_charge_w, link_max_w)
        self.ambient_c = ambient_c
        self.last_error = ""
        self.vars: dict[str, str] = {}

    def step(self, t_s: float, dt_s: float, battery_w: np.ndarray) -> None:
        try:
            self.vars = v = self.client.list_vars(self.ups)
            self._decode(v)
            self.ok[0] = True
        except BackendError as exc:
            self.last_error = str(exc)
            self.ok[0] = False
            for a in self.offer.values():
                a[0] = np.nan

    def _decode(self, v: dict[str, str]) -> None:
        def num(key: str, default: float | None = None) -> float:
            if key in v:
                try:
                    return float(v[key])
                except ValueError:
                    raise BackendError(f"upsd: {key} = {v[key]!r} is not a number") from None
            if default is None:
                raise BackendError(f"upsd: UPS {self.ups!r} reports no {key}")
            return default

        soc = min(max(num("battery.charge") / 100.0, 0.0), 1.0)
        volt = num("battery.voltage")
        if "ups.realpower" in v:
            demand = num("ups.realpower")
        else:
            nominal = self.nominal_w or num("ups.realpower.nominal")
            demand = num("ups.load") / 100.0 * nominal
        on_battery = "OB" in v.get("ups.status", "").split()
        cap = self.capacity_wh
        if cap is None:
            runtime_s = num("battery.runtime")
            cap = demand * runtime_s / 3600.0 / soc if soc > 0 and demand > 0 else float("nan")
        power = demand if on_battery else 0.0
        dis, chg, link = self.limits
        o = self.offer
        o["voltage_v"][0], o["soc"][0], o["capacity_wh"][0] = volt, soc, cap
        o["current_a"][0] = power / volt if volt > 0 else 0.0
        o["temperature_c"][0] = num("battery.temperature", self.ambient_c)
        o["demand_w"][0] = o["forecast_w"][0] = demand
        o["max_discharge_w"][0] = dis if soc > 0 else 0.0
        o["max_charge_w"][0] = chg if soc < 1 else 0.0
        o["link_max_w"][0] = link
        o["power_w"][0] = power

    def close(self) -> None:
        self.client.close()
