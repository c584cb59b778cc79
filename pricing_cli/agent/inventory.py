"""Pricing from a season's stock under the fitted demand model: the baselines of an inventory
(markdown) market (docs/agent.md, "Inventory").

A *run* is one product's rows inside one season: it sells from the units on hand on its first
day (``data.stock``, stock.csv) with no reorder, and what is left after the season's last day
is sold off at the salvage value. Every policy here is a price path scored exactly
(``market.sales_from_stock``: the path does not look at the stock, so a run's cumulative
demand is Poisson) as

    profit = sum over rows of (price - unit_cost) * expected sales
             + (salvage - unit_cost) * expected units left, on each season's last day

* ``planner``: ``market.stock_dp`` (the true oracle's DP) over (day, stock on a grid,
  yesterday's level) on the fitted demand and the run's price grid, within the daily-change
  rule (``pricing.feasible_mask``); exact for a known start up to the stock grid;
* ``greedy``: each day the feasible level with the most profit today given the stock the path
  has left (myopic: blind to the salvage and to the days ahead);
* ``static``: the best level held the whole split (feasible on day one);
* ``ladder``: a markdown ladder: from the best constant price (``static``), cut the price by x%
  (the nearest feasible level below it) when the days of cover (units left / today's
  expected demand at the current price) exceed y, at most once a week; x and y chosen on the
  validation split by a grid search under the fitted model (y = inf: never, the static price).

The season boundaries and the salvage value come from the ground truth's inventory section
(a retailer knows its season and its clearance price); the units on hand from stock.csv.
These baselines keep to the daily-change rule but not to merchant rules or a trust region.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.errors import MissingInputError
from pricing_cli.pricing import feasible_mask, nearest_level

LADDER_CUTS = (0.05, 0.10, 0.15, 0.20, 0.30)
"""The ladder's candidate cuts (share of the current price)."""
LADDER_COVER_DAYS = (7.0, 14.0, 21.0, 28.0, 42.0, 56.0, 91.0, math.inf)
"""The ladder's candidate days-of-cover thresholds (inf: never cut, the static price)."""
LADDER_EVERY_DAYS = 7
"""The ladder cuts at most once in this many days (a weekly markdown cadence)."""
PLANNER_STOCK_POINTS = 61
"""Stock grid points of the fitted planner's DP (every unit up to 60 units)."""


@dataclass(frozen=True)
class SeasonRuns:
    """How the rows of a split sell from season stocks.

    Attributes:
        start: (n_runs,) row where each run starts (runs are consecutive rows of one series).
        stock: (n_runs,) units on hand on the run's first day.
        terminal: (n_runs,) money per unit left after the run's last row: salvage - unit_cost
            when that row is its season's last day, else 0 (the season goes on).
        series: (n_runs,) the split series each run belongs to.
        run_of_row: (n,) the run of each row.
    """

    start: np.ndarray
    stock: np.ndarray
    terminal: np.ndarray
    series: np.ndarray
    run_of_row: np.ndarray

    @property
    def length(self) -> np.ndarray:
        return np.diff(np.append(self.start, self.run_of_row.size))

    def sales_and_left(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expected sales, expected units left after the day) of each row at uncapped
        expected demand ``units``."""
        from pricing_cli.data.market import sales_from_stock

        return sales_from_stock(np.asarray(units, np.float64), self.start, self.stock)

    def leftover_value(self, units: np.ndarray) -> np.ndarray:
        """(n,) terminal * expected units left on each run's last row, 0 elsewhere."""
        _, left = self.sales_and_left(units)
        out = np.zeros(left.size)
        last = np.append(self.start[1:], left.size) - 1
        out[last] = self.terminal * left[last]
        return out

    def profit(self, meta: SplitMeta, prices: np.ndarray, units: np.ndarray) -> float:
        sales, _ = self.sales_and_left(units)
        return float(np.sum((prices - meta.unit_cost) * sales)
                     + np.sum(self.leftover_value(units)))


def _season_days(meta: SplitMeta, truth: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(day index of every row, its season, each season's last day index) from the ground
    truth's inventory section (the one reading of the season calendar)."""
    sc = truth.scenario
    day = (meta.date - np.datetime64(sc.start_date, "D")).astype(np.int64)
    season = np.searchsorted(sc.season_start, day, side="right") - 1
    ends = np.r_[sc.season_start[1:], sc.inventory_prices.shape[1]] - 1
    return day, season, ends


def season_runs(meta: SplitMeta, truth: Any, truth_index: np.ndarray,
                on_hand: np.ndarray) -> SeasonRuns:
    """The runs of ``meta``'s rows: seasons and salvage from the ground truth's inventory
    section, the start stock from ``on_hand`` (per row, from stock.csv).

    Raises:
        MissingInputError: a run's first day has no on_hand row in the stock file.
    """
    sc = truth.scenario
    day, season, ends = _season_days(meta, truth)
    new = np.zeros(meta.n_rows, dtype=bool)
    new[meta.series_start] = True
    new[1:] |= season[1:] != season[:-1]
    start = np.flatnonzero(new)
    stock = np.asarray(on_hand, dtype=np.float64)[start]
    if not np.all(np.isfinite(stock)):
        row = int(start[np.flatnonzero(~np.isfinite(stock))[0]])
        raise MissingInputError(
            f"the stock file has no on_hand for {meta.product_id[row]} on "
            f"{meta.date[row]} (the first day of its season in the split)",
            "An inventory market needs data.stock: point it at the stock.csv `pricectl "
            "generate` wrote beside the transactions.")
    last = np.append(start[1:], meta.n_rows) - 1
    product = truth_index[start]
    terminal = np.where(day[last] == ends[season[last]],
                        sc.salvage[product] - truth.unit_cost[product], 0.0)
    counts = np.diff(np.append(start, meta.n_rows))
    return SeasonRuns(start, np.floor(stock), terminal, meta.series_of_row[start],
                      np.repeat(np.arange(start.size), counts))


@dataclass(frozen=True)
class MarketStock:
    """An inventory market's stock state per row of a split, for the env (``Market``).

    Attributes:
        on_hand: (n,) units on hand at the row's opening (stock.csv; NaN: unknown); on a run's
            first day the season stock the run sells from.
        delivery: (n,) whether the row starts a run (a season's delivery, or the split's first
            day): the env then takes ``on_hand`` instead of what is left.
        days_to_season_end: (n,) days left in the row's season, the row included (1 on its
            last day).
        salvage_margin: (n,) money per unit left after a season's last day: salvage - unit
            cost of the row's product (applied where ``days_to_season_end`` is 1).
    """

    on_hand: np.ndarray
    delivery: np.ndarray
    days_to_season_end: np.ndarray
    salvage_margin: np.ndarray


@dataclass(frozen=True)
class StockData:
    """What stock-aware pricing reads in an inventory market: the season calendar and the
    salvage values (the ground truth's inventory section: a retailer knows its season and
    its clearance price) and the units on hand (``data.stock``, read once)."""

    truth: Any
    stock: Any  # raw_contract.read_stock's frame

    def index(self, meta: SplitMeta) -> np.ndarray:
        """The ground truth's product index of every row of ``meta``.

        Raises:
            MissingInputError: the ground truth does not cover the split's products.
        """
        from pricing_cli.agent.baselines import ground_truth_index

        found = ground_truth_index(meta, self.truth.index)
        if found is None:
            raise MissingInputError(
                "the ground truth's inventory section does not cover the processed products",
                "Point data.ground_truth at the ground_truth.json generated with the data.")
        return found

    def runs(self, meta: SplitMeta) -> SeasonRuns:
        """The season runs of ``meta``'s rows (:func:`season_runs`)."""
        return season_runs(meta, self.truth, self.index(meta), on_hand_of(meta, self.stock))

    def market_stock(self, meta: SplitMeta) -> MarketStock:
        """The env's stock state of ``meta``'s rows (the rows of ``env.load_market`` for the
        same split and closed days)."""
        index = self.index(meta)
        on_hand = np.array(on_hand_of(meta, self.stock), dtype=np.float64)  # writable
        runs = season_runs(meta, self.truth, index, on_hand)
        day, season, ends = _season_days(meta, self.truth)
        delivery = np.zeros(meta.n_rows, dtype=bool)
        delivery[runs.start] = True
        on_hand[runs.start] = runs.stock
        sc = self.truth.scenario
        return MarketStock(on_hand, delivery, (ends[season] - day + 1).astype(np.int64),
                           sc.salvage[index] - self.truth.unit_cost[index])


def stock_data_of(settings: Any, truth: Any) -> StockData | None:
    """The inventory market's stock data under ``truth``; None unless it has an inventory
    section.

    Raises:
        MissingInputError: an inventory market without data.stock.
    """
    if truth is None or truth.scenario is None or truth.scenario.season_start is None:
        return None
    if settings.data.stock is None:
        raise MissingInputError("an inventory market needs the units on hand (data.stock)",
                                "Point data.stock at the stock.csv `pricectl generate` wrote.")
    from pricing_cli.data.raw_contract import read_stock

    stock, _ = read_stock(settings.data.stock, settings.data)
    return StockData(truth, stock)


def stock_data(settings: Any) -> StockData | None:
    """:func:`stock_data_of` under ``data.ground_truth``; None without stock data
    (``data.stock`` unset), a ground truth file, or an inventory section in it."""
    from pathlib import Path

    path = Path(settings.data.ground_truth)
    if settings.data.stock is None or not path.is_file():
        return None
    from pricing_cli.data.market import load_ground_truth

    return stock_data_of(settings, load_ground_truth(path))


def on_hand_of(meta: SplitMeta, stock: Any) -> np.ndarray:
    """(n,) on_hand of each row from the stock frame (``raw_contract.read_stock``); NaN where
    the file has no row for the product-day."""
    import polars as pl

    rows = pl.DataFrame({"product_id": meta.product_id.astype(str).tolist(),
                         "date": meta.date}).with_columns(pl.col("date").cast(pl.Date))
    joined = rows.join(stock.select("product_id", "date", "on_hand"),
                       on=["product_id", "date"], how="left", maintain_order="left")
    return joined["on_hand"].cast(pl.Float64).fill_null(np.nan).to_numpy()


def level_units(meta: SplitMeta, demand: Any, K: int) -> np.ndarray:
    """(n, K) fitted expected demand of every row at every level of its series' grid."""
    grid = meta.grid[meta.series_of_row]
    units = demand.expected_units(np.repeat(meta.product_index, K), np.repeat(meta.date, K),
                                  grid.ravel())
    return np.asarray(units, dtype=np.float64).reshape(meta.n_rows, K)


Chooser = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                    np.ndarray], np.ndarray]


def _walk(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray, max_daily_change: float,
          choose: Chooser) -> np.ndarray:
    """A day-by-day policy over every series at once: ``choose(rows, grid, mask, units,
    drawn, stock, previous)`` returns each row's level given its feasible levels (from the
    policy's own previous price; day one from the last price before the split), the demand
    at every level, the expected demand its run's path drew so far, the run's start stock
    and the previous price (NaN where unknown)."""
    prices = np.zeros(meta.n_rows)
    drawn = np.zeros(runs.start.size)
    for day in range(int(meta.series_length.max(initial=0))):
        series, rows = meta.rows_on_day(day)
        grid = meta.grid[series]
        previous = meta.prev_price[series] if day == 0 else prices[rows - 1]
        mask = np.ones(grid.shape, dtype=np.int8)
        known = np.isfinite(previous)
        if known.any():
            mask[known] = feasible_mask(grid[known], previous[known], max_daily_change)[0]
        run = runs.run_of_row[rows]
        level = choose(rows, grid, mask, table[rows], drawn[run], runs.stock[run], previous)
        at = np.arange(rows.size)
        prices[rows] = grid[at, level]
        drawn[run] += table[rows, level]
    return prices


def greedy_prices(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray,
                  max_daily_change: float) -> np.ndarray:
    """Each day the feasible level with the most expected profit today, given the stock the
    path has left: (price - cost) * (E[min(C + demand, S)] - E[min(C, S)]) (C the run's
    expected demand so far, S its start stock)."""
    from pricing_cli.data.market import expected_sales

    def choose(rows: np.ndarray, grid: np.ndarray, mask: np.ndarray, units: np.ndarray,
               drawn: np.ndarray, stock: np.ndarray, previous: np.ndarray) -> np.ndarray:
        sold = expected_sales(drawn[:, None] + units, stock[:, None])
        today = sold - expected_sales(drawn, stock)[:, None]
        gain = (grid - meta.unit_cost[rows, None]) * today
        return np.where(mask == 1, gain, -np.inf).argmax(axis=1)

    return _walk(meta, runs, table, max_daily_change, choose)


def ladder_prices(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray, max_daily_change: float,
                  cut: float, cover_days: float, start: np.ndarray | None = None) -> np.ndarray:
    """The markdown ladder: start from ``start`` (per row, read on each series' first row;
    None: the last price before the split, else the first historical price), hold it, and on
    a day whose days of cover (expected units left / the day's expected demand at the held
    price) exceed ``cover_days`` move to the feasible level nearest ``(1 - cut)`` times it
    (at least one level down), at most once in LADDER_EVERY_DAYS days."""
    from pricing_cli.data.market import expected_sales

    def choose(rows: np.ndarray, grid: np.ndarray, mask: np.ndarray, units: np.ndarray,
               drawn: np.ndarray, stock: np.ndarray, previous: np.ndarray) -> np.ndarray:
        at = np.arange(rows.size)
        held = np.where(np.isfinite(previous), previous, meta.price[rows])
        first = rows == meta.series_start[meta.series_of_row[rows]]
        if start is not None:  # day one holds the starting price (feasible: it is a level)
            held = np.where(first, start[rows], held)
            cutting_today = ~first
        else:
            cutting_today = np.ones(rows.size, dtype=bool)
        current = nearest_level(grid, held)
        left = stock - expected_sales(drawn, stock)
        cover = left / np.maximum(units[at, current], 1e-9)
        day = rows - meta.series_start[meta.series_of_row[rows]]
        series = meta.series_of_row[rows]
        due = day - last_cut[series] >= LADDER_EVERY_DAYS
        cutting = (cover > cover_days) & cutting_today & due
        last_cut[series[cutting]] = day[cutting]
        target = np.where(cutting, held * (1.0 - cut), held)
        distance = np.where(mask == 1, np.abs(grid - target[:, None]), np.inf)
        # A cut smaller than half a grid step still moves one level down.
        below = (mask == 1) & (grid < held[:, None] - 1e-9) & cutting[:, None]
        distance = np.where(cutting[:, None] & below.any(axis=1, keepdims=True) & ~below,
                            np.inf, distance)
        return distance.argmin(axis=1)

    last_cut = np.full(meta.series_start.size, -LADDER_EVERY_DAYS)
    return _walk(meta, runs, table, max_daily_change, choose)


def static_prices(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray,
                  max_daily_change: float) -> np.ndarray:
    """The best level held over the whole split per series (feasible on day one), its profit
    counted with the stock cap and the salvage."""
    K = table.shape[1]
    start = meta.series_start
    total = np.zeros((start.size, K))
    for level in range(K):
        prices = meta.grid[meta.series_of_row, level]
        sales, _ = runs.sales_and_left(table[:, level])
        per_row = (prices - meta.unit_cost) * sales + runs.leftover_value(table[:, level])
        total[:, level] = np.add.reduceat(per_row, start)
    mask = np.ones(total.shape, dtype=np.int8)
    known = np.isfinite(meta.prev_price)
    if known.any():
        mask[known] = feasible_mask(meta.grid[known], meta.prev_price[known],
                                    max_daily_change)[0]
    best = np.where(mask == 1, total, -np.inf).argmax(axis=1)
    return meta.grid[meta.series_of_row, best[meta.series_of_row]]


def planned_prices(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray,
                   max_daily_change: float) -> np.ndarray:
    """``market.stock_dp`` on each run under the fitted demand ``table``, within the daily
    change rule; day one of a series from the last price before the split (a run that starts
    a new season inside the split: free)."""
    from pricing_cli.data.market import stock_dp

    K = table.shape[1]
    length = runs.length
    offset = np.arange(meta.n_rows) - runs.start[runs.run_of_row]
    units = np.zeros((runs.start.size, int(length.max(initial=1)), K))
    units[runs.run_of_row, offset] = table
    series_first = runs.start == meta.series_start[runs.series]
    prev = np.where(series_first, meta.prev_price[runs.series], np.nan)
    chosen, _ = stock_dp(units, meta.grid[runs.series], meta.unit_cost[runs.start],
                         runs.terminal, runs.stock, length, points=PLANNER_STOCK_POINTS,
                         max_daily_change=max_daily_change, prev_price=prev)
    return meta.grid[meta.series_of_row, chosen[runs.run_of_row, offset]]


def fit_ladder(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray, max_daily_change: float,
               start: np.ndarray | None = None) -> tuple[float, float, dict[str, float]]:
    """(cut, cover days, profit of every pair) of the ladder (from ``start``) that earns most
    under the fitted demand on ``meta`` (the validation split); ties: the first pair in grid
    order."""
    scores: dict[str, float] = {}
    best = (LADDER_CUTS[0], float(LADDER_COVER_DAYS[0]), -np.inf)
    for cut in LADDER_CUTS:
        for days in LADDER_COVER_DAYS:
            prices = ladder_prices(meta, runs, table, max_daily_change, cut, days, start)
            units = table[np.arange(meta.n_rows), nearest_level(
                meta.grid[meta.series_of_row], prices)]
            profit = runs.profit(meta, prices, units)
            scores[f"{cut:g}/{days:g}"] = profit
            if profit > best[2]:
                best = (cut, float(days), profit)
    return best[0], best[1], scores


@dataclass(frozen=True)
class InventoryBaselines:
    """What evaluate adds in an inventory market.

    Attributes:
        runs: the evaluated split's runs (scoring caps sales by them, fitted and true).
        makers: name -> price path: stock-aware static, greedy and planner (in place of the
            stock-blind ones), the fitted ladder, and the oracle (recording the DP value).
        info: the ladder's fit and, once the oracle is priced, the DP value.
    """

    runs: SeasonRuns
    makers: dict[str, Callable[[], np.ndarray]]
    info: dict[str, Any]


STOCK_POLICIES = ("static", "greedy", "planner", "ladder")
"""The stock-aware policies a run may publish in an inventory market (train)."""


def stock_policies(meta: SplitMeta, runs: SeasonRuns, table: np.ndarray,
                   max_daily_change: float, ladder: tuple[float, float]
                   ) -> dict[str, Callable[[], np.ndarray]]:
    """name -> price path of every stock-aware policy (:data:`STOCK_POLICIES`) on ``meta``
    under the fitted demand ``table``; the ladder with its fitted (cut, cover days)."""
    import functools

    cut, cover = ladder
    return {
        "static": functools.partial(static_prices, meta, runs, table, max_daily_change),
        "greedy": functools.partial(greedy_prices, meta, runs, table, max_daily_change),
        "planner": functools.partial(planned_prices, meta, runs, table, max_daily_change),
        "ladder": lambda: ladder_prices(meta, runs, table, max_daily_change, cut, cover,
                                        static_prices(meta, runs, table, max_daily_change)),
    }


def fit_val_ladder(data: StockData, processed: Any, closed: Any, demand: Any, K: int,
                   max_daily_change: float) -> tuple[float, float, dict[str, float]]:
    """The ladder's (cut, cover days, val profit of every pair) fitted on the val split,
    read through the run's one reader (``processed``: agent/processed.py). It starts each
    season at the best constant price (its full price) and marks down from there; the last
    historical price may be far from any good price."""
    from pricing_cli.agent.baselines import load_split_meta

    val = load_split_meta(processed, "val", closed)
    val_runs = data.runs(val)
    val_table = level_units(val, demand, K)
    return fit_ladder(val, val_runs, val_table, max_daily_change,
                      static_prices(val, val_runs, val_table, max_daily_change))


def stock_policy_prices(name: str, data: StockData, processed: Any, closed: Any,
                        meta: SplitMeta, demand: Any, K: int, max_daily_change: float
                        ) -> np.ndarray:
    """The prices of the stock-aware policy ``name`` on ``meta`` (what a run that published
    it prices; the ladder fitted on val, as evaluate fits it)."""
    ladder = (LADDER_CUTS[0], math.inf)
    if name == "ladder":
        cut, cover, _ = fit_val_ladder(data, processed, closed, demand, K, max_daily_change)
        ladder = (cut, cover)
    makers = stock_policies(meta, data.runs(meta), level_units(meta, demand, K),
                            max_daily_change, ladder)
    return makers[name]()


def inventory_baselines(settings: Any, processed: Any, closed: Any, meta: SplitMeta,
                        truth: Any, truth_index: np.ndarray | None, demand: Any, K: int,
                        max_daily_change: float) -> InventoryBaselines | None:
    """The inventory baselines of ``meta`` under ``demand``; None unless the ground truth
    has an inventory section. The ladder's cut and cover are fitted on the val split, read
    through the run's one reader (``processed``: agent/processed.py).

    Raises:
        MissingInputError: no data.stock, or it lacks a run's first day.
    """
    if truth_index is None:
        return None
    data = stock_data_of(settings, truth)
    if data is None:
        return None
    from pricing_cli.data.market import inventory_optimum

    runs = season_runs(meta, truth, truth_index, on_hand_of(meta, data.stock))
    table = level_units(meta, demand, K)
    cut, cover, scores = fit_val_ladder(data, processed, closed, demand, K, max_daily_change)
    info: dict[str, Any] = {"ladder": {"cut": cut,  # cover None: never cuts (static)
                                       "cover_days": None if math.isinf(cover) else cover,
                                       "val_profit_fitted": scores}}

    def oracle() -> np.ndarray:
        prices, value = inventory_optimum(truth, truth_index, meta.date)
        info["dp_value_true"] = float(value.sum())
        return np.clip(prices, meta.min_price, meta.max_price)

    makers = stock_policies(meta, runs, table, max_daily_change, (cut, cover))
    makers["oracle"] = oracle
    return InventoryBaselines(runs, makers, info)
