"""`pricectl train`: fit the demand model, then train one pricing agent for every product.

Steps: read ``data/processed`` → fit :class:`DemandModel` on train (report on val) → build the
vectorized env over train → optional behaviour cloning of historical prices (``--warm-start
bc``) → MaskablePPO (or PPO) with the product-embedding extractor → every ``eval_every`` steps
the deterministic policy prices the whole val split under the fitted demand, and the best
(mean profit per product-day) is kept.

The run folder ``models/<run_id>/`` appears only when training is complete: work happens in
``models/.partial-<run_id>/`` (checkpoints every ``checkpoint_every`` steps, so ``--resume``
can continue a killed run) and is renamed into place as a whole at the end. It holds
``model.zip`` (the best policy), ``last_checkpoint.zip``, ``agent.json``, ``config.yaml``,
``demand_model.npz/.json``, ``train_summary.json`` and ``tensorboard/``. No VecNormalize: the
features are already scaled by the features stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.config import Settings, TrainSettings, settings_to_yaml
from pricing_cli.errors import ConfigError, ModelError
from pricing_cli.runinfo import StageResult
from pricing_cli.storage import (
    atomic_write,
    check_output_dir,
    commit_file,
    disk_full_names,
    replace_dir,
    sweep_stale_staging,
    sweep_stale_tmp,
    tmp_path_for,
    write_json,
    write_owner_marker,
)

if TYPE_CHECKING:
    import polars as pl

    from pricing_cli.agent.env import Market
    from pricing_cli.agent.policy import AgentConfig, PricingAgent
    from pricing_cli.agent.processed import ProcessedData
    from pricing_cli.monitor import RunMonitor

PARTIAL_PREFIX = ".partial-"
CHECKPOINT = "last_checkpoint.zip"
BEST = "best_model.zip"  # renamed to policy.MODEL_ZIP when the run is published
STATE_JSON = "training_state.json"
RL_STATE = "rl_state.npz"  # env episodes and RNG states at the last checkpoint
SUMMARY_JSON = "train_summary.json"


def run_train(settings: Settings, monitor: RunMonitor, *, product: str | None = None,
              resume: bool = False) -> StageResult:
    """Train the pricing agent; see the module docstring.

    Args:
        settings: uses ``train``, ``merge.output_dir``.
        monitor: progress (timesteps bar, fps, episode profit, losses, val profit).
        product: a product_id to train a single-product agent (same code, env restricted).
        resume: continue ``train.run_id`` from its last checkpoint.

    Returns:
        StageResult with the run folder and a summary of the training.

    Raises:
        MissingInputError: data/processed is incomplete.
        ConfigError: --product names no product with train rows.
        ModelError: --resume without a checkpoint, or a run folder that already exists.
    """

    from pricing_cli.agent.policy import TORCH_IMPORT_BYTES

    monitor.reserve(TORCH_IMPORT_BYTES, "loading torch and stable-baselines3")
    import torch

    from pricing_cli.agent.env import PriceVecEnv, random_feasible_policy, simulate
    from pricing_cli.agent.learning import learning_curve
    from pricing_cli.agent.policy import MODEL_ZIP, PricingAgent
    from pricing_cli.agent.processed import ProcessedData

    cfg, started = settings.train, time.monotonic()
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
    processed_dir = Path(settings.merge.output_dir)
    # The one reader of data/processed, through val: train never reads the test split.
    processed = ProcessedData(processed_dir, through="val")
    _ = processed.stats  # read first: a folder merge never wrote is named by its stats file
    meta_train_path = processed.path("meta_train.parquet")
    meta_val_path = processed.path("meta_val.parquet")
    run_id = cfg.run_id or datetime.now().strftime("%Y%m%d-%H%M%S")
    final_dir, work_dir, checkpoint = _prepare_run_folder(Path(cfg.models_dir), run_id, resume)

    fit = _fit_demand(settings, processed, product, monitor)  # 1. demand model
    # 2. Markets, env, the network.
    train_market, val_market, change_cost = _load_markets(settings, processed, fit, monitor)
    if cfg.ensemble_rewards:
        from pricing_cli.agent.learning import with_member_tables

        train_market = with_member_tables(train_market, fit.ensemble, monitor)
    env = PriceVecEnv(train_market, cfg.n_envs, episode_length=cfg.episode_length,
                      reward_scale=cfg.reward_scale, sample_demand=cfg.sample_demand,
                      normalize_reward=cfg.normalize_reward,
                      products=fit.products, seed=cfg.seed)
    config = _agent_config(settings, train_market, fit, product, processed_dir)
    model = _build_model(settings, env, config, work_dir, device)
    monitor.log(f"training on {model.device}")
    state = _resume(model, checkpoint, work_dir, run_id, monitor)
    agent = PricingAgent(policy=model.policy, config=config, demand=fit.decision,
                         change_cost=change_cost, trust_region=fit.trust_region)
    lines, curve_log = _curve_lines(settings, val_market, processed, fit, work_dir, monitor)
    selection = ValSelection(model, agent, val_market, fit.products, work_dir, state, monitor,
                             curve_log)

    # 3. Behaviour cloning, then RL (checkpoints and val selection), then what to publish.
    bc_summary = _warm_start(settings, model, train_market, processed, fit, checkpoint, monitor)
    loop = _learn(settings, model, work_dir, state, selection, checkpoint, monitor)
    curve_log.close()
    published = select_published_policy(settings, model, agent, work_dir / BEST, val_market,
                                        processed, fit.products, monitor)
    config = dataclasses.replace(config, published_policy=published["published_policy"])

    # 4. Baselines for context, under the same fitted demand, on the same rows.
    random_profit = simulate(val_market, random_feasible_policy(np.random.default_rng(cfg.seed)),
                             products=fit.products)["mean_profit"]
    historical_profit = _historical_profit(val_market, fit.products)

    # 5. Write the rest and publish the folder as a whole.
    _write_run(work_dir, settings, fit, change_cost,
               dataclasses.replace(config, timesteps=model.num_timesteps, seed=cfg.seed))
    summary = {
        "run_id": run_id, "algo": cfg.algo, "timesteps": int(model.num_timesteps),
        "resumed_from": None if checkpoint is None else str(checkpoint),
        "products_trained": "all" if product is None else product,
        "device": str(model.device), **loop, **_selection_summary(state),
        "val_mean_profit_random_feasible": random_profit,
        "val_mean_profit_historical": historical_profit, **_env_summary(env),
        **_fit_summary(fit), "decision_quantile": config.decision_quantile,
        "published_policy": published["published_policy"],
        "val_profit_by_policy": published["val_profit"],
        "behaviour_cloning": bc_summary, "evaluations": state["evaluations"],
        **{f"val_mean_profit_{name}": value for name, value in lines.items()},
        "learning_curve": learning_curve(state["evaluations"], lines),
        "seconds": round(time.monotonic() - started, 3)}
    write_json(work_dir / SUMMARY_JSON, summary)
    os.replace(work_dir / BEST, work_dir / MODEL_ZIP)
    _publish(work_dir, final_dir)
    env.close()
    return StageResult(stage="train", output_dir=final_dir,
                       inputs=[meta_train_path, meta_val_path,
                               processed_dir / "X_train.npy", processed_dir / "X_val.npy"],
                       summary=_flat_summary(summary),
                       notes=[f"best model: {final_dir / MODEL_ZIP} (val profit/day "
                              f"{state['best_val_profit']:,.2f} vs random feasible "
                              f"{random_profit:,.2f}, historical {historical_profit:,.2f})"])


def _selection_summary(state: dict[str, Any]) -> dict[str, Any]:
    return {"val_mean_profit_best": state["best_val_profit"],
            "best_timesteps": state["best_timesteps"]}


def _env_summary(env: Any) -> dict[str, int]:
    tables = env.market.member_tables  # train.ensemble_rewards
    return {"clipped_actions": int(env.batch.clipped_actions),
            "trust_region_fallbacks": int(env.batch.trust_fallbacks),
            "reward_members": 0 if tables is None else len(tables)}


def _fit_summary(fit: DemandFit) -> dict[str, Any]:
    """train_summary.json's keys about the demand fit."""
    return {"demand_fit": fit.demand.info, "demand_val": fit.demand_report,
            "ensemble_size": 0 if fit.ensemble is None else fit.ensemble.size,
            "ensemble_seconds": round(fit.ensemble_seconds, 3)}


def _flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The stage summary (run.json, the console): train_summary.json's scalars, the val fit's
    MAE and deviance and the behaviour cloning accuracy."""
    flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list)) and v is not None}
    flat["demand_val_mae"] = summary["demand_val"].get("mae")
    flat["demand_val_poisson_deviance"] = summary["demand_val"].get("poisson_deviance")
    if summary["behaviour_cloning"]:
        flat["bc_accuracy"] = summary["behaviour_cloning"]["accuracy"]
    return flat


# ----------------------------------------------------------------------------------------------
# The steps of a run


@dataclass
class DemandFit:
    """What train fits before any market exists (step 1 of :func:`run_train`).

    Attributes:
        demand: the point fit (``DemandModel``) and ``demand_report`` its fit on val.
        ensemble: the bootstrap refits (None below ``train.ensemble_size`` 2), and
            ``ensemble_seconds`` the time they took.
        decision: what every price is chosen on (env, val selection, teachers): the
            ensemble's ``train.decision_quantile``, or the point fit.
        trust_region: (lower, upper) by product index, or None.
        closed: the closed days (train's and val's) the fit and the env leave out.
        n_products: the product index size; ``products``: a single-product run's index.
    """

    demand: Any
    demand_report: dict[str, Any]
    ensemble: Any
    ensemble_seconds: float
    decision: Any
    trust_region: tuple[np.ndarray, np.ndarray] | None
    closed: Any
    n_products: int
    products: list[int] | None


def _fit_demand(settings: Settings, processed: ProcessedData, product: str | None,
                monitor: RunMonitor) -> DemandFit:
    """Fit the demand model (and its ensemble) on the train split's open days."""
    import polars as pl

    from pricing_cli.agent.baselines import recent_regular_price, sold_price_range
    from pricing_cli.agent.demand import DemandModel, uncapped_price_band
    from pricing_cli.agent.ensemble import decision_demand, fit_ensemble
    from pricing_cli.pricing import hold_band, restrict_to_band, trust_region_bounds

    cfg = settings.train
    meta_train_path = processed.path("meta_train.parquet")
    monitor.log(f"fitting the demand model on {meta_train_path}")
    meta_train = attach_stock(processed.meta("train"), settings, monitor)
    closed = processed.closed_days(settings.data)
    shut = closed.is_closed(meta_train["date"].to_numpy())
    if shut.any():
        # A day the store was shut says nothing about how price drives demand.
        monitor.log(f"demand fit: {int(shut.sum()):,} product-days on closed days left out")
        meta_train = meta_train.filter(pl.Series(~shut))
    n_products = processed.product_count()
    fallback_reference = _later_median_prices(processed, n_products)
    demand = DemandModel.fit(meta_train, settings, n_products=n_products,
                             fallback_reference=fallback_reference,
                             monitor=monitor, source=str(meta_train_path))
    demand_report = demand.fit_report(processed.meta("val"))
    monitor.log(f"demand model: {demand.info['newton_iterations']} Newton iterations; val MAE "
                f"{demand_report.get('mae', float('nan')):.3f} units/day, Poisson deviance "
                f"{demand_report.get('poisson_deviance', float('nan')):.3f}")
    products = None if product is None else [_product_index(meta_train, product, meta_train_path)]
    ensemble_started = time.monotonic()
    ensemble = fit_ensemble(meta_train, settings, n_products=n_products,
                            fallback_reference=fallback_reference,
                            monitor=monitor, source=str(meta_train_path), point=demand)
    ensemble_seconds = time.monotonic() - ensemble_started
    if ensemble is not None:
        monitor.log(f"demand ensemble: {ensemble.size} bootstrap refits in "
                    f"{ensemble_seconds:.1f} s")
    if cfg.decision_quantile is not None and ensemble is None:
        monitor.log("train.decision_quantile needs train.ensemble_size of 2 or more: prices "
                    "are chosen on the point fit")
    trust_region = None
    if cfg.trust_region is not None:
        trust_region = trust_region_bounds(
            *sold_price_range(processed, n_products), cfg.trust_region,
            agreed=_agreed_best_prices(cfg, processed, ensemble, closed, n_products, monitor),
            cap=cfg.trust_region_adaptive)
        if cfg.capped_price_band:
            # Do no harm where sales look capped: only the band of uncapped sales is measured,
            # and inside it the fit's response is too noisy to move from the status quo.
            band = uncapped_price_band(demand.info.get("censoring"), n_products)
            if cfg.capped_hold_margin is not None:
                band = hold_band(band, recent_regular_price(processed, n_products),
                                 cfg.capped_hold_margin)
            trust_region = restrict_to_band(trust_region, band)
    return DemandFit(demand, demand_report, ensemble, ensemble_seconds,
                     decision_demand(demand, ensemble, cfg.decision_quantile), trust_region,
                     closed, n_products, products)


def _agreed_best_prices(cfg: TrainSettings, processed: ProcessedData, ensemble: Any,
                        closed: Any, n_products: int, monitor: RunMonitor
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """The best prices the ensemble agrees on (``ensemble.agreed_best_prices``) over the
    train and val days, the days the sold range is taken from; None: a fixed region."""
    if cfg.trust_region_adaptive is None:
        return None
    if ensemble is None:
        monitor.log("train.trust_region_adaptive needs train.ensemble_size of 2 or more: the "
                    "trust region keeps its fixed margin")
        return None
    from pricing_cli.agent.baselines import load_split_meta
    from pricing_cli.agent.ensemble import agreed_best_prices

    metas = [load_split_meta(processed, split, closed) for split in ("train", "val")
             if processed.has_split(split)]
    low, high = agreed_best_prices(ensemble, metas, cfg.trust_region_agreement, n_products)
    monitor.log(f"adaptive trust region: the ensemble agrees on a best price of "
                f"{int(np.isfinite(low).sum())} of {n_products} products on some day")
    return low, high


def _load_markets(settings: Settings, processed: ProcessedData, fit: DemandFit,
                  monitor: RunMonitor) -> tuple[Market, Market, np.ndarray | None]:
    """(train market, val market, change costs or None) under the decision demand, with the
    merchant rules and the trust region. Closed days are not decision days: the env leaves
    their rows out, as the fit does. An empty val split selects on train."""
    from pricing_cli.agent.env import change_costs, load_market
    from pricing_cli.agent.guardrails import market_rule_bits

    cfg = settings.train
    stock = _stock_states(settings, processed, fit.closed, monitor)
    train_market = load_market(processed, "train", fit.decision, processed.stats,
                               closed=fit.closed, stock=stock.get("train"))
    train_market.rule_bits = market_rule_bits(settings, train_market)  # merchant rules
    change_cost = None
    if cfg.price_change_cost > 0:
        change_cost = change_costs(train_market, cfg.price_change_cost)
        train_market = dataclasses.replace(train_market, change_cost=change_cost)
    val_market = load_market(processed, "val", fit.decision, processed.stats,
                             change_cost=change_cost, closed=fit.closed, stock=stock.get("val"))
    val_market.rule_bits = market_rule_bits(settings, val_market)
    if fit.trust_region is not None:
        train_market = dataclasses.replace(train_market, trust_region=fit.trust_region)
        val_market = dataclasses.replace(val_market, trust_region=fit.trust_region)
    if val_market.n_rows == 0:
        monitor.log("the val split is empty: model selection uses the train split")
        val_market = train_market
    return train_market, val_market, change_cost


def _stock_states(settings: Settings, processed: ProcessedData, closed: Any,
                  monitor: RunMonitor) -> dict[str, Any]:
    """split -> the env's stock state (``inventory.MarketStock``) of train and val in an
    inventory market (data.stock and a ground truth with a season calendar); {} otherwise."""
    from pricing_cli.agent.baselines import load_split_meta
    from pricing_cli.agent.inventory import stock_data

    data = stock_data(settings)
    if data is None:
        return {}
    monitor.log("inventory market: the env sells from the season stock of "
                f"{settings.data.stock} and the observation carries the stock state")
    return {split: data.market_stock(load_split_meta(processed, split, closed))
            for split in ("train", "val")}


def _agent_config(settings: Settings, market: Market, fit: DemandFit, product: str | None,
                  processed_dir: Path) -> AgentConfig:
    """agent.json of this run (``published_policy``, ``timesteps`` and ``seed`` are set at
    the end)."""
    from pricing_cli.agent.policy import AgentConfig

    cfg = settings.train
    return AgentConfig(
        algo=cfg.algo, n_products=market.n_products, n_features=market.n_features,
        input_dim=int(market.features.shape[1]), price_levels=market.price_levels,
        max_daily_change=market.max_daily_change, net_arch=list(cfg.net_arch),
        embedding_dim=cfg.embedding_dim, feature_hidden=cfg.feature_hidden,
        forecast_prior=cfg.forecast_prior, price_change_cost=cfg.price_change_cost,
        reward_scale=cfg.reward_scale, episode_length=cfg.episode_length,
        products=fit.products, product_id=product, feature_cols=_feature_cols(processed_dir),
        ensemble_size=0 if fit.ensemble is None else fit.ensemble.size,
        decision_quantile=None if fit.ensemble is None else cfg.decision_quantile,
        trust_region=cfg.trust_region,
        trust_region_adaptive=(cfg.trust_region_adaptive if cfg.trust_region is not None
                               and fit.ensemble is not None else None))


def _curve_lines(settings: Settings, val_market: Market, processed: ProcessedData,
                 fit: DemandFit, work_dir: Path, monitor: RunMonitor
                 ) -> tuple[dict[str, float], Any]:
    """The learning curve's flat lines (greedy's and the planner's val profit in the env,
    agent/learning.py) and its TensorBoard log (``tensorboard/val/``)."""
    from pricing_cli.agent.learning import CurveLog, baseline_val_profits

    lines = baseline_val_profits(settings, val_market, processed, fit.decision,
                                 fit.trust_region, fit.products)
    if lines:
        monitor.log("val profit/day of the baselines in the env: "
                    + ", ".join(f"{name} {value:,.2f}" for name, value in lines.items()))
    folder = work_dir / "tensorboard" / "val" if settings.train.tensorboard else None
    return lines, CurveLog(folder, lines)


class ValSelection:
    """Model selection on val: ``selection(step)`` prices the val split with the network
    (deterministic), records the evaluation in ``state``, keeps the best weights as
    ``BEST`` and saves the state (so a resumed run keeps competing with them); ``curve``
    (agent/learning.py) draws each check in TensorBoard.

    ``seconds``: the time spent here, kept apart from the RL steps/s.
    """

    def __init__(self, model: Any, agent: PricingAgent, val_market: Market,
                 products: list[int] | None, work_dir: Path, state: dict[str, Any],
                 monitor: RunMonitor, curve: Any = None) -> None:
        self.model, self.agent, self.market, self.products = model, agent, val_market, products
        self.work_dir, self.state, self.monitor, self.curve = work_dir, state, monitor, curve
        self.seconds = 0.0

    def __call__(self, step: int) -> float:
        from pricing_cli.agent.env import simulate

        started = time.monotonic()
        self.model.policy.set_training_mode(False)
        profit = simulate(self.market, self.agent.chooser(True),
                          products=self.products)["mean_profit"]
        self.seconds += time.monotonic() - started
        state = self.state
        state["evaluations"].append({"timesteps": step, "val_mean_profit": profit})
        if self.curve is not None:
            self.curve.add(step, profit)
        if state["best_val_profit"] is None or profit > state["best_val_profit"]:
            state["best_val_profit"], state["best_timesteps"] = profit, step
            _save_model(self.model, self.work_dir / BEST)
        best = state["best_val_profit"]
        self.monitor.set_metric("val profit/day", f"{profit:,.2f} (best {best:,.2f})")
        _save_state(self.work_dir, state)
        return profit


def _resume(model: Any, checkpoint: Path | None, work_dir: Path, run_id: str,
            monitor: RunMonitor) -> dict[str, Any]:
    """Checkpointing, on the way in: the training state of the run (fresh, or the
    checkpoint's, with the weights, step count and env/RNG state restored into ``model``)."""
    if checkpoint is None:
        return _fresh_state()
    state = _load_state(work_dir)
    model.set_parameters(str(checkpoint), exact_match=True, device=model.device)
    model.num_timesteps = _checkpoint_timesteps(checkpoint)
    exact = _restore_rl_state(model, work_dir / RL_STATE)
    monitor.log(f"resuming {run_id} from {checkpoint} at {model.num_timesteps} steps"
                + ("" if exact else " (no rl_state.npz: the env starts new episodes)"))
    return state


def _warm_start(settings: Settings, model: Any, train_market: Market,
                processed: ProcessedData, fit: DemandFit, checkpoint: Path | None,
                monitor: RunMonitor) -> dict[str, Any] | None:
    """Behaviour cloning of ``train.warm_start``'s teacher before RL (a new run only);
    its summary, or None when there is none."""
    cfg = settings.train
    if cfg.warm_start == "none" or checkpoint is not None or cfg.bc_epochs <= 0:
        return None
    return behaviour_clone(model.policy, train_market, processed, cfg.bc_epochs,
                           cfg.batch_size, cfg.seed, monitor, fit.products,
                           teacher=cfg.warm_start, learning_rate=cfg.bc_learning_rate,
                           temperature=cfg.bc_temperature, demand=fit.decision)


def _learn(settings: Settings, model: Any, work_dir: Path, state: dict[str, Any],
           selection: ValSelection, checkpoint: Path | None,
           monitor: RunMonitor) -> dict[str, float]:
    """The RL loop: val selection at step 0 (a new run), ``model.learn`` to
    ``train.timesteps`` with checkpoints and val selections, a last selection and
    checkpoint. Returns its timings for train_summary.json (``rl_seconds``, ``fps``,
    ``rl_eval_seconds``, ``fps_without_eval``)."""
    cfg = settings.train
    if checkpoint is None:
        selection(0)
    remaining = max(cfg.timesteps - model.num_timesteps, 0)
    callback = make_training_callback(monitor, total=cfg.timesteps, reward_scale=cfg.reward_scale,
                                      checkpoint_every=cfg.checkpoint_every,
                                      eval_every=cfg.eval_every,
                                      on_checkpoint=lambda step: _checkpoint(model, work_dir,
                                                                             state),
                                      on_evaluate=selection)
    rl_started, rl_start_steps, eval_before = (time.monotonic(), model.num_timesteps,
                                               selection.seconds)
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=callback,
                    reset_num_timesteps=checkpoint is None, tb_log_name="agent",
                    progress_bar=False)
    rl_seconds = time.monotonic() - rl_started
    rl_eval_seconds = selection.seconds - eval_before  # val evaluations inside learn()
    if not state["evaluations"] or state["evaluations"][-1]["timesteps"] != model.num_timesteps:
        selection(model.num_timesteps)
    _checkpoint(model, work_dir, state)
    rl_steps = model.num_timesteps - rl_start_steps
    # fps_without_eval: rollouts and PPO updates only, what the RL loop itself sustains.
    return {"rl_seconds": round(rl_seconds, 3),
            "fps": round(rl_steps / max(rl_seconds, 1e-9), 1),
            "rl_eval_seconds": round(rl_eval_seconds, 3),
            "fps_without_eval": round(rl_steps / max(rl_seconds - rl_eval_seconds, 1e-9), 1)}


def _write_run(work_dir: Path, settings: Settings, fit: DemandFit,
               change_cost: np.ndarray | None, config: AgentConfig) -> None:
    """The run folder's model files: the demand model (and ensemble), trust region, change
    costs, agent.json and config.yaml."""
    from pricing_cli.agent.policy import AGENT_JSON, CHANGE_COSTS, save_trust_region

    fit.demand.save(work_dir)
    if fit.ensemble is not None:
        fit.ensemble.save(work_dir)
    if fit.trust_region is not None:
        save_trust_region(work_dir, fit.trust_region)
    if change_cost is not None:
        with atomic_write(work_dir / CHANGE_COSTS) as handle:
            np.save(handle, change_cost, allow_pickle=False)
    write_json(work_dir / AGENT_JSON, config.as_json())
    with atomic_write(work_dir / "config.yaml", "w") as handle:
        handle.write(settings_to_yaml(settings))


# ----------------------------------------------------------------------------------------------
# The model


def resolve_device(wanted: str) -> str:
    """The torch device train runs on: ``cuda`` only where torch sees a CUDA device, ``auto``
    picks it when there is one. Asking for cuda without one is an error, not a silent
    fallback to the CPU (which run.json would still record as cuda).

    Raises:
        ConfigError: ``cuda`` asked for and torch sees none.
    """
    import torch

    available = bool(torch.cuda.is_available())
    if wanted == "cuda" and not available:
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}, but no GPU is visible")
        raise ConfigError(f"train.device is cuda, but torch {torch.__version__} sees no CUDA "
                          f"device ({build})",
                          "Train with --device cpu, or --device auto (CUDA when there is "
                          "one, else the CPU).")
    if wanted == "auto":
        return "cuda" if available else "cpu"
    return wanted


def select_published_policy(settings: Settings, model: Any, agent: PricingAgent, best: Path,
                            val_market: Market, processed_dir: ProcessedData | Path,
                            products: list[int] | None, monitor: RunMonitor | None = None
                            ) -> dict[str, Any]:
    """Which policy the run publishes: the network (its best weights, ``best``), or a grid
    policy when one earns more on ``val_market``'s split under the decision demand, net of
    the change costs. Ties go to the network.

    Memoryless-stock markets: the joint greedy or planner, every policy scored with each
    row's siblings at that policy's own prices (``demand.policy_expected_units``; with a
    reference effect, the reference rolled along each path: ``evaluate.policy_units``). An
    inventory market (``val_market`` has the stock state): the stock-aware static, greedy,
    planner and fitted markdown ladder of agent/inventory.py, every policy's units capped by
    the season stock with its leftovers at the salvage value, as evaluate scores them.

    Only when ``train.publish_best_policy`` is on, the demand model prices categories
    jointly (``baselines.prices_jointly``), has a reference-price effect or the market is an
    inventory market, and every product was trained (``products`` None); otherwise the
    network, with ``val_profit`` None.

    Returns:
        {"published_policy": name, "val_profit": {policy: total profit} or None}.
    """
    from pricing_cli.agent.baselines import prices_jointly
    from pricing_cli.agent.env import simulate
    from pricing_cli.agent.evaluate import change_costs_per_row, policy_units
    from pricing_cli.agent.policy import grid_policy_meta, grid_policy_prices
    from pricing_cli.agent.reference import reference_of

    demand = agent.demand
    stocked = val_market.on_hand is not None
    # Where greedy is not already the network's start: joint categories, demand with a
    # memory, or a season's stock (the planner's path can beat the network's).
    grid_can_win = prices_jointly(demand) or reference_of(demand) is not None or stocked
    if not (settings.train.publish_best_policy and grid_can_win and products is None
            and val_market.n_rows):
        return {"published_policy": "agent", "val_profit": None}
    model.set_parameters(str(best), exact_match=True, device=model.device)
    model.policy.set_training_mode(False)
    levels = val_market.price_levels
    meta = grid_policy_meta(processed_dir, val_market.split, agent.trust_region, settings,
                            levels, demand)
    candidates = {"agent": simulate(val_market, agent.chooser(True))["prices"]}
    units_of: Any = functools.partial(policy_units, demand, meta)
    leftover: Any = None
    if stocked:  # the stock-aware policies, scored with the stock cap and the salvage
        from pricing_cli.agent import inventory

        data = inventory.stock_data(settings)
        assert data is not None
        runs = data.runs(meta)
        table = inventory.level_units(meta, demand, levels)
        cut, cover, _ = inventory.fit_ladder(
            meta, runs, table, val_market.max_daily_change,
            inventory.static_prices(meta, runs, table, val_market.max_daily_change))
        makers = inventory.stock_policies(meta, runs, table, val_market.max_daily_change,
                                          (cut, cover))
        for name in inventory.STOCK_POLICIES:
            candidates[name] = makers[name]()

        def units_of(prices: np.ndarray) -> np.ndarray:
            return runs.sales_and_left(policy_units(demand, meta, prices))[0]

        def leftover(prices: np.ndarray) -> np.ndarray:
            return runs.leftover_value(policy_units(demand, meta, prices))
    else:
        for name in ("greedy", "planner"):
            candidates[name] = grid_policy_prices(name, meta, demand, levels,
                                                  val_market.max_daily_change,
                                                  agent.change_cost)
    profit = {}
    for name, prices in candidates.items():
        total = ((prices - meta.unit_cost) * units_of(prices)
                 - change_costs_per_row(meta, prices, agent.change_cost)).sum()
        if leftover is not None:
            total += leftover(prices).sum()
        profit[name] = round(float(total), 4)
    winner = "agent"
    for name in candidates:
        if profit[name] > profit[winner] + 1e-9 * max(abs(profit[winner]), 1.0):
            winner = name
    if winner != "agent" and monitor is not None:
        kind = "stock-aware" if stocked else "joint"
        monitor.log(f"publishing the {kind} {winner}: it earned more on {val_market.split} "
                    f"than the network under the fitted demand ({profit})")
    return {"published_policy": winner, "val_profit": profit}


def _build_model(settings: Settings, env: Any, agent_config: AgentConfig, work_dir: Path,
                 device: str | None = None) -> Any:
    """MaskablePPO (or PPO) with the multi-input policy and the product-embedding extractor."""
    from pricing_cli.agent.policy import policy_class, policy_kwargs

    cfg = settings.train
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    # PPO ignores the masks; the env then moves an infeasible choice to the nearest feasible one.
    algorithm: type[Any] = MaskablePPO if cfg.algo == "maskable-ppo" else PPO
    rollout = cfg.n_steps * cfg.n_envs
    return algorithm(
        policy_class(agent_config), env, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps,
        # A minibatch larger than the rollout would be truncated by SB3 with a warning.
        batch_size=min(cfg.batch_size, rollout), n_epochs=cfg.n_epochs, gamma=cfg.gamma,
        ent_coef=cfg.ent_coef, policy_kwargs=policy_kwargs(agent_config), seed=cfg.seed,
        device=device or resolve_device(cfg.device),
        tensorboard_log=str(work_dir / "tensorboard") if cfg.tensorboard else None, verbose=0)


def _save_model(model: Any, path: Path) -> None:
    """model.save, atomically (SB3 writes in place); a full disk is a DiskFullError."""
    tmp = tmp_path_for(path)
    try:
        with disk_full_names(path):
            model.save(str(tmp))
            commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _checkpoint(model: Any, work_dir: Path, state: dict[str, Any]) -> None:
    """The weights and optimizer (SB3 zip), then what SB3 does not save: the env's episodes
    and every random generator, so a resumed run is the uninterrupted run, bit for bit."""
    _save_model(model, work_dir / CHECKPOINT)
    _save_rl_state(model, work_dir / RL_STATE)
    state["checkpoint_timesteps"] = int(model.num_timesteps)
    _save_state(work_dir, state)


# EpisodeBatch arrays that make up the env's state between steps (reference: the
# reference-price state, without which a resumed reference market restarted every episode's
# reference at 1.0).
_BATCH_ARRAYS = ("row", "end", "last_price", "held", "mask", "episode_return", "episode_profit",
                 "episode_length", "reference", "member")


def _batch_arrays(env: Any) -> tuple[str, ...]:
    """The EpisodeBatch arrays of the env's state: with the units on hand in an inventory
    market (memoryless runs keep rl_state.npz as it was)."""
    return _BATCH_ARRAYS + (("stock",) if env.market.on_hand is not None else ())


def _save_rl_state(model: Any, path: Path) -> None:
    """rl_state.npz: arrays only (no pickle). RNG states are integers, kept as JSON text."""
    import random

    import torch

    env = model.get_env()
    np_state: Any = np.random.get_state()  # the legacy tuple (kind, keys, pos, gauss...)
    scalars = {
        "env_rng": env.rng.bit_generator.state,
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_rng": random.getstate(),
        "episode_num": int(model._episode_num), "n_updates": int(model._n_updates),
        "clipped_actions": int(env.batch.clipped_actions),
    }
    arrays = {f"batch_{name}": getattr(env.batch, name) for name in _batch_arrays(env)}
    with atomic_write(path) as handle:
        np.savez(handle, **arrays, numpy_rng_keys=np_state[1],
                 torch_rng=torch.get_rng_state().numpy(),
                 last_episode_starts=np.asarray(model._last_episode_starts, dtype=bool),
                 scalars=np.array(json.dumps(scalars)))


def _restore_rl_state(model: Any, path: Path) -> bool:
    """Put back what _save_rl_state saved; False if the checkpoint predates rl_state.npz."""
    import random

    import torch

    if not path.is_file():
        return False
    env = model.get_env()
    with np.load(path, allow_pickle=False) as saved:
        scalars = json.loads(str(saved["scalars"]))
        for name in _batch_arrays(env):
            if f"batch_{name}" in saved.files:  # a checkpoint from before the array was saved
                getattr(env.batch, name)[...] = saved[f"batch_{name}"]
        kind, pos, has_gauss, gauss = scalars["numpy_rng"]
        np.random.set_state((kind, saved["numpy_rng_keys"], pos, has_gauss, gauss))
        torch.set_rng_state(torch.from_numpy(saved["torch_rng"].copy()))
        model._last_episode_starts = saved["last_episode_starts"].copy()
    version, internal, gauss_next = scalars["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))
    env.rng.bit_generator.state = scalars["env_rng"]
    env.batch.clipped_actions = scalars["clipped_actions"]
    model._episode_num, model._n_updates = scalars["episode_num"], scalars["n_updates"]
    # SB3 then skips its env.reset(): learn() continues from this observation.
    model._last_obs = env.batch.observe(np.arange(env.num_envs))
    return True


def _checkpoint_timesteps(checkpoint: Path) -> int:
    """num_timesteps stored in an SB3 zip (plain JSON, read without unpickling)."""
    with zipfile.ZipFile(checkpoint) as archive:
        return int(json.loads(archive.read("data"))["num_timesteps"])


def _fresh_state() -> dict[str, Any]:
    return {"best_val_profit": None, "best_timesteps": None, "evaluations": [],
            "checkpoint_timesteps": 0}


def _save_state(work_dir: Path, state: dict[str, Any]) -> None:
    write_json(work_dir / STATE_JSON, state)


def _load_state(work_dir: Path) -> dict[str, Any]:
    """The state of a run being resumed. Evaluations after its last checkpoint are dropped:
    training resumes from the checkpoint and redoes them (the best model found is kept)."""
    path = work_dir / STATE_JSON
    if not path.is_file():
        return _fresh_state()
    state = json.loads(path.read_text(encoding="utf-8"))
    state["evaluations"] = [e for e in state["evaluations"]
                            if e["timesteps"] <= state["checkpoint_timesteps"]]
    return state


def make_training_callback(monitor: RunMonitor, **kwargs: Any) -> Any:
    """The SB3 callback that reports to ``monitor``, checkpoints and evaluates.

    Defined inside a function so that importing this module does not import SB3.
    """
    from stable_baselines3.common.callbacks import BaseCallback

    class _TrainingCallback(BaseCallback):
        """Live progress, checkpoints and model selection from inside SB3's learn loop."""

        def __init__(self, monitor: RunMonitor, *, total: int, reward_scale: float,
                     checkpoint_every: int, eval_every: int, on_checkpoint: Any,
                     on_evaluate: Any) -> None:
            super().__init__()
            self.monitor = monitor
            self.total = total
            self.reward_scale = reward_scale
            self.checkpoint_every = checkpoint_every
            self.eval_every = eval_every
            self.on_checkpoint = on_checkpoint
            self.on_evaluate = on_evaluate

        def _on_training_start(self) -> None:
            self.started = time.monotonic()
            self.start_steps = self.num_timesteps
            self.next_checkpoint = (self.num_timesteps // self.checkpoint_every + 1) \
                * self.checkpoint_every
            self.next_eval = (self.num_timesteps // self.eval_every + 1) * self.eval_every
            self.monitor.add_bar("timesteps", "RL timesteps", self.total)
            self.monitor.update_bar("timesteps", completed=self.num_timesteps)

        def _on_rollout_start(self) -> None:
            # Checkpoints are taken here, between a PPO update and the next rollout: nothing
            # is half-collected, so --resume continues exactly where the run stopped.
            steps = self.num_timesteps
            if steps >= self.next_checkpoint:
                self.on_checkpoint(steps)
                self.next_checkpoint = (steps // self.checkpoint_every + 1) * self.checkpoint_every

        def _on_step(self) -> bool:
            steps = self.num_timesteps
            self.monitor.update_bar("timesteps", completed=steps)
            if steps >= self.next_eval:
                self.on_evaluate(steps)
                self.model.policy.set_training_mode(False)
                self.next_eval = (steps // self.eval_every + 1) * self.eval_every
            self.monitor.check_memory()
            return True

        def _on_rollout_end(self) -> None:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            fps = (self.num_timesteps - self.start_steps) / elapsed
            self.monitor.set_metric("fps", f"{fps:,.0f}")
            episodes = [e["profit"] for e in self.model.ep_info_buffer or [] if "profit" in e]
            if episodes:
                self.monitor.set_metric("episode profit", f"{np.mean(episodes):,.1f}")
            losses = self.model.logger.name_to_value
            if "train/loss" in losses:
                pg = losses.get("train/policy_gradient_loss", 0.0)
                value = losses.get("train/value_loss", 0.0)
                self.monitor.set_metric(
                    "loss", f"{losses['train/loss']:.4g} (pg {pg:.3g}, value {value:.3g})")

    return _TrainingCallback(monitor, **kwargs)


# ----------------------------------------------------------------------------------------------
# Behaviour cloning


def behaviour_clone(policy: Any, market: Market, processed_dir: ProcessedData | Path,
                    epochs: int,
                    batch_size: int, seed: int, monitor: RunMonitor,
                    products: list[int] | None = None, *, teacher: str = "bc",
                    learning_rate: float = 1e-3, temperature: float = 0.01,
                    demand: Any = None) -> dict[str, Any]:
    """Teach the policy's own actor a teacher's pricing before RL.

    Teachers:
        bc: history. Masked cross-entropy on the processed ``price_level`` labels; rows
            without a label (-1) or whose label is infeasible under their mask are skipped.
        greedy: the fitted demand model's myopic optimum, as soft targets over every level,
            ``softmax((relative profit - 1) / temperature)`` (``Market.profit_forecast``). Soft
            targets teach the whole ranking, not just the best level, so when the agent's own
            previous price makes the best level infeasible, its best feasible logit is still
            the most profitable feasible level.
        planner: the best feasible price path of each train product under the fitted model
            and the market's change costs (:func:`planner_path`); each row is seen in the
            planner's own state (its previous price and days held) and labelled with its
            level. Needs ``demand``. Worth it when changes cost money: greedy then stays
            put where the planner moves once and holds.

    Observations (bc, greedy) are the rows as history had them (yesterday's historical price
    as the agent's own last price). Accuracy: the argmax of the logits masked by the row's
    feasible levels (``allowed_levels``) against the teacher's level under the same mask.

    Returns:
        teacher, rows used, rows skipped, final-epoch loss and accuracy.
    """
    import torch

    state = Teacher.of(teacher, market, processed_dir, demand)
    usable = state.usable.copy()
    if products is not None:
        usable &= np.isin(market.product_index, products)
    rows = np.nonzero(usable)[0]
    skipped = int(market.n_rows - len(rows))
    if state.labels is not None:
        # A label the row's own mask rules out (history's moves beyond the daily limit; the
        # planner's first move, planned from an unknown previous price) cannot be taught.
        feasible = state.allowed_levels(rows)[np.arange(len(rows)), state.labels[rows]]
        skipped += int((~feasible).sum())
        rows = rows[feasible]
    if len(rows) == 0:
        return {"teacher": teacher, "rows": 0, "rows_skipped": skipped, "loss": None,
                "accuracy": None}
    rng = np.random.default_rng(seed)
    n_batches = -(-len(rows) // batch_size)
    monitor.add_bar("bc", f"behaviour cloning ({teacher}) batches", epochs * n_batches)
    policy.set_training_mode(True)
    # Its own optimizer: PPO's learning rate is tuned for small policy updates, too slow here.
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    total_loss = correct = seen = 0.0
    for _ in range(epochs):
        total_loss = correct = seen = 0.0
        order = rng.permutation(rows)
        for start in range(0, len(order), batch_size):
            # Sorted rows read the memory-mapped features in file order.
            batch = np.sort(order[start:start + batch_size])
            loss, target, allowed, logits = state.loss(policy, batch, temperature)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
            chosen = logits.detach().masked_fill(~allowed, -torch.inf).argmax(dim=1)
            correct += float((chosen == target).sum())
            seen += len(batch)
            monitor.update_bar("bc", advance=1)
            monitor.check_memory()
    policy.set_training_mode(False)
    summary = {"teacher": teacher, "rows": int(len(rows)), "rows_skipped": skipped,
               "epochs": epochs, "loss": total_loss / seen, "accuracy": correct / seen}
    monitor.log(f"behaviour cloning ({teacher}): accuracy {summary['accuracy']:.3f} on "
                f"{len(rows)} rows")
    return summary


@dataclass
class Teacher:
    """What behaviour cloning imitates on the train split, and the state each row is seen in.

    Attributes:
        name: bc (history's ``price_level`` labels), greedy (soft targets from the market's
            profit forecast; ``labels`` None) or planner (:func:`planner_path`'s levels).
        last_price, held, reference: the agent's own last price, days held and reference
            state on each row: history's (yesterday's historical price), or for the planner
            the teacher's own path.
        usable: rows with a label (bc: not -1).
    """

    name: str
    market: Market
    labels: np.ndarray | None
    last_price: np.ndarray
    held: np.ndarray
    reference: np.ndarray | None
    usable: np.ndarray

    @classmethod
    def of(cls, name: str, market: Market, processed_dir: ProcessedData | Path,
           demand: Any) -> Teacher:
        from pricing_cli.agent.processed import as_processed

        usable = np.ones(market.n_rows, dtype=bool)
        if name == "planner":
            planned, last_price, held, reference = planner_path(market, processed_dir, demand)
            return cls(name, market, planned, last_price, held, reference, usable)
        labels: np.ndarray | None = None
        if name == "bc":
            labels = as_processed(processed_dir).labels("train").astype(np.int64)
            if market.split_rows is not None:  # closed days left out of the market
                labels = labels[market.split_rows]
            usable = labels >= 0
        return cls(name, market, labels, market.previous_price, market.held_days,
                   market.history_reference, usable)

    def allowed_levels(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), K) bool: the levels feasible in the state each row is seen in."""
        from pricing_cli.pricing import feasible_mask

        if self.name == "planner":
            grid = self.market.grid(rows)
            return feasible_mask(grid, self.last_price[rows],
                                 self.market.max_daily_change)[0].astype(bool)
        return self.market.processed_masks(rows)

    def loss(self, policy: Any, batch: np.ndarray, temperature: float) -> tuple[Any, ...]:
        """(loss, target levels, allowed levels, logits) of the policy on ``batch``: masked
        cross-entropy on the labels, or on greedy's soft targets
        ``softmax((relative profit - 1) / temperature)``."""
        import torch
        import torch.nn.functional as F

        from pricing_cli.agent.policy import action_logits

        market, last_price = self.market, self.last_price
        state_ref = None if self.reference is None else self.reference[batch]
        obs, _ = policy.obs_to_tensor(
            market.observation(batch, last_price[batch], self.held[batch], state_ref))
        allowed = torch.as_tensor(self.allowed_levels(batch), device=policy.device)
        logits = action_logits(policy, obs)
        if self.labels is None:
            forecast = market.profit_forecast(batch, last_price[batch], state_ref)
            relative = torch.as_tensor(forecast, dtype=logits.dtype, device=policy.device)
            soft = torch.softmax((relative - 1.0) / temperature, dim=1)
            loss = -(soft * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
            target = relative.masked_fill(~allowed, -torch.inf).argmax(dim=1)
        else:
            target = torch.as_tensor(self.labels[batch], device=policy.device)
            loss = F.cross_entropy(logits.masked_fill(~allowed, -1e9), target)
        return loss, target, allowed, logits


def planner_path(market: Market, processed_dir: ProcessedData | Path, demand: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The planner's levels on the train split, and the state it meets on each row.

    Returns:
        (levels int64, previous price, days held, reference price or None without a
        reference effect) per row of ``market`` (the train split); a product's first row
        starts from its historical previous price (and reference), as env episodes do.
    """
    from pricing_cli.agent.baselines import load_split_meta, planned_prices
    from pricing_cli.agent.env import held_days
    from pricing_cli.agent.reference import (
        reference_of,
        series_references,
        with_start_reference,
    )
    from pricing_cli.pricing import nearest_level

    meta = with_start_reference(load_split_meta(processed_dir, market.split, market.closed),
                                demand, processed_dir, market.split)
    prices = planned_prices(meta, demand, market.price_levels, market.max_daily_change,
                            market.change_cost)
    first = np.zeros(market.n_rows, dtype=bool)
    first[meta.series_start] = True
    previous = np.r_[np.nan, prices[:-1]]
    previous[first] = market.previous_price[first]
    levels = np.empty(market.n_rows, dtype=np.int64)
    for start in range(0, market.n_rows, 65_536):
        rows = np.arange(start, min(start + 65_536, market.n_rows))
        levels[rows] = nearest_level(market.grid(rows), prices[rows])
    effect = reference_of(demand)
    reference = (None if effect is None or meta.start_reference is None
                 else series_references(meta, effect, prices))
    return levels, previous, held_days(prices, first), reference


# ----------------------------------------------------------------------------------------------
# Helpers


def _prepare_run_folder(models_dir: Path, run_id: str, resume: bool
                        ) -> tuple[Path, Path, Path | None]:
    """(final folder, work folder, checkpoint to resume from or None).

    A work folder without a checkpoint (a run stopped before its first one) is removed and
    the run starts over, with or without --resume.
    """
    final_dir, work_dir = models_dir / run_id, models_dir / f"{PARTIAL_PREFIX}{run_id}"
    if models_dir.is_dir():
        # A publish killed between its two renames left the previous run as .tmp-old-...
        sweep_stale_staging(final_dir)
    if final_dir.exists():
        check_output_dir(final_dir, "train")  # a run folder is replaced only if train made it
    stopped_early = work_dir.exists() and not (work_dir / CHECKPOINT).is_file()
    if stopped_early:
        # Killed before its first checkpoint: nothing to resume, so the run starts over.
        check_output_dir(work_dir, "train")
        shutil.rmtree(work_dir)
    if resume:
        if (work_dir / CHECKPOINT).is_file():
            # A checkpoint killed mid-write left its temporary file; it must not be published.
            sweep_stale_tmp(work_dir)
            from pricing_cli.agent.policy import MODEL_ZIP

            if (work_dir / MODEL_ZIP).is_file() and not (work_dir / BEST).exists():
                # Killed while publishing: the best model had already taken its final name.
                os.replace(work_dir / MODEL_ZIP, work_dir / BEST)
            return final_dir, work_dir, work_dir / CHECKPOINT
        if (final_dir / CHECKPOINT).is_file():
            shutil.copytree(final_dir, work_dir)
            # The best model so far keeps competing with what the resumed run finds.
            from pricing_cli.agent.policy import MODEL_ZIP

            os.replace(work_dir / MODEL_ZIP, work_dir / BEST)
            return final_dir, work_dir, work_dir / CHECKPOINT
        if not stopped_early:
            raise ModelError(f"--resume: no checkpoint for run '{run_id}' in {models_dir}",
                             "Pass --run-id of an earlier run (see the folders under "
                             f"{models_dir}), or drop --resume to start a new run.")
        # --resume of a run killed before its first checkpoint: start it from step 0.
    elif final_dir.exists():
        raise ModelError(f"run folder {final_dir} already exists",
                         "Pass --resume to continue it, or another --run-id.")
    elif work_dir.exists():
        raise ModelError(f"{work_dir} holds an unfinished (killed) run '{run_id}'",
                         f"Pass --resume --run-id {run_id} to continue it.")
    work_dir.mkdir(parents=True)
    write_owner_marker(work_dir, "train", list_files=False)
    return final_dir, work_dir, None


def _publish(work_dir: Path, final_dir: Path) -> None:
    """The finished work folder becomes ``final_dir`` by renaming it as a whole: a kill leaves
    either the complete ``.partial-`` folder (resume publishes it) or the published run."""
    sweep_stale_tmp(work_dir)  # e.g. a checkpoint's temporary file from a killed save
    if final_dir.exists():
        check_output_dir(final_dir, "train")
    replace_dir(work_dir, final_dir)


def _product_index(meta_train: pl.DataFrame, product_id: str, path: Path) -> int:
    import polars as pl

    found = meta_train.filter(pl.col("product_id") == product_id)["product_index"]
    if found.len() == 0:
        examples = ", ".join(meta_train["product_id"].unique(maintain_order=True).head(5).to_list())
        raise ConfigError(f"--product {product_id!r} has no rows in {path}",
                          f"Pass a product_id with train history, e.g. {examples}.")
    return int(found[0])


def attach_stock(meta: pl.DataFrame, settings: Settings, monitor: RunMonitor) -> pl.DataFrame:
    """The train meta with column ``on_hand`` from data.stock (null where the file has no
    row for a product-day); unchanged without a stock file."""
    if settings.data.stock is None:
        return meta
    from pricing_cli.data.raw_contract import read_stock

    stock, report = read_stock(settings.data.stock, settings.data)
    if report.bad_rows:
        monitor.log(f"stock: skipped {report.bad_rows} bad row(s): " + "; ".join(report.examples))
    joined = meta.join(stock, on=["product_id", "date"], how="left", maintain_order="left")
    monitor.log(f"stock: on_hand for {joined['on_hand'].is_not_null().sum():,} of "
                f"{joined.height:,} train product-days from {settings.data.stock}")
    return joined


def _later_median_prices(processed: ProcessedData, n_products: int) -> np.ndarray:
    """Median price per product over val: the reference of products new after train (never
    the test split: train does not read it)."""
    import polars as pl

    out = np.full(n_products, np.nan)
    if processed.has_split("val"):
        table = (processed.meta("val", ["product_index", "price"])
                 .group_by("product_index").agg(pl.col("price").median()))
        out[table["product_index"].to_numpy()] = table["price"].to_numpy()
    return out


def _historical_profit(market: Market, products: list[int] | None) -> float:
    """Mean profit per product-day of the historical prices, under the fitted demand (net of
    the market's change costs, as the agent's is)."""
    from pricing_cli.pricing import is_price_change

    rows = np.arange(market.n_rows) if products is None else np.nonzero(
        np.isin(market.product_index, products))[0]
    if len(rows) == 0:
        return 0.0
    price = market.historical_price[rows]
    units = market.expected_units(rows, price)
    assert market.change_cost is not None
    paid = (market.change_cost[market.product_index[rows]]
            * is_price_change(price, market.previous_price[rows]))
    return float(((price - market.unit_cost[rows]) * units - paid).mean())


def _feature_cols(processed_dir: Path) -> list[str] | None:
    path = processed_dir / "feature_cols.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
