"""Feature files written directly in the "features → preprocess" contract of
docs/architecture.md (no features stage needed), and the tiny settings and quiet monitor the
stage tests run with. Used by test_preprocess, test_merge, test_batches, test_hostile_batches,
test_ray and bench/bench_preprocess_merge.py.
"""

from __future__ import annotations

import io
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from pricing_cli.config import Settings, load_settings
from pricing_cli.monitor import RunMonitor

START = date(2023, 1, 1)
OUT_OF_BOUNDS_PRODUCT = 3  # its prices run above max_price: mask conflicts
JUMPY_PRODUCTS = (1, 5)  # +40 % / -35 % days that break max_daily_change 0.25


def write_feature_files(folder: Path, n_products: int = 13, n_days: int = 40,
                        n_features: int = 5, seed: int = 0) -> list[Path]:
    """Write per-product Parquet files and feature_manifest.json like `pricectl features`.

    Product i starts i % 4 days late (so files differ in length). Days are split
    chronologically: the first 70 % of the calendar train, the next 15 % val, the rest test.
    Returns the file paths in product order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    feature_columns = [f"f_{j}" for j in range(n_features)]
    val_start = START + timedelta(days=int(n_days * 0.7))
    test_start = START + timedelta(days=int(n_days * 0.85))
    paths, products = [], []
    for i in range(n_products):
        offset = i % 4
        days = n_days - offset
        dates = [START + timedelta(days=offset + d) for d in range(days)]
        cost = float(rng.uniform(2, 20))
        low, high = cost * 1.1, cost * 2.5
        log_price = np.log(cost * 1.8) + np.cumsum(rng.normal(0, 0.04, days))
        price = np.clip(np.exp(log_price), low, high)
        if i in JUMPY_PRODUCTS:
            price[days // 3:] *= 1.4
            price[2 * days // 3:] *= 0.65
            price = np.clip(price, low, high)
        if i == OUT_OF_BOUNDS_PRODUCT:
            price[days // 2:] = high * 1.6
        price = np.round(price, 2)
        units = rng.poisson(5, days).astype(np.float64) - (rng.random(days) < 0.05)
        ref = np.array([price[max(0, d - 7):d].mean() if d else price[0] for d in range(days)])
        split = ["train" if d < val_start else "val" if d < test_start else "test"
                 for d in dates]
        frame = pl.DataFrame({
            "product_index": pl.Series([i] * days, dtype=pl.Int32),
            "product_id": [f"SKU-{i * 7919 % 1000:03d}{'x' * (i % 3)}"] * days,
            "date": dates,
            "split": split,
            "units": units,
            "price": price,
            "revenue": units * price,
            "n_transactions": pl.Series(np.maximum(units, 0).astype(np.int64) // 2),
            "ref_price": ref,
            "unit_cost": [cost] * days,
            "min_price": [low] * days,
            "max_price": [high] * days,
            "category": [f"cat{i % 3}"] * days,
            **{c: pl.Series(rng.normal(size=days).astype(np.float32))
               for c in feature_columns},
        })
        path = folder / f"{i:05d}.parquet"
        frame.write_parquet(path)
        paths.append(path)
        counts = {s: split.count(s) for s in ("train", "val", "test")}
        products.append({"product_index": i, "product_id": frame["product_id"][0],
                         "file": path.name, "rows": counts})
    manifest = {
        "feature_columns": feature_columns,
        "raw_columns": ["units", "price", "revenue", "n_transactions", "ref_price"],
        "products": products,
        "splits": {"train": [str(START), str(val_start - timedelta(days=1))],
                   "val": [str(val_start), str(test_start - timedelta(days=1))],
                   "test": [str(test_start), str(START + timedelta(days=n_days - 1))]},
        "rows": {}, "scalers": {},
    }
    (folder / "feature_manifest.json").write_text(json.dumps(manifest, indent=2))
    return paths


def tiny_settings(**flags: object) -> Settings:
    """tiny preset with in-process work (workers=1) unless a test asks for a pool."""
    base: dict[str, object] = {"preprocess.workers": 1}
    base.update(flags)
    return load_settings(preset="tiny", flags=base, environ={})


def quiet_monitor(stage: str = "preprocess") -> tuple[RunMonitor, io.StringIO]:
    """A plain monitor writing to a buffer (not entered: no sampler thread)."""
    stream = io.StringIO()
    return RunMonitor(stage, "plain", stream=stream), stream
