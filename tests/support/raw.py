"""The raw-data fixtures (tests/fixtures/raw) and data settings pointing at their catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pricing_cli.config import DataSettings, load_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "raw"
CATALOG = FIXTURES / "catalog.csv"


def data_settings(**flags: Any) -> DataSettings:
    """The tiny preset's ``data`` section with the fixture catalog and ``flags`` (data.*)."""
    flags = {"data.catalog": str(CATALOG), **{f"data.{k}": v for k, v in flags.items()}}
    return load_settings(preset="tiny", flags=flags, environ={}).data
