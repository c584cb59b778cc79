"""An ensemble of demand fits: how sure the fitted model is, and cautious decisions from it.

The members are :meth:`DemandModel.fit` refits on bootstrap resamples of the train split by
product-week: within each product, whole weeks (Monday to Sunday) are drawn with replacement
as many times as the product has weeks, so each resample keeps a product's volume and its
within-week (day-of-week, price-run) structure. Days of a week drawn twice appear twice.

Uses:
- evaluate scores every policy under each member; the spread of the uplift across members is
  its interval (``evaluate.interval``);
- :class:`QuantileDemand` exposes the ``quantile``-th member prediction of units as a demand
  model, so greedy, planner, static and the env choose prices on a low quantile of profit
  (``train.decision_quantile``): for a price above unit cost, the q-quantile of profit
  (p − c) × units is (p − c) × the q-quantile of units.

Files in the run folder: ``ensemble/ensemble.json`` (size, seed, resampling, fit seconds) and
one folder per member written by ``DemandModel.save`` (npz + json; no pickle).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.errors import ModelError
from pricing_cli.storage import write_json

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.agent.demand import DemandModel
    from pricing_cli.config import Settings
    from pricing_cli.monitor import RunMonitor

ENSEMBLE_DIR = "ensemble"
ENSEMBLE_JSON = "ensemble.json"
# agreed_best_prices: the most member predictions it makes (about 10 s on one core), and
# the widest grid it scans level by level.
AGREEMENT_EVALUATIONS = 2e7
COARSE_LEVELS = 20
RESAMPLING = "bootstrap of whole product-weeks (Monday-Sunday), with replacement within product"


def bootstrap_product_weeks(meta: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    """One bootstrap resample of ``meta`` by product-week (see the module docstring).

    Args:
        meta: rows with at least product_index and date.
        rng: the random generator (one draw per product-week).

    Returns:
        The resampled rows, ordered by product_index then date (a week drawn twice gives its
        days twice).
    """
    import polars as pl

    weeks = (meta.select("product_index", pl.col("date").dt.truncate("1w").alias("week"))
             .unique().sort("product_index", "week")
             .with_columns(pl.int_range(pl.len()).over("product_index").alias("slot"),
                           pl.len().over("product_index").alias("n_weeks")))
    # Each product draws as many of its own weeks as it has.
    n_weeks = weeks["n_weeks"].to_numpy()
    drawn = np.minimum((rng.random(weeks.height) * n_weeks).astype(np.int64), n_weeks - 1)
    picks = pl.DataFrame({"product_index": weeks["product_index"],
                          "slot": pl.Series(drawn, dtype=weeks["slot"].dtype)})
    chosen = picks.join(weeks.select("product_index", "slot", "week"),
                        on=["product_index", "slot"], how="left").select("product_index", "week")
    tagged = meta.with_columns(pl.col("date").dt.truncate("1w").alias("week"))
    return (chosen.join(tagged, on=["product_index", "week"], how="inner")
            .drop("week").sort("product_index", "date", maintain_order=True)
            .select(meta.columns))


@dataclass(frozen=True)
class DemandEnsemble:
    """Demand models fitted on bootstrap resamples; see the module docstring.

    Attributes:
        members: the fitted models (at least 1).
        info: size, seed, resampling and fit seconds.
    """

    members: list[Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)

    def member_units(self, product_index: np.ndarray, dates: np.ndarray,
                     prices: np.ndarray, **options: Any) -> np.ndarray:
        """(B, *shape) each member's expected units for the rows (``options``, e.g. a
        category price index, go to every member)."""
        return np.stack([np.asarray(m.expected_units(product_index, dates, prices, **options),
                                    dtype=np.float64) for m in self.members])

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray, prices: np.ndarray,
                       quantile: float | None = None, **options: Any) -> np.ndarray:
        """Expected units across members: their mean, or their ``quantile`` (0-1, linear
        interpolation between members) row by row. Arrays broadcast as the members do."""
        units = self.member_units(product_index, dates, prices, **options)
        if quantile is None:
            return np.asarray(units.mean(axis=0))
        return np.asarray(np.quantile(units, quantile, axis=0))

    def elasticity(self, product_index: np.ndarray, dates: np.ndarray) -> np.ndarray:
        """The members' median elasticity per row."""
        return np.asarray(np.median(np.stack([m.elasticity(product_index, dates)
                                              for m in self.members]), axis=0))

    def save(self, folder: str | Path) -> None:
        """Write ``folder/ensemble/``: ensemble.json and member_NN/ (DemandModel.save)."""
        root = Path(folder) / ENSEMBLE_DIR
        for i, member in enumerate(self.members):
            target = root / f"member_{i:02d}"
            target.mkdir(parents=True, exist_ok=True)
            member.save(target)
        # Written last: a folder without it is an unfinished ensemble.
        write_json(root / ENSEMBLE_JSON, {**self.info, "members": self.size})

    @classmethod
    def load(cls, folder: str | Path) -> DemandEnsemble | None:
        """The ensemble saved in a run folder; None when the run has none.

        Raises:
            ModelError: ensemble.json or a member is unreadable.
        """
        from pricing_cli.agent.demand import DemandModel

        root = Path(folder) / ENSEMBLE_DIR
        if not (root / ENSEMBLE_JSON).is_file():
            return None
        try:
            info = json.loads((root / ENSEMBLE_JSON).read_text(encoding="utf-8"))
            size = int(info["members"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {root / ENSEMBLE_JSON}: {exc}",
                             "Re-run `pricectl train` to rebuild the run folder.") from None
        members = [DemandModel.load(root / f"member_{i:02d}") for i in range(size)]
        return cls(members=members, info=info)


def fit_ensemble(meta_train: pl.DataFrame, settings: Settings, *, n_products: int,
                 fallback_reference: np.ndarray | None = None,
                 monitor: RunMonitor | None = None,
                 source: str = "meta_train.parquet",
                 point: DemandModel | None = None) -> DemandEnsemble | None:
    """``train.ensemble_size`` refits of the demand model on product-week resamples of
    ``meta_train`` (seed ``train.ensemble_seed``); None when the size is below 2.

    ``point``: the fit on all of ``meta_train``. With ``train.ensemble_refit: estimates`` each
    member keeps its selections and refits only the estimates (``DemandModel.fit``'s
    ``selections``); without it, or with "full", each member is a whole fit.

    Raises:
        DataError: as :meth:`DemandModel.fit`.
    """
    from pricing_cli.agent.demand import DemandModel

    size = settings.train.ensemble_size
    if size < 2:
        return None
    started = time.monotonic()
    rng = np.random.default_rng(settings.train.ensemble_seed)
    if monitor is not None:
        monitor.add_bar("ensemble", "demand ensemble (bootstrap refits)", size)
    selections = point if settings.train.ensemble_refit == "estimates" else None
    members: list[DemandModel] = []
    for _ in range(size):
        resample = bootstrap_product_weeks(meta_train, rng)
        members.append(DemandModel.fit(resample, settings, n_products=n_products,
                                       fallback_reference=fallback_reference, source=source,
                                       selections=selections))
        if monitor is not None:
            monitor.update_bar("ensemble", advance=1)
            monitor.check_memory()
    info = {"seed": settings.train.ensemble_seed, "resampling": RESAMPLING,
            "refit": "estimates" if selections is not None else "full",
            "seconds": round(time.monotonic() - started, 3)}
    return DemandEnsemble(members=members, info=info)


class QuantileDemand:
    """The ensemble's ``quantile`` of expected units as a demand model (see the module
    docstring): pass it wherever a demand model chooses prices.

    ``point`` (the fit on all rows) supplies every attribute a quantile does not define (the
    reference prices and the product count the env reads, its info, ...).
    """

    def __init__(self, ensemble: DemandEnsemble, quantile: float, point: Any) -> None:
        self.ensemble = ensemble
        self.quantile = quantile
        self.point = point

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper itself.
        if name in ("ensemble", "quantile", "point"):
            raise AttributeError(name)
        return getattr(self.point, name)

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray, **options: Any) -> np.ndarray:
        return self.ensemble.expected_units(product_index, dates, prices, self.quantile,
                                            **options)

    def units_on_grid(self, product_index: np.ndarray, dates: np.ndarray,
                      grid: np.ndarray) -> np.ndarray:
        """(n, K) the quantile of units at every level of each row's grid."""
        grid = np.asarray(grid, dtype=np.float64)
        levels = grid.shape[1]
        # Flat rows: the members need not broadcast (n, 1) indices against (n, K) prices.
        units = self.expected_units(np.repeat(np.asarray(product_index), levels),
                                    np.repeat(np.asarray(dates), levels), grid.ravel())
        return units.reshape(grid.shape)

    def elasticity(self, product_index: np.ndarray, dates: np.ndarray) -> np.ndarray:
        return self.ensemble.elasticity(product_index, dates)

    def log_base_and_elasticity(self, product_index: np.ndarray, dates: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray]:
        """A constant-elasticity view of the quantile for consumers that take one (the env
        before it reads units on the grid): its log units at the reference price, and the
        slope of its log units between 0.8x and 1.25x the reference price."""
        index = np.asarray(product_index, dtype=np.int64)
        reference = self.reference_price[index]
        spread = np.log(1.25)
        at = [np.log(self.expected_units(index, dates, reference * np.exp(k * spread)))
              for k in (-1.0, 0.0, 1.0)]
        return at[1], (at[0] - at[2]) / (2 * spread)


def agreed_best_prices(ensemble: DemandEnsemble, metas: list[Any], agreement: float,
                       n_products: int, max_evaluations: float = AGREEMENT_EVALUATIONS
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) by product index: the lowest and highest best price the members agreed on,
    NaN for a product without an agreed day (what the adaptive trust region may grow to
    reach, :func:`pricing.trust_region_bounds`).

    Each member's best price on each row of ``metas`` (``baselines.SplitMeta``; train takes
    its train and val splits, the days the sold range comes from) is the grid
    level with the largest expected profit there (the whole [min_price, max_price] grid, no
    trust region): day by day, so a calendar the fit knows (an event window's higher
    elasticity) moves it. The members agree on a row where every one's best level is
    interior (not the grid's lowest or highest: a best price at the edge says only "further",
    not where the optimum is) and their interval (highest - lowest) is at most ``agreement``
    times their median best price.

    Cost: members x rows x levels predictions. Above ``max_evaluations`` of them, every s-th
    day of each product is used (the smallest s that fits), and a grid of more than
    ``COARSE_LEVELS`` levels is searched coarse to fine (every level of the best coarse
    level's neighbourhood): the small and 150-product markets are scanned in full, the full
    preset (7,300 products, 101 levels) in seconds.
    """
    low, high = np.full(n_products, np.nan), np.full(n_products, np.nan)
    rows = sum(meta.n_rows for meta in metas)
    if not rows:
        return low, high
    levels = metas[0].first_day_mask.shape[1]
    stride = max(1, levels // COARSE_LEVELS)
    searched = levels if stride == 1 else -(-levels // stride) + 2 * (stride - 1)
    every = max(1, int(np.ceil(ensemble.size * rows * searched / max_evaluations)))
    for meta in metas:
        if meta.n_rows:
            _agreed_rows(ensemble, meta, agreement, low, high, every, stride)
    return low, high


def _agreed_rows(ensemble: DemandEnsemble, meta: Any, agreement: float, low: np.ndarray,
                 high: np.ndarray, every: int, stride: int) -> None:
    """:func:`agreed_best_prices` of one split (every ``every``-th day of each product, levels
    searched at ``stride`` then refined), folded into ``low`` and ``high`` in place."""
    position = np.arange(meta.n_rows) - meta.series_start[meta.series_of_row]
    rows = np.flatnonzero(position % every == 0)
    grid = meta.grid[meta.series_of_row[rows]]  # (n, K)
    product, dates, cost = meta.product_index[rows], meta.date[rows], meta.unit_cost[rows]
    n, levels = grid.shape
    best = np.zeros((ensemble.size, n), dtype=np.int64)
    at = np.arange(n)
    offsets = [o for o in range(-(stride - 1), stride) if o]
    for m, member in enumerate(ensemble.members):
        value = np.full(n, -np.inf)
        candidates = [np.full(n, level) for level in range(0, levels, stride)]
        for phase in ("coarse", "fine"):
            if phase == "fine":  # every level within a coarse step of the coarse best
                candidates = [np.clip(best[m] + o, 0, levels - 1) for o in offsets]
            for level in candidates:
                # A running argmax keeps memory at a few n-vectors, whatever K is.
                price = grid[at, level]
                units = np.asarray(member.expected_units(product, dates, price),
                                   dtype=np.float64)
                profit = (price - cost) * units
                better = profit > value  # a tie keeps the level found first
                best[m, better], value[better] = level[better], profit[better]
    prices = np.take_along_axis(grid, best.T, axis=1)  # (n, members)
    lowest, highest = prices.min(axis=1), prices.max(axis=1)
    agree = (((best > 0) & (best < levels - 1)).all(axis=0)
             & (highest - lowest <= agreement * np.median(prices, axis=1)))
    keep = agree & (product < low.size)
    # A product keeps the widest interval agreed on any of its days (and splits).
    np.fmin.at(low, product[keep], lowest[keep])
    np.fmax.at(high, product[keep], highest[keep])


def decision_demand(point: Any, ensemble: DemandEnsemble | None, quantile: float | None) -> Any:
    """What prices are chosen on: the ensemble's ``quantile`` when both are given, else the
    point fit."""
    if ensemble is None or quantile is None:
        return point
    return QuantileDemand(ensemble, quantile, point)
