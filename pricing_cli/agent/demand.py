"""The fitted demand model: expected daily units of a product at a price, on a date.

For product p on a day with day of week d, weekend flag w and season (sin s, cos c of the day
of year), at price x = log(price / ref_p)::

    log λ = a_p + dow_d + s1_p·s + s2_p·c − (e_p + g1·s + g2·c + g3·w) · x

``ref_p`` is the product's median train price (fixed), so ``a_p`` is log demand at a typical
price and ``e_p`` the elasticity there; the elasticity itself moves with season and weekend
(global g). Units follow a Poisson law; net-return days (negative units) count as 0 sold.

Each product's parameters (a, s1, s2, e) are ``overall mean + category offset + product
offset``. Offsets carry an L2 penalty of strength ``train.demand_shrinkage`` (a Gaussian prior
centred on the group mean, empirical-Bayes style: the means are fitted from all products), so
a product with a handful of sales gets the curve of its group and one with years of sales its
own. All rows are fitted at once by a numpy Newton solver on the penalized Poisson likelihood
(the product blocks are eliminated, so each step solves the small system of the shared
parameters exactly; see ``_newton``); per-row parameters are gathered by index (no one-hot
design matrix), so memory is a few arrays of the row count.

Files: ``demand_model.npz`` (numeric arrays, loaded with allow_pickle=False) and
``demand_model.json`` (categories, fit information). No pickle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.agent import demand_shapes as shapes_module
from pricing_cli.agent import reference as reference_module
from pricing_cli.agent.demand_shapes import ETA_MAX, FORMS
from pricing_cli.errors import DataError, ModelError
from pricing_cli.storage import atomic_write, write_json

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.config import Settings
    from pricing_cli.monitor import RunMonitor

NPZ_NAME = "demand_model.npz"
JSON_NAME = "demand_model.json"
FORMULA = "log λ = a_p + dow_d + s1_p·s + s2_p·c − (e_p + g1·s + g2·c + g3·w) · log(price / ref_p)"
PARAMETERS = ("log_level", "season_sin", "season_cos", "elasticity")
# Relative weight of the shrinkage per parameter: product volumes differ by orders of
# magnitude, so the level gets a looser prior (SD ~1 in log units at the default strength).
SHRINK_WEIGHTS = np.array([0.1, 1.0, 1.0, 1.0])
# Category offsets get a 5x looser prior than product offsets: a category is measured by all of
# its products, and a tight prior would leave most of a category's shared deviation to its
# products' offsets (and so not to the sparse product that needs it).
CATEGORY_SHRINK = 0.2
# Fixed ridge on the global season means, the elasticity modifiers g and the day-of-week
# effects: a train window shorter than a year cannot tell season from level, so keep them small
# unless the data insists.
GLOBAL_RIDGE = 1.0
# Days that look capped by stock without a stock file (capped_day_weights): their weight,
# and the rules that find them.
CAPPED_WEIGHT = 0.02
PILE_UP_DAYS = 3
ZERO_AFTER_RUN = 3
ZERO_AFTER_MEAN = 3.0
# Sales capped at low prices (capped_low_price_days): a day LOW_PRICE_CUT or more below the
# product's regular price (rolling median, REGULAR_WINDOW days either side) is a low-price day.
# Without stock data, a Poisson count capped at a stock is under-dispersed: the products' low-
# price days are judged when the pooled Pearson dispersion (Σ (y − λ)² / λ / n around the
# first fit) of all of them is below CAPPED_MARKET_DISPERSION (and CAPPED_MARKET_SDS standard
# errors below 1) and a product's own, over
# CAPPED_MIN_LOW_DAYS days or more, below CAPPED_PRODUCT_DISPERSION. On the generator's
# stockouts market (stock planned for demand at the list price): 0.43 pooled, 0.35-0.55 per
# product, 0.91 on the regular days. With stock data: a product whose stock binds on
# CAPPED_LOW_SHARE of its low-price days or more (its uncapped ones are the low draws, so
# leaving out only the stocked-out days still flattens the response: 1.48 fitted against a
# true 2.54 there). Either way the product's low-price days are left out.
LOW_PRICE_CUT = 0.03
CAPPED_MIN_LOW_DAYS = 10
CAPPED_MARKET_DISPERSION = 0.8
CAPPED_MARKET_SDS = 4.0
CAPPED_PRODUCT_DISPERSION = 0.9
CAPPED_LOW_SHARE = 0.3
# Terms of the Poisson tail series (poisson_upper_tail), in standard deviations of the count.
TAIL_SDS = 12.0
# Rounds of the control function (each refits with the lagged surprises of the last fit and
# the lagged prices; with the prices one round settles: a second moved the tests' confounded
# elasticity by under 1%).
CONTROL_ROUNDS = 1
# Prices that may have reacted to the day's demand (reactive_price_weights): the regular price
# is the rolling median of a product's prices over REGULAR_WINDOW days either side; a product
# qualifies when it has REACTIVE_MIN_DAYS train days or more, sits at that price on
# REGULAR_SHARE of them or more and SHORT_SHARE of its days off it or more are in spells
# shorter than PROMO_MIN_RUN days (3-day promotions and the edges of list-price changes made
# up to 0.27 of them on the generator's markets without reactions, 0.49-0.63 with); a day
# off it keeps
# its full weight only as a cut held PROMO_MIN_RUN days or more, else REACTIVE_WEIGHT.
REGULAR_WINDOW = 14
REGULAR_SHARE = 0.5
SHORT_SHARE = 0.4
REACTIVE_MIN_DAYS = 120
PROMO_MIN_RUN = 4
REACTIVE_WEIGHT = 0.02
# Bounds of a day's elasticity relative to the product's typical one, as other shapes than
# loglog apply it (DemandModel.calendar_scale).
CALENDAR_SCALE_BOUNDS = (0.5, 2.0)
REQUIRED_COLUMNS = ("product_index", "date", "price", "units")
YEAR_DAYS = 365.25


def calendar_terms(dates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Day of week (Monday 0), season sin and cos of the day of year, weekend flag.

    Args:
        dates: datetime64 array (any unit at or above days).

    Returns:
        (dow int64, season_sin float64, season_cos float64, weekend float64), each like dates.
    """
    days = np.asarray(dates).astype("datetime64[D]")
    dow = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    doy = (days - days.astype("datetime64[Y]")).astype(np.int64) + 1
    angle = 2.0 * np.pi * doy / YEAR_DAYS
    return dow, np.sin(angle), np.cos(angle), (dow >= 5).astype(np.float64)


def event_indicators(dates: np.ndarray, events: dict[str, list[str]]) -> np.ndarray:
    """(..., n_events) float64: each event window's intensity on the date (windows MM-DD to
    MM-DD, inclusive, every year; a window whose first day is after its last wraps past New
    Year). A plain window is 1 inside; a ``[first, last, "ramp"]`` window rises linearly from
    0 on its first day to 1 on its last. 0 outside."""
    days = np.asarray(dates).astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    month_day = ((months.astype(np.int64) % 12 + 1) * 100
                 + (days - months).astype(np.int64) + 1)
    years = days.astype("datetime64[Y]")

    def anchor(year: np.ndarray, md: str) -> np.ndarray:
        month, day = (int(v) for v in md.split("-"))
        return (year.astype("datetime64[M]") + (month - 1)).astype("datetime64[D]") + (day - 1)

    columns = []
    for window in events.values():
        first, last = window[0], window[1]
        lo, hi = (int(first.replace("-", "")), int(last.replace("-", "")))
        inside = ((month_day >= lo) & (month_day <= hi) if lo <= hi
                  else (month_day >= lo) | (month_day <= hi))
        if len(window) > 2 and window[2] == "ramp":
            # The window's first day: this year's, or last year's for a wrapped window's days
            # after New Year.
            start_year = np.where((lo > hi) & (month_day <= hi),
                                  (years - np.timedelta64(1, "Y")).astype(np.int64),
                                  years.astype(np.int64)).astype("datetime64[Y]")
            start = anchor(start_year, first)
            end_year = start_year + np.timedelta64(1 if lo > hi else 0, "Y")
            span = np.maximum((anchor(end_year, last) - start).astype(np.float64), 1.0)
            columns.append(np.where(inside, (days - start).astype(np.float64) / span, 0.0))
        else:
            columns.append(inside.astype(np.float64))
    return np.stack(columns, axis=-1) if columns else np.zeros((*days.shape, 0))


def calendar_level_columns(dates: np.ndarray, calendar: dict[str, Any]) -> np.ndarray:
    """(..., 2·year_harmonics + n_events) common level terms: yearly sin/cos of order
    2..1+year_harmonics (week-of-year shape), then the event indicators."""
    days = np.asarray(dates).astype("datetime64[D]")
    doy = (days - days.astype("datetime64[Y]")).astype(np.int64) + 1
    angle = 2.0 * np.pi * doy / YEAR_DAYS
    columns = []
    for order in range(2, 2 + int(calendar.get("year_harmonics", 0))):
        columns += [np.sin(order * angle), np.cos(order * angle)]
    parts = [np.stack(columns, axis=-1)] if columns else []
    parts.append(event_indicators(days, calendar.get("events", {})))
    return np.concatenate(parts, axis=-1)


def calendar_spec(settings: Settings) -> dict[str, Any]:
    """The calendar terms the settings ask for (saved with the model, used to predict)."""
    train = settings.train
    return {"year_harmonics": int(train.demand_year_harmonics),
            "events": {k: list(v) for k, v in train.demand_events.items()},
            "event_elasticity": bool(train.demand_event_elasticity),
            "control_lags": int(train.demand_control_lags),
            "control_leads": int(train.demand_control_leads),
            "reactive_prices": bool(train.demand_reactive_prices),
            "cross_price": bool(train.demand_cross_price)}


@dataclass(frozen=True)
class DemandModel:
    """Fitted demand parameters; see the module docstring for the formula.

    Attributes:
        mean: (4,) overall means of (a, s1, s2, e).
        category_offset: (n_categories, 4); empty when the data had no category column.
        product_offset: (n_products, 4).
        product_category: (n_products,) index into ``categories``, -1 for none.
        dow_effect: (7,) Monday first, Monday fixed at 0.
        elasticity_modifiers: (3,) g1 (season sin), g2 (season cos), g3 (weekend).
        reference_price: (n_products,) ref_p.
        categories: category names.
        info: how the fit went (iterations, loss, seconds, rows).
    """

    mean: np.ndarray
    category_offset: np.ndarray
    product_offset: np.ndarray
    product_category: np.ndarray
    dow_effect: np.ndarray
    elasticity_modifiers: np.ndarray
    reference_price: np.ndarray
    categories: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # (n_products,) int8 index into demand_shapes.FORMS (None: all loglog, e.g. older files).
    product_form: np.ndarray | None = None
    # (n_products, len(FORMS), 3) each shape's parameters (the loglog slot is unused).
    shape_params: np.ndarray | None = None
    # Calendar beyond weekday and season (calendar_spec) and its fitted effects: common level
    # terms (calendar_level_columns), elasticity shifts per event, control coefficients
    # (fitted, not used to predict: the controls are 0 on a typical day).
    calendar: dict[str, Any] = field(default_factory=dict)
    level_effects: np.ndarray | None = None
    event_elasticity: np.ndarray | None = None
    control_effects: np.ndarray | None = None
    # Coefficient of the category price index (category_price_index): > 0 when siblings are
    # substitutes (their higher prices raise this product's demand). None or 0: no effect.
    cross_price: float | None = None
    # The reference-price effect (agent/reference.py); None: memoryless demand.
    reference_effect: reference_module.ReferenceEffect | None = None

    @property
    def n_products(self) -> int:
        return int(self.product_offset.shape[0])

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, meta: pl.DataFrame, settings: Settings, *, n_products: int | None = None,
            fallback_reference: np.ndarray | None = None, monitor: RunMonitor | None = None,
            source: str = "meta_train.parquet", selections: DemandModel | None = None
            ) -> DemandModel:
        """Fit on the train rows of the processed meta table.

        Args:
            meta: columns product_index, date, price, units (+ optional category).
            settings: uses ``train.demand_shrinkage``.
            n_products: size of the product index (default: max product_index + 1). Products
                without rows get the group mean.
            fallback_reference: (n_products,) reference prices for products without train
                rows (e.g. their median price in later splits); NaN entries become 1.0.
            monitor: progress (optional).
            source: file name used in error messages.
            selections: a fit of the same market (the point fit) whose selections this fit
                keeps: the reference half-life, each product's shape, the capped low-price
                days (judged against its predictions), and its estimates as the Newton start;
                only the estimates are refitted, in one round with the controls. A bootstrap
                member's fit (ensemble.fit_ensemble): it resamples the estimates, not the
                selections, at about a tenth of the cost of a full fit.

        Returns:
            The fitted model.

        Raises:
            DataError: a required column is missing, or no row has a positive price.
        """
        missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
        if missing:
            raise DataError(f"{source} lacks column(s) {', '.join(missing)} needed by the demand "
                            "model", "Re-run `pricectl merge` to rebuild the processed data.")
        started = time.monotonic()
        product = meta["product_index"].to_numpy().astype(np.int64)
        price = meta["price"].to_numpy().astype(np.float64)
        raw_units = meta["units"].to_numpy().astype(np.float64)
        usable = np.isfinite(price) & (price > 0) & np.isfinite(raw_units)
        if not usable.any():
            raise DataError(f"{source}: no row has a positive price and finite units",
                            "Check the price and units columns of the processed data.")
        n_products = int(n_products if n_products is not None else product.max() + 1)
        product, price = product[usable], price[usable]
        units = np.maximum(raw_units[usable], 0.0)  # net-return days sold nothing

        reference = _median_by_product(product, price, n_products)
        no_rows = np.isnan(reference)
        if fallback_reference is not None:
            reference[no_rows] = np.asarray(fallback_reference, dtype=np.float64)[no_rows]
        reference[np.isnan(reference)] = 1.0
        categories, product_category = _product_categories(meta, usable, n_products)
        dates = meta["date"].to_numpy().astype("datetime64[D]")[usable]
        on_hand = (meta["on_hand"].cast(float).to_numpy()[usable] if "on_hand" in meta.columns
                   else None)
        dispersion = float(settings.train.demand_censored_dispersion)
        detect = bool(settings.train.demand_detect_capped)
        reactive = bool(settings.train.demand_reactive_prices)
        censor = bool(settings.train.demand_censored)
        weights, censoring = fit_row_weights(product, dates, price, units, on_hand,
                                             detect=detect, reactive=reactive, censor=censor)
        reactive_info: dict[str, Any] = censoring.pop("reactive_prices", {})
        rows = _FitRows(product=product, dates=dates, price=price, units=units,
                        weight=weights.weight, censored=weights.censored,
                        exact=weights.exact, dispersion=dispersion)
        strength = float(settings.train.demand_shrinkage)
        forms: list[str] = list(dict.fromkeys(settings.train.demand_forms))
        calendar = calendar_spec(settings)
        span_days = int(np.ptp(dates.astype(np.int64))) + 1 if len(dates) else 0
        if span_days < 365:  # week-of-year shapes need a whole year of train days
            calendar["year_harmonics"] = 0
        lags = int(calendar["control_lags"])
        leads = int(calendar.get("control_leads", 0))

        def fit_rows(rows: _FitRows) -> tuple[DemandModel, _FitRows, dict[str, Any],
                                              dict[str, Any], np.ndarray]:
            """Reference selection, shape selection, the fit and its control rounds."""
            rows, reference_info = _select_reference(cls, rows, reference, product_category,
                                                     categories, strength, calendar, settings)

            selection: dict[str, Any] = {}
            if len(forms) > 1:
                holdout = _last_days(rows.product, rows.dates, n_products,
                                     float(settings.train.demand_holdout_fraction))
                trial = _fit_with_shapes(cls, rows.take(~holdout), reference,
                                         product_category, categories, strength, forms, None,
                                         calendar, monitor)
                held = rows.take(holdout)
                # Every shape is judged with the siblings' part of the level, as it was fitted
                # and as it predicts (the index from the whole category-day's prices).
                index = policy_category_index(trial, rows.product, rows.dates, rows.price)
                held_index = None if index is None else index[holdout]
                deviance: dict[str, np.ndarray] = {}
                for form in forms:
                    predicted = trial.expected_units(held.product, held.dates, held.price,
                                                     form=form, category_index=held_index)
                    deviance[form] = shapes_module.deviance_by_product(
                        predicted, held.units, held.product, n_products, held.exact_weight)
                held_rows = np.bincount(held.product, held.exact_weight, n_products)
                chosen = shapes_module.choose_forms(deviance, held_rows, product_category)
                selection = {"holdout": (f"last {settings.train.demand_holdout_fraction:.0%} "
                                         "of each product's train days"),
                             "holdout_rows": int(holdout.sum()),
                             "holdout_deviance_per_row": {
                                 f: float(deviance[f].sum() / max(holdout.sum(), 1))
                                 for f in forms}}
            else:
                chosen = np.full(n_products, FORMS.index(forms[0]), dtype=np.int8)
            model = _fit_with_shapes(cls, rows, reference, product_category, categories,
                                     strength, forms, chosen, calendar, monitor,
                                     warm=trial if selection else None)
            # The lagged prices beside the surprises absorb the part of a surprise that is the
            # current fit's own elasticity error (it would otherwise take many rounds to settle).
            log_rel_price = np.log(rows.price / reference[rows.product])
            for _ in range(CONTROL_ROUNDS if lags or leads else 0):
                # The control function: yesterday's (and earlier) demand surprise under the
                # current fit. A pricer reacting to demand it saw leaves its trace there.
                surprise = np.log((units + 0.5) / (model.expected_units(
                    rows.product, rows.dates, rows.price) + 0.5))
                model = _fit_with_shapes(cls, rows, reference, product_category, categories,
                                         strength, forms, chosen, calendar, monitor, warm=model,
                                         controls=np.column_stack([
                                             lagged(rows, surprise, lags),
                                             lagged(rows, log_rel_price, lags),
                                             lagged(rows, surprise, leads, lead=True),
                                             lagged(rows, log_rel_price, leads, lead=True)]))
            return model, rows, reference_info, selection, chosen

        if selections is not None:
            model, rows, reference_info, selection, chosen = _refit_estimates(
                cls, selections, rows, reference, product_category, categories, strength,
                forms, calendar, on_hand, censoring, settings, monitor)
        else:
            model, rows, reference_info, selection, chosen = fit_rows(rows)
        if settings.train.demand_detect_capped and selections is None:
            # Sales capped at low prices understate demand there and flatten the fitted
            # response; such products' low-price days enter as lower bounds on demand
            # (train.demand_censored) or are left out, and the fit is redone.
            expected = model.expected_units(rows.product, rows.dates, rows.price)
            left_out, low_price_info = capped_low_price_days(
                rows.product, rows.dates, rows.price, units, weights.exact, expected, on_hand,
                n_products)
            low_price_info["censored"] = bool(settings.train.demand_censored)
            if left_out.any():
                capped = np.zeros(n_products, dtype=bool)
                capped[[int(k) for k in low_price_info["per_product"]]] = True
                weights, censoring = fit_row_weights(product, dates, price, units, on_hand,
                                                     detect=detect, reactive=reactive,
                                                     censor=censor, capped_products=capped)
                censoring.pop("reactive_prices", None)
                model, rows, reference_info, selection, chosen = fit_rows(
                    _FitRows(product=product, dates=dates, price=price, units=units,
                             weight=weights.weight, censored=weights.censored,
                             exact=weights.exact, dispersion=dispersion))
            censoring["low_price_days"] = low_price_info
        info = {"rows": int(len(units)), "rows_dropped": int((~usable).sum()),
                "negative_unit_rows_clipped": int((raw_units < 0).sum()),
                "products": n_products, "products_without_rows": int(no_rows.sum()),
                "categories": len(categories), "shrinkage": strength, **model.info,
                "forms": {f: int((chosen == FORMS.index(f)).sum()) for f in forms},
                "censoring": censoring,
                **({"reactive_prices": reactive_info} if reactive_info else {}),
                "calendar": {
                    "year_harmonics": int(calendar["year_harmonics"]),
                    "event_rows": {name: int((column > 0).sum()) for name, column in zip(
                        calendar["events"], event_indicators(dates, calendar["events"]).T,
                        strict=True)},
                    "event_elasticity": dict(zip(calendar["events"],
                                                 np.asarray(model.event_elasticity).tolist(),
                                                 strict=True)),
                    "control_lags": lags,
                    "control_leads": leads,
                    "cross_price": model.cross_price,
                    "control_effects": np.asarray(model.control_effects).round(4).tolist()},
                **({"form_selection": selection} if selection else {}),
                "reference_prices": {**reference_info, "effect": (
                    None if model.reference_effect is None
                    else model.reference_effect.as_json())},
                "seconds": round(time.monotonic() - started, 3)}
        return replace(model, info=info)

    # -- prediction ----------------------------------------------------------------------------
    def product_parameters(self) -> np.ndarray:
        """(n_products, 4) per-product (a, s1, s2, e) = mean + category offset + offset."""
        theta = self.mean + self.product_offset
        has = self.product_category >= 0
        if has.any():
            theta = theta.copy()
            theta[has] += self.category_offset[self.product_category[has]]
        return theta

    def log_base_and_elasticity(self, product_index: np.ndarray, dates: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row log demand at the reference price, and the elasticity.

        So ``expected_units = exp(log_base - elasticity * log(price / reference))``; the env
        precomputes both once per row and only applies the price at each step.
        """
        theta = self.product_parameters()[np.asarray(product_index, dtype=np.int64)]
        dow, s_sin, s_cos, weekend = calendar_terms(dates)
        g = self.elasticity_modifiers
        log_base = (theta[..., 0] + self.dow_effect[dow] + theta[..., 1] * s_sin
                    + theta[..., 2] * s_cos)
        elasticity = theta[..., 3] + g[0] * s_sin + g[1] * s_cos + g[2] * weekend
        if self.level_effects is not None and len(self.level_effects):
            log_base = log_base + calendar_level_columns(dates, self.calendar) @ self.level_effects
        if self.event_elasticity is not None and len(self.event_elasticity):
            events = event_indicators(dates, self.calendar["events"])
            elasticity = elasticity + events @ self.event_elasticity
        return log_base, elasticity

    def core_vector(self) -> np.ndarray:
        """The fit's common parameters in the Newton core's order (means, dow Tue..Sun, g,
        event elasticity shifts, calendar level terms, cross-price, controls)."""
        n_shifts = len(self.calendar.get("events", {})) if self.calendar.get(
            "event_elasticity") else 0
        parts = [self.mean, self.dow_effect[1:], self.elasticity_modifiers,
                 np.asarray(self.event_elasticity if self.event_elasticity is not None
                            else [])[:n_shifts],
                 np.asarray(self.level_effects if self.level_effects is not None else []),
                 np.asarray([self.cross_price] if self.cross_price is not None else []),
                 np.asarray(self.control_effects if self.control_effects is not None else [])]
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])

    def _forms_of(self, product_index: np.ndarray, form: str | None) -> np.ndarray:
        """Shape index of each row (its product's, or ``form`` for every row)."""
        if form is not None:
            return np.full(np.shape(product_index), FORMS.index(form), dtype=np.int8)
        if self.product_form is None:
            return np.zeros(np.shape(product_index), dtype=np.int8)
        return self.product_form[product_index]

    def calendar_scale(self, product_index: np.ndarray, dates: np.ndarray) -> np.ndarray:
        """The day's elasticity relative to the product's typical one (season, weekend and
        events; 1 on a typical day), clipped to CALENDAR_SCALE_BOUNDS. A shape other than
        loglog takes it as a stretch of its price axis around the reference, r -> 1 + k(r − 1),
        which scales its elasticity at the reference by k, so every shape follows the calendar
        the same way."""
        product_index = np.asarray(product_index, dtype=np.int64)
        elasticity = self.log_base_and_elasticity(product_index, dates)[1]
        typical = self.product_parameters()[product_index, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(typical > 0.1, elasticity / typical, 1.0)
        return np.clip(scale, *CALENDAR_SCALE_BOUNDS)

    def elasticity(self, product_index: np.ndarray, dates: np.ndarray, *,
                   form: str | None = None) -> np.ndarray:
        """Price elasticity (positive: demand falls as price rises) per row, at the product's
        reference price (loglog: the same at every price; every shape moves with the
        calendar)."""
        product_index = np.asarray(product_index, dtype=np.int64)
        elasticity = self.log_base_and_elasticity(product_index, dates)[1]
        forms = np.broadcast_to(self._forms_of(product_index, form), elasticity.shape)
        if (forms > 0).any():
            elasticity = elasticity.copy()
            pi = np.broadcast_to(product_index, elasticity.shape)
            scale = np.broadcast_to(self.calendar_scale(product_index, dates), elasticity.shape)
            assert self.shape_params is not None
            for code in np.unique(forms[forms > 0]).tolist():
                sel = forms == code
                elasticity[sel] = scale[sel] * shapes_module.elasticity_at_reference(
                    FORMS[code], self.shape_params[pi[sel], code])
        return elasticity

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray, *, form: str | None = None,
                       category_index: np.ndarray | None = None,
                       reference: np.ndarray | None = None) -> np.ndarray:
        """Expected daily units (float64) for each (product, date, price) row.

        Arrays broadcast: e.g. product_index and dates of shape (n, 1) with prices (n, K).
        ``form`` evaluates every row with that shape instead of its product's chosen one.
        ``category_index``: the category's price index of each row (see
        :func:`category_price_index`; 0, the default, is siblings at their reference prices),
        for pricing a category jointly. ``reference``: each row's reference price (the
        reference-price state, agent/reference.py); None: the long-run curve (reference =
        price). The result then has the broadcast shape of all the arrays, with or without
        an effect.
        """
        product_index = np.asarray(product_index, dtype=np.int64)
        log_base, elasticity = self.log_base_and_elasticity(product_index, dates)
        if category_index is not None and self.cross_price:
            log_base = log_base + self.cross_price * np.asarray(category_index, dtype=np.float64)
        rel = np.asarray(prices, dtype=np.float64) / self.reference_price[product_index]
        units = np.exp(np.minimum(log_base - elasticity * np.log(rel), ETA_MAX))
        forms = np.broadcast_to(self._forms_of(product_index, form), units.shape)
        if (forms > 0).any():
            assert self.shape_params is not None
            pi = np.broadcast_to(product_index, units.shape)
            base = np.broadcast_to(log_base, units.shape)
            stretched = 1.0 + np.broadcast_to(self.calendar_scale(product_index, dates),
                                              units.shape) * (rel - 1.0)
            for code in np.unique(forms[forms > 0]).tolist():
                sel = forms == code
                multiplier, _ = shapes_module.response(
                    FORMS[code], self.shape_params[pi[sel], code], stretched[sel])
                units[sel] = np.exp(np.minimum(base[sel], ETA_MAX)) * multiplier
        if reference is not None:
            factor = (self.reference_effect.factor(prices, reference)
                      if self.reference_effect is not None
                      else np.ones(np.broadcast_shapes(np.shape(prices), np.shape(reference))))
            units = units * factor
        return units

    def units_on_grid(self, product_index: np.ndarray, dates: np.ndarray, grid: np.ndarray
                      ) -> np.ndarray:
        """(n, K) float32 expected units at each row's candidate prices; see
        :func:`units_on_grid`."""
        return units_on_grid(self, product_index, dates, grid)

    def fit_report(self, meta: pl.DataFrame) -> dict[str, Any]:
        """How well the model predicts the daily units of ``meta`` (e.g. the val split).

        Returns:
            rows; poisson_deviance (mean per row); mae and rmse of daily units; mean_actual and
            mean_predicted; calibration: per decile of the prediction, rows, mean_predicted,
            mean_actual. Actual units are clipped at 0 like in the fit.
        """
        actual = np.maximum(meta["units"].to_numpy().astype(np.float64), 0.0)
        predicted = self.expected_units(meta["product_index"].to_numpy(),
                                        meta["date"].to_numpy(), meta["price"].to_numpy())
        if len(actual) == 0:
            return {"rows": 0}
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(actual > 0, actual * np.log(actual / predicted), 0.0)
        deviance = 2.0 * (term - (actual - predicted))
        edges = np.quantile(predicted, np.linspace(0, 1, 11))
        decile = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, 9)
        calibration = []
        for d in range(10):
            sel = decile == d
            if sel.any():
                calibration.append({"decile": d + 1, "rows": int(sel.sum()),
                                    "mean_predicted": float(predicted[sel].mean()),
                                    "mean_actual": float(actual[sel].mean())})
        return {"rows": int(len(actual)), "poisson_deviance": float(deviance.mean()),
                "mae": float(np.abs(predicted - actual).mean()),
                "rmse": float(np.sqrt(((predicted - actual) ** 2).mean())),
                "mean_actual": float(actual.mean()), "mean_predicted": float(predicted.mean()),
                "calibration": calibration}

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write demand_model.npz and demand_model.json into ``folder`` (atomically each)."""
        folder = Path(folder)
        with atomic_write(folder / NPZ_NAME) as handle:
            np.savez(handle, allow_pickle=False, mean=self.mean,
                     category_offset=self.category_offset,
                     product_offset=self.product_offset, product_category=self.product_category,
                     dow_effect=self.dow_effect, elasticity_modifiers=self.elasticity_modifiers,
                     reference_price=self.reference_price, **self._shape_arrays())
        forms = self._shape_arrays()["product_form"]
        write_json(folder / JSON_NAME, {"formula": FORMULA, "parameters": list(PARAMETERS),
                                        "forms": list(FORMS),
                                        "product_forms": [FORMS[f] for f in forms.tolist()],
                                        "calendar": self.calendar,
                                        "reference_effect": (
                                            None if self.reference_effect is None
                                            else self.reference_effect.as_json()),
                                        "categories": self.categories, "info": self.info})

    def _shape_arrays(self) -> dict[str, np.ndarray]:
        n = self.n_products
        empty = np.zeros(0)
        return {"product_form": (self.product_form if self.product_form is not None
                                 else np.zeros(n, dtype=np.int8)),
                "shape_params": (self.shape_params if self.shape_params is not None
                                 else np.zeros((n, len(FORMS), shapes_module.N_SHAPE_PARAMS))),
                "level_effects": (self.level_effects if self.level_effects is not None
                                  else empty),
                "event_elasticity": (self.event_elasticity if self.event_elasticity is not None
                                     else empty),
                "control_effects": (self.control_effects if self.control_effects is not None
                                    else empty),
                "cross_price": np.array([self.cross_price if self.cross_price is not None
                                         else np.nan])}

    @classmethod
    def load(cls, folder: str | Path) -> DemandModel:
        """Read a model written by :meth:`save`.

        Raises:
            ModelError: a file is missing or unreadable.
        """
        folder = Path(folder)
        try:
            with np.load(folder / NPZ_NAME, allow_pickle=False) as arrays:
                data: dict[str, Any] = {k: arrays[k] for k in arrays.files}
            if "cross_price" in data:
                value = float(data["cross_price"][0])
                data["cross_price"] = None if np.isnan(value) else value
            meta = json.loads((folder / JSON_NAME).read_text(encoding="utf-8"))
            return cls(categories=list(meta["categories"]), info=dict(meta["info"]),
                       calendar=dict(meta.get("calendar", {})),
                       reference_effect=reference_module.ReferenceEffect.from_json(
                           meta.get("reference_effect")), **data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read the demand model in {folder}: {exc}",
                             "Re-run `pricectl train` to rebuild the run folder.") from None


GRID_CHUNK_ROWS = 32_768  # rows per expected_units call: bounds the float64 temporaries


def units_on_grid(model: Any, product_index: np.ndarray, dates: np.ndarray, grid: np.ndarray
                  ) -> np.ndarray:
    """(n, K) float32: ``model.expected_units`` of each row at each of its K candidate prices.

    The env's demand table (forecast and reward read it), built through the protocol only, so
    any model with ``expected_units(product_index, dates, prices)`` broadcasting prices of
    shape (n, K) against product_index and dates of shape (n, 1) works (a single fit, an
    ensemble, another demand shape). Rows go in chunks so the float64 temporaries stay small.
    """
    product_index = np.asarray(product_index, dtype=np.int64)
    dates = np.asarray(dates).astype("datetime64[D]")
    grid = np.asarray(grid, dtype=np.float64)
    out = np.empty(grid.shape, dtype=np.float32)
    for start in range(0, len(product_index), GRID_CHUNK_ROWS):
        part = slice(start, start + GRID_CHUNK_ROWS)
        out[part] = model.expected_units(product_index[part, None], dates[part, None], grid[part])
    return out


@dataclass(frozen=True)
class _FitRows:
    """The usable train rows: product index, date (datetime64[D]), price, units (>= 0)."""

    product: np.ndarray
    dates: np.ndarray
    price: np.ndarray
    units: np.ndarray
    weight: np.ndarray  # likelihood weight: 1, or less on days whose sales look capped
    # Rows whose sales are a lower bound on demand (a censored Poisson term P(Y >= y) in the
    # constant-elasticity fit; the shape fits and held-out deviances leave them out). None:
    # none.
    censored: np.ndarray | None = None
    exact: np.ndarray | None = None  # RowWeights.exact (None: weight with censored rows 0)
    # The reference-price columns (reference.design_columns) and their EWMA rate, when the
    # fit has the term.
    reference_columns: np.ndarray | None = None
    reference_rate: float | None = None
    # The counts' dispersion (variance / mean) the censored term is scaled by (_Design).
    dispersion: float = 1.0

    def take(self, keep: np.ndarray) -> _FitRows:
        return _FitRows(self.product[keep], self.dates[keep], self.price[keep], self.units[keep],
                        self.weight[keep],
                        None if self.censored is None else self.censored[keep],
                        None if self.exact is None else self.exact[keep],
                        None if self.reference_columns is None else self.reference_columns[keep],
                        self.reference_rate, self.dispersion)

    @property
    def exact_weight(self) -> np.ndarray:
        """The weight of the rows without censoring (RowWeights.exact): what the shape fits
        and the held-out deviances use."""
        if self.exact is not None:
            return self.exact
        return self.weight if self.censored is None else np.where(self.censored, 0.0,
                                                                   self.weight)

    def with_reference(self, rate: float | None) -> _FitRows:
        """These rows with the reference columns of EWMA ``rate`` (None: without)."""
        if rate is None:
            return replace(self, reference_columns=None, reference_rate=None)
        ref = reference_module.rolled_reference(self.product, self.dates, self.price, rate)
        return replace(self, reference_columns=reference_module.design_columns(
            np.log(self.price / ref)), reference_rate=rate)


def _last_days(product: np.ndarray, dates: np.ndarray, n_products: int, fraction: float
               ) -> np.ndarray:
    """Rows among the last ``fraction`` of each product's days (products with 5 rows or more;
    fewer cannot spare any)."""
    order = np.lexsort((dates, product))
    count = np.bincount(product, minlength=n_products)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.empty(len(product), dtype=np.int64)
    rank[order] = np.arange(len(product)) - first[product[order]]
    keep_first = np.ceil((1.0 - fraction) * count[product]).astype(np.int64)
    return (rank >= keep_first) & (count[product] >= 5)


def capped_day_weights(product: np.ndarray, dates: np.ndarray, units: np.ndarray,
                       on_hand: np.ndarray | None, *, detect: bool
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Likelihood weight of each row: sales capped by stock are not demand.

    With stock (``on_hand``, NaN where unknown), a day that sold all of it is censored:
    demand was at least the sales, so it is left out (weight 0). Rows without stock, when
    ``detect``: days that look capped get CAPPED_WEIGHT: a pile-up at the product's maximum
    (the maximum repeats on PILE_UP_DAYS days or more: a Poisson maximum rarely does) and a
    zero day right after ZERO_AFTER_RUN days of sales of a product selling ZERO_AFTER_MEAN a
    day or more (under Poisson, a zero is then a 5% event; after a run it is usually a
    stock-out).

    Returns:
        (weight per row, the rows that sold all their stock, counts for the fit's info).
    """
    n = len(units)
    weight = np.ones(n)
    stock = np.full(n, np.nan) if on_hand is None else np.asarray(on_hand, dtype=np.float64)
    known = np.isfinite(stock)
    stocked_out = known & (units >= np.where(known, stock, np.inf) - 1e-9)
    weight[stocked_out] = 0.0
    info: dict[str, Any] = {"stock_rows": int(known.sum()),
                            "stocked_out_days_left_out": int(stocked_out.sum())}
    if not detect or n == 0:
        return weight, stocked_out, info
    n_products = int(product.max()) + 1
    top = np.full(n_products, -np.inf)
    np.maximum.at(top, product, units)
    at_top = (units == top[product]) & (units > 0)
    repeats = np.bincount(product, at_top.astype(np.float64), n_products)
    pile_up = at_top & (repeats[product] >= PILE_UP_DAYS) & ~known
    order = np.lexsort((dates, product))
    p, day, sold = product[order], dates[order].astype(np.int64), units[order] > 0
    run = np.ones(n, dtype=bool)
    for k in range(1, ZERO_AFTER_RUN + 1):
        previous = np.zeros(n, dtype=bool)
        previous[k:] = (p[k:] == p[:-k]) & (day[k:] - day[:-k] == k) & sold[:-k]
        run &= previous
    mean = np.bincount(product, units, n_products) / np.maximum(np.bincount(product), 1)
    zero_after = np.zeros(n, dtype=bool)
    zero_after[order] = ~sold & run & (mean[p] >= ZERO_AFTER_MEAN)
    zero_after &= ~known
    weight[pile_up | zero_after] = np.minimum(weight[pile_up | zero_after], CAPPED_WEIGHT)
    info["detected_capped_days"] = {"pile_up_at_max": int(pile_up.sum()),
                                    "zero_after_sales": int(zero_after.sum()),
                                    "weight": CAPPED_WEIGHT}
    return weight, stocked_out, info


@dataclass(frozen=True)
class RowWeights:
    """How each train row enters the demand fit (:func:`fit_row_weights`)."""

    weight: np.ndarray  # likelihood weight of the constant-elasticity fit
    censored: np.ndarray  # sales a lower bound on demand: the term P(Y >= y), not P(Y = y)
    # The weights without censoring: capped rows left out (weight 0). What the shape fits
    # (linear, logit) and the held-out deviances use, in the fit and in
    # calibration.with_every_shape: they have no censored term, and keeping a capped
    # product's uncapped low-price days without its capped ones flattens their response.
    exact: np.ndarray


def fit_row_weights(product: np.ndarray, dates: np.ndarray, price: np.ndarray,
                    units: np.ndarray, on_hand: np.ndarray | None, *, detect: bool,
                    reactive: bool, censor: bool, capped_products: np.ndarray | None = None
                    ) -> tuple[RowWeights, dict[str, Any]]:
    """The demand fit's own row weights: the one copy, used by DemandModel.fit and by the
    checked uplift's shape refits (:func:`model_row_weights`).

    ``capped_day_weights`` (stocked-out days, days that look capped), the reactive-price
    weights when ``reactive``, and the low-price days (:func:`low_price_rows`) of
    ``capped_products`` ((n_products,) bool: the products :func:`capped_low_price_days`
    found capped; None: none). With ``censor`` a day that sold all its known stock keeps its
    weight and enters as a lower bound on demand (sales >= the recorded units: censored),
    and a capped product's low-price days with known stock stay in (the stocked-out ones
    censored, the others demand); without ``censor`` those are left out (weight 0). Rows
    without stock are treated alike either way: capped low-price days left out, days that
    look capped at CAPPED_WEIGHT.

    Returns:
        (the weights, the fit's censoring info and, when ``reactive``, the reactive-price
        info under "reactive_prices").
    """
    exact, stocked_out, info = capped_day_weights(product, dates, units, on_hand,
                                                  detect=detect)
    known = (np.zeros(len(units), dtype=bool) if on_hand is None
             else np.isfinite(np.asarray(on_hand, dtype=np.float64)))
    # A day that sold all its stock says demand was at least that much: kept as such.
    censored = stocked_out & censor
    weight = np.where(censored, 1.0, exact)
    if reactive:
        price_weight, reactive_info = reactive_price_weights(product, dates, price)
        weight, exact = np.minimum(weight, price_weight), np.minimum(exact, price_weight)
        info = {**info, "reactive_prices": reactive_info}
    if capped_products is not None and capped_products.any():
        rows = np.asarray(capped_products, dtype=bool)[product] & low_price_rows(
            product, dates, price)
        exact = np.where(rows, 0.0, exact)
        # With the stock known and censoring on, the stocked-out days are censored and the
        # others are demand: nothing more to do. Without the stock, which low-price days
        # bound is unknown, and censoring all of them is biased (an uncapped day's sales are
        # then read as a bound the demand exceeds: 2.97 fitted against a true 2.62 on the
        # stockouts bench, 2.77 left out), so they are left out.
        weight = np.where(rows & ~(known & censor), 0.0, weight)
    info["censored_rows"] = int((censored & (units > 0)).sum())
    info["censored_likelihood"] = bool(censor)
    return RowWeights(weight, censored, exact), info


def model_row_weights(model: Any, product: np.ndarray, dates: np.ndarray, price: np.ndarray,
                      units: np.ndarray, on_hand: np.ndarray | None, *, detect: bool
                      ) -> RowWeights:
    """:func:`fit_row_weights` of rows as ``model``'s fit weighted its train rows: its
    reactive-price weights if it had them, its censoring mode and the products its fit
    found capped at low prices (from ``model.info``)."""
    info = getattr(model, "info", None) or {}
    censoring = info.get("censoring") or {}
    n_products = int(getattr(model, "n_products", int(product.max()) + 1 if len(product) else 0))
    capped = np.zeros(max(n_products, int(product.max()) + 1 if len(product) else 0), bool)
    for key in ((censoring.get("low_price_days") or {}).get("per_product") or {}):
        capped[int(key)] = True
    return fit_row_weights(product, dates, price, units, on_hand, detect=detect,
                           reactive="reactive_prices" in info,
                           censor=bool(censoring.get("censored_likelihood", False)),
                           capped_products=capped)[0]


def _regular_prices(product: np.ndarray, price: np.ndarray) -> np.ndarray:
    """Each row's regular price: the rolling median of its product's prices over
    REGULAR_WINDOW rows either side (rows sorted by product, then date)."""
    import polars as pl

    return (pl.DataFrame({"p": product, "x": price})
            .select(pl.col("x").rolling_median(window_size=2 * REGULAR_WINDOW + 1,
                                               center=True, min_samples=1).over("p"))
            ["x"].to_numpy())


def low_price_rows(product: np.ndarray, dates: np.ndarray, price: np.ndarray) -> np.ndarray:
    """Rows priced LOW_PRICE_CUT or more below their product's regular price (the rolling
    median, :func:`_regular_prices`)."""
    n = len(price)
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((dates, product))
    regular = np.empty(n)
    regular[order] = _regular_prices(product[order], np.round(price[order], 2))
    return np.asarray(price <= (1.0 - LOW_PRICE_CUT) * regular)


def capped_low_price_days(product: np.ndarray, dates: np.ndarray, price: np.ndarray,
                          units: np.ndarray, weight: np.ndarray, expected: np.ndarray,
                          on_hand: np.ndarray | None, n_products: int
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """The low-price days of products whose sales there look capped by stock (to leave out).

    Stock binds where demand is high, i.e. at low prices: the recorded sales there understate
    demand and the fit reads a flatter response than the true one, so a policy learns to raise
    prices. A low-price day is LOW_PRICE_CUT or more below the product's regular price. With
    stock (``on_hand``, NaN where unknown) a product qualifies when its stock bound on
    CAPPED_LOW_SHARE of its low-price days or more; without, when its low-price days are
    under-dispersed around ``expected`` (the first fit's units): the pooled Pearson
    dispersion of every product's low-price days below CAPPED_MARKET_DISPERSION (and
    CAPPED_MARKET_SDS of its standard errors below 1) and the
    product's own (CAPPED_MIN_LOW_DAYS days or more) below CAPPED_PRODUCT_DISPERSION. Poisson
    sales show 1 (more around a wrong fit), so uncapped markets are left alone; a linear
    demand's flatter response at low prices is not under-dispersed either.

    Returns:
        (rows to leave out, the fit's info: the rule's numbers and, per product left out,
        its low-price days, dispersion, stocked-out share and the price range of the days
        kept: the band the fit saw uncapped sales in).
    """
    n = len(units)
    left_out = np.zeros(n, dtype=bool)
    info: dict[str, Any] = {"low_price_cut": LOW_PRICE_CUT, "products": 0, "rows_left_out": 0,
                            "pooled_dispersion": None, "pooled_dispersion_limit": None,
                            "per_product": {}}
    if n == 0:
        return left_out, info
    low = low_price_rows(product, dates, price)
    stock = np.full(n, np.nan) if on_hand is None else np.asarray(on_hand, dtype=np.float64)
    known = np.isfinite(stock)
    low_days = np.bincount(product, low, n_products)
    # With stock: the share of low-price days that sold out (their weight is already 0).
    low_known = low & known
    sold_out = low_known & (units >= np.where(known, stock, np.inf) - 1e-9)
    known_days = np.bincount(product, low_known, n_products)
    sold_out_share = np.bincount(product, sold_out, n_products) / np.maximum(known_days, 1)
    by_stock = (known_days >= CAPPED_MIN_LOW_DAYS) & (sold_out_share >= CAPPED_LOW_SHARE)
    # Without stock: under-dispersion of the low-price days around the first fit.
    judged = low & ~known & (weight > 0)
    pearson = (units - expected) ** 2 / np.maximum(expected, 1e-9)
    own_days = np.bincount(product, judged, n_products)
    dispersion = np.bincount(product, np.where(judged, pearson, 0.0), n_products) / np.maximum(
        own_days, 1)
    pooled = float(pearson[judged].mean()) if judged.any() else None
    # A Poisson row's Pearson term has variance 2 + 1/λ: the pooled figure must also lie
    # CAPPED_MARKET_SDS standard errors below 1 (a few dozen low-price days, or a bootstrap
    # resample of them, can show 0.7 by chance).
    pooled_limit = (min(CAPPED_MARKET_DISPERSION, 1.0 - CAPPED_MARKET_SDS * float(np.sqrt(
        np.mean(2.0 + 1.0 / np.maximum(expected[judged], 1e-9)) / judged.sum())))
        if judged.any() else 0.0)
    by_dispersion = ((pooled is not None and pooled < pooled_limit)
                     & (own_days >= CAPPED_MIN_LOW_DAYS)
                     & (dispersion < CAPPED_PRODUCT_DISPERSION))
    capped = by_stock | by_dispersion
    left_out = capped[product] & low
    kept = ~left_out & (weight > 0) & (units > 0)
    per_product: dict[str, Any] = {}
    for p in np.nonzero(capped)[0]:
        band = price[kept & (product == p)]
        per_product[str(int(p))] = {
            "low_price_days": int(low_days[p]),
            "dispersion": round(float(dispersion[p]), 3) if own_days[p] else None,
            "stocked_out_share": round(float(sold_out_share[p]), 3) if known_days[p] else None,
            "kept_price_range": [float(band.min()), float(band.max())] if band.size else None}
    info.update(products=int(capped.sum()), rows_left_out=int(left_out.sum()),
                pooled_dispersion=None if pooled is None else round(pooled, 3),
                pooled_dispersion_limit=round(pooled_limit, 3),
                per_product=per_product)
    return left_out, info


def uncapped_price_band(censoring: dict[str, Any] | None, n_products: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) price of the days the fit kept of each product whose low-price sales
    looked capped (``info["censoring"]["low_price_days"]``, :func:`capped_low_price_days`):
    the band its response was measured in uncapped. NaN for the other products."""
    lower, upper = np.full(n_products, np.nan), np.full(n_products, np.nan)
    bands = (((censoring or {}).get("low_price_days") or {}).get("per_product") or {})
    for key, entry in bands.items():
        band = entry.get("kept_price_range")
        if band is not None and 0 <= int(key) < n_products:
            lower[int(key)], upper[int(key)] = band
    return lower, upper


def category_price_index(product: np.ndarray, dates: np.ndarray, log_rel_price: np.ndarray,
                         product_category: np.ndarray) -> np.ndarray:
    """Each row's category price index: the mean log(price / reference) of the other
    products of its category priced that day (0 without a category or a sibling that day).

    Args:
        product, dates, log_rel_price: per row (log_rel_price = log(price / ref_p)).
        product_category: (n_products,) category index, -1 for none.
    """
    category = product_category[product]
    has = category >= 0
    out = np.zeros(len(product))
    if not has.any():
        return out
    day = dates.astype("datetime64[D]").astype(np.int64)
    day = day - day.min()
    key = category[has] * (int(day.max()) + 1) + day[has]
    _, group = np.unique(key, return_inverse=True)
    total = np.bincount(group, log_rel_price[has])
    count = np.bincount(group)
    siblings = count[group] - 1
    out[has] = np.where(siblings > 0, (total[group] - log_rel_price[has])
                        / np.maximum(siblings, 1), 0.0)
    return out


def policy_category_index(model: Any, product_index: np.ndarray, dates: np.ndarray,
                          prices: np.ndarray) -> np.ndarray | None:
    """(n,) each row's category price index from the rows' own prices (the siblings of a
    category-day are the rows of that category and day), or None where ``model`` has no
    fitted cross-price term (``cross_price`` None or 0, or no ``product_category``)."""
    product_index = np.asarray(product_index, dtype=np.int64)
    prices = np.asarray(prices, dtype=np.float64)
    category = getattr(model, "product_category", None)
    if not getattr(model, "cross_price", None) or category is None or product_index.size == 0:
        return None
    reference = np.asarray(model.reference_price, dtype=np.float64)[product_index]
    positive = (prices > 0) & (reference > 0)
    log_rel = np.log(np.where(positive, prices, 1.0) / np.where(positive, reference, 1.0))
    return category_price_index(product_index, np.asarray(dates).astype("datetime64[D]"),
                                log_rel, np.asarray(category, dtype=np.int64))


def cross_price_term(model: Any, product_index: np.ndarray, dates: np.ndarray,
                     prices: np.ndarray) -> np.ndarray | float:
    """Each row's fitted cross-price term in log units (``cross_price`` x its category price
    index from the rows' own prices; 0.0 without a cross-price term).

    Why: the shapes other than loglog are fitted on top of the base fit's calendar level
    (``log_base``), and prediction adds this term to that level for every shape; a shape fitted
    without it would take the siblings' promotions for noise around its own curve, and be
    judged on held-out days (where the term is added) with a curve fitted without it."""
    index = policy_category_index(model, product_index, dates, prices)
    return 0.0 if index is None else float(model.cross_price) * index


def policy_expected_units(model: Any, product_index: np.ndarray, dates: np.ndarray,
                          prices: np.ndarray) -> np.ndarray:
    """(n,) float64 expected units of a policy's rows, each with its category price index
    computed from the policy's OWN prices that day (its siblings at the policy's prices, not
    at their reference prices), as the fit computed it from the prices charged.

    Rows are a whole policy: every (product, date) row of the split it prices, so the rows of
    one category-day are the siblings of each other. Without a fitted cross-price term
    (``model.cross_price`` None or 0, or no ``product_category``) this is
    ``model.expected_units`` unchanged. A model without its own ``reference_price`` (an
    ensemble wrapper) uses the attributes it forwards (the point fit's).
    """
    index = policy_category_index(model, product_index, dates, prices)
    if index is None:
        return np.asarray(model.expected_units(product_index, dates, prices), dtype=np.float64)
    return np.asarray(model.expected_units(product_index, dates, prices, category_index=index),
                      dtype=np.float64)


def lagged(rows: _FitRows, series: np.ndarray, lags: int, *, lead: bool = False
           ) -> np.ndarray:
    """(n, lags): the product's ``series`` 1..lags days before each row (past only), or with
    ``lead`` 1..lags days after it.

    A row whose day k before (after) is not among ``rows`` (a product's first or last days, a
    gap, a resample that dropped it) gets 0: the value of a typical day, as predictions use.
    """
    n = len(series)
    out = np.zeros((n, lags))
    if lags == 0 or n == 0:
        return out
    order = np.lexsort((rows.dates, rows.product))
    product, day = rows.product[order], rows.dates[order].astype(np.int64)
    values = series[order]
    sorted_out = np.zeros_like(out)
    for k in range(1, lags + 1):
        ok = (product[k:] == product[:-k]) & (day[k:] - day[:-k] == k)
        if lead:
            sorted_out[:-k, k - 1] = np.where(ok, values[k:], 0.0)
        else:
            sorted_out[k:, k - 1] = np.where(ok, values[:-k], 0.0)
    out[order] = sorted_out
    return out


def reactive_price_weights(product: np.ndarray, dates: np.ndarray, price: np.ndarray
                           ) -> tuple[np.ndarray, dict[str, Any]]:
    """Likelihood weight of each row against prices that reacted to the day's demand.

    A pricer who sees demand the data do not show (a local event, the weather, a competitor)
    cuts the price on weak days and raises it on strong ones, for a day or two at a time; the
    fit would read the weak sales at the cut price as a small elasticity. A promotion planned
    in advance runs for days at one price, whatever demand does on each. So for a product with
    a regular price, the rolling median of its prices over REGULAR_WINDOW days either side,
    held on REGULAR_SHARE of its days or more: a day at the regular price and a cut below it
    that holds PROMO_MIN_RUN consecutive days or more keep their weight; a shorter cut and a
    price above the regular one (not yet the regular price itself) get REACTIVE_WEIGHT.
    Only products whose days off the regular price come in short spells (SHORT_SHARE of them
    or more; REACTIVE_MIN_DAYS of history or more to judge), the mark of a pricer reacting
    day by day, are treated so: a product that changes
    price most days has no regular price, and one whose price moves in steps that hold for
    days (planned promotions, a price ladder) keeps every day.

    Returns:
        (weight per row, counts for the fit's info).
    """
    if len(price) == 0:
        return np.ones(0), {"products": 0, "rows_down_weighted": 0}
    # A bootstrap resample repeats whole weeks: judge each product-day once.
    day_number = dates.astype("datetime64[D]").astype(np.int64)
    key = product.astype(np.int64) * (int(np.ptp(day_number)) + 1) + (day_number
                                                                      - day_number.min())
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    if len(first) < len(price):
        unique_weight, info = reactive_price_weights(product[first], dates[first], price[first])
        return unique_weight[inverse], {**info,
                                        "rows_down_weighted": int((unique_weight[inverse]
                                                                   < 1).sum())}
    n = len(price)
    weight = np.ones(n)
    order = np.lexsort((dates, product))
    p, day, x = product[order], dates[order].astype(np.int64), np.round(price[order], 2)
    regular = _regular_prices(p, x)
    at_regular = np.abs(x - regular) < 0.005
    n_products = int(p.max()) + 1
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (p[1:] != p[:-1]) | (day[1:] - day[:-1] != 1) | (np.abs(x[1:] - x[:-1]) > 0.005)
    run_id = np.cumsum(new_run) - 1
    run_length = np.bincount(run_id)[run_id]
    off = ~at_regular
    short = off & (run_length < PROMO_MIN_RUN)
    share = (np.bincount(p, at_regular.astype(np.float64), n_products)
             / np.maximum(np.bincount(p, minlength=n_products), 1))
    short_share = (np.bincount(p, short.astype(np.float64), n_products)
                   / np.maximum(np.bincount(p, off.astype(np.float64), n_products), 1))
    reactive = ((share >= REGULAR_SHARE) & (short_share >= SHORT_SHARE)
                & (np.bincount(p, minlength=n_products) >= REACTIVE_MIN_DAYS))
    planned_cut = (x < regular) & (run_length >= PROMO_MIN_RUN)
    suspect = reactive[p] & off & ~planned_cut
    weight[order[suspect]] = REACTIVE_WEIGHT
    return weight, {"products": int(reactive.sum()),
                    "rows_down_weighted": int(suspect.sum()), "weight": REACTIVE_WEIGHT}


def _fit_base(rows: _FitRows, reference: np.ndarray, product_category: np.ndarray,
              strength: float, calendar: dict[str, Any], controls: np.ndarray | None,
              monitor: RunMonitor | None, warm: DemandModel | None = None
              ) -> tuple[_Params, dict[str, Any], np.ndarray]:
    """The constant-elasticity (loglog) fit of the rows: the calendar level of every shape.

    Core columns after the 13 base ones: -x · event (elasticity shifts, if
    calendar["event_elasticity"]), the calendar level columns, the lag controls.

    Returns:
        (parameters, solver info, each row's control term: its controls times their
        coefficients).
    """
    dow, s_sin, s_cos, weekend = calendar_terms(rows.dates)
    neg_x = -np.log(rows.price / reference[rows.product])
    events = event_indicators(rows.dates, calendar.get("events", {}))
    shifts = events if calendar.get("event_elasticity") else np.zeros((len(neg_x), 0))
    controls = controls if controls is not None else np.zeros((len(neg_x), 0))
    reference_columns = (rows.reference_columns if rows.reference_columns is not None
                         else np.zeros((len(neg_x), 0)))
    cross = (category_price_index(rows.product, rows.dates, -neg_x, product_category)[:, None]
             if calendar.get("cross_price") else np.zeros((len(neg_x), 0)))
    design = _Design(product=rows.product, product_category=product_category, dow=dow,
                     z=np.column_stack([np.ones_like(neg_x), s_sin, s_cos, neg_x]),
                     v=np.column_stack([neg_x * s_sin, neg_x * s_cos, neg_x * weekend,
                                        neg_x[:, None] * shifts,
                                        calendar_level_columns(rows.dates, calendar),
                                        cross, controls, reference_columns]),
                     units=rows.units, weight=rows.weight, censored=rows.censored,
                     dispersion=rows.dispersion)
    start = _Params.initial(design)
    if warm is not None:  # a fit of nearly the same rows: Newton starts next to its optimum
        core = warm.core_vector()[:design.n_core]
        start = _Params(np.concatenate([core, np.zeros(design.n_core - len(core))]),
                        warm.category_offset.copy(), warm.product_offset.copy())
    params, solver = _newton(design, start, strength, monitor)
    tail = np.column_stack([controls, reference_columns])  # the term the shapes fit on top of
    n_controls = tail.shape[1]
    control_term = (tail @ params.core[design.n_core - n_controls:] if n_controls
                    else np.zeros(len(neg_x)))
    return params, solver, control_term


def _fit_with_shapes(cls: type[DemandModel], rows: _FitRows, reference: np.ndarray,
                     product_category: np.ndarray, categories: list[str], strength: float,
                     forms: list[str], chosen: np.ndarray | None, calendar: dict[str, Any],
                     monitor: RunMonitor | None, controls: np.ndarray | None = None,
                     warm: DemandModel | None = None) -> DemandModel:
    """The base fit, then each other shape in ``forms`` (only those some product chose, when
    ``chosen`` is given) on the base's calendar level (controls included). ``warm``: a fit of
    nearly the same rows to start from."""
    base, solver, control_term = _fit_base(rows, reference, product_category, strength,
                                           calendar, controls, monitor, warm)
    n_products = len(reference)
    n_events = len(calendar.get("events", {}))
    n_shifts = n_events if calendar.get("event_elasticity") else 0
    n_level = 2 * int(calendar.get("year_harmonics", 0)) + n_events
    n_cross = 1 if calendar.get("cross_price") else 0
    extra = base.core[N_BASE_CORE:]
    n_reference = 0 if rows.reference_columns is None else reference_module.N_COLUMNS
    effect = None
    if n_reference:
        assert rows.reference_rate is not None
        loss, gain = (float(v) for v in extra[len(extra) - n_reference:])
        effect = reference_module.ReferenceEffect(rate=rows.reference_rate, loss=loss, gain=gain)
        extra = extra[:len(extra) - n_reference]
    model = cls(mean=base.core[:4].copy(), category_offset=base.category,
                product_offset=base.product, product_category=product_category,
                dow_effect=np.concatenate([[0.0], base.core[4:10]]),
                elasticity_modifiers=base.core[10:13].copy(), reference_price=reference,
                categories=categories, info=solver, calendar=calendar,
                event_elasticity=(extra[:n_shifts].copy() if n_shifts else np.zeros(n_events)),
                level_effects=extra[n_shifts:n_shifts + n_level].copy(),
                cross_price=(float(extra[n_shifts + n_level]) if n_cross else None),
                control_effects=extra[n_shifts + n_level + n_cross:].copy(),
                reference_effect=effect)
    shape_params = np.zeros((n_products, len(FORMS), shapes_module.N_SHAPE_PARAMS))
    wanted = [f for f in forms if f != "loglog"
              and (chosen is None or (chosen == FORMS.index(f)).any())]
    if wanted:
        log_base = (model.log_base_and_elasticity(rows.product, rows.dates)[0] + control_term
                    + cross_price_term(model, rows.product, rows.dates, rows.price))
        r = rows.price / reference[rows.product]
        stretched = 1.0 + model.calendar_scale(rows.product, rows.dates) * (r - 1.0)
        shape_rows = shapes_module.ShapeRows(
            product=rows.product, r=stretched, log_base=log_base,
            units=rows.units, product_category=product_category, weight=rows.exact_weight)
        elasticity = model.product_parameters()[:, 3]
        for form in wanted:
            start = shapes_module.initial_params(form, elasticity)
            if warm is not None and warm.shape_params is not None \
                    and warm.shape_params[:, FORMS.index(form)].any():
                start = warm.shape_params[:, FORMS.index(form)].copy()
            shape_params[:, FORMS.index(form)] = shapes_module.fit_shape(
                form, shape_rows, start, strength)
    product_form = (chosen if chosen is not None
                    else np.zeros(n_products, dtype=np.int8)).astype(np.int8)
    return replace(model, product_form=product_form, shape_params=shape_params)


def _refit_estimates(cls: type[DemandModel], selections: DemandModel, rows: _FitRows,
                     reference: np.ndarray, product_category: np.ndarray, categories: list[str],
                     strength: float, forms: list[str], calendar: dict[str, Any],
                     on_hand: np.ndarray | None, censoring: dict[str, Any],
                     settings: Settings, monitor: RunMonitor | None
                     ) -> tuple[DemandModel, _FitRows, dict[str, Any], dict[str, Any],
                                np.ndarray]:
    """:meth:`DemandModel.fit` with ``selections``: the estimates refitted on ``rows`` with
    every selection of ``selections`` kept (see there).

    Returns:
        (model, rows with the reference columns and the point fit's weights, reference info,
        shape selection info (empty), each product's shape).
    """
    effect = selections.reference_effect
    rows = rows.with_reference(None if effect is None else effect.rate)
    reference_info = {"verdict": "kept from the point fit",
                      "rate": None if effect is None else effect.rate}
    chosen = np.asarray(selections.product_form, dtype=np.int8).copy()
    expected = selections.expected_units(rows.product, rows.dates, rows.price)
    # The point fit's row weights (its capped products' low-price days, its reactive-price
    # weights, its censoring mode) applied to these rows: one rule, not a second detection.
    weights = model_row_weights(selections, rows.product, rows.dates, rows.price, rows.units,
                                on_hand, detect=bool(settings.train.demand_detect_capped))
    rows = replace(rows, weight=weights.weight, censored=weights.censored, exact=weights.exact)
    low_price = ((selections.info or {}).get("censoring") or {}).get("low_price_days")
    if low_price is not None:
        censoring["low_price_days"] = low_price
    lags = int(calendar["control_lags"])
    leads = int(calendar.get("control_leads", 0))
    controls = None
    if lags or leads:
        # The control function on the selections' surprises: the point fit's are the best
        # estimate of the demand shocks the pricer saw, and a member's own first round would
        # only move them by its resampling noise.
        surprise = np.log((rows.units + 0.5) / (expected + 0.5))
        log_rel_price = np.log(rows.price / reference[rows.product])
        controls = np.column_stack([lagged(rows, surprise, lags),
                                    lagged(rows, log_rel_price, lags),
                                    lagged(rows, surprise, leads, lead=True),
                                    lagged(rows, log_rel_price, leads, lead=True)])
    model = _fit_with_shapes(cls, rows, reference, product_category, categories, strength,
                             forms, chosen, calendar, monitor, warm=selections,
                             controls=controls)
    return model, rows, reference_info, {}, chosen


def _select_reference(cls: type[DemandModel], rows: _FitRows, reference: np.ndarray,
                      product_category: np.ndarray, categories: list[str], strength: float,
                      calendar: dict[str, Any], settings: Settings
                      ) -> tuple[_FitRows, dict[str, Any]]:
    """``rows`` with the reference-price columns of the half-life chosen on the held-out last
    train days (reference.select_half_life; constant-elasticity trial fits), or unchanged
    when no candidate earns its keep; and what the selection saw."""
    half_lives = [float(h) for h in settings.train.demand_reference_half_lives]
    if not half_lives:
        return rows, {"verdict": "off (train.demand_reference_half_lives is empty)"}
    n_products = len(reference)
    holdout = _last_days(rows.product, rows.dates, n_products,
                         float(settings.train.demand_holdout_fraction))
    if not holdout.any() or holdout.all():
        return rows, {"verdict": "no reference-price effect: too few rows to hold out"}

    def fit_rows(keep: np.ndarray, rate: float | None) -> DemandModel:
        return _fit_with_shapes(cls, rows.with_reference(rate).take(keep), reference,
                                product_category, categories, strength, ["loglog"], None,
                                calendar, None)

    def deviance(model: DemandModel, held: _FitRows, ref: np.ndarray | None) -> float:
        predicted = model.expected_units(held.product, held.dates, held.price, reference=ref)
        total = shapes_module.deviance_by_product(predicted, held.units, held.product,
                                                  n_products, held.exact_weight).sum()
        return float(total / max(held.exact_weight.sum(), 1e-12))

    rate, info = reference_module.select_half_life(fit_rows, rows, holdout, half_lives,
                                                   deviance)
    return rows.with_reference(rate), info


def _median_by_product(product: np.ndarray, price: np.ndarray, n_products: int) -> np.ndarray:
    """Median price of each product (NaN where it has no row)."""
    import polars as pl

    medians = (pl.DataFrame({"p": product, "price": price}).group_by("p")
               .agg(pl.col("price").median()))
    out = np.full(n_products, np.nan)
    out[medians["p"].to_numpy()] = medians["price"].to_numpy()
    return out


def _product_categories(meta: pl.DataFrame, usable: np.ndarray, n_products: int
                        ) -> tuple[list[str], np.ndarray]:
    """Category names and each product's category index (-1: no category column / no rows)."""
    product_category = np.full(n_products, -1, dtype=np.int64)
    if "category" not in meta.columns:
        return [], product_category
    import polars as pl

    table = (meta.filter(pl.Series(usable)).select("product_index", "category")
             .unique(subset="product_index", keep="first").sort("product_index"))
    categories = sorted(set(table["category"].cast(pl.String).fill_null("none").to_list()))
    code = {name: i for i, name in enumerate(categories)}
    names = table["category"].cast(pl.String).fill_null("none").to_list()
    product_category[table["product_index"].to_numpy().astype(np.int64)] = [code[n] for n in names]
    return categories, product_category


# ----------------------------------------------------------------------------------------------
# The penalized Poisson fit: Newton's method on the block structure of the problem.
#
# Parameters: 13 "core" globals (means of a, s1, s2, e; dow Tue..Sun; g1, g2, g3), 4 per category
# and 4 per product. The Hessian is block-arrow shaped: one 4x4 block per product, coupled only
# to the globals, so the Newton system is solved exactly by eliminating the product blocks
# (batched 4x4 solves) and solving a small (13 + 4 categories) Schur complement. Every sum over
# rows is a bincount by product: memory stays a few arrays of the row count.

N_BASE_CORE = 13  # means of a, s1, s2, e; dow Tue..Sun; g1, g2, g3 (then the extra columns)
NEWTON_MAX_ITER = 100
NEWTON_TOL = 1e-12  # stop when the Newton decrement is this small relative to the objective
OFFSET_EPS = 1e-6  # keeps the system definite when demand_shrinkage is 0 (mean vs offsets)


class _Design:
    """The rows of the fit. ``q`` = [z (1, sin, cos, -log rel price), dow one-hot Tue..Sun,
    v (-log rel price times sin, cos, weekend, then the extra columns)], so log λ = (core +
    offsets) · q. ``weight`` scales each row's likelihood (capped days count less)."""

    def __init__(self, *, product: np.ndarray, product_category: np.ndarray, dow: np.ndarray,
                 z: np.ndarray, v: np.ndarray, units: np.ndarray,
                 weight: np.ndarray | None = None, censored: np.ndarray | None = None,
                 dispersion: float = 1.0) -> None:
        self.product = product
        self.dow = dow
        self.product_category = product_category
        self.category = product_category[product]
        dow_onehot = (dow[:, None] == np.arange(1, 7)[None, :]).astype(np.float64)
        self.q = np.ascontiguousarray(np.column_stack([z, dow_onehot, v]))
        self.weight = np.ones(len(units)) if weight is None else weight
        self.units = units
        self.weighted_units = self.weight * units
        # Censored rows (sales a lower bound on demand): their term is -log P(Y >= y).
        censored = (np.zeros(len(units), dtype=bool) if censored is None
                    else np.asarray(censored, dtype=bool) & (units > 0))  # y = 0 says nothing
        self.censored = np.nonzero(censored)[0] if censored.any() else None
        self.exact_weight = np.where(censored, 0.0, self.weight)
        self.exact_weighted_units = self.exact_weight * units
        # Counts more dispersed than Poisson (units summed over baskets of several) have a
        # fatter upper tail: the censored term is that of the count / dispersion, a Poisson
        # of mean λ / dispersion (quasi-likelihood), times the dispersion.
        self.dispersion = float(dispersion)
        self.n_core = self.q.shape[1]
        self.n_products = len(product_category)
        self.n_categories = int(product_category.max() + 1) if len(product_category) else 0


@dataclass(frozen=True)
class _Params:
    core: np.ndarray  # (13,)
    category: np.ndarray  # (n_categories, 4)
    product: np.ndarray  # (n_products, 4)

    @classmethod
    def initial(cls, d: _Design) -> _Params:
        """Each product's own mean volume and an elasticity of 1."""
        counts = np.bincount(d.product, minlength=d.n_products)
        sums = np.bincount(d.product, weights=d.units, minlength=d.n_products)
        overall = np.log(d.units.mean() + 0.1)
        own = np.where(counts > 0, np.log(sums / np.maximum(counts, 1) + 0.1), overall)
        product = np.zeros((d.n_products, 4))
        product[:, 0] = np.clip(own - overall, -5.0, 5.0)
        core = np.zeros(d.n_core)
        core[0], core[3] = overall, 1.0
        return cls(core, np.zeros((d.n_categories, 4)), product)

    def moved(self, delta: _Params, t: float) -> _Params:
        return _Params(self.core + t * delta.core, self.category + t * delta.category,
                       self.product + t * delta.product)

    def eta(self, d: _Design) -> np.ndarray:
        """log λ of every row."""
        theta = self.product[d.product] + self.core[:4]
        if d.n_categories:
            has = d.category >= 0
            theta[has] += self.category[d.category[has]]
        eta = np.einsum("ij,ij->i", theta, d.q[:, :4]) + d.q[:, 4:] @ self.core[4:]
        return np.minimum(eta, ETA_MAX)


def poisson_upper_tail(y: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log P(Y >= y), h = P(Y = y - 1) / P(Y >= y)) for Y ~ Poisson(lam), y >= 0.

    P(Y >= y) is the regularized lower incomplete gamma P(y, lam), so y need not be a whole
    count (a count scaled by its dispersion, _Design); h = lam^(y-1) e^-lam / Γ(y) / P(y, lam)
    gives the censored term's derivatives in eta = log lam: d log P / d eta = lam·h, and
    d² log P / d eta² = -lam·h·(lam·(1 + h) - y). No scipy: for lam < y + 1 the series
    P = pmf(y)·Σ_j Π_i lam / (y + i), else 1 - Q with Q(y, lam) by its continued fraction
    (modified Lentz, as Numerical Recipes' gcf); TAIL_SDS standard deviations of terms
    (plus 30) reach double precision either way.
    """
    import math

    y = np.asarray(y, dtype=np.float64)
    lam = np.maximum(np.asarray(lam, dtype=np.float64), 1e-300)
    log_tail, h = np.zeros(y.shape), np.zeros(y.shape)
    positive = y > 0
    if not positive.any():
        return log_tail, h
    a, x = y[positive], lam[positive]
    log_gamma_a = np.array([math.lgamma(v) for v in a.tolist()])
    log_density = (a - 1.0) * np.log(x) - x - log_gamma_a  # x^(a-1) e^-x / Γ(a)
    steps = int(np.ceil(TAIL_SDS * np.sqrt(max(float(a.max()), float(x.max()))))) + 30
    series = x < a + 1.0
    # Series: P(a, x) = x^a e^-x / Γ(a + 1) · Σ_j Π_{i=1..j} x / (a + i).
    total, term = np.ones(a.shape), np.ones(a.shape)
    for i in range(1, steps):
        term = term * x / (a + i)
        total += term
    log_series = log_density + np.log(x / a) + np.log(total)
    # Continued fraction: Q(a, x) = x^a e^-x / Γ(a) · 1 / (x + 1 - a - 1·(1 - a) / (x + 3 - a
    # - ...)), evaluated where it converges (x >= a + 1); elsewhere a placeholder x.
    xc = np.where(series, a + 2.0, x)
    tiny = 1e-300
    b = xc + 1.0 - a
    c = np.full(a.shape, 1.0 / tiny)
    d = 1.0 / b
    fraction = d.copy()
    for i in range(1, steps):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = b + an / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        fraction = fraction * d * c
    upper = np.exp(np.minimum(log_density + np.log(xc) + np.log(fraction), 0.0))
    log_fraction = np.log1p(-np.minimum(upper, 1.0 - 1e-16))
    tail = np.where(series, log_series, log_fraction)
    log_tail[positive] = tail
    h[positive] = np.exp(log_density - tail)
    return log_tail, h


def _curvature_and_residual(d: _Design, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the second and first derivative in eta of the weighted negative
    log-likelihood: Poisson rows w·lam and w·(lam - y); censored rows (-log P(Y >= y))
    w·lam·h·(lam·(1 + h) - y) and -w·lam·h (h: :func:`poisson_upper_tail`), the exact
    curvature (>= 0: it is lam less the variance of Y given Y >= y, and truncating a
    Poisson from below lowers its variance), so Newton keeps its quadratic convergence."""
    lam = np.exp(eta)
    curvature = d.exact_weight * lam  # weighted Poisson: weights scale rate and units alike
    residual = curvature - d.exact_weighted_units
    if d.censored is not None:
        c, phi = d.censored, d.dispersion
        w, lc = d.weight[c], lam[c]
        _, h = poisson_upper_tail(d.units[c] / phi, lc / phi)
        residual[c] = -w * lc * h
        curvature[c] = w * lc * h * np.maximum((lc * (1.0 + h) - d.units[c]) / phi, 0.0)
    return curvature, residual


def _penalty_weights(strength: float, n_core: int = N_BASE_CORE
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diagonal penalties (as in ``sum(w * x**2)``) of a product block, a category block and
    the core."""
    product = strength * SHRINK_WEIGHTS + OFFSET_EPS
    category = CATEGORY_SHRINK * strength * SHRINK_WEIGHTS + OFFSET_EPS
    core = np.zeros(n_core)
    core[[1, 2]] = GLOBAL_RIDGE  # season means
    core[4:] = GLOBAL_RIDGE  # dow effects, elasticity modifiers, calendar and controls
    return product, category, core


def _objective(d: _Design, p: _Params, product_w: np.ndarray, category_w: np.ndarray,
               core_w: np.ndarray) -> float:
    """The penalized Poisson negative log-likelihood (constant terms dropped)."""
    eta = p.eta(d)
    nll = float((d.exact_weight * np.exp(eta) - d.exact_weighted_units * eta).sum())
    if d.censored is not None:
        c, phi = d.censored, d.dispersion
        log_tail, _ = poisson_upper_tail(d.units[c] / phi, np.exp(eta[c]) / phi)
        nll -= float((phi * d.weight[c] * log_tail).sum())
    return nll + float((product_w * p.product**2).sum() + (category_w * p.category**2).sum()
                       + (core_w * p.core**2).sum())


def _newton_direction(d: _Design, p: _Params, product_w: np.ndarray, category_w: np.ndarray,
                      core_w: np.ndarray) -> tuple[_Params, float]:
    """The exact Newton step and the Newton decrement -grad·step."""
    N_CORE = d.n_core  # noqa: N806 - the size of the core block, as in the comments above
    P, K, G = d.n_products, d.n_categories, N_CORE + 4 * d.n_categories
    lam, residual = _curvature_and_residual(d, p.eta(d))
    z = d.q[:, :4]
    # Per product: E_p = sum lam z q^T (4 x 13); its first 4 columns are M_p = sum lam z z^T.
    E = np.zeros((P, 4, N_CORE))
    for i in range(4):
        for j in range(i, 4):
            E[:, i, j] = E[:, j, i] = np.bincount(d.product, lam * z[:, i] * z[:, j], P)
        by_dow = np.bincount(d.product * 7 + d.dow, lam * z[:, i], 7 * P).reshape(P, 7)
        E[:, i, 4:10] = by_dow[:, 1:]
        for j in range(10, N_CORE):
            E[:, i, j] = np.bincount(d.product, lam * z[:, i] * d.q[:, j], P)
    M = E[:, :, :4]
    grad_product = np.column_stack([np.bincount(d.product, residual * z[:, i], P)
                                    for i in range(4)])
    has = np.nonzero(d.product_category >= 0)[0] if K else np.zeros(0, dtype=np.int64)

    # Global block: core then categories.
    H = np.zeros((G, G))
    H[:N_CORE, :N_CORE] = (d.q * lam[:, None]).T @ d.q + 2.0 * np.diag(core_w)
    grad = np.zeros(G)
    grad[:N_CORE] = d.q.T @ residual + 2.0 * core_w * p.core
    cat = d.product_category[has] if K else np.zeros(0, dtype=np.int64)
    if K:
        E_cat = np.zeros((K, 4, N_CORE))
        np.add.at(E_cat, cat, E[has])
        g_cat = np.zeros((K, 4))
        np.add.at(g_cat, cat, grad_product[has])
        for k in range(K):
            block = slice(N_CORE + 4 * k, N_CORE + 4 * k + 4)
            H[block, block] = E_cat[k, :, :4] + 2.0 * np.diag(category_w)
            H[block, :N_CORE] = E_cat[k]
            H[:N_CORE, block] = E_cat[k].T
            grad[block] = g_cat[k] + 2.0 * category_w * p.category[k]
    grad_product = grad_product + 2.0 * product_w * p.product

    # Eliminate the product blocks: A_p d_p + B_p d_g = -g_p, where B_p = [E_p, M_p in its
    # category's 4 columns, 0 elsewhere]. Only those blocks are formed (A, M symmetric):
    # the Schur complement H - sum_p B_p^T A_p^-1 B_p has core x core, core x own category and
    # category x category parts only.
    A = M + 2.0 * np.diag(product_w)[None, :, :]
    A_inv_E = np.linalg.solve(A, E)
    A_inv_g = np.linalg.solve(A, grad_product[:, :, None])[:, :, 0]
    E_flat = E.reshape(P * 4, N_CORE)
    schur = H
    schur[:N_CORE, :N_CORE] -= E_flat.T @ A_inv_E.reshape(P * 4, N_CORE)
    rhs = -grad
    rhs[:N_CORE] += E_flat.T @ A_inv_g.reshape(P * 4)
    if K:
        A_inv_M = A_inv_E[has, :, :4]  # A^-1 M_p: M_p is E_p's first 4 columns
        core_cat = np.zeros((K, N_CORE, 4))
        np.add.at(core_cat, cat, np.einsum("pin,pij->pnj", A_inv_E[has], M[has]))
        cat_cat = np.zeros((K, 4, 4))
        np.add.at(cat_cat, cat, np.einsum("pin,pij->pnj", A_inv_M, M[has]))
        rhs_cat = np.zeros((K, 4))
        np.add.at(rhs_cat, cat, np.einsum("pij,pj->pi", M[has], A_inv_g[has]))
        for k in range(K):
            block = slice(N_CORE + 4 * k, N_CORE + 4 * k + 4)
            schur[:N_CORE, block] -= core_cat[k]
            schur[block, :N_CORE] -= core_cat[k].T
            schur[block, block] -= cat_cat[k]
            rhs[block] += rhs_cat[k]
    step_global = np.linalg.solve(schur, rhs)
    step_product = -A_inv_g - A_inv_E @ step_global[:N_CORE]
    if K:
        step_cat = step_global[N_CORE:].reshape(K, 4)
        step_product[has] -= np.einsum("pij,pj->pi", A_inv_M, step_cat[cat])
    step = _Params(step_global[:N_CORE], step_global[N_CORE:].reshape(K, 4), step_product)
    decrement = -float(grad @ step_global + (grad_product * step_product).sum())
    return step, decrement


def _newton(d: _Design, p: _Params, strength: float, monitor: RunMonitor | None
            ) -> tuple[_Params, dict[str, Any]]:
    """Damped Newton (backtracking line search) to the penalized Poisson optimum."""
    weights = _penalty_weights(strength, d.n_core)
    f = _objective(d, p, *weights)
    if monitor is not None:
        monitor.add_bar("demand_fit", "demand fit (Newton iterations)", NEWTON_MAX_ITER)
    decrement, iteration, converged = float("inf"), 0, False
    for iteration in range(1, NEWTON_MAX_ITER + 1):  # noqa: B007 - reported below
        step, decrement = _newton_direction(d, p, *weights)
        if decrement <= NEWTON_TOL * (1.0 + abs(f)):
            converged = True
            break
        t = 1.0
        while True:
            candidate = p.moved(step, t)
            f_new = _objective(d, candidate, *weights)
            if f_new <= f - 1e-4 * t * decrement or t < 1e-8:
                break
            t *= 0.5
        p, f = candidate, f_new
        if monitor is not None:
            monitor.update_bar("demand_fit", completed=iteration)
            monitor.check_memory()
    if monitor is not None:
        monitor.update_bar("demand_fit", completed=iteration, total=iteration)
    return p, {"newton_iterations": iteration, "converged": converged,
               "newton_decrement": decrement, "penalized_nll_per_row": f / max(len(d.units), 1)}
