"""PricingAgent.check_compatible: the refusal names the right feature counts."""

from __future__ import annotations


def test_check_compatible_counts_the_processed_features() -> None:
    """The observation is F processed features + K forecast columns + 3 of the agent's own
    price; the refusal names F (here 20 and 21), not F + K."""
    from types import SimpleNamespace

    import pytest

    from pricing_cli.agent.env import N_ENDOGENOUS
    from pricing_cli.agent.policy import AgentConfig, PricingAgent
    from pricing_cli.errors import ModelError

    assert N_ENDOGENOUS == 3
    agent = SimpleNamespace(run_dir="models/r1", config=AgentConfig(
        algo="maskable-ppo", n_features=20 + 11 + 3, price_levels=11, n_products=6,
        net_arch=[8], embedding_dim=4, feature_hidden=8))
    market = SimpleNamespace(n_features=21 + 11 + 3, price_levels=11, n_products=6,
                             n_stock_features=0, split="test")
    with pytest.raises(ModelError) as info:
        PricingAgent.check_compatible(agent, market)  # type: ignore[arg-type]
    assert info.value.message == (
        "models/r1 was trained on 20 features, K=11 price levels and 6 products, but the test "
        "split has 21 features, K=11 and 6 products")
