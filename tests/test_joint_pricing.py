"""Joint pricing of a category-day: greedy and planner with a fitted cross-price term, and
fitted scoring with each product's siblings at the policy's own prices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pricing_cli.agent.baselines import (
    CategoryDays,
    SplitMeta,
    greedy_prices,
    joint_levels,
    planned_prices,
)
from pricing_cli.agent.demand import DemandModel, policy_expected_units
from pricing_cli.agent.ensemble import DemandEnsemble, QuantileDemand

DAY = np.datetime64("2024-01-01")


def model(elasticity: float, cross: float | None, category: list[int],
          reference: list[float] | None = None) -> DemandModel:
    """log units = -elasticity * log(p / ref) + cross * (siblings' mean log(p / ref)): no
    calendar, one unit a day at the reference prices."""
    n = len(category)
    return DemandModel(
        mean=np.array([0.0, 0.0, 0.0, elasticity]), category_offset=np.zeros((1, 4)),
        product_offset=np.zeros((n, 4)), product_category=np.array(category),
        dow_effect=np.zeros(7), elasticity_modifiers=np.zeros(3),
        reference_price=np.array(reference or [1.0] * n), cross_price=cross)


def two_products(days: int = 2, *, upper_b: float = np.nan, cost: float = 0.5,
                 prev: float = np.nan) -> SplitMeta:
    """Products A (0) and B (1), ``days`` days each, grid {1, 1.5, 2} (K = 3), cost 0.5."""
    index = np.repeat([0, 1], days)
    n = index.size
    return SplitMeta(index, np.where(index == 0, "A", "B").astype(object),
                     np.tile(DAY + np.arange(days), 2), np.full(n, 1.5), np.ones(n),
                     np.full(n, cost), np.ones(n), np.full(n, 2.0),
                     first_day_mask=np.ones((2, 3), dtype=np.int8),
                     prev_price=np.full(2, prev),
                     trust_region=(np.full(2, np.nan), np.array([np.nan, upper_b])))


def category_profit(demand: DemandModel, meta: SplitMeta, prices: np.ndarray) -> float:
    units = policy_expected_units(demand, meta.product_index, meta.date, prices)
    return float(((prices - meta.unit_cost) * units).sum())


def test_two_substitutes_are_priced_at_their_joint_optimum() -> None:
    # Profit of a product at p with its sibling at q: (p - 0.5) p**-2 q**1.5. Alone (q at the
    # reference 1) each product's best level is p = 1 (0.5 vs 0.444 at 1.5 and 0.375 at 2);
    # jointly, both at 2 earn 2 * 1.5 * 2**-2 * 2**1.5 = 3 / sqrt(2) a day, the best of the
    # nine pairs: e.g. (2, 1.5) earns 1.5/4 * 1.5**1.5 + 1/2.25 * 2**1.5 = 1.946.
    meta = two_products()
    substitutes = model(2.0, 1.5, [0, 0])
    for policy in (greedy_prices, planned_prices):
        np.testing.assert_array_equal(policy(meta, substitutes, 3, 1.0), [2.0] * 4)
        np.testing.assert_array_equal(policy(meta, model(2.0, None, [0, 0]), 3, 1.0), [1.0] * 4)
    assert category_profit(substitutes, meta, np.full(4, 2.0)) == pytest.approx(
        2 * 3 / np.sqrt(2))
    day = two_products(1)
    best = max(category_profit(substitutes, day, np.array(pair))
               for pair in itertools.product([1.0, 1.5, 2.0], repeat=2))
    assert best == pytest.approx(3 / np.sqrt(2))
    assert category_profit(substitutes, day, np.array([2.0, 1.5])) == pytest.approx(
        1.5 / 4 * 1.5**1.5 + 1 / 2.25 * 2**1.5)


def test_joint_pricing_keeps_to_the_masks() -> None:
    # B's trust region stops at 1.5: with B there, A's best is 2 (0.689 + 1.257 = 1.946 vs
    # 1.633 at 1.5 and 1.363 at 1), and B's best below its cap is 1.5 (1.946 vs 1.789 at 1).
    meta = two_products(upper_b=1.5)
    for policy in (greedy_prices, planned_prices):
        np.testing.assert_array_equal(policy(meta, model(2.0, 1.5, [0, 0]), 3, 1.0),
                                      [2.0, 2.0, 1.5, 1.5])
    # A daily limit of 25% from yesterday's 1.0: day one can reach 1.0 only (1.5 is +50%).
    meta = two_products(prev=1.0)
    prices = greedy_prices(meta, model(2.0, 1.5, [0, 0]), 3, 0.25)
    np.testing.assert_array_equal(prices, [1.0] * 4)


def test_planner_matches_the_brute_force_joint_path_with_change_costs() -> None:
    meta = two_products(prev=1.0)
    substitutes = model(2.0, 1.5, [0, 0])
    cost = np.array([0.3, 0.3])
    paths = list(itertools.product([1.0, 1.5, 2.0], repeat=2))

    def net(prices: np.ndarray) -> float:
        previous = np.array([1.0, prices[0], 1.0, prices[2]])
        return category_profit(substitutes, meta, prices) - 0.3 * float(
            (prices != previous).sum())

    best = max(net(np.array([*a, *b])) for a in paths for b in paths)
    planned = planned_prices(meta, substitutes, 3, 1.0, cost)
    assert net(planned) == pytest.approx(best)
    # Greedy pays for a move only when today's category gain covers it, and is never better.
    assert net(greedy_prices(meta, substitutes, 3, 1.0, cost)) <= best + 1e-12


def random_market(seed: int = 3) -> tuple[SplitMeta, np.ndarray]:
    """9 products starting on different days, 40 days, 11 levels, masks, a trust region,
    merchant rule levels and change costs."""
    rng = np.random.default_rng(seed)
    n_products, days, K = 9, 40, 11
    starts = rng.integers(0, 6, n_products)
    index = np.concatenate([np.full(days - s, p) for p, s in enumerate(starts)])
    offset = np.concatenate([np.arange(s, days) for s in starts])
    n = index.size
    first = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    low = 2 + index * 0.3
    mask = (rng.random((n_products, K)) > 0.2).astype(np.int8)
    mask[:, 0] = 1
    meta = SplitMeta(index, np.array([f"P{i}" for i in index], dtype=object),
                     DAY + offset, low + low * 1.2 * rng.random(n), rng.random(n), low * 0.6,
                     low, low * 2.2, first_day_mask=mask,
                     prev_price=np.where(rng.random(n_products) > 0.3, low[first] * 1.5, np.nan),
                     trust_region=(low[first] * 1.1, low[first] * 2.1),
                     rule_levels=rng.random((n, K)) > 0.1)
    return meta, np.abs(rng.normal(3.0, 1.0, n_products))


def random_model(cross: float | None, category: np.ndarray, meta: SplitMeta) -> DemandModel:
    rng = np.random.default_rng(5)
    n = category.size
    first = meta.series_start
    return DemandModel(
        mean=np.array([np.log(20.0), 0.3, 0.1, 2.4]), category_offset=np.zeros((2, 4)),
        product_offset=rng.normal(0.0, 0.2, (n, 4)), product_category=category,
        dow_effect=np.r_[0.0, rng.normal(0.0, 0.1, 6)],
        elasticity_modifiers=np.array([0.1, 0.0, 0.05]),
        reference_price=(meta.min_price[first] + meta.max_price[first]) / 2, cross_price=cross)


def test_without_a_cross_price_term_every_product_is_priced_alone() -> None:
    # None and 0 take the per-product path; a cross-price term with no category takes the
    # joint path (walked date by date, products starting on different days), where no
    # product has a sibling: all three must give the same bytes.
    meta, change_cost = random_market()
    categories = np.arange(9) % 2
    for policy in (greedy_prices, planned_prices):
        for charge in (None, change_cost):
            alone = policy(meta, random_model(None, categories, meta), 11, 0.25, charge)
            zero = policy(meta, random_model(0.0, categories, meta), 11, 0.25, charge)
            no_siblings = policy(meta, random_model(0.8, np.full(9, -1), meta), 11, 0.25,
                                 charge)
            assert alone.tobytes() == zero.tobytes() == no_siblings.tobytes()
            linked = policy(meta, random_model(0.8, categories, meta), 11, 0.25, charge)
            assert (linked != alone).any()


def test_joint_pricing_earns_more_for_the_category_and_obeys_every_mask() -> None:
    from pricing_cli.agent.evaluate import count_violations, rows_outside_trust_region

    meta, change_cost = random_market()
    linked = random_model(0.8, np.arange(9) % 2, meta)

    class Alone:  # the same model with every sibling at its reference price
        reference_price = linked.reference_price

        def expected_units(self, product_index, dates, prices):  # noqa: ANN001, ANN201
            return linked.expected_units(product_index, dates, prices)

    for policy in (greedy_prices, planned_prices):
        joint = policy(meta, linked, 11, 0.25)
        alone = policy(meta, Alone(), 11, 0.25)
        assert category_profit(linked, meta, joint) > 1.1 * category_profit(linked, meta, alone)
        assert count_violations(meta, joint, 0.25).total == 0
        assert rows_outside_trust_region(meta, joint) == 0
        grid = meta.grid[meta.series_of_row]
        level = np.abs(grid - joint[:, None]).argmin(axis=1)
        assert meta.rule_levels is not None
        assert meta.rule_levels[np.arange(meta.n_rows), level].all()


def test_coordinate_ascent_stops_where_no_product_can_gain() -> None:
    meta, _ = random_market()
    linked = random_model(0.8, np.arange(9) % 2, meta)
    rows = np.flatnonzero(meta.date == DAY + 10)
    grid = meta.grid[meta.series_of_row[rows]]
    allowed = np.ones(grid.shape, dtype=np.int8)
    categories = CategoryDays.of(meta, linked)
    cost = meta.unit_cost[rows]
    levels = joint_levels(linked, meta.product_index[rows], meta.date[rows], grid, cost,
                          categories, rows, allowed, np.zeros(rows.size, dtype=np.int64))

    def total(chosen: np.ndarray) -> float:
        prices = grid[np.arange(rows.size), chosen]
        units = policy_expected_units(linked, meta.product_index[rows], meta.date[rows], prices)
        return float(((prices - cost) * units).sum())

    reached = total(levels)
    for i, k in itertools.product(range(rows.size), range(11)):
        moved = levels.copy()
        moved[i] = k
        assert total(moved) <= reached * (1 + 1e-9)


def test_fitted_scoring_of_cutting_every_sibling_gains_less_than_the_cuts_one_by_one() -> None:
    # e = 3, cross 1, cost 0.5, references 1: at p with the sibling at q a product sells
    # p**-3 q. History: both at 1.5, 1.5**-2 = 0.444 units each, profit 0.444 each.
    substitutes = model(3.0, 1.0, [0, 0])
    meta = two_products(1)
    history = np.array([1.5, 1.5])
    both_cut = np.array([1.0, 1.0])
    gain_both = category_profit(substitutes, meta, both_cut) - category_profit(
        substitutes, meta, history)
    # Both at 1: one unit each, profit 0.5 each.
    assert gain_both == pytest.approx(1.0 - 2 * 1.5**-2)
    one_by_one = sum(category_profit(substitutes, meta, np.where(np.arange(2) == i, 1.0, 1.5))
                     - category_profit(substitutes, meta, history) for i in range(2))
    # A alone at 1: A sells 1.5 (0.75 profit), B sells 1.5**-3 (profit 0.296).
    assert one_by_one == pytest.approx(2 * (0.75 + 1.5**-3 - 2 * 1.5**-2))
    assert gain_both < one_by_one
    # Siblings at their reference prices (the old scoring) would claim far more.
    old = float(((both_cut - 0.5) * substitutes.expected_units(np.arange(2), meta.date,
                                                                 both_cut)).sum()
                - ((history - 0.5) * substitutes.expected_units(np.arange(2), meta.date,
                                                                history)).sum())
    assert old == pytest.approx(2 * (0.5 - 1.5**-3)) and old > one_by_one > gain_both


def test_policy_units_through_an_ensemble_quantile() -> None:
    substitutes = model(3.0, 1.0, [0, 0])
    meta = two_products(1)
    prices = np.array([1.0, 1.5])
    quantile = QuantileDemand(DemandEnsemble([substitutes, substitutes]), 0.25, substitutes)
    np.testing.assert_allclose(
        policy_expected_units(quantile, meta.product_index, meta.date, prices),
        [1.5, 1.5**-3])


def test_agent_json_names_a_published_policy_it_does_not_know() -> None:
    from pathlib import Path

    from pricing_cli.agent.policy import check_agent_config
    from pricing_cli.errors import ModelError

    config = {"algo": "maskable-ppo", "n_products": 2, "n_features": 10, "price_levels": 3,
              "embedding_dim": 4, "feature_hidden": 8, "net_arch": [8]}
    for published in ("agent", "greedy", "planner"):
        assert check_agent_config({**config, "published_policy": published},
                                  Path("agent.json"))["published_policy"] == published
    with pytest.raises(ModelError, match=r"agent.json: key 'published_policy' is 'oracle': "
                                         r"expected one of agent, greedy, planner"):
        check_agent_config({**config, "published_policy": "oracle"}, Path("agent.json"))
