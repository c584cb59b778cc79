"""Streaming-engine plan checks shared by the features tests."""

from __future__ import annotations

import polars as pl


def fallback_nodes(query: pl.LazyFrame) -> list[str]:
    """Nodes of the streaming physical plan that fall back to the in-memory engine.

    ``show_graph(engine="streaming", plan_stage="physical", raw_output=True)`` returns the
    dot source of the plan; polars 2.1 labels a fallback node "in-memory-map" and fills it
    with the legend's fallback colour "0.0 0.3 1.0" (memory-intensive streaming nodes, such as
    windows or an in-memory DataFrame source, are "0.16 0.3 1.0" and are not fallbacks).
    """
    dot = query.show_graph(engine="streaming", plan_stage="physical", raw_output=True)
    assert dot and "in-memory engine fallback" in dot  # the legend: this is the right output
    nodes = [line for line in dot.splitlines() if "[label=" in line]
    return [n for n in nodes if 'label="in-memory-map' in n or 'fillcolor="0.0 0.3 1.0"' in n]
