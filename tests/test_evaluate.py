"""Baselines and `pricectl evaluate`: known optima, brute-force searches, hand-computed metrics."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent import baselines as bl
from pricing_cli.agent import evaluate as ev
from pricing_cli.agent import policy
from pricing_cli.agent.baselines import SplitMeta
from pricing_cli.config import load_settings
from pricing_cli.data import market
from pricing_cli.errors import BatchError, ModelError
from pricing_cli.monitor import RunMonitor
from pricing_cli.pricing import feasible_mask, price_grid
from pricing_cli.storage import OWNER_MARKER, write_json
from tests import agent_fixtures

K = 11
MAX_CHANGE = 0.25
N_DAYS = 28
START = np.datetime64("2023-06-01")
IDS = ("P-a", "P-b", "P-c")
COST = np.array([5.0, 3.0, 8.0])
ELASTICITY = np.array([2.0, 3.0, 2.5])
MIN_PRICE = np.array([6.0, 3.5, 9.0])
MAX_PRICE = np.array([16.0, 9.0, 20.0])
HISTORICAL = np.array([15.0, 8.0, 19.0])  # far above the optima 10, 4.5 and 13.3


def make_truth(order: tuple[int, ...] = (0, 1, 2)) -> market.GroundTruth:
    """A market whose daily optimum moves (season and weekends); products in ``order``."""
    pick = np.asarray(order)
    return market.GroundTruth(
        product_ids=tuple(IDS[i] for i in order), category=("c",) * len(order),
        base_units=np.array([20.0, 40.0, 10.0])[pick], ref_price=HISTORICAL[pick],
        elasticity=ELASTICITY[pick], season_amp=np.array([0.3, 0.2, 0.4])[pick],
        season_phase=np.array([100.0, 150.0, 200.0])[pick], unit_cost=COST[pick],
        min_price=MIN_PRICE[pick], max_price=MAX_PRICE[pick], elasticity_season=0.1,
        elasticity_weekend=0.2, dow_effect=np.array([0.0, 0.05, 0.0, -0.05, 0.1, 0.3, 0.2]))


class TruthDemand:
    """Stand-in for the fitted DemandModel that knows the true demand."""

    def __init__(self, truth: market.GroundTruth, processed_ids: tuple[str, ...] = IDS) -> None:
        self.truth = truth
        self.to_truth = truth.product_index(list(processed_ids))

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return market.expected_units(self.truth, self.to_truth[product_index], dates, prices)


def make_meta(n_days: int = N_DAYS, prev_price: np.ndarray | None = HISTORICAL) -> SplitMeta:
    n_products = len(IDS)
    product_index = np.repeat(np.arange(n_products), n_days)
    per_row = lambda values: np.repeat(values, n_days)  # noqa: E731
    dates = np.tile(START + np.arange(n_days), n_products)
    grid = price_grid(MIN_PRICE, MAX_PRICE, K)
    if prev_price is None:
        first_mask = np.ones((n_products, K), dtype=np.int8)
        prev = np.full(n_products, np.nan)
    else:
        first_mask = feasible_mask(grid, prev_price, MAX_CHANGE)[0]
        prev = np.asarray(prev_price, dtype=np.float64)
    return SplitMeta(product_index, np.array([IDS[i] for i in product_index], dtype=object),
                     dates, per_row(HISTORICAL), np.ones(product_index.size), per_row(COST),
                     per_row(MIN_PRICE), per_row(MAX_PRICE), first_mask, prev)


def profit(meta: SplitMeta, demand: TruthDemand, prices: np.ndarray) -> float:
    units = demand.expected_units(meta.product_index, meta.date, prices)
    return float(np.sum((prices - meta.unit_cost) * units))


# ----------------------------------------------------------------------------------------------
# Baselines against brute force and the known optimum


def test_static_equals_brute_force_over_feasible_levels() -> None:
    meta, demand = make_meta(), TruthDemand(make_truth())
    prices = bl.static_prices(meta, demand, K, MAX_CHANGE)
    for p in range(len(IDS)):
        rows = meta.product_index == p
        best, best_level = -np.inf, None
        for level in price_grid(MIN_PRICE[p], MAX_PRICE[p], K):
            if abs(level / HISTORICAL[p] - 1) > MAX_CHANGE + 1e-9:
                continue
            units = demand.expected_units(meta.product_index[rows], meta.date[rows],
                                          np.full(N_DAYS, level))
            value = float(np.sum((level - COST[p]) * units))
            if value > best:
                best, best_level = value, level
        np.testing.assert_array_equal(prices[rows], np.full(N_DAYS, best_level))
    # Product a: grid 6..16 step 1, day one must be within 25% of 15, so 12 is the lowest
    # (closest to the optimum 10) feasible level.
    np.testing.assert_array_equal(prices[meta.product_index == 0], 12.0)


def test_greedy_equals_brute_force_per_day_search() -> None:
    meta, demand = make_meta(), TruthDemand(make_truth())
    prices = bl.greedy_prices(meta, demand, K, MAX_CHANGE)
    expected = np.zeros(meta.n_rows)
    for p in range(len(IDS)):
        grid = price_grid(MIN_PRICE[p], MAX_PRICE[p], K)
        prev = HISTORICAL[p]
        for day in range(N_DAYS):
            row = p * N_DAYS + day
            best, best_price = -np.inf, None
            for level in grid:
                if abs(level / prev - 1) > MAX_CHANGE + 1e-9:
                    continue
                units = demand.expected_units(np.array([p]), meta.date[row:row + 1],
                                              np.array([level]))[0]
                if (level - COST[p]) * units > best:
                    best, best_price = (level - COST[p]) * units, level
            expected[row] = prev = best_price
    np.testing.assert_array_equal(prices, expected)
    # Product a walks from 15 toward its true optimum (9.3 on weekdays, 8.2 on Saturday
    # 2023-06-03): day one at most -25% (12), then the nearest levels 9 and 8.
    np.testing.assert_array_equal(prices[:3], [12.0, 9.0, 8.0])


def best_path_profit(day_profit: list[np.ndarray], grid: np.ndarray, prev: float,
                     max_change: float, cost: float = 0.0, day: int = 0) -> float:
    """Largest profit of days ``day``.. over every feasible price path, net of ``cost`` per
    price change (plain recursion)."""
    if day == len(day_profit):
        return 0.0
    return max(day_profit[day][j] - cost * (abs(grid[j] / prev - 1) > 0.005)
               + best_path_profit(day_profit, grid, grid[j], max_change, cost, day + 1)
               for j in range(len(grid)) if abs(grid[j] / prev - 1) <= max_change + 1e-9)


def net_path_profit(meta: SplitMeta, demand: TruthDemand, prices: np.ndarray, product: int,
                    cost: float) -> float:
    """One product's profit over the split, net of ``cost`` per price move."""
    rows = np.nonzero(meta.product_index == product)[0]
    units = demand.expected_units(meta.product_index[rows], meta.date[rows], prices[rows])
    moves = np.abs(prices[rows] / np.r_[HISTORICAL[product], prices[rows][:-1]] - 1) > 0.005
    return float(np.sum((prices[rows] - COST[product]) * units) - cost * moves.sum())


@pytest.mark.parametrize(("max_change", "cost"), [(0.25, 0.0), (0.08, 0.0), (0.25, 40.0)])
def test_planner_equals_brute_force_over_every_feasible_price_path(max_change: float,
                                                                    cost: float) -> None:
    meta, demand = make_meta(n_days=6), TruthDemand(make_truth())
    change_cost = np.full(len(IDS), cost) if cost else None
    planned = bl.planned_prices(meta, demand, K, max_change, change_cost)
    greedy = bl.greedy_prices(meta, demand, K, max_change, change_cost)
    for p in range(len(IDS)):
        rows = np.nonzero(meta.product_index == p)[0]
        grid = price_grid(MIN_PRICE[p], MAX_PRICE[p], K)
        day_profit = [(grid - COST[p]) * demand.expected_units(
            np.full(K, p), np.full(K, meta.date[row]), grid) for row in rows]
        best = best_path_profit(day_profit, grid, HISTORICAL[p], max_change, cost)

        assert net_path_profit(meta, demand, planned, p, cost) == pytest.approx(best, rel=1e-12)
        assert best >= net_path_profit(meta, demand, greedy, p, cost) - 1e-9
    assert ev.count_violations(meta, planned, max_change).total == 0
    if cost:
        # Evaluate charges the same costs: profit net of every move, day one's included.
        scored = ev.profit_metrics(meta, planned, demand.expected_units(
            meta.product_index, meta.date, planned), change_cost)
        moves = np.abs(planned / np.r_[np.nan, planned[:-1]] - 1) > 0.005
        moves[meta.series_start] = np.abs(planned[meta.series_start] / HISTORICAL - 1) > 0.005
        assert scored["change_costs"] == pytest.approx(cost * moves.sum())
        # A change costs 40 here (a few days' profit gain): the planner moves less than greedy
        # without costs does.
        free = bl.greedy_prices(meta, demand, K, max_change)
        free_moves = np.abs(free / np.r_[np.nan, free[:-1]] - 1) > 0.005
        free_moves[meta.series_start] = np.abs(free[meta.series_start] / HISTORICAL - 1) > 0.005
        assert moves.sum() < free_moves.sum()


class ShiftingDemand:
    """Constant-elasticity demand whose elasticity jumps from 1.6 to 4 on day 3: the best
    price falls from 3.1x to 1.33x unit cost overnight."""

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        day = (np.asarray(dates) - START).astype(np.int64)
        elasticity = np.where(day < 3, 1.6, 4.0)
        return 100.0 * (np.asarray(prices) / 10.0) ** -elasticity


def test_planner_anticipates_what_greedy_cannot() -> None:
    # Under a tight daily limit the planner starts lowering prices before the change.
    meta, demand = make_meta(n_days=6), ShiftingDemand()
    planned = bl.planned_prices(meta, demand, K, 0.08)
    greedy = bl.greedy_prices(meta, demand, K, 0.08)
    assert profit(meta, demand, planned) > profit(meta, demand, greedy) * 1.001
    before = (meta.date - START).astype(np.int64) < 3
    assert (planned[before] <= greedy[before]).all()
    # Product c: greedy holds its maximum 20 until the change; the planner leaves it at once.
    np.testing.assert_allclose(planned[meta.product_index == 2][:3], [17.8, 16.7, 15.6])
    np.testing.assert_array_equal(greedy[meta.product_index == 2][:3], [20.0, 20.0, 20.0])


def test_oracle_is_the_true_optimum_and_policies_rank() -> None:
    meta, truth = make_meta(), make_truth(order=(2, 0, 1))
    demand = TruthDemand(truth)
    truth_index = bl.ground_truth_index(meta, truth.index)
    assert truth_index is not None
    assert bl.ground_truth_index(meta, {"P-a": 0, "P-b": 1}) is None  # P-c unknown: not used
    np.testing.assert_array_equal(truth_index[[0, N_DAYS, 2 * N_DAYS]], [1, 2, 0])
    oracle = bl.oracle_prices(meta, truth, truth_index)
    # Constant elasticity e: the optimum is cost * e / (e - 1), e from the weekday.
    e = market.elasticity(truth, truth_index, meta.date)
    np.testing.assert_allclose(oracle, np.clip(meta.unit_cost * e / (e - 1), meta.min_price,
                                               meta.max_price))
    # No price beats the oracle on any product-day.
    for shift in (0.98, 1.02):
        assert np.all(market.expected_profit(truth, truth_index, meta.date, oracle) >=
                      market.expected_profit(truth, truth_index, meta.date, oracle * shift))
    profits = {name: profit(meta, demand, prices) for name, prices in {
        "oracle": oracle, "greedy": bl.greedy_prices(meta, demand, K, MAX_CHANGE),
        "static": bl.static_prices(meta, demand, K, MAX_CHANGE),
        "historical": bl.historical_prices(meta),
        "random": bl.random_feasible_prices(meta, K, MAX_CHANGE, seed=0)}.items()}
    assert profits["oracle"] > profits["greedy"] > profits["static"] > profits["historical"]
    assert profits["static"] > profits["random"]


def test_random_feasible_respects_masks_and_seed() -> None:
    meta = make_meta()
    prices = bl.random_feasible_prices(meta, K, MAX_CHANGE, seed=3)
    np.testing.assert_array_equal(prices, bl.random_feasible_prices(meta, K, MAX_CHANGE, seed=3))
    assert not np.array_equal(prices, bl.random_feasible_prices(meta, K, MAX_CHANGE, seed=4))
    for p in range(len(IDS)):
        grid = price_grid(MIN_PRICE[p], MAX_PRICE[p], K)
        path = prices[meta.product_index == p]
        prev = np.concatenate([[HISTORICAL[p]], path[:-1]])
        assert np.all(np.isin(path, grid))
        assert np.all(np.abs(path / prev - 1) <= MAX_CHANGE + 1e-9)
        assert len(np.unique(path)) > 2  # it does move
    # Where the price before the split is unknown, day one follows the processed mask row.
    unknown = make_meta(prev_price=None)
    only = np.zeros((len(IDS), K), dtype=np.int8)
    only[:, [2, 5]] = 1
    unknown = dataclasses.replace(unknown, first_day_mask=only)
    for seed in range(5):
        day_one = bl.random_feasible_prices(unknown, K, MAX_CHANGE, seed)[unknown.series_start]
        allowed = unknown.grid[:, [2, 5]]
        assert np.all((day_one == allowed[:, 0]) | (day_one == allowed[:, 1]))


def test_baselines_never_violate_constraints() -> None:
    meta, truth = make_meta(), make_truth()
    demand = TruthDemand(truth)
    for prices in (bl.static_prices(meta, demand, K, MAX_CHANGE),
                   bl.greedy_prices(meta, demand, K, MAX_CHANGE),
                   bl.random_feasible_prices(meta, K, MAX_CHANGE, seed=1),
                   bl.historical_prices(meta)):
        assert ev.count_violations(meta, prices, MAX_CHANGE).as_dict() == {
            "bounds": 0, "daily_change": 0, "total": 0}
    # The oracle jumps from 15 straight to about 10 (-33%): counted, as the exempt policy.
    truth_index = bl.ground_truth_index(meta, truth.index)
    assert truth_index is not None
    oracle = bl.oracle_prices(meta, truth, truth_index)
    assert ev.count_violations(meta, oracle, MAX_CHANGE).daily_change >= 1


# ----------------------------------------------------------------------------------------------
# Metrics by hand: 2 products x 3 days, demand units = 10 - price


class LinearDemand:
    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return 10.0 - np.asarray(prices)


def two_by_three(prev_price: tuple[float, float] = (4.0, 4.0)) -> SplitMeta:
    index = np.array([0, 0, 0, 1, 1, 1])
    dates = np.tile(START + np.arange(3), 2)
    grid = price_grid(np.array([2.0, 2.0]), np.array([8.0, 6.0]), 7)
    prev = np.asarray(prev_price)
    return SplitMeta(index, np.array(["A"] * 3 + ["B"] * 3, dtype=object), dates,
                     np.full(6, 4.0), np.full(6, 6.0), np.repeat([2.0, 1.0], 3),
                     np.repeat([2.0, 2.0], 3), np.repeat([8.0, 6.0], 3),
                     feasible_mask(grid, prev, MAX_CHANGE)[0], prev)


def test_metrics_hand_computed() -> None:
    meta, demand = two_by_three(), LinearDemand()
    # A: 4, 5 (+25% exactly: allowed), 5. B: 4, 6.5 (above max 6, +62.5%), 4 (-38.5%).
    agent = np.array([4.0, 5.0, 5.0, 4.0, 6.5, 4.0])
    units = lambda prices: demand.expected_units(meta.product_index, meta.date, prices)  # noqa
    scores = ev.score_policies(meta, {"agent": agent, "historical": meta.price}, units)
    # A: units 6, 5, 5; revenue 24 + 25 + 25; profit 2*6 + 3*5 + 3*5 = 42.
    # B: units 6, 3.5, 6; revenue 24 + 22.75 + 24; profit 3*6 + 5.5*3.5 + 3*6 = 55.25.
    assert scores["agent"]["units"] == 31.5
    assert scores["agent"]["revenue"] == 144.75
    assert scores["agent"]["profit"] == 97.25
    assert scores["agent"]["margin"] == pytest.approx(97.25 / 144.75)
    # Historical: A 36, B 54 -> 90.
    assert scores["historical"]["profit"] == 90.0
    assert scores["agent"]["uplift_pct"] == pytest.approx(7.25 / 90 * 100)
    assert scores["historical"]["uplift_pct"] == 0.0
    np.testing.assert_allclose(ev.product_uplift_pct(meta, agent, meta.price, units),
                               [6 / 36 * 100, 1.25 / 54 * 100])
    # 3 changes (A once, B twice) over 6 product-days = 6 / 30.4375 product-months.
    assert ev.price_changes_per_product_month(meta, agent) == pytest.approx(3 / (6 / 30.4375))
    assert ev.price_changes_per_product_month(meta, meta.price) == 0.0
    assert ev.count_violations(meta, agent, MAX_CHANGE).as_dict() == {
        "bounds": 1, "daily_change": 2, "total": 3}
    # Day one counts from the price before the split: 4 after 5.5 is -27%.
    assert ev.count_violations(two_by_three((5.5, 4.0)), agent, MAX_CHANGE).daily_change == 3
    # ...unless no level could obey the rule (20 is far above A's max 8): not counted.
    assert ev.count_violations(two_by_three((20.0, 4.0)), agent, MAX_CHANGE).daily_change == 2
    oracle_scores = ev.score_policies(meta, {"agent": agent, "historical": meta.price}, units,
                                      reference="agent")
    assert oracle_scores["historical"]["share_of_oracle_pct"] == pytest.approx(90 / 97.25 * 100)


def test_distribution_stats() -> None:
    stats = ev.distribution_stats(np.array([-10.0, 0.0, 10.0, 20.0, np.nan]))
    assert stats["count"] == 4 and stats["mean"] == 5.0 and stats["median"] == 5.0
    assert stats["min"] == -10.0 and stats["max"] == 20.0 and stats["share_positive"] == 0.5
    assert ev.distribution_stats(np.array([np.nan]))["count"] == 0


def test_recommendations_csv_one_row_per_product_day(tmp_path: Path) -> None:
    meta = two_by_three()
    ev.write_recommendations(tmp_path / "r.csv", meta,
                             np.array([4.0, 5.004, 5.0051, 4.0, 6.5, 1 / 3]))
    assert (tmp_path / "r.csv").read_text().splitlines() == [
        "product_id,date,recommended_price",
        "A,2023-06-01,4.00", "A,2023-06-02,5.00", "A,2023-06-03,5.01",
        "B,2023-06-01,4.00", "B,2023-06-02,6.50", "B,2023-06-03,0.33"]


# ----------------------------------------------------------------------------------------------
# Loading the processed split and the run


def write_processed(folder: Path, meta: SplitMeta, split: str = "test",
                    prev_split: str | None = "val") -> None:
    """A minimal processed folder: meta and masks of ``split``, the last prices before it."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame({
        "product_index": pl.Series(meta.product_index, dtype=pl.Int32),
        "product_id": meta.product_id.tolist(), "date": pl.Series(meta.date, dtype=pl.Date),
        "split": [split] * meta.n_rows, "price": meta.price, "units": meta.units,
        "unit_cost": meta.unit_cost, "min_price": meta.min_price, "max_price": meta.max_price,
        "ref_price": meta.price})
    frame.write_parquet(folder / f"meta_{split}.parquet")
    mask = np.ones((meta.n_rows, meta.first_day_mask.shape[1]), dtype=np.int8)
    mask[meta.series_start] = meta.first_day_mask
    np.savez(folder / f"masks_{split}.npz", price_level=mask,
             price_move=np.ones((meta.n_rows, 3), dtype=np.int8))
    if prev_split is not None:
        starts = meta.series_start
        # Two days per product before the split; the later one is the price before day one.
        pl.DataFrame({
            "product_id": np.repeat(meta.product_id[starts], 2).tolist(),
            "date": pl.Series(np.tile(meta.date[0] - np.array([1, 2]), starts.size),
                              dtype=pl.Date),
            "price": np.column_stack([meta.prev_price, meta.prev_price * 2]).ravel(),
        }).write_parquet(folder / f"meta_{prev_split}.parquet")
    write_json(folder / "preprocessing_stats.json",
               {"price_levels": int(meta.first_day_mask.shape[1]),
                "max_daily_change": MAX_CHANGE})


def test_load_split_meta_round_trip(tmp_path: Path) -> None:
    meta = make_meta(n_days=4)
    write_processed(tmp_path, meta)
    loaded = bl.load_split_meta(tmp_path, "test")
    for field in dataclasses.fields(SplitMeta):
        np.testing.assert_array_equal(getattr(loaded, field.name), getattr(meta, field.name))
    # Without the earlier split the price before day one is unknown.
    (tmp_path / "meta_val.parquet").unlink()
    assert np.isnan(bl.load_split_meta(tmp_path, "test").prev_price).all()


def test_load_split_meta_rejects_unordered_rows(tmp_path: Path) -> None:
    meta = make_meta(n_days=3)
    swapped = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8])
    write_processed(tmp_path, dataclasses.replace(meta, date=meta.date[swapped]))
    with pytest.raises(BatchError, match=r"meta_test.parquet: row 2 is out of order"):
        bl.load_split_meta(tmp_path, "test")


def test_find_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(preset="tiny", flags={}, environ={})
    with pytest.raises(ModelError, match=r"no complete training run under models/"):
        ev.find_run_dir(settings)
    # Written in this order; hidden folders are unfinished (train's .partial-, storage's .tmp-).
    for name in ("old", "new", "no-model", ".partial-newer", ".tmp-1234-newest"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / ("agent.json" if name == "no-model" else "model.zip")
         ).write_bytes(b"")
        os.utime(tmp_path / "models" / name / ("agent.json" if name == "no-model" else
                                               "model.zip"), ns=(0, len(name) * 10**9))
    os.utime(tmp_path / "models" / "new" / "model.zip", ns=(0, 10 * 10**9))  # old: 3 s
    assert ev.find_run_dir(settings).name == "new"
    missing = load_settings(preset="tiny", flags={"evaluate.model": "models/nope"}, environ={})
    with pytest.raises(ModelError, match=r"model run folder not found: models/nope"):
        ev.find_run_dir(missing)


# ----------------------------------------------------------------------------------------------
# The stage end to end, with a stand-in policy module (the agent prices like greedy)


def stage_with_stand_in_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              truth: market.GroundTruth,
                              agent_prices: np.ndarray | None = None,
                              change_cost: np.ndarray | None = None) -> None:
    """A processed folder, ground_truth.json, a finished run and a policy module stand-in
    whose demand model is ``truth`` and whose agent prices like greedy (or ``agent_prices``),
    trained with ``change_cost``."""
    monkeypatch.chdir(tmp_path)
    meta = make_meta()
    write_processed(tmp_path / "data" / "processed", meta)
    write_json(tmp_path / "data" / "raw" / "ground_truth.json", truth.to_dict())
    (tmp_path / "models" / "run1").mkdir(parents=True)
    (tmp_path / "models" / "run1" / "model.zip").write_bytes(b"")
    demand = TruthDemand(make_truth())
    if agent_prices is None:
        agent_prices = bl.greedy_prices(meta, demand, K, MAX_CHANGE, change_cost)
    from pricing_cli.agent.policy import AgentConfig

    agent = SimpleNamespace(change_cost=change_cost, config=AgentConfig(
        algo="maskable-ppo", n_products=3, n_features=1, price_levels=K, net_arch=[8],
        embedding_dim=4, feature_hidden=8,
        price_change_cost=0.0 if change_cost is None else 1.0))
    monkeypatch.setattr(policy, "load_demand_model", lambda run_dir: demand)
    monkeypatch.setattr(policy, "load_agent", lambda run_dir, stats=None, demand=None: agent)
    monkeypatch.setattr(policy, "rollout_prices",
                        lambda agent, folder, split, settings=None: (None, agent_prices))


def test_run_evaluate_charges_change_costs_to_every_policy_but_the_oracle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta, truth = make_meta(), make_truth()
    demand = TruthDemand(truth)
    cost = np.array([30.0, 10.0, 50.0])
    stage_with_stand_in_agent(tmp_path, monkeypatch, truth, change_cost=cost)
    settings = load_settings(preset="tiny", flags={"evaluate.plot_products": 0}, environ={})
    with RunMonitor("evaluate", "quiet") as monitor:
        ev.run_evaluate(settings, monitor)
    evaluation = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    policies = evaluation["policies"]
    greedy = bl.greedy_prices(meta, demand, K, MAX_CHANGE, cost)
    previous = np.r_[np.nan, greedy[:-1]]
    previous[meta.series_start] = HISTORICAL
    paid = float(np.sum(cost[meta.product_index] * (np.abs(greedy / previous - 1) > 0.005)))
    assert paid > 0
    assert policies["greedy"]["fitted"]["change_costs"] == pytest.approx(paid)
    assert policies["greedy"]["fitted"]["profit"] == pytest.approx(
        profit(meta, demand, greedy) - paid)
    assert policies["oracle"]["true"]["change_costs"] == 0.0
    assert policies["oracle"]["true"]["profit"] == pytest.approx(
        profit(meta, demand, bl.oracle_prices(meta, truth, bl.ground_truth_index(
            meta, truth.index))))
    # Per-product uplift (the agent prices like greedy here) is net of change costs too.
    def net_by_product(prices: np.ndarray) -> np.ndarray:
        before = np.r_[np.nan, prices[:-1]]
        before[meta.series_start] = HISTORICAL
        moved = np.abs(prices / before - 1) > 0.005
        units = demand.expected_units(meta.product_index, meta.date, prices)
        return np.bincount(meta.product_index, (prices - meta.unit_cost) * units
                           - cost[meta.product_index] * moved)

    uplift = (net_by_product(greedy) / net_by_product(meta.price) - 1) * 100
    assert evaluation["agent_uplift_per_product_pct"]["fitted"]["mean"] == pytest.approx(
        uplift.mean())
    # The planner optimises the same objective, so it is never below greedy.
    assert policies["planner"]["fitted"]["profit"] >= policies["greedy"]["fitted"]["profit"]
    assert evaluation["price_change_cost"] == 1.0


def test_run_evaluate_writes_every_output(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    meta, truth = make_meta(), make_truth(order=(1, 2, 0))
    demand = TruthDemand(truth)
    greedy = bl.greedy_prices(meta, demand, K, MAX_CHANGE)
    stage_with_stand_in_agent(tmp_path, monkeypatch, truth)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "stale.txt").write_text("old")  # a file an earlier evaluate wrote
    (tmp_path / "reports" / OWNER_MARKER).write_text(json.dumps(
        {"written_by": "pricectl", "stage": "evaluate", "files": ["stale.txt"]}))

    settings = load_settings(preset="tiny", flags={"evaluate.plot_products": 2}, environ={})
    with RunMonitor("evaluate", "quiet") as monitor:
        result = ev.run_evaluate(settings, monitor)

    reports = tmp_path / "reports"
    every_policy = [f"prices_{name}.csv" for name in (
        "agent", "greedy", "historical", "oracle", "planner", "random", "static")]
    assert sorted(p.name for p in reports.iterdir()) == [
        OWNER_MARKER, "evaluation.json", "price_paths.png", *every_policy, "profit_by_policy.png",
        "recommendations.csv", "report.md", "uplift_histogram.png"]  # stale.txt is gone
    for name in ("greedy", "static", "historical"):
        written = pl.read_csv(reports / f"prices_{name}.csv")
        np.testing.assert_allclose(written["recommended_price"].to_numpy(),
                                   np.round({"greedy": greedy, "historical": meta.price,
                                             "static": bl.static_prices(
                                                 meta, demand, K, MAX_CHANGE)}[name], 2))
    for png in reports.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluation = json.loads((reports / "evaluation.json").read_text())
    policies = evaluation["policies"]
    assert evaluation["policy_order"] == [
        "agent", "historical", "static", "greedy", "planner", "random", "oracle"]
    assert sorted(policies) == sorted(evaluation["policy_order"])
    assert policies["agent"]["fitted"] == policies["greedy"]["fitted"]
    # The stand-in demand is the truth, so fitted and true scores agree.
    assert policies["static"]["true"]["profit"] == pytest.approx(
        policies["static"]["fitted"]["profit"])
    assert policies["oracle"]["true"]["share_of_oracle_pct"] == 100.0
    assert policies["agent"]["true"]["share_of_oracle_pct"] == pytest.approx(
        profit(meta, demand, greedy) / policies["oracle"]["true"]["profit"] * 100)
    assert policies["historical"]["fitted"]["profit"] == pytest.approx(
        profit(meta, demand, meta.price))
    for name in ("agent", "historical", "static", "greedy", "planner", "random"):
        assert policies[name]["violations"]["total"] == 0, name
    assert policies["oracle"]["exempt_from_daily_limit"] is True
    assert evaluation["agent_uplift_per_product_pct"]["true"]["count"] == 3
    recommendations = pl.read_csv(reports / "recommendations.csv")
    assert recommendations.columns == ["product_id", "date", "recommended_price"]
    assert recommendations.height == meta.n_rows == len(IDS) * N_DAYS
    np.testing.assert_allclose(recommendations["recommended_price"].to_numpy(),
                               np.round(greedy, 2))
    report_md = (reports / "report.md").read_text()
    for name in ("profit_by_policy.png", "price_paths.png", "uplift_histogram.png"):
        assert f"]({name})" in report_md
    assert result.summary["agent violations"] == 0
    assert result.summary["agent share of oracle % (true)"] == pytest.approx(
        policies["agent"]["true"]["share_of_oracle_pct"])
    # The verdict leads: a fixed historical price gives no held-out price change to check.
    assert result.notes[0].splitlines()[0] == (
        "VERDICT: not reliable: only 0 held-out price changes, fewer than 10: the response to "
        "price could not be checked")
    assert result.summary["verdict"] == result.notes[0].splitlines()[0].removeprefix("VERDICT: ")
    assert list(result.summary)[0] == "verdict"
    assert list(evaluation)[0] == "verdict"
    assert report_md.splitlines()[2] == f"**{result.notes[0].splitlines()[0]}**"
    table = result.notes[1].splitlines()
    assert table[0].split() == ["policy", "profit", "uplift", "checked", "chg/mo", "viol.",
                                "true", "profit", "true", "uplift", "of", "oracle"]
    assert [line.split()[0] for line in table[2:9]] == evaluation["policy_order"]
    assert table[8].split()[5] == "3*"  # the oracle's exempt violations
    assert table[2].split()[3] == "n/a"  # no held-out price change: nothing to check against
    assert max(len(line) for line in table) <= 80


def test_day_one_rule_agrees_with_the_processed_masks(tmp_path: Path) -> None:
    """The price before the split, read from meta_val, rebuilds masks_test exactly."""
    truth = agent_fixtures.write_processed(tmp_path, n_products=4, n_days=60, K=K)
    meta = bl.load_split_meta(tmp_path, "test")
    assert np.isfinite(meta.prev_price).all()
    np.testing.assert_array_equal(meta.day_one_mask(MAX_CHANGE), meta.first_day_mask)
    assert ev.count_violations(meta, meta.price, MAX_CHANGE).total == 0

    class FixtureDemand:
        def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                           prices: np.ndarray) -> np.ndarray:
            return agent_fixtures.true_expected_units(truth, product_index, dates, prices)

    greedy = bl.greedy_prices(meta, FixtureDemand(), K, MAX_CHANGE)
    assert ev.count_violations(meta, greedy, MAX_CHANGE).total == 0
    # Constant elasticity e and no weekday effect on it: the optimum cost * e / (e - 1) is the
    # same every day and profit is unimodal in price, so by the last day greedy sits on one of
    # the two grid levels around it.
    optimum = np.clip(truth["unit_cost"] * truth["elasticity"] / (truth["elasticity"] - 1),
                      truth["min_price"], truth["max_price"])
    upper = np.minimum((meta.grid < optimum[:, None]).sum(axis=1), K - 1)
    products = np.arange(4)
    last = greedy[meta.series_start + meta.series_length - 1]
    assert np.all((last == meta.grid[products, upper])
                  | (last == meta.grid[products, np.maximum(upper - 1, 0)]))


def test_run_evaluate_without_matching_ground_truth(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    other = dataclasses.replace(make_truth(), product_ids=("X-1", "X-2", "X-3"))
    stage_with_stand_in_agent(tmp_path, monkeypatch, other)
    settings = load_settings(preset="tiny", flags={"evaluate.plot_products": 0}, environ={})
    with RunMonitor("evaluate", "quiet") as monitor:
        result = ev.run_evaluate(settings, monitor)
    evaluation = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    assert evaluation["policy_order"] == [
        "agent", "historical", "static", "greedy", "planner", "random"]
    assert evaluation["ground_truth"] == {
        "used": False, "path": "data/raw/ground_truth.json",
        "note": "the products of data/raw/ground_truth.json do not match the processed data"}
    assert evaluation["policies"]["agent"]["true"] is None
    assert not (tmp_path / "reports" / "price_paths.png").exists()  # plot_products 0
    assert result.notes[-1] == ("true demand not scored: the products of "
                                "data/raw/ground_truth.json do not match the processed data")
    assert result.notes[1].splitlines()[0].split() == [
        "policy", "profit", "uplift", "checked", "chg/mo", "viol."]


def test_run_evaluate_rejects_agent_prices_of_another_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage_with_stand_in_agent(tmp_path, monkeypatch, make_truth(), agent_prices=np.ones(5))
    settings = load_settings(preset="tiny", flags={}, environ={})
    with RunMonitor("evaluate", "quiet") as monitor, pytest.raises(
            ModelError, match=r"the agent of models/run1 priced 5 rows but meta_test has 84"):
        ev.run_evaluate(settings, monitor)
    assert not (tmp_path / "reports").exists()


# ----------------------------------------------------------------------------------------------
# The real thing: train a tiny agent, then `pricectl evaluate` through the CLI


def fixture_ground_truth(truth: dict, n_products: int) -> market.GroundTruth:
    """The agent fixture's demand written as a market ground truth (no season, same weekdays)."""
    zeros = np.zeros(n_products)
    # Listed in reverse so the ground truth's own product order differs from product_index.
    order = np.arange(n_products)[::-1]
    return market.GroundTruth(
        product_ids=tuple(f"P{p:03d}" for p in order), category=("c",) * n_products,
        base_units=np.exp(truth["log_base"])[order], ref_price=truth["list_price"][order],
        elasticity=truth["elasticity"][order], season_amp=zeros, season_phase=zeros,
        unit_cost=truth["unit_cost"][order], min_price=truth["min_price"][order],
        max_price=truth["max_price"][order], elasticity_season=0.0, elasticity_weekend=0.0,
        dow_effect=np.asarray(truth["dow_effect"], dtype=np.float64))


def test_pricectl_evaluate_after_a_real_training_run(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pricing_cli.agent.train import run_train
    from pricing_cli.cli import main

    monkeypatch.chdir(tmp_path)
    n_products = 6
    truth = agent_fixtures.write_processed(tmp_path / "data" / "processed",
                                           n_products=n_products, K=K)
    ground_truth = fixture_ground_truth(truth, n_products)
    write_json(tmp_path / "data" / "raw" / "ground_truth.json", ground_truth.to_dict())
    # The fixture's demand and the ground truth agree on every product-day.
    meta = bl.load_split_meta(tmp_path / "data" / "processed", "test")
    np.testing.assert_allclose(
        market.expected_units(ground_truth, ground_truth.product_index(list(meta.product_id)),
                              meta.date, meta.price),
        agent_fixtures.true_expected_units(truth, meta.product_index, meta.date, meta.price))
    settings = load_settings(preset="tiny", environ={}, flags={
        "train.n_envs": 4, "train.net_arch": [16], "train.n_steps": 64, "train.batch_size": 64,
        "train.timesteps": 2000, "train.eval_every": 1000, "train.checkpoint_every": 1000,
        "train.tensorboard": False, "train.run_id": "r1"})
    with RunMonitor("train", "quiet") as monitor:
        run_train(settings, monitor, product=None, resume=False)

    assert main(["--preset", "tiny", "--quiet", "evaluate"]) == 0

    reports = tmp_path / "reports"
    assert sorted(p.name for p in reports.iterdir()) == [
        OWNER_MARKER, "evaluation.json", "price_paths.png",
        *[f"prices_{name}.csv" for name in ("agent", "greedy", "historical", "oracle", "planner",
                                             "random", "static")],
        "profit_by_policy.png", "recommendations.csv", "report.md", "run.json",
        "uplift_histogram.png"]
    evaluation = json.loads((reports / "evaluation.json").read_text())
    assert evaluation["run"] == "models/r1" and evaluation["ground_truth"]["used"]
    policies = evaluation["policies"]
    for name in ("agent", "historical", "static", "greedy", "planner", "random"):
        assert policies[name]["violations"]["total"] == 0, name
        # Nothing beats the true per-day optimum under the true demand.
        assert policies[name]["true"]["share_of_oracle_pct"] <= 100.0 + 1e-9, name
    assert policies["oracle"]["true"]["share_of_oracle_pct"] == 100.0
    assert policies["greedy"]["fitted"]["profit"] > policies["random"]["fitted"]["profit"]
    agent = policy.load_agent(tmp_path / "models" / "r1")
    _, prices = policy.rollout_prices(agent, tmp_path / "data" / "processed", "test")
    recommendations = pl.read_csv(reports / "recommendations.csv")
    assert recommendations.height == meta.n_rows
    np.testing.assert_allclose(recommendations["recommended_price"].to_numpy(),
                               np.round(prices, 2))
    assert recommendations["product_id"].to_list() == list(meta.product_id)
    # The demand model against the truth, recomputed here from both models directly.
    # (the point fit; the agent itself chooses on the ensemble's decision quantile)
    fitted_e = policy.load_demand_model(tmp_path / "models" / "r1").elasticity(
        meta.product_index, meta.date)
    true_e = market.elasticity(ground_truth, ground_truth.product_index(list(meta.product_id)),
                               meta.date)
    vs_truth = evaluation["demand_model"]["elasticity_vs_truth"]
    assert vs_truth["product_days"] == meta.n_rows
    assert vs_truth["mean_abs_relative_error_pct"] == pytest.approx(
        100 * np.mean(np.abs(fitted_e - true_e) / true_e))
    assert vs_truth["mean_abs_error"] == pytest.approx(np.mean(np.abs(fitted_e - true_e)))
    # the fixture's elasticities are well identified: within 15% on average
    assert vs_truth["mean_abs_relative_error_pct"] < 15
    assert evaluation["demand_model"]["fit"]["rows"] == meta.n_rows
    # The agent's uplift interval, recomputed from the saved ensemble's members by hand.
    from pricing_cli.agent.ensemble import DemandEnsemble

    members = DemandEnsemble.load(tmp_path / "models" / "r1").members
    assert len(members) == 8

    def member_profit(member, p: np.ndarray) -> float:
        return float(((p - meta.unit_cost)
                      * member.expected_units(meta.product_index, meta.date, p)).sum())

    uplifts = [(member_profit(m, prices) / member_profit(m, meta.price) - 1) * 100
               for m in members]
    interval = policies["agent"]["uplift_interval"]
    point = policies["agent"]["fitted"]["uplift_pct"]
    q_low, q_high = np.quantile(uplifts, [0.05, 0.95])
    # The basic bootstrap interval: centred on the point fit, mirrored through it.
    assert [interval["low"], interval["point"], interval["high"]] == pytest.approx(
        [2 * point - q_high, point, 2 * point - q_low])
    verdict = evaluation["verdict"]
    assert list(evaluation)[0] == "verdict"
    assert verdict["ground_truth"]["interval_covers_true_uplift"] == (
        interval["low"] <= policies["agent"]["true"]["uplift_pct"] <= interval["high"])
    assert sum(verdict["products_by_status"].values()) == n_products
    # The trust region holds for every grid policy (no fallback on this market).
    for name in ("agent", "static", "greedy", "planner", "random"):
        assert policies[name]["outside_trust_region"] == 0, name
    assert evaluation["trust_region"] == {"margin": 0.1, "adaptive_cap": 0.3,
                                          "products_limited": n_products}
    assert evaluation["decisions"] == {"ensemble_size": 8, "decision_quantile": 0.25}


def test_tables_say_when_profit_is_net_of_change_costs() -> None:
    from pricing_cli.agent.report import exempt_footnote

    evaluation = {"policies": {"agent": {}, "oracle": {}}, "price_change_cost": 0.25}
    assert exempt_footnote(evaluation) == (
        "* the oracle ignores the daily-change limit and change costs by design (exempt)\n"
        "profit is net of change costs (0.25 x mean best daily profit per change)")
    assert exempt_footnote({"policies": {"agent": {}, "oracle": {}}}) == (
        "* the oracle ignores the daily-change limit by design (exempt)")
    assert exempt_footnote({"policies": {"agent": {}}, "price_change_cost": 0.0}) is None
