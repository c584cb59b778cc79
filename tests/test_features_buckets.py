"""`pricectl features` in product buckets: the same bytes for any bucket count, the count as
documented, exact scalers, and the config key's checks."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli.config import load_settings
from pricing_cli.data.generate import run_generate
from pricing_cli.data.raw_contract import read_catalog, read_transaction_sums, transaction_files
from pricing_cli.errors import ConfigError
from pricing_cli.monitor import RunMonitor
from pricing_cli.stages.features import (
    TrainMoments,
    assign_buckets,
    bucket_count,
    bucket_query,
    product_table,
    run_features,
    split_bounds,
)
from tests.support.streaming import fallback_nodes


def tiny_settings(root: Path, **flags):
    paths = {"generate.output_dir": str(root / "raw"),
             "data.transactions": str(root / "raw" / "transactions" / "*.csv"),
             "data.catalog": str(root / "raw" / "catalog.csv")}
    return load_settings(preset="tiny", flags={**paths, **flags}, environ={})


@pytest.fixture(scope="module")
def tiny_market(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    with RunMonitor("generate", "quiet") as monitor:
        run_generate(tiny_settings(root), monitor)
    return root


def run_with(root: Path, out: str, buckets: int | str):
    settings = tiny_settings(root, **{"features.output_dir": str(root / out),
                                      "features.buckets": buckets})
    with RunMonitor("features", "quiet") as monitor:
        return run_features(settings, monitor)


def test_bucketed_features_are_byte_identical_to_one_bucket(tiny_market):
    one = run_with(tiny_market, "one", 1)
    three = run_with(tiny_market, "three", 3)
    assert (one.summary["buckets"], three.summary["buckets"]) == (1, 3)
    names = sorted(p.name for p in (tiny_market / "one").iterdir() if p.name != "run.json")
    assert names == sorted(p.name for p in (tiny_market / "three").iterdir()
                           if p.name != "run.json")
    assert len([n for n in names if n.endswith(".parquet")]) == 12  # one file per product
    assert ".scratch" not in names
    for name in names:
        assert (tiny_market / "one" / name).read_bytes() == (
            tiny_market / "three" / name).read_bytes(), name
    # more buckets than products: one per product, still the same bytes
    many = run_with(tiny_market, "many", 50)
    assert many.summary["buckets"] == 12
    for name in names:
        assert (tiny_market / "one" / name).read_bytes() == (
            tiny_market / "many" / name).read_bytes(), name


def test_a_bucket_runs_on_the_streaming_engine_without_fallback(tiny_market, tmp_path):
    settings = tiny_settings(tiny_market)
    catalog = read_catalog(settings.data.catalog)
    parts: list[pl.DataFrame] = []
    read_transaction_sums(settings.data, catalog, transaction_files(settings.data.transactions),
                          parts.append)
    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"sums_{i}.parquet")
        part.sort("product_id", "date").write_parquet(files[-1])
    sales = pl.concat(parts)
    last_day = sales["date"].max()
    products = assign_buckets(product_table(sales, last_day), 3)
    bounds = split_bounds(products["first_day"].min(), last_day, settings.features)
    members = products.filter(pl.col("bucket") == 1)
    query = bucket_query(files, members, catalog, last_day, settings.features, bounds)
    dot = query.show_graph(engine="streaming", plan_stage="physical", raw_output=True)
    assert "multi-scan[parquet]" in dot
    assert fallback_nodes(query) == []
    assert set(query.collect()["product_id"]) == set(members["product_id"])


def test_buckets_are_consecutive_products_with_balanced_days():
    sales = pl.DataFrame({"product_id": ["a", "b", "c", "d", "e"],
                          "date": pl.date_range(pl.date(2024, 1, 1), pl.date(2024, 1, 5),
                                                eager=True)})
    products = product_table(sales, sales["date"].max())
    assert products["days"].to_list() == [5, 4, 3, 2, 1]  # first sale to the last day
    # 15 days in 2 buckets: a (days 0-4) and b (5-8) start before 7.5, c, d, e after
    assert assign_buckets(products, 2)["bucket"].to_list() == [0, 0, 1, 1, 1]
    assert assign_buckets(products, 1)["bucket"].to_list() == [0] * 5


@pytest.mark.parametrize(("rows", "products", "setting", "budget", "expected"), [
    (766_500, 7_300, "auto", None, 4),           # the full preset: ceil(766,500 / 200,000)
    (3_066_000, 29_200, "auto", None, 16),       # 4x its products
    (383_250, 3_650, "auto", None, 2),           # 1/2x
    (200_000, 1_000, "auto", None, 1),           # exactly one bucket's worth
    (200_001, 1_000, "auto", None, 2),
    (766_500, 7_300, "auto", 640 * 2**20, 4),    # (640 - 384) MiB / 1 KiB = 262,144 rows:
    (766_500, 7_300, "auto", 512 * 2**20, 6),    # > 200,000, so the default; 512 MiB: 131,072
    (766_500, 7_300, "auto", 100 * 2**20, 39),   # below 384 MiB: the 20,000-row floor
    (766_500, 7_300, 7, None, 7),                # a number is used as it is ...
    (766_500, 5, 7, None, 5),                    # ... but never more than one per product
    (10, 3, "auto", None, 1),
])
def test_bucket_count_follows_size_and_budget(rows, products, setting, budget, expected):
    assert bucket_count(rows, products, setting, budget) == expected


def test_scalers_are_exact_and_independent_of_how_rows_are_split():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.lognormal(3, 2, 5000), [0.0, 1e-300, -2.5e150, 1e-17]])
    frame = pl.DataFrame({"x_a": values, "x_b": np.full(values.size, 0.1)})
    whole = TrainMoments(["a", "b"])
    whole.add(frame)
    pieces = TrainMoments(["a", "b"])
    for part in (frame[:7], frame[7:4000], frame[4000:]):
        pieces.add(part.reverse())
    assert whole.scalers() == pieces.scalers()
    scalers = whole.scalers()
    # brute force with exact rationals: mean and variance correctly rounded
    mean = statistics.fmean(values)  # fsum-based: correctly rounded sum, then divided
    assert math.isclose(scalers["f_a"]["mean"], mean, rel_tol=1e-15)
    from fractions import Fraction
    exact = [Fraction(v) for v in values.tolist()]
    exact_mean = sum(exact) / len(exact)
    assert scalers["f_a"]["mean"] == float(exact_mean)
    variance = sum((v - exact_mean) ** 2 for v in exact) / len(exact)
    assert scalers["f_a"]["std"] == math.sqrt(float(variance))
    # a constant feature: std 1.0, so scaling never divides by zero
    assert scalers["f_b"] == {"column": "b", "mean": 0.1, "std": 1.0}


def test_config_typo_in_buckets_gets_a_suggestion(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("features:\n  bukets: 4\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config, environ={})
    assert caught.value.message == f"unknown config key 'features.bukets' in {config}"
    assert caught.value.hint.startswith("did you mean 'features.buckets'?")
    for bad in (0, "many"):
        with pytest.raises(ConfigError):
            load_settings(flags={"features.buckets": bad}, environ={})
    assert load_settings(flags={"features.buckets": "4"}, environ={}).features.buckets == 4
    assert load_settings(environ={}).features.buckets == "auto"
