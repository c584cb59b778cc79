"""The true demand function of a generated market (see docs/market.md for the formula).

``generate`` draws a :class:`GroundTruth` and samples transactions from it; ``evaluate`` loads
it back from ``ground_truth.json`` to score prices against the true optimum. Every function is
vectorized: ``product_idx``, ``dates`` and ``prices`` are broadcast against each other, so one
call can score one product over many days, many products on one day, or a whole grid of
candidate prices (``prices[..., None]`` against a ``(n, K)`` grid).

Expected daily units of product p on date t at price x::

    wave     = sin(2*pi*(doy(t) - season_phase_p) / 365.25)
    e_p(t)   = elasticity_p * (1 + elasticity_season * wave + elasticity_weekend * weekend(t))
    lambda   = base_units_p * exp(season_amp_p * wave + dow_effect[dow(t)])
               * (x / ref_price_p) ** (-e_p(t))

Only numpy is imported here, so the module is cheap to import from any stage.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pricing_cli.errors import DataError

FORMULA = "constant-elasticity-seasonal"
"""Name of the demand formula written to ground_truth.json; load refuses any other."""
FORMULA_VERSION = 2
"""Version of the formula and of the ground_truth.json layout. Version 2 adds the optional
``scenario`` section (docs/market.md, "Scenarios"); a market without one is still written as
version 1, byte for byte as before, and both versions load."""
BASE_FORMULA_VERSION = 1
"""The version written for a market without a scenario."""
DAYS_PER_YEAR = 365.25
WEEKEND_DOWS = (5, 6)
"""Saturday and Sunday, with Monday = 0 (ISO weekday - 1)."""

# Per-product parameters, in the order they appear in ground_truth.json records.
PRODUCT_FIELDS = ("base_units", "ref_price", "elasticity", "season_amp", "season_phase",
                  "unit_cost", "min_price", "max_price")

ArrayLike = Any  # anything np.asarray accepts


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Every product's true demand parameters, as arrays aligned on ``product_ids``.

    Attributes:
        product_ids: product identifiers; position i is product index i.
        category: category of each product.
        base_units: expected daily units at ``ref_price`` on an average day (wave 0, dow 0).
        ref_price: the price at which the price factor is 1 (the first list price).
        elasticity: e_p, the product's base own-price elasticity (> 1 for an interior optimum).
        season_amp: amplitude of the yearly demand wave (log scale).
        season_phase: day of year where the wave crosses zero going up.
        unit_cost, min_price, max_price: the catalog; prices are allowed in [min, max].
        elasticity_season: relative change of elasticity per unit of the seasonal wave.
        elasticity_weekend: relative change of elasticity on Saturdays and Sundays.
        dow_effect: shape (7,), additive log-demand effect of the weekday (Monday first).
        seed: seed the market was generated with (None if unknown).
        meta: free-form facts about the generation (start date, days, settings).
        scenario: the market's departures from the memoryless constant-elasticity model
            (None: today's market). Score any price path through :func:`true_units`.
    """

    product_ids: tuple[str, ...]
    category: tuple[str, ...]
    base_units: np.ndarray
    ref_price: np.ndarray
    elasticity: np.ndarray
    season_amp: np.ndarray
    season_phase: np.ndarray
    unit_cost: np.ndarray
    min_price: np.ndarray
    max_price: np.ndarray
    elasticity_season: float
    elasticity_weekend: float
    dow_effect: np.ndarray
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    scenario: Scenario | None = None

    @property
    def n_products(self) -> int:
        return len(self.product_ids)

    @property
    def index(self) -> dict[str, int]:
        """product_id -> product index."""
        return {pid: i for i, pid in enumerate(self.product_ids)}

    def product_index(self, product_ids: ArrayLike) -> np.ndarray:
        """Indices of ``product_ids`` (any array shape) in this ground truth.

        Raises:
            DataError: a product_id is not in the ground truth (wrong file for this data).
        """
        ids = np.asarray(product_ids, dtype=object)
        lookup = self.index
        try:
            flat = [lookup[str(pid)] for pid in ids.ravel()]
        except KeyError as exc:
            raise DataError(
                f"product_id {exc.args[0]!r} is not in the ground truth",
                "The ground truth belongs to another market: point data.ground_truth at the "
                "ground_truth.json written with these transactions.",
            ) from None
        return np.asarray(flat, dtype=np.intp).reshape(ids.shape)

    def to_dict(self) -> dict[str, Any]:
        """The JSON payload of ground_truth.json (floats written with full precision)."""
        products = []
        for i, pid in enumerate(self.product_ids):
            record: dict[str, Any] = {"product_id": pid, "category": self.category[i]}
            for name in PRODUCT_FIELDS:
                record[name] = float(getattr(self, name)[i])
            products.append(record)
        payload = {
            "formula": FORMULA,
            "formula_version": BASE_FORMULA_VERSION if self.scenario is None else FORMULA_VERSION,
            "formula_text": (
                "units = base_units * exp(season_amp * wave + dow_effect[dow]) * "
                "(price / ref_price) ** -(elasticity * (1 + elasticity_season * wave + "
                "elasticity_weekend * is_weekend)); wave = sin(2*pi*(doy - season_phase)/365.25); "
                "dow: Monday=0; doy: 1 = January 1; weekend: Saturday, Sunday"
            ),
            "seed": self.seed,
            "market": {
                "elasticity_season": float(self.elasticity_season),
                "elasticity_weekend": float(self.elasticity_weekend),
                "dow_effect": [float(v) for v in self.dow_effect],
            },
            "meta": self.meta,
            "products": products,
        }
        if self.scenario is not None:
            payload["scenario"] = self.scenario.to_dict()
        return payload

    @classmethod
    def from_dict(cls, payload: Any, source: str = "ground truth") -> GroundTruth:
        """Build from the payload of :meth:`to_dict`.

        Raises:
            DataError: wrong formula or version, a missing key, or an invalid value; the
                message names ``source`` and the product row.
        """
        hint = "Re-create it with `pricectl generate`."
        if not isinstance(payload, dict):
            raise DataError(f"{source}: expected a JSON object at the top level", hint)
        if (payload.get("formula") != FORMULA
                or payload.get("formula_version") not in (BASE_FORMULA_VERSION, FORMULA_VERSION)):
            raise DataError(
                f"{source}: formula {payload.get('formula')!r} version "
                f"{payload.get('formula_version')!r} is not {FORMULA!r} version "
                f"{BASE_FORMULA_VERSION} or {FORMULA_VERSION}", hint)
        market = payload.get("market")
        products = payload.get("products")
        if not isinstance(market, dict) or not isinstance(products, list) or not products:
            raise DataError(f"{source}: needs a 'market' object and a non-empty 'products' list",
                            hint)
        try:
            dow_effect = np.asarray(market["dow_effect"], dtype=np.float64)
            e_season = float(market["elasticity_season"])
            e_weekend = float(market["elasticity_weekend"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: market section is invalid ({exc!r})", hint) from None
        if dow_effect.shape != (7,):
            raise DataError(f"{source}: market.dow_effect must hold 7 numbers (Monday first)", hint)
        columns: dict[str, list[float]] = {name: [] for name in PRODUCT_FIELDS}
        ids: list[str] = []
        categories: list[str] = []
        for row, record in enumerate(products):
            try:
                ids.append(str(record["product_id"]))
                categories.append(str(record["category"]))
                for name in PRODUCT_FIELDS:
                    value = float(record[name])
                    if not math.isfinite(value):
                        raise ValueError(f"{name} is not finite")
                    columns[name].append(value)
            except (KeyError, TypeError, ValueError) as exc:
                what = f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
                raise DataError(f"{source}: products[{row}]: {what}", hint) from None
            if not (0 < columns["min_price"][-1] <= columns["max_price"][-1]
                    and columns["base_units"][-1] >= 0 and columns["ref_price"][-1] > 0):
                raise DataError(f"{source}: products[{row}] ({ids[-1]}): needs 0 < min_price <= "
                                "max_price, ref_price > 0 and base_units >= 0", hint)
        if len(set(ids)) != len(ids):
            raise DataError(f"{source}: product_ids are not unique", hint)
        arrays = {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}
        seed = payload.get("seed")
        scenario = None
        if payload.get("scenario") is not None:
            scenario = Scenario.from_dict(payload["scenario"], len(ids), f"{source}: scenario")
        return cls(product_ids=tuple(ids), category=tuple(categories), **arrays,
                   elasticity_season=e_season, elasticity_weekend=e_weekend,
                   dow_effect=dow_effect, seed=None if seed is None else int(seed),
                   meta=dict(payload.get("meta") or {}), scenario=scenario)


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read ground_truth.json written by ``pricectl generate``.

    Raises:
        DataError: the file is missing, is not JSON, or does not hold a valid ground truth;
            the message names the file (and the line or product row).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"ground truth file not found: {path}",
            "Only generated markets have one: run `pricectl generate`, or set "
            "data.ground_truth to the ground_truth.json written with your transactions.",
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"ground truth file {path} is not valid JSON at line {exc.lineno}: "
                        f"{exc.msg}", "Re-create it with `pricectl generate`.") from None
    except UnicodeDecodeError:
        raise DataError(f"ground truth file {path} is not UTF-8 text",
                        "Re-create it with `pricectl generate`.") from None
    return GroundTruth.from_dict(payload, source=str(path))


# ----------------------------------------------------------------------------------------------
# The demand function


def calendar(dates: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Day of year (1 = January 1) and weekday (Monday = 0) of ``dates``.

    ``dates`` is anything numpy reads as ``datetime64[D]``: datetime.date objects, ISO
    strings, datetime64 values (times are truncated to the day).
    """
    days = np.asarray(dates, dtype="datetime64[D]")
    doy = (days - days.astype("datetime64[Y]")).astype(np.int64) + 1
    # 1970-01-01 (day 0) was a Thursday, weekday 3.
    dow = (days.astype(np.int64) + 3) % 7
    return doy, dow


def _season_wave(gt: GroundTruth, idx: np.ndarray, doy: np.ndarray) -> np.ndarray:
    return np.sin(2.0 * np.pi * (doy - gt.season_phase[idx]) / DAYS_PER_YEAR)


def _demand_terms(gt: GroundTruth, product_idx: ArrayLike,
                  dates: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, units at ref_price, elasticity) of each product-day, broadcast together."""
    idx = np.asarray(product_idx, dtype=np.intp)
    doy, dow = calendar(dates)
    wave = _season_wave(gt, idx, doy)
    weekend = np.isin(dow, WEEKEND_DOWS)
    e = gt.elasticity[idx] * (1.0 + gt.elasticity_season * wave
                              + gt.elasticity_weekend * weekend)
    level = gt.base_units[idx] * np.exp(gt.season_amp[idx] * wave + gt.dow_effect[dow])
    idx, level, e = np.broadcast_arrays(idx, level, e)
    return idx, level, e


def elasticity(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike) -> np.ndarray:
    """True own-price elasticity e_p(t) (a positive number) of each product-day.

    In a scenario market it is the point elasticity at ref_price (siblings at theirs, the
    reference at the price): the holiday shift included, LINEAR_SLOPE * e for linear demand.
    """
    e = _scenario_terms(gt, product_idx, dates)[2]
    if gt.scenario is not None and gt.scenario.demand_form == "linear":
        return LINEAR_SLOPE * e
    return e


def _memoryless(gt: GroundTruth, what: str) -> None:
    sc = gt.scenario
    if sc is not None and (sc.outside_share is not None or sc.reference_rate is not None):
        raise ValueError(f"{what} is per product-day; with substitution or reference prices "
                         "score price paths with market.true_units")


def expected_units(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike,
                   prices: ArrayLike) -> np.ndarray:
    """Expected daily units (the Poisson mean) of product-days at ``prices`` (all > 0).

    In a scenario market: the uncapped demand of a memoryless one (any demand form, holidays,
    the stored shock); substitution and reference prices need :func:`true_units`.
    """
    if gt.scenario is not None:
        _memoryless(gt, "expected_units")
        return _units_at(gt, product_idx, dates, prices)
    idx, level, e = _demand_terms(gt, product_idx, dates)
    x = np.asarray(prices, dtype=np.float64)
    if np.any(x <= 0):
        raise ValueError("prices must be > 0")
    return level * (x / gt.ref_price[idx]) ** (-e)


def expected_profit(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike,
                    prices: ArrayLike) -> np.ndarray:
    """Expected daily profit (price - unit_cost) * expected_units."""
    idx = np.asarray(product_idx, dtype=np.intp)
    x = np.asarray(prices, dtype=np.float64)
    return (x - gt.unit_cost[idx]) * expected_units(gt, idx, dates, x)


def optimal_price(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike) -> np.ndarray:
    """The price in [min_price, max_price] that maximizes expected profit on each product-day.

    With constant elasticity e, profit (x - c) * A * x**-e has derivative
    A * x**(-e-1) * ((1 - e) * x + e * c): for e > 1 it rises up to x* = c * e / (e - 1) and
    falls after it, so profit is unimodal and clipping x* to the bounds is the constrained
    optimum. For e <= 1 profit rises for ever, so the optimum is max_price. Linear demand (a
    scenario): the parabola's peak, halfway between cost and the choke price, clipped.
    """
    if gt.scenario is not None:
        _memoryless(gt, "optimal_price")
        if (gt.scenario.demand_form == "logit" or gt.scenario.stock is not None
                or gt.scenario.season_stock is not None):
            raise ValueError("optimal_price has closed forms for loglog and linear demand "
                             "without stock-outs; use market.true_optimum")
    idx, _, e = _scenario_terms(gt, product_idx, dates)
    cost = gt.unit_cost[idx]
    if gt.scenario is not None and gt.scenario.demand_form == "linear":
        # (x - c) * (1 - s (x/ref - 1)) is a parabola peaking halfway between c and the choke.
        choke = gt.ref_price[idx] * (1.0 + 1.0 / (LINEAR_SLOPE * e))
        return np.clip(0.5 * (choke + cost), gt.min_price[idx], gt.max_price[idx])
    with np.errstate(divide="ignore", invalid="ignore"):
        unconstrained = np.where(e > 1.0, cost * e / (e - 1.0), np.inf)
    return np.clip(unconstrained, gt.min_price[idx], gt.max_price[idx])


# ----------------------------------------------------------------------------------------------
# Scenarios: markets that break the fitted model's assumptions (docs/market.md, "Scenarios")

DEMAND_FORMS = ("loglog", "linear", "logit")
LINEAR_SLOPE = 0.6
"""Linear demand's point elasticity at ref_price as a fraction of e_p(t): the choke price
ref_price * (1 + 1/(0.6 e)) is then at least 1.38 x ref_price on every preset, above the
historical prices, and the optimum (choke + cost) / 2 within [1.05, 3.5] x cost (docs/market.md)."""
LOGIT_SHARE = 0.3
"""Logit demand: the purchase probability at ref_price (the curve's slope there gives e_p(t))."""
_POISSON_EXACT_MAX = 700.0  # exp(-700) is still a normal float; above it use min(mean, stock)


@dataclass(frozen=True)
class HolidayWindow:
    """An event window in which log demand rises by ``level`` and the elasticity by
    ``elasticity`` (relative), times the window's intensity on that day.

    ``start``/``end`` are ``MM-DD`` in the same year (end inclusive). ``shape`` ``ramp``: the
    intensity rises linearly from 0 on ``start`` to 1 on ``end``; ``flat``: 1 throughout.
    """

    name: str
    start: str
    end: str
    shape: str
    level: float
    elasticity: float


@dataclass(frozen=True, eq=False)
class Scenario:
    """What a scenario market adds to the base demand. Day-indexed arrays have shape
    (n_products, n_days), day 0 = ``start_date``.

    Attributes:
        start_date: ISO date of day 0.
        demand_form: ``loglog`` (the base), ``linear`` or ``logit`` (see :func:`_price_factor`).
        holidays: event windows shifting demand level and elasticity.
        shock: the unobserved log-demand shock (AR(1)), or None.
        shock_autocorr, shock_sd: the AR(1) the shock was drawn from (documentation).
        outside_share: substitution on: each category is a multinomial logit with an outside
            option holding this share when every product is at its ref_price; None: off.
        stock: units on hand per product-day (stock-outs), or None.
        stock_file: where the stock file was written, if it was.
        reference_rate: reference prices on: the reference is an EWMA of the product's own
            past prices with this rate; None: off.
        reference_gain, reference_loss: log-demand change per unit of (reference - price) /
            reference below the reference (gain) and above it (loss).
        history: the historical prices (reference prices on), to rebuild the reference
            before any day.
        season_start: inventory on: the first day (index) of each season, ascending, the
            first 0; a season ends the day before the next starts (the last at the history's
            end); None: off.
        season_stock: inventory: (n_products, n_seasons) units delivered at each season's
            start (the only delivery: no reorders).
        salvage: inventory: (n_products,) what each unit left at a season's end fetches.
        inventory_prices: inventory: the historical prices, so a run of rows that starts
            inside a season starts from the stock the history left (in expectation).
    """

    start_date: str
    demand_form: str = "loglog"
    holidays: tuple[HolidayWindow, ...] = ()
    shock: np.ndarray | None = None
    shock_autocorr: float = 0.0
    shock_sd: float = 0.0
    outside_share: float | None = None
    stock: np.ndarray | None = None
    stock_file: str | None = None
    reference_rate: float | None = None
    reference_gain: float = 0.0
    reference_loss: float = 0.0
    history: np.ndarray | None = None
    season_start: np.ndarray | None = None
    season_stock: np.ndarray | None = None
    salvage: np.ndarray | None = None
    inventory_prices: np.ndarray | None = None

    @property
    def start(self) -> np.datetime64:
        return np.datetime64(self.start_date, "D")

    def to_dict(self) -> dict[str, Any]:
        def rows(array: np.ndarray, digits: int | None) -> list[list[float]]:
            if digits is None:
                return [[int(v) for v in row] for row in array]
            return [[round(float(v), digits) for v in row] for row in array]

        return {
            "start_date": self.start_date,
            "demand_form": self.demand_form,
            "holidays": [vars(w) for w in self.holidays],
            "price_endogeneity": None if self.shock is None else {
                "autocorr": self.shock_autocorr, "sd": self.shock_sd,
                "shock": rows(self.shock, SHOCK_DIGITS)},
            "substitution": None if self.outside_share is None else {
                "outside_share": self.outside_share},
            "stockouts": None if self.stock is None else {
                "stock_file": self.stock_file, "stock": rows(self.stock, None)},
            "reference_prices": None if self.reference_rate is None else {
                "rate": self.reference_rate, "gain": self.reference_gain,
                "loss": self.reference_loss,
                "historical_prices": rows(self.history, 2)},  # type: ignore[arg-type]
            "inventory": None if self.season_start is None else {
                "mode": "markdown", "stock_file": self.stock_file,
                "season_start": [int(v) for v in self.season_start],
                "season_stock": rows(self.season_stock, None),  # type: ignore[arg-type]
                "salvage": [round(float(v), 2) for v in self.salvage],  # type: ignore[union-attr]
                "historical_prices": rows(self.inventory_prices, 2)},  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, payload: Any, n_products: int, source: str) -> Scenario:
        """Build from :meth:`to_dict`'s payload. Raises DataError naming ``source``."""
        hint = "Re-create it with `pricectl generate`."
        try:
            start = str(payload["start_date"])
            np.datetime64(start, "D")
            form = str(payload.get("demand_form", "loglog"))
            if form not in DEMAND_FORMS:
                raise ValueError(f"demand_form {form!r} is not one of {DEMAND_FORMS}")
            holidays = tuple(HolidayWindow(**w) for w in payload.get("holidays") or [])
            for w in holidays:
                if w.shape not in ("ramp", "flat"):
                    raise ValueError(f"holiday {w.name!r}: shape must be ramp or flat")

            def path(section: dict[str, Any], key: str, dtype: Any) -> np.ndarray:
                array = np.asarray(section[key], dtype=dtype)
                if array.ndim != 2 or array.shape[0] != n_products or array.shape[1] < 1:
                    raise ValueError(f"{key} must be {n_products} rows of one value per day")
                if not np.all(np.isfinite(array)):
                    raise ValueError(f"{key} holds a value that is not finite")
                return array

            fields: dict[str, Any] = {"start_date": start, "demand_form": form,
                                      "holidays": holidays}
            if (endo := payload.get("price_endogeneity")) is not None:
                fields.update(shock=path(endo, "shock", np.float64),
                              shock_autocorr=float(endo["autocorr"]), shock_sd=float(endo["sd"]))
            if (sub := payload.get("substitution")) is not None:
                fields["outside_share"] = float(sub["outside_share"])
                if not 0 < fields["outside_share"] < 1:
                    raise ValueError("substitution.outside_share must be in (0, 1)")
            if (stock := payload.get("stockouts")) is not None:
                fields.update(stock=path(stock, "stock", np.int64),
                              stock_file=stock.get("stock_file"))
                if np.any(fields["stock"] < 0):
                    raise ValueError("stock must be >= 0")
            if (ref := payload.get("reference_prices")) is not None:
                fields.update(reference_rate=float(ref["rate"]), reference_gain=float(ref["gain"]),
                              reference_loss=float(ref["loss"]),
                              history=path(ref, "historical_prices", np.float64))
                if not 0 < fields["reference_rate"] <= 1:
                    raise ValueError("reference_prices.rate must be in (0, 1]")
            if (inv := payload.get("inventory")) is not None:
                starts = np.asarray(inv["season_start"], dtype=np.int64)
                prices = path(inv, "historical_prices", np.float64)
                season_stock = path(inv, "season_stock", np.int64)
                salvage = np.asarray(inv["salvage"], dtype=np.float64)
                if (starts.ndim != 1 or starts.size < 1 or starts[0] != 0
                        or np.any(np.diff(starts) <= 0) or starts[-1] >= prices.shape[1]):
                    raise ValueError("inventory.season_start must rise from 0 inside the history")
                if season_stock.shape[1] != starts.size or np.any(season_stock < 0):
                    raise ValueError("inventory.season_stock needs one count >= 0 per season")
                if salvage.shape != (n_products,) or not np.all(np.isfinite(salvage)
                                                                & (salvage >= 0)):
                    raise ValueError(f"inventory.salvage must be {n_products} values >= 0")
                fields.update(season_start=starts, season_stock=season_stock, salvage=salvage,
                              inventory_prices=prices, stock_file=inv.get("stock_file"))
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise DataError(f"{source}: {what}", hint) from None
        return cls(**fields)


SHOCK_DIGITS = 6
"""Decimals the demand shock is stored (and generated) with, so the file is the truth."""


def holiday_intensity(window: HolidayWindow, dates: ArrayLike) -> np.ndarray:
    """The window's intensity (0..1) on each of ``dates``."""
    days = np.asarray(dates, dtype="datetime64[D]")
    months = days.astype("datetime64[Y]").astype("datetime64[M]")

    def anchor(month_day: str) -> np.ndarray:
        month, day = (int(v) for v in month_day.split("-"))
        return (months + (month - 1)).astype("datetime64[D]") + (day - 1)

    start, end = anchor(window.start), anchor(window.end)
    inside = (days >= start) & (days <= end)
    if window.shape == "flat":
        return inside.astype(np.float64)
    span = np.maximum((end - start).astype(np.float64), 1.0)
    return np.where(inside, (days - start).astype(np.float64) / span, 0.0)


def _day_index(sc: Scenario, dates: ArrayLike) -> np.ndarray:
    return (np.asarray(dates, dtype="datetime64[D]") - sc.start).astype(np.int64)


def _path_at(path: np.ndarray, idx: np.ndarray, day: np.ndarray, what: str) -> np.ndarray:
    if np.any((day < 0) | (day >= path.shape[1])):
        raise ValueError(f"a date lies outside the generated history, which the {what} covers")
    return path[idx, day]


def _scenario_terms(gt: GroundTruth, product_idx: ArrayLike,
                    dates: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_demand_terms` plus the scenario's holiday windows and demand shock."""
    idx, level, e = _demand_terms(gt, product_idx, dates)
    sc = gt.scenario
    if sc is None:
        return idx, level, e
    if sc.holidays:
        lift = np.zeros(np.shape(dates))
        shift = np.zeros(np.shape(dates))
        for window in sc.holidays:
            h = holiday_intensity(window, dates)
            lift = lift + window.level * h
            shift = shift + window.elasticity * h
        level = level * np.exp(lift)
        e = e * (1.0 + shift)
    if sc.shock is not None:
        level = level * np.exp(_path_at(sc.shock, idx, _day_index(sc, dates), "demand shock"))
    idx, level, e = np.broadcast_arrays(idx, level, e)
    return idx, level, e


def _sigmoid(u: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * u))


def _price_factor(form: str, x: np.ndarray, ref: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Demand at price x relative to demand at ref, for a point elasticity e at ref
    (LINEAR_SLOPE * e for linear)."""
    if form == "linear":
        return np.maximum(0.0, 1.0 - LINEAR_SLOPE * e * (x / ref - 1.0))
    if form == "logit":
        u0 = math.log(LOGIT_SHARE / (1.0 - LOGIT_SHARE))
        slope = e / (ref * (1.0 - LOGIT_SHARE))
        return _sigmoid(u0 - slope * (x - ref)) / LOGIT_SHARE
    return (x / ref) ** (-e)


def _reference_factor(sc: Scenario, x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Demand multiplier of a price x against the reference: a gain below it, a (larger, loss
    aversion) loss above it."""
    gap = (x - reference) / reference
    return np.exp(-np.where(gap > 0, sc.reference_loss, sc.reference_gain) * gap)


def expected_sales(demand: ArrayLike, stock: ArrayLike) -> np.ndarray:
    """E[min(N, stock)] for N ~ Poisson(demand): the expected recorded sales under a stock cap.

    Uses E[min(N, S)] = sum_{k<S} P(N > k), by the Poisson recursion; above a mean of 700
    (where exp(-mean) underflows) it uses min(mean, S).
    """
    lam, cap = np.broadcast_arrays(np.asarray(demand, dtype=np.float64),
                                   np.asarray(stock, dtype=np.int64))
    exact = lam <= _POISSON_EXACT_MAX
    safe = np.where(exact, lam, 0.0)
    pmf = np.exp(-safe)
    cdf = pmf.copy()
    total = np.zeros(lam.shape)
    # P(N > k) is below 1e-30 beyond mean + 12 sd + 12: no need to sum up to a large stock.
    top = float(safe.max(initial=0.0))
    for k in range(min(int(cap.max(initial=0)), math.ceil(top + 12.0 * math.sqrt(top) + 12.0))):
        total += np.where(k < cap, 1.0 - cdf, 0.0)
        pmf = pmf * safe / (k + 1)
        cdf = cdf + pmf
    out = np.where(exact, np.maximum(total, 0.0), 0.0)
    if not exact.all():  # a season's cumulative demand: sum the pmf around its mean instead
        out[~exact] = _large_mean_sales(lam[~exact], cap[~exact])
    return out


def _large_mean_sales(lam: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """E[min(N, cap)] for means above _POISSON_EXACT_MAX (1-D arrays): P(N > k) is 1 (to
    1e-30) below mean - 12 sd and 0 above mean + 12 sd, so only the window between is summed,
    its pmf started in log space at the window's low end."""
    sd = np.sqrt(lam)
    low = np.maximum(np.floor(lam - 12.0 * sd), 0.0)
    width = int(np.ceil(24.0 * sd.max(initial=0.0))) + 2
    log_start = (low * np.log(lam) - lam
                 - np.asarray([math.lgamma(v + 1.0) for v in low.tolist()]))
    pmf = np.exp(log_start)
    cdf = pmf.copy()
    total = np.minimum(low, cap).astype(np.float64)
    for j in range(width):
        k = low + j
        total += np.where(k < cap, 1.0 - cdf, 0.0)
        pmf = pmf * lam / (k + 1.0)
        cdf = cdf + pmf
    return np.maximum(total, 0.0)


def _series_starts(idx: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Row index where each run of one product on consecutive days starts."""
    if idx.size == 0:
        return np.zeros(0, np.intp)
    breaks = (idx[1:] != idx[:-1]) | (day[1:] != day[:-1] + 1)
    return np.flatnonzero(np.r_[True, breaks])


def historical_reference(gt: GroundTruth) -> np.ndarray:
    """(n_products, n_days + 1) reference price before each day of the history (column t: the
    EWMA of the historical prices of days < t, starting from ref_price)."""
    sc = gt.scenario
    assert sc is not None and sc.history is not None and sc.reference_rate is not None
    rate = sc.reference_rate
    ref = np.empty((gt.n_products, sc.history.shape[1] + 1))
    ref[:, 0] = gt.ref_price
    for t in range(sc.history.shape[1]):
        ref[:, t + 1] = (1.0 - rate) * ref[:, t] + rate * sc.history[:, t]
    return ref


def _reference_rows(gt: GroundTruth, idx: np.ndarray, day: np.ndarray,
                    prices: np.ndarray) -> np.ndarray:
    """The reference price of each row: at a run's first day the historical one (built from the
    historical prices before it), after that rolled forward with the given prices."""
    sc = gt.scenario
    assert sc is not None and sc.reference_rate is not None
    starts = _series_starts(idx, day)
    if np.any((day[starts] < 0) | (day[starts] > historical_reference(gt).shape[1] - 1)):
        raise ValueError("a series starts outside the generated history")
    length = np.diff(np.append(starts, idx.size))
    ref = np.empty(idx.size)
    ref[starts] = historical_reference(gt)[idx[starts], day[starts]]
    for k in range(1, int(length.max(initial=0))):
        rows = starts[length > k] + k
        ref[rows] = (1.0 - sc.reference_rate) * ref[rows - 1] + sc.reference_rate * prices[rows - 1]
    return ref


def _units_at(gt: GroundTruth, idx: ArrayLike, dates: ArrayLike, x: ArrayLike,
              reference: ArrayLike | None = None) -> np.ndarray:
    """Uncapped expected units of single-product demand (any form, holidays, shock; times the
    reference effect when ``reference`` is given); broadcast like :func:`expected_units`."""
    idx, level, e = _scenario_terms(gt, idx, dates)
    price = np.asarray(x, dtype=np.float64)
    if np.any(price <= 0):
        raise ValueError("prices must be > 0")
    form = "loglog" if gt.scenario is None else gt.scenario.demand_form
    units = level * _price_factor(form, price, gt.ref_price[idx], e)
    if reference is not None:
        assert gt.scenario is not None
        units = units * _reference_factor(gt.scenario, price, np.asarray(reference, np.float64))
    return units


def _category_codes(gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """(category code per product, one-hot (n_categories, n_products) matrix)."""
    names, code = np.unique(np.asarray(gt.category, dtype=object), return_inverse=True)
    onehot = np.zeros((len(names), gt.n_products))
    onehot[code, np.arange(gt.n_products)] = 1.0
    return code, onehot


def _mnl_setup(gt: GroundTruth, dates: np.ndarray) -> dict[str, np.ndarray]:
    """Every product's MNL terms on each of ``dates`` (arrays (n_products, n_dates))."""
    sc = gt.scenario
    assert sc is not None and sc.outside_share is not None
    products = np.arange(gt.n_products)[:, None]
    _, level, e = _scenario_terms(gt, products, dates[None, :])
    code, onehot = _category_codes(gt)
    category_level = onehot @ level  # (C, D): every product at ref_price sells its level
    ref_share = level / category_level[code] * (1.0 - sc.outside_share)
    ref = gt.ref_price[:, None]
    slope = e / (ref * (1.0 - ref_share))  # own elasticity e at ref prices
    return {"code": code, "onehot": onehot, "size": category_level / (1.0 - sc.outside_share),
            "alpha": np.log(ref_share / sc.outside_share) + slope * ref, "slope": slope}


def _mnl_units(gt: GroundTruth, terms: dict[str, np.ndarray], prices: np.ndarray) -> np.ndarray:
    """(n_products, n_dates) expected units at (n_products, n_dates) prices."""
    attraction = np.exp(terms["alpha"] - terms["slope"] * prices)  # share / outside share
    inside = terms["onehot"] @ attraction
    return terms["size"][terms["code"]] * attraction / (1.0 + inside[terms["code"]])


def _on_dates(dates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, column = np.unique(np.asarray(dates, dtype="datetime64[D]"), return_inverse=True)
    return unique, column.reshape(-1)


def _demand_rows(gt: GroundTruth, idx: np.ndarray, dates: np.ndarray,
                 prices: np.ndarray) -> np.ndarray:
    """Uncapped expected units of each row (1-D arrays, rows ordered by product then date)."""
    sc = gt.scenario
    if sc is not None and sc.outside_share is not None:
        unique, column = _on_dates(dates)
        terms = _mnl_setup(gt, unique)
        # A product without a row on a date is at its ref_price there.
        grid = np.repeat(gt.ref_price[:, None], unique.size, axis=1)
        grid[idx, column] = prices
        return _mnl_units(gt, terms, grid)[idx, column]
    if sc is not None and sc.reference_rate is not None:
        reference = _reference_rows(gt, idx, _day_index(sc, dates), prices)
        return _units_at(gt, idx, dates, prices, reference)
    return _units_at(gt, idx, dates, prices)


def true_units(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike,
               prices: ArrayLike) -> np.ndarray:
    """True expected units sold of each row at ``prices``: the one scorer of price paths.

    Rows are 1-D and ordered by product, then date (one row per product-day). Substitution
    prices each category-day jointly (a sibling without a row is at its ref_price); reference
    prices roll the reference forward over each product's consecutive days from the
    historical one; the demand shock is the stored one; with stock-outs the result is the
    expected *recorded* sales E[min(demand draw, stock)] (lost sales are lost); with inventory
    the expected sales from each season's stock along the path (what is left at the season's
    end is :func:`true_leftover_value`). Without a scenario this equals :func:`expected_units`.
    """
    idx = np.asarray(product_idx, dtype=np.intp).reshape(-1)
    days = np.asarray(dates, dtype="datetime64[D]").reshape(-1)
    x = np.asarray(prices, dtype=np.float64).reshape(-1)
    if not idx.size == days.size == x.size:
        raise ValueError("product_idx, dates and prices must be one value per row")
    units = _demand_rows(gt, idx, days, x)
    sc = gt.scenario
    if sc is not None and sc.stock is not None:
        units = expected_sales(units, _path_at(sc.stock, idx, _day_index(sc, days), "stock"))
    if sc is not None and sc.season_stock is not None:
        units = _inventory_paths(gt, idx, _day_index(sc, days), units)[0]
    return units


# ----------------------------------------------------------------------------------------------
# Inventory (markdown): one delivery per season, sales capped by what is left


def _season_runs(sc: Scenario, idx: np.ndarray, day: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(row where each run of one product on consecutive days inside one season starts, the
    season of every row)."""
    assert sc.season_start is not None
    season = np.searchsorted(sc.season_start, day, side="right") - 1
    breaks = np.zeros(idx.size, dtype=bool)
    breaks[_series_starts(idx, day)] = True
    breaks[1:] |= season[1:] != season[:-1]
    return np.flatnonzero(breaks), season


def _season_last_day(sc: Scenario, season: np.ndarray) -> np.ndarray:
    assert sc.season_start is not None and sc.inventory_prices is not None
    ends = np.r_[sc.season_start[1:], sc.inventory_prices.shape[1]] - 1
    return ends[season]


def _demand_before_runs(gt: GroundTruth, idx: np.ndarray, day: np.ndarray,
                        starts: np.ndarray, season: np.ndarray) -> np.ndarray:
    """(n_runs,) expected demand of each run's product from its season's start to the day
    before the run, at the historical prices (0 for a run that starts a season)."""
    sc = gt.scenario
    assert sc is not None and sc.season_start is not None and sc.inventory_prices is not None
    first = sc.season_start[season[starts]]
    before = day[starts] - first
    out = np.zeros(starts.size)
    inside = np.flatnonzero(before > 0)
    if inside.size:
        count = before[inside]
        product = np.repeat(idx[starts][inside], count)
        offset = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        past = np.repeat(first[inside], count) + offset
        demand = _units_at(gt, product, sc.start + past, sc.inventory_prices[product, past])
        out[inside] = np.add.reduceat(demand, np.cumsum(count) - count)
    return out


def _inventory_paths(gt: GroundTruth, idx: np.ndarray, day: np.ndarray, units: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expected sales, expected units on hand after the day, whether the row is its
    season's last day) of each row, for uncapped expected demand ``units`` per row
    (:func:`sales_from_stock` on each run of a product's days inside a season, from the
    season's stock less what the history drew from it before the run)."""
    sc = gt.scenario
    assert sc is not None and sc.season_stock is not None
    starts, season = _season_runs(sc, idx, day)
    before = _demand_before_runs(gt, idx, day, starts, season)
    sales, left = sales_from_stock(units, starts, sc.season_stock[idx[starts], season[starts]],
                                   before)
    return sales, left, day == _season_last_day(sc, season)


def sales_from_stock(units: np.ndarray, run_start: np.ndarray, stock: np.ndarray,
                     drawn_before: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(expected sales, expected units left after the day) of each row of runs that sell
    from one stock each, along a fixed price path.

    A fixed path does not look at the stock, so a run's cumulative demand C_t is Poisson
    with the summed means, its sales to date min(C_t, S) and a day's expected sales
    E[min(C_t, S)] - E[min(C_t-1, S)]: exact, with no stock grid.

    Args:
        units: (n,) uncapped expected demand of each row; runs are consecutive rows.
        run_start: (n_runs,) the row where each run starts (the first 0, ascending).
        stock: (n_runs,) units on hand when the run's demand began (integers).
        drawn_before: (n_runs,) expected demand drawn from that stock before the run's
            first row (None: 0).
    """
    length = np.diff(np.append(run_start, units.size))
    run = np.repeat(np.arange(run_start.size), length)
    total = np.cumsum(units)
    cumulative = total - np.repeat(total[run_start] - units[run_start], length)
    if drawn_before is not None:
        cumulative = cumulative + drawn_before[run]
    cap = np.asarray(stock, dtype=np.int64)[run]
    sold = expected_sales(cumulative, cap)
    sales = sold - expected_sales(np.maximum(cumulative - units, 0.0), cap)
    return np.maximum(sales, 0.0), cap - sold


def true_leftover_value(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike,
                        prices: ArrayLike) -> np.ndarray:
    """(n,) what each row adds to profit beyond (price - unit_cost) * true_units: on a
    season's last day (inventory) the units expected to be left, times (salvage - unit_cost)
    (bought at cost, sold off at the salvage value); 0 on every other row and market.

    Rows as in :func:`true_units` (1-D, ordered by product, then date)."""
    idx = np.asarray(product_idx, dtype=np.intp).reshape(-1)
    days = np.asarray(dates, dtype="datetime64[D]").reshape(-1)
    x = np.asarray(prices, dtype=np.float64).reshape(-1)
    sc = gt.scenario
    if sc is None or sc.season_start is None or sc.salvage is None:
        return np.zeros(idx.size)
    _, left, last = _inventory_paths(gt, idx, _day_index(sc, days), _units_at(gt, idx, days, x))
    return np.where(last, (sc.salvage[idx] - gt.unit_cost[idx]) * left, 0.0)


STOCK_DP_LEVELS = 41
"""Price levels (between min and max price) of the inventory oracle's DP."""
STOCK_DP_POINTS = 101
"""Stock grid points of the inventory DP (every unit when the stock is at most 100)."""
_DP_RUNS_PER_BLOCK = 16  # (runs, stock points, demand outcomes) arrays of about 8 MB


def _poisson_table(lam: np.ndarray, n_max: int) -> np.ndarray:
    """(..., n_max + 1): P(N = n) for n < n_max and P(N >= n_max) in the last column."""
    n = np.arange(n_max)
    log_factorial = np.cumsum(np.r_[0.0, np.log(np.arange(1, max(n_max, 1)))])[:n_max]
    lam = np.asarray(lam, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_power = np.where(n == 0, 0.0, n * np.log(lam))
    pmf = np.exp(log_power - lam - log_factorial)
    tail = np.clip(1.0 - pmf.sum(axis=-1, keepdims=True), 0.0, 1.0)
    return np.concatenate([pmf, tail], axis=-1)


def stock_dp(units: np.ndarray, prices: np.ndarray, cost: np.ndarray, terminal: np.ndarray,
             start_stock: np.ndarray, length: np.ndarray, *, points: int = STOCK_DP_POINTS,
             max_daily_change: float | None = None,
             prev_price: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best pricing of runs of days that sell from one stock: backward induction over
    (day, units on hand on a grid[, yesterday's level]) with Poisson demand.

    ``V_t(s) = max_k (x_k - c) E[min(N_tk, s)] + E[V_t+1(max(s - N_tk, 0))]`` and
    ``V_T(s) = terminal * s``, the value between stock grid points interpolated linearly (a
    grid of every unit, exact, when the start stock is below ``points``). With
    ``max_daily_change`` the state also holds yesterday's level and only the levels
    ``pricing.feasible_mask`` allows from it follow (day one: from ``prev_price``, NaN: any).

    Args:
        units: (R, T, K) expected demand (Poisson mean) of run r's day t at level k.
        prices: (R, K) the levels' prices; cost, terminal, start_stock, length: (R,)
            (terminal: value per unit left after the run's last day; length: its days).

    Returns:
        (levels (R, T): a price path, each day the level whose value is best on average over
        the distribution of the units the path has left; value (R,): the expected profit of
        the optimal stock-aware policy from ``start_stock``, which a fixed path can approach
        but not exceed).
    """
    runs, horizon, levels = units.shape
    chosen = np.zeros((runs, horizon), dtype=np.int64)
    value = np.zeros(runs)
    for lo in range(0, runs, _DP_RUNS_PER_BLOCK):
        block = slice(lo, min(lo + _DP_RUNS_PER_BLOCK, runs))
        chosen[block], value[block] = _stock_dp_block(
            units[block], prices[block], cost[block], terminal[block], start_stock[block],
            length[block], points, max_daily_change,
            None if prev_price is None else prev_price[block])
    return chosen, value


def _stock_dp_block(units: np.ndarray, prices: np.ndarray, cost: np.ndarray,
                    terminal: np.ndarray, start_stock: np.ndarray, length: np.ndarray,
                    points: int, max_daily_change: float | None,
                    prev_price: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    from pricing_cli.pricing import feasible_mask

    runs, horizon, levels = units.shape
    top = np.ceil(np.maximum(start_stock, 0.0))
    n_points = max(2, min(points, int(top.max(initial=0.0)) + 1))
    step = np.maximum(top / (n_points - 1), 1.0)  # unit steps while the stock is small
    grid = step[:, None] * np.arange(n_points)  # (R, G)
    lam_max = float(units.max(initial=0.0))
    # Outcomes 0..n_max, the last holding N >= n_max: exact once n_max exceeds every stock,
    # else its mass is below 1e-20.
    n_max = int(min(grid.max() + 1.0, math.ceil(lam_max + 12.0 * math.sqrt(lam_max) + 12.0)))
    outcome = np.arange(n_max + 1, dtype=np.float64)
    margin = prices - cost[:, None]  # (R, K)
    limited = max_daily_change is not None
    limit = 0.0 if max_daily_change is None else float(max_daily_change)
    if limited:
        move = feasible_mask(np.broadcast_to(prices[:, None, :], (runs, levels, levels)),
                             prices, limit)[0].astype(bool)  # [r, from, to]

    # On the grid, stock s_g - n lies (n / step) grid points below s_g: each outcome's
    # probability splits between two offsets m (linear interpolation), so E[V(s_g - N)] is
    # a sum over G + 1 offsets (the last: nothing left) instead of over every outcome.
    shift = outcome[None, :] / step[:, None]  # (R, N)
    low = np.minimum(np.floor(shift).astype(np.intp), n_points)
    high = np.minimum(low + 1, n_points)
    upper = shift - np.floor(shift)
    offsets = n_points + 1
    run_at = np.arange(runs)[:, None, None] * levels + np.arange(levels)[None, :, None]
    toeplitz = np.maximum(np.arange(n_points)[:, None] - np.arange(offsets)[None, :], 0)

    def q_grid(t: int, ahead: np.ndarray) -> np.ndarray:
        """(R, G, K) :func:`q_values` at every grid stock."""
        table = _poisson_table(units[:, t, :], n_max)  # (R, K, N)
        cdf = np.cumsum(table, axis=2)
        partial = np.cumsum(table * outcome, axis=2)  # E[N; N <= n]
        below = np.ceil(grid - 1e-9).astype(np.intp) - 1  # largest outcome under each stock
        at = np.broadcast_to(np.clip(below, 0, n_max)[:, None, :], (runs, levels, n_points))
        sales = np.where(below[:, None, :] >= 0,
                         np.take_along_axis(partial, at, axis=2)
                         + grid[:, None, :] * (1.0 - np.take_along_axis(cdf, at, axis=2)),
                         0.0).transpose(0, 2, 1)  # (R, G, K)
        weight = (np.bincount((run_at * offsets + low[:, None, :]).ravel(),
                              (table * (1.0 - upper[:, None, :])).ravel(),
                              minlength=runs * levels * offsets)
                  + np.bincount((run_at * offsets + high[:, None, :]).ravel(),
                                (table * upper[:, None, :]).ravel(),
                                minlength=runs * levels * offsets)
                  ).reshape(runs, levels, offsets)
        later = ahead[:, toeplitz, :]  # (R, G, M, J): V(max(g - m, 0))
        if later.shape[3] == 1:
            expected = later[..., 0] @ np.ascontiguousarray(weight.transpose(0, 2, 1))
        else:
            expected = np.einsum("rgmk,rkm->rgk", later, weight)
        return margin[:, None, :] * sales + expected

    depth = levels if limited else 1
    end_value = np.broadcast_to((terminal[:, None] * grid)[:, :, None],
                                (runs, n_points, depth))
    values = end_value
    q_table = np.empty((horizon, runs, n_points, levels))
    for t in range(horizon - 1, -1, -1):
        q = q_grid(t, values)  # (R, G, K)
        q_table[t] = q
        if limited:
            best = np.where(move[:, None, :, :], q[:, :, None, :], -np.inf).max(axis=3)
        else:
            best = q.max(axis=2)[:, :, None]
        values = np.where((length > t)[:, None, None], best, end_value)

    # The price path: each day the level with the best value averaged over the distribution
    # of the units left along the path so far (the path does not look at the stock, so its
    # cumulative demand C is Poisson and the units left are max(S - C, 0)).
    chosen = np.zeros((runs, horizon), dtype=np.int64)
    stock = np.rint(np.maximum(start_stock, 0.0)).astype(np.int64)
    count = np.arange(int(stock.max(initial=0)) + 1)
    log_factorial = np.cumsum(np.r_[0.0, np.log(np.maximum(count[1:], 1))])
    drawn = np.zeros(runs)
    value = np.zeros(runs)
    previous = np.zeros(runs, dtype=np.int64)
    row_at = np.arange(runs)
    for t in range(horizon):
        with np.errstate(divide="ignore", invalid="ignore"):
            power = np.where(count == 0, 0.0, count * np.log(drawn[:, None]))
        pmf = np.where(count < stock[:, None], np.exp(power - drawn[:, None] - log_factorial),
                       0.0)
        mass = np.concatenate([pmf, np.clip(1.0 - pmf.sum(axis=1, keepdims=True), 0.0, 1.0)],
                              axis=1)  # C = j for j < S, then C >= S (nothing left)
        left = np.concatenate([np.maximum(stock[:, None] - count, 0), np.zeros((runs, 1))],
                              axis=1) / step[:, None]
        low_point = np.minimum(np.floor(left).astype(np.intp), n_points - 2)
        frac = np.clip(left - low_point, 0.0, 1.0)
        weight = (np.bincount((row_at[:, None] * n_points + low_point).ravel(),
                              (mass * (1.0 - frac)).ravel(), minlength=runs * n_points)
                  + np.bincount((row_at[:, None] * n_points + low_point + 1).ravel(),
                                (mass * frac).ravel(), minlength=runs * n_points)
                  ).reshape(runs, n_points)
        q = np.einsum("rg,rgk->rk", weight, q_table[t])
        allowed = np.ones(q.shape, dtype=bool)
        if limited and t == 0 and prev_price is not None:
            known = np.isfinite(prev_price)
            if known.any():
                allowed[known] = feasible_mask(prices[known], prev_price[known],
                                               limit)[0].astype(bool)
        elif limited and t > 0:
            allowed = move[row_at, previous]
        pick = np.where(allowed, q, -np.inf).argmax(axis=1)
        if t == 0:
            value = q[row_at, pick]
        active = length > t
        pick = np.where(active, pick, previous)
        chosen[:, t] = pick
        drawn = np.where(active, drawn + units[row_at, t, pick], drawn)
        previous = pick
    return chosen, value


def inventory_optimum(gt: GroundTruth, idx: np.ndarray, days: np.ndarray,
                      max_daily_change: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(price per row, DP value per run) of the true inventory optimum: :func:`stock_dp` on
    each run of a product's days inside one season, on STOCK_DP_LEVELS prices in
    [min_price, max_price], from the units the history left on the run's first day (in
    expectation; the whole season stock for a run that starts the season, where the DP is
    exact), the leftover worth (salvage - unit_cost) per unit when the run reaches the
    season's end. With ``max_daily_change``: within the limit, day one from the last
    historical price."""
    sc = gt.scenario
    assert sc is not None and sc.season_stock is not None and sc.inventory_prices is not None
    assert sc.salvage is not None
    day = _day_index(sc, days)
    starts, season = _season_runs(sc, idx, day)
    length = np.diff(np.append(starts, idx.size))
    run = np.repeat(np.arange(starts.size), length)
    offset = np.arange(idx.size) - starts[run]
    product = idx[starts]
    lo, hi = gt.min_price[product], gt.max_price[product]
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, STOCK_DP_LEVELS)[None, :]
    units = np.zeros((starts.size, int(length.max(initial=1)), STOCK_DP_LEVELS))
    units[run, offset] = _units_at(gt, idx[:, None], days[:, None], grid[run])
    stock0 = sc.season_stock[product, season[starts]]
    before = _demand_before_runs(gt, idx, day, starts, season)
    start_stock = stock0 - expected_sales(before, stock0)
    ends = np.append(starts[1:], idx.size) - 1
    reaches_end = day[ends] == _season_last_day(sc, season[starts])
    terminal = np.where(reaches_end, sc.salvage[product] - gt.unit_cost[product], 0.0)
    prev = None
    if max_daily_change is not None:
        first = day[starts] - 1
        prev = np.where(first >= 0, sc.inventory_prices[product, np.maximum(first, 0)], np.nan)
    chosen, value = stock_dp(units, grid, gt.unit_cost[product], terminal, start_stock, length,
                             max_daily_change=max_daily_change, prev_price=prev)
    return grid[run, chosen[run, offset]], value


def _golden_max(profit: Any, lo: np.ndarray, hi: np.ndarray, n_grid: int = 16,
                iterations: int = 40) -> np.ndarray:
    """Per row, the x in [lo, hi] maximizing ``profit(x)`` ((rows, k) -> (rows, k)): the best of
    an n_grid scan, refined by golden section between its neighbours (profit unimodal). The
    bracket shrinks to 0.618^40 (1e-8) of two grid steps; one new evaluation per iteration."""
    steps = np.linspace(0.0, 1.0, n_grid)
    grid = lo[:, None] + (hi - lo)[:, None] * steps[None, :]
    best = np.argmax(profit(grid), axis=1)
    rows = np.arange(lo.size)
    a = grid[rows, np.maximum(best - 1, 0)]
    b = grid[rows, np.minimum(best + 1, n_grid - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    left, right = b - ratio * (b - a), a + ratio * (b - a)
    values = profit(np.stack([left, right], axis=1))
    f_left, f_right = values[:, 0], values[:, 1]
    for _ in range(iterations):
        keep = f_left >= f_right  # the maximum lies in [a, right], else in [left, b]
        b = np.where(keep, right, b)
        a = np.where(keep, a, left)
        # The surviving inner point is reused (the golden ratio puts it where the next inner
        # point must be); one new evaluation per row.
        kept_x, kept_f = np.where(keep, left, right), np.where(keep, f_left, f_right)
        new = np.where(keep, b - ratio * (b - a), a + ratio * (b - a))
        f_new = profit(new[:, None])[:, 0]
        left, f_left = np.where(keep, new, kept_x), np.where(keep, f_new, kept_f)
        right, f_right = np.where(keep, kept_x, new), np.where(keep, kept_f, f_new)
    candidates = np.stack([grid[rows, best], 0.5 * (a + b)], axis=1)
    pick = np.argmax(profit(candidates), axis=1)
    return candidates[rows, pick]


def _mnl_optimum(gt: GroundTruth, idx: np.ndarray, dates: np.ndarray) -> np.ndarray:
    """The joint optimum of each category-day's rows (the others at ref_price).

    For an MNL the first-order condition of product j is m_j = 1/b_j + R, with m the margin,
    b the price slope and R the category's profit per customer; with price bounds the KKT
    point is m_j = clip(1/b_j + R, lo_j, hi_j). R solves R (1 + F) = sum_j A_j (m_j(R) - R),
    A_j = exp(alpha_j - b_j (c_j + m_j)) and F the fixed siblings' attraction; the right side
    falls in R, so the root is unique and bisection finds it.
    """
    unique, column = _on_dates(dates)
    terms = _mnl_setup(gt, unique)
    code, onehot = terms["code"], terms["onehot"]
    present = np.zeros((gt.n_products, unique.size), dtype=bool)
    present[idx, column] = True
    cost = gt.unit_cost[:, None]
    low, high = gt.min_price[:, None] - cost, gt.max_price[:, None] - cost
    alpha, slope = terms["alpha"], terms["slope"]
    fixed = onehot @ np.where(present, 0.0, np.exp(alpha - slope * gt.ref_price[:, None]))

    def margins(r: np.ndarray) -> np.ndarray:
        return np.clip(1.0 / slope + r[code], low, high)

    def right_side(r: np.ndarray) -> np.ndarray:
        m = margins(r)
        term = np.where(present, np.exp(alpha - slope * (cost + m)) * (m - r[code]), 0.0)
        return (onehot @ term) / (1.0 + fixed)

    lo = np.zeros(fixed.shape)
    hi = np.maximum(right_side(lo), 0.0)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        above = mid > right_side(mid)
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return (cost + margins(0.5 * (lo + hi)))[idx, column]


def _interp_value(value: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  reference: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``value`` (s, K), given on each series' uniform grid of K
    references from lo to hi, at ``reference`` (s, ...), clamped to the grid."""
    K = value.shape[1]
    flat = reference.reshape(reference.shape[0], -1)
    pos = np.clip((flat - lo[:, None]) / (hi - lo)[:, None] * (K - 1), 0.0, K - 1.0)
    left = np.minimum(np.floor(pos).astype(np.intp), K - 2)
    frac = pos - left
    below = np.take_along_axis(value, left, axis=1)
    above = np.take_along_axis(value, left + 1, axis=1)
    return (below * (1.0 - frac) + above * frac).reshape(reference.shape)


REFERENCE_DP_LEVELS = 121
"""Price and reference grid points of the reference-price oracle's DP (between min and max)."""
REFERENCE_DP_LIMITED_LEVELS = 41
"""The same with a daily-change limit, whose state also holds yesterday's price level."""
_SERIES_PER_BLOCK = 128  # DP arrays are (series, 121, 121): about 15 MB each per block
_ROWS_PER_BLOCK = 8192  # per-row scans under a stock cap: (rows, 64) arrays of 4 MB


def _in_blocks(solve: Any, idx: np.ndarray, dates: np.ndarray, starts: np.ndarray,
               per_block: int) -> np.ndarray:
    """``solve(idx, dates)`` on consecutive blocks of ``per_block`` runs (rows split at
    ``starts``), so memory stays bounded on the full preset."""
    cuts = [*starts[::per_block].tolist(), idx.size]
    out = np.empty(idx.size)
    for lo, hi in itertools.pairwise(cuts):
        out[lo:hi] = solve(idx[lo:hi], dates[lo:hi])
    return out


def _reference_optimum(gt: GroundTruth, idx: np.ndarray, dates: np.ndarray,
                       max_daily_change: float | None = None) -> np.ndarray:
    """:func:`_reference_block_optimum` on blocks of _SERIES_PER_BLOCK runs."""
    assert gt.scenario is not None
    starts = _series_starts(idx, _day_index(gt.scenario, dates))
    levels = REFERENCE_DP_LEVELS if max_daily_change is None else REFERENCE_DP_LIMITED_LEVELS
    return _in_blocks(lambda i, d: _reference_block_optimum(gt, i, d, levels, max_daily_change),
                      idx, dates, starts, _SERIES_PER_BLOCK)


def _reference_block_optimum(gt: GroundTruth, idx: np.ndarray, dates: np.ndarray,
                             levels: int, max_daily_change: float | None) -> np.ndarray:
    """The profit-maximizing price path of each product's run of days (reference prices).

    Backward induction over (day, reference) on a grid of ``levels`` references and prices in
    [min_price, max_price], the value between grid references interpolated linearly; then a
    forward pass from the true starting reference that picks, each day, the grid price with
    the best reward + interpolated value of the exact next reference. With
    ``max_daily_change`` the state also holds yesterday's price level, and only the levels
    ``pricing.feasible_mask`` allows from it may follow (day one: from the last historical
    price).
    """
    from pricing_cli.pricing import feasible_mask

    sc = gt.scenario
    assert sc is not None and sc.reference_rate is not None and sc.history is not None
    rate = sc.reference_rate
    day = _day_index(sc, dates)
    starts = _series_starts(idx, day)
    length = np.diff(np.append(starts, idx.size))
    n_series, horizon = starts.size, int(length.max(initial=0))
    product = idx[starts]
    lo, hi = gt.min_price[product], gt.max_price[product]
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, levels)[None, :]
    cost = gt.unit_cost[product]
    limited = max_daily_change is not None
    limit = 0.0 if max_daily_change is None else float(max_daily_change)
    # value[k, s, j, r]: the best profit from the k-th day on, yesterday at level j (limited
    # only; else j has one value) and the reference at grid level r.
    value = np.zeros((horizon + 1, n_series, levels if limited else 1, levels))
    if limited:
        move = feasible_mask(np.broadcast_to(grid[:, None, :], (n_series, levels, levels)),
                             grid, limit)[0].astype(bool)  # [s, from, to]

    def reward(series: np.ndarray, k: int, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(reward, next reference) of every grid price against references (s, R)."""
        rows = starts[series] + k
        x = grid[series][:, None, :]
        r = reference[:, :, None]
        shape = (-1, 1, 1)
        units = _units_at(gt, idx[rows].reshape(shape), dates[rows].reshape(shape), x, r)
        return (x - cost[series].reshape(shape)) * units, (1.0 - rate) * r + rate * x

    def later(series: np.ndarray, k: int, next_ref: np.ndarray) -> np.ndarray:
        """Value from day k + 1 on after choosing each grid price (s, R, K)."""
        ahead = value[k + 1, series]
        if not limited:
            return _interp_value(ahead[:, 0], lo[series], hi[series], next_ref)
        out = np.empty_like(next_ref)
        for level in range(levels):  # choosing level x makes it tomorrow's previous price
            out[:, :, level] = _interp_value(ahead[:, level], lo[series], hi[series],
                                             next_ref[:, :, level])
        return out

    for k in range(horizon - 1, -1, -1):
        series = np.flatnonzero(length > k)
        gain, next_ref = reward(series, k, grid[series])
        total = gain + later(series, k, next_ref)  # (s, R, K)
        if limited:
            value[k, series] = np.where(move[series][:, :, None, :], total[:, None, :, :],
                                        -np.inf).max(axis=-1)
        else:
            value[k, series, 0] = total.max(axis=2)
    prices = np.empty(idx.size)
    reference = historical_reference(gt)[product, day[starts]]
    before = day[starts] - 1
    previous = np.where(before >= 0, sc.history[product, np.maximum(before, 0)], np.nan)
    for k in range(horizon):
        series = np.flatnonzero(length > k)
        gain, next_ref = reward(series, k, reference[series][:, None])
        total = (gain + later(series, k, next_ref))[:, 0, :]
        if limited:
            known = np.isfinite(previous[series])
            allowed = np.ones(total.shape, dtype=bool)
            if known.any():
                allowed[known] = feasible_mask(grid[series[known]], previous[series[known]],
                                               limit)[0].astype(bool)
            total = np.where(allowed, total, -np.inf)
        choice = np.argmax(total, axis=1)
        prices[starts[series] + k] = grid[series, choice]
        previous[series] = grid[series, choice]
        reference[series] = next_ref[np.arange(series.size), 0, choice]
    return prices


def true_optimum(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike,
                 max_daily_change: float | None = None) -> np.ndarray:
    """The true profit-maximizing price of each row (1-D, ordered by product then date), in
    [min_price, max_price]: the oracle that evaluate scores every policy against (with no
    daily-change limit: ``max_daily_change`` None).

    Memoryless markets: each product-day's optimum (closed form for loglog and linear, a scan
    plus golden section for logit and under a stock cap, given the day's stock). Substitution:
    the joint optimum of each category-day. Reference prices: the DP optimum of each
    product's run of days (:func:`_reference_optimum`). Inventory: the DP over (day, stock)
    of each product's season (:func:`inventory_optimum`). Both optionally within a relative
    ``max_daily_change`` (ValueError for any other market).
    """
    idx = np.asarray(product_idx, dtype=np.intp).reshape(-1)
    days = np.asarray(dates, dtype="datetime64[D]").reshape(-1)
    sc = gt.scenario
    if sc is not None and sc.season_stock is not None:
        return inventory_optimum(gt, idx, days, max_daily_change)[0]
    if max_daily_change is not None:
        if sc is None or sc.reference_rate is None:
            raise ValueError("the daily-change limit is an option of the reference-price and "
                             "inventory DPs only")
        return _reference_optimum(gt, idx, days, max_daily_change)
    if sc is None or (sc.demand_form in ("loglog", "linear") and sc.stock is None
                      and sc.outside_share is None and sc.reference_rate is None):
        return np.asarray(optimal_price(gt, idx, days), dtype=np.float64)
    if sc.outside_share is not None:
        return _mnl_optimum(gt, idx, days)
    if sc.reference_rate is not None:
        return _reference_optimum(gt, idx, days)
    return _in_blocks(lambda i, d: _day_optimum(gt, i, d), idx, days,
                      np.arange(0, idx.size), _ROWS_PER_BLOCK)


def _day_optimum(gt: GroundTruth, idx: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Each row's profit-maximizing price of a memoryless market (given the day's stock)."""
    sc = gt.scenario
    assert sc is not None
    cost = gt.unit_cost[idx][:, None]
    stock = None if sc.stock is None else _path_at(sc.stock, idx, _day_index(sc, days),
                                                   "stock")[:, None]

    def profit(x: np.ndarray) -> np.ndarray:
        units = _units_at(gt, idx[:, None], days[:, None], x)
        return (x - cost) * (units if stock is None else expected_sales(units, stock))

    return _golden_max(profit, gt.min_price[idx], gt.max_price[idx])
