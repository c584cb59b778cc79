"""The candidate price grid, the feasibility rule and the trust region, shared by preprocess,
env and evaluate.

The grid spans each product's whole [min_price, max_price], not a band around the historical
price, because historical prices are not optimal and the agent must be able to leave them.
"""

from __future__ import annotations

import numpy as np

MOVE_DOWN, MOVE_HOLD, MOVE_UP = 0, 1, 2
# A relative move below this is the same price held (rounding, not a decision); it decides
# what counts as a price change for days held and for the price-change cost.
CHANGE_TOLERANCE = 0.005


def price_grid(min_price: np.ndarray | float, max_price: np.ndarray | float,
               levels: int) -> np.ndarray:
    """Evenly spaced candidate prices from min_price to max_price (inclusive).

    Args:
        min_price, max_price: scalars or arrays of shape (n,).
        levels: K, the number of candidate levels (>= 2).

    Returns:
        Array of shape (K,) for scalars or (n, K) for arrays, float64.
    """
    lo = np.asarray(min_price, dtype=np.float64)
    hi = np.asarray(max_price, dtype=np.float64)
    steps = np.linspace(0.0, 1.0, levels)
    return lo[..., None] + (hi - lo)[..., None] * steps


def nearest_level(grid: np.ndarray, price: np.ndarray | float) -> np.ndarray:
    """Index of the grid level closest to ``price`` (row-wise for a (n, K) grid)."""
    price = np.asarray(price, dtype=np.float64)
    return np.abs(grid - price[..., None]).argmin(axis=-1)


def feasible_mask(grid: np.ndarray, prev_price: np.ndarray | float,
                  max_daily_change: float) -> tuple[np.ndarray, np.ndarray]:
    """Which levels may be chosen today, given yesterday's price.

    A level is feasible if it lies within the grid's bounds (always, by construction) and
    within ``max_daily_change`` (relative) of ``prev_price``. A row is never all zero: if the
    constraints conflict (yesterday's price far outside the bounds), the level nearest to
    ``prev_price`` is kept and the row is counted as a conflict.

    Returns:
        (mask int8 of grid's shape, conflict bool of shape grid.shape[:-1]).
    """
    prev = np.asarray(prev_price, dtype=np.float64)[..., None]
    # A tiny tolerance keeps a level exactly on the boundary feasible despite rounding.
    ok = np.abs(grid / prev - 1.0) <= max_daily_change + 1e-9
    # Work on a 2-D view so a single (K,) grid and a (n, K) batch take the same path.
    flat = ok.reshape(-1, ok.shape[-1])
    conflict = ~flat.any(axis=1)
    if conflict.any():
        distance = np.abs(np.broadcast_to(grid - prev, ok.shape)).reshape(flat.shape)
        rows = np.nonzero(conflict)[0]
        flat[rows, distance[rows].argmin(axis=1)] = True
    mask: np.ndarray = flat.reshape(ok.shape).astype(np.int8)
    conflicts: np.ndarray = np.asarray(conflict.reshape(ok.shape[:-1]))
    return mask, conflicts


def is_price_change(price: np.ndarray | float, previous: np.ndarray | float) -> np.ndarray:
    """True where ``price`` moves more than CHANGE_TOLERANCE (relative) from ``previous``.
    A NaN previous price (unknown) is no change."""
    with np.errstate(invalid="ignore"):
        moved = np.abs(np.asarray(price, dtype=np.float64) / previous - 1.0) > CHANGE_TOLERANCE
    return np.asarray(moved)


def trust_region_bounds(min_sold: np.ndarray, max_sold: np.ndarray, margin: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper): the range a product has been sold at, widened by ``margin`` (a share)
    on each side. NaN (never sold) stays NaN: no limit."""
    lo = np.asarray(min_sold, dtype=np.float64)
    hi = np.asarray(max_sold, dtype=np.float64)
    return lo * (1.0 - margin), hi * (1.0 + margin)


def restrict_to_trust_region(mask: np.ndarray, grid: np.ndarray, lower: np.ndarray | float,
                             upper: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """AND the trust region [lower, upper] into a feasibility mask (from :func:`feasible_mask`).

    Every policy that moves on the grid (agent, greedy, planner, static, random) takes its
    mask through here, so none can recommend a price the data never backed. A row whose
    feasible levels all lie outside the region (yesterday's price far from it, or a region
    between two grid levels) keeps the one feasible level nearest to the region: the policy
    moves toward it as fast as the daily-change rule allows. Such rows are counted.

    Args:
        mask: (..., K) feasible levels (0/1 or bool).
        grid: (..., K) the prices of those levels.
        lower, upper: per row (shape ``mask.shape[:-1]``) or scalars; NaN means no limit.

    Returns:
        (mask int8 of mask's shape, fallback bool of shape mask.shape[:-1]).
    """
    feasible = np.asarray(mask).astype(bool)
    lo = np.asarray(lower, dtype=np.float64)[..., None]
    hi = np.asarray(upper, dtype=np.float64)[..., None]
    lo = np.where(np.isnan(lo), -np.inf, lo)
    hi = np.where(np.isnan(hi), np.inf, hi)
    # Grid prices are computed in floating point: a level on the boundary is inside.
    below = np.maximum(lo - grid, 0.0)
    above = np.maximum(grid - hi, 0.0)
    outside = below + above
    inside = outside <= 1e-9 * np.maximum(1.0, np.abs(grid))
    trusted = feasible & np.broadcast_to(inside, feasible.shape)
    # A 2-D view, so a single (K,) row and a batch take the same path.
    flat = trusted.reshape(-1, trusted.shape[-1])
    flat_feasible = feasible.reshape(flat.shape)
    fallback = ~flat.any(axis=1) & flat_feasible.any(axis=1)
    if fallback.any():
        distance = np.broadcast_to(outside, feasible.shape).reshape(flat.shape)
        rows = np.nonzero(fallback)[0]
        nearest = np.where(flat_feasible[rows], distance[rows], np.inf).argmin(axis=1)
        flat[rows, nearest] = True
    restricted: np.ndarray = flat.reshape(feasible.shape).astype(np.int8)
    return restricted, np.asarray(fallback.reshape(feasible.shape[:-1]))
