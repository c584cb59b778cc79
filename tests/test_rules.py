"""Merchant guardrails (config section ``rules``): every recommended price obeys every rule.

The property test draws random rule sets and checks each policy's prices with rules written
out again here, independently of :func:`pricing.rule_masks`.
"""

from __future__ import annotations

import dataclasses
from datetime import date

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricing_cli.agent import recommend as rc
from pricing_cli.config import RuleSet, RulesSettings
from pricing_cli.errors import ConfigError
from pricing_cli.pricing import (
    ProductRules,
    binding_rules,
    is_price_change,
    resolve_rules,
    rule_masks,
    snap_to_rules,
)

IDS = ("A", "B", "C")
CATEGORIES = ("food", "food", "toys")
COST = np.array([4.0, 10.0, 2.5])
LOW, HIGH = np.array([5.0, 12.0, 3.0]), np.array([9.0, 20.0, 6.0])
CURRENT = np.array([6.50, 15.00, 4.00])
LAST_DAY = np.datetime64("2024-03-31")


class ConstantElasticity:
    """units = 50 * (price / 7) ** -2.5, whatever the product and the day."""

    def expected_units(self, product_index: np.ndarray, dates: np.ndarray,
                       prices: np.ndarray) -> np.ndarray:
        return 50.0 * (np.asarray(prices, dtype=np.float64) / 7.0) ** -2.5


def state(history: np.ndarray | None = None) -> rc.ProductState:
    if history is None:
        history = np.tile(CURRENT[:, None], (1, rc.MONTH_DAYS))
    return rc.ProductState(
        product_index=np.arange(3), product_id=np.array(IDS, dtype=object),
        category=list(CATEGORIES), unit_cost=COST, min_price=LOW, max_price=HIGH,
        price=CURRENT.copy(), last_date=LAST_DAY, history=history, last_rows=[])


def horizon(rules: ProductRules, days: int = 14, history: np.ndarray | None = None,
            competitor: np.ndarray | None = None) -> rc.Horizon:
    dates = LAST_DAY + 1 + np.arange(days)
    return rc.build_horizon(state(history), rules, dates, ConstantElasticity(), 11, None,
                            competitor)


def rules_of(**default: object) -> ProductRules:
    return resolve_rules(RulesSettings(default=RuleSet(**default)), IDS, CATEGORIES, 0.25)


# ----------------------------------------------------------------------------------------------
# Resolution and the single rules


def test_product_rules_override_category_rules_override_the_default() -> None:
    rules = resolve_rules(RulesSettings(
        default=RuleSet(min_margin=0.1, max_change_per_week=0.3),
        categories={"food": RuleSet(min_margin=0.2)},
        products={"B": RuleSet(min_margin=0.3, freeze=True)}), IDS, CATEGORIES, 0.25)
    np.testing.assert_array_equal(rules.min_margin, [0.2, 0.3, 0.1])
    np.testing.assert_array_equal(rules.max_change_per_week, [0.3, 0.3, 0.3])
    np.testing.assert_array_equal(rules.max_change_per_day, [0.25, 0.25, 0.25])
    np.testing.assert_array_equal(rules.freeze, [False, True, False])
    assert rules.sources[1]["min_margin"] == "rules.products.B.min_margin"
    assert rules.sources[0]["min_margin"] == "rules.categories.food.min_margin"


def test_unknown_product_in_rules_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"rules.products names 'Z', not in the priced data"):
        resolve_rules(RulesSettings(products={"Z": RuleSet(freeze=True)}), IDS, CATEGORIES, 0.25)


def test_snapping_to_endings_and_ladders() -> None:
    rules = resolve_rules(RulesSettings(products={
        "A": RuleSet(price_endings=[0.49, 0.99]), "B": RuleSet(price_ladder=[12.5, 15.0, 19.99])}),
        IDS, CATEGORIES, 0.25)
    prices = np.array([[5.0, 5.3, 5.8, 6.80], [12.0, 14.0, 17.6, 20.0], [3.1, 3.2, 3.3, 3.4]])
    np.testing.assert_allclose(snap_to_rules(prices, rules), [
        [4.99, 5.49, 5.99, 6.99], [12.5, 15.0, 19.99, 19.99], [3.1, 3.2, 3.3, 3.4]])


def test_rule_masks_hand_computed() -> None:
    rules = resolve_rules(RulesSettings(default=RuleSet(min_margin=0.3, max_above_competitor=0.1,
                                                        max_changes_per_month=2)),
                          IDS, CATEGORIES, 0.25)
    candidates = np.array([[5.0, 6.0, 7.0], [12.0, 15.0, 18.0], [3.0, 4.0, 5.5]])
    masks = rule_masks(candidates, COST, LOW, HIGH, rules, previous=np.array([6.0, 15.0, 4.0]),
                       week_ago=np.full(3, np.nan), changes_in_month=np.array([0, 2, 5]),
                       day=LAST_DAY + 1, competitor=np.array([6.0, np.nan, 4.0]))
    # margin (p - c) / p >= 0.3: A needs p >= 5.71, B p >= 14.29, C p >= 3.57
    np.testing.assert_array_equal(masks["min_margin"], [[0, 1, 1], [0, 1, 1], [0, 1, 1]])
    # at most 10% over the competitor: A <= 6.6, B unknown (no limit), C <= 4.4
    np.testing.assert_array_equal(masks["max_above_competitor"], [[1, 1, 0], [1, 1, 1],
                                                                  [1, 1, 0]])
    # A has changes left; B and C used them up: only holding yesterday's price
    np.testing.assert_array_equal(masks["max_changes_per_month"], [[1, 1, 1], [0, 1, 0],
                                                                   [0, 1, 0]])
    np.testing.assert_array_equal(masks["max_change_per_day"], [[1, 1, 1], [1, 1, 1],
                                                                [1, 1, 0]])
    chosen = binding_rules(masks, unconstrained=np.array([2, 0, 2]), chosen=np.array([1, 1, 2]))
    assert chosen.tolist() == ["max_above_competitor", "max_changes_per_month", "none"]


def test_rules_leaving_no_price_name_the_product_and_the_rules() -> None:
    rules = resolve_rules(RulesSettings(products={"B": RuleSet(min_margin=0.5, freeze=True)}),
                          IDS, CATEGORIES, 0.25)
    with pytest.raises(ConfigError) as caught:
        rc.walk(horizon(rules), rc.greedy_policy(horizon(rules)))
    assert caught.value.message == (
        "the rules leave no feasible price for product 'B' on 2024-04-01: "
        "rules.products.B.freeze, preprocess.max_daily_change, rules.products.B.min_margin "
        "together refuse every candidate price")
    # Holding 15.00 (margin 33%) is all the freeze allows; without the margin rule it is fine.
    assert caught.value.hint == (
        "Loosen rules.products.B.min_margin for this product (every rule is optional; see "
        "docs/recommend.md), or widen its catalog min_price/max_price.")


def test_freeze_holds_the_current_price_exactly_and_is_the_binding_rule() -> None:
    rules = resolve_rules(RulesSettings(products={"A": RuleSet(freeze=True)}),
                          IDS, CATEGORIES, 0.25)
    h = horizon(rules)
    plan = rc.walk(h, rc.greedy_policy(h))
    np.testing.assert_array_equal(plan.prices[:, 0], np.full(14, 6.50))
    # With no rule greedy would move A (it prices B and C away from their current prices).
    assert plan.binding[0, 0] == "freeze"
    assert is_price_change(plan.prices[0, 1:], CURRENT[1:]).all()


def test_greedy_is_the_best_allowed_candidate_each_day() -> None:
    rules = rules_of(min_margin=0.35)
    h = horizon(rules, days=3)
    plan = rc.walk(h, rc.greedy_policy(h))
    # Constant elasticity 2.5: the best price is cost * 2.5 / 1.5, above the margin floor for
    # A (6.67 vs 6.15) once the daily limit allows it: 6.50 -> 6.60 (grid step 0.4 from 5).
    grid_a = np.linspace(5.0, 9.0, 11)
    assert plan.prices[0, 0] == pytest.approx(grid_a[4])  # 6.6: best of the allowed levels


# ----------------------------------------------------------------------------------------------
# The property: every price of every policy obeys every rule


def obeys_every_rule(h: rc.Horizon, plan: rc.Plan, rules: RuleSet, history: np.ndarray,
                     competitor: np.ndarray | None) -> None:
    """Fail unless every price of ``plan`` obeys ``rules`` (written out independently)."""
    prices = plan.prices.T  # (n, H)
    path = np.concatenate([history, prices], axis=1)  # history ends the day before day one
    start = history.shape[1]
    for i in range(3):
        for d in range(prices.shape[1]):
            p, t = prices[i, d], start + d
            where = f"product {IDS[i]} day {d}: {p}"
            assert LOW[i] - 1e-9 <= p <= HIGH[i] + 1e-9, where
            assert abs(p / path[i, t - 1] - 1) <= (rules.max_change_per_day or 0.25) + 1e-9, where
            if rules.max_change_per_week is not None:
                assert abs(p / path[i, t - 7] - 1) <= rules.max_change_per_week + 1e-9, where
            if rules.max_changes_per_month is not None and p != path[i, t - 1]:
                # A change today: with it, at most N changes on the 30 days ending today.
                window = path[i, t - 30:t + 1]
                changes = int(is_price_change(window[1:], window[:-1]).sum())
                assert changes <= rules.max_changes_per_month, where
            if rules.min_margin is not None:
                assert (p - COST[i]) / p >= rules.min_margin - 1e-9, where
            if rules.price_endings is not None:
                cents = round(p * 100) % 100
                assert cents in {round(e * 100) for e in rules.price_endings}, where
            if rules.price_ladder is not None:
                assert min(abs(p - r) for r in rules.price_ladder) < 1e-9, where
            frozen = rules.freeze or any(
                period.start <= (h.days[d]).astype(object) <= period.end
                for period in rules.freeze_periods or [])
            if frozen:
                assert p == path[i, t - 1], where
            if rules.max_above_competitor is not None and competitor is not None:
                assert p <= competitor[d, i] * (1 + rules.max_above_competitor) + 1e-9, where


rule_sets = st.builds(
    RuleSet,
    min_margin=st.none() | st.sampled_from([0.1, 0.3, 0.45]),
    max_change_per_day=st.none() | st.sampled_from([0.05, 0.1, 0.4]),
    max_change_per_week=st.none() | st.sampled_from([0.1, 0.2]),
    max_changes_per_month=st.none() | st.integers(0, 3),
    price_endings=st.none() | st.sampled_from([[0.99], [0.49, 0.99], [0.0, 0.5]]),
    freeze=st.none() | st.just(True),
    freeze_periods=st.none() | st.just([{"start": date(2024, 4, 3), "end": date(2024, 4, 6)}]),
    max_above_competitor=st.none() | st.sampled_from([0.0, 0.05, 0.2]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_set=rule_sets, policy=st.sampled_from(["greedy", "planner", "static", "historical"]),
       moves=st.lists(st.sampled_from([0.9, 1.0, 1.1]), min_size=rc.MONTH_DAYS,
                      max_size=rc.MONTH_DAYS))
def test_every_recommended_price_obeys_every_rule(rule_set: RuleSet, policy: str,
                                                  moves: list[float]) -> None:
    # A history that moved: the weekly and monthly rules then depend on it.
    factors = np.cumprod(np.array(moves[::-1]))[::-1] / moves[-1]
    history = np.clip(CURRENT[:, None] / factors[None, :], LOW[:, None], HIGH[:, None])
    history[:, -1] = CURRENT
    competitor = np.tile(np.array([7.0, 16.0, 4.5]), (14, 1))
    rules = resolve_rules(RulesSettings(default=rule_set), IDS, CATEGORIES, 0.25)
    h = horizon(rules, history=history, competitor=competitor)
    choose = {"greedy": rc.greedy_policy, "planner": rc.planner_policy,
              "static": rc.static_policy, "historical": rc.historical_policy}[policy](h)
    try:
        plan = rc.walk(h, choose)
    except ConfigError as exc:
        # Only a rule set that truly leaves nothing may fail, and it says for which product.
        assert exc.message.startswith("the rules leave no feasible price for product ")
        return
    obeys_every_rule(h, plan, rule_set, history, competitor)


# ----------------------------------------------------------------------------------------------
# On historical rows: the env and evaluate's baselines obey min_margin and max_above_competitor


def test_env_and_baselines_obey_the_margin_and_competitor_rules(tmp_path) -> None:
    import polars as pl

    from pricing_cli.agent import baselines as bl
    from pricing_cli.agent.demand import DemandModel
    from pricing_cli.agent.env import load_market, random_feasible_policy, simulate
    from pricing_cli.agent.guardrails import market_rule_bits, row_rule_levels
    from pricing_cli.config import load_settings
    from tests.agent_fixtures import write_processed

    truth = write_processed(tmp_path / "processed", n_products=4, n_days=60, K=11)
    meta_rows = pl.read_parquet(tmp_path / "processed" / "meta_test.parquet")
    # A competitor at 1.2 times the list price L from the first test day; costs are 0.5-0.6 L,
    # so a 45% margin needs 0.91-1.09 L: the grid (0.6 L to 1.6 L by 0.1 L) keeps 1-3 levels.
    ids = meta_rows.select("product_index", "product_id").unique().sort("product_index")
    competitor = pl.DataFrame({"product_id": ids["product_id"],
                               "date": [str(meta_rows["date"].min())] * 4,
                               "price": 1.2 * truth["max_price"][ids["product_index"]] / 1.6})
    competitor.write_csv(tmp_path / "competitor.csv")
    settings = load_settings(environ={}, flags={
        "data.catalog": str(tmp_path / "none.csv"),
        "rules.default": {"min_margin": 0.45, "max_above_competitor": 0.0},
        "rules.competitor_prices": str(tmp_path / "competitor.csv")})
    cost = dict(zip(ids["product_id"], truth["unit_cost"][ids["product_index"]], strict=True))
    cap = dict(zip(competitor["product_id"], competitor["price"], strict=True))

    def check(product_id: np.ndarray, prices: np.ndarray) -> None:
        c = np.array([cost[p] for p in product_id])
        k = np.array([cap[p] for p in product_id])
        assert ((prices - c) / prices >= 0.45 - 1e-9).all()
        assert (prices <= k * (1 + 1e-9)).all()

    meta = bl.load_split_meta(tmp_path / "processed", "test")
    meta = dataclasses.replace(meta, rule_levels=row_rule_levels(
        settings, meta.product_id, meta.date, meta.unit_cost, meta.min_price, meta.max_price, 11))
    # the two rules leave a band of levels: some, never all
    assert 0 < meta.rule_levels.mean() < 1
    demand = DemandModel.fit(pl.read_parquet(tmp_path / "processed" / "meta_train.parquet"),
                             settings)
    for prices in (bl.greedy_prices(meta, demand, 11, 0.25),
                   bl.planned_prices(meta, demand, 11, 0.25),
                   bl.static_prices(meta, demand, 11, 0.25),
                   bl.random_feasible_prices(meta, 11, 0.25, seed=1)):
        check(meta.product_id, prices)
    market = load_market(tmp_path / "processed", "test", demand)
    market.rule_bits = market_rule_bits(settings, market)
    out = simulate(market, random_feasible_policy(np.random.default_rng(0)))
    check(meta.product_id, out["prices"])
