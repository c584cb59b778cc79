"""`pricectl preprocess --executor ray`: same bytes as the local pool, panel lines, config errors.

One local Ray instance (2 CPUs) serves the whole module: it takes most of this file's ~15 s.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import polars as pl
import pytest

from pricing_cli import cli
from pricing_cli.config import load_settings
from pricing_cli.errors import ConfigError
from pricing_cli.monitor import RunMonitor
from pricing_cli.stages.executors import RayPool, check_executor_settings, init_ray
from pricing_cli.stages.preprocess import SampleParams, process_file, run_preprocess
from tests.support.feature_files import write_feature_files

try:
    import ray
except ImportError:  # the Makefile installs the [ray] extra; a bare venv may not have it
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed: "
                               "pip install 'pricing-cli[ray]' (make test installs it)")


def files_bytes(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


# ----------------------------------------------------------------------------------------------
# Config errors (no Ray started)


def test_ray_executor_without_ray_installed_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = cli.main(["--preset", "tiny", "--no-live", "preprocess", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 3
    assert "preprocess.executor is 'ray' but Ray cannot be imported" in err
    assert "pip install 'pricing-cli[ray]'" in err
    assert not Path("data/intermediate").exists()  # refused before any work


def test_ray_address_needs_the_ray_executor() -> None:
    settings = load_settings(preset="tiny", flags={"preprocess.ray_address": "auto"}, environ={})
    with pytest.raises(ConfigError, match="preprocess.ray_address is 'auto' but "
                                          "preprocess.executor is 'local'") as info:
        check_executor_settings(settings.preprocess)
    assert "--executor ray" in info.value.hint


def test_unreachable_cluster_is_a_config_error_naming_the_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in for ray whose init fails as Ray's does when no cluster answers, so the test
    # does not depend on what runs on this machine
    calls: list[dict] = []

    class NoCluster(types.ModuleType):
        def is_initialized(self) -> bool:
            return False

        def init(self, **options) -> None:
            calls.append(options)
            raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setitem(sys.modules, "ray", NoCluster("ray"))
    with pytest.raises(ConfigError, match="^cannot connect to the Ray cluster at 'auto': "
                                          "Could not find any running Ray instance.$") as info:
        init_ray(3, "auto")
    assert "docs/scaling.md" in info.value.hint
    # joining a cluster: no local CPU count or dashboard options, quiet workers
    assert calls == [{"address": "auto", "log_to_driver": False, "logging_level": 40,
                      "runtime_env": {"env_vars": {"POLARS_MAX_THREADS": "1"}}}]


def test_unknown_executor_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--preset", "tiny", "preprocess", "--executor", "dask"]) == 3
    assert "preprocess.executor" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# On a local Ray instance


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module; executors find it initialized and reuse it."""
    if ray is None:
        pytest.skip("ray is not installed: pip install 'pricing-cli[ray]'")
    started = init_ray(2, None)
    yield ray
    if started:
        ray.shutdown()


class RecordingMonitor(RunMonitor):
    """A quiet monitor that records every worker line it is given."""

    def __init__(self) -> None:
        super().__init__("preprocess", "quiet")
        self.worker_lines: list[tuple[int, str]] = []

    def set_worker(self, worker, text: str) -> None:
        self.worker_lines.append((worker, text))
        super().set_worker(worker, text)


@needs_ray
def test_ray_gives_the_same_batches_manifest_and_merged_outputs_as_local(
        local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features", n_products=13)
    # one unreadable and one contract-breaking file: quarantine reasons must match too
    (tmp_path / "data/features/00006.parquet").write_bytes(b"garbage")
    pl.read_parquet("data/features/00011.parquet").drop("f_1").write_parquet(
        "data/features/00011.parquet")
    base = ["--preset", "tiny", "--no-live", "--json", "preprocess", "--no-resume",
            "--keep-batches"]

    assert cli.main([*base, "--executor", "local", "--workers", "1"]) == 6  # partial failure
    local_out = json.loads(capsys.readouterr().out)
    local_batches = files_bytes(Path("data/intermediate"), "batch_*.npz")
    local_manifest = Path("data/intermediate/manifest.json").read_bytes()
    assert len(local_batches) == 3  # tiny: 5 files per batch, 13 files
    assert cli.main(["--preset", "tiny", "--no-live", "merge", "--keep-batches",
                     "--output-dir", "local_processed"]) == 0
    capsys.readouterr()

    assert cli.main([*base, "--executor", "ray"]) == 6
    ray_out = json.loads(capsys.readouterr().out)
    ray_manifest = Path("data/intermediate/manifest.json").read_bytes()
    assert files_bytes(Path("data/intermediate"), "batch_*.npz") == local_batches
    # The manifest's fingerprint covers what decides a batch's content, not how it was run.
    assert ray_manifest == local_manifest

    assert ray_out["failures"] == local_out["failures"]
    assert [f.split(" (")[0] for f in ray_out["failures"]] == [
        "data/features/00006.parquet: not a readable Parquet file",
        "data/features/00011.parquet: missing column(s) f_1"]
    for key in ("samples", "samples_per_split", "built", "files_quarantined"):
        assert ray_out["summary"][key] == local_out["summary"][key]
    assert ray_out["summary"]["workers"] == 2

    shutil.move("local_processed", "kept_local")  # merge writes the same folder name below
    assert cli.main(["--preset", "tiny", "--no-live", "merge", "--keep-batches",
                     "--output-dir", "local_processed"]) == 0
    merged_ray = files_bytes(Path("local_processed"), "*")
    merged_local = files_bytes(Path("kept_local"), "*")
    merged_ray.pop("run.json"), merged_local.pop("run.json")  # timestamps and command lines
    assert sorted(merged_ray) == sorted(merged_local)
    assert "X_train.npy" in merged_ray
    for name in merged_local:
        assert merged_ray[name] == merged_local[name], name


@needs_ray
def test_ray_panel_shows_each_file_on_a_slot_and_bars_complete(
        local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_feature_files(tmp_path / "data" / "features", n_products=9, n_days=20)
    settings = load_settings(preset="tiny", flags={"preprocess.executor": "ray",
                                                   "preprocess.workers": 2}, environ={})
    monitor = RecordingMonitor()
    result = run_preprocess(settings, monitor)
    assert result.summary["batches_built"] == 2 and result.summary["workers"] == 2
    shown = [text for _, text in monitor.worker_lines if text != "idle"]
    # every file is shown exactly once, in submission (= file) order, on slot 1 or 2
    assert shown == [f"{i:05d}.parquet" for i in range(9)]
    assert {slot for slot, _ in monitor.worker_lines} == {1, 2}
    # never more files on the panel than slots: replay the lines
    current: dict[int, str] = {}
    for slot, text in monitor.worker_lines:
        current[slot] = text
        assert sum(t != "idle" for t in current.values()) <= 2
    assert monitor._bars["batches"].completed == 2 == monitor._bars["batches"].total
    assert monitor._bars["files"].completed == 9 == monitor._bars["files"].total
    # a re-run reuses every batch and does not submit anything
    again = RecordingMonitor()
    assert run_preprocess(settings, again).summary["batches_built"] == 0
    assert again.worker_lines == []


@needs_ray
def test_ray_pool_yields_in_order_and_shows_chunks(local_ray, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = write_feature_files(tmp_path / "f", n_products=7, n_days=12, n_features=2)
    params = SampleParams(("f_0", "f_1"), price_levels=5, max_daily_change=0.25,
                          history_window=2, move_tolerance=0.005,
                          heads=("price_level", "price_move"))
    given = [str(p.relative_to(tmp_path)) for p in paths] + ["f/missing.parquet"]
    monitor = RecordingMonitor()
    with RayPool(params, process_file, 1, monitor) as pool:
        outcomes = list(pool.map(given))
    assert [o[0] for o in outcomes] == given  # paths as given, not the absolute ones sent
    # product i starts i % 4 days late
    assert [o[1].n for o in outcomes[:7]] == [12, 11, 10, 9, 12, 11, 10]
    assert outcomes[7][1] is None
    assert outcomes[7][2].startswith("not a readable Parquet file")
    assert str(tmp_path) not in outcomes[7][2]
    # 8 files, 1 worker: chunks of 8 // 4 = 2 files, one in flight at a time
    assert monitor.worker_lines == [
        (1, "00000.parquet +1 more"), (1, "idle"), (1, "00002.parquet +1 more"), (1, "idle"),
        (1, "00004.parquet +1 more"), (1, "idle"), (1, "00006.parquet +1 more"), (1, "idle")]
