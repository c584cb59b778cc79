"""`pricectl generate`: a synthetic market with known ground truth, in the raw-data contract.

Writes under ``generate.output_dir``:

* ``transactions/transactions_<period>.<csv|csv.gz|parquet>``: one file per month
  (``2023-01``), ISO week (``2023-W01``) or day (``2023-01-01``), columns ``date`` (ISO date,
  no time), ``product_id``, ``quantity`` (negative = return), ``unit_price`` (cents) and
  ``store_id`` (unless ``n_stores`` is 0). Rows are sorted by date, then product.
* ``catalog.csv``: product_id, unit_cost, min_price, max_price, category.
* ``ground_truth.json``: every product's true demand parameters (see market.py).

How the history is made (docs/market.md has the details):

1. :func:`draw_market` draws the true parameters of every product.
2. :func:`historical_prices` plays a plausible, non-optimal human pricing policy: a list price
   marked up over cost independently of elasticity, rare permanent list-price changes and
   short promotions on a loose calendar.
3. For each day, :func:`simulate_day` draws units ~ Poisson(expected_units at that day's
   price), splits them into transactions of 1..k units, assigns stores, and schedules
   returns 1-7 days later.

Every random draw comes from a generator keyed by (seed, purpose, day), so the same seed gives
byte-identical files, and the rows do not depend on file_period or file_format. Memory is
bounded by one file period of rows (plus the products x days price matrix): files are
written one at a time, each atomically, into a staged transactions folder that replaces the
old one as a whole, so a killed run leaves the previous output intact.
"""

from __future__ import annotations

import gzip
import os
import time
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pricing_cli.config import GenerateSettings, Settings
from pricing_cli.data import market
from pricing_cli.data.market import GroundTruth, expected_units
from pricing_cli.data.raw_contract import INCOMPLETE_MARKER, INCOMPLETE_NOTE
from pricing_cli.monitor import RunMonitor
from pricing_cli.runinfo import StageResult
from pricing_cli.storage import (
    atomic_write,
    check_output_dir,
    staged_dir,
    sweep_stale_tmp,
    tmp_path_for,
    write_json,
    write_owner_marker,
)

TRANSACTIONS_DIR = "transactions"
CATALOG_FILE = "catalog.csv"
GROUND_TRUTH_FILE = "ground_truth.json"
PRICE_DECIMALS = 2  # prices and costs are in cents

# Log-demand effect of the weekday, Monday first: weekend shopping peaks. The multipliers
# average exactly 1, so base_units is the mean over a week (before the season).
DOW_MULTIPLIERS = (0.90, 0.85, 0.90, 0.95, 1.10, 1.25, 1.05)
# The human policy's markup over cost, drawn independently of elasticity (so it is not optimal).
LIST_MARKUP = (1.15, 3.0)
# The allowed price band, as multiples of unit cost.
MIN_MARKUP, MAX_MARKUP = 1.05, 3.5
# Product elasticities: category means, product spread, and bounds. e >= 1.8 keeps the
# optimum c*e/(e-1) below 3.5*c even when season and weekend lower the elasticity by 18%.
CATEGORY_ELASTICITY = (2.0, 3.4)
ELASTICITY_SPREAD = 0.3
ELASTICITY_BOUNDS = (1.8, 4.0)
PROMO_DISCOUNT = (0.10, 0.30)
PROMO_DAYS = (3, 7)
LIST_CHANGE = (0.90, 1.10)
RETURN_DELAY_DAYS = (1, 7)

# Purposes of the random streams: each is seeded by (seed, purpose[, day]). The scenario
# streams are separate, so a market without a scenario is drawn exactly as before.
_STREAM_MARKET, _STREAM_PRICES, _STREAM_DAY = 1, 2, 3
_STREAM_SHOCK, _STREAM_SIGNAL, _STREAM_STOCK = 4, 5, 6
STOCK_FILE = "stock.csv"
# Price endogeneity: the pricer's reaction to its signal of the demand shock (in standard
# deviations): a 20% promotion below -1 (weak demand), 10% up above +1 (strong demand).
SIGNAL_THRESHOLD = 1.0
REACTIVE_PROMO, REACTIVE_MARKUP = 0.20, 0.10
# Stock-outs: the retailer stocks the day's expected demand at the list price, times a supply
# factor lognormal(0, STOCK_SUPPLY_SD), plus STOCK_SAFETY_Z * sqrt of it. Calibrated so stock
# binds on 10-20% of product-days (tiny, small and full presets), most often on promotions.
STOCK_SAFETY_Z = 1.5
STOCK_SUPPLY_SD = 0.10


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


# ----------------------------------------------------------------------------------------------
# The market and the historical prices


def product_ids(n_products: int) -> tuple[str, ...]:
    """P00001, P00002, ...: zero-padded so that string order is index order."""
    width = max(5, len(str(n_products)))
    return tuple(f"P{i + 1:0{width}d}" for i in range(n_products))


def draw_market(cfg: GenerateSettings) -> GroundTruth:
    """Draw every product's true demand parameters and catalog entry from ``cfg.seed``.

    Categories carry the mean elasticity, cost level and season phase, so pooling products
    of a category helps a demand model. Prices are in cents.
    """
    rng = _rng(cfg.seed, _STREAM_MARKET)
    n, n_cat = cfg.n_products, cfg.n_categories
    # Round-robin then shuffle: every category has a product when n >= n_categories.
    category_of = rng.permutation(np.arange(n) % n_cat)
    cat_cost = np.exp(rng.uniform(np.log(2.0), np.log(50.0), n_cat))
    cat_elasticity = rng.uniform(*CATEGORY_ELASTICITY, n_cat)
    cat_phase = rng.uniform(0.0, 365.25, n_cat)

    unit_cost = np.maximum(np.round(cat_cost[category_of] * rng.lognormal(0.0, 0.35, n), 2), 0.5)
    ref_price = np.round(unit_cost * rng.uniform(*LIST_MARKUP, n), 2)
    e_p = np.clip(cat_elasticity[category_of] + rng.normal(0.0, ELASTICITY_SPREAD, n),
                  *ELASTICITY_BOUNDS)
    season_amp = rng.uniform(0.05, 0.35, n)
    season_phase = (cat_phase[category_of] + rng.normal(0.0, 20.0, n)) % 365.25
    # Lognormal with mean 1: some products sell far more than others.
    volume = rng.lognormal(-0.5 * 0.5**2, 0.5, n)
    mean_units_per_transaction = (cfg.max_units_per_transaction + 1) / 2
    base_units = cfg.mean_transactions_per_day * mean_units_per_transaction * volume

    names = [f"C{j + 1:02d}" for j in range(n_cat)]
    settings = cfg.model_dump(mode="json")
    settings.pop("output_dir")  # where files go does not change the market
    if not cfg.scenario.active:  # today's market keeps today's ground_truth.json, byte for byte
        settings.pop("scenario")
    return GroundTruth(
        product_ids=product_ids(n),
        category=tuple(names[j] for j in category_of),
        base_units=base_units,
        ref_price=ref_price,
        elasticity=e_p,
        season_amp=season_amp,
        season_phase=season_phase,
        unit_cost=unit_cost,
        min_price=np.round(unit_cost * MIN_MARKUP, 2),
        max_price=np.round(unit_cost * MAX_MARKUP, 2),
        elasticity_season=cfg.elasticity_season,
        elasticity_weekend=cfg.elasticity_weekend,
        dow_effect=np.log(np.asarray(DOW_MULTIPLIERS)),
        seed=cfg.seed,
        meta={"start_date": cfg.start_date.isoformat(), "n_days": cfg.n_days,
              "settings": settings},
    )


def historical_prices(gt: GroundTruth, cfg: GenerateSettings) -> np.ndarray:
    """The prices a human pricing manager set, shape (n_products, n_days), in cents.

    Each product starts at its list price (``gt.ref_price``). On any day the list price may
    change permanently by -10%..+10%. Promotions (10-30% off for 3-7 days) follow a loose
    calendar: the first starts within the first mean gap (365.25 / promotions_per_year
    days), the next 0.5-1.5 mean gaps later, so every product's price varies within a
    history longer than about 1.5 gaps and its elasticity can be identified. Prices are
    clipped to [min_price, max_price].
    """
    return historical_price_paths(gt, cfg)[0]


def historical_price_paths(gt: GroundTruth, cfg: GenerateSettings) -> tuple[np.ndarray, np.ndarray]:
    """(prices, list prices), both (n_products, n_days): see :func:`historical_prices`."""
    rng = _rng(cfg.seed, _STREAM_PRICES)
    n = gt.n_products
    prices = np.empty((n, cfg.n_days), dtype=np.float64)
    list_prices = np.empty((n, cfg.n_days), dtype=np.float64)
    list_price = gt.ref_price.copy()
    promo_left = np.zeros(n, dtype=np.int64)
    promo_discount = np.zeros(n)
    p_change = cfg.list_price_changes_per_year / 365.25
    mean_gap = 365.25 / cfg.promotions_per_year if cfg.promotions_per_year > 0 else np.inf
    next_promo = np.floor(rng.uniform(0.0, 1.0, n) * mean_gap)
    for day in range(cfg.n_days):
        # Draw every array every day, so a day's draws never depend on earlier outcomes.
        change = rng.random(n) < p_change
        factor = rng.uniform(*LIST_CHANGE, n)
        length = rng.integers(PROMO_DAYS[0], PROMO_DAYS[1] + 1, n)
        discount = rng.uniform(*PROMO_DISCOUNT, n)
        gap = np.round(rng.uniform(0.5, 1.5, n) * mean_gap)
        list_price = np.where(change, np.clip(np.round(list_price * factor, 2),
                                              gt.min_price, gt.max_price), list_price)
        start = (day >= next_promo) & (promo_left == 0)
        promo_left = np.where(start, length, promo_left)
        promo_discount = np.where(start, discount, promo_discount)
        next_promo = np.where(start, day + gap, next_promo)
        price = np.where(promo_left > 0, np.round(list_price * (1.0 - promo_discount), 2),
                         list_price)
        prices[:, day] = np.clip(price, gt.min_price, gt.max_price)
        list_prices[:, day] = list_price
        promo_left = np.maximum(promo_left - 1, 0)
    return prices, list_prices


# ----------------------------------------------------------------------------------------------
# Scenarios (docs/market.md, "Scenarios")


def demand_shock(cfg: GenerateSettings) -> np.ndarray:
    """(n_products, n_days) stationary AR(1) log-demand shock, rounded to SHOCK_DIGITS."""
    sc = cfg.scenario
    rng = _rng(cfg.seed, _STREAM_SHOCK)
    noise = rng.standard_normal((cfg.n_products, cfg.n_days))
    shock = np.empty_like(noise)
    shock[:, 0] = sc.shock_sd * noise[:, 0]
    innovation = sc.shock_sd * np.sqrt(1.0 - sc.shock_autocorr**2)
    for day in range(1, cfg.n_days):
        shock[:, day] = sc.shock_autocorr * shock[:, day - 1] + innovation * noise[:, day]
    return np.round(shock, market.SHOCK_DIGITS)


def react_to_shock(gt: GroundTruth, cfg: GenerateSettings, prices: np.ndarray,
                   list_prices: np.ndarray, shock: np.ndarray) -> np.ndarray:
    """The historical prices of a pricer who partly sees the demand shock.

    Its signal is pricer_signal_corr * shock / shock_sd plus independent noise (unit
    variance): on a list-price day it promotes (REACTIVE_PROMO off) when the signal is below
    -SIGNAL_THRESHOLD and prices up (REACTIVE_MARKUP) above +SIGNAL_THRESHOLD.
    """
    sc = cfg.scenario
    rng = _rng(cfg.seed, _STREAM_SIGNAL)
    w = sc.pricer_signal_corr
    signal = (w * shock / sc.shock_sd
              + np.sqrt(1.0 - w**2) * rng.standard_normal(shock.shape))
    regular = prices == list_prices
    reacted = np.where(signal < -SIGNAL_THRESHOLD, np.round(prices * (1.0 - REACTIVE_PROMO), 2),
                       np.where(signal > SIGNAL_THRESHOLD,
                                np.round(prices * (1.0 + REACTIVE_MARKUP), 2), prices))
    return np.clip(np.where(regular, reacted, prices), gt.min_price[:, None],
                   gt.max_price[:, None])


def all_product_days(gt: GroundTruth, cfg: GenerateSettings) -> tuple[np.ndarray, np.ndarray]:
    """(product index, date) of every product-day, product-major (the order true_units takes)."""
    days = np.datetime64(cfg.start_date, "D") + np.arange(cfg.n_days)
    return (np.repeat(np.arange(gt.n_products), cfg.n_days), np.tile(days, gt.n_products))


def draw_stock(gt: GroundTruth, cfg: GenerateSettings, list_prices: np.ndarray) -> np.ndarray:
    """(n_products, n_days) units on hand: the day's expected demand at the list price times a
    lognormal supply factor, plus STOCK_SAFETY_Z standard deviations, rounded down."""
    rng = _rng(cfg.seed, _STREAM_STOCK)
    idx, dates = all_product_days(gt, cfg)
    plan = market.true_units(gt, idx, dates, list_prices.reshape(-1)).reshape(list_prices.shape)
    supply = rng.lognormal(0.0, STOCK_SUPPLY_SD, plan.shape)
    return np.floor(np.maximum(plan * supply + STOCK_SAFETY_Z * np.sqrt(plan), 0.0)).astype(
        np.int64)


def season_starts(n_days: int, season_days: int) -> np.ndarray:
    """First day of each season: seasons of ``season_days`` counted back from the history's
    last day, so the last quarter is one season; what is left at the start is a season of
    its own if at least half a season long, else it joins the first full one."""
    starts = list(range(n_days - season_days, 0, -season_days))[::-1]
    if starts and starts[0] < season_days / 2:
        starts = starts[1:]
    return np.asarray([0, *starts], dtype=np.int64)


def draw_season_stock(gt: GroundTruth, cfg: GenerateSettings, list_prices: np.ndarray,
                      starts: np.ndarray) -> np.ndarray:
    """(n_products, n_seasons) units delivered at each season's start: season_stock_ratio of
    the season's expected demand at the list prices, rounded down (no random draw: the buyer
    plans from the list prices, and the markdown is what clears a wrong plan)."""
    idx, dates = all_product_days(gt, cfg)
    plan = market.true_units(gt, idx, dates, list_prices.reshape(-1)).reshape(list_prices.shape)
    per_season = np.add.reduceat(plan, starts, axis=1)
    return np.floor(cfg.scenario.season_stock_ratio * per_season).astype(np.int64)


def scenario_market(gt: GroundTruth, cfg: GenerateSettings, out: Path
                    ) -> tuple[GroundTruth, np.ndarray]:
    """The scenario's ground truth and historical prices, from today's market ``gt``.

    The base market and its price history are drawn as without a scenario; the scenario's
    own draws come from separate streams.
    """
    sc = cfg.scenario
    prices, list_prices = historical_price_paths(gt, cfg)
    fields: dict[str, Any] = {
        "start_date": cfg.start_date.isoformat(), "demand_form": sc.demand_form,
        "holidays": tuple(market.HolidayWindow(**w.model_dump()) for w in sc.holiday_windows)
        if sc.holidays else ()}
    if sc.price_endogeneity:
        shock = demand_shock(cfg)
        prices = react_to_shock(gt, cfg, prices, list_prices, shock)
        fields.update(shock=shock, shock_autocorr=sc.shock_autocorr, shock_sd=sc.shock_sd)
    if sc.substitution:
        fields["outside_share"] = sc.outside_share
    if sc.reference_prices:
        fields.update(reference_rate=sc.reference_rate, reference_gain=sc.reference_gain,
                      reference_loss=sc.reference_loss, history=prices)
    scenario = market.Scenario(**fields)
    if sc.stockouts:
        # The retailer plans stock for the market it faces (holidays, shock and form included).
        stock = draw_stock(replace(gt, scenario=scenario), cfg, list_prices)
        scenario = replace(scenario, stock=stock,
                           stock_file=str(out / STOCK_FILE) if sc.stock_file else None)
    if sc.inventory == "markdown":
        starts = season_starts(cfg.n_days, sc.season_days)
        season_stock = draw_season_stock(replace(gt, scenario=scenario), cfg, list_prices,
                                         starts)
        scenario = replace(scenario, season_start=starts, season_stock=season_stock,
                           salvage=np.round(sc.salvage_fraction * gt.unit_cost, 2),
                           inventory_prices=prices, stock_file=str(out / STOCK_FILE))
    return replace(gt, scenario=scenario), prices


def stock_frame(gt: GroundTruth, cfg: GenerateSettings, stock: np.ndarray) -> Any:
    """stock.csv as a DataFrame: date,product_id,on_hand, sorted by date then product."""
    import polars as pl

    days = np.datetime64(cfg.start_date, "D") + np.arange(cfg.n_days)
    return pl.DataFrame({
        "date": pl.Series(np.repeat(days, gt.n_products)).cast(pl.Date),
        "product_id": pl.Series(list(gt.product_ids) * cfg.n_days, dtype=pl.String),
        "on_hand": pl.Series(stock.T.reshape(-1).astype(np.int64)),
    })


# ----------------------------------------------------------------------------------------------
# Transactions


@dataclass
class TransactionRows:
    """Columns of transaction rows: day index from start_date, product index, and values."""

    day: np.ndarray
    product: np.ndarray
    quantity: np.ndarray
    unit_price: np.ndarray
    store: np.ndarray

    def __len__(self) -> int:
        return len(self.day)

    def take(self, which: np.ndarray) -> TransactionRows:
        return TransactionRows(self.day[which], self.product[which], self.quantity[which],
                               self.unit_price[which], self.store[which])

    @staticmethod
    def concat(parts: list[TransactionRows]) -> TransactionRows:
        return TransactionRows(*(np.concatenate([getattr(p, name) for p in parts])
                                 for name in ("day", "product", "quantity", "unit_price",
                                              "store")))

    @staticmethod
    def empty() -> TransactionRows:
        return TransactionRows(np.zeros(0, np.int32), np.zeros(0, np.int32),
                               np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int16))


def split_units(units: np.ndarray, max_units: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split each product's daily units into transactions of 1..max_units units.

    Sizes are drawn uniformly and the last transaction of a product-day takes what is left.

    Args:
        units: (n,) non-negative daily units per product.

    Returns:
        (product index, size) of every transaction, in product order; sizes sum to ``units``.
    """
    total = int(units.sum())
    if total == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    # Draw one candidate size per unit (enough even if every size is 1), then cut each
    # product's run of candidates where the sizes add up to its units.
    sizes = rng.integers(1, max_units + 1, total)
    owner = np.repeat(np.arange(len(units), dtype=np.int32), units)
    before = np.cumsum(sizes) - sizes
    first = np.cumsum(units) - units  # position of each product's first candidate
    before -= np.repeat(before[first[units > 0]], units[units > 0])
    left = units[owner] - before
    keep = left > 0
    return owner[keep], np.minimum(sizes, left)[keep]


def simulate_day(gt: GroundTruth, cfg: GenerateSettings, day: int, day_prices: np.ndarray,
                 demand: np.ndarray | None = None, stock: np.ndarray | None = None,
                 stockouts: list[int] | None = None) -> tuple[TransactionRows, TransactionRows]:
    """One day's sales of every product at ``day_prices``, and the returns they cause.

    Args:
        demand: the day's expected units of every product (a scenario market: computed for
            the whole history at once); None: ``expected_units`` at ``day_prices``.
        stock: units on hand of every product (stock-outs): sales are min(draw, stock).
        stockouts: if given, the number of products whose draw exceeded the stock is appended.

    Returns:
        (sales on ``day``, returns dated 1-7 days later, possibly past the history's end).
    """
    rng = _rng(cfg.seed, _STREAM_DAY, day)
    n = gt.n_products
    today = np.datetime64(cfg.start_date, "D") + day
    lam = expected_units(gt, np.arange(n), today, day_prices) if demand is None else demand
    units = rng.poisson(lam)
    if stock is not None:
        if stockouts is not None:
            stockouts.append(int(np.count_nonzero(units > stock)))
        units = np.minimum(units, stock)
    product, size = split_units(units, cfg.max_units_per_transaction, rng)
    n_tx = len(product)
    if cfg.n_stores > 0:
        weights = 1.0 / np.arange(1, cfg.n_stores + 1)  # S1 is the busiest store
        store = rng.choice(cfg.n_stores, size=n_tx, p=weights / weights.sum()).astype(np.int16)
    else:
        store = np.zeros(n_tx, np.int16)
    price = day_prices[product]
    sales = TransactionRows(np.full(n_tx, day, np.int32), product, size, price, store)
    returned = rng.random(n_tx) < cfg.return_rate
    delay = rng.integers(RETURN_DELAY_DAYS[0], RETURN_DELAY_DAYS[1] + 1, n_tx)
    returns = sales.take(returned)
    returns.day = returns.day + delay[returned].astype(np.int32)
    returns.quantity = -returns.quantity
    return sales, returns


def file_periods(start: date, n_days: int, period: str) -> list[tuple[str, int, int]]:
    """Consecutive day ranges, one per file: [(name, first day, end day exclusive)].

    Names: ``2023-01`` (month), ``2023-W01`` (ISO week, so names sort by time), ``2023-01-01``.
    """
    def key(day: date) -> str:
        if period == "month":
            return f"{day.year:04d}-{day.month:02d}"
        if period == "week":
            iso = day.isocalendar()
            return f"{iso.year:04d}-W{iso.week:02d}"
        return day.isoformat()

    periods: list[tuple[str, int, int]] = []
    for offset in range(n_days):
        name = key(start + timedelta(days=offset))
        if periods and periods[-1][0] == name:
            periods[-1] = (name, periods[-1][1], offset + 1)
        else:
            periods.append((name, offset, offset + 1))
    return periods


def _frame(rows: TransactionRows, gt: GroundTruth, cfg: GenerateSettings) -> Any:
    """The transaction rows as a Polars DataFrame in the raw contract."""
    import polars as pl

    epoch_day = (np.datetime64(cfg.start_date, "D") - np.datetime64(0, "D")).astype(np.int64)
    columns = {
        "date": pl.Series((rows.day + epoch_day).astype(np.int32)).cast(pl.Date),
        "product_id": pl.Series(gt.product_ids, dtype=pl.String).gather(rows.product),
        "quantity": pl.Series(rows.quantity.astype(np.int64)),
        "unit_price": pl.Series(rows.unit_price.astype(np.float64)),
    }
    if cfg.n_stores > 0:
        stores = pl.Series([f"S{s + 1}" for s in range(cfg.n_stores)], dtype=pl.String)
        columns["store_id"] = stores.gather(rows.store)
    return pl.DataFrame(columns)


def write_table(frame: Any, path: Path, file_format: str) -> None:
    """Write a DataFrame atomically as CSV (prices with 2 decimals), CSV.gz or Parquet.

    The gzip header carries no time or file name, so re-runs are byte-identical.
    """
    with atomic_write(path, "wb") as handle:
        if file_format == "parquet":
            frame.write_parquet(handle)
        elif file_format == "csv.gz":
            with gzip.GzipFile(fileobj=handle, mode="wb", mtime=0, filename="",
                               compresslevel=6) as packed:
                frame.write_csv(packed, float_precision=PRICE_DECIMALS)
        else:
            frame.write_csv(handle, float_precision=PRICE_DECIMALS)


# ----------------------------------------------------------------------------------------------
# The stage


def _write_transactions(staging: Path, final_dir: Path, gt: GroundTruth, cfg: GenerateSettings,
                        prices: np.ndarray, monitor: RunMonitor, stockouts: list[int],
                        on_hand: np.ndarray | None = None) -> tuple[list[Path], int, int, int]:
    """Simulate the market day by day and write one transaction file per period into
    ``staging``. Returns (final paths of the files, rows, return rows, gross units sold);
    appends each day's stocked-out product count to ``stockouts``. With inventory, fills
    ``on_hand`` ((n_products, n_days)) with the units on hand at each day's opening."""
    demand = stock = season_stock = None
    if gt.scenario is not None:
        idx, dates = all_product_days(gt, cfg)
        # Uncapped demand (the stock cap is applied to the draw).
        uncapped = replace(gt.scenario, stock=None, season_stock=None)
        demand = market.true_units(replace(gt, scenario=uncapped),
                                   idx, dates, prices.reshape(-1)).reshape(prices.shape)
        stock = gt.scenario.stock
        season_stock = gt.scenario.season_stock
    if season_stock is not None:
        assert gt.scenario is not None and gt.scenario.season_start is not None
        delivery = {int(day): i for i, day in enumerate(gt.scenario.season_start)}
        left = np.zeros(gt.n_products, dtype=np.int64)
    periods = file_periods(cfg.start_date, cfg.n_days, cfg.file_period)
    monitor.add_bar("files", "transaction files", len(periods))
    started = time.monotonic()
    n_rows = n_returns = gross_units = 0
    written: list[Path] = []
    pending = TransactionRows.empty()  # returns dated after the period they were made in
    for name, first_day, end_day in periods:
        parts = []
        for day in range(first_day, end_day):
            today = None if stock is None else stock[:, day]
            if season_stock is not None:
                if day in delivery:  # the season's one delivery; the rest was sold off
                    left = season_stock[:, delivery[day]].copy()
                today = left
                if on_hand is not None:
                    on_hand[:, day] = left
            sales, returns = simulate_day(
                gt, cfg, day, prices[:, day], None if demand is None else demand[:, day],
                today, stockouts)
            if season_stock is not None:
                left = left - np.bincount(sales.product, sales.quantity,
                                          minlength=gt.n_products).astype(np.int64)
            parts.append(sales)
            gross_units += int(sales.quantity.sum())
            pending = TransactionRows.concat(
                [pending, returns.take(returns.day < cfg.n_days)])
        due = pending.day < end_day
        returns_now = pending.take(due)
        pending = pending.take(~due)
        rows = TransactionRows.concat([*parts, returns_now])
        # Stable sort: within a product-day, sales come before returns.
        order = np.argsort(rows.day.astype(np.int64) * gt.n_products + rows.product,
                           kind="stable")
        rows = rows.take(order)
        path = staging / f"transactions_{name}.{cfg.file_format}"
        write_table(_frame(rows, gt, cfg), path, cfg.file_format)
        written.append(final_dir / path.name)
        n_rows += len(rows)
        n_returns += len(returns_now)
        elapsed = max(time.monotonic() - started, 1e-9)
        monitor.update_bar("files", advance=1)
        monitor.set_metric("rows", f"{n_rows:,}")
        monitor.set_metric("rows/s", f"{n_rows / elapsed:,.0f}")
        monitor.check_memory()

    return written, n_rows, n_returns, gross_units


def run_generate(settings: Settings, monitor: RunMonitor) -> StageResult:
    """Write a synthetic market: transactions/, catalog.csv and ground_truth.json.

    Args:
        settings: uses the ``generate`` section.
        monitor: a files bar, rows and rows/s metrics; memory is checked after every file.

    Returns:
        StageResult with summary products, days, transactions (rows), return_rows, units
        (gross units sold), files (transaction files) and bytes (all files written).

    Raises:
        MemoryBudgetExceeded: --max-memory reached (the previous output is kept).
        DiskFullError: the disk filled up (the previous output is kept).
    """
    import polars as pl

    cfg = settings.generate
    out = Path(cfg.output_dir)
    # A user's own data under the documented data/raw paths must never be replaced by a
    # synthetic market: only a folder generate made (its marker) is written into.
    check_output_dir(out, "generate")
    out.mkdir(parents=True, exist_ok=True)
    write_owner_marker(out, "generate", list_files=False)
    sweep_stale_tmp(out)  # leftovers of a run killed before it could clean up

    gt = draw_market(cfg)
    if cfg.scenario.active:
        gt, prices = scenario_market(gt, cfg, out)
    else:
        prices = historical_prices(gt, cfg)
    stock = None if gt.scenario is None else gt.scenario.stock
    on_hand = None
    if gt.scenario is not None and gt.scenario.season_stock is not None:
        # Inventory: on hand follows the sales, so the simulation fills it in.
        on_hand = stock = np.zeros((gt.n_products, cfg.n_days), dtype=np.int64)
    stockouts: list[int] = []

    # Transactions are staged as a folder; the catalog and ground truth of the same market are
    # staged beside them and renamed into place right after the folder swap. Between that swap
    # and the last rename, data/raw mixes two markets: the INCOMPLETE_MARKER says so, and the
    # raw reader refuses such a folder (a kill there is the only way to see it).
    staged_files = {out / CATALOG_FILE: tmp_path_for(out / CATALOG_FILE),
                    out / GROUND_TRUTH_FILE: tmp_path_for(out / GROUND_TRUTH_FILE)}
    if stock is not None and (cfg.scenario.stock_file or on_hand is not None):
        staged_files[out / STOCK_FILE] = tmp_path_for(out / STOCK_FILE)
    marker = out / INCOMPLETE_MARKER
    swapped = False  # True once the new transactions/ replaced the old
    try:
        with staged_dir(out / TRANSACTIONS_DIR, owner="generate") as staging:
            written, n_rows, n_returns, gross_units = _write_transactions(
                staging, out / TRANSACTIONS_DIR, gt, cfg, prices, monitor, stockouts, on_hand)

            catalog = pl.DataFrame({
                "product_id": list(gt.product_ids), "unit_cost": gt.unit_cost,
                "min_price": gt.min_price, "max_price": gt.max_price, "category": list(gt.category),
            })
            write_table(catalog, staged_files[out / CATALOG_FILE], "csv")
            write_json(staged_files[out / GROUND_TRUTH_FILE], gt.to_dict())
            if stock is not None and out / STOCK_FILE in staged_files:
                write_table(stock_frame(gt, cfg, stock), staged_files[out / STOCK_FILE], "csv")
            write_json(marker, {"stage": "generate", "note": INCOMPLETE_NOTE})
        swapped = True
        for final, staged in staged_files.items():
            os.replace(staged, final)
    except BaseException:
        for staged in staged_files.values():
            staged.unlink(missing_ok=True)
        if not swapped:  # the previous market is still whole
            marker.unlink(missing_ok=True)
        raise
    marker.unlink()

    files = [*written, *staged_files]
    summary: dict[str, Any] = {
        "products": gt.n_products,
        "days": cfg.n_days,
        "transactions": n_rows,
        "return_rows": n_returns,
        "units": gross_units,
        "files": len(written),
        "bytes": sum(p.stat().st_size for p in files),
    }
    if stock is not None:
        # Share of product-days whose demand draw exceeded the stock (sales == on_hand there).
        summary["stockout_days_pct"] = round(100.0 * sum(stockouts) / stock.size, 2)
    notes = [f"transactions: {out / TRANSACTIONS_DIR}/transactions_*.{cfg.file_format}",
             f"ground truth: {out / GROUND_TRUTH_FILE} (true demand; see docs/market.md)"]
    return StageResult(stage="generate", output_dir=out, summary=summary, notes=notes)
