"""Helpers shared by the train tests (tests/test_train.py, tests/test_learning.py)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from pricing_cli.monitor import RunMonitor

SMALL = {"train.n_envs": 4, "train.net_arch": [16], "train.n_steps": 64, "train.batch_size": 64,
         "train.n_epochs": 4, "train.timesteps": 2000, "train.eval_every": 1000,
         "train.checkpoint_every": 1000, "train.tensorboard": False, "train.torch_threads": 1,
         # The point fit: these tests compare the env with evaluate's baselines exactly, and the
         # env takes a constant-elasticity view of an ensemble quantile (until it reads units
         # on the grid). The CLI test below trains with the default ensemble.
         "train.ensemble_size": 0}


def policy_weights(zip_path: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(zip_path) as archive:
        return torch.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)


class KillAt(RunMonitor):
    """A monitor whose timesteps bar raises Ctrl+C once training passes ``steps``."""

    def __init__(self, steps: int) -> None:
        super().__init__("train", "quiet")
        self.steps = steps

    def update_bar(self, key: str, **kwargs: object) -> None:
        super().update_bar(key, **kwargs)
        if key == "timesteps" and (kwargs.get("completed") or 0) >= self.steps:
            raise KeyboardInterrupt
