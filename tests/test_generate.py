"""`pricectl generate` and the true market model (pricing_cli/data/{generate,market}.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli import cli
from pricing_cli.config import load_settings
from pricing_cli.data import market
from pricing_cli.data.generate import (
    draw_market,
    file_periods,
    historical_prices,
    run_generate,
    split_units,
)
from pricing_cli.errors import DataError
from pricing_cli.monitor import RunMonitor
from pricing_cli.storage import OWNER_MARKER


def _generate(out: Path, **flags):
    settings = load_settings(preset="tiny", environ={},
                             flags={"generate.output_dir": str(out), **flags})
    with RunMonitor("generate", "quiet") as monitor:
        result = run_generate(settings, monitor)
    return settings, result


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _read_transactions(root: Path) -> pl.DataFrame:
    files = sorted((root / "transactions").glob("transactions_*"))
    frames = [pl.read_parquet(f) if f.suffix == ".parquet" else
              pl.read_csv(f, schema_overrides={"product_id": pl.String}, try_parse_dates=True)
              for f in files]
    return pl.concat(frames)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny market: (settings, result, output folder, ground truth)."""
    out = tmp_path_factory.mktemp("market") / "raw"
    settings, result = _generate(out)
    return settings, result, out, market.load_ground_truth(out / "ground_truth.json")


def _days(cfg) -> np.ndarray:
    return np.datetime64(cfg.start_date, "D") + np.arange(cfg.n_days)


# ----------------------------------------------------------------------------------------------
# Determinism and layout


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path, tiny):
    _, _, first, _ = tiny
    _generate(tmp_path / "again")
    _generate(tmp_path / "other", **{"generate.seed": 8})
    reference = _files(first)
    assert _files(tmp_path / "again") == reference
    other = _files(tmp_path / "other")
    assert other.keys() == reference.keys()
    # every data file differs; the ownership markers say the same thing in both
    assert all(other[name] != reference[name] for name in reference
               if not name.endswith(OWNER_MARKER))


def test_files_and_summary(tiny):
    settings, result, out, _ = tiny
    names = sorted(p.name for p in (out / "transactions").glob("transactions_*"))
    # tiny: 120 days from 2023-01-01 end on 2023-04-30.
    assert names == [f"transactions_2023-0{m}.csv" for m in (1, 2, 3, 4)]
    frame = _read_transactions(out)
    summary = result.summary
    assert summary["products"] == 12 and summary["days"] == 120 and summary["files"] == 4
    assert summary["transactions"] == frame.height
    assert summary["return_rows"] == frame.filter(pl.col("quantity") < 0).height
    assert summary["units"] == frame.filter(pl.col("quantity") > 0)["quantity"].sum()
    all_files = list((out / "transactions").glob("transactions_*")) + [out / "catalog.csv",
                                                          out / "ground_truth.json"]
    assert summary["bytes"] == sum(p.stat().st_size for p in all_files)
    assert result.output_dir == out


def test_transactions_follow_the_raw_contract(tiny):
    settings, _, out, gt = tiny
    first = (out / "transactions" / "transactions_2023-01.csv").read_text().splitlines()
    assert first[0] == "date,product_id,quantity,unit_price,store_id"
    date_text, pid, qty, price, store = first[1].split(",")
    assert len(date_text) == 10 and date.fromisoformat(date_text) == date(2023, 1, 1)
    assert pid.startswith("P") and len(pid) == 6 and int(qty) != 0
    assert len(price.split(".")[1]) == 2 and store in {"S1", "S2", "S3"}

    frame = _read_transactions(out)
    assert frame.schema == pl.Schema({"date": pl.Date, "product_id": pl.String,
                                      "quantity": pl.Int64, "unit_price": pl.Float64,
                                      "store_id": pl.String})
    assert frame["date"].min() == date(2023, 1, 1)
    assert frame["date"].max() <= date(2023, 4, 30)
    assert frame["date"].is_sorted()
    assert set(frame["product_id"].unique()) <= set(gt.product_ids)
    assert (frame["quantity"] != 0).all()
    assert frame["quantity"].abs().max() <= settings.generate.max_units_per_transaction
    assert (frame["unit_price"] > 0).all()
    assert ((frame["unit_price"] * 100).round(6) % 1 == 0).all()  # cents
    returns = frame.filter(pl.col("quantity") < 0).height
    assert 0.005 < returns / frame.height < 0.04  # return_rate 0.02

    catalog = pl.read_csv(out / "catalog.csv", schema_overrides={"product_id": pl.String})
    assert catalog.columns == ["product_id", "unit_cost", "min_price", "max_price", "category"]
    assert catalog["product_id"].to_list() == list(gt.product_ids)
    assert catalog["unit_cost"].to_list() == gt.unit_cost.tolist()
    assert catalog["min_price"].to_list() == gt.min_price.tolist()
    assert catalog["max_price"].to_list() == gt.max_price.tolist()
    assert set(catalog["category"]) == {"C01", "C02", "C03"}
    assert (catalog["unit_cost"] < catalog["min_price"]).all()


def test_ground_truth_round_trip(tiny):
    settings, _, out, gt = tiny
    payload = json.loads((out / "ground_truth.json").read_text())
    assert gt.to_dict() == payload
    drawn = draw_market(settings.generate)
    assert gt.product_ids == drawn.product_ids and gt.category == drawn.category
    for name in market.PRODUCT_FIELDS:
        np.testing.assert_array_equal(getattr(gt, name), getattr(drawn, name))
    assert gt.seed == 7 and payload["meta"]["n_days"] == 120
    assert gt.product_index(["P00003", "P00001"]).tolist() == [2, 0]
    with pytest.raises(DataError, match="product_id 'P99999' is not in the ground truth"):
        gt.product_index(["P99999"])


def test_load_ground_truth_errors(tmp_path, tiny):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=f"ground truth file not found: {missing}$"):
        market.load_ground_truth(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "formula": \n')
    with pytest.raises(DataError, match=f"{broken} is not valid JSON at line 3"):
        market.load_ground_truth(broken)
    payload = tiny[3].to_dict()
    del payload["products"][4]["elasticity"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"products\[4\]: missing key 'elasticity'$"):
        market.load_ground_truth(bad)
    payload["formula_version"] = 99
    bad.write_text(json.dumps(payload))
    with pytest.raises(DataError, match="version 99 is not"):
        market.load_ground_truth(bad)


def test_rows_do_not_depend_on_file_period_or_format(tmp_path, tiny):
    _, _, monthly, _ = tiny
    _generate(tmp_path / "weekly", **{"generate.file_period": "week",
                                      "generate.file_format": "parquet"})
    _generate(tmp_path / "gz", **{"generate.file_format": "csv.gz"})
    names = sorted(p.name for p in (tmp_path / "weekly" / "transactions").glob("transactions_*"))
    # 2023-01-01 is a Sunday: ISO week 2022-W52; 2023-04-30 is the Sunday of 2023-W17.
    assert names[0] == "transactions_2022-W52.parquet" and len(names) == 18
    reference = _read_transactions(monthly)
    assert _read_transactions(tmp_path / "weekly").equals(reference)
    assert _read_transactions(tmp_path / "gz").equals(reference)
    # Compressed and Parquet files are byte-identical on re-run too (no time in gzip headers).
    _generate(tmp_path / "weekly2", **{"generate.file_period": "week",
                                       "generate.file_format": "parquet"})
    _generate(tmp_path / "gz2", **{"generate.file_format": "csv.gz"})
    assert _files(tmp_path / "weekly2") == _files(tmp_path / "weekly")
    assert _files(tmp_path / "gz2") == _files(tmp_path / "gz")


def test_rerun_replaces_the_old_transaction_files(tmp_path):
    out = tmp_path / "raw"
    _generate(out, **{"generate.file_period": "week"})
    (out / "notes.txt").write_text("mine")
    _generate(out)
    names = sorted(p.name for p in (out / "transactions").glob("transactions_*"))
    assert names == [f"transactions_2023-0{m}.csv" for m in (1, 2, 3, 4)]
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_a_generate_killed_while_swapping_in_is_refused_until_rerun(tmp_path, monkeypatch):
    from pricing_cli.data import generate as generate_module
    from pricing_cli.data.raw_contract import INCOMPLETE_MARKER, read_catalog

    out = tmp_path / "raw"
    _generate(out, **{"generate.seed": 1})
    before = _files(out)
    # Killed after the new transactions/ is in place, before the catalog follows.
    real_replace = os.replace

    def killed_at_the_catalog(src, dst):
        if Path(dst).name == "catalog.csv":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(generate_module.os, "replace", killed_at_the_catalog)
    with pytest.raises(KeyboardInterrupt):
        _generate(out, **{"generate.seed": 2})
    monkeypatch.setattr(generate_module.os, "replace", real_replace)
    assert (out / INCOMPLETE_MARKER).exists()
    assert (out / "catalog.csv").read_bytes() == before["catalog.csv"]  # the old market's
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(DataError, match="interrupted while replacing this market") as info:
        read_catalog(out / "catalog.csv")
    assert "Re-run `pricectl generate`" in info.value.hint
    # The re-run completes the market: the same files as an uninterrupted run.
    _generate(out, **{"generate.seed": 2})
    _generate(tmp_path / "clean", **{"generate.seed": 2})
    assert not (out / INCOMPLETE_MARKER).exists()
    assert _files(out) == _files(tmp_path / "clean")


def test_a_generate_stopped_before_the_swap_keeps_the_old_market(tmp_path, monkeypatch):
    from pricing_cli.data.raw_contract import INCOMPLETE_MARKER

    out = tmp_path / "raw"
    _generate(out, **{"generate.seed": 1})
    before = _files(out)

    class StopAfterOneFile(RunMonitor):
        def update_bar(self, key, **kwargs):
            raise KeyboardInterrupt

    settings = load_settings(preset="tiny", environ={}, flags={
        "generate.output_dir": str(out), "generate.seed": 2})
    with pytest.raises(KeyboardInterrupt), StopAfterOneFile("generate", "quiet") as monitor:
        run_generate(settings, monitor)
    assert _files(out) == before
    assert not (out / INCOMPLETE_MARKER).exists()


def test_cli_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRICECTL_CONFIG", raising=False)
    code = cli.main(["--preset", "tiny", "--quiet", "generate", "--products", "3",
                     "--days", "20", "--seed", "3", "--output-dir", "gen"])
    assert code == 0
    catalog = pl.read_csv(tmp_path / "gen" / "catalog.csv")
    assert catalog["product_id"].to_list() == ["P00001", "P00002", "P00003"]
    assert json.loads((tmp_path / "gen" / "run.json").read_text())["summary"]["days"] == 20


def test_file_periods():
    assert file_periods(date(2023, 1, 30), 5, "month") == [("2023-01", 0, 2), ("2023-02", 2, 5)]
    assert file_periods(date(2023, 1, 1), 9, "week") == [
        ("2022-W52", 0, 1), ("2023-W01", 1, 8), ("2023-W02", 8, 9)]
    assert file_periods(date(2023, 1, 1), 2, "day") == [("2023-01-01", 0, 1),
                                                        ("2023-01-02", 1, 2)]


def test_split_units_sums_to_daily_units():
    units = np.array([0, 1, 7, 0, 30, 2])
    product, size = split_units(units, 4, np.random.default_rng(0))
    assert np.bincount(product, weights=size, minlength=6).tolist() == units.tolist()
    assert size.min() >= 1 and size.max() <= 4
    assert product.tolist() == sorted(product.tolist())
    # 30 units in transactions of mean size ~2.5 need between 8 and 30 transactions.
    assert 8 <= (product == 4).sum() < 30


# ----------------------------------------------------------------------------------------------
# The true demand function


def test_expected_units_matches_a_hand_computation(tiny):
    _, _, out, gt = tiny
    record = json.loads((out / "ground_truth.json").read_text())["products"][5]
    mkt = json.loads((out / "ground_truth.json").read_text())["market"]
    day = date(2023, 3, 11)  # a Saturday, day of year 70
    price = 1.37 * record["unit_cost"]
    wave = math.sin(2 * math.pi * (70 - record["season_phase"]) / 365.25)
    e = record["elasticity"] * (1 + mkt["elasticity_season"] * wave + mkt["elasticity_weekend"])
    units = (record["base_units"] * math.exp(record["season_amp"] * wave + mkt["dow_effect"][5])
             * (price / record["ref_price"]) ** (-e))
    assert market.elasticity(gt, 5, day) == pytest.approx(e, rel=1e-12)
    assert market.expected_units(gt, 5, day, price) == pytest.approx(units, rel=1e-12)
    assert market.expected_profit(gt, 5, day, price) == pytest.approx(
        (price - record["unit_cost"]) * units, rel=1e-12)
    assert market.optimal_price(gt, 5, day) == pytest.approx(
        min(max(record["unit_cost"] * e / (e - 1), record["min_price"]), record["max_price"]))


def test_calendar():
    doy, dow = market.calendar(["2023-01-01", "2024-12-31", "2023-03-11"])
    assert doy.tolist() == [1, 366, 70]
    assert dow.tolist() == [6, 1, 5]  # Sunday, Tuesday, Saturday


def _brute_force_optimum(gt, idx, day, points=20001):
    grid = np.linspace(gt.min_price[idx], gt.max_price[idx], points)
    return grid[np.argmax(market.expected_profit(gt, idx, day, grid))]


def test_optimal_price_equals_a_grid_search(tiny):
    settings, _, _, gt = tiny
    rng = np.random.default_rng(1)
    days = _days(settings.generate)
    for _ in range(60):
        idx = int(rng.integers(gt.n_products))
        day = days[rng.integers(len(days))]
        best = _brute_force_optimum(gt, idx, day)
        assert market.optimal_price(gt, idx, day) == pytest.approx(best, rel=1e-3)


def test_optimal_price_is_clipped_when_the_optimum_is_outside_the_band(tiny):
    gt = tiny[3]
    day = np.datetime64("2023-02-01")
    free = market.optimal_price(gt, np.arange(gt.n_products), day)
    narrow_high = dataclasses.replace(gt, max_price=free * 0.9)
    narrow_low = dataclasses.replace(gt, min_price=free * 1.1, max_price=free * 2.0)
    for variant, bound in ((narrow_high, free * 0.9), (narrow_low, free * 1.1)):
        clipped = market.optimal_price(variant, np.arange(gt.n_products), day)
        np.testing.assert_allclose(clipped, bound, rtol=1e-12)
        for idx in (0, 7):
            assert clipped[idx] == pytest.approx(_brute_force_optimum(variant, idx, day),
                                                 rel=1e-6)
    # Elasticity <= 1: profit rises with price, so the optimum is max_price.
    inelastic = dataclasses.replace(gt, elasticity=np.full(gt.n_products, 0.8))
    np.testing.assert_array_equal(market.optimal_price(inelastic, np.arange(gt.n_products), day),
                                  gt.max_price)


def test_elasticity_varies_by_product_season_and_weekday(tiny):
    settings, _, _, gt = tiny
    days = _days(settings.generate)
    e = market.elasticity(gt, np.arange(gt.n_products)[:, None], days[None, :])
    assert e.shape == (12, 120)
    _, dow = market.calendar(days)
    friday, saturday = np.nonzero(dow == 4)[0][0], np.nonzero(dow == 5)[0][0]
    assert saturday == friday + 1
    wave = np.sin(2 * np.pi * (market.calendar(days[saturday])[0] - gt.season_phase) / 365.25)
    np.testing.assert_allclose(e[:, saturday], gt.elasticity * (1 + 0.1 * wave - 0.08))
    assert (e[:, saturday] < e[:, friday]).all()  # weekend shoppers are less price-sensitive
    weekdays = e[:, dow < 5]
    assert (weekdays.max(axis=1) - weekdays.min(axis=1) > 0.02 * gt.elasticity).all()
    assert gt.elasticity.max() - gt.elasticity.min() > 0.3
    assert (e > 1.0).all()


def test_historical_prices_are_in_bounds_and_not_optimal(tiny):
    settings, _, out, gt = tiny
    cfg = settings.generate
    prices = historical_prices(gt, cfg)
    assert (prices >= gt.min_price[:, None]).all() and (prices <= gt.max_price[:, None]).all()
    days = _days(cfg)
    optimum = market.optimal_price(gt, np.arange(gt.n_products)[:, None], days[None, :])
    assert np.mean(np.abs(prices - optimum) / optimum) > 0.08
    # Interior optima for every product-day with these parameters.
    assert ((optimum > gt.min_price[:, None]) & (optimum < gt.max_price[:, None])).all()
    # Promotions and list changes: every product has several price levels.
    assert all(len(np.unique(row)) >= 2 for row in prices)
    # The files carry exactly these prices.
    frame = _read_transactions(out).filter(pl.col("quantity") > 0)
    idx = gt.product_index(frame["product_id"].to_numpy())
    day = (frame["date"].to_numpy().astype("datetime64[D]") - days[0]).astype(int)
    np.testing.assert_array_equal(frame["unit_price"].to_numpy(), prices[idx, day])


def test_sales_follow_the_true_demand(tiny):
    settings, _, out, gt = tiny
    cfg = settings.generate
    prices = historical_prices(gt, cfg)
    days = _days(cfg)
    expected = market.expected_units(gt, np.arange(gt.n_products)[:, None], days[None, :],
                                     prices)
    sold = _read_transactions(out).filter(pl.col("quantity") > 0)
    per_product = sold.group_by("product_id").agg(pl.col("quantity").sum()).sort("product_id")
    # Poisson: the total is within 4 standard deviations of its mean.
    assert abs(per_product["quantity"].sum() - expected.sum()) < 4 * math.sqrt(expected.sum())
    np.testing.assert_allclose(per_product["quantity"].to_numpy(), expected.sum(axis=1),
                               rtol=0.15)
