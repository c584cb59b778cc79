"""Scale run of `features` on generated full-preset markets (not part of the tests).

For each scale it generates the full preset with ``--products`` x 7,300 products and ``--days``
x 105 days, runs ``features`` with each launcher given (before/after, alternated for
``--rounds`` rounds, under ``nice -n 10``), reports wall time and the kernel's peak (run.json
``kernel_peak_tree_bound_bytes``), compares every output file of the later launchers with the
first one's, and deletes the data before the next scale (4x is about 5 GB of CSV).

Usage (from the repository root; a launcher is a command such as ``.venv/bin/pricectl`` or
a script running another checkout)::

    .venv/bin/python -m bench.bench_features_scaling --scale 0.5x1 --scale 1x1 --scale 2x1 \\
        --scale 1x2 --launcher before=/tmp/pricectl_main --launcher after=.venv/bin/pricectl
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.harness import OUT, PRICECTL, measure, mib, quote

PRODUCTS, DAYS = 7300, 105


def compare(first: Path, other: Path) -> dict[str, object]:
    """Files that differ between two features outputs (run.json left out), and for product
    files the columns that differ."""
    import polars as pl

    names = sorted(p.name for p in first.iterdir() if p.name != "run.json")
    if names != sorted(p.name for p in other.iterdir() if p.name != "run.json"):
        return {"same_names": False}
    differing = [n for n in names if (first / n).read_bytes() != (other / n).read_bytes()]
    columns: dict[str, int] = {}
    for name in differing:
        if name.endswith(".parquet"):
            a, b = pl.read_parquet(first / name), pl.read_parquet(other / name)
            for column in a.columns:
                if not a[column].equals(b[column]):
                    columns[column] = columns.get(column, 0) + 1
    return {"same_names": True, "files": len(names), "differing": len(differing),
            "differing_json": [n for n in differing if n.endswith(".json")],
            "differing_columns": columns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="append", default=[],
                        help="PRODUCTSxDAYS factors, e.g. 0.5x1, 2x1, 1x2 (repeatable)")
    parser.add_argument("--launcher", action="append", default=[],
                        help="NAME=COMMAND (repeatable); the first is the reference output")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=OUT / "features_scaling")
    parser.add_argument("--keep", action="store_true", help="keep each scale's data")
    args = parser.parse_args()
    launchers = dict(item.split("=", 1) for item in args.launcher) or {"pricectl": PRICECTL}
    results = []
    for scale in args.scale or ["1x1"]:
        product_factor, day_factor = (float(x) for x in scale.split("x"))
        products, days = round(PRODUCTS * product_factor), round(DAYS * day_factor)
        work = (args.workdir / scale).resolve()
        shutil.rmtree(work, ignore_errors=True)
        env = {"PRICECTL_GENERATE__N_PRODUCTS": str(products),
               "PRICECTL_GENERATE__N_DAYS": str(days)}
        first = next(iter(launchers.values()))
        started = time.monotonic()
        measure("nice -n 10 " + quote(*first.split(), "--preset", "full", "--json", "--no-live",
                                      "generate"), work, env=env)
        raw_bytes = sum(p.stat().st_size for p in (work / "data" / "raw").rglob("*")
                        if p.is_file())
        print(f"{scale}: generated {products} products x {days} days "
              f"({raw_bytes / 2**30:.2f} GiB) in {time.monotonic() - started:.0f} s", flush=True)
        for round_ in range(args.rounds):
            for name, command in launchers.items():
                out = f"data/features_{name}"
                run = measure("nice -n 10 " + quote(*command.split(), "--preset", "full",
                                                    "--json", "--no-live", "features",
                                                    "--output-dir", out),
                              work, run_json=Path(out) / "run.json", env=env)
                summary = run.run_json.get("summary", {})
                row = {"scale": scale, "products": products, "days": days, "launcher": name,
                       "round": round_ + 1, "wall_s": round(run.wall_s, 1),
                       "kernel_peak": mib(run.kernel_tree_bound_bytes),
                       "sampled_peak": mib(run.peak_tree_bytes),
                       "max_rss": mib(run.max_rss_bytes),
                       "buckets": summary.get("buckets", "-"),
                       "product_days": summary.get("product_days")}
                results.append(row)
                print(json.dumps(row), flush=True)
        names = list(launchers)
        for name in names[1:]:
            verdict = compare(work / "data" / f"features_{names[0]}",
                              work / "data" / f"features_{name}")
            results.append({"scale": scale, "compare": f"{names[0]} vs {name}", **verdict})
            print(json.dumps(results[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(work / "data", ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
