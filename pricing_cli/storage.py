"""Crash-safe file writing and input fingerprints, shared by every stage.

A file is written under a temporary name in the same folder, fsynced, then renamed, so no
reader ever sees a half-written file under its final name, whatever kills the process.
A folder of outputs is staged the same way and renamed into place as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pricing_cli.errors import DiskFullError

TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` means the disk is full: OSError ENOSPC, or a library error that
    wraps it (Polars' Rust writers raise ComputeError "... (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    text = str(exc)
    return "(os error 28)" in text or "No space left on device" in text


@contextlib.contextmanager
def disk_full_names(path: str | Path) -> Iterator[None]:
    """Turn a full-disk error raised in the block into a DiskFullError naming ``path``.

    For writes that do not go through :func:`atomic_write` (streams inside a
    :func:`staged_dir`, Polars' writers), whose OSError carries no file name.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"no space left on device while writing {path}") from exc
        raise


def _first_disk_full_error(exc: BaseException) -> DiskFullError | None:
    """The DiskFullError in ``exc`` or the exceptions it was raised while handling.

    When a write fails for lack of space, closing the other open files of the block fails the
    same way and replaces the DiskFullError that named the file; this finds it again.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DiskFullError):
            return current
        if not is_disk_full(current):
            return None
        seen.add(id(current))
        current = current.__context__
    return None


def sweep_stale_staging(final: Path) -> None:
    """Remove staging folders of ``final`` left by a killed run (``.tmp-<8 hex>-<name>``,
    ``.tmp-old-<8 hex>-<name>``); only this name's, so other stages' staging is untouched.

    A run killed between staged_dir's two renames leaves no ``final`` but the previous
    ``final`` complete under ``.tmp-old-...``: it is put back first, so the earlier outputs
    are never swept away with the half-finished new ones.
    """
    pattern = re.compile(rf"{re.escape(TMP_MARK)}(old-)?[0-9a-f]{{8}}-{re.escape(final.name)}")
    stale = [path for path in final.parent.iterdir()
             if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink()]
    if not final.exists():
        previous = [path for path in stale if path.name.startswith(f"{TMP_MARK}old-")]
        if previous:
            os.replace(previous[0], final)
            stale.remove(previous[0])
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def tmp_path_for(final: Path) -> Path:
    """A unique temporary sibling of ``final``; recognisable so stale ones can be swept."""
    return final.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{final.name}")


@contextlib.contextmanager
def atomic_write(final: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``final`` only if the block completes.

    Raises:
        DiskFullError: the disk filled up; the temporary file is removed, ``final`` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on device while writing {final}") from exc
        raise
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, DiskFullError) and is_disk_full(exc):
            # e.g. Polars writing into the handle reports ENOSPC as its own error type
            raise DiskFullError(f"no space left on device while writing {final}") from exc
        raise


def commit_file(tmp: Path, final: Path) -> None:
    """fsync an already-written temporary file and rename it to ``final``."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_json(path: str | Path, payload: Any, *, sort_keys: bool = True) -> None:
    """Write JSON atomically (sorted keys unless ``sort_keys`` is False: then in the payload's
    own order, e.g. a verdict first; two-space indent, trailing newline)."""
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=sort_keys, default=str)
        handle.write("\n")


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``final`` as a whole on success.

    On any failure (including Ctrl+C) the temporary folder is removed and ``final`` keeps
    what it had before. Staging folders of ``final`` left by a killed run (kill -9 skips this
    cleanup) are removed first.

    Raises:
        DiskFullError: the disk filled up (OSError ENOSPC, or a Polars writer's "os error 28");
            a DiskFullError raised inside the block naming a staged file is re-worded to name
            the file's final path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(final)
    tmp = tmp_path_for(final)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _first_disk_full_error(exc)
        if named is not None:
            # the user knows the final folder, not the staging one that no longer exists
            named.message = named.message.replace(str(tmp), str(final))
            named.args = (named.message,)
            if named is exc:
                raise
            raise named from exc
        if is_disk_full(exc):
            raise DiskFullError(f"no space left on device while writing {final}") from exc
        raise


def replace_dir(src: Path, final: Path) -> None:
    """Put the complete folder ``src`` at ``final`` (same filesystem), replacing what was there.

    One rename when ``final`` is new. Otherwise ``final`` first becomes
    ``.tmp-old-<hex>-<name>``: a kill between the two renames leaves it under that name, and
    the next :func:`sweep_stale_staging` of ``final`` (every staged_dir starts with one) puts
    it back.
    """
    for child in src.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        old = final.with_name(f"{TMP_MARK}old-{uuid.uuid4().hex[:8]}-{final.name}")
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)
    _fsync_dir(final.parent)


def sweep_stale_tmp(folder: str | Path) -> int:
    """Remove temporary files left by a killed run in ``folder``; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for child in folder.iterdir():
        if child.name.startswith(TMP_MARK):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed += 1
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap identity of an input file: path, size and mtime (ns)."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Fingerprint a set of input files: count, total size and one digest over all of them."""
    entries = [file_fingerprint(p) for p in sorted(str(p) for p in paths)]
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"files": len(entries), "bytes": sum(e["size"] for e in entries), "sha256": digest}
