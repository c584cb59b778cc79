"""Session fixtures: the tiny markets the stage, kill and recommend tests share, built once.

Both are read-only for tests: copy what you change (tests.support.markets.copy_parts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.markets import build_batches, build_markdown_market, build_trained_market


@pytest.fixture(scope="session")
def tiny_batches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny preset's data/raw, data/features and data/intermediate (3
    batches), from `pricectl pipeline --to preprocess`."""
    return build_batches(tmp_path_factory.mktemp("tiny_batches"))


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory: pytest.TempPathFactory, tiny_batches: Path) -> Path:
    """``tiny_batches``' raw data, processed and trained with a catalog of 9 of its 12
    products: base.yaml, subset_catalog.csv, data/ (features, intermediate, processed) and
    models/r1. Run pricectl there with ``--config base.yaml``."""
    return build_trained_market(tmp_path_factory.mktemp("tiny_market"), tiny_batches)


@pytest.fixture(scope="session")
def tiny_markdown(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's markdown market through the whole pipeline (generate to evaluate):
    markdown.yaml, data/, models/r1, reports/ (tests.support.markets.build_markdown_market)."""
    return build_markdown_market(tmp_path_factory.mktemp("tiny_markdown"))
