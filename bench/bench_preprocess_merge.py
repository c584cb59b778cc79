"""Scale run of `preprocess` + `merge` on a synthetic full-size input (not part of the tests).

Writes ``--products`` feature files of ``--days`` days with ``--features`` f_* columns (the
"features → preprocess" contract, via the test fixture generator), then runs
``pricectl --preset full preprocess`` and ``merge`` under /usr/bin/time -v and reports wall
time, the largest process's max RSS, the process tree's peak (run.json), files/s, samples/s
and the state width F.

Usage (from the repository root)::

    .venv/bin/python -m bench.bench_preprocess_merge [--products 7300] [--days 77]
        [--features 20] [--workers 0] [--strategy sequential] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.harness import OUT, PRICECTL, gib, measure, mib, quote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=7300)
    parser.add_argument("--days", type=int, default=77)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--strategy", default="sequential")
    parser.add_argument("--workdir", type=Path, default=OUT / "preprocess_merge")
    parser.add_argument("--regenerate", action="store_true",
                        help="rewrite the input files even if they exist")
    args = parser.parse_args()

    from tests.support.feature_files import write_feature_files

    work = args.workdir.resolve()
    features = work / "data" / "features"
    marker = work / "inputs.json"
    wanted = {"products": args.products, "days": args.days, "features": args.features}
    if args.regenerate or not marker.is_file() or json.loads(marker.read_text()) != wanted:
        for old in features.glob("*.parquet"):
            old.unlink()
        started = time.monotonic()
        write_feature_files(features, n_products=args.products, n_days=args.days,
                            n_features=args.features, seed=1)
        marker.write_text(json.dumps(wanted))
        print(f"wrote {args.products} feature files in {time.monotonic() - started:.1f} s")

    base = [PRICECTL, "--preset", "full", "--json", "--no-live"]
    pre = measure(quote(*base, "preprocess", "--no-resume", "--workers", str(args.workers)),
                  work, run_json=Path("data/intermediate/run.json"))
    merge = measure(quote(*base, "merge", "--strategy", args.strategy, "--keep-batches"), work,
                    run_json=Path("data/processed/run.json"))
    pre_summary = pre.run_json["summary"]
    merge_summary = merge.run_json["summary"]
    processed = work / "data" / "processed"
    x_bytes = sum(p.stat().st_size for p in processed.glob("X_*.npy"))
    batch_bytes = sum(p.stat().st_size for p in (work / "data" / "intermediate").glob("*.npz"))
    rows = [
        ("input files", f"{pre_summary['files']:,}"),
        ("samples", f"{pre_summary['samples']:,} {pre_summary['samples_per_split']}"),
        ("state width F", str(pre_summary["n_features"])),
        ("price levels K", str(pre_summary["price_levels"])),
        ("preprocess wall", f"{pre.wall_s:.1f} s ({pre_summary['workers']} workers)"),
        ("preprocess files/s", f"{pre_summary['files_per_s']:,}"),
        ("preprocess samples/s", f"{pre_summary['samples_per_s']:,}"),
        ("preprocess max RSS (largest process)", mib(pre.max_rss_bytes)),
        ("preprocess peak tree (run.json)", mib(pre.peak_tree_bytes)),
        ("preprocess kernel peak bound (run.json)", mib(pre.kernel_tree_bound_bytes)),
        ("batches on disk", gib(batch_bytes)),
        (f"merge ({args.strategy}) wall", f"{merge.wall_s:.1f} s"),
        ("merge max RSS", mib(merge.max_rss_bytes)),
        ("merge peak tree (run.json)", mib(merge.peak_tree_bytes)),
        ("merge kernel peak bound (run.json)", mib(merge.kernel_tree_bound_bytes)),
        ("X_*.npy on disk", gib(x_bytes)),
        ("merge samples", f"{merge_summary['samples']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    (work / "results.json").write_text(json.dumps(dict(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
