"""The features extractor of the multi-product policy: a product embedding next to an MLP.

SB3's ``MultiInputPolicy`` would one-hot a Discrete product id (7,000 columns); here the
product id arrives as a float Box index and is embedded, and the state features go through
their own small MLP. The two are concatenated; the policy and value heads (``net_arch``) sit
on top.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class ProductFeaturesExtractor(BaseFeaturesExtractor):
    """Embedding(product_id) ⊕ MLP(features).

    Args:
        observation_space: the env's Dict space with ``product_id`` (Box (1,)) and
            ``features`` (Box (F,)); the number of products is ``product_id.high + 1``.
        embedding_dim: size of the product embedding.
        hidden: width of the features MLP (two layers).

    Output size: ``embedding_dim + hidden``.
    """

    def __init__(self, observation_space: gym.spaces.Dict, embedding_dim: int = 16,
                 hidden: int = 64) -> None:
        super().__init__(observation_space, features_dim=embedding_dim + hidden)
        product_space = observation_space["product_id"]
        feature_space = observation_space["features"]
        assert isinstance(product_space, gym.spaces.Box) and feature_space.shape is not None
        self.n_products = int(product_space.high[0]) + 1
        n_features = int(feature_space.shape[0])
        self.embedding = nn.Embedding(self.n_products, embedding_dim)
        self.features_mlp = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        # The id travels as float32 (exact for integers below 2**24); round before the cast.
        ids = observations["product_id"].reshape(-1).round().long().clamp(0, self.n_products - 1)
        return torch.cat([self.embedding(ids), self.features_mlp(observations["features"])],
                         dim=1)
