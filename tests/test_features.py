"""`pricectl features`: the file contract, a pandas reference, no leakage, streaming plans,
and no partial output on failure."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from bench.pandas_features import pandas_features
from pricing_cli.cli import main
from pricing_cli.config import load_settings
from pricing_cli.data.raw_contract import (
    file_queries,
    read_catalog,
    read_daily_sales,
    scan_transaction_file,
    transaction_files,
)
from pricing_cli.errors import ConfigError, DataError
from pricing_cli.monitor import RunMonitor
from pricing_cli.stages.features import (
    RAW_COLUMNS,
    daily_panel,
    feature_query,
    run_features,
    split_bounds,
)
from tests.support.streaming import fallback_nodes

FIXTURES = Path(__file__).parent / "fixtures" / "raw"
START = date(2023, 1, 1)
N_DAYS = 70
# The tiny preset: lags [1, 7], windows [7], reference window 14.
TINY_FEATURES = ["units_lag_1", "price_lag_1", "units_lag_7", "price_lag_7", "units_mean_7",
                 "units_std_7", "price_mean_7", "price_std_7", "price", "ref_price",
                 "price_rel_ref", "dow_sin", "dow_cos", "doy_sin", "doy_cos", "is_weekend",
                 "unit_cost", "margin", "price_position"]


def write_market(folder: Path, seed: int = 0, n_products: int = 5) -> None:
    """A few hundred transactions in two monthly CSVs plus a catalog.

    Products start on staggered days; about one day in five has no sales; one in ten rows
    is a return. The last product starts 5 days before the end, so all its days are warm-up.
    """
    rng = np.random.default_rng(seed)
    (folder / "transactions").mkdir(parents=True, exist_ok=True)
    ids = [f"SKU-{i:02d}" for i in range(n_products)]
    pd.DataFrame({"product_id": ids, "unit_cost": np.round(rng.uniform(1, 3, n_products), 2),
                  "min_price": 4.0, "max_price": 9.0,
                  "category": ["snacks", "drinks"] * (n_products // 2) + ["snacks"]
                  * (n_products % 2)}).to_csv(folder / "catalog.csv", index=False)
    rows = []
    for p, product_id in enumerate(ids):
        first = N_DAYS - 5 if p == n_products - 1 else 3 * p
        for day in range(first, N_DAYS):
            if day > first and rng.random() < 0.2:
                continue
            list_price = rng.uniform(4, 9)
            for _ in range(rng.integers(1, 5)):
                quantity = int(rng.integers(1, 5)) * (-1 if rng.random() < 0.1 else 1)
                rows.append((START + timedelta(days=day), product_id, quantity,
                             round(list_price + rng.normal(0, 0.1), 2)))
    tx = pd.DataFrame(rows, columns=["date", "product_id", "quantity", "unit_price"])
    month = pd.to_datetime(tx["date"]).dt.month
    tx[month == 1].to_csv(folder / "transactions" / "2023-01.csv", index=False)
    tx[month != 1].to_csv(folder / "transactions" / "2023-02.csv", index=False)


def settings_for(raw: Path, out: Path, **features):
    flags = {"data.transactions": str(raw / "transactions" / "*.csv"),
             "data.catalog": str(raw / "catalog.csv"), "features.output_dir": str(out),
             **{f"features.{k}": v for k, v in features.items()}}
    return load_settings(preset="tiny", flags=flags, environ={})


def run(settings):
    with RunMonitor("features", "quiet") as monitor:
        return run_features(settings, monitor)


def read_all(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("*.parquet"))])


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    write_market(root / "raw")
    result = run(settings_for(root / "raw", root / "features"))
    return root, result


# ----------------------------------------------------------------------------------------------
# The contract with preprocess


def test_output_follows_the_features_contract(market):
    root, result = market
    out = root / "features"
    manifest = json.loads((out / "feature_manifest.json").read_text())
    feature_columns = [f"f_{n}" for n in TINY_FEATURES]
    assert manifest["feature_columns"] == feature_columns
    assert manifest["raw_columns"] == list(RAW_COLUMNS)
    assert [p["product_id"] for p in manifest["products"]] == [f"SKU-{i:02d}" for i in range(5)]
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{i:05d}.parquet" for i in range(5)]
    expected_schema = {"product_index": pl.Int32, "product_id": pl.String, "date": pl.Date,
                       "split": pl.String, "units": pl.Float64, "price": pl.Float64,
                       "revenue": pl.Float64, "n_transactions": pl.Int64,
                       "ref_price": pl.Float64, "unit_cost": pl.Float64,
                       "min_price": pl.Float64, "max_price": pl.Float64, "category": pl.String,
                       **dict.fromkeys(feature_columns, pl.Float32)}
    last_day = START + timedelta(days=N_DAYS - 1)
    for entry in manifest["products"]:
        frame = pl.read_parquet(out / entry["file"])
        assert dict(frame.schema) == expected_schema
        counts = frame["split"].value_counts()
        assert {s: int(counts.filter(pl.col("split") == s)["count"].sum())
                for s in ("train", "val", "test")} == entry["rows"]
        if frame.height:
            assert frame["product_index"].unique().to_list() == [entry["product_index"]]
            # One row per calendar day up to the last day of the data, chronological splits.
            days = frame["date"].to_list()
            assert days == [days[0] + timedelta(days=i) for i in range(len(days))]
            assert days[-1] == last_day
            assert frame["split"].to_list() == sorted(frame["split"].to_list(),
                                                      key=["train", "val", "test"].index)
    # 70 days: test = last round(10.5) = 10 days, val = the 10 before.
    assert manifest["splits"] == {"train": ["2023-01-01", "2023-02-19"],
                                  "val": ["2023-02-20", "2023-03-01"],
                                  "test": ["2023-03-02", "2023-03-11"]}
    # The last product's 5 days are all warm-up: its file is empty, and the run says so.
    assert manifest["products"][4]["rows"] == {"train": 0, "val": 0, "test": 0}
    assert result.notes == ["1 product(s) have only warm-up days and empty files: SKU-04"]
    assert result.summary["products"] == 5
    assert result.summary["product_days"] == manifest["rows"]
    assert result.summary["feature_columns"] == len(TINY_FEATURES)
    assert result.summary["bad_rows"] == 0
    # Scalers are fit on train: there every f_* has mean 0 and std 1 (ddof 0).
    train = read_all(out).filter(pl.col("split") == "train")
    stats = train.select(*[pl.col(c).cast(pl.Float64).mean().alias(f"m{c}") for c in
                           feature_columns], *[pl.col(c).cast(pl.Float64).std(ddof=0)
                                               .alias(f"s{c}") for c in feature_columns])
    for column in feature_columns:
        assert abs(stats[f"m{column}"][0]) < 1e-5, column
        assert abs(stats[f"s{column}"][0] - 1) < 1e-5, column
    scalers = json.loads((out / "scalers.json").read_text())
    assert scalers == manifest["scalers"] and sorted(scalers) == sorted(feature_columns)


# ----------------------------------------------------------------------------------------------
# The features match an independent pandas implementation (bench/pandas_features.py)


def test_features_match_an_independent_pandas_implementation(market):
    root, _ = market
    frame = read_all(root / "features")  # no pyarrow here: convert column by column
    got = pd.DataFrame({column: frame[column].to_numpy() for column in frame.columns})
    want = pandas_features(root / "raw")
    assert len(got) == len(want) > 100
    assert got["product_id"].tolist() == want["product_id"].tolist()
    assert got["split"].tolist() == want["split"].tolist()
    assert (got["date"].astype("datetime64[ns]") == want["date"]).all()
    for column in ["product_index", "units", "price", "revenue", "n_transactions", "ref_price",
                   "unit_cost", "min_price", "max_price"]:
        np.testing.assert_allclose(got[column].to_numpy(float), want[column].to_numpy(float),
                                   rtol=1e-9, err_msg=column)
    assert got["category"].tolist() == want["category"].tolist()
    for name in TINY_FEATURES:
        # f_* are Float32: compare at float32 precision.
        np.testing.assert_allclose(got[f"f_{name}"].to_numpy(float),
                                   want[f"f_{name}"].to_numpy(float), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


# ----------------------------------------------------------------------------------------------
# No leakage from val/test into train


def test_val_and_test_rows_do_not_change_train_features_or_scalers(tmp_path):
    raw = tmp_path / "raw"
    write_market(raw, seed=3)
    split = {"val_start": "2023-02-20", "test_start": "2023-03-02"}
    run(settings_for(raw, tmp_path / "before", **split))
    for path in (raw / "transactions").glob("*.csv"):
        tx = pd.read_csv(path)
        later = pd.to_datetime(tx["date"]) >= pd.Timestamp(split["val_start"])
        assert later.any() or path.name == "2023-01.csv"
        tx.loc[later, "quantity"] *= 100
        tx.to_csv(path, index=False)
    run(settings_for(raw, tmp_path / "after", **split))

    before, after = read_all(tmp_path / "before"), read_all(tmp_path / "after")
    assert (json.loads((tmp_path / "before" / "scalers.json").read_text())
            == json.loads((tmp_path / "after" / "scalers.json").read_text()))
    train_before = before.filter(pl.col("split") == "train")
    assert train_before.height > 100
    assert train_before.equals(after.filter(pl.col("split") == "train"))
    # ... while val/test did change, so the comparison above could have failed.
    assert not before.filter(pl.col("split") == "val")["units"].equals(
        after.filter(pl.col("split") == "val")["units"])


# ----------------------------------------------------------------------------------------------
# Streaming plans


def test_scan_and_aggregation_run_on_the_streaming_engine_without_fallback():
    data = load_settings(preset="tiny", flags={"data.catalog": str(FIXTURES / "catalog.csv")},
                         environ={}).data
    ids = read_catalog(FIXTURES / "catalog.csv")["product_id"]
    parsed = scan_transaction_file(FIXTURES / "bad_price.csv", data, ids)
    for query in file_queries(parsed, 5):
        assert "multi-scan[csv]" in query.show_graph(
            engine="streaming", plan_stage="physical", raw_output=True)
        assert fallback_nodes(query) == []
    # The check can fail: a per-group top-k does fall back in polars 2.1.
    fallback = parsed.group_by("product_id").agg(pl.col("_line").bottom_k(2))
    assert len(fallback_nodes(fallback)) == 1


def test_feature_windows_run_on_the_streaming_engine_without_fallback(market):
    root, _ = market
    settings = settings_for(root / "raw", root / "unused")
    catalog = read_catalog(settings.data.catalog)
    sales = read_daily_sales(settings.data, catalog, transaction_files(settings.data.transactions))
    panel = daily_panel(sales.panel, catalog)
    bounds = split_bounds(panel["date"].min(), panel["date"].max(), settings.features)
    query, _ = feature_query(panel, settings.features, bounds)
    assert fallback_nodes(query) == []


# ----------------------------------------------------------------------------------------------
# Splits and failures


def test_split_bounds_from_fractions_and_dates():
    features = load_settings(preset="tiny", environ={}).features
    bounds = split_bounds(date(2023, 1, 1), date(2023, 4, 10), features)  # 100 days
    assert (bounds.val_start, bounds.test_start) == (date(2023, 3, 12), date(2023, 3, 27))
    fixed = load_settings(flags={"features.val_start": "2023-02-01",
                                 "features.test_start": "2023-03-01"}, environ={}).features
    bounds = split_bounds(date(2023, 1, 1), date(2023, 4, 10), fixed)
    assert (bounds.val_start, bounds.test_start) == (date(2023, 2, 1), date(2023, 3, 1))
    wrong = load_settings(flags={"features.val_start": "2023-03-01",
                                 "features.test_start": "2023-02-01"}, environ={}).features
    with pytest.raises(ConfigError, match="each split needs at least one day"):
        split_bounds(date(2023, 1, 1), date(2023, 4, 10), wrong)


def test_failed_run_leaves_the_previous_output_untouched(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "features"
    write_market(raw)
    run(settings_for(raw, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (raw / "transactions" / "2023-03.csv").write_bytes((FIXTURES / "not_utf8.csv").read_bytes())
    with pytest.raises(DataError, match="2023-03.csv is not UTF-8 text"):
        run(settings_for(raw, out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features", "raw"]  # no temp folder


def test_cli_reports_bad_rows_and_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_market(tmp_path / "raw")
    bad = tmp_path / "raw" / "transactions" / "2023-01.csv"
    lines = bad.read_text().splitlines()
    lines[2] = "2023-01-01,SKU-00,1,free"
    bad.write_text("\n".join(lines) + "\n")
    args = ["--preset", "tiny", "--quiet", "features", "--transactions",
            "raw/transactions/*.csv", "--catalog", "raw/catalog.csv", "--output-dir", "out"]
    monkeypatch.setenv("PRICECTL_DATA__MAX_BAD_FRACTION", "0.001")
    assert main(args) == 4  # the data error code
    err = capsys.readouterr().err
    assert (f"raw/transactions/2023-01.csv: 1 of {len(lines) - 1} rows" in err
            and "raw/transactions/2023-01.csv:3: cannot read unit_price 'free' as a number"
            in err)
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("PRICECTL_DATA__MAX_BAD_FRACTION")  # default 1%: skipped, reported
    assert main(["--json", *args[:2], *args[3:]]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["bad_rows"] == 1 and summary["products"] == 5
    assert (tmp_path / "out" / "run.json").is_file()
