"""One config loader for every subcommand.

Precedence, lowest first::

    built-in defaults < preset (--preset) < YAML file (--config / PRICECTL_CONFIG)
        < env vars PRICECTL_<SECTION>__<KEY> < command-line flags

The result is a frozen, typed :class:`Settings`. Unknown keys are rejected with the file they
came from and the closest valid key; wrong types name the key and the type expected. Only
safe YAML loading is used, because configs may come from elsewhere; a config file is capped in
size (MAX_CONFIG_BYTES) and in the number of values its aliases expand to (MAX_CONFIG_NODES),
and an error message echoes at most MAX_ECHO characters of a value (docs/security.md).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import reprlib
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pricing_cli.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
ENV_PREFIX = "PRICECTL_"
# A whole documented config is about 10 KiB and 150 values: these caps leave room for any real
# config while refusing a 50 MB list or a "billion laughs" alias bomb in milliseconds.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 10_000
MAX_LIST_ITEMS = 64
MAX_ECHO = 200
# Seeds reach np.random.seed (via stable-baselines3), which takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


class Section(BaseModel):
    """Base of every config section: frozen, and no unknown keys."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True,
        allow_inf_nan=False,  # inf or nan in a rate, cost or fraction is always a mistake
    )


class ColumnMap(Section):
    """Names of the raw transaction columns in the input files (maps an export as it is)."""

    date: str = "date"
    """Transaction date or datetime (ISO)."""
    product_id: str = "product_id"
    """Product identifier (read as a string)."""
    quantity: str = "quantity"
    """Units sold; negative is a return."""
    unit_price: str = "unit_price"
    """Price paid per unit, > 0."""
    store_id: str | None = None
    """Optional store column; None if absent."""


class CatalogColumnMap(Section):
    """Names of the catalog columns in the catalog file (maps an export as it is)."""

    product_id: str = "product_id"
    """Product identifier (read as a string)."""
    unit_cost: str = "unit_cost"
    """Cost of one unit, >= 0."""
    min_price: str = "min_price"
    """Lowest allowed price, > 0."""
    max_price: str = "max_price"
    """Highest allowed price, >= min_price."""
    category: str = "category"
    """Optional category column; absent means no category."""


class DataSettings(Section):
    """Where raw data lives and how it is read."""

    transactions: str = "data/raw/transactions/*.csv*"
    """Glob of transaction files: CSV (optionally .gz) or Parquet."""
    catalog: str = "data/raw/catalog.csv"
    """Catalog file: product_id, unit_cost, min_price, max_price, optional category."""
    ground_truth: str = "data/raw/ground_truth.json"
    """True demand parameters (only for generated markets); ignored if missing."""
    stock: str | None = None
    """Optional stock file (CSV/Parquet: date, product_id, on_hand units that day). Days
    that sold all their stock are censored demand: the demand fit leaves them out. None: no
    stock data (the fit then down-weights days that look capped; train.demand_detect_capped)."""
    columns: ColumnMap = ColumnMap()
    """Column-name mapping for the transaction files."""
    catalog_columns: CatalogColumnMap = CatalogColumnMap()
    """Column-name mapping for the catalog file."""
    closed_weekdays: list[int] = []
    """Weekdays the store is closed (0 = Monday ... 6 = Sunday): left out of the demand fit
    and of recommendations. Days on which no product sold anything are found as closed too."""
    closed_dates: list[date] = []
    """Dates the store is closed (public holidays): left out like closed_weekdays."""
    date_format: str | None = None
    """strftime format of the date column; None means ISO date or datetime."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Fraction of bad rows per file above which the file is an error instead of a skip."""
    bad_row_examples: int = Field(5, ge=0)
    """How many bad rows to show per file as file:line examples."""
    read_chunk_mb: float = Field(2.0, gt=0)
    """CSV files larger than this (MiB) are parsed in blocks of whole records of about this
    size, so reading holds one block, not one whole file; smaller files in one piece. Counts
    are the same either way; float sums may differ in the last bit (docs/scaling.md)."""


class HolidayWindowSettings(Section):
    """One event window of the holidays scenario."""

    name: str
    """Label, for the docs and ground_truth.json."""
    start: str = Field(pattern=r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")
    """First day, MM-DD."""
    end: str = Field(pattern=r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")
    """Last day (inclusive), MM-DD, in the same year as start."""
    shape: Literal["ramp", "flat"] = "ramp"
    """ramp: the intensity rises linearly from 0 on start to 1 on end; flat: 1 throughout."""
    level: float = Field(0.4, ge=-2.0, le=2.0)
    """Change of log demand at full intensity."""
    elasticity: float = Field(0.35, ge=-0.5, le=1.0)
    """Relative change of every elasticity at full intensity."""


class ScenarioSettings(Section):
    """Switches that make a market break the fitted model's assumptions (docs/market.md,
    "Scenarios"). All off is today's market; they combine, except that substitution takes
    neither demand_form (it is a logit of its own), stockouts nor reference_prices, and
    stockouts do not combine with reference_prices, nor inventory with stockouts, substitution
    or reference_prices."""

    price_endogeneity: bool = False
    """An unobserved AR(1) log-demand shock that the historical pricer partly sees: it promotes
    when demand is weak and prices up when it is strong."""
    shock_autocorr: float = Field(0.7, ge=0.0, lt=1.0)
    """AR(1) coefficient of the demand shock (day to day)."""
    shock_sd: float = Field(0.4, gt=0.0, le=1.0)
    """Stationary standard deviation of the log-demand shock."""
    pricer_signal_corr: float = Field(0.9, ge=0.0, le=1.0)
    """Correlation of the pricer's daily signal with the shock (1 = the pricer sees it)."""
    demand_form: Literal["loglog", "linear", "logit"] = "loglog"
    """Shape of the price response: constant elasticity, linear with a choke price, or logit."""
    substitution: bool = False
    """Products of a category are substitutes: a multinomial logit with an outside option."""
    outside_share: float = Field(0.5, gt=0.0, lt=1.0)
    """Substitution: the outside option's share when every product is at its list price."""
    stockouts: bool = False
    """Limited daily stock (binds on 10-20% of days, more on promotion days); recorded sales
    are min(demand, stock)."""
    stock_file: bool = False
    """Stockouts: also write stock.csv (date,product_id,on_hand) beside the transactions."""
    holidays: bool = False
    """Event windows (holiday_windows) in which demand level and elasticity shift."""
    holiday_windows: list[HolidayWindowSettings] = [
        HolidayWindowSettings(name="christmas", start="11-01", end="12-24", shape="ramp",
                              level=0.4, elasticity=0.35),
        HolidayWindowSettings(name="black-friday-week", start="11-23", end="11-29",
                              shape="flat", level=0.3, elasticity=0.1),
    ]
    """Holidays: the windows; the default is a Nov-Dec ramp to Christmas plus Black Friday week."""
    reference_prices: bool = False
    """Demand depends on the price against a reference (an EWMA of the product's own past
    prices), with loss aversion."""
    reference_rate: float = Field(0.1, gt=0.0, le=1.0)
    """EWMA rate of the reference price (reference += rate * (price - reference) each day)."""
    reference_gain: float = Field(1.0, ge=0.0)
    """Log-demand gain per unit of (reference - price) / reference below the reference."""
    reference_loss: float = Field(2.5, ge=0.0)
    """Log-demand loss per unit of (price - reference) / reference above it (loss aversion)."""
    inventory: Literal["off", "markdown"] = "off"
    """Season inventory: ``markdown`` gives each product one delivery per season (a fixed
    season stock, no reorders), sales are min(demand, on hand), and what is left at the
    season's end is sold off at the salvage value. Writes stock.csv (on hand each day)."""
    season_days: int = Field(91, ge=7, le=3660)
    """Inventory: season length in days, counted back from the history's last day (the last
    quarter is one season); the history's first season may be shorter."""
    season_stock_ratio: float = Field(1.3, gt=0.0, le=5.0)
    """Inventory: a season's stock as a share of its expected demand at the list prices
    (below 1: stock binds unless the price goes up; above 1: a markdown clears it)."""
    salvage_fraction: float = Field(0.4, ge=0.0, le=1.0)
    """Inventory: what a unit left at the season's end fetches, as a share of its unit cost."""

    @property
    def active(self) -> bool:
        """Whether any switch is on (off: the market is byte for byte today's)."""
        return (self.price_endogeneity or self.demand_form != "loglog" or self.substitution
                or self.stockouts or self.holidays or self.reference_prices
                or self.inventory != "off")

    @model_validator(mode="after")
    def _combinable(self) -> ScenarioSettings:
        if self.substitution and self.demand_form != "loglog":
            raise ValueError("substitution is a logit of its own: leave demand_form at loglog")
        if self.substitution and (self.stockouts or self.reference_prices):
            raise ValueError("substitution does not combine with stockouts or reference_prices")
        if self.stockouts and self.reference_prices:
            raise ValueError("stockouts do not combine with reference_prices")
        if self.inventory != "off" and (self.stockouts or self.substitution
                                        or self.reference_prices):
            raise ValueError("inventory does not combine with stockouts, substitution or "
                             "reference_prices (it has a stock of its own)")
        if self.stock_file and not self.stockouts:
            raise ValueError("stock_file needs stockouts: true")
        return self


class GenerateSettings(Section):
    """The synthetic market written by `pricectl generate`."""

    output_dir: str = "data/raw"
    """Where transactions/, catalog.csv and ground_truth.json are written."""
    seed: int = Field(7, ge=0, le=MAX_SEED)
    """Random seed; the same seed gives byte-identical files."""
    n_products: int = Field(50, ge=1)
    """Number of products in the catalog."""
    n_categories: int = Field(5, ge=1)
    """Number of product categories."""
    start_date: date = date(2023, 1, 1)
    """First day of history."""
    n_days: int = Field(365, ge=14, le=36_600)
    """Days of history."""
    mean_transactions_per_day: float = Field(6.0, gt=0)
    """Average transactions per product-day at list price (sets the sales volume)."""
    return_rate: float = Field(0.02, ge=0, lt=1)
    """Fraction of sale transactions returned later (a negative-quantity row 1-7 days after)."""
    file_period: Literal["month", "week", "day"] = "month"
    """One transaction file per period."""
    file_format: Literal["csv", "csv.gz", "parquet"] = "csv"
    """Format of the transaction files."""
    n_stores: int = Field(3, ge=0)
    """Stores S1..Sn a transaction is assigned to; 0 writes no store_id column."""
    max_units_per_transaction: int = Field(4, ge=1)
    """A transaction holds 1..this many units (uniform), so the mean is about (k + 1) / 2."""
    promotions_per_year: float = Field(8.0, ge=0)
    """Promotions (10-30% off for 3-7 days) per product per year; gaps of 0.5-1.5x the mean."""
    list_price_changes_per_year: float = Field(3.0, ge=0)
    """Permanent list-price changes (-10%..+10%) per product per year, on average."""
    elasticity_season: float = Field(0.10, ge=-0.4, le=0.4)
    """Relative change of every elasticity per unit of the product's seasonal wave."""
    elasticity_weekend: float = Field(-0.08, ge=-0.4, le=0.4)
    """Relative change of every elasticity on Saturdays and Sundays (< 0: less sensitive)."""
    scenario: ScenarioSettings = ScenarioSettings()
    """Markets that break the model's assumptions; all off by default."""


class FeaturesSettings(Section):
    """The lazy, streaming `features` stage."""

    output_dir: str = "data/features"
    """Per-product Parquet files, scalers.json and feature_manifest.json go here."""
    lags: list[int] = Field([1, 7, 14], max_length=MAX_LIST_ITEMS)
    """Lags (days) of units and price."""
    windows: list[int] = Field([7, 28], max_length=MAX_LIST_ITEMS)
    """Rolling windows (days) for mean/std of units and price."""
    reference_window: int = Field(28, ge=2, le=3660)
    """Rolling window (days) of the reference price that price_rel_ref is relative to."""
    val_start: date | None = None
    """First day of validation; None means use val_fraction."""
    test_start: date | None = None
    """First day of test; None means use test_fraction."""
    val_fraction: float = Field(0.15, gt=0, lt=1)
    """Fraction of days (from the end, before test) used for validation."""
    test_fraction: float = Field(0.15, gt=0, lt=1)
    """Fraction of days at the end used for test."""
    buckets: Literal["auto"] | int = "auto"
    """Product buckets the daily panel and features are built in, one after the other, so
    memory stays flat as products grow; auto: from the product-days and --max-memory
    (docs/scaling.md). Changes memory and time only, never the output files."""

    @field_validator("buckets")
    @classmethod
    def _at_least_one_bucket(cls, value: Literal["auto"] | int) -> Literal["auto"] | int:
        if value != "auto" and not 1 <= value <= 1_000_000:
            raise ValueError("must be 'auto' or a whole number from 1 to 1,000,000")
        return value

    @field_validator("lags", "windows")
    @classmethod
    def _positive_days(cls, value: list[int], info: Any) -> list[int]:
        # A window of 1 day has no standard deviation, and a lag of 0 is today (leakage).
        smallest = 2 if info.field_name == "windows" else 1
        if any(day < smallest for day in value):
            raise ValueError(f"every entry must be >= {smallest} days")
        return sorted(set(value))


    @field_validator("lags", "windows")
    @classmethod
    def _at_most_ten_years(cls, value: list[int]) -> list[int]:
        # Longer than any history: every value would be null, and the window would be built.
        if any(day > 3660 for day in value):
            raise ValueError("every entry must be at most 3660 days (ten years)")
        return value


class PreprocessSettings(Section):
    """Per-product feature files to batches of decision samples."""

    input_glob: str = "data/features/*.parquet"
    """Per-series files to read (the output of `features` by default)."""
    output_dir: str = "data/intermediate"
    """batch_NNNN.npz and manifest.json go here."""
    batch_size: int = Field(500, ge=1)
    """Files per batch at most; the parent holds one batch at a time."""
    batch_max_mb: float = Field(64.0, gt=0)
    """Estimated sample bytes per batch at most, in MiB (whichever of this and batch_size
    is reached first closes a batch), so a batch stays this size however long the history;
    the rule is in docs/batch-format.md."""
    workers: int = Field(0, ge=0)
    """Worker processes; 0 means all cores."""
    price_levels: int = Field(21, ge=2, le=32767)
    """K: candidate price levels spanning each product's [min_price, max_price]."""
    max_daily_change: float = Field(0.25, gt=0)
    """Largest allowed relative price change from one day to the next."""
    history_window: int = Field(7, ge=0, le=3660)
    """Days of recent units and prices stacked into the state."""
    heads: list[str] = Field(["price_level", "price_move"], max_length=MAX_LIST_ITEMS)
    """Label heads; price_level and price_move are built in."""
    move_tolerance: float = Field(0.005, ge=0)
    """Relative change below which a price move counts as hold."""
    keep_batches: bool = False
    """Keep intermediate batches after a successful merge."""
    resume: bool = True
    """Reuse batches whose inputs and config are unchanged."""
    fail_fast: bool = False
    """Stop at the first failed file instead of quarantining it."""
    executor: Literal["local", "ray"] = "local"
    """local: a process pool on this machine. ray: Ray tasks (pip install 'pricing-cli[ray]')."""
    ray_address: str | None = None
    """With executor ray: null starts a local Ray instance; auto or ray://host:port joins a
    cluster whose nodes all see the input files at the same path (docs/scaling.md)."""


class MergeSettings(Section):
    """Batches to the processed arrays."""

    strategy: Literal["sequential", "accumulative"] = "sequential"
    """sequential: two-pass, memory set by one batch. accumulative: load-all reference."""
    output_dir: str = "data/processed"
    """X_{split}.npy, labels/masks/meta per split and the stats go here."""
    keep_batches: bool = False
    """Keep the intermediate batches after a successful merge."""


class TrainSettings(Section):
    """The multi-product pricing agent."""

    models_dir: str = "models"
    """Run folders models/<run_id>/ are created here."""
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    """Name of the run folder (letters, digits, '.', '_', '-'; it stays inside models_dir);
    None means a timestamp."""
    algo: Literal["maskable-ppo", "ppo"] = "maskable-ppo"
    """RL algorithm."""
    timesteps: int = Field(50_000, ge=1)
    """Environment steps of RL training."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the env, the policy and the demand fit."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Torch device."""
    n_envs: int = Field(16, ge=1)
    """Parallel environments (vectorized in one numpy step)."""
    episode_length: int = Field(28, ge=1)
    """Days in one episode (a window of one product)."""
    embedding_dim: int = Field(16, ge=1, le=4096)
    """Size of the product embedding."""
    net_arch: list[int] = Field([64, 64], max_length=16)
    """Hidden layers of the policy and value networks (each 1..65536 units)."""
    learning_rate: float = Field(3e-4, gt=0)
    """Optimizer learning rate."""
    n_steps: int = Field(256, ge=1)
    """Rollout length per env before each PPO update."""
    batch_size: int = Field(512, ge=1)
    """PPO minibatch size."""
    n_epochs: int = Field(5, ge=1)
    """PPO epochs per update."""
    gamma: float = Field(0.9, gt=0, le=1)
    """Discount factor."""
    ent_coef: float = Field(0.01, ge=0)
    """Entropy bonus."""
    reward_scale: float = Field(1.0, gt=0)
    """The reward is the (normalized) profit multiplied by this."""
    normalize_reward: bool = True
    """Divide each product's daily profit by its mean best daily profit under the fitted
    demand model, so every product's reward is about 1 a day and products whose profits are
    100x larger do not dominate the value loss. Off: reward = profit * reward_scale."""
    warm_start: Literal["none", "bc", "greedy", "planner"] = "none"
    """Supervised start before RL. bc: clone the historical prices (labels + masks). greedy:
    clone each train day's most profitable feasible level under the fitted demand model (the
    myopic optimum). planner: clone the best feasible price path under the fitted model and
    the change costs (worth it with price_change_cost > 0). none: no cloning; with
    forecast_prior > 0 the policy already starts at the greedy choice."""
    bc_epochs: int = Field(30, ge=0)
    """Epochs of behaviour cloning for --warm-start bc or greedy."""
    bc_learning_rate: float = Field(1e-3, gt=0)
    """Adam learning rate of the behaviour-cloning step (RL uses learning_rate)."""
    bc_temperature: float = Field(0.01, gt=0)
    """--warm-start greedy: soft targets softmax((relative profit - 1) / this); smaller is
    sharper (0.01: a level 1% less profitable gets e^-1 of the best level's weight)."""
    checkpoint_every: int = Field(10_000, ge=1)
    """Save a checkpoint every N steps."""
    eval_every: int = Field(10_000, ge=1)
    """Evaluate on val every N steps to select the best model."""
    demand_shrinkage: float = Field(5.0, ge=0)
    """Strength of the pooling of product demand parameters toward their category."""
    demand_forms: list[Literal["loglog", "linear", "logit"]] = ["loglog", "linear", "logit"]
    """Price-response shapes the demand fit tries for every product: loglog (constant
    elasticity), linear (with a choke price), logit (units = M·σ(a − b·price/ref)). Each
    product gets the one with the lowest Poisson deviance on its held-out last train days,
    pooled toward its category's choice; [loglog] alone: no selection (docs/agent.md)."""
    demand_holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each product's last train days held out to choose its demand shape (the
    shapes are then refitted on all train days). The val and test splits are never used."""
    demand_events: dict[str, list[str]] = {"black_friday_week": ["11-22", "11-30"],
                                           "christmas_run_up": ["11-01", "12-24", "ramp"]}
    """Calendar event windows of the demand model, name: [first MM-DD, last MM-DD] or
    [first, last, "ramp"] (inclusive, every year; a window may wrap past New Year). Inside
    each window demand gets its own level shift and (with demand_event_elasticity) its own
    elasticity shift: the full shift on every day of a plain ("flat") window; a "ramp" window
    grows linearly from 0 on its first day to the full shift on its last (a season that
    builds up). {}: no events. The default is the retail Black Friday week and the Christmas
    shopping season building from November 1 to Christmas Eve."""
    demand_event_elasticity: bool = True
    """Let the elasticity shift inside each event window (shoppers compare prices more in
    sales seasons). Off: events move the level only."""
    demand_year_harmonics: int = Field(2, ge=0)
    """Week-of-year effects: yearly sine/cosine pairs of order 2..1+N as common level terms
    (order 1 is each product's own season). Used only when train spans a year or more
    (shorter, they would extrapolate). 0: none."""
    demand_control_lags: int = Field(2, ge=0)
    """Control function against prices set in response to demand: the product's demand
    surprises (log sales vs a first fit's prediction) and log relative prices of the last N
    days (past only) enter a second fit as controls, so a price that followed demand the
    pricer saw does not bias the elasticity. They are 0 (a typical day) when predicting.
    0: off."""
    demand_control_leads: int = Field(2, ge=0)
    """The control function also takes the demand surprises and log relative prices of the
    next N days (the history is fitted after the fact): a demand shock that lasts a few days
    shows on both sides of the day a pricer reacted to it, so the two sides together measure
    it better than the past alone. 0: past days only."""
    demand_reactive_prices: bool = True
    """Down-weight price moves that may have reacted to that day's demand (docs/agent.md,
    "Prices that react to demand"): for a product that sits at a regular price (the rolling
    median of its prices) on most days, a day off it counts in the fit only as a cut that
    holds for several days (a planned promotion); a short cut or a price above the regular
    one gets a small weight. Off: every day counts fully."""

    demand_cross_price: bool = True
    """Cross-price effect: the category's price index (the mean log price of the product's
    category siblings that day relative to their reference prices) enters the fit with its
    own coefficient (> 0: substitutes). Predictions take siblings at their reference prices
    unless given the index. Needs the catalog's category."""
    demand_reference_half_lives: list[float] = [3.0, 7.0, 14.0, 30.0]
    """Reference-price effect: candidate half-lives (days) of the reference price, an
    exponentially weighted average of the product's own past prices; demand gets separate
    gain and loss coefficients on log(price / reference). The half-life is chosen on the
    held-out last train days (demand_holdout_fraction) and the term is kept only when it
    lowers their deviance (agent/reference.py). []: memoryless demand, no selection."""
    demand_detect_capped: bool = True
    """Without stock data for a day, down-weight days whose sales look capped by a stock-out
    (a pile-up at the product's maximum, a zero right after a run of sales). With data.stock,
    days that sold all the stock are left out of the fit (their demand was higher)."""
    demand_censored: bool = False
    """With data.stock: a day that sold all its stock enters the constant-elasticity fit as
    a lower bound on demand, a censored Poisson term P(units >= sales), and a capped
    product's other low-price days stay in, instead of all its low-price days being left out
    (the linear and logit shape fits still leave them out). Right for Poisson counts (a
    simulated Poisson history on the stockouts bench's prices and stock: 2.50 fitted, true
    2.54, left out 2.62), but on the generator's own units (baskets of 1-4, net of returns)
    it reads 2.29 (left out 2.71; 2.50 with demand_censored_dispersion 2, the cause not
    established: on a basket-summed test market dispersion 1 did best).
    Days without stock data are never censored: which of them bound is unknown, and
    censoring all of a capped product's low-price days overshoots (2.97 against a true 2.62,
    2.77 left out). Off (default): left out."""
    demand_censored_dispersion: float = Field(1.0, ge=1.0)
    """Variance / mean of a day's units for the censored term (demand_censored): the
    censored count and its mean are divided by it (quasi-likelihood), since units summed
    over baskets of several have a fatter upper tail than Poisson. 1: Poisson."""

    @field_validator("demand_reference_half_lives")
    @classmethod
    def _half_lives(cls, value: list[float]) -> list[float]:
        bad = [h for h in value if not h > 0]
        if bad:
            raise ValueError(f"half-lives must be > 0 days, got {bad}")
        return value

    @field_validator("demand_events")
    @classmethod
    def _event_windows(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, window in value.items():
            if len(window) not in (2, 3) or (len(window) == 3
                                             and window[2] not in ("flat", "ramp")):
                raise ValueError(f"event {name!r} needs [first MM-DD, last MM-DD] or "
                                 "[first, last, \"ramp\"]")
            for day in window[:2]:
                try:
                    date.fromisoformat(f"2000-{day}")
                except ValueError:
                    raise ValueError(f"event {name!r}: {day!r} is not a MM-DD day, e.g. "
                                     "11-22") from None
        return value
    feature_hidden: int = Field(64, ge=1, le=65536)
    """Width of the extractor's MLP over the state features (beside the product embedding)."""
    price_change_cost: float = Field(0.0, ge=0)
    """What one price change costs (relabelling, shoppers' trust), as a share of the product's
    mean best daily profit under the fitted model; 0: changes are free. The agent's reward,
    the greedy and planner baselines and every policy's evaluated profit are net of it."""
    forecast_prior: float = Field(100.0, ge=0)
    """Weight of the demand model's relative profit per level added straight to the policy's
    logits (a residual policy): training starts from the greedy choice, softened with
    temperature 1/this, and RL learns corrections. 0: a plain policy head."""
    sample_demand: bool = False
    """Draw each day's units from Poisson instead of using the demand model's expectation."""
    tensorboard: bool = True
    """Write TensorBoard logs into the run folder (models/<run_id>/tensorboard/)."""
    torch_threads: int = Field(1, ge=0)
    """Torch CPU threads; 0 means one per core. 1 by default: the policy net is small, so one
    thread is as fast on an idle machine and several times faster on a busy one (docs/agent.md)."""
    ensemble_size: int = Field(8, ge=0)
    """Refits of the demand model on bootstrap resamples of the train split (whole product-weeks
    drawn with replacement within each product), saved in the run folder; evaluate's uplift
    interval and the pessimistic decisions come from them. 0 or 1: no ensemble."""
    ensemble_seed: int = 0
    """Seed of the bootstrap resamples."""
    ensemble_refit: Literal["estimates", "full"] = "full"
    """What each bootstrap member refits: "full" repeats every selection on the resample (the
    reference half-life, each product's shape, the capped days), so the spread also carries
    the selections' own uncertainty; "estimates" keeps the point fit's selections and refits
    the estimates once, 2.6x less CPU on the full preset but a narrower spread for the
    pessimistic decisions (small preset: agent 96.3% of the oracle against 97.1% with
    "full"; docs/benchmarks.md "demand fit and ensemble, stop 18")."""
    decision_quantile: float | None = Field(0.25, gt=0, lt=1)
    """Prices are chosen on this quantile of profit across the ensemble (for a price above cost,
    (price - cost) x this quantile of units): 0.5 the median, lower is more cautious where the
    members disagree. null: the point fit. Needs ensemble_size of 2 or more."""
    trust_region: float | None = Field(0.10, ge=0)
    """A recommended price stays within the product's sold range (min to max price over train
    and val days with units > 0) widened by this share on each side; every policy's masks
    enforce it. null: no trust region (the whole [min_price, max_price] grid)."""
    ensemble_rewards: bool = False
    """RL rewards from the demand ensemble: each training episode draws one member (uniformly)
    and is paid by its expected units, so the agent cannot exploit one model's errors; the
    observation's forecast stays the decision demand. Holds every member's demand table
    (ensemble_size x the env's table in memory). Needs ensemble_size of 2 or more."""
    trust_region_adaptive: float | None = Field(0.30, ge=0)
    """The adaptive trust region's cap: on a train or val day where every ensemble member's
    best price of a product (its most profitable grid level under that member) is interior
    and within trust_region_agreement of the others', the region grows on that side to reach
    it, up to the sold range widened by this share. null: the fixed trust_region margin
    everywhere. Needs trust_region and ensemble_size of 2 or more."""
    trust_region_agreement: float = Field(0.10, gt=0)
    """How close the members' best prices must be for the adaptive region to grow: the width
    of their interval on a day (highest - lowest) as a share of their median."""
    capped_price_band: bool = True
    """For a product whose low-price sales look capped by stock (the fit's low-price days
    left out, train.demand_detect_capped), the trust region is narrowed to the price band of
    the days the fit kept (lowest to highest), where its response was measured uncapped.
    Needs trust_region. false: the trust region alone."""
    capped_hold_margin: float | None = Field(0.03, ge=0)
    """Inside that band, such a product is held to its status quo: its regular price now (the
    median of its last 29 days' prices over train and val) ± this share. Why: the fit
    measures its response from the list-price moves alone, too few to move on (stockouts
    bench, 40 x 730: the kept band alone 92.9% of the optimum, historical 95.2%, the status
    quo on the grid 97.0%). null: the band alone."""
    publish_best_policy: bool = True
    """When the demand model links a product to its siblings (a fitted cross-price term),
    publish whichever of the network, the joint greedy and the joint planner earns most on
    val under the fitted demand (siblings at each policy's own prices); evaluate and
    recommend then use it as "agent" and say which it is. false: always the network."""


    @field_validator("net_arch")
    @classmethod
    def _layer_widths(cls, value: list[int]) -> list[int]:
        if any(not 1 <= units <= 65536 for units in value):
            raise ValueError("every layer must have 1..65536 units")
        return value


class EvaluateSettings(Section):
    """Agent vs baselines vs the true optimum."""

    model: str | None = None
    """Run folder to evaluate; None means the newest under train.models_dir."""
    split: Literal["train", "val", "test"] = "test"
    """Split to evaluate on."""
    reports_dir: str = "reports"
    """evaluation.json, recommendations.csv, plots and report.md go here."""
    plot_products: int = Field(4, ge=0)
    """Products whose price paths are plotted."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the random-feasible baseline."""
    event_window_days: int = Field(7, ge=1)
    """Days before and after each held-out price change over which the predicted and actual
    change in units are compared (each window stops at the neighbouring change)."""
    min_sign_accuracy: float = Field(0.7, ge=0, le=1)
    """Least share of held-out price changes whose unit change the model must predict with the
    right sign; below it the verdict is 'not reliable'."""
    min_price_changes: int = Field(10, ge=0)
    """Held-out price changes needed to check the response to price at all; with fewer the
    verdict is 'not reliable' (nothing backs the model's elasticity out of sample)."""
    min_product_price_changes: int = Field(5, ge=0)
    """A product with fewer own held-out price changes is judged on the overall sign check."""
    max_abs_bias_pct: float = Field(20.0, ge=0)
    """Largest |total predicted / total actual held-out units - 1| in % before 'not reliable'."""
    max_wmape_excess: float = Field(2.0, gt=0)
    """Largest held-out WMAPE as a multiple of its Poisson noise floor (what a perfect model
    would still show) before 'not reliable'."""
    interval: float = Field(0.9, gt=0, lt=1)
    """Coverage of the uplift interval across the demand ensemble."""


class DatePeriod(Section):
    """An inclusive range of dates."""

    start: date
    """First day of the period."""
    end: date
    """Last day of the period (inclusive)."""


class RuleSet(Section):
    """Merchant guardrails for one product, one category or every product (``rules.default``).

    Every rule is optional (None: not set here). A product's rules are ``rules.default``, then
    its category's, then its own, each set key overriding the one before.
    """

    min_margin: float | None = Field(None, ge=0.0, lt=1.0)
    """Smallest allowed margin (price - unit_cost) / price, e.g. 0.15."""
    max_change_per_day: float | None = Field(None, gt=0.0)
    """Largest relative change from yesterday's price; None: preprocess.max_daily_change."""
    max_change_per_week: float | None = Field(None, gt=0.0)
    """Largest relative change from the price charged 7 days earlier."""
    max_changes_per_month: int | None = Field(None, ge=0)
    """Most price changes in any 30 days (today and the 29 before, history included)."""
    price_endings: list[float] | None = None
    """Allowed cents, e.g. [0.99] or [0.49, 0.99]; prices are snapped to the nearest ending."""
    price_ladder: list[float] | None = None
    """Allowed prices, e.g. [9.99, 12.49, 14.99]; prices are snapped to the nearest rung."""
    freeze: bool | None = None
    """True: never change this price (it is held at the current price)."""
    freeze_periods: list[DatePeriod] | None = None
    """Date ranges during which the price is held at the previous day's price."""
    max_above_competitor: float | None = Field(None, ge=0.0)
    """Largest relative premium over the competitor's price (rules.competitor_prices)."""

    @field_validator("price_endings")
    @classmethod
    def _cents(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not 0.0 <= v < 1.0 for v in value)):
            raise ValueError("price_endings are cents in [0, 1), e.g. [0.49, 0.99]")
        return value

    @field_validator("price_ladder")
    @classmethod
    def _rungs(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(v <= 0 for v in value)):
            raise ValueError("price_ladder needs at least one positive price")
        return value


class RulesSettings(Section):
    """Merchant guardrails that every recommended price obeys (docs/recommend.md)."""

    default: RuleSet = RuleSet()
    """Rules for every product."""
    categories: dict[str, RuleSet] = {}
    """Rules per catalog category, over rules.default."""
    products: dict[str, RuleSet] = {}
    """Rules per product_id, over its category's."""
    competitor_prices: str | None = None
    """CSV of competitor prices (product_id, date, price) for max_above_competitor; the latest
    price on or before a day applies to it."""


class RecommendSettings(Section):
    """`pricectl recommend`: prices for the days after the data ends."""

    horizon: int = Field(14, ge=1, le=366)
    """Days to price."""
    start: date | None = None
    """First day to price; None: the day after the last day of the data."""
    policy: Literal["agent", "greedy", "planner", "static", "historical"] = "agent"
    """Which policy sets the prices."""
    output_dir: str = "recommendations"
    """Prices go to <output_dir>/<start date>/."""
    interval: float = Field(0.9, gt=0, lt=1)
    """Coverage of profit_low..profit_high (and of the elasticity and profit-change
    intervals): the central share of the run's demand-ensemble members' predictions."""


class PipelineSettings(Section):
    """`pricectl pipeline`."""

    generate: bool = False
    """Start with `generate` (a synthetic market written into generate.output_dir). Off by
    default so a pipeline over your own data never runs it; the built-in presets and
    `pipeline --generate` turn it on. generate refuses a folder it did not create anyway."""


class MonitorSettings(Section):
    """The live panel and memory sampler shared by every stage."""

    live: Literal["auto", "on", "off"] = "auto"
    """auto: live panel on a TTY, plain timestamped lines otherwise."""
    refresh_per_second: float = Field(4.0, gt=0, le=4.0)
    """Live panel redraws per second (at most 4)."""
    plain_interval_s: float = Field(5.0, gt=0)
    """Seconds between plain progress lines when not on a TTY."""
    sample_interval_s: float = Field(0.25, gt=0)
    """Seconds between memory samples (RSS of the tree; the budget is checked on each)."""
    pss_interval_s: float = Field(1.0, gt=0)
    """Seconds between PSS readings, which walk every mapping (the costly part of a sample);
    between them each process's PSS is carried forward by its RSS change."""
    max_memory: str | None = None
    """Memory budget of the process tree, e.g. '1.5GB'; the stage stops cleanly before it."""
    runs_dir: str = "runs"
    """Run folders with memory.jsonl and run.json are written under this folder."""

    @field_validator("max_memory")
    @classmethod
    def _parse_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value


class Settings(Section):
    """The whole effective configuration; one frozen object travels through the code."""

    data: DataSettings = DataSettings()
    generate: GenerateSettings = GenerateSettings()
    features: FeaturesSettings = FeaturesSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    merge: MergeSettings = MergeSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    pipeline: PipelineSettings = PipelineSettings()
    rules: RulesSettings = RulesSettings()
    recommend: RecommendSettings = RecommendSettings()
    monitor: MonitorSettings = MonitorSettings()

    def section_fingerprint(self, section: str) -> str:
        """SHA-256 of one section's values; used to invalidate cached stage outputs."""
        payload = json.dumps(getattr(self, section).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4,
               "TB": 1024**4, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """Parse '1.5GB', '512M', '800MiB' or a byte count into bytes (binary units)."""
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"cannot read memory size {shown(text)}",
                          "Use a number with a unit, e.g. 1.5GB or 800MB.") from None
    if unit not in _SIZE_UNITS or not 0 < value < float("inf"):
        raise ConfigError(f"cannot read memory size {shown(text)}",
                          "Use a number with a unit, e.g. 1.5GB or 800MB.")
    return int(value * _SIZE_UNITS[unit])


# ----------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(raw: Mapping[str, Any], model: type[BaseModel], source: str, prefix: str) -> None:
    """Reject unknown keys, naming the source and the closest valid key."""
    fields = model.model_fields
    for key, value in raw.items():
        name = str(key) if len(str(key)) <= MAX_ECHO else str(key)[:MAX_ECHO - 3] + "..."
        where = f"{prefix}{name}"
        if key not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.5)
            names = sorted(fields)
            # a section can hold dozens of keys; the message stays readable
            listed = ", ".join(names[:12]) + (f", ... ({len(names)} in all)"
                                              if len(names) > 12 else "")
            suggestion = f"did you mean '{prefix}{close[0]}'?" if close else (
                "valid keys here: " + listed)
            raise ConfigError(
                f"unknown config key '{where}' in {source}",
                f"{suggestion} See configs/default.yaml for every key.",
            )
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"config key '{where}' in {source} must be a mapping of keys, "
                    f"got {type(value).__name__}",
                    f"Write it as a section: `{key}:` followed by indented keys.",
                )
            _check_keys(value, annotation, source, f"{where}.")


def shown(value: Any) -> str:
    """``repr(value)`` cut to MAX_ECHO characters, without ever building the whole repr.

    A config value can be huge (a long list, an alias that expands to millions of items), and
    an error message must not spend minutes and gigabytes printing it back.
    """
    limited = reprlib.Repr()
    limited.maxlevel, limited.maxlist, limited.maxdict = 3, 12, 12
    limited.maxstring, limited.maxlong, limited.maxother = MAX_ECHO, 60, MAX_ECHO
    try:
        text = limited.repr(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 3] + "..."


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader without implicit timestamps: dates stay text until the typed Settings
    parse them, so `val_start: 2023-02-30` is an error naming its key, not a crash inside
    the YAML reader."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _expanded_size(root: yaml.Node, budget: int) -> int:
    """How many values ``root`` stands for once every alias is expanded, counted up to
    ``budget`` + 1 (aliases share nodes, so each node is sized once: linear time)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:  # an alias to its own ancestor: infinitely deep
            return budget + 1
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > budget:
                break
        in_progress.discard(key)
        sizes[key] = min(total, budget + 1)
        return sizes[key]

    return size(root)


def parse_yaml(text: str, source: str) -> Any:
    """Parse config text safely and within bounds; ``source`` names it in errors.

    Raises:
        ConfigError: invalid YAML; aliases expanding to more than MAX_CONFIG_NODES values (a
            "billion laughs" bomb); a value the YAML reader cannot build (e.g. a 5,000-digit
            integer, an invalid explicit !!timestamp).
    """
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{source} expands to more than {MAX_CONFIG_NODES:,} values through YAML "
                "anchors and aliases (&name / *name); pricectl refuses it before building it, "
                "because a few hundred bytes of nested aliases can stand for billions of values",
                "Write the values out without aliases; a real config holds a few hundred.")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {shown(str(exc))[1:-1]}",
                          "Fix the YAML syntax.") from None
    except (ValueError, OverflowError) as exc:
        raise ConfigError(f"{source} holds a value the YAML reader cannot build: "
                          f"{shown(str(exc))[1:-1]}",
                          "Check numbers and dates, e.g. 2023-02-28, not 2023-02-30.") from None
    except RecursionError:
        raise ConfigError(f"{source} nests lists or mappings too deeply",
                          "A config is sections of keys: flatten the value.") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML config file with the safe loader, at most MAX_CONFIG_BYTES of it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "Pass an existing file to --config.")
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes; "
                          "pricectl does not read it",
                          "A config holds settings, not data: the documented reference "
                          "(configs/default.yaml) is about 10 KiB. Check that --config names "
                          "the right file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text", "Save it as UTF-8.") from None
    loaded = parse_yaml(text, f"config file {path}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections",
                          "Start with a section name such as `preprocess:`.")
    return loaded


def preset_path(name: str) -> Path:
    """Path of a built-in preset (tiny, small, full)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown preset '{name}'", f"{hint}Available: {', '.join(names)}.")
    return path


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Collect PRICECTL_<SECTION>__<KEY>[__<SUBKEY>] variables as a nested mapping.

    Values are parsed with ``yaml.safe_load`` so numbers, booleans and lists get their types.
    """
    nested: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        try:
            value = parse_yaml(text, f"environment variable {name}") if text != "" else None
        except ConfigError as exc:
            if "is not valid YAML" not in exc.message:
                raise
            value = text
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
    return nested


def flag_overrides(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Turn {'preprocess.batch_size': 500, ...} into a nested mapping, dropping None values."""
    nested: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        parts = dotted.split(".")
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
    return nested


def _type_name(annotation: Any) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        # "Literal" alone says nothing; the user needs the allowed values.
        return "one of " + ", ".join(repr(value) for value in get_args(annotation))
    if get_origin(annotation) is not None:  # list[int], date | None: show the whole type
        text = str(annotation).replace("typing.", "").replace("datetime.", "")
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    if text in ("date", "date | None"):
        return "a real calendar date (YYYY-MM-DD)" + (" or null" if "None" in text else "")
    return text


def _validate(raw: dict[str, Any], sources: str) -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        expected = _expected_type(first["loc"])
        got = first.get("input")
        hint = f"Expected {expected}." if expected else "See configs/default.yaml."
        if expected and not first["type"].endswith(("_type", "_parsing", "literal_error")):
            # the right type, out of range: the default is a value known to work
            hint = (f"Expected {expected}; the default is {shown(_default_of(first['loc']))} "
                    "(configs/default.yaml).")
        raise ConfigError(
            f"config key '{key}' has an invalid value {shown(got)} (from {sources}): "
            f"{first['msg']}", hint) from None


def _default_of(loc: tuple[Any, ...]) -> Any:
    """The built-in default of the key at ``loc`` (the deepest section or key it names)."""
    value: Any = Settings()
    for part in loc:
        if not isinstance(value, BaseModel) or part not in type(value).model_fields:
            break
        value = getattr(value, part)
    return _jsonable(value)


def _expected_type(loc: tuple[Any, ...]) -> str | None:
    model: Any = Settings
    annotation: Any = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        annotation = fields[part].annotation
        model = annotation
    return _type_name(annotation) if annotation is not None else None


def load_settings(
    config_file: str | Path | None = None,
    preset: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective settings from every source, in precedence order.

    Args:
        config_file: YAML file; if None, ``PRICECTL_CONFIG`` is used when set.
        preset: name of a built-in preset (tiny, small, full), applied below the file.
        flags: dotted keys to values from command-line flags; None values are ignored.
        environ: environment to read PRICECTL_* variables from (default: os.environ).

    Returns:
        The validated, frozen settings.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, unreadable file.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    sources = ["defaults"]
    if preset is None:
        preset = environ.get("PRICECTL_PRESET") or None
    if preset:
        path = preset_path(preset)
        layer = read_yaml(path)
        _check_keys(layer, Settings, f"preset '{preset}' ({path})", "")
        raw = _deep_merge(raw, layer)
        sources.append(f"preset {preset}")
    if config_file is None and environ.get("PRICECTL_CONFIG"):
        config_file = environ["PRICECTL_CONFIG"]
    if config_file is not None:
        path = Path(config_file)
        layer = read_yaml(path)
        _check_keys(layer, Settings, str(path), "")
        raw = _deep_merge(raw, layer)
        sources.append(str(path))
    env_layer = env_overrides(environ)
    if env_layer:
        _check_keys(env_layer, Settings, "environment (PRICECTL_<SECTION>__<KEY>)", "")
        raw = _deep_merge(raw, env_layer)
        sources.append("environment")
    flag_layer = flag_overrides(flags or {})
    if flag_layer:
        _check_keys(flag_layer, Settings, "command-line flags", "")
        raw = _deep_merge(raw, flag_layer)
        sources.append("flags")
    return _validate(raw, " < ".join(sources))


def settings_to_yaml(settings: Settings) -> str:
    """The effective config as YAML, for `pricectl config show`."""
    return yaml.safe_dump(settings.to_dict(), sort_keys=False)


def documented_yaml(settings: Settings | None = None) -> str:
    """The config as YAML with each key's docstring as a comment above it.

    This is how configs/default.yaml is produced (`pricectl config show --documented`), so the
    reference can never drift from the code; a test compares the two.
    """
    settings = settings or Settings()
    lines = [
        "# pricectl configuration: every key, its default and what it does.",
        "# Precedence: defaults < --preset < this file (--config / PRICECTL_CONFIG)",
        "#             < env PRICECTL_<SECTION>__<KEY> < command-line flags.",
        "# Regenerate with: pricectl config show --documented > configs/default.yaml",
    ]

    def emit(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if info.description:
                for text in info.description.splitlines():
                    lines.append(f"{pad}# {text.strip()}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(value, indent + 1)
                continue
            dumped = yaml.safe_dump({name: value.model_dump(mode="json") if isinstance(
                value, BaseModel) else _jsonable(value)}, default_flow_style=True,
                sort_keys=False).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")

    for section, info in Settings.model_fields.items():
        lines.append("")
        doc = (info.annotation.__doc__ or "").strip().splitlines()[0] if info.annotation else ""
        lines.append(f"# --- {section}: {doc}")
        lines.append(f"{section}:")
        emit(getattr(settings, section), 1)
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, date):
        return value.isoformat()
    return value
