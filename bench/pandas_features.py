"""A plain pandas, eager implementation of `pricectl features` (the reference).

Used two ways: tests/test_features.py checks pricectl's output against it value for value on
a tiny market, and `make bench` runs it side by side with pricectl on the full preset.

    .venv/bin/python -m bench.pandas_features RAW_DIR [--pattern '*.csv']
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def feature_names(lags: Sequence[int], windows: Sequence[int]) -> list[str]:
    """The feature columns in pricectl's order (features.feature_definitions)."""
    names = []
    for k in lags:
        names += [f"units_lag_{k}", f"price_lag_{k}"]
    for w in windows:
        names += [f"units_mean_{w}", f"units_std_{w}", f"price_mean_{w}", f"price_std_{w}"]
    return names + ["price", "ref_price", "price_rel_ref", "dow_sin", "dow_cos", "doy_sin",
                    "doy_cos", "is_weekend", "unit_cost", "margin", "price_position"]


def pandas_features(raw: Path, lags: Sequence[int] = (1, 7), windows: Sequence[int] = (7,),
                    reference_window: int = 14, val_fraction: float = 0.15,
                    test_fraction: float = 0.15, pattern: str = "*.csv") -> pd.DataFrame:
    """Daily panel + features + split + train-only scaling, eagerly, one frame in memory."""
    names = feature_names(lags, windows)
    tx = pd.concat([pd.read_csv(p, dtype={"product_id": str})
                    for p in sorted((raw / "transactions").glob(pattern))])
    tx["date"] = pd.to_datetime(tx["date"])
    catalog = pd.read_csv(raw / "catalog.csv", dtype={"product_id": str})
    tx["revenue"] = tx["quantity"] * tx["unit_price"]
    tx["sold"] = tx["quantity"].clip(lower=0)
    tx["sold_revenue"] = tx["sold"] * tx["unit_price"]
    daily = tx.groupby(["product_id", "date"]).agg(
        units=("quantity", "sum"), revenue=("revenue", "sum"), sold=("sold", "sum"),
        sold_revenue=("sold_revenue", "sum"), mean_price=("unit_price", "mean"),
        n_transactions=("quantity", "size")).reset_index()
    daily["price"] = np.where(daily["sold"] > 0, daily["sold_revenue"] / daily["sold"].where(
        daily["sold"] > 0), daily["mean_price"])
    first_day, last_day = daily["date"].min(), daily["date"].max()
    n_days = (last_day - first_day).days + 1
    test_start = last_day - pd.Timedelta(days=round(n_days * test_fraction) - 1)
    val_start = test_start - pd.Timedelta(days=round(n_days * val_fraction))
    parts = []
    for index, (product_id, group) in enumerate(daily.groupby("product_id", sort=True)):
        days = pd.date_range(group["date"].min(), last_day, freq="D")
        g = group.set_index("date").reindex(days)
        g.index.name = "date"
        g["units"] = g["units"].fillna(0.0)
        g["revenue"] = g["revenue"].fillna(0.0)
        g["n_transactions"] = g["n_transactions"].fillna(0)
        g["price"] = g["price"].ffill()
        g["product_index"], g["product_id"] = index, product_id
        for k in lags:
            g[f"units_lag_{k}"] = g["units"].shift(k)
            g[f"price_lag_{k}"] = g["price"].shift(k)
        for w in windows:
            g[f"units_mean_{w}"] = g["units"].shift(1).rolling(w).mean()
            g[f"units_std_{w}"] = g["units"].shift(1).rolling(w).std()
            g[f"price_mean_{w}"] = g["price"].shift(1).rolling(w).mean()
            g[f"price_std_{w}"] = g["price"].shift(1).rolling(w).std()
        g["ref_price"] = g["price"].shift(1).rolling(reference_window).mean()
        parts.append(g.reset_index())
    df = pd.concat(parts).merge(catalog, on="product_id", how="left")
    df["price_rel_ref"] = df["price"] / df["ref_price"]
    dow = df["date"].dt.day_of_week  # Monday = 0
    df["dow_sin"], df["dow_cos"] = np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)
    doy = df["date"].dt.day_of_year
    df["doy_sin"] = np.sin(2 * np.pi * doy / 365.25)
    df["doy_cos"] = np.cos(2 * np.pi * doy / 365.25)
    df["is_weekend"] = (dow >= 5).astype(float)
    df["margin"] = (df["price"] - df["unit_cost"]) / df["price"]
    df["price_position"] = (df["price"] - df["min_price"]) / (df["max_price"] - df["min_price"])
    df["split"] = np.where(df["date"] >= test_start, "test",
                           np.where(df["date"] >= val_start, "val", "train"))
    df = df.dropna(subset=names).reset_index(drop=True)
    train = df[df["split"] == "train"]
    for name in names:
        std = train[name].std(ddof=0)
        df[f"f_{name}"] = (df[name] - train[name].mean()) / (std if std > 0 else 1.0)
    return df.sort_values(["product_index", "date"]).reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--pattern", default="*.csv")
    args = parser.parse_args()
    started = time.monotonic()
    # The full preset's features settings are the defaults: lags 1/7/14, windows 7/28, ref 28.
    frame = pandas_features(args.raw, lags=(1, 7, 14), windows=(7, 28), reference_window=28,
                            pattern=args.pattern)
    print(f"{len(frame)} product-days in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
