"""Scale run of `preprocess` + `merge` on a synthetic full-size input (not part of the tests).

Writes ``--products`` feature files of ``--days`` days with ``--features`` f_* columns (the
"features → preprocess" contract, via the test fixture generator), then runs
``pricectl --preset full preprocess`` and ``merge`` under /usr/bin/time -v and reports wall
time, the largest process's max RSS, the process tree's peak (run.json: sampled and the
kernel's VmHWM bound), files/s, samples/s and the state width F.

With ``--scale`` (repeatable, ``PRODUCTSxDAYS`` factors of 7,300 products x 77 days) it runs
each scale in its own folder, prints ``df -h`` before it, runs merge and a plain
``cp -r data/intermediate`` + ``sync`` alternately for ``--rounds`` rounds (the ratio of
their median wall times is the "merge vs cp" figure), and deletes the scale's data afterwards
unless ``--keep``. Commands run under ``nice -n 10`` (the machine is shared).

Usage (from the repository root)::

    .venv/bin/python -m bench.bench_preprocess_merge [--products 7300] [--days 77]
        [--features 20] [--workers 0] [--strategy sequential] [--workdir DIR]
    .venv/bin/python -m bench.bench_preprocess_merge --scale 0.5x1 --scale 1x1 --scale 2x1 \\
        --scale 4x1 --scale 1x2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.harness import OUT, PRICECTL, gib, measure, mib, quote

PRODUCTS, DAYS = 7300, 77


def write_inputs(work: Path, products: int, days: int, n_features: int, regenerate: bool) -> None:
    from tests.support.feature_files import write_feature_files

    features = work / "data" / "features"
    marker = work / "inputs.json"
    wanted = {"products": products, "days": days, "features": n_features}
    if regenerate or not marker.is_file() or json.loads(marker.read_text()) != wanted:
        for old in features.glob("*.parquet"):
            old.unlink()
        started = time.monotonic()
        write_feature_files(features, n_products=products, n_days=days,
                            n_features=n_features, seed=1)
        marker.write_text(json.dumps(wanted))
        print(f"wrote {products} feature files in {time.monotonic() - started:.1f} s",
              flush=True)


def one_scale(work: Path, args: argparse.Namespace, products: int, days: int,
              nice: str) -> dict[str, object]:
    write_inputs(work, products, days, args.features, args.regenerate)
    base = [*nice.split(), PRICECTL, "--preset", "full", "--json", "--no-live"]
    pre = measure(quote(*base, "preprocess", "--no-resume", "--workers", str(args.workers)),
                  work, run_json=Path("data/intermediate/run.json"))
    pre_summary = pre.run_json["summary"]
    merges, copies = [], []
    merge = None
    for round_ in range(args.rounds):
        out = f"data/processed_r{round_}"
        merge = measure(quote(*base, "merge", "--strategy", args.strategy, "--keep-batches",
                              "--output-dir", out), work, run_json=Path(out) / "run.json")
        merges.append(merge)
        if round_ + 1 < args.rounds:
            shutil.rmtree(work / out)
        copy = measure(f"{nice} cp -r data/intermediate data/cp_copy && sync", work)
        copies.append(copy.wall_s)
        shutil.rmtree(work / "data" / "cp_copy")
        print(f"  round {round_ + 1}: merge {merge.wall_s:.1f} s "
              f"(kernel {mib(merge.kernel_tree_bound_bytes)}), cp {copy.wall_s:.1f} s",
              flush=True)
    assert merge is not None
    processed = work / "data" / f"processed_r{args.rounds - 1}"
    x_bytes = sum(p.stat().st_size for p in processed.glob("X_*.npy"))
    batch_bytes = sum(p.stat().st_size for p in (work / "data" / "intermediate").glob("*.npz"))
    merge_walls = [m.wall_s for m in merges]
    return {
        "products": products, "days": days,
        "input files": f"{pre_summary['files']:,}",
        "samples": f"{pre_summary['samples']:,} {pre_summary['samples_per_split']}",
        "batches": pre_summary.get("batches"),
        "state width F": str(pre_summary["n_features"]),
        "price levels K": str(pre_summary["price_levels"]),
        "preprocess wall": f"{pre.wall_s:.1f} s ({pre_summary['workers']} workers)",
        "preprocess wall_s": round(pre.wall_s, 1),
        "preprocess files/s": f"{pre_summary['files_per_s']:,}",
        "preprocess max RSS (largest process)": mib(pre.max_rss_bytes),
        "preprocess peak tree (run.json)": mib(pre.peak_tree_bytes),
        "preprocess kernel peak bound (run.json)": mib(pre.kernel_tree_bound_bytes),
        "batches on disk": gib(batch_bytes),
        f"merge ({args.strategy}) walls": [round(w, 1) for w in merge_walls],
        "merge_wall_s": round(statistics.median(merge_walls), 1),
        "cp walls": [round(w, 1) for w in copies],
        "merge / cp (medians)": round(statistics.median(merge_walls)
                                      / statistics.median(copies), 2),
        "merge / cp per round": [round(m / c, 2) for m, c in zip(merge_walls, copies, strict=True)],
        "merge max RSS": [mib(m.max_rss_bytes) for m in merges],
        "merge peak tree (run.json)": [mib(m.peak_tree_bytes) for m in merges],
        "merge kernel peak bound (run.json)": [mib(m.kernel_tree_bound_bytes) for m in merges],
        "X_*.npy on disk": gib(x_bytes),
        "merge samples": f"{merge.run_json['summary']['samples']:,}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=PRODUCTS)
    parser.add_argument("--days", type=int, default=DAYS)
    parser.add_argument("--scale", action="append", default=[],
                        help="PRODUCTSxDAYS factors of 7,300 x 77, e.g. 0.5x1, 4x1, 1x2")
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--strategy", default="sequential")
    parser.add_argument("--rounds", type=int, default=1,
                        help="merge and cp runs, alternated (the ratio uses their medians)")
    parser.add_argument("--workdir", type=Path, default=OUT / "preprocess_merge")
    parser.add_argument("--keep", action="store_true", help="keep each scale's data")
    parser.add_argument("--no-nice", action="store_true")
    parser.add_argument("--regenerate", action="store_true",
                        help="rewrite the input files even if they exist")
    args = parser.parse_args()
    nice = "" if args.no_nice else "nice -n 10"

    if not args.scale:
        result = one_scale(args.workdir.resolve(), args, args.products, args.days, nice)
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
        (args.workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    results = []
    for scale in args.scale:
        product_factor, day_factor = (float(x) for x in scale.split("x"))
        products, days = round(PRODUCTS * product_factor), round(DAYS * day_factor)
        work = (args.workdir / scale).resolve()
        work.mkdir(parents=True, exist_ok=True)
        df = subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout
        print(f"{scale}: {products} products x {days} days; df -h before:\n{df}", flush=True)
        result = {"scale": scale, "df_before": df.strip().splitlines()[-1],
                  **one_scale(work, args, products, days, nice)}
        results.append(result)
        print(json.dumps(result), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
        (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
