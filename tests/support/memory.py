"""A stage that grows until the memory budget stops it, and the settings with that budget."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pricing_cli.config import Settings, load_settings
from pricing_cli.monitor import read_memory

CHUNK_BYTES = 16 * 1024 * 1024


def grow_until_stopped(monitor: Any) -> None:
    """Hold 16 MiB more every 30 ms, checking the budget each time; the budget must trip
    within 200 chunks (3.2 GiB)."""
    hoard = []
    for _ in range(200):
        hoard.append(np.ones(CHUNK_BYTES // 8))
        monitor.check_memory()
        time.sleep(0.03)
    raise AssertionError("the budget never tripped")


def budget_settings(headroom_mib: int = 200) -> Settings:
    """Default settings whose monitor.max_memory is the process tree now plus ``headroom_mib``,
    sampled every 10 ms."""
    budget = read_memory().tree + headroom_mib * 1024 * 1024
    return load_settings(flags={"monitor.max_memory": str(budget),
                                "monitor.sample_interval_s": 0.01}, environ={})
