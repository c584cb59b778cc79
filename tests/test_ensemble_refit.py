"""Bootstrap members that keep the point fit's selections (train.ensemble_refit: estimates)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent import demand as demand_module
from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.ensemble import bootstrap_product_weeks, fit_ensemble
from pricing_cli.config import Settings
from tests.demand_markets import reference_meta, synthetic_meta


def _settings(**train: object) -> Settings:
    return Settings.model_validate({"train": train})


def _count_base_fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = demand_module._fit_base

    def counting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demand_module, "_fit_base", counting)
    return calls


def test_refit_on_the_same_rows_lands_on_the_point_fit() -> None:
    # No controls, no capped days: the point fit's last step is a fit of these rows with its
    # shapes, so refitting the estimates from it must return the same optimum.
    meta, _ = synthetic_meta("linear", n_products=8, n_days=200, seed=4)
    settings = _settings(demand_control_lags=0, demand_control_leads=0,
                         demand_detect_capped=False, demand_reference_half_lives=[])
    point = DemandModel.fit(meta, settings)
    refit = DemandModel.fit(meta, settings, selections=point)
    np.testing.assert_array_equal(refit.product_form, point.product_form)
    np.testing.assert_allclose(refit.product_parameters(), point.product_parameters(),
                               rtol=1e-5, atol=1e-6)
    # The shapes' own solver stops at a looser tolerance: compare what they predict.
    product = meta["product_index"].to_numpy()
    dates = meta["date"].to_numpy().astype("datetime64[D]")
    price = meta["price"].to_numpy()
    np.testing.assert_allclose(refit.expected_units(product, dates, price),
                               point.expected_units(product, dates, price), rtol=5e-3)


def test_members_keep_the_selections_and_fit_once(monkeypatch: pytest.MonkeyPatch) -> None:
    meta, truth = reference_meta(n_products=6, n_days=240)
    settings = Settings()
    calls = _count_base_fits(monkeypatch)
    point = DemandModel.fit(meta, settings)
    full_fits = calls[0]
    assert point.reference_effect is not None
    resample = bootstrap_product_weeks(meta, np.random.default_rng(0))
    calls[0] = 0
    member = DemandModel.fit(resample, settings, selections=point)
    # One base fit (with the controls) instead of the reference trials, the shape trial, the
    # final fit and its control round.
    assert calls[0] == 1
    assert full_fits >= 8
    assert member.reference_effect is not None
    assert member.reference_effect.rate == point.reference_effect.rate
    np.testing.assert_array_equal(member.product_form, point.product_form)
    assert member.info["reference_prices"]["verdict"] == "kept from the point fit"
    # The estimates did move: the member is a refit of the resample, not a copy.
    assert not np.allclose(member.product_parameters(), point.product_parameters())


def test_fit_ensemble_refits_by_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    meta, _ = synthetic_meta("loglog", n_products=4, n_days=150, seed=1)
    meta = meta.with_columns(pl.col("product_index").cast(pl.Int32))
    settings = _settings(ensemble_size=3, ensemble_refit="estimates")
    point = DemandModel.fit(meta, settings)
    calls = _count_base_fits(monkeypatch)
    ensemble = fit_ensemble(meta, settings, n_products=4, point=point)
    assert ensemble is not None and ensemble.info["refit"] == "estimates"
    assert calls[0] == 3
    calls[0] = 0
    # The default repeats every selection per member.
    full = fit_ensemble(meta, _settings(ensemble_size=3), n_products=4, point=point)
    assert full is not None and full.info["refit"] == "full"
    assert calls[0] > 3 * 3
    # Same seed, same resamples: the two ensembles' first members differ only by the refit.
    assert ensemble.members[0].product_form.tolist() == point.product_form.tolist()
