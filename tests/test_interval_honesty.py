"""The checked uplift's interval across demand shapes (agent/calibration.py): a claim of uplift
needs an interval that covers the truth where the fitted shape extrapolates wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent import calibration, checks
from pricing_cli.agent import evaluate as ev
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.agent.demand import DemandModel
from pricing_cli.config import load_settings
from tests.demand_markets import DOW, synthetic_meta, true_response


def test_shape_choice_hand_computed() -> None:
    # Two products; shape 0 fits product 0 perfectly and product 1 badly, shape 1 the reverse
    # but less badly. Over all products shape 1 wins (5 < 10). A resample of two products is
    # {0, 0} with probability 1/4 (shape 0: 0 vs 10), {0, 1} with 1/2 (10 vs 5: shape 1) and
    # {1, 1} with 1/4 (20 vs 0: shape 1): shape 0 in a quarter of the draws.
    best, choice = calibration.shape_choice(np.array([[0.0, 10.0], [5.0, 0.0]]), 4000, 3)
    assert best == 1
    assert choice.shape == (4000,)
    assert np.mean(choice == 0) == pytest.approx(0.25, abs=0.025)
    # A shape worse on every product is never drawn; one shape is drawn always.
    best, choice = calibration.shape_choice(np.array([[4.0, 4.0], [1.0, 2.0]]), 100, 0)
    assert best == 1 and np.all(choice == 1)
    assert np.all(calibration.shape_choice(np.array([[3.0, 1.0]]), 10, 0)[1] == 0)


class Power:
    """q = 10 (p / 10) ** -e."""

    reference_price = np.array([10.0])

    def __init__(self, elasticity: float) -> None:
        self.e = elasticity

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return 10.0 * (np.asarray(prices) / 10.0) ** -self.e


def constant_slope(value: float, draws: int = 400) -> calibration.ResponseSlope:
    return calibration.ResponseSlope(
        pooled=value, position_effect=0.0, pooled_draws=np.full(draws, value),
        position_draws=np.zeros(draws), series=np.array([value]),
        series_draws=np.full((draws, 1), value), events=12, between_sd=0.0)


def test_interval_across_two_shapes_hand_computed() -> None:
    """Sold 10 and 12 at 10 (cost 5), the policy charges 12. Shape "fitted" (elasticity 2,
    slope 1) and shape "flat" (elasticity 1, slope 1) each have draws that all agree, and each
    takes half the draws: the 90% interval runs from one shape's uplift to the other's, and
    the point is the best shape's."""
    meta = SplitMeta(np.array([0, 0]), np.array(["A", "A"], dtype=object),
                     np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]"),
                     np.array([10.0, 10.0]), np.array([10.0, 12.0]), np.full(2, 5.0),
                     np.full(2, 5.0), np.full(2, 20.0), np.ones((1, 3), dtype=np.int8),
                     np.full(1, np.nan))

    def profits(name: str, prices: np.ndarray, units: np.ndarray) -> np.ndarray:
        return np.array([((prices - meta.unit_cost) * units).sum()])

    shapes = [calibration.ShapeCheck("fitted", [Power(2.0)], constant_slope(1.0), np.zeros(1)),
              calibration.ShapeCheck("flat", [Power(1.0)], constant_slope(1.0), np.zeros(1))]
    choice = np.arange(400) % 2
    overall, per_product = calibration.shape_checked_uplift(
        meta, {"historical": meta.price, "agent": np.full(2, 12.0)}, shapes, 1, choice,
        np.full(2, 10.0), profits, 0.9)
    # units 22 x the smoothed ratio (10 (1/1.2)^e + 0.5) / 10.5; profit 7 x units vs 5 x 22
    steep = (7 * 22 * (10 / 1.44 + 0.5) / 10.5 / 110 - 1) * 100  # +3.7%
    flat = (7 * 22 * (10 / 1.2 + 0.5) / 10.5 / 110 - 1) * 100  # +17.8%
    agent = overall["agent"]
    assert agent["point"] == pytest.approx(flat) and agent["shape"] == "flat"
    assert agent["low"] == pytest.approx(steep) and agent["high"] == pytest.approx(flat)
    assert agent["shapes"] == {"fitted": {"point": pytest.approx(steep), "share": 0.5},
                               "flat": {"point": pytest.approx(flat), "share": 0.5}}
    assert agent["fitted_point"] == pytest.approx((7 * 22 / 1.44 / 110 - 1) * 100)
    assert per_product["A"]["low"] == pytest.approx(steep)
    # One shape: the interval of that shape alone (every draw agrees: a point).
    single, _ = calibration.checked_uplift(
        meta, {"historical": meta.price, "agent": np.full(2, 12.0)}, [Power(2.0)],
        constant_slope(1.0), np.full(2, 10.0), profits, 0.9)
    assert single["agent"]["low"] == single["agent"]["high"] == pytest.approx(steep)


# ----------------------------------------------------------------------------------------------
# A market whose constant-elasticity fit extrapolates wrong

TRAIN_DAYS, TEST_DAYS = 240, 91


def linear_market() -> tuple[pl.DataFrame, SplitMeta, dict[str, Any]]:
    """Linear demand with a choke price (slopes 1.2-2.2), history priced at 0.7-1.3x the
    list price: train on the first 240 days, the last 91 are the evaluated split."""
    frame, truth = synthetic_meta("linear", n_products=12, n_days=TRAIN_DAYS + TEST_DAYS,
                                  seed=3)
    first_test = frame["date"].min() + pl.duration(days=TRAIN_DAYS)
    train = frame.filter(pl.col("date") < first_test)
    test = frame.filter(pl.col("date") >= first_test).sort("product_index", "date")
    n = test.height
    meta = SplitMeta(test["product_index"].to_numpy().astype(np.int64),
                     test["product_id"].to_numpy().astype(object),
                     test["date"].to_numpy().astype("datetime64[D]"),
                     test["price"].to_numpy().astype(np.float64),
                     test["units"].to_numpy().astype(np.float64),
                     test["unit_cost"].to_numpy(), test["min_price"].to_numpy(),
                     test["max_price"].to_numpy(), np.ones((12, 3), dtype=np.int8),
                     np.full(12, np.nan))
    assert meta.n_rows == n
    return train, meta, truth


def true_units(meta: SplitMeta, truth: dict[str, Any], prices: np.ndarray) -> np.ndarray:
    p = meta.product_index
    dow = (meta.date.astype(np.int64) + 3) % 7
    return (truth["base"][p] * np.exp(DOW[dow])
            * true_response("linear", prices / truth["list_price"][p], truth["slope"][p]))


def test_shape_ensemble_covers_a_linear_market_the_loglog_check_misses() -> None:
    """The run chose constant elasticity (train.demand_forms [loglog]); the policy prices
    every product at 1.3x its list price, the top of history's range, where the linear
    truth sells far less than the loglog curve says. The loglog check alone misses the true
    uplift; with every shape refitted on the train rows and weighed by the split's own
    units, the interval covers it.

    Measured (this market, seed 3): true -13.0%; loglog check -1.5% (-3.0 to +0.2); across
    shapes -13.1% (-14.7 to -11.4), the linear shape in every draw. Over seeds 1-6 of the
    same market the shapes' interval covered 4 of 6 (missed: seed 1, true -11.2% against
    -9.9 to -6.3; seed 4, -16.7% against -16.66 to -12.2), the loglog check's none."""
    settings = load_settings(preset="tiny", flags={"train.demand_forms": ["loglog"]},
                             environ={})
    train, meta, truth = linear_market()
    point = DemandModel.fit(train, settings)
    policies = {"agent": np.round(1.3 * truth["list_price"][meta.product_index], 2),
                "historical": meta.price}
    at_historical = point.expected_units(meta.product_index, meta.date, meta.price)
    events = checks.price_change_events(
        meta, at_historical, 7,
        point.expected_units(meta.product_index, meta.date, checks.prices_held(meta)))
    true = ev.score_policies(meta, policies, lambda prices: true_units(meta, truth, prices))
    truth_uplift = true["agent"]["uplift_pct"]

    _, old, _ = ev.checked_uplifts(meta, policies, point, None, None, events, 0.9, 0)
    _, new, _ = ev.checked_uplifts(
        meta, policies, point, None, None, events, 0.9, 0,
        lambda: calibration.with_every_shape(point, train, settings.train.demand_shrinkage,
                                             settings.train.demand_detect_capped, 8))
    assert not old["agent"]["low"] <= truth_uplift <= old["agent"]["high"]
    assert new["agent"]["low"] <= truth_uplift <= new["agent"]["high"]
    assert new["agent"]["shape"] == "linear" and new["agent"]["shapes"]["linear"]["share"] > 0.9
    assert new["agent"]["high"] - new["agent"]["low"] < 5  # measured 3.3 points
    assert new["agent"]["fitted_point"] == old["agent"]["fitted_point"]  # the run's own model
