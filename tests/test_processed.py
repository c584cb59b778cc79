"""agent/processed.py: the one reader of data/processed, each file read once per run."""

from __future__ import annotations

import json
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pricing_cli.agent.processed import ProcessedData, ProcessedStats
from pricing_cli.errors import BatchError, MissingInputError

TINY_TRAIN = {"n_envs": 2, "net_arch": [8], "n_steps": 16, "batch_size": 16, "n_epochs": 1,
              "timesteps": 32, "eval_every": 1000, "checkpoint_every": 1000,
              "tensorboard": False, "torch_threads": 1, "embedding_dim": 4,
              "feature_hidden": 8, "ensemble_size": 2}
READERS = ("read_processed_meta", "read_processed_member", "read_processed_array",
           "read_processed_stats")


def count_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every call of merge's checked readers of processed files, by file name (the readers
    are imported inside functions, so patching the merge module catches every caller)."""
    from pricing_cli.stages import merge

    reads: Counter[str] = Counter()
    for name in READERS:
        real = getattr(merge, name)

        def counted(path: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            reads[Path(path).name] += 1
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(merge, name, counted)
    return reads


def settings_for(root: Path) -> Any:
    from pricing_cli.config import load_settings

    return load_settings(preset="tiny", environ={}, flags={
        "merge.output_dir": str(root / "data" / "processed"),
        "train.models_dir": str(root / "models"), "train.run_id": "r1",
        "evaluate.reports_dir": str(root / "reports"),
        "data.ground_truth": str(root / "no_truth.json"),
        **{f"train.{k}": v for k, v in TINY_TRAIN.items()}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pricing_cli.agent.train import run_train
    from pricing_cli.monitor import RunMonitor
    from tests.agent_fixtures import write_processed

    root = tmp_path_factory.mktemp("processed")
    write_processed(root / "data" / "processed", K=11)
    with pytest.MonkeyPatch.context() as patch, RunMonitor("train", "quiet") as monitor:
        reads = count_reads(patch)
        run_train(settings_for(root), monitor)
    (root / "train_reads.json").write_text(json.dumps(reads))
    return root


def test_train_reads_each_file_once_and_never_the_test_split(trained: Path) -> None:
    reads = json.loads((trained / "train_reads.json").read_text())
    # (labels_train.npz only with warm_start bc, not the tiny preset's default)
    assert reads == {"X_train.npy": 1, "X_val.npy": 1, "masks_train.npz": 1,
                     "masks_val.npz": 1, "meta_train.parquet": 1, "meta_val.parquet": 1,
                     "preprocessing_stats.json": 1}


def test_one_evaluate_reads_each_processed_file_once(
        trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pricing_cli.agent.evaluate import run_evaluate
    from pricing_cli.monitor import RunMonitor

    reads = count_reads(monkeypatch)
    loads: Counter[str] = Counter()
    from pricing_cli.agent import demand as demand_module

    real_load = demand_module.DemandModel.load.__func__  # type: ignore[attr-defined]

    def counted_load(cls: Any, folder: Any) -> Any:
        loads["DemandModel.load"] += 1
        return real_load(cls, folder)

    monkeypatch.setattr(demand_module.DemandModel, "load", classmethod(counted_load))
    with RunMonitor("evaluate", "quiet") as monitor:
        run_evaluate(settings_for(trained), monitor)
    # The test split's meta was parsed three times and its stats twice before the one reader,
    # and the demand model loaded twice;
    # the earlier splits' meta is read once for the price before day one, the closed days and
    # the reference (each from the same frame).
    assert dict(reads) == {"meta_train.parquet": 1, "meta_val.parquet": 1,
                           "meta_test.parquet": 1, "masks_test.npz": 1, "X_test.npy": 1,
                           "preprocessing_stats.json": 1}
    assert loads == {"DemandModel.load": 1 + 2}  # the point fit and the 2 ensemble members
    assert (trained / "reports" / "evaluation.json").is_file()


def test_the_price_before_day_one_is_the_latest_earlier_day(tmp_path: Path) -> None:
    # b has no val rows: its last train price is the price before test; c is new in test.
    for split, rows in {"train": [("a", 1, 5.0), ("a", 2, 6.0), ("b", 1, 7.0)],
                        "val": [("a", 4, 8.0), ("a", 3, 9.0)]}.items():
        pl.DataFrame({"product_id": [r[0] for r in rows],
                      "date": pl.Series([date(2024, 1, r[1]) for r in rows], dtype=pl.Date),
                      "price": [r[2] for r in rows],
                      }).write_parquet(tmp_path / f"meta_{split}.parquet")
    processed = ProcessedData(tmp_path)
    before = processed.last_prices_before("test", np.array(["a", "b", "c"], dtype=object))
    np.testing.assert_array_equal(before, [8.0, 7.0, np.nan])  # a: day 4 (8.0), not row order
    np.testing.assert_array_equal(processed.last_prices_before("val", np.array(["a"])), [6.0])
    assert np.isnan(processed.last_prices_before("train", np.array(["a"]))).all()
    # A reader through val does not see the test split.
    through_val = ProcessedData(tmp_path, through="val")
    assert not through_val.has_split("test")
    with pytest.raises(ValueError, match="the test split is not read here"):
        through_val.meta("test")


def test_stats_are_typed_and_missing_files_say_what_to_run(tmp_path: Path) -> None:
    stats = ProcessedStats.from_dict({"price_levels": 11, "max_daily_change": 0.25,
                                      "input_dim": 20, "products": 6,
                                      "samples": {"train": 3}})
    assert (stats.price_levels, stats.max_daily_change, stats.input_dim, stats.products,
            stats.samples) == (11, 0.25, 20, 6, {"train": 3})
    assert ProcessedStats.from_dict({"price_levels": 3, "max_daily_change": 0.1,
                                     "products": True}).products is None
    with pytest.raises(BatchError, match="stats.json lacks the key 'max_daily_change'"):
        ProcessedStats.from_dict({"price_levels": 3}, "stats.json")
    with pytest.raises(MissingInputError) as caught:
        _ = ProcessedData(tmp_path).stats
    assert caught.value.message == (
        f"processed file {tmp_path / 'preprocessing_stats.json'} not found")
    assert caught.value.hint == "Run `pricectl merge` (after preprocess) to build data/processed/."


class PowerDemand:
    """Constant-elasticity demand with a weekday swing: a stand-in for the fitted model."""

    def __init__(self, n_products: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.n_products = n_products
        self.base = rng.uniform(5.0, 40.0, n_products)
        self.elasticity = rng.uniform(1.2, 3.0, n_products)
        self.list_price = rng.uniform(5.0, 50.0, n_products)

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        p = np.asarray(product_index, dtype=np.int64)
        dow = (np.asarray(dates).astype("datetime64[D]").astype(np.int64) + 3) % 7
        return (self.base[p] * (1.0 + 0.1 * dow)
                * (np.asarray(prices, dtype=np.float64) / self.list_price[p])
                ** -self.elasticity[p])


def test_simulator_planner_and_scorer_agree_on_one_random_case(tmp_path: Path) -> None:
    """The env (simulator), the planner (baselines) and evaluate (scorer) on the same rows and
    prices: the planner's every price is feasible where the env's mask says so, and the env's
    units, profit and change costs are evaluate's, from the same price before day one."""
    from pricing_cli.agent import env as env_module
    from pricing_cli.agent import evaluate as ev
    from pricing_cli.agent.baselines import load_split_meta, planned_prices
    from tests.agent_fixtures import write_processed

    write_processed(tmp_path, n_products=5, n_days=60, K=9, seed=13)
    processed = ProcessedData(tmp_path)
    demand = PowerDemand(5, seed=13)
    change_cost = np.random.default_rng(13).uniform(0.0, 30.0, 5)
    market = env_module.load_market(processed, "val", demand, change_cost=change_cost)
    meta = load_split_meta(processed, "val")
    K, limit = market.price_levels, market.max_daily_change
    prices = planned_prices(meta, demand, K, limit, change_cost)
    # Day one of both starts from the same price before the split (processed.py's rule).
    np.testing.assert_array_equal(market.previous_price[meta.series_start], meta.prev_price)
    levels = np.abs(meta.grid[meta.series_of_row] - prices[:, None]).argmin(axis=1)
    np.testing.assert_array_equal(meta.grid[meta.series_of_row, levels], prices)
    days = [0]
    feasible_in_env: list[bool] = []

    def replay(obs: Any, mask: np.ndarray) -> np.ndarray:
        _, rows = meta.rows_on_day(days[0])
        days[0] += 1
        feasible_in_env.extend(mask[np.arange(len(rows)), levels[rows]].tolist())
        return levels[rows]

    result = env_module.simulate(market, replay)
    assert result["clipped_actions"] == 0 and all(feasible_in_env)
    assert len(feasible_in_env) == meta.n_rows
    np.testing.assert_array_equal(result["prices"], prices)
    units = ev.policy_units(demand, meta, prices)
    np.testing.assert_allclose(result["units"], units, rtol=1e-6)  # the env's table: float32
    paid = ev.change_costs_per_row(meta, prices, change_cost)
    assert np.count_nonzero(paid) > 0  # the planner moved, and paid for it
    np.testing.assert_allclose(result["profit"], (prices - meta.unit_cost) * units - paid,
                               rtol=1e-6)
    assert ev.count_violations(meta, prices, limit).total == 0
    # Both count a change by pricing.is_price_change (the move onto day one aside).
    inner_changes = np.count_nonzero(paid) - np.count_nonzero(paid[meta.series_start])
    assert ev.price_changes_per_product_month(meta, prices) == pytest.approx(
        inner_changes / (meta.n_rows / ev.DAYS_PER_MONTH))


def test_the_env_and_evaluate_draw_the_same_random_baseline(tmp_path: Path) -> None:
    """One random-feasible rule (pricing.random_feasible_levels): train's context figure
    (the env's random policy) and evaluate's random baseline price alike from one seed."""
    from pricing_cli.agent import env as env_module
    from pricing_cli.agent.baselines import load_split_meta, random_feasible_prices
    from pricing_cli.pricing import random_feasible_levels
    from tests.agent_fixtures import write_processed

    write_processed(tmp_path, n_products=4, n_days=60, K=9, seed=5)
    processed = ProcessedData(tmp_path)
    market = env_module.load_market(processed, "val", PowerDemand(4, seed=5))
    meta = load_split_meta(processed, "val")
    simulated = env_module.simulate(
        market, env_module.random_feasible_policy(np.random.default_rng(7)))["prices"]
    walked = random_feasible_prices(meta, market.price_levels, market.max_daily_change, seed=7)
    np.testing.assert_array_equal(simulated, walked)
    # Uniform among the feasible levels, never an infeasible one: 3 of 5 levels allowed.
    mask = np.tile(np.array([0, 1, 1, 0, 1], dtype=np.int8), (30_000, 1))
    drawn = random_feasible_levels(np.random.default_rng(0), mask)
    counts = np.bincount(drawn, minlength=5)
    assert counts[[0, 3]].sum() == 0
    np.testing.assert_allclose(counts[[1, 2, 4]] / 30_000, 1 / 3, atol=0.01)
