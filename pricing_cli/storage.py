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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_file(tmp: Path, final: Path) -> None:
    """fsync an already-written temporary file and rename it to ``final``."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (sorted keys, two-space indent, trailing newline)."""
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``final`` as a whole on success.

    On any failure (including Ctrl+C) the temporary folder is removed and ``final`` keeps
    what it had before.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            old = final.with_name(f"{TMP_MARK}old-{uuid.uuid4().hex[:8]}-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on device while writing {final}") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
