"""The raw-data reader: parsing, bad-row reports with file:line, unreadable files."""

from __future__ import annotations

import gzip
from datetime import date

import polars as pl
import pytest

from pricing_cli.data.raw_contract import (
    read_catalog,
    read_daily_sales,
    read_stock,
    read_transaction_file,
    transaction_files,
)
from pricing_cli.errors import DataError, MissingInputError
from tests.support.raw import CATALOG, FIXTURES, data_settings


@pytest.fixture(scope="module")
def catalog_ids() -> pl.Series:
    return read_catalog(CATALOG)["product_id"]


# One fixture per kind of bad row: (file, line, reason as reported).
BAD_ROWS = [
    ("bad_date.csv", 5, "cannot read date '2023-13-45'"),
    ("bad_number.csv", 7, "cannot read quantity 'two' as an integer"),
    ("bad_price.csv", 4, "unit_price 0 is not a positive number"),
    ("bad_year.csv", 4, "date '0023-01-03' is outside 1900-01-01..2199-12-31 (a typo?)"),
    ("huge_quantity.csv", 4,
     "quantity 99999999999999 is implausibly large (more than 1,000,000,000,000)"),
]


def test_rows_of_products_outside_the_catalog_are_skipped_and_counted_not_bad(catalog_ids):
    path = FIXTURES / "unknown_product.csv"
    # strict: not one bad row is allowed, and the file still reads
    sums, report = read_transaction_file(path, data_settings(max_bad_fraction=0.0), catalog_ids)
    assert (report.rows, report.bad_rows, report.outside_catalog) == (10, 0, 1)
    assert report.note() == (f"{path}: skipped 0 bad row(s) of 10 (0.00%); skipped 1 row(s) of "
                             "products outside the catalog")
    assert sums["n_transactions"].sum() == 9 and "ZZZ" not in sums["product_id"].to_list()


@pytest.mark.parametrize(("name", "line", "reason"), BAD_ROWS)
def test_bad_row_is_skipped_and_reported_with_its_line(name, line, reason, catalog_ids):
    path = FIXTURES / name
    sums, report = read_transaction_file(path, data_settings(max_bad_fraction=0.2), catalog_ids)
    assert (report.rows, report.bad_rows) == (10, 1)
    assert report.examples == (f"{path}:{line}: {reason}",)
    assert report.note() == (
        f"{path}: skipped 1 bad row(s) of 10 (10.00%); first: {path}:{line}: {reason}")
    # The good rows are all there: 9 rows, their units summed.
    good = pl.read_csv(path, infer_schema=False).with_row_index("i").filter(pl.col("i") != line - 2)
    assert sums["n_transactions"].sum() == 9
    assert sums["units"].sum() == good["quantity"].cast(pl.Int64).sum()


@pytest.mark.parametrize(("name", "line", "reason"), BAD_ROWS)
def test_bad_fraction_above_limit_is_an_error_naming_file_counts_and_rows(name, line, reason,
                                                                          catalog_ids):
    path = FIXTURES / name
    with pytest.raises(DataError) as caught:
        read_transaction_file(path, data_settings(), catalog_ids)  # default limit 1%
    assert caught.value.message == (
        f"{path}: 1 of 10 rows (10.00%) are bad, more than data.max_bad_fraction = 1.00%; "
        f"first: {path}:{line}: {reason}")
    assert "max_bad_fraction" in caught.value.hint


@pytest.mark.parametrize(("name", "message"), [
    ("missing_column.csv", "{path} has no column 'unit_price'; its columns are: 'date', "
                           "'product_id', 'quantity'"),
    ("empty.csv", "{path} is empty"),
    ("not_utf8.csv", "{path} is not UTF-8 text (invalid utf-8 sequence)"),
    ("truncated.csv.gz", "{path} is a truncated or corrupt gzip file (unexpected end of file)"),
])
def test_unreadable_file_is_a_clear_error(name, message, catalog_ids):
    path = FIXTURES / name
    with pytest.raises(DataError) as caught:
        read_transaction_file(path, data_settings(), catalog_ids)
    assert caught.value.message == message.format(path=path)


def test_header_without_rows_is_an_error(tmp_path, catalog_ids):
    path = tmp_path / "only_header.csv"
    path.write_text("date,product_id,quantity,unit_price\n")
    with pytest.raises(DataError, match="has a header but no transactions"):
        read_transaction_file(path, data_settings(), catalog_ids)


def test_uci_online_retail_export_reads_as_it_is(tmp_path):
    """InvoiceDate with a time, StockCode, Quantity, Price; extra columns are ignored."""
    data = data_settings(transactions=str(FIXTURES / "online_retail_ii.csv"),
                         columns={"date": "InvoiceDate", "product_id": "StockCode",
                                  "quantity": "Quantity", "unit_price": "Price"})
    catalog = read_catalog(CATALOG)
    sales = read_daily_sales(data, catalog, transaction_files(data.transactions))
    assert sales.bad_rows == 0 and sales.transaction_rows == 6
    got = {(r["product_id"], r["date"]): (r["units"], r["revenue"], r["price"],
                                          r["n_transactions"])
           for r in sales.panel.iter_rows(named=True)}
    assert got == {
        ("22041", date(2009, 12, 1)): (48.0, 72.0, 1.5, 1),
        ("22041", date(2009, 12, 2)): (-12.0, -18.0, 1.5, 1),  # only a return: mean unit_price
        ("79323P", date(2009, 12, 1)): (12.0, 81.0, 6.75, 1),
        ("79323P", date(2009, 12, 3)): (4.0, 27.0, 6.75, 1),
        ("85048", date(2009, 12, 1)): (12.0, 83.4, 6.95, 1),
        ("85048", date(2009, 12, 2)): (6.0, 47.7, 7.95, 1),
    }


def test_daily_sales_net_returns_and_weight_price_by_sold_units(tmp_path):
    """Hand-computed day: sales 2 @ 3.0 and 1 @ 6.0, a return of 1 @ 3.0."""
    (tmp_path / "t.csv").write_text(
        "date,product_id,quantity,unit_price\n"
        "2023-01-01,A,2,3.0\n2023-01-01T09:30:00,A,1,6.0\n2023-01-01 18:00,A,-1,3.0\n")
    data = data_settings(transactions=str(tmp_path / "*.csv"))
    sales = read_daily_sales(data, read_catalog(CATALOG), transaction_files(data.transactions))
    row = sales.panel.row(0, named=True)
    assert row == {"product_id": "A", "date": date(2023, 1, 1), "units": 2.0, "revenue": 9.0,
                   "price": 4.0, "n_transactions": 3}


def test_csv_gz_parquet_and_date_format_give_the_same_daily_sales(tmp_path):
    text = ("date,product_id,quantity,unit_price\n"
            "03/01/2023,A,2,3.0\n04/01/2023,B,1,4.0\n03/01/2023,A,1,6.0\n")
    (tmp_path / "a.csv").write_text(text)
    catalog = read_catalog(CATALOG)
    by_format = read_daily_sales(data_settings(date_format="%d/%m/%Y"), catalog,
                                 [tmp_path / "a.csv"]).panel
    typed = pl.read_csv(tmp_path / "a.csv").with_columns(
        pl.col("date").str.strptime(pl.Date, "%d/%m/%Y"))
    typed.write_parquet(tmp_path / "b.parquet")
    iso_csv = typed.with_columns(pl.col("date").cast(pl.String)).write_csv()
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(iso_csv.encode()))
    for name in ("b.parquet", "d.csv.gz"):
        other = read_daily_sales(data_settings(), catalog, [tmp_path / name]).panel
        assert other.equals(by_format), name
    assert by_format["price"].to_list() == [4.0, 4.0]  # (2*3 + 1*6) / 3 and 4.0


def test_files_overlapping_in_dates_combine_exactly(tmp_path, catalog_ids):
    (tmp_path / "a.csv").write_text("date,product_id,quantity,unit_price\n2023-01-01,A,2,3.0\n")
    (tmp_path / "b.csv").write_text("date,product_id,quantity,unit_price\n2023-01-01,A,1,6.0\n")
    data = data_settings(transactions=str(tmp_path / "*.csv"))
    sales = read_daily_sales(data, read_catalog(CATALOG), transaction_files(data.transactions))
    assert sales.panel.select("units", "revenue", "price", "n_transactions").row(0) == (
        3.0, 12.0, 4.0, 2)


def test_no_matching_files_and_unknown_suffix(tmp_path):
    with pytest.raises(MissingInputError, match="no transaction files match"):
        transaction_files(str(tmp_path / "*.csv"))
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(DataError, match="is not a CSV, CSV.gz or Parquet file"):
        transaction_files(str(tmp_path / "*"))


def test_catalog_errors_name_the_line(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("product_id,unit_cost,min_price,max_price\n"
                    "A,1,2,5\nB,1,6,5\nA,1,2,5\nC,x,2,5\n")
    with pytest.raises(DataError) as caught:
        read_catalog(path)
    assert caught.value.message == (
        f"catalog {path} has invalid rows: {path}:3: min_price 6.0 > max_price 5.0; "
        f"{path}:5: cannot read unit_cost 'x' as a number; {path}:4: product_id 'A' repeats")
    with pytest.raises(MissingInputError, match="catalog file not found"):
        read_catalog(tmp_path / "nope.csv")


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_line_numbers_count_line_breaks_inside_quoted_fields(tmp_path, catalog_ids, suffix):
    """Descriptions with line breaks (common in shop exports) must not shift the reported line:
    the bad row below is the 4th record (line 5 by record count) but starts on line 8."""
    import gzip

    text = ("date,product_id,quantity,unit_price,description\n"
            "2023-01-01,A,1,2.5,plain\n"
            '2023-01-02,B,2,3.5,"two\nlines"\n'
            '2023-01-03,C,1,1.5,"three\nmore\nlines"\n'
            "2023-01-04,A,x,2.5,bad quantity here\n"
            "2023-01-05,B,1,3.5,plain\n")
    path = tmp_path / f"sales{suffix}"
    if suffix == ".csv.gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    assert text.splitlines()[7].startswith("2023-01-04,A,x")  # line 8, 1-based
    _, report = read_transaction_file(path, data_settings(max_bad_fraction=0.5), catalog_ids)
    assert report.examples == (f"{path}:8: cannot read quantity 'x' as an integer",)


def test_catalog_line_numbers_count_line_breaks_inside_quoted_fields(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("product_id,unit_cost,min_price,max_price,category\n"
                    'A,1,2,5,"home\nand garden"\nB,1,6,5,toys\n')
    with pytest.raises(DataError) as caught:
        read_catalog(path)
    assert caught.value.message == (
        f"catalog {path} has invalid rows: {path}:4: min_price 6.0 > max_price 5.0")


# ----------------------------------------------------------------------------------------------
# Stock file (data.stock)

STOCK_ROWS = [
    "date,product_id,on_hand",
    "2023-01-01,A,12",
    "2023-01-02,A,0",
    "2023-01-01,B,7.5",
]


@pytest.mark.parametrize(("bad_line", "reason"), [
    ("2023-01-03,A,many", "cannot read on_hand 'many' as a number"),
    ("2023-01-03,A,-2", "on_hand -2 is not a count >= 0"),
    ("2023-02-30,B,4", "cannot read date '2023-02-30'"),
    ("2023-01-03,,4", "missing product_id"),
    ("2023-01-01,A,3", "product 'A' on 2023-01-01 repeats an earlier row"),
])
def test_a_bad_stock_row_is_skipped_and_reported_with_its_line(tmp_path, bad_line, reason):
    path = tmp_path / "stock.csv"
    path.write_text("\n".join([*STOCK_ROWS[:3], bad_line, STOCK_ROWS[3]]) + "\n")
    stock, report = read_stock(path, data_settings(max_bad_fraction=0.25))
    assert report.rows == 4 and report.bad_rows == 1
    assert report.examples == (f"{path}:4: {reason}",)
    assert stock.rows() == [("A", date(2023, 1, 1), 12.0), ("A", date(2023, 1, 2), 0.0),
                            ("B", date(2023, 1, 1), 7.5)]
    # Above data.max_bad_fraction the file is an error that names the row and the fix.
    with pytest.raises(DataError, match=r"1 of 4 rows \(25.00%\) are bad, more than "
                                        r"data.max_bad_fraction = 1.00%; first: .*:4: ") as err:
        read_stock(path, data_settings())
    assert "data.max_bad_fraction" in err.value.hint


def test_stock_file_problems_are_clear_errors(tmp_path):
    with pytest.raises(MissingInputError, match="stock file not found"):
        read_stock(tmp_path / "none.csv", data_settings())
    path = tmp_path / "stock.csv"
    path.write_text("date,product_id,units\n2023-01-01,A,3\n")
    with pytest.raises(DataError, match="has no column 'on_hand'"):
        read_stock(path, data_settings())
    path.write_text("date,product_id,on_hand\n")
    with pytest.raises(DataError, match="has a header but no rows"):
        read_stock(path, data_settings())
    parquet = tmp_path / "stock.parquet"
    pl.DataFrame({"date": [date(2023, 1, 1)], "product_id": ["A"], "on_hand": [3]}
                 ).write_parquet(parquet)
    assert read_stock(parquet, data_settings())[0].rows() == [("A", date(2023, 1, 1), 3.0)]
