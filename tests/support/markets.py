"""Tiny markets built through the CLI, once per test session (tests/conftest.py), and the
helpers to copy them into a test's own folder.

The session builds each market once; a test that writes must work on a copy
(:func:`copy_parts`), never in the session folder itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The trained market prices 9 of the tiny preset's 12 products (a subset catalog), as
# tests/test_recommend.py needs; runs go to models/r1 without TensorBoard.
PRICED = [f"P{i:05d}" for i in range(1, 10)]
BASE_CONFIG = "base.yaml"
BASE = "train:\n  tensorboard: false\n  run_id: r1\ndata:\n  catalog: subset_catalog.csv\n"


@contextmanager
def working_dir(folder: Path) -> Iterator[Path]:
    """Run the block with ``folder`` as the working directory (session fixtures cannot use
    the function-scoped ``monkeypatch``)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def pricectl(folder: Path, *args: str) -> None:
    """``pricectl --preset tiny -q <args>`` in-process in ``folder``; fails on a non-zero exit."""
    from pricing_cli import cli

    with working_dir(folder):
        code = cli.main(["--preset", "tiny", "-q", *args])
    assert code == 0, f"pricectl {' '.join(args)} exited {code} in {folder}"


def build_batches(folder: Path) -> Path:
    """`pipeline --to preprocess` on the tiny preset in ``folder``: data/raw (12 products,
    120 days), data/features and data/intermediate (3 batches and their manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    pricectl(folder, "--no-live", "pipeline", "--to", "preprocess")
    return folder


def build_trained_market(folder: Path, raw_from: Path) -> Path:
    """The raw data of ``raw_from`` copied into ``folder``, a catalog of the 9 products of
    :data:`PRICED`, then `pipeline --from features --to train` with :data:`BASE`: features,
    batches, data/processed and models/r1 (the tiny preset's training)."""
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    copy_parts(raw_from, folder, "data/raw")
    (folder / BASE_CONFIG).write_text(BASE)
    catalog = pl.read_csv(folder / "data/raw/catalog.csv")
    catalog.filter(pl.col("product_id").is_in(PRICED)).write_csv(folder / "subset_catalog.csv")
    pricectl(folder, "--config", BASE_CONFIG, "pipeline", "--from", "features", "--to", "train")
    return folder


def copy_parts(source: Path, dest: Path, *parts: str) -> Path:
    """Copy ``parts`` (paths relative to ``source``: folders or files; none: everything) into
    ``dest``, keeping modification times, so stages see the inputs the session built."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts or tuple(p.name for p in source.iterdir()):
        src, dst = source / part, dest / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return dest


# The tiny preset's markdown market (configs/scenarios/markdown.yaml) with seasons as long as
# its val and test splits (18 days each), so val holds one whole season as in the bench, and
# 16 transactions a day so 120 days fit a usable demand model; runs go to models/r1.
MARKDOWN_CONFIG = "markdown.yaml"
MARKDOWN = ("generate:\n  mean_transactions_per_day: 16.0\n  scenario:\n"
            "    inventory: markdown\n    season_days: 18\n"
            "data:\n  stock: data/raw/stock.csv\n"
            "train:\n  tensorboard: false\n  run_id: r1\n")


def build_markdown_market(folder: Path) -> Path:
    """The whole pipeline (generate to evaluate) of :data:`MARKDOWN` in ``folder``: data/,
    models/r1 and reports/. Run pricectl there with ``--config markdown.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKDOWN_CONFIG).write_text(MARKDOWN)
    pricectl(folder, "--config", MARKDOWN_CONFIG, "--no-live", "pipeline")
    return folder
