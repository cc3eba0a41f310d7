"""A class seeded from its own record checks the record against its first hours (programs/energy/horizon.py
`_shift_check`, docs/energy.md "The recorded history"): a record an hour off (a daylight-saving change:
the profile's bins are UTC) is moved by that hour; a right record, one that is only larger, one whose
first hours say nothing (a flat night), and a short season (no hour to shift by) are left as they are."""

from __future__ import annotations

import numpy as np
import pytest

from vbatt.programs.energy import EnergyParams
from vbatt.programs.energy.horizon import (CHECK_S, HZ_N, HZ_SEEN, HZ_SHIFT, horizon_mean, horizon_update,
                                           preseed)

DAY = 86400.0
P = EnergyParams()
BINS = P.demand_season_bins
DT = 60.0


def _day(t_s, shift_s=0.0):
    """A working day by the hour of t_s + shift_s: 200 W at night, a ramp to 800 W from 06 to 09 h, down from
    17 to 20 h (the edges an hour's shift moves)."""
    h = ((t_s + shift_s) % DAY) / 3600.0
    return 200.0 + 600.0 * np.clip(np.minimum((h - 6.0) / 3.0, (20.0 - h) / 3.0), 0.0, 1.0)


def _bin_means(shift_s, scale=1.0):
    """The record's profile: per bin the mean of the day, as seed.class_profiles gives it."""
    w = DAY / BINS
    return np.array([scale * np.mean([_day(j * w + x, shift_s) for x in np.linspace(0, w, 16, endpoint=False)])
                     for j in range(BINS)])


def _run(record, start_h, hours, truth=_day, season_s=DAY, bins=BINS):
    hz = np.zeros((1, HZ_N))
    season = np.zeros((1, bins))
    preseed(hz, season, 0, record)
    seeded = season.copy()
    prior, prior_season = np.full(3, np.nan), np.zeros(bins)
    t0 = 20 * DAY + start_h * 3600.0
    errs = []
    for i in range(int(hours * 3600 / DT)):
        t = t0 + i * DT
        horizon_update(t, 1, np.array([truth(t)]), hz, season, prior, prior_season, False, P.demand_level_tau_s,
                       P.demand_trend_tau_s, P.demand_damping_s, season_s, P.demand_season_tau_s)
        if t >= t0 + CHECK_S + 3600.0:  # after the check: the forecast over the next hour against what comes
            f = horizon_mean(t, 0, 3600.0, hz, season, P.demand_damping_s, season_s)
            errs.append(abs(f - np.mean([truth(t + x) for x in np.arange(0, 3600.0, DT)])))
    return hz, season, seeded, float(np.mean(errs)) if errs else float("nan")


@pytest.mark.parametrize("shift_h", [1, -1])
def test_a_record_an_hour_off_is_moved_by_that_hour(shift_h):
    """Started at 05:00 (the morning ramp within the 3 h checked): the record of a day shifted by an hour
    (at 1.3 x the demand: the scale is judged apart) is moved back, and the hour ahead is then forecast
    as with a right record, where left as it was it errs by far more."""
    record = _bin_means(shift_h * 3600.0, scale=1.3)
    hz, season, _, err = _run(record, 5.0, 12.0)
    assert hz[0, HZ_SHIFT] == -shift_h * 4  # 4 bins of 15 min
    assert hz[0, HZ_SEEN] == BINS
    right = _bin_means(0.0)
    away = (np.arange(BINS) < 4 * 5) | (np.arange(BINS) >= 4 * 9)  # bins the 3 h after 05:00 did not see
    assert season[0, away] == pytest.approx(right[away], rel=0.02)
    _, _, _, err_right = _run(_bin_means(0.0, scale=1.3), 5.0, 12.0)
    assert err <= 1.5 * err_right + 1.0

    # the same without the check (a season whose bins do not divide an hour) errs many times more
    def truth(t):
        return _day(t)
    hz_no, _, _, err_no = _run(np.repeat(record, 1), 5.0, 12.0, truth, season_s=DAY + 1.0)
    assert hz_no[0, HZ_SHIFT] == 0.0
    assert err_no > 3.0 * err


@pytest.mark.parametrize("record, start_h", [(_bin_means(0.0), 5.0), (_bin_means(0.0, 0.7), 16.0),
                                             (_bin_means(3600.0), 0.0)])
def test_a_right_record_or_a_flat_start_leaves_the_seed_as_it_is(record, start_h):
    """A right record (also at another scale) stays; so does a shifted one whose first 3 h are a flat
    night (nothing to judge by: the check says nothing rather than a guess)."""
    hz, season, seeded, _ = _run(record, start_h, CHECK_S / 3600.0 + 0.5)
    assert hz[0, HZ_SHIFT] == 0.0
    j0 = int(round(start_h * 4))
    away = (np.arange(BINS) - j0) % BINS >= 15  # the bins not yet learnt online
    assert season[0, away] == pytest.approx(seeded[0, away] * (season[0, away][0] / seeded[0, away][0]))


def test_no_check_for_a_season_without_whole_hours_or_too_short():
    """The tests' 8-second days, and bins that do not divide an hour: no shift is tried."""
    short = np.array([50.0, 100.0, 150.0, 100.0])
    hz, _, _, _ = _run(short, 0.0, 0.05, truth=lambda t: 100.0, season_s=8.0, bins=4)
    assert hz[0, HZ_SHIFT] == 0.0
