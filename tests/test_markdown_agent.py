"""The markdown do-no-harm (issue 11): in an inventory market the env sells from the season
stock of stock.csv (load_market's stock state), the observation carries it, train publishes
the best of the network and the stock-aware policies on val, evaluate's agent row is what it
published, recommend refuses rather than price stock-blind, and resume stays bit for bit.

One session market (tests/conftest.py ``tiny_markdown``): the tiny preset, the markdown
scenario, 18-day seasons (val and test are one season each), through evaluate.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_cli.config import load_settings
from pricing_cli.monitor import RunMonitor
from tests.support.markets import MARKDOWN_CONFIG, copy_parts, working_dir
from tests.support.training import KillAt

STOCK_POLICIES = ("static", "greedy", "planner", "ladder")


def _settings(folder: Path, **flags: object):
    return load_settings(folder / MARKDOWN_CONFIG, preset="tiny", environ={},
                         flags={"data.stock": str(folder / "data/raw/stock.csv"),
                                "data.ground_truth": str(folder / "data/raw/ground_truth.json"),
                                "merge.output_dir": str(folder / "data/processed"),
                                "train.models_dir": str(folder / "models"), **flags})


@pytest.fixture(scope="module")
def wired(tiny_markdown: Path):
    """(market of the train split with its stock state, the stock data, the split meta)."""
    from pricing_cli.agent.baselines import load_split_meta
    from pricing_cli.agent.env import load_market
    from pricing_cli.agent.inventory import stock_data
    from pricing_cli.agent.policy import load_demand_model
    from pricing_cli.agent.processed import ProcessedData

    config = _settings(tiny_markdown)
    data = stock_data(config)
    assert data is not None
    processed = ProcessedData(Path(config.merge.output_dir))
    meta = load_split_meta(processed, "train")
    market = load_market(processed, "train", load_demand_model(tiny_markdown / "models/r1"),
                         stock=data.market_stock(meta))
    return market, data, meta


def test_load_market_fills_the_stock_state_from_stock_csv_and_the_season_calendar(wired):
    market, data, meta = wired
    stock = data.stock  # stock.csv as raw_contract.read_stock reads it
    keys = zip(stock["product_id"].to_list(), stock["date"].to_list(), strict=True)
    on_hand = dict(zip(keys, stock["on_hand"].to_list(), strict=True))
    days = (meta.date - np.datetime64("2023-01-01")).astype(int)
    # 120 days, seasons of 18 counted back from the last day: the first season is days 0-11.
    season_first = (days - 12) % 18 == 0
    first_row = np.r_[True, market.product_index[1:] != market.product_index[:-1]]
    np.testing.assert_array_equal(market.delivery, season_first | first_row)
    for row in np.flatnonzero(market.delivery):
        assert market.on_hand[row] == on_hand[(meta.product_id[row],
                                               meta.date[row].astype(object))]
    np.testing.assert_array_equal(market.days_to_season_end, 18 - (days - 12) % 18)
    truth = data.truth
    index = data.index(meta)
    # salvage_fraction 0.4 of the cost (ground_truth.json rounds the salvage to cents)
    np.testing.assert_allclose(market.salvage_margin,
                               truth.scenario.salvage[index] - truth.unit_cost[index])
    np.testing.assert_allclose(market.salvage_margin, -0.6 * truth.unit_cost[index],
                               atol=0.005)
    assert market.n_stock_features == 2 and market.n_features == market.features.shape[1] + 16


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), sample=st.booleans())
def test_the_wired_env_never_sells_more_than_it_has_on_hand(wired, seed, sample):
    """A random feasible policy over 30-day windows of the real markdown market: each day's
    sales are at most what is on hand (after a delivery: the delivery), the rest carries to
    the next day, and a season's last day leaves nothing (sold off)."""
    from pricing_cli.agent.env import EpisodeBatch
    from pricing_cli.pricing import random_feasible_levels

    market, _, _ = wired
    rng = np.random.default_rng(seed)
    candidates = market.episode_starts(30)
    starts = candidates[rng.integers(0, len(candidates), 6)]
    batch = EpisodeBatch(market, 6, sample_demand=sample)
    slots = np.arange(6)
    batch.begin(slots, starts, np.minimum(starts + 30, market.product_end[starts]))
    np.testing.assert_array_equal(batch.stock, market.on_hand[starts])
    for _ in range(30):
        live = slots[batch.row[slots] < batch.end[slots]]
        if live.size == 0:
            break
        rows = batch.row[live]
        before = np.where(market.delivery[rows], market.on_hand[rows], batch.stock[live])
        out = batch.step(live, random_feasible_levels(rng, batch.mask[live]), rng)
        assert np.all(out["units"] <= before + 1e-9) and np.all(out["units"] >= 0.0)
        ending = market.days_to_season_end[rows] == 1
        np.testing.assert_allclose(batch.stock[live],
                                   np.where(ending, 0.0, before - out["units"]), atol=1e-9)


def test_a_markdown_run_publishes_a_stock_aware_policy_no_worse_than_the_history(
        tiny_markdown: Path):
    run = tiny_markdown / "models/r1"
    config = json.loads((run / "agent.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    evaluation = json.loads((tiny_markdown / "reports/evaluation.json").read_text())
    # The observation: processed features + 2 stock features + K forecast + 3 endogenous.
    assert config["n_features"] == config["input_dim"] + 2 + config["price_levels"] + 3
    # Train compared the network with every stock-aware policy on val and kept the best.
    val = summary["val_profit_by_policy"]
    assert sorted(val) == sorted(("agent", *STOCK_POLICIES))
    published = config["published_policy"]
    assert summary["published_policy"] == published == evaluation["agent_policy"]
    assert val[published] == max(val.values())
    policies = evaluation["policies"]
    if published != "agent":  # the agent row is the published policy, priced on test
        assert policies["agent"]["true"]["profit"] == policies[published]["true"]["profit"]
    # Do no harm: measured agent (the planner) 11,871.3 against historical 11,229.5 (87.3%
    # and 82.6% of the DP value).
    assert policies["agent"]["true"]["profit"] >= policies["historical"]["true"]["profit"]
    shares = evaluation["inventory"]["share_of_dp_pct"]
    assert shares["agent"] >= shares["historical"]


def test_the_network_of_a_stock_run_prices_from_its_stock_or_refuses(tiny_markdown: Path):
    """Priced as a network (not what it published), the run's policy simulates the test
    split with the stock state; without the stock data it refuses, naming what is missing."""
    from pricing_cli.agent.policy import load_agent, rollout_prices
    from pricing_cli.errors import ModelError

    agent = load_agent(tiny_markdown / "models/r1")
    agent.config = dataclasses.replace(agent.config, published_policy="agent")
    config = _settings(tiny_markdown)
    levels, prices = rollout_prices(agent, Path(config.merge.output_dir), "test",
                                    settings=config)
    assert prices.shape == (12 * 18,) and np.all(np.isfinite(prices))
    blind = config.model_copy(update={"data": config.data.model_copy(update={"stock": None})})
    with pytest.raises(ModelError) as info:
        rollout_prices(agent, Path(config.merge.output_dir), "test", settings=blind)
    assert info.value.message == (
        f"{tiny_markdown / 'models/r1'} was trained on an inventory market (it prices from "
        "the season's stock), but no stock data are configured")


def test_recommend_refuses_a_stock_run_instead_of_pricing_stock_blind(tiny_markdown: Path,
                                                                     tmp_path: Path):
    from pricing_cli.agent.recommend import run_recommend
    from pricing_cli.errors import ModelError

    folder = copy_parts(tiny_markdown, tmp_path / "m", MARKDOWN_CONFIG, "data", "models")
    with working_dir(folder), RunMonitor("recommend", "quiet") as monitor:
        config = load_settings(Path(MARKDOWN_CONFIG), preset="tiny", environ={})
        with pytest.raises(ModelError) as info:
            run_recommend(config, monitor)
    published = json.loads((folder / "models/r1/agent.json").read_text())["published_policy"]
    assert info.value.message == (
        f"models/r1 was trained on an inventory market: its published {published} prices "
        "from the season's stock, and recommend does not carry the stock over the days ahead "
        "yet")


def test_a_killed_markdown_run_resumes_bit_for_bit_with_its_stock_state(tiny_markdown: Path,
                                                                        tmp_path: Path):
    """The units on hand are part of the checkpointed env state (rl_state.npz): a run killed
    after its first checkpoint and resumed equals the session's uninterrupted run."""
    import torch

    from pricing_cli.agent.train import run_train

    folder = copy_parts(tiny_markdown, tmp_path / "m", MARKDOWN_CONFIG, "data")
    config = _settings(folder, **{"train.run_id": "k"})
    with pytest.raises(KeyboardInterrupt), KillAt(1100) as monitor:
        run_train(config, monitor)
    with np.load(folder / "models/.partial-k/rl_state.npz") as saved:
        stock = saved["batch_stock"]
    assert stock.shape == (8,) and np.all(np.isfinite(stock))  # carried, not the inf default
    with RunMonitor("train", "quiet") as monitor:
        run_train(config, monitor, resume=True)

    def weights(run: Path) -> dict[str, torch.Tensor]:
        with zipfile.ZipFile(run / "model.zip") as archive:
            return torch.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)

    resumed, whole = folder / "models/k", tiny_markdown / "models/r1"
    runs = [json.loads((run / "train_summary.json").read_text()) for run in (resumed, whole)]
    assert runs[0]["resumed_from"].endswith("last_checkpoint.zip")
    assert runs[0]["evaluations"] == runs[1]["evaluations"]
    a, b = weights(resumed), weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
