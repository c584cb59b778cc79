"""Small synthetic meta frames (the processed meta contract) with a known demand, for the
demand-model tests: each price-response shape, categories, events, confounded prices."""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import polars as pl

DOW = np.array([0.0, 0.05, 0.0, 0.1, 0.2, 0.35, 0.3])  # Monday first
LOGIT_MIDDLE = 1.1
MULTIPLIERS = np.round(np.arange(0.7, 1.301, 0.05), 2)  # of the list price


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-t))


def true_response(form: str, r: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Units at relative price r (price / list price) as a share of units at the list price.

    loglog: r ** -slope; linear: max(1 - slope (r - 1), 0) (choke at 1 + 1/slope); logit:
    σ(slope (LOGIT_MIDDLE - r)) / σ(slope (LOGIT_MIDDLE - 1)), the curve's middle a little
    above the list price (so its S shape shows within the prices charged).
    """
    if form == "loglog":
        return r ** -slope
    if form == "linear":
        return np.maximum(1.0 - slope * (r - 1.0), 0.0)
    if form == "logit":
        return _sigmoid(slope * (LOGIT_MIDDLE - r)) / _sigmoid(slope * (LOGIT_MIDDLE - 1.0))
    raise ValueError(form)


def true_elasticity(form: str, r: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """-d log units / d log price of :func:`true_response` at r."""
    if form == "loglog":
        return np.asarray(slope, dtype=np.float64) * np.ones_like(r)
    if form == "linear":
        return slope * r / (1.0 - slope * (r - 1.0))
    return slope * r * (1.0 - _sigmoid(slope * (LOGIT_MIDDLE - r)))


def synthetic_meta(form: str, *, n_products: int = 12, n_days: int = 240, seed: int = 0,
                   slope: Any = None, base_units: tuple[float, float] = (30.0, 80.0),
                   n_categories: int = 3, start: date = date(2023, 1, 2),
                   shock_rho: float = 0.0, shock_sd: float = 0.0, price_reaction: float = 0.0,
                   event: tuple[str, str] | None = None, event_level: float = 0.0,
                   event_elasticity: float = 0.0, stock: tuple[float, float] | None = None
                   ) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A train-only meta frame: every product's price is its list price times a multiplier in
    0.7..1.3 redrawn on ~40% of days (exogenous), units ~ Poisson(base * dow * response).

    Confounded prices: with shock_sd > 0 demand carries an unobserved AR(1) shock u (log
    scale, u_t = shock_rho u_t-1 + N(0, shock_sd)); the pricer saw yesterday's demand and
    multiplies the price by exp(price_reaction * u_t-1): dearer after strong days.

    An event window (MM-DD, MM-DD; loglog only) adds event_level to log demand and
    event_elasticity to the elasticity on its days.

    Stock-outs: with ``stock`` = (lo, hi), each day's stock is floor(base * uniform(lo, hi))
    (lo == hi: the same every day) and the recorded units are min(demand, stock), with the
    stock in column ``on_hand``. Cheap days sell out more often.

    Returns:
        (meta with product_index, product_id, date, split, price, units, unit_cost,
        min_price, max_price, ref_price, category; truth: list_price, slope, base).
    """
    rng = np.random.default_rng(seed)
    list_price = rng.uniform(5.0, 50.0, n_products)
    default = {"loglog": (1.5, 3.0), "linear": (1.2, 2.2), "logit": (6.0, 9.0)}[form]
    slope = (rng.uniform(*default, n_products) if slope is None
             else np.broadcast_to(np.asarray(slope, dtype=np.float64), (n_products,)))
    base = rng.uniform(*base_units, n_products)
    dates = np.datetime64(start, "D") + np.arange(n_days)
    dow = (dates.astype(np.int64) + 3) % 7
    frames = []
    for p in range(n_products):
        level = np.empty(n_days, dtype=np.int64)
        level[0] = rng.integers(len(MULTIPLIERS))
        for t in range(1, n_days):
            level[t] = rng.integers(len(MULTIPLIERS)) if rng.random() < 0.4 else level[t - 1]
        shock = np.zeros(n_days)
        noise = rng.normal(0.0, shock_sd, n_days) if shock_sd > 0 else np.zeros(n_days)
        for t in range(1, n_days):
            shock[t] = shock_rho * shock[t - 1] + noise[t]
        seen = np.concatenate([[0.0], shock[:-1]])
        r = MULTIPLIERS[level] * np.exp(price_reaction * seen)
        if event is not None:
            inside = np.array([event[0] <= str(d)[5:] <= event[1] for d in dates])
            e_day = slope[p] + event_elasticity * inside
            lam = base[p] * np.exp(DOW[dow] + shock + event_level * inside) * r ** -e_day
        else:
            lam = base[p] * np.exp(DOW[dow] + shock) * true_response(form, r, slope[p])
        price = np.round(list_price[p] * r, 2)
        units = rng.poisson(lam).astype(np.float64)
        on_hand = np.full(n_days, np.nan)
        if stock is not None:
            on_hand = np.floor(base[p] * rng.uniform(stock[0], stock[1], n_days))
            units = np.minimum(units, on_hand)
        frames.append(pl.DataFrame({
            "product_index": pl.Series([p] * n_days, dtype=pl.Int32),
            "product_id": [f"P{p:03d}"] * n_days, "date": dates, "split": ["train"] * n_days,
            "price": price, "units": units, "on_hand": on_hand,
            "unit_cost": [0.5 * list_price[p]] * n_days,
            "min_price": [0.6 * list_price[p]] * n_days,
            "max_price": [1.6 * list_price[p]] * n_days,
            "ref_price": price, "category": [f"c{p % n_categories}"] * n_days}))
    meta = pl.concat(frames)
    return (meta if stock is not None else meta.drop("on_hand"),
            {"list_price": list_price, "slope": slope, "base": base})


def substitutes_meta(cross_price: float, *, n_categories: int = 3, per_category: int = 4,
                     n_days: int = 240, seed: int = 5, elasticity: float = 2.5
                     ) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Categories of substitutes: log units = log base + dow - elasticity log r_p +
    cross_price * (mean log r of the category's other products that day), r = price / list
    price in 0.7..1.3, each product's multiplier redrawn on ~40% of days independently."""
    rng = np.random.default_rng(seed)
    n = n_categories * per_category
    list_price = rng.uniform(5.0, 50.0, n)
    base = rng.uniform(30.0, 80.0, n)
    dates = np.datetime64("2023-01-02", "D") + np.arange(n_days)
    dow = (dates.astype(np.int64) + 3) % 7
    level = np.empty((n, n_days), dtype=np.int64)
    level[:, 0] = rng.integers(len(MULTIPLIERS), size=n)
    for t in range(1, n_days):
        redraw = rng.random(n) < 0.4
        level[:, t] = np.where(redraw, rng.integers(len(MULTIPLIERS), size=n), level[:, t - 1])
    log_r = np.log(MULTIPLIERS[level])
    category = np.arange(n) // per_category
    frames = []
    for p in range(n):
        siblings = (category == category[p]) & (np.arange(n) != p)
        index = log_r[siblings].mean(axis=0)
        lam = base[p] * np.exp(DOW[dow] - elasticity * log_r[p] + cross_price * index)
        price = np.round(list_price[p] * np.exp(log_r[p]), 2)
        frames.append(pl.DataFrame({
            "product_index": pl.Series([p] * n_days, dtype=pl.Int32),
            "product_id": [f"P{p:03d}"] * n_days, "date": dates, "split": ["train"] * n_days,
            "price": price, "units": rng.poisson(lam).astype(np.float64),
            "category": [f"c{category[p]}"] * n_days}))
    return pl.concat(frames), {"list_price": list_price, "base": base}


def reference_meta(*, n_products: int = 12, n_days: int = 300, seed: int = 3,
                   elasticity: float = 2.0, loss: float = 2.5, gain: float = 1.0,
                   rate: float = 0.1, promo_every: int = 20, base_units: float = 40.0
                   ) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Loglog demand with a reference-price effect: the reference R is the EWMA (``rate``) of
    the product's own past prices, from its first price; log units = log base + dow −
    elasticity log(p / list) − loss max(g, 0) − gain min(g, 0), g = log(p / R). Prices sit at
    the list price times a multiplier in 0.9..1.1 redrawn on ~10% of days, with 5-day
    promotions of 20-30% off every ~``promo_every`` days (the spikes a memoryless fit reads
    as elasticity)."""
    rng = np.random.default_rng(seed)
    list_price = rng.uniform(5.0, 50.0, n_products)
    dates = np.datetime64("2023-01-02", "D") + np.arange(n_days)
    dow = (dates.astype(np.int64) + 3) % 7
    frames = []
    for p in range(n_products):
        r = np.empty(n_days)
        level, promo_left, discount = 1.0, 0, 0.0
        for t in range(n_days):
            if rng.random() < 0.1:
                level = float(rng.choice([0.9, 0.95, 1.0, 1.05, 1.1]))
            if promo_left == 0 and rng.random() < 1.0 / promo_every:
                promo_left, discount = 5, float(rng.uniform(0.2, 0.3))
            r[t] = level * (1.0 - discount) if promo_left > 0 else level
            promo_left = max(promo_left - 1, 0)
        price = np.round(list_price[p] * r, 2)
        ref = np.empty(n_days)
        ref[0] = price[0]
        for t in range(1, n_days):
            ref[t] = (1.0 - rate) * ref[t - 1] + rate * price[t - 1]
        gap = np.log(price / ref)
        lam = base_units * np.exp(DOW[dow] - elasticity * np.log(price / list_price[p])
                                  - loss * np.maximum(gap, 0.0) - gain * np.minimum(gap, 0.0))
        units = rng.poisson(lam).astype(np.float64)
        frames.append(pl.DataFrame({
            "product_index": pl.Series([p] * n_days, dtype=pl.Int32),
            "product_id": [f"P{p:03d}"] * n_days, "date": dates, "split": ["train"] * n_days,
            "price": price, "units": units,
            "unit_cost": [0.5 * list_price[p]] * n_days,
            "min_price": [0.6 * list_price[p]] * n_days,
            "max_price": [1.6 * list_price[p]] * n_days,
            "ref_price": price, "category": [f"c{p % 3}"] * n_days}))
    return pl.concat(frames), {"list_price": list_price}
