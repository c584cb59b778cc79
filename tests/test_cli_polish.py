"""The rough edges of issue 12, section 3: hints that name the right fix, --json on failure and
for an up-to-date pipeline, --help in pipeline order with defaults, the panel's names, ETA and
worker count, and train's device."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pricing_cli import cli
from pricing_cli.data.raw_contract import date_format_hint

REPO = Path(__file__).resolve().parents[1]


def pricectl(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pricing_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Hints


def test_day_month_dates_point_to_date_format() -> None:
    assert date_format_hint(["13/01/2024"], None) == (
        "Dates such as '13/01/2024' are not ISO (YYYY-MM-DD): set data.date_format in your "
        "config to '%d/%m/%Y' (day first); see docs/data-format.md.")
    assert date_format_hint(["01.13.2024"], None) == (
        "Dates such as '01.13.2024' are not ISO (YYYY-MM-DD): set data.date_format in your "
        "config to '%m.%d.%Y' (month first); see docs/data-format.md.")
    # UCI Online Retail: month first, but 12/1 could be either
    assert date_format_hint([None, "12/1/2009 7:45"], None) == (
        "Dates such as '12/1/2009 7:45' are not ISO (YYYY-MM-DD): set data.date_format in your "
        "config to '%d/%m/%Y %H:%M' (day first) or '%m/%d/%Y %H:%M' (month first); see "
        "docs/data-format.md.")
    assert date_format_hint(["13/01/24 08:15:00"], "%Y-%m-%d") == (
        "Dates such as '13/01/24 08:15:00' do not match data.date_format '%Y-%m-%d': set it to "
        "'%d/%m/%y %H:%M:%S' (day first) or '%m/%d/%y %H:%M:%S' (month first); see "
        "docs/data-format.md.")
    assert date_format_hint(["yesterday", "2024-13-01"], None) is None


def test_features_on_day_month_dates_names_date_format_and_that_format_reads_them(
        tmp_path: Path) -> None:
    (tmp_path / "tx").mkdir()
    (tmp_path / "catalog.csv").write_text("product_id,unit_cost,min_price,max_price\nA,1,2,5\n")
    from datetime import date, timedelta

    days = [date(2024, 1, 13) + timedelta(days=k) for k in range(120)]  # 13/01 first: day first
    (tmp_path / "tx" / "t.csv").write_text("date,product_id,quantity,unit_price\n" + "".join(
        f"{d:%d/%m/%Y},A,{1 + k % 3},3\n" for k, d in enumerate(days)))
    (tmp_path / "c.yaml").write_text("data:\n  transactions: tx/*.csv\n  catalog: catalog.csv\n")
    proc = pricectl("--config", "c.yaml", "-q", "features", cwd=tmp_path)
    assert proc.returncode == 4
    assert ("  hint: Dates such as '13/01/2024' are not ISO (YYYY-MM-DD): set data.date_format "
            "in your config to '%d/%m/%Y' (day first); see docs/data-format.md.\n") in proc.stderr
    assert "max_bad_fraction to skip" not in proc.stderr
    (tmp_path / "c.yaml").write_text("data:\n  transactions: tx/*.csv\n  catalog: catalog.csv\n"
                                     "  date_format: '%d/%m/%Y'\n")
    proc = pricectl("--config", "c.yaml", "--json", "features", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["bad_rows"] == 0


def test_validate_batches_on_a_raw_file_says_it_is_not_a_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("catalog.csv").write_text("product_id,unit_cost,min_price,max_price\nA,1,2,5\n")
    assert cli.main(["validate-batches", "catalog.csv"]) == 2
    err = capsys.readouterr().err
    assert ("catalog.csv is not a batch: validate-batches checks the batch_NNNN.npz files "
            "that `pricectl preprocess` writes") in err
    assert "Delete this batch" not in err


def test_a_global_option_after_the_subcommand_gets_the_fixed_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["preprocess", "--preset", "small"]) == 2
    assert ("  hint: --preset is a global option: it goes before the subcommand, as in "
            "`pricectl --preset small preprocess`\n") in capsys.readouterr().err
    assert cli.main(["--preset", "tiny", "train", "--multi-product", "--max-memory=1GB"]) == 2
    assert ("as in `pricectl --preset tiny --max-memory=1GB train --multi-product`"
            in capsys.readouterr().err)
    assert cli.main(["train", "--multi-product", "--quiet"]) == 2
    assert "as in `pricectl --quiet train --multi-product`" in capsys.readouterr().err
    assert cli.main(["train", "--multi-prodct"]) == 2  # a typo, not a global option
    assert "global option" not in capsys.readouterr().err


def test_the_memory_budget_is_named_once_with_the_stages_own_hint(tmp_path: Path) -> None:
    from pricing_cli.monitor import budget_hint

    assert budget_hint("train") == (
        "Work done so far is kept; re-run with a larger budget (a global option, before the "
        "subcommand: `pricectl --max-memory SIZE train`), or fewer parallel episodes and "
        "smaller updates (train.n_envs, train.n_steps, train.batch_size in the config).")
    assert budget_hint("evaluate") == (
        "Work done so far is kept; re-run with a larger budget (a global option, before the "
        "subcommand: `pricectl --max-memory SIZE evaluate`).")
    assert "--batch-size" in budget_hint("preprocess")
    # a stage that grows past its budget: the message says "memory budget" once (the label
    # pricectl prints before it), the hint is the stage's own

    from pricing_cli.errors import MemoryBudgetExceeded
    from pricing_cli.runinfo import OutputOptions, execute_stage

    os.chdir(tmp_path)

    from tests.support.memory import budget_settings, grow_until_stopped

    def growing(settings, monitor):
        grow_until_stopped(monitor)

    settings = budget_settings()
    try:
        with pytest.raises(MemoryBudgetExceeded) as caught:
            execute_stage("train", settings, OutputOptions(quiet=True), growing)
    finally:
        os.chdir(REPO)
    assert caught.value.message.startswith("the process tree reached ")
    assert "memory budget" not in caught.value.message
    assert caught.value.hint == budget_hint("train")


def test_train_refuses_cuda_without_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pricing_cli.agent.train import resolve_device
    from pricing_cli.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda")
    assert caught.value.message == (f"train.device is cuda, but torch {torch.__version__} sees "
                                    "no CUDA device (a CPU-only build)")
    assert caught.value.hint == ("Train with --device cpu, or --device auto (CUDA when there "
                                 "is one, else the CPU).")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"


# ---------------------------------------------------------------------------------------------
# --json


def test_a_failure_with_json_prints_a_json_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--json", "merge"]) == 10
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert error["exit_code"] == 10 and error["kind"] == "missing input"
    assert error["message"] in err and f"  hint: {error['hint']}" in err
    # a usage error too, and the next command line without --json prints no JSON
    assert cli.main(["--json", "train", "--multi-product", "--timesteps", "many"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["exit_code"] == 2 and error["kind"] == "usage error"
    assert error["message"].startswith("Invalid value for '--timesteps'")
    assert cli.main(["merge"]) == 10
    assert capsys.readouterr().out == ""


def test_pipeline_json_summarises_skipped_stages_and_a_manual_run_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--preset", "tiny", "-q", "generate"]) == 0
    assert cli.main(["--preset", "tiny", "-q", "features"]) == 0  # by hand, not by pipeline
    capsys.readouterr()
    assert cli.main(["--preset", "tiny", "--json", "pipeline", "--to", "features"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # nothing ran: only the pipeline's own line
    record = json.loads(lines[0])
    assert record["stage"] == "pipeline" and record["failures"] == []
    assert record["summary"] == {"generate": "skipped (up to date)",
                                 "features": "skipped (up to date)"}


# ---------------------------------------------------------------------------------------------
# --help


def test_help_lists_the_stages_in_pipeline_order_with_defaults() -> None:
    import typer

    from pricing_cli.registry import PIPELINE_NAMES

    assert PIPELINE_NAMES == ("generate", "features", "preprocess", "validate-batches", "merge",
                              "train", "evaluate")
    group = typer.main.get_command(cli.app)
    assert ("Stages run in this order (`pricectl pipeline` runs them all): generate → features "
            "→ preprocess → validate-batches → merge → train → evaluate; then") in " ".join(
                (group.help or "").split())
    assert list(group.list_commands(None)) == [*PIPELINE_NAMES, "recommend", "pipeline",
                                               "config"]
    assert cli._default("train.timesteps") == " [default: 50000; config train.timesteps]"
    options = {p.name: p.help for p in group.commands["train"].params}
    assert options["timesteps"] == ("Environment steps of RL. [default: 50000; config "
                                    "train.timesteps]")
    assert options["device"] == "auto, cpu or cuda. [default: cpu; config train.device]"
    # every option that overrides a config key says its default
    for name, command in group.commands.items():
        for param in getattr(command, "params", []):
            text = getattr(param, "help", None) or ""
            if "config " in text or name == "config":
                continue
            assert param.name in {"multi_product", "product", "resume", "deep", "convert_legacy",
                                  "trust_pickle", "force", "paths", "products", "model",
                                  "start", "stop", "with_generate"}, (name, param.name, text)


# ---------------------------------------------------------------------------------------------
# The panel


def test_the_panel_names_products_and_shows_an_eta() -> None:
    from pricing_cli.monitor import RunMonitor, _Bar

    monitor = RunMonitor("preprocess", "quiet")
    monitor.name_files({"00010.parquet": "P00011"})
    monitor.set_worker(1, "00010.parquet")
    monitor.set_worker(2, "00010.parquet +15 more")
    monitor.set_worker(3, "idle")
    assert monitor._workers == {1: "P00011", 2: "P00011 +15 more", 3: "idle"}
    bar = _Bar("files", 12, completed=3, started=time.monotonic() - 6.0)
    assert monitor._bar_text(bar) == "files 3/12 (0.5/s, ETA 0:00:18)"
    assert monitor._bar_text(_Bar("files", 12, completed=12)).endswith("/s)")  # done: no ETA
    assert monitor._bar_text(_Bar("files", None, completed=3)).endswith("/s)")  # no total


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_the_worker_count_leaves_out_multiprocessing_helpers() -> None:
    from pricing_cli.monitor import read_memory

    with mp.get_context("spawn").Pool(2) as pool:
        pending = pool.map_async(_sleep, [0.5, 0.5])
        sample = read_memory()
        pending.get(timeout=60)
    # the pool's 2 workers, and spawn's resource tracker apart from them
    assert sample.n_workers == 2
    assert sample.n_helpers == 1 and sample.helpers > 0
    assert sample.tree >= sample.workers + sample.helpers
