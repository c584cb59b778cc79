"""`pricectl recommend`: prices for the days after the data ends, under the merchant's rules.

Each product starts from its last known state (its last price, the trailing 30 days of its
prices for the weekly and monthly rules) and is priced day by day over ``recommend.horizon``
open days, using the demand model at those future dates (day of week, season).

Candidate prices: the product's K grid levels (:func:`pricing.price_grid`), moved to the
allowed endings or ladder where ``rules`` sets them (:func:`pricing.snap_to_rules`), plus its
current price (so a frozen price can be held exactly). Every day, every rule's mask comes
from :func:`pricing.rule_masks` given the policy's own previous prices; a policy picks among
the candidates every rule allows, so each price obeys every rule by construction, and the rule
that bound is the first one that refused what the policy would have picked with no rules.

The agent sees, for each future day, the product's last processed feature row with the
calendar features (day of week, day of year, weekend) moved to that date; lags, rolling
windows, the history window and the static columns are carried forward unchanged (an
approximation: the future's sales are unknown). The forecast and own-price features come from
the agent's own previous price, as in training (docs/recommend.md).

Outputs (``recommend.output_dir/<start date>/``, replaced as a whole): prices.csv,
explain.json, summary.md.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.config import CatalogColumnMap, Settings
from pricing_cli.errors import ConfigError, MissingInputError, ModelError
from pricing_cli.monitor import RunMonitor
from pricing_cli.pricing import (
    MONTH_DAYS,
    RULE_ORDER,
    WEEK_DAYS,
    ProductRules,
    binding_rules,
    check_rules_feasible,
    combine_rule_masks,
    is_price_change,
    price_grid,
    resolve_rules,
    restrict_to_trust_region,
    rule_masks,
    snap_to_rules,
    trust_region_of,
    within_daily_change,
)
from pricing_cli.runinfo import StageResult
from pricing_cli.stages.batches import SPLITS
from pricing_cli.storage import check_output_dir, staged_dir, write_json

if TYPE_CHECKING:
    from pricing_cli.agent.processed import ProcessedData

# binding_rule of a move the trust region refused (no merchant rule did).
TRUST_REGION_RULE = "trust_region"
# Calendar features moved to the future date; every other feature is carried forward.
CALENDAR_FEATURES = ("dow_sin", "dow_cos", "doy_sin", "doy_cos", "is_weekend")
POLICIES = ("agent", "greedy", "planner", "static", "historical")
# Candidates beyond the K grid levels: the current price moved to an allowed ending, and the
# current price itself (last, so a frozen price is held exactly).
EXTRA_CANDIDATES = 2
PRICES_COLUMNS = ("product_id", "date", "current_price", "recommended_price", "change_pct",
                  "expected_units", "expected_profit", "profit_low", "profit_high",
                  "binding_rule")

ChooseFn = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class ProductState:
    """The last known state of the priced products (arrays by product, in processed order).

    Attributes:
        product_index, product_id, category: identity (category None where unknown).
        unit_cost, min_price, max_price, price: from each product's last processed row.
        last_date: the data's last day.
        history: (n, MONTH_DAYS) the prices of the last 30 days, oldest first (NaN: unknown).
        last_rows: (split, row) of each product's last processed row, for its features.
    """

    product_index: np.ndarray
    product_id: np.ndarray
    category: list[str | None]
    unit_cost: np.ndarray
    min_price: np.ndarray
    max_price: np.ndarray
    price: np.ndarray
    last_date: np.datetime64
    history: np.ndarray
    last_rows: list[tuple[str, int]]

    @property
    def n(self) -> int:
        return int(self.product_index.size)

    def subset(self, rows: np.ndarray) -> ProductState:
        return ProductState(self.product_index[rows], self.product_id[rows],
                            [self.category[i] for i in rows], self.unit_cost[rows],
                            self.min_price[rows], self.max_price[rows], self.price[rows],
                            self.last_date, self.history[rows],
                            [self.last_rows[i] for i in rows])


def load_state(processed_dir: ProcessedData | Path, catalog_path: Path | None,
               catalog_columns: CatalogColumnMap | None = None) -> ProductState:
    """Each product's last processed row and its last 30 days of prices.

    Raises:
        MissingInputError: no processed meta file.
    """
    import polars as pl

    from pricing_cli.agent.processed import as_processed

    processed = as_processed(processed_dir)
    frames = [processed.meta(split, [
        "product_index", "product_id", "date", "price", "unit_cost", "min_price", "max_price"])
        .with_row_index("row").with_columns(split=pl.lit(split))
        for split in SPLITS if processed.has_split(split)]
    if not frames:
        raise MissingInputError(f"no processed split in {processed.folder}",
                                "Run `pricectl pipeline` (or features, preprocess, merge) first.")
    meta = pl.concat(frames).sort("product_index", "date")
    last_date = meta["date"].to_numpy().astype("datetime64[D]").max()
    last = meta.group_by("product_index", maintain_order=True).last()
    history = np.full((last.height, MONTH_DAYS), np.nan)
    days_back = (last_date - meta["date"].to_numpy().astype("datetime64[D]")).astype(np.int64)
    position = {int(p): i for i, p in enumerate(last["product_index"].to_list())}
    recent = days_back < MONTH_DAYS
    rows = np.array([position[int(p)] for p in meta["product_index"].to_numpy()[recent]])
    if rows.size:
        history[rows, MONTH_DAYS - 1 - days_back[recent]] = meta["price"].to_numpy()[recent]
    from pricing_cli.agent.guardrails import catalog_categories

    categories = catalog_categories(catalog_path, catalog_columns)
    ids = [str(p) for p in last["product_id"].to_list()]

    def floats(name: str) -> np.ndarray:
        return last[name].cast(pl.Float64).to_numpy()

    return ProductState(
        product_index=last["product_index"].to_numpy().astype(np.int64),
        product_id=np.array(ids, dtype=object), category=[categories.get(p) for p in ids],
        unit_cost=floats("unit_cost"), min_price=floats("min_price"),
        max_price=floats("max_price"), price=floats("price"), last_date=last_date,
        history=history,
        last_rows=list(zip(last["split"].to_list(), last["row"].to_list(), strict=True)))


def select_products(state: ProductState, products: str | None) -> ProductState:
    """The products named by ``--products``: a file (one product_id per line, or a CSV with a
    product_id column) or comma-separated ids; None: all.

    Raises:
        ConfigError: an id is not among the processed products, or the file is empty.
    """
    if not products:
        return state
    path = Path(products)
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        wanted = [line.split(",")[0].strip() for line in lines if line]
        if wanted and wanted[0] == "product_id":
            wanted = wanted[1:]
        source = str(path)
    else:
        wanted, source = [p.strip() for p in products.split(",") if p.strip()], "--products"
    if not wanted:
        raise ConfigError(f"{source} names no product", "Give product_ids, one per line or "
                          "comma-separated.")
    index = {str(p): i for i, p in enumerate(state.product_id)}
    unknown = [p for p in wanted if p not in index]
    if unknown:
        raise ConfigError(f"{source}: product(s) {', '.join(map(repr, unknown[:5]))} are not "
                          f"in the processed data ({len(unknown)} unknown)",
                          f"Known products include {', '.join(list(index)[:3])}; re-run the "
                          "pipeline if the catalog changed.")
    return state.subset(np.array(sorted({index[p] for p in wanted})))


def horizon_dates(last_date: np.datetime64, start: date | None, horizon: int,
                  closed: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(open days to price, closed days left out) of the ``horizon`` calendar days from
    ``start`` (default: the day after ``last_date``).

    Raises:
        ConfigError: ``start`` is not after the data's last day.
    """
    first = last_date + 1 if start is None else np.datetime64(start, "D")
    if first <= last_date:
        raise ConfigError(f"--start {first} is not after the data's last day {last_date}",
                          f"recommend prices future days: pass --start {last_date + 1} or later, "
                          "or leave it out.")
    days = first + np.arange(horizon)
    shut = closed(days) if closed is not None else np.zeros(horizon, dtype=bool)
    return days[~shut], days[shut]


# ----------------------------------------------------------------------------------------------
# The day loop


@dataclass
class Horizon:
    """Everything the policies need, fixed before the first day is priced.

    Attributes:
        state: the products.
        rules: their resolved guardrails.
        days: (H,) open days to price.
        candidates: (n, K + 2) candidate prices: the grid levels, the current price moved to
            an allowed ending, the current price.
        profit: (H, n, C) expected profit of each candidate on each day (fitted demand).
        units: (H, n, C) expected units.
        change_cost: (n,) money per price change (zeros: free).
        competitor: (H, n) competitor prices or None.
        trust_region: (lower, upper), each (n,): the run's trust region (train.trust_region:
            the prices the data backed, widened by the margin; NaN: no limit) or None.
    """

    state: ProductState
    rules: ProductRules
    days: np.ndarray
    candidates: np.ndarray
    profit: np.ndarray
    units: np.ndarray
    change_cost: np.ndarray
    competitor: np.ndarray | None
    trust_region: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def hold_column(self) -> int:
        return self.candidates.shape[1] - 1


@dataclass
class Plan:
    """A policy's prices over the horizon: (H, n) candidate columns, prices and the rule that
    bound each choice ("none" where none did)."""

    columns: np.ndarray
    prices: np.ndarray
    binding: np.ndarray


def build_horizon(state: ProductState, rules: ProductRules, days: np.ndarray, demand: Any,
                  levels: int, change_cost: np.ndarray | None,
                  competitor: np.ndarray | None) -> Horizon:
    """Candidate prices and their expected units and profit on every day of the horizon."""
    grid = snap_to_rules(price_grid(state.min_price, state.max_price, levels), rules)
    # The current price moved to the nearest allowed ending: the smallest step that makes an
    # off-ending price compliant (the grid may be coarser than a tight daily limit).
    nearest = snap_to_rules(state.price[:, None], rules)[:, 0]
    candidates = np.column_stack([grid, nearest, state.price])
    n, width = candidates.shape
    units = np.empty((len(days), n, width))
    for d, day in enumerate(days):
        units[d] = np.asarray(demand.expected_units(
            np.repeat(state.product_index, width), np.full(n * width, day),
            candidates.ravel()), dtype=np.float64).reshape(n, width)
    profit = (candidates - state.unit_cost[:, None])[None] * units
    cost = np.zeros(n) if change_cost is None else np.asarray(change_cost)[state.product_index]
    return Horizon(state, rules, days, candidates, profit, units, cost, competitor)


def _timeline(horizon: Horizon) -> tuple[np.ndarray, np.ndarray]:
    """(n, T) prices by calendar day from 30 days before the data's end to the horizon's last
    day (history, then the last price held over any gap and closed days; NaN where still
    unknown), and the timeline position of every horizon day."""
    state = horizon.state
    offset = (horizon.days - state.last_date).astype(np.int64) + MONTH_DAYS - 1
    timeline = np.full((state.n, int(offset[-1]) + 1), np.nan)
    timeline[:, :MONTH_DAYS] = state.history
    return timeline, offset


def walk(horizon: Horizon, choose: ChooseFn) -> Plan:
    """Run a policy day by day under every rule.

    ``choose(day, allowed, previous_column, previous_price, held_days)`` returns a candidate
    column per product given the (n, C) bool mask of what it may pick today; it is called a
    second time with every candidate allowed, to find the rule that bound.

    Raises:
        ConfigError: the rules leave some product no feasible price on some day.
    """
    state, rules = horizon.state, horizon.rules
    candidates = horizon.candidates
    n, H = state.n, len(horizon.days)
    timeline, offset = _timeline(horizon)
    previous = state.price.copy()
    previous_column = np.full(n, horizon.hold_column)
    held = _held_days(state.history)
    plan = Plan(np.zeros((H, n), dtype=np.int64), np.zeros((H, n)),
                np.full((H, n), "none", dtype=object))
    everything = np.ones(candidates.shape, dtype=bool)
    at = MONTH_DAYS  # first timeline day not yet filled
    for d, day in enumerate(horizon.days):
        t = int(offset[d])
        timeline[:, at:t] = previous[:, None]  # gap and closed days: the price stays
        window = timeline[:, t - MONTH_DAYS:t]
        changes = np.nansum(is_price_change(window[:, 1:], window[:, :-1]), axis=1)
        masks = rule_masks(candidates, state.unit_cost, state.min_price, state.max_price, rules,
                           previous=previous, week_ago=timeline[:, t - WEEK_DAYS],
                           changes_in_month=changes, day=day,
                           competitor=None if horizon.competitor is None
                           else horizon.competitor[d])
        allowed = combine_rule_masks(masks)
        check_rules_feasible(allowed, masks, rules, day)
        if horizon.trust_region is not None:
            # Do no harm: only prices the data backed (a product whose allowed prices all lie
            # outside keeps the allowed one nearest to the region, and moves toward it).
            restricted, _ = restrict_to_trust_region(allowed, candidates,
                                                     *horizon.trust_region)
            allowed = restricted.astype(bool)
        chosen = np.asarray(choose(d, allowed, previous_column, previous, held), dtype=np.int64)
        free = np.asarray(choose(d, everything, previous_column, previous, held), dtype=np.int64)
        assert allowed[np.arange(n), chosen].all(), "a policy picked a refused price"
        prices = candidates[np.arange(n), chosen]
        plan.columns[d], plan.prices[d] = chosen, prices
        plan.binding[d] = binding_rules(masks, free, chosen)
        if horizon.trust_region is not None:  # no rule refused the free pick: the region did
            unexplained = (plan.binding[d] == "none") & (chosen != free)
            plan.binding[d][unexplained] = TRUST_REGION_RULE
        held = np.where(is_price_change(prices, previous), 1.0, held + 1.0)
        previous, previous_column = prices, chosen
        timeline[:, t] = prices
        at = t + 1
    return plan


def _held_days(history: np.ndarray) -> np.ndarray:
    """(n,) days the last price had been held at the end of the history (1 at least)."""
    last = history[:, -1:]
    same = ~is_price_change(history, last) & np.isfinite(history)
    # Count the trailing run of days at the last price.
    run = np.argmin(same[:, ::-1], axis=1)
    run[same.all(axis=1)] = history.shape[1]
    return np.maximum(run, 1).astype(np.float64)


def _net(horizon: Horizon, d: int, previous: np.ndarray) -> np.ndarray:
    """(n, C) today's profit net of the change cost of moving from ``previous``."""
    moves = is_price_change(horizon.candidates, previous[:, None])
    return horizon.profit[d] - np.where(moves, horizon.change_cost[:, None], 0.0)


def _best(values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    return np.where(allowed, values, -np.inf).argmax(axis=1)


def greedy_policy(horizon: Horizon, demand: Any = None) -> ChooseFn:
    """Each day's most profitable allowed candidate (net of the change cost).

    With ``demand`` that links a product to its siblings (``baselines.prices_jointly``), each
    category-day is then priced jointly from there (``baselines.joint_levels``, over the
    candidates every rule allows), as evaluate's greedy does."""
    from pricing_cli.agent.baselines import CategoryDays, joint_levels, prices_jointly

    state = horizon.state
    joint = demand is not None and prices_jointly(demand)

    def choose(d: int, allowed: np.ndarray, prev_col: np.ndarray, prev: np.ndarray,
               held: np.ndarray) -> np.ndarray:
        net = _net(horizon, d, prev)
        column = _best(net, allowed)
        if not joint:
            return column
        dates = np.full(state.n, horizon.days[d])
        categories = CategoryDays.of_rows(state.product_index, dates, demand.product_category)
        charges = net - horizon.profit[d]  # minus the change cost of each candidate
        return joint_levels(demand, state.product_index, dates, horizon.candidates,
                            state.unit_cost, categories, np.arange(state.n),
                            allowed.astype(np.int8), column, -charges)
    return choose


def planner_policy(horizon: Horizon) -> ChooseFn:
    """The best price path under the fitted demand: dynamic programming over days and
    candidates, with the bounds, daily limit, freeze, margin, endings, ladder and competitor
    rules in the transitions. The weekly and monthly limits depend on the whole path, so they
    are enforced on the walk only (the plan stays feasible; it may then not be optimal)."""
    state, rules, cand = horizon.state, horizon.rules, horizon.candidates
    H = len(horizon.days)
    value = np.zeros(horizon.profit.shape)
    moves = is_price_change(cand[:, None, :], cand[:, :, None])  # [s, from j, to k]
    step = within_daily_change(cand[:, None, :], cand[:, :, None],
                               rules.max_change_per_day[:, None, None])
    for d in reversed(range(H)):
        value[d] = horizon.profit[d]
        if d + 1 < H:
            masks = rule_masks(cand, state.unit_cost, state.min_price, state.max_price, rules,
                               previous=cand[:, -1], week_ago=np.full(state.n, np.nan),
                               changes_in_month=np.zeros(state.n), day=horizon.days[d + 1],
                               competitor=None if horizon.competitor is None
                               else horizon.competitor[d + 1])
            ok = np.logical_and.reduce([masks[k] for k in ("bounds", "min_margin",
                                                           "price_endings", "price_ladder",
                                                           "max_above_competitor")])
            frozen = rules.frozen_on(horizon.days[d + 1])
            allowed = step & ok[:, None, :] & (~moves | ~frozen[:, None, None])
            tomorrow = value[d + 1][:, None, :] - np.where(
                moves, horizon.change_cost[:, None, None], 0.0)
            best = np.where(allowed, tomorrow, -np.inf).max(axis=2)
            value[d] = value[d] + np.where(np.isfinite(best), best, -1e18)

    def choose(d: int, allowed: np.ndarray, prev_col: np.ndarray, prev: np.ndarray,
               held: np.ndarray) -> np.ndarray:
        moved = is_price_change(cand, prev[:, None])
        return _best(value[d] - np.where(moved, horizon.change_cost[:, None], 0.0), allowed)
    return choose


def static_policy(horizon: Horizon) -> ChooseFn:
    """One price per product for the whole horizon: the candidate with the largest summed
    expected profit among those every day's stateless rules allow (then held)."""
    total = horizon.profit.sum(axis=0)

    def choose(d: int, allowed: np.ndarray, prev_col: np.ndarray, prev: np.ndarray,
               held: np.ndarray) -> np.ndarray:
        if d == 0:
            return _best(total, allowed)
        keep = allowed[np.arange(len(prev_col)), prev_col]
        return np.where(keep, prev_col, _best(total, allowed))
    return choose


def historical_policy(horizon: Horizon) -> ChooseFn:
    """Keep the current price (the "do nothing" reference); where a rule refuses it, the
    allowed candidate nearest to it."""
    distance = -np.abs(horizon.candidates - horizon.state.price[:, None])
    distance[:, -1] = 1.0  # the current price itself comes first

    def choose(d: int, allowed: np.ndarray, prev_col: np.ndarray, prev: np.ndarray,
               held: np.ndarray) -> np.ndarray:
        return _best(distance, allowed)
    return choose


def agent_policy(horizon: Horizon, agent: Any, market: Any) -> ChooseFn:
    """The trained agent on the future rows of ``market`` (one row per product and open day,
    products in order). It picks grid levels (its action space); the two extra columns (the
    current price, and it moved to an allowed ending) are taken only where the rules allow no
    grid level (a freeze, the monthly limit reached on day one, a daily limit finer than the
    grid): the allowed one nearest to yesterday's price."""
    from pricing_cli.agent.env import clip_to_feasible

    levels = horizon.candidates.shape[1] - EXTRA_CANDIDATES
    H = len(horizon.days)

    def choose(d: int, allowed: np.ndarray, prev_col: np.ndarray, prev: np.ndarray,
               held: np.ndarray) -> np.ndarray:
        rows = np.arange(horizon.state.n) * H + d
        obs = market.observation(rows, prev, held)
        grid_ok = allowed[:, :levels]
        some = np.asarray(grid_ok.any(axis=1))
        mask = np.where(some[:, None], grid_ok, True)
        picked = agent.choose_levels(obs, mask)
        picked, _ = clip_to_feasible(picked, mask)
        extra = -np.abs(horizon.candidates[:, levels:] - prev[:, None])
        fallback = levels + _best(extra, allowed[:, levels:])
        return np.where(some, picked, fallback)
    return choose


def future_market(processed_dir: ProcessedData | Path, horizon: Horizon, folder: Path,
                  demand: Any,
                  scalers: dict[str, Any], settings: Settings) -> Any:
    """The horizon's rows written in the processed-data contract into ``folder`` and opened
    with the env's one reader (:func:`env.load_market`): each row is its product's last
    processed feature row with the calendar features of the future date."""
    import polars as pl

    from pricing_cli.agent.env import load_market
    from pricing_cli.agent.processed import as_processed
    from pricing_cli.stages.features import feature_definitions

    processed = as_processed(processed_dir)
    state, days, H = horizon.state, horizon.days, len(horizon.days)
    names = json.loads((processed.folder / "feature_cols.json").read_text(encoding="utf-8"))
    # X through the checked reader (header and size checked, memory-mapped, never unpickled).
    last = np.stack([np.asarray(processed.features(s)[r], dtype=np.float32)
                     for s, r in state.last_rows])
    rows = np.repeat(last, H, axis=0)
    definitions = feature_definitions(settings.features)
    calendar = pl.DataFrame({"date": pl.Series(days, dtype=pl.Date)}).select(
        [definitions[c].alias(c) for c in CALENDAR_FEATURES])
    for column in CALENDAR_FEATURES:
        name = f"f_{column}"
        if name in names and name in scalers:
            scale = scalers[name]
            moved = (calendar[column].to_numpy() - scale["mean"]) / scale["std"]
            rows[:, names.index(name)] = np.tile(moved, state.n).astype(np.float32)
    stats = processed.stats.raw
    levels = int(stats["price_levels"])
    np.save(folder / "X_test.npy", rows)
    np.savez(folder / "masks_test.npz", price_level=np.ones((rows.shape[0], levels), np.int8),
             price_move=np.ones((rows.shape[0], 3), np.int8))
    n_rows = rows.shape[0]
    pl.DataFrame({
        "product_index": pl.Series(np.repeat(state.product_index, H), dtype=pl.Int32),
        "product_id": pl.Series(np.repeat(state.product_id, H).tolist(), dtype=pl.String),
        "date": pl.Series(np.tile(days, state.n), dtype=pl.Date),
        "split": pl.Series(["test"] * n_rows, dtype=pl.String),
        "price": np.repeat(state.price, H), "units": np.zeros(n_rows),
        "unit_cost": np.repeat(state.unit_cost, H), "min_price": np.repeat(state.min_price, H),
        "max_price": np.repeat(state.max_price, H), "ref_price": np.repeat(state.price, H),
    }).write_parquet(folder / "meta_test.parquet")
    (folder / "feature_cols.json").write_text(json.dumps(names), encoding="utf-8")
    write_json(folder / "preprocessing_stats.json", stats)
    return load_market(folder, "test", demand, stats)


# ----------------------------------------------------------------------------------------------
# The stage


def run_recommend(settings: Settings, monitor: RunMonitor, *, products: str | None = None,
                  model: str | None = None) -> StageResult:
    """Write prices for ``recommend.horizon`` days after the data ends (see module docstring).

    Inputs: the processed splits (``merge.output_dir``), the run folder (``model``, else
    ``evaluate.model``, else the newest complete run), the catalog (categories), the
    feature scalers (the agent's calendar features) and ``rules.competitor_prices`` if set.

    Raises:
        MissingInputError, ModelError: an input is missing.
        ConfigError: bad --products / --start, or rules that leave a product no price.
    """
    from pricing_cli.agent.evaluate import find_run_dir

    rec = settings.recommend
    processed_dir = Path(settings.merge.output_dir)
    from pricing_cli.agent.processed import STATS_JSON, ProcessedData

    processed = ProcessedData(processed_dir)  # each processed file read once
    if model is not None:
        settings = settings.model_copy(update={"evaluate": settings.evaluate.model_copy(
            update={"model": model})})
    run_dir = find_run_dir(settings)
    state = select_products(load_state(processed, Path(settings.data.catalog),
                                       settings.data.catalog_columns), products)
    closed = processed.closed_days(settings.data)
    days, shut = horizon_dates(state.last_date, rec.start, rec.horizon, closed.is_closed)
    if days.size == 0:
        raise ConfigError(f"every day of the horizon from {rec.start or state.last_date + 1} is "
                          "a closed day", "Pass a longer --horizon or check data.closed_*.")
    output_dir = Path(rec.output_dir) / str(days[0])
    check_output_dir(output_dir, "recommend", [processed_dir, run_dir])
    rules = resolve_rules(settings.rules, list(state.product_id), state.category,
                          float(settings.preprocess.max_daily_change))
    competitor = None
    if settings.rules.competitor_prices:
        from pricing_cli.agent.guardrails import read_competitor_prices

        competitor = read_competitor_prices(Path(settings.rules.competitor_prices),
                                            list(state.product_id), days)
    levels = (processed.stats.price_levels if (processed_dir / STATS_JSON).is_file()
              else settings.preprocess.price_levels)
    monitor.log(f"pricing {state.n} products for {days.size} open days from {days[0]} with the "
                f"{rec.policy} policy of {run_dir}"
                + (f"; {shut.size} closed day(s) left out" if shut.size else ""))

    from pricing_cli.agent.policy import CHANGE_COSTS, load_demand_model

    demand = load_demand_model(run_dir)
    change_cost = (np.load(run_dir / CHANGE_COSTS, allow_pickle=False)
                   if (run_dir / CHANGE_COSTS).is_file() else None)
    horizon = build_horizon(state, rules, days, demand, levels, change_cost, competitor)
    from pricing_cli.agent.policy import load_trust_region

    region = load_trust_region(run_dir)
    if region is not None:  # the region the run was trained and evaluated in
        horizon = dataclasses.replace(horizon,
                                      trust_region=trust_region_of(region, state.product_index))
    monitor.check_memory()
    with tempfile.TemporaryDirectory(prefix="pricectl-recommend-") as scratch:
        policy: str = rec.policy
        if policy != "historical":
            from pricing_cli.agent.policy import AGENT_JSON, AgentConfig, check_agent_config

            config = AgentConfig.of(check_agent_config(
                json.loads((run_dir / AGENT_JSON).read_text(encoding="utf-8")),
                run_dir / AGENT_JSON))
            if config.stock_features:
                # The run prices from the season's stock; the horizon has no stock state, and
                # recommend's own policies are stock-blind: no silent stock-blind prices.
                raise ModelError(
                    f"{run_dir} was trained on an inventory market: its published "
                    f"{config.published_policy} prices from the season's stock, and recommend "
                    "does not carry the stock over the days ahead yet",
                    "Use the prices of `pricectl evaluate` (reports/recommendations.csv, the "
                    "published policy on the evaluated split), or --policy historical.")
        if policy == "agent":
            policy = config.published_policy
            if policy != "agent":
                monitor.log(f"the run published its joint {policy} (it earned more on val "
                            "than the network): recommending with it")
        if policy == "agent":
            from pricing_cli.agent.policy import TORCH_IMPORT_BYTES

            monitor.reserve(TORCH_IMPORT_BYTES, "loading the agent (torch)")
            from pricing_cli.agent.policy import load_agent

            agent = load_agent(run_dir)
            scalers_path = Path(settings.features.output_dir) / "scalers.json"
            scalers = (json.loads(scalers_path.read_text(encoding="utf-8"))
                       if scalers_path.is_file() else {})
            if not scalers:
                monitor.log(f"no {scalers_path}: the agent's calendar features are carried "
                            "from the last day instead of moved to each future date")
            market = future_market(processed, horizon, Path(scratch), demand, scalers,
                                   settings)
            agent.check_compatible(market)
            choose = agent_policy(horizon, agent, market)
        elif policy == "greedy":
            choose = greedy_policy(horizon, demand)
        else:
            choose = {"planner": planner_policy, "static": static_policy,
                      "historical": historical_policy}[policy](horizon)
        plan = walk(horizon, choose)
    reference = walk(horizon, historical_policy(horizon)) if rec.policy != "historical" else plan
    from pricing_cli.agent.ensemble import DemandEnsemble

    spread = ensemble_spread(DemandEnsemble.load(run_dir), horizon, plan, reference,
                             rec.interval)
    summary = write_recommendations(output_dir, horizon, plan, reference, demand, rec.policy,
                                    run_dir, spread, published=policy)
    monitor.log(f"wrote {output_dir}/prices.csv, explain.json and summary.md")
    inputs = [processed_dir / f"meta_{s}.parquet" for s in SPLITS
              if (processed_dir / f"meta_{s}.parquet").is_file()]
    inputs += sorted(p for p in run_dir.iterdir() if p.is_file())
    return StageResult("recommend", output_dir, inputs=inputs, summary=summary)


@dataclass
class Spread:
    """What the run's demand ensemble says about a plan (see :func:`ensemble_spread`).

    Attributes:
        members: how many bootstrap refits.
        level: the interval's coverage (``recommend.interval``).
        profit_low, profit_high: (H, n) each row's expected profit at the recommended price,
            the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles over the members.
        change_low, change_high: the same quantiles of the horizon's total expected profit
            change (plan minus keeping the current prices), summed over products.
        elasticity_low, elasticity_high: (n,) the same quantiles of each product's mean
            elasticity over the horizon.
    """

    members: int
    level: float
    profit_low: np.ndarray
    profit_high: np.ndarray
    change_low: float
    change_high: float
    elasticity_low: np.ndarray | None
    elasticity_high: np.ndarray | None


def ensemble_spread(ensemble: Any, horizon: Horizon, plan: Plan, reference: Plan,
                    level: float) -> Spread | None:
    """Each member of the run's demand ensemble (``train.ensemble_size`` bootstrap refits,
    agent/ensemble.py) prices the plan's and the reference's prices; the interval is the
    central ``level`` share of their predictions (quantiles, linear between members). None
    when the run has no ensemble.

    It says how much the fit moves with the data it was fitted on (resampled weeks); it does
    not cover a wrong demand shape or demand the history never showed.
    """
    if ensemble is None:
        return None
    state = horizon.state
    n = state.n

    def member_profits(plan_: Plan) -> np.ndarray:
        """(B, H, n) each member's expected profit of the plan's prices."""
        from pricing_cli.agent.demand import policy_expected_units

        out = np.empty((ensemble.size, len(horizon.days), n))
        for d, day in enumerate(horizon.days):
            # Each member scores the day's prices with the siblings at the plan's prices.
            for b, member in enumerate(ensemble.members):
                units = policy_expected_units(member, state.product_index, np.full(n, day),
                                              plan_.prices[d])
                out[b, d] = (plan_.prices[d] - state.unit_cost) * units
        return out

    tails = [(1 - level) / 2, (1 + level) / 2]
    chosen = member_profits(plan)
    low, high = np.quantile(chosen, tails, axis=0)
    base = chosen if reference is plan else member_profits(reference)
    change = chosen.sum(axis=(1, 2)) - base.sum(axis=(1, 2))
    change_low, change_high = (float(v) for v in np.quantile(change, tails))
    e_low = e_high = None
    if all(hasattr(m, "elasticity") for m in ensemble.members):
        H = len(horizon.days)
        per_member = np.stack([np.asarray(m.elasticity(
            np.repeat(state.product_index, H), np.tile(horizon.days, n)),
            dtype=np.float64).reshape(n, H).mean(axis=1) for m in ensemble.members])
        e_low, e_high = np.quantile(per_member, tails, axis=0)
    return Spread(ensemble.size, level, low, high, change_low, change_high, e_low, e_high)


def write_recommendations(output_dir: Path, horizon: Horizon, plan: Plan, reference: Plan,
                          demand: Any, policy: str, run_dir: Path,
                          spread: Spread | None = None, *,
                          published: str | None = None) -> dict[str, Any]:
    """prices.csv, explain.json and summary.md in a staged folder; returns the summary.

    ``published``: the policy that priced (for ``agent``, what the run published: the
    network, or the joint greedy/planner train chose on val)."""
    import polars as pl

    state, days = horizon.state, horizon.days
    H, n = plan.prices.shape
    from pricing_cli.agent.demand import policy_expected_units

    def plan_units(prices: np.ndarray) -> np.ndarray:
        # Each product's siblings at the plan's own prices that day (the cross-price term).
        return policy_expected_units(demand, np.tile(state.product_index, H),
                                     np.repeat(days, n), prices.ravel()).reshape(H, n)

    units = plan_units(plan.prices)
    profit = (plan.prices - state.unit_cost[None, :]) * units
    ref_profit = (reference.prices - state.unit_cost[None, :]) * plan_units(reference.prices)
    current = np.broadcast_to(state.price, (H, n))
    change_pct = (plan.prices / current - 1.0) * 100.0
    frame = pl.DataFrame({
        "product_id": pl.Series(np.tile(state.product_id, H).tolist(), dtype=pl.String),
        "date": pl.Series(np.repeat(days, n), dtype=pl.Date),
        "current_price": np.round(current.ravel(), 2),
        "recommended_price": np.round(plan.prices.ravel(), 2),
        "change_pct": np.round(change_pct.ravel(), 2),
        "expected_units": np.round(units.ravel(), 3),
        "expected_profit": np.round(profit.ravel(), 2),
        "profit_low": (pl.Series([None] * (H * n), dtype=pl.Float64) if spread is None
                       else np.round(spread.profit_low.ravel(), 2)),
        "profit_high": (pl.Series([None] * (H * n), dtype=pl.Float64) if spread is None
                        else np.round(spread.profit_high.ravel(), 2)),
        "binding_rule": pl.Series(plan.binding.ravel().tolist(), dtype=pl.String),
    }).sort("product_id", "date")
    elasticity = (np.asarray(demand.elasticity(np.repeat(state.product_index, H),
                                               np.tile(days, n)), dtype=np.float64).reshape(n, H)
                  if hasattr(demand, "elasticity") else None)
    shape = getattr(demand, "shape", None) or getattr(demand, "formula", None)
    if shape is None:
        from pricing_cli.agent import demand as demand_module

        shape = getattr(demand_module, "FORMULA", None)
    bound = {name: int((plan.binding == name).sum()) for name in RULE_ORDER}
    explain: dict[str, Any] = {"policy": policy, "priced_by": published or policy,
                               "run": str(run_dir),
                               "dates": [str(days[0]), str(days[-1])],
                               "demand_shape": shape,
                               "interval": _interval_note(spread),
                               "rule_bound_counts": bound, "products": []}
    for i in range(n):
        first, top = plan.prices[0, i], int(np.argmax(np.abs(plan.prices[:, i] - state.price[i])))
        rules_here = [r for r in plan.binding[:, i] if r != "none"]
        main_rule = max(set(rules_here), key=rules_here.count) if rules_here else "none"
        gain = float(profit[:, i].sum() - ref_profit[:, i].sum())
        e = None if elasticity is None else float(elasticity[i].mean())
        explain["products"].append({
            "product_id": str(state.product_id[i]),
            "current_price": round(float(state.price[i]), 2),
            "first_day_price": round(float(first), 2),
            "largest_move_pct": round(float(change_pct[top, i]), 2),
            "demand_shape": _product_shape(demand, int(state.product_index[i])),
            "elasticity": None if e is None else round(e, 4),
            "elasticity_interval": (
                None if spread is None or spread.elasticity_low is None
                or spread.elasticity_high is None
                else [round(float(spread.elasticity_low[i]), 4),
                      round(float(spread.elasticity_high[i]), 4)]),
            "binding_rule": main_rule,
            "binding_days": {r: rules_here.count(r) for r in sorted(set(rules_here))},
            "expected_profit": round(float(profit[:, i].sum()), 2),
            "expected_profit_change_vs_current_price": round(gain, 2),
            "reason": _reason(state.price[i], plan.prices[:, i], e, state.unit_cost[i], gain,
                              main_rule),
        })
    moves = np.asarray(plan.prices[-1] / state.price - 1.0)
    up, down = int((moves > 0.005).sum()), int((moves < -0.005).sum())
    total, base = float(profit.sum()), float(ref_profit.sum())
    summary = {"output": str(output_dir), "policy": policy, "products": n, "days": H,
               "first day": str(days[0]), "last day": str(days[-1]),
               "products up": up, "products down": down, "products unchanged": n - up - down,
               "expected profit": round(total, 2),
               "expected profit at current prices": round(base, 2),
               "expected profit change": round(total - base, 2),
               **({} if spread is None else {
                   f"expected profit change {spread.level:.0%} interval":
                       f"{spread.change_low:+,.2f} to {spread.change_high:+,.2f}"}),
               **{f"rule bound: {k}": v for k, v in bound.items() if v}}
    with staged_dir(output_dir, owner="recommend") as folder:
        frame.write_csv(folder / "prices.csv", float_precision=2)
        write_json(folder / "explain.json", explain)
        (folder / "summary.md").write_text(_summary_md(summary, state, moves, bound, spread),
                                           encoding="utf-8")
    return summary


def _product_shape(demand: Any, product_index: int) -> str:
    """The demand shape fitted for one product (demand_shapes.FORMS: loglog, linear or
    logit; loglog for a model fitted before shapes were chosen per product)."""
    from pricing_cli.agent.demand_shapes import FORMS

    forms = getattr(demand, "product_form", None)
    if forms is None or product_index >= len(forms):
        return FORMS[0]
    return FORMS[int(forms[product_index])]


def _interval_note(spread: Spread | None) -> dict[str, Any]:
    """explain.json's account of profit_low/profit_high and the elasticity interval."""
    if spread is None:
        return {"members": 0, "level": None,
                "note": "the run has no demand ensemble (train.ensemble_size below 2): "
                        "profit_low, profit_high and the elasticity interval are left empty"}
    return {"members": spread.members, "level": spread.level,
            "expected_profit_change": [round(spread.change_low, 2),
                                       round(spread.change_high, 2)],
            "note": f"profit_low/profit_high: the {(1 - spread.level) / 2:.0%} and "
                    f"{(1 + spread.level) / 2:.0%} quantiles of the expected profit at the "
                    f"recommended price over the {spread.members} bootstrap refits of the "
                    "demand model; they show how much the fit moves with the data it saw, "
                    "not whether its demand shape is right"}


def _reason(current: float, prices: np.ndarray, elasticity: float | None, cost: float,
            gain: float, rule: str) -> str:
    """One sentence on why the price moves (or not)."""
    end = prices[-1]
    direction = ("up" if end > current * 1.005 else "down" if end < current * 0.995
                 else "held")
    text = f"price {direction} from {current:.2f} to {end:.2f}"
    if elasticity is not None and elasticity > 1:
        # The profit-maximising price of constant-elasticity demand: cost * e / (e - 1).
        text += (f"; at elasticity {elasticity:.2f} the fitted model's best price is near "
                 f"{cost * elasticity / (elasticity - 1):.2f}")
    text += f"; expected profit {gain:+.2f} over the horizon vs keeping {current:.2f}"
    if rule != "none":
        text += f"; bound by {rule}"
    return text


def _summary_md(summary: dict[str, Any], state: ProductState, moves: np.ndarray,
                bound: dict[str, int], spread: Spread | None = None) -> str:
    order = np.argsort(-np.abs(moves))[:5]
    interval = ("no interval: the run has no demand ensemble" if spread is None else
                f"{spread.level:.0%} interval {spread.change_low:+,.2f} to "
                f"{spread.change_high:+,.2f} over {spread.members} demand refits")
    lines = [f"# Recommended prices {summary['first day']} to {summary['last day']}", "",
             f"Policy **{summary['policy']}**, {summary['products']} products, "
             f"{summary['days']} open days.", "",
             f"- {summary['products up']} products move up, {summary['products down']} down, "
             f"{summary['products unchanged']} unchanged (last day vs current price).",
             f"- Expected profit {summary['expected profit']:,.2f} vs "
             f"{summary['expected profit at current prices']:,.2f} at current prices "
             f"({summary['expected profit change']:+,.2f}; {interval}).", "",
             "Largest moves:", "",
             "| product | current | last day | change |", "|---|---:|---:|---:|"]
    for i in order:
        lines.append(f"| {state.product_id[i]} | {state.price[i]:.2f} | "
                     f"{state.price[i] * (1 + moves[i]):.2f} | {moves[i] * 100:+.1f}% |")
    lines += ["", "Rules that bound (product-days):", ""]
    lines += [f"- {k}: {v}" for k, v in bound.items() if v] or ["- none"]
    return "\n".join(lines) + "\n"
