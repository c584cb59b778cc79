"""PriceEnv, PriceVecEnv, simulate and the extractor: checkers, masks, rewards by hand, shapes."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.env import (
    HELD_DAYS_SCALE,
    PriceEnv,
    PriceVecEnv,
    clip_to_feasible,
    load_market,
    random_feasible_policy,
    simulate,
)
from pricing_cli.agent.extractor import ProductFeaturesExtractor
from pricing_cli.config import load_settings
from pricing_cli.pricing import feasible_mask, price_grid
from tests.agent_fixtures import write_processed

K, F, N_PRODUCTS, EPISODE = 11, 20, 6, 10


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("processed")
    truth = write_processed(folder, n_products=N_PRODUCTS, K=K, F=F)
    demand = DemandModel.fit(pl.read_parquet(folder / "meta_train.parquet"),
                             load_settings(preset="tiny", environ={}))
    return folder, truth, demand, load_market(folder, "train", demand)


def make_env(world, **kwargs) -> PriceEnv:
    return PriceEnv(world[3], episode_length=EPISODE, reward_scale=0.01, **kwargs)


def test_env_passes_the_gymnasium_and_sb3_checkers(world) -> None:
    from gymnasium.utils.env_checker import check_env as gymnasium_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite feature bounds are on purpose
        gymnasium_check(make_env(world), skip_render_check=True)
        sb3_check(make_env(world), warn=False)


def test_spaces_use_a_box_product_index(world) -> None:
    env = make_env(world)
    space = env.observation_space
    assert space["product_id"].shape == (1,) and space["product_id"].high[0] == N_PRODUCTS - 1
    assert space["features"].shape == (F + K + 3,)
    assert env.action_space.n == K


def test_reward_is_margin_times_expected_units_times_scale(world) -> None:
    folder, _, demand, market = world
    env = make_env(world)
    _, info = env.reset(seed=3)
    row = info["row"]
    meta = pl.read_parquet(folder / "meta_train.parquet")
    level = int(np.nonzero(env.action_masks())[0][0])
    _, reward, terminated, truncated, step_info = env.step(level)
    price = price_grid(meta["min_price"][row], meta["max_price"][row], K)[level]
    units = demand.expected_units(np.array([meta["product_index"][row]]),
                                  meta["date"].to_numpy()[row:row + 1], np.array([price]))[0]
    assert step_info["price"] == price
    # The env reads units from its float32 demand table: equal to float32 precision.
    assert step_info["units"] == pytest.approx(units, rel=1e-6)
    assert step_info["units"] == float(np.float32(units))
    assert reward == pytest.approx((price - meta["unit_cost"][row]) * units * 0.01, rel=1e-6)
    assert not terminated and not truncated


def test_forecast_features_are_the_demand_models_relative_profit_per_level(world) -> None:
    folder, _, demand, market = world
    meta = pl.read_parquet(folder / "meta_train.parquet")
    rows = np.array([0, 17, 40])
    obs = market.observation(rows, market.previous_price[rows], market.held_days[rows])
    for i, row in enumerate(rows.tolist()):
        grid = price_grid(meta["min_price"][row], meta["max_price"][row], K)
        units = demand.expected_units(np.full(K, meta["product_index"][row]),
                                      np.repeat(meta["date"].to_numpy()[row], K), grid)
        profit = (grid - meta["unit_cost"][row]) * units
        want = np.clip(profit / profit.max(), -1, 1)
        np.testing.assert_allclose(obs["features"][i, F:F + K], want, rtol=1e-5, atol=1e-6)
        assert obs["features"][i, F + int(profit.argmax())] == pytest.approx(1.0)


def test_a_price_change_pays_the_change_cost_in_reward_and_forecast(world) -> None:
    import dataclasses

    folder, _, demand, market = world
    cost = np.arange(1.0, N_PRODUCTS + 1) * 7.0  # money per change, by product index
    costly = dataclasses.replace(market, change_cost=cost)
    free_env, env = make_env(world), PriceEnv(costly, episode_length=EPISODE, reward_scale=0.01)
    _, info = env.reset(seed=3)
    free_env.reset(seed=3)  # the same episode
    row = info["row"]
    product = int(market.product_index[row])
    grid = market.grid(np.array([row]))[0]
    last = market.previous_price[row]
    moves = np.abs(grid / last - 1.0) > 0.005
    # The forecast is today's profit net of the cost on every level that moves the price.
    obs = costly.observation(np.array([row]), np.array([last]), np.array([1.0]))
    profit = costly.level_profit(np.array([row]))[0]
    want = np.clip((profit - cost[product] * moves) / profit.max(), -1, 1)
    np.testing.assert_allclose(obs["features"][0, F:F + K], want, rtol=1e-5, atol=1e-6)
    # Moving pays the cost once; holding next day pays nothing.
    level = int(np.nonzero(env.action_masks() & moves)[0][0])
    _, reward, _, _, step = env.step(level)
    _, free_reward, _, _, _ = free_env.step(level)
    assert reward == pytest.approx(free_reward - cost[product] * 0.01, rel=1e-12)
    assert step["profit"] == pytest.approx(free_reward / 0.01 - cost[product], rel=1e-12)
    _, reward, _, _, _ = env.step(level)
    _, free_reward, _, _, _ = free_env.step(level)
    assert reward == pytest.approx(free_reward, rel=1e-12)


def test_sampled_demand_draws_poisson_units(world) -> None:
    env = make_env(world, sample_demand=True)
    env.reset(seed=0)
    units = []
    for _ in range(EPISODE):
        _, _, _, truncated, info = env.step(int(np.nonzero(env.action_masks())[0][-1]))
        units.append(info["units"])
    assert all(float(u).is_integer() for u in units)
    assert truncated


def test_an_episode_is_a_window_of_one_product_from_its_historical_state(world) -> None:
    folder, _, demand, market = world
    env = make_env(world)
    obs, info = env.reset(seed=11)
    start = info["row"]
    # Day one: the processed mask of the row, the historical price of the day before.
    with np.load(folder / "masks_train.npz") as masks:
        np.testing.assert_array_equal(env.action_masks(), masks["price_level"][start].astype(bool))
    X = np.load(folder / "X_train.npy")
    np.testing.assert_array_equal(obs["features"][:F], X[start])
    assert obs["product_id"][0] == market.product_index[start]
    rows = []
    for day in range(EPISODE):
        _, _, _, truncated, step = env.step(int(np.nonzero(env.action_masks())[0][0]))
        rows.append(step["row"])
        assert truncated == (day == EPISODE - 1)
    assert rows == list(range(start, start + EPISODE))
    assert len(set(market.product_index[rows])) == 1


def test_endogenous_features_follow_the_agents_own_prices(world) -> None:
    market = world[3]
    env = make_env(world)
    env.reset(seed=5)
    level = int(np.nonzero(env.action_masks())[0][-1])
    obs, _, _, _, info = env.step(level)
    row = info["row"] + 1
    ref, lo, hi = market.reference[row], market.min_price[row], market.max_price[row]
    expected = [np.log(info["price"] / ref), 1 / HELD_DAYS_SCALE, (info["price"] - lo) / (hi - lo)]
    np.testing.assert_allclose(obs["features"][F + K:], expected, rtol=1e-6)
    # The same price again: held for two days now; the mask is centred on that price.
    obs, _, _, _, again = env.step(level)
    assert again["price"] == info["price"]
    assert obs["features"][F + K + 1] == pytest.approx(2 / HELD_DAYS_SCALE)
    np.testing.assert_array_equal(
        env.action_masks(), feasible_mask(market.grid(np.array([row + 1]))[0], again["price"],
                                          market.max_daily_change)[0].astype(bool))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), actions=st.lists(st.integers(0, K - 1), min_size=1,
                                                      max_size=2 * EPISODE))
def test_prices_always_respect_the_masks(world, seed: int, actions: list[int]) -> None:
    """Whatever the agent asks for, every price is feasible from the previous one."""
    market = world[3]
    env = make_env(world)
    _, info = env.reset(seed=seed)
    previous = market.previous_price[info["row"]]
    first_day = True
    for action in actions:
        mask = env.action_masks()
        row = env.batch.row[0]
        grid = market.grid(np.array([row]))[0]
        if not first_day:  # day one uses the processed mask (checked elsewhere)
            np.testing.assert_array_equal(
                mask, feasible_mask(grid, previous, market.max_daily_change)[0].astype(bool))
        _, _, _, truncated, step = env.step(action)
        level = int(np.argmin(np.abs(grid - step["price"])))
        assert mask[level]
        assert step["clipped"] == (not mask[action])
        if not step["clipped"]:
            assert level == action
        if not first_day:
            assert abs(step["price"] / previous - 1) <= market.max_daily_change + 1e-9
        assert market.min_price[row] <= step["price"] <= market.max_price[row]
        previous, first_day = step["price"], False
        if truncated:
            _, info = env.reset()
            previous, first_day = market.previous_price[info["row"]], True


def test_clip_to_feasible_moves_to_the_nearest_feasible_level() -> None:
    mask = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 0, 1], [0, 1, 1, 1, 0]], dtype=bool)
    levels, moved = clip_to_feasible(np.array([0, 2, 2]), mask)
    assert levels.tolist() == [2, 0, 2]  # a tie (0 and 4 both 2 away) goes down
    assert moved.tolist() == [True, True, False]


def test_vec_env_steps_like_the_single_env_and_auto_resets(world) -> None:
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    market = world[3]
    vec = PriceVecEnv(market, 8, episode_length=EPISODE, reward_scale=0.01, seed=1)
    vec.seed(7)
    obs = vec.reset()
    assert is_masking_supported(vec)
    masks = get_action_masks(vec)
    assert masks.shape == (8, K) and masks.dtype == bool
    assert obs["features"].shape == (8, F + K + 3) and obs["product_id"].shape == (8, 1)
    rows = vec.batch.row.copy()
    actions = masks.argmax(axis=1)
    _, rewards, dones, infos = vec.step(actions)
    prices = market.prices(rows, actions)
    expected = (prices - market.unit_cost[rows]) * market.expected_units(rows, prices) * 0.01
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    assert not dones.any() and infos == [{}] * 8
    for _ in range(EPISODE - 1):
        _, rewards, dones, infos = vec.step(get_action_masks(vec).argmax(axis=1))
    assert dones.all()
    episode = infos[0]["episode"]
    assert episode["l"] == EPISODE and infos[0]["TimeLimit.truncated"]
    assert episode["r"] == pytest.approx(episode["profit"] * 0.01)
    assert infos[0]["terminal_observation"]["features"].shape == (F + K + 3,)
    assert (vec.batch.episode_length == 0).all()  # restarted
    # The same seed gives the same episodes.
    again = PriceVecEnv(market, 8, episode_length=EPISODE, seed=1)
    again.seed(7)
    np.testing.assert_array_equal(again.reset()["features"], obs["features"])


def test_simulate_prices_every_row_once_from_the_last_historical_price(world) -> None:
    folder, _, demand, _ = world
    val = load_market(folder, "val", demand)
    train_meta = pl.read_parquet(folder / "meta_train.parquet")
    last_train_price = train_meta.group_by("product_index").agg(pl.col("price").last())
    firsts = np.nonzero(np.r_[True, np.diff(val.product_index) != 0])[0]
    expected = dict(zip(*last_train_price.to_numpy().T.tolist(), strict=True))
    assert val.previous_price[firsts].tolist() == [expected[p] for p in val.product_index[firsts]]
    result = simulate(val, random_feasible_policy(np.random.default_rng(0)))
    assert (result["levels"] >= 0).all() and not np.isnan(result["prices"]).any()
    grid = val.grid(np.arange(val.n_rows))
    np.testing.assert_array_equal(grid[np.arange(val.n_rows), result["levels"]], result["prices"])
    with np.load(folder / "masks_val.npz") as masks:
        first_masks = masks["price_level"][firsts].astype(bool)
    assert first_masks[np.arange(len(firsts)), result["levels"][firsts]].all()
    later = np.setdiff1d(np.arange(val.n_rows), firsts)
    change = result["prices"][later] / result["prices"][later - 1] - 1
    assert np.abs(change).max() <= val.max_daily_change + 1e-9
    assert result["mean_profit"] == pytest.approx(result["profit"].mean())
    assert result["clipped_actions"] == 0


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_extractor_shapes_and_gradient_to_the_embedding(world, batch: int) -> None:
    space = make_env(world).observation_space
    extractor = ProductFeaturesExtractor(space, embedding_dim=4, hidden=12)
    assert extractor.features_dim == 16 and extractor.embedding.num_embeddings == N_PRODUCTS
    ids = torch.arange(batch, dtype=torch.float32).remainder(N_PRODUCTS)[:, None]
    out = extractor({"product_id": ids, "features": torch.randn(batch, F + K + 3)})
    assert out.shape == (batch, 16)
    # The first 4 outputs are the embedding rows of the ids.
    np.testing.assert_array_equal(out[:, :4].detach().numpy(),
                                  extractor.embedding.weight[ids[:, 0].long()].detach().numpy())
    out.sum().backward()
    grad = extractor.embedding.weight.grad
    used = np.unique(ids[:, 0].long().numpy())
    assert (grad[used].abs().sum(dim=1) > 0).all()
    unused = np.setdiff1d(np.arange(N_PRODUCTS), used)
    assert (grad[unused] == 0).all()


def test_forecast_prior_logits_are_the_scaled_forecast_at_the_start(world) -> None:
    from pricing_cli.agent.policy import action_logits, build_policy

    env = make_env(world)
    config = {"algo": "maskable-ppo", "n_products": N_PRODUCTS, "n_features": F + K + 3,
              "price_levels": K, "net_arch": [8], "embedding_dim": 4, "feature_hidden": 12,
              "forecast_prior": 50.0}
    policy = build_policy(config)
    assert policy.features_extractor.features_dim == 4 + 12 + K
    obs, _ = env.reset(seed=1)
    batch = {k: v[None] for k, v in obs.items()}
    tensor, _ = policy.obs_to_tensor(batch)
    logits = action_logits(policy, tensor).detach().numpy()[0]
    forecast = obs["features"][F:F + K]  # the K relative-profit columns
    np.testing.assert_allclose(logits, 50.0 * forecast, rtol=1e-6, atol=1e-5)
    # The extractor passes exactly those columns through, last.
    out = policy.extract_features(tensor)
    np.testing.assert_array_equal(out[0, -K:].detach().numpy(), forecast)


def test_release_pages_drops_the_feature_matrix_from_resident_memory(world, tmp_path) -> None:
    import dataclasses

    import psutil

    big = tmp_path / "X_big.npy"
    np.save(big, np.ones((4096, 4096), dtype=np.float32))  # 64 MiB
    market = dataclasses.replace(world[3], features=np.load(big, mmap_mode="r"))
    process = psutil.Process()
    before = process.memory_info().rss
    assert float(np.asarray(market.features).sum(dtype=np.float64)) == 4096 * 4096  # every page
    touched = process.memory_info().rss
    market.release_pages()
    released = process.memory_info().rss
    assert touched - before > 48 * 2**20
    assert touched - released > 48 * 2**20
    # the data is still there, read back from the page cache
    assert float(market.features[4095, 4095]) == 1.0


def test_env_carries_the_reference_state_and_matches_path_scoring(world) -> None:
    # A hand-set reference effect on the fitted model: the env's units are the table's times
    # exp(log_factor(price, reference)), the reference rolls with the agent's prices from the
    # historical one, and a whole split simulated at a constant level earns exactly what the
    # path scoring of evaluate gives the same prices.
    import dataclasses

    from pricing_cli.agent import reference as reference_module
    from pricing_cli.agent.baselines import load_split_meta
    from pricing_cli.agent.env import EpisodeBatch
    from pricing_cli.agent.evaluate import with_start_reference

    folder, _, demand, _ = world
    effect = reference_module.ReferenceEffect(rate=0.5, loss=2.0, gain=1.0)
    model = dataclasses.replace(demand, reference_effect=effect)
    market = load_market(folder, "val", model)
    assert market.history_reference is not None
    first = np.nonzero(np.r_[True, np.diff(market.product_index) != 0])[0]
    # The first val row's reference: the EWMA of the train prices, rolled one day further.
    meta = with_start_reference(load_split_meta(folder, "val"), model, folder, "val")
    np.testing.assert_allclose(market.history_reference[first], meta.start_reference)

    batch = EpisodeBatch(market, 1)
    row = int(first[1])
    batch.begin(np.array([0]), np.array([row]), np.array([row + 3]))
    start_ref = market.history_reference[row]
    out = batch.step(np.array([0]), np.array([K - 1]))
    price = out["prices"][0]
    expected = market.units_table[row, out["levels"][0]] * np.exp(
        effect.log_factor(price, start_ref))
    assert out["units"][0] == pytest.approx(expected, rel=1e-6)
    assert batch.reference[0] == pytest.approx(0.5 * start_ref + 0.5 * price)
    obs = batch.observe(np.array([0]))
    assert obs["features"][0, -3] == pytest.approx(np.log(price / batch.reference[0]), rel=1e-5)

    level = K // 2
    sim = simulate(market, lambda obs, mask: np.where(mask[:, level], level,
                                                      mask.argmax(axis=1)))
    scored = reference_module.units_along_path(model, meta, sim["prices"])
    np.testing.assert_allclose(sim["units"], scored, rtol=1e-5)


def test_train_split_references_start_at_the_first_price_everywhere(world) -> None:
    # The fit, the env and the planner's warm start agree on the train split's start: each
    # product's first historical price.
    import dataclasses

    from pricing_cli.agent import reference as reference_module
    from pricing_cli.agent.baselines import load_split_meta
    from pricing_cli.agent.evaluate import with_start_reference

    folder, _, demand, _ = world
    model = dataclasses.replace(demand, reference_effect=reference_module.ReferenceEffect(
        rate=0.2, loss=2.0, gain=1.0))
    market = load_market(folder, "train", model)
    meta = with_start_reference(load_split_meta(folder, "train"), model, folder, "train")
    np.testing.assert_allclose(meta.start_reference, meta.price[meta.series_start])
    np.testing.assert_allclose(market.history_reference,
                               reference_module.series_references(meta, model.reference_effect,
                                                                  meta.price))
