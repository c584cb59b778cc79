"""Learning curves (agent/learning.py) and RL on a market with memory: a 3-product
reference-price market, trained for a few thousand steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pricing_cli.agent.learning import curve_table_lines, path_chooser, replayed_profit
from pricing_cli.agent.train import run_train
from pricing_cli.config import load_settings
from pricing_cli.monitor import RunMonitor
from tests.agent_fixtures import write_processed
from tests.support.training import SMALL, KillAt, policy_weights

# Loss aversion 2.5, gain 1.0, the reference an EWMA at rate 0.1 (half-life 6.6 days).
REFERENCE = (0.1, 2.5, 1.0)


@pytest.fixture(scope="module")
def reference_market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reference") / "processed"
    write_processed(folder, n_products=3, n_days=240, K=11, seed=0, true_elasticity=2.0,
                    reference_effect=REFERENCE)
    return folder


def train(processed: Path, models: Path, monitor: RunMonitor | None = None,
          resume: bool = False, **flags: object):
    settings = load_settings(preset="tiny", environ={}, flags={
        **SMALL, "merge.output_dir": str(processed), "train.models_dir": str(models),
        **{f"train.{k}": v for k, v in flags.items()}})
    with monitor or RunMonitor("train", "quiet") as m:
        return run_train(settings, m, resume=resume)


def summary_of(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


# configs/reference-rl.yaml's recipe (docs/agent.md, "Making RL learn"): a softer forecast
# prior (exploration), a longer horizon and episodes that outlast the reference's memory.
RECIPE = {"forecast_prior": 30.0, "learning_rate": 1e-3, "gamma": 0.97, "episode_length": 56,
          "ent_coef": 0.0}


@pytest.fixture(scope="module")
def curve_run(reference_market: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("curve") / "models"
    train(reference_market, models, run_id="c", tensorboard=True, timesteps=5120, **RECIPE)
    return models / "c"


def test_the_learning_curve_has_every_val_check_and_the_baselines_lines(curve_run) -> None:
    summary = summary_of(curve_run)
    # The fit found the memory (the lines below only differ because of it).
    assert summary["demand_fit"]["reference_prices"]["effect"] is not None
    curve = summary["learning_curve"]
    # Step 0, every eval_every (1000) and the end (5120: rollouts of 4 envs x 64 steps).
    assert [row["timesteps"] for row in curve] == [0, 1000, 2000, 3000, 4000, 5000, 5120]
    assert [row["network"] for row in curve] == [e["val_mean_profit"]
                                                for e in summary["evaluations"]]
    greedy, planner = summary["val_mean_profit_greedy"], summary["val_mean_profit_planner"]
    assert all(row["greedy"] == greedy and row["planner"] == planner for row in curve)
    # The forecast prior starts the network at greedy-in-state: the same prices, so the same
    # val profit to the last bit; the planner's path earns more (demand has a memory).
    assert curve[0]["network"] == greedy
    assert planner > greedy * 1.005
    # TensorBoard: one event file per line under tensorboard/val/.
    tags = sorted(p.name for p in (curve_run / "tensorboard" / "val").iterdir() if p.is_dir())
    assert tags == ["val_profit_per_product_day_greedy", "val_profit_per_product_day_network",
                    "val_profit_per_product_day_planner"]


def test_the_curve_reaches_the_report_table(curve_run) -> None:
    summary = summary_of(curve_run)
    lines = curve_table_lines(summary["learning_curve"], summary["best_timesteps"])
    assert lines[1] == "## Learning curve"
    assert f"kept the network of step {summary['best_timesteps']:,}." in lines[3]
    rows = [line for line in lines if line.startswith("| 5,120 |")]
    last = summary["learning_curve"][-1]
    assert rows == [f"| 5,120 | {last['network']:,.2f} | {last['greedy']:,.2f} | "
                    f"{last['planner']:,.2f} |"]
    assert curve_table_lines(None) == [] and curve_table_lines([]) == []


def test_rl_beats_greedy_on_val_where_demand_has_a_memory(curve_run) -> None:
    # Greedy is myopic in the reference state; RL learns to price for tomorrow's reference.
    summary = summary_of(curve_run)
    greedy, planner = summary["val_mean_profit_greedy"], summary["val_mean_profit_planner"]
    assert summary["best_timesteps"] > 0
    best = summary["val_mean_profit_best"]
    assert best == max(row["network"] for row in summary["learning_curve"])
    # Measured (seed 0): 491.72 greedy, 495.44 at step 5000, 497.89 the planner.
    assert best > greedy * 1.005
    # The planner is the best path under the same fitted model (up to its reference grid):
    # on val, in its own env, no policy should beat it.
    assert best < planner
    # Under evaluate's scoring of whole val paths too (train's published-policy choice).
    scored = summary["val_profit_by_policy"]
    assert scored["agent"] > scored["greedy"]


@pytest.fixture(scope="module")
def memoryless(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(ProcessedData, its point fit) of a 3-product memoryless market."""
    from pricing_cli.agent.demand import DemandModel
    from pricing_cli.agent.processed import ProcessedData

    folder = tmp_path_factory.mktemp("memoryless") / "processed"
    write_processed(folder, n_products=3, n_days=60, K=11, seed=1)
    processed = ProcessedData(folder)
    return processed, DemandModel.fit(processed.meta("train"),
                                      load_settings(preset="tiny", environ={}))


def test_a_fixed_path_replays_to_its_hand_computed_profit(memoryless) -> None:
    from pricing_cli.agent.env import load_market, simulate

    processed, demand = memoryless
    market = load_market(processed, "val", demand)
    # Each product holds the level its first day's mask allows nearest the middle: feasible
    # every day (holding), so nothing is clipped and the profit is the table's.
    first = np.nonzero(np.r_[True, np.diff(market.product_index) != 0])[0]
    masks = market.processed_masks(first)
    start = np.abs(np.arange(11)[None, :] - 5.0) + np.where(masks, 0.0, 99.0)
    levels = np.repeat(start.argmin(axis=1), np.diff(np.r_[first, market.n_rows]))
    rows = np.arange(market.n_rows)
    expected = ((market.prices(rows, levels) - market.unit_cost)
                * market.units_table[rows, levels]).mean()
    prices = market.prices(rows, levels)
    assert replayed_profit(market, prices) == pytest.approx(expected, rel=1e-12)
    played = simulate(market, path_chooser(market, levels))
    np.testing.assert_array_equal(played["levels"], levels)
    assert played["clipped_actions"] == 0


def test_resume_is_bit_for_bit_with_the_reference_state(reference_market, tmp_path) -> None:
    # The env's reference-price state is part of the checkpoint: a run killed mid-way and
    # resumed is the uninterrupted run (same curve, same weights).
    flags = {"forecast_prior": 0.0}
    train(reference_market, tmp_path / "whole", run_id="w", **flags)
    with pytest.raises(KeyboardInterrupt):
        train(reference_market, tmp_path / "k", KillAt(1500), run_id="k", **flags)
    train(reference_market, tmp_path / "k", resume=True, run_id="k", **flags)
    whole, resumed = tmp_path / "whole" / "w", tmp_path / "k" / "k"
    assert summary_of(resumed)["learning_curve"] == summary_of(whole)["learning_curve"]
    for name in ("model.zip", "last_checkpoint.zip"):
        a, b = (policy_weights(run / name) for run in (resumed, whole))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_each_episode_is_paid_by_one_ensemble_member(memoryless) -> None:
    import dataclasses

    from pricing_cli.agent.ensemble import DemandEnsemble
    from pricing_cli.agent.env import PriceVecEnv, load_market
    from pricing_cli.agent.learning import with_member_tables

    processed, demand = memoryless
    market = load_market(processed, "train", demand)
    # Two members: the fit, and the fit with every product's level doubled (log 2 more).
    doubled = dataclasses.replace(demand, mean=demand.mean + np.array([np.log(2.0), 0, 0, 0]))
    market = with_member_tables(market, DemandEnsemble([demand, doubled]))
    assert market.member_tables is not None
    np.testing.assert_array_equal(market.member_tables[0], market.units_table)
    np.testing.assert_allclose(market.member_tables[1], 2.0 * market.units_table, rtol=1e-6)
    env = PriceVecEnv(market, 8, episode_length=5, reward_scale=1.0, seed=3)
    env.reset()
    members = env.batch.member.copy()
    assert set(members) == {0, 1}  # both drawn among 8 episodes (seed 3)
    rows = env.batch.row.copy()
    levels = env.batch.mask.argmax(axis=1)
    _, reward, _, _ = env.step(levels)
    price = market.prices(rows, levels)
    paid = (price - market.unit_cost[rows]) * market.units_table[rows, levels] * (1 + members)
    np.testing.assert_allclose(reward, paid, rtol=1e-5)
