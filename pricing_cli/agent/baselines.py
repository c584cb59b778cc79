"""The baseline pricing policies the agent is compared with.

Every policy is one price per row of ``meta_{split}.parquet`` (rows ordered by
``product_index``, then ``date``), so evaluate scores all of them the same way. The policies
that move on the price grid (static, greedy, planner, random) obey the agent's rules: a price is
one of the product's K levels (:func:`pricing.price_grid`), is feasible from the policy's *own*
previous price (:func:`pricing.feasible_mask`) and lies in the run's trust region
(:func:`pricing.restrict_to_trust_region`, when :attr:`SplitMeta.trust_region` is set). Day
one of the split is feasible from the last historical price before the split (see
:meth:`SplitMeta.day_one_mask`).

Everything is vectorized across products: the sequential policies loop over days, never over
products x days.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pricing_cli.agent.reference import reference_of
from pricing_cli.errors import BatchError
from pricing_cli.pricing import (
    apply_rule_levels,
    feasible_mask,
    is_price_change,
    price_grid,
    random_feasible_levels,
    restrict_to_trust_region,
    trust_region_of,
    within_daily_change,
)

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.agent.processed import ProcessedData


class DemandLike(Protocol):
    """Anything that predicts expected units sold (the fitted DemandModel, or a test stand-in)."""

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class SplitMeta:
    """The rows of one processed split as numpy arrays, plus what day one is feasible from.

    Row arrays have shape (n,) and follow ``meta_{split}.parquet``. A *series* is one product's
    consecutive rows; series arrays have shape (n_series,).

    Attributes:
        product_index: processed product index (int64).
        product_id: product id strings (object).
        date: datetime64[D].
        price, units, unit_cost, min_price, max_price: float64, as in meta.
        first_day_mask: (n_series, K) int8, the processed ``price_level`` mask of each series'
            first row (feasibility from the last historical price before the split).
        prev_price: (n_series,) last historical price before the split, NaN where unknown
            (the train split, or a product whose history starts inside the split).
        trust_region: (lower, upper), each (n_series,): the prices the grid policies may
            choose (NaN: no limit); None: the whole grid.
        rule_levels: (n, K) bool levels the merchant rules allow on each row
            (guardrails.row_rule_levels); None: no rule.
        start_reference: (n_series,) each series' reference price on its first day, for a
            demand model with a reference-price effect (reference.start_references); None:
            memoryless scoring and policies.
    """

    product_index: np.ndarray
    product_id: np.ndarray
    date: np.ndarray
    price: np.ndarray
    units: np.ndarray
    unit_cost: np.ndarray
    min_price: np.ndarray
    max_price: np.ndarray
    first_day_mask: np.ndarray
    prev_price: np.ndarray
    trust_region: tuple[np.ndarray, np.ndarray] | None = None
    rule_levels: np.ndarray | None = None
    start_reference: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.product_index.shape[0])

    @functools.cached_property
    def series_start(self) -> np.ndarray:
        """Row index of each series' first row."""
        return series_starts(self.product_index)

    @functools.cached_property
    def series_length(self) -> np.ndarray:
        return np.diff(np.append(self.series_start, self.n_rows))

    @functools.cached_property
    def series_of_row(self) -> np.ndarray:
        """Which series each row belongs to."""
        return np.repeat(np.arange(self.series_start.size), self.series_length)

    @functools.cached_property
    def grid(self) -> np.ndarray:
        """(n_series, K) candidate prices; min/max price are per product, so per series."""
        levels = self.first_day_mask.shape[1]
        start = self.series_start
        return price_grid(self.min_price[start], self.max_price[start], levels)

    def rows_on_day(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        """(series, rows) of every series that has a ``day``-th row (0 = its first)."""
        series = np.flatnonzero(self.series_length > day)
        return series, self.series_start[series] + day

    def trusted(self, series: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` ((len(series), K) or (len(series), K, K) with the target level last)
        restricted to each series' trust region (unchanged without one)."""
        if self.trust_region is None:
            return mask
        lower, upper = self.trust_region
        extra = (None,) * (mask.ndim - 2)  # a transition mask has one more axis
        grid = np.broadcast_to(self.grid[series][(slice(None), *extra, slice(None))],
                               mask.shape)
        index = (slice(None), *extra)
        return restrict_to_trust_region(mask, grid, lower[series][index],
                                        upper[series][index])[0]

    def day_one_mask(self, max_daily_change: float) -> np.ndarray:
        """(n_series, K) levels feasible on each series' first day.

        From the known previous price with the shared rule where there is one, so choosing and
        counting violations agree exactly; otherwise the processed mask row.
        """
        mask = self.first_day_mask.astype(np.int8, copy=True)
        known = np.isfinite(self.prev_price)
        if known.any():
            mask[known] = feasible_mask(self.grid[known], self.prev_price[known],
                                        max_daily_change)[0]
        if self.rule_levels is None:
            return mask
        previous = np.where(known, self.prev_price, self.price[self.series_start])
        return apply_rule_levels(mask, self.rule_levels[self.series_start], self.grid, previous)


def series_starts(product_index: np.ndarray) -> np.ndarray:
    """Row index where each product's run of rows begins (rows grouped by product)."""
    if product_index.size == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(product_index.size, dtype=bool)
    new[1:] = product_index[1:] != product_index[:-1]
    return np.flatnonzero(new)


def _check_order(product_index: np.ndarray, date: np.ndarray, source: str) -> None:
    """Raise BatchError unless rows are ordered by product_index, then strictly by date."""
    if product_index.size < 2:
        return
    step_product = np.diff(product_index)
    same = step_product == 0
    bad = (step_product < 0) | (same & (np.diff(date) <= np.timedelta64(0, "D")))
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise BatchError(
            f"{source}: row {row} is out of order (rows must be sorted by product_index, then "
            f"date, one row per product-day)",
            "Re-run `pricectl merge` to rebuild the processed split.",
        )


def load_split_meta(processed_dir: ProcessedData | str | Path, split: str,
                    closed: Any = None) -> SplitMeta:
    """``meta_{split}.parquet`` and ``masks_{split}.npz`` as a :class:`SplitMeta`, read
    through the processed folder's one reader (agent/processed.py; pass the run's reader so
    nothing is read twice).

    The price before day one is :meth:`ProcessedData.last_prices_before`, the rule the env
    starts from too. ``closed`` (``data.closed_days.ClosedDays``): rows on those days are left
    out, as :func:`env.load_market` leaves them out.

    Raises:
        MissingInputError: the processed split does not exist.
        BatchError: the meta and masks disagree, or rows are out of order.
    """
    import polars as pl

    from pricing_cli.agent.processed import as_processed

    processed = as_processed(processed_dir)
    meta_path = processed.folder / f"meta_{split}.parquet"
    frame = processed.meta(split)
    missing = {"product_index", "product_id", "date", "price", "units", "unit_cost", "min_price",
               "max_price"} - set(frame.columns)
    if missing:
        raise BatchError(f"{meta_path} lacks column(s) {sorted(missing)}",
                         "Re-run `pricectl merge` to rebuild the processed split.")
    product_index = frame["product_index"].to_numpy().astype(np.int64)
    date = frame["date"].to_numpy().astype("datetime64[D]")
    _check_order(product_index, date, str(meta_path))
    level_mask = processed.masks(split)
    if level_mask.shape[0] != frame.height:
        raise BatchError(f"{processed.folder / f'masks_{split}.npz'} has {level_mask.shape[0]} "
                         f"rows but {meta_path} has {frame.height}",
                         "Re-run `pricectl merge` to rebuild the split.")
    from pricing_cli.data.closed_days import open_rows

    keep = open_rows(date, closed)
    if keep is not None:
        frame, level_mask = frame[keep], level_mask[keep]
        product_index, date = product_index[keep], date[keep]

    def floats(name: str) -> np.ndarray:
        return frame[name].cast(pl.Float64).to_numpy()

    product_id = frame["product_id"].to_numpy().astype(object)
    start = series_starts(product_index)
    return SplitMeta(product_index, product_id, date, floats("price"), floats("units"),
                     floats("unit_cost"), floats("min_price"), floats("max_price"),
                     first_day_mask=np.ascontiguousarray(level_mask[start]),
                     prev_price=processed.last_prices_before(split, product_id[start]))


def sold_price_range(processed_dir: ProcessedData | str | Path, n_products: int,
                     splits: tuple[str, ...] = ("train", "val")) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) price per product_index over the rows of ``splits`` that sold (units > 0);
    NaN for a product that never sold there. What the trust region is built from."""
    import polars as pl

    from pricing_cli.agent.processed import as_processed

    processed = as_processed(processed_dir)
    low, high = np.full(n_products, np.nan), np.full(n_products, np.nan)
    parts = [processed.meta(s, ["product_index", "price", "units"]) for s in splits
             if processed.has_split(s)]
    if not parts:
        return low, high
    table = (pl.concat(parts)
             .filter((pl.col("units") > 0) & (pl.col("price") > 0))
             .group_by("product_index")
             .agg(pl.col("price").min().alias("low"), pl.col("price").max().alias("high")))
    index = table["product_index"].to_numpy().astype(np.int64)
    keep = index < n_products
    low[index[keep]] = table["low"].to_numpy()[keep]
    high[index[keep]] = table["high"].to_numpy()[keep]
    return low, high


# Days of history whose median price is a product's regular price now (recent_regular_price):
# a 5-day promotion cannot move a 29-day median, a list-price change 15 days old has.
RECENT_REGULAR_DAYS = 29


def recent_regular_price(processed_dir: ProcessedData | str | Path, n_products: int,
                         splits: tuple[str, ...] = ("train", "val")) -> np.ndarray:
    """The median price of each product over its last RECENT_REGULAR_DAYS days with a price
    in ``splits`` (NaN for a product without any): the price it is regularly sold at now, the
    status quo the trust region holds a product to where its sales look capped."""
    import polars as pl

    from pricing_cli.agent.processed import as_processed

    processed = as_processed(processed_dir)
    out = np.full(n_products, np.nan)
    parts = [processed.meta(s, ["product_index", "date", "price"]) for s in splits
             if processed.has_split(s)]
    if not parts:
        return out
    return regular_price_now(pl.concat(parts), n_products)


def regular_price_now(frame: pl.DataFrame, n_products: int) -> np.ndarray:
    """:func:`recent_regular_price` of the rows of ``frame`` (product_index, date, price)."""
    import polars as pl

    out = np.full(n_products, np.nan)
    table = (frame.filter(pl.col("price") > 0).sort("product_index", "date")
             .group_by("product_index")
             .agg(pl.col("price").tail(RECENT_REGULAR_DAYS).median().alias("regular")))
    index = table["product_index"].to_numpy().astype(np.int64)
    keep = index < n_products
    out[index[keep]] = table["regular"].to_numpy()[keep]
    return out


# ----------------------------------------------------------------------------------------------
# Policies


def series_bounds(meta: SplitMeta, trust_region: tuple[np.ndarray, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of each series from bounds by product index (NaN, no limit, for a
    product index beyond them)."""
    return trust_region_of(trust_region, meta.product_index[meta.series_start])


def historical_prices(meta: SplitMeta) -> np.ndarray:
    """The prices actually charged (meta ``price``)."""
    return meta.price.copy()


def _level_profits(meta: SplitMeta, demand: DemandLike, rows: np.ndarray,
                   grid: np.ndarray) -> np.ndarray:
    """(len(rows), K) expected profit of every candidate level of ``grid`` on ``rows``."""
    levels = grid.shape[1]
    units = demand.expected_units(np.repeat(meta.product_index[rows], levels),
                                  np.repeat(meta.date[rows], levels), grid.ravel())
    units = np.asarray(units, dtype=np.float64).reshape(grid.shape)
    return (grid - meta.unit_cost[rows, None]) * units


def static_prices(meta: SplitMeta, demand: DemandLike, K: int,
                  max_daily_change: float) -> np.ndarray:
    """The best single price per product over the split under ``demand``.

    Searches the product's K grid levels that are feasible on day one (so holding the price
    never breaks the daily-change rule) and keeps the one with the largest summed expected
    profit over the split. Ties go to the lower price.
    """
    _check_levels(meta, K)
    if meta.n_rows == 0:
        return np.zeros(0)
    start = meta.series_start
    total = np.zeros(meta.grid.shape)
    # One call per level over every row keeps memory at n floats, whatever K is.
    for level in range(K):
        prices = meta.grid[meta.series_of_row, level]
        units = np.asarray(demand.expected_units(meta.product_index, meta.date, prices),
                           dtype=np.float64)
        total[:, level] = np.add.reduceat((prices - meta.unit_cost) * units, start)
    all_series = np.arange(start.size)
    total[meta.trusted(all_series, meta.day_one_mask(max_daily_change)) == 0] = -np.inf
    if meta.rule_levels is not None:  # held all split long: allowed on every day
        total[~np.logical_and.reduceat(meta.rule_levels, start, axis=0)] = -np.inf
    best = total.argmax(axis=1)
    return meta.grid[meta.series_of_row, best[meta.series_of_row]]


def _walk_grid(meta: SplitMeta, K: int, max_daily_change: float,
               choose: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
               *, by_date: bool = False, series: np.ndarray | None = None,
               prices: np.ndarray | None = None) -> np.ndarray:
    """Run a day-by-day grid policy for every product at once.

    ``choose(series, rows, mask, previous)`` returns the level index for each active series
    given its feasibility mask (from its own previous price; from
    :meth:`SplitMeta.day_one_mask` on day one) and that previous price (NaN where unknown).

    Each call decides the t-th row of every series (``by_date`` False), or every row of one
    calendar date (``by_date``: what a joint category-day choice needs, since series may start
    on different dates). ``series``: walk only these series (the others' rows keep
    ``prices``, which the walk fills in place when given).
    """
    _check_levels(meta, K)
    prices = np.zeros(meta.n_rows) if prices is None else prices
    if meta.n_rows == 0:
        return prices
    first_mask = meta.day_one_mask(max_daily_change)
    for active, rows in _batches(meta, by_date, series):
        grid = meta.grid[active]
        first = rows == meta.series_start[active]
        previous = np.where(first, meta.prev_price[active], prices[np.maximum(rows - 1, 0)])
        if first.all():
            mask = first_mask[active]
        else:
            mask = feasible_mask(grid, previous, max_daily_change)[0]
            if meta.rule_levels is not None:
                mask = apply_rule_levels(mask, meta.rule_levels[rows], grid, previous)
            mask[first] = first_mask[active[first]]
        level = choose(active, rows, meta.trusted(active, mask), previous)
        prices[rows] = grid[np.arange(active.size), level]
    return prices


def _batches(meta: SplitMeta, by_date: bool, only: np.ndarray | None
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(series, rows) decided together by :func:`_walk_grid`, in walking order."""
    keep = None
    if only is not None:
        keep = np.zeros(meta.series_start.size, dtype=bool)
        keep[only] = True
    out = []
    if by_date:
        order = np.argsort(meta.date, kind="stable")
        cuts = np.flatnonzero(np.diff(meta.date[order].astype(np.int64))) + 1
        for rows in np.split(order, cuts):
            if keep is not None:
                rows = rows[keep[meta.series_of_row[rows]]]
            if rows.size:
                out.append((meta.series_of_row[rows], rows))
        return out
    for day in range(int(meta.series_length.max())):
        series, rows = meta.rows_on_day(day)
        if keep is not None:
            chosen = keep[series]
            series, rows = series[chosen], rows[chosen]
        if rows.size:
            out.append((series, rows))
    return out


# ----------------------------------------------------------------------------------------------
# Joint pricing of a category-day (a fitted cross-price term)

# Coordinate-ascent rounds at most (each round visits every product of a category once); the
# ascent stops as soon as a round moves no product. A move must gain more than JOINT_TOLERANCE
# (relative) of the category's profit, so ties never cycle.
JOINT_MAX_ROUNDS = 8
JOINT_TOLERANCE = 1e-9


def prices_jointly(demand: Any) -> bool:
    """Whether ``demand`` links a product's demand to its siblings' prices (a nonzero fitted
    ``cross_price`` and a ``product_category``): then greedy and the planner price each
    category jointly; otherwise every product alone, exactly as before."""
    return bool(getattr(demand, "cross_price", None)) and getattr(
        demand, "product_category", None) is not None


@dataclass(frozen=True)
class CategoryDays:
    """How the rows of a split group into category-days.

    Attributes:
        group: (n,) category-day id of each row, -1 for a product without a category.
        rank: (n,) the product's rank among its category's products in the split (products
            of equal rank in different categories move at the same time; -1: no category).
        shared: (n,) the row has a sibling that day.
    """

    group: np.ndarray
    rank: np.ndarray
    shared: np.ndarray

    @classmethod
    def of(cls, meta: SplitMeta, demand: Any) -> CategoryDays:
        return cls.of_rows(meta.product_index, meta.date, demand.product_category)

    @classmethod
    def of_rows(cls, product: np.ndarray, dates: np.ndarray, product_category: np.ndarray
                ) -> CategoryDays:
        """The grouping of rows (product index, date), with ``product_category`` (by product
        index, -1 for none; a product beyond it has none)."""
        table = np.asarray(product_category, dtype=np.int64)
        product = np.asarray(product, dtype=np.int64)
        known = product < table.size
        category = np.full(product.size, -1, dtype=np.int64)
        category[known] = table[product[known]]
        has = category >= 0
        group = np.full(product.size, -1, dtype=np.int64)
        rank = np.full(product.size, -1, dtype=np.int64)
        if has.any():
            day = np.asarray(dates).astype("datetime64[D]").astype(np.int64)
            key = category[has] * (int(day.max() - day.min()) + 1) + (day[has] - day.min())
            group[has] = np.unique(key, return_inverse=True)[1].reshape(-1)
            # Rank of each product among its category's products in the rows.
            products, first = np.unique(product[has], return_index=True)
            cats = category[has][first]
            order = np.lexsort((products, cats))
            new_block = np.r_[True, cats[order][1:] != cats[order][:-1]]
            block_start = np.maximum.accumulate(np.where(new_block, np.arange(order.size), 0))
            product_rank = np.empty(order.size, dtype=np.int64)
            product_rank[order] = np.arange(order.size) - block_start
            rank[has] = product_rank[np.searchsorted(products, product[has])]
        size = np.bincount(group[has]) if has.any() else np.zeros(1, dtype=np.int64)
        shared = has & (size[np.maximum(group, 0)] > 1)
        return cls(group, rank, shared)


def category_level_profits(demand: Any, product: np.ndarray, dates: np.ndarray,
                           prices: np.ndarray, unit_cost: np.ndarray, group: np.ndarray,
                           acting: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(len(acting), K) the category-day's expected profit when acting row i takes each level
    of ``grid[i]`` and every other row keeps ``prices``: the row's own profit (its category
    price index from its siblings' prices) plus its siblings' profits (their index moved by
    the row's price).

    Args:
        product, dates, prices, unit_cost, group: per row of the rows considered together
            (group: category-day id, -1 for none; at most one acting row per group).
        acting: indices of the rows that move.
        grid: (len(acting), K) their candidate prices.
    """
    levels = grid.shape[1]
    reference = np.asarray(demand.reference_price, dtype=np.float64)
    log_rel = np.log(prices / reference[product])
    has = group >= 0
    gid = np.where(has, group, 0)
    n_groups = int(gid.max()) + 1 if gid.size else 1
    size = np.bincount(gid[has], minlength=n_groups)
    total = np.bincount(gid[has], log_rel[has], minlength=n_groups)
    g_act = gid[acting]
    others = np.where(has[acting], size[g_act] - 1, 0)
    own_index = np.where(others > 0, (total[g_act] - log_rel[acting]) / np.maximum(others, 1),
                         0.0)
    units = demand.expected_units(np.repeat(product[acting], levels),
                                  np.repeat(dates[acting], levels), grid.ravel(),
                                  category_index=np.repeat(own_index, levels))
    out = (grid - unit_cost[acting, None]) * np.asarray(units, dtype=np.float64).reshape(
        grid.shape)
    slot = np.full(n_groups, -1, dtype=np.int64)
    slot[g_act[has[acting]]] = np.flatnonzero(has[acting])
    is_acting = np.zeros(len(product), dtype=bool)
    is_acting[acting] = True
    pair_s = np.flatnonzero(has & ~is_acting & (slot[gid] >= 0))
    if pair_s.size == 0:
        return out
    pair_a = slot[gid[pair_s]]
    rest = (total[gid[pair_s]] - log_rel[pair_s] - log_rel[acting[pair_a]])[:, None]
    grid_rel = np.log(grid / reference[product[acting]][:, None])
    index = (rest + grid_rel[pair_a]) / (size[gid[pair_s]] - 1)[:, None]
    sibling = demand.expected_units(np.repeat(product[pair_s], levels),
                                    np.repeat(dates[pair_s], levels),
                                    np.repeat(prices[pair_s], levels),
                                    category_index=index.ravel())
    sibling = np.asarray(sibling, dtype=np.float64).reshape(pair_s.size, levels)
    np.add.at(out, pair_a, (prices[pair_s] - unit_cost[pair_s])[:, None] * sibling)
    return out


def _improves(value: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best level, whether it beats the current level by more than the tolerance)."""
    best = value.argmax(axis=1)
    rows = np.arange(value.shape[0])
    now = value[rows, current]
    gain = value[rows, best] - now
    return best, gain > JOINT_TOLERANCE * np.maximum(np.abs(np.where(np.isfinite(now), now,
                                                                    0.0)), 1.0)


def joint_levels(demand: Any, product: np.ndarray, dates: np.ndarray, grid: np.ndarray,
                 unit_cost: np.ndarray, categories: CategoryDays, rows: np.ndarray,
                 allowed: np.ndarray, start: np.ndarray,
                 charges: np.ndarray | float = 0.0) -> np.ndarray:
    """Levels of ``rows`` (rows of the split decided together: one date) by coordinate ascent
    on each category-day's profit: from ``start``, each product in turn (products of the same
    rank in every category at once) moves to the allowed level that maximises its
    category-day's profit net of its own ``charges`` (:func:`category_level_profits`), until a
    round moves no product (at most JOINT_MAX_ROUNDS). Every move raises the category's
    profit, so it ends at a choice no single product can improve.

    Args:
        grid, allowed, start, charges: (len(rows), K) / (len(rows),) per row of ``rows``.
    """
    levels = np.asarray(start, dtype=np.int64).copy()
    shared = categories.shared[rows]
    if not shared.any():
        return levels
    at = np.arange(rows.size)
    prices = grid[at, levels]
    group, rank = categories.group[rows], categories.rank[rows]
    charges = np.broadcast_to(charges, grid.shape)
    ranks = np.unique(rank[shared])
    for _ in range(JOINT_MAX_ROUNDS):
        moved = False
        for j in ranks.tolist():
            acting = np.flatnonzero(shared & (rank == j))
            value = category_level_profits(demand, product, dates, prices, unit_cost, group,
                                           acting, grid[acting]) - charges[acting]
            value = np.where(allowed[acting] == 1, value, -np.inf)
            best, better = _improves(value, levels[acting])
            if better.any():
                moved = True
                levels[acting[better]] = best[better]
                prices[acting[better]] = grid[acting[better], best[better]]
        if not moved:
            break
    return levels


def change_charges(meta: SplitMeta, change_cost: np.ndarray | None, grid: np.ndarray,
                   series: np.ndarray, previous: np.ndarray) -> np.ndarray | float:
    """(len(series), K) what choosing each level costs in price-change cost, given the
    previous prices (0 where the level holds the price or the previous price is unknown)."""
    if change_cost is None:
        return 0.0
    cost = change_cost[meta.product_index[meta.series_start[series]]]
    return np.where(is_price_change(grid, previous[:, None]), cost[:, None], 0.0)


def greedy_prices(meta: SplitMeta, demand: DemandLike, K: int, max_daily_change: float,
                  change_cost: np.ndarray | None = None) -> np.ndarray:
    """Each day's most profitable feasible level under ``demand`` (myopic; ties: lower price).

    With ``change_cost`` ((n_products,) money per price change, by product index), today's
    profit is net of it: greedy moves only when today's gain pays for the change.

    With a fitted cross-price term (:func:`prices_jointly`), each category-day is priced
    jointly: from every product's own best level, :func:`joint_levels` maximises the
    category's profit (a product's own and its effect on its siblings' demand) under the same
    masks. Without one, every product is priced alone.

    A model with a reference-price effect: :func:`greedy_prices_with_reference`.
    """
    if _with_reference(meta, demand):
        return greedy_prices_with_reference(meta, demand, K, max_daily_change, change_cost)
    joint = prices_jointly(demand)
    categories = CategoryDays.of(meta, demand) if joint else None

    def choose(series: np.ndarray, rows: np.ndarray, mask: np.ndarray,
               previous: np.ndarray) -> np.ndarray:
        grid = meta.grid[series]
        charges = change_charges(meta, change_cost, grid, series, previous)
        profit = _level_profits(meta, demand, rows, grid) - charges
        level = np.where(mask == 1, profit, -np.inf).argmax(axis=1)
        if categories is None:
            return level
        return joint_levels(demand, meta.product_index[rows], meta.date[rows], grid,
                            meta.unit_cost[rows], categories, rows, mask, level, charges)

    return _walk_grid(meta, K, max_daily_change, choose, by_date=joint)


def planned_prices(meta: SplitMeta, demand: DemandLike, K: int, max_daily_change: float,
                   change_cost: np.ndarray | None = None, *, chunk: int = 512) -> np.ndarray:
    """The most profitable feasible price path of each product over the whole split under
    ``demand``: dynamic programming over days and grid levels, with the daily-change rule as
    the only link between days, and ``change_cost`` ((n_products,) money per price change, as
    in :func:`greedy_prices`) charged on every move.

    This is the best any grid policy can earn in the world the agent trains in (the fitted
    model), so it bounds what RL can add over ``greedy``: when it equals greedy, the myopic
    choice is already optimal and planning has nothing to gain. Ties: lower price.

    With a fitted cross-price term (:func:`prices_jointly`): block coordinate ascent over
    whole paths. From every product's own plan, the products of each rank (one per category)
    are re-planned in turn with every day's level worth its category-day's profit given the
    siblings' current paths (:func:`category_level_profits`); a new path is kept only when it
    raises the category's profit, and a round that keeps none ends the ascent.

    Memory: (n_rows, K) float64 of values-to-go, plus (``chunk``, K, K) per day.
    A model with a reference-price effect: the DP over (level, reference) of
    :func:`planned_prices_with_reference`.
    """
    if _with_reference(meta, demand):
        return planned_prices_with_reference(meta, demand, K, max_daily_change, change_cost)
    _check_levels(meta, K)
    if meta.n_rows == 0:
        return np.zeros(0)

    def own(rows: np.ndarray, series: np.ndarray) -> np.ndarray:
        return _level_profits(meta, demand, rows, meta.grid[series])

    prices = _plan(meta, K, max_daily_change, change_cost, own, None, chunk)
    if not prices_jointly(demand):
        return prices
    categories = CategoryDays.of(meta, demand)
    series_rank = categories.rank[meta.series_start]
    series_shared = np.logical_or.reduceat(categories.shared, meta.series_start)
    grid_rows = meta.grid[meta.series_of_row]
    for _ in range(JOINT_MAX_ROUNDS):
        moved = False
        for j in np.unique(series_rank[series_shared]).tolist():
            series = np.flatnonzero(series_shared & (series_rank == j))
            acting = np.concatenate([np.arange(meta.series_start[s],
                                               meta.series_start[s] + meta.series_length[s])
                                     for s in series])
            table = np.empty((meta.n_rows, K))
            table[acting] = category_level_profits(
                demand, meta.product_index, meta.date, prices, meta.unit_cost,
                categories.group, acting, grid_rows[acting])
            planned = _plan(meta, K, max_daily_change, change_cost,
                            functools.partial(_table_rows, table), series, chunk,
                            prices=prices.copy())
            for s in series.tolist():  # keep a path only when it earns more
                rows = np.arange(meta.series_start[s], meta.series_start[s] + meta.series_length[s])
                if (_path_value(meta, table, rows, planned, change_cost)
                        > _path_value(meta, table, rows, prices, change_cost)
                        + JOINT_TOLERANCE * max(abs(_path_value(meta, table, rows, prices,
                                                                change_cost)), 1.0)):
                    prices[rows] = planned[rows]
                    moved = True
        if not moved:
            break
    return prices


def _table_rows(table: np.ndarray, rows: np.ndarray, _series: np.ndarray) -> np.ndarray:
    return table[rows]


def _path_value(meta: SplitMeta, table: np.ndarray, rows: np.ndarray, prices: np.ndarray,
                change_cost: np.ndarray | None) -> float:
    """A series' summed ``table`` value along ``prices`` (rows of one series), net of its
    price-change costs (its first day: from the known previous price)."""
    grid = meta.grid[meta.series_of_row[rows]]
    level = np.abs(grid - prices[rows, None]).argmin(axis=1)
    value = float(table[rows, level].sum())
    if change_cost is not None:
        previous = np.r_[meta.prev_price[meta.series_of_row[rows[0]]], prices[rows[:-1]]]
        moves = is_price_change(prices[rows], previous)
        value -= float(change_cost[meta.product_index[rows[0]]] * moves.sum())
    return value


def _plan(meta: SplitMeta, K: int, max_daily_change: float, change_cost: np.ndarray | None,
          profit: Callable[[np.ndarray, np.ndarray], np.ndarray], only: np.ndarray | None,
          chunk: int, prices: np.ndarray | None = None) -> np.ndarray:
    """The DP of :func:`planned_prices` with each row's level profits ``profit(rows,
    series)``, over the series ``only`` (None: all), then its walk (into ``prices``)."""
    value = np.empty((meta.n_rows, K))  # profit from this row on, if it takes level j
    for series, rows in reversed(_batches(meta, False, only)):
        day = int(rows[0] - meta.series_start[series[0]])
        grid = meta.grid[series]
        to_go = profit(rows, series)
        going = np.nonzero(meta.series_length[series] > day + 1)[0]
        for start in range(0, len(going), chunk):
            part = going[start:start + chunk]
            g = grid[part]
            # allowed[s, j, k]: from level j today to level k tomorrow (pricing.feasible_mask's
            # rule; a level can always be held, so no row is ever all-infeasible).
            allowed = within_daily_change(g[:, None, :], g[:, :, None], max_daily_change)
            if meta.rule_levels is not None:  # tomorrow's merchant rules
                allowed &= meta.rule_levels[rows[part] + 1][:, None, :]
            allowed = meta.trusted(series[part], allowed).astype(bool)
            tomorrow = value[rows[part] + 1][:, None, :]
            if change_cost is not None:
                moves = is_price_change(g[:, None, :], g[:, :, None])
                cost = change_cost[meta.product_index[rows[part]]]
                tomorrow = tomorrow - np.where(moves, cost[:, None, None], 0.0)
            best = np.where(allowed, tomorrow, -np.inf).max(axis=2)
            # A level a merchant rule leaves no way out of is a dead end, not -inf: the walk
            # may still have to take it (apply_rule_levels' nearest allowed level).
            to_go[part] += np.where(np.isfinite(best), best, -1e18)
        value[rows] = to_go

    def choose(series: np.ndarray, rows: np.ndarray, mask: np.ndarray,
               previous: np.ndarray) -> np.ndarray:
        grid = meta.grid[series]
        net = value[rows] - change_charges(meta, change_cost, grid, series, previous)
        return np.where(mask == 1, net, -np.inf).argmax(axis=1)

    return _walk_grid(meta, K, max_daily_change, choose, series=only, prices=prices)


def _with_reference(meta: SplitMeta, demand: DemandLike) -> bool:
    """Whether ``demand`` has a reference-price effect and ``meta`` the starting reference
    its policies roll forward from."""
    return meta.start_reference is not None and reference_of(demand) is not None


def random_feasible_prices(meta: SplitMeta, K: int, max_daily_change: float,
                           seed: int) -> np.ndarray:
    """A uniformly random feasible level each day (the floor any policy should beat):
    ``pricing.random_feasible_levels``, as the env's random policy draws."""
    rng = np.random.default_rng(seed)

    def choose(series: np.ndarray, rows: np.ndarray, mask: np.ndarray,
               previous: np.ndarray) -> np.ndarray:
        return random_feasible_levels(rng, mask)

    return _walk_grid(meta, K, max_daily_change, choose)


def oracle_prices(meta: SplitMeta, ground_truth: Any, truth_index: np.ndarray) -> np.ndarray:
    """The true optimum within [min_price, max_price] (continuous, no daily limit):
    ``market.true_optimum`` (per day; joint per category-day with substitution; a DP over the
    reference with reference prices; given the day's stock with stock-outs).

    Args:
        ground_truth: a loaded ``market.GroundTruth``.
        truth_index: (n,) the ground truth's product index of every row
            (see :func:`ground_truth_index`).
    """
    from pricing_cli.data.market import true_optimum

    prices = np.asarray(true_optimum(ground_truth, truth_index, meta.date), dtype=np.float64)
    return np.clip(prices, meta.min_price, meta.max_price)


def ground_truth_index(meta: SplitMeta, truth_product_ids: dict[str, int]) -> np.ndarray | None:
    """The ground truth's product index of every row, through product_id; None on a mismatch.

    The ground truth numbers products its own way, so the processed product_index cannot be
    used directly.
    """
    start = meta.series_start
    mapped = [truth_product_ids.get(str(pid)) for pid in meta.product_id[start]]
    if any(index is None for index in mapped):
        return None
    return np.asarray(mapped, dtype=np.int64)[meta.series_of_row]


def _check_levels(meta: SplitMeta, K: int) -> None:
    if meta.first_day_mask.shape[1] != K:
        raise BatchError(
            f"the processed masks have {meta.first_day_mask.shape[1]} price levels, expected {K}",
            "Re-run `pricectl preprocess` and `pricectl merge` with the same price_levels.")


# ----------------------------------------------------------------------------------------------
# Grid policies under a reference-price effect (reference.py holds the effect itself)

# Reference grid points of the planner's DP (between the lowest and highest grid price).
PLANNER_REFERENCE_POINTS = 41
PLANNER_SERIES_PER_BLOCK = 256  # DP arrays (days, block, K, points) float32 per block


def _grid_units(meta: SplitMeta, demand: Any, rows: np.ndarray, grid: np.ndarray,
                reference: np.ndarray) -> np.ndarray:
    """(len(rows), K, M) expected profit at every level of ``grid`` (len(rows), K) against
    every reference of ``reference`` (len(rows), M)."""
    levels, points = grid.shape[1], reference.shape[1]
    shape = (len(rows), levels, points)
    units = demand.expected_units(
        np.repeat(meta.product_index[rows], levels * points),
        np.repeat(meta.date[rows], levels * points),
        np.broadcast_to(grid[:, :, None], shape).ravel(),
        reference=np.broadcast_to(reference[:, None, :], shape).ravel())
    units = np.asarray(units, dtype=np.float64).reshape(shape)
    return (grid[:, :, None] - meta.unit_cost[rows, None, None]) * units


def greedy_prices_with_reference(meta: SplitMeta, demand: Any, K: int, max_daily_change: float,
                                 change_cost: np.ndarray | None = None) -> np.ndarray:
    """:func:`baselines.greedy_prices` in the reference state: each day the most profitable
    feasible level given today's reference (myopic: blind to what the price does to
    tomorrow's reference), the reference then rolled forward with the level chosen."""

    effect = reference_of(demand)
    assert effect is not None and meta.start_reference is not None
    ref = np.asarray(meta.start_reference, dtype=np.float64).copy()

    def choose(series: np.ndarray, rows: np.ndarray, mask: np.ndarray,
               previous: np.ndarray) -> np.ndarray:
        grid = meta.grid[series]
        profit = (_grid_units(meta, demand, rows, grid, ref[series][:, None])[:, :, 0]
                  - change_charges(meta, change_cost, grid, series, previous))
        level = np.where(mask == 1, profit, -np.inf).argmax(axis=1)
        ref[series] = effect.next_reference(ref[series], grid[np.arange(series.size), level])
        return level

    return _walk_grid(meta, K, max_daily_change, choose)


def _interp(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values`` (s, K, M), given on each series' uniform grid of M
    references from lo to hi (s,), at references ``at`` (s, K, ...) (level k reads row k),
    clamped to the grid."""
    points = values.shape[2]
    flat = at.reshape(at.shape[0], at.shape[1], -1)
    span = np.maximum(hi - lo, 1e-12)[:, None, None]
    pos = np.clip((flat - lo[:, None, None]) / span * (points - 1), 0.0, points - 1.0)
    left = np.minimum(np.floor(pos).astype(np.intp), points - 2)
    frac = pos - left
    below = np.take_along_axis(values, left, axis=2)
    above = np.take_along_axis(values, left + 1, axis=2)
    return (below * (1.0 - frac) + above * frac).reshape(at.shape)


def planned_prices_with_reference(meta: SplitMeta, demand: Any, K: int, max_daily_change: float,
                                  change_cost: np.ndarray | None = None, *,
                                  points: int = PLANNER_REFERENCE_POINTS,
                                  per_block: int = PLANNER_SERIES_PER_BLOCK) -> np.ndarray:
    """:func:`baselines.planned_prices` over the state (price level, reference): the best price
    path of each series under the fitted reference model, from its known starting reference.

    Backward induction per day over the level held and a grid of ``points`` references
    spanning the series' grid prices and its starting reference (the value between grid
    references interpolated linearly): ``W_t(k, R) = profit_t(k, R) + U_{t+1}(k, R')`` with
    ``R' = (1 − a)·R + a·price_k`` and ``U_{t+1}(k, R) = max over the levels k' allowed from
    k tomorrow of W_{t+1}(k', R) − change cost``. Then a forward walk
    (:func:`baselines._walk_grid`, so day one, merchant rules and the trust region are as in
    every grid policy) that picks, from the exact reference, the level with the best
    ``profit − change cost + U_{t+1}(k, R')``. Ties: lower price.

    Memory: (days, ``per_block``, K, ``points``) float32 per block of series.
    """
    from pricing_cli.pricing import is_price_change

    effect = reference_of(demand)
    assert effect is not None and meta.start_reference is not None
    _check_levels(meta, K)
    if meta.n_rows == 0:
        return np.zeros(0)
    n_series = meta.series_start.size
    start_ref = np.asarray(meta.start_reference, dtype=np.float64)
    lo = np.minimum(meta.grid.min(axis=1), start_ref)
    hi = np.maximum(meta.grid.max(axis=1), start_ref)
    ref_grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, points)[None, :]
    # to_go[s] for series s: (length, K, points) U_{t}(k, R) for t = 1..length-1 (index t-1).
    to_go: list[np.ndarray] = [np.zeros((0, K, points), np.float32)] * n_series
    for block in range(0, n_series, per_block):
        series_all = np.arange(block, min(block + per_block, n_series))
        length = meta.series_length[series_all]
        horizon = int(length.max())
        u_next = np.zeros((series_all.size, K, points))  # U_{t+1}, 0 past the last day
        stored = np.zeros((horizon, series_all.size, K, points), np.float32)
        for day in reversed(range(horizon)):
            active = np.flatnonzero(length > day)
            series = series_all[active]
            rows = meta.series_start[series] + day
            grid = meta.grid[series]
            refs = ref_grid[series]
            profit = _grid_units(meta, demand, rows, grid, refs)  # (s, K, M)
            next_ref = effect.next_reference(refs[:, None, :], grid[:, :, None])  # (s, K, M)
            w = profit + _interp(u_next[active], lo[series], hi[series], next_ref)
            if day == 0:
                break
            # U_t(j, R) = max over k allowed from j (today's rules) of W_t(k, R) − cost.
            allowed = within_daily_change(grid[:, None, :], grid[:, :, None], max_daily_change)
            if meta.rule_levels is not None:
                allowed &= meta.rule_levels[rows][:, None, :]
            allowed = meta.trusted(series, allowed).astype(bool)
            candidate = np.broadcast_to(w[:, None, :, :], (len(series), K, K, points))
            if change_cost is not None:
                moves = is_price_change(grid[:, None, :], grid[:, :, None])
                cost = change_cost[meta.product_index[rows]]
                candidate = candidate - np.where(moves, cost[:, None, None], 0.0)[..., None]
            best = np.where(allowed[..., None], candidate, -np.inf).max(axis=2)
            best = np.where(np.isfinite(best), best, -1e18)  # a dead end, as in planned_prices
            u_next = np.zeros((series_all.size, K, points))
            u_next[active] = best
            stored[day, active] = best
        for i, s in enumerate(series_all.tolist()):
            to_go[s] = stored[1:length[i], i]
    ref = start_ref.copy()

    def choose(series: np.ndarray, rows: np.ndarray, mask: np.ndarray,
               previous: np.ndarray) -> np.ndarray:
        grid = meta.grid[series]
        day = rows - meta.series_start[series]
        profit = _grid_units(meta, demand, rows, grid, ref[series][:, None])[:, :, 0]
        net = profit - change_charges(meta, change_cost, grid, series, previous)
        next_ref = effect.next_reference(ref[series][:, None], grid)  # (s, K)
        later = np.zeros_like(net)
        has_next = np.flatnonzero(day + 1 < meta.series_length[series])
        if has_next.size:
            u = np.stack([to_go[int(s)][int(d)] for s, d in
                          zip(series[has_next], day[has_next], strict=True)]).astype(np.float64)
            later[has_next] = _interp(u, lo[series[has_next]], hi[series[has_next]],
                                      next_ref[has_next][:, :, None])[:, :, 0]
        level = np.where(mask == 1, net + later, -np.inf).argmax(axis=1)
        ref[series] = next_ref[np.arange(series.size), level]
        return level

    return _walk_grid(meta, K, max_daily_change, choose)


# ----------------------------------------------------------------------------------------------
# Fitting: the half-life on held-out train days
