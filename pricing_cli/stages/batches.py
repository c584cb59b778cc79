"""The batch format: the one writer and reader of ``batch_NNNN.npz`` and of its manifest.

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
is ``stages/legacy.py``'s ``_load_legacy_unsafe``, reached only through
``pricectl validate-batches --convert-legacy --trust-pickle``.

This module also owns ``manifest.json`` and its journal (read/write). The checks of a batch
and the ``validate-batches`` stage live in ``stages/batch_checks.py``; the import of the old
pickled layout in ``stages/legacy.py``. Neither is imported here, so the format has no
dependency on them (tests/test_architecture.py).
"""

from __future__ import annotations

import hashlib
import io
import math
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

from pricing_cli.errors import BatchError, ConfigError
from pricing_cli.pricing import MOVE_DOWN, MOVE_HOLD, MOVE_UP
from pricing_cli.storage import append_line, atomic_write, write_json

if TYPE_CHECKING:
    pass

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
# Members of the old system's batches (pickled): see docs/batch-format.md, "Legacy layout".
LEGACY_MEMBERS = ("strategic_features", "labels", "masks", "df")

# Fixed zip metadata: identical samples must give identical bytes (resume, merge outputs).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# What reading a corrupt zip raises besides BadZipFile (found by tests/test_fuzz.py): a flipped
# bit can set the encryption flag (RuntimeError), name an unknown compression method or zip
# version (NotImplementedError), move an offset before the start of the file (OSError), or
# garble a field that struct cannot unpack.
CORRUPT_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError,
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
    except CORRUPT_ZIP_ERRORS as exc:
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
    except (*CORRUPT_ZIP_ERRORS, *_CORRUPT_NPY) as exc:
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
        zipfile.BadZipFile (a member fails its CRC) or another error of ``CORRUPT_ZIP_ERRORS``: the
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
