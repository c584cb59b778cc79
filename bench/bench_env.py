"""Env-alone throughput: PriceVecEnv stepping random feasible actions (no policy, no learning).

    .venv/bin/python -m bench.bench_env PROCESSED_DIR [--envs 256] [--steps 2000]

Fits the demand model on the train split, then times ``steps`` vectorized steps of ``envs``
environments (observation building, masks, rewards, auto-resets included; the random
feasible actions are drawn outside the timed calls).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.env import PriceVecEnv, load_market
from pricing_cli.config import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("processed", type=Path)
    parser.add_argument("--envs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    settings = load_settings(environ={})
    demand = DemandModel.fit(pl.read_parquet(args.processed / "meta_train.parquet"), settings)
    market = load_market(args.processed, "train", demand)
    env = PriceVecEnv(market, args.envs, episode_length=28, seed=0, normalize_reward=True)
    rng = np.random.default_rng(0)
    env.reset()
    # Only the env's own calls are timed (masks, step with auto-resets): drawing the random
    # feasible actions is the policy's work, not the env's.
    elapsed = 0.0
    for _ in range(args.steps):
        started = time.perf_counter()
        masks = env.action_masks()
        elapsed += time.perf_counter() - started
        actions = np.where(masks, rng.random(masks.shape), -1.0).argmax(axis=1)
        started = time.perf_counter()
        env.step(actions)
        elapsed += time.perf_counter() - started
    result = {"envs": args.envs, "steps": args.steps * args.envs,
              "seconds": round(elapsed, 3), "steps_per_s": round(args.steps * args.envs / elapsed),
              "features": int(market.n_features)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
