"""Closed days: days on which the whole store sells nothing (a weekday it never opens, public
holidays), found from the processed data or set in config (``data.closed_weekdays``,
``data.closed_dates``).

They are left out of the demand fit (a closed Saturday is not a day on which the price drove
demand to zero), of recommendations (no price is needed on a day the store is shut), of the
env's rows (training, evaluate's agent rollout: :func:`env.load_market` with ``closed``) and
of evaluate's rows (every policy and the held-out checks: :func:`baselines.load_split_meta`
with ``closed``). A row left out is simply not there: the price of the last open day carries
over the closed ones, and no policy is scored or counted on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pricing_cli.config import DataSettings

# A weekday counts as always closed only when it was seen closed this many times, and never
# open: two empty Saturdays in a short history could be chance.
MIN_WEEKS_SEEN = 4


@dataclass(frozen=True)
class ClosedDays:
    """Closed dates and weekdays (0 = Monday), from config and from the data.

    Attributes:
        dates: closed dates (datetime64[D]), sorted.
        weekdays: weekdays the store never opens.
        found_in_data: how many of ``dates`` the data showed (no sale by any product).
    """

    dates: np.ndarray
    weekdays: frozenset[int]
    found_in_data: int = 0

    def is_closed(self, days: np.ndarray) -> np.ndarray:
        """(n,) bool: which of ``days`` (datetime64[D]) are closed."""
        days = np.asarray(days).astype("datetime64[D]")
        dow = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
        return np.isin(days, self.dates) | np.isin(dow, list(self.weekdays))


def find_closed_days(dates: np.ndarray, units: np.ndarray, data: DataSettings) -> ClosedDays:
    """Closed days of a panel of product-day rows: every date on which no product sold a unit
    (net units 0 for every product), plus ``data.closed_dates``; a weekday on which the store
    was closed every week (at least MIN_WEEKS_SEEN times), plus ``data.closed_weekdays``.

    Args:
        dates: (n,) datetime64[D] of every product-day row.
        units: (n,) units sold on that row.
    """
    days = np.asarray(dates).astype("datetime64[D]")
    sold = np.abs(np.nan_to_num(np.asarray(units, dtype=np.float64))) > 0
    unique, inverse = np.unique(days, return_inverse=True)
    open_day = np.bincount(inverse, weights=sold, minlength=unique.size) > 0
    empty = unique[~open_day]
    configured = np.array(sorted(data.closed_dates), dtype="datetime64[D]")
    weekdays = set(data.closed_weekdays)
    dow = (unique.astype(np.int64) + 3) % 7
    for weekday in range(7):
        on = dow == weekday
        if on.sum() >= MIN_WEEKS_SEEN and not open_day[on].any():
            weekdays.add(weekday)
    return ClosedDays(np.union1d(empty, configured), frozenset(weekdays), int(empty.size))


def open_rows(dates: np.ndarray, closed: ClosedDays | None) -> np.ndarray | None:
    """Indices of the rows whose date is not a closed day; None when none is closed (or no
    closed days are known), so callers keep every row without copying."""
    if closed is None:
        return None
    shut = closed.is_closed(np.asarray(dates))
    return np.flatnonzero(~shut) if shut.any() else None
