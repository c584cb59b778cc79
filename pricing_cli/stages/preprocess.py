"""`pricectl preprocess`: per-product feature files to batches of decision samples.

Each input file (one product, one row per day; the "features → preprocess" contract in
docs/architecture.md) becomes one decision sample per product-day:

* state features (float32): the ``f_*`` columns; a window of the last ``history_window`` days
  of :data:`HISTORY_SERIES` (past only, zero-padded before the first day); the price ladder
  (for each of the K candidate prices of ``pricing.price_grid``: log(candidate / ref_price)
  and the margin (candidate - unit_cost) / candidate); :data:`STATIC_FEATURES`;
* labels (int16 per head): ``price_level`` = grid level nearest the historical price,
  ``price_move`` = down/hold/up against yesterday (-1 on a product's first day);
* masks (int8 per head): the feasible levels (``pricing.feasible_mask``) and moves;
* meta: product_index, product_id, date, split, price, units, costs and bounds.

Files are sorted and cut into batches of at most ``batch_size`` files and about
``batch_max_mb`` of samples (:func:`plan_batches`). A worker pool (spawn) builds one batch;
the parent holds only that batch, writes it with ``batches.write_batch`` (atomic), records it
with a line in ``manifest.journal`` and frees it. A re-run reuses every batch whose input files and
content config are unchanged. A file that breaks the contract is quarantined (recorded with its
reason) unless ``fail_fast``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.errors import DataError, MissingInputError, PricingError
from pricing_cli.pricing import (
    MOVE_DOWN,
    MOVE_HOLD,
    MOVE_UP,
    feasible_mask,
    nearest_level,
    price_grid,
)
from pricing_cli.stages.batches import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MOVE_CLASSES,
    SPLITS,
    BatchRecord,
    SampleBlock,
    append_manifest_entry,
    batch_name,
    head_classes,
    read_manifest,
    write_batch,
    write_manifest,
)
from pricing_cli.storage import (
    check_output_dir,
    file_fingerprint,
    sha256_file,
    sweep_stale_tmp,
    write_owner_marker,
)

if TYPE_CHECKING:
    from pricing_cli.config import Settings
    from pricing_cli.monitor import RunMonitor
    from pricing_cli.runinfo import StageResult

FEATURE_MANIFEST = "feature_manifest.json"

# Past-only daily series stacked into the state, each over `history_window` days (lag 1 first).
# asinh compresses counts like log but is defined at 0 and for negative net units (returns).
HISTORY_SERIES = (
    "units",              # asinh(units)
    "price_rel_ref",      # price / ref_price - 1
    "log_price_change",   # log(price_t / price_{t-1}); 0 on the first day
    "price_position",     # (price - min_price) / (max_price - min_price)
    "margin",             # (price - unit_cost) / price
    "transactions",       # asinh(n_transactions)
    "revenue",            # asinh(revenue)
    "zero_sales",         # 1 if units <= 0
)
STATIC_FEATURES = ("log_unit_cost", "log_min_price", "log_max_price", "log_ref_price",
                   "cost_to_min_price", "log_price_range")

RAW_COLUMNS: dict[str, str] = {
    "product_index": "Int32", "product_id": "String", "date": "Date", "split": "String",
    "units": "Float64", "price": "Float64", "revenue": "Float64", "n_transactions": "Int64",
    "ref_price": "Float64", "unit_cost": "Float64", "min_price": "Float64",
    "max_price": "Float64",
}

# Keys of the preprocess section that change how the work is run, not what a batch holds:
# they must not invalidate batches (a resume with other --workers reuses everything).
EXECUTION_ONLY_KEYS = ("workers", "batch_size", "batch_max_mb", "keep_batches", "resume",
                       "fail_fast", "output_dir", "input_glob", "executor", "ray_address")


@dataclass(frozen=True)
class SampleParams:
    """Everything that decides the samples built from one file (recorded in the manifest)."""

    feature_columns: tuple[str, ...]
    price_levels: int
    max_daily_change: float
    history_window: int
    move_tolerance: float
    heads: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings, feature_columns: Sequence[str]) -> SampleParams:
        cfg = settings.preprocess
        head_classes(cfg.heads, cfg.price_levels)  # reject unknown heads early
        return cls(tuple(feature_columns), cfg.price_levels, cfg.max_daily_change,
                   cfg.history_window, cfg.move_tolerance, tuple(cfg.heads))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleParams:
        return cls(tuple(data["feature_columns"]), int(data["price_levels"]),
                   float(data["max_daily_change"]), int(data["history_window"]),
                   float(data["move_tolerance"]), tuple(data["heads"]))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature_columns"] = list(self.feature_columns)
        data["heads"] = list(self.heads)
        return data

    @property
    def head_k(self) -> dict[str, int]:
        return head_classes(self.heads, self.price_levels)


def feature_layout(params: SampleParams) -> tuple[list[str], dict[str, list[int]]]:
    """Names of the F state features in column order, and each group's [start, stop).

    Groups: ``catalog_features`` (the f_* columns), ``history``, ``ladder_log_rel``,
    ``ladder_margin``, ``static``.
    """
    w, k = params.history_window, params.price_levels
    groups: dict[str, list[str]] = {
        "catalog_features": list(params.feature_columns),
        "history": [f"hist_{s}_lag{d}" for s in HISTORY_SERIES for d in range(1, w + 1)],
        "ladder_log_rel": [f"ladder_log_rel_{i:03d}" for i in range(k)],
        "ladder_margin": [f"ladder_margin_{i:03d}" for i in range(k)],
        "static": [f"static_{s}" for s in STATIC_FEATURES],
    }
    names: list[str] = []
    spans: dict[str, list[int]] = {}
    for group, group_names in groups.items():
        spans[group] = [len(names), len(names) + len(group_names)]
        names.extend(group_names)
    return names, spans


# ----------------------------------------------------------------------------------------------
# One file -> samples (runs in the workers)


def _lagged(series: np.ndarray, window: int) -> np.ndarray:
    """(n, window) matrix whose column d-1 is ``series`` d days back (0 before the start)."""
    n = series.shape[0]
    padded = np.concatenate([np.zeros(window), series])
    # row t of the view covers padded[t : t + window] = series[t - window : t]; reverse it
    # so the first column is lag 1.
    return np.lib.stride_tricks.sliding_window_view(padded, window)[:n, ::-1]


def _category(frame: Any) -> np.ndarray:
    """The product's catalog category per row ("none" where the features file has none), so
    the demand fit can pool a product toward its category."""
    if "category" not in frame.columns:
        return np.full(frame.height, "none")
    return frame["category"].fill_null("none").to_numpy().astype(str)


def _read_feature_file(path: Path, params: SampleParams) -> Any:
    """Read one feature file with the contract's column types; DataError on any breach."""
    import polars as pl

    wanted = {**RAW_COLUMNS, **{c: "Float32" for c in params.feature_columns}}
    # One open and one read (a per-product file is small); polars given the path opens it
    # twice, and a schema read first made three. The schema is parsed only to explain a failure.
    try:
        content = io.BytesIO(path.read_bytes())
    except OSError as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})",
                        "Re-run `pricectl features` to rewrite it.") from None
    try:
        # every column: the optional category (older files lack it) needs no schema read
        frame = pl.read_parquet(content)
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}",
                            "The file does not follow the features contract "
                            "(docs/architecture.md); re-run `pricectl features`.")
        if "category" in frame.columns:
            wanted["category"] = "String"
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
        try:
            schema = pl.read_parquet_schema(io.BytesIO(content.getvalue()))
        except Exception:  # noqa: BLE001
            raise DataError(f"{path}: not a readable Parquet file ({exc})",
                            "Re-run `pricectl features` to rewrite it.") from None
        missing = [c for c in wanted if c not in schema]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}",
                            "The file does not follow the features contract "
                            "(docs/architecture.md); re-run `pricectl features`.") from None
        raise DataError(f"{path}: cannot read the columns with their contract types ({exc})",
                        "Re-run `pricectl features` to rewrite it.") from None
    try:
        return frame.select(pl.col(c).cast(getattr(pl, t), strict=True)
                            for c, t in wanted.items())
    except Exception as exc:  # noqa: BLE001 - polars raises several error types here
        raise DataError(f"{path}: cannot read the columns with their contract types ({exc})",
                        "Re-run `pricectl features` to rewrite it.") from None


def _check_rows(path: Path, frame: Any, feature_matrix: np.ndarray,
                params: SampleParams) -> None:
    """Contract checks that need the values; the message names the first bad row."""
    n = frame.height
    dates = frame["date"].to_numpy()

    def fail(rows: np.ndarray, what: str, fix: str) -> None:
        row = int(np.flatnonzero(rows)[0])
        raise DataError(f"{path}: row {row} (date {dates[row]}): {what}", fix)

    if n == 0:
        raise DataError(f"{path}: no rows", "Remove the file or re-run `pricectl features`.")
    for column in ("product_index", "product_id"):
        if frame[column].n_unique() != 1 or frame[column].null_count():
            raise DataError(f"{path}: column {column} must hold one product only",
                            "Write one file per product (re-run `pricectl features`).")
    nulls = {c: frame[c].null_count() for c in RAW_COLUMNS}
    for column, count in nulls.items():
        if count:
            fail(frame[column].is_null().to_numpy(), f"{column} is empty",
                 "Fill it in the features stage.")
    steps = np.diff(dates.astype(np.int64))
    if (steps != 1).any():
        bad = np.concatenate([[False], steps != 1])
        fail(bad, "dates must increase by exactly one day (one row per calendar day)",
             "Sort the file by date and fill missing days (re-run `pricectl features`).")
    split = frame["split"].to_numpy().astype(str)
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        fail(unknown, f"split {split[unknown][0]!r} is not one of {', '.join(SPLITS)}",
             "Use train, val or test.")
    for column in ("price", "ref_price", "min_price"):
        values = frame[column].to_numpy()
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            fail(bad, f"{column} must be a finite number > 0, got {values[bad][0]}",
                 "Fix the catalog or the transactions and re-run `pricectl features`.")
    for column in ("units", "revenue", "unit_cost", "max_price"):
        values = frame[column].to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            fail(bad, f"{column} must be finite, got {values[bad][0]}",
                 "Fix the input and re-run `pricectl features`.")
    low, high = frame["min_price"].to_numpy(), frame["max_price"].to_numpy()
    if (high < low).any():
        fail(high < low, f"max_price {high[high < low][0]} is below min_price",
             "Fix the product's bounds in the catalog.")
    bad = ~np.isfinite(feature_matrix)
    if bad.any():
        rows = bad.any(axis=1)
        column = params.feature_columns[int(np.flatnonzero(bad[np.argmax(rows)])[0])]
        fail(rows, f"feature column {column} is NaN or inf",
             "Fix the features stage output (scalers, lags) and re-run `pricectl features`.")


@dataclass
class FileStats:
    """Counts from one file that go into the manifest and the summary."""

    mask_conflicts: int = 0
    labels_projected: dict[str, int] = field(default_factory=dict)


def build_samples(path: str | Path, params: SampleParams) -> SampleBlock:
    """Build the decision samples of one per-product feature file.

    Args:
        path: a Parquet file of the features → preprocess contract.
        params: what to build (feature columns, K, max_daily_change, window, heads).

    Returns:
        One sample per row, in date order (:func:`build_samples_with_stats` also returns
        the counts of mask conflicts and projected labels).

    Raises:
        DataError: the file is unreadable or breaks the contract (missing column, NaN in a
            feature, non-consecutive dates, bad prices); the message names the row.
    """
    return build_samples_with_stats(path, params)[0]


def build_samples_with_stats(path: str | Path, params: SampleParams
                             ) -> tuple[SampleBlock, FileStats]:
    """:func:`build_samples`, plus the counts of mask conflicts and projected labels."""
    path = Path(path)
    frame = _read_feature_file(path, params)
    feature_matrix = frame.select(params.feature_columns).to_numpy().astype(
        np.float32, copy=False).reshape(frame.height, len(params.feature_columns))
    _check_rows(path, frame, feature_matrix, params)

    def col(name: str) -> np.ndarray:
        return frame[name].to_numpy().astype(np.float64, copy=False)

    price, units, ref = col("price"), col("units"), col("ref_price")
    cost, low, high = col("unit_cost"), col("min_price"), col("max_price")
    revenue, transactions = col("revenue"), col("n_transactions")
    n, k, w = frame.height, params.price_levels, params.history_window
    grid = price_grid(low, high, k)  # (n, K)
    stats = FileStats()

    # --- masks and labels ---------------------------------------------------------------
    prev = np.concatenate([[np.nan], price[:-1]])
    level_mask = np.ones((n, k), np.int8)  # first day: every level feasible
    if n > 1:
        level_mask[1:], conflict = feasible_mask(grid[1:], prev[1:], params.max_daily_change)
        stats.mask_conflicts = int(conflict.sum())
    labels: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    feasible = level_mask.astype(bool)
    level = nearest_level(grid, price)
    infeasible = ~feasible[np.arange(n), level]
    if infeasible.any():
        # A day that broke max_daily_change (or a price outside the bounds): clone the
        # nearest move the rule allows rather than an action the agent can never take.
        distance = np.where(feasible, np.abs(grid - price[:, None]), np.inf)
        level = np.where(infeasible, distance.argmin(axis=1), level)
    if "price_level" in params.heads:
        labels["price_level"] = level.astype(np.int16)
        masks["price_level"] = level_mask
        stats.labels_projected["price_level"] = int(infeasible.sum())
    if "price_move" in params.heads:
        tol = params.move_tolerance
        change = price[1:] / price[:-1] - 1.0
        move = np.full(n, -1, np.int64)
        move[1:] = np.where(change > tol, MOVE_UP, np.where(change < -tol, MOVE_DOWN, MOVE_HOLD))
        move_mask = np.ones((n, MOVE_CLASSES), np.int8)
        # down/up are feasible when some feasible level lies beyond the hold band; hold
        # (stay at the feasible level nearest yesterday's price) always exists.
        move_mask[1:, MOVE_DOWN] = (feasible[1:] & (grid[1:] < prev[1:, None] * (1 - tol))
                                    ).any(axis=1)
        move_mask[1:, MOVE_UP] = (feasible[1:] & (grid[1:] > prev[1:, None] * (1 + tol))
                                  ).any(axis=1)
        rows = np.arange(1, n)
        blocked = np.zeros(n, bool)
        blocked[1:] = move_mask[rows, move[1:]] == 0
        move[blocked] = MOVE_HOLD
        labels["price_move"] = move.astype(np.int16)
        masks["price_move"] = move_mask
        stats.labels_projected["price_move"] = int(blocked.sum())

    # --- state features -------------------------------------------------------------------
    names, spans = feature_layout(params)
    features = np.empty((n, len(names)), np.float32)
    start, stop = spans["catalog_features"]
    features[:, start:stop] = feature_matrix
    span = np.where(high > low, high - low, 1.0)
    log_change = np.zeros(n)
    log_change[1:] = np.log(price[1:] / price[:-1])
    series = {
        "units": np.arcsinh(units),
        "price_rel_ref": price / ref - 1.0,
        "log_price_change": log_change,
        "price_position": np.where(high > low, (price - low) / span, 0.5),
        "margin": (price - cost) / price,
        "transactions": np.arcsinh(transactions),
        "revenue": np.arcsinh(revenue),
        "zero_sales": (units <= 0).astype(np.float64),
    }
    column = spans["history"][0]
    if w:
        for name in HISTORY_SERIES:
            features[:, column:column + w] = _lagged(series[name], w)
            column += w
    start, stop = spans["ladder_log_rel"]
    features[:, start:stop] = np.log(grid / ref[:, None])
    start, stop = spans["ladder_margin"]
    features[:, start:stop] = (grid - cost[:, None]) / grid
    start, stop = spans["static"]
    features[:, start:stop] = np.column_stack([
        np.log(np.maximum(cost, 1e-9)), np.log(low), np.log(high), np.log(ref), cost / low,
        np.log(high / low)])
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: row {row}: a derived state feature is NaN or inf",
                        "Check the row's prices, costs and bounds.")

    meta = {
        "product_index": frame["product_index"].to_numpy().astype(np.int32),
        "product_id": frame["product_id"].to_numpy().astype(str),
        "date": frame["date"].to_numpy().astype("datetime64[D]"),
        "split": frame["split"].to_numpy().astype(str),
        "price": price, "units": units, "unit_cost": cost, "min_price": low,
        "max_price": high, "ref_price": ref, "category": _category(frame),
    }
    return SampleBlock(features, labels, masks, meta), stats


# ----------------------------------------------------------------------------------------------
# The unit of work of the executors


# (file, samples or None, failure reason or None, stats)
FileOutcome = tuple[str, SampleBlock | None, str | None, FileStats]

def process_file(path: str, params: SampleParams) -> FileOutcome:
    """Build one file's samples; contract and read failures become a reason, not a crash.

    The unit of work the executors (stages/executors.py) run, in this process or a worker.
    """
    try:
        block, stats = build_samples_with_stats(path, params)
    except PricingError as exc:
        return path, None, exc.message.removeprefix(f"{path}: "), FileStats()
    except OSError as exc:
        return path, None, f"cannot read: {exc}", FileStats()
    return path, block, None, stats


# ----------------------------------------------------------------------------------------------
# The stage


def find_input_files(settings: Settings) -> list[Path]:
    """Input files, sorted by name (= product_index for features' {index:05d}.parquet).

    Raises:
        MissingInputError: nothing matches preprocess.input_glob.
    """
    pattern = settings.preprocess.input_glob
    files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
    if not files:
        raise MissingInputError(f"no files match preprocess.input_glob {pattern!r}",
                                "Run `pricectl features` first, or pass --input-glob.")
    return files


def read_feature_manifest(files: Sequence[Path]) -> tuple[Path, dict[str, Any]]:
    """The feature_manifest.json beside the input files.

    Raises:
        MissingInputError: it does not exist.
        DataError: it is not JSON or lacks feature_columns.
    """
    path = files[0].parent / FEATURE_MANIFEST
    if not path.is_file():
        raise MissingInputError(f"{path} not found beside the input files",
                                "Run `pricectl features`; it writes the manifest with the "
                                "feature files.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        columns = manifest["feature_columns"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid feature manifest ({exc!r})",
                        "Re-run `pricectl features`.") from None
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise DataError(f"{path}: feature_columns must be a list of column names",
                        "Re-run `pricectl features`.")
    return path, manifest


def state_excluded_columns(feature_manifest: dict[str, Any]) -> list[str]:
    """f_* columns computed from the same day's price (``current_price_columns``).

    The sample of day t asks which price to set on day t, so a feature of that day's price
    would hand the label to the model and is unknown when pricing ahead. The same quantities
    enter the state one day back through :data:`HISTORY_SERIES`.
    """
    columns = feature_manifest.get("current_price_columns") or []
    return [c for c in columns if c in feature_manifest["feature_columns"]]


def content_fingerprint(settings: Settings, feature_manifest_sha: str) -> str:
    """Fingerprint of everything that decides a batch's content (not how it is run)."""
    section = settings.preprocess.model_dump(mode="json")
    for key in EXECUTION_ONLY_KEYS:
        section.pop(key, None)
    payload = json.dumps({"preprocess": section, "feature_manifest": feature_manifest_sha,
                          "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# Bytes per sample besides the state and the heads: the ten meta columns at 8 bytes each.
META_BYTES_PER_SAMPLE = 80


def sample_bytes(n_features: int, heads: dict[str, int]) -> int:
    """Estimated bytes of one decision sample in memory and in a batch: float32 features,
    per head an int16 label and K int8 mask entries, and the meta columns."""
    return 4 * n_features + sum(2 + k for k in heads.values()) + META_BYTES_PER_SAMPLE


def plan_batches(rows: Sequence[int], max_files: int, max_bytes: int,
                 bytes_per_sample: int) -> list[tuple[int, int]]:
    """Cut files (in order, with ``rows`` samples each) into batches ``[start, stop)``.

    A batch takes the next file unless it already holds ``max_files`` files or the file
    would take its estimated bytes (``rows x bytes_per_sample``, summed) past ``max_bytes``.
    A batch holds at least one file, so a single file larger than the cap gets a batch of
    its own.
    """
    plan: list[tuple[int, int]] = []
    start, held = 0, 0
    for index, n in enumerate(rows):
        size = int(n) * bytes_per_sample
        if index > start and (index - start >= max_files or held + size > max_bytes):
            plan.append((start, index))
            start, held = index, 0
        held += size
    if len(rows) > start:
        plan.append((start, len(rows)))
    return plan


def file_rows(files: Sequence[Path], feature_manifest: dict[str, Any]) -> list[int]:
    """Rows of each input file: from feature_manifest.json where it lists the file (no I/O),
    else from the Parquet footer."""
    import polars as pl

    listed: dict[str, int] = {}
    for product in feature_manifest.get("products") or []:
        try:
            listed[str(product["file"])] = int(sum(product["rows"].values()))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    rows: list[int] = []
    for path in files:
        n = listed.get(path.name)
        if n is None:
            try:
                n = int(pl.scan_parquet(path).select(pl.len()).collect().item())
            except Exception:  # noqa: BLE001 - the worker reports an unreadable file
                n = 0
        rows.append(n)
    return rows


def _reusable(entry: dict[str, Any] | None, files: list[dict[str, Any]], fingerprint: str,
              output_dir: Path) -> bool:
    """A recorded batch can be reused: same inputs (path, size, mtime), same config, on disk."""
    if not entry or entry.get("fingerprint") != fingerprint or entry.get("files") != files:
        return False
    path = output_dir / entry["name"]
    return path.is_file() and path.stat().st_size == entry.get("bytes")


@dataclass
class _Totals:
    """Sums over batch entries for the summary, kept instead of the entries themselves."""

    samples: dict[str, int]
    quarantined: list[dict[str, str]]
    mask_conflicts: int
    labels_projected: dict[str, int]

    @classmethod
    def of(cls, entries: Iterable[dict[str, Any]], heads: dict[str, int]) -> _Totals:
        totals = cls(dict.fromkeys(SPLITS, 0), [], 0, dict.fromkeys(heads, 0))
        for entry in entries:
            totals.add(entry)
        return totals

    def add(self, entry: dict[str, Any]) -> None:
        for split in SPLITS:
            self.samples[split] += entry["samples"][split]
        self.quarantined.extend(entry["quarantined"])
        self.mask_conflicts += entry["stats"].get("mask_conflicts", 0)
        for head in self.labels_projected:
            self.labels_projected[head] += entry["stats"].get("labels_projected", {}).get(
                head, 0)


def run_preprocess(settings: Settings, monitor: RunMonitor) -> StageResult:
    """Build batches of decision samples from the per-product feature files.

    Returns:
        StageResult with counts, rates and one failure line per quarantined file.

    Raises:
        MissingInputError: no input files or no feature_manifest.json.
        ConfigError: unknown label heads.
        DataError: with ``fail_fast``, the first file that fails.
        MemoryBudgetExceeded / KeyboardInterrupt: completed batches stay valid.
    """
    from pricing_cli.runinfo import StageResult
    from pricing_cli.stages.executors import check_executor_settings, open_executor

    cfg = settings.preprocess
    check_executor_settings(cfg)  # e.g. --executor ray without Ray installed: fail before work
    files = find_input_files(settings)
    fm_path, feature_manifest = read_feature_manifest(files)
    excluded = state_excluded_columns(feature_manifest)
    params = SampleParams.from_settings(
        settings, [c for c in feature_manifest["feature_columns"] if c not in excluded])
    head_k = params.head_k
    names, spans = feature_layout(params)
    fm_sha = sha256_file(fm_path)
    fingerprint = content_fingerprint(settings, fm_sha)
    # The panel names each worker's product, not its index file (00010.parquet).
    monitor.name_files({Path(str(p["file"])).name: str(p["product_id"])
                        for p in feature_manifest.get("products", [])
                        if isinstance(p, dict) and "file" in p and "product_id" in p})

    output_dir = Path(cfg.output_dir)
    # Batches are added and stale ones deleted in place: only in a folder preprocess made.
    check_output_dir(output_dir, "preprocess", files)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_owner_marker(output_dir, "preprocess", list_files=False)
    swept = sweep_stale_tmp(output_dir)
    if swept:
        monitor.log(f"removed {swept} temporary file(s) left by an interrupted run")
    old = None
    if cfg.resume:
        try:
            old = read_manifest(output_dir)
        except PricingError as exc:
            monitor.log(f"ignoring unreadable manifest: {exc.message}")

    # fingerprints are taken per batch when it is checked or built, not kept for every file
    plan = [files[a:b] for a, b in plan_batches(
        file_rows(files, feature_manifest), cfg.batch_size, int(cfg.batch_max_mb * 2**20),
        sample_bytes(len(names), head_k))]
    old_entries = {b["name"]: b for b in (old or {}).get("batches", [])}
    del old
    entries: dict[str, dict[str, Any]] = {}
    for i, chunk in enumerate(plan):
        entry = old_entries.get(batch_name(i))
        if entry is not None and _reusable(entry, [file_fingerprint(p) for p in chunk],
                                           fingerprint, output_dir):
            entries[batch_name(i)] = entry
    del old_entries
    planned = {batch_name(i) for i in range(len(plan))}
    for stale in output_dir.glob("batch_*.npz"):
        if stale.name not in planned:
            stale.unlink()
    todo = [i for i in range(len(plan)) if batch_name(i) not in entries]
    if entries:
        monitor.log(f"reusing {len(entries)} of {len(plan)} batches "
                    f"(inputs and config unchanged); building {len(todo)}")

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "feature_manifest": {"path": str(fm_path), "sha256": fm_sha},
        "params": params.to_json(),
        "heads": head_k,
        "n_features": len(names),
        "feature_groups": spans,
        "excluded_feature_columns": excluded,
        "splits": feature_manifest.get("splits"),
        "input_glob": cfg.input_glob,
        "n_files": len(files),
        "batch_size": cfg.batch_size,
        "batch_max_mb": cfg.batch_max_mb,
        "n_batches": len(plan),
        "batches": [entries[k] for k in sorted(entries)],
    }
    write_manifest(output_dir, manifest)

    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, sum(len(plan[i]) for i in todo) or 1))
    files_todo = sum(len(plan[i]) for i in todo)
    monitor.add_bar("batches", "batches", len(plan))
    monitor.update_bar("batches", completed=len(entries))
    monitor.add_bar("files", "files", files_todo)
    started = time.monotonic()
    files_done = samples_done = 0
    built: list[str] = []
    # What the summary needs of the batches built here; their entries go to the journal
    totals = _Totals.of(entries.values(), head_k)
    with open_executor(cfg, params, workers, monitor, process_file) as pool:
        for i in todo:
            monitor.set_metric("working on batch", f"{i + 1}/{len(plan)}")
            # before reading: a file changed while it is read must not look unchanged later
            inputs = [file_fingerprint(p) for p in plan[i]]
            blocks: list[SampleBlock] = []
            quarantined: list[dict[str, str]] = []
            conflicts = 0
            projected = dict.fromkeys(head_k, 0)
            for path, block, reason, stats in pool.map([str(p) for p in plan[i]]):
                files_done += 1
                monitor.update_bar("files", advance=1)
                if block is None:
                    if cfg.fail_fast:
                        raise DataError(
                            f"{path}: {reason} (--fail-fast: stopped at the first failed file)",
                            "Fix the file, or run without --fail-fast to quarantine failing "
                            "files and carry on.")
                    quarantined.append({"file": path, "reason": str(reason)})
                    monitor.log(f"quarantined {path}: {reason}")
                    continue
                blocks.append(block)
                samples_done += block.n
                conflicts += stats.mask_conflicts
                for head, count in stats.labels_projected.items():
                    projected[head] += count
                elapsed = max(time.monotonic() - started, 1e-9)
                monitor.set_metric("files/s", f"{files_done / elapsed:.1f}")
                monitor.set_metric("samples/s", f"{samples_done / elapsed:,.0f}")
            record: BatchRecord = write_batch(output_dir / batch_name(i), blocks, names, head_k)
            entry = {
                "name": batch_name(i), "files": inputs,
                "fingerprint": fingerprint,
                "n_samples": record.n_samples, "samples": record.samples,
                "products": len(blocks), "members": record.members, "bytes": record.bytes,
                "quarantined": quarantined,
                "stats": {"mask_conflicts": conflicts, "labels_projected": projected},
            }
            del blocks  # the parent holds one batch at a time
            append_manifest_entry(output_dir, entry)
            totals.add(entry)
            built.append(batch_name(i))
            monitor.update_bar("batches", advance=1)
            monitor.check_memory()
        workers = pool.workers  # a Ray cluster's window is known once it has started
    monitor.clear_workers()
    if built:
        # once, complete: read_manifest folds the journal in, write_manifest removes it
        final = read_manifest(output_dir)
        assert final is not None
        write_manifest(output_dir, final)
        del final

    elapsed = max(time.monotonic() - started, 1e-9)
    samples = totals.samples
    quarantined_all = totals.quarantined
    summary = {
        "files": len(files), "files_quarantined": len(quarantined_all),
        "batches": len(plan), "batches_reused": len(plan) - len(built),
        "batches_built": len(built), "built": built,
        "samples": sum(samples.values()), "samples_per_split": samples,
        "n_features": len(names), "price_levels": params.price_levels,
        "mask_conflicts": totals.mask_conflicts,
        "labels_projected": totals.labels_projected,
        "workers": workers if built else 0,
        "files_per_s": round(files_done / elapsed, 1),
        "samples_per_s": round(samples_done / elapsed, 1),
    }
    failures = [f"{q['file']}: {q['reason']}" for q in quarantined_all]
    return StageResult("preprocess", output_dir, inputs=files, summary=summary,
                       outputs=[output_dir / MANIFEST_NAME],
                       failures=failures)
