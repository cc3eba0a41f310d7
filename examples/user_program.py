"""An example user program (docs/programs.md): keep a larger reserve on nodes that run hot.

A node hotter than `hot_c` may discharge only while its SoC is above `soc_floor`;
once it has been cool again for `cool_s` seconds the normal limits return.
Narrows hi_w, so it runs before `allocation` (which uses the narrowed limits).
"""

from numba import njit


@njit(nogil=True, cache=True)
def keep_reserve_when_hot(temperature_c, soc, hi_w, cool_timer_s, dt_s, hot_c, soc_floor, cool_s):
    # Every parameter is bound by its name (docs/programs.md): node fields, memory, params, context.
    dt = dt_s[0]
    for i in range(soc.shape[0]):
        if temperature_c[i] > hot_c:
            cool_timer_s[i] = 0.0
        else:
            cool_timer_s[i] += dt
        hot = cool_timer_s[i] < cool_s
        if hot and soc[i] <= soc_floor:
            hi_w[i] = 0.0
