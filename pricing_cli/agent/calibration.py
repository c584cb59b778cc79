"""The uplift checked against held-out data: what evaluate claims when it cannot trust its model.

An uplift "under the fitted model" compares two prices by the model's ratio of expected units
at them, so its error is the model's error in *how demand answers a price move*: a wrong
shape, a biased elasticity, sales capped by stock, siblings that take the sales. The bootstrap
ensemble cannot see any of that (every member has the same shape and the same blind spots), so
its interval was far too narrow on markets unlike the model (docs/benchmarks.md, scenarios).

The held-out split has its own answer to that question: its day-to-day price changes
(:func:`checks.price_change_events`), each with the actual and the predicted log ratio of units
after vs before. Regressed through the origin, actual on predicted, they give the **response
slope** s: 1 when the model's response has the right size, 0.6 when actual units moved 60% as
much as predicted. The checked uplift then

- anchors on what was actually sold at the historical prices (the realized units ``y`` of each
  row, not the model's prediction, so a biased level does not move the baseline), and
- moves each row to the policy's price with the model's unit ratio damped or stretched by s:
  ``units = y · (q(p_policy) / q(p_historical)) ** s``.

Its interval combines three sources of doubt, resampled together in each of ``draws`` draws:
the products whose price changes measured s (a cluster bootstrap, since one product's changes
share its errors), a product's own deviation from the pooled s (empirical-Bayes shrinkage of
each product's slope toward the pooled one, drawn from its posterior), and the demand ensemble
(one member per draw). It is a percentile interval of the draws, moved to centre on the point
estimate (the point fit at the pooled s).

Where the held-out changes are too few to measure s, there is no checked uplift (and the
verdict refuses to claim one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pricing_cli.agent.baselines import SplitMeta
    from pricing_cli.agent.checks import PriceChangeEvents

# Draws of the checked uplift (cluster bootstrap of the slope x ensemble member).
DRAWS = 400
# Bounds on a response slope: beyond them one product's few changes say more about noise than
# about the model. Below 0 the split's units answered price moves the other way round.
SLOPE_RANGE = (-2.0, 3.0)
# Ridge on the position effect s1, in units of the mm evidence: a spread of positions of
# about 0.1 in log price has as much say as the ridge.
POSITION_RIDGE = 0.01
# Events whose predicted log ratio is this small carry no information on the slope.
MIN_PREDICTED = 1e-6
METHOD = ("realized units at historical prices x the model's unit ratio ** the held-out "
          "response slope; cluster bootstrap over products x ensemble members")


@dataclass(frozen=True)
class ResponseSlope:
    """The held-out response slope, pooled and per series, with bootstrap draws.

    The slope may change with where on the price scale a move happens: a shape error (say
    linear demand fitted as constant elasticity) shows as moves at high prices answering more
    than the model says, at low prices less. So the fit is ``a = (s0 + s1 · z) · m`` with
    ``z`` the move's mean log price relative to the product's reference price (its median
    train price), and a policy's move at position z gets the slope ``s0_p + s1 · z``.

    Attributes:
        pooled: s0, the slope of actual on predicted log ratios at the reference price.
        position_effect: s1, how the slope changes per unit of log price position.
        pooled_draws, position_draws: (B,) both on products resampled with replacement.
        series: (n_series,) each product's s0 shrunk toward the pooled one.
        series_draws: (B, n_series) draws from each product's posterior (its own evidence and
            the pooled draw as prior).
        events: price changes that measured it.
        between_sd: the spread of the products' true s0 around the pooled one (method of
            moments; 0 when the products agree within their noise).
    """

    pooled: float
    position_effect: float
    pooled_draws: np.ndarray
    position_draws: np.ndarray
    series: np.ndarray
    series_draws: np.ndarray
    events: int
    between_sd: float

    def row_slope(self, series: np.ndarray, position: np.ndarray, draw: int | None = None
                  ) -> np.ndarray:
        """(n,) the slope of each row: its product's s0 plus s1 times its move's position
        (``draw``: bootstrap draw b instead of the point estimate)."""
        if draw is None:
            s0, s1 = self.series[series], self.position_effect
        else:
            s0, s1 = self.series_draws[draw][series], self.position_draws[draw]
        return np.clip(s0 + s1 * position, *SLOPE_RANGE)

    def as_dict(self) -> dict[str, Any]:
        low, high = np.quantile(self.pooled_draws, [0.05, 0.95])
        p_low, p_high = np.quantile(self.position_draws, [0.05, 0.95])
        return {"pooled": self.pooled, "pooled_90pct": [float(low), float(high)],
                "position_effect": self.position_effect,
                "position_effect_90pct": [float(p_low), float(p_high)],
                "events": self.events, "between_product_sd": self.between_sd,
                "products_median": float(np.median(self.series)) if self.series.size else None}


def _solve_slopes(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s0, s1) from summed normal-equation terms (..., 5) = (mm, mmz, mmzz, ma, maz), with a
    ridge on s1 (POSITION_RIDGE times the mm evidence) so a narrow spread of positions
    leaves s1 near 0 instead of wild."""
    mm, mmz, mmzz, ma, maz = np.moveaxis(sums, -1, 0)
    mmzz = mmzz + POSITION_RIDGE * mm
    det = mm * mmzz - mmz * mmz
    safe = np.where(np.abs(det) > 1e-300, det, np.inf)
    return (ma * mmzz - maz * mmz) / safe, (mm * maz - mmz * ma) / safe


def response_slope(events: PriceChangeEvents, n_series: int, position: np.ndarray, *,
                   draws: int = DRAWS, seed: int = 0) -> ResponseSlope | None:
    """The response slope of the held-out price changes (None without a usable change).

    Args:
        events: the split's price changes (checks.price_change_events).
        n_series: products in the split.
        position: (events.count,) each change's mean log price relative to the product's
            reference price (:func:`move_position` of the old and the new price).
        draws: bootstrap draws.
        seed: of the bootstrap.
    """
    # The calendar's part of each change is predicted alike on both sides; left in, it would
    # pull the slope toward 1 whatever the price response.
    m = events.predicted_log_ratio - events.calendar_log_ratio
    a = events.actual_log_ratio - events.calendar_log_ratio
    use = np.abs(m) > MIN_PREDICTED
    if not use.any():
        return None
    m, a, series, z = m[use], a[use], events.series[use], np.asarray(position)[use]
    terms = np.column_stack([m * m, m * m * z, m * m * z * z, m * a, m * a * z])
    per_series = np.stack([np.bincount(series, terms[:, j], n_series) for j in range(5)],
                          axis=1)
    s0, s1 = (float(v) for v in _solve_slopes(per_series.sum(axis=0)))
    rng = np.random.default_rng(seed)
    # Cluster bootstrap: each draw takes products with replacement (multinomial counts).
    has = np.flatnonzero(per_series[:, 0] > 0)
    counts = rng.multinomial(has.size, np.full(has.size, 1.0 / has.size), size=draws)
    s0_draws, s1_draws = _solve_slopes(counts @ per_series[has])
    # Each product's own s0 (given the pooled s1) and its sampling variance.
    smm = per_series[:, 0]
    own_sma = np.bincount(series, m * (a - s1 * z * m), n_series)
    residual = a - (s0 + s1 * z) * m
    noise = np.bincount(series, m * m * residual * residual, n_series)
    own = np.divide(own_sma, smm, out=np.full(n_series, s0), where=smm > 0)
    own_var = np.divide(noise, smm * smm, out=np.full(n_series, np.inf), where=smm > 0)
    own_var[own_var <= 0] = np.inf
    finite = np.isfinite(own_var)
    if finite.sum() >= 2:
        # Method of moments: the spread of own slopes beyond their noise is the real spread.
        weights = 1.0 / own_var[finite]
        spread = float(np.average((own[finite] - s0) ** 2, weights=weights))
        tau2 = max(0.0, spread - float(np.average(own_var[finite], weights=weights)))
    else:
        tau2 = 0.0
    if tau2 > 0:
        precision = np.where(finite, 1.0 / np.where(finite, own_var, 1.0), 0.0) + 1.0 / tau2
        prior_weight = (1.0 / tau2) / precision
        post_sd = np.sqrt(1.0 / precision)
    else:
        prior_weight = np.ones(n_series)
        post_sd = np.zeros(n_series)
    own_part = np.where(finite, own, s0)
    series_slope = prior_weight * s0 + (1 - prior_weight) * own_part
    noise_draws = rng.standard_normal((draws, n_series))
    series_draws = (prior_weight * s0_draws[:, None] + (1 - prior_weight) * own_part
                    + post_sd * noise_draws)
    return ResponseSlope(pooled=s0, position_effect=s1, pooled_draws=s0_draws,
                         position_draws=s1_draws, series=series_slope,
                         series_draws=series_draws, events=int(use.sum()),
                         between_sd=float(np.sqrt(tau2)))


def move_position(old_price: np.ndarray, new_price: np.ndarray, reference: np.ndarray
                  ) -> np.ndarray:
    """Where on the price scale a move happens: the mean of both prices' log ratio to the
    product's reference price."""
    return 0.5 * (np.log(old_price / reference) + np.log(new_price / reference))


def checked_units(realized: np.ndarray, model_at_policy: np.ndarray,
                  model_at_historical: np.ndarray, slope: np.ndarray | float) -> np.ndarray:
    """Units at the policy's prices: the realized units at the historical prices times the
    model's unit ratio to the power ``slope`` (per row).

    The ratio is smoothed as the held-out changes that measured the slope were
    (``checks.UNIT_SMOOTHING`` on both sides): a model that puts the historical price near its
    choke price would otherwise multiply real sales by thousands."""
    from pricing_cli.agent.checks import UNIT_SMOOTHING

    ratio = ((np.maximum(model_at_policy, 0.0) + UNIT_SMOOTHING)
             / (np.maximum(model_at_historical, 0.0) + UNIT_SMOOTHING))
    return np.maximum(realized, 0.0) * ratio ** slope


def checked_uplift(meta: SplitMeta, policies: dict[str, np.ndarray], models: list[Any],
                   slope: ResponseSlope, reference: np.ndarray, profits_of: Any, level: float,
                   baseline: str = "historical", units_under: Any = None
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every policy's checked uplift over ``baseline``, overall and (for the agent) per product.

    Args:
        meta: the evaluated split.
        policies: name -> (n,) prices; must contain ``baseline`` and ``agent``.
        models: the point fit first, then the ensemble members (each with expected_units).
        slope: the held-out response slope.
        reference: (n,) each row's reference price (the one ``slope`` was measured with).
        profits_of: (name, prices, units) -> (n_series,) profit per product (change costs as
            the policy pays them).
        level: coverage of the interval.
        units_under: (model, prices) -> (n,) a policy's expected units under a model, as
            evaluate scores it (default: ``model.expected_units`` row by row).

    Returns:
        (policy -> entry, product_id -> entry of the agent); an entry is {point, low, high,
        level, draws, slope, method, fitted_point (the point fit's own uplift)}, the
        uplifts None where the baseline profit is ~0.
    """
    if meta.n_rows == 0:
        return {}, {}
    realized = np.maximum(meta.units, 0.0)
    base_prices = policies[baseline]
    base_profit = profits_of(baseline, base_prices, realized)  # what was actually earned
    if units_under is None:
        def units_under(model: Any, prices: np.ndarray) -> np.ndarray:
            return model.expected_units(meta.product_index, meta.date, prices)
    # Unit ratios per model: only the policy's price over the historical one matters.
    at_base = [np.asarray(units_under(m, base_prices), dtype=np.float64) for m in models]
    n_draws = slope.pooled_draws.size
    member = np.arange(n_draws) % max(len(models) - 1, 1) + (1 if len(models) > 1 else 0)
    tails = [(1 - level) / 2, 0.5, (1 + level) / 2]
    row_series = meta.series_of_row

    model_base_profit = profits_of(baseline, base_prices, at_base[0])

    def entry(point: float | None, draws: np.ndarray | None, fitted: float | None
              ) -> dict[str, Any]:
        out: dict[str, Any] = {"point": point, "low": None, "high": None, "level": level,
                               "draws": n_draws, "slope": slope.pooled, "method": METHOD,
                               "fitted_point": fitted}
        if point is not None and draws is not None:
            low, median, high = np.quantile(draws, tails)
            out.update(low=point - (float(median) - float(low)),
                       high=point + (float(high) - float(median)))
        return out

    def pct(gain: np.ndarray, base: np.ndarray) -> np.ndarray | None:
        if np.any(np.abs(base) < 1e-9):
            return None
        return gain / np.abs(base) * 100.0

    overall: dict[str, dict[str, Any]] = {}
    per_product: dict[str, dict[str, Any]] = {}
    for name, prices in policies.items():
        at_policy = [np.asarray(units_under(m, prices), dtype=np.float64) for m in models]
        position = move_position(base_prices, prices, reference)
        point_units = checked_units(realized, at_policy[0], at_base[0],
                                    slope.row_slope(row_series, position))
        point_profit = profits_of(name, prices, point_units)
        draws = np.empty((n_draws, meta.series_start.size))
        for b in range(n_draws):
            k = int(member[b])
            units = checked_units(realized, at_policy[k], at_base[k],
                                  slope.row_slope(row_series, position, b))
            draws[b] = profits_of(name, prices, units)
        # The fitted model's own uplift (its units for both policies), shown beside.
        model_profit = profits_of(name, prices, at_policy[0])

        def first(values: np.ndarray | None) -> float | None:
            return None if values is None else float(values[0])

        total = pct(np.array([point_profit.sum() - base_profit.sum()]),
                    np.array([base_profit.sum()]))
        total_draws = pct(draws.sum(axis=1) - base_profit.sum(),
                          np.full(n_draws, base_profit.sum()))
        fitted = pct(np.array([model_profit.sum() - model_base_profit.sum()]),
                     np.array([model_base_profit.sum()]))
        overall[name] = entry(first(total), total_draws, first(fitted))
        if name == "agent":
            for s, start in enumerate(meta.series_start):
                own = pct(np.array([point_profit[s] - base_profit[s]]),
                          np.array([base_profit[s]]))
                own_draws = pct(draws[:, s] - base_profit[s], np.full(n_draws, base_profit[s]))
                own_fitted = pct(np.array([model_profit[s] - model_base_profit[s]]),
                                 np.array([model_base_profit[s]]))
                per_product[str(meta.product_id[start])] = entry(first(own), own_draws,
                                                                 first(own_fitted))
    return overall, per_product
