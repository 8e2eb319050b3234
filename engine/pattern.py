"""Codebook delay pattern, streaming: LM columns in, complete frames out.

The LM predicts one *column* of the delayed grid per step. Codebook ``k`` runs
``delays[k]`` frames behind codebook 0, so column ``c`` holds codebook ``k`` of
frame ``c - delays[k]``. With MusicGen's delays ``[0, 1, 2, 3]`` (``S`` is the
special token, ``aN`` codebook 0 of frame N, ...)::

    step / column   0   1   2   3   4   5
    k0              a0  a1  a2  a3  a4  a5
    k1              S   b0  b1  b2  b3  b4
    k2              S   S   c0  c1  c2  c3
    k3              S   S   S   d0  d1  d2
                                ^ frame 0 complete after column 3
                                    (max(delays) = 3 columns = 60 ms at 50 Hz)

The LM's input at step ``t`` is column ``t - 1`` (an all-``S`` column before the
first step). Cells above the diagonal, where ``c < delays[k]``, are forced to
``S`` whatever was sampled. After the first ``max(delays)`` columns, every
column completes exactly one frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class DelayPattern:
    """Streaming delay pattern for ``K`` codebooks.

    ``push(column [K]) -> frame [K] | None``; ``input_column`` is the LM input
    for the next step ``[K]`` (a view; copy it if you keep it).
    """

    def __init__(self, delays: Sequence[int], special: int) -> None:
        if not delays or min(delays) < 0:
            raise ValueError(f"delays must be a non-empty list of ints >= 0, got {list(delays)}")
        self.delays = np.asarray(delays, dtype=np.int64)
        self.special = int(special)
        self.k = len(delays)
        self.max_delay = int(self.delays.max())
        depth = self.max_delay + 1
        self._hist = np.full((depth, self.k), self.special, dtype=np.int64)  # ring of the last columns
        self._books = np.arange(self.k)
        self.columns = 0  # columns pushed so far
        self.input_column = np.full(self.k, self.special, dtype=np.int64)

    @property
    def latency_frames(self) -> int:
        """Columns between codebook 0 of a frame and the frame being complete."""
        return self.max_delay

    def reset(self) -> None:
        self._hist.fill(self.special)
        self.columns = 0
        self.input_column.fill(self.special)

    def push(self, column: np.ndarray) -> np.ndarray | None:
        """Take the column just sampled ``[K]``; return the frame it completes ``[K]`` or None."""
        c = self.columns
        col = np.where(c < self.delays, self.special, column)
        depth = self._hist.shape[0]
        self._hist[c % depth] = col
        self.input_column[:] = col
        self.columns = c + 1
        f = c - self.max_delay  # frame completed by this column
        if f < 0:
            return None
        # codebook k of frame f sits in column f + delays[k]
        return self._hist[(f + self.delays) % depth, self._books].copy()
