"""A sink for tests: keeps every block it is given (like a file, it never has anything queued)."""

from __future__ import annotations

from typing import Any

import numpy as np


class ListSink:
    """Keeps every block; never has anything queued (like a file)."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate, self.channels = rate, channels
        self.blocks: list[np.ndarray] = []

    def start(self) -> None:
        pass

    def queued(self) -> int:
        return 0

    def write(self, block: np.ndarray) -> None:
        self.blocks.append(block.copy())

    def stats(self) -> dict[str, Any]:
        return {}

    def stop(self, fade: bool = True) -> None:
        pass

    def audio(self) -> np.ndarray:
        return np.concatenate(self.blocks)
