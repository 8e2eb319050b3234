"""ONNX Runtime session for the streaming decoder step graph.

``DecoderSession.step(codes [1, K, F]) -> pcm [C, F*hop]``. The state tensors
the manifest declares (convolution caches, overlap-add tails, LSTM state, the
frame counter) are allocated once at their fixed shapes; each step's state
outputs become the next step's inputs, paired by the manifest's ``state``
names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.pack import Pack

_NP = {"float32": np.float32, "int64": np.int64}


class DecoderSession:
    def __init__(self, pack: Pack, options: Any = None, providers: list | None = None) -> None:
        g = pack.decoder
        self.pack = pack
        self.session = pack.session(g, options, providers)
        self.frames_per_step: int = g["frames_per_step"]
        self.lookahead_samples: int = g["lookahead_samples"]
        self._state_inputs = [t for t in g.inputs if t.state]
        self._outputs = ["pcm"] + [t.state for t in self._state_inputs]
        self.state: dict[str, np.ndarray] = {t.name: np.zeros(t.shape, _NP[t.dtype]) for t in self._state_inputs}

    def reset(self) -> None:
        """Back to the start of a stream (silence, pre-roll again)."""
        for v in self.state.values():
            v.fill(0)

    def step(self, codes: np.ndarray) -> np.ndarray:
        """``codes [1, K, F]`` int64 -> ``pcm [C, F*hop]`` float32 (a view of the output)."""
        outs = self.session.run(self._outputs, {"codes": codes, **self.state})
        for t, value in zip(self._state_inputs, outs[1:]):
            self.state[t.name] = value
        return outs[0][0]
