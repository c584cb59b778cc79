"""Scenario markets (docs/market.md, "Scenarios"): each oracle against a brute-force search
written here, each tiny scenario market generated and its ground truth round-tripped, the stock
cap, and today's market unchanged byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli.config import load_settings
from pricing_cli.data import generate, market
from pricing_cli.errors import ConfigError, DataError
from pricing_cli.monitor import RunMonitor

SCENARIOS_DIR = Path(__file__).resolve().parents[1] / "configs" / "scenarios"
SCENARIOS = ("price_endogeneity", "linear", "logit", "substitution", "stockouts", "holidays",
             "reference_prices")
# sha256 over (relative path, NUL, bytes) of every file `pricectl --preset tiny generate` wrote
# (run.json aside), computed on main at 83fa5fe before any scenario existed.
TINY_DEFAULT_DIGEST = "51836f635254f875db858b36dd2a051492e27efe5a769e0072073fc8bf4f9dfd"


def _settings(name: str | None, out: Path, **flags):
    config = None if name is None else SCENARIOS_DIR / f"{name}.yaml"
    return load_settings(config, preset="tiny", environ={},
                         flags={"generate.output_dir": str(out), **flags})


def _generate(settings):
    with RunMonitor("generate", "quiet") as monitor:
        return generate.run_generate(settings, monitor)


def _market(name: str, **flags):
    """(in-memory ground truth, historical prices, settings) of a tiny scenario market."""
    settings = _settings(name, Path("unused"), **flags)
    gt, prices = generate.scenario_market(generate.draw_market(settings.generate),
                                          settings.generate, Path("unused"))
    return gt, prices, settings.generate


def _days(cfg) -> np.ndarray:
    return np.datetime64(cfg.start_date, "D") + np.arange(cfg.n_days)


def _base(gt: market.GroundTruth) -> market.GroundTruth:
    return dataclasses.replace(gt, scenario=None)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        # the ownership markers (storage.OWNER_MARKER) came later and hold no market data
        if path.is_file() and path.name not in ("run.json", ".pricectl-output.json"):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_default_market_is_byte_identical_to_before_scenarios(tmp_path):
    _generate(_settings(None, tmp_path / "raw"))
    assert _digest(tmp_path / "raw") == TINY_DEFAULT_DIGEST
    payload = json.loads((tmp_path / "raw" / "ground_truth.json").read_text())
    assert payload["formula_version"] == market.BASE_FORMULA_VERSION == 1
    assert "scenario" not in payload and "scenario" not in payload["meta"]["settings"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_tiny_scenario_generates_and_its_ground_truth_round_trips(tmp_path, name):
    settings = _settings(name, tmp_path / "raw")
    result = _generate(settings)
    path = tmp_path / "raw" / "ground_truth.json"
    loaded = market.load_ground_truth(path)
    assert loaded.scenario is not None
    assert json.loads(path.read_text())["formula_version"] == market.FORMULA_VERSION == 2
    # Writing the loaded truth again gives the same payload.
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(path.read_text())
    # The file scores the history exactly as the truth the generator simulated from.
    gt, prices, cfg = _market(name)
    idx = np.repeat(np.arange(gt.n_products), cfg.n_days)
    dates = np.tile(_days(cfg), gt.n_products)
    np.testing.assert_array_equal(market.true_units(loaded, idx, dates, prices.reshape(-1)),
                                  market.true_units(gt, idx, dates, prices.reshape(-1)))
    # The history's units are the Poisson draws of that truth: total within 4 sigma.
    expected = market.true_units(gt, idx, dates, prices.reshape(-1)).sum()
    assert abs(result.summary["units"] - expected) < 4 * math.sqrt(expected)


def test_scenarios_that_cannot_combine_are_refused():
    with pytest.raises(ConfigError, match="substitution is a logit of its own"):
        load_settings(preset="tiny", environ={}, flags={
            "generate.scenario.substitution": True, "generate.scenario.demand_form": "linear"})
    with pytest.raises(ConfigError, match="stock_file needs stockouts"):
        load_settings(preset="tiny", environ={}, flags={"generate.scenario.stock_file": True})


# ----------------------------------------------------------------------------------------------
# Memoryless scenarios: the per-day oracle against a 20,001-point grid


def _grid_best(gt, idx, day, stock=None):
    """Best price of one product-day on a 20,001-point grid of [min, max] (brute force)."""
    grid = np.linspace(gt.min_price[idx], gt.max_price[idx], 20_001)
    units = market.expected_units(gt, idx, day, grid)
    if stock is not None:  # E[min(N, S)] summed term by term, independently of the market's
        units = _capped_mean(units, stock)
    profit = (grid - gt.unit_cost[idx]) * units
    return grid[np.argmax(profit)], profit.max()


def _capped_mean(lam, stock: int) -> np.ndarray:
    """E[min(N, stock)], N ~ Poisson(lam), as the sum over k of min(k, stock) P(N = k)."""
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))[:, None]
    terms = np.arange(stock + 400)
    log_factorial = np.array([math.lgamma(k + 1) for k in terms])
    pmf = np.exp(terms * np.log(lam) - lam - log_factorial)
    return (np.minimum(terms, stock) * pmf).sum(axis=1)


@pytest.mark.parametrize("name", ["linear", "logit", "holidays", "price_endogeneity"])
def test_memoryless_oracle_matches_a_grid_search(name):
    if name == "holidays":  # a history over the event windows
        gt, _, cfg = _market(name, **{"generate.start_date": "2023-09-01"})
        days = np.array(["2023-11-25", "2023-12-20", "2023-12-24"], dtype="datetime64[D]")
    else:
        gt, _, cfg = _market(name)
        days = _days(cfg)[[10, 60, 119]]
    for idx, day in itertools.product(range(0, gt.n_products, 3), days):
        best, _ = _grid_best(gt, idx, day)
        oracle = market.true_optimum(gt, [idx], [day])[0]
        step = (gt.max_price[idx] - gt.min_price[idx]) / 20_000
        assert abs(oracle - best) <= 2 * step, (name, idx, day)


def test_holiday_ramp_lifts_elasticity_and_level_as_documented():
    gt, _, _ = _market("holidays", **{"generate.start_date": "2023-09-01"})
    base = _base(gt)
    # Dec 24: the Christmas ramp at full intensity (+35% elasticity, +0.4 log demand);
    # Nov 23 (Black Friday week, ramp at 22/53): +0.1 + 0.35 * 22/53.
    for day, e_shift, lift in (("2023-12-24", 0.35, 0.4),
                               ("2023-11-23", 0.1 + 0.35 * 22 / 53, 0.3 + 0.4 * 22 / 53),
                               ("2023-10-15", 0.0, 0.0)):
        assert market.elasticity(gt, 4, day) == pytest.approx(
            market.elasticity(base, 4, day) * (1 + e_shift), rel=1e-12)
        at_ref = gt.ref_price[4]  # where the elasticity does not move demand
        assert market.expected_units(gt, 4, day, at_ref) == pytest.approx(
            market.expected_units(base, 4, day, at_ref) * math.exp(lift), rel=1e-12)


def test_stock_capped_oracle_matches_a_grid_search():
    gt, _, cfg = _market("stockouts")
    stock = gt.scenario.stock
    days = _days(cfg)
    # The product-days where the stock matters most: demand at the uncapped optimum is the
    # largest multiple of the stock.
    uncapped = dataclasses.replace(gt, scenario=dataclasses.replace(gt.scenario, stock=None))
    free = market.optimal_price(uncapped, np.arange(gt.n_products)[:, None], days[None, :])
    pressure = market.expected_units(uncapped, np.arange(gt.n_products)[:, None], days[None, :],
                                     free) / np.maximum(stock, 1)
    picks = np.argsort(pressure, axis=None)[-3:]
    for idx, day_index in zip(*np.unravel_index(picks, stock.shape), strict=True):
        day, on_hand = days[day_index], int(stock[idx, day_index])
        best, best_profit = _grid_best(gt, idx, day, on_hand)
        oracle = market.true_optimum(gt, [idx], [day])[0]
        oracle_profit = (oracle - gt.unit_cost[idx]) * market.true_units(gt, [idx], [day],
                                                                        [oracle])[0]
        assert oracle_profit == pytest.approx(best_profit, rel=1e-6)
        assert abs(oracle - best) < 0.01 * gt.unit_cost[idx]
        assert oracle > free[idx, day_index]  # scarce stock: sell fewer units at a higher price
        assert market.true_units(gt, [idx], [day], [oracle])[0] == pytest.approx(
            _capped_mean(market.expected_units(gt, idx, day, oracle), on_hand)[0], rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Substitution: the joint optimum of a category-day against a grid over every price vector


def _mnl_units(base, products, day, prices, outside_share):
    """The documented MNL, written out here: units of ``products`` (one category) at prices
    (..., k), every product of the category present."""
    level = market.expected_units(base, products, day, base.ref_price[products])
    e = market.elasticity(base, products, day)
    ref_share = level / level.sum() * (1 - outside_share)
    slope = e / (base.ref_price[products] * (1 - ref_share))
    attraction = ref_share / outside_share * np.exp(-slope * (prices - base.ref_price[products]))
    return level.sum() / (1 - outside_share) * attraction / (1 + attraction.sum(-1,
                                                                                 keepdims=True))


@pytest.mark.parametrize("narrow", [False, True])
def test_substitution_oracle_is_the_joint_optimum_of_a_grid(narrow):
    gt, _, cfg = _market("substitution", **{"generate.n_products": 6,
                                            "generate.n_categories": 2})
    if narrow:  # a band that binds: the KKT clip path of the oracle
        max_price = gt.max_price.copy()
        max_price[:] = gt.unit_cost * 1.4
        gt = dataclasses.replace(gt, max_price=max_price)
    day = _days(cfg)[30]
    category = np.asarray(gt.category)
    products = np.flatnonzero(category == category[0])
    assert products.size == 3
    # The market's joint demand is the formula above.
    probe = gt.ref_price[products] * np.array([0.9, 1.1, 1.3])
    np.testing.assert_allclose(
        market.true_units(gt, products, np.repeat(day, 3), probe),
        _mnl_units(_base(gt), products, day, probe[None, :], gt.scenario.outside_share)[0],
        rtol=1e-12)
    axes = [np.linspace(gt.min_price[p], gt.max_price[p], 81) for p in products]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    units = _mnl_units(_base(gt), products, day, grid, gt.scenario.outside_share)
    profit = ((grid - gt.unit_cost[products]) * units).sum(axis=1)
    best = grid[np.argmax(profit)]
    oracle = market.true_optimum(gt, products, np.repeat(day, 3))
    oracle_profit = ((oracle - gt.unit_cost[products])
                     * market.true_units(gt, products, np.repeat(day, 3), oracle)).sum()
    assert oracle_profit >= profit.max()  # the continuous optimum beats every grid point
    assert oracle_profit <= profit.max() * 1.001
    steps = np.array([a[1] - a[0] for a in axes])
    assert np.all(np.abs(oracle - best) <= steps)
    if narrow:
        assert np.any(np.isclose(oracle, gt.max_price[products]))


# ----------------------------------------------------------------------------------------------
# Reference prices: the DP oracle against every price path on a grid


def _path_profit(gt, idx, days, paths, start_ref):
    """Profit of every price path (m, T) with the documented reference recursion."""
    sc = gt.scenario
    base = _base(gt)
    ref = np.full(paths.shape[0], start_ref)
    total = np.zeros(paths.shape[0])
    for t, day in enumerate(days):
        x = paths[:, t]
        gap = (x - ref) / ref
        effect = np.exp(-np.where(gap > 0, sc.reference_loss, sc.reference_gain) * gap)
        total += (x - gt.unit_cost[idx]) * market.expected_units(base, idx, day, x) * effect
        ref = (1 - sc.reference_rate) * ref + sc.reference_rate * x
    return total


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_reference_price_oracle_beats_every_grid_path(rate):
    gt, prices, cfg = _market("reference_prices", **{"generate.scenario.reference_rate": rate})
    idx, first, horizon = 2, 100, 6
    days = _days(cfg)[first:first + horizon]
    # The reference at the start is the EWMA of the historical prices before it.
    start_ref = gt.ref_price[idx]
    for x in prices[idx, :first]:
        start_ref = (1 - rate) * start_ref + rate * x
    assert market.historical_reference(gt)[idx, first] == pytest.approx(start_ref, rel=1e-12)
    # 9 levels: every one is on the DP's 121-level grid, so the DP can pick any of these paths.
    levels = np.linspace(gt.min_price[idx], gt.max_price[idx], 9)
    paths = np.array(list(itertools.product(levels, repeat=horizon)))
    profits = _path_profit(gt, idx, days, paths, start_ref)
    oracle = market.true_optimum(gt, np.repeat(idx, horizon), days)
    oracle_profit = float(((oracle - gt.unit_cost[idx])
                           * market.true_units(gt, np.repeat(idx, horizon), days, oracle)).sum())
    assert oracle_profit == pytest.approx(
        _path_profit(gt, idx, days, oracle[None, :], start_ref)[0], rel=1e-12)
    if rate == 1.0:  # the next reference is today's price, on the grid: the DP is exact
        assert oracle_profit >= profits.max() * (1 - 1e-12)
    else:  # the value between grid references is interpolated
        assert oracle_profit >= profits.max() * 0.999
    # Path dependence: the best path is not one price held (loss aversion makes a cut costly
    # to undo, so the oracle moves the reference).
    flat = _path_profit(gt, idx, days, np.repeat(levels[:, None], horizon, axis=1), start_ref)
    assert profits.max() > flat.max()


# ----------------------------------------------------------------------------------------------
# Stock-outs and price endogeneity in the generated history


def test_stock_binds_on_10_to_20_percent_of_days_and_caps_recorded_sales(tmp_path):
    out = tmp_path / "raw"
    result = _generate(_settings("stockouts", out, **{"generate.scenario.stock_file": True}))
    assert 10.0 <= result.summary["stockout_days_pct"] <= 20.0
    truth = market.load_ground_truth(out / "ground_truth.json")
    assert truth.scenario.stock_file == str(out / "stock.csv")
    stock = pl.read_csv(out / "stock.csv", schema_overrides={"product_id": pl.String},
                        try_parse_dates=True)
    assert stock.columns == ["date", "product_id", "on_hand"]
    assert stock.height == truth.n_products * 120
    on_hand = (stock.sort(["product_id", "date"])["on_hand"].to_numpy()
               .reshape(truth.n_products, 120))
    np.testing.assert_array_equal(on_hand, truth.scenario.stock)
    sales = (pl.concat([pl.read_csv(f, schema_overrides={"product_id": pl.String},
                                    try_parse_dates=True)
                        for f in sorted((out / "transactions").glob("*.csv"))])
             .filter(pl.col("quantity") > 0)
             .group_by(["date", "product_id"]).agg(pl.col("quantity").sum().alias("sold")))
    joined = stock.join(sales, on=["date", "product_id"], how="left").fill_null(0)
    assert (joined["sold"] <= joined["on_hand"]).all()
    at_cap = (joined["sold"] == joined["on_hand"]).mean()
    assert at_cap >= result.summary["stockout_days_pct"] / 100  # every capped day sold out
    # More stock-outs on promotion days: the expected chance the draw exceeds the stock.
    gt, prices, cfg = _market("stockouts")
    _, list_prices = generate.historical_price_paths(generate.draw_market(cfg), cfg)
    idx = np.repeat(np.arange(gt.n_products), cfg.n_days)
    dates = np.tile(_days(cfg), gt.n_products)
    demand = market.expected_units(gt, idx, dates, prices.reshape(-1))
    beyond = demand - market.true_units(gt, idx, dates, prices.reshape(-1))  # E[lost sales]
    promo = (prices < list_prices).reshape(-1)
    assert beyond[promo].mean() > 3 * beyond[~promo].mean()


def test_pricer_reacts_to_the_demand_shock():
    gt, prices, cfg = _market("price_endogeneity")
    _, list_prices = generate.historical_price_paths(generate.draw_market(cfg), cfg)
    shock = gt.scenario.shock
    markup = prices > list_prices
    cut = (prices < list_prices) & (prices > 0)
    assert shock[markup].mean() > 0.2 and shock[cut].mean() < -0.1
    # The stored shock is the one the units were drawn with: rounded to 6 decimals.
    np.testing.assert_array_equal(shock, np.round(shock, market.SHOCK_DIGITS))


def test_reference_price_oracle_within_a_daily_change_limit_beats_every_feasible_grid_path():
    limit = 0.15
    gt, prices, cfg = _market("reference_prices", **{"generate.scenario.reference_rate": 1.0})
    idx, first, horizon = 2, 100, 6
    days = _days(cfg)[first:first + horizon]
    start_ref = prices[idx, first - 1]  # rate 1: the reference is yesterday's price
    levels = np.linspace(gt.min_price[idx], gt.max_price[idx], 9)  # on the DP's 41 levels
    paths = np.array(list(itertools.product(levels, repeat=horizon)))
    with_previous = np.concatenate([np.full((paths.shape[0], 1), prices[idx, first - 1]), paths],
                                   axis=1)
    feasible = np.all(np.abs(with_previous[:, 1:] / with_previous[:, :-1] - 1) <= limit + 1e-9,
                      axis=1)
    assert 0 < feasible.sum() < paths.shape[0]  # the limit binds
    best = _path_profit(gt, idx, days, paths[feasible], start_ref).max()
    # Rate 1 keeps both DPs exact, and the 41 levels are among the 121: a limit can only cost.
    free = market.true_optimum(gt, np.repeat(idx, horizon), days)
    unlimited = _path_profit(gt, idx, days, free[None, :], start_ref)[0]
    oracle = market.true_optimum(gt, np.repeat(idx, horizon), days, max_daily_change=limit)
    steps = np.abs(np.diff(np.r_[prices[idx, first - 1], oracle]) / np.r_[prices[idx, first - 1],
                                                                         oracle][:-1])
    assert np.all(steps <= limit + 1e-9)
    profit = _path_profit(gt, idx, days, oracle[None, :], start_ref)[0]
    assert best * (1 - 1e-12) <= profit <= unlimited * (1 + 1e-12)
    assert np.any(np.abs(np.diff(free) / free[:-1]) > limit)  # the unlimited path breaks it
    with pytest.raises(ValueError, match="reference-price DP only"):
        market.true_optimum(_market("linear")[0], [0], [days[0]], max_daily_change=limit)


def test_a_damaged_scenario_section_names_the_file_and_the_fix(tmp_path):
    gt, _, _ = _market("stockouts")
    payload = gt.to_dict()
    payload["scenario"]["stockouts"]["stock"] = payload["scenario"]["stockouts"]["stock"][:-1]
    path = tmp_path / "ground_truth.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError) as caught:
        market.load_ground_truth(path)
    assert str(caught.value).startswith(
        f"{path}: scenario: stock must be {gt.n_products} rows of one value per day")
    assert "pricectl generate" in caught.value.hint
