"""The pricing environment: one product's days, priced by the agent, sold under the demand model.

A :class:`Market` is one split of ``data/processed`` made ready for simulation: the feature
matrix stays memory-mapped (``np.load(mmap_mode="r")``, one page cache shared by every reader),
and small per-row arrays (cost, bounds, historical prices, bit-packed processed masks) live in
memory, with the demand table: the demand model's expected units at each of the row's K
candidate prices, (n, K) float32, computed once by ``demand.units_on_grid`` through the model's
``expected_units`` (so any demand shape or an ensemble works; the env holds no demand formula).

:class:`EpisodeBatch` holds the state of many episodes at once and steps them in one numpy
operation; :class:`PriceEnv` (gymnasium, one episode) and :class:`PriceVecEnv` (SB3 VecEnv,
``n_envs`` episodes) are thin shells around it, and :func:`simulate` runs a policy over every
product of a split (used by evaluation and rollouts).

Observation: ``{"product_id": Box (1,), "features": Box (F + K + 3,)}`` (F + 2 + K + 3 in an
inventory market, below). The product is a Box
index, not Discrete, so SB3 does not one-hot it (7,000 products); the extractor embeds it.
The K forecast features are the demand model's expected profit at each candidate level
relative to the day's best level (1 at the best): the model's view of today, which the policy
would otherwise have to re-learn from the ladder and calendar features. The 3 endogenous
features come from the agent's own prices, so today's price shapes tomorrow's state:
log(last price / reference), days the last price has been held (scaled), and the last price's
position in [min_price, max_price].

Action: ``Discrete(K)``, a level of ``pricing.price_grid(min_price, max_price, K)``. Feasible
levels follow ``pricing.feasible_mask`` from the agent's previous price (on an episode's first
day: the processed mask of that row). An infeasible action (PPO without masks) is moved to the
nearest feasible level and counted.

Reward: ``((price - unit_cost) * units - change cost) * reward_scale``, units = the demand
model's expectation (or a Poisson draw with ``sample_demand``); the change cost is paid on a day
the price moves (``Market.change_cost``, zero by default: train.price_change_cost).

Reference prices: when the demand model has a reference-price effect (agent/reference.py),
every episode carries the product's reference price, starting from the historical one
(``Market.history_reference``: the EWMA of the historical prices before the row) and rolled
forward with the agent's own prices. Units are the demand table's times the effect's factor
at today's reference; the forecast columns are today's (myopic) profits at that reference; and
the first endogenous feature is log(last price / the reference state), the reference gap.

Inventory (a markdown market: ``load_market(stock=...)``, agent/inventory.py): each episode
carries its units on hand, from the history's on hand at its first row; a season's delivery
replaces what is left; sales are min(demand, on hand) (the expectation E[min(N, on hand)], or
a capped Poisson draw) and the stock carries from day to day; on a season's last day what is
left is sold off at the salvage value (its margin is added to that day's profit). Two stock
features follow the processed ones: the days of cover (on hand / the demand model's units at
the last price) and the days to the season's end, each min(days, 182) / 91.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from pricing_cli.agent.demand import units_on_grid
from pricing_cli.errors import BatchError
from pricing_cli.pricing import (
    apply_rule_levels,
    feasible_mask,
    is_price_change,
    nearest_level,
    price_grid,
    random_feasible_levels,
    restrict_to_trust_region,
)

if TYPE_CHECKING:
    from pricing_cli.agent.demand import DemandModel
    from pricing_cli.agent.processed import ProcessedData, ProcessedStats

ENDOGENOUS_FEATURES = ("own_log_price_vs_reference", "own_days_held", "own_price_position")
N_ENDOGENOUS = len(ENDOGENOUS_FEATURES)
HELD_DAYS_SCALE = 28.0  # days held are reported as min(days, 28) / 28
# Inventory markets only (Market.on_hand given): the stock state, between the processed
# features and the forecast columns (so the forecast stays the K columns before the
# endogenous ones, where the extractor reads it). Memoryless markets keep F + K + 3.
STOCK_FEATURES = ("days_of_cover", "days_to_season_end")
N_STOCK = len(STOCK_FEATURES)
# Both in days, reported as min(days, 2 x 91) / 91: a season is 91 days by default, and cover
# beyond two seasons says the same (far too much stock) as at two.
STOCK_DAYS_SCALE = 91.0
STOCK_DAYS_CLIP = 2.0 * STOCK_DAYS_SCALE
# Resident feature pages are dropped after this many rows were read (Market.release_pages):
# RSS stays bounded (16k rows x 4 KB = 64 MB at the full preset's width) at the cost of minor
# page faults from the page cache.
RELEASE_EVERY_ROWS = 16_384
OBSERVATION_BLOCK = 256  # rows per block when building a batch of observations
META_COLUMNS = ("product_index", "product_id", "date", "price", "unit_cost", "min_price",
                "max_price", "ref_price")

Observation = dict[str, np.ndarray]


def clip_to_feasible(levels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each level to the nearest feasible one (by grid index; ties go down).

    Returns:
        (levels int64, moved bool) of the batch's shape.
    """
    levels = np.asarray(levels, dtype=np.int64).reshape(-1)
    mask = np.asarray(mask, dtype=bool).reshape(len(levels), -1)
    moved = ~mask[np.arange(len(levels)), levels]
    if moved.any():
        distance = np.abs(np.arange(mask.shape[1])[None, :] - levels[moved, None]).astype(float)
        distance[~mask[moved]] = np.inf
        levels = levels.copy()
        levels[moved] = distance.argmin(axis=1)
    return levels, moved


@dataclass
class Market:
    """One split of the processed data, ready to simulate. Row order is the processed order."""

    split: str
    features: np.ndarray  # (n, F) float32, memory-mapped
    product_index: np.ndarray  # (n,) int64
    dates: np.ndarray  # (n,) datetime64[D]
    unit_cost: np.ndarray
    min_price: np.ndarray
    max_price: np.ndarray
    historical_price: np.ndarray
    previous_price: np.ndarray  # historical price the day before each row
    held_days: np.ndarray  # days the previous price had been held, before each row
    mask_bits: np.ndarray  # (n, ceil(K/8)) processed price_level masks, bit-packed
    units_table: np.ndarray  # (n, K) float32 expected units at each candidate level
    reference: np.ndarray  # reference price of the endogenous features
    product_end: np.ndarray  # (n,) first row after this row's product
    product_ids: dict[int, str]
    n_products: int
    price_levels: int
    max_daily_change: float
    # (n_products,) money lost per price change (train.price_change_cost x the product's
    # profit scale); zeros: changes are free.
    change_cost: np.ndarray | None = None
    # The model behind units_table, asked only for prices off the grid (e.g. history's).
    demand: Any = None
    # (lower, upper) by product index: the trust region every mask is restricted to
    # (pricing.restrict_to_trust_region; train.trust_region); None: the whole grid.
    trust_region: tuple[np.ndarray, np.ndarray] | None = None
    # (n, ceil(K/8)) bit-packed levels the merchant rules allow on each row (guardrails.py:
    # min_margin, max_above_competitor); None: no rule.
    rule_bits: np.ndarray | None = None
    # (n,) each row's row in the processed split (its row of X, labels, masks) when closed
    # days were left out (load_market's ``closed``); None: row i is split row i.
    split_rows: np.ndarray | None = None
    # The closed days left out (data/closed_days.ClosedDays), for readers of the same split.
    closed: Any = None
    # The demand model's reference-price effect (None: memoryless) and the reference before
    # each row along the historical prices (where episodes start from).
    reference_effect: Any = None
    history_reference: np.ndarray | None = None
    # Inventory (agent/inventory.py): (n,) units on hand at each row's opening (stock.csv;
    # NaN: unknown, no cap), (n,) whether a season's delivery arrives that morning (on_hand
    # then replaces what is left) and (n,) days to the season's last day, that day included.
    # None: sales are demand.
    on_hand: np.ndarray | None = None
    delivery: np.ndarray | None = None
    days_to_season_end: np.ndarray | None = None
    # (n,) money per unit left after a season's last day (days_to_season_end 1): salvage -
    # unit cost (agent/inventory.py, MarketStock); None: what is left is worth nothing.
    salvage_margin: np.ndarray | None = None
    # (M, n, K) float32: each demand-ensemble member's units_table (train.ensemble_rewards,
    # agent/learning.py); an episode's rewards come from one member drawn at its start, its
    # observation still from units_table. None: rewards from units_table.
    member_tables: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.change_cost is None:
            self.change_cost = np.zeros(self.n_products)
        # A plain ndarray view of the mapping (no copy): np.memmap's __getitem__ wraps every
        # gathered batch in a memmap subclass, which made row gathers 3x slower.
        self._rows: np.ndarray = np.asarray(self.features)
        self._rows_since_release = 0
        self._steps = np.linspace(0.0, 1.0, self.price_levels)  # as pricing.price_grid
        self._span = self.max_price - self.min_price
        # float32 copies for the per-step forecast (a float32 feature anyway).
        f32 = np.float32
        self._forecast_terms = (self.min_price.astype(f32), self._span.astype(f32),
                                self.unit_cost.astype(f32), self._steps.astype(f32))
        self._change_cost32 = np.asarray(self.change_cost, dtype=f32)
        self._charges_changes = bool(np.any(self._change_cost32 > 0))

    @property
    def n_rows(self) -> int:
        return len(self.product_index)

    @property
    def n_stock_features(self) -> int:
        """N_STOCK in an inventory market (``on_hand`` given), else 0."""
        return 0 if self.on_hand is None else N_STOCK

    @property
    def n_features(self) -> int:
        return (int(self.features.shape[1]) + self.n_stock_features + self.price_levels
                + N_ENDOGENOUS)

    def grid(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), K) candidate prices; the same arithmetic as pricing.price_grid (a test
        compares them), without rebuilding the level steps on every call."""
        return self.min_price[rows, None] + self._span[rows, None] * self._steps

    def prices(self, rows: np.ndarray, levels: np.ndarray) -> np.ndarray:
        return self.grid(rows)[np.arange(len(rows)), levels]

    def rule_levels(self, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), K) bool: the levels the merchant rules allow (None: no rule)."""
        if self.rule_bits is None:
            return None
        return np.unpackbits(self.rule_bits[rows], axis=1, count=self.price_levels).astype(bool)

    def processed_masks(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), K) bool: the processed price_level masks of these rows."""
        return np.unpackbits(self.mask_bits[rows], axis=1, count=self.price_levels).astype(bool)

    def expected_units(self, rows: np.ndarray, prices: np.ndarray) -> np.ndarray:
        """The demand model's expected units (float64) of these rows at these prices: read
        from the demand table where the price is a grid level, asked of the model otherwise.

        Raises:
            ValueError: a price is off the grid and the market holds no demand model.
        """
        rows = np.asarray(rows, dtype=np.int64)
        prices = np.asarray(prices, dtype=np.float64)
        span = np.where(self._span[rows] > 0, self._span[rows], 1.0)
        levels = np.clip(np.rint((prices - self.min_price[rows]) / span
                                 * (self.price_levels - 1)), 0, self.price_levels - 1)
        levels = levels.astype(np.int64)
        units = self.units_table[rows, levels].astype(np.float64)
        off_grid = self.prices(rows, levels) != prices
        if off_grid.any():
            if self.demand is None:
                raise ValueError("prices off the grid need the market's demand model")
            units[off_grid] = self.demand.expected_units(
                self.product_index[rows[off_grid]], self.dates[rows[off_grid]],
                prices[off_grid])
        return units

    def release_pages(self) -> None:
        """Drop the feature matrix's pages from this process's resident set.

        The matrix is memory-mapped: every row read stays resident (and counts in RSS/PSS)
        until the kernel needs the memory. Training and evaluation read every row sooner or
        later, which at full scale is over a gigabyte. MADV_DONTNEED unmaps the pages from this
        process only; they stay in the page cache, so reading them again is a cheap minor
        fault, and resident memory stays set by what was read since the last release.
        """
        import mmap

        handle = getattr(self.features, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED)
        self._rows_since_release = 0

    def product_profit_scale(self) -> np.ndarray:
        """(n_products,): each product's mean best daily profit under the demand model.

        Dividing a product's profit by it puts every product's reward near 1 a day, so a few
        high-revenue products cannot dominate the value loss (products differ 100x in scale).
        """
        best = np.zeros(self.n_rows)
        for start in range(0, self.n_rows, 65_536):
            rows = np.arange(start, min(start + 65_536, self.n_rows))
            best[rows] = self.level_profit(rows).max(axis=1)
        total = np.bincount(self.product_index, weights=best, minlength=self.n_products)
        count = np.bincount(self.product_index, minlength=self.n_products)
        scale = np.divide(total, count, out=np.ones(self.n_products), where=count > 0)
        return np.maximum(scale, 1e-9)

    def level_profit(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), K): the demand model's expected profit at every candidate level."""
        return (self.grid(rows) - self.unit_cost[rows, None]) * self.units_table[rows]

    def reference_factor(self, rows: np.ndarray, prices: np.ndarray,
                         reference: np.ndarray | None) -> np.ndarray | float:
        """The reference effect's demand multiplier at ``prices`` ((len(rows),) or
        (len(rows), K)) against each row's reference state (1.0 without an effect)."""
        if self.reference_effect is None or reference is None:
            return 1.0
        extra = (None,) * (np.ndim(prices) - 1)
        return self.reference_effect.factor(prices, reference[(slice(None), *extra)])

    def profit_forecast(self, rows: np.ndarray, last_price: np.ndarray | None = None,
                        reference: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), K) float32: the demand model's expected profit at each level / the best
        level's. Clipped below at -1 so a loss-making level far under cost cannot dominate the
        scale. With a price-change cost and ``last_price`` given, every level that would
        change the price carries the cost: the forecast is today's profit net of it.

        The same demand table as :meth:`level_profit`, in float32 (relative error ~1e-6: only
        exact ties between levels can order differently); this runs on every env step.
        """
        lo, span, cost, steps = self._forecast_terms
        grid = lo[rows, None] + span[rows, None] * steps
        profit = (grid - cost[rows, None]) * self.units_table[rows]
        if self.reference_effect is not None and reference is not None:
            profit *= np.asarray(self.reference_factor(rows, grid, reference), np.float32)
        best = np.maximum(profit.max(axis=1, keepdims=True), np.float32(1e-9))
        if last_price is not None and self._charges_changes:
            change_cost = self._change_cost32[self.product_index[rows]]
            moves = is_price_change(grid, last_price[:, None].astype(np.float32), np.float32)
            profit -= np.where(moves, change_cost[:, None], np.float32(0.0))
        profit /= best
        return np.clip(profit, np.float32(-1.0), np.float32(1.0), out=profit)

    def endogenous(self, rows: np.ndarray, last_price: np.ndarray, held: np.ndarray,
                   reference: np.ndarray | None = None) -> np.ndarray:
        """The 3 features computed from the agent's own last price (see module docstring);
        with a reference effect and state, the first is the gap to the reference state."""
        span = np.maximum(self.max_price[rows] - self.min_price[rows], 1e-12)
        against = (reference if self.reference_effect is not None and reference is not None
                   else self.reference[rows])
        return np.column_stack([
            np.log(last_price / against),
            np.minimum(held, HELD_DAYS_SCALE) / HELD_DAYS_SCALE,
            np.clip((last_price - self.min_price[rows]) / span, 0.0, 1.0),
        ])

    def stock_days(self, rows: np.ndarray, last_price: np.ndarray, stock: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(days of cover, days to the season's end) of these rows: units on hand / the
        demand model's expected units at the last price (its nearest level) on the row (inf
        where the stock is unknown), and the season's days left, the row included (inf
        without a season)."""
        level = nearest_level(self.grid(rows), last_price)
        demand = self.units_table[rows, level].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            cover = np.where(np.isfinite(stock), stock / np.maximum(demand, 1e-9), np.inf)
        ahead = (np.full(len(rows), np.inf) if self.days_to_season_end is None
                 else self.days_to_season_end[rows].astype(np.float64))
        return cover, ahead

    def stock_features(self, rows: np.ndarray, last_price: np.ndarray, stock: np.ndarray
                       ) -> np.ndarray:
        """(len(rows), N_STOCK): :meth:`stock_days` clipped at STOCK_DAYS_CLIP and divided by
        STOCK_DAYS_SCALE."""
        return np.column_stack([np.minimum(days, STOCK_DAYS_CLIP) / STOCK_DAYS_SCALE
                                for days in self.stock_days(rows, last_price, stock)])

    def observation(self, rows: np.ndarray, last_price: np.ndarray, held: np.ndarray,
                    reference: np.ndarray | None = None, stock: np.ndarray | None = None
                    ) -> Observation:
        """The Dict observation of a batch of rows (``stock``: units on hand of each, used
        in an inventory market; None there: unknown, no cap)."""
        features = np.empty((len(rows), self.n_features), dtype=np.float32)
        width = self.features.shape[1]
        n_stock = self.n_stock_features
        if n_stock and stock is None:
            stock = np.full(len(rows), np.inf)
        self._rows_since_release += len(rows)
        if self._rows_since_release > RELEASE_EVERY_ROWS:
            self.release_pages()
        source = rows if self.split_rows is None else self.split_rows[rows]
        # Blocks of OBSERVATION_BLOCK rows keep each block's temporaries in cache; take(out=)
        # gathers straight into the observation, with no temporary (x1.25 faster).
        for start in range(0, len(rows), OBSERVATION_BLOCK):
            part = slice(start, start + OBSERVATION_BLOCK)
            block, last = rows[part], last_price[part]
            ref = None if reference is None else reference[part]
            np.take(self._rows, source[part], axis=0, out=features[part, :width])
            if n_stock:
                assert stock is not None
                features[part, width:width + n_stock] = self.stock_features(block, last,
                                                                            stock[part])
            features[part, width + n_stock:-N_ENDOGENOUS] = self.profit_forecast(block, last,
                                                                                 ref)
            features[part, -N_ENDOGENOUS:] = self.endogenous(block, last, held[part], ref)
        return {"product_id": self.product_index[rows].astype(np.float32)[:, None],
                "features": features}

    def episode_starts(self, episode_length: int, products: Sequence[int] | None = None
                       ) -> np.ndarray:
        """Rows where a window of ``episode_length`` days of one product can start (a product
        shorter than that contributes its first row: its episode is all its rows).

        Raises:
            BatchError: no row of these products is in this split.
        """
        rows = np.arange(self.n_rows)
        first = np.r_[True, self.product_index[1:] != self.product_index[:-1]]
        ok = (rows + episode_length <= self.product_end) | first
        if products is not None:
            ok &= np.isin(self.product_index, np.asarray(products))
        starts = np.nonzero(ok)[0]
        if len(starts) == 0:
            raise BatchError(f"the {self.split} split has no rows for these products",
                             "Pick a product that has rows in this split.")
        return starts

    def observation_space(self) -> spaces.Dict:
        return observation_space(self.n_products, self.n_features)


def observation_space(n_products: int, n_features: int) -> spaces.Dict:
    """The Dict observation space (product_id as a Box index, features incl. endogenous)."""
    return spaces.Dict({
        "product_id": spaces.Box(low=0.0, high=float(max(n_products - 1, 0)), shape=(1,),
                                 dtype=np.float32),
        "features": spaces.Box(low=-np.inf, high=np.inf, shape=(n_features,), dtype=np.float32),
    })


def load_market(processed_dir: ProcessedData | str | Path, split: str, demand: DemandModel,
                stats: ProcessedStats | dict[str, Any] | None = None,
                change_cost: np.ndarray | None = None, closed: Any = None,
                stock: Any = None) -> Market:
    """Open one split of ``processed_dir`` for simulation.

    Args:
        processed_dir: the merge output folder (data/processed), or its reader
            (agent/processed.py: pass the run's one reader, so nothing is read twice).
        split: train, val or test.
        demand: the fitted demand model, or anything with ``expected_units`` (its expected
            units on every row's price grid are computed once, ``demand.units_on_grid``); its
            ``reference_price`` (if it has one) is the endogenous features' reference,
            otherwise the meta ``ref_price``.
        stats: preprocessing_stats.json content (the reader's if None).
        change_cost: (n_products,) money per price change (None: free; see
            :func:`change_costs`).
        closed: closed days (``data.closed_days.ClosedDays``) whose rows are left out: the
            market's rows are the open days (``Market.split_rows`` maps them to the split's
            rows; the feature matrix stays mapped, not copied). None: every row.
        stock: an inventory market's stock state of the split's (open) rows
            (``inventory.MarketStock``, from ``StockData.market_stock``): sales are capped
            by the units on hand, which carry from day to day, the season's leftovers fetch
            the salvage, and the observation carries days of cover and days to the season's
            end. None: sales are demand.

    Raises:
        MissingInputError: a processed file is missing.
        BatchError: the files disagree (row counts, K) with each other, or with ``stock``.
    """
    from pricing_cli.agent.processed import ProcessedStats, as_processed

    processed = as_processed(processed_dir)
    if stats is None:
        stats = processed.stats
    elif isinstance(stats, dict):
        stats = ProcessedStats.from_dict(stats)
    K = stats.price_levels
    meta = processed.meta(split, list(META_COLUMNS))
    features = processed.features(split)
    meta_path, n = processed.folder / f"meta_{split}.parquet", meta.height
    if features.ndim != 2 or features.shape[0] != n:
        raise BatchError(f"{processed.folder / f'X_{split}.npy'} has shape {features.shape} but "
                         f"{meta_path} has {n} rows",
                         "Re-run `pricectl merge` so the processed files agree.")
    masks = processed.masks(split)
    if masks.shape != (n, K):
        raise BatchError(f"{processed.folder / f'masks_{split}.npz'}: price_level masks have "
                         f"shape {masks.shape}, expected ({n}, {K}) from {meta_path} and "
                         "price_levels", "Re-run `pricectl merge` so the processed files agree.")
    from pricing_cli.data.closed_days import open_rows

    split_rows = open_rows(meta["date"].to_numpy(), closed)
    if split_rows is not None:  # closed days left out: the open rows, in order
        meta, masks, n = meta[split_rows], masks[split_rows], len(split_rows)
    mask_bits = np.packbits(masks.astype(bool), axis=1)
    del masks

    product = meta["product_index"].to_numpy().astype(np.int64)
    price = meta["price"].to_numpy().astype(np.float64)
    first = np.r_[True, product[1:] != product[:-1]] if n else np.zeros(0, dtype=bool)
    previous = np.r_[price[:1], price[:-1]]
    first_rows = np.nonzero(first)[0]
    # Day one starts from the price before the split (processed.py's one rule), or where
    # that is unknown from the row's own historical price.
    before = processed.last_prices_before(split, meta["product_id"].to_numpy()[first_rows])
    previous[first_rows] = np.where(np.isnan(before), price[first_rows], before)
    held = held_days(price, first)
    starts = np.r_[first_rows, n]
    product_end = np.repeat(starts[1:], np.diff(starts))
    dates = meta["date"].to_numpy().astype("datetime64[D]")
    min_price = meta["min_price"].to_numpy().astype(np.float64)
    max_price = meta["max_price"].to_numpy().astype(np.float64)
    units_table = units_on_grid(demand, product, dates, price_grid(min_price, max_price, K))
    model_reference = getattr(demand, "reference_price", None)
    reference = (np.asarray(model_reference, dtype=np.float64)[product]
                 if model_reference is not None else meta["ref_price"].to_numpy())
    ids = meta.select("product_index", "product_id").unique(subset="product_index")
    n_products = max(stats.products if stats.products is not None
                     else processed.product_count(), demand.n_products)
    from pricing_cli.agent.reference import historical_references, reference_of

    effect = reference_of(demand)
    history_reference = (None if effect is None else historical_references(
        processed, split, product, dates, price, effect.rate))
    if stock is not None and len(stock.on_hand) != n:
        raise BatchError(f"the stock state has {len(stock.on_hand)} rows but {meta_path} has "
                         f"{n} open rows", "Build it from the same split and closed days.")
    return Market(
        split=split, features=features, product_index=product,
        dates=dates, unit_cost=meta["unit_cost"].to_numpy().astype(np.float64),
        min_price=min_price, max_price=max_price,
        historical_price=price, previous_price=previous, held_days=held, mask_bits=mask_bits,
        units_table=units_table, reference=reference,
        product_end=product_end,
        product_ids=dict(zip(ids["product_index"].to_list(), ids["product_id"].to_list(),
                             strict=True)),
        n_products=n_products, price_levels=K,
        max_daily_change=stats.max_daily_change,
        change_cost=_fit_length(change_cost, n_products), demand=demand,
        split_rows=split_rows, closed=closed if split_rows is not None else None,
        reference_effect=effect, history_reference=history_reference,
        on_hand=None if stock is None else np.asarray(stock.on_hand, np.float64),
        delivery=None if stock is None else np.asarray(stock.delivery, bool),
        days_to_season_end=None if stock is None else stock.days_to_season_end,
        salvage_margin=None if stock is None else np.asarray(stock.salvage_margin, np.float64))


def change_costs(market: Market, share: float) -> np.ndarray:
    """(n_products,) the money one price change costs each product: ``share`` of its mean best
    daily profit under the demand model on ``market`` (train.price_change_cost). Relative to
    each product's own profit, so one setting means the same for a product selling 5 a day
    and one selling 5,000."""
    if share <= 0:
        return np.zeros(market.n_products)
    return share * market.product_profit_scale()


def _fit_length(values: np.ndarray | None, n: int) -> np.ndarray | None:
    """``values`` cut or zero-padded to n (a later split may know more product indices)."""
    if values is None:
        return None
    out = np.zeros(n)
    k = min(n, len(values))
    out[:k] = values[:k]
    return out


def held_days(price: np.ndarray, first: np.ndarray) -> np.ndarray:
    """For each row, how many consecutive days (ending the day before) the price was held;
    1 on a product's first row, where the history before is unknown."""
    n = len(price)
    if n == 0:
        return np.zeros(0)
    prev = np.r_[price[:1], price[:-1]]
    changed = first | is_price_change(price, prev)
    run_start = np.maximum.accumulate(np.where(changed, np.arange(n), 0))
    run_length = np.arange(n) - run_start + 1  # days at this price, ending at this row
    held = np.r_[1.0, run_length[:-1].astype(np.float64)]
    held[first] = 1.0
    return held


class EpisodeBatch:
    """The state of ``size`` episodes (slots), stepped together.

    Args:
        market: the split being simulated.
        size: number of slots.
        reward_scale: reward = profit * reward_scale (after normalization, if on).
        sample_demand: draw units from Poisson instead of using the expectation.
        normalize_reward: divide profit by the product's ``Market.product_profit_scale``.
    """

    def __init__(self, market: Market, size: int, *, reward_scale: float = 1.0,
                 sample_demand: bool = False, normalize_reward: bool = False) -> None:
        self.market = market
        self.reward_scale = reward_scale
        self.profit_scale = (market.product_profit_scale() if normalize_reward
                             else np.ones(market.n_products))
        self.sample_demand = sample_demand
        self.row = np.zeros(size, dtype=np.int64)
        self.end = np.zeros(size, dtype=np.int64)
        self.last_price = np.ones(size)
        self.held = np.ones(size)
        # The reference-price state (used only when the market's model has the effect).
        self.reference = np.ones(size)
        # Units on hand (inventory markets; inf: no cap).
        self.stock = np.full(size, np.inf)
        # The ensemble member each episode's rewards come from (with Market.member_tables).
        self.member = np.zeros(size, dtype=np.int64)
        self.mask = np.ones((size, market.price_levels), dtype=bool)
        self.episode_return = np.zeros(size)
        self.episode_profit = np.zeros(size)
        self.episode_length = np.zeros(size, dtype=np.int64)
        self.clipped_actions = 0
        self.trust_fallbacks = 0  # masks where no feasible level lay in the trust region

    def _trusted(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The feasible ``mask`` of these rows ANDed with the market's trust region."""
        m = self.market
        if m.trust_region is None:
            return mask
        lower, upper = m.trust_region
        product = m.product_index[rows]
        trusted, fallback = restrict_to_trust_region(mask, m.grid(rows), lower[product],
                                                     upper[product])
        self.trust_fallbacks += int(fallback.sum())
        return trusted.astype(bool)

    def begin(self, slots: np.ndarray, start_rows: np.ndarray, end_rows: np.ndarray) -> None:
        """Start episodes covering rows [start, end) in these slots, from the historical state."""
        m = self.market
        self.row[slots] = start_rows
        self.end[slots] = end_rows
        self.last_price[slots] = m.previous_price[start_rows]
        self.held[slots] = m.held_days[start_rows]
        if m.history_reference is not None:
            self.reference[slots] = m.history_reference[start_rows]
        if m.on_hand is not None:
            known = m.on_hand[start_rows]
            self.stock[slots] = np.where(np.isfinite(known), known, np.inf)
        self.mask[slots] = self._trusted(start_rows, apply_rule_levels(
            m.processed_masks(start_rows), m.rule_levels(start_rows), m.grid(start_rows),
            m.previous_price[start_rows]))
        self.episode_return[slots] = 0.0
        self.episode_profit[slots] = 0.0
        self.episode_length[slots] = 0

    def observe(self, slots: np.ndarray) -> Observation:
        """Observation of these slots (after an episode's end: its last row, updated state)."""
        rows = np.minimum(self.row[slots], self.market.product_end[self.row[slots] - 1] - 1)
        rows = np.where(self.episode_length[slots] == 0, self.row[slots], rows)
        return self.market.observation(rows, self.last_price[slots], self.held[slots],
                                       self.reference[slots], self.stock[slots])

    def step(self, slots: np.ndarray, levels: np.ndarray, rng: np.random.Generator | None = None
             ) -> dict[str, np.ndarray]:
        """Apply one day's price levels to these slots.

        Returns:
            dict of per-slot arrays: rows, levels (after clipping), prices, units, profit
            (net of change_cost), change_cost (paid for a price change), reward, clipped
            (bool), done (the window is over).
        """
        m = self.market
        rows = self.row[slots]
        levels, clipped = clip_to_feasible(levels, self.mask[slots])
        self.clipped_actions += int(clipped.sum())
        grid = m.grid(rows)
        prices = grid[np.arange(len(rows)), levels]
        units = (m.units_table[rows, levels] if m.member_tables is None
                 else m.member_tables[self.member[slots], rows, levels]).astype(np.float64)
        if m.reference_effect is not None:  # today's reference, then roll it forward
            units = units * m.reference_factor(rows, prices, self.reference[slots])
            self.reference[slots] = m.reference_effect.next_reference(self.reference[slots],
                                                                      prices)
        capped = m.on_hand is not None
        if capped:
            assert m.on_hand is not None and m.delivery is not None
            arrived = m.delivery[rows] & np.isfinite(m.on_hand[rows])
            self.stock[slots] = np.where(arrived, m.on_hand[rows], self.stock[slots])
        if self.sample_demand:
            units = (rng if rng is not None else np.random.default_rng()).poisson(units)
            units = units.astype(np.float64)
            if capped:
                units = np.minimum(units, self.stock[slots])
        elif capped:  # expected recorded sales E[min(N, stock)] (market.expected_sales)
            from pricing_cli.data.market import expected_sales

            stock = self.stock[slots]
            finite = np.isfinite(stock)
            if finite.any():
                units = units.copy()
                units[finite] = np.minimum(expected_sales(units[finite], np.floor(stock[finite])),
                                           stock[finite])
        if capped:
            self.stock[slots] = np.maximum(self.stock[slots] - units, 0.0)
        changed = is_price_change(prices, self.last_price[slots])
        assert m.change_cost is not None
        change_cost = m.change_cost[m.product_index[rows]] * changed
        profit = (prices - m.unit_cost[rows]) * units - change_cost
        if capped and m.salvage_margin is not None and m.days_to_season_end is not None:
            # The season's last day: what is left is sold off at the salvage value.
            ending = (m.days_to_season_end[rows] == 1) & np.isfinite(self.stock[slots])
            if ending.any():
                left = np.where(ending, self.stock[slots], 0.0)
                profit = profit + m.salvage_margin[rows] * left
                self.stock[slots] = np.where(ending, 0.0, self.stock[slots])
        reward = profit * self.reward_scale / self.profit_scale[m.product_index[rows]]
        self.held[slots] = np.where(changed, 1.0, self.held[slots] + 1.0)
        self.last_price[slots] = prices
        self.episode_return[slots] += reward
        self.episode_profit[slots] += profit
        self.episode_length[slots] += 1
        next_rows = rows + 1
        self.row[slots] = next_rows
        done = next_rows >= self.end[slots]
        going = ~done
        if going.any():
            grid = m.grid(next_rows[going])
            self.mask[slots[going]] = self._trusted(next_rows[going], apply_rule_levels(
                feasible_mask(grid, prices[going], m.max_daily_change)[0].astype(bool),
                m.rule_levels(next_rows[going]), grid, prices[going]))
        return {"rows": rows, "levels": levels, "prices": prices, "units": units,
                "profit": profit, "change_cost": change_cost, "reward": reward,
                "clipped": clipped, "done": done}

    def stock_state(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The inventory state of these slots: units on hand (inf: no cap), days of cover
        (on hand / the expected demand at the last price on the next row) and days to the
        season's end (inf without a season); the observation carries the last two, scaled
        (``Market.stock_features``)."""
        m = self.market
        rows = np.minimum(self.row[slots], m.n_rows - 1)
        stock = self.stock[slots]
        cover, ahead = m.stock_days(rows, self.last_price[slots], stock)
        return {"on_hand": stock, "days_of_cover": cover, "days_to_season_end": ahead}


class PriceEnv(gym.Env):
    """One episode at a time: a window of ``episode_length`` days of one random product.

    Args:
        market: the split to simulate.
        episode_length: days per episode.
        reward_scale: reward = profit * reward_scale.
        sample_demand: Poisson units instead of the expectation.
        products: restrict episodes to these product indices (single-product agents).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, market: Market, *, episode_length: int = 28, reward_scale: float = 0.01,
                 sample_demand: bool = False, products: Sequence[int] | None = None) -> None:
        super().__init__()
        self.market = market
        self.episode_length = episode_length
        self.starts = market.episode_starts(episode_length, products)
        self.observation_space = market.observation_space()
        self.action_space = spaces.Discrete(market.price_levels)
        self.batch = EpisodeBatch(market, 1, reward_scale=reward_scale,
                                  sample_demand=sample_demand)
        self._slot = np.zeros(1, dtype=np.int64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        start = self.starts[self.np_random.integers(len(self.starts))]
        end = min(start + self.episode_length, self.market.product_end[start])
        self.batch.begin(self._slot, np.array([start]), np.array([end]))
        return self._observe(), {"row": int(start)}

    def step(self, action: Any) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        out = self.batch.step(self._slot, np.array([int(action)]), self.np_random)
        info = {"row": int(out["rows"][0]), "price": float(out["prices"][0]),
                "units": float(out["units"][0]), "profit": float(out["profit"][0]),
                "clipped": bool(out["clipped"][0])}
        # Windows end by time limit: truncated, not terminated (the market goes on).
        return self._observe(), float(out["reward"][0]), False, bool(out["done"][0]), info

    def action_masks(self) -> np.ndarray:
        """(K,) bool: the levels feasible today."""
        return self.batch.mask[0].copy()

    def _observe(self) -> Observation:
        obs = self.batch.observe(self._slot)
        return {key: value[0] for key, value in obs.items()}


class PriceVecEnv(VecEnv):
    """``n_envs`` PriceEnv episodes stepped in one numpy operation (SB3 VecEnv).

    Finished windows restart at once (SB3 auto-reset); their last observation is in
    ``info["terminal_observation"]`` with ``TimeLimit.truncated`` so PPO bootstraps the value,
    and ``info["episode"]`` carries r (reward sum), l, t and profit.
    """

    render_mode = None

    def __init__(self, market: Market, n_envs: int, *, episode_length: int = 28,
                 reward_scale: float = 0.01, sample_demand: bool = False,
                 products: Sequence[int] | None = None, seed: int | None = None,
                 normalize_reward: bool = False) -> None:
        self.market = market
        self.episode_length = episode_length
        self.starts = market.episode_starts(episode_length, products)
        self.batch = EpisodeBatch(market, n_envs, reward_scale=reward_scale,
                                  sample_demand=sample_demand,
                                  normalize_reward=normalize_reward)
        self.rng = np.random.default_rng(seed)
        self._slots = np.arange(n_envs)
        self._actions = np.zeros(n_envs, dtype=np.int64)
        self._started = time.monotonic()
        super().__init__(n_envs, market.observation_space(), spaces.Discrete(market.price_levels))

    def _begin(self, slots: np.ndarray) -> None:
        starts = self.starts[self.rng.integers(len(self.starts), size=len(slots))]
        ends = np.minimum(starts + self.episode_length, self.market.product_end[starts])
        self.batch.begin(slots, starts, ends)
        if self.market.member_tables is not None:  # a member per episode, drawn uniformly
            members = len(self.market.member_tables)
            self.batch.member[slots] = self.rng.integers(members, size=len(slots))

    def reset(self) -> Observation:
        if self._seeds[0] is not None:
            self.rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        self._begin(self._slots)
        return self.batch.observe(self._slots)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(-1)

    def step_wait(self) -> tuple[Observation, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        out = self.batch.step(self._slots, self._actions, self.rng)
        done = out["done"]
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if done.any():
            finished = np.nonzero(done)[0]
            terminal = self.batch.observe(finished)
            elapsed = round(time.monotonic() - self._started, 6)
            for j, slot in enumerate(finished):
                infos[slot] = {
                    "terminal_observation": {k: v[j] for k, v in terminal.items()},
                    "TimeLimit.truncated": True,
                    "episode": {"r": float(self.batch.episode_return[slot]),
                                "l": int(self.batch.episode_length[slot]), "t": elapsed,
                                "profit": float(self.batch.episode_profit[slot])},
                }
            self._begin(finished)
        return (self.batch.observe(self._slots), out["reward"].astype(np.float32), done.copy(),
                infos)

    def action_masks(self) -> np.ndarray:
        """(n_envs, K) bool: the levels feasible today in each env."""
        return self.batch.mask.copy()

    def close(self) -> None:
        return None

    def _indices(self, indices: Any) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        value = getattr(self, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None,
                   **method_kwargs: Any) -> list[Any]:
        """Only ``action_masks`` is per-env here (what sb3-contrib's get_action_masks calls)."""
        if method_name != "action_masks":
            raise AttributeError(f"PriceVecEnv has no per-env method {method_name!r}")
        masks = self.action_masks()
        return [masks[i] for i in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: Any = None) -> list[bool]:
        return [False for _ in self._indices(indices)]


def simulate(market: Market, choose: Callable[[Observation, np.ndarray], np.ndarray], *,
             sample_demand: bool = False, rng: np.random.Generator | None = None,
             products: Sequence[int] | None = None) -> dict[str, Any]:
    """Price every row of a split with ``choose``, each product day by day from its history.

    All products run side by side: on day t, the t-th row of every product still going is
    decided in one call ``choose(observation, mask) -> levels``. Each product starts from its
    last historical price before the split (the processed mask of its first row) and then
    follows its own prices.

    Returns:
        dict with per-row arrays in row order (``levels`` int64, ``prices``, ``units``,
        ``profit``; rows not simulated hold -1 / NaN), ``clipped_actions`` and
        ``mean_profit`` (per simulated product-day).
    """
    n = market.n_rows
    first = np.nonzero(np.r_[True, market.product_index[1:] != market.product_index[:-1]])[0]
    if products is not None:
        first = first[np.isin(market.product_index[first], np.asarray(products))]
    out: dict[str, Any] = {"levels": np.full(n, -1, dtype=np.int64), "prices": np.full(n, np.nan),
           "units": np.full(n, np.nan), "profit": np.full(n, np.nan)}
    batch = EpisodeBatch(market, len(first), sample_demand=sample_demand)
    batch.begin(np.arange(len(first)), first, market.product_end[first])
    active = np.arange(len(first))
    while len(active):
        obs = batch.observe(active)
        levels = np.asarray(choose(obs, batch.mask[active]), dtype=np.int64).reshape(-1)
        result = batch.step(active, levels, rng)
        rows = result["rows"]
        for key in ("levels", "prices", "units", "profit"):
            out[key][rows] = result[key]
        active = active[~result["done"]]
    market.release_pages()
    simulated = out["levels"] >= 0
    out["clipped_actions"] = batch.clipped_actions
    out["mean_profit"] = float(out["profit"][simulated].mean()) if simulated.any() else 0.0
    return out


def random_feasible_policy(rng: np.random.Generator) -> Callable[[Observation, np.ndarray],
                                                                  np.ndarray]:
    """A policy that picks a feasible level uniformly at random (a baseline): the draw of
    evaluate's random baseline (``pricing.random_feasible_levels``)."""
    def choose(obs: Observation, mask: np.ndarray) -> np.ndarray:
        return random_feasible_levels(rng, mask)
    return choose
