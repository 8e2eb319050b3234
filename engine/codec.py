"""ONNX Runtime session for the streaming decoder step graph.

``DecoderSession.step(codes [1, K, F]) -> pcm [C, F * hop]``::

    codes [1, K, F] --+
    *_in (state) -----+--> decoder.onnx --> pcm [1, C, F*hop]
         ^                                  *_out (state)
         |                                        |
         +------------- swap (A <-> B) -----------+

The state tensors the manifest declares (a SEANet's convolution caches,
overlap-add tails, LSTM state and frame counter ``step_in``; the spectral
codec's block caches, accumulated phase and overlap-add tail; whatever a
pack's decoder carries) are allocated twice at their fixed
shapes, A and B. Two IOBindings are built once: A in -> B out, and B in -> A
out; each step runs one and flips, so no state is copied or reallocated.

Latency: ``lookahead_samples`` (a non-causal decoder delays its output so that
streaming equals offline decoding; 0 for a causal one).
"""

from __future__ import annotations

import numpy as np

from engine.lm import session_options
from engine.pack import Pack

_NP = {"float32": np.float32, "int64": np.int64}


class DecoderSession:
    def __init__(self, pack: Pack, threads: int = 1, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        g = pack.decoder
        self.pack = pack
        self.session = pack.session(g, session_options(threads), providers)
        self.frames_per_step: int = g["frames_per_step"]
        self.lookahead_samples: int = g["lookahead_samples"]
        self.codes = np.zeros(g.input("codes").shape, np.int64)  # [1, K, F]
        pcm = g.output("pcm")
        self.pcm = np.zeros(pcm.shape, np.float32)  # [1, C, F*hop]
        states = [t for t in g.inputs if t.state]
        self._a = {t.name: np.zeros(t.shape, _NP[t.dtype]) for t in states}
        self._b = {t.name: np.zeros(t.shape, _NP[t.dtype]) for t in states}
        ov = ort.OrtValue.ortvalue_from_numpy
        self._bindings = []
        for src, dst in ((self._a, self._b), (self._b, self._a)):
            io = self.session.io_binding()
            io.bind_ortvalue_input("codes", ov(self.codes))
            io.bind_ortvalue_output("pcm", ov(self.pcm))
            for t in states:
                io.bind_ortvalue_input(t.name, ov(src[t.name]))
                io.bind_ortvalue_output(t.state, ov(dst[t.name]))
            self._bindings.append(io)
        self._flip = 0
        self.steps = 0

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The state the next step reads, by input name."""
        return self._a if self._flip == 0 else self._b

    def reset(self) -> None:
        """Back to the start of a stream (silence, pre-roll again)."""
        for v in self._a.values():
            v.fill(0)
        for v in self._b.values():
            v.fill(0)
        self._flip = 0
        self.steps = 0

    def step(self, codes: np.ndarray) -> np.ndarray:
        """``codes [1, K, F]`` or ``[K, F]`` int64 -> ``pcm [C, F*hop]`` float32.

        The result is a view of a preallocated buffer, overwritten by the next step.
        """
        self.codes.reshape(-1)[:] = np.asarray(codes).reshape(-1)
        self.session.run_with_iobinding(self._bindings[self._flip])
        self._flip ^= 1
        self.steps += 1
        return self.pcm[0]
