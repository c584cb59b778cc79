"""Sales capped by stock where demand is high (promotions): the fit and evaluate's verdict."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent import checks
from pricing_cli.agent import demand as dm
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.agent.demand import DemandModel
from pricing_cli.config import load_settings

# The 13-parameter core and one shape (fast); the capped-day detection on unless a test
# turns it off.
FIT: dict[str, object] = {"demand_forms": ["loglog"], "demand_events": {},
                          "demand_year_harmonics": 0, "demand_control_lags": 0,
                          "demand_control_leads": 0, "demand_cross_price": False,
                          "demand_reactive_prices": False,
                          "demand_reference_half_lives": []}
MONDAY = np.datetime64("2023-01-02")


def settings(**train: object) -> Any:
    flags = {f"train.{k}": v for k, v in {**FIT, **train}.items()}
    return load_settings(preset="tiny", flags=flags, environ={})


def promoted_market(*, stocked: bool, n_products: int = 8, n_days: int = 360, seed: int = 6
                    ) -> tuple[pl.DataFrame, np.ndarray]:
    """A retailer's history: list prices that move ±10% about every 60 days, 5-day promotions
    (10-30% off) about every 30 days, units ~ Poisson(base · (price / list0) ** -e). With
    ``stocked`` the stock is planned for the day's demand at the list price (times a
    lognormal(0, 0.1) supply factor, plus 1.5 standard deviations), as the generator's
    stockouts scenario does, so it binds on most promotion days; the stock goes to column
    ``on_hand`` (drop it for a fit without stock data).

    Returns:
        (meta, true elasticity per product).
    """
    rng = np.random.default_rng(seed)
    elasticity = rng.uniform(2.0, 3.0, n_products)
    base = rng.uniform(15.0, 40.0, n_products)
    list0 = rng.uniform(5.0, 20.0, n_products)
    dates = MONDAY + np.arange(n_days)
    frames = []
    for p in range(n_products):
        list_price = np.empty(n_days)
        level = list0[p]
        promo_left, discount = 0, 0.0
        price = np.empty(n_days)
        for t in range(n_days):
            if rng.random() < 1 / 60:
                level = round(level * rng.uniform(0.9, 1.1), 2)
            if promo_left == 0 and rng.random() < 1 / 30:
                promo_left, discount = 5, rng.uniform(0.1, 0.3)
            list_price[t] = level
            price[t] = round(level * (1 - discount), 2) if promo_left else level
            promo_left = max(promo_left - 1, 0)
            if promo_left == 0:
                discount = 0.0
        lam = base[p] * (price / list0[p]) ** -elasticity[p]
        units = rng.poisson(lam).astype(np.float64)
        plan = base[p] * (list_price / list0[p]) ** -elasticity[p]
        stock = np.floor(plan * rng.lognormal(0.0, 0.1, n_days) + 1.5 * np.sqrt(plan))
        if stocked:
            units = np.minimum(units, stock)
        frames.append(pl.DataFrame({
            "product_index": pl.Series([p] * n_days, dtype=pl.Int32), "date": dates,
            "price": price, "units": units, "on_hand": stock,
            "category": [f"c{p % 2}"] * n_days}))
    return pl.concat(frames), elasticity


def elasticity_ratio(model: DemandModel, truth: np.ndarray) -> float:
    """Mean over products of fitted / true elasticity."""
    n = len(truth)
    return float((model.elasticity(np.arange(n), np.full(n, MONDAY)) / truth).mean())


def test_capped_promotion_sales_without_stock_data_are_found_and_left_out() -> None:
    """Stock planned for list-price demand binds on 21% of days, most promotion days: read as
    demand, the promotions look flat and the fit finds 0.61 of the true elasticity (the
    pile-up and zero-after rules find 3 days: the stock varies by day). The low-price days
    are under-dispersed around that fit (pooled Pearson 0.64; Poisson sales give 1), so those
    of 7 of the 8 products are left out and the elasticity comes from the list-price moves:
    within 5% of the truth."""
    meta, truth = promoted_market(stocked=True)
    on_hand = meta["on_hand"].to_numpy()
    units = meta["units"].to_numpy()
    assert float((units >= on_hand).mean()) == pytest.approx(0.21, abs=0.005)
    meta = meta.drop("on_hand")
    naive = DemandModel.fit(meta, settings(demand_detect_capped=False))
    assert elasticity_ratio(naive, truth) < 0.65
    fitted = DemandModel.fit(meta, settings())
    assert abs(elasticity_ratio(fitted, truth) - 1.0) < 0.05
    censoring = fitted.info["censoring"]
    assert censoring["detected_capped_days"]["pile_up_at_max"] == 3
    low = censoring["low_price_days"]
    assert low["products"] == 7 and low["pooled_dispersion"] < dm.CAPPED_MARKET_DISPERSION
    assert sorted(low["per_product"]) == ["1", "2", "3", "4", "5", "6", "7"]
    assert all(e["dispersion"] < dm.CAPPED_PRODUCT_DISPERSION
               for e in low["per_product"].values())
    assert low["rows_left_out"] == sum(e["low_price_days"] for e in low["per_product"].values())
    # The band the fit saw uncapped sales in: up to the product's highest list price.
    second = meta.filter(pl.col("product_index") == 1)
    assert low["per_product"]["1"]["kept_price_range"][1] == second["price"].max()


def test_with_stock_data_the_censored_fit_recovers_the_elasticity() -> None:
    """With the stock file the sold-out days are known. Left out, they take the promotion days
    whose demand drew high with them: the promotions look flat (naive: 0.88 of the truth).
    As lower bounds (the censored term P(units >= sales), train.demand_censored) every day
    stays in: within 3% of the truth on average and 6.5% per product (leaving out all the
    low-price days, the stop-17 rule, also lands within 3% on average but 8.6% per product:
    it measures the response from the list-price moves alone)."""
    meta, truth = promoted_market(stocked=True)

    def per_product_error(model: DemandModel) -> float:
        n = len(truth)
        return float(np.abs(model.elasticity(np.arange(n), np.full(n, MONDAY)) / truth
                            - 1.0).mean())

    naive = DemandModel.fit(meta, settings(demand_detect_capped=False, demand_censored=False))
    assert elasticity_ratio(naive, truth) < 0.9
    assert naive.info["censoring"]["stocked_out_days_left_out"] == int(
        (meta["units"] >= meta["on_hand"]).sum())
    censored = DemandModel.fit(meta, settings(demand_censored=True))
    assert abs(elasticity_ratio(censored, truth) - 1.0) < 0.03
    assert censored.info["censoring"]["censored_rows"] == int(
        ((meta["units"] >= meta["on_hand"]) & (meta["units"] > 0)).sum())
    left_out = DemandModel.fit(meta, settings())
    assert abs(elasticity_ratio(left_out, truth) - 1.0) < 0.03
    assert per_product_error(censored) < 0.07 < per_product_error(left_out)
    low = censored.info["censoring"]["low_price_days"]
    assert low["products"] == 8 and low["pooled_dispersion"] is None and low["censored"]
    assert all(e["stocked_out_share"] >= dm.CAPPED_LOW_SHARE for e in low["per_product"].values())


def test_the_poisson_tail_matches_brute_force() -> None:
    """log P(Y >= y) and h = P(Y = y - 1) / P(Y >= y) against sums of the pmf, on both
    series branches (y above and below the mean), far tails and y = 0."""
    import math

    y = np.array([0, 1, 3, 5, 10, 10, 40, 200, 200, 3])
    lam = np.array([2.0, 0.5, 3.0, 20.0, 2.0, 30.0, 40.0, 180.0, 230.0, 1e-3])
    log_tail, h = dm.poisson_upper_tail(y, lam)
    for k, (count, mean) in enumerate(zip(y.tolist(), lam.tolist(), strict=True)):
        pmf = np.exp([j * math.log(mean) - mean - math.lgamma(j + 1.0) for j in range(2000)])
        tail = pmf[count:].sum()
        assert log_tail[k] == pytest.approx(math.log(tail), rel=1e-9, abs=1e-12)
        assert h[k] == pytest.approx(pmf[count - 1] / tail if count else 0.0, rel=1e-9)


def test_the_fit_and_the_shape_refits_weight_rows_alike(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """calibration.with_every_shape refits the linear and logit shapes with the weights the
    fit gave them (demand.model_row_weights): the low-price leave-out of the capped products
    included (the gap found in review at stop 17), the same array in both."""
    from pricing_cli.agent import calibration
    from pricing_cli.agent import demand_shapes as shapes

    meta, _ = promoted_market(stocked=True, n_products=4, n_days=200)
    meta = meta.drop("on_hand")
    seen: list[np.ndarray] = []
    real_fit_shape = shapes.fit_shape

    def spy(form: str, rows: Any, start: np.ndarray, strength: float) -> np.ndarray:
        seen.append(np.asarray(rows.weight).copy())
        return real_fit_shape(form, rows, start, strength)

    monkeypatch.setattr(shapes, "fit_shape", spy)
    model = DemandModel.fit(meta, settings(demand_forms=["linear"]))
    fit_weights = seen[-1]
    low = model.info["censoring"]["low_price_days"]
    assert low["products"] >= 1
    # By hand: the capped products' low-price days weigh 0, the days that look capped
    # CAPPED_WEIGHT, every other day 1.
    product = meta["product_index"].to_numpy().astype(np.int64)
    dates = meta["date"].to_numpy().astype("datetime64[D]")
    price = meta["price"].to_numpy()
    units = meta["units"].to_numpy()
    capped = np.isin(product, [int(k) for k in low["per_product"]])
    expected, _, _ = dm.capped_day_weights(product, dates, units, None, detect=True)
    expected[capped & dm.low_price_rows(product, dates, price)] = 0.0
    assert np.array_equal(fit_weights, expected)
    assert int((fit_weights == 0).sum()) == low["rows_left_out"]
    seen.clear()
    calibration.with_every_shape(model, meta, 1.0, True)
    assert seen and all(np.array_equal(w, fit_weights) for w in seen)
    assert np.array_equal(dm.model_row_weights(model, product, dates, price, units, None,
                                               detect=True).exact, fit_weights)


def test_uncapped_promotions_are_kept() -> None:
    """The same market without a stock cap: its low-price days are Poisson (pooled dispersion
    1.02), nothing is left out and the fit is within 3% of the truth."""
    meta, truth = promoted_market(stocked=False)
    fitted = DemandModel.fit(meta.drop("on_hand"), settings())
    low = fitted.info["censoring"]["low_price_days"]
    assert low["products"] == 0 and low["rows_left_out"] == 0
    assert low["pooled_dispersion"] == pytest.approx(1.0, abs=0.1)
    assert abs(elasticity_ratio(fitted, truth) - 1.0) < 0.03


def split(prices: list[float]) -> SplitMeta:
    """Two products, A (index 0) and B (index 1), two days each."""
    index = np.array([0, 0, 1, 1])
    date = np.datetime64("2024-01-01") + np.array([0, 1, 0, 1])
    return SplitMeta(index, np.array(["A", "A", "B", "B"], dtype=object), date,
                     np.asarray(prices, float), np.full(4, 5.0), np.full(4, 1.0),
                     np.full(4, 1.0), np.full(4, 20.0), np.ones((2, 3), dtype=np.int8),
                     np.full(2, np.nan))


def test_the_verdict_refuses_a_claim_above_the_uncapped_price_band() -> None:
    """A's uncapped sales were seen up to 10.00; the policy prices one of its two days at
    10.10 (above 10.00 × 1.005): 50% of the capped product's days, 25 of the 200 fit rows
    left out. B had no capped days and is not judged."""
    censoring = {"low_price_days": {"products": 1, "rows_left_out": 25, "per_product": {
        "0": {"low_price_days": 25, "dispersion": 0.4, "stocked_out_share": None,
              "kept_price_range": [8.0, 10.0]}}}}
    meta = split([9.0, 9.0, 30.0, 30.0])
    policy = np.array([10.04, 10.10, 40.0, 40.0])
    overall, per_product = checks.capped_sales_reasons(censoring, 200, meta, policy)
    assert overall == (
        "sales look capped by stock on 12% of train days (the low-price days of 1 product "
        "sells less than their demand and were left out of the fit); the policy prices 50% of "
        "those products' days above the highest price their uncapped sales were seen at, "
        "where the response to price is not measured")
    assert per_product == {"A": (
        "sales look capped by stock on 12% of train days (the low-price days of 1 product "
        "sells less than their demand and were left out of the fit); the policy prices 50% of "
        "this product's days above 10.00, the highest price its uncapped sales were seen at")}
    # Within the band (10.04 is inside the 0.5% tolerance): the claim still cannot stand.
    inside = ("sales look capped by stock on 12% of train days (the low-price days of 1 "
              "product sells less than their demand and were left out of the fit); the fit "
              "cannot score the history's capped low-price days (it does not know the stock), "
              "so the uplift over them is not measured")
    assert checks.capped_sales_reasons(censoring, 200, meta, np.array(
        [10.04, 9.0, 40.0, 40.0])) == (inside, {"A": inside})
    assert checks.capped_sales_reasons({"stock_rows": 0}, 200, meta, policy) == (None, {})
    # The verdict leads with it, whatever the interval says.
    fit = {"rows": 4, "bias_pct": 0.0, "wmape": 0.1, "wmape_noise_floor": 0.1}
    changes = {"with_sign": 40, "right_sign": 40, "sign_accuracy": 1.0}
    held_out = {"fit": {"overall": fit, "per_product": {"A": fit, "B": fit}},
                "price_changes": {"overall": changes,
                                  "per_product": {"A": changes, "B": changes}}}
    interval = {"low": 10.0, "point": 14.0, "high": 17.7, "level": 0.9}
    result = checks.verdict(held_out, interval, {"A": interval, "B": interval},
                            load_settings(preset="tiny", flags={}, environ={}).evaluate,
                            (overall, per_product))
    assert result["status"] == "not_reliable"
    assert result["message"] == f"not reliable: {overall}"
    assert result["per_product"]["A"]["message"] == f"not reliable: {per_product['A']}"
    assert result["per_product"]["B"]["status"] == "reliable_uplift"


def test_report_md_says_what_the_fit_left_out() -> None:
    from pricing_cli.agent.report import capped_lines

    low = {"products": 38, "rows_left_out": 2206, "low_price_cut": 0.03,
           "pooled_dispersion": 0.425}
    evaluation = {"demand_model": {"censoring": {"low_price_days": low}}}
    assert capped_lines(evaluation) == [
        "- Sales capped by stock: 38 products' low-price days (2206 train rows, 3% or more "
        "below the regular price) were left out of the demand fit: their low-price sales are "
        "under-dispersed (pooled Pearson dispersion 0.42; Poisson sales give 1)."]
    assert capped_lines({"demand_model": {"censoring": {"low_price_days": {
        **low, "products": 0}}}}) == []
    assert capped_lines({"demand_model": {"censoring": None}}) == []


def test_the_trust_region_of_a_capped_product_is_its_uncapped_band() -> None:
    """Product 0's sales looked capped at low prices; the fit kept its days priced 8.00 to
    10.00. Its trust region (from the sold range 6.00-11.00 widened 10%: 5.40-12.10) narrows
    to that band; product 1 (not capped) keeps its region; product 2 (no region, NaN) stays
    unlimited. Masked on a grid of 5.00..13.00 by 1.00, product 0 keeps only 8, 9 and 10."""
    from pricing_cli.pricing import restrict_to_band, restrict_to_trust_region, trust_region_bounds

    censoring = {"low_price_days": {"products": 1, "rows_left_out": 25, "per_product": {
        "0": {"low_price_days": 25, "dispersion": 0.4, "stocked_out_share": None,
              "kept_price_range": [8.0, 10.0]}}}}
    band = dm.uncapped_price_band(censoring, 3)
    np.testing.assert_array_equal(band[0], [8.0, np.nan, np.nan])
    np.testing.assert_array_equal(band[1], [10.0, np.nan, np.nan])
    region = trust_region_bounds(np.array([6.0, 4.0, np.nan]), np.array([11.0, 5.0, np.nan]),
                                 0.1)
    lower, upper = restrict_to_band(region, band)
    np.testing.assert_allclose(lower, [8.0, 3.6, np.nan])
    np.testing.assert_allclose(upper, [10.0, 5.5, np.nan])
    assert all(np.isnan(b).all() for b in dm.uncapped_price_band(None, 2))  # nothing known
    grid = np.tile(np.arange(5.0, 14.0), (3, 1))
    mask, fallback = restrict_to_trust_region(np.ones((3, 9), np.int8), grid, lower, upper)
    assert grid[0][mask[0] == 1].tolist() == [8.0, 9.0, 10.0]
    assert grid[1][mask[1] == 1].tolist() == [5.0]
    assert mask[2].all() and not fallback.any()


def test_a_capped_product_is_held_to_its_status_quo_inside_its_band() -> None:
    """Product 0's band is 8.00-10.00 and it sells at 9.00 now: held to 8.73-9.27 (±3%).
    Product 1 sells at 10.50, above its band 8.00-10.00: held about 10.50 (10.185-10.815),
    what it sells at now. Product 2 has no band: unchanged (NaN)."""
    from pricing_cli.pricing import hold_band

    band = (np.array([8.0, 8.0, np.nan]), np.array([10.0, 10.0, np.nan]))
    lower, upper = hold_band(band, np.array([9.0, 10.5, 5.0]), 0.03)
    np.testing.assert_allclose(lower, [8.73, 10.185, np.nan])
    np.testing.assert_allclose(upper, [9.27, 10.815, np.nan])


def test_the_regular_price_now_is_the_median_of_the_last_29_days() -> None:
    """Product 0: 40 days at 10.00, then 29 days of which 5 on promotion at 7.00 and 24 at
    11.00: its regular price now is 11.00. Product 1 has 3 days (4, 5, 6, given out of
    order): 5.00. Product 2 has none: NaN."""
    from pricing_cli.agent.baselines import regular_price_now

    prices = [10.0] * 40 + [11.0] * 12 + [7.0] * 5 + [11.0] * 12
    frame = pl.DataFrame({
        "product_index": [0] * 69 + [1] * 3,
        "date": np.concatenate([MONDAY + np.arange(69), MONDAY + np.array([2, 0, 1])]),
        "price": prices + [6.0, 4.0, 5.0]})
    out = regular_price_now(frame, 3)
    assert out[:2].tolist() == [11.0, 5.0] and np.isnan(out[2])
