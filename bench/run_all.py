"""`make bench`: the scale runs, written to docs/benchmarks.md.

Every figure is measured here by running the command printed beside it (under
/usr/bin/time -v, plus pricectl's own run.json for the process-tree peak). Results are cached
per section in bench/out/results.json, so one section can be re-run alone:

    .venv/bin/python -m bench.run_all [--only features,preprocess,...] [--render-only]

Sections: generate, features, features_scaling, pandas, preprocess, merge_scaling, env,
train, quality, budget, faults, fuzz. The whole run takes roughly 30 minutes on 2 cores
and needs about 15 GB of disk under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import OUT, PRICECTL, PYTHON, ROOT, Measurement, gib, measure, mib, quote

RESULTS = OUT / "results.json"
FULL = OUT / "full"
BASE = [PRICECTL, "--preset", "full", "--json", "--no-live"]


def row(figure: str, value: str, command: str, target: str = "") -> dict[str, str]:
    return {"figure": figure, "value": value, "command": command, "target": target}


def measured(m: Measurement, what: str, target: str = "") -> list[dict[str, str]]:
    rows = [row(f"{what}: wall time", f"{m.wall_s:.1f} s", m.command),
            row(f"{what}: max RSS of the largest process", mib(m.max_rss_bytes), m.command)]
    if m.peak_tree_bytes is not None:
        rows.append(row(f"{what}: peak memory of the process tree (PSS)",
                        mib(m.peak_tree_bytes), m.command, target))
    return rows


def _true(policy: dict[str, Any], key: str) -> float:
    return float((policy.get("true") or {}).get(key, float("nan")))


# The columns a policy row can show: (name in the figure, value from the policy's entry).
POLICY_COLUMNS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "share": ("share of oracle profit (true demand)",
              lambda p: f"{_true(p, 'share_of_oracle_pct'):.2f}%"),
    "share_net": ("share of oracle profit net of change costs (true demand)",
                  lambda p: f"{_true(p, 'share_of_oracle_pct'):.2f}%"),
    "uplift": ("uplift vs historical (true)", lambda p: f"{_true(p, 'uplift_pct'):+.1f}%"),
    "fitted_uplift": ("uplift (fitted model)", lambda p: f"{p['fitted']['uplift_pct']:+.1f}%"),
    "changes": ("price changes per product-month",
                lambda p: f"{p['price_changes_per_product_month']:.2f}"),
}


def policy_rows(report: dict[str, Any], what: str, columns: Sequence[str], command: str,
                targets: dict[str, str] | None = None) -> list[dict[str, str]]:
    """One row per policy of an evaluation.json: ``<what>, <policy>: <column / column ...>``."""
    names = " / ".join(POLICY_COLUMNS[c][0] for c in columns)
    return [row(f"{what}, {name}: {names}",
                " / ".join(POLICY_COLUMNS[c][1](report["policies"][name]) for c in columns),
                command, (targets or {}).get(name, ""))
            for name in report["policy_order"]]


# ---------------------------------------------------------------------------------------------


def bench_generate() -> list[dict[str, str]]:
    m = measure(quote(*BASE, "generate"), FULL, run_json=Path("data/raw/run.json"))
    s = m.run_json["summary"]
    return measured(m, "generate (full preset)") + [
        row("generate: transaction rows", f"{s['transactions']:,}", m.command, ">= 40 M"),
        row("generate: products / files", f"{s['products']:,} / {s['files']}", m.command),
    ]


def bench_features() -> list[dict[str, str]]:
    m = measure(quote(*BASE, "features"), FULL, run_json=Path("data/features/run.json"))
    s = m.run_json["summary"]
    days = s["product_days"]
    return measured(m, "features (full preset)", "<= 1.5 GB") + [
        row("features: transaction rows read", f"{s['transaction_rows']:,}", m.command),
        row("features: product-days after warm-up (train/val/test)",
            f"{sum(days.values()):,} ({days['train']:,}/{days['val']:,}/{days['test']:,})",
            m.command, ">= 500,000"),
    ]


def bench_pandas() -> list[dict[str, str]]:
    raw = FULL / "data" / "raw"
    m = measure(quote(PYTHON, "-m", "bench.pandas_features", str(raw)), ROOT)
    return measured(m, "pandas eager features (same input, no file writing)")


def bench_features_scaling() -> list[dict[str, str]]:
    """features on 1/4, 1/2 and all of the full preset's rows, with the same output.

    The market keeps its 7,300 products and 105 days (so the daily panel and the files
    written are the same size); only the transactions per product-day change. Peak memory
    that stays nearly flat here is what streaming the raw rows buys.
    """
    out: list[dict[str, str]] = []
    for per_day in (13.75, 27.5, 55.0):
        work = OUT / f"features_{per_day:g}"
        shutil.rmtree(work, ignore_errors=True)
        env = f"PRICECTL_GENERATE__MEAN_TRANSACTIONS_PER_DAY={per_day:g}"
        gen = f"{env} {quote(*BASE, 'generate')}"
        measure(gen, work)
        m = measure(quote(*BASE, "features"), work, run_json=Path("data/features/run.json"))
        rows = m.run_json["summary"]["transaction_rows"]
        out.append(row(f"features on {rows / 1e6:.1f} M rows (7,300 products x 105 days): "
                       "wall / peak tree / max RSS",
                       f"{m.wall_s:.1f} s / {mib(m.peak_tree_bytes)} / {mib(m.max_rss_bytes)}",
                       f"cd {work} && {gen} && {m.command}", "grows far slower than input"))
        shutil.rmtree(work, ignore_errors=True)
    return out


def bench_preprocess() -> list[dict[str, str]]:
    pre = measure(quote(*BASE, "preprocess", "--no-resume"), FULL,
                  run_json=Path("data/intermediate/run.json"))
    s = pre.run_json["summary"]
    val = measure(quote(*BASE, "validate-batches"), FULL)
    seq = measure(quote(*BASE, "merge", "--keep-batches"), FULL,
                  run_json=Path("data/processed/run.json"))
    acc = measure(quote(*BASE, "merge", "--strategy", "accumulative", "--keep-batches",
                        "--output-dir", "data/processed_acc"), FULL,
                  run_json=Path("data/processed_acc/run.json"))
    same = subprocess.run(
        "for f in data/processed/X_*.npy data/processed/labels_* data/processed/masks_* "
        "data/processed/meta_*; do cmp -s $f data/processed_acc/$(basename $f) || echo $f; "
        "done", shell=True, cwd=FULL, capture_output=True, text=True).stdout.strip()
    cp = measure("rm -rf /tmp/pricectl_cp && cp -r data/intermediate /tmp/pricectl_cp && sync "
                 "&& rm -rf /tmp/pricectl_cp", FULL)
    x_bytes = sum(p.stat().st_size for p in (FULL / "data" / "processed").glob("X_*.npy"))
    rows = measured(pre, "preprocess (full preset)", "<= 1.5 GB") + [
        row("preprocess: files / samples / features per sample",
            f"{s['files']:,} / {s['samples']:,} / {s['n_features']}", pre.command),
        row("preprocess: files/s, samples/s",
            f"{s['files_per_s']:.0f} files/s, {s['samples_per_s']:,.0f} samples/s", pre.command),
    ]
    rows += measured(val, "validate-batches (full preset)")
    rows += measured(seq, "merge sequential (full preset)", "<= 512 MB")
    rows += [row("merge: final float32 X size", gib(x_bytes), seq.command),
             row("plain cp of the batch files (reference for merge time)",
                 f"{cp.wall_s:.1f} s", cp.command),
             row("merge sequential wall time / cp wall time", f"{seq.wall_s / cp.wall_s:.2f}x",
                 seq.command, "<= 3x")]
    rows += measured(acc, "merge accumulative (full preset)")
    rows.append(row("sequential and accumulative outputs byte-identical",
                    "yes" if not same else f"NO: {same}", "cmp data/processed/* "
                    "data/processed_acc/*"))
    shutil.rmtree(FULL / "data" / "processed_acc", ignore_errors=True)
    return rows


def bench_merge_scaling() -> list[dict[str, str]]:
    rows = []
    for label, products in (("1/2x", 3650), ("1x", 7300), ("2x", 14600)):
        work = OUT / f"merge_{products}"
        cmd = quote(PYTHON, "-m", "bench.bench_preprocess_merge", "--products", str(products),
                    "--workdir", str(work))
        subprocess.run(cmd, shell=True, cwd=ROOT, check=True, capture_output=True)
        result = json.loads((work / "results.json").read_text())
        rows.append(row(f"merge sequential at {label} ({products:,} files): peak tree / wall",
                        f"{result['merge peak tree (run.json)']} / "
                        f"{result['merge (sequential) wall']}",
                        cmd, "flat, <= 512 MB"))
        rows.append(row(f"preprocess at {label} ({products:,} files): peak tree / wall",
                        f"{result['preprocess peak tree (run.json)']} / "
                        f"{result['preprocess wall']}", cmd, "<= 1.5 GB"))
        rows.append(row(f"at {label}: X_*.npy on disk / samples",
                        f"{result['X_*.npy on disk']} / {result['merge samples']}", cmd))
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_env() -> list[dict[str, str]]:
    rows = []
    # The small preset's data comes from the quality section, which runs before this one.
    for preset, folder in (("small", OUT / "small"), ("full", FULL)):
        processed = folder / "data" / "processed"
        for envs in (16, 256, 1024):
            cmd = quote(PYTHON, "-m", "bench.bench_env", str(processed), "--envs", str(envs),
                        "--steps", str(max(200_000 // envs, 200)))
            out = subprocess.run(cmd, shell=True, cwd=ROOT, check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            rows.append(row(f"env alone, {envs} envs ({preset} preset, {result['features']} "
                            "features)", f"{result['steps_per_s']:,} steps/s", cmd,
                            ">= 200,000" if envs >= 256 else ""))
    return rows


def bench_train_full() -> list[dict[str, str]]:
    m = measure(quote(*BASE, "train", "--multi-product", "--timesteps", "100000", "--run-id",
                      "bench-full"), FULL, run_json=Path("models/bench-full/run.json"))
    s = m.run_json["summary"]
    rows = measured(m, "train (full preset, 100k steps)", "<= 2 GB")
    rows.append(row("train on full preset: RL env steps/s on 2 cores, including the val "
                    "evaluations for model selection", f"{s['fps']:,.0f}", m.command, ">= 4,000"))
    rows.append(row("train on full preset: RL env steps/s, rollouts and PPO updates only "
                    f"({s['rl_eval_seconds']:.1f} s of val evaluations left out)",
                    f"{s['fps_without_eval']:,.0f}", m.command, ">= 4,000"))
    # The same model, evaluated on the full test split (116,800 product-days).
    e = measure(quote(*BASE, "evaluate", "--model", "models/bench-full", "--reports-dir",
                      "reports-bench-full"), FULL, run_json=Path("reports-bench-full/run.json"))
    both = f"{m.command} && {e.command}"  # evaluate needs the model the train run made
    rows += [{**r, "command": both} for r in measured(e, "evaluate (full preset, test split)")]
    report = json.loads((FULL / "reports-bench-full" / "evaluation.json").read_text())
    rows += policy_rows(report, "full preset, test split (agent: 100k RL steps)",
                        ("share", "uplift"), both)
    shutil.rmtree(FULL / "models" / "bench-full", ignore_errors=True)
    shutil.rmtree(FULL / "reports-bench-full", ignore_errors=True)
    return rows


def bench_quality() -> list[dict[str, str]]:
    work = OUT / "small"
    shutil.rmtree(work, ignore_errors=True)
    m = measure(quote(PRICECTL, "--preset", "small", "--no-live", "pipeline"), work)
    report = json.loads((work / "reports" / "evaluation.json").read_text())
    train_run = sorted((work / "models").glob("*/run.json"))[-1]
    train_record = json.loads(train_run.read_text())
    cmd = f"cd {work} && {m.command}"
    rows = [row("small preset: whole pipeline generate → evaluate, wall", f"{m.wall_s:.0f} s",
                cmd, "< 10 min"),
            row("small preset: train wall time (demand fit + RL + val evaluations) on 2 cores",
                f"{train_record['elapsed_s']:.0f} s "
                f"({train_record['summary']['timesteps']:,} RL steps at "
                f"{train_record['summary']['fps']:,.0f} steps/s)", cmd)]
    return rows + policy_rows(
        report, "small preset, test split", ("share", "uplift", "fitted_uplift"), cmd,
        {"agent": ">= 97% of oracle, >= greedy, >= +10% vs historical"})


def bench_change_cost() -> list[dict[str, str]]:
    """The small market where every price change costs a quarter of a day's best profit."""
    work = OUT / "small-change-cost"
    shutil.rmtree(work, ignore_errors=True)
    m = measure(quote(PRICECTL, "--preset", "small", "--config",
                      str(ROOT / "configs" / "change-cost.yaml"), "--no-live", "pipeline"), work)
    report = json.loads((work / "reports" / "evaluation.json").read_text())
    train_run = sorted((work / "models").glob("*/run.json"))[-1]
    summary = json.loads(train_run.read_text())["summary"]
    cmd = f"cd {work} && {m.command}"
    rows = [row("small preset + configs/change-cost.yaml: whole pipeline, wall",
                f"{m.wall_s:.0f} s", cmd),
            row("small + change cost: best model chosen on val at RL step",
                f"{summary['best_timesteps']:,} of {summary['timesteps']:,} "
                f"({summary['fps']:,.0f} steps/s)", cmd)]
    rows += policy_rows(report, "small + change cost, test split",
                        ("share_net", "uplift", "changes"), cmd, {"agent": "> greedy"})
    return rows + _change_cost_full()


def _change_cost_full() -> list[dict[str, str]]:
    """The same config on the full preset: 100k RL steps, then evaluate on test."""
    config = str(ROOT / "configs" / "change-cost.yaml")
    t = measure(quote(*BASE, "--config", config, "train", "--multi-product", "--timesteps",
                      "100000", "--run-id", "bench-cc"), FULL,
                run_json=Path("models/bench-cc/run.json"))
    e = measure(quote(*BASE, "evaluate", "--model", "models/bench-cc", "--reports-dir",
                      "reports-bench-cc"), FULL, run_json=Path("reports-bench-cc/run.json"))
    both = f"cd {FULL} && {t.command} && {e.command}"
    rows = [{**r, "command": f"cd {FULL} && {t.command}"}
            for r in measured(t, "full preset + change cost: train 100k steps (planner cloning)",
                              "<= 2 GB")]
    report = json.loads((FULL / "reports-bench-cc" / "evaluation.json").read_text())
    rows += policy_rows(report, "full preset + change cost, test split",
                        ("share_net", "changes"), both, {"agent": "> greedy"})
    shutil.rmtree(FULL / "models" / "bench-cc", ignore_errors=True)
    shutil.rmtree(FULL / "reports-bench-cc", ignore_errors=True)
    return rows


def bench_faults() -> list[dict[str, str]]:
    from bench.kill_test import run_kill_test

    work = OUT / "kill"
    shutil.rmtree(work, ignore_errors=True)
    cmd = ".venv/bin/python -m bench.kill_test --kills 20 --stage both"
    report = run_kill_test(work, 20, "both", 0)
    rows = []
    for stage in ("preprocess", "merge"):
        r = report[stage]
        rows.append(row(f"kill test, {stage}: SIGKILLs / landed mid-run / re-runs byte-identical "
                        "/ half-written files seen / temp files left after re-run",
                        f"{r['kills_attempted']} / {r['kills_landed_mid_run']} / "
                        f"{r['reruns_byte_identical']} / {r['half_written_files_seen']} / "
                        f"{r['tmp_files_left_after_rerun']}", cmd,
                        "byte-identical, 0 half-written"))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_fuzz() -> list[dict[str, str]]:
    from bench.fuzz_batches import run

    result = run(1000, 0)
    return [row("validate-batches on randomly mutated batch files (bit flips, truncations, "
                "overwrites, appended junk): mutated / caught / missed",
                f"{result['mutations']} / {result['caught']} / {result['missed']}",
                ".venv/bin/python -m bench.fuzz_batches --mutations 1000", "0 missed")]


def bench_budget() -> list[dict[str, str]]:
    """--max-memory on the full preset: stop cleanly under a tight budget, then resume."""
    shutil.rmtree(FULL / "data" / "intermediate", ignore_errors=True)
    budget = 300 * 1024**2
    tight = measure(quote(*BASE, "--max-memory", "300MiB", "preprocess"), FULL, check=False)
    samples = sorted((FULL / "runs").glob("*-preprocess-*/memory.jsonl"),
                     key=lambda p: p.stat().st_mtime)[-1]
    peak = max(json.loads(line)["tree"] for line in samples.read_text().splitlines())
    manifest = FULL / "data" / "intermediate" / "manifest.json"
    kept = len(json.loads(manifest.read_text())["batches"]) if manifest.is_file() else 0
    resume = measure(quote(*BASE, "preprocess"), FULL,
                     run_json=Path("data/intermediate/run.json"))
    s = resume.run_json["summary"]
    return [
        row("preprocess --max-memory 300MiB (full preset, natural peak ~360 MiB): exit code / "
            "highest process-tree sample / complete batches kept",
            f"{tight.exit_code} / {mib(peak)} (budget {mib(budget)}) / {kept}",
            tight.command, "exit 7 before passing the budget"),
        row("then preprocess without a budget: batches reused / built / exit code",
            f"{s['batches_reused']} / {s['batches_built']} / {resume.exit_code}",
            resume.command, "resume completes"),
    ]


SECTIONS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "generate": bench_generate,
    "features": bench_features,
    "features_scaling": bench_features_scaling,
    "pandas": bench_pandas,
    "preprocess": bench_preprocess,
    "merge_scaling": bench_merge_scaling,
    "train": bench_train_full,
    "quality": bench_quality,
    "change_cost": bench_change_cost,
    "env": bench_env,
    "budget": bench_budget,
    "faults": bench_faults,
    "fuzz": bench_fuzz,
}


# Sections whose commands run in the full preset's folder (measure(..., FULL)).
RUN_IN_FULL = {"generate", "features", "preprocess", "train", "budget"}


def shown_command(section: str, command: str) -> str:
    """The command as a user re-types it from the repository root, on any clone."""
    if section in RUN_IN_FULL and not command.startswith("cd "):
        command = f"cd {FULL} && {command}"
    if command.startswith(f"cd {ROOT}/"):
        # Inside bench/out/<name>/, the repository root is three levels up.
        head, _, tail = command.partition(" && ")
        return head.replace(f"{ROOT}/", "") + " && " + tail.replace(f"{ROOT}/", "../../../")
    return command.replace(f"{ROOT}/", "")


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Measured on this project's machine (2 cores, 24 GiB RAM, no GPU) by `make bench`",
        "(`.venv/bin/python -m bench.run_all`). Each figure comes with the command that",
        "reproduces it, typed from the repository root (`cd bench/out/...` first where",
        "shown; the folders are made by the earlier sections). Wall times are single runs.",
        "'Peak memory of the process tree' is pricectl's own sampler (run.json): the parent's",
        "and every worker's PSS, so shared pages count once. 'Max RSS' is /usr/bin/time -v's",
        "figure for the largest single process.",
    ]
    for section in SECTIONS:
        if section not in results:
            continue
        entry = results[section]
        lines += ["", f"## {section}", "", f"Measured {entry['when']}.", "",
                  "| figure | value | target | command |", "|---|---|---|---|"]
        for r in entry["rows"]:
            command = shown_command(section, r["command"])
            lines.append(f"| {r['figure']} | {r['value']} | {r['target']} | `{command}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated sections")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    wanted = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not args.render_only:
        from datetime import datetime

        for section in wanted:
            print(f"== {section}", flush=True)
            rows = SECTIONS[section]()
            results[section] = {"when": datetime.now().strftime("%Y-%m-%d %H:%M"), "rows": rows}
            RESULTS.write_text(json.dumps(results, indent=2))
            for r in rows:
                print(f"   {r['figure']}: {r['value']}", flush=True)
    (ROOT / "docs" / "benchmarks.md").write_text(render(results), encoding="utf-8")
    print(f"wrote docs/benchmarks.md ({len(results)} sections)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
