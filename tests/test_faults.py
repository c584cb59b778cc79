"""Faults, proven: kill -9 at random moments (bench/kill_test.py, small) and a full disk.

The full disk is injected at the lowest write the stage uses: a file object whose raw writes
stop after N bytes with ENOSPC (short write first, as a real disk does), or Polars' own error
text for its Rust writers. docs/faults.md states the guarantees these tests check.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from bench.kill_test import Watcher, run_kill_test
from pricing_cli import cli
from pricing_cli.stages import merge as merge_module
from pricing_cli.stages.batches import read_manifest, write_batch
from pricing_cli.storage import LOCK_SUFFIX, OWNER_MARKER, staged_dir
from tests.support.markets import BASE_CONFIG, copy_parts
from tests.support.markets import pricectl as pricectl_in

HINT = "  hint: Free disk space and re-run: completed work is kept and will be reused.\n"


class _FullDiskRaw(io.FileIO):
    """A raw file that accepts ``budget`` bytes, then fails every write with ENOSPC."""

    def __init__(self, path: Any, budget: int, mode: str = "w") -> None:
        super().__init__(path, mode)
        self.budget = budget

    def write(self, data: Any) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = memoryview(data).cast("B")[: self.budget]
        written = super().write(view) or 0
        self.budget -= written
        return written


def full_disk_open(name_part: str, after_bytes: int, nth: int = 1) -> Callable[..., Any]:
    """An ``open`` whose ``nth`` write- or append-open of a file named like ``name_part``
    fills the disk."""
    calls = {"n": 0}

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if ("w" in mode or "a" in mode) and name_part in Path(file).name:
            calls["n"] += 1
            if calls["n"] == nth:
                raw = _FullDiskRaw(file, after_bytes, "a" if "a" in mode else "w")
                buffered = io.BufferedWriter(raw)
                if "b" in mode:
                    return buffered
                return io.TextIOWrapper(buffered, encoding=kwargs.get("encoding") or "utf-8")
        return builtins.open(file, mode, *args, **kwargs)

    return fake_open


def folders(parent: Path) -> list[str]:
    """What ``parent`` holds, without the runs' lock files beside the folders."""
    return sorted(n for n in os.listdir(parent) if not n.endswith(LOCK_SUFFIX))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file but run.json (it holds times)."""
    return {k: v for k, v in folder_bytes(folder).items() if k != "run.json"}


def pricectl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["--preset", "tiny", "-q", *args])
    return code, capsys.readouterr().err


PREPROCESS = ("preprocess", "--batch-size", "2", "--workers", "1")  # 12 products: 6 batches


@pytest.fixture
def tiny_features(tiny_batches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's tiny raw data and features (12 products), copied; the working folder."""
    copy_parts(tiny_batches, tmp_path, "data/raw", "data/features")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_kill_9_at_random_moments_leaves_only_whole_files(
        tiny_features: Path) -> None:
    # One kill per stage, early in the working window so it lands before the run ends even
    # when the machine is busy; a try that misses is made again (the bench, make bench, draws
    # 20 moments per stage at random).
    report = run_kill_test(tiny_features, kills=1, stage="both", seed=0, products=12,
                           batch_size=1, workers=1, fractions=(0.05,), retries=2)
    for stage in ("preprocess", "merge"):
        got = report[stage]
        assert got["violations"] == []
        assert got["half_written_files_seen"] == 0
        assert got["kills_attempted"] == 1
        assert got["kills_landed_mid_run"] == 1, got["trials"]
        assert got["reruns_byte_identical"] == 1, got["trials"]
        assert got["retried_reruns_not_identical"] == 0
        assert got["tmp_files_left_after_rerun"] == 0
        assert got["files_checked"] > 0
    # a merge killed mid-run leaves its staging folder behind; the re-run swept it
    assert report["merge"]["kills_leaving_tmp_files"] == 1
    # (seed 0 draws a merge that replaces a complete output: the riskier case)
    assert report["merge"]["kills_replacing_an_output"] == 1
    assert report["preprocess"]["n_batches"] == 12


def test_watcher_sees_half_written_files(tmp_path: Path) -> None:
    """The kill test's checker fails on what it must catch (so its 0 means something)."""
    folder = tmp_path / "data" / "intermediate"
    record = write_batch(folder / "batch_0000.npz", [], ["f0"], {"price_level": 3})
    whole = (folder / "batch_0000.npz").read_bytes()
    (folder / "batch_0001.npz").write_bytes(whole[: len(whole) // 2])
    manifest = {"batches": [
        {"name": "batch_0000.npz", "members": record.members},
        {"name": "batch_0002.npz", "members": record.members},
    ]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    watcher = Watcher(tmp_path, "preprocess")
    watcher.poll()
    assert len(watcher.violations) == 2
    assert watcher.violations[0].startswith(f"{folder / 'batch_0001.npz'}: visible under its "
                                            "final name but not a whole zip")
    assert watcher.violations[1] == (f"{folder / 'batch_0002.npz'}: listed in manifest.json "
                                     "but not a complete file on disk")

    processed = tmp_path / "data" / "processed"
    processed.mkdir()
    (processed / "X_train.npy").write_bytes(b"whole")
    (processed / "X_val.npy").write_bytes(b"half")
    reference = {"X_train.npy": hashlib.sha256(b"whole").hexdigest(),
                 "X_test.npy": "0" * 64, "X_val.npy": "1" * 64}
    watcher = Watcher(tmp_path, "merge", reference=reference)
    watcher.poll()
    assert watcher.violations == [
        f"{processed}: visible without X_test.npy",
        f"{processed / 'X_val.npy'}: visible under its final name with other bytes than a "
        "whole run's",
    ]


def uninterrupted_batches(capsys: pytest.CaptureFixture[str], inter: Path) -> dict[str, bytes]:
    """The batches and manifest of a preprocess run that nothing stopped; the folder is then
    removed so the faulty run starts from scratch."""
    code, err = pricectl(capsys, *PREPROCESS)
    assert code == 0, err
    reference = outputs(inter)
    shutil.rmtree(inter)
    return reference


def test_disk_full_during_a_batch_keeps_the_complete_batches(
        tiny_features: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    inter = Path("data/intermediate")
    reference = uninterrupted_batches(capsys, inter)
    assert len(reference) == 8  # 6 batches + manifest.json + the ownership marker

    # the disk fills 3,000 bytes into the 4th batch
    monkeypatch.setattr("pricing_cli.storage.open", full_disk_open("batch_0003.npz", 3000),
                        raising=False)
    code, err = pricectl(capsys, *PREPROCESS)
    assert code == 8
    assert err == ("pricectl: disk full: no space left on device while writing "
                   "data/intermediate/batch_0003.npz\n" + HINT)
    # no temporary file, no run.json: only the three complete batches, the manifest and
    # the journal that lists them
    assert sorted(os.listdir(inter)) == [OWNER_MARKER, "batch_0000.npz", "batch_0001.npz",
                                         "batch_0002.npz", "manifest.journal", "manifest.json"]
    manifest = read_manifest(inter)
    assert manifest is not None
    assert [b["name"] for b in manifest["batches"]] == ["batch_0000.npz", "batch_0001.npz",
                                                        "batch_0002.npz"]
    assert manifest["n_batches"] == 6
    for name in ("batch_0000.npz", "batch_0001.npz", "batch_0002.npz"):
        assert (inter / name).read_bytes() == reference[name]
    monkeypatch.undo()
    monkeypatch.chdir(tiny_features)
    code, err = pricectl(capsys, "validate-batches")
    assert code == 0, err

    # space again: the re-run builds only the rest, and the folder equals an uninterrupted run
    code, err = pricectl(capsys, *PREPROCESS)
    assert code == 0, err
    assert outputs(inter) == reference
    summary = json.loads((inter / "run.json").read_text())["summary"]
    assert summary["batches_reused"] == 3
    assert summary["built"] == ["batch_0003.npz", "batch_0004.npz", "batch_0005.npz"]


def test_disk_full_writing_the_manifest_rebuilds_the_unlisted_batch(
        tiny_features: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    inter = Path("data/intermediate")
    reference = uninterrupted_batches(capsys, inter)

    # journal appends: 1 after batch 0, 2 after batch 1 (fills the disk 100 bytes in)
    monkeypatch.setattr("pricing_cli.storage.open",
                        full_disk_open("manifest.journal", 100, nth=2), raising=False)
    code, err = pricectl(capsys, *PREPROCESS)
    assert code == 8
    assert err == ("pricectl: disk full: no space left on device while writing "
                   "data/intermediate/manifest.journal\n" + HINT)
    # the journal lists only batch 0 (batch 1's line is torn, so ignored); batch 1 is
    # complete but unlisted, so it is not trusted and gets rebuilt
    assert sorted(os.listdir(inter)) == [OWNER_MARKER, "batch_0000.npz", "batch_0001.npz",
                                         "manifest.journal", "manifest.json"]
    manifest = read_manifest(inter)
    assert manifest is not None
    assert [b["name"] for b in manifest["batches"]] == ["batch_0000.npz"]
    monkeypatch.undo()
    monkeypatch.chdir(tiny_features)
    code, err = pricectl(capsys, *PREPROCESS)
    assert code == 0, err
    assert outputs(inter) == reference
    summary = json.loads((inter / "run.json").read_text())["summary"]
    assert summary["batches_reused"] == 1


def test_disk_full_during_merge_keeps_batches_and_the_previous_output(
        tiny_features: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = Path("data")
    code, err = pricectl(capsys, *PREPROCESS)
    assert code == 0, err
    batches = folder_bytes(data / "intermediate")
    code, err = pricectl(capsys, "merge", "--keep-batches")
    assert code == 0, err
    previous = folder_bytes(data / "processed")
    reference = outputs(data / "processed")

    # the disk fills inside the streamed X_val.npy (merge's own open, inside staged_dir)
    monkeypatch.setattr(merge_module, "open", full_disk_open("X_val.npy", 5000), raising=False)
    code, err = pricectl(capsys, "merge", "--keep-batches")
    assert code == 8
    assert err == ("pricectl: disk full: no space left on device while writing "
                   "data/processed/X_val.npy\n" + HINT)
    # the previous complete output is untouched, the batches too, no staging folder is left
    assert folder_bytes(data / "processed") == previous
    assert folder_bytes(data / "intermediate") == batches
    assert folders(data) == ["features", "intermediate", "processed", "raw"]
    monkeypatch.undo()
    monkeypatch.chdir(tiny_features)

    # Polars' writers report a full disk as ComputeError "... (os error 28)"
    def polars_full(frame: Any, path: Path) -> None:
        raise pl.exceptions.ComputeError(
            "parquet: File out of specification: underlying IO error: No space left on device "
            "(os error 28)")

    monkeypatch.setattr(merge_module, "write_meta", polars_full)
    shutil.rmtree(data / "processed")
    code, err = pricectl(capsys, "merge", "--keep-batches")
    assert code == 8
    assert err == ("pricectl: disk full: no space left on device while writing "
                   "data/processed/meta_train.parquet\n" + HINT)
    assert folders(data) == ["features", "intermediate", "raw"]
    monkeypatch.undo()
    monkeypatch.chdir(tiny_features)

    code, err = pricectl(capsys, "merge", "--keep-batches")
    assert code == 0, err
    assert outputs(data / "processed") == reference


def test_staged_dir_sweeps_only_its_own_stale_staging(tmp_path: Path) -> None:
    """kill -9 skips staged_dir's cleanup; the next run of the same output removes it."""
    for name in (".tmp-0123abcd-processed", ".tmp-old-0123abcd-processed",
                 ".tmp-0123abcd-features"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "X_train.npy").write_bytes(b"partial")
    with staged_dir(tmp_path / "processed") as staging:
        (staging / "X_train.npy").write_bytes(b"whole")
    assert sorted(os.listdir(tmp_path)) == [".tmp-0123abcd-features", "processed"]
    assert (tmp_path / "processed" / "X_train.npy").read_bytes() == b"whole"


def test_a_kill_between_the_two_renames_keeps_the_previous_outputs(tmp_path: Path) -> None:
    """Killed after ``processed`` became ``.tmp-old-...`` but before the new folder took its
    place: the next run puts the previous outputs back, even if that run fails too."""
    (tmp_path / ".tmp-old-0123abcd-processed").mkdir()
    (tmp_path / ".tmp-old-0123abcd-processed" / "X_train.npy").write_bytes(b"previous")
    (tmp_path / ".tmp-89abcdef-processed").mkdir()
    (tmp_path / ".tmp-89abcdef-processed" / "X_train.npy").write_bytes(b"new, maybe partial")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(tmp_path / "processed") as staging:
            (staging / "X_train.npy").write_bytes(b"half")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["processed"]
    assert (tmp_path / "processed" / "X_train.npy").read_bytes() == b"previous"


def test_a_full_disk_while_saving_the_model_is_a_disk_full_error(tmp_path, monkeypatch) -> None:
    """SB3 writes model.zip itself; a full disk there must still be exit code 8, not a bug."""
    import errno

    from pricing_cli.agent import train as train_module
    from pricing_cli.errors import DiskFullError, exit_code_for

    class FullDiskModel:
        def save(self, path: str) -> None:
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "best_model.zip"
    with pytest.raises(DiskFullError, match=f"while writing {target}") as info:
        train_module._save_model(FullDiskModel(), target)
    assert exit_code_for(info.value).code == 8
    assert list(tmp_path.iterdir()) == []  # neither the partial temp file nor a final one


def test_kill_9_during_training_then_resume_equals_the_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGKILL (no cleanup runs) right after the first checkpoint; --resume then ends
    with the same evaluations and weights, bit for bit, as a run that was never stopped.

    Only the killed run is a subprocess (SIGKILL needs one); the uninterrupted run and the
    resume run in this process, where torch is already imported, through the same CLI."""
    import signal
    import subprocess
    import sys
    import time
    import zipfile

    import torch
    import yaml

    from tests.agent_fixtures import write_processed

    write_processed(tmp_path / "processed", K=11)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "merge": {"output_dir": str(tmp_path / "processed")},
        "train": {"models_dir": str(tmp_path / "models"), "n_envs": 4, "net_arch": [16],
                  "n_steps": 64, "batch_size": 64, "n_epochs": 4, "timesteps": 2048,
                  "eval_every": 512, "checkpoint_every": 512, "tensorboard": False,
                  "torch_threads": 1}}))
    args = ["--preset", "tiny", "--config", str(tmp_path / "run.yaml"), "--quiet", "train",
            "--multi-product"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    monkeypatch.chdir(tmp_path)

    def run(*extra: str) -> None:
        assert cli.main([*args, *extra]) == 0

    run("--run-id", "whole")
    state = tmp_path / "models" / ".partial-k" / "training_state.json"
    process = subprocess.Popen([sys.executable, "-c", "from pricing_cli.cli import entry; entry()",
                                *args, "--run-id", "k"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["checkpoint_timesteps"] > 0:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (tmp_path / "models" / "k").exists()
    killed_at = json.loads(state.read_text())["checkpoint_timesteps"]
    assert 0 < killed_at <= 1024  # the resume trains 4 or more rollouts of 256 steps
    run("--run-id", "k", "--resume")

    def weights(run_id: str, name: str) -> dict[str, torch.Tensor]:
        with zipfile.ZipFile(tmp_path / "models" / run_id / name) as archive:
            return torch.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)

    summaries = [json.loads((tmp_path / "models" / r / "train_summary.json").read_text())
                 for r in ("k", "whole")]
    assert summaries[0]["resumed_from"].endswith("last_checkpoint.zip")
    assert summaries[0]["evaluations"] == summaries[1]["evaluations"]
    for name in ("model.zip", "last_checkpoint.zip"):
        a, b = weights("k", name), weights("whole", name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(("stage", "staging", "output"), [
    ("generate", "data/raw/.tmp-*-transactions", "data/raw"),
    ("features", "data/.tmp-*-features", "data/features"),
    ("evaluate", ".tmp-*-reports", "reports"),
])
def test_kill_9_mid_stage_then_rerun_gives_the_clean_outputs(
        stage: str, staging: str, output: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """SIGKILL once the stage's staging folder exists (the stage is writing), re-run: the
    outputs equal a clean run's, byte for byte, and no staging is left behind.

    The stage's inputs are the session's tiny market (tests/conftest.py); the clean run and
    the re-run are in-process, only the killed run is a subprocess."""
    import signal
    import subprocess
    import sys
    import time

    config = ["--config", BASE_CONFIG] if stage == "evaluate" else []
    command = [sys.executable, "-c", "from pricing_cli.cli import entry; entry()", "--preset",
               "tiny", "--quiet", *config, stage]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    if stage == "features":  # the stage's inputs, made once per session and copied
        copy_parts(request.getfixturevalue("tiny_batches"), clean, "data/raw")
    elif stage == "evaluate":
        copy_parts(request.getfixturevalue("tiny_market"), clean, BASE_CONFIG,
                   "subset_catalog.csv", "data", "models")
    shutil.copytree(clean, killed)

    def kill_while_staging(process: subprocess.Popen[bytes]) -> bool:
        """SIGKILL the stage once its staging folder exists; True if it landed."""
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if list(killed.glob(staging)):
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        return process.returncode == -signal.SIGKILL and bool(list(killed.glob(staging)))

    # The first killed run starts (imports) while the clean run works on the other core.
    first = subprocess.Popen(command, cwd=killed, env=env)
    pricectl_in(clean, *config, stage)
    # The tiny stages write for a fraction of a second: on a busy machine a try can miss.
    assert any(kill_while_staging(first if attempt == 0 else
                                  subprocess.Popen(command, cwd=killed, env=env))
               for attempt in range(5)), "no kill landed while staging"
    pricectl_in(killed, *config, stage)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "run.json"}

    assert files(killed / output) == files(clean / output)
    assert not [p for p in killed.rglob(".tmp-*")]
