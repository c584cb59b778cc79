"""Byte-identity check: `pricectl pipeline` gives the same outputs from two source trees.

Runs ``pricectl --preset PRESET -q pipeline`` in two fresh folders, one with the code of
``--base`` (a git revision, exported with ``git archive``, or a source folder) and one with
``--head`` (default: this working tree), then compares every file the runs wrote, byte for
byte, except what records the run rather than its result. Two runs of the *same* code differ
in exactly these (``--base REV --head REV`` shows it), so they are masked:

* JSON files (run.json, manifest.json, train_summary.json, demand_model.json, ...) are
  compared after removing the keys in ``CLOCK_KEYS`` and ending in ``_seconds`` at any depth:
  times, speeds, memory samples, the interpreter's path (``command_line``), file mtimes
  (``mtime_ns``) and what is derived from them (run.json's ``inputs`` fingerprints and
  ``stage_key``, preprocessing_stats' ``inputs_sha256``; run.json's ``outputs`` sizes, since
  each of those files is compared itself);
* ``model.zip`` / ``last_checkpoint.zip`` (Stable-Baselines3) member by member, exactly
  (weights, optimizer state), except SB3's ``data`` member: compared as JSON without
  ``start_time`` and ``ep_info_buffer`` (episode wall times; it is pickled, and this script
  unpickles nothing), with object reprs' memory addresses masked;
* not compared: TensorBoard event files (named and stamped by the clock), the lock files
  beside folders (they hold the pid), ``runs/`` memory logs. runs/*/run.json are compared like
  the other run.json files, matched by stage.

Both runs get ``PRICECTL_TRAIN__RUN_ID=identity`` (train names its folder by the clock
otherwise) and the same environment.

Usage::

    .venv/bin/python -m bench.check_identical --base fb651b8 [--head DIR] [--preset small]
        [--workdir DIR] [--parallel]

Exit code 0 when everything is identical, 1 otherwise (the differing files are listed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What the outputs record about the run itself (clock, speed, memory, mtimes), not its result.
CLOCK_KEYS = frozenset({"started", "ended", "elapsed_s", "memory", "command_line", "stage_key",
                        "inputs", "outputs", "mtime_ns", "inputs_sha256", "seconds", "fps",
                        "fps_without_eval", "files_per_s", "samples_per_s"})
ADDRESS = re.compile(rb" at 0x[0-9a-f]+")
SB3_CLOCK_KEYS = ("start_time", "ep_info_buffer")


def export_tree(rev_or_dir: str, into: Path) -> Path:
    """A folder holding the source at ``rev_or_dir``: the folder itself, or ``git archive``
    of the revision extracted under ``into``."""
    if Path(rev_or_dir).is_dir():
        return Path(rev_or_dir).resolve()
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "source.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev_or_dir],
                       stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    archive.unlink()
    return (into / "src").resolve()


def run_pipeline(source: Path, workdir: Path, preset: str) -> subprocess.Popen[bytes]:
    """Start ``pricectl --preset PRESET -q pipeline`` with the code of ``source``."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(source), "PRICECTL_TRAIN__RUN_ID": "identity"}
    env.pop("PRICECTL_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "pricing_cli", "--preset", preset, "-q",
                             "pipeline"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def without_clock(value: Any) -> Any:
    """``value`` with every key of CLOCK_KEYS or ending in _seconds removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items()
                if k not in CLOCK_KEYS and not str(k).endswith("_seconds")}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value


def _sb3_data(raw: bytes) -> Any:
    """SB3's ``data`` member without its clock: ``start_time`` and ``ep_info_buffer`` (each
    episode's wall time ``t``, pickled, so left out whole rather than unpickled), object
    reprs without their memory address."""
    data = json.loads(ADDRESS.sub(b" at 0x", raw))
    return {k: v for k, v in data.items() if k not in SB3_CLOCK_KEYS}


def same_zip(a: Path, b: Path) -> bool:
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        if za.namelist() != zb.namelist():
            return False
        for name in za.namelist():
            x, y = za.read(name), zb.read(name)
            if name == "data":
                x, y = _sb3_data(x), _sb3_data(y)
            if x != y:
                return False
    return True


def same_file(a: Path, b: Path) -> bool:
    if a.suffix == ".json":
        return bool(without_clock(json.loads(a.read_text()))
                    == without_clock(json.loads(b.read_text())))
    if a.suffix == ".zip" and a.parent.parent.name == "models":
        return same_zip(a, b)
    return a.read_bytes() == b.read_bytes()


def outputs(root: Path) -> dict[str, Path]:
    """Every file under ``root`` but runs/, TensorBoard events and lock files."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "runs"
            and "tensorboard" not in p.relative_to(root).parts
            and not p.name.endswith(".pricectl-lock")}


def run_records(root: Path) -> dict[str, Path]:
    """runs/*/run.json by stage (one run per stage in a fresh pipeline)."""
    found: dict[str, Path] = {}
    for path in sorted((root / "runs").glob("*/run.json")):
        found[json.loads(path.read_text())["stage"]] = path
    return found


def compare(base: Path, head: Path) -> list[str]:
    """The differences between two pipeline folders (empty: identical)."""
    problems: list[str] = []
    a, b = outputs(base), outputs(head)
    for name in sorted(set(a) ^ set(b)):
        problems.append(f"only in {'base' if name in a else 'head'}: {name}")
    for name in sorted(set(a) & set(b)):
        if not same_file(a[name], b[name]):
            problems.append(f"differs: {name}")
    ra, rb = run_records(base), run_records(head)
    if sorted(ra) != sorted(rb):
        problems.append(f"runs/ stages differ: {sorted(ra)} vs {sorted(rb)}")
    for stage in sorted(set(ra) & set(rb)):
        if not same_file(ra[stage], rb[stage]):
            problems.append(f"differs: runs/*-{stage}-*/run.json")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision or source folder")
    parser.add_argument("--head", default=str(REPO), help="git revision or source folder "
                        "(default: this working tree)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to run (default: a temporary folder, removed after)")
    parser.add_argument("--parallel", action="store_true", help="run both pipelines at once")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pricectl-identical-"))
    try:
        sources = {side: export_tree(getattr(args, side), workdir / f"{side}-code")
                   for side in ("base", "head")}
        folders = {side: workdir / f"{side}-run" for side in sources}
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        started = time.monotonic()
        order = [("base", "head")] if args.parallel else [("base",), ("head",)]
        for group in order:
            procs = {side: run_pipeline(sources[side], folders[side], args.preset)
                     for side in group}
            for side, proc in procs.items():
                _, err = proc.communicate()
                if proc.returncode != 0:
                    print(f"{side} pipeline exited {proc.returncode}: {err.decode()[-2000:]}")
                    return 2
        n_files = len(outputs(folders["head"]))
        problems = compare(folders["base"], folders["head"])
        print(f"base {args.base} vs head {args.head}, preset {args.preset}: {n_files} files "
              f"compared in {time.monotonic() - started:.0f} s of pipeline runs")
        for line in problems:
            print(line)
        print("IDENTICAL" if not problems else f"{len(problems)} difference(s)")
        return 0 if not problems else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
