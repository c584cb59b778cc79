"""`pricectl features`: raw transactions to one feature file per product.

Steps (docs/data-format.md has the details and which steps run in memory):

1. read and clean every transaction file in one streaming pass each (data/raw_contract.py);
   each file's daily sums per product go to a scratch Parquet file, so no step holds the
   sales of every product at once;
2. split the products into buckets of consecutive product_ids with about the same number of
   product-days (:func:`bucket_count` says how many, from the size and ``--max-memory``);
3. per bucket, on the streaming engine: fill zero-sale days (a full calendar per product from
   its first sale to the last day of the data, price carried forward), add the past-only
   time-series features (lags, rolling mean/std shifted by one day, so a day's units never
   enter its own features; the reference price and price relative to it; calendar and
   catalog features), the chronological train/val/test split, drop warm-up rows (incomplete
   history), and write the unscaled features to scratch; the train rows' exact sums and sums
   of squares are added up (:class:`TrainMoments`);
4. scalers (mean/std) from those sums: train rows only, and the same bits for any bucketing;
5. per bucket again: scale every split into ``f_*`` columns and write one Parquet file per
   product; then scalers.json and feature_manifest.json, all in a staged folder that replaces
   ``features.output_dir`` only when everything succeeded (made durable with one syncfs, not
   one fsync per file).

The file contract is "features → preprocess" in docs/architecture.md. The bucketing changes
memory and time only: the output files are the same bytes for any number of buckets.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pricing_cli.config import FeaturesSettings, Settings, parse_size
from pricing_cli.data.raw_contract import (
    combine_daily_sums,
    no_good_rows,
    read_catalog,
    read_transaction_sums,
    transaction_files,
)
from pricing_cli.errors import ConfigError, DataError
from pricing_cli.monitor import RunMonitor
from pricing_cli.runinfo import StageResult
from pricing_cli.stages.batches import SPLITS  # the one list of split names
from pricing_cli.storage import check_output_dir, staged_dir, write_json

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

# Columns every product file carries before the f_* features, in this order (the contract).
RAW_COLUMNS = ("product_index", "product_id", "date", "split", "units", "price", "revenue",
               "n_transactions", "ref_price", "unit_cost", "min_price", "max_price", "category")
# Features computed from the day's own price: known when the demand of that price is modelled,
# but they reveal the price that was chosen, so a pricing state must leave them out.
CURRENT_PRICE_FEATURES = ("price", "price_rel_ref", "margin", "price_position")
# Products written per sink call: one progress step and one memory check each.
PRODUCTS_PER_CHUNK = 500
# How many buckets `features.buckets: auto` makes (bucket_count; docs/scaling.md, "features in
# buckets", has the measurements behind these numbers).
BUCKET_ROWS = 200_000
"""Product-days of the daily panel per bucket when no memory budget is set."""
BYTES_PER_BUCKET_ROW = 1024
"""Peak memory one product-day of a bucket adds while its features are built and written
(measured: about 600 bytes at the full preset; rounded up)."""
BASE_BYTES = 384 * 2**20
"""What features holds besides one bucket: interpreter, Polars, catalog, the reading pass."""
MIN_BUCKET_ROWS = 20_000
"""Smallest bucket a tight budget gets: below this, per-bucket overhead dominates."""
SCRATCH_DIR = ".scratch"
"""Inside the staged output folder: the files' daily sums and each bucket's unscaled features,
removed before the folder is renamed into place (and swept with it after a kill)."""


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


def product_table(sales: pl.LazyFrame | pl.DataFrame, last_day: date) -> pl.DataFrame:
    """Every product with sales: ``product_index`` (Int32, its position in the sorted
    product_ids, the contract), ``product_id``, ``first_day`` (its first sale) and ``days``
    (Int64, its rows in the daily panel: first_day to ``last_day``).

    Args:
        sales: rows with ``product_id`` and ``date`` (any number per product).
        last_day: the last date of the data.
    """
    import polars as pl

    return (sales.lazy().group_by("product_id").agg(pl.col("date").min().alias("first_day"))
            .sort("product_id")
            .with_row_index("product_index")
            .with_columns(pl.col("product_index").cast(pl.Int32),
                          ((pl.lit(last_day, dtype=pl.Date) - pl.col("first_day")).dt.total_days()
                           + 1).cast(pl.Int64).alias("days"))
            .collect())


def panel_query(sales: pl.LazyFrame, products: pl.DataFrame, catalog: pl.DataFrame,
                last_day: date) -> pl.LazyFrame:
    """The daily panel of ``products`` (rows of :func:`product_table`) as a lazy query: zero-sale
    days filled, product index and catalog columns attached.

    Args:
        sales: ``DailySales.panel`` rows (product_id, date, units, revenue, price,
            n_transactions); rows of other products are left out by the join.
        products: from :func:`product_table`, all of them or one bucket's.
        catalog: from ``read_catalog``.
        last_day: the last date of the whole data (not of these products).

    Returns:
        One row per product and calendar day from the product's first sale to ``last_day``,
        sorted by product_index then date: the raw columns of the contract except ``split``
        and ``ref_price``. Zero-sale days have units, revenue and n_transactions 0 and
        yesterday's price.
    """
    import polars as pl

    calendar = products.lazy().select(
        "product_index", "product_id",
        pl.date_ranges("first_day", pl.lit(last_day, dtype=pl.Date)).alias("date"),
    ).explode("date")
    return (calendar.join(sales, on=["product_id", "date"], how="left")
            .join(catalog.lazy(), on="product_id", how="left")
            .sort("product_index", "date")
            .with_columns(pl.col("units", "revenue").fill_null(0.0),
                          pl.col("n_transactions").fill_null(0),
                          pl.col("price").forward_fill().over("product_index")))


def daily_panel(sales: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """:func:`panel_query` of every product in ``sales`` (``DailySales.panel``), collected:
    the whole panel in memory (the stage itself builds it per bucket)."""
    last_day = cast(date, sales["date"].max())
    products = product_table(sales, last_day)
    return panel_query(sales.lazy(), products, catalog, last_day).collect(engine="streaming")


def bucket_count(panel_rows: int, n_products: int, setting: int | str,
                 budget_bytes: int | None) -> int:
    """How many buckets the products are split into.

    ``setting`` (``features.buckets``) a number: that many (at most one per product).
    ``"auto"``: enough that a bucket has at most ``BUCKET_ROWS`` (200,000) product-days; with a
    memory budget (``--max-memory``), at most ``(budget - BASE_BYTES) / BYTES_PER_BUCKET_ROW``
    product-days ((budget - 384 MiB) / 1 KiB), but never under ``MIN_BUCKET_ROWS`` (20,000).
    E.g. the full preset (766,500 product-days) gets 4 buckets, 8 with ``--max-memory 640MB``;
    four times its products 16.

    Args:
        panel_rows: product-days of the whole daily panel (zero-sale days included).
        n_products: products with sales.
        setting: ``features.buckets``.
        budget_bytes: ``--max-memory`` in bytes, or None.
    """
    if setting != "auto":
        return max(1, min(int(setting), n_products))
    rows = BUCKET_ROWS
    if budget_bytes is not None:
        rows = min(rows, max(MIN_BUCKET_ROWS, (budget_bytes - BASE_BYTES) // BYTES_PER_BUCKET_ROW))
    return max(1, min(n_products, math.ceil(panel_rows / rows)))


def assign_buckets(products: pl.DataFrame, n_buckets: int) -> pl.DataFrame:
    """``products`` (from :func:`product_table`) with a ``bucket`` column (Int64, 0..n-1):
    consecutive product_indexes, about ``sum(days) / n_buckets`` product-days each (a product
    goes to the bucket its first product-day falls in)."""
    import polars as pl

    total = max(1, int(products["days"].sum()))
    before = pl.col("days").cum_sum() - pl.col("days")
    return products.with_columns((before * n_buckets // total).alias("bucket"))


# ----------------------------------------------------------------------------------------------
# Scalers from exact sums: the same bits whatever the bucketing or the order of the rows

# Sums are kept as integers in units of 2**-_SHIFT (2**-_SHIFT2 for squares): below the last
# bit of any float64 (frexp's exponent is >= -1073, mantissas have 53 bits), so adding is exact.
_SHIFT = 1200
_SHIFT2 = 2 * _SHIFT
# bincount adds in float64; its partial sums stay exact integers below 2**53 when at most
# 2**25 values of below 2**27 go into one call.
_BINCOUNT_CHUNK = 1 << 25
# Dekker's exact square holds where neither x*x nor the split's pieces over- or underflow.
_DEKKER_RANGE = (2.0**-450, 2.0**450)
_FLOAT_MAX = Fraction(1.7976931348623157e308)


def _exact_sum(values: np.ndarray, shift: int = _SHIFT) -> int:
    """The exact sum of finite float64 ``values``, as an integer count of ``2**-shift``."""
    import numpy as np

    mantissa, exponent = np.frexp(values)
    digits = (mantissa * 2.0**53).astype(np.int64)  # exact: |digits| < 2**53
    power = exponent.astype(np.int64) - 53 + shift  # values = digits * 2**(power - shift)
    high, low = digits >> 26, digits & ((1 << 26) - 1)  # digits = high * 2**26 + low
    total = 0
    for start in range(0, len(values), _BINCOUNT_CHUNK):
        part = slice(start, start + _BINCOUNT_CHUNK)
        offset = int(power[part].min())
        bins = power[part] - offset
        highs = np.bincount(bins, weights=high[part])
        lows = np.bincount(bins, weights=low[part])
        for index in np.flatnonzero((highs != 0) | (lows != 0)):
            total += ((int(highs[index]) << 26) + int(lows[index])) << (int(index) + offset)
    return total


def _exact_square_sum(values: np.ndarray) -> int:
    """The exact sum of the squares of finite float64 ``values``, in units of 2**-_SHIFT2."""
    import numpy as np

    size = np.abs(values)
    dekker = (size == 0) | ((size >= _DEKKER_RANGE[0]) & (size <= _DEKKER_RANGE[1]))
    x = values[dekker]
    square = x * x
    split = 134217729.0 * x  # 2**27 + 1: x = big + small, each with at most 26 bits
    big = split - (split - x)
    small = x - big
    error = ((big * big - square) + 2.0 * big * small) + small * small  # square + error = x**2
    total = _exact_sum(square, _SHIFT2) + _exact_sum(error, _SHIFT2)
    for value in values[~dekker].tolist():  # far outside any feature's range: rare, slow
        numerator, denominator = value.as_integer_ratio()
        total += (numerator * numerator << _SHIFT2) // (denominator * denominator)
    return total


class TrainMoments:
    """Count, exact sum and exact sum of squares of each feature over the train rows added so
    far (:meth:`add`, one bucket at a time), so the scalers need no whole-panel state and
    do not depend on how the rows were split into buckets or ordered."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rows = 0
        self.sums = dict.fromkeys(names, 0)
        self.squares = dict.fromkeys(names, 0)
        self.non_finite: dict[str, float] = {}

    def add(self, train: pl.DataFrame) -> None:
        """Add train rows: a frame with one Float64 column ``x_<name>`` per feature, no nulls."""
        import numpy as np

        self.rows += train.height
        for name in self.names:
            values = train[f"x_{name}"].to_numpy()
            finite = np.isfinite(values)
            if not finite.all():  # inf or nan: the mean is what float addition makes of them
                self.non_finite[name] = float(values[~finite].sum()
                                              + self.non_finite.get(name, 0.0))
                values = values[finite]
            self.sums[name] += _exact_sum(values)
            self.squares[name] += _exact_square_sum(values)

    def scalers(self) -> dict[str, dict[str, Any]]:
        """``{"f_<name>": {"column": name, "mean": m, "std": s}}``: the mean and the standard
        deviation (ddof 0) correctly rounded from the exact sums (the std is the square root of
        the rounded variance); ``s`` is 1.0 for a feature that is constant on train, so scaling
        never divides by zero.

        Raises:
            DataError: no train row was added (all were warm-up).
        """
        if self.rows == 0:
            raise DataError(
                "no train rows are left after dropping the warm-up days (incomplete history)",
                "Use more history before features.val_start, or shorter features.lags / "
                "features.windows / features.reference_window.")
        scalers: dict[str, dict[str, Any]] = {}
        for name in self.names:
            if name in self.non_finite:
                mean, std = self.non_finite[name], math.nan
            else:
                exact_mean = Fraction(self.sums[name], self.rows << _SHIFT)
                variance = Fraction(self.squares[name], self.rows << _SHIFT2) - exact_mean ** 2
                mean = float(exact_mean)
                std = math.sqrt(float(variance)) if variance < _FLOAT_MAX else math.inf
            scalers[f"f_{name}"] = {"column": name, "mean": mean,
                                    "std": std if std > 0 else 1.0}
        return scalers


def feature_query(panel: pl.DataFrame | pl.LazyFrame, settings: FeaturesSettings,
                  bounds: SplitBounds) -> tuple[pl.LazyFrame, list[str]]:
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
        frame: from :func:`apply_scalers`, sorted by product_index then date; the rows of
            ``products`` (one bucket's, or more).
        products: ``product_index`` of every product in ``frame``'s bucket, sorted; one whose
            rows were all warm-up gets a file with no rows, so indexes stay contiguous.
        folder: where the files go.
        monitor: bar ``products`` (added by the caller); memory is checked between chunks.
    """
    import polars as pl

    def path_for(args: Any) -> str:
        if args.index_in_partition:  # a second file for one product would break the contract
            raise RuntimeError("a product's rows were split over several files")
        return product_file_name(int(args.partition_keys["product_index"][0]))

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


def split_counts(frame: pl.DataFrame) -> dict[int, dict[str, int]]:
    """{product_index: {split: rows}} of the products with rows in ``frame``."""
    per_product: dict[int, dict[str, int]] = {}
    for index, split, n in frame.group_by("product_index", "split").len().iter_rows():
        per_product.setdefault(index, dict.fromkeys(SPLITS, 0))[split] = n
    return per_product


def build_manifest(counts: dict[int, dict[str, int]], products: pl.DataFrame,
                   bounds: SplitBounds, scalers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """feature_manifest.json: columns, products with their rows per split, split dates, rows,
    scalers (the contract in docs/architecture.md), plus ``current_price_columns``.

    Args:
        counts: :func:`split_counts` of every bucket, merged.
        products: ``product_index``, ``product_id`` of every product with sales.
        bounds: the split dates.
        scalers: from :meth:`TrainMoments.scalers`.
    """
    rows = {split: sum(c[split] for c in counts.values()) for split in SPLITS}
    return {
        "feature_columns": list(scalers),
        "raw_columns": list(RAW_COLUMNS),
        "current_price_columns": [f"f_{n}" for n in CURRENT_PRICE_FEATURES],
        "products": [
            {"product_index": index, "product_id": product_id,
             "file": product_file_name(index),
             "rows": counts.get(index, dict.fromkeys(SPLITS, 0))}
            for index, product_id in products.select("product_index", "product_id").iter_rows()
        ],
        "splits": bounds.ranges(),
        "rows": rows,
        "scalers": scalers,
    }


def bucket_query(sums_files: list[Path], members: pl.DataFrame, catalog: pl.DataFrame,
                 last_day: date, settings: FeaturesSettings, bounds: SplitBounds) -> pl.LazyFrame:
    """One bucket's unscaled features (:func:`feature_query`) from the files' daily sums on
    disk: only the bucket's product_id range is read and combined.

    Args:
        sums_files: the reading pass's Parquet files of daily sums (each sorted by product_id).
        members: the bucket's rows of :func:`product_table` (consecutive product_ids).
        catalog: from ``read_catalog``.
        last_day: the last date of the data.
        settings: the features settings.
        bounds: the split dates.
    """
    import polars as pl

    first_id, last_id = members["product_id"][0], members["product_id"][-1]
    sales = combine_daily_sums(pl.scan_parquet(sums_files).filter(
        pl.col("product_id").is_between(pl.lit(first_id), pl.lit(last_id))))
    query, _ = feature_query(panel_query(sales, members, catalog, last_day), settings, bounds)
    return query


SCRATCH_ROW_GROUP = 16_384


@dataclass
class _SalesScratch:
    """What the reading pass keeps: each file's daily sums on disk, every product's first
    sale and the data's last day in memory (one row per product)."""

    folder: Path
    files: list[Path]
    first_days: pl.DataFrame | None = None
    last_day: date | None = None

    def keep(self, sums: pl.DataFrame) -> None:
        import polars as pl

        if sums.height == 0:
            return
        path = self.folder / f"sums_{len(self.files):05d}.parquet"
        # Small row groups: a bucket reads its product_id range back, and the row groups'
        # statistics let it skip the rest, so a bucket's read does not grow with the file.
        sums.sort("product_id", "date").write_parquet(path, row_group_size=SCRATCH_ROW_GROUP)
        self.files.append(path)
        days = sums.group_by("product_id").agg(pl.col("date").min())
        self.first_days = days if self.first_days is None else pl.concat(
            [self.first_days, days]).group_by("product_id").agg(pl.col("date").min())
        last = sums["date"].max()
        self.last_day = last if self.last_day is None else max(self.last_day, last)  # type: ignore[type-var,assignment]


def run_features(settings: Settings, monitor: RunMonitor) -> StageResult:
    """Run the features stage (see the module docstring).

    Returns:
        StageResult with summary ``transaction_rows``, ``bad_rows``, ``products``,
        ``product_days`` {split: rows}, ``feature_columns``, ``buckets``, and one note per
        file that had bad rows.

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
    budget = parse_size(settings.monitor.max_memory) if settings.monitor.max_memory else None
    with staged_dir(output_dir, owner="features", sync_filesystem=True) as staging:
        scratch = staging / SCRATCH_DIR
        scratch.mkdir()
        sales = _SalesScratch(scratch, [])
        reports = read_transaction_sums(data, catalog, files, sales.keep, monitor)
        rows, bad = sum(r.rows for r in reports), sum(r.bad_rows for r in reports)
        outside = sum(r.outside_catalog for r in reports)
        if sales.first_days is None or sales.last_day is None:
            raise no_good_rows(data, len(files))
        last_day = sales.last_day
        products = product_table(sales.first_days, last_day)
        panel_rows = int(products["days"].sum())
        n_buckets = bucket_count(panel_rows, products.height, config.buckets, budget)
        products = assign_buckets(products, n_buckets)
        bounds = split_bounds(products["first_day"].min(), last_day, config)  # type: ignore[arg-type]
        monitor.log(f"read {rows:,} transaction rows ({bad:,} bad, skipped; {outside:,} of "
                    f"products outside the catalog, skipped); {panel_rows:,} product-days with "
                    f"zero-sale days for {products.height:,} products, in {n_buckets} "
                    f"bucket(s); splits {bounds.ranges()}")

        # Pass 1: each bucket's panel and unscaled features, on the streaming engine, to disk;
        # the train rows' exact sums are all the scalers need.
        names = list(feature_definitions(config))
        moments = TrainMoments(names)
        monitor.add_bar("buckets", "buckets (features, then files)", 2 * n_buckets)
        buckets = products.partition_by("bucket", maintain_order=True, include_key=False)
        unscaled = [scratch / f"features_{k:05d}.parquet" for k in range(len(buckets))]
        for k, members in enumerate(buckets):
            monitor.set_worker("features", f"bucket {k + 1}/{len(buckets)}: "
                               f"{members.height:,} products, {int(members['days'].sum()):,} days")
            query = bucket_query(sales.files, members, catalog, last_day, config, bounds)
            # The per-product windows need each product's rows together: the streaming engine
            # runs them as memory-intensive nodes, on one bucket (docs/data-format.md).
            query.sink_parquet(unscaled[k], engine="streaming")
            moments.add(pl.scan_parquet(unscaled[k]).filter(pl.col("split") == "train")
                        .select(f"x_{n}" for n in names).collect(engine="streaming"))
            monitor.update_bar("buckets", advance=1)
            monitor.check_memory()
        for path in sales.files:
            path.unlink()
        scalers = moments.scalers()
        monitor.log(f"{len(names)} features; scalers fit on {moments.rows:,} train rows")

        # Pass 2: scale each bucket and write its products' files.
        monitor.add_bar("products", "product files", products.height)
        counts: dict[int, dict[str, int]] = {}
        for k, members in enumerate(buckets):
            monitor.set_worker("features", f"writing bucket {k + 1}/{len(buckets)}")
            frame = apply_scalers(pl.read_parquet(unscaled[k]), scalers)
            counts.update(split_counts(frame))
            write_product_files(frame, members, staging, monitor)
            del frame
            unscaled[k].unlink()
            monitor.update_bar("buckets", advance=1)
        shutil.rmtree(scratch)
        monitor.clear_workers()
        manifest = build_manifest(counts, products, bounds, scalers)
        write_json(staging / "scalers.json", scalers)
        write_json(staging / "feature_manifest.json", manifest)
    monitor.log(f"wrote {products.height:,} product files to {output_dir}")

    empty = [p["product_id"] for p in manifest["products"] if not sum(p["rows"].values())]
    notes = [report.note() for report in reports if report.bad_rows or report.outside_catalog]
    if empty:
        notes.append(f"{len(empty)} product(s) have only warm-up days and empty files: "
                     + ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    return StageResult(
        stage="features",
        output_dir=output_dir,
        inputs=[*files, Path(data.catalog)],
        summary={
            "transaction_rows": rows,
            "bad_rows": bad,
            "outside_catalog_rows": outside,
            "products": products.height,
            "product_days": manifest["rows"],
            "feature_columns": len(scalers),
            "buckets": n_buckets,
        },
        notes=notes,
    )
