"""Typed Parquet transactions follow the CSV rules (issue 9, docs/security.md).

A Parquet column has a type of its own: a Float64 quantity was cut (2.5 sold as 2) and a
Boolean quantity or price read as 1/0. Both are bad rows with their reason, as in a CSV.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pricing_cli import cli
from pricing_cli.data.raw_contract import read_catalog, read_transaction_file
from pricing_cli.errors import DataError
from tests.support.raw import CATALOG, data_settings


@pytest.fixture(scope="module")
def catalog_ids() -> pl.Series:
    return read_catalog(CATALOG)["product_id"]


def transactions(quantity: pl.Series, unit_price: pl.Series | None = None) -> pl.DataFrame:
    n = len(quantity)
    return pl.DataFrame({
        "date": pl.date_range(pl.date(2023, 1, 1), pl.date(2023, 1, n), eager=True),
        "product_id": ["A"] * n,
        "quantity": quantity,
        "unit_price": unit_price if unit_price is not None else pl.Series([3.0] * n),
    })


def test_a_fractional_float_quantity_is_a_bad_row_not_truncated(
        tmp_path: Path, catalog_ids: pl.Series) -> None:
    path = tmp_path / "sales.parquet"
    transactions(pl.Series([2.0, 2.5, 1.0, 4.0, 3.0, 1.0, 2.0, 5.0, 1.0, 1.0])).write_parquet(path)
    sums, report = read_transaction_file(path, data_settings(max_bad_fraction=0.2), catalog_ids)
    assert (report.rows, report.bad_rows) == (10, 1)
    assert report.examples == (f"{path}:2: cannot read quantity 2.5 as an integer",)
    # the integral floats are read exactly: 20 units, without the 2.5
    assert sums["units"].sum() == 20.0 and sums["n_transactions"].sum() == 9
    with pytest.raises(DataError) as caught:
        read_transaction_file(path, data_settings(), catalog_ids)
    assert caught.value.message == (
        f"{path}: 1 of 10 rows (10.00%) are bad, more than data.max_bad_fraction = 1.00%; "
        f"first: {path}:2: cannot read quantity 2.5 as an integer")


def test_nan_and_infinite_float_quantities_are_bad_rows(tmp_path: Path,
                                                        catalog_ids: pl.Series) -> None:
    path = tmp_path / "sales.parquet"
    transactions(pl.Series([1.0, float("nan"), float("inf"), 1e300, 2.0])).write_parquet(path)
    _, report = read_transaction_file(path, data_settings(max_bad_fraction=1.0), catalog_ids)
    assert report.examples == (f"{path}:2: cannot read quantity nan as an integer",
                               f"{path}:3: cannot read quantity inf as an integer",
                               f"{path}:4: cannot read quantity 1e+300 as an integer")


@pytest.mark.parametrize("column", ["quantity", "unit_price"])
def test_a_boolean_column_is_bad_rows_with_a_clear_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        column: str) -> None:
    flags = pl.Series([True, False, True])
    frame = (transactions(flags) if column == "quantity"
             else transactions(pl.Series([1, 2, 1]), flags))
    (tmp_path / "raw").mkdir()
    frame.write_parquet(tmp_path / "raw" / "sales.parquet")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["--preset", "tiny", "-q", "features", "--transactions", "raw/*.parquet",
                     "--catalog", str(CATALOG)])
    err = capsys.readouterr().err
    path = "raw/sales.parquet"
    assert code == 4
    assert err.startswith(
        f"pricectl: data error: {path}: 3 of 3 rows (100.00%) are bad, more than "
        f"data.max_bad_fraction = 1.00%; first: {path}:1: {column} True is a boolean (a "
        f"true/false column), not a number; {path}:2: {column} False is a boolean (a "
        f"true/false column), not a number; ")
