"""The merchant rules (config section ``rules``) for the rows of a processed split, as the
training env, evaluate's baselines and recommend use them.

recommend applies every rule (it keeps each policy's own price history, see
agent/recommend.py). On historical rows (the env and evaluate's baselines) the rules that
need no history are applied to the price grid: ``min_margin`` and ``max_above_competitor``.
Price endings and ladders move prices off the grid, and the daily, weekly and monthly limits
and the freeze depend on the policy's own path; they are enforced by recommend only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pricing_cli.config import CatalogColumnMap, RulesSettings, Settings
from pricing_cli.errors import ConfigError, DataError, MissingInputError
from pricing_cli.pricing import (
    ProductRules,
    competitor_levels,
    margin_levels,
    price_grid,
    resolve_rules,
)


def rules_are_set(rules: RulesSettings) -> bool:
    """True when the config sets any merchant rule."""
    return rules != RulesSettings()


def catalog_categories(path: Path | None, columns: CatalogColumnMap | None = None
                       ) -> dict[str, str]:
    """product_id -> category from the catalog, {} when there is none (rules by category then
    cannot apply, and naming one is an error in :func:`pricing.resolve_rules`)."""
    if path is None or not path.is_file():
        return {}
    from pricing_cli.data.raw_contract import read_catalog

    catalog = read_catalog(path, columns)
    return {str(p): str(c) for p, c in zip(catalog["product_id"].to_list(),
                                           catalog["category"].to_list(), strict=True)
            if c is not None and c != "none"}


def resolve_for(settings: Settings, product_ids: list[str]) -> ProductRules:
    """The rules of ``product_ids``, with categories from ``data.catalog``."""
    categories = catalog_categories(Path(settings.data.catalog), settings.data.catalog_columns)
    return resolve_rules(settings.rules, product_ids, [categories.get(p) for p in product_ids],
                         float(settings.preprocess.max_daily_change))


def read_competitor_prices(path: Path, product_ids: list[str], days: np.ndarray) -> np.ndarray:
    """(len(days), n) the competitor's price of each product on each day: its latest price on
    or before that day (NaN: none known).

    Raises:
        MissingInputError: the file does not exist.
        DataError: a column is missing or a row cannot be read (named by line).
    """
    import polars as pl

    if not path.is_file():
        raise MissingInputError(f"competitor price file not found: {path}",
                                "Point rules.competitor_prices at a CSV of product_id,date,price.")
    try:
        frame = pl.read_csv(path, schema_overrides={"product_id": pl.String, "date": pl.String,
                                                    "price": pl.String})
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise DataError(f"cannot read {path}: {exc}", "Save it as CSV with a header "
                        "product_id,date,price.") from None
    missing = {"product_id", "date", "price"} - set(frame.columns)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}",
                        "The competitor file needs the columns product_id,date,price.")
    parsed = frame.with_columns(pl.col("date").str.to_date(strict=False).alias("_date"),
                                pl.col("price").cast(pl.Float64, strict=False).alias("_price"))
    bad = parsed.with_row_index("line").filter(
        pl.col("_date").is_null() | pl.col("_price").is_null() | (pl.col("_price") <= 0))
    if bad.height:
        row = bad.row(0, named=True)
        raise DataError(f"{path}:{int(row['line']) + 2}: cannot read date {row['date']!r} or "
                        f"price {row['price']!r} ({bad.height} bad rows)",
                        "Dates are ISO (2024-05-01) and prices positive numbers.")
    out = np.full((len(days), len(product_ids)), np.nan)
    column = {p: i for i, p in enumerate(product_ids)}
    for pid, group in parsed.sort("_date").group_by("product_id", maintain_order=True):
        i = column.get(str(pid[0]))
        if i is None:
            continue
        when = group["_date"].to_numpy().astype("datetime64[D]")
        at = np.searchsorted(when, days, side="right") - 1
        prices = group["_price"].to_numpy()
        out[at >= 0, i] = prices[at[at >= 0]]
    return out


def row_rule_levels(settings: Settings, product_id: np.ndarray, dates: np.ndarray,
                    unit_cost: np.ndarray, min_price: np.ndarray, max_price: np.ndarray,
                    levels: int) -> np.ndarray | None:
    """(n, K) bool: the grid levels of each processed row that ``min_margin`` and
    ``max_above_competitor`` allow; None when no rule is set.

    Raises:
        ConfigError: a rule leaves a row no level (naming the product, the day and the rule).
    """
    if not rules_are_set(settings.rules):
        return None
    ids, row_product = np.unique(np.asarray(product_id).astype(str), return_inverse=True)
    rules = resolve_for(settings, ids.tolist())
    grid = price_grid(min_price, max_price, levels)
    allowed = margin_levels(grid, unit_cost, rules.min_margin[row_product])
    if settings.rules.competitor_prices:
        days, row_day = np.unique(np.asarray(dates).astype("datetime64[D]"), return_inverse=True)
        table = read_competitor_prices(Path(settings.rules.competitor_prices), ids.tolist(),
                                       days)
        allowed &= competitor_levels(grid, table[row_day, row_product],
                                     rules.max_above_competitor[row_product])
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        i = int(empty[0])
        source: dict[str, Any] = rules.sources[row_product[i]]
        keys = [source.get(k, k) for k in ("min_margin", "max_above_competitor") if k in source]
        raise ConfigError(
            f"the rules leave no feasible price for product {ids[row_product[i]]!r} on "
            f"{np.datetime64(dates[i], 'D')}: {', '.join(keys)} refuse every level up to its "
            f"max_price {max_price[i]:.2f}" + (f" ({empty.size} rows in all)"
                                               if empty.size > 1 else ""),
            "Loosen that rule for this product, or raise its catalog max_price.")
    return allowed


def market_rule_bits(settings: Settings, market: Any) -> np.ndarray | None:
    """:func:`row_rule_levels` of every row of an env ``Market``, bit-packed as
    ``Market.rule_bits`` holds them; None when no rule is set."""
    if not rules_are_set(settings.rules):
        return None
    ids = np.array([market.product_ids.get(int(p), str(p)) for p in market.product_index],
                   dtype=object)
    allowed = row_rule_levels(settings, ids, market.dates, market.unit_cost, market.min_price,
                              market.max_price, market.price_levels)
    return None if allowed is None else np.packbits(allowed, axis=1)
