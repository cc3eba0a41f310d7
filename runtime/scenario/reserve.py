"""The reserve margin a simulation measures, independent of the energy program.

The reserve of docs/design.md §2b is the energy that serves every class for its ride-through target
if the main supply fails now: Σ_c D_c · T_c, with D_c the class's demand over the next T_c. The
program must forecast D_c; a simulation knows it afterwards: the demand that came. So the margin of
step t is the usable energy of every battery (Σ capacity_wh · max(0, soc − soc_min)) above
Σ_c (energy class c drew from t to t + T_c). Counting D_c as the demand of the step instead (as
this measure did first) charges the loads' noise of one step for hours: on peak.yaml ±60 W of
class 0's demand is ±240 Wh of its 4 h target, a reserve that rises and falls from one 10 s step
to the next.

Online, in bounded memory: a ring of the last `h + 1` steps (h = the longest target in steps) holds
the usable energy, whether the main supply was on, and the class energy drawn before each step; a
step's margin is known once its longest window has passed. The steps whose window runs past the end
of the run (`finish`) count the mean class demand of what is left of it over the whole target.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["HindsightReserve"]


@njit(nogil=True, cache=True)
def _need_wh(t, h_c, ring_c, cum_end, end_k, n_ring):
    """Energy the classes drew over [t, t + h_c[c]] (steps), from the cumulative energies in the ring;
    a window past end_k (the last cumulative known) counts the mean over its part before end_k."""
    need = 0.0
    for c in range(h_c.shape[0]):
        h = h_c[c]
        if h <= 0.0:
            continue
        c0 = ring_c[t % n_ring, c]
        j = int(math.floor(h))
        if t + j + 1 <= end_k:
            a = ring_c[(t + j) % n_ring, c]
            b = ring_c[(t + j + 1) % n_ring, c] if t + j + 1 < end_k else cum_end[c]
            need += a - c0 + (h - j) * (b - a)
        elif t + j == end_k and h == j:
            need += cum_end[c] - c0
        else:
            left = end_k - t
            if left > 0:
                need += (cum_end[c] - c0) * h / left
    return need


@njit(nogil=True, cache=True)
def _push(k, u_wh, main_on, demand_c, dt_h, h_c, h_max, ring_u, ring_on, ring_c, cum, out):
    """Step k: its usable energy and class demands; evaluates step k - h_max, whose windows are whole."""
    n_ring = ring_u.shape[0]
    s = k % n_ring
    ring_u[s] = u_wh
    ring_on[s] = main_on
    for c in range(cum.shape[0]):
        ring_c[s, c] = cum[c]
        cum[c] += demand_c[c] * dt_h
    t = k - h_max
    if t >= 0 and ring_on[t % n_ring]:
        # cumulative energies up to step k are in the ring; cum holds the one after step k
        out[0] = min(out[0], ring_u[t % n_ring] - _need_wh(t, h_c, ring_c, cum, k + 1, n_ring))


@njit(nogil=True, cache=True)
def _finish(steps, h_c, h_max, ring_u, ring_on, ring_c, cum, out):
    n_ring = ring_u.shape[0]
    for t in range(max(0, steps - h_max), steps):
        if ring_on[t % n_ring]:
            out[0] = min(out[0], ring_u[t % n_ring] - _need_wh(t, h_c, ring_c, cum, steps, n_ring))


class HindsightReserve:
    """The minimum over the steps with the main supply on of: usable energy minus the energy every
    class drew over its target from that step (the demand that came). `push` every step, then
    `finish`; `min_wh` is +inf when the main supply was never on."""

    def __init__(self, targets_s: np.ndarray, step_s: float):
        self.h_c = np.asarray(targets_s, float) / step_s
        self.h_max = int(math.floor(self.h_c.max(initial=0.0))) + 1
        n = self.h_max + 1
        self.ring_u = np.zeros(n)
        self.ring_on = np.zeros(n, np.bool_)
        self.ring_c = np.zeros((n, self.h_c.size))
        self.cum = np.zeros(self.h_c.size)
        self.out = np.full(1, math.inf)
        self.dt_h = step_s / 3600.0
        self.k = 0

    def push(self, u_wh: float, main_on: bool, demand_c: np.ndarray) -> None:
        _push(self.k, u_wh, main_on, demand_c, self.dt_h, self.h_c, self.h_max, self.ring_u, self.ring_on,
              self.ring_c, self.cum, self.out)
        self.k += 1

    def finish(self) -> float:
        _finish(self.k, self.h_c, self.h_max, self.ring_u, self.ring_on, self.ring_c, self.cum, self.out)
        return float(self.out[0])
