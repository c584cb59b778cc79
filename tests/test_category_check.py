"""The checked uplift at category-wide moves (agent/calibration.py, docs/evaluate.md): the
cross-price term held inside the held-out range of the category price index, and the
cross-price term in the demand fit's shapes (agent/demand.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pricing_cli.agent import calibration
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.agent.checks import UNIT_SMOOTHING
from pricing_cli.agent.demand import DemandModel, cross_price_term, policy_expected_units

DAY = np.datetime64("2024-01-01")
LEVEL = 100.0  # units a day at the reference prices: the checked ratio's smoothing is ~0


def siblings(cross: float, elasticity: float = 2.0) -> DemandModel:
    """A and B in one category, references 1: log units = log 100 - e log p + cross x (the
    sibling's log price)."""
    return DemandModel(
        mean=np.array([math.log(LEVEL), 0.0, 0.0, elasticity]),
        category_offset=np.zeros((1, 4)), product_offset=np.zeros((2, 4)),
        product_category=np.array([0, 0]), dow_effect=np.zeros(7),
        elasticity_modifiers=np.zeros(3), reference_price=np.ones(2), cross_price=cross)


def held_out(price_a: list[float], price_b: list[float], units: np.ndarray | None = None
             ) -> SplitMeta:
    """Products A (0) and B (1) on the same days, cost 0.5, band [0.5, 3]."""
    days = len(price_a)
    index = np.repeat([0, 1], days)
    n = index.size
    return SplitMeta(index, np.where(index == 0, "A", "B").astype(object),
                     np.tile(DAY + np.arange(days), 2), np.array(price_a + price_b),
                     np.ones(n) if units is None else units, np.full(n, 0.5),
                     np.full(n, 0.5), np.full(n, 3.0),
                     first_day_mask=np.ones((2, 3), dtype=np.int8), prev_price=np.full(2, np.nan))


def test_cross_price_term_is_the_coefficient_times_the_siblings_log_price() -> None:
    model = siblings(1.5)
    term = cross_price_term(model, np.array([0, 1, 0, 1]), np.repeat(DAY + np.arange(2), 2),
                            np.array([1.0, 0.8, 1.2, 1.0]))
    # day 1: A sees B at 0.8, B sees A at 1; day 2: A sees B at 1, B sees A at 1.2
    np.testing.assert_allclose(term, [1.5 * math.log(0.8), 0.0, 0.0, 1.5 * math.log(1.2)])
    assert cross_price_term(siblings(0.0), np.array([0]), np.array([DAY]), np.ones(1)) == 0.0


def test_held_out_range_and_the_held_model_hand_computed() -> None:
    # Held out: B promoted to 0.8 on day 2, A never moves. A's index (B's log price) spans
    # [log 0.8, 0]; B's (A's log price) is 0 on every day.
    model = siblings(1.5)
    meta = held_out([1.0, 1.0, 1.0, 1.0], [1.0, 0.8, 1.0, 1.0])
    found = calibration.held_out_index_range(model, meta)
    assert found is not None
    low, high = found
    np.testing.assert_allclose(low, [math.log(0.8), 0.0])
    np.testing.assert_allclose(high, [0.0, 0.0])
    held = calibration.CrossPriceWithin(model, low, high)
    assert held.cross_price == 1.5 and held.n_products == 2  # the model's own attributes
    product, dates = np.array([0, 1, 0, 1]), np.repeat(DAY + np.arange(2), 2)
    # day 1: B raised to 1.5 (A's index log 1.5, held at 0); day 2: B cut to 0.7 (held at
    # log 0.8). A at 1 both days, so its units are 100 x exp(1.5 x held index).
    prices = np.array([1.0, 1.5, 1.0, 0.7])
    extrapolated = policy_expected_units(model, product, dates, prices)
    within = policy_expected_units(held, product, dates, prices)
    np.testing.assert_allclose(extrapolated[[0, 2]], [100 * 1.5 ** 1.5, 100 * 0.7 ** 1.5])
    np.testing.assert_allclose(within[[0, 2]], [100.0, 100 * 0.8 ** 1.5])
    # B's own units (its index, A's log price 0, is inside its range): 100 p ** -2 alike
    np.testing.assert_allclose(within[[1, 3]], extrapolated[[1, 3]])
    np.testing.assert_allclose(within[[1, 3]], [100 / 1.5 ** 2, 100 / 0.7 ** 2])
    assert calibration.held_out_index_range(siblings(0.0), meta) is None


def flat_slope(draws: int) -> calibration.ResponseSlope:
    """A held-out response slope of exactly 1 in every draw (the model's own response)."""
    return calibration.ResponseSlope(
        pooled=1.0, position_effect=0.0, pooled_draws=np.ones(draws),
        position_draws=np.zeros(draws), series=np.ones(2), series_draws=np.ones((draws, 2)),
        events=20, between_sd=0.0)


def test_a_category_wide_move_the_held_out_days_never_made_is_not_claimed() -> None:
    """History moved B between 0.8 and 1; inside that range A's units answer B's price as
    the model says (cross-elasticity 1.5), beyond it, in the truth, with half of it. The
    model's straight line credits A with B's raise to 1.5 in full (x 1.5 ** 1.5). The old
    check claims that (+42.5%, every draw alike) and misses the true +17.3%; the new one's
    interval runs from the held-range form (-1.0%, where the siblings' effect stops at the
    range) to the line, covers the truth, and includes 0: no claim."""
    model = siblings(1.5)
    history_a, history_b = [1.0, 1.0, 1.0, 1.0], [1.0, 0.8, 1.0, 1.0]
    probe = held_out(history_a, history_b)
    low, high = calibration.held_out_index_range(model, probe)  # type: ignore[misc]
    truth = calibration.CrossPriceWithin(model, low, high)
    realized = policy_expected_units(truth, probe.product_index, probe.date, probe.price)
    meta = held_out(history_a, history_b, realized)
    policy = np.array([1.0] * 4 + [1.5] * 4)
    prices = {"historical": meta.price, "agent": policy}

    def profits(name: str, p: np.ndarray, units: np.ndarray) -> np.ndarray:
        return np.bincount(meta.product_index, (p - meta.unit_cost) * units, 2)

    def uplift(units_policy: np.ndarray) -> float:
        return float(profits("", policy, units_policy).sum()
                     / profits("", meta.price, realized).sum() - 1) * 100

    def checked(m: object) -> np.ndarray:
        return calibration.checked_units(
            realized, policy_expected_units(m, meta.product_index, meta.date, policy),
            policy_expected_units(m, meta.product_index, meta.date, meta.price), 1.0)

    # the truth at the policy: A's index log 1.5 is beyond its range's top (0) by log 1.5,
    # answered with half the cross-elasticity
    true_at_policy = policy_expected_units(truth, meta.product_index, meta.date, policy)
    true_at_policy[:4] *= 1.5 ** 0.75
    true = uplift(true_at_policy)
    extrapolated, within = uplift(checked(model)), uplift(checked(truth))
    # A: 4 days at 1 selling 100 x 1.5 ** 1.5 (line) or 100 (held); B: 4 days at 1.5 selling
    # 100 / 2.25. History: A 300 + 100 x 0.8 ** 1.5, B 300 at 1 and 156.25 at 0.8.
    base = 0.5 * (300 + 100 * 0.8 ** 1.5) + 0.5 * 300 + 0.3 * 156.25
    assert true == pytest.approx(((0.5 * 400 * 1.5 ** 0.75 + 1.0 * 400 / 2.25) / base - 1)
                                 * 100)
    assert true == pytest.approx(17.3, abs=0.1)
    # the checked ratio is smoothed (+0.5 units on both sides): the held model is off the
    # truth by that smoothing only
    s = UNIT_SMOOTHING
    a_day2 = 100 * 0.8 ** 1.5 * (100 + s) / (100 * 0.8 ** 1.5 + s)
    b_units = (300 * (100 / 2.25 + s) / (100 + s)  # sold 100 a day at 1, 156.25 at 0.8
               + 156.25 * (100 / 2.25 + s) / (156.25 + s))
    expected_within = ((0.5 * (300 + a_day2) + 1.0 * b_units) / base - 1) * 100
    assert within == pytest.approx(expected_within)
    assert within == pytest.approx(-1.0, abs=0.1)
    line = 100 * 1.5 ** 1.5 + s  # A's model units at the policy (smoothed), every day
    a_line = 300 * line / (100 + s) + 100 * 0.8 ** 1.5 * line / (100 * 0.8 ** 1.5 + s)
    assert extrapolated == pytest.approx(((0.5 * a_line + 1.0 * b_units) / base - 1) * 100)
    assert extrapolated == pytest.approx(42.5, abs=0.1)

    draws = 40
    shapes = [calibration.ShapeCheck("fitted", [model], flat_slope(draws), np.zeros(2))]

    def units_under(m: object, p: np.ndarray) -> np.ndarray:  # as evaluate scores a policy
        return policy_expected_units(m, meta.product_index, meta.date, p)

    old, _ = calibration.shape_checked_uplift(meta, prices, shapes, 0,
                                              np.zeros(draws, dtype=np.int64), np.ones(8),
                                              profits, 0.9, units_under=units_under)
    assert old["agent"]["point"] == pytest.approx(extrapolated)
    assert old["agent"]["low"] == pytest.approx(extrapolated)
    assert old["agent"]["low"] > true  # the old interval misses the truth
    both, best, choice = calibration.with_cross_price_range(
        shapes, 0, np.zeros(draws, dtype=np.int64), low, high)
    assert [(s.name, s.held_range) for s in both] == [("fitted", False), ("fitted", True)]
    assert best == [0, 1] and np.bincount(choice).tolist() == [20, 20]
    new, per_product = calibration.shape_checked_uplift(meta, prices, both, best, choice,
                                                        np.ones(8), profits, 0.9,
                                                        units_under=units_under)
    agent = new["agent"]
    assert agent["low"] == pytest.approx(within) and agent["high"] == pytest.approx(extrapolated)
    assert agent["low"] <= true <= agent["high"] and agent["low"] < 0  # no claim
    assert agent["point"] == pytest.approx((within + extrapolated) / 2)
    assert agent["shapes"] == {"fitted": {"point": agent["point"], "share": 1.0}}
    assert agent["cross_price"] == {
        "extrapolated": {"point": pytest.approx(extrapolated), "share": 0.5},
        "held_out_range": {"point": pytest.approx(within), "share": 0.5}}
    # B's own uplift: its index never left its range, so both forms agree
    assert per_product["B"]["low"] == pytest.approx(per_product["B"]["high"])


def promoted_together(n_days: int = 240, per_category: int = 3, seed: int = 3) -> object:
    """Two categories whose products are promoted together half the time (a category-wide
    discount on top of each product's own price): log units = log 50 - 2.5 log r + 1.0 x (the
    siblings' mean log r), r = price / 10."""
    import polars as pl

    rng = np.random.default_rng(seed)
    n = 2 * per_category
    category = np.arange(n) // per_category
    common = np.log(rng.choice([0.75, 1.0, 1.0, 1.2], (2, n_days)))[category]
    log_r = common + np.log(rng.choice([0.85, 1.0, 1.15], (n, n_days)))
    dates = np.datetime64("2023-01-02", "D") + np.arange(n_days)
    frames = []
    for p in range(n):
        siblings = (category == category[p]) & (np.arange(n) != p)
        lam = 50.0 * np.exp(-2.5 * log_r[p] + 1.0 * log_r[siblings].mean(axis=0))
        frames.append(pl.DataFrame({
            "product_index": pl.Series([p] * n_days, dtype=pl.Int32),
            "product_id": [f"P{p:03d}"] * n_days, "date": dates,
            "split": ["train"] * n_days, "price": np.round(10.0 * np.exp(log_r[p]), 2),
            "units": rng.poisson(lam).astype(np.float64),
            "category": [f"c{category[p]}"] * n_days}))
    return pl.concat(frames)


def test_a_shape_is_fitted_with_the_siblings_part_of_its_level(monkeypatch) -> None:
    """Siblings promoted together: a logit shape fitted without the cross-price term takes
    part of the siblings' pull for its own price response (omitted-variable bias: elasticity
    2.05 against the loglog fit's 2.51, measured) and predicts the units, scored with the
    term as evaluate scores them, with twice the deviance; fitted with it: 2.78 and 1,866
    against 3,971."""
    from pricing_cli.agent import demand as dm
    from pricing_cli.agent.demand_shapes import deviance_by_product
    from pricing_cli.config import load_settings

    meta = promoted_together()
    settings = load_settings(preset="tiny", environ={}, flags={
        "train.demand_forms": ["logit"], "train.demand_events": {},
        "train.demand_year_harmonics": 0, "train.demand_control_lags": 0,
        "train.demand_control_leads": 0, "train.demand_reactive_prices": False,
        "train.demand_detect_capped": False})
    product = meta["product_index"].to_numpy()

    def judged(model: DemandModel) -> tuple[float, float, float]:
        """(loglog and logit elasticity at the reference, the logit's deviance)."""
        first = np.arange(6)
        dates = np.full(6, np.datetime64("2023-01-02"))
        units = policy_expected_units(model, product, meta["date"].to_numpy(),
                                      meta["price"].to_numpy())
        return (float(model.elasticity(first, dates, form="loglog").mean()),
                float(model.elasticity(first, dates, form="logit").mean()),
                float(deviance_by_product(units, meta["units"].to_numpy(), product, 6).sum()))

    model = DemandModel.fit(meta, settings)
    assert model.cross_price == pytest.approx(1.0, abs=0.15)
    loglog, logit, deviance = judged(model)
    assert loglog == pytest.approx(2.5, abs=0.2)
    assert logit == pytest.approx(loglog, rel=0.15)
    monkeypatch.setattr(dm, "cross_price_term", lambda *args: 0.0)  # the fit before stop 18
    _, biased, biased_deviance = judged(DemandModel.fit(meta, settings))
    assert biased < 0.85 * loglog
    assert deviance < 0.6 * biased_deviance
