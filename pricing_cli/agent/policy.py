"""A trained pricing agent, as evaluate and recommendations use it.

:func:`load_agent` rebuilds the policy network from ``agent.json`` and loads its weights from
``model.zip`` with ``torch.load(weights_only=True)``: nothing in a run folder is unpickled.
:func:`rollout_prices` prices every row of a split, each product day by day from its last
historical price, with the same state and masks as in training (:func:`env.simulate`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
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

    from pricing_cli.agent.baselines import SplitMeta
    from pricing_cli.agent.env import Market, Observation
    from pricing_cli.agent.processed import ProcessedData
    from pricing_cli.config import Settings

AGENT_JSON = "agent.json"
MODEL_ZIP = "model.zip"
CHANGE_COSTS = "change_costs.npy"  # (n_products,) money per price change; absent: free
# lower, upper (n_products,): the trust region of every recommended price; absent: none.
TRUST_REGION = "trust_region.npz"
MASKED_ALGOS = ("maskable-ppo",)
# What a run publishes (agent.json "published_policy"): the network, or the joint greedy or
# planner when it earned more on val under the fitted demand (train.publish_best_policy). In
# an inventory run (AgentConfig.stock_features) greedy and planner are the stock-aware ones
# of agent/inventory.py, and static and the fitted markdown ladder may win too.
PUBLISHED_POLICIES = ("agent", "greedy", "planner", "static", "ladder")


@dataclass(frozen=True)
class AgentConfig:
    """agent.json: the network's shape and what it was trained with (train writes it,
    :func:`load_agent` reads it back after :func:`check_agent_config`).

    Keys that agent.json files of earlier versions lack take the default that version meant
    (no forecast prior, free price changes, the network published). ``as_json`` writes every
    field, in train's keys.
    """

    algo: str
    n_products: int
    n_features: int
    price_levels: int
    net_arch: list[int]
    embedding_dim: int
    feature_hidden: int
    input_dim: int | None = None
    max_daily_change: float | None = None
    forecast_prior: float = 0.0
    price_change_cost: float = 0.0
    reward_scale: float | None = None
    episode_length: int | None = None
    products: list[int] | None = None  # a single-product agent's product index
    product_id: str | None = None
    feature_cols: list[str] | None = None
    ensemble_size: int = 0
    decision_quantile: float | None = None  # None: prices chosen on the point fit
    trust_region: float | None = None  # the margin; the bounds are trust_region.npz
    # The adaptive region's cap (train.trust_region_adaptive); None: the fixed margin only.
    trust_region_adaptive: float | None = None
    published_policy: str = "agent"  # agent, greedy or planner (train.publish_best_policy)
    timesteps: int | None = None
    seed: int | None = None

    @classmethod
    def of(cls, config: AgentConfig | dict[str, Any]) -> AgentConfig:
        """``config`` itself, or the record of an agent.json-style dict (unknown keys are
        ignored: check it first with :func:`check_agent_config`)."""
        if isinstance(config, AgentConfig):
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def uses_masks(self) -> bool:
        return self.algo in MASKED_ALGOS

    @property
    def stock_features(self) -> int:
        """How many stock features the observation carries: ``env.N_STOCK`` for a run
        trained on an inventory market (its prices come from the season's stock), else 0
        (agent.json has no key of its own: memoryless runs keep their bytes)."""
        if self.input_dim is None:
            return 0
        from pricing_cli.agent.env import N_ENDOGENOUS

        return int(self.n_features) - int(self.input_dim) - int(self.price_levels) - N_ENDOGENOUS

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def policy_kwargs(config: AgentConfig | dict[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of the multi-product policy, from agent.json's ``net_arch``,
    ``embedding_dim``, ``feature_hidden``, ``forecast_prior`` and ``price_levels``.
    agent.json files written before the forecast prior existed mean ``forecast_prior`` 0."""
    from pricing_cli.agent.extractor import ProductFeaturesExtractor

    config = AgentConfig.of(config)
    prior = float(config.forecast_prior)
    levels = int(config.price_levels) if prior > 0 else 0
    kwargs: dict[str, Any] = {
        "net_arch": list(config.net_arch),
        "features_extractor_class": ProductFeaturesExtractor,
        "features_extractor_kwargs": {"embedding_dim": int(config.embedding_dim),
                                      "hidden": int(config.feature_hidden),
                                      "forecast_levels": levels}}
    if prior > 0:
        kwargs.update(forecast_prior=prior, forecast_levels=levels)
    return kwargs


def policy_class(config: AgentConfig | dict[str, Any]) -> type[Any]:
    """The SB3 policy class for agent.json's ``algo`` and ``forecast_prior``."""
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy
    from stable_baselines3.common.policies import MultiInputActorCriticPolicy

    from pricing_cli.agent.extractor import ForecastPriorMaskablePolicy, ForecastPriorPolicy

    config = AgentConfig.of(config)
    masked = config.uses_masks
    if float(config.forecast_prior) > 0:
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
        config: agent.json (algo, n_products, n_features, price_levels, ...), typed.
        demand: what it chooses prices on: the demand model fitted with it, or the ensemble's
            ``decision_quantile`` of it (:func:`ensemble.decision_demand`).
        run_dir: where it was loaded from (None while training).
        change_cost: (n_products,) money per price change it was trained with (None: free);
            part of its state (the forecast features are net of it).
        trust_region: (lower, upper) by product index, the prices it may recommend (NaN: no
            limit); None: the whole grid.
    """

    policy: Any
    config: AgentConfig
    demand: Any
    run_dir: Path | None = None
    change_cost: np.ndarray | None = None
    trust_region: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def uses_masks(self) -> bool:
        return self.config.uses_masks

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
        from pricing_cli.agent.env import N_ENDOGENOUS

        expected = (self.config.n_features, self.config.price_levels)
        found = (market.n_features, market.price_levels)
        where = self.run_dir or "this agent"
        if self.config.stock_features != market.n_stock_features:
            raise ModelError(
                f"{where} was trained " + ("with" if self.config.stock_features else "without")
                + f" the stock state of an inventory market, but the {market.split} split is "
                + ("not stocked" if self.config.stock_features else "stocked"),
                "Price it with the data.stock and data.ground_truth it was trained with, or "
                "retrain.")
        if expected != found or market.n_products > self.config.n_products:
            # the observation is the processed features [+ stock state] + K forecast
            # columns + N_ENDOGENOUS
            trained, given = (n - k - N_ENDOGENOUS - market.n_stock_features
                              for n, k in (expected, found))
            raise ModelError(
                f"{where} was trained on {trained} features, K={expected[1]} price levels "
                f"and {self.config.n_products} products, but the {market.split} split has "
                f"{given} features, K={found[1]} and {market.n_products} products",
                "Evaluate with the processed data the model was trained on, or retrain it.")


def load_demand_model(run_dir: str | Path) -> DemandModel:
    """The demand model saved in a run folder.

    Raises:
        ModelError: the run folder or its demand files are missing or unreadable.
    """
    run_dir = _check_run_dir(run_dir)
    return DemandModel.load(run_dir)


def load_agent(run_dir: str | Path, stats: dict[str, Any] | None = None, *,
               demand: tuple[DemandModel, Any] | None = None) -> PricingAgent:
    """Rebuild the trained agent of ``models/<run_id>/`` (its best model, ``model.zip``).

    agent.json is checked (types, ranges, consistency with ``stats`` when given) and the
    architecture it describes is compared with the weights' shapes before any network is
    allocated, so a forged ``n_products: 1e9`` cannot make pricectl ask for gigabytes.

    Args:
        stats: preprocessing_stats.json of the data the agent will price (None: not checked).
        demand: (point model, ensemble or None) already loaded from ``run_dir`` (evaluate
            has them): not read again. None: loaded here.

    Raises:
        ModelError: missing, unreadable or forged files, or weights that do not fit agent.json.
    """
    import torch

    run_dir = _check_run_dir(run_dir)
    try:
        raw = json.loads((run_dir / AGENT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {run_dir / AGENT_JSON}: {exc}",
                         "Re-run `pricectl train`; the run folder is incomplete.") from None
    config = AgentConfig.of(check_agent_config(raw, run_dir / AGENT_JSON, stats))
    try:
        with zipfile.ZipFile(run_dir / MODEL_ZIP) as archive:
            _check_weights_member(archive.getinfo("policy.pth"), run_dir / MODEL_ZIP)
            state = torch.load(io.BytesIO(archive.read("policy.pth")), map_location="cpu",
                               weights_only=True)
        _check_architecture(config, state, run_dir)
        policy = build_policy(config)
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
    from pricing_cli.agent.ensemble import DemandEnsemble, decision_demand

    point, ensemble = demand if demand is not None else (DemandModel.load(run_dir),
                                                         DemandEnsemble.load(run_dir))
    return PricingAgent(policy=policy, config=config,
                        demand=decision_demand(point, ensemble, config.decision_quantile),
                        run_dir=run_dir, change_cost=change_cost,
                        trust_region=load_trust_region(run_dir))


def save_trust_region(folder: Path, trust_region: tuple[np.ndarray, np.ndarray]) -> None:
    """trust_region.npz: arrays ``lower`` and ``upper`` by product index."""
    from pricing_cli.storage import atomic_write

    with atomic_write(folder / TRUST_REGION) as handle:
        np.savez(handle, lower=trust_region[0], upper=trust_region[1])


def load_trust_region(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's trust region (None when it was trained without one).

    Raises:
        ModelError: the file is unreadable.
    """
    path = run_dir / TRUST_REGION
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return arrays["lower"], arrays["upper"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read {path}: {exc}",
                         "Re-run `pricectl train`; the run folder is damaged.") from None


# What agent.json must hold: key -> (kind, lowest, highest). The bounds are those of the
# typed Settings (train.*, preprocess.price_levels) widened to what any real market needs;
# the weights decide the rest (see _check_architecture).
_AGENT_FIELDS: dict[str, tuple[str, float, float]] = {
    "n_products": ("int", 1, 100_000_000),
    "n_features": ("int", 1, 10_000_000),
    "price_levels": ("int", 2, 32767),
    "embedding_dim": ("int", 1, 4096),
    "feature_hidden": ("int", 1, 65536),
    "forecast_prior": ("number", 0, float("inf")),
    "max_daily_change": ("number", 0, float("inf")),
    "input_dim": ("int", 0, 10_000_000),
}
_RETRAIN = ("agent.json is written by `pricectl train`: restore the run folder, or train "
            "again; do not edit it by hand.")


def check_agent_config(config: Any, path: Path, stats: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """Check agent.json's keys before they size anything; return it unchanged.

    Args:
        config: the parsed agent.json.
        path: its path, named in errors.
        stats: preprocessing_stats.json of the data to price; its input_dim, price_levels and
            product count must fit the agent (None: not checked).

    Raises:
        ModelError: naming the file and the key: a wrong type, a value out of range, keys
            that disagree with each other, or with ``stats``.
    """
    from pricing_cli.agent.env import N_ENDOGENOUS, N_STOCK

    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object", _RETRAIN)

    def bad(key: str, why: str) -> ModelError:
        shown = repr(config.get(key))[:200]
        return ModelError(f"{path}: key '{key}' is {shown}: {why}", _RETRAIN)

    if config.get("algo") not in ("maskable-ppo", "ppo"):
        raise bad("algo", "expected 'maskable-ppo' or 'ppo'")
    optional = ("forecast_prior", "max_daily_change", "input_dim")
    for key, (kind, low, high) in _AGENT_FIELDS.items():
        if key not in config and key in optional:
            continue
        value: Any = config.get(key)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_number = is_int or (isinstance(value, float) and math.isfinite(value))
        if not (is_int if kind == "int" else is_number):
            raise bad(key, "expected an integer" if kind == "int" else "expected a finite number")
        if not low <= value <= high:
            raise bad(key, f"expected {low:,} to {high:,}" if high < float("inf")
                      else f"expected at least {low}")
    if config.get("published_policy", "agent") not in PUBLISHED_POLICIES:
        raise bad("published_policy", f"expected one of {', '.join(PUBLISHED_POLICIES)}")
    arch = config.get("net_arch")
    if (not isinstance(arch, list) or len(arch) > 16
            or not all(isinstance(u, int) and not isinstance(u, bool) and 1 <= u <= 65536
                       for u in arch)):
        raise bad("net_arch", "expected a list of at most 16 layer widths, each 1 to 65,536")
    if "input_dim" in config and (config["n_features"] - config["input_dim"]
                                  - config["price_levels"] - N_ENDOGENOUS) not in (0, N_STOCK):
        raise bad("n_features", f"expected input_dim + price_levels + {N_ENDOGENOUS} = "
                  f"{config['input_dim'] + config['price_levels'] + N_ENDOGENOUS} (or "
                  f"{N_STOCK} more with the stock state of an inventory market)")
    if stats is not None:
        for key in ("input_dim", "price_levels"):
            if key in config and key in stats and stats[key] != config[key]:
                raise ModelError(
                    f"{path}: key '{key}' is {config[key]!r}, but the processed data's "
                    f"preprocessing_stats.json has {key} {str(stats[key])[:50]}",
                    "Evaluate with the processed data the model was trained on, or retrain.")
        products = stats.get("products")
        if isinstance(products, int) and products > config["n_products"]:
            raise ModelError(
                f"{path}: key 'n_products' is {config['n_products']}, but the processed data's "
                f"preprocessing_stats.json has {products} products",
                "Evaluate with the processed data the model was trained on, or retrain.")
    return config


def _check_weights_member(info: zipfile.ZipInfo, path: Path) -> None:
    """Refuse a policy.pth whose zip sizes are forged (inflates >100x, or longer than the
    file): SB3 deflates the weights, which compress by a few percent at most."""
    size = path.stat().st_size
    if info.compress_size > size or info.file_size > 100 * max(info.compress_size, 1):
        raise ModelError(f"{path}: member 'policy.pth' claims {info.file_size:,} bytes from "
                         f"{info.compress_size:,} compressed in a {size:,}-byte file: refused "
                         "as forged before inflating it", _RETRAIN)


def _check_architecture(config: AgentConfig, state: Any, run_dir: Path) -> None:
    """Compare the network agent.json describes with the weights, without allocating it.

    The network is built on torch's "meta" device (shapes only, no memory); every tensor of
    the weights must have the shape agent.json implies. Only then is the real network built,
    and its size is what model.zip really holds.

    Raises:
        ModelError: a missing, extra or differently shaped tensor, naming the first.
    """
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ModelError(f"{run_dir / MODEL_ZIP}: policy.pth is not a dict of tensors",
                         _RETRAIN)
    with torch.device("meta"):
        skeleton = build_policy(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            raise ModelError(
                f"{run_dir / AGENT_JSON} does not describe the weights in "
                f"{run_dir / MODEL_ZIP}: tensor {key!r} is {_shape(found.get(key))} in the "
                f"weights but {_shape(expected.get(key))} from agent.json (n_products "
                f"{config.n_products}, n_features {config.n_features}, price_levels "
                f"{config.price_levels}, embedding_dim {config.embedding_dim}, "
                f"feature_hidden {config.feature_hidden}, net_arch {config.net_arch})",
                _RETRAIN)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))


def build_policy(config: AgentConfig | dict[str, Any]) -> Any:
    """A fresh policy network with the architecture described by agent.json."""
    from gymnasium import spaces

    from pricing_cli.agent.env import observation_space

    config = AgentConfig.of(config)
    return policy_class(config)(
        observation_space(int(config.n_products), int(config.n_features)),
        spaces.Discrete(int(config.price_levels)), lambda _: 0.0, **policy_kwargs(config))


def rollout_prices(agent: PricingAgent, processed_dir: ProcessedData | str | Path, split: str,
                   deterministic: bool = True, settings: Settings | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The agent's price for every row of ``meta_{split}.parquet``, in row order (with
    ``settings``: every row not on a closed day, ``data.closed_*`` and found in the data).

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
    from pricing_cli.agent.processed import as_processed

    processed_dir = as_processed(processed_dir)
    published = agent.config.published_policy
    # Closed days are left out, as in training and evaluate.
    closed = None if settings is None else processed_dir.closed_days(settings.data)
    stocked = run_stock_data(agent.config, settings, agent.run_dir)
    if published != "agent":  # train chose a grid policy over the network on val
        meta = grid_policy_meta(processed_dir, split, agent.trust_region, settings,
                                agent.config.price_levels, agent.demand)
        if agent.config.max_daily_change is None:
            raise ModelError(f"{agent.run_dir or 'the agent'}: agent.json publishes the "
                             f"{published} but has no max_daily_change", _RETRAIN)
        if stocked is not None:  # the stock-aware policy train compared on val
            from pricing_cli.agent.inventory import stock_policy_prices

            prices = stock_policy_prices(published, stocked, processed_dir, closed, meta,
                                         agent.demand, agent.config.price_levels,
                                         agent.config.max_daily_change)
        elif published in ("greedy", "planner"):
            prices = grid_policy_prices(published, meta, agent.demand,
                                        agent.config.price_levels,
                                        agent.config.max_daily_change, agent.change_cost)
        else:
            raise ModelError(f"{agent.run_dir or 'the agent'}: agent.json publishes the "
                             f"{published}, a stock-aware policy, but the run has no stock "
                             "state", _RETRAIN)
        levels = np.abs(meta.grid[meta.series_of_row] - prices[:, None]).argmin(axis=1)
        return levels.astype(np.int64), prices
    stock = None
    if stocked is not None:  # the network sees its stock, as in training
        from pricing_cli.agent.baselines import load_split_meta

        stock = stocked.market_stock(load_split_meta(processed_dir, split, closed))
    market = load_market(processed_dir, split, agent.demand, change_cost=agent.change_cost,
                         closed=closed, stock=stock)
    if settings is not None:  # the merchant rules that apply to historical rows
        from pricing_cli.agent.guardrails import market_rule_bits

        market.rule_bits = market_rule_bits(settings, market)
    agent.check_compatible(market)
    if agent.trust_region is not None:
        market = dataclasses.replace(market, trust_region=_by_product(agent.trust_region,
                                                                      market.n_products))
    result = simulate(market, agent.chooser(deterministic))
    return result["levels"], result["prices"]


def run_stock_data(config: AgentConfig, settings: Settings | None,
                   run_dir: str | Path | None = None) -> Any:
    """The stock data (``inventory.StockData``) a run trained on an inventory market prices
    from; None for a run without the stock state.

    Raises:
        ModelError: the run has the stock state but ``settings`` give no stock data.
    """
    if config.stock_features == 0:
        return None
    from pricing_cli.agent.inventory import stock_data

    data = None if settings is None else stock_data(settings)
    if data is None:
        raise ModelError(
            f"{run_dir or 'the agent'} was trained on an inventory market (it prices from the "
            "season's stock), but no stock data are configured",
            "Set data.stock and data.ground_truth (the season calendar and salvage) as in "
            "training.")
    return data


def grid_policy_meta(processed_dir: ProcessedData | str | Path, split: str,
                     trust_region: tuple[np.ndarray, np.ndarray] | None,
                     settings: Settings | None, levels: int, demand: Any = None) -> SplitMeta:
    """The split's rows as the grid policies price them: the merchant rules (when
    ``settings`` is given), the run's trust region (by product index) and, with ``demand``,
    the starting reference price of its reference effect, as in evaluate."""
    from pricing_cli.agent.baselines import load_split_meta, series_bounds
    from pricing_cli.agent.processed import as_processed

    processed_dir = as_processed(processed_dir)
    # Closed days are left out, as in evaluate and the env.
    closed = None if settings is None else processed_dir.closed_days(settings.data)
    meta = load_split_meta(processed_dir, split, closed)
    if settings is not None:
        from pricing_cli.agent.guardrails import row_rule_levels

        meta = dataclasses.replace(meta, rule_levels=row_rule_levels(
            settings, meta.product_id, meta.date, meta.unit_cost, meta.min_price,
            meta.max_price, levels))
    if trust_region is not None:
        meta = dataclasses.replace(meta, trust_region=series_bounds(meta, trust_region))
    if demand is not None:  # a reference effect: greedy and the planner roll it from day one
        from pricing_cli.agent.reference import with_start_reference

        meta = with_start_reference(meta, demand, processed_dir, split)
    return meta


def grid_policy_prices(name: str, meta: SplitMeta, demand: Any, levels: int,
                       max_daily_change: float, change_cost: np.ndarray | None) -> np.ndarray:
    """``greedy`` or ``planner`` prices of every row of ``meta`` (joint per category-day when
    ``demand`` has a cross-price term)."""
    from pricing_cli.agent.baselines import greedy_prices, planned_prices

    policy = {"greedy": greedy_prices, "planner": planned_prices}[name]
    return policy(meta, demand, levels, max_daily_change, change_cost)


def _by_product(trust_region: tuple[np.ndarray, np.ndarray], n_products: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The bounds cut or NaN-padded (no limit) to n_products (a later split may know more)."""
    out = []
    for bound in trust_region:
        values = np.full(n_products, np.nan)
        k = min(n_products, len(bound))
        values[:k] = bound[:k]
        out.append(values)
    return out[0], out[1]


def _check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_ZIP).is_file():
        raise ModelError(f"{run_dir} is not a complete run folder (no {MODEL_ZIP})",
                         "Train a model first with `pricectl train --multi-product`, "
                         "or pass --model models/<run_id>.")
    return run_dir
