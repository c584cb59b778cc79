"""The candidate price grid, the feasibility rule and the trust region, shared by preprocess,
env and evaluate.

The grid spans each product's whole [min_price, max_price], not a band around the historical
price, because historical prices are not optimal and the agent must be able to leave them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pricing_cli.config import RuleSet
from pricing_cli.errors import ConfigError

if TYPE_CHECKING:
    from pricing_cli.config import RulesSettings

MOVE_DOWN, MOVE_HOLD, MOVE_UP = 0, 1, 2
# A relative move below this is the same price held (rounding, not a decision); it decides
# what counts as a price change for days held and for the price-change cost.
CHANGE_TOLERANCE = 0.005


def price_grid(min_price: np.ndarray | float, max_price: np.ndarray | float,
               levels: int) -> np.ndarray:
    """Evenly spaced candidate prices from min_price to max_price (inclusive).

    Args:
        min_price, max_price: scalars or arrays of shape (n,).
        levels: K, the number of candidate levels (>= 2).

    Returns:
        Array of shape (K,) for scalars or (n, K) for arrays, float64.
    """
    lo = np.asarray(min_price, dtype=np.float64)
    hi = np.asarray(max_price, dtype=np.float64)
    steps = np.linspace(0.0, 1.0, levels)
    return lo[..., None] + (hi - lo)[..., None] * steps


def nearest_level(grid: np.ndarray, price: np.ndarray | float) -> np.ndarray:
    """Index of the grid level closest to ``price`` (row-wise for a (n, K) grid)."""
    price = np.asarray(price, dtype=np.float64)
    return np.abs(grid - price[..., None]).argmin(axis=-1)


# Relative slack of the daily-change rule: a level exactly on the boundary stays feasible
# despite floating-point rounding.
FEASIBLE_SLACK = 1e-9


def within_daily_change(price: np.ndarray | float, previous: np.ndarray | float,
                        max_daily_change: np.ndarray | float) -> np.ndarray:
    """The daily-change rule: True where ``price`` is within ``max_daily_change``
    (relative) of ``previous`` (broadcast; False where ``previous`` is NaN). The one copy of
    the rule: the masks (:func:`feasible_mask`), the planners' transitions and evaluate's
    violation count all call it."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.abs(np.asarray(price) / previous - 1.0) <= max_daily_change + FEASIBLE_SLACK
    return np.asarray(ok)


def feasible_mask(grid: np.ndarray, prev_price: np.ndarray | float,
                  max_daily_change: float) -> tuple[np.ndarray, np.ndarray]:
    """Which levels may be chosen today, given yesterday's price.

    A level is feasible if it lies within the grid's bounds (always, by construction) and
    within ``max_daily_change`` (relative) of ``prev_price``. A row is never all zero: if the
    constraints conflict (yesterday's price far outside the bounds), the level nearest to
    ``prev_price`` is kept and the row is counted as a conflict.

    Returns:
        (mask int8 of grid's shape, conflict bool of shape grid.shape[:-1]).
    """
    prev = np.asarray(prev_price, dtype=np.float64)[..., None]
    ok = within_daily_change(grid, prev, max_daily_change)
    # Work on a 2-D view so a single (K,) grid and a (n, K) batch take the same path.
    flat = ok.reshape(-1, ok.shape[-1])
    conflict = ~flat.any(axis=1)
    if conflict.any():
        distance = np.abs(np.broadcast_to(grid - prev, ok.shape)).reshape(flat.shape)
        rows = np.nonzero(conflict)[0]
        flat[rows, distance[rows].argmin(axis=1)] = True
    mask: np.ndarray = flat.reshape(ok.shape).astype(np.int8)
    conflicts: np.ndarray = np.asarray(conflict.reshape(ok.shape[:-1]))
    return mask, conflicts


def random_feasible_levels(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """(n,) a level drawn uniformly among each row's feasible levels of ``mask`` ((n, K),
    nonzero where feasible; every row has one): one uniform draw per row, the ``pick``-th
    feasible level. The random baseline of both the env (train's context figure) and
    evaluate."""
    mask = np.asarray(mask)
    count = (mask != 0).sum(axis=1)
    pick = np.minimum((rng.random(mask.shape[0]) * count).astype(np.int64), count - 1)
    # The pick-th feasible level: the first whose running count of feasible levels passes it.
    return np.asarray((np.cumsum(mask != 0, axis=1) > pick[:, None]).argmax(axis=1))


def is_price_change(price: np.ndarray | float, previous: np.ndarray | float,
                    dtype: type[np.floating[Any]] = np.float64) -> np.ndarray:
    """True where ``price`` moves more than CHANGE_TOLERANCE (relative) from ``previous``.
    A NaN previous price (unknown) is no change. ``dtype``: the precision of the arithmetic
    (the env's per-step forecast runs in float32)."""
    with np.errstate(invalid="ignore"):
        moved = (np.abs(np.asarray(price, dtype=dtype) / previous - dtype(1.0))
                 > dtype(CHANGE_TOLERANCE))
    return np.asarray(moved)


def trust_region_bounds(min_sold: np.ndarray, max_sold: np.ndarray, margin: float, *,
                        agreed: tuple[np.ndarray, np.ndarray] | None = None,
                        cap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper): the range a product has been sold at, widened by ``margin`` (a share)
    on each side. NaN (never sold) stays NaN: no limit.

    The adaptive region (``train.trust_region_adaptive``): ``agreed`` is (low, high) by
    product, the interval of the ensemble members' best prices where they agree on one (NaN
    where they do not, :func:`ensemble.agreed_best_prices`). Where it lies beyond the fixed
    region, that side grows to reach it, but never past the sold range widened by ``cap``: a
    well-identified optimum outside the history can be reached, a guess cannot.
    """
    lo = np.asarray(min_sold, dtype=np.float64)
    hi = np.asarray(max_sold, dtype=np.float64)
    lower, upper = lo * (1.0 - margin), hi * (1.0 + margin)
    if agreed is None or cap is None or cap <= margin:
        return lower, upper
    low, high = (np.asarray(bound, dtype=np.float64) for bound in agreed)
    # NaN (no agreement) compares False: those products keep the fixed margin.
    with np.errstate(invalid="ignore"):
        lower = np.where(low < lower, np.maximum(low, lo * (1.0 - cap)), lower)
        upper = np.where(high > upper, np.minimum(high, hi * (1.0 + cap)), upper)
    return lower, upper


def restrict_to_band(trust_region: tuple[np.ndarray, np.ndarray],
                     band: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The trust region (lower, upper by product index) narrowed to ``band`` where the band
    is known (both ends finite; NaN: the product keeps its region). Used for the products
    whose sales look capped by stock (demand.uncapped_price_band): their response is measured
    only inside the band, so a price outside it relies on demand nobody saw uncapped."""
    lower = np.asarray(trust_region[0], dtype=np.float64).copy()
    upper = np.asarray(trust_region[1], dtype=np.float64).copy()
    n = min(len(lower), len(band[0]))
    band_lo = np.asarray(band[0], dtype=np.float64)[:n]
    band_hi = np.asarray(band[1], dtype=np.float64)[:n]
    known = np.isfinite(band_lo) & np.isfinite(band_hi)
    # fmax/fmin: a product without a region (NaN) gets the band itself.
    lower[:n] = np.where(known, np.fmax(lower[:n], band_lo), lower[:n])
    upper[:n] = np.where(known, np.fmin(upper[:n], band_hi), upper[:n])
    return lower, upper


def hold_band(band: tuple[np.ndarray, np.ndarray], regular: np.ndarray, margin: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """``band`` (lower, upper by product index, NaN: none) narrowed to ``regular`` ± ``margin``
    (a share) where both are known: the status quo inside the band. Where the regular price
    lies outside the band, the window about it alone (it is what the product sells at now)."""
    lo, hi = (np.asarray(b, dtype=np.float64) for b in band)
    reg = np.asarray(regular, dtype=np.float64)[:len(lo)]
    reg = np.concatenate([reg, np.full(len(lo) - len(reg), np.nan)])
    win_lo, win_hi = reg * (1.0 - margin), reg * (1.0 + margin)
    new_lo, new_hi = np.fmax(lo, win_lo), np.fmin(hi, win_hi)
    apart = new_lo > new_hi
    new_lo, new_hi = np.where(apart, win_lo, new_lo), np.where(apart, win_hi, new_hi)
    known = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(reg)
    return np.where(known, new_lo, lo), np.where(known, new_hi, hi)


def trust_region_of(trust_region: tuple[np.ndarray, np.ndarray], product_index: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) for the given products from bounds by product index (NaN, no limit,
    for a product index beyond them)."""
    index = np.asarray(product_index, dtype=np.int64)
    out = []
    for bound in trust_region:
        known = index < len(bound)
        values = np.full(index.size, np.nan)
        values[known] = np.asarray(bound, dtype=np.float64)[index[known]]
        out.append(values)
    return out[0], out[1]


def restrict_to_trust_region(mask: np.ndarray, grid: np.ndarray, lower: np.ndarray | float,
                             upper: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """AND the trust region [lower, upper] into a feasibility mask (from :func:`feasible_mask`).

    Every policy that moves on the grid (agent, greedy, planner, static, random) takes its
    mask through here, so none can recommend a price the data never backed. A row whose
    feasible levels all lie outside the region (yesterday's price far from it, or a region
    between two grid levels) keeps the one feasible level nearest to the region: the policy
    moves toward it as fast as the daily-change rule allows. Such rows are counted.

    Args:
        mask: (..., K) feasible levels (0/1 or bool).
        grid: (..., K) the prices of those levels.
        lower, upper: per row (shape ``mask.shape[:-1]``) or scalars; NaN means no limit.

    Returns:
        (mask int8 of mask's shape, fallback bool of shape mask.shape[:-1]).
    """
    feasible = np.asarray(mask).astype(bool)
    lo = np.asarray(lower, dtype=np.float64)[..., None]
    hi = np.asarray(upper, dtype=np.float64)[..., None]
    lo = np.where(np.isnan(lo), -np.inf, lo)
    hi = np.where(np.isnan(hi), np.inf, hi)
    # Grid prices are computed in floating point: a level on the boundary is inside.
    below = np.maximum(lo - grid, 0.0)
    above = np.maximum(grid - hi, 0.0)
    outside = below + above
    inside = outside <= 1e-9 * np.maximum(1.0, np.abs(grid))
    trusted = feasible & np.broadcast_to(inside, feasible.shape)
    # A 2-D view, so a single (K,) row and a batch take the same path.
    flat = trusted.reshape(-1, trusted.shape[-1])
    flat_feasible = feasible.reshape(flat.shape)
    fallback = ~flat.any(axis=1) & flat_feasible.any(axis=1)
    if fallback.any():
        distance = np.broadcast_to(outside, feasible.shape).reshape(flat.shape)
        rows = np.nonzero(fallback)[0]
        nearest = np.where(flat_feasible[rows], distance[rows], np.inf).argmin(axis=1)
        flat[rows, nearest] = True
    restricted: np.ndarray = flat.reshape(feasible.shape).astype(np.int8)
    return restricted, np.asarray(fallback.reshape(feasible.shape[:-1]))


# ----------------------------------------------------------------------------------------------
# Merchant guardrails (config section ``rules``; docs/recommend.md)

# The order in which rules are named when several refuse the same price: the rules that hold
# the price (they explain the whole day) first, then the bounds and the limits on a move,
# then the rules on the price itself.
RULE_ORDER = ("freeze", "max_changes_per_month", "bounds", "max_change_per_day",
              "max_change_per_week", "min_margin", "price_endings", "price_ladder",
              "max_above_competitor")
# Days in the window of max_changes_per_month (today and the 29 before).
MONTH_DAYS = 30
WEEK_DAYS = 7
# Slack on price comparisons so a price exactly on a limit is not refused by rounding.
RULE_SLACK = 1e-9


@dataclass(frozen=True)
class ProductRules:
    """The guardrails of n products, resolved from ``rules`` (default < category < product).

    Arrays have shape (n,); a rule that is not set is NaN (floats), -1 (counts), False
    (freeze) or None (endings, ladders, periods).

    Attributes:
        product_id: the products, in the order of the arrays.
        max_change_per_day: always set (``preprocess.max_daily_change`` where no rule sets it).
        max_change_per_week, min_margin, max_above_competitor: floats.
        max_changes_per_month: int64.
        freeze: bool.
        price_endings: per product, the allowed cents (float array) or None.
        price_ladder: per product, the allowed prices (sorted float array) or None.
        freeze_periods: per product, (start, end) datetime64[D] pairs (inclusive) or None.
        sources: per product, rule name -> the config key that set it (for messages).
    """

    product_id: tuple[str, ...]
    max_change_per_day: np.ndarray
    max_change_per_week: np.ndarray
    max_changes_per_month: np.ndarray
    min_margin: np.ndarray
    max_above_competitor: np.ndarray
    freeze: np.ndarray
    price_endings: tuple[np.ndarray | None, ...]
    price_ladder: tuple[np.ndarray | None, ...]
    freeze_periods: tuple[tuple[tuple[np.datetime64, np.datetime64], ...] | None, ...]
    sources: tuple[dict[str, str], ...]

    def subset(self, rows: np.ndarray) -> ProductRules:
        """The rules of products ``rows`` (indices into the arrays), in that order."""
        rows = np.asarray(rows, dtype=np.int64)

        def pick(values: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(values[i] for i in rows)

        return ProductRules(pick(self.product_id), self.max_change_per_day[rows],
                            self.max_change_per_week[rows], self.max_changes_per_month[rows],
                            self.min_margin[rows], self.max_above_competitor[rows],
                            self.freeze[rows], pick(self.price_endings), pick(self.price_ladder),
                            pick(self.freeze_periods), pick(self.sources))

    def frozen_on(self, day: np.datetime64) -> np.ndarray:
        """(n,) True where the price may not change on ``day`` (freeze or a freeze period)."""
        frozen = self.freeze.copy()
        for i, periods in enumerate(self.freeze_periods):
            if periods and any(start <= day <= end for start, end in periods):
                frozen[i] = True
        return frozen


def resolve_rules(rules: RulesSettings, product_ids: Sequence[str],
                  categories: Sequence[str | None], default_daily_change: float) -> ProductRules:
    """Each product's guardrails: ``rules.default``, then its category's, then its own.

    Raises:
        ConfigError: ``rules.products`` or ``rules.categories`` names a product or category
            that is not in the data.
    """
    known_products, known_categories = set(product_ids), {c for c in categories if c}
    for kind, keys, known in (("products", rules.products, known_products),
                              ("categories", rules.categories, known_categories)):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ConfigError(f"rules.{kind} names {', '.join(map(repr, unknown[:5]))}, not "
                              f"in the priced data",
                              f"Use {kind[:-1]} names from the catalog, e.g. "
                              f"{', '.join(sorted(known)[:3]) or '(none)'}.")
    n = len(product_ids)
    values: dict[str, list[Any]] = {name: [None] * n for name in RuleSet.model_fields}
    sources: list[dict[str, str]] = [{} for _ in range(n)]
    for i, (pid, category) in enumerate(zip(product_ids, categories, strict=True)):
        layers = [("rules.default", rules.default)]
        if category and category in rules.categories:
            layers.append((f"rules.categories.{category}", rules.categories[category]))
        if pid in rules.products:
            layers.append((f"rules.products.{pid}", rules.products[pid]))
        for where, layer in layers:
            for name in layer.model_fields_set:
                value = getattr(layer, name)
                if value is not None:
                    values[name][i] = value
                    sources[i][name] = f"{where}.{name}"

    def floats(name: str, fill: float = np.nan) -> np.ndarray:
        return np.array([fill if v is None else float(v) for v in values[name]])

    return ProductRules(
        product_id=tuple(str(p) for p in product_ids),
        max_change_per_day=floats("max_change_per_day", default_daily_change),
        max_change_per_week=floats("max_change_per_week"),
        max_changes_per_month=np.array([-1 if v is None else int(v)
                                        for v in values["max_changes_per_month"]]),
        min_margin=floats("min_margin"),
        max_above_competitor=floats("max_above_competitor"),
        freeze=np.array([bool(v) for v in values["freeze"]]),
        price_endings=tuple(None if v is None else np.array(sorted(v), dtype=np.float64)
                            for v in values["price_endings"]),
        price_ladder=tuple(None if v is None else np.array(sorted(v), dtype=np.float64)
                           for v in values["price_ladder"]),
        freeze_periods=tuple(None if v is None else tuple(
            (np.datetime64(p.start, "D"), np.datetime64(p.end, "D")) for p in v)
            for v in values["freeze_periods"]),
        sources=tuple(sources))


def snap_to_rules(prices: np.ndarray, rules: ProductRules) -> np.ndarray:
    """(n, C) ``prices`` moved to the nearest allowed price of each product's price ladder, or
    else to the nearest price with an allowed ending (.99, .49, ...); other rows unchanged."""
    out = np.array(prices, dtype=np.float64, copy=True)
    for i in range(out.shape[0]):
        ladder, endings = rules.price_ladder[i], rules.price_endings[i]
        if ladder is not None:
            out[i] = ladder[np.abs(out[i][:, None] - ladder[None, :]).argmin(axis=1)]
        elif endings is not None:
            whole = np.floor(out[i])[:, None] + np.array([-1.0, 0.0])[None, :]
            options = (whole[:, :, None] + endings[None, None, :]).reshape(out.shape[1], -1)
            options = np.where(options > 0, options, np.inf)
            out[i] = options[np.arange(out.shape[1]),
                             np.abs(options - out[i][:, None]).argmin(axis=1)]
    return out


def _ends_in(prices: np.ndarray, endings: np.ndarray) -> np.ndarray:
    """True where a price's cents are one of ``endings`` (to the cent)."""
    cents = np.round(prices * 100.0).astype(np.int64) % 100
    allowed = np.round(endings * 100.0).astype(np.int64)
    return np.isin(cents, allowed) & (np.abs(prices * 100.0 - np.round(prices * 100.0)) < 1e-6)


def rule_masks(candidates: np.ndarray, unit_cost: np.ndarray, min_price: np.ndarray,
               max_price: np.ndarray, rules: ProductRules, *, previous: np.ndarray,
               week_ago: np.ndarray, changes_in_month: np.ndarray, day: np.datetime64,
               competitor: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Which candidate prices each rule allows today, one (n, C) bool mask per rule.

    Args:
        candidates: (n, C) prices that may be charged today.
        unit_cost, min_price, max_price: (n,).
        rules: the n products' rules (:func:`resolve_rules`).
        previous: (n,) yesterday's price.
        week_ago: (n,) the price charged 7 days before today (NaN: unknown, rule skipped).
        changes_in_month: (n,) price changes on the 29 days before today.
        day: today.
        competitor: (n,) the competitor's price today (NaN: unknown, rule skipped).

    Returns:
        rule name (:data:`RULE_ORDER`) -> mask; a product's feasible prices are the AND of all.
        The daily, weekly and monthly limits and the freeze are relative to the policy's own
        previous prices, so the caller keeps that history (recommend, baselines' day loop).
    """
    prices = np.asarray(candidates, dtype=np.float64)
    col = (slice(None), None)
    # A freeze or a used-up monthly limit holds yesterday's price exactly (it is always a
    # candidate), not merely within CHANGE_TOLERANCE: small steps could otherwise drift.
    held = np.abs(prices - previous[col]) <= RULE_SLACK * np.maximum(np.abs(previous[col]), 1.0)
    masks = {
        "bounds": (prices >= min_price[col] * (1 - RULE_SLACK))
        & (prices <= max_price[col] * (1 + RULE_SLACK)),
        "max_change_per_day": np.abs(prices / previous[col] - 1.0)
        <= rules.max_change_per_day[col] + RULE_SLACK,
    }
    with np.errstate(invalid="ignore"):
        weekly = np.abs(prices / week_ago[col] - 1.0) <= rules.max_change_per_week[col] + RULE_SLACK
    masks["max_change_per_week"] = weekly | ~np.isfinite(week_ago * rules.max_change_per_week)[col]
    limit = rules.max_changes_per_month
    used_up = (limit >= 0) & (changes_in_month >= limit)
    masks["max_changes_per_month"] = held | ~used_up[col]
    masks["freeze"] = held | ~rules.frozen_on(day)[col]
    masks["min_margin"] = margin_levels(prices, unit_cost, rules.min_margin)
    endings = np.ones(prices.shape, dtype=bool)
    ladder = np.ones(prices.shape, dtype=bool)
    for i in range(prices.shape[0]):
        cents, rungs = rules.price_endings[i], rules.price_ladder[i]
        if cents is not None:
            endings[i] = _ends_in(prices[i], cents)
        if rungs is not None:
            ladder[i] = np.abs(prices[i][:, None] - rungs[None, :]).min(axis=1) < 1e-6
    masks["price_endings"], masks["price_ladder"] = endings, ladder
    masks["max_above_competitor"] = competitor_levels(prices, competitor,
                                                      rules.max_above_competitor)
    return masks


def margin_levels(prices: np.ndarray, unit_cost: np.ndarray, min_margin: np.ndarray
                  ) -> np.ndarray:
    """(n, C) bool: prices whose margin (price - cost) / price is at least ``min_margin``
    ((n,), NaN: no rule)."""
    with np.errstate(invalid="ignore"):
        ok = prices - unit_cost[:, None] >= min_margin[:, None] * prices - RULE_SLACK
    return np.asarray(ok | np.isnan(min_margin)[:, None])


def competitor_levels(prices: np.ndarray, competitor: np.ndarray | None,
                      max_above: np.ndarray) -> np.ndarray:
    """(n, C) bool: prices at most ``max_above`` ((n,), NaN: no rule) over the competitor's
    price ((n,), NaN or None: unknown, no limit)."""
    if competitor is None:
        return np.ones(prices.shape, dtype=bool)
    cap = competitor * (1.0 + max_above)
    with np.errstate(invalid="ignore"):
        return np.asarray((prices <= cap[:, None] * (1 + RULE_SLACK)) | np.isnan(cap)[:, None])


def apply_rule_levels(mask: np.ndarray, allowed: np.ndarray | None, grid: np.ndarray,
                      prev_price: np.ndarray) -> np.ndarray:
    """The feasible ``mask`` (n, K) ANDed with the levels the merchant rules allow (``allowed``
    (n, K) bool, None: no rule). Where the two leave nothing (yesterday's price far from what
    a rule allows), the allowed level nearest to ``prev_price`` is kept: the rule wins over the
    daily limit, as the catalog bounds do in :func:`feasible_mask`."""
    if allowed is None:
        return mask
    both = np.asarray(mask, dtype=bool) & allowed
    empty = ~both.any(axis=1)
    if empty.any():
        distance = np.where(allowed[empty], np.abs(grid[empty] - prev_price[empty, None]),
                            np.inf)
        both[np.flatnonzero(empty), distance.argmin(axis=1)] = True
    return both.astype(mask.dtype)


def combine_rule_masks(masks: dict[str, np.ndarray]) -> np.ndarray:
    """(n, C) bool: the prices every rule allows."""
    return np.logical_and.reduce([masks[name] for name in RULE_ORDER])


def check_rules_feasible(allowed: np.ndarray, masks: dict[str, np.ndarray], rules: ProductRules,
                         day: np.datetime64) -> None:
    """Raise ConfigError naming the first product whose rules leave no price on ``day``."""
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size == 0:
        return
    i = int(empty[0])
    defaults = {"max_change_per_day": "preprocess.max_daily_change",
                "bounds": "the catalog's min_price/max_price"}
    refusing = [name for name in RULE_ORDER if not masks[name][i].all()]
    keys = [rules.sources[i].get(name, defaults.get(name, name)) for name in refusing]
    # The rules whose loosening alone would leave a price: the ones to tell the user about.
    alone = [key for name, key in zip(refusing, keys, strict=True)
             if np.logical_and.reduce([masks[o][i] for o in RULE_ORDER if o != name]).any()]
    raise ConfigError(
        f"the rules leave no feasible price for product {rules.product_id[i]!r} on {day}: "
        f"{', '.join(keys)} together refuse every candidate price"
        + (f" ({empty.size} products in all)" if empty.size > 1 else ""),
        (f"Loosen {' or '.join(alone)} for this product" if alone else
         "Loosen some of these rules for this product") + " (every rule is optional; see "
        "docs/recommend.md), or widen its catalog min_price/max_price.")


def binding_rules(masks: dict[str, np.ndarray], unconstrained: np.ndarray,
                  chosen: np.ndarray) -> np.ndarray:
    """(n,) the rule that bound each choice: the first of :data:`RULE_ORDER` that refuses the
    candidate the policy would have picked with no rule at all (``unconstrained``), or
    ``"none"`` where the policy got that candidate (``chosen == unconstrained``)."""
    n = unconstrained.shape[0]
    out = np.full(n, "none", dtype=object)
    moved = np.flatnonzero(chosen != unconstrained)
    for i in moved:
        for name in RULE_ORDER:
            if not masks[name][i, unconstrained[i]]:
                out[i] = name
                break
    return out
