"""Large CSV files read in blocks of whole records (issue 14): the cuts, and the same sums,
counts and bad-row lines as reading each file in one piece."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from pricing_cli.config import load_settings
from pricing_cli.data import raw_contract
from pricing_cli.data.raw_contract import read_catalog, read_transaction_file
from pricing_cli.data.raw_contract_chunks import csv_chunks
from pricing_cli.errors import DataError
from tests.support.raw import CATALOG, data_settings

# A quoted field with a line break (and a doubled quote), CRLF lines, a blank line and two bad
# rows (lines 5 and 9 of the file: record numbers and physical lines differ after line 3).
TRICKY = (b'date,product_id,quantity,unit_price,note\r\n'
          b'2024-01-01,A,2,2.5,"plain"\r\n'
          b'2024-01-01,A,1,2.5,"two\r\nlines, and a ""quote"""\r\n'
          b'2024-01-01,B,oops,3.0,\r\n'
          b'\r\n'
          b'2024-01-02,A,3,2.75,"x\ny"\r\n'
          b'2024-01-02,B,1,3.25,\r\n'
          b'2024-01-02,B,1,-1,bad price\r\n'
          b'2024-01-03,C,4,3.5,last')


def chunk_mb(n_bytes: int) -> float:
    return n_bytes / 2**20


@pytest.fixture(scope="module")
def catalog_ids():
    return read_catalog(CATALOG)["product_id"]


@pytest.mark.parametrize("size", range(1, len(TRICKY) + 2))
def test_blocks_are_whole_records_that_join_to_the_file(tmp_path, size):
    path = tmp_path / "t.csv"
    path.write_bytes(TRICKY)
    blocks = list(csv_chunks(path, size, key_columns=(1, 0)))
    header = b"date,product_id,quantity,unit_price,note\r\n"
    assert all(h == header for h, _ in blocks)
    assert header + b"".join(b for _, b in blocks) == TRICKY
    for _, block in blocks:
        # every block parses on its own into whole rows of 5 fields (the quoted line break
        # and CRLF never cut): a cut inside a quote would leave an odd count of quotes
        assert block.count(b'"') % 2 == 0
        frame = pl.read_csv(header + block, infer_schema=False)
        assert frame.width == 5


def test_a_cut_moves_back_to_the_start_of_a_product_day(tmp_path):
    rows = [f"2024-01-0{d},P{p},1,1.0\n".encode() for d in (1, 2) for p in (1, 2)
            for _ in range(3)]  # 4 groups of 3 records, 20 bytes each
    assert {len(r) for r in rows} == {20}
    path = tmp_path / "g.csv"
    path.write_bytes(b"date,product_id,quantity,unit_price\n" + b"".join(rows))
    cut_free = [len(b) // 20 for _, b in csv_chunks(path, 20 * 5, key_columns=None)]
    assert cut_free == [5, 5, 2]  # records per block, cut inside groups
    grouped = [len(b) // 20 for _, b in csv_chunks(path, 20 * 5, key_columns=(1, 0))]
    assert grouped == [3, 3, 3, 3]  # each block ends where a product-day ends


def test_gzip_files_are_cut_like_plain_ones(tmp_path):
    plain = tmp_path / "t.csv"
    plain.write_bytes(TRICKY)
    packed = tmp_path / "t.csv.gz"
    packed.write_bytes(gzip.compress(TRICKY))
    assert list(csv_chunks(packed, 40, (1, 0))) == list(csv_chunks(plain, 40, (1, 0)))


def whole_and_blocks(path: Path, catalog_ids, sizes, **flags):
    whole = read_transaction_file(path, data_settings(**flags), catalog_ids)
    for size in sizes:
        yield whole, read_transaction_file(
            path, data_settings(read_chunk_mb=chunk_mb(size), **flags), catalog_ids), size


@pytest.mark.parametrize("size", [1, 20, 45, 64, 100, 200])
def test_blocks_give_the_same_sums_counts_and_lines_as_one_piece(tmp_path, catalog_ids, size):
    path = tmp_path / "t.csv"
    path.write_bytes(TRICKY)
    flags = {"max_bad_fraction": 0.5}
    whole = read_transaction_file(path, data_settings(**flags), catalog_ids)
    blocks = read_transaction_file(path, data_settings(read_chunk_mb=chunk_mb(size), **flags),
                                   catalog_ids)
    # by hand: 8 records (the blank line is one, and bad), bad: "oops", the blank line, -1
    assert (whole[1].rows, whole[1].bad_rows) == (8, 3)
    assert whole[1].examples == (f"{path}:5: cannot read quantity 'oops' as an integer",
                                 f"{path}:6: empty line",
                                 f"{path}:10: unit_price -1 is not a positive number")
    assert blocks[1] == whole[1]
    key = ["product_id", "date"]
    assert blocks[0].sort(key).equals(whole[0].sort(key))
    a = whole[0].sort(key)
    assert a["units"].to_list() == [3.0, 3.0, 1.0, 4.0]  # A 01-01, A 01-02, B 01-02, C 01-03
    assert a["revenue"].to_list() == [7.5, 8.25, 3.25, 14.0]
    assert a["n_transactions"].to_list() == [2, 1, 1, 1]


def test_sums_over_blocks_match_one_piece_for_files_sorted_by_day(tmp_path, catalog_ids):
    # 5 days x 6 records of floats whose sum depends on its order. Counts and integer sums
    # are exact; the float sums may differ in the last bit only (Polars' streaming sum cuts
    # its input at its own points, in one piece as in blocks: a documented limit).
    prices = ["0.1", "0.2", "0.3", "0.7", "0.6", "0.3"] * 5
    lines = [f"2024-01-{1 + i // 6:02d},A,{1 + i % 2},{p}\n" for i, p in enumerate(prices)]
    path = tmp_path / "s.csv"
    path.write_text("date,product_id,quantity,unit_price\n" + "".join(lines))
    for whole, blocks, size in whole_and_blocks(path, catalog_ids, [40, 240, 300, 420, 500]):
        a, b = whole[0].sort("date"), blocks[0].sort("date")
        assert blocks[1] == whole[1], size
        assert b.select("product_id", "date", "units", "sold_units", "n_transactions").equals(
            a.select("product_id", "date", "units", "sold_units", "n_transactions")), size
        assert a["units"].to_list() == [9.0] * 5  # 1+2+1+2+1+2 each day
        for column in ("revenue", "sold_revenue", "price_sum"):
            assert b[column].to_list() == pytest.approx(a[column].to_list(), rel=1e-15, abs=0)
        assert a["price_sum"].to_list() == pytest.approx([2.2] * 5, rel=1e-15)


def test_a_truncated_large_gzip_is_named(tmp_path, catalog_ids):
    body = b"".join(f"2024-01-01,A,1,{i % 7 + 1}.5\n".encode() for i in range(2000))
    packed = gzip.compress(b"date,product_id,quantity,unit_price\n" + body)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError) as err:
        read_transaction_file(path, data_settings(read_chunk_mb=chunk_mb(64)), catalog_ids)
    assert err.value.message.startswith(f"{path} is a truncated or corrupt gzip file (")
    # the block reader's own error (Python's gzip) gets the same message
    assert raw_contract._read_error(path, EOFError("Compressed file ended")).message == (
        f"{path} is a truncated or corrupt gzip file (Compressed file ended)")


def tiny_settings(root: Path, **flags):
    paths = {"generate.output_dir": str(root / "raw"),
             "data.transactions": str(root / "raw" / "transactions" / "*.csv"),
             "data.catalog": str(root / "raw" / "catalog.csv")}
    return load_settings(preset="tiny", flags={**paths, **flags}, environ={})


def test_tiny_preset_features_read_in_blocks_match_one_piece(tmp_path):
    from pricing_cli.data.generate import run_generate
    from pricing_cli.monitor import RunMonitor
    from pricing_cli.stages.features import run_features

    with RunMonitor("generate", "quiet") as monitor:
        run_generate(tiny_settings(tmp_path), monitor)
    sizes = [p.stat().st_size for p in (tmp_path / "raw" / "transactions").glob("*.csv")]
    assert len(sizes) == 4 and max(sizes) < 2 * 2**20  # the default reads them in one piece
    outputs = {}
    for name, mb in (("whole", 2.0), ("blocks", chunk_mb(3000))):  # about 14 blocks a file
        settings = tiny_settings(tmp_path, **{"features.output_dir": str(tmp_path / name),
                                              "data.read_chunk_mb": mb})
        with RunMonitor("features", "quiet") as monitor:
            outputs[name] = run_features(settings, monitor).summary
    for key in ("transaction_rows", "product_days"):
        assert outputs["blocks"][key] == outputs["whole"][key]
    names = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.name != "run.json")
    assert names == sorted(p.name for p in (tmp_path / "blocks").iterdir()
                           if p.name != "run.json")
    manifests = [json.loads((tmp_path / name / "feature_manifest.json").read_text())
                 for name in ("whole", "blocks")]
    scalers = [m.pop("scalers") for m in manifests]
    assert manifests[0] == manifests[1]  # products, rows per split, split dates, columns
    assert list(scalers[0]) == list(scalers[1])
    for column, scaler in scalers[0].items():  # the means and stds: last bits only
        assert scalers[1][column]["mean"] == pytest.approx(scaler["mean"], rel=1e-9, abs=1e-15)
        assert scalers[1][column]["std"] == pytest.approx(scaler["std"], rel=1e-9)
    for name in (n for n in names if n.endswith(".parquet")):
        a = pl.read_parquet(tmp_path / "whole" / name)
        b = pl.read_parquet(tmp_path / "blocks" / name)
        assert a.columns == b.columns and a.height == b.height
        for column in a.columns:
            if a[column].dtype.is_float():  # last bits only, see raw_contract_chunks.py
                assert b[column].to_numpy() == pytest.approx(a[column].to_numpy(), rel=1e-9,
                                                             abs=1e-12), (name, column)
            else:
                assert b[column].equals(a[column]), (name, column)


def test_an_empty_or_header_only_file_has_no_blocks(tmp_path):
    empty, header = tmp_path / "e.csv", tmp_path / "h.csv"
    empty.write_bytes(b"")
    header.write_bytes(b"date,product_id,quantity,unit_price")
    assert list(csv_chunks(empty, 8, (1, 0))) == []
    assert list(csv_chunks(header, 8, (1, 0))) == []
