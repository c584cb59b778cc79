"""Held-out checks of the fitted demand model: what evaluate can verify without ground truth.

Every profit that evaluate reports comes from the fitted demand model, so before it claims an
uplift it checks that model on data it was not fitted on (the evaluated split), at the prices
that were actually charged there:

- **fit**: WMAPE (Σ|predicted − actual| / Σ actual), bias (Σ predicted / Σ actual − 1) and
  calibration by decile of the prediction, overall and per product. Daily units are noisy, so
  the WMAPE is shown next to its *noise floor*: the WMAPE a perfect model would still have if
  units were Poisson around its prediction (E|Y − λ| = 2 e^-λ λ^(⌊λ⌋+1) / ⌊λ⌋!).
- **price changes** (the natural experiments of the data): for every day-to-day price change
  of a product inside the split (a move beyond ``pricing.CHANGE_TOLERANCE``), the change in
  units from the days before to the days after, predicted vs actual, as a log ratio of mean
  daily units (:func:`price_change_events`). Its sign says whether the model knows which way
  demand answers a price move, its error by how much.

:func:`verdict` turns the checks and the interval of the checked uplift (calibration.py: the
uplift re-measured against the split's own price changes) into the call evaluate leads with.
Actual units are clipped at 0 (net-return days sold nothing), as in the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.pricing import CHANGE_TOLERANCE, is_price_change

if TYPE_CHECKING:
    from pricing_cli.agent.baselines import SplitMeta
    from pricing_cli.config import EvaluateSettings

# Added to mean daily units before taking log ratios, to actual and predicted alike: a window
# without sales must not give an infinite change.
UNIT_SMOOTHING = 0.5
DECILES = 10


def calibration_by_decile(predicted: np.ndarray, actual: np.ndarray) -> list[dict[str, Any]]:
    """Rows, mean predicted and mean actual units per decile of the prediction (rows with
    equal predictions may share a decile, so fewer than 10 entries can come back)."""
    if predicted.size == 0:
        return []
    edges = np.quantile(predicted, np.linspace(0, 1, DECILES + 1))
    decile = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, DECILES - 1)
    out = []
    for d in range(DECILES):
        sel = decile == d
        if sel.any():
            out.append({"decile": d + 1, "rows": int(sel.sum()),
                        "mean_predicted": float(predicted[sel].mean()),
                        "mean_actual": float(actual[sel].mean())})
    return out


def poisson_mean_absolute_deviation(mean: np.ndarray) -> np.ndarray:
    """E|Y − λ| for Y ~ Poisson(λ), elementwise: 2 e^-λ λ^(⌊λ⌋+1) / ⌊λ⌋!."""
    lam = np.maximum(np.asarray(mean, dtype=np.float64), 0.0)
    floor = np.floor(lam)
    levels, inverse = np.unique(floor, return_inverse=True)
    log_factorial = np.array([math.lgamma(f + 1.0) for f in levels])[inverse.reshape(-1)]
    with np.errstate(divide="ignore"):
        log_mad = np.log(2.0) - lam + (floor + 1.0) * np.log(lam) - log_factorial.reshape(lam.shape)
    return np.where(lam > 0, np.exp(log_mad), 0.0)


def _fit_numbers(predicted: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    total_actual = float(actual.sum())
    total_predicted = float(predicted.sum())
    floor = float(poisson_mean_absolute_deviation(predicted).sum())
    ok = total_actual > 0
    return {
        "rows": int(actual.size), "actual_units": total_actual,
        "predicted_units": total_predicted,
        "wmape": float(np.abs(predicted - actual).sum()) / total_actual if ok else None,
        "wmape_noise_floor": floor / total_actual if ok else None,
        "bias_pct": (total_predicted / total_actual - 1.0) * 100.0 if ok else None,
    }


def held_out_fit(meta: SplitMeta, predicted: np.ndarray) -> dict[str, Any]:
    """The fit at the prices charged, overall and per product (keyed by product_id).

    Args:
        meta: the evaluated split.
        predicted: (n,) the model's expected units at ``meta.price``.

    Returns:
        {"overall": {...}, "per_product": {product_id: {...}}}, each with rows, actual_units,
        predicted_units, wmape, wmape_noise_floor, bias_pct (None where nothing was sold) and
        calibration (by decile).
    """
    actual = np.maximum(meta.units, 0.0)
    overall = {**_fit_numbers(predicted, actual),
               "calibration": calibration_by_decile(predicted, actual)}
    per_product: dict[str, Any] = {}
    for series, start in enumerate(meta.series_start):
        rows = slice(start, start + meta.series_length[series])
        per_product[str(meta.product_id[start])] = {
            **_fit_numbers(predicted[rows], actual[rows]),
            "calibration": calibration_by_decile(predicted[rows], actual[rows])}
    return {"overall": overall, "per_product": per_product}


@dataclass(frozen=True)
class PriceChangeEvents:
    """The held-out price changes, one entry per change.

    Attributes:
        series: the series (product) of each change.
        row: the first row at the new price.
        price_ratio: new price / old price.
        days_before, days_after: days in each window (at most the window, never across
            another price change or the split's edge).
        actual_log_ratio, predicted_log_ratio: log((mean units after + s) / (mean units
            before + s)), s = UNIT_SMOOTHING.
        calendar_log_ratio: the predicted log ratio had the price not changed (the model's
            units after the change at the old price): the part of both ratios that is the
            calendar, not the price. Zeros when not asked for.
    """

    series: np.ndarray
    row: np.ndarray
    price_ratio: np.ndarray
    days_before: np.ndarray
    days_after: np.ndarray
    actual_log_ratio: np.ndarray
    predicted_log_ratio: np.ndarray
    calendar_log_ratio: np.ndarray

    @property
    def count(self) -> int:
        return int(self.row.size)

    @property
    def signed(self) -> np.ndarray:
        """Changes where both the actual and the predicted units moved (a sign to compare)."""
        return (self.actual_log_ratio != 0) & (self.predicted_log_ratio != 0)

    @property
    def right_sign(self) -> np.ndarray:
        return np.sign(self.actual_log_ratio) == np.sign(self.predicted_log_ratio)


def _runs(meta: SplitMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, exclusive end, is a series' first run) of each run of one price."""
    n = meta.n_rows
    first = np.zeros(n, dtype=bool)
    first[meta.series_start] = True
    changed = np.zeros(n, dtype=bool)
    if n > 1:
        changed[1:] = is_price_change(meta.price[1:], meta.price[:-1])
    changed &= ~first
    run_start = np.flatnonzero(first | changed)
    return run_start, np.r_[run_start[1:], n], first[run_start]


def prices_held(meta: SplitMeta) -> np.ndarray:
    """(n,) each row's price had the last change not happened: the previous run's price
    (a series' first run keeps its own). Predicted units at these prices give
    :func:`price_change_events` the calendar part of each change."""
    run_start, run_end, first = _runs(meta)
    held = meta.price.copy()
    later = np.flatnonzero(~first)
    for run in later.tolist():
        held[run_start[run]:run_end[run]] = meta.price[run_start[run] - 1]
    return held


def price_change_events(meta: SplitMeta, predicted: np.ndarray, window: int,
                        predicted_held: np.ndarray | None = None) -> PriceChangeEvents:
    """Every day-to-day price change inside the split, with the units around it.

    A change on day t (``pricing.is_price_change`` from day t−1; the move onto day one is not
    seen) is compared over the up to ``window`` days before it at the old price and the up to
    ``window`` days from t on at the new price; each window stops at the neighbouring change.
    Predicted units are the model's at the prices charged on those days, so calendar effects
    inside the windows count on both sides. ``predicted_held``: the model's units at
    :func:`prices_held` (gives ``calendar_log_ratio``).
    """
    n = meta.n_rows
    actual = np.maximum(meta.units, 0.0)
    run_start, run_end, first_run = _runs(meta)
    # A change is the start of a run that is not a series' first run.
    later = ~first_run
    after_start = run_start[later]
    after_end = np.minimum(run_end[later], after_start + window)
    prev = np.flatnonzero(later) - 1
    before_end = run_end[prev]  # == after_start
    before_start = np.maximum(run_start[prev], before_end - window)

    def window_mean(values: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        cumulative = np.r_[0.0, np.cumsum(values)]
        return (cumulative[end] - cumulative[start]) / (end - start)

    def log_ratio(values: np.ndarray, before: np.ndarray | None = None) -> np.ndarray:
        return (np.log(window_mean(values, after_start, after_end) + UNIT_SMOOTHING)
                - np.log(window_mean(values if before is None else before, before_start,
                                     before_end) + UNIT_SMOOTHING))

    return PriceChangeEvents(
        series=meta.series_of_row[after_start] if n else np.zeros(0, dtype=np.int64),
        row=after_start, price_ratio=meta.price[after_start] / meta.price[after_start - 1],
        days_before=before_end - before_start, days_after=after_end - after_start,
        actual_log_ratio=log_ratio(actual), predicted_log_ratio=log_ratio(predicted),
        calendar_log_ratio=np.zeros(after_start.size) if predicted_held is None
        else log_ratio(predicted_held, predicted))


def _event_numbers(events: PriceChangeEvents, select: np.ndarray) -> dict[str, Any]:
    signed = events.signed & select
    right = int((events.right_sign & signed).sum())
    error = events.predicted_log_ratio[select] - events.actual_log_ratio[select]
    predicted, actual = events.predicted_log_ratio[select], events.actual_log_ratio[select]
    denominator = float((predicted**2).sum())
    return {
        "price_changes": int(select.sum()), "with_sign": int(signed.sum()),
        "right_sign": right,
        "sign_accuracy": right / int(signed.sum()) if signed.any() else None,
        "mean_abs_error": float(np.abs(error).mean()) if error.size else None,
        "mean_error": float(error.mean()) if error.size else None,
        # Actual on predicted log ratio, through the origin: 1 when the model's response to a
        # price move has the right size, below 0 when it has the wrong sign.
        "response_slope": float((predicted * actual).sum()) / denominator
        if denominator > 0 else None,
    }


def price_change_report(meta: SplitMeta, events: PriceChangeEvents, window: int
                        ) -> dict[str, Any]:
    """Sign accuracy and error of the predicted unit changes, overall and per product_id."""
    every = np.ones(events.count, dtype=bool)
    per_product = {str(meta.product_id[start]): _event_numbers(events, events.series == series)
                   for series, start in enumerate(meta.series_start)}
    return {"window_days": window, "measure": "log((mean units after + 0.5) / (mean units "
            "before + 0.5)) over the days at the old and at the new price",
            "overall": _event_numbers(events, every), "per_product": per_product}


def run_checks(meta: SplitMeta, predicted: np.ndarray, window: int,
               events: PriceChangeEvents | None = None) -> dict[str, Any]:
    """Both held-out checks: ``{"fit": held_out_fit, "price_changes": price_change_report}``
    (``events``: the split's price changes if already found with the same window)."""
    if events is None:
        events = price_change_events(meta, predicted, window)
    return {"fit": held_out_fit(meta, predicted),
            "price_changes": price_change_report(meta, events, window)}


# ----------------------------------------------------------------------------------------------
# The verdict


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def interval_text(interval: dict[str, Any]) -> str:
    """'+3.1% to +12.4%' (or 'n/a' where the baseline's profit is zero)."""
    if interval.get("low") is None:
        return "n/a"
    return f"{_pct(interval['low'])} to {_pct(interval['high'])}"


def failed_checks(fit: dict[str, Any], changes: dict[str, Any], cfg: EvaluateSettings,
                  min_changes: int) -> list[str]:
    """Why the model cannot be trusted on these rows, worst first ([] when every check passes).

    Args:
        fit: one entry of :func:`held_out_fit` (overall or a product's).
        changes: the matching entry of :func:`price_change_report`.
        cfg: the thresholds (``evaluate.*``).
        min_changes: price changes needed to check the response to price at all.
    """
    reasons = []
    accuracy = changes["sign_accuracy"]
    if changes["with_sign"] < min_changes:
        reasons.append(f"only {changes['with_sign']} held-out price changes, fewer than "
                       f"{min_changes}: the response to price could not be checked")
    elif accuracy is not None and accuracy < cfg.min_sign_accuracy:
        wrong = changes["with_sign"] - changes["right_sign"]
        reasons.append(f"the predicted response to price changes had the wrong sign in "
                       f"{(1 - accuracy) * 100:.0f}% of cases ({wrong} of "
                       f"{changes['with_sign']}; evaluate.min_sign_accuracy is "
                       f"{cfg.min_sign_accuracy:.0%})")
    bias = fit["bias_pct"]
    if bias is not None and abs(bias) > cfg.max_abs_bias_pct:
        side = "over" if bias > 0 else "under"
        reasons.append(f"the model {side}-predicts held-out units by {abs(bias):.0f}% "
                       f"(evaluate.max_abs_bias_pct is {cfg.max_abs_bias_pct:g}%)")
    wmape, floor = fit["wmape"], fit["wmape_noise_floor"]
    if wmape is not None and floor and wmape > cfg.max_wmape_excess * floor:
        reasons.append(f"held-out WMAPE {wmape:.2f} is {wmape / floor:.1f}x what Poisson noise "
                       f"alone gives ({floor:.2f}; evaluate.max_wmape_excess is "
                       f"{cfg.max_wmape_excess:g})")
    return reasons


# Share of a capped product's rows (demand.capped_low_price_days) the policy may price above
# the band the fit saw uncapped sales in before the verdict refuses the claim: a few rows are
# the grid's rounding at the band's edge.
CAPPED_ABOVE_BAND_SHARE = 0.05


def capped_sales_reasons(censoring: dict[str, Any] | None, fit_rows: int, meta: SplitMeta,
                         prices: np.ndarray) -> tuple[str | None, dict[str, str]]:
    """Why the claim cannot stand when sales look capped by stock and the policy leaves the
    prices where uncapped sales were seen (overall reason or None, and per product id).

    Capped sales understate demand where stock binds (low prices): the fit then leaves those
    days out (demand.capped_low_price_days), so its response is measured only over the price
    band of the days kept. A policy that prices a capped product above that band on more than
    CAPPED_ABOVE_BAND_SHARE of its rows relies on demand nobody saw uncapped, and the held-out
    price changes (capped alike) cannot check it.

    Args:
        censoring: the fit's ``info["censoring"]`` (None: no fit information).
        fit_rows: rows the demand model was fitted on (``info["rows"]``).
        meta: the evaluated split.
        prices: the policy's price of every row of ``meta``.
    """
    from pricing_cli.agent.demand import uncapped_price_band

    low = (censoring or {}).get("low_price_days") or {}
    if not low.get("per_product") or fit_rows <= 0:
        return None, {}
    upper = uncapped_price_band(censoring, int(meta.product_index.max()) + 1
                                if meta.n_rows else 0)[1]
    capped = np.isfinite(upper[meta.product_index]) if len(upper) else np.zeros(0, bool)
    above = capped & (prices > np.where(capped, upper[meta.product_index], np.inf)
                      * (1.0 + CHANGE_TOLERANCE))
    days_pct = 100.0 * low["rows_left_out"] / fit_rows
    products = "1 product sells" if low["products"] == 1 else f"{low['products']} products sell"
    lead = (f"sales look capped by stock on {days_pct:.0f}% of train days (the low-price "
            f"days of {products} less than their demand and were left out of the fit)")
    # Inside the band the claim still cannot stand: the fit does not know the stock, so it
    # scores the history's capped low-price days at demand they could not sell (measured on
    # the stockouts bench: a checked +4.1% [+2.7, +6.0] where the true uplift was -2.4%).
    unscored = ("the fit cannot score the history's capped low-price days (it does not know "
                "the stock), so the uplift over them is not measured")
    per_product: dict[str, str] = {}
    for product in np.unique(meta.product_index[capped]):
        own = meta.product_index == product
        share = float(above[own].mean())
        per_product[str(meta.product_id[own][0])] = (
            f"{lead}; the policy prices {share:.0%} of this product's days above "
            f"{upper[product]:.2f}, the highest price its uncapped sales were seen at"
            if share > CAPPED_ABOVE_BAND_SHARE else f"{lead}; {unscored}")
    if not capped.any():
        return None, per_product
    share = float(above[capped].mean())
    if share <= CAPPED_ABOVE_BAND_SHARE:
        return f"{lead}; {unscored}", per_product
    return (f"{lead}; the policy prices {share:.0%} of those products' days above the highest "
            "price their uncapped sales were seen at, where the response to price is not "
            "measured", per_product)


def call(reasons: list[str], interval: dict[str, Any] | None) -> dict[str, Any]:
    """One reliability call from the failed checks and the uplift interval.

    Returns:
        {status, message, reasons}; status is ``not_reliable`` (a check failed),
        ``no_interval`` (no held-out price change to check the uplift against),
        ``no_reliable_uplift`` (the 90% interval includes 0), ``reliable_uplift`` or
        ``reliable_loss`` (the interval lies above / below 0).
    """
    if reasons:
        return {"status": "not_reliable", "message": f"not reliable: {reasons[0]}",
                "reasons": reasons}
    if interval is None or interval.get("low") is None:
        return {"status": "no_interval",
                "message": "no reliable uplift: no held-out price change measured how demand "
                           "answers a price move, so the uplift could not be checked",
                "reasons": []}
    low, high, point = interval["low"], interval["high"], interval["point"]
    level = f"{interval['level']:.0%} interval"
    fitted = interval.get("fitted_point")
    # The fitted model's own figure goes beside the checked one.
    aside = "" if fitted is None else f"; {_pct(fitted)} under the fitted model"
    if low <= 0 <= high:
        return {"status": "no_reliable_uplift",
                "message": f"no reliable uplift: the {level} of the profit uplift vs historical "
                           f"prices, {interval_text(interval)}, includes 0{aside}", "reasons": []}
    if low > 0:
        return {"status": "reliable_uplift",
                "message": f"reliable: profit uplift vs historical prices {_pct(point)} "
                           f"({level} {interval_text(interval)}{aside})", "reasons": []}
    return {"status": "reliable_loss",
            "message": f"reliable loss: profit vs historical prices {_pct(point)} "
                       f"({level} {interval_text(interval)}{aside})", "reasons": []}


def verdict(checks: dict[str, Any], interval: dict[str, Any] | None,
            product_intervals: dict[str, dict[str, Any]] | None,
            cfg: EvaluateSettings,
            capped: tuple[str | None, dict[str, str]] = (None, {})) -> dict[str, Any]:
    """The overall and per-product reliability calls on the agent's uplift.

    A product with fewer than ``evaluate.min_product_price_changes`` price changes is judged on
    the overall sign check (the model pools its products), not refused for its own few.
    ``capped`` (:func:`capped_sales_reasons`) leads the reasons, overall and per product.

    Returns:
        {status, message, reasons, thresholds, per_product: {product_id: {status, message,
        reasons}}, products_by_status}.
    """
    fit, changes = checks["fit"], checks["price_changes"]
    capped_reason, capped_products = capped
    overall = call([*([capped_reason] if capped_reason else []),
                    *failed_checks(fit["overall"], changes["overall"], cfg,
                                   cfg.min_price_changes)], interval)
    overall_changes = changes["overall"]
    per_product: dict[str, Any] = {}
    for product_id, product_fit in fit["per_product"].items():
        own = changes["per_product"][product_id]
        pooled = own["with_sign"] < cfg.min_product_price_changes
        reasons = failed_checks(product_fit, overall_changes if pooled else own, cfg,
                                cfg.min_price_changes if pooled else
                                cfg.min_product_price_changes)
        if product_id in capped_products:
            reasons.insert(0, capped_products[product_id])
        per_product[product_id] = call(reasons, (product_intervals or {}).get(product_id))
        per_product[product_id]["sign_check"] = "pooled" if pooled else "own"
    counts: dict[str, int] = {}
    for entry in per_product.values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return {**overall, "per_product": per_product, "products_by_status": counts,
            "thresholds": {"min_sign_accuracy": cfg.min_sign_accuracy,
                           "min_price_changes": cfg.min_price_changes,
                           "min_product_price_changes": cfg.min_product_price_changes,
                           "max_abs_bias_pct": cfg.max_abs_bias_pct,
                           "max_wmape_excess": cfg.max_wmape_excess,
                           "event_window_days": cfg.event_window_days}}
