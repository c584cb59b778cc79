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
