"""The demand model: recovered parameters, shrinkage, the Newton optimum, files, fit report."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent import demand as dm
from pricing_cli.agent.demand import DemandModel, calendar_terms
from pricing_cli.config import load_settings
from pricing_cli.errors import DataError
from tests.agent_fixtures import TRUE_DOW_EFFECT, write_processed
from tests.demand_markets import substitutes_meta, synthetic_meta, true_elasticity


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    folder = tmp_path_factory.mktemp("processed")
    truth = write_processed(folder)
    return (truth, pl.read_parquet(folder / "meta_train.parquet"),
            pl.read_parquet(folder / "meta_val.parquet"))


def settings(**train: object) -> object:
    return load_settings(preset="tiny", flags={f"train.{k}": v for k, v in train.items()},
                         environ={})


# The 13-parameter core alone: one shape, no events, no week-of-year terms, no controls, no
# cross-price term, every day at full weight.
BASE_ONLY: dict[str, object] = {"demand_forms": ["loglog"], "demand_events": {},
                                "demand_year_harmonics": 0, "demand_control_lags": 0,
                                "demand_cross_price": False, "demand_detect_capped": False,
                                "demand_control_leads": 0, "demand_reactive_prices": False}


def mean_elasticity_by_product(model: DemandModel, meta: pl.DataFrame) -> np.ndarray:
    products = meta["product_index"].to_numpy()
    e = model.elasticity(products, meta["date"].to_numpy())
    return np.bincount(products, e) / np.bincount(products)


def test_calendar_terms_of_known_dates() -> None:
    dates = np.array(["2023-01-02", "2023-01-07", "2023-01-08", "2024-12-31"],
                     dtype="datetime64[D]")
    dow, s_sin, s_cos, weekend = calendar_terms(dates)
    assert dow.tolist() == [0, 5, 6, 1]  # Monday, Saturday, Sunday, Tuesday
    assert weekend.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert s_sin[0] == pytest.approx(np.sin(2 * np.pi * 2 / 365.25))
    assert s_cos[3] == pytest.approx(np.cos(2 * np.pi * 366 / 365.25))


def test_fit_recovers_true_elasticities_and_weekday_effects(market) -> None:
    truth, train, _ = market
    model = DemandModel.fit(train, settings())
    assert model.info["converged"]
    fitted = mean_elasticity_by_product(model, train)
    np.testing.assert_allclose(fitted, truth["elasticity"], rtol=0.15)
    # Monday is the baseline in both; the truth's weekend lift is 0.3-0.35.
    np.testing.assert_allclose(model.dow_effect, TRUE_DOW_EFFECT, atol=0.06)
    assert model.reference_price.tolist() == train.group_by("product_index").agg(
        pl.col("price").median()).sort("product_index")["price"].to_list()


def test_shrinkage_pulls_a_product_with_few_rows_to_the_group_mean(market) -> None:
    truth, train, _ = market
    # Product 0 (true elasticity 1.8, the lowest) keeps only its first 3 days.
    sparse = train.filter((pl.col("product_index") != 0) | (pl.col("date") < pl.date(2023, 1, 5)))
    pooled = DemandModel.fit(sparse, settings(demand_shrinkage=5.0))
    alone = DemandModel.fit(sparse, settings(demand_shrinkage=0.0))
    e_pooled = pooled.product_parameters()[0, 3]
    e_alone = alone.product_parameters()[0, 3]
    # Three days cannot identify four parameters: unpooled, the estimate is far off ...
    assert abs(e_alone - truth["elasticity"][0]) > 1.0
    # ... pooled, it stays within 0.1 of the group mean while the well-measured products
    # keep their own elasticity.
    assert abs(e_pooled - pooled.mean[3]) < 0.1
    np.testing.assert_allclose(pooled.product_parameters()[1:, 3], truth["elasticity"][1:],
                               rtol=0.15)


def test_a_product_without_rows_gets_the_mean_and_the_fallback_reference(market) -> None:
    _, train, _ = market
    fallback = np.array([np.nan] * 6 + [12.5])
    model = DemandModel.fit(train, settings(), n_products=7, fallback_reference=fallback)
    np.testing.assert_allclose(model.product_parameters()[6], model.mean, atol=1e-9)
    assert model.reference_price[6] == 12.5
    assert model.info["products_without_rows"] == 1


def test_a_product_with_three_days_gets_its_categorys_curve(tmp_path) -> None:
    write_processed(tmp_path, true_elasticity=[1.8, 1.9, 2.0, 3.0, 3.1, 3.2])
    train = pl.read_parquet(tmp_path / "meta_train.parquet").with_columns(
        category=pl.when(pl.col("product_index") < 3).then(pl.lit("low")).otherwise(pl.lit("high")))
    sparse = train.filter((pl.col("product_index") != 0) | (pl.col("date") < pl.date(2023, 1, 5)))
    assert sparse.filter(pl.col("product_index") == 0).height == 3
    model = DemandModel.fit(sparse, settings())
    assert model.categories == ["high", "low"] and model.info["categories"] == 2
    e = model.product_parameters()[:, 3]
    siblings = e[[1, 2]].mean()  # the common value of its category (truth 1.95)
    # Within 0.15 of its siblings' elasticity, and at least 0.25 away from the overall mean
    # (2.34) that it would get without the category.
    assert abs(e[0] - siblings) < 0.15
    assert abs(e[0] - model.mean[3]) > 0.25
    assert abs(e[0] - 1.95) < abs(e[0] - model.mean[3])


def test_newton_stops_at_the_penalized_optimum(market) -> None:
    """No small move of any parameter lowers the penalized objective (categories included)."""
    _, train, _ = market
    train = train.with_columns(category=(pl.col("product_index") % 2).cast(pl.String))
    model = DemandModel.fit(train, settings(**BASE_ONLY))
    product = train["product_index"].to_numpy().astype(np.int64)
    dow, s_sin, s_cos, weekend = calendar_terms(train["date"].to_numpy())
    neg_x = -np.log(train["price"].to_numpy() / model.reference_price[product])
    design = dm._Design(product=product, product_category=model.product_category, dow=dow,
                        z=np.column_stack([np.ones_like(neg_x), s_sin, s_cos, neg_x]),
                        v=np.column_stack([neg_x * s_sin, neg_x * s_cos, neg_x * weekend]),
                        units=np.maximum(train["units"].to_numpy(), 0.0))
    best = dm._Params(np.concatenate([model.mean, model.dow_effect[1:],
                                      model.elasticity_modifiers]),
                      model.category_offset, model.product_offset)
    weights = dm._penalty_weights(5.0)
    f0 = dm._objective(design, best, *weights)
    for block in ("core", "category", "product"):
        values = getattr(best, block)
        for index in np.ndindex(values.shape):
            for h in (-1e-4, 1e-4):
                moved = values.copy()
                moved[index] += h
                params = dm._Params(**{**best.__dict__, block: moved})
                assert dm._objective(design, params, *weights) >= f0 - 1e-11 * abs(f0)


def test_net_return_days_count_as_zero_units(market) -> None:
    _, train, _ = market
    rows = pl.Series(np.arange(train.height) % 17 == 0)
    as_returns = train.with_columns(units=pl.when(rows).then(-2.0).otherwise(pl.col("units")))
    as_zero = train.with_columns(units=pl.when(rows).then(0.0).otherwise(pl.col("units")))
    a, b = DemandModel.fit(as_returns, settings()), DemandModel.fit(as_zero, settings())
    np.testing.assert_array_equal(a.product_offset, b.product_offset)
    assert a.info["negative_unit_rows_clipped"] == int(rows.sum())


def test_expected_units_and_fit_report_by_hand() -> None:
    model = DemandModel(
        mean=np.array([np.log(10.0), 0.0, 0.0, 2.0]), category_offset=np.zeros((0, 4)),
        product_offset=np.zeros((1, 4)), product_category=np.array([-1]),
        dow_effect=np.zeros(7), elasticity_modifiers=np.zeros(3),
        reference_price=np.array([4.0]))
    meta = pl.DataFrame({"product_index": [0, 0, 0],
                         "date": pl.Series(np.array(["2023-01-02"] * 3, dtype="datetime64[D]")),
                         "price": [4.0, 8.0, 4.0], "units": [10.0, 0.0, 5.0]})
    predicted = model.expected_units(np.zeros(3), meta["date"].to_numpy(), meta["price"])
    np.testing.assert_allclose(predicted, [10.0, 2.5, 10.0])  # 10 * 2**-2 at twice the price
    report = model.fit_report(meta)
    assert report["mae"] == pytest.approx((0 + 2.5 + 5) / 3)
    assert report["rmse"] == pytest.approx(np.sqrt((0 + 2.5**2 + 5**2) / 3))
    # Unit deviances: 0; 2*(0 - (0 - 2.5)) = 5; 2*(5 log(5/10) - (5 - 10)).
    assert report["poisson_deviance"] == pytest.approx((0 + 5 + 2 * (5 * np.log(0.5) + 5)) / 3)
    assert sum(c["rows"] for c in report["calibration"]) == 3
    assert report["mean_actual"] == 5.0
    assert report["mean_predicted"] == pytest.approx(7.5)


def test_save_and_load_round_trip(market, tmp_path) -> None:
    _, train, val = market
    model = DemandModel.fit(train.with_columns(category=pl.lit("a")), settings())
    model.save(tmp_path)
    loaded = DemandModel.load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demand_model.json", "demand_model.npz"]
    args = (val["product_index"].to_numpy(), val["date"].to_numpy(), val["price"].to_numpy())
    np.testing.assert_array_equal(loaded.expected_units(*args), model.expected_units(*args))
    assert loaded.categories == ["a"] and loaded.info == model.info


def test_missing_column_names_the_file() -> None:
    meta = pl.DataFrame({"product_index": [0], "date": [None], "price": [1.0]})
    with pytest.raises(DataError, match=r"meta_train.parquet lacks column\(s\) units"):
        DemandModel.fit(meta, settings())


# ----------------------------------------------------------------------------------------------
# Price-response shapes chosen per product on held-out train days

MONDAY = np.datetime64("2023-01-02")


@pytest.mark.parametrize(("form", "each_tolerance", "mean_tolerance"),
                         [("loglog", 0.10, 0.05), ("linear", 0.10, 0.05),
                          ("logit", 0.20, 0.08)])
def test_each_shape_is_recovered_from_its_own_data(form, each_tolerance, mean_tolerance) -> None:
    """12 products x 240 days of one true shape: at least 9 of them choose it, and the
    elasticity at the median price is within 10% (logit 20%) of the truth for every product,
    5% (logit 8%) on average."""
    meta, truth = synthetic_meta(form, seed=1)
    model = DemandModel.fit(meta, settings())
    assert model.info["forms"][form] >= 9
    assert int((model.product_form == dm.FORMS.index(form)).sum()) == model.info["forms"][form]
    want = true_elasticity(form, model.reference_price / truth["list_price"], truth["slope"])
    got = model.elasticity(np.arange(12), np.full(12, MONDAY))
    error = np.abs(got / want - 1.0)
    assert error.max() < each_tolerance, (got, want)
    assert error.mean() < mean_tolerance
    # The held-out days are train's own last 20% (no other split exists here).
    assert model.info["form_selection"]["holdout_rows"] == 12 * 48


def test_a_linear_demand_is_zero_above_its_choke_price() -> None:
    meta, truth = synthetic_meta("linear", seed=1)
    model = DemandModel.fit(meta, settings())
    choke = truth["list_price"] * (1.0 + 1.0 / truth["slope"])
    far = model.expected_units(np.arange(12), np.full(12, MONDAY), 1.2 * choke)
    loglog = model.expected_units(np.arange(12), np.full(12, MONDAY), 1.2 * choke, form="loglog")
    linear = model.product_form == dm.FORMS.index("linear")
    assert (far[linear] < 1e-3).all() and (loglog[linear] > 1.0).all()


def test_only_the_configured_shapes_are_tried() -> None:
    meta, _ = synthetic_meta("linear", seed=1)
    only = DemandModel.fit(meta, settings(demand_forms=["loglog"]))
    assert only.info["forms"] == {"loglog": 12} and "form_selection" not in only.info
    assert (only.product_form == 0).all()


def test_shapes_are_saved_per_product(tmp_path) -> None:
    meta, _ = synthetic_meta("logit", seed=1)
    model = DemandModel.fit(meta, settings())
    model.save(tmp_path)
    loaded = DemandModel.load(tmp_path)
    names = json.loads((tmp_path / "demand_model.json").read_text())["product_forms"]
    assert names == [dm.FORMS[f] for f in model.product_form.tolist()]
    prices = meta["price"].to_numpy()[::50]
    args = (meta["product_index"].to_numpy()[::50], meta["date"].to_numpy()[::50], prices)
    np.testing.assert_array_equal(loaded.expected_units(*args), model.expected_units(*args))
    # Broadcasting (the env's (n, 1) x (n, K) call) gives the same values as row by row.
    grid = prices[:, None] * np.array([0.8, 1.0, 1.2])
    table = model.expected_units(args[0][:, None], args[1][:, None], grid)
    for j in range(3):
        np.testing.assert_allclose(table[:, j], model.expected_units(args[0], args[1], grid[:, j]),
                                   rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# Calendar events and the control function


def test_an_event_window_shift_in_level_and_elasticity_is_recovered() -> None:
    """Sep-Jan, 12 products: in Black Friday week (Nov 22-30) log demand is 0.5 higher and
    the elasticity 1.0 higher. The fit finds both within 0.1; the December run-up, which the
    data do not move, stays within 0.1 of nothing."""
    meta, truth = synthetic_meta("loglog", seed=3, n_days=150, start=date(2023, 9, 1),
                                 event=("11-22", "11-30"), event_level=0.5, event_elasticity=1.0)
    model = DemandModel.fit(meta, settings(demand_forms=["loglog"]))
    calendar = model.info["calendar"]
    # The Christmas ramp is 0 on Nov 1, so its rows are Nov 2 - Dec 24.
    assert calendar["event_rows"] == {"black_friday_week": 12 * 9, "christmas_run_up": 12 * 53}
    assert calendar["event_elasticity"]["black_friday_week"] == pytest.approx(1.0, abs=0.1)
    assert abs(calendar["event_elasticity"]["christmas_run_up"]) < 0.1
    assert model.level_effects.tolist() == pytest.approx([0.5, 0.0], abs=0.1)
    products = np.arange(12)
    inside = model.elasticity(products, np.full(12, np.datetime64("2023-11-24")))
    before = model.elasticity(products, np.full(12, np.datetime64("2023-11-17")))
    np.testing.assert_allclose(inside - before, 1.0, atol=0.1)
    np.testing.assert_allclose(before, truth["slope"], rtol=0.1)
    # Switched off, the elasticity stays flat through the event.
    flat = DemandModel.fit(meta, settings(demand_forms=["loglog"], demand_event_elasticity=False))
    assert flat.info["calendar"]["event_elasticity"]["black_friday_week"] == 0.0
    flat_inside = flat.elasticity(products, np.full(12, np.datetime64("2023-11-24")))
    flat_before = flat.elasticity(products, np.full(12, np.datetime64("2023-11-17")))
    assert np.abs(flat_inside - flat_before).max() < 0.05


def test_the_control_function_removes_most_of_the_bias_of_reactive_prices() -> None:
    """The pricer raised prices after strong days (an AR(1) demand shock, rho 0.8): the naive
    fit finds elasticities at most 0.8 of the truth on average; with two lags of controls the
    fit is within 10% on average and 15% for every product."""
    meta, truth = synthetic_meta("loglog", seed=2, n_days=300, base_units=(80.0, 200.0),
                                 shock_rho=0.8, shock_sd=0.25, price_reaction=1.0)
    products, monday = np.arange(12), np.full(12, MONDAY)
    naive = DemandModel.fit(meta, settings(demand_forms=["loglog"], demand_control_lags=0,
                                           demand_control_leads=0))
    ratio = naive.elasticity(products, monday) / truth["slope"]
    assert ratio.mean() < 0.8
    controlled = DemandModel.fit(meta, settings(demand_forms=["loglog"], demand_control_lags=2))
    ratio = controlled.elasticity(products, monday) / truth["slope"]
    assert abs(ratio.mean() - 1.0) < 0.1 and np.abs(ratio - 1.0).max() < 0.15
    assert controlled.info["calendar"]["control_effects"][0] > 0.3  # yesterday's surprise


def test_controls_change_nothing_much_when_prices_are_exogenous() -> None:
    meta, truth = synthetic_meta("loglog", seed=1)
    products, monday = np.arange(12), np.full(12, MONDAY)
    without = DemandModel.fit(meta, settings(demand_forms=["loglog"], demand_control_lags=0))
    with_controls = DemandModel.fit(meta, settings(demand_forms=["loglog"]))
    np.testing.assert_allclose(with_controls.elasticity(products, monday),
                               without.elasticity(products, monday), rtol=0.02)
    assert np.abs(with_controls.control_effects).max() < 0.05


# ----------------------------------------------------------------------------------------------
# Sales capped by stock


def mean_elasticity_ratio(model: DemandModel, truth: dict) -> float:
    return float((model.elasticity(np.arange(12), np.full(12, MONDAY)) / truth["slope"]).mean())


def test_days_that_sold_out_are_left_out_and_the_elasticity_recovered() -> None:
    """Stock of 1.6-2.6x the base volume binds on ~17% of days (mostly cheap ones): taken as
    demand, the elasticity comes out at most 0.87 of the truth; with on_hand within 5%."""
    meta, truth = synthetic_meta("loglog", seed=4, stock=(1.6, 2.6))
    sold_out = int((meta["units"] >= meta["on_hand"]).sum())
    assert 0.1 < sold_out / meta.height < 0.2
    loglog = {"demand_forms": ["loglog"]}
    naive = DemandModel.fit(meta.drop("on_hand"), settings(**loglog, demand_detect_capped=False))
    assert mean_elasticity_ratio(naive, truth) < 0.87
    censored = DemandModel.fit(meta, settings(**loglog))
    assert abs(mean_elasticity_ratio(censored, truth) - 1.0) < 0.05
    assert censored.info["censoring"]["stocked_out_days_left_out"] == sold_out
    assert censored.info["censoring"]["stock_rows"] == meta.height


def test_without_stock_data_a_pile_up_at_the_maximum_is_down_weighted() -> None:
    """The same stock every day (1.9x the base volume): sales pile up at it. Detected, the
    fit is within 8% of the truth instead of 0.85 of it, and says how many days it found."""
    meta, truth = synthetic_meta("loglog", seed=4, stock=(1.9, 1.9))
    capped = int((meta["units"] >= meta["on_hand"]).sum())
    meta = meta.drop("on_hand")
    loglog = {"demand_forms": ["loglog"]}
    naive = DemandModel.fit(meta, settings(**loglog, demand_detect_capped=False))
    assert mean_elasticity_ratio(naive, truth) < 0.85
    assert "detected_capped_days" not in naive.info["censoring"]
    detected = DemandModel.fit(meta, settings(**loglog))
    assert abs(mean_elasticity_ratio(detected, truth) - 1.0) < 0.08
    found = detected.info["censoring"]["detected_capped_days"]
    assert found["pile_up_at_max"] == capped and found["zero_after_sales"] == 0


def test_a_zero_day_after_a_run_of_sales_looks_capped() -> None:
    product = np.zeros(8, dtype=np.int64)
    dates = np.datetime64("2023-01-02") + np.arange(8)
    units = np.array([5.0, 4, 6, 0, 0, 7, 3, 0])
    weight, bound, info = dm.capped_day_weights(product, dates, units, None, detect=True)
    # Day 3 follows three selling days; day 4 follows a zero; day 7 follows only two.
    assert weight.tolist() == [1, 1, 1, dm.CAPPED_WEIGHT, 1, 1, 1, 1]
    assert not bound.any()  # a zero says nothing as a lower bound
    assert info["detected_capped_days"]["zero_after_sales"] == 1


# ----------------------------------------------------------------------------------------------
# Cross-price: the category's price index


def test_the_cross_price_effect_of_substitutes_is_recovered() -> None:
    """3 categories of 4 substitutes: a sibling's price 10% up raises demand by the cross
    effect 1.0 / 3 siblings. The fit finds the coefficient within 0.15, keeps the own
    elasticity (2.5) within 5%, and a price index passed in moves the prediction."""
    meta, _ = substitutes_meta(1.0)
    model = DemandModel.fit(meta, settings(demand_forms=["loglog"]))
    assert model.cross_price == pytest.approx(1.0, abs=0.15)
    np.testing.assert_allclose(model.elasticity(np.arange(12), np.full(12, MONDAY)), 2.5,
                               rtol=0.05)
    price = model.reference_price[:1]
    at_reference = model.expected_units(np.zeros(1), np.full(1, MONDAY), price)
    dearer_siblings = model.expected_units(np.zeros(1), np.full(1, MONDAY), price,
                                           category_index=np.full(1, 0.1))
    assert dearer_siblings[0] / at_reference[0] == pytest.approx(np.exp(0.1 * model.cross_price))
    # Independent products: the coefficient shrinks to nothing.
    alone = DemandModel.fit(substitutes_meta(0.0)[0], settings(demand_forms=["loglog"]))
    assert abs(alone.cross_price) < 0.1
    off = DemandModel.fit(meta, settings(demand_forms=["loglog"], demand_cross_price=False))
    assert off.cross_price is None and off.info["calendar"]["cross_price"] is None


def test_category_price_index_by_hand() -> None:
    product = np.array([0, 1, 2, 0, 1, 3])
    dates = np.array(["2023-01-02"] * 3 + ["2023-01-03"] * 3, dtype="datetime64[D]")
    log_rel = np.array([0.1, 0.2, 0.6, -0.1, 0.3, 0.5])
    # Products 0-2 in category 0, product 3 without a category.
    index = dm.category_price_index(product, dates, log_rel, np.array([0, 0, 0, -1]))
    np.testing.assert_allclose(index, [0.4, 0.35, 0.15, 0.3, -0.1, 0.0])
