"""Byte-identity check: `pricectl pipeline` gives the same outputs from two source trees.

Runs ``pricectl --preset PRESET -q pipeline`` in two fresh folders, one with the code of
``--base`` (a git revision, exported with ``git archive``, or a source folder) and one with
``--head`` (default: this working tree), then compares every file the runs wrote, byte for
byte. The only exceptions are the fields of run.json that record the run rather than the
result: ``started``, ``ended``, ``elapsed_s``, ``memory`` and ``command_line`` (it holds the
interpreter's path to the code). Those run.json files are compared with these fields removed,
everything else exactly. ``runs/`` (memory logs in folders named by the clock) is not
compared; its run.json copies are checked the same way, matched by stage.

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
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What a run.json records about the run itself, not about its result.
VOLATILE = ("started", "ended", "elapsed_s", "memory", "command_line")


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


def normalized_run_record(path: Path) -> Any:
    record = json.loads(path.read_text())
    return {k: v for k, v in record.items() if k not in VOLATILE}


def outputs(root: Path) -> dict[str, Path]:
    """Every file under ``root`` but runs/, by relative path."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "runs"}


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
        if Path(name).name == "run.json":
            if normalized_run_record(a[name]) != normalized_run_record(b[name]):
                problems.append(f"differs (beyond run.json's timing fields): {name}")
        elif a[name].read_bytes() != b[name].read_bytes():
            problems.append(f"differs: {name}")
    ra, rb = run_records(base), run_records(head)
    if sorted(ra) != sorted(rb):
        problems.append(f"runs/ stages differ: {sorted(ra)} vs {sorted(rb)}")
    for stage in sorted(set(ra) & set(rb)):
        if normalized_run_record(ra[stage]) != normalized_run_record(rb[stage]):
            problems.append(f"differs (beyond run.json's timing fields): runs/*-{stage}-*/run.json")
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
