"""The inventory (markdown) scenario: the season stock in the generated history and stock.csv,
true scoring of a price path against a brute-force walk over every stock level, and the
(day, stock) DP oracle against an expectimax over every demand outcome."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli.config import load_settings
from pricing_cli.data import generate, market
from pricing_cli.errors import ConfigError
from pricing_cli.monitor import RunMonitor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scenarios" / "markdown.yaml"
SEASON = {"generate.scenario.season_days": 40}  # tiny's 120 days: seasons from days 0, 40, 80


def _settings(out: Path, **flags):
    return load_settings(CONFIG, preset="tiny", environ={},
                         flags={"generate.output_dir": str(out), **SEASON, **flags})


def _market(**flags):
    cfg = _settings(Path("unused"), **flags).generate
    gt, prices = generate.scenario_market(generate.draw_market(cfg), cfg, Path("unused"))
    return gt, prices, cfg


def _pmf(lam: float, n: int) -> float:
    return math.exp(n * math.log(lam) - lam - math.lgamma(n + 1)) if lam > 0 else float(n == 0)


def _stock_walk(lams: list[float], stock: int) -> tuple[list[float], float]:
    """Expected sales of each day and expected units left, by carrying the distribution of the
    units on hand through every day (written here independently of market.py)."""
    dist = {stock: 1.0}
    sales = []
    for lam in lams:
        new: dict[int, float] = {}
        sold = 0.0
        for s, p in dist.items():
            for n in range(s):
                q = p * _pmf(lam, n)
                new[s - n] = new.get(s - n, 0.0) + q
                sold += q * n
            tail = p * (1.0 - sum(_pmf(lam, n) for n in range(s)))  # N >= s sells out
            new[0] = new.get(0, 0.0) + tail
            sold += tail * s
        sales.append(sold)
        dist = new
    return sales, sum(s * p for s, p in dist.items())


def test_markdown_needs_its_own_stock():
    with pytest.raises(ConfigError, match="inventory does not combine with stockouts"):
        load_settings(CONFIG, preset="tiny", environ={},
                      flags={"generate.scenario.stockouts": True})


def test_season_starts_count_back_from_the_last_day():
    np.testing.assert_array_equal(generate.season_starts(365, 91), [0, 92, 183, 274])
    np.testing.assert_array_equal(generate.season_starts(120, 40), [0, 40, 80])
    np.testing.assert_array_equal(generate.season_starts(120, 91), [0])  # 29 days join
    np.testing.assert_array_equal(generate.season_starts(150, 91), [0, 59])


def test_history_sells_from_one_delivery_per_season_and_stock_csv_records_it(tmp_path):
    out = tmp_path / "raw"
    with RunMonitor("generate", "quiet") as monitor:
        generate.run_generate(_settings(out), monitor)
    truth = market.load_ground_truth(out / "ground_truth.json")
    sc = truth.scenario
    np.testing.assert_array_equal(sc.season_start, [0, 40, 80])
    assert sc.stock_file == str(out / "stock.csv")
    np.testing.assert_allclose(sc.salvage, np.round(0.4 * truth.unit_cost, 2))
    stock = pl.read_csv(out / "stock.csv", schema_overrides={"product_id": pl.String},
                        try_parse_dates=True)
    assert stock.columns == ["date", "product_id", "on_hand"]
    on_hand = (stock.sort(["product_id", "date"])["on_hand"].to_numpy()
               .reshape(truth.n_products, 120))
    sold = (pl.concat([pl.read_csv(f, schema_overrides={"product_id": pl.String},
                                   try_parse_dates=True)
                       for f in sorted((out / "transactions").glob("*.csv"))])
            .filter(pl.col("quantity") > 0)
            .group_by(["product_id", "date"]).agg(pl.col("quantity").sum().alias("sold")))
    grid = (stock.join(sold, on=["product_id", "date"], how="left").fill_null(0)
            .sort(["product_id", "date"])["sold"].to_numpy().reshape(truth.n_products, 120))
    assert (grid <= on_hand).all()  # never sells more than is on hand
    for season, start in enumerate(sc.season_start):
        np.testing.assert_array_equal(on_hand[:, start], sc.season_stock[:, season])
        end = 120 if season == 2 else sc.season_start[season + 1]
        # No reorders: each day opens with what the day before left.
        np.testing.assert_array_equal(on_hand[:, start + 1:end],
                                      on_hand[:, start:end - 1] - grid[:, start:end - 1])
    # 1.3x the expected demand at list prices: a season left at list ends with stock.
    assert (on_hand[:, 119] - grid[:, 119] > 0).mean() > 0.5


def test_true_units_of_a_path_match_a_walk_over_every_stock_level():
    gt, prices, cfg = _market()
    sc = gt.scenario
    product, stock = 4, 40
    small = np.array(sc.season_stock)
    small[product, 2] = stock
    gt = dataclasses.replace(gt, scenario=dataclasses.replace(sc, season_stock=small))
    # Three days inside the last season: its first two, before them, at the historical prices.
    days = np.datetime64(cfg.start_date, "D") + np.array([82, 83, 84])
    path = gt.ref_price[product] * np.array([1.0, 1.3, 0.9])
    before = np.datetime64(cfg.start_date, "D") + np.array([80, 81])
    lams = [float(v) for v in market.expected_units(gt, product, before, prices[product, 80:82])]
    lams += [float(v) for v in market.expected_units(gt, product, days, path)]
    walk, _ = _stock_walk(lams, stock)
    idx = np.full(3, product)
    np.testing.assert_allclose(market.true_units(gt, idx, days, path), walk[2:], rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_array_equal(market.true_leftover_value(gt, idx, days, path), 0.0)
    # The whole last season, its leftover salvaged on day 119.
    full = np.datetime64(cfg.start_date, "D") + np.arange(80, 120)
    full_path = np.r_[prices[product, 80:117], path]
    lams = [float(v) for v in market.expected_units(gt, product, full, full_path)]
    full_walk, full_left = _stock_walk(lams, stock)
    np.testing.assert_allclose(market.true_units(gt, np.full(40, product), full, full_path),
                               full_walk, rtol=1e-9, atol=1e-12)
    value = market.true_leftover_value(gt, np.full(40, product), full, full_path)
    assert value[-1] == pytest.approx((sc.salvage[product] - gt.unit_cost[product]) * full_left,
                                      rel=1e-9)


def test_expected_sales_of_a_large_mean_match_a_direct_sum():
    lam, stock = np.array([900.0, 2500.0, 2500.0, 2500.0]), np.array([880, 2400, 2500, 2700])
    direct = []
    for m, s in zip(lam, stock, strict=True):
        n = np.arange(int(m + 40 * math.sqrt(m)))
        logs = n * math.log(m) - m - np.array([math.lgamma(k + 1) for k in n])
        direct.append(float((np.minimum(n, s) * np.exp(logs)).sum()))
    np.testing.assert_allclose(market.expected_sales(lam, stock), direct, rtol=1e-10)


def _expectimax(lams: np.ndarray, prices: np.ndarray, cost: float, terminal: float, stock: int,
                allowed: np.ndarray | None, previous: int | None, day: int = 0) -> float:
    """Best expected profit over every adaptive policy: each day every allowed level, then
    every demand outcome (brute force; allowed[j, k]: level k may follow level j)."""
    if day == lams.shape[0]:
        return terminal * stock
    best = -math.inf
    for k in range(prices.size):
        if allowed is not None and previous is not None and not allowed[previous, k]:
            continue
        total = 0.0
        mass = 0.0
        for n in range(stock):
            p = _pmf(lams[day, k], n)
            mass += p
            total += p * ((prices[k] - cost) * n
                          + _expectimax(lams, prices, cost, terminal, stock - n, allowed, k,
                                        day + 1))
        total += (1.0 - mass) * ((prices[k] - cost) * stock
                                 + _expectimax(lams, prices, cost, terminal, 0, allowed, k,
                                               day + 1))
        best = max(best, total)
    return best


@pytest.mark.parametrize("limit", [None, 0.15])
def test_stock_dp_equals_an_expectimax_over_every_outcome(limit):
    prices = np.array([10.0, 11.0, 13.0])
    lams = np.array([[3.0, 2.2, 1.2], [2.5, 1.8, 1.0], [4.0, 3.0, 1.9]])
    cost, terminal, stock = 6.0, -4.0, 6
    allowed = None
    if limit is not None:
        allowed = np.abs(prices[None, :] / prices[:, None] - 1.0) <= limit + 1e-9
    chosen, value = market.stock_dp(lams[None], prices[None], np.array([cost]),
                                    np.array([terminal]), np.array([float(stock)]),
                                    np.array([3]), max_daily_change=limit,
                                    prev_price=np.array([13.0]) if limit else None)
    # Day one from 13 (level 2) under the limit: 11 and 13 are allowed, 10 is not.
    best = _expectimax(lams, prices, cost, terminal, stock, allowed, 2 if limit else None)
    assert value[0] == pytest.approx(best, rel=1e-10)
    # The price path (expected stock) is feasible and worth no more than the adaptive optimum.
    levels = chosen[0]
    if limit:
        assert abs(prices[levels[0]] / 13.0 - 1) <= limit + 1e-9
        assert all(allowed[a, b] for a, b in itertools.pairwise(levels))
    sales, left = _stock_walk([lams[t, k] for t, k in enumerate(levels)], stock)
    path_value = sum((prices[k] - cost) * s for k, s in zip(levels, sales, strict=True))
    assert path_value + terminal * left <= best + 1e-9


def test_inventory_oracle_beats_the_history_and_every_constant_price():
    gt, prices, cfg = _market()
    n = gt.n_products
    idx = np.repeat(np.arange(n), 40)
    days = np.tile(np.datetime64(cfg.start_date, "D") + np.arange(80, 120), n)

    def profit(x: np.ndarray) -> float:
        return float(((x - gt.unit_cost[idx]) * market.true_units(gt, idx, days, x)
                      + market.true_leftover_value(gt, idx, days, x)).sum())

    oracle = market.true_optimum(gt, idx, days)
    _, value = market.inventory_optimum(gt, idx, days)
    assert profit(oracle) <= value.sum()
    assert profit(oracle) > profit(prices[:, 80:].reshape(-1))
    # Every constant price of a 41-level grid, per product, is no better than the path.
    levels = np.linspace(0.0, 1.0, 41)
    best_constant = 0.0
    for p in range(n):
        rows = idx == p
        grid = gt.min_price[p] + (gt.max_price[p] - gt.min_price[p]) * levels
        best_constant += max(
            float(((x - gt.unit_cost[p]) * market.true_units(gt, idx[rows], days[rows],
                                                             np.full(40, x))
                   + market.true_leftover_value(gt, idx[rows], days[rows], np.full(40, x))
                   ).sum()) for x in grid)
    assert profit(oracle) >= best_constant
