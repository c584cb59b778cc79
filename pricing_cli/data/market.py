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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pricing_cli.errors import DataError

FORMULA = "constant-elasticity-seasonal"
"""Name of the demand formula written to ground_truth.json; load refuses any other."""
FORMULA_VERSION = 1
"""Version of the formula and of the ground_truth.json layout."""
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
        return {
            "formula": FORMULA,
            "formula_version": FORMULA_VERSION,
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
        if payload.get("formula") != FORMULA or payload.get("formula_version") != FORMULA_VERSION:
            raise DataError(
                f"{source}: formula {payload.get('formula')!r} version "
                f"{payload.get('formula_version')!r} is not {FORMULA!r} version {FORMULA_VERSION}",
                hint)
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
        return cls(product_ids=tuple(ids), category=tuple(categories), **arrays,
                   elasticity_season=e_season, elasticity_weekend=e_weekend,
                   dow_effect=dow_effect, seed=None if seed is None else int(seed),
                   meta=dict(payload.get("meta") or {}))


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
    """True own-price elasticity e_p(t) (a positive number) of each product-day."""
    return _demand_terms(gt, product_idx, dates)[2]


def expected_units(gt: GroundTruth, product_idx: ArrayLike, dates: ArrayLike,
                   prices: ArrayLike) -> np.ndarray:
    """Expected daily units (the Poisson mean) of product-days at ``prices`` (all > 0)."""
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
    optimum. For e <= 1 profit rises for ever, so the optimum is max_price.
    """
    idx, _, e = _demand_terms(gt, product_idx, dates)
    cost = gt.unit_cost[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        unconstrained = np.where(e > 1.0, cost * e / (e - 1.0), np.inf)
    return np.clip(unconstrained, gt.min_price[idx], gt.max_price[idx])
