"""The env's inventory state: sales never exceed the units on hand (a property test over
random stocks, deliveries and price levels), and a delivery restocks the slot."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.env import EpisodeBatch, load_market
from pricing_cli.config import load_settings
from tests.agent_fixtures import write_processed

K = 11


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("processed")
    write_processed(folder, n_products=4, K=K, F=12)
    demand = DemandModel.fit(pl.read_parquet(folder / "meta_train.parquet"),
                             load_settings(preset="tiny", environ={}))
    return load_market(folder, "train", demand)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sample=st.booleans(), start_stock=st.integers(0, 60))
def test_the_env_never_sells_more_than_is_on_hand(market, seed, sample, start_stock):
    rng = np.random.default_rng(seed)
    n = market.n_rows
    on_hand = np.full(n, np.nan)
    delivery = rng.random(n) < 0.05
    on_hand[delivery] = rng.integers(0, 40, delivery.sum())
    starts = np.flatnonzero(np.r_[True, market.product_index[1:] != market.product_index[:-1]])
    on_hand[starts] = start_stock
    delivery[starts] = True
    stocked = dataclasses.replace(market, on_hand=on_hand, delivery=delivery,
                                  days_to_season_end=np.zeros(n, dtype=np.int64))
    batch = EpisodeBatch(stocked, 4, sample_demand=sample)
    slots = np.arange(4)
    first = starts[:4] if starts.size >= 4 else np.resize(starts, 4)
    batch.begin(slots, first, first + 20)
    for _ in range(20):
        live = slots[batch.row[slots] < batch.end[slots]]
        if live.size == 0:
            break
        rows = batch.row[live]
        arrived = delivery[rows]
        before = np.where(arrived, on_hand[rows], batch.stock[live])
        out = batch.step(live, rng.integers(0, K, live.size), rng)
        assert np.all(out["units"] <= before + 1e-9)
        assert np.all(out["units"] >= 0.0)
        np.testing.assert_allclose(batch.stock[live], np.maximum(before - out["units"], 0.0))
        if sample:
            assert np.all(out["units"] == np.round(out["units"]))


def test_without_stock_the_units_are_the_demand(market):
    batch = EpisodeBatch(market, 1)
    batch.begin(np.array([0]), np.array([0]), np.array([5]))
    out = batch.step(np.array([0]), np.array([3]))
    assert out["units"][0] == pytest.approx(float(market.units_table[0, 3]))
    assert batch.stock_state(np.array([0]))["on_hand"][0] == np.inf


def test_a_sold_out_slot_sells_nothing_and_reports_zero_cover(market):
    n = market.n_rows
    stocked = dataclasses.replace(market, on_hand=np.r_[2.0, np.full(n - 1, np.nan)],
                                  delivery=np.r_[True, np.zeros(n - 1, bool)],
                                  days_to_season_end=np.arange(n)[::-1])
    batch = EpisodeBatch(stocked, 1, sample_demand=True)
    batch.begin(np.array([0]), np.array([0]), np.array([5]))
    rng = np.random.default_rng(0)
    sold = sum(batch.step(np.array([0]), np.array([0]), rng)["units"][0] for _ in range(4))
    assert sold == 2.0  # demand at the lowest price is far above 2 units a day
    state = batch.stock_state(np.array([0]))
    assert state["on_hand"][0] == 0.0 and state["days_of_cover"][0] == 0.0
    assert state["days_to_season_end"][0] == n - 1 - 4


class PowerDemand:
    """A stand-in demand model: 4 (product 0) or 2 (product 1) units a day at a price of 10,
    elasticity 2. Exact, so the stock features can be computed by hand."""

    n_products = 2

    def expected_units(self, product_index, dates, prices):
        base = np.where(np.asarray(product_index) == 0, 4.0, 2.0)
        return base * (np.asarray(prices, dtype=np.float64) / 10.0) ** -2.0


@pytest.fixture(scope="module")
def two_products(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("two_products")
    write_processed(folder, n_products=2, n_days=20, K=5, F=3)
    return folder


def _first_rows(market) -> np.ndarray:
    return np.flatnonzero(np.r_[True, market.product_index[1:] != market.product_index[:-1]])


def test_a_memoryless_market_keeps_its_observation_bytes(two_products):
    """Without stock the observation is F + K + 3 and, byte for byte, what it was before the
    stock state existed (digest measured with the env of 665ae9f)."""
    import hashlib

    market = load_market(two_products, "train", PowerDemand())
    assert market.n_stock_features == 0 and market.n_features == 3 + 5 + 3
    batch = EpisodeBatch(market, 2)
    starts = _first_rows(market)
    batch.begin(np.arange(2), starts, market.product_end[starts])
    digest = hashlib.sha256()
    for _ in range(5):
        obs = batch.observe(np.arange(2))
        digest.update(obs["features"].tobytes())
        digest.update(obs["product_id"].tobytes())
        batch.step(np.arange(2), np.array([1, 3]))
    assert digest.hexdigest() == (
        "5fd2c68e6b9f09a9354cd6cb6ef7efc3c1816038d99a522bda3d3dec55dd1156")


def test_the_observation_carries_days_of_cover_and_days_to_the_season_end(two_products):
    from pricing_cli.agent.env import N_ENDOGENOUS, STOCK_FEATURES
    from pricing_cli.agent.inventory import MarketStock

    plain = load_market(two_products, "train", PowerDemand())
    n = plain.n_rows
    starts = _first_rows(plain)
    on_hand = np.full(n, np.nan)
    on_hand[starts] = [40.0, 500.0]
    delivery = np.zeros(n, dtype=bool)
    delivery[starts] = True
    # Product 0's season ends 5 days into the split (then a new one of 1 unit), product 1's
    # runs past the split's end, 300 days away.
    ahead = np.zeros(n, dtype=np.int64)
    p0 = np.arange(starts[0], starts[1])
    ahead[p0] = np.r_[np.arange(5, 0, -1), np.arange(p0.size - 5, 0, -1)]
    on_hand[p0[5]], delivery[p0[5]] = 1.0, True
    p1 = np.arange(starts[1], n)
    ahead[p1] = 300 - np.arange(p1.size)
    stock = MarketStock(on_hand, delivery, ahead, np.full(n, -2.0))
    market = load_market(two_products, "train", PowerDemand(), stock=stock)
    assert STOCK_FEATURES == ("days_of_cover", "days_to_season_end")
    assert market.n_stock_features == 2 and market.n_features == 3 + 2 + 5 + 3
    batch = EpisodeBatch(market, 2)
    batch.begin(np.arange(2), starts, market.product_end[starts])
    last = market.previous_price[starts]
    obs = batch.observe(np.arange(2))
    units = np.array([4.0, 2.0]) * (market.grid(starts)[np.arange(2), [
        int(np.abs(market.grid(starts)[i] - last[i]).argmin()) for i in range(2)]] / 10) ** -2
    # Product 0: 40 units / its demand at yesterday's price, 5 days left; product 1: 500 / 2
    # a day is 250 days of cover, clipped at 182 (2 x 91); 300 days left, clipped too.
    np.testing.assert_allclose(obs["features"][:, 3:5], np.array(
        [[40.0 / units[0] / 91.0, 5.0 / 91.0], [2.0, 2.0]]), rtol=1e-6)
    # The layout: processed features, stock, the K forecast columns, the 3 endogenous ones.
    np.testing.assert_array_equal(obs["features"][:, :3], np.asarray(market.features)[starts])
    np.testing.assert_allclose(obs["features"][:, 5:10],
                               market.profit_forecast(starts, last), rtol=1e-6)
    np.testing.assert_allclose(obs["features"][:, -N_ENDOGENOUS:],
                               market.endogenous(starts, last, market.held_days[starts]),
                               rtol=1e-6)
    assert obs["product_id"].tolist() == [[0.0], [1.0]]  # a Box index, not one-hot

    # Day one as low as the daily-change rule allows: E[min(Poisson(u), 40)] = u to 1e-12
    # sold, the rest carries; tomorrow's cover is at the price just set (the same level).
    out = batch.step(np.arange(2), np.array([0, 0]))
    sold = np.array([4.0, 2.0]) * (out["prices"] / 10) ** -2
    # (the demand table is float32: 1e-7 relative)
    np.testing.assert_allclose(out["units"], sold, rtol=1e-6)
    np.testing.assert_allclose(batch.stock, [40.0 - sold[0], 500.0 - sold[1]], rtol=1e-6)
    obs = batch.observe(np.arange(2))
    tomorrow = 4.0 * (market.grid(starts + 1)[0, out["levels"][0]] / 10) ** -2
    np.testing.assert_allclose(obs["features"][0, 3:5],
                               [(40.0 - sold[0]) / tomorrow / 91.0, 4.0 / 91.0], rtol=1e-6)

    # On the season's last day (day 5) what is left is sold off at the salvage margin (-2 a
    # unit) and a new season's delivery (1 unit) replaces it the next morning.
    for _ in range(3):
        batch.step(np.arange(2), np.array([0, 0]))
    before = batch.stock[0]
    out = batch.step(np.arange(2), np.array([0, 0]))
    assert out["rows"][0] == starts[0] + 4 and market.days_to_season_end[out["rows"][0]] == 1
    price = out["prices"][0]
    left = before - out["units"][0]
    assert left > 1.0
    assert out["profit"][0] == pytest.approx((price - market.unit_cost[starts[0] + 4])
                                             * out["units"][0] - 2.0 * left)
    assert batch.stock[0] == 0.0
    out = batch.step(np.arange(2), np.array([0, 0]))
    assert out["units"][0] <= 1.0 and batch.stock[0] == pytest.approx(1.0 - out["units"][0])
