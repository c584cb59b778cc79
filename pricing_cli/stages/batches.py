"""The batch format: the one writer and reader of ``batch_NNNN.npz``, its checks, legacy import.

A batch is a zip (``.npz``) of plain ``.npy`` members and nothing pickled (full layout in
docs/batch-format.md)::

    format_version   ()       int32    FORMAT_VERSION
    feature_names    (F,)     <U..     state feature names, in column order
    features         (n, F)   float32  state vectors
    labels_<head>    (n,)     int16    -1 where the head does not apply
    masks_<head>     (n, K)   int8     1 = the class may be chosen
    meta_<column>    (n,)     see META_DTYPES

Members are stored uncompressed with fixed zip timestamps, so the same samples always give the
same bytes, and are streamed from per-file blocks, so the writer never concatenates a batch in
memory. Everything is loaded with ``allow_pickle=False``; the single place allowed to unpickle
is :func:`_load_legacy_unsafe`, reached only through
``pricectl validate-batches --convert-legacy --trust-pickle``.

This module also owns ``manifest.json`` (read/write), :func:`validate_batch` and the
``validate-batches`` stage.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import struct
import tokenize
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from numpy.lib import format as npy_format

from pricing_cli.errors import BatchError, ConfigError, MissingInputError
from pricing_cli.pricing import MOVE_DOWN, MOVE_HOLD, MOVE_UP
from pricing_cli.storage import append_line, atomic_write, write_json

if TYPE_CHECKING:
    from pricing_cli.config import Settings
    from pricing_cli.monitor import RunMonitor
    from pricing_cli.runinfo import StageResult

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
# One JSON line per batch finished since manifest.json was last written (see read_manifest).
JOURNAL_NAME = "manifest.journal"
BATCH_GLOB = "batch_*.npz"
MOVE_CLASSES = 3
assert (MOVE_DOWN, MOVE_HOLD, MOVE_UP) == (0, 1, 2), "price_move classes are 0, 1, 2"

# Meta columns and their dtypes. "U" is fixed-width unicode whose width may differ from batch
# to batch (the longest value in that batch).
META_DTYPES: dict[str, str] = {
    "product_index": "int32",
    "product_id": "U",
    "date": "datetime64[D]",
    "split": "U",
    "price": "float64",
    "units": "float64",
    "unit_cost": "float64",
    "min_price": "float64",
    "max_price": "float64",
    "ref_price": "float64",
    "category": "U",
}
# Meta columns the old system's batches may lack, and the value they get when converted.
LEGACY_DEFAULTS = {"category": "none"}
# Members of the old system's batches (pickled): see docs/batch-format.md, "Legacy layout".
LEGACY_MEMBERS = ("strategic_features", "labels", "masks", "df")

# Fixed zip metadata: identical samples must give identical bytes (resume, merge outputs).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# What reading a corrupt zip raises besides BadZipFile (found by tests/test_fuzz.py): a flipped
# bit can set the encryption flag (RuntimeError), name an unknown compression method or zip
# version (NotImplementedError), move an offset before the start of the file (OSError), or
# garble a field that struct cannot unpack.
_CORRUPT_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError,
                NotImplementedError, struct.error, ValueError, OverflowError)
# The batch writer stores members uncompressed (ratio 1). A foreign deflated member is allowed
# up to this ratio: deflate reaches ~1000x only on long runs of one byte, i.e. a zip bomb.
MAX_COMPRESSION_RATIO = 100
_FORGED = ("Do not use this file: delete it and re-run `pricectl preprocess` (only this batch "
           "is rebuilt).")
# What numpy raises on a garbled .npy header: bad magic or dict (ValueError), text the
# tokenizer or the literal parser rejects (TokenError, SyntaxError), an unknown dtype.
_CORRUPT_NPY = (ValueError, SyntaxError, tokenize.TokenError, TypeError, OverflowError)


def batch_name(index: int) -> str:
    """File name of batch ``index``: batch_0000.npz, batch_0001.npz, ..."""
    return f"batch_{index:04d}.npz"


def head_classes(heads: Sequence[str], price_levels: int) -> dict[str, int]:
    """Number of classes of each label head, in the configured order.

    Raises:
        ConfigError: a head other than the built-in price_level and price_move, or a repeat.
    """
    known = {"price_level": price_levels, "price_move": MOVE_CLASSES}
    unknown = [h for h in heads if h not in known]
    if unknown:
        raise ConfigError(f"unknown label head(s) in preprocess.heads: {unknown}",
                          "Built-in heads are price_level and price_move.")
    if not heads or len(set(heads)) != len(heads):
        raise ConfigError(f"preprocess.heads must list each head once, got {list(heads)}",
                          "Use e.g. [price_level, price_move].")
    return {h: known[h] for h in heads}


def member_names(heads: Iterable[str]) -> list[str]:
    """Members of a current-format batch, in the order they are written."""
    heads = list(heads)
    return (["format_version", "feature_names", "features"]
            + [f"labels_{h}" for h in heads] + [f"masks_{h}" for h in heads]
            + [f"meta_{c}" for c in META_DTYPES])


# ----------------------------------------------------------------------------------------------
# Samples in memory


@dataclass
class SampleBlock:
    """Decision samples of one file or one batch, as plain arrays (never lists of dicts).

    Attributes:
        features: (n, F) float32 state vectors.
        labels: head -> (n,) int16.
        masks: head -> (n, K_head) int8.
        meta: column of META_DTYPES -> (n,) array.
    """

    features: np.ndarray
    labels: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    meta: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def split_counts(self) -> dict[str, int]:
        split = self.meta["split"]
        return {s: int(np.count_nonzero(split == s)) for s in SPLITS}

    @classmethod
    def concat(cls, blocks: Sequence[SampleBlock]) -> SampleBlock:
        """One block holding the rows of ``blocks`` in order."""
        first = blocks[0]
        return cls(
            features=np.concatenate([b.features for b in blocks]),
            labels={h: np.concatenate([b.labels[h] for b in blocks]) for h in first.labels},
            masks={h: np.concatenate([b.masks[h] for b in blocks]) for h in first.masks},
            meta={c: np.concatenate([b.meta[c] for b in blocks]) for c in first.meta},
        )

    def take(self, rows: np.ndarray | slice) -> SampleBlock:
        """The rows selected by a boolean mask, an index array or a slice."""
        return SampleBlock(
            features=self.features[rows],
            labels={h: a[rows] for h, a in self.labels.items()},
            masks={h: a[rows] for h, a in self.masks.items()},
            meta={c: a[rows] for c, a in self.meta.items()},
        )


# ----------------------------------------------------------------------------------------------
# Streaming .npy writer (shared with merge)


def npy_header(dtype: np.dtype[Any] | str, shape: tuple[int, ...]) -> bytes:
    """The .npy header ``np.save`` writes for an array of ``dtype`` and ``shape``."""
    header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    buffer = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header over 64 KiB: np.save moves to version 2.0 as well
        buffer = io.BytesIO()
        npy_format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


class NpyStreamWriter:
    """Write one .npy stream of known final shape: the header first, then rows in order.

    The bytes equal ``np.save`` of the concatenated rows, while memory stays one chunk. The
    SHA-256 of all bytes written is returned by :meth:`close` (None with ``digest=False``:
    hashing is a quarter of merge's CPU, and merge's outputs record no digest).

    Args:
        handle: binary file or zip member open for writing.
        dtype: dtype stored; chunks of the same kind are cast to it (e.g. a narrower <U).
        shape: final shape. For a 0-d array, append one 0-d array.
        name: used in error messages.
        digest: compute the SHA-256 of the stream.
    """

    def __init__(self, handle: IO[bytes], dtype: np.dtype[Any] | str,
                 shape: tuple[int, ...], name: str, digest: bool = True) -> None:
        self.handle = handle
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        self.rows_total = self.shape[0] if self.shape else 1
        self.rows_written = 0
        self._digest = hashlib.sha256() if digest else None
        self._write(npy_header(self.dtype, self.shape))

    def _write(self, data: bytes | memoryview) -> None:
        self.handle.write(data)
        if self._digest is not None:
            self._digest.update(data)

    def append(self, rows: np.ndarray) -> None:
        """Append rows; a C-contiguous chunk of the right dtype is written without a copy."""
        n_rows = rows.shape[0] if self.shape else 1
        row_shape = rows.shape[1:] if self.shape else rows.shape
        if row_shape != self.shape[1:]:
            raise BatchError(f"{self.name}: rows of shape {row_shape} appended to an array "
                             f"of row shape {self.shape[1:]}")
        if rows.dtype.kind != self.dtype.kind:
            raise BatchError(f"{self.name}: {rows.dtype} rows appended to a {self.dtype} array")
        if self.rows_written + n_rows > self.rows_total:
            raise BatchError(f"{self.name}: more rows than the {self.rows_total} announced")
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.size:
            self._write(data.reshape(-1).view(np.uint8).data)
        self.rows_written += n_rows

    def close(self) -> str | None:
        """Check that every announced row was written; return the stream's SHA-256."""
        if self.rows_written != self.rows_total:
            raise BatchError(f"{self.name}: {self.rows_written} rows written, "
                             f"{self.rows_total} announced")
        return None if self._digest is None else self._digest.hexdigest()


def zip_member_info(name: str) -> zipfile.ZipInfo:
    """ZipInfo of ``name``.npy: fixed timestamp and permissions, stored uncompressed."""
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def write_npy_member(archive: zipfile.ZipFile, name: str, chunks: Iterable[np.ndarray],
                     dtype: np.dtype[Any] | str, shape: tuple[int, ...]) -> str:
    """Stream row blocks into the member ``name``.npy of ``archive``; return its SHA-256."""
    with archive.open(zip_member_info(name), "w", force_zip64=True) as handle:
        writer = NpyStreamWriter(handle, dtype, shape, name)
        for chunk in chunks:
            writer.append(chunk)
        return str(writer.close())


def copy_npy_member(archive: zipfile.ZipFile, name: str, source: str | Path) -> None:
    """Copy a finished .npy file into member ``name``.npy in constant memory."""
    with open(source, "rb") as src, archive.open(zip_member_info(name), "w",
                                                 force_zip64=True) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


# ----------------------------------------------------------------------------------------------
# Writing a batch


@dataclass
class BatchRecord:
    """What :func:`write_batch` reports about the file it wrote (goes into the manifest)."""

    n_samples: int
    samples: dict[str, int]
    members: dict[str, dict[str, Any]]  # name -> {"shape", "dtype", "sha256"}
    bytes: int


def _unicode_dtype(parts: Sequence[np.ndarray]) -> np.dtype[Any]:
    width = max([p.dtype.itemsize // 4 for p in parts if p.size] + [1])
    return np.dtype(f"<U{width}")


def write_batch(path: str | Path, blocks: Sequence[SampleBlock], feature_names: Sequence[str],
                heads: Mapping[str, int]) -> BatchRecord:
    """Write the samples of ``blocks`` (in order) as one batch file, atomically.

    Args:
        path: final file name; written under a temporary name, fsynced, then renamed.
        blocks: per-file sample blocks; none at all gives a valid empty batch.
        feature_names: the F state feature names.
        heads: head -> number of classes K_head, in member order.

    Returns:
        Sample counts, per-member shape/dtype/SHA-256 and the file size, for the manifest.

    Raises:
        BatchError: a block has the wrong width or lacks a head.
        DiskFullError: the disk filled up; nothing is left under ``path``.
    """
    path = Path(path)
    n_features = len(feature_names)
    n = sum(b.n for b in blocks)
    for block in blocks:
        if block.features.ndim != 2 or block.features.shape[1] != n_features:
            raise BatchError(f"{path.name}: a block has features of shape "
                             f"{block.features.shape}, expected (rows, {n_features})")
        for head, k in heads.items():
            if head not in block.labels or block.masks[head].shape[1:] != (k,):
                raise BatchError(f"{path.name}: a block lacks head {head!r} with {k} classes")

    def member(name: str) -> tuple[list[np.ndarray], np.dtype[Any], tuple[int, ...]]:
        if name == "format_version":
            return [np.array(FORMAT_VERSION, np.int32)], np.dtype(np.int32), ()
        if name == "feature_names":
            names = np.array(list(feature_names), dtype=str).reshape(n_features)
            return [names], _unicode_dtype([names]), (n_features,)
        if name == "features":
            return [b.features for b in blocks], np.dtype(np.float32), (n, n_features)
        if name.startswith("labels_"):
            return [b.labels[name[7:]] for b in blocks], np.dtype(np.int16), (n,)
        if name.startswith("masks_"):
            head = name[6:]
            return [b.masks[head] for b in blocks], np.dtype(np.int8), (n, heads[head])
        column = name[5:]
        parts = [b.meta[column] for b in blocks]
        kind = META_DTYPES[column]
        return parts, (_unicode_dtype(parts) if kind == "U" else np.dtype(kind)), (n,)

    members: dict[str, dict[str, Any]] = {}
    with atomic_write(path, "wb") as handle, zipfile.ZipFile(handle, "w") as archive:
        for name in member_names(heads):
            parts, dtype, shape = member(name)
            sha = write_npy_member(archive, name, parts, dtype, shape)
            members[name] = {"shape": list(shape), "dtype": dtype.str, "sha256": sha}
    samples = dict.fromkeys(SPLITS, 0)
    for block in blocks:
        for split, count in block.split_counts().items():
            samples[split] += count
    return BatchRecord(n, samples, members, path.stat().st_size)


# ----------------------------------------------------------------------------------------------
# Reading a batch (allow_pickle=False, always)


def read_member_headers(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Shape and dtype of every member, from the .npy headers only (no array data is read).

    Raises:
        BatchError: not a zip (e.g. truncated), or a member that is not a .npy array.
    """
    path = Path(path)
    headers: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    try:
        file_size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                _check_member_sizes(path, info, file_size)
                with archive.open(info) as member:
                    shape, dtype, header_size = read_npy_header(
                        member, f"{path}: member {info.filename!r}")
                    _check_declared_size(path, info, shape, dtype, header_size)
                    headers[name] = (shape, dtype)
    except _CORRUPT_ZIP as exc:
        raise BatchError(f"{path}: not a readable .npz (zip) file: {exc}",
                         "The file is truncated or corrupt; delete it and re-run "
                         "`pricectl preprocess` (only this batch is rebuilt).") from None
    return headers


def read_npy_header(handle: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Shape, dtype and header length of the .npy stream at the start of ``handle``.

    Args:
        where: names the file (and member) in errors.

    Raises:
        BatchError: not a .npy header (garbled, truncated), or a Fortran-ordered array
            (batches and processed arrays are C-ordered).
    """
    try:
        version = npy_format.read_magic(handle)
        reader = (npy_format.read_array_header_1_0 if version == (1, 0)
                  else npy_format.read_array_header_2_0)
        shape, fortran, dtype = reader(handle)
    except _CORRUPT_NPY as exc:
        raise BatchError(f"{where} is not a .npy array ({exc})") from None
    if fortran and len(shape) > 1:
        raise BatchError(f"{where} is Fortran-ordered; pricectl writes C-ordered arrays only")
    return tuple(int(n) for n in shape), dtype, handle.tell()


def _check_member_sizes(path: Path, info: zipfile.ZipInfo, file_size: int) -> None:
    """Refuse a member whose zip sizes cannot be honest, before any of it is inflated.

    The batch writer stores members uncompressed, so a deflated member that inflates more than
    MAX_COMPRESSION_RATIO times is a zip bomb (2.5 MB on disk, gigabytes in memory), and a
    member can never be longer on disk than the whole file.
    """
    if info.compress_size > file_size:
        raise BatchError(
            f"{path}: member {info.filename!r} claims {info.compress_size:,} bytes on disk, more "
            f"than the whole file ({file_size:,} bytes): the zip directory is forged or the "
            "file is truncated", _FORGED)
    if (info.compress_type != zipfile.ZIP_STORED
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
        raise BatchError(
            f"{path}: member {info.filename!r} inflates from {info.compress_size:,} to "
            f"{info.file_size:,} bytes (over {MAX_COMPRESSION_RATIO}x): refused as a zip bomb "
            "before loading; the batch writer stores members uncompressed", _FORGED)


def _check_declared_size(path: Path, info: zipfile.ZipInfo, shape: tuple[int, ...],
                         dtype: np.dtype[Any], header_size: int) -> None:
    """The member's uncompressed size must be exactly its .npy header plus shape × itemsize.

    np.load allocates what the header announces before it reads a byte of data, so a forged
    shape (10^12 rows) would ask for terabytes; checked against the zip's declared size it is
    refused here instead. Object arrays are pickles of any length; they are refused elsewhere.
    """
    if dtype.hasobject:
        return
    implied = header_size + math.prod(shape) * dtype.itemsize
    if info.file_size != implied:
        raise BatchError(
            f"{path}: member {info.filename!r} holds {info.file_size:,} bytes but its .npy "
            f"header ({dtype.str} {list(shape)}) implies {implied:,}: the header or the zip "
            "directory is forged or corrupt", _FORGED)


def _refuse_pickled(path: Path, headers: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]
                    ) -> None:
    pickled = [name for name, (_, dtype) in headers.items() if dtype.hasobject]
    if pickled:
        legacy = [m for m in LEGACY_MEMBERS if m in headers]
        hint = ("This is a legacy batch: convert it with `pricectl validate-batches "
                "--convert-legacy --trust-pickle`, only if you made the file yourself."
                if legacy else "Rebuild the batch with `pricectl preprocess`.")
        raise BatchError(
            f"{path}: member(s) {', '.join(pickled)} hold pickled Python objects; batches are "
            "loaded with allow_pickle=False because unpickling a file can run arbitrary code",
            hint)


def load_batch(path: str | Path) -> tuple[SampleBlock, list[str]]:
    """Load a whole batch: its samples and feature names (allow_pickle=False).

    Raises:
        BatchError: unreadable or truncated file, pickled members, legacy layout, missing
            members, wrong format_version or inconsistent row counts.
    """
    path = Path(path)
    headers = read_member_headers(path)
    _refuse_pickled(path, headers)
    heads = [name[7:] for name in headers if name.startswith("labels_")]
    missing = [m for m in member_names(heads) if m not in headers]
    if missing:
        raise BatchError(f"{path}: missing member(s) {', '.join(missing)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in member_names(heads)}
    except (*_CORRUPT_ZIP, *_CORRUPT_NPY) as exc:
        raise BatchError(f"{path}: cannot read batch: {exc}") from None
    version = int(arrays["format_version"])
    if version != FORMAT_VERSION:
        raise BatchError(f"{path}: format_version {version}, this pricectl reads "
                         f"{FORMAT_VERSION}", "Re-run `pricectl preprocess`.")
    block = SampleBlock(
        features=arrays["features"],
        labels={h: arrays[f"labels_{h}"] for h in heads},
        masks={h: arrays[f"masks_{h}"] for h in heads},
        meta={c: arrays[f"meta_{c}"] for c in META_DTYPES},
    )
    lengths = {name: a.shape[0] for name, a in arrays.items() if a.ndim and name != "feature_names"}
    if len(set(lengths.values())) > 1:
        raise BatchError(f"{path}: members disagree on the number of samples: {lengths}")
    return block, [str(s) for s in arrays["feature_names"]]


def member_sha256(path: str | Path) -> dict[str, str]:
    """SHA-256 of every member's bytes, streamed (zip CRC errors raise zipfile.BadZipFile)."""
    digests: dict[str, str] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            digest = hashlib.sha256()
            with archive.open(info) as member:
                while block := member.read(1 << 20):
                    digest.update(block)
            digests[info.filename.removesuffix(".npy")] = digest.hexdigest()
    return digests


class _LayoutRecorder:
    """Seekable write-only sink for :func:`layout_difference`.

    Keeps the writes of up to ``SMALL`` bytes by offset (zip headers, the central directory,
    small members; a later write at the same offset replaces the earlier one, as zipfile
    rewrites each local header once its CRC is known) and only counts larger writes (member
    data, checked by its CRC and SHA-256 instead), so memory stays small.
    """

    SMALL = 4096

    def __init__(self) -> None:
        self.pos = 0
        self.end = 0
        self.small: dict[int, bytes] = {}

    def write(self, data: bytes | memoryview) -> int:
        size = memoryview(data).nbytes
        if size <= self.SMALL:
            self.small[self.pos] = bytes(data)
        self.pos += size
        self.end = max(self.end, self.pos)
        return size

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.end)[whence]
        return self.pos

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        pass


def layout_difference(path: str | Path) -> tuple[dict[str, str], str | None]:
    """SHA-256 of every member, and where the file differs from what :func:`write_batch`
    writes for these members (None: nowhere).

    The writer's zip is a function of the member names and bytes alone (fixed timestamps and
    permissions, stored, zip64 extras), so writing the members again into a recorder gives
    every byte outside the member data. Member checksums miss a flipped bit in a field the zip
    reader ignores (a local header's time, CRC or extra field, the directory's attributes)
    and junk appended after the directory; this comparison does not, so a file whose members
    match the manifest and whose layout matches is byte for byte the file that was written.

    Raises:
        zipfile.BadZipFile (a member fails its CRC) or another error of ``_CORRUPT_ZIP``: the
            file cannot be read as a zip.
    """
    path = Path(path)
    digests: dict[str, str] = {}
    recorder = _LayoutRecorder()
    with zipfile.ZipFile(path) as archive, \
            zipfile.ZipFile(recorder, "w") as rewritten:  # type: ignore[call-overload]
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            digest = hashlib.sha256()
            with archive.open(info) as member, \
                    rewritten.open(zip_member_info(name), "w", force_zip64=True) as copy:
                while block := member.read(1 << 20):
                    digest.update(block)
                    copy.write(block)
            digests[name] = digest.hexdigest()
    size = path.stat().st_size
    if size != recorder.end:
        return digests, (f"the file has {size:,} bytes where the batch writer gives "
                         f"{recorder.end:,} for these members (junk appended or bytes cut)")
    with open(path, "rb") as handle:
        for offset in sorted(recorder.small):
            expected = recorder.small[offset]
            handle.seek(offset)
            if handle.read(len(expected)) != expected:
                return digests, (f"bytes {offset:,}..{offset + len(expected) - 1:,} differ from "
                                 "the zip headers the batch writer gives for these members")
    return digests, None


# ----------------------------------------------------------------------------------------------
# manifest.json


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The batch manifest of ``folder``, or None when there is none.

    Raises:
        BatchError: the manifest exists but is not valid JSON.
    """
    import json

    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BatchError(f"{path}: not valid JSON ({exc})",
                         "Delete it and re-run `pricectl preprocess --no-resume`.") from None
    if not isinstance(manifest, dict):
        raise BatchError(f"{path}: expected a JSON object", "Re-run `pricectl preprocess`.")
    manifest = _with_journal(Path(folder), manifest)
    entries = manifest.get("batches", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BatchError(f"{path}: 'batches' must be a list of batch entries",
                         "Delete it and re-run `pricectl preprocess --no-resume`.")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        confined_batch_path(Path(folder), entry.get("name"), f"{path}: batch entry {index}")
        if entry["name"] in seen:  # merge would read its samples twice
            raise BatchError(f"{path}: batch entry {index} repeats the name "
                             f"{entry['name']!r}",
                             "Delete the manifest and re-run `pricectl preprocess --no-resume`.")
        seen.add(entry["name"])
    return manifest


def _with_journal(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` plus the batches recorded in manifest.journal since it was written.

    A journal line replaces a manifest entry of the same name. A torn last line (a kill
    while appending) is ignored: its batch is simply rebuilt.
    """
    import json

    path = folder / JOURNAL_NAME
    if not path.is_file() or not isinstance(manifest.get("batches", []), list):
        return manifest  # a malformed manifest is reported by read_manifest
    entries = {b.get("name"): b for b in manifest.get("batches", []) if isinstance(b, dict)}
    with open(path, encoding="utf-8") as journal:
        for line in journal:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                entries[entry["name"]] = entry
    manifest["batches"] = [entries[k] for k in sorted(entries, key=str)]
    return manifest


def confined_batch_path(folder: Path, name: object, where: str) -> Path:
    """The path of the batch ``name`` listed in ``folder``'s manifest, confined to ``folder``.

    Merge reads every listed batch and then deletes it, so a name such as
    ``../../victim/x.npz``, an absolute path, or a symlink leading out of the folder would make
    pricectl read and delete a file it never wrote. A name must be a plain file name (no
    separator, not ``.`` or ``..``) whose resolved path (symlinks followed) is in ``folder``.

    Raises:
        BatchError: naming ``where`` (the manifest and the entry), the name and the fix.
    """
    fix = ("Batch names in manifest.json are plain file names of files in the same folder "
           "(batch_0000.npz, ...): restore the manifest, or delete it and re-run "
           "`pricectl preprocess --no-resume`.")
    if not isinstance(name, str) or not name:
        raise BatchError(f"{where} has no file name (name: {str(name)[:200]!r})", fix)
    shown = name[:200]
    if (name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or Path(name).is_absolute()):
        raise BatchError(f"{where} names {shown!r}, which is not a plain file name inside "
                         f"{folder}; pricectl reads and then deletes listed batches, so it "
                         "refuses names that could lead outside the batch folder", fix)
    path = folder / name
    try:
        target = str(path.resolve())
        inside = path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        target, inside = "a symlink loop", False
    if not inside:
        raise BatchError(f"{where} names {shown!r}, a symlink that leads outside {folder} "
                         f"(to {target}); pricectl reads and then deletes listed batches, so "
                         "it refuses files outside the batch folder", fix)
    return path


def write_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``folder``/manifest.json atomically; it then holds the journal's batches too,
    so the journal is removed."""
    write_json(Path(folder) / MANIFEST_NAME, dict(manifest))
    (Path(folder) / JOURNAL_NAME).unlink(missing_ok=True)


def append_manifest_entry(folder: str | Path, entry: Mapping[str, Any]) -> None:
    """Record one finished batch by appending a line to manifest.journal (fsynced): the
    cost per batch stays one line, where rewriting manifest.json grew with every batch."""
    import json

    append_line(Path(folder) / JOURNAL_NAME, json.dumps(dict(entry), sort_keys=True,
                                                        default=str))


# ----------------------------------------------------------------------------------------------
# Validation


@dataclass
class Problem:
    """One problem found in a batch, explained: what is wrong, why it matters, how to fix."""

    batch: str
    what: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.batch}: {self.what}. Why it matters: {self.why} Fix: {self.fix}"


_REBUILD = "Delete this batch and re-run `pricectl preprocess`; only it is rebuilt."


def _first_rows(mask: np.ndarray, limit: int = 5) -> str:
    rows = np.flatnonzero(mask)[:limit]
    return ", ".join(str(int(r)) for r in rows) + (" ..." if mask.sum() > limit else "")


def validate_batch(path: str | Path, manifest: Mapping[str, Any] | None) -> list[Problem]:
    """Check one batch file and explain each problem found.

    Checks, in order (later checks need the earlier ones): the file opens as a zip; every
    member is a .npy array, none pickled, none missing; format_version; shapes and dtypes agree
    across members and with the manifest; each member's SHA-256 matches the manifest; no
    NaN/inf in features; labels within [-1, K) and feasible in their mask; no all-zero mask
    row; split values known and dates inside their split's range.

    Args:
        path: the batch file.
        manifest: the manifest of its folder (None: the manifest checks are a problem).

    Returns:
        The problems found; empty when the batch is sound.
    """
    path = Path(path)
    name = path.name
    problems: list[Problem] = []

    def add(what: str, why: str, fix: str = _REBUILD) -> None:
        problems.append(Problem(str(path), what, why, fix))

    try:
        headers = read_member_headers(path)
    except BatchError as exc:
        add(exc.message.removeprefix(f"{path}: "),
            "merge and training cannot read any sample of this batch.")
        return problems
    legacy = [m for m in LEGACY_MEMBERS if m in headers]
    if legacy and "format_version" not in headers:
        add(f"legacy layout (members {', '.join(legacy)}) with pickled objects",
            "the current loader never unpickles (unpickling can run arbitrary code), so merge "
            "cannot read it.",
            "If you made this file, run `pricectl validate-batches --convert-legacy "
            f"--trust-pickle {path}` to rewrite it in the current format.")
        return problems
    pickled = [m for m, (_, dtype) in headers.items() if dtype.hasobject]
    for member in pickled:
        add(f"member {member!r} is an object array (pickled Python objects)",
            "batches are loaded with allow_pickle=False, so this member cannot be read.")
    entry = None
    if manifest is None:
        add("no manifest.json beside the batch",
            "without it the checksums, shapes and source files cannot be verified.",
            "Re-run `pricectl preprocess` to rebuild the folder's manifest.")
    else:
        entry = next((b for b in manifest.get("batches", []) if b.get("name") == name), None)
        if entry is None:
            add("not recorded in manifest.json",
                "merge only reads the batches the manifest lists, so this file is ignored or "
                "stale.", "Delete it, or re-run `pricectl preprocess`.")
    heads = [m[7:] for m in headers if m.startswith("labels_")]
    if manifest is not None and manifest.get("heads"):
        heads = list(manifest["heads"])
    expected_members = member_names(heads)
    missing = [m for m in expected_members if m not in headers]
    for member in missing:
        add(f"member {member!r} is missing",
            "every batch must hold the same members so merge can stack them.")
    extra = [m for m in headers if m not in expected_members]
    for member in extra:
        add(f"unexpected member {member!r}",
            f"it is not part of format version {FORMAT_VERSION}; the file was not written by "
            "this pricectl.")
    if missing or pickled:
        return problems

    # shapes and dtypes across members
    expected_dtypes = {"format_version": "int32", "features": "float32"}
    expected_dtypes.update({f"labels_{h}": "int16" for h in heads})
    expected_dtypes.update({f"masks_{h}": "int8" for h in heads})
    expected_dtypes.update({f"meta_{c}": k for c, k in META_DTYPES.items() if k != "U"})
    for member, wanted in expected_dtypes.items():
        dtype = headers[member][1]
        if dtype != np.dtype(wanted):
            add(f"member {member!r} has dtype {dtype}, expected {wanted}",
                "merge writes fixed dtypes and training reads them; a different dtype means "
                "the file was not written by the batch writer.")
    for member in ["feature_names", *(f"meta_{c}" for c, k in META_DTYPES.items() if k == "U")]:
        if headers[member][1].kind != "U":
            add(f"member {member!r} has dtype {headers[member][1]}, expected fixed-width "
                "unicode (<U..)", "string members are stored as fixed-width unicode.")
    n_rows = headers["features"][0][0] if len(headers["features"][0]) == 2 else -1
    n_features = headers["feature_names"][0][0] if headers["feature_names"][0] else -1
    if headers["features"][0] != (n_rows, n_features):
        add(f"features has shape {headers['features'][0]}, expected (n, {n_features}) for "
            f"{n_features} feature names", "the state width must match the feature names.")
    if headers["format_version"][0] != ():
        add("format_version is not a scalar", "the reader checks it before anything else.")
    k_expected = dict(manifest["heads"]) if manifest is not None and manifest.get("heads") else {}
    for head in heads:
        label_shape = headers[f"labels_{head}"][0]
        mask_shape = headers[f"masks_{head}"][0]
        if label_shape != (n_rows,):
            add(f"labels_{head} has shape {label_shape}, expected ({n_rows},)",
                "every member must hold one row per sample.")
        k = k_expected.get(head, mask_shape[-1] if mask_shape else -1)
        if mask_shape != (n_rows, k):
            add(f"masks_{head} has shape {mask_shape}, expected ({n_rows}, {k})",
                "a mask needs one column per class of its head.")
    for column in META_DTYPES:
        if headers[f"meta_{column}"][0] != (n_rows,):
            add(f"meta_{column} has shape {headers[f'meta_{column}'][0]}, expected ({n_rows},)",
                "every member must hold one row per sample.")

    # manifest: shapes, dtypes and checksums; the zip layout around the members
    recorded = entry.get("members", {}) if entry is not None else {}
    for member, (shape, dtype) in headers.items():
        info = recorded.get(member)
        if info is None:
            continue
        if list(shape) != list(info["shape"]) or dtype.str != info["dtype"]:
            add(f"member {member!r} is {dtype.str} {list(shape)} but the manifest records "
                f"{info['dtype']} {info['shape']}",
                "the file changed after it was written.")
    try:
        digests, difference = layout_difference(path)
    except _CORRUPT_ZIP as exc:
        what = ("fails its zip checksum" if isinstance(exc, zipfile.BadZipFile)
                else "cannot be read")
        add(f"a member {what} ({exc})",
            "the bytes on disk differ from those written (flipped bits, partial copy).")
        return problems
    if difference is not None:
        add(difference, "the bytes on disk differ from those written (flipped bits, partial "
            "copy, junk appended, or a file edited by hand).")
    if entry is not None:
        size = path.stat().st_size
        if entry.get("bytes") is not None and entry["bytes"] != size:
            add(f"the file has {size:,} bytes but the manifest records {entry['bytes']:,}",
                "the file changed after it was written (partial copy or junk appended).")
        for member, digest in digests.items():
            info = recorded.get(member)
            if info is not None and info["sha256"] != digest:
                add(f"member {member!r} does not match its SHA-256 in the manifest",
                    "the bytes on disk differ from those written (flipped bits, partial copy, "
                    "or a file edited by hand).")
    if problems:
        return problems

    # values
    try:
        block, _ = load_batch(path)
    except BatchError as exc:
        add(exc.message.removeprefix(f"{path}: "), "the batch cannot be loaded.")
        return problems
    bad = ~np.isfinite(block.features).all(axis=1)
    if bad.any():
        add(f"{int(bad.sum())} sample(s) have NaN or inf features (rows {_first_rows(bad)})",
            "a single NaN turns every gradient of a training step into NaN.",
            "Check the source feature files of these rows, then re-run `pricectl preprocess`.")
    for head in heads:
        labels = block.labels[head].astype(np.int64)
        masks = block.masks[head]
        k = masks.shape[1]
        out = (labels < -1) | (labels >= k)
        if out.any():
            add(f"labels_{head} outside [-1, {k}) in rows {_first_rows(out)}",
                "a label must name one of the head's classes (or -1 for 'does not apply').")
        if not np.isin(masks, (0, 1)).all():
            add(f"masks_{head} holds values other than 0 and 1",
                "masks are read as booleans by the masked policy.")
        empty = np.asarray(~masks.any(axis=1))
        if empty.any():
            add(f"masks_{head} has all-zero rows ({_first_rows(empty)})",
                "a masked policy must be able to choose at least one class; an all-zero row "
                "makes its action distribution undefined (NaN).")
        rows = np.flatnonzero((labels >= 0) & ~out)
        infeasible = rows[masks[rows, labels[rows]] == 0]
        if infeasible.size:
            flags = np.zeros(len(labels), bool)
            flags[infeasible] = True
            add(f"labels_{head} name a class that its mask forbids in rows {_first_rows(flags)}",
                "behaviour cloning would teach the agent an action it is never allowed to take.")
    split = block.meta["split"]
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        add(f"meta_split holds values other than {SPLITS} (rows {_first_rows(unknown)})",
            "merge writes one set of files per split.")
    ranges = (manifest or {}).get("splits") or {}
    dates = block.meta["date"]
    for split_name, bounds in ranges.items():
        if not bounds:
            continue
        lo, hi = np.datetime64(bounds[0], "D"), np.datetime64(bounds[1], "D")
        outside = (split == split_name) & ((dates < lo) | (dates > hi))
        if outside.any():
            add(f"{int(outside.sum())} '{split_name}' sample(s) dated outside "
                f"{bounds[0]}..{bounds[1]} (rows {_first_rows(outside)})",
                "samples in the wrong split leak future data into training or evaluation.",
                "Re-run `pricectl features` and `pricectl preprocess`.")
    return problems


def deep_check(path: Path, manifest: Mapping[str, Any], max_files: int = 3) -> list[Problem]:
    """Rebuild the samples of up to ``max_files`` source files of a batch and compare.

    Uses the parameters recorded in the manifest (not the current config), so it checks that
    the batch still matches its sources.
    """
    from pricing_cli.stages.preprocess import SampleParams, build_samples

    problems: list[Problem] = []
    entry = next((b for b in manifest.get("batches", []) if b.get("name") == path.name), None)
    if entry is None or not manifest.get("params") or not entry.get("files"):
        return problems
    params = SampleParams.from_json(manifest["params"])
    quarantined = {q["file"] for q in entry.get("quarantined", [])}
    files = [f for f in entry["files"] if f["path"] not in quarantined]
    if not files:
        return problems
    picks = sorted({0, len(files) // 2, len(files) - 1})[:max_files]
    block, _ = load_batch(path)
    for i in picks:
        source = Path(files[i]["path"])
        if not source.is_file():
            problems.append(Problem(str(path), f"source file {source} no longer exists",
                                    "--deep cannot rebuild its rows.",
                                    "Restore the file or re-run `pricectl preprocess`."))
            continue
        stat = source.stat()
        if (stat.st_size, stat.st_mtime_ns) != (files[i]["size"], files[i]["mtime_ns"]):
            problems.append(Problem(str(path), f"source file {source} changed after the batch "
                                    "was built", "the batch no longer reflects its input.",
                                    "Re-run `pricectl preprocess` (it rebuilds this batch)."))
            continue
        rebuilt = build_samples(source, params)
        if rebuilt.n == 0:
            continue
        rows = block.meta["product_index"] == rebuilt.meta["product_index"][0]
        stored = block.take(rows)
        same = (stored.n == rebuilt.n
                and np.array_equal(stored.features, rebuilt.features)
                and all(np.array_equal(stored.labels[h], rebuilt.labels[h]) for h in params.heads)
                and all(np.array_equal(stored.masks[h], rebuilt.masks[h]) for h in params.heads)
                and all(np.array_equal(stored.meta[c], rebuilt.meta[c]) for c in META_DTYPES))
        if not same:
            problems.append(Problem(str(path), f"rows of {source.name} differ from a rebuild "
                                    "from the source file",
                                    "the batch does not hold what preprocess computes from its "
                                    "inputs.", _REBUILD))
    return problems


# ----------------------------------------------------------------------------------------------
# Legacy batches (the old system's pickled list-of-dicts layout)


def is_legacy(path: str | Path) -> bool:
    """True if the file has the old layout (pickled members, no format_version)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {i.filename.removesuffix(".npy") for i in archive.infolist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return "format_version" not in names and bool(names & set(LEGACY_MEMBERS))


def _load_legacy_unsafe(path: Path) -> dict[str, Any]:
    # SECURITY: the ONLY allow_pickle=True in pricectl. Unpickling runs code stored in the
    # file, so this is reached only from `validate-batches --convert-legacy --trust-pickle`,
    # where the user has declared that they made the file.
    with np.load(path, allow_pickle=True) as npz:
        return {name: npz[name] for name in npz.files}


def convert_legacy_batch(path: str | Path, *, trust_pickle: bool) -> tuple[SampleBlock,
                                                                        list[str], dict[str, Any]]:
    """Rewrite a legacy batch in the current format, in place, and check the values match.

    The original is kept beside it as ``<name>.legacy`` and restored if the check fails.

    Legacy layout: ``strategic_features`` (n,) object array of {feature_name: value};
    ``labels`` and ``masks`` (n,) object arrays of {head: value} / {head: list of 0/1};
    ``df`` a pickled pandas DataFrame of the meta columns.

    Returns:
        (samples, feature names, manifest entry of the converted batch).

    Raises:
        ConfigError: trust_pickle is False.
        BatchError: the legacy file is inconsistent, or the rewritten values differ.
    """
    path = Path(path)
    if not trust_pickle:
        raise ConfigError(f"{path}: converting a legacy batch needs --trust-pickle",
                          "Legacy batches are pickled; add --trust-pickle only for files "
                          "you made yourself.")
    try:
        legacy = _load_legacy_unsafe(path)
    except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways
        raise BatchError(f"{path}: cannot unpickle the legacy batch: {exc}",
                         "Legacy meta is a pandas DataFrame: install pandas to convert.") from None
    missing = [m for m in LEGACY_MEMBERS if m not in legacy]
    if missing:
        raise BatchError(f"{path}: legacy batch lacks member(s) {missing}")
    rows = list(legacy["strategic_features"])
    label_rows, mask_rows = list(legacy["labels"]), list(legacy["masks"])
    frame = legacy["df"].item() if legacy["df"].dtype.hasobject and legacy["df"].ndim == 0 \
        else legacy["df"]
    if not (len(rows) == len(label_rows) == len(mask_rows) == len(frame)):
        raise BatchError(f"{path}: legacy members disagree on the number of samples")
    if not rows:
        raise BatchError(f"{path}: legacy batch is empty")
    feature_names = list(rows[0])
    heads = list(label_rows[0])
    for i, (row, lab, msk) in enumerate(zip(rows, label_rows, mask_rows, strict=True)):
        if list(row) != feature_names or sorted(lab) != sorted(heads) \
                or sorted(msk) != sorted(heads):
            raise BatchError(f"{path}: legacy sample {i} has different feature or head names "
                             "than sample 0")
    features64 = np.array([[row[k] for k in feature_names] for row in rows], dtype=np.float64)
    labels = {h: np.array([-1 if r[h] is None else r[h] for r in label_rows], dtype=np.int64)
              for h in heads}
    masks = {h: np.array([list(r[h]) for r in mask_rows], dtype=np.int64) for h in heads}
    meta: dict[str, np.ndarray] = {}
    for column, kind in META_DTYPES.items():
        if column not in frame.columns and column in LEGACY_DEFAULTS:
            meta[column] = np.full(len(frame), LEGACY_DEFAULTS[column])
            continue
        if column not in frame.columns:
            raise BatchError(f"{path}: legacy DataFrame lacks meta column {column!r}")
        values = frame[column].to_numpy()
        meta[column] = (values.astype(str) if kind == "U"
                        else values.astype("datetime64[D]") if kind.startswith("datetime")
                        else values.astype(kind))
    block = SampleBlock(
        features=features64.astype(np.float32),
        labels={h: a.astype(np.int16) for h, a in labels.items()},
        masks={h: a.astype(np.int8) for h, a in masks.items()},
        meta=meta,
    )
    head_k = {h: int(block.masks[h].shape[1]) for h in heads}
    backup = path.with_name(path.name + ".legacy")
    shutil.copy2(path, backup)
    record = write_batch(path, [block], feature_names, head_k)
    converted, names = load_batch(path)
    same = (names == feature_names
            and np.array_equal(converted.features, features64.astype(np.float32))
            and all(np.array_equal(converted.labels[h], labels[h]) for h in heads)
            and all(np.array_equal(converted.masks[h], masks[h]) for h in heads)
            and all(np.array_equal(converted.meta[c], meta[c]) for c in META_DTYPES))
    if not same:
        os.replace(backup, path)
        raise BatchError(f"{path}: the converted batch does not hold the legacy values; "
                         "the original was restored")
    entry = {"name": path.name, "source": "legacy", "files": [], "fingerprint": "legacy",
             "n_samples": record.n_samples, "samples": record.samples,
             "products": int(np.unique(meta["product_index"]).size),
             "members": record.members, "bytes": record.bytes, "quarantined": [], "stats": {}}
    return converted, feature_names, entry


# ----------------------------------------------------------------------------------------------
# The validate-batches stage


def _resolve_batch_paths(paths: Sequence[Path], default_dir: Path) -> list[Path]:
    found: list[Path] = []
    for given in (list(paths) or [default_dir]):
        given = Path(given)
        if given.is_dir():
            found.extend(sorted(given.glob(BATCH_GLOB)))
        elif given.is_file():
            found.append(given)
        else:
            raise MissingInputError(f"no such batch file or folder: {given}",
                                    "Pass batch files or folders, or run `pricectl preprocess`.")
    if not found:
        where = ", ".join(str(p) for p in (list(paths) or [default_dir]))
        raise MissingInputError(f"no {BATCH_GLOB} files in {where}",
                                "Run `pricectl preprocess` first.")
    return found


def run_validate_batches(settings: Settings, monitor: RunMonitor, *, paths: Sequence[Path],
                         deep: bool = False, convert_legacy: bool = False,
                         trust_pickle: bool = False) -> StageResult:
    """Check batch files and explain every problem (what, why, how to fix).

    Args:
        paths: batch files or folders; empty means ``preprocess.output_dir``.
        deep: also rebuild a few source files per batch and compare.
        convert_legacy: rewrite legacy batches in the current format first.
        trust_pickle: required with convert_legacy (legacy batches are pickled).

    Returns:
        StageResult whose ``failures`` hold one line per problem (non-empty: non-zero exit).

    Raises:
        ConfigError: --convert-legacy without --trust-pickle or the reverse.
        MissingInputError: no batch files found.
    """
    from pricing_cli.runinfo import StageResult

    if convert_legacy != trust_pickle:
        raise ConfigError("--convert-legacy and --trust-pickle go together",
                          "Legacy batches are pickled: pass both flags, and only for files "
                          "you made yourself.")
    batch_paths = _resolve_batch_paths(paths, Path(settings.preprocess.output_dir))
    monitor.add_bar("batches", "batches checked", len(batch_paths))
    manifests: dict[Path, dict[str, Any] | None] = {}
    refused: set[Path] = set()  # folders whose manifest is itself a problem (reported once)
    unverified = 0
    problems: list[Problem] = []
    converted = 0
    samples = 0
    for path in batch_paths:
        folder = path.parent
        monitor.set_worker("main", path.name)
        if folder not in manifests:
            try:
                manifests[folder] = read_manifest(folder)
            except BatchError as exc:
                problems.append(Problem(str(folder / MANIFEST_NAME), exc.message,
                                        "no batch in this folder can be verified.", exc.hint))
                manifests[folder] = None
                refused.add(folder)
        if folder in refused:
            unverified += 1
            monitor.update_bar("batches", advance=1)
            continue
        if convert_legacy and is_legacy(path):
            _, names, entry = convert_legacy_batch(path, trust_pickle=trust_pickle)
            updated = manifests[folder] or {"format_version": FORMAT_VERSION, "batches": [],
                                            "heads": {}, "n_features": len(names)}
            others = [b for b in updated["batches"] if b["name"] != path.name]
            updated["batches"] = sorted([*others, entry], key=lambda b: b["name"])
            updated["heads"] = updated.get("heads") or {
                m[6:]: info["shape"][1] for m, info in entry["members"].items()
                if m.startswith("masks_")}
            write_manifest(folder, updated)
            manifests[folder] = updated
            converted += 1
            monitor.log(f"converted legacy batch {path} (original kept as {path.name}.legacy)")
        manifest = manifests[folder]
        found = validate_batch(path, manifest)
        if deep and not found and manifest is not None:
            found = deep_check(path, manifest)
        if not found and manifest is not None:
            recorded = [b for b in manifest.get("batches", []) if b.get("name") == path.name]
            samples += sum(int(b["n_samples"]) for b in recorded)
        problems.extend(found)
        monitor.update_bar("batches", advance=1)
        monitor.check_memory()
    monitor.clear_workers()
    bad_batches = len({p.batch for p in problems if not p.batch.endswith(MANIFEST_NAME)})
    summary = {"batches_checked": len(batch_paths),
               "batches_ok": len(batch_paths) - bad_batches - unverified,
               "problems": len(problems), "samples_in_ok_batches": samples,
               "legacy_converted": converted, "deep": "yes" if deep else "no"}
    notes = [] if problems else [f"all {len(batch_paths)} batch(es) passed every check"]
    return StageResult("validate-batches", None, inputs=batch_paths, summary=summary,
                       failures=[str(p) for p in problems], notes=notes)
