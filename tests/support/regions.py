"""Trust-region test helpers: a constant-elasticity demand stand-in and the region checks
(tests/test_trust_region.py, tests/test_trust_region_adaptive.py)."""

from __future__ import annotations

import numpy as np


class ConstantElasticity:
    def __init__(self, level: np.ndarray, elasticity: np.ndarray) -> None:
        self.level, self.elasticity = level, elasticity

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return self.level[product_index] * np.asarray(prices) ** -self.elasticity[product_index]


def in_region(prices: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    slack = 1e-9 * np.maximum(1.0, prices)
    return ((np.isnan(lower) | (prices >= lower - slack))
            & (np.isnan(upper) | (prices <= upper + slack)))


def none_reachable(grid: np.ndarray, previous: np.ndarray, lower: np.ndarray,
                   upper: np.ndarray, max_change: float) -> np.ndarray:
    """Rows where no level within max_change of the previous price lies in the region, by
    direct arithmetic (a fallback is allowed there). Unknown previous price: any level."""
    with np.errstate(invalid="ignore"):
        reach = np.abs(grid / previous[:, None] - 1.0) <= max_change + 1e-9
    reach = np.where(np.isnan(previous)[:, None], True, reach)
    if not reach.any(axis=1).all():  # the shared rule then keeps the nearest level
        nearest = np.abs(grid - previous[:, None]).argmin(axis=1)
        reach[np.arange(len(grid)), nearest] |= ~reach.any(axis=1)
    inside = in_region(grid, lower[:, None], upper[:, None])
    return ~(reach & inside).any(axis=1)
