"""`pricectl pipeline`: stage order, skipping what is up to date, --from/--to/--force."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pricing_cli import cli


def pipeline(capsys, *args: str) -> list[str]:
    code = cli.main(["--preset", "tiny", "--no-live", *args])
    err = capsys.readouterr().err
    assert code == 0, err
    # plain mode: "[YYYY-MM-DD HH:MM:SS] pipeline: <stage>: <what>"
    said = [line.split("] ", 1)[1] for line in err.splitlines() if "] pipeline: " in line]
    return [line.removeprefix("pipeline: ") for line in said
            if not line.startswith("pipeline: done")]


def test_pipeline_skips_up_to_date_stages_and_reruns_downstream(tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    monkeypatch.chdir(tmp_path)
    first = pipeline(capsys, "pipeline", "--to", "merge")
    assert first == ["generate: running", "features: running", "preprocess: running",
                     "validate-batches: running", "merge: running"]
    x_train = np.load("data/processed/X_train.npy")
    stats = json.loads(Path("data/processed/preprocessing_stats.json").read_text())
    assert x_train.shape == (stats["samples"]["train"], stats["input_dim"])
    # batches were merged and deleted; their manifest stays as the record
    assert not list(Path("data/intermediate").glob("batch_*.npz"))

    again = pipeline(capsys, "pipeline", "--to", "merge")
    assert again == [f"{s}: up to date, skipped" for s in
                     ("generate", "features", "preprocess", "validate-batches", "merge")]

    # a changed features setting re-runs features and everything after it, not generate
    monkeypatch.setenv("PRICECTL_FEATURES__WINDOWS", "[7, 14]")
    changed = pipeline(capsys, "pipeline", "--to", "merge")
    assert changed == ["generate: up to date, skipped", "features: running",
                       "preprocess: running", "validate-batches: running", "merge: running"]

    # a touched raw file (new mtime) is a changed input
    raw = sorted(Path("data/raw/transactions").glob("transactions_*"))[0]
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    touched = pipeline(capsys, "pipeline", "--from", "features", "--to", "preprocess")
    assert touched == ["features: running", "preprocess: running"]

    forced = pipeline(capsys, "pipeline", "--from", "merge", "--to", "merge", "--force")
    assert forced == ["merge: running"]

    # a generate killed while swapping its market in (marker left) is not up to date
    Path("data/raw/.generate-incomplete").write_text("{}")
    resumed = pipeline(capsys, "pipeline", "--to", "features")
    assert resumed == ["generate: running", "features: running"]
    assert not Path("data/raw/.generate-incomplete").exists()


def test_pipeline_rejects_unknown_or_reversed_stages(tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pipeline", "--from", "featurs"]) == 3
    assert "unknown stage 'featurs'" in capsys.readouterr().err
    assert cli.main(["pipeline", "--from", "merge", "--to", "features"]) == 3
    assert "--from merge comes after --to features" in capsys.readouterr().err


@pytest.mark.parametrize(("stage", "message"), [
    ("merge", "pricectl: missing input: no batch manifest in data/intermediate\n"
              "  hint: Run `pricectl preprocess` first.\n"),
    ("train", "pricectl: missing input: processed file data/processed/preprocessing_stats.json "
              "not found\n  hint: Run `pricectl merge` (after preprocess) to build "
              "data/processed/.\n"),
])
def test_stage_without_its_input_says_which_stage_to_run(stage: str, message: str,
                                                         tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args = [stage] + (["--multi-product"] if stage == "train" else [])
    code = cli.main(["--preset", "tiny", "-q", *args])
    assert (code, capsys.readouterr().err) == (10, message)  # exit 10: missing input


def test_help_lists_the_stages_in_pipeline_order(capsys) -> None:
    from pricing_cli.registry import PIPELINE_NAMES, STAGES

    assert PIPELINE_NAMES == ("generate", "features", "preprocess", "validate-batches", "merge",
                              "train", "evaluate")
    assert [s.name for s in STAGES][-1] == "recommend"  # a stage, not in the pipeline
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert ("runs them all): generate → features → preprocess → validate-batches → merge → "
            "train → evaluate; then" in " ".join(out.split()))
    commands = out[out.index("Commands"):]
    listed = [line.split()[1] for line in commands.splitlines()
              if line.startswith("│ ") and len(line.split()) > 1
              and line.split()[1] in {*PIPELINE_NAMES, "recommend", "pipeline", "config"}]
    assert listed == [*PIPELINE_NAMES, "recommend", "pipeline", "config"]


def test_every_stage_function_named_by_the_registry_exists() -> None:
    from pricing_cli.registry import STAGES, stage_folders

    for stage in STAGES:
        assert callable(stage.load()), stage.name
    settings = cli.load_settings(preset="tiny", environ={})
    assert stage_folders("merge", settings) == ([Path("data/processed"),
                                                 Path("data/intermediate")], [])
    assert stage_folders("pipeline", settings) == ([], [])
