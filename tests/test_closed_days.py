"""Closed days are left out of the env's rows and of evaluate's rows, as they are left out of
the demand fit and of recommendations (data/closed_days.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pricing_cli.agent import baselines as bl
from pricing_cli.agent.env import load_market, simulate
from pricing_cli.data.closed_days import ClosedDays, open_rows
from tests.agent_fixtures import true_expected_units, write_processed


class TrueDemand:
    """The fixture's true demand as a demand model (what load_market needs of one)."""

    def __init__(self, truth: dict) -> None:
        self.truth = truth
        self.n_products = len(truth["elasticity"])

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return true_expected_units(self.truth, product_index, dates, prices)


SATURDAYS = ClosedDays(np.zeros(0, dtype="datetime64[D]"), frozenset({5}))


def test_open_rows_are_the_rows_off_closed_days() -> None:
    days = np.array(["2024-01-05", "2024-01-06", "2024-01-07", "2024-01-08"],
                    dtype="datetime64[D]")  # Friday, Saturday, Sunday, Monday
    assert open_rows(days, SATURDAYS).tolist() == [0, 2, 3]
    assert open_rows(days, None) is None
    holiday = ClosedDays(np.array(["2024-01-08"], dtype="datetime64[D]"), frozenset())
    assert open_rows(days, holiday).tolist() == [0, 1, 2]
    assert open_rows(days[:1], SATURDAYS) is None  # nothing closed: every row, no copy


def test_the_env_and_evaluate_leave_closed_rows_out(tmp_path: Path) -> None:
    # 84 days from Monday 2 January 2023: the test split is the last 12 days (2 Saturdays).
    truth = write_processed(tmp_path, n_products=3, n_days=84, K=11)
    demand = TrueDemand(truth)
    full = load_market(tmp_path, "test", demand)
    market = load_market(tmp_path, "test", demand, closed=SATURDAYS)
    meta = bl.load_split_meta(tmp_path, "test", SATURDAYS)
    frame = pl.read_parquet(tmp_path / "meta_test.parquet")
    saturday = frame["date"].dt.weekday().to_numpy() == 6  # polars: Monday 1
    assert saturday.sum() == 3 * 2
    assert full.n_rows == frame.height and market.n_rows == frame.height - 6
    # the same open rows, in the same order, in the env and in evaluate's meta
    np.testing.assert_array_equal(market.split_rows, np.flatnonzero(~saturday))
    np.testing.assert_array_equal(market.dates, meta.date)
    assert not ((market.dates.astype(np.int64) + 3) % 7 == 5).any()
    np.testing.assert_array_equal(meta.price, frame["price"].to_numpy()[~saturday])
    # each open row sees its own features (the matrix stays mapped, rows picked through
    # split_rows) and its own processed mask
    X = np.load(tmp_path / "X_test.npy")
    rows = np.arange(market.n_rows)
    obs = market.observation(rows, market.previous_price, market.held_days)
    np.testing.assert_array_equal(obs["features"][:, :X.shape[1]], X[~saturday])
    masks = np.load(tmp_path / "masks_test.npz")["price_level"].astype(bool)
    np.testing.assert_array_equal(market.processed_masks(rows), masks[~saturday])
    # the row after a closed Saturday starts from Friday's price (carried over the closed day)
    after = np.flatnonzero(saturday[:-1])[0]  # the Saturday's row; the Sunday follows it
    sunday = int(np.searchsorted(market.split_rows, after + 1))
    assert market.previous_price[sunday] == frame["price"][int(after) - 1]
    # every policy prices exactly the open rows
    prices = simulate(market, lambda obs, mask: mask.argmax(axis=1))["prices"]
    assert prices.shape == (meta.n_rows,) and np.isfinite(prices).all()
    greedy = bl.greedy_prices(meta, demand, 11, truth["max_daily_change"])
    assert greedy.shape == (meta.n_rows,)
