"""Learning curves: the network's val profit against RL steps, beside greedy's and the planner's.

Every val check of the train loop (``train.ValSelection``) prices the val split with the
deterministic network in the env: mean profit per product-day under the decision demand, the
number model selection keeps the best of. Greedy's and the planner's val paths
(``policy.grid_policy_prices``, the baselines evaluate and ``select_published_policy`` use) are
computed once per run and replayed through the same env (:func:`replayed_profit`), so the three
lines share one measure: the env's units (the demand table, the reference rolled along the
path, siblings at their references), its masks and its change costs. A flat line at the
planner's level is what RL has to reach; the network's points above greedy's line are what RL
learned.

``train_summary.json`` holds them as ``learning_curve`` (one row per val check: timesteps, the
network's val profit, greedy's and the planner's), TensorBoard as the scalars
``val/profit_per_product_day`` (one chart, three lines) in ``tensorboard/val/``, and
evaluate's report.md as a table (:func:`curve_table_lines`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pricing_cli.agent.env import Market, Observation
    from pricing_cli.agent.processed import ProcessedData
    from pricing_cli.config import Settings

BASELINES = ("greedy", "planner")
CURVE_TAG = "val/profit_per_product_day"


def path_chooser(market: Market, levels: np.ndarray
                 ) -> Callable[[Observation, np.ndarray], np.ndarray]:
    """A ``choose(obs, mask)`` for ``env.simulate`` that plays a fixed level per row.

    simulate decides one row per product per call, each product's rows in order from its
    first, so the next row of a product is its last decided row + 1: the observation's
    product index is enough to find it (no change to the env).
    """
    first = np.nonzero(np.r_[True, market.product_index[1:] != market.product_index[:-1]])[0]
    next_row = np.full(market.n_products, -1, dtype=np.int64)
    next_row[market.product_index[first]] = first

    def choose(obs: Observation, mask: np.ndarray) -> np.ndarray:
        product = obs["product_id"][:, 0].astype(np.int64)
        rows = next_row[product]
        next_row[product] += 1
        return levels[rows]

    return choose


def replayed_profit(market: Market, prices: np.ndarray,
                    products: Sequence[int] | None = None) -> float:
    """Mean profit per product-day of a fixed price path (one price per market row) played
    through the env, as ``ValSelection`` scores the network. A price off the grid takes the
    nearest level; one the env's mask rules out is moved as the env moves any action."""
    from pricing_cli.agent.env import simulate
    from pricing_cli.pricing import nearest_level

    levels = np.empty(market.n_rows, dtype=np.int64)
    for start in range(0, market.n_rows, 65_536):
        rows = np.arange(start, min(start + 65_536, market.n_rows))
        levels[rows] = nearest_level(market.grid(rows), prices[rows])
    return float(simulate(market, path_chooser(market, levels), products=products)["mean_profit"])


def baseline_val_profits(settings: Settings, val_market: Market,
                         processed: ProcessedData | Path, demand: Any,
                         trust_region: tuple[np.ndarray, np.ndarray] | None,
                         products: Sequence[int] | None = None) -> dict[str, float]:
    """{greedy, planner}: each one's val path (under the decision demand, the trust region,
    the merchant rules and the change costs) replayed through the val env."""
    from pricing_cli.agent.policy import grid_policy_meta, grid_policy_prices

    if val_market.n_rows == 0:
        return {}
    levels = val_market.price_levels
    meta = grid_policy_meta(processed, val_market.split, trust_region, settings, levels,
                            demand)
    if meta.n_rows != val_market.n_rows:  # cannot happen with one reader; say so if it does
        raise ValueError(f"the {val_market.split} split has {meta.n_rows} grid-policy rows "
                         f"but {val_market.n_rows} env rows")
    cost = val_market.change_cost
    change_cost = cost if cost is not None and np.any(cost > 0) else None
    return {name: replayed_profit(val_market, grid_policy_prices(
        name, meta, demand, levels, val_market.max_daily_change, change_cost), products)
        for name in BASELINES}


def learning_curve(evaluations: list[dict[str, Any]], lines: dict[str, float]
                   ) -> list[dict[str, Any]]:
    """One row per val check: timesteps, the network's val profit and the baselines' lines."""
    return [{"timesteps": int(e["timesteps"]), "network": e["val_mean_profit"],
             **{name: lines.get(name) for name in BASELINES}} for e in evaluations]


class CurveLog:
    """The learning curve as TensorBoard scalars (``tensorboard/val/``): at every val check,
    the network's val profit and the baselines' flat lines under one tag, so the three share
    a chart. Without the tensorboard package nothing is written (``enabled`` False)."""

    def __init__(self, folder: Path | None, lines: dict[str, float]) -> None:
        self.lines, self.writer = lines, None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: the summary JSON still has the curve
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def add(self, step: int, profit: float) -> None:
        if self.writer is None:
            return
        self.writer.add_scalars(CURVE_TAG, {"network": profit, **self.lines}, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def curve_table_lines(curve: list[dict[str, Any]] | None,
                      best_timesteps: int | None = None) -> list[str]:
    """report.md's "Learning curve" section (nothing without a curve)."""
    if not curve:
        return []

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.2f}"

    if best_timesteps is None:
        best_timesteps = max(curve, key=lambda row: row["network"])["timesteps"]
    lines = ["", "## Learning curve", "",
             "Val profit per product-day under the fitted (decision) demand at each val check "
             "of training: the network, and greedy's and the planner's val paths played through "
             "the same env (flat lines). The run kept the network of step "
             f"{best_timesteps:,}.", "",
             "| steps | network | greedy | planner |", "|---|---|---|---|"]
    lines += [f"| {row['timesteps']:,} | {cell(row['network'])} | {cell(row.get('greedy'))} | "
              f"{cell(row.get('planner'))} |" for row in curve]
    return lines


def read_train_curve(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's learning curve for evaluate (evaluation.json's ``learning_curve``):
    {"rows": train_summary.json's ``learning_curve``, "best_timesteps"}; None for a run
    trained before curves were recorded, or without a readable summary."""
    import json

    path = Path(run_dir) / "train_summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rows = summary.get("learning_curve") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not rows:
        return None
    return {"rows": rows, "best_timesteps": summary.get("best_timesteps")}


def with_member_tables(market: Market, ensemble: Any, monitor: Any = None) -> Market:
    """``market`` with ``member_tables``: every ensemble member's expected units at each row's
    K levels (``demand.units_on_grid``, as the decision table), so env episodes can be paid by
    one member each (``train.ensemble_rewards``). Each member's own price response, the
    decision demand's reference effect (as the decision quantile has: the point fit's).
    Unchanged without an ensemble."""
    import dataclasses

    from pricing_cli.agent.demand import units_on_grid

    if ensemble is None:
        if monitor is not None:
            monitor.log("train.ensemble_rewards needs train.ensemble_size of 2 or more: "
                        "rewards come from the decision demand")
        return market
    rows = np.arange(market.n_rows)
    grid = market.grid(rows)
    tables = np.stack([units_on_grid(member, market.product_index, market.dates, grid)
                       for member in ensemble.members])
    if monitor is not None:
        monitor.log(f"RL rewards from {len(tables)} ensemble members, one per episode "
                    f"({tables.nbytes / 2**20:,.1f} MiB of demand tables)")
    return dataclasses.replace(market, member_tables=tables)
