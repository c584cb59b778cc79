"""The one reader of raw transactions and the product catalog (contract: docs/data-format.md).

Transactions are read lazily, one file at a time, on Polars' streaming engine. Every column is
scanned as text and parsed with non-strict casts, so a bad value becomes a null instead of an
exception; a row whose date, product, quantity or price cannot be read or whose price is not a
positive number is *bad*; a good row of a product not in the catalog is skipped and counted
apart (a catalog may name only the products to price). Per file, one streaming pass
gives the daily partial sums of the good rows per (product_id, date) together with the
number of rows and of bad rows (bad rows are grouped under a null key); only a file with bad
rows is read a second time, stopping after its first bad rows, for the report.

Bad rows are skipped and reported as ``file:line: reason``; a file whose bad fraction exceeds
``data.max_bad_fraction`` is a :class:`DataError`, as is a file that cannot be read at all
(missing column, empty, not UTF-8, truncated gzip). The partial sums are additive, so files
that overlap in dates combine exactly.

Polars is imported inside the functions: this module sits under the CLI's import path.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pricing_cli.config import CatalogColumnMap, DataSettings
from pricing_cli.errors import DataError, MissingInputError

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.monitor import RunMonitor

# Logical transaction columns (keys of data.columns) that every file must have.
REQUIRED_TRANSACTION_COLUMNS = ("date", "product_id", "quantity", "unit_price")
CATALOG_COLUMNS = ("product_id", "unit_cost", "min_price", "max_price")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".txt", ".txt.gz")

# What may follow an ISO date (YYYY-MM-DD): a time after a space or T, with optional seconds,
# fractional seconds and UTC offset. The calendar date as written is kept: an offset does not
# move a sale to another day.
ISO_TIME_SUFFIX = r"^[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
# A whole ISO date or datetime. The layout must be checked, not left to strptime: "%Y-%m-%d"
# also reads 23-01-01 (the year 23, which would stretch the panel over 2,000 years of empty
# days), 2023-1-1 and 5-digit years. ASCII digits only ("\d" also matches other scripts).
# Dates outside these bounds are typos (0023-01-01 is a valid ISO date): one such row would
# stretch the daily panel and the chronological split over centuries.
EARLIEST_DATE, LATEST_DATE = date(1900, 1, 1), date(2199, 12, 31)
# |quantity| above this is a typo, and would let Int64 sums over a file overflow.
MAX_ABS_QUANTITY = 10**12
ISO_DATE_TIME = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?:" + ISO_TIME_SUFFIX[1:-1].replace(
    r"\d", "[0-9]") + ")?$"

# Columns of the daily partial sums (per product_id, date) that read_daily_sales returns.
DAILY_SUM_COLUMNS = ("units", "revenue", "sold_units", "sold_revenue", "price_sum",
                     "n_transactions")


@dataclass(frozen=True)
class FileReport:
    """What reading one transaction file found.

    Args:
        path: the file.
        rows: data rows in the file (header excluded).
        bad_rows: rows skipped as bad.
        examples: the first bad rows as ``file:line: reason`` (line 1 is the CSV header; for
            Parquet, the 1-based row number).
    """

    path: Path
    rows: int
    bad_rows: int
    examples: tuple[str, ...] = ()
    outside_catalog: int = 0
    """Good rows of products not in the catalog: skipped and counted, not bad (pricing a
    subset of the products is a catalog with only those)."""

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.rows if self.rows else 0.0

    def note(self) -> str:
        """One line for the stage notes: counts, then the examples."""
        text = (f"{self.path}: skipped {self.bad_rows:,} bad row(s) of {self.rows:,} "
                f"({self.bad_fraction:.2%})")
        if self.examples:
            text += "; first: " + "; ".join(self.examples)
        if self.outside_catalog:
            text += (f"; skipped {self.outside_catalog:,} row(s) of products outside the "
                     "catalog")
        return text


@dataclass
class DailySales:
    """Good transactions aggregated per product and day, with what reading them found.

    Attributes:
        panel: one row per (product_id, date) with sales: ``product_id`` String, ``date`` Date,
            ``units`` Float64 (net: returns subtract), ``revenue`` Float64 (net),
            ``price`` Float64 (mean paid price), ``n_transactions`` Int64 (returns included);
            sorted by product_id, date.
        reports: one per transaction file, in file order.
    """

    panel: pl.DataFrame
    reports: list[FileReport]

    @property
    def transaction_rows(self) -> int:
        return sum(r.rows for r in self.reports)

    @property
    def bad_rows(self) -> int:
        return sum(r.bad_rows for r in self.reports)

    @property
    def outside_catalog(self) -> int:
        return sum(r.outside_catalog for r in self.reports)


# ----------------------------------------------------------------------------------------------
# Files


def transaction_files(pattern: str) -> list[Path]:
    """The transaction files matched by the glob ``data.transactions``, sorted.

    Raises:
        MissingInputError: nothing matches.
        DataError: a matched file is neither CSV (optionally .gz) nor Parquet.
    """
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise MissingInputError(
            f"no transaction files match data.transactions = {pattern!r}",
            "Run `pricectl generate`, or point --transactions at your CSV/Parquet files.")
    for path in paths:
        if _file_format(path) is None:
            raise DataError(
                f"{path} is not a CSV, CSV.gz or Parquet file (matched by {pattern!r})",
                "Narrow the glob in data.transactions / --transactions to the transaction files.")
    return paths


def _file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def _header_line_offset(fmt: str) -> int:
    """Line number of row index 0: 2 in a CSV (the header is line 1), 1 in Parquet."""
    return 2 if fmt == "csv" else 1


def physical_lines(path: Path, records: Iterable[int]) -> dict[int, int]:
    """{data record index: the line of ``path`` it starts on} for a CSV (or CSV.gz).

    Polars numbers records, not lines: after a quoted field holding a line break the two
    drift apart, and an error message would send the user to the wrong line. Python's csv
    module splits records the same way and counts physical lines; it reads only up to the
    last record asked for (error messages name the first few bad rows).
    """
    import csv
    import gzip

    wanted = sorted(set(records))
    found: dict[int, int] = {}
    if not wanted:
        return found
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # the header
        consumed = reader.line_num
        targets = iter(wanted)
        target = next(targets)
        for index, _ in enumerate(reader):
            if index == target:
                found[index] = consumed + 1  # the record starts on the line after the last
                next_target = next(targets, None)
                if next_target is None:
                    break
                target = next_target
            consumed = reader.line_num
    return found


def _with_physical_lines(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (with ``_line`` from Polars' record index) with ``_line`` set to the physical
    line in a CSV; Parquet rows are left as they are."""
    if not rows or _file_format(path) != "csv":
        return rows
    offset = _header_line_offset("csv")
    try:
        lines = physical_lines(path, [row["_line"] - offset for row in rows])
    except (OSError, UnicodeDecodeError, EOFError):
        return rows  # the record numbers are still a good pointer
    return [{**row, "_line": lines.get(row["_line"] - offset, row["_line"])} for row in rows]


def _read_error(path: Path, exc: BaseException) -> DataError:
    """Turn a Polars/IO error while reading ``path`` into a DataError that says what to do."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "utf-8" in lowered or "utf8" in lowered:
        return DataError(f"{path} is not UTF-8 text ({text})",
                         "Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`.")
    if path.name.lower().endswith(".gz") and (
            isinstance(exc, EOFError) or "end of file" in lowered or "gzip" in lowered
            or "deflate" in lowered or "corrupt" in lowered or "invalid" in lowered):
        return DataError(f"{path} is a truncated or corrupt gzip file ({text})",
                         "Copy or compress the file again; `gzip -t FILE` checks it.")
    if "empty" in lowered:
        return DataError(f"{path} is empty", "Remove the file or fill it with transactions.")
    return DataError(f"cannot read {path}: {text}",
                     "Check that the file is a well-formed CSV (or Parquet) file.")


def _scan(path: Path, row_index: str | None = None, block: bytes | None = None
          ) -> pl.LazyFrame:
    """``path`` scanned lazily; with ``block`` (a CSV header and whole records of ``path``,
    from raw_contract_chunks.csv_chunks), that block instead of the whole file."""
    import polars as pl

    if _file_format(path) == "parquet":
        return pl.scan_parquet(path, row_index_name=row_index)
    # Every column as text: casting ourselves turns a bad value into a counted bad row
    # instead of an exception that names neither the row nor the file.
    if block is None:
        return pl.scan_csv(path, infer_schema=False, row_index_name=row_index)
    # A block is parsed eagerly (it is small) and summed as one in-memory frame: the
    # streaming engine then cuts it into morsels of a fixed number of rows, not at points
    # of the CSV reader's own, so a block's product-days are summed in file order.
    return pl.read_csv(block, infer_schema=False, row_index_name=row_index).lazy()


def _schema(path: Path) -> dict[str, Any]:
    import polars as pl

    try:
        return dict(_scan(path).collect_schema())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _read_error(path, exc) from None


def _require_columns(path: Path, found: Sequence[str], wanted: Sequence[str], hint: str) -> None:
    missing = [repr(name) for name in wanted if name not in found]
    if missing:
        raise DataError(
            f"{path} has no column {', '.join(missing)}; its columns are: "
            f"{', '.join(map(repr, found)) or '(none)'}", hint)


# ----------------------------------------------------------------------------------------------
# Parsing expressions (shared by the catalog and the transactions)


def _text(name: str, dtype: Any) -> pl.Expr:
    """Column ``name`` as stripped text, null when empty (for messages and string keys)."""
    import polars as pl

    col = pl.col(name) if dtype == pl.String else pl.col(name).cast(pl.String)
    stripped = col.str.strip_chars()
    return pl.when(stripped != "").then(stripped)


def _number(name: str, dtype: Any, target: Any) -> pl.Expr:
    """Column ``name`` as ``target`` (Int64/Float64); null where it cannot be read.

    Typed (Parquet) columns follow the CSV rules: a Boolean is not a number (a cast would
    read true as 1), and a fractional value is not an integer quantity (a cast would cut 2.5
    to 2); both give null, so the row is bad with its reason. Integral floats (3.0, as pandas
    writes an integer column that had a missing value) are read as integers.
    """
    import polars as pl

    if dtype == pl.Boolean:
        return pl.lit(None, dtype=target)
    if target == pl.Int64 and (dtype.is_float() or dtype.is_decimal()):
        value = pl.col(name).cast(pl.Float64, strict=False)
        return pl.when(value == value.floor()).then(value.cast(pl.Int64, strict=False))
    # Text is cast as written (no strip): it is the hot path, and exports do not pad numbers.
    return pl.col(name).cast(target, strict=False)


def _date(name: str, dtype: Any, date_format: str | None) -> pl.Expr:
    """Column ``name`` as a Date; null where it cannot be read.

    Text is parsed with ``date_format`` if given, else as ISO date or datetime (the date as
    written is kept). Date and Datetime columns (Parquet) are used as they are.
    """
    import polars as pl

    if dtype == pl.Date:
        return pl.col(name)
    if isinstance(dtype, pl.Datetime):
        return pl.col(name).dt.date()
    if dtype != pl.String:
        return pl.lit(None, dtype=pl.Date)
    text = pl.col(name)
    if date_format is not None:
        return text.str.strptime(pl.Datetime, date_format, strict=False).dt.date()
    # The regex checks the layout; strptime on the first 10 characters reads the date and
    # rejects impossible ones such as 2023-02-30. One anchored ASCII regex per value costs
    # about what matching the time part alone did (5M values: ~1 s either way, 2 cores).
    return (pl.when(text.str.contains(ISO_DATE_TIME))
            .then(text.str.slice(0, 10).str.strptime(pl.Date, "%Y-%m-%d", strict=False)))


# ----------------------------------------------------------------------------------------------
# Catalog


# Present only while a raw folder mixes two generated markets: `pricectl generate` writes it
# just before swapping its transactions in and removes it once catalog and ground truth follow.
INCOMPLETE_MARKER = ".generate-incomplete"
INCOMPLETE_NOTE = ("`pricectl generate` was interrupted while replacing this market: the "
                   "transactions, catalog and ground truth may come from different runs")


def read_catalog(path: str | Path, columns: CatalogColumnMap | None = None) -> pl.DataFrame:
    """Read and check the catalog (small, so eagerly).

    Args:
        path: CSV (optionally .gz) or Parquet with product_id, unit_cost, min_price, max_price
            and optionally category.
        columns: the names of those columns in the file (``data.catalog_columns``); None:
            as above.

    Returns:
        ``product_id`` String, ``unit_cost``, ``min_price``, ``max_price`` Float64,
        ``category`` String (``"none"`` when absent); sorted by product_id.

    Raises:
        MissingInputError: the file does not exist.
        DataError: the folder holds a half-replaced generated market (INCOMPLETE_MARKER), a
            column is missing, a product_id repeats or is empty, a number cannot be read,
            unit_cost < 0, min_price <= 0 or min_price > max_price; the message names the
            first offending lines. The catalog is reference data, so no row is skipped.
    """
    import polars as pl

    path = Path(path)
    if (path.parent / INCOMPLETE_MARKER).exists():
        raise DataError(f"{path.parent} is incomplete: {INCOMPLETE_NOTE}",
                        "Re-run `pricectl generate`; it removes "
                        f"{path.parent / INCOMPLETE_MARKER} when the market is whole again.")
    if not path.is_file():
        raise MissingInputError(f"catalog file not found: {path}",
                                "Run `pricectl generate`, or pass --catalog FILE.")
    fmt = _file_format(path)
    if fmt is None:
        raise DataError(f"catalog {path} is not a CSV, CSV.gz or Parquet file",
                        "Point data.catalog / --catalog at catalog.csv.")
    schema = _schema(path)
    name = {c: c if columns is None else getattr(columns, c)
            for c in (*CATALOG_COLUMNS, "category")}
    _require_columns(path, list(schema), [name[c] for c in CATALOG_COLUMNS],
                     "The catalog needs the columns " + ", ".join(CATALOG_COLUMNS)
                     + " (and optionally category); map other names under "
                     "data.catalog_columns; see docs/data-format.md.")
    has_category = name["category"] in schema
    try:
        parsed = _scan(path, "_row").select(
            (pl.col("_row").cast(pl.Int64) + _header_line_offset(fmt)).alias("_line"),
            _text(name["product_id"], schema[name["product_id"]]).alias("product_id"),
            *[_number(name[c], schema[name[c]], pl.Float64).alias(c)
              for c in ("unit_cost", "min_price", "max_price")],
            *[_text(name[c], schema[name[c]]).alias(f"_raw_{c}") for c in CATALOG_COLUMNS[1:]],
            (_text(name["category"], schema[name["category"]]) if has_category
             else pl.lit(None, dtype=pl.String)).fill_null("none").alias("category"),
        ).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _read_error(path, exc) from None
    if parsed.height == 0:
        raise DataError(f"catalog {path} has no products", "Add one row per product.")

    problems: list[tuple[dict[str, Any], str]] = []
    for row in parsed.iter_rows(named=True):
        reason = _catalog_row_problem(row)
        if reason:
            problems.append((row, reason))
        if len(problems) >= 5:
            break
    duplicated = parsed.filter(pl.col("product_id").is_duplicated() & ~pl.col(
        "product_id").is_first_distinct())
    for row in duplicated.head(5 - min(len(problems), 5)).iter_rows(named=True):
        problems.append((row, f"product_id {row['product_id']!r} repeats"))
    if problems:
        located = _with_physical_lines(path, [row for row, _ in problems])
        problems_text = [f"{path}:{row['_line']}: {reason}"
                         for row, (_, reason) in zip(located, problems, strict=True)]
        raise DataError(f"catalog {path} has invalid rows: " + "; ".join(problems_text),
                        "Fix these rows: every product needs a unique product_id, "
                        "unit_cost >= 0 and 0 < min_price <= max_price.")
    return parsed.select("product_id", "unit_cost", "min_price", "max_price",
                         "category").sort("product_id")


def _catalog_row_problem(row: dict[str, Any]) -> str | None:
    if row["product_id"] is None:
        return "missing product_id"
    for column in CATALOG_COLUMNS[1:]:
        if row[column] is None or row[column] != row[column]:  # null or NaN
            return f"cannot read {column} {row[f'_raw_{column}']!r} as a number"
    if row["unit_cost"] < 0:
        return f"unit_cost {row['unit_cost']} < 0"
    if row["min_price"] <= 0:
        return f"min_price {row['min_price']} <= 0"
    if row["min_price"] > row["max_price"]:
        return f"min_price {row['min_price']} > max_price {row['max_price']}"
    return None


# ----------------------------------------------------------------------------------------------
# Transactions


def scan_transaction_file(path: Path, data: DataSettings, product_ids: pl.Series,
                          block: bytes | None = None, records_before: int = 0,
                          schema: dict[str, Any] | None = None) -> pl.LazyFrame:
    """Lazily parse one transaction file, flagging bad rows instead of failing on them.

    Args:
        path: one CSV(.gz) or Parquet file.
        data: the data settings (column map, date format).
        product_ids: the catalog's product_ids; rows of other products are skipped, not bad.
        block: parse only this block of the CSV ``path`` (its header and whole records,
            from raw_contract_chunks.csv_chunks) instead of the whole file.
        records_before: the file's records before ``block``, so ``_line`` is the file's.
        schema: ``path``'s columns, when already read (each block has the same header).

    Returns:
        A LazyFrame with ``_line`` Int64 (as in the file), ``product_id`` String, ``date`` Date,
        ``quantity`` Int64, ``unit_price`` Float64, ``_known`` Boolean (in the catalog),
        ``_bad`` Boolean, and the raw text of each column as ``_raw_<name>``.

    Raises:
        DataError: the file cannot be opened, is empty, or lacks a mapped column.
    """
    import polars as pl

    fmt = _file_format(path) or "csv"
    schema = _schema(path) if schema is None else schema
    mapping = {key: getattr(data.columns, key) for key in REQUIRED_TRANSACTION_COLUMNS}
    if data.columns.store_id is not None:
        mapping["store_id"] = data.columns.store_id
    _require_columns(path, list(schema), list(mapping.values()),
                     "Rename the column, or map it in your config under data.columns, e.g. "
                     "`data: {columns: {unit_price: Price}}` (see docs/data-format.md).")

    raw_names = {key: f"_raw_{key}" for key in REQUIRED_TRANSACTION_COLUMNS}
    raw_types = {key: schema[mapping[key]] for key in REQUIRED_TRANSACTION_COLUMNS}
    # Each stage refers to the previous one by column name, so no parse runs twice.
    raw = _scan(path, "_row", block).select(
        (pl.col("_row").cast(pl.Int64) + (_header_line_offset(fmt) + records_before)
         ).alias("_line"),
        *[pl.col(mapping[key]).alias(raw_names[key]) for key in REQUIRED_TRANSACTION_COLUMNS],
    )
    parsed = raw.with_columns(
        _text(raw_names["product_id"], raw_types["product_id"]).alias("product_id"),
        _date(raw_names["date"], raw_types["date"], data.date_format).alias("date"),
        _number(raw_names["quantity"], raw_types["quantity"], pl.Int64).alias("quantity"),
        _number(raw_names["unit_price"], raw_types["unit_price"], pl.Float64).alias("unit_price"),
    ).with_columns(
        pl.col("product_id").is_in(product_ids.implode()).fill_null(False).alias("_known"),
    )
    price = pl.col("unit_price")
    bad = (pl.col("date").is_null() | pl.col("product_id").is_null()
           | pl.col("quantity").is_null() | ~(price.is_finite() & (price > 0)).fill_null(False)
           | ~pl.col("date").is_between(EARLIEST_DATE, LATEST_DATE).fill_null(True)
           | (pl.col("quantity").abs() > MAX_ABS_QUANTITY).fill_null(False))
    return parsed.with_columns(bad.alias("_bad"))


def file_queries(parsed: pl.LazyFrame, n_examples: int) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """The two per-file queries over :func:`scan_transaction_file`'s frame.

    Returns:
        ``(daily_sums, examples)``. ``daily_sums``: rows summed per (product_id, date) into
        :data:`DAILY_SUM_COLUMNS` (``sold_*`` over positive quantities only, ``price_sum`` the
        plain sum of unit_price). Bad rows get null keys, so they all fall in one group whose
        ``n_transactions`` is the bad-row count: one pass gives the sums and the counts.
        ``examples``: the first ``n_examples`` bad rows. Both run on the streaming engine
        without falling back to the in-memory engine (tests/test_features.py checks the plan).
    """
    import polars as pl

    # A readable row of a product outside the catalog is skipped, not bad: it is counted in
    # the null group's outside_catalog.
    good = ~pl.col("_bad") & pl.col("_known")
    quantity = pl.col("quantity")
    sold = quantity.clip(lower_bound=0)
    daily_sums = parsed.with_columns(
        pl.when(good).then(pl.col("product_id")).alias("product_id"),
        pl.when(good).then(pl.col("date")).alias("date"),
    ).group_by("product_id", "date").agg(
        quantity.sum().cast(pl.Float64).alias("units"),
        (quantity * pl.col("unit_price")).sum().alias("revenue"),
        sold.sum().cast(pl.Float64).alias("sold_units"),
        (sold * pl.col("unit_price")).sum().alias("sold_revenue"),
        pl.col("unit_price").sum().alias("price_sum"),
        pl.len().cast(pl.Int64).alias("n_transactions"),
        (~pl.col("_bad") & ~pl.col("_known")).sum().cast(pl.Int64).alias("outside_catalog"),
    )
    examples = parsed.filter(pl.col("_bad")).head(n_examples)
    return daily_sums, examples


def _date_problem(raw: Any, parsed: Any) -> str | None:
    """Why a row's date is bad (transactions and stock rows alike), or None."""
    if raw is None:
        return "missing date"
    if parsed is None:
        return f"cannot read date {raw!r}"
    if not EARLIEST_DATE <= parsed <= LATEST_DATE:
        return f"date {raw!r} is outside {EARLIEST_DATE}..{LATEST_DATE} (a typo?)"
    return None


# A date written day/month/year or month/day/year (13/01/2024, 1.12.2009 07:45): not ISO.
_NUMERIC_DATE = re.compile(r"^\s*(\d{1,2})([/.\-])(\d{1,2})\2(\d{4}|\d{2})"
                           r"(?:[ T](\d{1,2}:\d{2})(:\d{2})?)?\s*$")


def date_format_hint(raw_dates: Iterable[Any], date_format: str | None) -> str | None:
    """The hint for bad rows whose dates are numeric but not ISO (day or month first): the
    ``data.date_format`` that reads them, instead of raising ``data.max_bad_fraction``.
    None when no such date is among ``raw_dates``."""
    for raw in raw_dates:
        match = _NUMERIC_DATE.match(str(raw)) if raw is not None else None
        if match is None:
            continue
        first, sep, second, year, clock, seconds = match.groups()
        tail = ("%y" if len(year) == 2 else "%Y") + (
            "" if clock is None else " %H:%M" + (":%S" if seconds else ""))
        day_first, month_first = f"%d{sep}%m{sep}{tail}", f"%m{sep}%d{sep}{tail}"
        if date_format is not None:
            return (f"Dates such as {raw!r} do not match data.date_format {date_format!r}: "
                    f"set it to {day_first!r} (day first) or {month_first!r} (month first); "
                    "see docs/data-format.md.")
        if int(first) > 12:
            choice = f"{day_first!r} (day first)"
        elif int(second) > 12:
            choice = f"{month_first!r} (month first)"
        else:
            choice = f"{day_first!r} (day first) or {month_first!r} (month first)"
        return (f"Dates such as {raw!r} are not ISO (YYYY-MM-DD): set data.date_format in your "
                f"config to {choice}; see docs/data-format.md.")
    return None


def bad_row_reason(row: dict[str, Any], catalog_name: str) -> str:
    """Why one flagged row is bad, in words, from its parsed and raw values."""
    raw = {key: row[f"_raw_{key}"] for key in REQUIRED_TRANSACTION_COLUMNS}
    if all(value is None for value in raw.values()):
        return "empty line"
    date_problem = _date_problem(raw["date"], row["date"])
    if date_problem:
        return date_problem
    if raw["product_id"] is None:
        return "missing product_id"
    if raw["quantity"] is None:
        return "missing quantity"
    for key in ("quantity", "unit_price"):
        if isinstance(raw[key], bool):  # a Boolean column in a Parquet file
            return f"{key} {raw[key]} is a boolean (a true/false column), not a number"
    if row["quantity"] is None:
        return f"cannot read quantity {raw['quantity']!r} as an integer"
    if abs(row["quantity"]) > MAX_ABS_QUANTITY:
        return f"quantity {raw['quantity']} is implausibly large (more than {MAX_ABS_QUANTITY:,})"
    if raw["unit_price"] is None:
        return "missing unit_price"
    price = row["unit_price"]
    if price is None:
        return f"cannot read unit_price {raw['unit_price']!r} as a number"
    if not price > 0 or price == float("inf"):
        return f"unit_price {raw['unit_price']} is not a positive number"
    if not row["_known"]:
        return f"product {raw['product_id']!r} is not in the catalog {catalog_name}"
    return "bad row"


def _blocks(path: Path, data: DataSettings, schema: dict[str, Any]) -> Iterable[bytes | None]:
    """What :func:`read_transaction_file` parses one after another: ``[None]`` (the whole
    file) for Parquet and CSVs up to ``data.read_chunk_mb``, else blocks of whole records
    (raw_contract_chunks.csv_chunks), cut between product-days where the file allows."""
    from pricing_cli.data.raw_contract_chunks import csv_chunks, is_large

    chunk_bytes = max(1, int(data.read_chunk_mb * 2**20))
    if _file_format(path) != "csv" or not is_large(path, chunk_bytes):
        return [None]
    names = list(schema)
    product, day = data.columns.product_id, data.columns.date
    keys = (names.index(product), names.index(day)) if product in names and day in names else None
    return (header + records for header, records in
            csv_chunks(path, chunk_bytes, keys, date_prefix=data.date_format is None))


def read_transaction_file(path: Path, data: DataSettings, product_ids: pl.Series
                          ) -> tuple[pl.DataFrame, FileReport]:
    """One streaming pass over one file: its good rows' daily sums and its report.

    A CSV larger than ``data.read_chunk_mb`` is parsed one block of whole records at a time
    (raw_contract_chunks.py), so memory holds one block, not the file; the blocks' sums are
    added per (product_id, date). Blocks are cut between product-days where the file allows
    (sorted by day or product), so each day's sum is the same running sum as in one piece.

    Raises:
        DataError: unreadable file, header without rows, or a bad fraction above
            ``data.max_bad_fraction`` (the message has the counts and first examples).
    """
    import polars as pl

    schema = _schema(path)
    is_bad = pl.col("product_id").is_null()
    parts: list[pl.DataFrame] = []
    bad_found: list[dict[str, Any]] = []
    rows = bad_rows = outside = 0
    try:
        for block in _blocks(path, data, schema):
            parsed = scan_transaction_file(path, data, product_ids, block, rows, schema)
            daily_sums, examples = file_queries(parsed, data.bad_row_examples - len(bad_found))
            # Two separate collects, not pl.collect_all: sharing the scan makes Polars cache
            # the whole parsed file in memory (2.1 GiB for a 530 MB CSV in polars 2.1).
            sums = daily_sums.collect(engine="streaming")
            skipped = sums.filter(is_bad)
            block_outside = int(skipped["outside_catalog"].sum())
            block_bad = int(skipped["n_transactions"].sum()) - block_outside
            rows += int(sums["n_transactions"].sum())
            outside += block_outside
            bad_rows += block_bad
            # Only blocks with bad rows are read again, and only up to the last example.
            if block_bad and len(bad_found) < data.bad_row_examples:
                bad_found += examples.collect(engine="streaming").iter_rows(named=True)
            parts.append(sums)
            del sums, parsed, daily_sums, examples
    except (pl.exceptions.PolarsError, OSError, EOFError) as exc:
        raise _read_error(path, exc) from None
    if rows == 0:
        raise DataError(f"{path} has a header but no transactions",
                        "Remove the file or fill it with transactions.")
    sums = parts[0] if len(parts) == 1 else pl.concat(parts).group_by(
        "product_id", "date", maintain_order=True).agg(
        pl.col(c).sum() for c in parts[0].columns if c not in ("product_id", "date"))
    del parts
    examples_found = _with_physical_lines(path, bad_found)
    report = FileReport(path, rows, bad_rows, tuple(
        f"{path}:{row['_line']}: {bad_row_reason(row, data.catalog)}"
        for row in examples_found), outside_catalog=outside)
    sums = sums.filter(~is_bad).drop("outside_catalog")
    if report.bad_fraction > data.max_bad_fraction:
        raise DataError(
            f"{path}: {bad_rows:,} of {rows:,} rows ({report.bad_fraction:.2%}) are bad, more "
            f"than data.max_bad_fraction = {data.max_bad_fraction:.2%}; first: "
            + "; ".join(report.examples),
            date_format_hint((row["_raw_date"] for row in examples_found if row["date"] is None),
                             data.date_format)
            or "Fix those rows (see docs/data-format.md), or raise data.max_bad_fraction to "
               "skip them.")
    return sums, report


def read_transaction_sums(data: DataSettings, catalog: pl.DataFrame, files: Sequence[Path],
                          keep: Callable[[pl.DataFrame], None],
                          monitor: RunMonitor | None = None) -> list[FileReport]:
    """Read every transaction file, one streaming pass each, handing each file's good daily
    sums (:func:`file_queries`'s ``daily_sums`` without the bad-row group) to ``keep``.

    Args:
        data: data settings.
        catalog: from :func:`read_catalog` (only its product_ids are used here).
        files: from :func:`transaction_files`.
        keep: called once per file, in file order, with its sums; it decides what stays in
            memory (features writes them to disk, :func:`read_daily_sales` keeps them).
        monitor: progress is reported to it (bar ``files``), and memory checked per file.

    Returns:
        One report per file, in file order.

    Raises:
        DataError: see :func:`read_transaction_file`.
    """
    product_ids = catalog["product_id"]
    if monitor is not None:
        monitor.add_bar("files", "transaction files", len(files))
    reports: list[FileReport] = []
    for path in files:
        if monitor is not None:
            monitor.set_worker("reader", f"reading {path.name}")
        sums, report = read_transaction_file(path, data, product_ids)
        keep(sums)
        del sums
        reports.append(report)
        if monitor is not None:
            monitor.update_bar("files", advance=1)
            monitor.set_metric("rows", f"{sum(r.rows for r in reports):,}")
            if report.bad_rows:
                monitor.log(report.note())
            monitor.check_memory()
    if monitor is not None:
        monitor.clear_workers()
    return reports


def no_good_rows(data: DataSettings, n_files: int) -> DataError:
    """The error for transaction files that hold no good row at all."""
    return DataError(f"no good transaction rows in {n_files} file(s) matching "
                     f"{data.transactions!r}",
                     "Check the column map (data.columns) and the catalog's product_ids.")


def combine_daily_sums(sums: pl.LazyFrame) -> pl.LazyFrame:
    """Files' daily sums (from :func:`read_transaction_sums`) to the rows of
    ``DailySales.panel``: summed per product and day, with the day's mean paid price
    (revenue / units over its positive-quantity rows, or the mean unit_price when the day only
    has returns), sorted by product_id, date."""
    import polars as pl

    return sums.group_by("product_id", "date").agg(
        pl.col(c).sum() for c in DAILY_SUM_COLUMNS
    ).select(
        "product_id", "date", "units", "revenue",
        pl.when(pl.col("sold_units") > 0)
        .then(pl.col("sold_revenue") / pl.col("sold_units"))
        .otherwise(pl.col("price_sum") / pl.col("n_transactions")).alias("price"),
        "n_transactions",
    ).sort("product_id", "date")


def read_daily_sales(data: DataSettings, catalog: pl.DataFrame, files: Sequence[Path],
                     monitor: RunMonitor | None = None) -> DailySales:
    """Read every transaction file and aggregate the good rows per product and day, in memory.

    Args:
        data: data settings.
        catalog: from :func:`read_catalog` (only its product_ids are used here).
        files: from :func:`transaction_files`.
        monitor: progress is reported to it (bar ``files``), and memory checked per file.

    Returns:
        :class:`DailySales` (its panel from :func:`combine_daily_sums`).

    Raises:
        DataError: see :func:`read_transaction_file`; also when no good row is left at all.
    """
    import polars as pl

    parts: list[pl.DataFrame] = []
    reports = read_transaction_sums(data, catalog, files, parts.append, monitor)
    panel = combine_daily_sums(pl.concat(parts).lazy()).collect()
    if panel.height == 0:
        raise no_good_rows(data, len(files))
    return DailySales(panel, reports)


# ----------------------------------------------------------------------------------------------
# Stock (optional): on-hand units per product-day, so the demand fit knows sold-out days

STOCK_COLUMNS = ("date", "product_id", "on_hand")


def read_stock(path: str | Path, data: DataSettings) -> tuple[pl.DataFrame, FileReport]:
    """Read the stock file (``data.stock``): one row per product-day with the units on hand
    that day (what could be sold; a day that sold all of it is censored demand).

    Bad rows (unreadable or missing date, empty product_id, on_hand missing, not a number or
    negative, a repeated product-day) are skipped and reported as ``file:line: reason``,
    like bad transaction rows.

    Args:
        path: CSV (optionally .gz) or Parquet with date, product_id, on_hand.
        data: uses date_format, max_bad_fraction, bad_row_examples.

    Returns:
        (``product_id`` String, ``date`` Date, ``on_hand`` Float64, sorted by product_id and
        date; the file's report).

    Raises:
        MissingInputError: the file does not exist.
        DataError: not CSV/Parquet, unreadable, a column missing, no rows, or more bad rows
            than data.max_bad_fraction.
    """
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"stock file not found: {path}",
                                "Fix data.stock, or set it to null to fit without stock.")
    fmt = _file_format(path)
    if fmt is None:
        raise DataError(f"stock file {path} is not a CSV, CSV.gz or Parquet file",
                        "Point data.stock at a file with date, product_id, on_hand.")
    schema = _schema(path)
    _require_columns(path, list(schema), STOCK_COLUMNS,
                     "The stock file needs the columns date, product_id, on_hand; see "
                     "docs/data-format.md.")
    try:
        parsed = _scan(path, "_row").select(
            (pl.col("_row").cast(pl.Int64) + _header_line_offset(fmt)).alias("_line"),
            _date("date", schema["date"], data.date_format).alias("date"),
            _text("product_id", schema["product_id"]).alias("product_id"),
            _number("on_hand", schema["on_hand"], pl.Float64).alias("on_hand"),
            *[_text(c, schema[c]).alias(f"_raw_{c}") for c in STOCK_COLUMNS],
        ).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _read_error(path, exc) from None
    if parsed.height == 0:
        raise DataError(f"stock file {path} has a header but no rows",
                        "Remove data.stock or fill the file with date, product_id, on_hand.")
    in_range = pl.col("date").is_between(EARLIEST_DATE, LATEST_DATE)
    parsed = parsed.with_columns(
        _bad=(pl.col("date").is_null() | ~in_range | pl.col("product_id").is_null()
              | pl.col("on_hand").is_null() | ~pl.col("on_hand").is_finite()
              | (pl.col("on_hand") < 0)
              | pl.struct("product_id", "date").is_duplicated()
              & ~pl.struct("product_id", "date").is_first_distinct()).fill_null(True))
    bad = parsed.filter(pl.col("_bad"))
    examples = _with_physical_lines(path, list(bad.head(data.bad_row_examples)
                                               .iter_rows(named=True)))
    report = FileReport(path, parsed.height, bad.height, tuple(
        f"{path}:{row['_line']}: {_stock_row_problem(row)}" for row in examples))
    if report.bad_fraction > data.max_bad_fraction:
        raise DataError(
            f"{path}: {bad.height:,} of {parsed.height:,} rows ({report.bad_fraction:.2%}) are "
            f"bad, more than data.max_bad_fraction = {data.max_bad_fraction:.2%}; first: "
            + "; ".join(report.examples),
            date_format_hint((row["_raw_date"] for row in examples if row["date"] is None),
                             data.date_format)
            or "Fix those rows (see docs/data-format.md, \"Stock\"), or raise "
               "data.max_bad_fraction to skip them.")
    stock = (parsed.filter(~pl.col("_bad")).select("product_id", "date", "on_hand")
             .sort("product_id", "date"))
    return stock, report


def _stock_row_problem(row: dict[str, Any]) -> str:
    """Why one stock row is bad, in words."""
    if all(row[f"_raw_{c}"] is None for c in STOCK_COLUMNS):
        return "empty line"
    date_problem = _date_problem(row["_raw_date"], row["date"])
    if date_problem:
        return date_problem
    if row["product_id"] is None:
        return "missing product_id"
    if row["_raw_on_hand"] is None:
        return "missing on_hand"
    if row["on_hand"] is None or row["on_hand"] != row["on_hand"]:
        return f"cannot read on_hand {row['_raw_on_hand']!r} as a number"
    if row["on_hand"] < 0 or row["on_hand"] == float("inf"):
        return f"on_hand {row['_raw_on_hand']} is not a count >= 0"
    return f"product {row['product_id']!r} on {row['date']} repeats an earlier row"
