"""The whole pipeline on every generator scenario, scored under the true demand.

For the default market and each ``configs/scenarios/<name>.yaml``, writes a config whose every
output folder lies in ``bench/out/scenarios/<name>/``, runs ``pricectl --preset small --config
<it> pipeline --generate --force`` there (``--generate`` so the market is generated first,
today and once ``pipeline`` generates only when asked), and reads
``reports/evaluation.json``: per policy the share of the true optimum, the agent's and
greedy's true and reported (fitted) uplift over the historical prices, and the fitted vs true
mean elasticity. The table goes to stdout and to
``bench/out/scenarios/scenarios.md``. The test split is the last quarter (91 days), the
validation split the quarter before it.

    python -m bench.bench_scenarios                      # 150 products x 730 days (slow)
    python -m bench.bench_scenarios --products 20 --days 365 --timesteps 2048   # a quick check
    python -m bench.bench_scenarios --only default --overlay configs/change-cost.yaml \
        --set train.trust_region=0.2 --tag cc-tr20    # a config on top, out in default+cc-tr20/

``--overlay`` (a config file) and ``--set section.key=value`` (YAML values) go on top of the
scenario's config, before the bench's sizes and paths; ``--tag`` names the output folder
``<name>+<tag>`` so a variant does not overwrite the scenario's own run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_CONFIGS = ROOT / "configs" / "scenarios"
OUT = ROOT / "bench" / "out" / "scenarios"
POLICIES = ("historical", "static", "greedy", "planner", "agent")
# An inventory market: every policy's true profit as a share of the stock DP's value.
DP_POLICIES = ("historical", "static", "greedy", "ladder", "planner", "agent", "oracle")
QUARTER_DAYS = 91


def scenario_names() -> list[str]:
    return ["default", *sorted(p.stem for p in SCENARIO_CONFIGS.glob("*.yaml"))]


def overrides(overlay: list[str], assignments: list[str]) -> dict[str, Any]:
    """The sections of the ``--overlay`` files, then the ``--set section.key=value`` items
    (the value read as YAML: 0.2, null, true), later ones winning."""
    out: dict[str, dict[str, Any]] = {}
    for path in overlay:
        for section, values in (yaml.safe_load(Path(path).read_text()) or {}).items():
            out.setdefault(section, {}).update(values or {})
    for item in assignments:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise SystemExit(f"--set {item!r}: expected section.key=value, e.g. "
                             "train.trust_region=0.2")
        out.setdefault(section, {})[field] = yaml.safe_load(value)
    return out


def bench_config(name: str, work: Path, products: int, days: int,
                 timesteps: int | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scenario's config with ``extra`` (see :func:`overrides`) on top, then sizes, splits
    and every input/output path under ``work``."""
    config: dict[str, Any] = {}
    if name != "default":
        config = yaml.safe_load((SCENARIO_CONFIGS / f"{name}.yaml").read_text()) or {}
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    start = date(2023, 1, 1)
    test_start = start + timedelta(days=days - QUARTER_DAYS)
    raw = work / "data" / "raw"
    sections = {
        "data": {"transactions": str(raw / "transactions" / "*.csv*"),
                 "catalog": str(raw / "catalog.csv"),
                 "ground_truth": str(raw / "ground_truth.json")},
        "generate": {"output_dir": str(raw), "n_products": products, "n_days": days,
                     "start_date": start.isoformat()},
        "features": {"output_dir": str(work / "data" / "features"),
                     "val_start": (test_start - timedelta(days=QUARTER_DAYS)).isoformat(),
                     "test_start": test_start.isoformat()},
        "preprocess": {"input_glob": str(work / "data" / "features" / "*.parquet"),
                       "output_dir": str(work / "data" / "intermediate")},
        "merge": {"output_dir": str(work / "data" / "processed")},
        "train": {"models_dir": str(work / "models")},
        "evaluate": {"reports_dir": str(work / "reports")},
        "monitor": {"runs_dir": str(work / "runs")},
    }
    if timesteps is not None:
        sections["train"]["timesteps"] = timesteps
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline of one scenario; returns its evaluation.json (plus wall_s)."""
    work = OUT / folder_name(name, args.tag)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(
        bench_config(name, work, args.products, args.days, args.timesteps,
                     overrides(args.overlay, args.set)), sort_keys=False))
    command = [sys.executable, "-m", "pricing_cli", "--preset", args.preset, "--config",
               str(config_path), "--no-live", "pipeline", "--generate", "--force"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    (work / "pipeline.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: pipeline failed (exit {proc.returncode}); see "
                         f"{work / 'pipeline.log'}\n{proc.stderr[-2000:]}")
    evaluation = json.loads((work / "reports" / "evaluation.json").read_text())
    evaluation["wall_s"] = wall
    return evaluation


def folder_name(name: str, tag: str | None) -> str:
    return name if not tag else f"{name}+{tag}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def table_rows(name: str, evaluation: dict[str, Any]) -> str:
    """One markdown table row of a scenario."""
    policies = evaluation["policies"]

    def true(policy: str, key: str) -> float | None:
        return (policies[policy].get("true") or {}).get(key)

    shares = [_pct(true(p, "share_of_oracle_pct")) for p in POLICIES]
    uplift = [f"{_pct(true(p, 'uplift_pct'))} / {_pct(policies[p]['fitted']['uplift_pct'])}"
              for p in ("greedy", "agent")]
    vs_truth = (evaluation.get("demand_model") or {}).get("elasticity_vs_truth")
    elasticity = ("n/a" if not vs_truth else
                  f"{vs_truth['mean_fitted']:.2f} / {vs_truth['mean_true']:.2f}")
    return " | ".join([name, *shares, *uplift, elasticity, f"{evaluation['wall_s']:.0f}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=150)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--timesteps", type=int, default=None,
                        help="RL steps (default: the preset's)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    parser.add_argument("--overlay", action="append", default=[],
                        help="a config file on top of each scenario's (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="one setting on top (repeatable), e.g. train.trust_region=0.2")
    parser.add_argument("--tag", default=None,
                        help="output folder <scenario>+<tag> (default: <scenario>)")
    args = parser.parse_args(argv)
    names = args.only or scenario_names()
    header = ("scenario | " + " | ".join(f"{p} % of optimum" for p in POLICIES)
              + " | greedy uplift % true / fitted | agent uplift % true / fitted"
              + " | elasticity fitted / true | wall s")
    lines = [f"Scenarios: {args.products} products x {args.days} days, test = the last "
             f"{QUARTER_DAYS} days, preset {args.preset}, timesteps "
             f"{args.timesteps or 'preset'} (python -m bench.bench_scenarios "
             f"{' '.join(argv if argv is not None else sys.argv[1:])})", "",
             "| " + header + " |", "|" + "---|" * (header.count("|") + 1)]
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        lines.append("| " + table_rows(folder_name(name, args.tag), run_scenario(name, args))
                     + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    for name in names:
        evaluation_path = OUT / folder_name(name, args.tag) / "reports" / "evaluation.json"
        inventory = json.loads(evaluation_path.read_text()).get("inventory")
        if inventory and inventory.get("share_of_dp_pct"):
            share = inventory["share_of_dp_pct"]
            ladder = inventory["ladder"]
            cover = ("never (static)" if ladder["cover_days"] is None
                     else f"at cover > {ladder['cover_days']:g} days")
            lines += ["", f"{name}: true profit as % of the (day, stock) DP optimum "
                      f"({inventory['dp_value_true']:,.0f}); ladder cut {ladder['cut']:g} "
                      f"{cover} (fitted on val)", "",
                      "| " + " | ".join(DP_POLICIES) + " |", "|" + "---|" * len(DP_POLICIES),
                      "| " + " | ".join(_pct(share.get(p)) for p in DP_POLICIES) + " |"]
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("scenarios.md" if not args.tag else f"scenarios+{args.tag}.md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
