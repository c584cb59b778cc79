"""A market whose held-out split answers price as told, fitted and priced end to end: the
verdict, checked uplift and intervals that tests/test_checks.py and tests/test_calibration.py
assert on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pricing_cli.agent import baselines as bl
from pricing_cli.agent import checks
from pricing_cli.agent import evaluate as ev
from pricing_cli.agent.demand import DemandModel
from pricing_cli.agent.ensemble import decision_demand, fit_ensemble
from pricing_cli.config import load_settings
from tests import agent_fixtures

SETTINGS = load_settings(preset="tiny", flags={}, environ={})


def checked_market(tmp_path: Path, flip_test_response: bool = False,
                   test_units_factor: float = 1.0, test_elasticity_factor: float = 1.0,
                   n_products: int = 6) -> tuple[dict, dict]:
    """Fit on the fixture's train split, price its test split greedily on the ensemble's 0.25
    quantile and return (the verdict, the truth's uplift and the intervals).

    ``flip_test_response``: the test split's units answer price with the opposite sign of the
    truth the model was fitted on (a market that changed, or one that fools the model);
    ``test_elasticity_factor``: they answer it with this share of the elasticity.
    """
    truth = agent_fixtures.write_processed(tmp_path, n_products=n_products, n_days=360, seed=1)
    test_truth = dict(truth)
    if flip_test_response or test_units_factor != 1.0 or test_elasticity_factor != 1.0:
        frame = pl.read_parquet(tmp_path / "meta_test.parquet")
        if flip_test_response:
            test_truth["elasticity"] = -truth["elasticity"]
        test_truth["elasticity"] = test_truth["elasticity"] * test_elasticity_factor
        lam = test_units_factor * agent_fixtures.true_expected_units(
            test_truth, frame["product_index"].to_numpy(), frame["date"].to_numpy(),
            frame["price"].to_numpy())
        units = np.random.default_rng(5).poisson(lam).astype(np.float64)
        frame.with_columns(units=pl.Series(units)).write_parquet(tmp_path / "meta_test.parquet")
    train = pl.read_parquet(tmp_path / "meta_train.parquet")
    point = DemandModel.fit(train, SETTINGS)
    ensemble = fit_ensemble(train, SETTINGS, n_products=n_products, point=point)
    meta = bl.load_split_meta(tmp_path, "test")
    at_historical = point.expected_units(meta.product_index, meta.date, meta.price)
    events = checks.price_change_events(
        meta, at_historical, 7,
        point.expected_units(meta.product_index, meta.date, checks.prices_held(meta)))
    report = checks.run_checks(meta, at_historical, 7, events)
    policies = {"agent": bl.greedy_prices(meta, decision_demand(point, ensemble, 0.25), 11,
                                          0.25),
                "historical": meta.price}
    intervals, _ = ev.uplift_intervals(meta, policies, ensemble, point, None, 0.9)
    slope, checked, per_product = ev.checked_uplifts(meta, policies, point, ensemble, None,
                                                     events, 0.9, 0)

    def true_units(prices: np.ndarray) -> np.ndarray:
        return agent_fixtures.true_expected_units(test_truth, meta.product_index, meta.date,
                                                  prices)

    true = ev.score_policies(meta, policies, true_units)
    verdict = checks.verdict(report, checked["agent"], per_product, SETTINGS.evaluate)
    return verdict, {"true_uplift": true["agent"]["uplift_pct"], "interval": checked["agent"],
                     "fitted_interval": intervals["agent"], "checks": report, "slope": slope}
