"""A trained pricing agent, as evaluate and recommendations use it.

:func:`load_agent` rebuilds the policy network from ``agent.json`` and loads its weights from
``model.zip`` with ``torch.load(weights_only=True)``: nothing in a run folder is unpickled.
:func:`rollout_prices` prices every row of a split, each product day by day from its last
historical price, with the same state and masks as in training (:func:`env.simulate`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.agent.demand import DemandModel
from pricing_cli.errors import ModelError

TORCH_IMPORT_BYTES = 200 << 20
"""What importing torch, stable-baselines3 and sb3-contrib adds to RSS (measured: 194 MiB);
train and evaluate reserve it under --max-memory before the import, which no sampler can
interrupt."""

if TYPE_CHECKING:
    import torch

    from pricing_cli.agent.env import Market, Observation
    from pricing_cli.config import Settings

AGENT_JSON = "agent.json"
MODEL_ZIP = "model.zip"
CHANGE_COSTS = "change_costs.npy"  # (n_products,) money per price change; absent: free
MASKED_ALGOS = ("maskable-ppo",)


def policy_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of the multi-product policy, from agent.json-style keys
    (``net_arch``, ``embedding_dim``, ``feature_hidden``, ``forecast_prior``, ``price_levels``).
    agent.json files written before the forecast prior existed mean ``forecast_prior`` 0."""
    from pricing_cli.agent.extractor import ProductFeaturesExtractor

    prior = float(config.get("forecast_prior", 0.0))
    levels = int(config["price_levels"]) if prior > 0 else 0
    kwargs: dict[str, Any] = {
        "net_arch": list(config["net_arch"]),
        "features_extractor_class": ProductFeaturesExtractor,
        "features_extractor_kwargs": {"embedding_dim": int(config["embedding_dim"]),
                                      "hidden": int(config["feature_hidden"]),
                                      "forecast_levels": levels}}
    if prior > 0:
        kwargs.update(forecast_prior=prior, forecast_levels=levels)
    return kwargs


def policy_class(config: dict[str, Any]) -> type[Any]:
    """The SB3 policy class for agent.json-style keys ``algo`` and ``forecast_prior``."""
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy
    from stable_baselines3.common.policies import MultiInputActorCriticPolicy

    from pricing_cli.agent.extractor import ForecastPriorMaskablePolicy, ForecastPriorPolicy

    masked = config["algo"] in MASKED_ALGOS
    if float(config.get("forecast_prior", 0.0)) > 0:
        return ForecastPriorMaskablePolicy if masked else ForecastPriorPolicy
    return MaskableMultiInputActorCriticPolicy if masked else MultiInputActorCriticPolicy


def action_logits(policy: Any, obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unmasked action logits of an SB3 actor-critic policy (its own extractor and actor head).

    Used by behaviour cloning (trains these logits) and by :class:`PricingAgent`.
    """
    features = policy.extract_features(obs)
    if isinstance(features, tuple):  # separate actor / critic extractors
        features = features[0]
    return policy.action_net(policy.mlp_extractor.forward_actor(features))


@dataclass
class PricingAgent:
    """A policy network plus what it needs to act: its demand model and its agent.json.

    Attributes:
        policy: the SB3 actor-critic policy (torch module, eval mode).
        config: agent.json (algo, n_products, n_features, price_levels, ...).
        demand: the demand model fitted with it.
        run_dir: where it was loaded from (None while training).
        change_cost: (n_products,) money per price change it was trained with (None: free);
            part of its state (the forecast features are net of it).
    """

    policy: Any
    config: dict[str, Any]
    demand: DemandModel
    run_dir: Path | None = None
    change_cost: np.ndarray | None = None

    @property
    def uses_masks(self) -> bool:
        return self.config["algo"] in MASKED_ALGOS

    def choose_levels(self, obs: Observation, mask: np.ndarray, deterministic: bool = True
                      ) -> np.ndarray:
        """Price levels for a batch of observations.

        A maskable agent never picks an infeasible level; a plain PPO agent ignores the mask
        (the env then moves its choice to the nearest feasible level and counts it).
        """
        import torch

        with torch.no_grad():
            obs_tensor, _ = self.policy.obs_to_tensor(obs)
            logits = action_logits(self.policy, obs_tensor)
            if self.uses_masks:
                allowed = torch.as_tensor(np.asarray(mask, dtype=bool), device=logits.device)
                logits = logits.masked_fill(~allowed, float("-inf"))
            if deterministic:
                levels = logits.argmax(dim=1)
            else:
                levels = torch.distributions.Categorical(logits=logits).sample()
        return levels.cpu().numpy().astype(np.int64)

    def chooser(self, deterministic: bool = True) -> Callable[[Observation, np.ndarray],
                                                               np.ndarray]:
        """``choose(obs, mask) -> levels`` for :func:`pricing_cli.agent.env.simulate`."""
        return lambda obs, mask: self.choose_levels(obs, mask, deterministic)

    def check_compatible(self, market: Market) -> None:
        """Raise ModelError if the processed data do not match what the agent was trained on."""
        expected = (int(self.config["n_features"]), int(self.config["price_levels"]))
        found = (market.n_features, market.price_levels)
        if expected != found or market.n_products > int(self.config["n_products"]):
            where = self.run_dir or "this agent"
            raise ModelError(
                f"{where} was trained on {expected[0] - 3} features, K={expected[1]} price levels "
                f"and {self.config['n_products']} products, but the {market.split} split has "
                f"{found[0] - 3} features, K={found[1]} and {market.n_products} products",
                "Evaluate with the processed data the model was trained on, or retrain it.")


def load_demand_model(run_dir: str | Path) -> DemandModel:
    """The demand model saved in a run folder.

    Raises:
        ModelError: the run folder or its demand files are missing or unreadable.
    """
    run_dir = _check_run_dir(run_dir)
    return DemandModel.load(run_dir)


def load_agent(run_dir: str | Path) -> PricingAgent:
    """Rebuild the trained agent of ``models/<run_id>/`` (its best model, ``model.zip``).

    Raises:
        ModelError: missing or unreadable files, or weights that do not fit agent.json.
    """
    import torch

    run_dir = _check_run_dir(run_dir)
    try:
        config = json.loads((run_dir / AGENT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {run_dir / AGENT_JSON}: {exc}",
                         "Re-run `pricectl train`; the run folder is incomplete.") from None
    policy = build_policy(config)
    try:
        with zipfile.ZipFile(run_dir / MODEL_ZIP) as archive:
            state = torch.load(io.BytesIO(archive.read("policy.pth")), map_location="cpu",
                               weights_only=True)
        policy.load_state_dict(state)
    except (OSError, KeyError, RuntimeError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot load the policy weights in {run_dir / MODEL_ZIP}: {exc}",
                         "Re-run `pricectl train`; the model file is damaged.") from None
    policy.set_training_mode(False)
    change_cost = None
    if (run_dir / CHANGE_COSTS).is_file():
        try:
            change_cost = np.load(run_dir / CHANGE_COSTS, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {run_dir / CHANGE_COSTS}: {exc}",
                             "Re-run `pricectl train`; the run folder is damaged.") from None
    return PricingAgent(policy=policy, config=config, demand=DemandModel.load(run_dir),
                        run_dir=run_dir, change_cost=change_cost)


def build_policy(config: dict[str, Any]) -> Any:
    """A fresh policy network with the architecture described by agent.json."""
    from gymnasium import spaces

    from pricing_cli.agent.env import observation_space

    return policy_class(config)(
        observation_space(int(config["n_products"]), int(config["n_features"])),
        spaces.Discrete(int(config["price_levels"])), lambda _: 0.0, **policy_kwargs(config))


def rollout_prices(agent: PricingAgent, processed_dir: str | Path, split: str,
                   deterministic: bool = True, settings: Settings | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The agent's price for every row of ``meta_{split}.parquet``, in row order.

    Each product is simulated day by day over the split: its first day starts from the last
    historical price before the split (the processed mask of its first row), every later day
    from the agent's own previous price (state and mask), exactly as in training.

    Returns:
        (levels int64 (n,), prices float64 (n,)).

    Raises:
        MissingInputError: a processed file is missing.
        ModelError: the processed data do not match the agent.
    """
    from pricing_cli.agent.env import load_market, simulate

    market = load_market(processed_dir, split, agent.demand, change_cost=agent.change_cost)
    if settings is not None:  # the merchant rules that apply to historical rows
        from pricing_cli.agent.guardrails import market_rule_bits

        market.rule_bits = market_rule_bits(settings, market)
    agent.check_compatible(market)
    result = simulate(market, agent.chooser(deterministic))
    return result["levels"], result["prices"]


def _check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_ZIP).is_file():
        raise ModelError(f"{run_dir} is not a complete run folder (no {MODEL_ZIP})",
                         "Train a model first with `pricectl train --multi-product`, "
                         "or pass --model models/<run_id>.")
    return run_dir
