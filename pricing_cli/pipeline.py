"""`pricectl pipeline`: every stage in order, skipping those that are already up to date.

A stage is up to date, the way `dvc repro` decides it, when the run.json beside its outputs
records the same *stage key*: a digest of the pricectl version, the config sections the
stage reads, and the identity of its inputs. For `features` the inputs are the raw files
(path, size, mtime); for every later stage they are the upstream stage's run.json, so a
re-run upstream re-runs everything downstream.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pricing_cli import __version__
from pricing_cli.config import Settings
from pricing_cli.errors import ConfigError
from pricing_cli.registry import PIPELINE, PIPELINE_NAMES, Stage, stage
from pricing_cli.storage import fingerprint_files

# run_stage(name, settings, stage_key): runs one stage; stage_key() is the key to record in
# the run.json beside its outputs, computed once the stage's work is done.
RunFn = Callable[[str, Settings, Callable[[], str | None]], None]
STAGES = PIPELINE
STAGE_NAMES = PIPELINE_NAMES


def stage_key(step: Stage, settings: Settings) -> str | None:
    """The digest that decides whether ``step`` must run; None if its inputs are missing."""
    if step.name == "features":
        files = sorted(glob.glob(settings.data.transactions)) + [settings.data.catalog]
        if not all(Path(f).is_file() for f in files):
            return None
        inputs: Any = fingerprint_files(files)
    elif step.upstream is not None:
        folder = stage(step.upstream).output(settings)
        record = None if folder is None else folder / "run.json"
        if record is None or not record.is_file():
            return None
        inputs = hashlib.sha256(record.read_bytes()).hexdigest()
    else:
        inputs = None
    payload = {
        "version": __version__,
        "config": {s: settings.section_fingerprint(s) for s in step.key_sections},
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def key_of(name: str, settings: Settings) -> str | None:
    """The stage key of the pipeline stage called ``name``; None for a command the pipeline
    does not run, or while its inputs are missing. Every run of a stage records it, typed
    alone or in a pipeline, so `pricectl pipeline` skips what a manual run made up to date."""
    stage = next((s for s in STAGES if s.name == name), None)
    return None if stage is None else stage_key(stage, settings)


def recorded_key(step: Stage, settings: Settings) -> str | None:
    """The stage key of the run.json beside the stage's outputs; None if there is none or the
    folder is a half-replaced generated market (its run.json is the earlier run's)."""
    from pricing_cli.data.raw_contract import INCOMPLETE_MARKER

    folder = step.output(settings)
    if folder is None or not (folder / "run.json").is_file():
        return None
    if (folder / INCOMPLETE_MARKER).exists():
        return None
    try:
        record = json.loads((folder / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not outputs_intact(folder, record.get("outputs")):
        return None
    return record.get("stage_key")


def outputs_intact(folder: Path, outputs: Any) -> bool:
    """True when every output that run.json recorded is still there with its size: a run
    stopped half-way, or a file deleted by hand, makes the stage run again."""
    if not isinstance(outputs, dict):
        return False
    for name, size in outputs.items():
        path = folder / str(name)
        try:
            if not path.is_file() or path.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def plan(settings: Settings, start: str | None, stop: str | None, force: bool,
         with_generate: bool) -> list[Stage]:
    """The stages between --from and --to, in order."""
    for name in (start, stop):
        if name is not None and name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage '{name}'", f"Stages: {', '.join(STAGE_NAMES)}.")
    names = list(STAGE_NAMES)
    first = names.index(start) if start else (0 if with_generate else 1)
    last = names.index(stop) if stop else len(names) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop}",
                          f"Stages run in this order: {' → '.join(STAGE_NAMES)}.")
    return list(STAGES[first:last + 1])


def run_pipeline(settings: Settings, run_stage: RunFn, log: Callable[[str], None], *,
                 start: str | None = None, stop: str | None = None, force: bool = False,
                 with_generate: bool = True) -> list[tuple[str, str]]:
    """Run the planned stages; returns (stage, 'ran' | 'skipped (up to date)') pairs.

    ``run_stage(name, settings, key)`` runs one stage (the CLI passes its own stage runner,
    so each stage behaves exactly as when typed alone); ``key()`` gives the stage key that
    run.json records, so run.json is written once. validate-batches always runs when
    preprocess or merge runs, and is skipped with them otherwise.
    """
    outcome: list[tuple[str, str]] = []
    ran_upstream = False
    stages = plan(settings, start, stop, force, with_generate)
    for step in stages:
        key_before = stage_key(step, settings)
        up_to_date = (not force and not ran_upstream and key_before is not None
                      and key_before == recorded_key(step, settings))
        if up_to_date and step.name == "preprocess" and _merge_needs_batches(stages, settings):
            up_to_date = False  # merge must re-run and its batches were deleted: rebuild them
        if step.name == "validate-batches":
            # It has no outputs of its own: it runs exactly when the batches are new.
            up_to_date = not ran_upstream and not force
        if up_to_date:
            log(f"{step.name}: up to date, skipped")
            outcome.append((step.name, "skipped (up to date)"))
            continue
        log(f"{step.name}: running")
        run_stage(step.name, settings, functools.partial(stage_key, step, settings))
        ran_upstream = True
        outcome.append((step.name, "ran"))
    return outcome


def _merge_needs_batches(stages: list[Stage], settings: Settings) -> bool:
    """True when merge is planned, is not up to date, and a batch it needs is gone (merge
    deletes the batches it merged, so a merge re-run needs preprocess again)."""
    merge = next((s for s in stages if s.name == "merge"), None)
    if merge is None:
        return False
    key = stage_key(merge, settings)
    if key is not None and key == recorded_key(merge, settings):
        return False
    folder = Path(settings.preprocess.output_dir)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        names = [str(b["name"]) for b in manifest["batches"]]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return not all((folder / Path(name).name).is_file() for name in names)
