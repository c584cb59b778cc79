"""`make demo`: the whole pipeline on the built-in synthetic market, then where the reports are.

Runs `pricectl --preset small pipeline` through the same entry point a user types. evaluate
prints the verdict and the policy table in its summary; when evaluate was up to date (a second
`make demo` skips every stage that is), the demo prints them from reports/evaluation.json
instead, so the table appears once either way. It ends by naming the reports folder and what
is in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pricing_cli import cli
from pricing_cli.config import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pricing_cli.demo", description=__doc__)
    parser.add_argument("--preset", default="small", help="tiny, small or full")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    started, started_wall = time.monotonic(), time.time()
    command = ["--preset", args.preset, "pipeline", "--generate",
               *(["--force"] if args.force else [])]
    print(f"$ pricectl {' '.join(command)}", flush=True)
    code = cli.main(command)
    if code != 0:
        print(f"demo stopped: the pipeline exited with code {code}", file=sys.stderr)
        return code
    reports = Path(load_settings(None, args.preset, {}).evaluate.reports_dir)
    evaluation = reports / "evaluation.json"
    # (file times lag time.time() by up to a clock tick: a second of slack)
    if evaluation.is_file() and evaluation.stat().st_mtime < started_wall - 1.0:
        # evaluate did not run now, so its summary (verdict and table) was not printed
        from pricing_cli.agent.report import policy_table, verdict_lines

        record = json.loads(evaluation.read_text(encoding="utf-8"))
        print("\n".join(["", *verdict_lines(record), "", policy_table(record)]))
    print(f"\nreports: {reports}/ (report.md, evaluation.json, prices_<policy>.csv, plots); "
          f"prices for the days after the data: pricectl --preset {args.preset} recommend")
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
