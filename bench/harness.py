"""Measuring one command: wall time and peak memory, from /usr/bin/time -v and run.json.

/usr/bin/time reports the largest single process's max RSS; pricectl's own run.json adds the
peak of the whole process tree (parent + workers, PSS), which is what the memory targets mean.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
# PRICECTL: another launcher, e.g. a script running a worktree's checkout with the main venv.
PRICECTL = os.environ.get("PRICECTL", str(ROOT / ".venv" / "bin" / "pricectl"))
PYTHON = str(ROOT / ".venv" / "bin" / "python")


@dataclass
class Measurement:
    command: str
    wall_s: float
    max_rss_bytes: int
    exit_code: int
    run_json: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_tree_bytes(self) -> int | None:
        mem = self.run_json.get("memory") or {}
        return mem.get("peak_tree_bytes")

    @property
    def kernel_tree_bound_bytes(self) -> int | None:
        """The kernel's figure (VmHWM of the parent + workers x the largest worker's peak):
        what docs quote, since no sampling interval can miss it."""
        mem = self.run_json.get("memory") or {}
        return mem.get("kernel_peak_tree_bound_bytes")


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1024**3:.2f} GiB"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1024**2:.0f} MiB"


def measure(command: str, cwd: Path, run_json: Path | None = None,
            env: dict[str, str] | None = None, check: bool = True) -> Measurement:
    """Run ``command`` (a shell string) under /usr/bin/time -v in ``cwd``."""
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", command], cwd=cwd,
                          capture_output=True, text=True, env=full_env)
    wall = time.monotonic() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(match.group(1)) * 1024 if match else 0
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {command}")
    record: dict[str, Any] = {}
    if run_json is not None and (cwd / run_json).is_file():
        record = json.loads((cwd / run_json).read_text())
    return Measurement(command, wall, rss, proc.returncode, record)


def quote(*parts: str) -> str:
    return " ".join(shlex.quote(p) for p in parts)
