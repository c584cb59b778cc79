"""Trust region and pessimism on a market the demand model gets wrong (greedy, no RL).

    .venv/bin/python -m bench.bench_decisions [--seeds 4] [--products 20]

The true demand is linear with a choke price (units fall to 0 at 1.25-1.6x the list price)
while the model is constant elasticity, and history only ever priced at 0.9-1.1x the list
price: the model must extrapolate, the case the trust region and the ensemble quantile are
for. Each seed: the agent fixture's market (360 days) with its units redrawn from the linear
truth, the point fit and the 8-member ensemble on train, greedy on the test split with each
decision rule, scored under the truth as a share of the per-day true optimum on the grid.
Prints one JSON line: the mean share per rule over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from pricing_cli.agent import baselines as bl
from pricing_cli.agent import evaluate as ev
from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.ensemble import decision_demand, fit_ensemble
from pricing_cli.config import load_settings
from pricing_cli.pricing import trust_region_bounds
from tests import agent_fixtures

K = 21
NARROW_HISTORY = np.array([0.9, 0.95, 1.0, 1.05, 1.1])


def one_market(seed: int, n_products: int) -> dict[str, float]:
    settings = load_settings(preset="tiny", flags={}, environ={})
    folder = Path(tempfile.mkdtemp(prefix="bench-decisions-"))
    truth = agent_fixtures.write_processed(folder, n_products=n_products, n_days=360, seed=seed,
                                           K=K, price_multipliers=NARROW_HISTORY)
    rng = np.random.default_rng(seed + 100)
    choke = rng.uniform(1.25, 1.6, n_products)

    def true_units(product: np.ndarray, dates: np.ndarray, prices: np.ndarray) -> np.ndarray:
        dow = (np.asarray(dates, dtype="datetime64[D]").astype(np.int64) + 3) % 7
        base = np.exp(truth["log_base"][product] + agent_fixtures.TRUE_DOW_EFFECT[dow])
        relative = np.asarray(prices) / truth["list_price"][product]
        return base * np.clip((choke[product] - relative) / (choke[product] - 1.0), 0, None)

    for split in ("train", "val", "test"):
        frame = pl.read_parquet(folder / f"meta_{split}.parquet")
        units = rng.poisson(true_units(frame["product_index"].to_numpy(),
                                       frame["date"].to_numpy(), frame["price"].to_numpy()))
        frame.with_columns(units=pl.Series(units.astype(np.float64))).write_parquet(
            folder / f"meta_{split}.parquet")
    train = pl.read_parquet(folder / "meta_train.parquet")
    point = DemandModel.fit(train, settings)
    ensemble = fit_ensemble(train, settings, n_products=n_products, point=point)
    meta = bl.load_split_meta(folder, "test")
    bounds = trust_region_bounds(*bl.sold_price_range(folder, n_products), 0.10)
    trusted = dataclasses.replace(meta, trust_region=ev.series_bounds(meta, bounds))

    def profit(prices: np.ndarray) -> float:
        units = true_units(meta.product_index, meta.date, prices)
        return float(((prices - meta.unit_cost) * units).sum())

    grid = meta.grid[meta.series_of_row]
    rows = np.repeat(np.arange(meta.n_rows), K).reshape(-1, K)
    best = float(np.max((grid - meta.unit_cost[:, None])
                        * true_units(meta.product_index[rows], meta.date[rows], grid),
                        axis=1).sum())
    shares = {"historical": profit(meta.price)}
    for name, split_meta, quantile in (("point fit", meta, None), ("quantile 0.25", meta, 0.25),
                                       ("quantile 0.5", meta, 0.5),
                                       ("trust region 0.10", trusted, None),
                                       ("trust region 0.10 + quantile 0.25", trusted, 0.25)):
        demand = decision_demand(point, ensemble, quantile)
        shares[name] = profit(bl.greedy_prices(split_meta, demand, K, 0.25))
    return {name: value / best * 100 for name, value in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--products", type=int, default=20)
    args = parser.parse_args()
    runs = [one_market(seed, args.products) for seed in range(args.seeds)]
    print(json.dumps({name: round(float(np.mean([r[name] for r in runs])), 2)
                      for name in runs[0]}))


if __name__ == "__main__":
    main()
