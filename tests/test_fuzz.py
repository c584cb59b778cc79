"""Fuzzing (Hypothesis): the raw transaction reader and validate-batches.

* Reading a transaction file ends either in a report (bad rows counted, ``file:line``
  examples) or in a :class:`DataError` naming the file, never in another exception; on rows
  whose goodness is known by construction, the counts, the example lines and the sums are
  exactly those computed by hand.
* Every byte-level mutation of a real batch file (bit flips, truncation, overwritten ranges,
  appended or prepended junk) is reported by ``validate_batch``; none slips through and none
  crashes it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import os
import random
import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench.fuzz_batches import zip_structure_offsets
from pricing_cli import cli
from pricing_cli.config import DataSettings, load_settings
from pricing_cli.data.raw_contract import FileReport, read_catalog, read_transaction_file
from pricing_cli.errors import DataError
from pricing_cli.stages.batch_checks import validate_batch
from pricing_cli.stages.batches import read_manifest

CATALOG_IDS = ("A", "B", "C", "85048")
HEADER = "date,product_id,quantity,unit_price"


# PRICECTL_FUZZ_SCALE=N runs N times the examples, drawn at random instead of reproducibly:
# a longer bug hunt than the suite's default.
FUZZ_SCALE = int(os.environ.get("PRICECTL_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Small, reproducible runs: the same examples every time, nothing stored in the repo."""
    return settings(max_examples=examples * FUZZ_SCALE, deadline=None,
                    derandomize=FUZZ_SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@dataclass(frozen=True)
class Reader:
    lenient: DataSettings  # data.max_bad_fraction = 100%: every file with rows gives a report
    strict: DataSettings  # the default 1%
    ids: pl.Series


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Reader:
    catalog = tmp_path_factory.mktemp("catalog") / "catalog.csv"
    catalog.write_text("product_id,unit_cost,min_price,max_price\n"
                       + "".join(f"{pid},1.0,2.0,5.0\n" for pid in CATALOG_IDS))

    def data(fraction: float) -> DataSettings:
        flags = {"data.catalog": str(catalog), "data.max_bad_fraction": fraction,
                 "data.bad_row_examples": 5}
        return load_settings(preset="tiny", flags=flags, environ={}).data

    strict = data(0.01)
    assert strict.max_bad_fraction == 0.01
    return Reader(data(1.0), strict, read_catalog(catalog)["product_id"])


def read_or_error(path: Path, data: DataSettings, ids: pl.Series
                  ) -> tuple[pl.DataFrame, FileReport] | None:
    """Read ``path``; None for a DataError naming it. Any other exception fails the test."""
    try:
        sums, report = read_transaction_file(path, data, ids)
    except DataError as exc:
        assert str(path) in exc.message, exc.message
        assert exc.hint
        return None
    # A report is consistent with itself and names the file in every example.
    assert 1 <= report.rows and 0 <= report.bad_rows <= report.rows
    assert report.bad_fraction <= data.max_bad_fraction
    assert len(report.examples) == min(report.bad_rows, data.bad_row_examples)
    for example in report.examples:
        assert example.startswith(f"{path}:"), example
        line = example.removeprefix(f"{path}:").split(":", 1)[0]
        first = 1 if path.suffix == ".parquet" else 2  # a CSV's line 1 is its header
        assert line.isdigit() and int(line) >= first, example
    assert int(sums["n_transactions"].sum() or 0) == (report.rows - report.bad_rows
                                                      - report.outside_catalog)
    assert sums["product_id"].is_in(list(CATALOG_IDS)).all()
    assert sums["date"].null_count() == 0
    return sums, report


# ----------------------------------------------------------------------------------------------
# Rows whose goodness is known by construction: exact counts, lines and sums

GARBAGE = st.one_of(
    st.sampled_from(["", " ", "n/a", "NULL", '"', '""', ",", "a,b", "\t", "é", "€", "💥",
                     "\x00"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Nd", "Cs")),
            min_size=1, max_size=20).filter(lambda s: s.strip() != ""),
    st.text(alphabet="xyz,\"' ", min_size=1000, max_size=3000),  # very long, quoted
)
GOOD_DATE = st.tuples(
    st.dates(date(1990, 1, 1), date(2040, 12, 31)),
    st.sampled_from(["", " 00:00", "T12:34:56", "T23:59:59.123Z", " 08:00:00+02:00"]),
).map(lambda d: d[0].isoformat() + d[1])
BAD_DATE = st.one_of(
    GARBAGE,
    st.sampled_from(["2023-02-30", "2023-13-01", "2023-00-10", "23-01-01", "2023/01/01",
                     "01.02.2023", "2023-01-01x", "2023-01-01 7:45", "2023-1-1", "2023-01-1",
                     "20231-01-01", "+2023-01-01", "٢٠٢٣-٠١-٠١"]),
)
GOOD_QTY = st.integers(-10**6, 10**6)
BAD_QTY = st.one_of(GARBAGE, st.sampled_from(["1.5", "two", "1e3", "nan", "inf", "--1",
                                              "99999999999999999999999"]))
GOOD_PRICE = st.floats(0.01, 1e6, allow_nan=False).map(repr)
BAD_PRICE = st.one_of(GARBAGE, st.sampled_from(["0", "0.0", "-1.5", "-0", "nan", "NaN", "inf",
                                                "-inf", "1,5", "€3", "1e999"]))
GOOD_PRODUCT = st.sampled_from(CATALOG_IDS).flatmap(
    lambda pid: st.sampled_from([pid, f" {pid}", f"{pid} "]))
# A blank product is a bad row; any other product not in the catalog is skipped and counted
# apart (kept clear of characters a strip could remove, so the expected count is exact).
BAD_PRODUCT = st.sampled_from(["", "   "])
OUTSIDE_PRODUCT = st.one_of(
    st.sampled_from(["a", "ZZZ", "85048.0", "A B"]),
    # an empty id is a missing field (a bad row), not a product outside the catalog
    GARBAGE.filter(lambda s: s != "" and s.strip() == s and s not in CATALOG_IDS
                   and not any(c.isspace() or ord(c) < 32 for c in s)))


@st.composite
def known_row(draw) -> tuple[list[str], str | None, int]:
    """(fields, the reason it is bad or None, quantity when good)."""
    fields = {"date": draw(GOOD_DATE), "product_id": draw(GOOD_PRODUCT),
              "quantity": str(draw(GOOD_QTY)), "unit_price": draw(GOOD_PRICE)}
    broken = draw(st.sampled_from([None, None, "date", "product_id", "quantity", "unit_price",
                                   "outside"]))
    bad_values = {"date": BAD_DATE, "product_id": BAD_PRODUCT, "quantity": BAD_QTY,
                  "unit_price": BAD_PRICE, "outside": OUTSIDE_PRODUCT}
    if broken is not None:
        fields["product_id" if broken == "outside" else broken] = draw(bad_values[broken])
    quantity = int(fields["quantity"]) if broken is None else 0
    return [fields[c] for c in HEADER.split(",")], broken, quantity


def write_csv(path: Path, rows: list[list[str]], gz: bool = False) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER.split(","))
    writer.writerows(rows)
    raw = buffer.getvalue().encode()
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)


@fuzz(60)
@given(rows=st.lists(known_row(), min_size=1, max_size=40), gz=st.booleans())
def test_rows_with_known_garbage_are_counted_and_reported_exactly(rows, gz, tmp_path,
                                                                  reader):
    # A field holding a line break would make a row span two lines: kept for the next test.
    assume(not any("\n" in f or "\r" in f for fields, _, _ in rows for f in fields))
    path = tmp_path / ("t.csv.gz" if gz else "t.csv")
    write_csv(path, [fields for fields, _, _ in rows], gz=gz)
    bad_lines = [i + 2 for i, (_, broken, _) in enumerate(rows)
                 if broken is not None and broken != "outside"]
    outside = sum(broken == "outside" for _, broken, _ in rows)
    good = [(fields, qty) for fields, broken, qty in rows if broken is None]

    result = read_or_error(path, reader.lenient, reader.ids)
    assert result is not None  # even when every row is bad: max_bad_fraction = 100%
    sums, report = result
    assert (report.rows, report.bad_rows, report.outside_catalog) == (
        len(rows), len(bad_lines), outside)
    assert [int(e.removeprefix(f"{path}:").split(":", 1)[0]) for e in report.examples] == \
        bad_lines[:5]
    assert int(sums["units"].sum() or 0) == sum(qty for _, qty in good)
    assert sums.height == len({(f[1].strip(), f[0][:10]) for f, _ in good})

    # Under the default 1% limit, any bad row in fewer than 100 rows is an error naming it.
    strict = read_or_error(path, reader.strict, reader.ids)
    assert (strict is None) == bool(bad_lines)


# ----------------------------------------------------------------------------------------------
# Anything at all: a report or a DataError naming the file


ANY_FIELD = st.one_of(GARBAGE, GOOD_DATE, GOOD_PRICE, GOOD_PRODUCT, GOOD_QTY.map(str),
                      st.text(max_size=30))


@fuzz(60)
@given(rows=st.lists(st.lists(ANY_FIELD, min_size=0, max_size=6), max_size=25),
       header=st.sampled_from([HEADER, HEADER + ",store_id", "unit_price,quantity,product_id,date",
                               "date,product_id,quantity", "", "date;product_id;quantity"]))
def test_random_text_rows_give_a_report_or_a_data_error(rows, header, tmp_path, reader):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=random.Random(len(rows)).choice(["\n", "\r\n"]))
    if header:
        writer.writerow(header.split(","))
    writer.writerows(rows)
    path = tmp_path / "t.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    read_or_error(path, reader.lenient, reader.ids)
    read_or_error(path, reader.strict, reader.ids)


@fuzz(60)
@given(body=st.binary(max_size=400), with_header=st.booleans(),
       suffix=st.sampled_from([".csv", ".txt", ".csv.gz", ".parquet"]))
def test_random_bytes_give_a_report_or_a_data_error(body, with_header, suffix, tmp_path,
                                                    reader):
    path = tmp_path / f"t{suffix}"
    path.write_bytes((HEADER.encode() + b"\n" if with_header else b"") + body)
    read_or_error(path, reader.lenient, reader.ids)


def valid_rows(n: int) -> list[list[str]]:
    day = date(2023, 1, 1)
    return [[(day + timedelta(days=i % 30)).isoformat(), CATALOG_IDS[i % 4], str(1 + i % 3),
             f"{2.5 + i % 7}"] for i in range(n)]


@fuzz(60)
@given(cut=st.floats(0.0, 1.0, exclude_max=True),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)),
                      max_size=4),
       append=st.binary(max_size=40))
def test_truncated_and_corrupted_gzip_gives_a_report_or_a_data_error(cut, flips, append,
                                                                     tmp_path, reader):
    raw = io.StringIO()
    csv.writer(raw, lineterminator="\n").writerows([HEADER.split(","), *valid_rows(300)])
    data = bytearray(gzip.compress(raw.getvalue().encode(), mtime=0))
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    if not flips and not append:
        data = data[: int(cut * len(data))]
    path = tmp_path / "t.csv.gz"
    path.write_bytes(bytes(data) + append)
    result = read_or_error(path, reader.lenient, reader.ids)
    if not flips and not append and result is not None:
        pytest.fail(f"a gzip file cut at {int(cut * len(data))} bytes was read without error")


def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path, reader):
    raw = "\n".join([HEADER, *(",".join(r) for r in valid_rows(300))]).encode()
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(raw, mtime=0)[:-9])  # loses the 8-byte trailer and one more
    with pytest.raises(DataError) as caught:
        read_transaction_file(path, reader.lenient, reader.ids)
    assert caught.value.message.startswith(f"{path} is a truncated or corrupt gzip file")


PARQUET_COLUMNS = {
    "str": st.lists(st.one_of(st.none(), ANY_FIELD), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.String)),
    "int": st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), min_size=8,
                    max_size=8).map(lambda v: pl.Series(v, dtype=pl.Int64)),
    "float": st.lists(st.one_of(st.none(), st.floats()), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.Float64)),
    "bool": st.lists(st.one_of(st.none(), st.booleans()), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.Boolean)),
    "date": st.lists(st.one_of(st.none(), st.dates()), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.Date)),
    "datetime": st.lists(st.one_of(st.none(), st.datetimes()), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.Datetime("us"))),
    "list": st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.List(pl.Int64))),
    "binary": st.lists(st.binary(max_size=5), min_size=8, max_size=8).map(
        lambda v: pl.Series(v, dtype=pl.Binary)),
}


@fuzz(40)
@given(kinds=st.fixed_dictionaries({c: st.sampled_from(sorted(PARQUET_COLUMNS))
                                    for c in HEADER.split(",")}), data=st.data())
def test_parquet_with_any_column_types_gives_a_report_or_a_data_error(kinds, data, tmp_path,
                                                                      reader):
    frame = pl.DataFrame({c: data.draw(PARQUET_COLUMNS[k]).alias(c) for c, k in kinds.items()})
    path = tmp_path / "t.parquet"
    frame.write_parquet(path)
    read_or_error(path, reader.lenient, reader.ids)


# ----------------------------------------------------------------------------------------------
# Batch files: every mutation is caught by validate-batches


@pytest.fixture(scope="module")
def batch_folder(tiny_batches: Path) -> Path:
    """A real tiny batch set (generate → features → preprocess), the session's
    (tests/conftest.py); read only: the tests write their mutated copies elsewhere."""
    folder = tiny_batches / "data" / "intermediate"
    manifest = read_manifest(folder)
    for path in sorted(folder.glob("batch_*.npz")):
        assert validate_batch(path, manifest) == []
    return folder


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                  st.integers(0, 7)), min_size=1, max_size=8)),
    # bits of the zip structure (headers, directory, end record): ~2% of the file, rarely hit
    # at random, and the part that member checksums do not cover
    st.tuples(st.just("flip_zip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                      st.integers(0, 7)), min_size=1,
                                            max_size=3)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("overwrite"), st.tuples(st.floats(0, 1, exclude_max=True),
                                              st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("prepend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1, exclude_max=True),
                                           st.binary(min_size=1, max_size=64))),
)


structure_offsets = functools.cache(zip_structure_offsets)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    out = bytearray(data)
    if kind == "flip":
        for where, bit in arg:
            out[int(where * len(out))] ^= 1 << bit
    elif kind == "flip_zip":
        structure = structure_offsets(data)
        for where, bit in arg:
            out[structure[int(where * len(structure))]] ^= 1 << bit
    elif kind == "truncate":
        del out[int(arg * len(out)):]
    elif kind == "overwrite":
        start = int(arg[0] * len(out))
        out[start:start + len(arg[1])] = arg[1][:len(out) - start]
    elif kind == "append":
        out += arg
    elif kind == "prepend":
        out[:0] = arg
    else:
        start = int(arg[0] * len(out))
        out[start:start] = arg[1]
    return bytes(out)


@fuzz(300)
@given(name=st.sampled_from(["batch_0000.npz", "batch_0002.npz"]), mutation=MUTATION)
def test_every_mutation_of_a_batch_file_is_reported(name, mutation, batch_folder, tmp_path):
    original = (batch_folder / name).read_bytes()
    mutated = mutate(original, mutation)
    assume(mutated != original)  # two flips of the same bit cancel out
    path = tmp_path / name
    path.write_bytes(mutated)
    problems = validate_batch(path, read_manifest(batch_folder))  # never raises
    assert problems, f"{mutation[0]} not caught"
    assert all(p.batch == str(path) and p.what and p.why and p.fix for p in problems)


def test_a_flipped_bit_in_a_header_field_the_zip_reader_ignores_fails_validate_batches(
        batch_folder, tmp_path, monkeypatch, capsys):
    # Byte 10 of the first local header is its modification time, which zipfile never reads;
    # the members and their CRCs are intact, so only the layout check sees the change.
    folder = tmp_path / "intermediate"
    shutil.copytree(batch_folder, folder)
    path = folder / "batch_0001.npz"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    assert validate_batch(folder / "batch_0000.npz", read_manifest(folder)) == []
    problems = [p.what for p in validate_batch(path, read_manifest(folder))]
    assert problems == ["bytes 0..67 differ from the zip headers the batch writer gives for "
                        "these members"]

    monkeypatch.chdir(tmp_path)
    code = cli.main(["--preset", "tiny", "--quiet", "--json", "validate-batches", str(folder)])
    assert code == 6  # partial failure (README "Exit codes")
    result = json.loads(capsys.readouterr().out)
    assert result["summary"]["batches_ok"] == 2
    assert [f.split(". Why")[0] for f in result["failures"]] == [
        f"{path}: bytes 0..67 differ from the zip headers the batch writer gives for these "
        "members"]


def test_junk_appended_to_a_batch_is_reported_against_the_writer_and_the_manifest(
        batch_folder, tmp_path):
    folder = tmp_path / "intermediate"
    shutil.copytree(batch_folder, folder)
    path = folder / "batch_0002.npz"
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"\0" * 7)
    assert [p.what for p in validate_batch(path, read_manifest(folder))] == [
        f"the file has {size + 7:,} bytes where the batch writer gives {size:,} for these "
        "members (junk appended or bytes cut)",
        f"the file has {size + 7:,} bytes but the manifest records {size:,}",
    ]
