"""The multi-product policy network: a product embedding next to an MLP, and a forecast prior.

SB3's ``MultiInputPolicy`` would one-hot a Discrete product id (7,000 columns); here the
product id arrives as a float Box index and is embedded, and the state features go through
their own small MLP. The two are concatenated; the policy and value heads (``net_arch``) sit
on top.

The forecast prior (``train.forecast_prior`` > 0) is a residual policy: the K columns of the
state that hold the demand model's relative profit per price level skip the MLPs and enter the
action head directly, through a K x K block initialised to ``forecast_prior`` x identity. So
at step 0 the logits are ``forecast_prior * relative_profit`` plus a small learned term: the
agent prices like the greedy baseline (softmax with temperature 1/forecast_prior), and RL
learns only what it can add to the model's view of today (planning around the daily-change
limit, correcting the forecast's ranking). Without the skip, the MLP has to re-learn an argmax
over 101 inputs from rewards, and in a market where the greedy choice is the optimum under the
fitted model it never quite does (docs/agent.md has the measurements).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy
from stable_baselines3.common.policies import MultiInputActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, MlpExtractor
from torch import nn

from pricing_cli.agent.env import N_ENDOGENOUS


class ProductFeaturesExtractor(BaseFeaturesExtractor):
    """Embedding(product_id) ⊕ MLP(features) [⊕ the K forecast columns, passed through].

    Args:
        observation_space: the env's Dict space with ``product_id`` (Box (1,)) and
            ``features`` (Box (F + K + 3,)); the number of products is ``product_id.high + 1``.
        embedding_dim: size of the product embedding.
        hidden: width of the features MLP (two layers).
        forecast_levels: K > 0 appends the forecast columns (the K before the 3 endogenous
            features) unchanged, for the forecast-prior action head; 0 leaves them out.

    Output size: ``embedding_dim + hidden + forecast_levels``.
    """

    def __init__(self, observation_space: gym.spaces.Dict, embedding_dim: int = 16,
                 hidden: int = 64, forecast_levels: int = 0) -> None:
        super().__init__(observation_space,
                         features_dim=embedding_dim + hidden + forecast_levels)
        product_space = observation_space["product_id"]
        feature_space = observation_space["features"]
        assert isinstance(product_space, gym.spaces.Box) and feature_space.shape is not None
        self.n_products = int(product_space.high[0]) + 1
        n_features = int(feature_space.shape[0])
        self.forecast_end = n_features - N_ENDOGENOUS
        self.forecast_start = self.forecast_end - forecast_levels
        self.embedding = nn.Embedding(self.n_products, embedding_dim)
        self.features_mlp = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        # The id travels as float32 (exact for integers below 2**24); round before the cast.
        ids = observations["product_id"].reshape(-1).round().long().clamp(0, self.n_products - 1)
        features = observations["features"]
        parts = [self.embedding(ids), self.features_mlp(features)]
        if self.forecast_end > self.forecast_start:
            parts.append(features[:, self.forecast_start:self.forecast_end])
        return torch.cat(parts, dim=1)


class ForecastSkipMlpExtractor(MlpExtractor):
    """SB3's MlpExtractor whose actor latent also carries the last K inputs (the forecast)."""

    def __init__(self, feature_dim: int, forecast_levels: int, **kwargs: Any) -> None:
        super().__init__(feature_dim, **kwargs)
        self.forecast_levels = forecast_levels
        self.latent_dim_pi += forecast_levels

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.policy_net(features), features[:, -self.forecast_levels:]], dim=1)


class _ForecastPrior:
    """Mixin for SB3 actor-critic policies: the forecast skip and its identity-initialised block.

    ``forecast_prior`` (float > 0) and ``forecast_levels`` (K) are extra policy kwargs.
    """

    # As the SB3 base classes declare them (the mixin comes first in the MRO).
    action_net: nn.Module
    mlp_extractor: MlpExtractor
    forecast_prior: float
    forecast_levels: int

    def __init__(self, *args: Any, forecast_prior: float, forecast_levels: int,
                 **kwargs: Any) -> None:
        # Set before the base __init__, which calls _build.
        object.__setattr__(self, "forecast_prior", float(forecast_prior))
        object.__setattr__(self, "forecast_levels", int(forecast_levels))
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = ForecastSkipMlpExtractor(
            self.features_dim, self.forecast_levels, net_arch=self.net_arch,  # type: ignore
            activation_fn=self.activation_fn, device=self.device)  # type: ignore

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        K = self.forecast_levels
        with torch.no_grad():
            # After SB3's orthogonal init (gain 0.01) of the whole head. The learned part
            # starts at zero: even SB3's small initial logits (~0.01) reorder levels whose
            # forecast profits are within 1e-4 of each other, and the agent would start a
            # little below greedy instead of at it. Its gradient is not zero (latent x error),
            # so it learns from the first update.
            head = self.action_net
            assert isinstance(head, nn.Linear)
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:, -K:] = self.forecast_prior * torch.eye(K)


class ForecastPriorMaskablePolicy(_ForecastPrior, MaskableMultiInputActorCriticPolicy):
    """MaskablePPO's Dict-observation policy with the forecast prior."""


class ForecastPriorPolicy(_ForecastPrior, MultiInputActorCriticPolicy):
    """PPO's Dict-observation policy with the forecast prior."""
