"""A small simulated market written in the processed-data contract, for agent tests.

Used by tests/test_demand.py, tests/test_env.py, tests/test_train.py and the evaluate tests,
so the signature of :func:`write_processed` is stable: add keyword arguments only.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from pricing_cli.pricing import (
    MOVE_DOWN,
    MOVE_HOLD,
    MOVE_UP,
    feasible_mask,
    nearest_level,
    price_grid,
)

# True day-of-week effect on log demand, Monday first: busier towards the weekend.
TRUE_DOW_EFFECT = np.array([0.0, 0.05, 0.0, 0.1, 0.2, 0.35, 0.3])
# Historical prices are the list price times one of these, moving one step at a time.
PRICE_MULTIPLIERS = np.array([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
REFERENCE_WINDOW = 14
INFORMATIVE_COLUMNS = ["f_dow_sin", "f_dow_cos", "f_doy_sin", "f_doy_cos", "f_prev_price_rel_list",
                       "f_log_list_price", "f_cost_rel_list", "f_log_units_lag1"]


def true_expected_units(truth: dict[str, Any], product_index: np.ndarray, dates: np.ndarray,
                        prices: np.ndarray) -> np.ndarray:
    """Expected daily units under the fixture's true demand.

    Args:
        truth: the dict returned by :func:`write_processed`.
        product_index, dates (datetime64[D]), prices: arrays of the same length.

    Returns:
        exp(log_base_p + dow_d) * (price / list_price_p) ** -elasticity_p, float64.
    """
    pi = np.asarray(product_index, dtype=np.int64)
    dow = (np.asarray(dates, dtype="datetime64[D]").astype(np.int64) + 3) % 7
    rel = np.asarray(prices, dtype=np.float64) / truth["list_price"][pi]
    return np.exp(truth["log_base"][pi] + TRUE_DOW_EFFECT[dow]) * rel ** -truth["elasticity"][pi]


def write_processed(folder: str | Path, n_products: int = 6, n_days: int = 90, K: int = 11,
                    F: int = 20, seed: int = 0, true_elasticity: Any = None, *,
                    max_daily_change: float = 0.25, base_units: tuple[float, float] = (20.0, 60.0),
                    start: date = date(2023, 1, 2),
                    price_multipliers: np.ndarray | None = None,
                    reference_effect: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Simulate a small market and write it as ``data/processed`` (docs/architecture.md).

    Each product has a list price L in [5, 50], a unit cost of 0.5-0.6 L, a price range
    [0.6 L, 1.6 L] (so with K=11 the grid steps by 0.1 L) and constant-elasticity Poisson
    demand ``units ~ Poisson(exp(log_base + dow) * (price / L) ** -elasticity)``. Historical
    prices are L times a multiplier in 0.7..1.3 that moves one step of 0.1 on ~20% of days
    (promotions and price rises, always within ``max_daily_change``). Days are split 70/15/15
    into train/val/test, chronologically.

    Writes X_{split}.npy (the first 8 columns informative: dow and season sin/cos, yesterday's
    price vs L, log L, cost/L, yesterday's log units; the rest N(0, 1) noise), labels_{split}.npz,
    masks_{split}.npz, meta_{split}.parquet, feature_cols.json and preprocessing_stats.json.

    Args:
        folder: output folder (created).
        n_products, n_days, K (price levels), F (feature columns), seed: market size and seed.
        true_elasticity: scalar or (n_products,) array; default linspace(1.8, 3.2).
        max_daily_change: recorded in the stats and used for the masks.
        base_units: range of expected daily units at list price on a Monday.
        start: first date.
        price_multipliers: the ladder of historical price / list price (default
            PRICE_MULTIPLIERS); prices start at its middle rung.
        reference_effect: (rate, loss, gain): demand with a memory, the agent/reference.py
            effect: units times exp(-loss·max(g, 0) - gain·min(g, 0)), g = log(price / R),
            R an EWMA of the product's earlier prices at ``rate`` (from its first price).
            None: memoryless (:func:`true_expected_units` holds only then).

    Returns:
        The truth: ``elasticity``, ``log_base``, ``list_price``, ``unit_cost``, ``min_price``,
        ``max_price`` (arrays by product_index), ``dow_effect``, ``rows`` per split, ``K``,
        ``max_daily_change``. Feed it to :func:`true_expected_units`.
    """
    import polars as pl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ladder = PRICE_MULTIPLIERS if price_multipliers is None else np.asarray(price_multipliers)
    elasticity = (np.linspace(1.8, 3.2, n_products) if true_elasticity is None else
                  np.broadcast_to(np.asarray(true_elasticity, dtype=np.float64), (n_products,)))
    list_price = np.round(rng.uniform(5.0, 50.0, n_products), 2)
    unit_cost = np.round(list_price * rng.uniform(0.5, 0.6, n_products), 2)
    log_base = np.log(rng.uniform(*base_units, n_products))
    min_price, max_price = 0.6 * list_price, 1.6 * list_price

    dates = np.datetime64(start, "D") + np.arange(n_days)
    dow = (dates.astype(np.int64) + 3) % 7
    doy = (dates - dates.astype("datetime64[Y]")).astype(np.int64) + 1
    n_train, n_val = round(0.7 * n_days), round(0.15 * n_days)
    split_of_day = np.array(["train"] * n_train + ["val"] * n_val
                            + ["test"] * (n_days - n_train - n_val))

    columns: dict[str, list[np.ndarray]] = {}
    for p in range(n_products):
        step = np.where(rng.random(n_days) < 0.2, rng.choice([-1, 1], n_days), 0)
        level = np.clip(len(ladder) // 2 + np.cumsum(step), 0, len(ladder) - 1)
        price = list_price[p] * ladder[level]
        lam = (np.exp(log_base[p] + TRUE_DOW_EFFECT[dow])
               * ladder[level] ** -elasticity[p])
        if reference_effect is not None:
            rate, loss, gain = reference_effect
            seen = np.empty(n_days)
            seen[0] = price[0]
            for t in range(1, n_days):
                seen[t] = (1.0 - rate) * seen[t - 1] + rate * price[t - 1]
            gap = np.log(price / seen)
            lam = lam * np.exp(-loss * np.maximum(gap, 0.0) - gain * np.minimum(gap, 0.0))
        units = rng.poisson(lam).astype(np.float64)
        prev_price = np.concatenate([[price[0]], price[:-1]])
        prev_units = np.concatenate([[np.exp(log_base[p])], units[:-1]])
        cumsum = np.concatenate([[0.0], np.cumsum(price)])
        day = np.arange(n_days)
        lo = np.maximum(day - REFERENCE_WINDOW, 0)
        # Mean of the previous (up to) 14 prices; the first day has no past and uses its own.
        ref = np.where(day == 0, price, (cumsum[day] - cumsum[lo]) / np.maximum(day - lo, 1))
        informative = np.column_stack([
            np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7),
            np.sin(2 * np.pi * doy / 365.25), np.cos(2 * np.pi * doy / 365.25),
            3.0 * np.log(prev_price / list_price[p]),
            np.full(n_days, (np.log(list_price[p]) - 3.0)),
            np.full(n_days, 10.0 * (unit_cost[p] / list_price[p] - 0.55)),
            np.log1p(prev_units) - 3.5,
        ])
        noise = rng.standard_normal((n_days, max(F - informative.shape[1], 0)))
        X = np.column_stack([informative, noise])[:, :F].astype(np.float32)
        grid = price_grid(min_price[p], max_price[p], K)
        mask, _ = feasible_mask(np.broadcast_to(grid, (n_days, K)), prev_price, max_daily_change)
        change = price / prev_price - 1.0
        move = np.where(change < -0.005, MOVE_DOWN, np.where(change > 0.005, MOVE_UP, MOVE_HOLD))
        move[0] = -1
        for name, value in {
            "product_index": np.full(n_days, p), "date": dates, "split": split_of_day,
            "price": price, "units": units, "unit_cost": np.full(n_days, unit_cost[p]),
            "min_price": np.full(n_days, min_price[p]), "max_price": np.full(n_days, max_price[p]),
            "ref_price": ref, "X": X, "level": nearest_level(grid, price), "move": move,
            "mask": mask,
        }.items():
            columns.setdefault(name, []).append(value)

    merged = {name: np.concatenate(parts) for name, parts in columns.items()}
    rows = {}
    for split in ("train", "val", "test"):
        # Rows ordered by product_index, then date: the concatenation order already is.
        keep = merged["split"] == split
        rows[split] = int(keep.sum())
        np.save(folder / f"X_{split}.npy", merged["X"][keep])
        np.savez(folder / f"labels_{split}.npz", price_level=merged["level"][keep].astype(np.int16),
                 price_move=merged["move"][keep].astype(np.int16))
        np.savez(folder / f"masks_{split}.npz", price_level=merged["mask"][keep].astype(np.int8),
                 price_move=np.ones((rows[split], 3), dtype=np.int8))
        pi = merged["product_index"][keep]
        pl.DataFrame({
            "product_index": pl.Series(pi, dtype=pl.Int32),
            "product_id": [f"P{p:03d}" for p in pi],
            "date": pl.Series(merged["date"][keep]).cast(pl.Date),
            "split": merged["split"][keep].tolist(),
            **{c: pl.Series(merged[c][keep], dtype=pl.Float64)
               for c in ("price", "units", "unit_cost", "min_price", "max_price", "ref_price")},
        }).write_parquet(folder / f"meta_{split}.parquet")
    names = INFORMATIVE_COLUMNS + [f"f_noise_{i:02d}" for i in range(F - len(INFORMATIVE_COLUMNS))]
    (folder / "feature_cols.json").write_text(json.dumps(names[:F]))
    stats = {"samples": {**rows, "total": sum(rows.values())}, "input_dim": F,
             "heads": {"price_level": K, "price_move": 3}, "price_levels": K,
             "max_daily_change": max_daily_change, "products": n_products, "fingerprints": {}}
    (folder / "preprocessing_stats.json").write_text(json.dumps(stats, indent=2))
    return {"elasticity": np.asarray(elasticity, dtype=np.float64), "log_base": log_base,
            "list_price": list_price, "unit_cost": unit_cost, "min_price": min_price,
            "max_price": max_price, "dow_effect": TRUE_DOW_EFFECT, "rows": rows, "K": K,
            "max_daily_change": max_daily_change}
