"""Running one stage: the monitor around it, run.json beside its outputs, the summary.

Every stage function has the shape ``fn(settings, monitor) -> StageResult``. The CLI calls
:func:`execute_stage`, which owns everything around it, so no stage repeats it. What a stage
locks and which config section its run.json fingerprints come from registry.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pricing_cli import __version__
from pricing_cli.config import Settings, parse_size
from pricing_cli.errors import PartialFailure
from pricing_cli.monitor import DisplayMode, RunMonitor, format_bytes
from pricing_cli.registry import BY_NAME, stage_folders
from pricing_cli.storage import TMP_MARK, fingerprint_files, folder_locks, write_json


@dataclass
class OutputOptions:
    """Global display options from the command line."""

    live: str = "auto"  # auto | on | off
    quiet: bool = False
    json: bool = False
    debug: bool = False


@dataclass
class StageResult:
    """What a stage returns to the CLI.

    Args:
        stage: stage name.
        output_dir: where its outputs are; run.json is written there (None: run folder only).
        inputs: input files, fingerprinted into run.json.
        summary: numbers for the summary table, run.json and --json.
        failures: one line per failed input; non-empty means exit code 'partial failure'.
        notes: extra lines printed under the summary table.
        outputs: the files that must still be there, unchanged in size, for the stage to be
            up to date (None: every file under ``output_dir``). preprocess names only its
            manifest, since merge deletes the batches.
    """

    stage: str
    output_dir: Path | None
    inputs: Sequence[Path] = ()
    summary: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: Sequence[Path] | None = None


StageFn = Callable[[Settings, RunMonitor], StageResult]


def display_mode(options: OutputOptions, settings: Settings) -> DisplayMode:
    """live on a TTY (stdout and stderr), plain otherwise; --quiet/--json silence progress."""
    if options.quiet or options.json:
        return "quiet"
    live = options.live if options.live != "auto" else settings.monitor.live
    if live == "on":
        return "live"
    if live == "off":
        return "plain"
    return "live" if sys.stdout.isatty() and sys.stderr.isatty() else "plain"


def new_run_dir(settings: Settings, stage: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(settings.monitor.runs_dir) / f"{stamp}-{stage}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_record(stage: str, settings: Settings, result: StageResult, monitor: RunMonitor,
               ended: datetime) -> dict[str, Any]:
    """The content of run.json."""
    return {
        "stage": stage,
        "pricectl_version": __version__,
        "command_line": sys.argv,
        "config": settings.to_dict(),
        "config_fingerprint": settings.section_fingerprint(config_section(stage)),
        "inputs": fingerprint_files(list(result.inputs)) if result.inputs else None,
        "outputs": output_sizes(result),
        "started": monitor.started_wall.isoformat(),
        "ended": ended.isoformat(),
        "elapsed_s": round(monitor.elapsed, 3),
        "memory": monitor.memory_summary(),
        "summary": result.summary,
        "failures": result.failures,
    }


def output_sizes(result: StageResult) -> dict[str, int] | None:
    """{path relative to output_dir: size} of the stage's outputs, recorded in run.json so the
    pipeline can tell that they are all still there (see pipeline.recorded_key)."""
    if result.output_dir is None or not Path(result.output_dir).is_dir():
        return None
    root = Path(result.output_dir)
    paths = (list(result.outputs) if result.outputs is not None
             else [p for p in root.rglob("*") if p.is_file()])
    sizes = {str(Path(p).relative_to(root)): Path(p).stat().st_size for p in paths
             if Path(p).name != "run.json" and not Path(p).name.startswith(TMP_MARK)}
    return dict(sorted(sizes.items()))


def config_section(stage: str) -> str:
    """The config section whose fingerprint run.json records (the registry's, else the
    stage's own name)."""
    found = BY_NAME.get(stage)
    return stage if found is None else found.config_section


def make_monitor(stage: str, settings: Settings, options: OutputOptions,
                 memory_jsonl: Path | None) -> RunMonitor:
    """The monitor for a run, as the settings and display options ask."""
    budget = parse_size(settings.monitor.max_memory) if settings.monitor.max_memory else None
    return RunMonitor(
        stage, display_mode(options, settings),
        refresh_per_second=settings.monitor.refresh_per_second,
        plain_interval_s=settings.monitor.plain_interval_s,
        sample_interval_s=settings.monitor.sample_interval_s,
        pss_interval_s=settings.monitor.pss_interval_s,
        memory_jsonl=memory_jsonl, budget_bytes=budget,
    )


def execute_stage(stage: str, settings: Settings, options: OutputOptions, fn: StageFn,
                  shared: RunMonitor | None = None,
                  stage_key: Callable[[], str | None] | None = None) -> StageResult:
    """Run ``fn`` under a monitor, write run.json (once), print the summary.

    ``shared``: a monitor already running (one live panel for a whole pipeline); it is
    switched to this stage instead of starting a new one. ``stage_key``: the pipeline's key
    of this stage (pipeline.stage_key), recorded in the run.json beside the outputs.

    Raises:
        PartialFailure: the stage finished but listed failures.
        Whatever ``fn`` raises (a PricingError subclass for user mistakes).
    """
    outputs, inputs = stage_folders(stage, settings)
    with folder_locks(outputs, inputs):
        run_dir = new_run_dir(settings, stage)
        if shared is None:
            monitor = make_monitor(stage, settings, options, run_dir / "memory.jsonl")
            with monitor:
                result = fn(settings, monitor)
        else:
            monitor = shared
            monitor.begin_stage(stage, run_dir / "memory.jsonl")
            result = fn(settings, monitor)
            monitor.check_memory()
        record = run_record(stage, settings, result, monitor, datetime.now().astimezone())
        from pricing_cli.pipeline import key_of

        # A manual run counts for `pricectl pipeline` too: both record the stage key.
        key = stage_key() if stage_key is not None else key_of(stage, settings)
        if key is not None:
            record["stage_key"] = key
        write_json(run_dir / "run.json", record)
        if result.output_dir is not None and Path(result.output_dir).is_dir():
            write_json(Path(result.output_dir) / "run.json", record)
    print_summary(stage, record, result, options, monitor)
    if result.failures:
        raise PartialFailure(f"{stage}: {len(result.failures)} input(s) failed")
    return result


def print_summary(stage: str, record: dict[str, Any], result: StageResult,
                  options: OutputOptions, monitor: RunMonitor) -> None:
    if options.json:
        sys.stdout.write(json.dumps({k: record[k] for k in (
            "stage", "summary", "failures", "elapsed_s", "memory")}, default=str) + "\n")
        return
    if options.quiet:
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"pricectl {stage}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in result.summary.items():
        if isinstance(value, float):
            value = f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        table.add_row(str(key), str(value))
    mem = record["memory"]
    table.add_row("elapsed", f"{record['elapsed_s']:.1f} s")
    table.add_row("peak memory (tree, sampled)", format_bytes(mem["peak_tree_bytes"]))
    table.add_row("peak memory (kernel bound)", format_bytes(mem["kernel_peak_tree_bound_bytes"]))
    if result.output_dir is not None:
        table.add_row("outputs", str(result.output_dir))
    monitor.print(table)
    for note in result.notes:
        monitor.print(Text(note))
    for failure in result.failures[:20]:
        monitor.print(Text.assemble(("failed", "red"), f": {failure}"))
    if len(result.failures) > 20:
        monitor.print(Text(f"... and {len(result.failures) - 20} more (see run.json)"))
