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

Shapes (:func:`shape_checked_uplift`): the slope is measured at history's own moves, and the
policy's moves are larger, where a constant-elasticity curve and a linear or logit one part.
So the check is repeated with every demand shape given to every product (the shapes train did
not choose are fitted here on the train rows, :func:`with_every_shape`), each with its own
held-out slope, and each draw takes the shape with the lowest held-out deviance of the
split's units over a resample of the products (:func:`shape_choice`): shapes the held-out
data cannot tell apart share the interval, a shape it rejects gets no draw. The point is the
best shape's over all products.

Category-wide moves (:func:`with_cross_price_range`): a product's units also answer its
siblings' prices, through the fitted cross-price term on the category price index (the mean
log price of its siblings relative to their reference prices). The held-out days show that
term only over the range of the index they had (history promotes one product at a time, so a
product's index moves a few percent); a policy that moves a whole category moves the index
further, where the term's straight line is an extrapolation no held-out day checked (on the
substitution market it credited the agent with +10 points of uplift that the true choice
model does not give). So every shape is taken twice: as fitted, and with each row's index held
inside its product's held-out range (the siblings' effect stops where the data stopped). The
held-out units at the prices charged cannot tell the two apart (inside the range they are the
same model), so they share the draws half and half and the point is the mean of their points.

Where the held-out changes are too few to measure s, there is no checked uplift (and the
verdict refuses to claim one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl

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
          "response slope; cluster bootstrap over products x ensemble members x demand shapes "
          "(each chosen by the held-out deviance of a product resample)")


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


@dataclass(frozen=True)
class ShapeCheck:
    """One demand shape's part in the checked uplift.

    Attributes:
        name: ``fitted`` (the run's own model, each product at its chosen shape) or a shape of
            ``demand_shapes.FORMS`` given to every product.
        models: the point model of that shape first, then ensemble members (may be none).
        slope: the held-out response slope measured with that shape's predictions.
        deviance: (n_series,) the shape's Poisson deviance of each product's held-out units at
            the prices charged.
        held_range: the models hold the category price index inside its held-out range
            (:func:`with_cross_price_range`).
    """

    name: str
    models: list[Any]
    slope: ResponseSlope
    deviance: np.ndarray
    held_range: bool = False


def with_every_shape(model: Any, train: pl.DataFrame, strength: float, detect_capped: bool,
                     resamples: int = 0, seed: int = 0) -> list[Any]:
    """``model`` with parameters for every shape of ``demand_shapes.FORMS``, then
    ``resamples`` copies whose linear and logit parameters were refitted on bootstrap
    resamples of the train rows (whole product-weeks, as the ensemble's refits).

    Why: train fits only the shapes some product chose, so a run whose products all chose
    loglog cannot say what a linear or logit curve through the same history would predict at
    the policy's prices, and that is where the shapes part (docs/evaluate.md, linear and
    logit markets). The missing shapes are fitted here as train fits them
    (``demand_shapes.fit_shape`` on the model's calendar level, each price stretched by the
    day's calendar scale, the rows weighted as the fit weighted them: demand.model_row_weights,
    capped days and the low-price leave-out included), less the demand-surprise
    controls, which are 0 on a typical day. The resampled copies carry the shape's own fit
    uncertainty into the checked interval, as the ensemble members carry the run's. A model
    without shapes or train rows: ``[model]``.

    Args:
        model: a fitted DemandModel.
        train: the train rows it was fitted on (product_index, date, price, units[, on_hand]).
        strength: train.demand_shrinkage.
        detect_capped: train.demand_detect_capped.
        resamples: refits on resampled product-weeks.
        seed: of the resampling.
    """
    from dataclasses import replace

    import polars as pl

    from pricing_cli.agent import demand_shapes as shapes
    from pricing_cli.agent.demand import cross_price_term, model_row_weights
    from pricing_cli.agent.ensemble import bootstrap_product_weeks

    params = getattr(model, "shape_params", None)
    if params is None or train.height == 0:
        return [model]
    elasticity = model.product_parameters()[:, 3]
    kept = train.select([c for c in ("product_index", "date", "price", "units", "on_hand")
                         if c in train.columns]).filter(
        pl.col("price").is_finite() & (pl.col("price") > 0) & pl.col("units").is_finite())
    # The siblings' part of each row's level, from the whole category-day's prices (a
    # resample below repeats or drops product-weeks, so it is taken along, not recomputed).
    kept = kept.with_columns(pl.Series("cross_term", np.broadcast_to(cross_price_term(
        model, kept["product_index"].to_numpy().astype(np.int64),
        kept["date"].to_numpy().astype("datetime64[D]"),
        kept["price"].to_numpy().astype(np.float64)), kept.height).astype(np.float64)))

    def refit(rows_frame: pl.DataFrame, params: np.ndarray, forms: list[str]) -> np.ndarray:
        product = rows_frame["product_index"].to_numpy().astype(np.int64)
        price = rows_frame["price"].to_numpy().astype(np.float64)
        units = np.maximum(rows_frame["units"].to_numpy().astype(np.float64), 0.0)
        dates = rows_frame["date"].to_numpy().astype("datetime64[D]")
        on_hand = (rows_frame["on_hand"].cast(float).to_numpy()
                   if "on_hand" in rows_frame.columns else None)
        weight = model_row_weights(model, product, dates, price, units, on_hand,
                                   detect=detect_capped).exact
        relative = price / model.reference_price[product]
        rows = shapes.ShapeRows(
            product=product, r=1.0 + model.calendar_scale(product, dates) * (relative - 1.0),
            log_base=(model.log_base_and_elasticity(product, dates)[0]
                      + rows_frame["cross_term"].to_numpy()), units=units,
            product_category=model.product_category, weight=weight)
        params = params.copy()
        for form in forms:
            code = shapes.FORMS.index(form)
            start = params[:, code] if params[:, code].any() else shapes.initial_params(
                form, elasticity)
            params[:, code] = shapes.fit_shape(form, rows, start, strength)
        return params

    missing = [form for form in shapes.FORMS[1:] if not params[:, shapes.FORMS.index(form)].any()]
    every = replace(model, shape_params=refit(kept, params, missing) if missing else params)
    out = [every]
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        out.append(replace(model, shape_params=refit(
            bootstrap_product_weeks(kept, rng), every.shape_params, list(shapes.FORMS[1:]))))
    return out


@dataclass(frozen=True)
class CrossPriceWithin:
    """``model`` with each row's category price index held inside its product's range
    ``[low, high]`` (by product index): beyond the range the held-out days measured, the
    siblings' prices move this model's units no further. Every other attribute is the
    model's."""

    model: Any
    low: np.ndarray
    high: np.ndarray

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray, prices: np.ndarray,
                       **options: Any) -> np.ndarray:
        index = options.get("category_index")
        if index is not None:
            product = np.asarray(product_index, dtype=np.int64)
            options["category_index"] = np.clip(index, self.low[product], self.high[product])
        return self.model.expected_units(product_index, dates, prices, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def held_out_index_range(model: Any, meta: SplitMeta) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high), by product index: the range of each product's category price index on
    the split's days at the prices charged (0 to 0 for a product without rows); None where
    ``model`` has no cross-price term."""
    from pricing_cli.agent.demand import policy_category_index

    index = policy_category_index(model, meta.product_index, meta.date, meta.price)
    if index is None:
        return None
    size = max(int(model.n_products), int(meta.product_index.max()) + 1 if meta.n_rows else 0)
    low, high = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(low, meta.product_index, index)
    np.maximum.at(high, meta.product_index, index)
    seen = np.isfinite(low)
    return np.where(seen, low, 0.0), np.where(seen, high, 0.0)


def with_cross_price_range(shapes: list[ShapeCheck], best: int, choice: np.ndarray,
                           low: np.ndarray, high: np.ndarray, seed: int = 0
                           ) -> tuple[list[ShapeCheck], list[int], np.ndarray]:
    """Every shape twice: as fitted (the cross-price term extrapolated along its line) and
    with the category price index held inside each product's held-out range
    (:class:`CrossPriceWithin`).

    Why: the held-out units at the prices charged are the same under both (the index stays
    inside its range there), so they cannot say which holds at a policy's category-wide moves;
    like two shapes the data cannot separate (:func:`shape_choice`), they share the draws.

    Args:
        shapes, best, choice: the candidates, the best one and each draw's
            (:func:`shape_choice`).
        low, high: (n_products,) :func:`held_out_index_range`.
        seed: which half of the draws takes the held range (a seeded permutation, so each
            half still meets every ensemble member).

    Returns:
        (candidates: shape k at 2k, its held-range twin at 2k + 1; the best pair (both points
        count, equally); each draw's candidate).
    """
    out: list[ShapeCheck] = []
    for check in shapes:
        out.append(check)
        out.append(ShapeCheck(check.name,
                              [CrossPriceWithin(m, low, high) for m in check.models],
                              check.slope, check.deviance, held_range=True))
    held = np.random.default_rng(seed).permutation(choice.size) % 2
    return out, [2 * best, 2 * best + 1], 2 * np.asarray(choice, dtype=np.int64) + held


def shape_variant(model: Any, form: str) -> Any:
    """``model`` with every product at ``form`` (its parameters must be fitted:
    :func:`with_every_shape`)."""
    from dataclasses import replace

    from pricing_cli.agent.demand_shapes import FORMS

    return replace(model, product_form=np.full(model.n_products, FORMS.index(form), np.int8))


def shape_choice(deviance: np.ndarray, draws: int, seed: int) -> tuple[int, np.ndarray]:
    """Which shape each draw of the checked uplift uses: the shape with the lowest held-out
    deviance over a cluster-bootstrap resample of the products.

    Why: the held-out days at the prices charged tell the shapes apart only as far as the
    history's own prices do, and the policy's prices lie further out, where the shapes part
    (docs/evaluate.md, measured: at 40 products the loglog fit's checked interval missed the
    true uplift of a linear market and of a logit one). Resampling the products and taking
    the best shape of each resample gives every shape the share of draws the data cannot
    take from it: a shape that fits clearly worse gets none, two shapes the data cannot
    separate share the interval. The products are resampled as the slope's draws are (whole
    products, with replacement), since one product's days share its errors.

    Args:
        deviance: (n_shapes, n_series) each shape's deviance of each product's held-out units.
        draws: bootstrap draws.
        seed: of the resampling.

    Returns:
        (the shape with the lowest deviance over all products, (draws,) the shape of each
        draw). Ties go to the earlier shape.
    """
    deviance = np.asarray(deviance, dtype=np.float64)
    best = int(np.argmin(deviance.sum(axis=1)))
    n_series = deviance.shape[1]
    if deviance.shape[0] == 1 or n_series == 0:
        return best, np.full(draws, best, dtype=np.int64)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_series, np.full(n_series, 1.0 / n_series), size=draws)
    return best, np.argmin(counts @ deviance.T, axis=1).astype(np.int64)


def checked_uplift(meta: SplitMeta, policies: dict[str, np.ndarray], models: list[Any],
                   slope: ResponseSlope, reference: np.ndarray, profits_of: Any, level: float,
                   baseline: str = "historical", units_under: Any = None
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every policy's checked uplift over ``baseline`` under one model, overall and (for the
    agent) per product: :func:`shape_checked_uplift` with a single shape.

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
    check = ShapeCheck("fitted", models, slope, np.zeros(meta.series_start.size))
    return shape_checked_uplift(meta, policies, [check], 0,
                                np.zeros(slope.pooled_draws.size, dtype=np.int64), reference,
                                profits_of, level, baseline, units_under)


def shape_checked_uplift(meta: SplitMeta, policies: dict[str, np.ndarray],
                         shapes: list[ShapeCheck], best: int | list[int], choice: np.ndarray,
                         reference: np.ndarray, profits_of: Any, level: float,
                         baseline: str = "historical", units_under: Any = None
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every policy's checked uplift over ``baseline`` across demand shapes.

    Each shape gives a point (its point model at its own pooled slope) and draws (cluster
    bootstrap of its slope x its ensemble members), the draws moved to centre on its point.
    Draw b takes shape ``choice[b]`` (:func:`shape_choice`); the interval is the percentile
    range of those draws and the point that of shape ``best`` (a list: the mean of their
    points, :func:`with_cross_price_range`). With one shape this is the
    interval of the one model, centred on its point. ``shapes[0]`` is the run's own model:
    ``fitted_point`` is its own uplift.

    Returns:
        (policy -> entry, product_id -> entry of the agent); an entry is {point, low, high,
        level, draws, slope, method, fitted_point, shape, shapes (name -> {point, share})},
        the uplifts None where the baseline profit is ~0.
    """
    if meta.n_rows == 0:
        return {}, {}
    best_of = [best] if isinstance(best, int) else list(best)
    first = best_of[0]
    realized = np.maximum(meta.units, 0.0)
    base_prices = policies[baseline]
    base_profit = profits_of(baseline, base_prices, realized)  # what was actually earned
    if units_under is None:
        def units_under(model: Any, prices: np.ndarray) -> np.ndarray:
            return model.expected_units(meta.product_index, meta.date, prices)
    n_draws = int(choice.size)
    tails = [(1 - level) / 2, (1 + level) / 2]
    row_series = meta.series_of_row
    n_series = meta.series_start.size
    share = np.bincount(choice, minlength=len(shapes)) / max(n_draws, 1)
    # Unit ratios per model: only the policy's price over the historical one matters.
    at_base = [[np.asarray(units_under(m, base_prices), dtype=np.float64) for m in s.models]
               for s in shapes]
    fitted_base = profits_of(baseline, base_prices, at_base[0][0])

    def pct(gain: np.ndarray, base: np.ndarray | float) -> np.ndarray | None:
        if np.any(np.abs(base) < 1e-9):
            return None
        return gain / np.abs(base) * 100.0

    def shape_draws(k: int, name: str, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n_series,) the point profit and (n_draws, n_series) the draws' of shape k."""
        check = shapes[k]
        models = check.models
        member = (np.arange(n_draws) % max(len(models) - 1, 1)
                  + (1 if len(models) > 1 else 0))
        at_policy = [np.asarray(units_under(m, prices), dtype=np.float64) for m in models]
        position = move_position(base_prices, prices, reference)
        point = profits_of(name, prices, checked_units(
            realized, at_policy[0], at_base[k][0], check.slope.row_slope(row_series, position)))
        draws = np.zeros((n_draws, n_series))
        for b in np.flatnonzero(choice == k).tolist():  # only the draws that use this shape
            j = int(member[b])
            draws[b] = profits_of(name, prices, checked_units(
                realized, at_policy[j], at_base[k][j],
                check.slope.row_slope(row_series, position, b)))
        return point, draws

    forms = range(len(shapes))

    def mean_point(ks: list[int], points: list[Any]) -> float | None:
        found = [points[k] for k in ks]
        return None if not found or any(p is None for p in found) else float(np.mean(found))

    def entry(points: list[np.ndarray | None], draws: list[np.ndarray | None],
              fitted: np.ndarray | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "point": None, "low": None, "high": None, "level": level, "draws": n_draws,
            "slope": shapes[first].slope.pooled, "method": METHOD,
            "fitted_point": None if fitted is None else float(fitted),
            "shape": shapes[first].name,
            "shapes": {name: {"point": mean_point([k for k in forms if shapes[k].name == name],
                                                  points),
                              "share": float(sum(share[k] for k in forms
                                                 if shapes[k].name == name))}
                       for name in dict.fromkeys(s.name for s in shapes)}}
        if any(s.held_range for s in shapes):
            # The cross-price term's two forms, each for the best shape.
            out["cross_price"] = {
                key: {"point": mean_point([k for k in best_of if shapes[k].held_range == held],
                                          points),
                      "share": float(sum(share[k] for k in forms
                                         if shapes[k].held_range == held))}
                for key, held in (("extrapolated", False), ("held_out_range", True))}
        if any(p is None for p in points) or any(d is None for d in draws):
            return out
        mixed = np.empty(n_draws)
        for k, (p, d) in enumerate(zip(points, draws, strict=True)):
            use = choice == k
            if use.any():  # each shape's draws centred on its own point
                assert d is not None and p is not None
                mixed[use] = d[use] - np.median(d[use]) + p
        low, high = np.quantile(mixed, tails)
        out.update(point=mean_point(best_of, points), low=float(low), high=float(high))
        return out

    overall: dict[str, dict[str, Any]] = {}
    per_product: dict[str, dict[str, Any]] = {}
    for name, prices in policies.items():
        found = [shape_draws(k, name, prices) for k in range(len(shapes))]
        fitted_profit = profits_of(name, prices, np.asarray(
            units_under(shapes[0].models[0], prices), dtype=np.float64))
        base_total = float(base_profit.sum())
        fitted = pct(np.array([fitted_profit.sum() - fitted_base.sum()]),
                     np.array([fitted_base.sum()]))
        overall[name] = entry(
            [None if (v := pct(np.array([p.sum() - base_total]), base_total)) is None
             else v[0] for p, _ in found],
            [pct(d.sum(axis=1) - base_total, base_total) for _, d in found],
            None if fitted is None else fitted[0])
        if name == "agent":
            for s, start in enumerate(meta.series_start):
                own_fitted = pct(np.array([fitted_profit[s] - fitted_base[s]]),
                                 np.array([fitted_base[s]]))
                per_product[str(meta.product_id[start])] = entry(
                    [None if (v := pct(np.array([p[s] - base_profit[s]]), base_profit[s]))
                     is None else v[0] for p, _ in found],
                    [pct(d[:, s] - base_profit[s], base_profit[s]) for _, d in found],
                    None if own_fitted is None else own_fitted[0])
    return overall, per_product
