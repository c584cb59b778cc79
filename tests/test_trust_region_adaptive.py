"""The adaptive trust region: it grows only where the ensemble agrees on the best price."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_cli.agent import baselines as bl
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.agent.ensemble import DemandEnsemble, agreed_best_prices
from pricing_cli.config import load_settings
from pricing_cli.errors import ConfigError
from pricing_cli.pricing import price_grid, trust_region_bounds
from tests.support.regions import ConstantElasticity, in_region, none_reachable


def test_adaptive_bounds_by_hand() -> None:
    sold_low = np.array([10.0, 10.0, 10.0, 10.0, np.nan])
    sold_high = np.array([20.0, 20.0, 20.0, 20.0, np.nan])
    agreed = (np.array([np.nan, 8.5, 5.0, 9.5, 3.0]), np.array([np.nan, 24.0, 30.0, 21.0, 40.0]))
    lower, upper = trust_region_bounds(sold_low, sold_high, 0.1, agreed=agreed, cap=0.3)
    # 0: no agreement, the fixed 10%; 1: grows to the agreed interval; 2: to the 30% cap;
    # 3: the agreed interval is inside the fixed region; 4: never sold, no limit.
    np.testing.assert_allclose(lower, [9.0, 8.5, 7.0, 9.0, np.nan])
    np.testing.assert_allclose(upper, [22.0, 24.0, 26.0, 22.0, np.nan])
    for cap in (None, 0.1, 0.05):  # no cap, or one not above the margin: the fixed region
        lower, upper = trust_region_bounds(sold_low, sold_high, 0.1, agreed=agreed, cap=cap)
        np.testing.assert_allclose(lower, [9.0, 9.0, 9.0, 9.0, np.nan])
        np.testing.assert_allclose(upper, [22.0, 22.0, 22.0, 22.0, np.nan])


def one_product_meta(days: int = 7, sold: float = 16.0) -> SplitMeta:
    """One product, cost 10, a 36-level grid from 5 to 40 (one unit apart), history at 16."""
    n = days
    meta = SplitMeta(np.zeros(n, dtype=np.int64), np.array(["P0"] * n, dtype=object),
                     np.datetime64("2024-03-01") + np.arange(n), np.full(n, sold), np.ones(n),
                     np.full(n, 10.0), np.full(n, 5.0), np.full(n, 40.0),
                     np.ones((1, 36), dtype=np.int8), np.array([sold]))
    if days:
        np.testing.assert_allclose(meta.grid[0], np.arange(5.0, 41.0))
    return meta


def ensemble_of(elasticities: list[float]) -> DemandEnsemble:
    return DemandEnsemble(members=[ConstantElasticity(np.array([1000.0]), np.array([e]))
                                   for e in elasticities])


def test_a_tight_ensemble_widens_the_region_and_a_loose_one_does_not() -> None:
    meta = one_product_meta()
    # Constant elasticity e at cost 10: the best price is 10 e / (e - 1), on the grid here.
    tight = ensemble_of([2.0, 21 / 11, 19 / 9])  # best prices 20, 21, 19: width 2/20 = 0.1
    loose = ensemble_of([2.0, 1.5, 3.0])  # 20, 30, 15: width 15/20 = 0.75
    edge = ensemble_of([1.05, 1.06])  # 210 and 187: both at the grid's top level (40)
    low, high = agreed_best_prices(tight, [meta], 0.15, 1)
    np.testing.assert_allclose([low[0], high[0]], [19.0, 21.0])
    assert np.isnan(agreed_best_prices(tight, [meta], 0.05, 1)[0]).all()  # 0.1 > 0.05
    assert np.isnan(agreed_best_prices(loose, [meta], 0.15, 1)[0]).all()
    # At the edge a member says only "further", not where the optimum is.
    assert np.isnan(agreed_best_prices(edge, [meta], 0.15, 1)[0]).all()

    # Sold at 10..16: the fixed 10% region ends at 17.6; the tight ensemble's reaches 21
    # (cap 0.5: 24), the loose one's stays at 17.6.
    sold = (np.array([10.0]), np.array([16.0]))
    tight_region = trust_region_bounds(*sold, 0.1, cap=0.5,
                                       agreed=agreed_best_prices(tight, [meta], 0.15, 1))
    loose_region = trust_region_bounds(*sold, 0.1, cap=0.5,
                                       agreed=agreed_best_prices(loose, [meta], 0.15, 1))
    np.testing.assert_allclose(np.ravel(tight_region), [9.0, 21.0])
    np.testing.assert_allclose(np.ravel(loose_region), [9.0, 17.6])
    # Greedy under the point fit (e = 2, best price 20) reaches 20 only in the grown region.
    point = tight.members[0]
    for bounds, expected in ((tight_region, 20.0), (loose_region, 17.0)):
        trusted = dataclasses.replace(meta, trust_region=bounds)
        np.testing.assert_allclose(bl.greedy_prices(trusted, point, 36, 0.25), expected)


class DayElasticity:
    """Constant elasticity that changes by day (a calendar the fit knows)."""

    def __init__(self, by_day: list[float]) -> None:
        self.by_day = np.array(by_day)

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        day = (np.asarray(dates) - np.datetime64("2024-03-01")).astype(np.int64)
        return 1000.0 * np.asarray(prices) ** -self.by_day[day]


def test_agreement_is_day_by_day() -> None:
    meta = one_product_meta(days=3)
    # Day 0: best 20 and 21 (agreed); day 1: 15 and 15 (agreed, an event's higher
    # elasticity); day 2: 30 and 15 (no agreement, left out).
    members = [DayElasticity([2.0, 3.0, 1.5]), DayElasticity([21 / 11, 3.0, 3.0])]
    low, high = agreed_best_prices(DemandEnsemble(members=members), [meta], 0.1, 2)
    np.testing.assert_allclose(low, [15.0, np.nan])  # product 1 has no rows: no agreement
    np.testing.assert_allclose(high, [21.0, np.nan])
    # A second split folds in: its agreed day 0 at 20/21 keeps (15, 21); an empty one is skipped.
    low, high = agreed_best_prices(DemandEnsemble(members=members),
                                   [meta, one_product_meta(days=1), one_product_meta(days=0)],
                                   0.1, 1)
    np.testing.assert_allclose([low[0], high[0]], [15.0, 21.0])


def test_a_large_market_is_searched_coarse_to_fine_on_fewer_days() -> None:
    meta = one_product_meta(days=3)
    members = [DayElasticity([2.0, 3.0, 1.5]), DayElasticity([21 / 11, 3.0, 3.0])]
    ensemble = DemandEnsemble(members=members)
    # 2 members x 3 rows x 36 levels = 216 predictions; a budget of 100 uses every 3rd day
    # (day 0 only: best 20 and 21).
    low, high = agreed_best_prices(ensemble, [meta], 0.1, 1, max_evaluations=100)
    np.testing.assert_allclose([low[0], high[0]], [20.0, 21.0])
    # 101 levels 0.5 apart from 10 to 60: searched every 5th level, then +-4 around the best
    # (29 of 101), and the same optimum as the full scan: 15 .. 21.
    wide = dataclasses.replace(meta, min_price=np.full(3, 10.0), max_price=np.full(3, 60.0),
                               first_day_mask=np.ones((1, 101), dtype=np.int8))
    np.testing.assert_allclose(wide.grid[0][[10, 18, 20, 22]], [15.0, 19.0, 20.0, 21.0])
    low, high = agreed_best_prices(ensemble, [wide], 0.1, 1)
    np.testing.assert_allclose([low[0], high[0]], [15.0, 21.0])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_prices_never_leave_the_adaptive_region(data: st.DataObject) -> None:
    n_products = data.draw(st.integers(1, 3))
    days = data.draw(st.integers(1, 5))
    levels = data.draw(st.integers(2, 9))
    max_change = data.draw(st.sampled_from([0.05, 0.1, 0.25, 0.5]))
    margin = data.draw(st.sampled_from([0.0, 0.05, 0.1]))
    cap = data.draw(st.sampled_from([0.1, 0.2, 0.3, 0.6]))

    def draws(low: float, high: float) -> np.ndarray:
        return np.array([data.draw(st.floats(low, high)) for _ in range(n_products)])

    lo = draws(0.5, 50.0)
    hi = lo * draws(1.05, 4.0)
    sold_low = lo * draws(0.5, 2.0)
    sold_high = sold_low * draws(1.0, 2.0)
    agree_low = sold_low * draws(0.3, 2.0)
    agree_high = agree_low * draws(1.0, 1.5)
    none = np.array([data.draw(st.booleans()) for _ in range(n_products)])
    agreed = (np.where(none, np.nan, agree_low), np.where(none, np.nan, agree_high))
    lower, upper = trust_region_bounds(sold_low, sold_high, margin, agreed=agreed, cap=cap)
    # The fixed region inside it, and it inside the cap's.
    fixed = trust_region_bounds(sold_low, sold_high, margin)
    widest = trust_region_bounds(sold_low, sold_high, max(cap, margin))
    assert np.all(lower <= fixed[0] + 1e-12) and np.all(upper >= fixed[1] - 1e-12)
    assert np.all(lower >= widest[0] - 1e-12) and np.all(upper <= widest[1] + 1e-12)
    # No agreement: exactly the fixed region.
    np.testing.assert_array_equal(lower[none], fixed[0][none])
    np.testing.assert_array_equal(upper[none], fixed[1][none])

    prev = lo * draws(0.5, 5.0)
    n = n_products * days
    index = np.repeat(np.arange(n_products), days)
    meta = SplitMeta(index, np.array([f"P{p}" for p in index], dtype=object),
                     np.tile(np.datetime64("2024-03-01") + np.arange(days), n_products),
                     np.repeat(prev, days), np.ones(n), np.repeat(lo * 0.5, days),
                     np.repeat(lo, days), np.repeat(hi, days),
                     np.ones((n_products, levels), dtype=np.int8), prev,
                     trust_region=(lower, upper))
    demand = ConstantElasticity(draws(1.0, 100.0), draws(1.2, 4.0))
    grid = price_grid(lo, hi, levels)[index]
    row_lower, row_upper = lower[index], upper[index]
    for prices in (bl.greedy_prices(meta, demand, levels, max_change),
                   bl.planned_prices(meta, demand, levels, max_change,
                                     np.full(n_products, 0.5))):
        previous = np.r_[np.nan, prices[:-1]]
        previous[meta.series_start] = prev
        inside = in_region(prices, row_lower, row_upper)
        # Outside only where no reachable level lies inside (moving toward it, counted).
        assert np.all(inside | none_reachable(grid, previous, row_lower, row_upper, max_change))


def test_the_adaptive_keys_are_spell_checked(tmp_path: Path) -> None:
    settings_ = load_settings(preset="tiny", flags={"train.trust_region_adaptive": 0.3},
                              environ={})
    assert settings_.train.trust_region_adaptive == 0.3
    assert settings_.train.trust_region_agreement == 0.1
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  trust_region_adaptiv: 0.3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "did you mean 'train.trust_region_adaptive'?" in info.value.hint
