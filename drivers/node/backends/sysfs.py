"""A real battery from Linux `/sys/class/power_supply/<name>` (read-only: the kernel does not take orders).

Units there: voltage_now µV, current_now µA (sign varies by driver; the
`status` file decides), power_now µW, energy_full/energy_now µWh or
charge_full/charge_now µAh, capacity %, temp 0.1 °C. What the battery does not
report (demand, limits, link) comes from the node config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vbatt.drivers.node.backends import Backend, BackendError

__all__ = ["SysfsBackend", "read_power_supply"]


def _num(d: Path, name: str) -> float | None:
    p = d / name
    try:
        return float(p.read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BackendError(f"{p}: unreadable ({exc})") from None


def read_power_supply(d: Path) -> dict[str, float]:
    """The battery state in SI units; raises BackendError when it is not a readable battery."""
    if not (d / "type").is_file():
        raise BackendError(f"{d}: not a power_supply device (no 'type' file)")
    kind = (d / "type").read_text().strip()
    if kind != "Battery":
        raise BackendError(f"{d}: type is {kind!r}, expected 'Battery'")
    status = (d / "status").read_text().strip() if (d / "status").is_file() else "Unknown"
    v = _num(d, "voltage_now")
    out: dict[str, float] = {"voltage_v": v / 1e6 if v is not None else float("nan")}
    cap = _num(d, "capacity")
    if cap is None:
        raise BackendError(f"{d}: no 'capacity' file (state of charge unknown)")
    out["soc"] = min(max(cap / 100.0, 0.0), 1.0)
    i = _num(d, "current_now")
    p = _num(d, "power_now")
    if i is None and p is not None and v:
        i = p / v * 1e6
    i_a = abs(i) / 1e6 if i is not None else 0.0
    out["current_a"] = i_a if status == "Discharging" else (-i_a if status == "Charging" else 0.0)
    e_full = _num(d, "energy_full")
    if e_full is None:
        c_full = _num(d, "charge_full")
        vmin = _num(d, "voltage_min_design") or v
        e_full = c_full * vmin / 1e6 if c_full is not None and vmin else None
    out["capacity_wh"] = e_full / 1e6 if e_full is not None else float("nan")
    t = _num(d, "temp")
    out["temperature_c"] = t / 10.0 if t is not None else float("nan")
    out["power_w"] = out["voltage_v"] * out["current_a"]
    return out


class SysfsBackend(Backend):
    kind = "sysfs"
    controllable = False

    def __init__(self, path: str, demand_w: float, max_discharge_w: float, max_charge_w: float,
                 link_max_w: float, ambient_c: float = 25.0) -> None:
        super().__init__(1)
        self.dir = Path(path)
        self.fixed = {"demand_w": demand_w, "forecast_w": demand_w, "max_discharge_w": max_discharge_w,
                      "max_charge_w": max_charge_w, "link_max_w": link_max_w}
        self.ambient_c = ambient_c
        self.last_error = ""
        self.step(0.0, 0.0, np.zeros(1))

    def step(self, t_s: float, dt_s: float, battery_w: np.ndarray) -> None:
        try:
            vals = read_power_supply(self.dir)
        except (BackendError, OSError) as exc:
            self.last_error = str(exc)
            self.ok[0] = False
            for a in self.offer.values():
                a[0] = np.nan
            return
        self.ok[0] = True
        if not np.isfinite(vals["temperature_c"]):
            vals["temperature_c"] = self.ambient_c  # many laptops expose no battery temperature
        for k, v in {**vals, **self.fixed}.items():
            self.offer[k][0] = v
        soc = vals["soc"]
        self.offer["max_discharge_w"][0] = self.fixed["max_discharge_w"] if soc > 0 else 0.0
        self.offer["max_charge_w"][0] = self.fixed["max_charge_w"] if soc < 1 else 0.0
