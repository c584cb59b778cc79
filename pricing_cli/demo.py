"""`make demo`: the whole pipeline on the built-in synthetic market, then the report.

Runs `pricectl --preset small pipeline` through the same entry point a user types, then
prints reports/report.md. A second `make demo` skips every stage that is up to date.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pricing_cli import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pricing_cli.demo", description=__doc__)
    parser.add_argument("--preset", default="small", help="tiny, small or full")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    started = time.monotonic()
    command = ["--preset", args.preset, "pipeline", "--generate",
               *(["--force"] if args.force else [])]
    print(f"$ pricectl {' '.join(command)}", flush=True)
    code = cli.main(command)
    if code != 0:
        print(f"demo stopped: the pipeline exited with code {code}", file=sys.stderr)
        return code
    report = Path("reports") / "report.md"
    if report.is_file():
        print("\n" + report.read_text(encoding="utf-8"))
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
