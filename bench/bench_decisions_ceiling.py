"""Where the last points of the true optimum go, and the trust region x pessimism trade-off.

Re-scores runs that ``bench.bench_scenarios`` left in ``bench/out/scenarios/<folder>/`` (the
processed data, the run folder's demand model and ensemble, ground_truth.json); nothing is
re-trained. Every policy here is priced on the test split and scored under the true demand
(``market.true_units``) as a share of the true optimum (``market.true_optimum``: continuous,
no daily limit), net of the run's change costs when it has them.

The ceiling (``--ceiling``), each step one restriction more:
    (a) the true model's greedy on the price grid, no daily-change limit;
    (b) + the daily-change limit;
    (c) + the trust region at the run's margin (0.10);
    (d) the fitted point model's greedy in that region (the model's error: elasticity, shape,
        calendar);
    (e) the fitted ensemble's decision quantile (0.25) in it: the run's greedy (pessimism).
Holiday markets also split the (c) -> (e) loss between the event windows' rows and the
rest ("calendar": what the fit gets wrong inside the windows).

The sweep (``--sweep``): greedy (the planner when the run has change costs) on the fitted
decision demand for every trust-region margin x decision quantile, plus the adaptive region
(``train.trust_region_adaptive``). Greedy stands in for the published agent: on a memoryless
market without change costs the agent starts at greedy and RL has never improved on it (the
bench run's own agent vs greedy columns say how close).

    python -m bench.bench_decisions_ceiling --ceiling --sweep default holidays linear stockouts
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "scenarios"
MARGINS = (0.05, 0.10, 0.20)
QUANTILES = (0.25, 0.5)
NO_DAILY_LIMIT = 1e9


@dataclasses.dataclass
class Scored:
    """One scenario run, loaded once: the test split, its truth and the fitted models."""

    name: str
    meta: Any
    levels: int
    max_daily_change: float
    truth: Any
    truth_index: np.ndarray
    demand: Any
    ensemble: Any
    change_cost: np.ndarray | None
    sold: tuple[np.ndarray, np.ndarray]
    fit_metas: list[Any]
    n_products: int
    margin: float
    quantile: float | None
    evaluation: dict[str, Any]


def load(folder: str) -> Scored:
    from pricing_cli.agent.baselines import ground_truth_index, load_split_meta, sold_price_range
    from pricing_cli.agent.ensemble import DemandEnsemble
    from pricing_cli.agent.evaluate import find_run_dir
    from pricing_cli.agent.guardrails import row_rule_levels
    from pricing_cli.agent.policy import CHANGE_COSTS, load_demand_model
    from pricing_cli.agent.processed import ProcessedData
    from pricing_cli.config import load_settings
    from pricing_cli.data.market import load_ground_truth

    work = OUT / folder
    settings = load_settings(work / "config.yaml", preset="small", flags={}, environ={})
    processed = ProcessedData(Path(settings.merge.output_dir))
    closed = processed.closed_days(settings.data)
    meta = load_split_meta(processed, "test", closed)
    stats = processed.stats
    meta = dataclasses.replace(meta, rule_levels=row_rule_levels(
        settings, meta.product_id, meta.date, meta.unit_cost, meta.min_price, meta.max_price,
        stats.price_levels))
    truth = load_ground_truth(settings.data.ground_truth)
    truth_index = ground_truth_index(meta, truth.index)
    assert truth_index is not None, f"{folder}: the ground truth does not cover the products"
    run_dir = find_run_dir(settings)
    cost_path = run_dir / CHANGE_COSTS
    n_products = processed.product_count()
    return Scored(folder, meta, stats.price_levels, stats.max_daily_change, truth, truth_index,
                  load_demand_model(run_dir), DemandEnsemble.load(run_dir),
                  np.load(cost_path, allow_pickle=False) if cost_path.is_file() else None,
                  sold_price_range(processed, n_products),
                  [load_split_meta(processed, split, closed) for split in ("train", "val")],
                  n_products, float(settings.train.trust_region or 0.0),
                  settings.train.decision_quantile,
                  json.loads((work / "reports" / "evaluation.json").read_text()))


class TrueDemand:
    """The ground truth as a demand model on processed product indices (memoryless markets:
    every row is scored on its own)."""

    def __init__(self, run: Scored) -> None:
        start = run.meta.series_start
        self.truth = run.truth
        self.to_truth = np.full(int(run.meta.product_index.max()) + 1, -1, dtype=np.int64)
        self.to_truth[run.meta.product_index[start]] = run.truth_index[start]

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        from pricing_cli.data.market import true_units

        shape = np.shape(prices)
        index = np.broadcast_to(self.to_truth[np.asarray(product_index)], shape).ravel()
        days = np.broadcast_to(np.asarray(dates), shape).ravel()
        return true_units(self.truth, index, days, np.asarray(prices).ravel()).reshape(shape)


def region(run: Scored, margin: float, adaptive: float | None = None,
           agreement: float = 0.10) -> Any:
    """The test split with the trust region of ``margin`` (adaptive up to ``adaptive``)."""
    from pricing_cli.agent.baselines import series_bounds
    from pricing_cli.agent.ensemble import agreed_best_prices
    from pricing_cli.pricing import trust_region_bounds

    agreed = (None if adaptive is None else
              agreed_best_prices(run.ensemble, run.fit_metas, agreement, run.n_products))
    bounds = trust_region_bounds(*run.sold, margin, agreed=agreed, cap=adaptive)
    return dataclasses.replace(run.meta, trust_region=series_bounds(run.meta, bounds))


def price(run: Scored, meta: Any, demand: Any, max_daily_change: float | None = None
          ) -> np.ndarray:
    """Greedy, or the planner when the run charges for price changes (what it publishes)."""
    from pricing_cli.agent.baselines import greedy_prices, planned_prices

    limit = run.max_daily_change if max_daily_change is None else max_daily_change
    if run.change_cost is not None and np.any(run.change_cost > 0):
        return planned_prices(meta, demand, run.levels, limit, run.change_cost)
    return greedy_prices(meta, demand, run.levels, limit, run.change_cost)


def score(run: Scored, policies: dict[str, np.ndarray],
          rows: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """score_policies under the truth (share of the oracle, uplift vs historical)."""
    from pricing_cli.agent.baselines import historical_prices, oracle_prices
    from pricing_cli.agent.evaluate import score_policies
    from pricing_cli.data.market import true_units

    meta, index = run.meta, run.truth_index
    every = {"historical": historical_prices(meta),
             "oracle": oracle_prices(meta, run.truth, index), **policies}

    def units(prices: np.ndarray) -> np.ndarray:
        out = np.asarray(true_units(run.truth, index, meta.date, prices), dtype=np.float64)
        return out if rows is None else np.where(rows, out, 0.0)

    return score_policies(meta, every, units, reference="oracle", change_cost=run.change_cost)


def ceiling(run: Scored) -> dict[str, Any]:
    from pricing_cli.agent.ensemble import decision_demand
    from pricing_cli.data.market import holiday_intensity

    truth = TrueDemand(run)
    trusted = region(run, run.margin)
    policies = {
        "(a) true, grid": price(run, run.meta, truth, NO_DAILY_LIMIT),
        "(b) + daily limit": price(run, run.meta, truth),
        "(c) + trust region": price(run, trusted, truth),
        "(d) fitted point": price(run, trusted, run.demand),
        "(e) fitted quantile": price(run, trusted, decision_demand(run.demand, run.ensemble,
                                                                   run.quantile)),
    }
    scores = score(run, policies)
    out: dict[str, Any] = {name: round(scores[name]["share_of_oracle_pct"], 2)
                           for name in policies}
    out["historical"] = round(scores["historical"]["share_of_oracle_pct"], 2)
    out["published agent (bench run)"] = run.evaluation["policies"]["agent"]["true"][
        "share_of_oracle_pct"]
    sc = run.truth.scenario
    if sc is not None and sc.holidays:
        inside = np.zeros(run.meta.n_rows, dtype=bool)
        for window in sc.holidays:
            inside |= holiday_intensity(window, run.meta.date) > 0
        total = scores["oracle"]["profit"]
        for label, rows in (("in event windows", inside), ("outside", ~inside)):
            part = score(run, policies, rows)
            # Points of the whole split's optimum each step loses on these rows.
            out[f"(c)->(e) loss, {label}"] = round(
                (part["(c) + trust region"]["profit"] - part["(e) fitted quantile"]["profit"])
                / total * 100, 2)
            out[f"(c)->(d) loss, {label}"] = round(
                (part["(c) + trust region"]["profit"] - part["(d) fitted point"]["profit"])
                / total * 100, 2)
            out[f"(b)->(c) loss, {label}"] = round(
                (part["(b) + daily limit"]["profit"] - part["(c) + trust region"]["profit"])
                / total * 100, 2)
        out["event-window share of rows %"] = round(float(inside.mean() * 100), 1)
    return out


def sweep(run: Scored, margins: list[str], quantiles: list[float],
          agreement: float) -> list[dict[str, Any]]:
    """Every margin ("0.2", or "adaptive:0.3", base 0.10 up to that cap) x quantile."""
    from pricing_cli.agent.ensemble import decision_demand

    cells: list[dict[str, Any]] = []
    regions: list[tuple[str, Any]] = []
    for margin in margins:
        kind, _, cap = margin.partition(":")
        if kind == "adaptive":
            regions.append((f"adaptive 0.10..{float(cap):.2f}",
                            region(run, 0.10, adaptive=float(cap), agreement=agreement)))
        else:
            regions.append((f"{float(margin):.2f}", region(run, float(margin))))
    low, high = (bound[run.meta.product_index[run.meta.series_start]] for bound in run.sold)
    for label, meta in regions:
        lower, upper = meta.trust_region
        for quantile in quantiles:
            demand = decision_demand(run.demand, run.ensemble, quantile)
            prices = price(run, meta, demand)
            true = score(run, {"cell": prices})["cell"]
            cells.append({"scenario": run.name, "margin": label, "quantile": quantile,
                          "share_pct": round(true["share_of_oracle_pct"], 2),
                          "uplift_pct": round(true["uplift_pct"], 2),
                          "mean_upper_over_max_sold": round(float(np.nanmean(upper / high)), 3),
                          "mean_lower_over_min_sold": round(float(np.nanmean(lower / low)), 3)})
            print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders under bench/out/scenarios/")
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--margins", nargs="+",
                        default=[*(f"{m:g}" for m in MARGINS), "adaptive:0.3"],
                        help="fixed margins, and adaptive:<cap> (base 0.10)")
    parser.add_argument("--quantiles", nargs="+", type=float, default=list(QUANTILES))
    parser.add_argument("--out", default="decisions_ceiling.json",
                        help="file name under bench/out/scenarios/")
    parser.add_argument("--agreement", type=float, default=0.10)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    for folder in args.folders:
        run = load(folder)
        entry: dict[str, Any] = {}
        if args.ceiling:
            entry["ceiling"] = ceiling(run)
            print(folder, json.dumps(entry["ceiling"]), file=sys.stderr, flush=True)
        if args.sweep:
            entry["sweep"] = sweep(run, args.margins, args.quantiles, args.agreement)
        result[folder] = entry
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
