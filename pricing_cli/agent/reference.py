"""The reference-price effect of the demand model: shoppers judge a price against the prices
they have seen.

Each product carries a reference price R, an exponentially weighted average of its own past
prices (``R_{t+1} = (1 − a)·R_t + a·p_t``, rate ``a`` from a half-life h: ``a = 1 − 2^(−1/h)``).
With the gap g = log(p / R), the demand model's log units gain

    − loss · max(g, 0) − gain · min(g, 0)

so a price above the reference costs ``loss`` per unit of log gap and one below it earns
``gain`` (loss aversion: loss > gain). Holding a price makes R equal to it and the term 0: the
rest of the model is the long-run demand curve, and the term is the short-run deviation.

The coefficients are two columns of the demand fit (fitted with everything else, so the
promotion spikes are no longer read as elasticity). The half-life is chosen on held-out train
days (the demand shapes' holdout) among ``train.demand_reference_half_lives``; the term is kept
only when it lowers the held-out Poisson deviance by REFERENCE_MIN_GAIN of the memoryless
model's; else it drops out and the fit info says so.

Path dependence: a price path's units depend on the reference it builds, so scoring
(:func:`units_along_path`), greedy (:func:`greedy_prices_with_reference`) and the planner
(:func:`planned_prices_with_reference`, a DP over (price level, reference)) roll the reference
forward along each policy's own prices from the split's starting reference
(:func:`start_references`, the EWMA over the earlier splits' historical prices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pricing_cli.agent.baselines import SplitMeta
    from pricing_cli.agent.processed import ProcessedData

# Held-out deviance the reference term must save (share of the memoryless model's) to stay.
REFERENCE_MIN_GAIN = 0.03
N_COLUMNS = 2  # the design's loss and gain columns


def rate_of_half_life(half_life: float) -> float:
    """EWMA rate whose weight halves every ``half_life`` days."""
    return float(1.0 - 0.5 ** (1.0 / float(half_life)))


@dataclass(frozen=True)
class ReferenceEffect:
    """A fitted reference-price effect (see the module docstring).

    Attributes:
        rate: EWMA rate a of the reference.
        loss: log-units lost per unit of log(price / reference) above the reference.
        gain: log-units gained per unit of log(reference / price) below it.
    """

    rate: float
    loss: float
    gain: float

    @property
    def half_life(self) -> float:
        return float(np.log(0.5) / np.log(1.0 - self.rate))

    def log_factor(self, prices: Any, reference: Any) -> np.ndarray:
        """The term added to log units at ``prices`` against ``reference`` (broadcast)."""
        gap = np.log(np.asarray(prices, dtype=np.float64) / np.asarray(reference, np.float64))
        return -(self.loss * np.maximum(gap, 0.0) + self.gain * np.minimum(gap, 0.0))

    def factor(self, prices: Any, reference: Any) -> np.ndarray:
        """The demand multiplier at ``prices`` against ``reference``: exp(log_factor)."""
        return np.exp(self.log_factor(prices, reference))

    def next_reference(self, reference: Any, prices: Any) -> np.ndarray:
        """Tomorrow's reference after charging ``prices`` today."""
        return ((1.0 - self.rate) * np.asarray(reference, dtype=np.float64)
                + self.rate * np.asarray(prices, dtype=np.float64))

    def as_json(self) -> dict[str, float]:
        return {"rate": self.rate, "half_life_days": round(self.half_life, 3),
                "loss": self.loss, "gain": self.gain}

    @classmethod
    def from_json(cls, payload: dict[str, Any] | None) -> ReferenceEffect | None:
        if not payload:
            return None
        return cls(rate=float(payload["rate"]), loss=float(payload["loss"]),
                   gain=float(payload["gain"]))


def design_columns(gap: np.ndarray) -> np.ndarray:
    """(n, 2) the fit's columns for the (loss, gain) coefficients at log gaps ``gap``."""
    return np.column_stack([-np.maximum(gap, 0.0), -np.minimum(gap, 0.0)])


def rolled_reference(product: np.ndarray, dates: np.ndarray, prices: np.ndarray, rate: float,
                     start: np.ndarray | None = None) -> np.ndarray:
    """The reference before each row: the EWMA of the product's earlier rows' prices.

    Rows in any order; they are walked per product by date. A product's first row starts at
    ``start[product]`` (default: its own first price, so day one has no gap). A gap of k days
    counts the unknown days at the last price; rows on the same date (a bootstrap's repeated
    week) share one reference.

    Returns:
        (n,) the reference of each row, in the rows' order.
    """
    product = np.asarray(product, dtype=np.int64)
    n = len(product)
    out = np.empty(n)
    if n == 0:
        return out
    order = np.lexsort((np.asarray(dates).astype("datetime64[D]").astype(np.int64), product))
    p, x = product[order], np.asarray(prices, dtype=np.float64)[order]
    day = np.asarray(dates).astype("datetime64[D]").astype(np.int64)[order]
    first = np.r_[True, p[1:] != p[:-1]]
    ref = np.empty(n)
    ref[first] = x[first] if start is None else np.asarray(start, np.float64)[p[first]]
    keep = 1.0 - rate
    # Sequential in rows, vectorised across products: walk the k-th row of every product.
    starts = np.flatnonzero(first)
    length = np.diff(np.append(starts, n))
    for k in range(1, int(length.max())):
        rows = starts[length > k] + k
        gap = np.maximum(day[rows] - day[rows - 1], 0)
        decay = keep ** gap
        ref[rows] = decay * ref[rows - 1] + (1.0 - decay) * x[rows - 1]
    out[order] = ref
    return out


def reference_of(demand: Any) -> ReferenceEffect | None:
    """The fitted reference effect of a demand model (a DemandModel, a QuantileDemand over
    one, or anything without one: None)."""
    effect = getattr(demand, "reference_effect", None)
    return effect if isinstance(effect, ReferenceEffect) else None


def start_references(processed_dir: ProcessedData | str | Path, split: str, meta: SplitMeta,
                     effect: ReferenceEffect, fallback: np.ndarray) -> np.ndarray:
    """(n_series,) each series' reference on its first day: the EWMA of the product's
    historical prices in the splits before ``split`` (as in the fit: from its first price,
    unknown days at the last price); where there are none, the series' own first historical
    price (as the env and the fit start), or ``fallback`` (by product_index) without one."""
    import polars as pl

    from pricing_cli.agent.processed import as_processed

    starts = meta.series_start
    own = meta.price[starts]
    out = np.where(np.isfinite(own) & (own > 0), own,
                   np.asarray(fallback, dtype=np.float64)[meta.product_index[starts]])
    parts = as_processed(processed_dir).earlier_meta(split, ["product_id", "date", "price"])
    if not parts:
        return out
    history = pl.concat(parts)
    history = history.filter(pl.col("price") > 0).sort("product_id", "date")
    if history.height == 0:
        return out
    ids = history["product_id"].cast(pl.String).to_numpy()
    names, code = np.unique(ids, return_inverse=True)
    dates = history["date"].to_numpy().astype("datetime64[D]")
    prices = history["price"].cast(pl.Float64).to_numpy()
    ref = rolled_reference(code, dates, prices, effect.rate)
    last = np.r_[code[1:] != code[:-1], True]
    lookup = {str(names[c]): (r, x, d) for c, r, x, d in zip(
        code[last], ref[last], prices[last], dates[last], strict=True)}
    for i, (pid, day) in enumerate(zip(meta.product_id[starts], meta.date[starts], strict=True)):
        found = lookup.get(str(pid))
        if found is None:
            continue
        r, x, d = found
        after = effect.next_reference(r, x)  # the reference the day after the last row
        gap = max(int((day - d).astype(np.int64)) - 1, 0)  # unknown days at the last price
        out[i] = x + (1.0 - effect.rate) ** gap * (after - x)
    return out


def historical_references(processed_dir: ProcessedData | str | Path, split: str,
                          product_index: np.ndarray, dates: np.ndarray, prices: np.ndarray,
                          rate: float) -> np.ndarray:
    """(n,) the reference before each row of ``split`` (rows ``product_index``, ``dates``,
    ``prices``) along the historical prices, the earlier splits' included (as in the fit and
    :func:`start_references`): where the env's episodes start from."""
    import polars as pl

    from pricing_cli.agent.processed import as_processed

    parts = as_processed(processed_dir).earlier_meta(split, ["product_index", "date", "price"])
    own = np.asarray(prices, dtype=np.float64)
    if not parts:
        return rolled_reference(product_index, dates, own, rate)
    history = pl.concat(parts).filter(pl.col("price") > 0)
    all_product = np.r_[history["product_index"].to_numpy().astype(np.int64),
                        np.asarray(product_index, dtype=np.int64)]
    all_dates = np.r_[history["date"].to_numpy().astype("datetime64[D]"),
                      np.asarray(dates).astype("datetime64[D]")]
    all_prices = np.r_[history["price"].cast(pl.Float64).to_numpy(), own]
    return rolled_reference(all_product, all_dates, all_prices, rate)[history.height:]


def series_references(meta: SplitMeta, effect: ReferenceEffect, prices: np.ndarray
                      ) -> np.ndarray:
    """(n_rows,) the reference before each row when the series charge ``prices``, from
    ``meta.start_reference``."""
    assert meta.start_reference is not None
    ref = np.empty(meta.n_rows)
    ref[meta.series_start] = meta.start_reference
    for day in range(1, int(meta.series_length.max(initial=0))):
        _, rows = meta.rows_on_day(day)
        ref[rows] = effect.next_reference(ref[rows - 1], prices[rows - 1])
    return ref


def units_along_path(demand: Any, meta: SplitMeta, prices: np.ndarray) -> np.ndarray | None:
    """Expected units of each row under ``demand`` with the reference rolled forward along
    ``prices`` (each policy's own path); None when the model has no reference effect or the
    split no starting reference (then the memoryless prediction is the right one)."""
    effect = reference_of(demand)
    if effect is None or meta.start_reference is None:
        return None
    ref = series_references(meta, effect, prices)
    return np.asarray(demand.expected_units(meta.product_index, meta.date, prices,
                                            reference=ref), dtype=np.float64)


def select_half_life(fit_rows: Callable[[np.ndarray, float | None], Any],
                     rows: Any, holdout: np.ndarray, half_lives: list[float],
                     deviance: Callable[[Any, Any, np.ndarray | None], float]
                     ) -> tuple[float | None, dict[str, Any]]:
    """Choose the reference half-life (or none) on held-out rows.

    Args:
        fit_rows: ``fit_rows(keep, rate)`` fits the memoryless model (rate None) or the model
            with the reference columns of ``rate`` on the rows ``keep``.
        rows: the train rows (demand._FitRows).
        holdout: bool mask of the held-out rows.
        half_lives: the candidates (days).
        deviance: ``deviance(model, held_rows, reference)`` held-out deviance per row.

    Returns:
        (the chosen EWMA rate or None, what the selection saw for the fit info).
    """
    held = rows.take(holdout)
    base = fit_rows(~holdout, None)
    none_deviance = deviance(base, held, None)
    scores: dict[str, float] = {}
    best_rate, best = None, none_deviance
    for half_life in half_lives:
        rate = rate_of_half_life(half_life)
        model = fit_rows(~holdout, rate)
        ref = rolled_reference(rows.product, rows.dates, rows.price, rate)[holdout]
        score = deviance(model, held, ref)
        scores[f"{half_life:g}"] = score
        effect = reference_of(model)
        if effect is not None and effect.loss >= 0 and effect.gain >= 0 and score < best:
            best_rate, best = rate, score
    kept = best_rate is not None and best <= none_deviance * (1.0 - REFERENCE_MIN_GAIN)
    info = {"holdout_rows": int(holdout.sum()),
            "holdout_deviance_per_row": {"none": none_deviance, **scores},
            "min_gain": REFERENCE_MIN_GAIN,
            "chosen_half_life_days": (None if not kept or best_rate is None
                                      else round(float(np.log(0.5) / np.log(1.0 - best_rate)),
                                                 3))}
    if not kept:
        info["verdict"] = ("no reference-price effect: the term did not lower the held-out "
                           f"deviance by {REFERENCE_MIN_GAIN:.1%}; it is left out")
    return (best_rate if kept else None), info


def with_start_reference(meta: SplitMeta, demand: Any,
                         processed_dir: ProcessedData | str | Path, split: str) -> SplitMeta:
    """``meta`` with each series' starting reference price when ``demand`` has a
    reference-price effect (scoring and the grid policies then roll it forward along each
    price path); unchanged otherwise."""
    import dataclasses

    effect = reference_of(demand)
    if effect is None:
        return meta
    return dataclasses.replace(meta, start_reference=start_references(
        processed_dir, split, meta, effect, demand.reference_price))
