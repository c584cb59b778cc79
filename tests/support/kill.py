"""A monitor that stops training as Ctrl+C would (the resume tests of train)."""

from __future__ import annotations

from pricing_cli.monitor import RunMonitor


class KillAt(RunMonitor):
    """A monitor whose timesteps bar raises Ctrl+C once training passes ``steps``."""

    def __init__(self, steps: int) -> None:
        super().__init__("train", "quiet")
        self.steps = steps

    def update_bar(self, key: str, **kwargs: object) -> None:
        super().update_bar(key, **kwargs)
        if key == "timesteps" and (kwargs.get("completed") or 0) >= self.steps:
            raise KeyboardInterrupt
