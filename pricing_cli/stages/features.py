"""`pricectl features`: raw transactions to one feature file per product.

Steps (docs/data-format.md has the details and which steps run in memory):

1. read and clean every transaction file in one streaming pass each (data/raw_contract.py),
   giving the daily sales per product;
2. fill zero-sale days: a full calendar per product from its first sale to the last day of
   the data, price carried forward;
3. past-only time-series features: lags, rolling mean/std (shifted by one day, so a day's
   units never enter its own features), the reference price and price relative to it,
   calendar and catalog features;
4. a chronological train/val/test split by date, warm-up rows (incomplete history) dropped;
5. scalers (mean/std) fit on train rows only and applied to every split as ``f_*`` columns;
6. one Parquet file per product, scalers.json and feature_manifest.json, written into a
   staged folder that replaces ``features.output_dir`` only when everything succeeded.

The file contract is "features → preprocess" in docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pricing_cli.config import FeaturesSettings, Settings
from pricing_cli.data.raw_contract import read_catalog, read_daily_sales, transaction_files
from pricing_cli.errors import ConfigError, DataError
from pricing_cli.monitor import RunMonitor
from pricing_cli.runinfo import StageResult
from pricing_cli.storage import check_output_dir, staged_dir, write_json

if TYPE_CHECKING:
    import polars as pl

SPLITS = ("train", "val", "test")
# Columns every product file carries before the f_* features, in this order (the contract).
RAW_COLUMNS = ("product_index", "product_id", "date", "split", "units", "price", "revenue",
               "n_transactions", "ref_price", "unit_cost", "min_price", "max_price", "category")
# Features computed from the day's own price: known when the demand of that price is modelled,
# but they reveal the price that was chosen, so a pricing state must leave them out.
CURRENT_PRICE_FEATURES = ("price", "price_rel_ref", "margin", "price_position")
# Products written per sink call: one progress step and one memory check each.
PRODUCTS_PER_CHUNK = 500


@dataclass(frozen=True)
class SplitBounds:
    """First day of each split; every date from ``first`` to ``last`` belongs to one split."""

    first: date
    val_start: date
    test_start: date
    last: date

    def ranges(self) -> dict[str, list[str]]:
        """{split: [first_date, last_date]} as ISO strings, for the manifest."""
        one = timedelta(days=1)
        return {"train": [self.first.isoformat(), (self.val_start - one).isoformat()],
                "val": [self.val_start.isoformat(), (self.test_start - one).isoformat()],
                "test": [self.test_start.isoformat(), self.last.isoformat()]}


def split_bounds(first: date, last: date, settings: FeaturesSettings) -> SplitBounds:
    """Where val and test start: the configured dates, else fractions of the date range.

    With fractions, test is the last ``round(n_days * test_fraction)`` days (at least one)
    and val the ``round(n_days * val_fraction)`` days (at least one) before it.

    Raises:
        ConfigError: the splits would be empty or out of order.
    """
    n_days = (last - first).days + 1
    test_start = settings.test_start or last - timedelta(
        days=max(1, round(n_days * settings.test_fraction)) - 1)
    val_start = settings.val_start or test_start - timedelta(
        days=max(1, round(n_days * settings.val_fraction)))
    if not first < val_start < test_start <= last:
        raise ConfigError(
            f"cannot split the data's dates {first}..{last} with val starting {val_start} "
            f"and test starting {test_start}: each split needs at least one day, in order",
            "Set features.val_start < features.test_start inside the data's date range, or "
            "adjust features.val_fraction / features.test_fraction.")
    return SplitBounds(first, val_start, test_start, last)


def feature_definitions(settings: FeaturesSettings) -> dict[str, pl.Expr]:
    """Name → past-only expression of every feature, in output order.

    The expressions assume rows sorted by date within each product, one per calendar day,
    and are evaluated per product (``.over("product_index")``). They need the columns
    ``units``, ``price``, ``date``, ``unit_cost``, ``min_price`` and ``max_price``.
    """
    import polars as pl

    units, price = pl.col("units"), pl.col("price")
    # Shifted by one day: the window ends yesterday, so today's units are never in it.
    past_units, past_price = units.shift(1), price.shift(1)
    features: dict[str, pl.Expr] = {}
    for lag in settings.lags:
        features[f"units_lag_{lag}"] = units.shift(lag)
        features[f"price_lag_{lag}"] = price.shift(lag)
    for window in settings.windows:
        features[f"units_mean_{window}"] = past_units.rolling_mean(window)
        features[f"units_std_{window}"] = past_units.rolling_std(window)
        features[f"price_mean_{window}"] = past_price.rolling_mean(window)
        features[f"price_std_{window}"] = past_price.rolling_std(window)
    features = {name: expr.over("product_index") for name, expr in features.items()}
    ref_price = pl.col("ref_price")
    weekday = pl.col("date").dt.weekday()  # Monday = 1 ... Sunday = 7
    day_of_year = pl.col("date").dt.ordinal_day()
    features.update({
        "price": price,
        "ref_price": ref_price,
        "price_rel_ref": price / ref_price,
        "dow_sin": (2 * math.pi * (weekday - 1) / 7).sin(),
        "dow_cos": (2 * math.pi * (weekday - 1) / 7).cos(),
        "doy_sin": (2 * math.pi * day_of_year / 365.25).sin(),
        "doy_cos": (2 * math.pi * day_of_year / 365.25).cos(),
        "is_weekend": (weekday >= 6).cast(pl.Float64),
        "unit_cost": pl.col("unit_cost"),
        "margin": (price - pl.col("unit_cost")) / price,
        # A product with min_price == max_price has one possible price: the middle.
        "price_position": pl.when(pl.col("max_price") > pl.col("min_price"))
        .then((price - pl.col("min_price")) / (pl.col("max_price") - pl.col("min_price")))
        .otherwise(0.5),
    })
    return features


def daily_panel(sales: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """Fill zero-sale days and attach the product index and catalog columns.

    Args:
        sales: ``DailySales.panel`` (product_id, date, units, revenue, price, n_transactions).
        catalog: from ``read_catalog``.

    Returns:
        One row per product and calendar day from the product's first sale to the last date
        of the data, sorted by product_index then date: the raw columns of the contract
        except ``split`` and ``ref_price``. Zero-sale days have units, revenue and
        n_transactions 0 and yesterday's price.
    """
    import polars as pl

    last_day = sales["date"].max()
    # product_index: position in the sorted product_ids that have sales (the contract).
    products = (sales.group_by("product_id").agg(pl.col("date").min().alias("first_day"))
                .sort("product_id")
                .with_row_index("product_index")
                .with_columns(pl.col("product_index").cast(pl.Int32)))
    calendar = products.select(
        "product_index", "product_id",
        pl.date_ranges("first_day", pl.lit(last_day, dtype=pl.Date)).alias("date"),
    ).explode("date")
    return (calendar.join(sales, on=["product_id", "date"], how="left")
            .join(catalog, on="product_id", how="left")
            .sort("product_index", "date")
            .with_columns(pl.col("units", "revenue").fill_null(0.0),
                          pl.col("n_transactions").fill_null(0),
                          pl.col("price").forward_fill().over("product_index")))


def feature_query(panel: pl.DataFrame, settings: FeaturesSettings, bounds: SplitBounds
                  ) -> tuple[pl.LazyFrame, list[str]]:
    """The lazy query that adds the split, ``ref_price`` and every feature to the daily panel
    (from :func:`daily_panel`) and drops warm-up rows.

    Returns:
        (query, feature names): the query yields the raw contract columns plus one unscaled
        Float64 column ``x_<name>`` per feature; rows with an incomplete history (a null
        feature) are dropped.
    """
    import polars as pl

    definitions = feature_definitions(settings)
    names = list(definitions)
    ref_price = (pl.col("price").shift(1).rolling_mean(settings.reference_window)
                 .over("product_index"))
    split = (pl.when(pl.col("date") >= bounds.test_start).then(pl.lit("test"))
             .when(pl.col("date") >= bounds.val_start).then(pl.lit("val"))
             .otherwise(pl.lit("train")))
    query = (panel.lazy()
             .with_columns(ref_price.alias("ref_price"), split.alias("split"))
             .with_columns(expr.cast(pl.Float64).alias(f"x_{name}")
                           for name, expr in definitions.items())
             .filter(pl.all_horizontal(pl.col(f"x_{n}").is_not_null() for n in names)))
    return query, names


def fit_scalers(frame: pl.DataFrame, names: list[str]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation (ddof 0) of each feature over the train rows only.

    Returns:
        ``{"f_<name>": {"column": name, "mean": m, "std": s}}``; ``s`` is 1.0 for a feature
        that is constant on train, so scaling never divides by zero.

    Raises:
        DataError: no train row is left after the warm-up.
    """
    import polars as pl

    train = frame.filter(pl.col("split") == "train")
    if train.height == 0:
        raise DataError(
            "no train rows are left after dropping the warm-up days (incomplete history)",
            "Use more history before features.val_start, or shorter features.lags / "
            "features.windows / features.reference_window.")
    stats = train.select(
        *[pl.col(f"x_{n}").mean().alias(f"mean_{n}") for n in names],
        *[pl.col(f"x_{n}").std(ddof=0).alias(f"std_{n}") for n in names],
    ).row(0, named=True)
    scalers: dict[str, dict[str, Any]] = {}
    for name in names:
        std = stats[f"std_{name}"]
        scalers[f"f_{name}"] = {"column": name, "mean": stats[f"mean_{name}"],
                                "std": std if std and std > 0 else 1.0}
    return scalers


def apply_scalers(frame: pl.DataFrame, scalers: dict[str, dict[str, Any]]) -> pl.DataFrame:
    """The contract's columns: raw columns in order, then ``f_*`` = (x - mean) / std, Float32."""
    import polars as pl

    raw_types = {"product_index": pl.Int32, "units": pl.Float64, "price": pl.Float64,
                 "revenue": pl.Float64, "n_transactions": pl.Int64, "ref_price": pl.Float64,
                 "unit_cost": pl.Float64, "min_price": pl.Float64, "max_price": pl.Float64}
    return frame.select(
        *[pl.col(c).cast(raw_types[c]) if c in raw_types else pl.col(c) for c in RAW_COLUMNS],
        *[((pl.col(f"x_{s['column']}") - s["mean"]) / s["std"]).cast(pl.Float32).alias(name)
          for name, s in scalers.items()],
    )


def product_file_name(product_index: int) -> str:
    return f"{product_index:05d}.parquet"


def write_product_files(frame: pl.DataFrame, products: pl.DataFrame, folder: Path,
                        monitor: RunMonitor) -> None:
    """Write one Parquet file per product into ``folder`` (the staged output folder).

    Args:
        frame: from :func:`apply_scalers`, sorted by product_index then date.
        products: ``product_index``, ``product_id`` of every product with sales; one whose
            rows were all warm-up gets a file with no rows, so indexes stay contiguous.
        folder: where the files go.
        monitor: bar ``products``; memory is checked between chunks.
    """
    import polars as pl

    def path_for(args: Any) -> str:
        if args.index_in_partition:  # a second file for one product would break the contract
            raise RuntimeError("a product's rows were split over several files")
        return product_file_name(int(args.partition_keys["product_index"][0]))

    monitor.add_bar("products", "product files", products.height)
    indexes = products["product_index"]
    for start in range(0, products.height, PRODUCTS_PER_CHUNK):
        chunk = indexes[start:start + PRODUCTS_PER_CHUNK]
        lo, hi = int(chunk[0]), int(chunk[-1])
        part = frame.filter(pl.col("product_index").is_between(lo, hi))
        if part.height:
            # One key per file, no size-based splitting: exactly one file per product.
            part.lazy().sink_parquet(
                pl.PartitionBy(folder, key="product_index", include_key=True,
                               file_path_provider=path_for, max_rows_per_file=None,
                               approximate_bytes_per_file=None),
                engine="streaming")
        written = set(part["product_index"].unique().to_list())
        for index in chunk.to_list():
            if index not in written:
                frame.clear().write_parquet(folder / product_file_name(index))
        monitor.update_bar("products", advance=len(chunk))
        monitor.check_memory()


def build_manifest(frame: pl.DataFrame, products: pl.DataFrame, bounds: SplitBounds,
                   scalers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """feature_manifest.json: columns, products with their rows per split, split dates, rows,
    scalers (the contract in docs/architecture.md), plus ``current_price_columns``."""
    import polars as pl

    counts = frame.group_by("product_index", "split").len()
    per_product: dict[int, dict[str, int]] = {}
    for index, split, n in counts.iter_rows():
        per_product.setdefault(index, dict.fromkeys(SPLITS, 0))[split] = n
    rows = {split: int(frame.filter(pl.col("split") == split).height) for split in SPLITS}
    return {
        "feature_columns": list(scalers),
        "raw_columns": list(RAW_COLUMNS),
        "current_price_columns": [f"f_{n}" for n in CURRENT_PRICE_FEATURES],
        "products": [
            {"product_index": index, "product_id": product_id,
             "file": product_file_name(index),
             "rows": per_product.get(index, dict.fromkeys(SPLITS, 0))}
            for index, product_id in products.select("product_index", "product_id").iter_rows()
        ],
        "splits": bounds.ranges(),
        "rows": rows,
        "scalers": scalers,
    }


def run_features(settings: Settings, monitor: RunMonitor) -> StageResult:
    """Run the features stage (see the module docstring).

    Returns:
        StageResult with summary ``transaction_rows``, ``bad_rows``, ``products``,
        ``product_days`` {split: rows}, ``feature_columns``, and one note per file that had
        bad rows.

    Raises:
        MissingInputError: no transaction files or no catalog.
        DataError: unreadable input or too many bad rows (see data/raw_contract.py); nothing
            is written and the previous output stays as it was.
        ConfigError: the split dates do not fit the data.
    """
    import polars as pl

    data, config = settings.data, settings.features
    files = transaction_files(data.transactions)
    output_dir = Path(config.output_dir)
    # before any work: a wrong --output-dir must not cost a full read to find out
    check_output_dir(output_dir, "features", [*files, Path(data.catalog)])
    catalog = read_catalog(data.catalog, data.catalog_columns)
    monitor.log(f"reading {len(files)} transaction file(s) and {catalog.height:,} catalog "
                f"products")
    sales = read_daily_sales(data, catalog, files, monitor)
    monitor.log(f"read {sales.transaction_rows:,} transaction rows ({sales.bad_rows:,} bad, "
                f"skipped; {sales.outside_catalog:,} of products outside the catalog, skipped) "
                f"into {sales.panel.height:,} product-days with sales")

    panel = daily_panel(sales.panel, catalog)
    first_day, last_day = panel.select(pl.col("date").min().alias("first"),
                                       pl.col("date").max().alias("last")).row(0)
    bounds = split_bounds(first_day, last_day, config)
    products = panel.select("product_index", "product_id").unique("product_index").sort(
        "product_index")
    monitor.log(f"filled zero-sale days: {panel.height:,} product-days for "
                f"{products.height:,} products; splits {bounds.ranges()}")
    monitor.set_worker("features", "lags, rolling windows, calendar and catalog features")
    query, names = feature_query(panel, config, bounds)
    # The per-product windows need each product's rows together: the streaming engine runs
    # them as memory-intensive nodes on the daily panel (docs/data-format.md, "in memory").
    features = query.collect(engine="streaming")
    del panel
    scalers = fit_scalers(features, names)
    frame = apply_scalers(features, scalers)
    del features
    monitor.clear_workers()
    monitor.check_memory()
    monitor.log(f"{len(names)} features; {frame.height:,} rows after the warm-up; scalers fit "
                f"on {frame.filter(pl.col('split') == 'train').height:,} train rows")

    manifest = build_manifest(frame, products, bounds, scalers)
    with staged_dir(output_dir, owner="features") as staging:
        write_product_files(frame, products, staging, monitor)
        write_json(staging / "scalers.json", scalers)
        write_json(staging / "feature_manifest.json", manifest)
    monitor.log(f"wrote {products.height:,} product files to {output_dir}")

    empty = [p["product_id"] for p in manifest["products"] if not sum(p["rows"].values())]
    notes = [report.note() for report in sales.reports
             if report.bad_rows or report.outside_catalog]
    if empty:
        notes.append(f"{len(empty)} product(s) have only warm-up days and empty files: "
                     + ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    return StageResult(
        stage="features",
        output_dir=output_dir,
        inputs=[*files, Path(data.catalog)],
        summary={
            "transaction_rows": sales.transaction_rows,
            "bad_rows": sales.bad_rows,
            "outside_catalog_rows": sales.outside_catalog,
            "products": products.height,
            "product_days": manifest["rows"],
            "feature_columns": len(scalers),
        },
        notes=notes,
    )
