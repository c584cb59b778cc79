"""Demand fit at the full preset's scale on a synthetic meta frame (no pipeline needed).

    .venv/bin/python -m bench.bench_demand_fit [--products 7300] [--days 75] [--categories 40]
        [--ensemble] [--refit estimates|full]

``--ensemble`` also fits the ``train.ensemble_size`` bootstrap refits (as train does) and
prints their seconds and the peak after them.

Builds products x days train rows (547,500 by default, like the full preset's processed data)
with a mix of the three price-response shapes, fits DemandModel with the default settings and
prints the fit's seconds, the process's peak RSS before and after the fit, and the shapes
chosen.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import polars as pl

from pricing_cli.agent.demand import DemandModel
from pricing_cli.config import load_settings


def synthetic_frame(n_products: int, n_days: int, n_categories: int, seed: int = 0
                    ) -> pl.DataFrame:
    """Train rows: prices 0.7-1.3 x list price (redrawn on 40% of days), Poisson units from
    a third each of loglog, linear and logit demand, weekly pattern."""
    rng = np.random.default_rng(seed)
    product = np.repeat(np.arange(n_products), n_days)
    day = np.tile(np.arange(n_days), n_products)
    dates = np.datetime64("2023-09-01") + day
    list_price = rng.uniform(5, 50, n_products)
    redraw = rng.random(len(product)) < 0.4
    redraw[day == 0] = True
    draw = rng.uniform(0.7, 1.3, len(product))
    # Carry the last redrawn multiplier forward within each product.
    last = np.maximum.accumulate(np.where(redraw, np.arange(len(product)), 0))
    r = np.round(draw[last], 2)
    form = np.arange(n_products) % 3
    e = rng.uniform(1.5, 3.0, n_products)[product]
    response = np.select([form[product] == 0, form[product] == 1],
                         [r ** -e, np.maximum(1 - 0.7 * e * (r - 1), 0)],
                         1 / (1 + np.exp(-3 * e * (1.1 - r))) * (1 + np.exp(-0.3 * e)))
    dow = (dates.astype(np.int64) + 3) % 7
    lam = rng.uniform(2, 40, n_products)[product] * np.exp(0.05 * dow) * response
    return pl.DataFrame({
        "product_index": pl.Series(product, dtype=pl.Int32),
        "date": dates, "price": np.round(list_price[product] * r, 2),
        "units": rng.poisson(lam).astype(np.float64),
        "category": pl.Series([f"c{k}" for k in range(n_categories)])
        .gather(product % n_categories)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=7300)
    parser.add_argument("--days", type=int, default=75)
    parser.add_argument("--categories", type=int, default=40)
    parser.add_argument("--ensemble", action="store_true",
                        help="also fit the bootstrap ensemble, as train does")
    parser.add_argument("--refit", choices=("estimates", "full"), default=None,
                        help="train.ensemble_refit for the members (default: the config's)")
    args = parser.parse_args()
    meta = synthetic_frame(args.products, args.days, args.categories)
    flags = {} if args.refit is None else {"train.ensemble_refit": args.refit}
    settings = load_settings(flags=flags, environ={})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    model = DemandModel.fit(meta, settings)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"rows": meta.height, "products": args.products,
              "fit_seconds": round(seconds, 2), "peak_rss_mib_before_fit": round(before),
              "peak_rss_mib_after_fit": round(after), "forms": model.info["forms"],
              "newton_iterations": model.info["newton_iterations"]}
    if args.ensemble:
        from pricing_cli.agent.ensemble import fit_ensemble

        started = time.perf_counter()
        ensemble = fit_ensemble(meta, settings, n_products=args.products, point=model)
        result["ensemble_members"] = 0 if ensemble is None else ensemble.size
        result["ensemble_seconds"] = round(time.perf_counter() - started, 2)
        result["fit_and_ensemble_seconds"] = round(seconds + result["ensemble_seconds"], 2)
        result["peak_rss_mib_after_ensemble"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
