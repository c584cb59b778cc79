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
                               "deviance by 0.3%; it is left out")
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
