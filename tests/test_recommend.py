"""`pricectl recommend` on the tiny preset: future dates, every rule obeyed, the binding rule
explained, a subset of products."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pricing_cli import cli
from pricing_cli.agent.demand import policy_expected_units
from pricing_cli.agent.policy import load_demand_model
from pricing_cli.pricing import RULE_ORDER
from pricing_cli.storage import OWNER_MARKER
from tests.support.markets import BASE, PRICED, copy_parts

PRICES_COLUMNS = ["product_id", "date", "current_price", "recommended_price", "change_pct",
                  "expected_units", "expected_profit", "profit_low", "profit_high",
                  "binding_rule"]


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory, tiny_market: Path) -> Path:
    """The session's trained tiny market (tests/conftest.py: a catalog of 9 of its 12
    products, models/r1), copied once for this module's tests to write into."""
    return copy_parts(tiny_market, tmp_path_factory.mktemp("recommend"))


def test_a_subset_catalog_prices_only_its_products(market: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(market)
    record = json.loads(Path("data/features/run.json").read_text())
    # the other 3 products' transactions were skipped and counted, not bad rows
    assert record["summary"]["bad_rows"] == 0
    transactions = pl.concat([pl.read_csv(p) for p in sorted(Path("data/raw/transactions")
                                                             .glob("*.csv"))])
    outside = transactions.filter(~pl.col("product_id").is_in(PRICED)).height
    assert outside > 0 and record["summary"]["outside_catalog_rows"] == outside
    assert recommend("--policy", "historical", "--horizon", "2") == 0
    start = np.datetime64(last_rows()["date"].max(), "D") + 1
    prices = pl.read_csv(Path("recommendations") / str(start) / "prices.csv")
    assert sorted(set(prices["product_id"])) == PRICED


def last_rows() -> pl.DataFrame:
    meta = pl.read_parquet("data/processed/meta_test.parquet")
    return meta.sort("date").group_by("product_id").last().sort("product_id")


def recommend(*args: str, config: str = "base.yaml") -> int:
    return cli.main(["--preset", "tiny", "--config", config, "-q", "recommend", *args])


def test_recommend_prices_the_days_after_the_data(market: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(market)
    assert recommend("--policy", "greedy", "--horizon", "5") == 0
    last = last_rows()
    last_day = last["date"].max()
    folder = Path("recommendations") / str(np.datetime64(last_day, "D") + 1)
    assert sorted(p.name for p in folder.iterdir()) == [
        OWNER_MARKER, "explain.json", "prices.csv", "run.json", "summary.md"]
    prices = pl.read_csv(folder / "prices.csv", try_parse_dates=True)
    assert prices.columns == PRICES_COLUMNS
    # 5 days after the data's last day, for every product
    expected_days = [np.datetime64(last_day, "D") + k for k in range(1, 6)]
    assert sorted(set(prices["date"].to_numpy().astype("datetime64[D]"))) == expected_days
    assert prices.height == 5 * last.height
    # each product starts from its last known price
    current = dict(zip(last["product_id"], last["price"], strict=True))
    assert all(abs(row["current_price"] - current[row["product_id"]]) < 0.006
               for row in prices.iter_rows(named=True))
    # expected units and profit are the run's demand model at the future date
    demand = load_demand_model("models/r1")
    index = dict(zip(last["product_id"], last["product_index"], strict=True))
    cost = dict(zip(last["product_id"], last["unit_cost"], strict=True))
    row = prices.row(7, named=True)
    # Siblings at their own recommended prices that day (the cross-price term).
    that_day = prices.filter(pl.col("date") == row["date"])
    day_units = policy_expected_units(
        demand, np.array([index[p] for p in that_day["product_id"]]),
        np.full(that_day.height, np.datetime64(row["date"], "D")),
        that_day["recommended_price"].to_numpy())
    units = day_units[that_day["product_id"].to_list().index(row["product_id"])]
    # (the CSV holds prices in cents: 1% covers the rounding at these elasticities)
    assert row["expected_units"] == pytest.approx(units, rel=0.01)
    assert row["expected_profit"] == pytest.approx(
        (row["recommended_price"] - cost[row["product_id"]]) * units, rel=0.01)
    assert row["change_pct"] == pytest.approx(
        (row["recommended_price"] / row["current_price"] - 1) * 100, abs=0.1)
    assert set(prices["binding_rule"]) <= {"none", "trust_region", *RULE_ORDER}
    # Do no harm: every price inside the run's trust region, or on the way toward it (only
    # where today's allowed prices all lie outside it)
    from pricing_cli.agent.policy import load_trust_region

    region = load_trust_region(Path("models/r1"))
    assert region is not None
    for r in prices.iter_rows(named=True):
        lower, upper = (float(b[index[r["product_id"]]]) for b in region)
        inside = lower - 0.01 <= r["recommended_price"] <= upper + 0.01
        toward = (abs(r["recommended_price"] - np.clip(r["recommended_price"], lower, upper))
                  <= abs(r["current_price"] - np.clip(r["current_price"], lower, upper)) + 0.01)
        assert inside or toward, r
    # profit_low/high: the 5% and 95% quantiles of the ensemble members' expected profit at
    # the recommended price (recommend.interval 0.9), linear between the 8 members
    from pricing_cli.agent.ensemble import DemandEnsemble

    ensemble = DemandEnsemble.load("models/r1")
    assert ensemble is not None and ensemble.size == 8
    # each member with the siblings at their recommended prices that day, as the point fit
    at = that_day["product_id"].to_list().index(row["product_id"])
    member_units = np.array([policy_expected_units(
        member, np.array([index[p] for p in that_day["product_id"]]),
        np.full(that_day.height, np.datetime64(row["date"], "D")),
        that_day["recommended_price"].to_numpy())[at] for member in ensemble.members])
    member_profit = np.sort((row["recommended_price"] - cost[row["product_id"]]) * member_units)
    # by hand: position 0.05 * 7 = 0.35 between the lowest two, 0.95 * 7 = 6.65 between the top two
    low = member_profit[0] + 0.35 * (member_profit[1] - member_profit[0])
    high = member_profit[6] + 0.65 * (member_profit[7] - member_profit[6])
    assert row["profit_low"] == pytest.approx(low, rel=0.01)
    assert row["profit_high"] == pytest.approx(high, rel=0.01)
    assert (prices["profit_low"] <= prices["profit_high"]).all()
    assert prices["profit_low"].null_count() == 0
    explain = json.loads((folder / "explain.json").read_text())
    assert explain["interval"]["members"] == 8 and explain["interval"]["level"] == 0.9
    first = explain["products"][0]
    assert first["demand_shape"] in ("loglog", "linear", "logit")
    e_low, e_high = first["elasticity_interval"]
    assert e_low <= e_high
    summary = (folder / "summary.md").read_text()
    change_low, change_high = explain["interval"]["expected_profit_change"]
    assert (f"90% interval {change_low:+,.2f} to {change_high:+,.2f} over 8 demand refits"
            in summary)


def test_agent_obeys_every_rule_and_explain_names_the_binding_rule(
        market: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(market)
    Path("rules.yaml").write_text(
        BASE + "rules:\n  default:\n    max_change_per_day: 0.15\n    min_margin: 0.2\n"
        "  categories:\n    C02: {price_endings: [0.49, 0.99]}\n"
        "    C03: {price_endings: [0.49, 0.99]}\n"
        "  products:\n    P00003:\n      freeze: true\n")
    # The tiny market's catalog: P00003, P00005, P00007 and P00009 are category C01.
    no_endings = {"P00003", "P00005", "P00007", "P00009"}
    assert recommend("--policy", "agent", "--horizon", "7", config="rules.yaml") == 0
    last = last_rows()
    start = np.datetime64(last["date"].max(), "D") + 1
    folder = Path("recommendations") / str(start)
    prices = pl.read_csv(folder / "prices.csv").sort("product_id", "date")
    cost = dict(zip(last["product_id"], last["unit_cost"], strict=True))
    for pid, rows in prices.group_by("product_id", maintain_order=True):
        path = rows["recommended_price"].to_numpy()
        current = rows["current_price"][0]
        previous = np.r_[current, path[:-1]]
        if pid[0] == "P00003":
            np.testing.assert_array_equal(path, current)  # frozen: held exactly
            assert set(rows["binding_rule"]) <= {"freeze", "none"}
            continue
        assert (np.abs(path / previous - 1) <= 0.15 + 1e-9).all(), pid
        if pid[0] not in no_endings:
            assert set(np.round(path * 100).astype(int) % 100) <= {49, 99}, pid
        assert ((path - cost[pid[0]]) / path >= 0.2 - 1e-9).all(), pid
    explain = json.loads((folder / "explain.json").read_text())
    by_product = {p["product_id"]: p for p in explain["products"]}
    assert sorted(by_product) == sorted(last["product_id"])
    bound = prices.filter(pl.col("binding_rule") != "none")
    assert bound.height > 0
    # the explain file names, per product, the rule that bound most often
    for pid, rows in bound.group_by("product_id"):
        counts = rows["binding_rule"].value_counts()
        top = counts.filter(pl.col("count") == counts["count"].max())["binding_rule"].to_list()
        assert by_product[pid[0]]["binding_rule"] in top
        assert sum(by_product[pid[0]]["binding_days"].values()) == rows.height
    assert explain["rule_bound_counts"]["max_change_per_day"] == int(
        (prices["binding_rule"] == "max_change_per_day").sum())
    summary = (folder / "summary.md").read_text()
    assert f"- max_change_per_day: {explain['rule_bound_counts']['max_change_per_day']}" in summary


def test_products_subset_prices_only_those(market: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(market)
    Path("subset.txt").write_text("product_id\nP00005\nP00002\n")
    assert recommend("--policy", "planner", "--horizon", "3", "--products", "subset.txt") == 0
    start = np.datetime64(last_rows()["date"].max(), "D") + 1
    prices = pl.read_csv(Path("recommendations") / str(start) / "prices.csv")
    assert sorted(set(prices["product_id"])) == ["P00002", "P00005"]
    assert prices.height == 6


def test_start_before_the_data_ends_and_unknown_products_are_errors(
        market: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(market)
    last_day = np.datetime64(last_rows()["date"].max(), "D")
    assert recommend("--policy", "greedy", "--start", str(last_day)) == 3
    err = capsys.readouterr().err
    assert (f"pricectl: config error: --start {last_day} is not after the data's last day "
            f"{last_day}\n  hint: recommend prices future days: pass --start {last_day + 1} or "
            "later, or leave it out.\n") in err
    assert recommend("--policy", "greedy", "--products", "P00001,NOPE") == 3
    assert ("--products: product(s) 'NOPE' are not in the processed data (1 unknown)"
            in capsys.readouterr().err)


def test_rules_leaving_no_price_fail_naming_the_product(
        market: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(market)
    Path("impossible.yaml").write_text(
        BASE + "rules:\n  products:\n    P00004:\n      min_margin: 0.95\n")
    assert recommend("--policy", "greedy", config="impossible.yaml") == 3
    err = capsys.readouterr().err
    assert "the rules leave no feasible price for product 'P00004' on " in err
    assert "hint: Loosen rules.products.P00004.min_margin for this product" in err


def test_closed_days_are_found_from_the_data_and_from_config() -> None:
    from pricing_cli.config import DataSettings
    from pricing_cli.data.closed_days import find_closed_days

    days = np.datetime64("2024-01-01") + np.arange(35)  # Monday 1 January, 5 weeks
    dates = np.repeat(days, 2)  # two products
    units = np.ones(70)
    sunday = ((days.astype(np.int64) + 3) % 7) == 6
    units[np.repeat(sunday, 2)] = 0.0  # shut every Sunday
    units[[4, 5]] = 0.0  # and on 3 January (both products)
    units[6] = 0.0  # one product sold nothing on 4 January: the store was open
    closed = find_closed_days(dates, units, DataSettings(
        closed_weekdays=[5], closed_dates=[np.datetime64("2024-12-25").astype(object)]))
    assert closed.weekdays == frozenset({5, 6})
    assert [str(d) for d in closed.dates] == [
        "2024-01-03", "2024-01-07", "2024-01-14", "2024-01-21", "2024-01-28", "2024-02-04",
        "2024-12-25"]
    assert closed.found_in_data == 6
    assert closed.is_closed(np.array(["2024-01-03", "2024-01-04", "2024-02-10", "2024-02-12"],
                                     dtype="datetime64[D]")).tolist() == [True, False, True,
                                                                           False]


def test_closed_weekdays_get_no_recommendation(market: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(market)
    Path("closed.yaml").write_text(BASE + "  closed_weekdays: [5, 6]\n")
    assert recommend("--policy", "greedy", "--horizon", "14", config="closed.yaml") == 0
    start = np.datetime64(last_rows()["date"].max(), "D") + 1
    assert str(start) == "2023-05-01"  # a Monday: the folder is named by the first open day
    prices = pl.read_csv(Path("recommendations") / str(start) / "prices.csv",
                         try_parse_dates=True)
    weekdays = set(prices["date"].dt.weekday().to_list())  # Monday 1
    assert weekdays == {1, 2, 3, 4, 5}
    assert prices["date"].n_unique() == 10  # 14 days, 2 weekends


def test_evaluate_leaves_closed_days_out(market: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(market)
    Path("closed.yaml").write_text(BASE + "  closed_weekdays: [5, 6]\nevaluate:\n"
                                   "  reports_dir: reports-closed\n")
    assert cli.main(["--preset", "tiny", "--config", "closed.yaml", "-q", "evaluate"]) == 0
    meta = pl.read_parquet("data/processed/meta_test.parquet")
    weekend = meta.filter(pl.col("date").dt.weekday() >= 6)  # polars: Monday 1
    assert weekend.height > 0
    evaluation = json.loads(Path("reports-closed/evaluation.json").read_text())
    assert evaluation["closed_days"]["product_days_left_out"] == weekend.height
    assert evaluation["closed_days"]["weekdays"] == [5, 6]
    assert evaluation["product_days"] == meta.height - weekend.height
    for policy in ("agent", "greedy", "historical"):
        prices = pl.read_csv(f"reports-closed/prices_{policy}.csv", try_parse_dates=True)
        assert prices.height == meta.height - weekend.height
        assert set(prices["date"].dt.weekday()) <= {1, 2, 3, 4, 5}


def test_make_demo_prints_the_table_once_and_names_the_reports_folder(
        market: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pricing_cli import demo

    monkeypatch.chdir(market)
    assert cli.main(["--preset", "tiny", "--config", "base.yaml", "-q", "evaluate"]) == 0
    old = Path("reports/evaluation.json").stat().st_mtime - 60
    os.utime("reports/evaluation.json", (old, old))
    capsys.readouterr()
    # a second `make demo`: every stage up to date, so evaluate printed nothing this time
    monkeypatch.setattr(demo.cli, "main", lambda argv: 0)
    assert demo.main(["--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("\npolicy ") == 1 and out.count("VERDICT: ") == 1
    assert ("reports: reports/ (report.md, evaluation.json, prices_<policy>.csv, plots); "
            "prices for the days after the data: pricectl --preset tiny recommend") in out

    def evaluated_now(argv: list[str]) -> int:  # evaluate ran and printed its own table
        Path("reports/evaluation.json").touch()
        return 0

    monkeypatch.setattr(demo.cli, "main", evaluated_now)
    assert demo.main(["--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "policy " not in out and "reports: reports/" in out
