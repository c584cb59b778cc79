"""The demand fit on generator markets whose prices react to demand, and holiday ramps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent.demand import DemandModel, event_indicators, reactive_price_weights
from pricing_cli.config import load_settings
from pricing_cli.data import generate, market

# One shape and no calendar beyond weekday and season: the fits stay about a second.
LOGLOG_ONLY = {"train.demand_forms": ["loglog"], "train.demand_year_harmonics": 0,
               "train.demand_cross_price": False, "train.demand_detect_capped": False}


def generator_market(scenario: str, n_products: int, n_days: int, tmp_path: Path,
                     **train: object) -> tuple[Any, market.GroundTruth, pl.DataFrame]:
    """(settings, truth, meta): every product-day of a generated scenario market, units drawn
    Poisson from the true demand at the historical prices (no transactions written)."""
    flags = {"generate.n_products": n_products, "generate.n_days": n_days,
             "generate.n_categories": 3, f"generate.scenario.{scenario}": True,
             **LOGLOG_ONLY, **{f"train.{k}": v for k, v in train.items()}}
    settings = load_settings(preset="small", flags=flags, environ={})
    cfg = settings.generate
    truth, prices = generate.scenario_market(generate.draw_market(cfg), cfg, tmp_path)
    index, dates = generate.all_product_days(truth, cfg)
    lam = market.true_units(truth, index, dates, prices.reshape(-1))
    units = np.random.default_rng(7).poisson(lam).astype(np.float64)
    meta = pl.DataFrame({"product_index": index, "date": dates, "price": prices.reshape(-1),
                         "units": units, "category": np.asarray(truth.category)[index]})
    return settings, truth, meta


def refit(meta: pl.DataFrame, settings: Any, **train: object) -> DemandModel:
    """The fit with some train settings changed."""
    changed = settings.model_copy(update={"train": settings.train.model_copy(update=train)})
    return DemandModel.fit(meta, changed)


def test_reactive_prices_no_longer_halve_the_elasticity(tmp_path: Path) -> None:
    """The price_endogeneity market (AR(1) shock, rho 0.7, sd 0.4; the pricer cuts 20% on
    weak days and adds 10% on strong ones, seeing the shock with correlation 0.9), 16
    products x 1 year. The old estimator (every day at full weight, past controls only) finds
    0.62 of the true mean elasticity; down-weighting the short price moves and the two-sided
    control function bring it to 0.95 (within 10%), and every product within 25% (measured
    0.19)."""
    settings, truth, meta = generator_market("price_endogeneity", 16, 365, tmp_path)
    true_e = truth.elasticity
    old = refit(meta, settings, demand_reactive_prices=False, demand_control_leads=0)
    assert old.product_parameters()[:, 3].mean() / true_e.mean() < 0.7
    model = DemandModel.fit(meta, settings)
    fitted = model.product_parameters()[:, 3]
    assert fitted.mean() / true_e.mean() == pytest.approx(1.0, abs=0.1)
    assert np.abs(fitted / true_e - 1.0).max() < 0.25
    assert model.info["reactive_prices"]["products"] == 16
    assert model.info["calendar"]["control_leads"] == 2


def test_planned_promotions_keep_their_weight(tmp_path: Path) -> None:
    """Without reactions (the holidays market's base prices: 3-7 day promotions, rare list
    changes) at most one product of 16 is judged reactive (measured: 1, by its 3-day
    promotions), so under 0.5% of the days lose weight."""
    _, _, meta = generator_market("holidays", 16, 365, tmp_path)
    weight, info = reactive_price_weights(meta["product_index"].to_numpy(),
                                          meta["date"].to_numpy().astype("datetime64[D]"),
                                          meta["price"].to_numpy())
    assert info["products"] <= 1
    assert info["rows_down_weighted"] == int((weight < 1).sum()) < 0.005 * len(meta)


def test_reactive_price_weights_by_hand() -> None:
    """200 days at 10.00 with a 1-day cut to 8.00 every 5th day and a 5-day cut to 7.50 on
    days 100-104: the 1-day cuts (40 of 46 off days are in spells under 4 days) and a 2-day
    rise to 11.00 get the small weight; the 5-day cut and the regular days keep 1."""
    price = np.full(200, 10.0)
    price[3::5] = 8.0
    price[100:105] = 7.5
    price[150:152] = 11.0
    dates = np.datetime64("2024-01-01") + np.arange(200)
    weight, info = reactive_price_weights(np.zeros(200, dtype=np.int64), dates, price)
    short_cuts = (price == 8.0)
    assert weight[short_cuts].tolist() == [0.02] * int(short_cuts.sum())
    assert weight[150:152].tolist() == [0.02, 0.02]
    assert weight[100:105].tolist() == [1.0] * 5
    assert weight[price == 10.0].tolist() == [1.0] * int((price == 10.0).sum())
    assert info == {"products": 1, "rows_down_weighted": int(short_cuts.sum()) + 2,
                    "weight": 0.02}


def test_a_ramp_window_by_hand() -> None:
    days = np.array(["2023-10-31", "2023-11-01", "2023-11-27", "2023-12-24", "2023-12-25",
                     "2024-01-02"], dtype="datetime64[D]")
    events = {"run_up": ["11-01", "12-24", "ramp"], "flat": ["11-22", "11-30"],
              "new_year": ["12-25", "01-04", "ramp"]}
    np.testing.assert_allclose(event_indicators(days, events), [
        [0, 0, 0], [0, 0, 0], [26 / 53, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 8 / 10]])


def test_the_holiday_ramp_in_the_elasticity_is_recovered(tmp_path: Path) -> None:
    """The holidays market, 16 products x 2 years: the truth's elasticity rises by 35% of
    the product's own from 0 on Nov 1 to Christmas Eve (plus 10% in Black Friday week). The
    default ramp window recovers the Christmas Eve shift within 0.25 of the truth's mean
    (0.35 x the mean elasticity), so the fitted elasticity on Dec 20 exceeds Oct 20's by
    about that much; the flat December window of before found no ramp in November."""
    settings, truth, meta = generator_market("holidays", 16, 730, tmp_path)
    model = DemandModel.fit(meta, settings)
    shift = model.info["calendar"]["event_elasticity"]["christmas_run_up"]
    true_shift = 0.35 * float(truth.elasticity.mean())
    assert shift == pytest.approx(true_shift, abs=0.25)
    products = np.arange(16)
    oct20, nov15, dec20 = (model.elasticity(products, np.full(16, np.datetime64(d)))
                           for d in ("2024-10-20", "2024-11-15", "2024-12-20"))
    rise = float((dec20 - oct20).mean())
    assert rise == pytest.approx(0.35 * (50 / 53) * float(truth.elasticity.mean()), abs=0.3)
    assert float((nov15 - oct20).mean()) > 0.2  # the ramp has started by mid-November


def test_a_resample_that_repeats_a_week_is_judged_like_the_original() -> None:
    """Days given twice (a bootstrap draws a week twice) get the weight of the day itself."""
    price = np.full(200, 10.0)
    price[3::5] = 8.0
    price[100:105] = 7.5
    dates = np.datetime64("2024-01-01") + np.arange(200)
    once, _ = reactive_price_weights(np.zeros(200, dtype=np.int64), dates, price)
    twice = np.sort(np.concatenate([np.arange(200), np.arange(98, 112)]))
    weight, info = reactive_price_weights(np.zeros(len(twice), dtype=np.int64), dates[twice],
                                          price[twice])
    assert weight.tolist() == once[twice].tolist()
    assert info["rows_down_weighted"] == int((once[twice] < 1).sum())
