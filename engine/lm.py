"""ONNX Runtime session for one LM step; the KV cache lives in preallocated OrtValues.

Per step (``B`` = 2 rows: conditioned and null, ``K`` codebooks, ``V`` card,
``L`` layers, ``H`` heads, ``S`` ring slots, ``Dh`` head dim, ``Tc`` text slots)::

    tokens [B, K] ---------+
    rope / position -------+--> lm.onnx --> logits [B, K, V]
    cache_k_l, cache_v_l --+                new_k, new_v [L, B, H, 1, Dh]
    [B, H, S, Dh] x L      |                    |
    cache_mask [1, S] -----+                    +--> written into slot pos % S
    cross_k_l, cross_v_l --+                         (numpy, in place)
    cross_mask [B, Tc] ----+

Every tensor is allocated once. The caches are two numpy arrays
``[L, B, H, S, Dh]`` whose per-layer slices are bound to the graph inputs
through an IOBinding (CPU OrtValues share the numpy memory), so writing this
step's keys into their slot is one numpy assignment and nothing is copied or
reallocated between steps. Outputs are bound to preallocated arrays as well.

Packs with a rotary LM (ours) stream forever on the ring: a step at frame 10
million costs what a step at frame 10 costs. Packs with learned/sinusoidal
absolute positions (converted MusicGen) can only see positions below
``max_positions``; before the stream gets there, a second cache set is
*re-primed* in the background: the last ``P`` input columns are replayed into
it from position 0, two replay steps per real step, and the stream switches to
it once it has caught up. The audio never stops and the switch keeps the
recent context, so there is no gap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.pack import Pack

NEG = float(np.finfo(np.float32).min)

# Re-priming runs this many replay steps per real step (must be >= 2 to catch up).
REPRIME_RATE = 2


def session_options(threads: int) -> Any:
    """ONNX Runtime options the engine uses everywhere: fixed threads, no spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads make two sessions on two cores slow each other badly.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Rotary frequencies ``theta ** (-2 i / Dh)`` for ``i < Dh/2``, float64 ``[Dh/2]``."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    return theta ** (-2.0 * i / head_dim)


def rope_tables(position: int, inv_freq: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Fill ``cos, sin [1, Dh/2]`` for ``position`` (float64 angles: exact for billions of frames)."""
    ang = float(position) * inv_freq
    cos[0] = np.cos(ang)
    sin[0] = np.sin(ang)


class _CacheSet:
    """One KV ring: caches ``[L, B, H, S, Dh]``, mask ``[1, S]``, inputs and an IOBinding."""

    def __init__(self, owner: LMSession) -> None:
        o = owner
        shape = (o.layers, o.batch, o.heads, o.slots, o.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.mask = np.full((1, o.slots), NEG, np.float32)
        self.tokens = np.full((o.batch, o.k), o.special, np.int64)
        self.position = np.zeros(1, np.int64)
        self.rope_cos = np.zeros((1, o.head_dim // 2), np.float32)
        self.rope_sin = np.zeros((1, o.head_dim // 2), np.float32)
        self.pos = 0  # position of the next step
        arrays: dict[str, np.ndarray] = {"tokens": self.tokens, "cache_mask": self.mask}
        if o.sinusoidal:
            arrays["position"] = self.position
        else:
            arrays["rope_cos"], arrays["rope_sin"] = self.rope_cos, self.rope_sin
        for layer in range(o.layers):
            arrays[f"cache_k_{layer}"] = self.k[layer]
            arrays[f"cache_v_{layer}"] = self.v[layer]
        arrays.update(o.cross_arrays)
        self.binding = o.bind(arrays)

    def reset(self) -> None:
        self.k.fill(0.0)
        self.v.fill(0.0)
        self.mask.fill(NEG)
        self.pos = 0


class LMSession:
    """Steps the pack's LM graph; owns the ring KV cache and the cross-attention inputs.

    ``step(column [K]) -> logits [B, K, V]`` (a preallocated array, overwritten
    by the next step). ``set_condition`` writes the conditioned row of the
    cross-attention inputs; row 1 is the null condition, fixed.
    """

    def __init__(self, pack: Pack, threads: int = 1, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        g = pack.lm
        self.pack = pack
        self.session = pack.session(g, session_options(threads), providers)
        self._ort = ort
        self.layers: int = g["layers"]
        self.heads: int = g["heads"]
        self.head_dim: int = g["head_dim"]
        self.slots: int = g["context"]
        self.batch: int = g["batch"]
        self.sinusoidal = g["positions"] == "sinusoidal"
        self.max_positions: int = int(g["max_positions"]) if self.sinusoidal else 0
        self._rope_inv = rope_inv_freq(self.head_dim, float(g.params.get("rope_theta", 10000.0)))
        self.k = pack.codebooks.count
        self.special = pack.codebooks.special_token
        card = pack.codebooks.cardinality
        self.has_cross = g.input("cross_mask") is not None
        text_len = int(pack.conditioner["max_tokens"])

        # Cross-attention inputs, shared by both cache sets. Row 1 stays null.
        self.cross_k = np.zeros((self.layers, self.batch, self.heads, text_len, self.head_dim), np.float32)
        self.cross_v = np.zeros_like(self.cross_k)
        self.cross_mask = np.full((self.batch, text_len), NEG, np.float32)
        self.cross_arrays: dict[str, np.ndarray] = {}
        if self.has_cross:
            for layer in range(self.layers):
                self.cross_arrays[f"cross_k_{layer}"] = self.cross_k[layer]
                self.cross_arrays[f"cross_v_{layer}"] = self.cross_v[layer]
            self.cross_arrays["cross_mask"] = self.cross_mask

        # Outputs, shared: logits are consumed before the next run.
        self.logits = np.zeros((self.batch, self.k, card), np.float32)
        self.new_k = np.zeros((self.layers, self.batch, self.heads, 1, self.head_dim), np.float32)
        self.new_v = np.zeros_like(self.new_k)
        self._outputs = {"logits": self.logits, "new_k": self.new_k, "new_v": self.new_v}

        self._main = _CacheSet(self)
        self._shadow: _CacheSet | None = None
        # Re-priming state (absolute-position packs only).
        self.prime_len = min(self.slots, self.max_positions // 4) if self.max_positions else 0
        if self.max_positions and self.prime_len < 1:
            raise ValueError(f"{g.file}: max_positions {self.max_positions} is too small to stream")
        self._hist = np.full((max(self.prime_len, 1) + 1, self.k), self.special, np.int64)  # input columns
        self.steps = 0  # real steps since reset
        self._replay_next = -1  # history step index the shadow consumes next (-1: not priming)
        self.reprimes = 0
        self.replay_start = 0  # first history step the last re-prime replayed

    # ------------------------------------------------------------------ binding

    def bind(self, arrays: dict[str, np.ndarray]) -> Any:
        io = self.session.io_binding()
        ov = self._ort.OrtValue.ortvalue_from_numpy
        for name, arr in arrays.items():
            assert arr.flags.c_contiguous, name
            io.bind_ortvalue_input(name, ov(arr))
        for name, arr in self._outputs.items():
            io.bind_ortvalue_output(name, ov(arr))
        return io

    # ------------------------------------------------------------------ conditioning

    def set_condition(self, cross_k: np.ndarray, cross_v: np.ndarray, mask: np.ndarray) -> None:
        """Conditioned row: ``cross_k, cross_v [L, H, Tc, Dh]``, additive ``mask [Tc]``.

        Takes effect at the next step; the self-attention cache is kept.
        """
        if not self.has_cross:
            return
        self.cross_k[:, 0] = cross_k
        self.cross_v[:, 0] = cross_v
        self.cross_mask[0] = mask

    # ------------------------------------------------------------------ stepping

    @property
    def position(self) -> int:
        """Position the next real step runs at."""
        return self._main.pos

    def reset(self) -> None:
        """Forget the context (a new stream); the condition is kept."""
        self._main.reset()
        if self._shadow is not None:
            self._shadow.reset()
        self._hist.fill(self.special)
        self.steps = 0
        self._replay_next = -1

    def _run(self, cs: _CacheSet, column: np.ndarray) -> None:
        cs.tokens[:] = column
        pos = cs.pos
        if self.sinusoidal:
            cs.position[0] = pos
        else:
            rope_tables(pos, self._rope_inv, cs.rope_cos, cs.rope_sin)
        self.session.run_with_iobinding(cs.binding)
        slot = pos % self.slots
        cs.k[:, :, :, slot] = self.new_k[:, :, :, 0]
        cs.v[:, :, :, slot] = self.new_v[:, :, :, 0]
        cs.mask[0, slot] = 0.0
        cs.pos = pos + 1

    def step(self, column: np.ndarray) -> np.ndarray:
        """Run one step on input ``column [K]`` (int64); return ``logits [B, K, V]``."""
        n = self.steps
        if self.max_positions:
            self._hist[n % self._hist.shape[0]] = column
            self._reprime(n)
        self._run(self._main, column)
        self.steps = n + 1
        return self.logits

    def _reprime(self, n: int) -> None:
        """Before real step ``n``: start, advance or finish re-priming the shadow cache.

        The shadow replays input columns ``n0 - P .. n - 1`` from position 0,
        ``REPRIME_RATE`` per real step; once it has replayed column ``n - 1`` it
        becomes the main set and step ``n`` runs on it.
        """
        p = self.prime_len
        if self._replay_next < 0:
            if self._main.pos < self.max_positions - p - 1:
                return
            if self._shadow is None:
                self._shadow = _CacheSet(self)
            self._shadow.reset()
            self._replay_next = self.replay_start = max(0, n - p)
        shadow = self._shadow
        assert shadow is not None
        depth = self._hist.shape[0]
        for _ in range(REPRIME_RATE):
            if self._replay_next >= n:
                break
            self._run(shadow, self._hist[self._replay_next % depth])
            self._replay_next += 1
        if self._replay_next >= n:
            self._main, self._shadow = shadow, self._main
            self._replay_next = -1
            self.reprimes += 1
