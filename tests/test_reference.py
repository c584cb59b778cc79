"""The reference-price effect: its state, its fit and selection, and path-dependent policies."""

from __future__ import annotations

import numpy as np
import pytest

from pricing_cli.agent import reference
from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.reference import ReferenceEffect
from pricing_cli.config import Settings
from tests.demand_markets import reference_meta, synthetic_meta


@pytest.fixture(scope="module")
def reference_fit() -> DemandModel:
    meta, _ = reference_meta()
    return DemandModel.fit(meta, Settings())


def test_rolled_reference_is_the_ewma_of_earlier_prices() -> None:
    # Product 0: 10, 20, 20 at rate 0.5 -> 10 (its first price), 10, 15. Product 1 skips a
    # day: the unknown day counts at the last price (8): 4 -> 0.5*4 + 0.5*8 = 6 -> 7.
    product = np.array([1, 0, 0, 1, 0])
    dates = np.array(["2024-01-01", "2024-01-01", "2024-01-02", "2024-01-03", "2024-01-03"],
                     dtype="datetime64[D]")
    prices = np.array([8.0, 10.0, 20.0, 4.0, 20.0])
    ref = reference.rolled_reference(product, dates, prices, 0.5)
    np.testing.assert_allclose(ref, [8.0, 10.0, 10.0, 8.0, 15.0])
    ref = reference.rolled_reference(product, dates, prices, 0.5, start=np.array([12.0, 4.0]))
    np.testing.assert_allclose(ref, [4.0, 12.0, 11.0, 0.25 * 4.0 + 0.75 * 8.0, 15.5])
    assert reference.rate_of_half_life(7.0) == pytest.approx(1.0 - 0.5 ** (1 / 7))


def test_log_factor_charges_loss_above_and_gain_below() -> None:
    effect = ReferenceEffect(rate=0.1, loss=2.0, gain=0.5)
    factor = effect.log_factor(np.array([10.0, 10.0, 10.0]), np.array([10.0, 5.0, 20.0]))
    np.testing.assert_allclose(factor, [0.0, -2.0 * np.log(2.0), 0.5 * np.log(2.0)])
    assert effect.next_reference(10.0, 20.0) == pytest.approx(11.0)


def test_fit_recovers_loss_aversion_and_the_long_run_elasticity(reference_fit) -> None:
    # Truth: elasticity 2.0, loss 2.5, gain 1.0, rate 0.1 (half-life 6.6 days: 7 is nearest).
    effect = reference_fit.reference_effect
    assert effect is not None
    assert effect.half_life == pytest.approx(7.0)
    assert effect.loss == pytest.approx(2.5, abs=0.25)
    assert effect.gain == pytest.approx(1.0, abs=0.25)
    assert reference_fit.mean[3] == pytest.approx(2.0, abs=0.2)
    info = reference_fit.info["reference_prices"]
    assert info["chosen_half_life_days"] == 7.0
    seen = info["holdout_deviance_per_row"]
    assert seen["7"] < seen["none"] * (1 - reference.REFERENCE_MIN_GAIN)
    assert info["effect"]["loss"] == effect.loss


def test_memoryless_fit_reads_the_promotions_as_elasticity() -> None:
    # The same market without the term: the fit's elasticity is well above the true 2.0.
    meta, _ = reference_meta()
    settings = Settings.model_validate({"train": {"demand_reference_half_lives": [],
                                                  "demand_forms": ["loglog"]}})
    model = DemandModel.fit(meta, settings)
    assert model.reference_effect is None
    assert model.info["reference_prices"]["verdict"].startswith("off")
    assert model.mean[3] > 2.8


def test_no_effect_in_memoryless_data_drops_the_term() -> None:
    meta, _ = synthetic_meta("loglog")
    model = DemandModel.fit(meta, Settings.model_validate(
        {"train": {"demand_forms": ["loglog"]}}))
    assert model.reference_effect is None
    info = model.info["reference_prices"]
    assert info["chosen_half_life_days"] is None
    assert info["effect"] is None
    assert info["verdict"] == ("no reference-price effect: the term did not lower the held-out "
                               "deviance by 3.0%; it is left out")
    # Without an effect a given reference changes nothing.
    units = model.expected_units(np.array([0]), np.array(["2023-03-01"], "datetime64[D]"),
                                 np.array([20.0]))
    with_ref = model.expected_units(np.array([0]), np.array(["2023-03-01"], "datetime64[D]"),
                                    np.array([20.0]), reference=np.array([10.0]))
    np.testing.assert_allclose(with_ref, units)


def test_reference_effect_survives_save_and_load(reference_fit, tmp_path) -> None:
    reference_fit.save(tmp_path)
    loaded = DemandModel.load(tmp_path)
    assert loaded.reference_effect == reference_fit.reference_effect
    index = np.array([0, 1, 2])
    dates = np.array(["2023-05-01"] * 3, dtype="datetime64[D]")
    prices = reference_fit.reference_price[index] * np.array([0.8, 1.0, 1.2])
    ref = reference_fit.reference_price[index]
    np.testing.assert_allclose(loaded.expected_units(index, dates, prices, reference=ref),
                               reference_fit.expected_units(index, dates, prices, reference=ref))
    # The reference term: above the reference, units fall by exp(-loss * gap) on top.
    effect = reference_fit.reference_effect
    ratio = (reference_fit.expected_units(index, dates, prices, reference=ref)
             / reference_fit.expected_units(index, dates, prices))
    np.testing.assert_allclose(ratio, np.exp(effect.log_factor(prices, ref)))
    assert ratio[2] == pytest.approx(np.exp(-effect.loss * np.log(1.2)))


def test_half_lives_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half-lives must be > 0 days"):
        Settings.model_validate({"train": {"demand_reference_half_lives": [7, 0]}})


# -- path-dependent policies ------------------------------------------------------------------

class _ReferenceDemand:
    """Hand-made demand: units = level_p · (price / 10)^-elasticity · the reference factor."""

    def __init__(self, effect: ReferenceEffect, level: np.ndarray, elasticity: float) -> None:
        self.reference_effect = effect
        self.level = level
        self.elasticity = elasticity
        self.reference_price = np.full(len(level), 10.0)

    def expected_units(self, product_index, dates, prices, reference=None):
        units = self.level[np.asarray(product_index)] * (np.asarray(prices) / 10.0) ** (
            -self.elasticity)
        if reference is not None:
            units = units * np.exp(self.reference_effect.log_factor(prices, reference))
        return units


def _split(days: int, start_reference: list[float], prev_price: list[float],
           max_daily_change: float):
    """Series of ``days`` rows each, grid 8 / 10 / 12 (K = 3), unit cost 5."""
    from pricing_cli.agent.baselines import SplitMeta

    n = len(start_reference)
    product = np.repeat(np.arange(n), days)
    dates = np.tile(np.datetime64("2024-03-01") + np.arange(days), n)
    rows = n * days
    meta = SplitMeta(product, np.array([f"P{p}" for p in product], dtype=object), dates,
                     np.full(rows, 10.0), np.zeros(rows), np.full(rows, 5.0),
                     np.full(rows, 8.0), np.full(rows, 12.0),
                     first_day_mask=np.ones((n, 3), dtype=np.int8),
                     prev_price=np.asarray(prev_price, dtype=np.float64),
                     start_reference=np.asarray(start_reference, dtype=np.float64))
    return meta


def _path_profit(meta, demand, prices, change_cost=None) -> np.ndarray:
    """Per-series profit of ``prices`` with the reference rolled along them."""
    units = reference.units_along_path(demand, meta, prices)
    profit = (prices - meta.unit_cost) * units
    total = np.add.reduceat(profit, meta.series_start)
    if change_cost is not None:
        previous = np.r_[np.nan, prices[:-1]]
        previous[meta.series_start] = meta.prev_price
        moved = np.isfinite(previous) & (np.abs(prices - previous) > 1e-9)
        total -= np.add.reduceat(moved * change_cost[meta.product_index], meta.series_start)
    return total


def test_planner_raises_the_reference_greedy_stays_at_the_promotion_price() -> None:
    # Two days, reference = yesterday's price (rate 1), start reference 8 (after a
    # promotion), flat long-run demand 10 units, loss 3, gain 1, unit cost 5.
    # Day one at R = 8: 8 -> 30, 10 -> 50·1.25^-3 = 25.6, 12 -> 70·1.5^-3 = 20.74: greedy takes
    # 8 and then R stays 8: 30 + 30 = 60. The best path is 12, 12: 20.74 + 70 = 90.74
    # (10, 12: 25.6 + 70·1.2^-3 = 66.1; 12, 10: 20.74 + 50·1.2 = 80.74).
    from pricing_cli.agent.baselines import greedy_prices, planned_prices

    demand = _ReferenceDemand(ReferenceEffect(rate=1.0, loss=3.0, gain=1.0),
                              np.array([10.0]), 0.0)
    meta = _split(2, [8.0], [8.0], max_daily_change=1.0)
    greedy = greedy_prices(meta, demand, 3, 1.0)
    planner = planned_prices(meta, demand, 3, 1.0)
    np.testing.assert_allclose(greedy, [8.0, 8.0])
    np.testing.assert_allclose(planner, [12.0, 12.0])
    assert _path_profit(meta, demand, greedy)[0] == pytest.approx(60.0)
    assert _path_profit(meta, demand, planner)[0] == pytest.approx(70 / 1.5**3 + 70)


@pytest.mark.parametrize("change", [None, 4.0])
def test_planner_matches_brute_force_over_every_feasible_path(change) -> None:
    # Three days, rate 0.5, the 25% daily limit (8 -> 12 is not allowed), elasticity 0.5,
    # loss 3, gain 0.8; start references 8 and 12 on the grid: every reachable reference is
    # a multiple of 0.5 between 8 and 12, so on the planner's 41-point reference grid and the
    # DP is exact.
    import itertools

    from pricing_cli.agent.baselines import greedy_prices, planned_prices
    from pricing_cli.pricing import feasible_mask

    demand = _ReferenceDemand(ReferenceEffect(rate=0.5, loss=3.0, gain=0.8),
                              np.array([20.0, 30.0]), 0.5)
    meta = _split(3, [8.0, 12.0], [8.0, 12.0], max_daily_change=0.25)
    change_cost = None if change is None else np.array([change, change])
    planner = planned_prices(meta, demand, 3, 0.25, change_cost)
    greedy = greedy_prices(meta, demand, 3, 0.25, change_cost)
    got = _path_profit(meta, demand, planner, change_cost)
    best = np.full(2, -np.inf)
    grid = np.array([8.0, 10.0, 12.0])
    for path in itertools.product(grid, repeat=3):
        prices = np.array(path * 2)
        for s in range(2):
            previous = [meta.prev_price[s], *path[:-1]]
            if all(feasible_mask(grid, p, 0.25)[0][list(grid).index(x)]
                   for p, x in zip(previous, path, strict=True)):
                best[s] = max(best[s], _path_profit(meta, demand, prices, change_cost)[s])
    np.testing.assert_allclose(got, best, rtol=1e-9)
    # Myopic greedy is strictly worse on the series that starts low.
    assert _path_profit(meta, demand, greedy, change_cost)[0] < best[0] - 1.0


def test_fitted_scoring_rolls_the_reference_along_each_path() -> None:
    demand = _ReferenceDemand(ReferenceEffect(rate=0.5, loss=2.0, gain=1.0),
                              np.array([10.0]), 0.0)
    meta = _split(3, [8.0], [8.0], max_daily_change=1.0)
    prices = np.array([12.0, 12.0, 8.0])
    # References 8, 10, 11: units 10·1.5^-2, 10·1.2^-2, 10·(8/11)^-1.
    np.testing.assert_allclose(reference.series_references(meta, demand.reference_effect,
                                                           prices), [8.0, 10.0, 11.0])
    np.testing.assert_allclose(reference.units_along_path(demand, meta, prices),
                               [10 / 1.5**2, 10 / 1.2**2, 10 * 11 / 8])
