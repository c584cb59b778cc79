"""Kill test: SIGKILL `pricectl preprocess` / `merge` at random moments, prove nothing breaks.

For each of ``--kills`` trials per stage: start the stage as a subprocess in its own process
group, SIGKILL the whole group (parent and workers) at a random moment of its working phase,
re-run it to completion, and check that

(a) the outputs are byte-identical to an uninterrupted run (preprocess: every batch and
    manifest.json; merge: every file of data/processed except run.json, which holds times);
(b) no half-written file was ever visible under a final name: a thread polls the output
    folders every 5 ms while a run (killed or re-run) is alive and verifies every file it sees
    under a final name (batch_NNNN.npz: a zip whose CRCs check, whose member SHA-256s equal
    the manifest's when listed; manifest.json and run.json: whole JSON; data/processed: all
    expected files present, each byte-identical to the reference);
(c) no temporary file is left once the re-run finished.

Usage::

    .venv/bin/python -m bench.kill_test --kills 20 [--stage preprocess|merge|both]
        [--workdir DIR] [--seed N] [--products 300] [--disk-full-demo]

``--disk-full-demo`` (root only) also runs preprocess and merge once on a real, too small
tmpfs mount and checks exit code 8, what is kept, and that a re-run with space gives the
reference bytes. Importable: :func:`run_kill_test`, :func:`run_disk_full_demo`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pricing_cli.stages.batches import member_sha256

BATCH_RE = re.compile(r"batch_\d{4}\.npz")
TMP_MARK = ".tmp-"
POLL_S = 0.005
COMMAND = [sys.executable, "-c", "import sys; from pricing_cli.cli import main; sys.exit(main())"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path, names: Callable[[str], bool]) -> dict[str, str]:
    """SHA-256 of every file of ``folder`` whose name passes ``names``."""
    if not folder.is_dir():
        return {}
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file() and names(p.name)}


def preprocess_outputs(name: str) -> bool:
    return bool(BATCH_RE.fullmatch(name)) or name == "manifest.json"


def merge_outputs(name: str) -> bool:
    return name != "run.json" and not name.startswith(".")


def leftovers(folder: Path) -> list[str]:
    """Temporary files or staging folders (storage's ``.tmp-`` mark) in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_MARK))


# ----------------------------------------------------------------------------------------------
# The watcher: polls the output folders while a run is alive


@dataclass
class Watcher:
    """Polls ``data/`` every 5 ms in a thread and records every incomplete file it sees.

    Args:
        workdir: the folder holding ``data/``.
        stage: ``preprocess`` (watches data/intermediate) or ``merge`` (data/processed).
        reference: the reference SHA-256 of the processed files (merge only).
    """

    workdir: Path
    stage: str
    reference: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    first_output_at: float | None = None
    polls: int = 0
    checked_files: int = 0
    _seen: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()  # the final state counts too

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(POLL_S)

    def poll(self) -> None:
        self.polls += 1
        try:
            if self.stage == "preprocess":
                self._poll_batches(self.workdir / "data" / "intermediate")
            else:
                self._poll_processed(self.workdir / "data")
        except Exception as exc:  # noqa: BLE001 - a watcher bug must show, not stop the test
            self.violations.append(f"watcher error: {type(exc).__name__}: {exc}")

    def _note_output(self, present: bool) -> None:
        if present and self.first_output_at is None:
            self.first_output_at = time.monotonic()

    def _json_whole(self, path: Path) -> Any:
        """Parsed JSON, None if the file vanished; a violation if it is not whole."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            self.violations.append(f"{path}: not whole JSON under its final name ({exc})")
            return None

    def _poll_batches(self, folder: Path) -> None:
        # read the manifest first: a batch is renamed into place before the manifest lists
        # it, so every batch listed here must be visible in the listing taken after
        manifest = self._json_whole(folder / "manifest.json") if folder.is_dir() else None
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        self._note_output(bool(names))
        digests: dict[str, dict[str, str]] = {}
        for name in names:
            if name == "run.json":
                self._json_whole(folder / name)
            if not BATCH_RE.fullmatch(name):
                continue
            path = folder / name
            try:
                stat = path.stat()
                key = (name, stat.st_ino, stat.st_size, stat.st_mtime_ns)
                if key not in self._seen:
                    with zipfile.ZipFile(path) as archive:
                        bad = archive.testzip()
                    if bad is not None:
                        self.violations.append(f"{path}: member {bad} fails its CRC")
                    self._seen[key] = member_sha256(path)
                    self.checked_files += 1
            except FileNotFoundError:
                continue
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                self.violations.append(f"{path}: visible under its final name but not a whole "
                                       f"zip ({exc})")
                continue
            digests[name] = self._seen[key]
        for entry in (manifest or {}).get("batches", []):
            name = entry["name"]
            if name not in digests:
                self.violations.append(f"{folder / name}: listed in manifest.json but not a "
                                       "complete file on disk")
                continue
            recorded = {m: v["sha256"] for m, v in entry["members"].items()}
            if recorded != digests[name]:
                self.violations.append(f"{folder / name}: members differ from manifest.json")

    def _poll_processed(self, data: Path) -> None:
        self._note_output(bool(leftovers(data)))
        try:
            fd = os.open(data / "processed", os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            folder_ino = os.fstat(fd).st_ino
            names = set(os.listdir(fd))
            missing = set(self.reference) - names
            if missing and self._swapped(data, fd, folder_ino):
                return  # staged_dir renamed this folder away while we listed it: not visible
            for name in sorted(missing):
                self.violations.append(f"{data / 'processed'}: visible without {name}")
            if "run.json" in names:
                self._json_whole(data / "processed" / "run.json")
            for name in sorted(set(self.reference) & names):
                try:
                    stat = os.stat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                key = (folder_ino, name, stat.st_ino, stat.st_size, stat.st_mtime_ns)
                if key in self._seen:
                    continue
                try:
                    file_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
                except FileNotFoundError:
                    continue
                with os.fdopen(file_fd, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                self.checked_files += 1
                self._seen[key] = digest
                if digest != self.reference[name] and not self._swapped(data, fd, folder_ino):
                    self.violations.append(f"{data / 'processed' / name}: visible under its "
                                           "final name with other bytes than a whole run's")
        finally:
            os.close(fd)

    @staticmethod
    def _swapped(data: Path, fd: int, folder_ino: int) -> bool:
        """The folder we hold open is no longer data/processed (renamed or being removed)."""
        try:
            return (os.fstat(fd).st_nlink == 0
                    or os.stat(data / "processed").st_ino != folder_ino)
        except FileNotFoundError:
            return True


# ----------------------------------------------------------------------------------------------
# Running pricectl


@dataclass
class Setup:
    workdir: Path
    products: int
    batch_size: int
    workers: int

    def args(self, stage: str) -> list[str]:
        common = ["--preset", "tiny", "-q"]
        if stage == "preprocess":
            return [*common, "preprocess", "--batch-size", str(self.batch_size),
                    "--workers", str(self.workers)]
        if stage == "merge":
            return [*common, "merge", "--keep-batches"]
        if stage == "generate":
            return [*common, "generate", "--products", str(self.products)]
        return [*common, stage]

    def popen(self, stage: str) -> subprocess.Popen[bytes]:
        # own session = own process group, so one killpg reaches the pool workers too
        return subprocess.Popen([*COMMAND, *self.args(stage)], cwd=self.workdir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)

    def run(self, stage: str) -> float:
        """Run ``stage`` to completion; returns its wall time. Raises on a non-zero exit."""
        started = time.monotonic()
        proc = self.popen(stage)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"pricectl {stage} exited {proc.returncode}: {err.decode()}")
        return time.monotonic() - started


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _count_manifest_batches(folder: Path) -> int:
    try:
        return len(json.loads((folder / "manifest.json").read_text())["batches"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _trial(setup: Setup, stage: str, rng: random.Random, window: tuple[float, float],
           reference: dict[str, str], watcher: Watcher, fraction: float | None
           ) -> dict[str, Any]:
    """One kill and re-run of ``stage``; returns what happened.

    ``fraction`` places the kill in the working window (None: uniformly at random).
    """
    data = setup.workdir / "data"
    out = data / ("intermediate" if stage == "preprocess" else "processed")
    if stage == "preprocess":
        shutil.rmtree(out, ignore_errors=True)
    elif rng.random() < 0.5:
        # half the merges replace a previous complete output, half write a fresh one
        shutil.rmtree(out, ignore_errors=True)
    replacing = out.is_dir()
    watcher.first_output_at = None
    watcher.start()
    proc = setup.popen(stage)
    # kill at a random moment of the working phase: after the first output appeared, within
    # the time the uninterrupted run spent from its first output to its end
    delay = (window[1] - window[0]) * (rng.random() if fraction is None else fraction)
    landed = False
    while proc.poll() is None:
        if watcher.first_output_at is not None and \
                time.monotonic() >= watcher.first_output_at + delay:
            landed = proc.poll() is None
            break
        time.sleep(0.001)
    # a run that ended before its kill shows how long the working phase really takes now
    worked = (time.monotonic() - watcher.first_output_at
              if not landed and watcher.first_output_at is not None else None)
    _kill_group(proc)
    after_kill = {
        "landed": landed, "delay_s": round(delay, 3),
        "worked_s": None if worked is None else round(worked, 3),
        "replacing_output": replacing if stage == "merge" else None,
        "tmp_left_by_kill": len(leftovers(out if stage == "preprocess" else data)),
        "batches_listed_at_kill": (_count_manifest_batches(out) if stage == "preprocess"
                                   else None),
        "processed_present_at_kill": out.is_dir() if stage == "merge" else None,
    }
    rerun = setup.popen(stage)
    _, err = rerun.communicate()
    watcher.stop()
    result = {**after_kill, "rerun_rc": rerun.returncode}
    if rerun.returncode != 0:
        result["rerun_error"] = err.decode()[-2000:]
    names = preprocess_outputs if stage == "preprocess" else merge_outputs
    result["identical"] = rerun.returncode == 0 and snapshot(out, names) == reference
    result["tmp_left_after_rerun"] = leftovers(out) + leftovers(data)
    return result


def run_kill_test(workdir: Path, kills: int, stage: str, seed: int, *, products: int = 300,
                  batch_size: int = 5, workers: int = 2,
                  fractions: Sequence[float] | None = None, retries: int = 0,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build a dataset in ``workdir``, then kill and re-run preprocess and/or merge.

    Args:
        workdir: an empty or disposable folder (``data/`` and ``runs/`` are written there).
        kills: trials per stage.
        stage: ``preprocess``, ``merge`` or ``both``.
        seed: seeds the kill moments (and merge's fresh-or-replace choice).
        products, batch_size, workers: dataset size and how preprocess is run.
        fractions: where in the working window each kill lands, e.g. (0.1, 0.4) (cycled);
            None: uniformly at random. The window runs from the first output the
            uninterrupted run showed to its end.
        retries: how many times a trial whose run ended before its kill is tried again
            (its re-run is still checked; the report keeps the last try and counts the
            misses in "kills_retried"). The tests ask for one kill per stage that lands.
        log: called with one line per trial (None: silent).

    Returns:
        ``{stage: {"kills_attempted", "kills_landed_mid_run", "kills_leaving_tmp_files",
        "reruns_byte_identical", "kills_retried", "retried_reruns_not_identical",
        "half_written_files_seen", "tmp_files_left_after_rerun" (retried tries included),
        "reference_s", "working_window_s" (first output -> end, shrunk to the fastest
        uninterrupted working phase seen), "files_checked", "polls", "violations",
        "trials"}}`` (merge adds "kills_replacing_an_output" and
        "replacing_kills_leaving_no_output"; preprocess "batches_done_at_kill", "n_batches").

    Raises:
        RuntimeError: an uninterrupted run failed.
    """
    say = log or (lambda _line: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(workdir, products, batch_size, workers)
    data = workdir / "data"
    if not (data / "features" / "feature_manifest.json").is_file():
        setup.run("generate")
        setup.run("features")
    stages = ["preprocess", "merge"] if stage == "both" else [stage]
    rng = random.Random(seed)

    # uninterrupted reference runs, watched too (they also measure the working window)
    shutil.rmtree(data / "intermediate", ignore_errors=True)
    shutil.rmtree(data / "processed", ignore_errors=True)
    references: dict[str, dict[str, str]] = {}
    windows: dict[str, tuple[float, float]] = {}
    reference_s: dict[str, float] = {}
    report: dict[str, Any] = {}
    for name, folder, names in (("preprocess", data / "intermediate", preprocess_outputs),
                                ("merge", data / "processed", merge_outputs)):
        watcher = Watcher(workdir, name)
        started = time.monotonic()
        watcher.start()
        elapsed = setup.run(name)
        watcher.stop()
        first = (watcher.first_output_at or started) - started
        windows[name] = (first, elapsed)
        reference_s[name] = elapsed
        references[name] = snapshot(folder, names)
        if watcher.violations:
            raise RuntimeError(f"uninterrupted {name} showed incomplete files: "
                               f"{watcher.violations[:3]}")
        say(f"reference {name}: {elapsed:.2f} s, first output after {first:.2f} s, "
            f"{len(references[name])} files")

    for name in stages:
        watcher = Watcher(workdir, name, reference=references["merge"] if name == "merge"
                          else {})
        trials = []
        retried = missed_not_identical = missed_tmp_left = 0
        for i in range(kills):
            fraction = fractions[i % len(fractions)] if fractions else None
            for attempt in range(retries + 1):
                trial = _trial(setup, name, rng, windows[name], references[name], watcher,
                               fraction)
                if trial["worked_s"] is not None:
                    # the reference may have run on a busier machine: aim within real run times
                    first = windows[name][0]
                    windows[name] = (first, min(windows[name][1], first + trial["worked_s"]))
                if trial["landed"] or attempt == retries:
                    break
                retried += 1
                # a missed try's re-run must still have given the reference bytes
                missed_not_identical += not trial["identical"]
                missed_tmp_left += len(trial["tmp_left_after_rerun"])
            trials.append(trial)
            say(f"{name} kill {i + 1}/{kills}: " + json.dumps(
                {k: v for k, v in trial.items() if k != "rerun_error"}))
        report[name] = {
            "kills_attempted": kills,
            "kills_landed_mid_run": sum(t["landed"] for t in trials),
            "kills_leaving_tmp_files": sum(t["tmp_left_by_kill"] > 0 for t in trials),
            "reruns_byte_identical": sum(t["identical"] for t in trials),
            "kills_retried": retried,
            "retried_reruns_not_identical": missed_not_identical,
            "half_written_files_seen": len(watcher.violations),
            "tmp_files_left_after_rerun": (sum(len(t["tmp_left_after_rerun"]) for t in trials)
                                           + missed_tmp_left),
            "reference_s": round(reference_s[name], 2),
            "working_window_s": [round(w, 2) for w in windows[name]],
            "files_checked": watcher.checked_files,
            "polls": watcher.polls,
            "violations": watcher.violations[:10],
            "trials": trials,
        }
        if name == "preprocess":
            listed = [t["batches_listed_at_kill"] for t in trials if t["landed"]]
            report[name]["batches_done_at_kill"] = [min(listed, default=0),
                                                    max(listed, default=0)]
            report[name]["n_batches"] = sum(1 for n in references["preprocess"]
                                            if BATCH_RE.fullmatch(n))
        else:
            report[name]["kills_replacing_an_output"] = sum(
                bool(t["replacing_output"]) for t in trials)
            # the instant between staged_dir's two renames: no folder, never a partial one
            report[name]["replacing_kills_leaving_no_output"] = sum(
                bool(t["replacing_output"]) and not t["processed_present_at_kill"]
                for t in trials)
    return report


# ----------------------------------------------------------------------------------------------
# A real full disk (tmpfs), for the bench only


def _mount_tmpfs(mount: Path, size_bytes: int) -> None:
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)],
                   check=True)


def _remount(mount: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)


def run_disk_full_demo(workdir: Path, mount: Path) -> dict[str, Any]:
    """Run preprocess, then merge, on a tmpfs too small for their outputs (needs root).

    Uses the dataset and reference outputs :func:`run_kill_test` left in ``workdir``. For each
    stage: run with too little space (expect exit code 8 and the message), check what is
    kept (preprocess: validate-batches passes on the complete batches, the manifest lists only
    them; merge: no data/processed, batches untouched), that no temporary file is left, then
    grow the mount and re-run: outputs must be byte-identical to the reference.
    """
    data = workdir / "data"
    ref_batches = snapshot(data / "intermediate", preprocess_outputs)
    ref_processed = snapshot(data / "processed", merge_outputs)
    features_bytes = sum(p.stat().st_size for p in (data / "features").iterdir())
    batches_bytes = sum((data / "intermediate" / n).stat().st_size for n in ref_batches)
    processed_bytes = sum((data / "processed" / n).stat().st_size for n in ref_processed)
    result: dict[str, Any] = {}
    _mount_tmpfs(mount, features_bytes + batches_bytes // 2)
    try:
        (mount / "data").mkdir()
        # same paths relative to the mount, same mtimes: the manifest must come out identical
        shutil.copytree(data / "features", mount / "data" / "features")
        setup = Setup(mount, 0, 5, 2)
        proc = subprocess.run([*COMMAND, *setup.args("preprocess")], cwd=mount,
                              capture_output=True, text=True)
        inter = mount / "data" / "intermediate"
        manifest = json.loads((inter / "manifest.json").read_text())
        listed = [b["name"] for b in manifest["batches"]]
        on_disk = sorted(p.name for p in inter.glob("batch_*.npz"))
        validate = subprocess.run([*COMMAND, "--preset", "tiny", "-q", "validate-batches"],
                                  cwd=mount, capture_output=True, text=True)
        pre: dict[str, Any] = {
            "rc": proc.returncode,
            "message": proc.stderr.strip().splitlines()[:2],
            "batches_complete": len(on_disk), "batches_planned": manifest["n_batches"],
            "manifest_lists_exactly_the_files": listed == on_disk,
            "validate_batches_rc": validate.returncode,
            "tmp_left": leftovers(inter),
        }
        _remount(mount, features_bytes + batches_bytes * 2)
        rerun = subprocess.run([*COMMAND, *setup.args("preprocess")], cwd=mount,
                               capture_output=True, text=True)
        pre["rerun_rc"] = rerun.returncode
        pre["rerun_identical"] = snapshot(inter, preprocess_outputs) == ref_batches
        result["preprocess"] = pre

        # merge: room for the batches and half the processed arrays
        _remount(mount, features_bytes + batches_bytes + processed_bytes // 2)
        proc = subprocess.run([*COMMAND, *setup.args("merge")], cwd=mount,
                              capture_output=True, text=True)
        mer: dict[str, Any] = {
            "rc": proc.returncode,
            "message": proc.stderr.strip().splitlines()[:2],
            "processed_exists": (mount / "data" / "processed").exists(),
            "batches_untouched": snapshot(inter, preprocess_outputs) == ref_batches,
            "tmp_left": leftovers(mount / "data") + leftovers(inter),
        }
        _remount(mount, features_bytes + batches_bytes + processed_bytes * 3)
        rerun = subprocess.run([*COMMAND, *setup.args("merge")], cwd=mount,
                               capture_output=True, text=True)
        mer["rerun_rc"] = rerun.returncode
        mer["rerun_identical"] = snapshot(mount / "data" / "processed",
                                          merge_outputs) == ref_processed
        result["merge"] = mer
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per stage")
    parser.add_argument("--stage", choices=["preprocess", "merge", "both"], default="both")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="dataset folder (default: a fresh temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--disk-full-demo", action="store_true",
                        help="also run preprocess and merge on a too small tmpfs (root)")
    parser.add_argument("--trials", action="store_true", help="print every trial's record")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pricectl-kill-"))
    report = run_kill_test(workdir, args.kills, args.stage, args.seed,
                           products=args.products, batch_size=args.batch_size,
                           workers=args.workers, log=lambda line: print(line, flush=True))
    if args.disk_full_demo:
        report["disk_full_demo"] = run_disk_full_demo(workdir, workdir.parent / (
            workdir.name + "-tmpfs"))
    shown = {k: ({kk: vv for kk, vv in v.items() if kk != "trials" or args.trials}
                 if isinstance(v, dict) else v) for k, v in report.items()}
    print(json.dumps(shown, indent=2))
    failed = any(isinstance(v, dict) and (v.get("half_written_files_seen")
                                          or v.get("reruns_byte_identical") != v.get(
                                              "kills_attempted")
                                          or v.get("tmp_files_left_after_rerun")
                                          or v.get("retried_reruns_not_identical"))
                 for k, v in report.items() if k != "disk_full_demo")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
