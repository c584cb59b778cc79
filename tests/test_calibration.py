"""The uplift checked against held-out price changes (agent/calibration.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pricing_cli.agent import calibration
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.agent.checks import PriceChangeEvents
from tests.support.checked_market import checked_market


def events(series: list[int], predicted: list[float], actual: list[float],
           calendar: list[float] | None = None) -> PriceChangeEvents:
    n = len(series)
    return PriceChangeEvents(
        series=np.asarray(series), row=np.arange(1, n + 1), price_ratio=np.ones(n),
        days_before=np.ones(n, dtype=np.int64), days_after=np.ones(n, dtype=np.int64),
        actual_log_ratio=np.asarray(actual, float),
        predicted_log_ratio=np.asarray(predicted, float),
        calendar_log_ratio=np.zeros(n) if calendar is None else np.asarray(calendar, float))


def test_pooled_slope_hand_computed() -> None:
    # Product 0 answers exactly as predicted, product 1 half as much:
    # s0 = sum(m a) / sum(m m) = (1 + 4 + 0.5) / (1 + 4 + 1) = 5.5 / 6.
    found = calibration.response_slope(events([0, 0, 1], [1.0, 2.0, 1.0], [1.0, 2.0, 0.5]),
                                       2, np.zeros(3), draws=50)
    assert found is not None
    assert found.pooled == pytest.approx(5.5 / 6)
    assert found.position_effect == 0.0  # every move at the reference price
    assert found.events == 3 and found.pooled_draws.shape == (50,)
    assert found.series_draws.shape == (50, 2)


def test_the_calendar_part_of_a_change_does_not_count_as_response() -> None:
    # Units answer price at 0.5x the model; the calendar adds 0.3 to predicted and actual alike.
    price_part = np.array([0.2, -0.1, 0.4, -0.3])
    found = calibration.response_slope(
        events([0, 0, 1, 1], list(price_part + 0.3), list(0.5 * price_part + 0.3),
               [0.3] * 4), 2, np.zeros(4), draws=20)
    assert found is not None and found.pooled == pytest.approx(0.5)
    assert found.between_sd == 0.0
    np.testing.assert_allclose(found.series, 0.5)
    ignored = calibration.response_slope(
        events([0, 0, 1, 1], list(price_part + 0.3), list(0.5 * price_part + 0.3)),
        2, np.zeros(4), draws=20)
    assert ignored is not None and ignored.pooled > 0.7  # without it, pulled toward 1


def test_position_effect_is_recovered() -> None:
    # a = (0.8 + 2 z) m: moves at high prices answer more than the model says.
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, 400)
    m = rng.choice([-0.3, 0.3], 400)
    found = calibration.response_slope(events(list(np.arange(400) % 20), list(m),
                                              list((0.8 + 2 * z) * m)), 20, z, draws=100)
    assert found is not None
    assert found.pooled == pytest.approx(0.8, abs=0.02)
    assert 1.9 < found.position_effect <= 2.0  # the ridge (1% of the evidence) shrinks it
    np.testing.assert_allclose(found.row_slope(np.array([0, 1]), np.array([0.0, 0.5])),
                               [found.series[0], found.series[1] + 0.5 * found.position_effect])
    assert calibration.response_slope(events([0], [0.0], [1.0]), 1, np.zeros(1)) is None


def test_checked_units_hand_computed() -> None:
    # ratios smoothed by 0.5 on both sides: (4.5/2.5), (5.5/1.5), (1.5/2.5), (2.5/1.5)
    units = calibration.checked_units(np.array([2.0, 0.0, 3.0, -1.0]),
                                      np.array([4.0, 5.0, 1.0, 2.0]),
                                      np.array([2.0, 1.0, 2.0, 1.0]), 0.5)
    np.testing.assert_allclose(units, [2 * 1.8 ** 0.5, 0.0, 3 * 0.6 ** 0.5, 0.0])
    # a model that puts the historical price at its choke price: 0.5 / 0.5 + 20, not 1e12
    assert calibration.checked_units(np.array([3.0]), np.array([20.0]), np.array([1e-12]),
                                     1.0)[0] == pytest.approx(3 * 20.5 / 0.5)


class PowerDemand:
    """q = 10 (p / 10) ** -2: elasticity 2 everywhere."""

    reference_price = np.array([10.0])

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return 10.0 * (np.asarray(prices) / 10.0) ** -2.0


def test_checked_uplift_hand_computed() -> None:
    """Sold 10 and 12 at 10 (cost 5); the policy charges 9. The model says units x 1/0.81, the
    held-out slope 0.5 takes its square root (of the smoothed ratio, about x 1.106): profit
    4 x 22 x 1.106 = 97.3 against 5 x 22 = 110, -11.5%, where the fitted model alone says
    4 x 22 / 0.81 = 108.6, -1.2%."""
    meta = SplitMeta(np.array([0, 0]), np.array(["A", "A"], dtype=object),
                     np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]"),
                     np.array([10.0, 10.0]), np.array([10.0, 12.0]), np.full(2, 5.0),
                     np.full(2, 5.0), np.full(2, 20.0), np.ones((1, 3), dtype=np.int8),
                     np.full(1, np.nan))
    slope = calibration.ResponseSlope(
        pooled=0.5, position_effect=0.0, pooled_draws=np.full(10, 0.5),
        position_draws=np.zeros(10), series=np.array([0.5]), series_draws=np.full((10, 1), 0.5),
        events=12, between_sd=0.0)

    def profits(name: str, prices: np.ndarray, units: np.ndarray) -> np.ndarray:
        return np.array([((prices - meta.unit_cost) * units).sum()])

    overall, per_product = calibration.checked_uplift(
        meta, {"historical": meta.price, "agent": np.full(2, 9.0)}, [PowerDemand()], slope,
        np.full(2, 10.0), profits, 0.9)
    # the model's ratio, smoothed as the held-out changes are: (10 / 0.81 + 0.5) / (10 + 0.5)
    expected = (4 * 22 * ((10 / 0.81 + 0.5) / 10.5) ** 0.5 / 110 - 1) * 100  # -11.5%
    assert overall["agent"]["point"] == pytest.approx(expected)
    assert overall["agent"]["low"] == pytest.approx(expected)  # every draw agrees
    assert overall["historical"]["point"] == 0.0
    assert per_product["A"]["point"] == pytest.approx(expected)
    assert overall["agent"]["fitted_point"] == pytest.approx((4 * 22 / 0.81 / 110 - 1) * 100)


def test_checked_interval_covers_the_truth_where_the_fitted_one_claims_too_much(
        tmp_path: Path) -> None:
    """The test split answers price with 0.4x the elasticity the model was fitted on: the
    fitted model's interval misses the true uplift, the checked one covers it."""
    verdict, found = checked_market(tmp_path, test_elasticity_factor=0.4, n_products=20)
    fitted, checked, true = found["fitted_interval"], found["interval"], found["true_uplift"]
    # Measured: true +33.1%; fitted +23.3% (+22.7 to +24.1); checked +31.7% (+28.4 to +35.0);
    # held-out slope 0.42.
    assert not fitted["low"] <= true <= fitted["high"]
    assert checked["low"] <= true <= checked["high"]
    assert 0.3 < found["slope"].pooled < 0.55
    assert verdict["status"] == "not_reliable"  # the level check fails too (bias +40%)


def test_a_not_reliable_verdict_claims_no_uplift_against_the_truth():
    from pricing_cli.agent.evaluate import truth_coverage

    interval = {"point": 7.6, "low": 5.1, "high": 10.9}
    claimed = truth_coverage(-2.7, None, None, interval, None, None, claimed=True)
    refused = truth_coverage(-2.7, None, None, interval, None, None, claimed=False)
    assert claimed["claimed_uplift_where_true_is_not_positive"] is True
    assert refused["claimed_uplift_where_true_is_not_positive"] is False
    assert claimed["interval_covers_true_uplift"] is refused["interval_covers_true_uplift"] is False
    assert truth_coverage(6.0, None, None, interval, None, None)[
        "claimed_uplift_where_true_is_not_positive"] is False
