"""The trust region: no policy recommends a price outside the range the data backs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricing_cli.agent import baselines as bl
from pricing_cli.agent import evaluate as ev
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.agent.env import load_market, random_feasible_policy, simulate
from pricing_cli.pricing import price_grid, restrict_to_trust_region, trust_region_bounds
from tests import agent_fixtures
from tests.support.regions import ConstantElasticity, in_region, none_reachable


def test_restrict_to_trust_region_by_hand() -> None:
    grid = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    feasible = np.array([0, 1, 1, 1, 0])
    mask, fallback = restrict_to_trust_region(feasible, grid, 2.5, 10.0)
    assert mask.tolist() == [0, 0, 1, 1, 0] and not fallback
    # A boundary level is inside despite rounding.
    mask, _ = restrict_to_trust_region(feasible, grid, 2.0 + 1e-12, 3.0 - 1e-12)
    assert mask.tolist() == [0, 1, 1, 0, 0]
    # No feasible level inside: the feasible level nearest to the region, counted.
    mask, fallback = restrict_to_trust_region(feasible, grid, 4.6, 9.0)
    assert mask.tolist() == [0, 0, 0, 1, 0] and bool(fallback)
    mask, fallback = restrict_to_trust_region(feasible, grid, 0.1, 1.4)
    assert mask.tolist() == [0, 1, 0, 0, 0] and bool(fallback)
    # A region between two levels: the nearest level.
    mask, fallback = restrict_to_trust_region(np.ones(5), grid, 3.3, 3.4)
    assert mask.tolist() == [0, 0, 1, 0, 0] and bool(fallback)
    # NaN bounds: no limit; rows are independent.
    mask, fallback = restrict_to_trust_region(np.stack([feasible, feasible]),
                                              np.stack([grid, grid]),
                                              np.array([np.nan, 3.5]), np.array([np.nan, 9.0]))
    assert mask.tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 1, 0]]
    assert fallback.tolist() == [False, False]
    lower, upper = trust_region_bounds(np.array([10.0, np.nan]), np.array([20.0, np.nan]), 0.1)
    np.testing.assert_allclose(lower, [9.0, np.nan])
    np.testing.assert_allclose(upper, [22.0, np.nan])


@st.composite
def markets(draw: st.DrawFn) -> tuple[SplitMeta, ConstantElasticity, float]:
    n_products = draw(st.integers(1, 3))
    days = draw(st.integers(1, 6))
    levels = draw(st.integers(2, 9))
    max_change = draw(st.sampled_from([0.05, 0.1, 0.25, 0.5]))
    floats = st.floats(0.5, 50.0, allow_nan=False)
    lo = np.array([draw(floats) for _ in range(n_products)])
    hi = lo * np.array([draw(st.floats(1.05, 4.0)) for _ in range(n_products)])
    # Regions anywhere around the grid: inside, partly outside, between two levels, beyond.
    a = lo * np.array([draw(st.floats(0.3, 3.0)) for _ in range(n_products)])
    b = a * np.array([draw(st.floats(1.0, 2.0)) for _ in range(n_products)])
    unlimited = np.array([draw(st.booleans()) and draw(st.booleans())
                          for _ in range(n_products)])
    lower, upper = np.where(unlimited, np.nan, a), np.where(unlimited, np.nan, b)
    prev = lo * np.array([draw(st.floats(0.5, 5.0)) for _ in range(n_products)])
    n = n_products * days
    index = np.repeat(np.arange(n_products), days)
    cost = np.repeat(lo * 0.5, days)
    grid = price_grid(lo, hi, levels)
    meta = SplitMeta(index, np.array([f"P{p}" for p in index], dtype=object),
                     np.tile(np.datetime64("2024-03-01") + np.arange(days), n_products),
                     np.repeat(prev, days), np.ones(n), cost, np.repeat(lo, days),
                     np.repeat(hi, days),
                     np.ones((n_products, levels), dtype=np.int8), prev,
                     trust_region=(lower, upper))
    assert grid.shape == meta.grid.shape
    demand = ConstantElasticity(np.array([draw(st.floats(1.0, 100.0))
                                          for _ in range(n_products)]),
                                np.array([draw(st.floats(1.2, 4.0)) for _ in range(n_products)]))
    return meta, demand, max_change


@settings(max_examples=150, deadline=None)
@given(markets())
def test_every_grid_policy_stays_in_the_trust_region_or_counts_a_fallback(
        market: tuple[SplitMeta, ConstantElasticity, float]) -> None:
    meta, demand, max_change = market
    K = meta.grid.shape[1]
    lower, upper = (bound[meta.series_of_row] for bound in meta.trust_region)
    grid = meta.grid[meta.series_of_row]
    policies = {
        "static": bl.static_prices(meta, demand, K, max_change),
        "greedy": bl.greedy_prices(meta, demand, K, max_change),
        "planner": bl.planned_prices(meta, demand, K, max_change,
                                     np.full(meta.series_start.size, 0.5)),
        "random": bl.random_feasible_prices(meta, K, max_change, seed=1),
    }
    for name, prices in policies.items():
        previous = np.r_[np.nan, prices[:-1]]
        previous[meta.series_start] = meta.prev_price
        if name == "static":  # one price all split long, chosen among day one's levels
            previous = meta.prev_price[meta.series_of_row]
        inside = in_region(prices, lower, upper)
        fallback = none_reachable(grid, previous, lower, upper, max_change)
        assert np.all(inside | fallback), name
        # A fallback is the reachable level nearest to the region.
        for row in np.flatnonzero(~inside):
            distance = np.maximum(lower[row] - grid[row], 0) + np.maximum(grid[row] - upper[row],
                                                                          0)
            with np.errstate(invalid="ignore"):
                reach = np.abs(grid[row] / previous[row] - 1.0) <= max_change + 1e-9
            if reach.any():
                assert distance[np.abs(grid[row] - prices[row]).argmin()] == pytest.approx(
                    distance[reach].min()), name
        assert ev.rows_outside_trust_region(meta, prices) == int((~inside).sum())


@pytest.fixture(scope="module")
def fixture_market(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("processed")
    agent_fixtures.write_processed(folder, n_products=4, n_days=60, K=11)
    meta = bl.load_split_meta(folder, "test")
    demand = ConstantElasticity(np.full(4, 20.0), np.full(4, 2.0))
    demand.reference_price = np.ones(4)  # type: ignore[attr-defined]
    demand.n_products = 4  # type: ignore[attr-defined]

    def log_base_and_elasticity(product_index: np.ndarray, dates: np.ndarray):
        return np.log(demand.level[product_index]), demand.elasticity[product_index]

    demand.log_base_and_elasticity = log_base_and_elasticity  # type: ignore[attr-defined]
    return load_market(folder, "test", demand), meta


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0.3, 1.8), st.floats(1.0, 1.6)), min_size=4, max_size=4),
       st.integers(0, 1000))
def test_the_env_masks_keep_the_agent_in_the_trust_region(fixture_market, regions,
                                                          seed: int) -> None:
    market, meta = fixture_market
    start = meta.series_start
    list_price = meta.max_price[start] / 1.6  # the fixture's range is [0.6 L, 1.6 L]
    lower = np.array([r[0] for r in regions]) * list_price
    upper = lower * np.array([r[1] for r in regions])
    trusted = dataclasses.replace(market, trust_region=(lower, upper))
    prices = simulate(trusted, random_feasible_policy(np.random.default_rng(seed)))["prices"]
    product = market.product_index
    previous = np.r_[np.nan, prices[:-1]]
    previous[start] = market.previous_price[start]  # the env starts from history
    inside = in_region(prices, lower[product], upper[product])
    fallback = none_reachable(market.grid(np.arange(market.n_rows)), previous, lower[product],
                              upper[product], market.max_daily_change)
    assert np.all(inside | fallback)


def test_evaluate_series_bounds_follow_product_index() -> None:
    meta = SplitMeta(np.array([2, 2, 5]), np.array(["a", "a", "b"], dtype=object),
                     np.array(["2024-01-01", "2024-01-02", "2024-01-01"], dtype="datetime64[D]"),
                     np.ones(3), np.ones(3), np.ones(3), np.ones(3), np.full(3, 2.0),
                     np.ones((2, 3), dtype=np.int8), np.full(2, np.nan))
    lower, upper = ev.series_bounds(meta, (np.arange(4.0), np.arange(4.0) + 10))
    np.testing.assert_array_equal(lower, [2.0, np.nan])  # product 5 is beyond: no limit
    np.testing.assert_array_equal(upper, [12.0, np.nan])


def test_sold_price_range_ignores_days_without_sales(tmp_path: Path) -> None:
    import polars as pl

    for split, prices, units in (("train", [5.0, 9.0, 4.0], [1.0, 2.0, 0.0]),
                                 ("val", [11.0, 3.0, 7.0], [3.0, -1.0, 1.0])):
        pl.DataFrame({"product_index": [0, 0, 1], "price": prices, "units": units}
                     ).write_parquet(tmp_path / f"meta_{split}.parquet")
    low, high = bl.sold_price_range(tmp_path, 3)
    np.testing.assert_array_equal(low, [5.0, 7.0, np.nan])
    np.testing.assert_array_equal(high, [11.0, 7.0, np.nan])
