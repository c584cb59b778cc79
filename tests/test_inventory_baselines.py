"""The inventory baselines under a known demand (agent/inventory.py): greedy and the ladder
against hand-computed choices, and the stock DP planner against every feasible price path."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pricing_cli.agent import inventory
from pricing_cli.agent.baselines import SplitMeta

GRID = np.array([10.0, 12.0, 14.0])


class PowerDemand:
    """units = scale * (price / 12) ** -3 (per product), whatever the date."""

    def __init__(self, scale: np.ndarray) -> None:
        self.scale = scale

    def expected_units(self, product_index, dates, prices):
        return self.scale[np.asarray(product_index)] * (np.asarray(prices) / 12.0) ** -3.0


def _meta(days: int, prev: float, products: int = 1) -> SplitMeta:
    n = days * products
    return SplitMeta(
        product_index=np.repeat(np.arange(products), days), product_id=np.repeat(
            np.array([f"P{i}" for i in range(products)], dtype=object), days),
        date=np.tile(np.datetime64("2024-01-01") + np.arange(days), products),
        price=np.full(n, prev), units=np.zeros(n), unit_cost=np.full(n, 6.0),
        min_price=np.full(n, 10.0), max_price=np.full(n, 14.0),
        first_day_mask=np.ones((products, 3), np.int8), prev_price=np.full(products, prev))


def _runs(meta: SplitMeta, stock: list[float], terminal: float) -> inventory.SeasonRuns:
    start = meta.series_start
    return inventory.SeasonRuns(start, np.asarray(stock, float), np.full(start.size, terminal),
                                np.arange(start.size), meta.series_of_row)


def _min_mean(lam: float, stock: int) -> float:
    """E[min(N, stock)], N ~ Poisson(lam), term by term."""
    return sum(min(n, stock) * math.exp(n * math.log(lam) - lam - math.lgamma(n + 1))
               for n in range(stock + 200))


def test_greedy_takes_the_most_profitable_level_given_the_stock():
    meta = _meta(1, 12.0)
    demand = PowerDemand(np.array([4.0]))
    table = inventory.level_units(meta, demand, 3)
    # Stock 2: at 10 demand 6.9 sells ~2 at margin 4; at 14 demand 2.5 sells ~1.6 at margin 8.
    gains = [(x - 6.0) * _min_mean(4.0 * (x / 12) ** -3, 2) for x in GRID]
    prices = inventory.greedy_prices(meta, _runs(meta, [2], -3.0), table, 0.25)
    assert prices[0] == GRID[int(np.argmax(gains))] == 14.0
    # With plenty of stock the margin-times-demand optimum wins: (x - 6) x^-3 is largest at 10.
    prices = inventory.greedy_prices(meta, _runs(meta, [500], -3.0), table, 0.25)
    assert prices[0] == 10.0


def test_ladder_cuts_one_level_a_week_while_the_cover_exceeds_its_threshold():
    meta = _meta(9, 14.0)
    demand = PowerDemand(np.array([2.0]))
    table = inventory.level_units(meta, demand, 3)
    # Demand at 14 is 1.26/day, at 12 2/day: 30 units are 24 days of cover at 14, 15 at 12.
    prices = inventory.ladder_prices(meta, _runs(meta, [30], -3.0), table, 0.25, 0.05, 20.0)
    np.testing.assert_array_equal(prices, [12.0] * 9)  # one cut, then 15 days < 20
    # 300 units stay above 10 days of cover: a cut on day 0 and the next a week later.
    prices = inventory.ladder_prices(meta, _runs(meta, [300], -3.0), table, 0.25, 0.05, 10.0)
    np.testing.assert_array_equal(prices, [12.0] * 7 + [10.0] * 2)
    prices = inventory.ladder_prices(meta, _runs(meta, [30], -3.0), table, 0.25, 0.05, 30.0)
    np.testing.assert_array_equal(prices, [14.0] * 9)
    prices = inventory.ladder_prices(meta, _runs(meta, [30], -3.0), table, 0.25, 0.05,
                                     math.inf)
    np.testing.assert_array_equal(prices, [14.0] * 9)


@pytest.mark.parametrize("limit", [0.25, 0.15])
def test_planner_earns_at_least_every_other_baseline_and_nearly_the_best_path(limit):
    meta = _meta(4, 14.0, products=2)
    demand = PowerDemand(np.array([2.0, 5.0]))
    table = inventory.level_units(meta, demand, 3)
    runs = _runs(meta, [6, 12], -4.0)

    def profit(prices: np.ndarray) -> float:
        units = demand.expected_units(meta.product_index, meta.date, prices)
        return runs.profit(meta, prices, units)

    planner = inventory.planned_prices(meta, runs, table, limit)
    others = {"greedy": inventory.greedy_prices(meta, runs, table, limit),
              "static": inventory.static_prices(meta, runs, table, limit),
              "ladder": inventory.ladder_prices(meta, runs, table, limit, 0.1, 3.0)}
    for name, prices in others.items():
        assert profit(planner) >= profit(prices) - 1e-9, name
    # Every feasible path of each product (from 14 on day one): the planner's open-loop path
    # is within 0.5% of the best one.
    for p in range(2):
        rows = meta.product_index == p
        best = -np.inf
        for path in itertools.product(GRID, repeat=4):
            steps = np.abs(np.diff(np.r_[14.0, path]) / np.r_[14.0, path][:-1])
            if np.all(steps <= limit + 1e-9):
                trial = planner.copy()
                trial[rows] = path
                best = max(best, profit(trial))
        assert profit(planner) >= best - 0.005 * abs(best)
        steps = np.abs(np.diff(np.r_[14.0, planner[rows]]) / np.r_[14.0, planner[rows]][:-1])
        assert np.all(steps <= limit + 1e-9)


def test_ladder_from_a_start_price_holds_it_on_day_one_then_marks_down():
    meta = _meta(3, 12.0)
    demand = PowerDemand(np.array([2.0]))
    table = inventory.level_units(meta, demand, 3)
    # Starts at 14 (feasible from 12: +16.7%), then 30 units are 24 days of cover > 20.
    prices = inventory.ladder_prices(meta, _runs(meta, [30], -3.0), table, 0.25, 0.05, 20.0,
                                     np.full(3, 14.0))
    np.testing.assert_array_equal(prices, [14.0, 12.0, 12.0])


def test_evaluate_adds_the_salvage_to_every_profit_and_shares_the_dp_value():
    from pricing_cli.agent.evaluate import inventory_report, score_policies

    meta = _meta(2, 12.0)
    policies = {"historical": np.array([12.0, 12.0]), "oracle": np.array([14.0, 14.0])}
    scores = score_policies(meta, policies, lambda prices: np.array([1.0, 2.0]),
                            reference="oracle",
                            leftover=lambda prices: np.array([0.0, -prices[1]]))
    # historical: (12 - 6) * 3 - 12 = 6; oracle: (14 - 6) * 3 - 14 = 10.
    assert scores["historical"]["salvage"] == -12.0
    assert scores["historical"]["profit"] == 6.0 and scores["oracle"]["profit"] == 10.0
    assert scores["historical"]["share_of_oracle_pct"] == pytest.approx(60.0)
    report = inventory_report({"dp_value_true": 20.0}, scores)
    assert report["share_of_dp_pct"] == {"historical": 30.0, "oracle": 50.0}
