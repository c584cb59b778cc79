"""Never lose or mix a user's data (issue 9): each case was reproduced on the code before the
fix, where it deleted or overwrote a file pricectl did not write, or mixed two runs.

What is proven here is listed with these test names in docs/faults.md ("Your files").
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pricing_cli import cli
from pricing_cli.errors import DiskFullError, OutputError, RunLocked, classify_os_error
from pricing_cli.storage import (
    OWNER_MARKER,
    check_output_dir,
    folder_locks,
    lock_path,
    staged_dir,
)
from tests.support.markets import copy_parts

USER_CATALOG = ("product_id,unit_cost,min_price,max_price,category\n"
                "A,1.0,2.0,4.0,x\nB,2.0,3.0,6.0,y\n")
USER_SALES = "date,product_id,quantity,unit_price\n2023-01-02,A,1,3.0\n2023-01-03,B,2,4.5\n"


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["--no-live", *args])
    return code, capsys.readouterr().err


def user_raw_data(root: Path) -> None:
    """A user's own data under the documented default paths (data/raw)."""
    (root / "data/raw/transactions").mkdir(parents=True)
    (root / "data/raw/transactions/my_sales.csv").write_text(USER_SALES)
    (root / "data/raw/catalog.csv").write_text(USER_CATALOG)


# -- generate only when asked, and never over a user's files ---------------------------------

def test_pipeline_does_not_generate_over_a_users_raw_data(tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    monkeypatch.chdir(tmp_path)
    user_raw_data(tmp_path)
    (tmp_path / "my.yaml").write_text("features:\n  lags: [1]\n  windows: [3]\n")
    before = digest_tree(tmp_path / "data/raw")
    code, err = run(capsys, "--config", "my.yaml", "pipeline", "--to", "features")
    # the user's 2 rows are too few for the default splits: features fails, but generate
    # never ran and nothing of theirs changed
    assert "generate: running" not in err
    assert "pipeline: features: running" in err
    assert digest_tree(tmp_path / "data/raw") == before, err
    assert code != 0


def test_generate_refuses_a_folder_it_did_not_create(tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    monkeypatch.chdir(tmp_path)
    user_raw_data(tmp_path)
    before = digest_tree(tmp_path / "data/raw")
    for args in (["--preset", "tiny", "generate"],
                 ["--preset", "tiny", "pipeline", "--to", "generate"],
                 ["pipeline", "--generate", "--to", "generate"]):
        code, err = run(capsys, *args)
        assert code == 11, err
        assert ("pricectl: output refused: generate: refusing to write into data/raw: it holds "
                "files that pricectl did not write (catalog.csv, transactions)") in err
        assert digest_tree(tmp_path / "data/raw") == before


def test_generate_refuses_a_users_file_added_to_its_transactions(tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "--preset", "tiny", "-q", "generate")
    assert code == 0, err
    mine = tmp_path / "data/raw/transactions/my_sales.csv"
    mine.write_text(USER_SALES)
    code, err = run(capsys, "--preset", "tiny", "-q", "generate", "--seed", "8")
    assert code == 11, err
    assert ("refusing to replace data/raw/transactions: it holds files pricectl did not write "
            "(my_sales.csv)") in err
    assert mine.read_text() == USER_SALES


# -- output folders: replaced only if the stage made them; never over an input ---------------

def test_features_refuses_a_folder_of_someone_elses_files(tmp_path: Path, monkeypatch,
                                                          capsys, tiny_batches: Path) -> None:
    monkeypatch.chdir(tmp_path)
    copy_parts(tiny_batches, tmp_path, "data/raw")  # a generated market
    (tmp_path / "mydocs").mkdir()
    (tmp_path / "mydocs/thesis.txt").write_text("four years of work")
    code, err = run(capsys, "--preset", "tiny", "features", "--output-dir", "mydocs")
    assert code == 11, err
    assert ("features: refusing to write into mydocs: it holds files that pricectl did not "
            "write (thesis.txt)") in err
    assert (tmp_path / "mydocs/thesis.txt").read_text() == "four years of work"


def test_features_refuses_an_output_folder_that_holds_its_input(
        tmp_path: Path, monkeypatch, capsys, tiny_batches: Path) -> None:
    monkeypatch.chdir(tmp_path)
    copy_parts(tiny_batches, tmp_path, "data/raw")  # a generated market
    before = digest_tree(tmp_path / "data/raw")
    code, err = run(capsys, "--preset", "tiny", "features", "--output-dir", "data")
    assert code == 11, err
    assert "features: the output folder data overlaps its input" in err
    assert digest_tree(tmp_path / "data/raw") == before


def test_evaluate_refuses_to_write_its_reports_over_the_models(tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "models/r1"
    run_dir.mkdir(parents=True)
    (run_dir / "model.zip").write_bytes(b"weights")
    (tmp_path / "data/processed").mkdir(parents=True)
    code, err = run(capsys, "evaluate", "--reports-dir", "models")
    assert code == 11, err
    assert "evaluate: the output folder models overlaps its input models/r1" in err
    assert (run_dir / "model.zip").read_bytes() == b"weights"


def test_staged_dir_replaces_its_own_folder_and_refuses_one_with_a_users_file(
        tmp_path: Path) -> None:
    out = tmp_path / "reports"
    with staged_dir(out, owner="evaluate") as folder:
        (folder / "report.md").write_text("v1")
    marker = json.loads((out / OWNER_MARKER).read_text())
    assert marker == {"written_by": "pricectl", "stage": "evaluate", "files": ["report.md"]}
    with staged_dir(out, owner="evaluate") as folder:  # its own folder: replaced
        (folder / "report.md").write_text("v2")
    assert (out / "report.md").read_text() == "v2"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"refusing to replace .*reports: it holds files "
                                          r"pricectl did not write \(notes.txt\)"):
        with staged_dir(out, owner="evaluate") as folder:
            (folder / "report.md").write_text("v3")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "report.md").read_text() == "v2"
    # another stage's folder is not this stage's either
    with pytest.raises(OutputError, match="holds files written by pricectl evaluate"):
        check_output_dir(out, "features")


def test_an_empty_folder_or_a_gitkeep_is_free_to_use(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    check_output_dir(tmp_path / "a", "features")
    (tmp_path / "a/.gitkeep").write_text("")
    check_output_dir(tmp_path / "a", "features")
    (tmp_path / "a/.gitkeep").write_text("not empty")
    with pytest.raises(OutputError):
        check_output_dir(tmp_path / "a", "features")


# -- one run at a time per folder -----------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pricing_cli.storage import folder_locks
with folder_locks([sys.argv[1]]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_locked_folder_is_refused_with_the_holders_pid(
        tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, "data/processed"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, err = run(capsys, "--preset", "tiny", "merge")
        assert code == 12, err
        assert (f"pricectl: locked: another pricectl run (pid {holder.pid}) holds "
                "data/processed\n") in err
        # a reader is refused too while a writer holds it
        with pytest.raises(RunLocked):
            with folder_locks([], [tmp_path / "data/processed"]):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the lock with its holder, even on SIGKILL: no stale lock
    with folder_locks([tmp_path / "data/processed"]):
        assert lock_path(tmp_path / "data/processed").is_file()


def test_locks_are_reentrant_within_one_run(tmp_path: Path) -> None:
    with folder_locks([tmp_path / "out"], [tmp_path / "in"]):
        with folder_locks([tmp_path / "out"], [tmp_path / "in"]):  # a stage in a pipeline
            pass
        with folder_locks([tmp_path / "in"]):  # upgrade a shared lock this run holds
            pass


# -- up to date means the outputs are still there -------------------------------------------

def test_pipeline_reruns_a_stage_whose_outputs_are_missing_or_changed(
        tmp_path: Path, monkeypatch, capsys, tiny_batches: Path) -> None:
    # the session's market up to its batches (copied with their times: up to date), merged
    copy_parts(tiny_batches, tmp_path, "data")
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "--preset", "tiny", "pipeline", "--to", "merge")
    assert code == 0, err
    record = json.loads(Path("data/processed/run.json").read_text())
    assert record["outputs"]["X_train.npy"] == Path("data/processed/X_train.npy").stat().st_size
    Path("data/processed/masks_val.npz").unlink()  # e.g. a merge that never finished
    code, err = run(capsys, "--preset", "tiny", "pipeline", "--to", "merge")
    assert code == 0, err
    assert "pipeline: features: up to date, skipped" in err
    assert "pipeline: merge: running" in err
    assert Path("data/processed/masks_val.npz").is_file()
    with open("data/features/00000.parquet", "ab") as handle:  # a changed size
        handle.write(b"\0")
    code, err = run(capsys, "--preset", "tiny", "pipeline", "--to", "features")
    assert "pipeline: features: running" in err and code == 0, err


# -- SIGTERM is Ctrl+C ------------------------------------------------------------------------

def test_sigterm_stops_a_stage_cleanly_with_exit_143(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pricing_cli", "--no-live", "--preset", "tiny", "generate",
         "--products", "3000", "--days", "400"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("data/raw/.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until it is writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "pricectl: terminated (SIGTERM); completed work is kept, partial outputs removed" in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("data/raw/.tmp-*"))  # its staging folder is gone


# -- failures the system raises get their class ----------------------------------------------

def test_system_errors_are_classified_not_internal(tmp_path: Path) -> None:
    full = classify_os_error(OSError(28, "No space left on device", "data/x.parquet"))
    assert isinstance(full, DiskFullError)
    assert full.message.startswith("no space left on device (data/x.parquet)")
    # Polars' own error types carry the OS error only in their text
    assert isinstance(classify_os_error(RuntimeError("write failed (os error 28)")),
                      DiskFullError)
    denied = classify_os_error(PermissionError(13, "Permission denied", "reports"))
    assert isinstance(denied, OutputError)
    assert denied.message == "cannot write (reports): [Errno 13] Permission denied: 'reports'"
    assert isinstance(classify_os_error(OSError(30, "Read-only file system")), OutputError)
    bug = ValueError("a real bug")
    assert classify_os_error(bug) is bug


def test_a_full_disk_that_a_writer_misreports_is_a_disk_full_error(tmp_path: Path,
                                                                   monkeypatch) -> None:
    import shutil

    import pricing_cli.storage as storage

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage",
                        lambda path: usage._replace(free=4096))
    with pytest.raises(DiskFullError, match="no space left on device while writing"):
        with staged_dir(tmp_path / "features", owner="features"):
            raise OSError("Invalid thrift: end of file")  # what Polars says, errno None
    assert not (tmp_path / "features").exists()


# -- train: confined run ids, clean restarts --------------------------------------------------

def test_run_id_cannot_leave_the_models_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "train", "--multi-product", "--run-id", "../../x")
    assert code == 3, err
    assert "config key 'train.run_id' has an invalid value '../../x'" in err
    assert not (tmp_path.parent / "x").exists()
