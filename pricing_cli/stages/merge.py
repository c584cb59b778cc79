"""`pricectl merge`: batches to the processed arrays that train and evaluate read.

Outputs (the "merge → train/evaluate" contract in docs/architecture.md), per split:
``X_{split}.npy``, ``labels_{split}.npz``, ``masks_{split}.npz``, ``meta_{split}.parquet``; and
``feature_cols.json``, ``preprocessing_stats.json``. Rows are ordered by product_index, then
date (checked, not assumed).

Two strategies give byte-identical files:

* ``sequential`` (default): pass 1 reads only the manifest and the members' .npy headers to
  size every output; pass 2 loads one batch at a time and appends its rows to every output
  (each split's rows are contiguous runs, written as views without copies). Peak memory is
  one batch plus a constant.
* ``accumulative``: loads every batch, concatenates, selects each split and writes it: the
  simple reference the sequential merge is tested against.

Everything is written into ``storage.staged_dir(output_dir)`` and appears at once; batches are
deleted only after a successful merge, unless keep_batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zipfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from pricing_cli.errors import BatchError, MissingInputError
from pricing_cli.stages.batches import (
    FORMAT_VERSION,
    SPLITS,
    NpyStreamWriter,
    SampleBlock,
    copy_npy_member,
    load_batch,
    member_names,
    read_manifest,
    read_member_headers,
    read_npy_header,
    write_npy_member,
)
from pricing_cli.storage import check_output_dir, disk_full_names, staged_dir, write_json

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.config import Settings
    from pricing_cli.monitor import RunMonitor
    from pricing_cli.runinfo import StageResult

# Fixed row groups make meta_{split}.parquet independent of how rows arrived (batch sizes).
META_ROW_GROUP = 65_536


@dataclass
class MergePlan:
    """What pass 1 learns from the manifest and the member headers, without reading data."""

    batch_dir: Path
    batches: list[tuple[Path, dict[str, Any]]]
    manifest: dict[str, Any]
    heads: dict[str, int]
    n_features: int
    feature_names: list[str]
    samples: dict[str, int]


def plan_merge(batch_dir: Path) -> MergePlan:
    """Pass 1: check that every batch is present and consistent; count samples per split.

    Reads manifest.json and the .npy header of every member (never array data, except the
    small feature_names of the first batch).

    Raises:
        MissingInputError: no manifest (preprocess has not run).
        BatchError: preprocess unfinished, a batch missing, or shapes/dtypes that disagree
            with the manifest or between batches.
    """
    manifest = read_manifest(batch_dir)
    if manifest is None:
        raise MissingInputError(f"no batch manifest in {batch_dir}",
                                "Run `pricectl preprocess` first.")
    entries = list(manifest.get("batches", []))
    expected = manifest.get("n_batches", len(entries))
    if len(entries) != expected:
        raise BatchError(f"{batch_dir}: preprocess finished {len(entries)} of {expected} "
                         "batches", "Re-run `pricectl preprocess`; it builds only the missing "
                         "batches.")
    if not entries:
        raise BatchError(f"{batch_dir}: the manifest lists no batches",
                         "Re-run `pricectl preprocess`.")
    heads = {h: int(k) for h, k in manifest["heads"].items()}
    n_features = int(manifest["n_features"])
    names_sha = None
    batches: list[tuple[Path, dict[str, Any]]] = []
    samples = dict.fromkeys(SPLITS, 0)
    for entry in entries:
        path = batch_dir / entry["name"]
        if not path.is_file():
            raise BatchError(f"{path}: listed in the manifest but missing",
                             "Re-run `pricectl preprocess`; it rebuilds missing batches.")
        size = path.stat().st_size
        if entry.get("bytes") is not None and entry["bytes"] != size:
            raise BatchError(f"{path}: the file has {size:,} bytes but the manifest records "
                             f"{entry['bytes']:,}",
                             "The file changed after preprocess wrote it; run `pricectl "
                             "validate-batches` for details, or re-run `pricectl preprocess`.")
        headers = read_member_headers(path)
        n = int(entry["n_samples"])
        for member in member_names(heads):
            recorded = entry["members"].get(member)
            if member not in headers or recorded is None:
                raise BatchError(f"{path}: member {member!r} missing from the file or the "
                                 "manifest")
            shape, dtype = headers[member]
            if list(shape) != list(recorded["shape"]) or dtype.str != recorded["dtype"]:
                raise BatchError(f"{path}: member {member!r} is {dtype.str} {list(shape)}, the "
                                 f"manifest records {recorded['dtype']} {recorded['shape']}")
            if dtype.hasobject:
                raise BatchError(f"{path}: member {member!r} holds pickled objects")
        if headers["features"][0] != (n, n_features):
            raise BatchError(f"{path}: features {headers['features'][0]}, expected "
                             f"({n}, {n_features})")
        for head, k in heads.items():
            if headers[f"masks_{head}"][0] != (n, k) or headers[f"labels_{head}"][0] != (n,):
                raise BatchError(f"{path}: head {head!r} does not have {n} rows of {k} classes")
        sha = entry["members"]["feature_names"]["sha256"]
        if names_sha is not None and sha != names_sha:
            raise BatchError(f"{path}: its feature names differ from the first batch's",
                             "Re-run `pricectl preprocess --no-resume`.")
        names_sha = sha
        if sum(entry["samples"].values()) != n:
            raise BatchError(f"{path}: split counts {entry['samples']} do not add up to {n}")
        for split in SPLITS:
            samples[split] += int(entry["samples"].get(split, 0))
        batches.append((path, entry))
    with np.load(batches[0][0], allow_pickle=False) as npz:
        feature_names = [str(s) for s in npz["feature_names"]]
    return MergePlan(batch_dir, batches, manifest, heads, n_features, feature_names, samples)


# ----------------------------------------------------------------------------------------------
# Writers shared by both strategies (so their bytes can only differ through the rows)


META_SCHEMA = {"product_index": "Int32", "product_id": "String", "date": "Date",
               "split": "String", "price": "Float64", "units": "Float64",
               "unit_cost": "Float64", "min_price": "Float64", "max_price": "Float64",
               "ref_price": "Float64", "category": "String"}


def meta_frame(meta: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Meta arrays as a DataFrame with the contract's column types."""
    import polars as pl

    return pl.DataFrame({c: pl.Series(c, meta[c], dtype=getattr(pl, t))
                         for c, t in META_SCHEMA.items()})


def write_meta(frame: pl.LazyFrame, path: Path) -> None:
    """Write meta rows with fixed row groups (bytes independent of how rows were chunked)."""
    frame.sink_parquet(path, row_group_size=META_ROW_GROUP, engine="streaming")


def _empty_meta() -> pl.DataFrame:
    import polars as pl

    return pl.DataFrame(schema={c: getattr(pl, t) for c, t in META_SCHEMA.items()})


def _order_key(meta: Mapping[str, np.ndarray]) -> np.ndarray:
    """One int64 per row that sorts like (product_index, date)."""
    days = meta["date"].astype(np.int64) + (1 << 31)  # non-negative for any plausible date
    return meta["product_index"].astype(np.int64) * (1 << 32) + days


def check_order(meta: Mapping[str, np.ndarray], previous: int | None, where: str) -> int | None:
    """Check rows are ordered by product_index, then date (strictly), continuing ``previous``.

    Returns:
        The key of the last row (None for no rows), for the next batch.

    Raises:
        BatchError: naming the first row out of order.
    """
    keys = _order_key(meta)
    if not keys.size:
        return previous
    if previous is not None:
        keys = np.concatenate([[previous], keys])
    bad = np.flatnonzero(np.diff(keys) <= 0)
    if bad.size:
        row = int(bad[0]) + (0 if previous is not None else 1)
        raise BatchError(
            f"{where}: row {row} is not after the previous one in (product_index, date) order",
            "Input files must sort by product_index ({product_index:05d}.parquet, as "
            "`pricectl features` names them); re-run `pricectl preprocess --no-resume`.")
    return int(keys[-1])


def _stats(plan: MergePlan) -> dict[str, Any]:
    """preprocessing_stats.json: deterministic (no times, no batch layout)."""
    manifest = plan.manifest
    entries = [e for _, e in plan.batches]
    params = manifest.get("params") or {}
    inputs = sorted((f for e in entries for f in e.get("files", [])), key=lambda f: f["path"])
    return {
        "format_version": FORMAT_VERSION,
        "samples": {**plan.samples, "total": sum(plan.samples.values())},
        "input_dim": plan.n_features,
        "heads": plan.heads,
        "price_levels": plan.heads.get("price_level", params.get("price_levels")),
        "max_daily_change": params.get("max_daily_change"),
        "move_tolerance": params.get("move_tolerance"),
        "history_window": params.get("history_window"),
        "products": sum(int(e.get("products", 0)) for e in entries),
        "feature_groups": manifest.get("feature_groups"),
        "excluded_feature_columns": manifest.get("excluded_feature_columns", []),
        "splits": manifest.get("splits"),
        "mask_conflicts": sum(e.get("stats", {}).get("mask_conflicts", 0) for e in entries),
        "labels_projected": {h: sum(e.get("stats", {}).get("labels_projected", {}).get(h, 0)
                                    for e in entries) for h in plan.heads},
        "quarantined": [q for e in entries for q in e.get("quarantined", [])],
        "source": {
            "preprocess_fingerprint": manifest.get("fingerprint"),
            "feature_manifest_sha256": (manifest.get("feature_manifest") or {}).get("sha256"),
            "inputs_sha256": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
            .hexdigest(),
            "input_files": len(inputs),
        },
    }


# ----------------------------------------------------------------------------------------------
# The two strategies


def merge_sequential(plan: MergePlan, staging: Path, monitor: RunMonitor) -> None:
    """Pass 2: stream each batch's rows to their offsets; one batch in memory at a time."""
    import polars as pl

    parts_dir = staging / ".meta-parts"
    parts_dir.mkdir()
    parts: dict[str, list[Path]] = {s: [] for s in SPLITS}
    started = time.monotonic()
    done = 0
    with ExitStack() as stack:
        def stream(path: Path, dtype: str, shape: tuple[int, ...]) -> NpyStreamWriter:
            handle: IO[bytes] = stack.enter_context(open(path, "wb"))
            return NpyStreamWriter(handle, dtype, shape, path.name, digest=False)

        x_out = {s: stream(staging / f"X_{s}.npy", "float32", (plan.samples[s],
                                                               plan.n_features))
                 for s in SPLITS}
        label_out = {(s, h): stream(staging / f".labels_{s}_{h}.npy", "int16",
                                    (plan.samples[s],))
                     for s in SPLITS for h in plan.heads}
        mask_out = {(s, h): stream(staging / f".masks_{s}_{h}.npy", "int8",
                                   (plan.samples[s], k))
                    for s in SPLITS for h, k in plan.heads.items()}
        previous: int | None = None
        for index, (path, entry) in enumerate(plan.batches):
            monitor.set_worker("merge", path.name)
            block, _ = load_batch(path)
            previous = check_order(block.meta, previous, str(path))
            split = block.meta["split"]
            # each product's rows run train -> val -> test, so a split is a few slices
            cuts = np.flatnonzero(split[1:] != split[:-1]) + 1
            for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), block.n], strict=True):
                if start == stop:
                    continue
                s = str(split[start])
                # a full disk names the output file (staged_dir shows its final path)
                with disk_full_names(staging / f"X_{s}.npy"):
                    x_out[s].append(block.features[start:stop])
                for h in plan.heads:
                    with disk_full_names(staging / f"labels_{s}.npz"):
                        label_out[(s, h)].append(block.labels[h][start:stop])
                    with disk_full_names(staging / f"masks_{s}.npz"):
                        mask_out[(s, h)].append(block.masks[h][start:stop])
            for s in SPLITS:
                if entry["samples"].get(s):
                    part = parts_dir / f"{s}_{index:05d}.parquet"
                    # the meta columns only: block.take would copy the feature rows too
                    rows = split == s
                    meta = {c: column[rows] for c, column in block.meta.items()}
                    with disk_full_names(staging / f"meta_{s}.parquet"):
                        meta_frame(meta).write_parquet(part)
                    parts[s].append(part)
            done += block.n
            del block
            monitor.update_bar("batches", advance=1)
            monitor.set_metric("samples/s", f"{done / max(time.monotonic() - started, 1e-9):,.0f}")
            monitor.check_memory()
        for writer in [*x_out.values(), *label_out.values(), *mask_out.values()]:
            writer.close()
    for kind in ("labels", "masks"):
        for s in SPLITS:
            with disk_full_names(staging / f"{kind}_{s}.npz"), \
                    zipfile.ZipFile(staging / f"{kind}_{s}.npz", "w") as archive:
                for h in plan.heads:
                    temp = staging / f".{kind}_{s}_{h}.npy"
                    copy_npy_member(archive, h, temp)
                    temp.unlink()
    for s in SPLITS:
        frame = pl.scan_parquet(parts[s]) if parts[s] else _empty_meta().lazy()
        with disk_full_names(staging / f"meta_{s}.parquet"):
            write_meta(frame, staging / f"meta_{s}.parquet")
        for part in parts[s]:
            part.unlink()
    parts_dir.rmdir()


def merge_accumulative(plan: MergePlan, staging: Path, monitor: RunMonitor) -> None:
    """The reference: load every batch, concatenate, select each split, write."""
    blocks = []
    for path, _ in plan.batches:
        blocks.append(load_batch(path)[0])
        monitor.update_bar("batches", advance=1)
        monitor.check_memory()
    whole = SampleBlock.concat(blocks)
    del blocks
    check_order(whole.meta, None, str(plan.batch_dir))
    for s in SPLITS:
        part = whole.take(whole.meta["split"] == s)
        with open(staging / f"X_{s}.npy", "wb") as handle:
            writer = NpyStreamWriter(handle, "float32", part.features.shape, f"X_{s}.npy",
                                     digest=False)
            writer.append(part.features)
            writer.close()
        with zipfile.ZipFile(staging / f"labels_{s}.npz", "w") as archive:
            for h in plan.heads:
                write_npy_member(archive, h, [part.labels[h]], "int16", (part.n,))
        with zipfile.ZipFile(staging / f"masks_{s}.npz", "w") as archive:
            for h, k in plan.heads.items():
                write_npy_member(archive, h, [part.masks[h]], "int8", (part.n, k))
        frame = meta_frame(part.meta) if part.n else _empty_meta()
        write_meta(frame.lazy(), staging / f"meta_{s}.parquet")


def delete_batches(plan: MergePlan) -> int:
    """Remove the merged batch files; returns how many.

    manifest.json and run.json stay: they are a few KB, record what was merged, and let
    `pricectl pipeline` see that preprocess is up to date without keeping the batches.
    """
    for path, _ in plan.batches:
        path.unlink(missing_ok=True)
    return len(plan.batches)


# ----------------------------------------------------------------------------------------------
# Reading the processed arrays back (train, evaluate, baselines): checked before anything is
# mapped or loaded, so a truncated or forged file is a BatchError naming it, never a crash.

REBUILD_PROCESSED = ("Re-run `pricectl merge` to rebuild the processed folder (re-run "
                     "`pricectl preprocess` first if its batches were deleted).")


def read_processed_array(path: str | Path) -> np.ndarray:
    """``X_{split}.npy``, memory-mapped read-only, after checking its header against its size.

    np.load maps what the header announces; a truncated file (or a forged shape) would fail
    inside numpy or map past the end of the file.

    Raises:
        BatchError: not a .npy array, an object (pickled) array, or a size other than the
            header implies; naming the file and saying to re-run merge.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            shape, dtype, header_size = read_npy_header(handle, str(path))
    except BatchError as exc:
        raise BatchError(exc.message, REBUILD_PROCESSED) from None
    if dtype.hasobject:
        raise BatchError(f"{path} holds pickled Python objects; processed arrays are plain "
                         "numbers and are never unpickled", REBUILD_PROCESSED)
    implied = header_size + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != implied:
        raise BatchError(f"{path} has {size:,} bytes but its .npy header ({dtype.str} "
                         f"{list(shape)}) implies {implied:,}: the file is truncated or "
                         "corrupt", REBUILD_PROCESSED)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BatchError(f"{path}: cannot map the array ({exc})", REBUILD_PROCESSED) from None


def read_processed_member(path: str | Path, member: str) -> np.ndarray:
    """One array of ``labels_{split}.npz`` / ``masks_{split}.npz`` (a head), checked first.

    The zip's sizes and every member's header are checked as for a batch (no zip bomb, no
    forged shape) before the member is loaded.

    Raises:
        BatchError: unreadable, truncated or forged file, or no such member.
    """
    path = Path(path)
    try:
        headers = read_member_headers(path)
    except BatchError as exc:
        raise BatchError(exc.message, REBUILD_PROCESSED) from None
    if member not in headers:
        raise BatchError(f"{path} has no member {member!r} (it holds "
                         f"{', '.join(sorted(headers)) or 'none'})", REBUILD_PROCESSED)
    if headers[member][1].hasobject:
        raise BatchError(f"{path}: member {member!r} holds pickled Python objects; processed "
                         "arrays are plain numbers and are never unpickled", REBUILD_PROCESSED)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive[member]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BatchError(f"{path}: cannot read member {member!r} ({exc})",
                         REBUILD_PROCESSED) from None


def read_processed_meta(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """``meta_{split}.parquet`` (the listed columns, or all).

    Raises:
        BatchError: the file is not readable Parquet (truncated, corrupt) or lacks a column.
    """
    import polars as pl

    path = Path(path)
    try:
        return pl.read_parquet(path, columns=columns)
    except (pl.exceptions.PolarsError, OSError) as exc:
        if isinstance(exc, PermissionError):
            raise
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if isinstance(exc, pl.exceptions.ColumnNotFoundError):
            raise BatchError(f"{path} lacks a column pricectl reads ({first_line})",
                             REBUILD_PROCESSED) from None
        raise BatchError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                         f"{first_line})", REBUILD_PROCESSED) from None


def read_processed_stats(path: str | Path) -> dict[str, Any]:
    """``preprocessing_stats.json`` as a JSON object.

    Raises:
        BatchError: not JSON, or not an object.
    """
    path = Path(path)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchError(f"{path}: not valid JSON ({exc})", REBUILD_PROCESSED) from None
    if not isinstance(stats, dict):
        raise BatchError(f"{path}: expected a JSON object", REBUILD_PROCESSED)
    return stats


def run_merge(settings: Settings, monitor: RunMonitor) -> StageResult:
    """Merge the batches of ``preprocess.output_dir`` into ``merge.output_dir``.

    Returns:
        StageResult with samples per split, the input width and whether batches were deleted.

    Raises:
        MissingInputError: no batches (preprocess has not run).
        BatchError: a batch is missing, inconsistent or out of order (batches are kept).
    """
    from pricing_cli.runinfo import StageResult

    batch_dir = Path(settings.preprocess.output_dir)
    output_dir = Path(settings.merge.output_dir)
    check_output_dir(output_dir, "merge", [batch_dir])
    plan = plan_merge(batch_dir)
    monitor.log(f"merging {len(plan.batches)} batches: " + ", ".join(
        f"{s} {n:,}" for s, n in plan.samples.items()) + f" samples × {plan.n_features} features")
    monitor.add_bar("batches", "batches", len(plan.batches))
    strategy = settings.merge.strategy
    with staged_dir(output_dir, owner="merge") as staging:
        if strategy == "sequential":
            merge_sequential(plan, staging, monitor)
        else:
            merge_accumulative(plan, staging, monitor)
        write_json(staging / "feature_cols.json", plan.feature_names)
        write_json(staging / "preprocessing_stats.json", _stats(plan))
    monitor.clear_workers()
    keep = settings.merge.keep_batches or settings.preprocess.keep_batches
    deleted = 0 if keep else delete_batches(plan)
    summary = {
        "strategy": strategy, "batches": len(plan.batches),
        "samples": sum(plan.samples.values()), "samples_per_split": plan.samples,
        "input_dim": plan.n_features, "heads": plan.heads,
        "batches_deleted": deleted,
    }
    inputs = [path for path, _ in plan.batches] if keep else []
    return StageResult("merge", output_dir, inputs=inputs, summary=summary)
