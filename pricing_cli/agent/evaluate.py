"""`pricectl evaluate`: the agent vs the baselines vs the true optimum.

Every policy is one price per row of the processed split (see baselines.py), so one scorer
serves them all. Profit, revenue and units are *expected* values under a demand function, so
the evaluation is deterministic: first under the fitted demand model of the run, and, where the
market's ground truth is known (generated data), under the true demand as well, next to the
oracle that knows it.

A real user has no ground truth, so the fitted model is checked on the evaluated split first
(checks.py: held-out fit and the split's own price changes), every policy is also scored under
each member of the run's demand ensemble (the uplift's interval), and :func:`checks.verdict`
refuses to claim an uplift the checks or the interval cannot back. The outputs lead with it.

Outputs (``evaluate.reports_dir``, replaced as a whole): evaluation.json, recommendations.csv,
profit_by_policy.png, price_paths.png, uplift_histogram.png, report.md and prices_<policy>.csv
for every policy (the same columns as recommendations.csv).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.agent import calibration, checks
from pricing_cli.agent.baselines import (
    SplitMeta,
    greedy_prices,
    ground_truth_index,
    historical_prices,
    load_split_meta,
    oracle_prices,
    planned_prices,
    random_feasible_prices,
    series_bounds,
    static_prices,
)
from pricing_cli.agent.demand import policy_expected_units
from pricing_cli.agent.reference import units_along_path, with_start_reference
from pricing_cli.config import Settings
from pricing_cli.errors import ModelError
from pricing_cli.monitor import RunMonitor
from pricing_cli.pricing import feasible_mask, is_price_change, within_daily_change
from pricing_cli.runinfo import StageResult
from pricing_cli.storage import check_output_dir, staged_dir, write_json

# Average Gregorian month, so "per product-month" does not depend on which months the split has.
DAYS_PER_MONTH = 365.25 / 12
# Relative slack when comparing prices with bounds and limits: grid prices are computed in
# floating point and must not count as violations by rounding alone.
PRICE_TOLERANCE = 1e-9
# Policies held to no rule (daily-change limit, change costs): the oracle, an upper bound.
EXEMPT_POLICIES = ("oracle",)
# Products whose historical profit is this close to zero have no meaningful uplift in %.
MIN_BASE_PROFIT = 1e-9
# Refits of the linear and logit shapes on resampled train weeks: their fit uncertainty in the
# checked uplift (calibration.with_every_shape), as many as the default ensemble's members.
SHAPE_RESAMPLES = 8

if TYPE_CHECKING:
    from pricing_cli.agent.processed import ProcessedData

UnitsFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Finding the run


def find_run_dir(settings: Settings) -> Path:
    """The run folder to evaluate: ``evaluate.model``, or the newest complete run.

    train publishes a run folder as a whole only when training finished; until then it lives in
    a hidden folder (``.partial-<run_id>``, or storage's ``.tmp-`` while being renamed), so a
    complete run is a visible folder under ``train.models_dir`` holding ``model.zip``. Newest
    means the most recently written files (a resumed run counts from its last training).

    Raises:
        ModelError: the given folder does not exist, or no complete run exists.
    """
    from pricing_cli.agent.policy import MODEL_ZIP

    if settings.evaluate.model is not None:
        run_dir = Path(settings.evaluate.model)
        if not run_dir.is_dir():
            raise ModelError(f"model run folder not found: {run_dir}",
                             "Pass --model models/<run_id> of a finished `pricectl train` run.")
        return run_dir
    models_dir = Path(settings.train.models_dir)
    complete = [p for p in models_dir.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / MODEL_ZIP).is_file()
                ] if models_dir.is_dir() else []
    if not complete:
        raise ModelError(f"no complete training run under {models_dir}/",
                         "Train one with `pricectl train --multi-product`, or pass --model.")

    def written(run_dir: Path) -> tuple[int, str]:
        return max(f.stat().st_mtime_ns for f in run_dir.iterdir() if f.is_file()), run_dir.name

    return max(complete, key=written)


# ----------------------------------------------------------------------------------------------
# Metrics


def profit_metrics(meta: SplitMeta, prices: np.ndarray, units: np.ndarray,
                   change_cost: np.ndarray | None = None) -> dict[str, float]:
    """Profit, revenue, units, margin (profit / revenue) and change costs of one policy,
    summed over rows. With ``change_cost`` ((n_products,) money per price change) profit is
    net of the price-change costs the policy paid."""
    revenue = float(np.sum(prices * units))
    costs = float(np.sum(change_costs_per_row(meta, prices, change_cost)))
    profit = float(np.sum((prices - meta.unit_cost) * units)) - costs
    return {"profit": profit, "revenue": revenue, "units": float(np.sum(units)),
            "margin": profit / revenue if revenue else 0.0, "change_costs": costs}


def change_costs_per_row(meta: SplitMeta, prices: np.ndarray,
                         change_cost: np.ndarray | None) -> np.ndarray | float:
    """(n,) the change cost each row pays: every move beyond pricing.CHANGE_TOLERANCE, the one
    onto day one from the last price before the split included (as the env charges it)."""
    if change_cost is None or meta.n_rows == 0:
        return 0.0
    previous = np.roll(prices, 1)
    previous[meta.series_start] = meta.prev_price
    return change_cost[meta.product_index] * is_price_change(prices, previous)


def product_profits(meta: SplitMeta, prices: np.ndarray, units: np.ndarray,
                    change_cost: np.ndarray | None = None) -> np.ndarray:
    """(n_series,) profit of each product over the split (net of change costs, if given)."""
    if meta.n_rows == 0:
        return np.zeros(0)
    return np.add.reduceat((prices - meta.unit_cost) * units
                           - change_costs_per_row(meta, prices, change_cost), meta.series_start)


def uplift_pct(profit: float, base_profit: float) -> float | None:
    """Relative profit gain over ``base_profit`` in %; None when the base is zero."""
    if abs(base_profit) < MIN_BASE_PROFIT:
        return None
    return (profit - base_profit) / abs(base_profit) * 100.0


def price_changes_per_product_month(meta: SplitMeta, prices: np.ndarray) -> float:
    """Day-to-day price changes inside the split (``pricing.is_price_change``, the rule the
    change costs and the env count by), per product and month (30.44 days).

    The move onto day one (from before the split) is not counted: only the policy's own moves.
    """
    if meta.n_rows == 0:
        return 0.0
    inner = np.ones(meta.n_rows, dtype=bool)
    inner[meta.series_start] = False
    changed = inner & is_price_change(prices, np.roll(prices, 1))
    return float(changed.sum()) / (meta.n_rows / DAYS_PER_MONTH)


@dataclass(frozen=True)
class Violations:
    """Constraint violations of one policy.

    Attributes:
        bounds: rows priced outside [min_price, max_price].
        daily_change: rows whose relative change from the policy's own previous price exceeds
            max_daily_change. Day one is checked against the last price before the split where
            it is known. A row where no grid level satisfies the rule (yesterday's price far
            outside the bounds) is not counted: no policy could avoid it.
    """

    bounds: int
    daily_change: int

    @property
    def total(self) -> int:
        return self.bounds + self.daily_change

    def as_dict(self) -> dict[str, int]:
        return {"bounds": self.bounds, "daily_change": self.daily_change, "total": self.total}


def count_violations(meta: SplitMeta, prices: np.ndarray, max_daily_change: float) -> Violations:
    """Count price-bound and daily-change violations of ``prices`` (see :class:`Violations`)."""
    slack_lo = PRICE_TOLERANCE * np.maximum(1.0, np.abs(meta.min_price))
    slack_hi = PRICE_TOLERANCE * np.maximum(1.0, np.abs(meta.max_price))
    out_of_bounds = (prices < meta.min_price - slack_lo) | (prices > meta.max_price + slack_hi)
    prev = np.roll(prices, 1)
    prev[meta.series_start] = meta.prev_price  # NaN where the price before the split is unknown
    with np.errstate(divide="ignore", invalid="ignore"):
        # pricing's rule; an unknown previous price (NaN) is skipped, not a violation.
        too_far = ~within_daily_change(prices, prev, max_daily_change) & ~np.isnan(prices / prev)
    rows = np.flatnonzero(too_far)
    if rows.size:
        grid = meta.grid[meta.series_of_row[rows]]
        conflict = feasible_mask(grid, prev[rows], max_daily_change)[1]
        rows = rows[~conflict]
    return Violations(int(out_of_bounds.sum()), int(rows.size))


def distribution_stats(values: np.ndarray) -> dict[str, float | int | None]:
    """count, mean, quantiles, min/max and share of positive values (NaN values dropped)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"count": 0, "mean": None, "median": None, "p10": None, "p90": None,
                "min": None, "max": None, "share_positive": None}
    p10, median, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"count": int(values.size), "mean": float(values.mean()), "median": float(median),
            "p10": float(p10), "p90": float(p90), "min": float(values.min()),
            "max": float(values.max()), "share_positive": float((values > 0).mean())}


def product_uplift_pct(meta: SplitMeta, prices: np.ndarray, base_prices: np.ndarray,
                       units_fn: UnitsFn, change_cost: np.ndarray | None = None) -> np.ndarray:
    """(n_series,) profit uplift in % of ``prices`` over ``base_prices`` per product (NaN: 0),
    both net of change costs if given."""
    profit = product_profits(meta, prices, units_fn(prices), change_cost)
    base = product_profits(meta, base_prices, units_fn(base_prices), change_cost)
    uplift = np.full(base.shape, np.nan)
    ok = np.abs(base) >= MIN_BASE_PROFIT
    uplift[ok] = (profit[ok] - base[ok]) / np.abs(base[ok]) * 100.0
    return uplift


def score_policies(meta: SplitMeta, policies: dict[str, np.ndarray], units_fn: UnitsFn,
                   baseline: str = "historical", reference: str | None = None,
                   change_cost: np.ndarray | None = None,
                   leftover: UnitsFn | None = None) -> dict[str, dict[str, Any]]:
    """Profit metrics of every policy under one demand function.

    Args:
        policies: name -> (n,) prices; must contain ``baseline``.
        units_fn: prices -> expected units, row by row.
        baseline: the policy uplift is measured against.
        reference: a policy (the oracle) whose profit every policy is shown as a share of.
        change_cost: (n_products,) money per price change, charged to every policy but the
            oracle (exempt from the rules, it stays an upper bound).
        leftover: prices -> (n,) money the stock left at a season's end adds (inventory:
            (salvage - unit_cost) * units left); added to profit as ``salvage``.

    Returns:
        name -> {profit, revenue, units, margin, change_costs, uplift_pct[,
        share_of_oracle_pct]}.
    """
    scores: dict[str, dict[str, Any]] = {
        name: dict(profit_metrics(meta, prices, units_fn(prices),
                                  None if name in EXEMPT_POLICIES else change_cost))
        for name, prices in policies.items()}
    if leftover is not None:
        for name, prices in policies.items():
            values = scores[name]
            values["salvage"] = float(np.sum(leftover(prices)))
            values["profit"] += values["salvage"]
            values["margin"] = values["profit"] / values["revenue"] if values["revenue"] else 0.0
    base = scores[baseline]["profit"]
    for values in scores.values():
        values["uplift_pct"] = uplift_pct(values["profit"], base)
    if reference is not None:
        best = scores[reference]["profit"]
        for values in scores.values():
            values["share_of_oracle_pct"] = (values["profit"] / best * 100.0
                                             if abs(best) >= MIN_BASE_PROFIT else None)
    return scores


def inventory_report(info: dict[str, Any], true: dict[str, dict[str, Any]] | None
                     ) -> dict[str, Any]:
    """evaluation.json's ``inventory``: the ladder's fit, the true DP value (the optimum of a
    stock-aware policy) and each policy's true profit as a share of it."""
    report = dict(info)
    value = info.get("dp_value_true")
    if true is not None and value:
        report["share_of_dp_pct"] = {name: entry["profit"] / value * 100.0
                                     for name, entry in true.items()}
    return report


def rows_outside_trust_region(meta: SplitMeta, prices: np.ndarray) -> int | None:
    """Rows priced outside their trust region (None without one). For the grid policies these
    are the counted fallbacks of ``pricing.restrict_to_trust_region``."""
    if meta.trust_region is None:
        return None
    lower, upper = (bound[meta.series_of_row] for bound in meta.trust_region)
    slack = PRICE_TOLERANCE * np.maximum(1.0, np.abs(prices))
    with np.errstate(invalid="ignore"):
        outside = (prices < lower - slack) | (prices > upper + slack)  # NaN: no limit
    return int(outside.sum())


def policy_units(model: Any, meta: SplitMeta, prices: np.ndarray) -> np.ndarray:
    """(n,) a policy's expected units under a fitted model, as evaluate scores it: with a
    reference-price effect, the reference rolled along the policy's own path
    (``reference.units_along_path``); otherwise each row's siblings at the policy's own prices
    that day (``demand.policy_expected_units``, the cross-price term)."""
    rolled = units_along_path(model, meta, prices)
    if rolled is not None:
        return rolled
    return policy_expected_units(model, meta.product_index, meta.date, prices)


def uplift_intervals(meta: SplitMeta, policies: dict[str, np.ndarray], ensemble: Any,
                     point: Any, change_cost: np.ndarray | None, level: float,
                     baseline: str = "historical"
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every policy's profit uplift over ``baseline`` under the point fit, with a ``level``
    interval from the ensemble members.

    The interval is the basic (reverse percentile) bootstrap one: with u the point fit's
    uplift and q_lo, q_hi the members' quantiles (linear between members), [2u − q_hi,
    2u − q_lo]. It is centred on the point fit and corrects for how far the members sit from
    it (bootstrap refits on resampled weeks overshot the point fit's uplift by about 3 points
    on the small preset, and the plain percentile interval then missed the true uplift).

    Returns:
        (policy -> interval overall, product_id -> interval of the agent's uplift); an interval
        is {point, low, high, members_low, members_median, members_high, level, members,
        method}, every value None where a baseline profit is zero.
    """
    if meta.n_rows == 0:
        return {}, {}
    models = [point, *ensemble.members]
    # (1 + B, n_series) profit of each policy under the point fit, then each member.
    profits = {name: np.stack([product_profits(
        meta, prices, policy_units(m, meta, prices),
        None if name in EXEMPT_POLICIES else change_cost) for m in models])
        for name, prices in policies.items()}
    base = profits[baseline]
    tails = [(1 - level) / 2, 0.5, (1 + level) / 2]

    def interval(gain: np.ndarray, base_profit: np.ndarray) -> dict[str, Any]:
        entry: dict[str, Any] = dict.fromkeys(("point", "low", "high", "members_low",
                                               "members_median", "members_high"))
        entry.update(level=level, members=len(models) - 1, method="basic bootstrap")
        if np.all(np.abs(base_profit) >= MIN_BASE_PROFIT):
            uplift = gain / np.abs(base_profit) * 100.0
            low, median, high = np.quantile(uplift[1:], tails)
            centre = float(uplift[0])
            entry.update(point=centre, low=2 * centre - float(high),
                         high=2 * centre - float(low), members_low=float(low),
                         members_median=float(median), members_high=float(high))
        return entry

    overall = {name: interval(p.sum(axis=1) - base.sum(axis=1), base.sum(axis=1))
               for name, p in profits.items()}
    agent = profits["agent"]
    per_product = {str(meta.product_id[start]): interval(agent[:, s] - base[:, s], base[:, s])
                   for s, start in enumerate(meta.series_start)}
    return overall, per_product


def checked_uplifts(meta: SplitMeta, policies: dict[str, np.ndarray], point: Any,
                    ensemble: Any, change_cost: np.ndarray | None,
                    events: checks.PriceChangeEvents, level: float, seed: int,
                    shapes_of: Any = None, window: int = 7
                    ) -> tuple[calibration.ResponseSlope | None, dict[str, dict[str, Any]],
                               dict[str, dict[str, Any]] | None]:
    """(the held-out response slope, every policy's checked uplift, the agent's per product):
    calibration.shape_checked_uplift with evaluate's profit rule (change costs for all but the
    oracle). Nothing is checked (None, {}, None) where no price change measured the slope.

    ``shapes_of``: a callable giving the point fit with every demand shape fitted, then its
    refits on resampled train rows (calibration.with_every_shape); then the claim also
    weighs each shape given to every product, each with its own held-out slope, by how well
    it predicts the split's units (calibration.shape_choice). None: the run's own model
    only. ``window``: of ``events``.
    """
    from pricing_cli.agent.demand_shapes import FORMS, deviance_by_product

    # Positions on the price scale are relative to the point fit's reference prices (a model
    # without them: each product's median price in the split).
    if hasattr(point, "reference_price"):
        reference = np.asarray(point.reference_price, dtype=np.float64)[meta.product_index]
    else:
        medians = np.array([np.median(meta.price[start:start + length]) for start, length
                            in zip(meta.series_start, meta.series_length, strict=True)])
        reference = medians[meta.series_of_row]
    n_series = meta.series_start.size
    realized = np.maximum(meta.units, 0.0)

    def slope_of(found: checks.PriceChangeEvents) -> calibration.ResponseSlope | None:
        position = calibration.move_position(meta.price[found.row - 1], meta.price[found.row],
                                             reference[found.row])
        return calibration.response_slope(found, n_series, position, seed=seed)

    def deviance_of(model: Any) -> np.ndarray:
        return deviance_by_product(policy_units(model, meta, meta.price), realized,
                                   meta.series_of_row, n_series)

    slope = slope_of(events)
    if slope is None:
        return None, {}, None
    models = [point, *(ensemble.members if ensemble is not None else [])]
    candidates = [calibration.ShapeCheck("fitted", models, slope, deviance_of(point))]
    every = shapes_of() if shapes_of is not None else None
    if every is not None:
        held = checks.prices_held(meta)
        own_forms = np.asarray(getattr(point, "product_form", None))
        for form in FORMS:
            variants = [calibration.shape_variant(m, form) for m in every]
            if np.array_equal(variants[0].product_form, own_forms):
                continue  # the run's own model already
            if form == FORMS[0]:  # loglog: the ensemble's refits are its fit uncertainty
                variants = [variants[0], *(calibration.shape_variant(m, form)
                                           for m in models[1:])]
            at_historical = policy_units(variants[0], meta, meta.price)
            own = slope_of(checks.price_change_events(meta, at_historical, window,
                                                      policy_units(variants[0], meta, held)))
            if own is not None:
                candidates.append(calibration.ShapeCheck(form, variants, own,
                                                         deviance_of(variants[0])))
    best, choice = calibration.shape_choice(np.stack([c.deviance for c in candidates]),
                                            slope.pooled_draws.size, seed)
    # Category-wide moves beyond the held-out range of the category price index: the
    # cross-price term extrapolated, or held at the range's edge (calibration.py).
    best_of: int | list[int] = best
    held_range = calibration.held_out_index_range(point, meta)
    if held_range is not None:
        candidates, best_of, choice = calibration.with_cross_price_range(
            candidates, best, choice, *held_range, seed=seed)

    def profits_of(name: str, prices: np.ndarray, units: np.ndarray) -> np.ndarray:
        return product_profits(meta, prices, units,
                               None if name in EXEMPT_POLICIES else change_cost)

    overall, per_product = calibration.shape_checked_uplift(
        meta, policies, candidates, best_of, choice, reference, profits_of, level,
        units_under=lambda model, prices: policy_units(model, meta, prices))
    return candidates[best if held_range is None else 2 * best].slope, overall, per_product


def truth_coverage(true_uplift: float | None, true_product_uplift: np.ndarray | None,
                   meta: SplitMeta, interval: dict[str, Any] | None,
                   product_intervals: dict[str, dict[str, Any]] | None,
                   elasticity: dict[str, Any] | None, *, claimed: bool = True
                   ) -> dict[str, Any]:
    """With ground truth: the agent's true uplift, whether the interval covered it (overall and
    the share of products), whether a positive uplift was claimed where the true one is not,
    and the fitted vs true elasticity. ``claimed``: whether the verdict claims the uplift (a
    "not reliable" verdict claims nothing, whatever its interval says)."""

    def covers(entry: dict[str, Any] | None, value: float | None) -> bool | None:
        if entry is None or entry.get("low") is None or value is None or not np.isfinite(value):
            return None
        return bool(entry["low"] <= value <= entry["high"])

    per_product = [covers((product_intervals or {}).get(str(meta.product_id[start])),
                          float(true_product_uplift[s]))
                   for s, start in enumerate(meta.series_start)] \
        if true_product_uplift is not None else []
    judged = [c for c in per_product if c is not None]
    low = None if interval is None else interval.get("low")
    return {
        "true_uplift_pct": true_uplift,
        "interval_covers_true_uplift": covers(interval, true_uplift),
        "products_covered_share": sum(judged) / len(judged) if judged else None,
        "products_judged": len(judged),
        "claimed_uplift_where_true_is_not_positive": bool(
            claimed and low is not None and low > 0
            and true_uplift is not None and true_uplift <= 0),
        "elasticity_fitted_mean": None if elasticity is None else elasticity["mean_fitted"],
        "elasticity_true_mean": None if elasticity is None else elasticity["mean_true"],
        "elasticity_mean_abs_relative_error_pct": None if elasticity is None
        else elasticity["mean_abs_relative_error_pct"],
    }


# ----------------------------------------------------------------------------------------------
# The stage


def _load_truth(settings: Settings, meta: SplitMeta,
                monitor: RunMonitor) -> tuple[Any, np.ndarray | None, str]:
    """(ground truth, its product index per row, why it is not used) from data.ground_truth."""
    path = Path(settings.data.ground_truth)
    if not path.is_file():
        return None, None, f"no ground truth at {path} (only generated markets have one)"
    from pricing_cli.data.market import load_ground_truth

    truth = load_ground_truth(path)
    index = ground_truth_index(meta, truth.index)
    if index is None:
        monitor.log(f"ground truth {path} does not cover the processed products; "
                    "scoring under the fitted demand only")
        return None, None, f"the products of {path} do not match the processed data"
    return truth, index, ""


def run_evaluate(settings: Settings, monitor: RunMonitor) -> StageResult:
    """Score the agent and the baselines on ``evaluate.split`` and write the reports.

    Inputs: the processed split (``merge.output_dir``), the run folder (``evaluate.model`` or
    the newest complete one under ``train.models_dir``) and, if present and matching,
    ``data.ground_truth``.

    Returns:
        StageResult whose summary holds the agent's key numbers and whose notes hold the
        table of every policy.

    Raises:
        MissingInputError: the processed split does not exist.
        ModelError: no run folder, or the agent's prices do not fit the split.
        BatchError: the processed split is inconsistent.
    """
    ev = settings.evaluate
    processed_dir = Path(settings.merge.output_dir)
    run_dir = find_run_dir(settings)
    check_output_dir(ev.reports_dir, "evaluate",
                     [processed_dir, run_dir, Path(settings.train.models_dir)])
    monitor.log(f"evaluating {run_dir} on the {ev.split} split of {processed_dir}")
    from pricing_cli.agent.processed import ProcessedData

    # The one reader of the processed folder: every file below is read once and passed down.
    processed = ProcessedData(processed_dir)
    # Closed days are left out of every policy's rows (the agent's rollout leaves them out
    # the same way): no price is set or scored on a day the store is shut.
    closed = processed.closed_days(settings.data)
    meta = load_split_meta(processed, ev.split, closed)
    closed_rows = processed.meta(ev.split).height - meta.n_rows
    if closed_rows:
        monitor.log(f"{closed_rows:,} product-days on closed days left out of the {ev.split} "
                    "split")
    stats = processed.stats
    levels = stats.price_levels
    from pricing_cli.agent.guardrails import row_rule_levels

    meta = dataclasses.replace(meta, rule_levels=row_rule_levels(
        settings, meta.product_id, meta.date, meta.unit_cost, meta.min_price, meta.max_price,
        levels))  # the merchant rules every grid policy obeys
    max_daily_change = stats.max_daily_change
    monitor.check_memory()

    truth, truth_index, truth_note = _load_truth(settings, meta, monitor)

    from pricing_cli.agent.policy import TORCH_IMPORT_BYTES

    monitor.reserve(TORCH_IMPORT_BYTES, "loading the agent (torch)")
    from pricing_cli.agent.ensemble import DemandEnsemble, decision_demand
    from pricing_cli.agent.policy import load_agent, load_demand_model, rollout_prices

    demand = load_demand_model(run_dir)
    ensemble = DemandEnsemble.load(run_dir)
    agent = load_agent(run_dir, stats.raw, demand=(demand, ensemble))
    # The baselines choose prices as the agent was trained to: on the ensemble's
    # decision_quantile when the run has one, else on the point fit.
    decision = decision_demand(demand, ensemble, agent.config.decision_quantile)
    # The baselines keep to the trust region the agent was trained in.
    trust = getattr(agent, "trust_region", None)
    if trust is not None:
        meta = dataclasses.replace(meta, trust_region=series_bounds(meta, trust))
    meta = with_start_reference(meta, demand, processed, ev.split)
    # The agent's objective: greedy and the planner optimise it too, every policy is scored
    # net of it.
    change_cost = agent.change_cost
    # Each baseline is priced on demand, after the agent, in table order.
    makers: dict[str, Callable[[], np.ndarray]] = {
        "historical": functools.partial(historical_prices, meta),
        "static": functools.partial(static_prices, meta, decision, levels, max_daily_change),
        "greedy": functools.partial(greedy_prices, meta, decision, levels, max_daily_change,
                                    change_cost),
        "planner": functools.partial(planned_prices, meta, decision, levels, max_daily_change,
                                     change_cost),
        "random": functools.partial(random_feasible_prices, meta, levels, max_daily_change,
                                    ev.seed),
    }
    if truth_index is not None:
        makers["oracle"] = functools.partial(oracle_prices, meta, truth, truth_index)
    from pricing_cli.agent.inventory import inventory_baselines

    # An inventory market: stock-aware baselines, the markdown ladder, and stock-capped scores.
    stocked = inventory_baselines(settings, processed, closed, meta, truth, truth_index,
                                  decision, levels, max_daily_change)
    if stocked is not None:
        makers.update(stocked.makers)
    monitor.add_bar("policies", "policies priced", 1 + len(makers))

    monitor.set_metric("policy", "agent")
    _, agent_prices = rollout_prices(agent, processed, ev.split, settings=settings)
    agent_prices = np.asarray(agent_prices, dtype=np.float64)
    if agent_prices.shape != (meta.n_rows,):
        raise ModelError(f"the agent of {run_dir} priced {agent_prices.shape[0]} rows but "
                         f"meta_{ev.split} has {meta.n_rows}",
                         "Evaluate with the processed data the run was trained on, or retrain.")
    policies: dict[str, np.ndarray] = {"agent": agent_prices}
    monitor.update_bar("policies", advance=1)
    for name in makers:
        monitor.set_metric("policy", name)
        policies[name] = makers[name]()
        monitor.update_bar("policies", advance=1)
        monitor.check_memory()

    def fitted_units(prices: np.ndarray) -> np.ndarray:
        units = policy_units(demand, meta, prices)
        return units if stocked is None else stocked.runs.sales_and_left(units)[0]

    def fitted_leftover(prices: np.ndarray) -> np.ndarray:
        assert stocked is not None
        return stocked.runs.leftover_value(policy_units(demand, meta, prices))

    fitted = score_policies(meta, policies, fitted_units, change_cost=change_cost,
                            leftover=None if stocked is None else fitted_leftover)
    true: dict[str, dict[str, Any]] | None = None
    uplift_true = None
    if truth is not None:
        from pricing_cli.data.market import true_units as true_expected_units

        def true_units(prices: np.ndarray) -> np.ndarray:
            # Scenario markets: joint per category-day, reference rolled forward, stock-capped.
            return np.asarray(true_expected_units(truth, truth_index, meta.date, prices),
                              dtype=np.float64)

        def true_leftover(prices: np.ndarray) -> np.ndarray:
            from pricing_cli.data.market import true_leftover_value

            return true_leftover_value(truth, truth_index, meta.date, prices)

        true = score_policies(meta, policies, true_units, reference="oracle",
                              change_cost=change_cost,
                              leftover=None if stocked is None else true_leftover)
        uplift_true = product_uplift_pct(meta, agent_prices, policies["historical"], true_units,
                                         change_cost)
    uplift_fitted = product_uplift_pct(meta, agent_prices, policies["historical"], fitted_units,
                                       change_cost)

    monitor.set_metric("policy", "held-out checks")
    at_historical = fitted_units(meta.price)
    events = checks.price_change_events(meta, at_historical, ev.event_window_days,
                                        fitted_units(checks.prices_held(meta)))
    held_out = checks.run_checks(meta, at_historical, ev.event_window_days, events)
    intervals, product_intervals = (
        uplift_intervals(meta, policies, ensemble, demand, change_cost, ev.interval)
        if ensemble is not None else ({}, None))
    # The claim: the uplift checked against the split's own price changes (calibration.py),
    # not the fitted model's, whose ensemble shares the model's blind spots.
    slope, checked, product_checked = checked_uplifts(
        meta, policies, demand, ensemble, change_cost, events, ev.interval, ev.seed,
        functools.partial(_with_every_shape, demand, processed, settings),
        ev.event_window_days)
    if slope is not None:
        held_out["response_slope"] = slope.as_dict()
    # Sales capped by stock: the fit measured the response only where sales were uncapped.
    fit_info = getattr(demand, "info", None) or {}  # stand-in models (tests) carry none
    capped = checks.capped_sales_reasons(fit_info.get("censoring"), int(fit_info.get("rows", 0)),
                                         meta, agent_prices)
    verdict = checks.verdict(held_out, checked.get("agent"), product_checked, ev, capped)
    demand_report = demand_model_report(demand, processed, ev.split, meta, truth, truth_index,
                                        closed)
    if true is not None:
        verdict["ground_truth"] = truth_coverage(
            true["agent"]["uplift_pct"], uplift_true, meta, checked.get("agent"),
            product_checked, demand_report["elasticity_vs_truth"],
            claimed=verdict["status"] == "reliable_uplift")
        verdict["ground_truth"]["fitted_interval_covers_true_uplift"] = truth_coverage(
            true["agent"]["uplift_pct"], uplift_true, meta, intervals.get("agent"),
            product_intervals, None)["interval_covers_true_uplift"]

    # The verdict first: evaluation.json keeps this order (not sorted).
    evaluation: dict[str, Any] = {"verdict": verdict}
    evaluation.update(_evaluation_record(settings, run_dir, meta, levels, max_daily_change,
                                         policies, fitted, true, uplift_fitted, uplift_true,
                                         truth_note))
    for name, interval in intervals.items():
        evaluation["policies"][name]["uplift_interval"] = interval
    for name, entry in checked.items():
        evaluation["policies"][name]["checked_uplift"] = entry
    for name, prices in policies.items():
        evaluation["policies"][name]["outside_trust_region"] = rows_outside_trust_region(
            meta, prices)
    evaluation["trust_region"] = {
        "margin": agent.config.trust_region if trust is not None else None,
        "adaptive_cap": agent.config.trust_region_adaptive if trust is not None else None,
        "products_limited": 0 if meta.trust_region is None
        else int(np.isfinite(meta.trust_region[0]).sum())}
    evaluation["agent_uplift_interval_per_product"] = product_intervals
    evaluation["agent_checked_uplift_per_product"] = product_checked
    evaluation["held_out_checks"] = held_out
    evaluation["decisions"] = {
        "ensemble_size": 0 if ensemble is None else ensemble.size,
        "decision_quantile": (agent.config.decision_quantile
                              if ensemble is not None else None)}
    evaluation["price_change_cost"] = float(agent.config.price_change_cost)
    evaluation["closed_days"] = {
        "product_days_left_out": closed_rows,
        "weekdays": sorted(closed.weekdays),
        "dates": len(closed.dates), "found_in_data": closed.found_in_data}
    # The "agent" row is what the run published: its network, or the joint greedy/planner
    # that earned more on val (train.publish_best_policy).
    evaluation["agent_policy"] = agent.config.published_policy
    from pricing_cli.agent.learning import read_train_curve

    evaluation["learning_curve"] = read_train_curve(run_dir)  # val profit against RL steps
    evaluation["demand_model"] = demand_report
    if stocked is not None:
        evaluation["inventory"] = inventory_report(stocked.info, true)
    reports_dir = Path(ev.reports_dir)
    _write_reports(reports_dir, meta, policies, evaluation, uplift_true if uplift_true is not None
                   else uplift_fitted, ev.plot_products)

    from pricing_cli.agent.report import policy_table

    agent_row = evaluation["policies"]["agent"]
    summary: dict[str, Any] = {
        "verdict": verdict["message"],
        "run": str(run_dir), "split": ev.split, "products": int(meta.series_start.size),
        "product-days": meta.n_rows,
        "agent profit (fitted)": agent_row["fitted"]["profit"],
        "agent uplift vs historical % (fitted)": agent_row["fitted"]["uplift_pct"],
        "agent policy (published by train)": evaluation["agent_policy"],
    }
    if "agent" in intervals:
        summary["agent uplift 90% interval (fitted ensemble)"] = checks.interval_text(
            intervals["agent"])
    if "agent" in checked:
        summary["agent uplift % (checked on held-out changes)"] = checked["agent"]["point"]
        summary["agent checked uplift 90% interval"] = checks.interval_text(checked["agent"])
    summary["agent violations"] = agent_row["violations"]["total"]
    if closed_rows:
        summary["closed product-days left out"] = closed_rows
    if true is not None:
        summary["agent uplift vs historical % (true)"] = agent_row["true"]["uplift_pct"]
        summary["agent share of oracle % (true)"] = agent_row["true"]["share_of_oracle_pct"]
    fit = evaluation["demand_model"]
    if fit["fit"] is not None:
        summary["demand model MAE, units/day"] = fit["fit"].get("mae")
    if fit["elasticity_vs_truth"] is not None:
        summary["demand model elasticity error % (vs truth)"] = (
            fit["elasticity_vs_truth"]["mean_abs_relative_error_pct"])
    from pricing_cli.agent.report import verdict_lines

    notes = ["\n".join(verdict_lines(evaluation)), policy_table(evaluation)]
    if truth_note:
        notes.append(f"true demand not scored: {truth_note}")
    inputs = [processed_dir / f"meta_{ev.split}.parquet", processed_dir / f"masks_{ev.split}.npz",
              *sorted(p for p in run_dir.iterdir() if p.is_file())]
    if truth is not None:
        inputs.append(Path(settings.data.ground_truth))
    return StageResult("evaluate", reports_dir, inputs=inputs, summary=summary, notes=notes)


def _with_every_shape(demand: Any, processed: ProcessedData, settings: Settings) -> Any:
    """The point fit with every demand shape fitted on the train rows (None: a model without
    shapes, or no train split to fit them on)."""
    if getattr(demand, "shape_params", None) is None or not processed.has_split("train"):
        return None
    return calibration.with_every_shape(
        demand, processed.meta("train"), float(settings.train.demand_shrinkage),
        bool(settings.train.demand_detect_capped), SHAPE_RESAMPLES,
        settings.train.ensemble_seed)


def demand_model_report(demand: Any, processed: ProcessedData, split: str, meta: SplitMeta,
                        truth: Any, truth_index: np.ndarray | None, closed: Any = None
                        ) -> dict[str, Any]:
    """The fitted demand model's quality on ``split`` (its meta from ``processed``), and
    against the truth if known.

    Returns:
        ``fit``: ``DemandModel.fit_report`` on the split (Poisson deviance, MAE and RMSE of
        daily units, calibration by decile). ``censoring``: the fit's censoring info (None
        for a stand-in model). ``elasticity_vs_truth`` (None without ground
        truth): over every product-day, the mean absolute error and mean absolute relative
        error of the fitted elasticity against the true one, their correlation, and the
        median over products of each product's mean relative error.
    """
    # Stand-in demand models (tests, custom callers) may only predict units.
    frame = processed.meta(split) if hasattr(demand, "fit_report") else None
    if frame is not None and closed is not None:  # as the checks: open days only
        from pricing_cli.data.closed_days import open_rows

        keep = open_rows(frame["date"].to_numpy(), closed)
        frame = frame if keep is None else frame[keep]
    fit = demand.fit_report(frame) if frame is not None else None
    # What the fit did about sales capped by stock (demand.capped_day_weights and
    # capped_low_price_days), per product.
    censoring = (getattr(demand, "info", None) or {}).get("censoring")
    report: dict[str, Any] = {"fit": fit, "censoring": censoring, "elasticity_vs_truth": None}
    if (truth is None or truth_index is None or meta.n_rows == 0
            or not hasattr(demand, "elasticity")):
        return report
    from pricing_cli.data.market import elasticity as true_elasticity

    fitted = np.asarray(demand.elasticity(meta.product_index, meta.date), dtype=np.float64)
    actual = np.asarray(true_elasticity(truth, truth_index, meta.date), dtype=np.float64)
    relative = np.abs(fitted - actual) / actual
    per_product = (np.bincount(meta.product_index, weights=relative)
                   / np.maximum(np.bincount(meta.product_index), 1))[np.unique(meta.product_index)]
    report["elasticity_vs_truth"] = {
        "product_days": int(meta.n_rows),
        "mean_abs_error": float(np.mean(np.abs(fitted - actual))),
        "mean_abs_relative_error_pct": float(100 * relative.mean()),
        "correlation": float(np.corrcoef(fitted, actual)[0, 1]) if meta.n_rows > 1 else None,
        "median_product_relative_error_pct": float(100 * np.median(per_product)),
        "mean_fitted": float(fitted.mean()),
        "mean_true": float(actual.mean()),
    }
    return report


def _evaluation_record(settings: Settings, run_dir: Path, meta: SplitMeta, levels: int,
                       max_daily_change: float, policies: dict[str, np.ndarray],
                       fitted: dict[str, dict[str, Any]], true: dict[str, dict[str, Any]] | None,
                       uplift_fitted: np.ndarray, uplift_true: np.ndarray | None,
                       truth_note: str) -> dict[str, Any]:
    """The content of evaluation.json."""
    per_policy: dict[str, Any] = {}
    for name, prices in policies.items():
        per_policy[name] = {
            "fitted": fitted[name],
            "true": None if true is None else true[name],
            "price_changes_per_product_month": price_changes_per_product_month(meta, prices),
            "violations": count_violations(meta, prices, max_daily_change).as_dict(),
            # The oracle knows the true demand and ignores the daily limit by design.
            "exempt_from_daily_limit": name == "oracle",
        }
    return {
        "run": str(run_dir),
        "split": settings.evaluate.split,
        "products": int(meta.series_start.size),
        "product_days": meta.n_rows,
        "dates": [str(meta.date.min()), str(meta.date.max())] if meta.n_rows else None,
        "price_levels": levels,
        "max_daily_change": max_daily_change,
        "ground_truth": {"used": true is not None, "path": settings.data.ground_truth,
                         "note": truth_note or None},
        "policies": per_policy,
        "policy_order": list(policies),  # the JSON keys are sorted; this is the table order
        "agent_uplift_per_product_pct": {
            "fitted": distribution_stats(uplift_fitted),
            "true": None if uplift_true is None else distribution_stats(uplift_true),
        },
    }


def _write_reports(reports_dir: Path, meta: SplitMeta, policies: dict[str, np.ndarray],
                   evaluation: dict[str, Any], uplift: np.ndarray, plot_products: int) -> None:
    """Write every report file into a staged folder that replaces ``reports_dir`` as a whole."""
    from pricing_cli.agent import report

    with staged_dir(reports_dir, owner="evaluate") as folder:
        write_json(folder / "evaluation.json", evaluation, sort_keys=False)
        write_recommendations(folder / "recommendations.csv", meta, policies["agent"])
        # Every policy's prices, so users can compare them row by row.
        for name, prices in policies.items():
            write_recommendations(folder / f"prices_{name}.csv", meta, prices)
        plots = {
            "profit_by_policy": report.plot_profit_by_policy(folder / "profit_by_policy.png",
                                                             evaluation),
            "price_paths": report.plot_price_paths(folder / "price_paths.png", meta, policies,
                                                   plot_products),
            "uplift_histogram": report.plot_uplift_histogram(folder / "uplift_histogram.png",
                                                             uplift),
        }
        report.write_report_md(folder / "report.md", evaluation,
                               {k: v for k, v in plots.items() if v is not None})


def write_recommendations(path: Path, meta: SplitMeta, prices: np.ndarray) -> None:
    """recommendations.csv: product_id,date,recommended_price (cents) for every product-day."""
    import polars as pl

    frame = pl.DataFrame({
        "product_id": pl.Series(meta.product_id.tolist(), dtype=pl.String),
        "date": pl.Series(meta.date, dtype=pl.Date),
        "recommended_price": np.round(prices, 2),
    })
    frame.write_csv(path, float_precision=2)
