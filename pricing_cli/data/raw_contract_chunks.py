"""Split a large CSV transaction file into record-aligned byte ranges (issue 14).

Polars' streaming CSV scan holds about one whole input file in memory (one 351 MB weekly file
of the 4x market alone peaked at 430 MiB), so the reading pass of `features` grew with the
largest file, not with a bounded batch. :func:`csv_chunks` reads a file sequentially in blocks
of about ``chunk_bytes`` and hands back the header and one block of whole records at a time,
so the reader (data/raw_contract.py) parses one bounded block after another.

Where a block is cut:

* only between records: a line break counts as a record end only when the number of ``"``
  bytes before it is even (RFC 4180 quoting, which is what Polars reads: a doubled ``""``
  inside a quoted field adds two), so a quoted field holding a line break is never cut; a
  CRLF line keeps its ``\\r`` (the cut is after the ``\\n``);
* and, where it can, between two *groups*: the records of one (product_id, day) are summed
  together, and a group cut in two is summed as two partial sums added afterwards. The cut
  therefore moves back to the start of the last group in the block (the key is the raw
  product_id, stripped, and the date's first 10 characters when no ``data.date_format`` is
  set, else the date text as written), which keeps every product-day of a file sorted by day
  and product (as `pricectl generate` writes them, and as most exports are) in one block.
  A group longer than half a block is cut anyway.

Counts and integer sums are exact whatever the cuts. Float sums (revenue, price_sum) may
still differ in the last bit from reading the file in one piece: Polars' streaming group_by
splits its own input at points of its own, in one piece as in blocks (two runs of the
one-piece read already differed in the last bit on a few product-days; docs/scaling.md).

Gzip files are decompressed as a stream, so the same holds for ``.csv.gz``.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

QUOTE, NEWLINE = b'"', b"\n"


def _record_end(data: bytes, start: int) -> int:
    """Index just past the first record of ``data[start:]`` (its line break included), or -1
    when that record is not complete in ``data``. ``start`` must be a record start."""
    quotes = 0
    position = start
    while True:
        newline = data.find(NEWLINE, position)
        if newline < 0:
            return -1
        quotes += data.count(QUOTE, position, newline)
        if quotes % 2 == 0:
            return newline + 1
        position = newline + 1


def _last_record_end(data: bytes, limit: int, quotes_before_limit: int) -> int:
    """The largest record end ``e <= limit`` in ``data`` (``data[:e]`` is whole records),
    or 0 when there is none. ``quotes_before_limit`` is the count of ``"`` in
    ``data[:limit]``; ``data`` starts at a record start."""
    newline = data.rfind(NEWLINE, 0, limit)
    quotes = quotes_before_limit
    while newline >= 0:
        quotes -= data.count(QUOTE, newline, limit)
        if quotes % 2 == 0:
            return newline + 1
        limit = newline
        newline = data.rfind(NEWLINE, 0, limit)
    return 0


def _key(record: bytes, columns: tuple[int, int], date_prefix: bool) -> tuple[str, str] | None:
    """(product_id, day) as written in one raw record, or None if it has too few fields."""
    rows = list(csv.reader(io.StringIO(record.decode("utf-8", errors="replace"))))
    fields = rows[0] if rows else []
    if len(fields) <= max(columns):
        return None
    product, day = fields[columns[0]].strip(), fields[columns[1]].strip()
    return product, day[:10] if date_prefix else day


def _group_cut(data: bytes, end: int, quotes_before_end: int, columns: tuple[int, int],
               date_prefix: bool) -> int:
    """Move the cut ``end`` (a record end) back to the start of the last group of records
    before it, keeping at least half of ``data[:end]``; ``end`` itself when that fails."""
    # data[end - 1] is the record's line break, so data[:end - 1] has the same quotes.
    last_start = _last_record_end(data, end - 1, quotes_before_end)
    if last_start == 0:
        return end
    key = _key(data[last_start:end], columns, date_prefix)
    if key is None:
        return end
    cut = last_start
    quotes = quotes_before_end - data.count(QUOTE, last_start, end)
    while cut > end // 2:
        previous = _last_record_end(data, cut - 1, quotes)
        if _key(data[previous:cut], columns, date_prefix) != key:
            return cut
        quotes -= data.count(QUOTE, previous, cut)
        cut = previous
    return end


def _open(path: Path) -> BinaryIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def csv_chunks(path: Path, chunk_bytes: int, key_columns: tuple[int, int] | None = None,
               date_prefix: bool = True) -> Iterator[tuple[bytes, bytes]]:
    """``(header, records)`` for consecutive blocks of whole records of the CSV ``path``.

    Args:
        path: a CSV or CSV.gz file.
        chunk_bytes: about how many bytes each block holds (a block holds at least one
            record, so a single longer record makes a longer block).
        key_columns: the field indices of product_id and date, to cut between groups (see
            the module docstring); None: cut at the last record end in the block.
        date_prefix: compare only the date's first 10 characters (ISO dates and datetimes).

    Yields:
        The header record (the file's first record, its line break included, the same
        bytes every time) and a non-empty block; the blocks joined are the file after the
        header, byte for byte.
    """
    with _open(path) as handle:
        data = b""
        header = b""
        at_eof = False
        while not header and not at_eof:
            block = handle.read(chunk_bytes)
            at_eof = not block
            data += block
            end = _record_end(data, 0)
            if end > 0:
                header, data = data[:end], data[end:]
            elif at_eof:
                header, data = data, b""  # a header without a line break, no records
        if not header:
            return  # an empty file: no header, no records
        while True:
            while len(data) < chunk_bytes and not at_eof:
                block = handle.read(chunk_bytes - len(data))
                at_eof = not block
                data += block
            if at_eof:
                if data:
                    yield header, data
                return
            quotes = data.count(QUOTE)
            end = _last_record_end(data, len(data), quotes)
            if end == 0:
                # One record longer than the block: read on until it ends.
                more = handle.read(chunk_bytes)
                at_eof = not more
                data += more
                continue
            if key_columns is not None:
                end = _group_cut(data, end, quotes - data.count(QUOTE, end), key_columns,
                                 date_prefix)
            yield header, data[:end]
            data = data[end:]


def key_columns(header: list[str], product_column: str, date_column: str) -> tuple[int, int]:
    """Field indices of the product_id and date columns in a header (Polars' names)."""
    return header.index(product_column), header.index(date_column)


def is_large(path: Path, chunk_bytes: int, gzip_ratio: int = 8) -> bool:
    """Whether ``path`` is read in blocks: a CSV over ``chunk_bytes`` on disk, or a CSV.gz
    over ``chunk_bytes / gzip_ratio`` (transaction CSVs compress about 5-10x)."""
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        return size * gzip_ratio > chunk_bytes
    return size > chunk_bytes

