"""Monitor, run.json, exit codes and crash-safe storage: the machinery every stage shares."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pricing_cli import __version__, cli
from pricing_cli.config import load_settings
from pricing_cli.errors import (
    EXIT_CODES,
    ConfigError,
    DataError,
    MemoryBudgetExceeded,
    PartialFailure,
    exit_code_for,
)
from pricing_cli.monitor import RunMonitor, format_bytes, read_memory
from pricing_cli.runinfo import OutputOptions, StageResult, display_mode, execute_stage
from pricing_cli.storage import atomic_write, staged_dir, sweep_stale_tmp

ANSI = re.compile(r"\x1b\[")
STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


def test_memory_reading_sees_own_allocation() -> None:
    before = read_memory().rss
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
    after = read_memory().rss
    assert after - before > 50 * 1024 * 1024
    del block


def test_worker_memory_is_counted_once() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import numpy as np, time; a = np.ones(40_000_000 // 8); "
                              "time.sleep(5)"])
    try:
        import time

        deadline = time.time() + 4
        sample = read_memory()
        while sample.workers < 30_000_000 and time.time() < deadline:
            time.sleep(0.1)
            sample = read_memory()
        assert sample.n_workers >= 1
        # the child's 40 MB array is counted; PSS keeps shared library pages from doubling
        assert 30_000_000 < sample.workers < 200_000_000
        assert sample.tree >= sample.workers
    finally:
        child.kill()
        child.wait()


def test_plain_mode_prints_timestamped_lines_without_escape_codes(tmp_path: Path) -> None:
    stream = io.StringIO()
    with RunMonitor("preprocess", "plain", plain_interval_s=0.05, sample_interval_s=0.02,
                    memory_jsonl=tmp_path / "memory.jsonl", stream=stream) as mon:
        mon.add_bar("batches", "batch", 3)
        mon.add_bar("files", "files", 12)
        mon.set_worker(0, "00001.parquet")
        mon.set_worker(1, "00002.parquet")
        mon.update_bar("batches", advance=1)
        mon.update_bar("files", completed=5)
        mon.log("reusing 1 of 3 batches")
        import time

        time.sleep(0.3)
    text = stream.getvalue()
    lines = text.splitlines()
    assert len(lines) >= 3
    assert not ANSI.search(text)
    assert all(STAMP.match(line) for line in lines)
    assert any(line.endswith("reusing 1 of 3 batches") for line in lines)
    progress = [line for line in lines if "batch 1/3" in line]
    assert progress and "files 5/12" in progress[-1]
    assert "workers: 0=00001.parquet, 1=00002.parquet" in progress[-1]
    assert "memory: rss" in progress[-1] and "swap" in progress[-1]
    samples = [json.loads(x) for x in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert len(samples) >= 3
    keys = {"t", "rss", "workers", "tree", "available", "swap_used", "swap_total"}
    assert keys <= set(samples[0])


def test_display_mode_is_plain_when_not_a_tty() -> None:
    settings = load_settings(environ={})
    # pytest captures stdout, so it is not a TTY
    assert display_mode(OutputOptions(), settings) == "plain"
    assert display_mode(OutputOptions(live="on"), settings) == "live"
    assert display_mode(OutputOptions(json=True, live="on"), settings) == "quiet"
    assert display_mode(OutputOptions(quiet=True), settings) == "quiet"


def test_live_panel_renders_workers_bars_and_memory() -> None:
    from rich.console import Console

    mon = RunMonitor("preprocess", "quiet")
    mon.sampler.sample()
    mon.add_bar("batches", "batch", 4)
    mon.update_bar("batches", advance=2)
    mon.set_worker(1, "00042.parquet")
    mon.set_metric("samples/s", "1,234")
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(mon._render())
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "pricectl preprocess" in out
    assert "worker 1" in out and "00042.parquet" in out
    assert "batch 2/4" in out
    assert "samples/s 1,234" in out
    assert "memory: rss" in out


def test_memory_budget_stops_cleanly_and_keeps_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "done.txt"

    from tests.support.memory import budget_settings, grow_until_stopped

    def greedy_stage(settings, monitor):
        with atomic_write(kept, "w") as fh:
            fh.write("finished unit 1\n")
        grow_until_stopped(monitor)

    settings = budget_settings()
    with pytest.raises(MemoryBudgetExceeded, match="--max-memory; stopped cleanly"):
        execute_stage("toy", settings, OutputOptions(quiet=True), greedy_stage)
    assert kept.read_text() == "finished unit 1\n"
    assert exit_code_for(MemoryBudgetExceeded("x")).code == 7


def test_run_json_beside_outputs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "in.csv"
    source.write_text("a\n1\n")

    def stage(settings, monitor):
        out = Path("out")
        with staged_dir(out) as tmp:
            (tmp / "result.txt").write_text("ok")
        return StageResult("features", out, inputs=[source], summary={"rows": 1})

    settings = load_settings(preset="tiny", environ={})
    execute_stage("features", settings, OutputOptions(quiet=True), stage)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["stage"] == "features"
    assert record["pricectl_version"] == __version__
    assert record["config"]["preprocess"]["batch_size"] == 5
    assert record["inputs"]["files"] == 1 and record["inputs"]["bytes"] == 4
    assert len(record["inputs"]["sha256"]) == 64
    assert record["summary"] == {"rows": 1}
    assert record["started"] <= record["ended"]
    assert record["memory"]["peak_tree_bytes"] > 10 * 1024 * 1024
    assert isinstance(record["command_line"], list)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "run.json").read_text() == (tmp_path / "out" / "run.json").read_text()
    assert (runs[0] / "memory.jsonl").stat().st_size > 0


def test_partial_failure_raises_after_writing_run_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("out").mkdir()

    def stage(settings, monitor):
        return StageResult("preprocess", Path("out"), failures=["a.parquet: unreadable"])

    with pytest.raises(PartialFailure, match="1 input"):
        execute_stage("preprocess", load_settings(environ={}), OutputOptions(quiet=True), stage)
    assert json.loads(Path("out/run.json").read_text())["failures"] == ["a.parquet: unreadable"]


def test_exit_code_table() -> None:
    codes = {row.error.__name__: row.code for row in EXIT_CODES}
    assert codes["ConfigError"] == 3 and codes["DataError"] == 4
    assert codes["KeyboardInterrupt"] == 130
    assert len(set(codes.values())) == len(codes)  # one code per type
    assert exit_code_for(DataError("x")).label == "data error"
    assert exit_code_for(ValueError("x")).code == 1


def test_cli_error_is_one_line_with_hint_and_no_traceback(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  batchsize: 3\n")
    code = cli.main(["--config", str(bad), "config", "show"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.splitlines()[0] == (
        f"pricectl: config error: unknown config key 'preprocess.batchsize' in {bad}")
    assert "hint: did you mean 'preprocess.batch_size'?" in err
    assert "Traceback" not in err


def test_cli_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_settings", interrupted)
    assert cli.main(["config", "show"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_cli_config_error_raised_inside_stage_maps_to_code(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise ConfigError("boom", "fix it")

    monkeypatch.setattr(cli, "load_settings", broken)
    assert cli.main(["config", "show"]) == 3
    assert capsys.readouterr().err == "pricectl: config error: boom\n  hint: fix it\n"


def test_version_and_json_config(capsys) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pricectl {__version__}"
    assert cli.main(["--json", "--preset", "tiny", "config", "show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["preprocess"]["batch_size"] == 5


def test_help_is_instant_without_heavy_imports() -> None:
    code = ("import sys; from pricing_cli import cli; "
            "heavy = [m for m in ('torch', 'stable_baselines3', 'polars', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "x.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(final) as fh:
        fh.write(b"partial")
        raise RuntimeError("killed")
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_staged_dir_replaces_whole_or_nothing(tmp_path: Path) -> None:
    final = tmp_path / "processed"
    with staged_dir(final) as tmp:
        (tmp / "a.npy").write_bytes(b"1")
    assert sorted(os.listdir(final)) == ["a.npy"]
    with pytest.raises(KeyboardInterrupt), staged_dir(final) as tmp:
        (tmp / "b.npy").write_bytes(b"2")
        raise KeyboardInterrupt
    assert sorted(os.listdir(final)) == ["a.npy"]
    assert sorted(os.listdir(tmp_path)) == ["processed"]


def test_sweep_stale_tmp(tmp_path: Path) -> None:
    (tmp_path / ".tmp-1234-batch_0001.npz").write_bytes(b"x")
    (tmp_path / "batch_0000.npz").write_bytes(b"x")
    assert sweep_stale_tmp(tmp_path) == 1
    assert os.listdir(tmp_path) == ["batch_0000.npz"]


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"


def test_a_budget_makes_the_sampler_fast_enough_to_stop_before_it() -> None:
    from pricing_cli.monitor import MemorySampler

    assert MemorySampler(0.25).interval_s == 0.25
    assert MemorySampler(0.25, budget_bytes=300 * 2**20).interval_s == 0.05
    assert MemorySampler(0.01, budget_bytes=300 * 2**20).interval_s == 0.01


def _in_a_fresh_process(test_name: str) -> bool:
    """Run ``test_name`` alone in a new interpreter and return True (the caller returns).

    The kernel's figures (VmHWM, ru_maxrss of finished children) are per process and per
    process lifetime: in the full suite, earlier tests' workers would be counted here.
    """
    if os.environ.get("PRICECTL_TEST_FRESH") == "1":
        return False
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::{test_name}"],
                          env={**os.environ, "PRICECTL_TEST_FRESH": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return True


def test_kernel_peak_sees_a_spike_between_samples() -> None:
    if _in_a_fresh_process("test_kernel_peak_sees_a_spike_between_samples"):
        return
    # One sample at start, the next in 60 s: a 256 MiB spike in between is invisible to the
    # sampler, but not to the kernel's VmHWM (reset when the sampler starts).
    with RunMonitor("merge", "quiet", sample_interval_s=60) as mon:
        assert mon.sampler.last is not None
        base = mon.sampler.last.rss
        block = np.ones(256 * 2**20 // 8)
        del block
        summary = mon.memory_summary()
    assert summary["peak_rss_bytes"] < base + 64 * 2**20
    assert summary["kernel_peak_rss_source"] == "VmHWM"
    assert summary["kernel_peak_rss_bytes"] >= base + 250 * 2**20
    assert summary["kernel_peak_worker_bytes"] == 0  # no workers: the bound is self alone
    assert summary["kernel_peak_tree_bound_bytes"] == summary["kernel_peak_rss_bytes"]


def test_kernel_bound_counts_a_worker_spike_the_sampler_missed() -> None:
    # The worker touches 160 MB, frees it, then idles: samples see ~20 MB, VmHWM sees 160 MB.
    child = subprocess.Popen([sys.executable, "-c",
                              "import numpy as np, sys, time; a = np.ones(160_000_000 // 8); "
                              "del a; print('ready', flush=True); time.sleep(10)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with RunMonitor("preprocess", "quiet", sample_interval_s=60) as mon:
            summary = mon.memory_summary()
        assert summary["peak_workers"] >= 1
        assert summary["peak_workers_bytes"] < 100_000_000
        assert summary["kernel_peak_worker_bytes"] >= 160_000_000
        assert summary["kernel_peak_workers_bytes"] >= 160_000_000
        assert summary["kernel_peak_tree_bound_bytes"] >= (
            summary["kernel_peak_rss_bytes"] + 160_000_000)
    finally:
        child.kill()
        child.wait()


def test_pss_is_read_once_per_interval_and_rss_carries_the_tree(monkeypatch) -> None:
    if _in_a_fresh_process("test_pss_is_read_once_per_interval_and_rss_carries_the_tree"):
        return
    from pricing_cli import monitor
    from pricing_cli.monitor import MemorySampler

    calls: list[int] = []
    real = monitor._proportional_memory
    monkeypatch.setattr(monitor, "_proportional_memory",
                        lambda proc: calls.append(proc.pid) or real(proc))
    sampler = MemorySampler(0.01, pss_interval_s=3600)
    first = sampler.sample()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched, between two RSS-only samples
    later = [sampler.sample() for _ in range(5)][-1]
    assert calls == [os.getpid()]  # PSS read once, on the first sample only
    assert later.tree - first.tree >= 60 * 2**20  # the budget still sees the growth
    del block
