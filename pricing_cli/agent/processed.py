"""The one reader of a processed folder (``data/processed``, merge's output).

Train, evaluate, the env, the baselines and recommend read the processed split through a
:class:`ProcessedData`, which reads each file at most once per run and hands out what it read:

* ``preprocessing_stats.json`` as a typed :class:`ProcessedStats`;
* ``meta_{split}.parquet`` as a polars frame (every column, read once; callers select);
* ``masks_{split}.npz`` (``price_level``) and ``labels_{split}.npz`` members;
* ``X_{split}.npy`` memory-mapped read-only;
* the price before day one (:meth:`ProcessedData.last_prices_before`): the one rule the env's
  episodes, the baselines and the violation count start from;
* the closed days found in every split's meta (:meth:`ProcessedData.closed_days`).

Every file goes through the checked readers of ``stages/merge.py`` (``read_processed_*``:
headers and sizes checked before anything is mapped, never ``allow_pickle``), so a truncated or
forged file is a BatchError naming it. A missing file is a MissingInputError saying to run
merge. Pass the one ``ProcessedData`` down instead of a folder: every function that takes a
folder also takes one (:func:`as_processed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.errors import BatchError, MissingInputError
from pricing_cli.stages.batches import SPLITS

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.config import DataSettings
    from pricing_cli.data.closed_days import ClosedDays

STATS_JSON = "preprocessing_stats.json"
# The keys every reader of the processed folder needs from preprocessing_stats.json.
REQUIRED_STATS = ("price_levels", "max_daily_change")
MISSING_HINT = "Run `pricectl merge` (after preprocess) to build data/processed/."


def split_position(split: str) -> int:
    """Position of ``split`` in the chronological order (an unknown split counts as first:
    nothing comes before it)."""
    return SPLITS.index(split) if split in SPLITS else 0


@dataclass(frozen=True)
class ProcessedStats:
    """``preprocessing_stats.json``, typed (merge writes it; see docs/architecture.md).

    Attributes:
        price_levels: K, the candidate prices per row.
        max_daily_change: the relative daily-change limit the masks were built with.
        input_dim: F, the width of ``X_{split}.npy`` (None where the file does not say).
        products: the size of the product index, when the file records it as a count.
        samples: rows per split (and ``total``), as recorded.
        raw: the whole JSON object (the keys only some readers need, e.g. agent.json checks).
    """

    price_levels: int
    max_daily_change: float
    input_dim: int | None = None
    products: int | None = None
    samples: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, stats: dict[str, Any], path: Path | str = STATS_JSON) -> ProcessedStats:
        """Check and type a parsed preprocessing_stats.json.

        Raises:
            BatchError: a required key is missing, naming the file and the key.
        """
        for key in REQUIRED_STATS:
            if key not in stats:
                raise BatchError(f"{path} lacks the key '{key}'", "Re-run `pricectl merge`.")
        products = stats.get("products")
        samples = stats.get("samples")
        return cls(price_levels=int(stats["price_levels"]),
                   max_daily_change=float(stats["max_daily_change"]),
                   input_dim=(int(stats["input_dim"]) if stats.get("input_dim") is not None
                              else None),
                   products=(products if isinstance(products, int)
                             and not isinstance(products, bool) else None),
                   samples=dict(samples) if isinstance(samples, dict) else {},
                   raw=dict(stats))


class ProcessedData:
    """One processed folder, each of its files read at most once (see the module docstring).

    Not thread-safe; one per run. Reading is lazy: nothing is opened until asked for.

    ``through``: the last split this reader sees (None: all). Train reads through ``val``: the
    test split stays unseen until evaluate (no fallback, closed day or product count is
    learnt from it); a later split is refused, and counts as absent where splits are scanned.
    """

    def __init__(self, folder: str | Path, through: str | None = None) -> None:
        self.folder = Path(folder)
        self.splits = SPLITS if through is None else SPLITS[:SPLITS.index(through) + 1]
        self._stats: ProcessedStats | None = None
        self._meta: dict[str, pl.DataFrame] = {}
        self._masks: dict[str, np.ndarray] = {}
        self._labels: dict[tuple[str, str], np.ndarray] = {}
        self._features: dict[str, np.ndarray] = {}
        self._closed: dict[tuple[Any, ...], ClosedDays] = {}

    def __repr__(self) -> str:
        return f"ProcessedData({str(self.folder)!r}, through={self.splits[-1]!r})"

    def path(self, name: str) -> Path:
        """Path of one processed file.

        Raises:
            MissingInputError: the file does not exist (an earlier stage not run yet).
        """
        path = self.folder / name
        if not path.is_file():
            raise MissingInputError(f"processed file {path} not found", MISSING_HINT)
        return path

    def has_split(self, split: str) -> bool:
        """Whether ``meta_{split}.parquet`` exists (and this reader sees ``split``)."""
        return (self._visible(split) is None
                and (self.folder / f"meta_{split}.parquet").is_file())

    def _visible(self, split: str) -> str | None:
        """None if this reader may read ``split``, else why not."""
        if split in SPLITS and split not in self.splits:
            return (f"the {split} split is not read here (this reader reads "
                    f"{', '.join(self.splits)})")
        return None

    def _split_path(self, split: str, name: str) -> Path:
        why = self._visible(split)
        if why is not None:  # a programming error: a stage reading a split it must not see
            raise ValueError(why)
        return self.path(name)

    @property
    def stats(self) -> ProcessedStats:
        """preprocessing_stats.json, checked and typed.

        Raises:
            MissingInputError: the file is missing. BatchError: not a JSON object, or a
                required key is missing.
        """
        if self._stats is None:
            from pricing_cli.stages.merge import read_processed_stats

            path = self.path(STATS_JSON)
            self._stats = ProcessedStats.from_dict(read_processed_stats(path), path)
        return self._stats

    def meta(self, split: str, columns: list[str] | tuple[str, ...] | None = None
             ) -> pl.DataFrame:
        """``meta_{split}.parquet``: ``columns`` (every column if None) of the frame read once.

        Raises:
            MissingInputError: the file is missing. BatchError: unreadable Parquet, or a
                listed column is missing (named as the checked reader names it).
        """
        frame = self._meta.get(split)
        if frame is None:
            from pricing_cli.stages.merge import read_processed_meta

            frame = read_processed_meta(self._split_path(split, f"meta_{split}.parquet"))
            self._meta[split] = frame
        if columns is None:
            return frame
        if not set(columns) <= set(frame.columns):
            from pricing_cli.stages.merge import read_processed_meta

            # Re-read with the projection only to raise the checked reader's own message.
            read_processed_meta(self.folder / f"meta_{split}.parquet", list(columns))
        return frame.select(list(columns))

    def masks(self, split: str) -> np.ndarray:
        """(n, K) int8: the ``price_level`` member of ``masks_{split}.npz``."""
        if split not in self._masks:
            from pricing_cli.stages.merge import read_processed_member

            self._masks[split] = read_processed_member(
                self._split_path(split, f"masks_{split}.npz"), "price_level")
        return self._masks[split]

    def labels(self, split: str, head: str = "price_level") -> np.ndarray:
        """(n,) int16: one head of ``labels_{split}.npz`` (-1 where the head does not apply)."""
        if (split, head) not in self._labels:
            from pricing_cli.stages.merge import read_processed_member

            self._labels[split, head] = read_processed_member(
                self._split_path(split, f"labels_{split}.npz"), head)
        return self._labels[split, head]

    def features(self, split: str) -> np.ndarray:
        """(n, F) float32: ``X_{split}.npy``, memory-mapped read-only (checked first)."""
        if split not in self._features:
            from pricing_cli.stages.merge import read_processed_array

            self._features[split] = read_processed_array(
                self._split_path(split, f"X_{split}.npy"))
        return self._features[split]

    def earlier_meta(self, split: str, columns: list[str]) -> list[pl.DataFrame]:
        """``columns`` of the meta of every split before ``split`` that exists, in order."""
        return [self.meta(s, columns) for s in SPLITS[:split_position(split)]
                if self.has_split(s)]

    def last_prices_before(self, split: str, product_ids: np.ndarray) -> np.ndarray:
        """The price before day one: each product's price on its latest day in the splits
        before ``split`` (by ``product_id``), NaN where there is none (the first split, or a
        product whose history starts inside ``split``).

        The one rule the env's episodes, the grid policies and evaluate's violation count
        start from, so they all start day one from the same state.
        """
        import polars as pl

        prev = np.full(len(product_ids), np.nan)
        parts = self.earlier_meta(split, ["product_id", "date", "price"])
        if not parts or not len(product_ids):
            return prev
        last = (pl.concat(parts).group_by("product_id")
                .agg(pl.col("price").sort_by("date").last()))
        lookup = dict(zip(last["product_id"].to_list(), last["price"].to_list(), strict=True))
        for i, pid in enumerate(product_ids):
            value = lookup.get(pid)
            if value is not None:
                prev[i] = value
        return prev

    def product_count(self) -> int:
        """Size of the product index: the stats' ``products`` (a count) or 1 + the largest
        index in any split's meta."""
        if self.stats.products is not None:
            return self.stats.products
        top = -1
        for split in self.splits:
            if self.has_split(split):
                indices = self.meta(split, ["product_index"])["product_index"].to_numpy()
                if indices.size:
                    top = max(top, int(indices.max()))
        return top + 1

    def closed_days(self, data: DataSettings) -> ClosedDays:
        """``data.closed_days.find_closed_days`` over the meta of every split this reader
        sees that has ``date`` and ``units`` (a hand-made earlier split without units says
        nothing of sales)."""
        key = (tuple(sorted(data.closed_dates)), tuple(sorted(data.closed_weekdays)))
        if key not in self._closed:
            import polars as pl

            from pricing_cli.data.closed_days import find_closed_days

            frames = [self.meta(s, ["date", "units"]) for s in self.splits
                      if self.has_split(s) and {"date", "units"} <= set(self.meta(s).columns)]
            days = pl.concat(frames) if frames else None
            self._closed[key] = find_closed_days(
                np.zeros(0, dtype="datetime64[D]") if days is None else days["date"].to_numpy(),
                np.zeros(0) if days is None else days["units"].to_numpy(), data)
        return self._closed[key]


def as_processed(source: ProcessedData | str | Path) -> ProcessedData:
    """``source`` itself, or a new reader of the folder ``source``."""
    return source if isinstance(source, ProcessedData) else ProcessedData(source)
