"""Token sampling: classifier-free guidance, temperature, top-k, top-p.

One LM step returns ``logits [B=2, K, V]``: row 0 conditioned on the prompt,
row 1 on the null condition. Guidance mixes them per codebook,

    guided = uncond + (cond - uncond) * guidance      (guidance 1 = cond alone)

then each of the ``K`` codebooks draws one token from the guided logits,
filtered by top-k and top-p and sharpened or flattened by temperature.
Temperature 0 (or top-k 1) is greedy.

Randomness comes from a ``numpy.random.Generator`` the caller owns and seeds,
so a stream is reproducible from its seed: every step consumes exactly ``K``
uniforms whatever the settings, which keeps later steps aligned when the
settings change mid-stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_kernel = None  # _draw compiled by numba, made on first use (see _draw_kernel)


@dataclass(frozen=True)
class SamplingParams:
    """Per-step sampling settings (a snapshot; replace it, don't mutate it)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 250  # 0 = no top-k filter
    top_p: float = 0.0  # 0 = no nucleus filter; else keep the smallest set with mass >= top_p
    guidance: float = 3.0  # classifier-free guidance scale; 1 = conditioned row only

    def checked(self) -> SamplingParams:
        """Raise ValueError naming the bad field; return self."""
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in 0..1 (0 = off), got {self.top_p}")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        return self


def guide(logits: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """``logits [2, K, V]`` (cond, uncond) -> guided ``[K, V]`` float32."""
    cond, uncond = logits[0], logits[1]
    if out is None:
        out = np.empty_like(cond)
    np.subtract(cond, uncond, out=out)
    out *= np.float32(scale)
    out += uncond
    return out


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Draw one token per codebook.

    logits: ``[K, V]`` float32 (already guided).
    Returns ``tokens [K]`` int64. Consumes exactly ``K`` uniforms from ``rng``.
    """
    k_books, vocab = logits.shape
    u = rng.random(k_books)
    if params.temperature <= 0.0 or params.top_k == 1:
        return np.argmax(logits, axis=-1).astype(np.int64)
    top_k = vocab if params.top_k <= 0 else min(params.top_k, vocab)
    out = np.empty(k_books, np.int64)
    draw = _kernel or _draw_kernel()
    draw(np.ascontiguousarray(logits, np.float32), u, float(params.temperature), top_k, float(params.top_p), out)
    return out


def _draw_kernel() -> Any:
    """:func:`_draw` compiled by numba (or loaded from its disk cache).

    Made on first use, not at import: importing numba takes about 0.4 s, and `cicada play` imports this
    module before it starts the audio process, whose start-up it would otherwise delay.
    """
    global _kernel
    if _kernel is None:
        from engine.post import njit

        _kernel = njit(cache=True, nogil=True)(_draw)
    return _kernel


def _draw(logits: np.ndarray, u: np.ndarray, temperature: float, top_k: int, top_p: float, out: np.ndarray) -> None:
    """Per codebook: the ``top_k`` best logits in descending order (ties: lower index first), softmax at
    ``temperature``, the nucleus cut at ``top_p`` (0 or 1 = off), then the token where the CDF passes ``u``."""
    k_books, vocab = logits.shape
    probs = np.empty(top_k, np.float64)
    cand = np.empty(top_k, np.int64)
    for b in range(k_books):
        row = logits[b]
        # the top_k candidates in index order (a partition, not a sort of the whole row) ...
        kth = np.partition(row, vocab - top_k)[vocab - top_k] if top_k < vocab else row.min()
        c = 0
        for j in range(vocab):
            if row[j] > kth:
                cand[c] = j
                c += 1
        for j in range(vocab):
            if c == top_k:
                break
            if row[j] == kth:
                cand[c] = j
                c += 1
        if c == 0:  # nothing comparable (NaN logits): token 0; the stream's NaN guard deals with the rest
            out[b] = 0
            continue
        # ... then sorted by descending logit (stable: equal logits keep index order)
        order = cand[:c][np.argsort(-row[cand[:c]], kind="mergesort")]
        best = row[order[0]]
        total = 0.0
        for j in range(c):
            p = np.exp((np.float64(row[order[j]]) - best) / temperature)
            probs[j] = p
            total += p
        n = c
        if 0.0 < top_p < 1.0:
            # keep tokens up to and including the one that brings the mass to top_p
            mass = 0.0
            for j in range(c):
                if mass >= top_p * total:
                    n = j
                    break
                mass += probs[j]
            total = mass
        target = u[b] * total
        acc = 0.0
        pick = n - 1
        for j in range(n):
            acc += probs[j]
            if acc > target:
                pick = j
                break
        out[b] = order[pick]


def warmup() -> None:
    """Compile (or load from numba's disk cache) the sampling kernel now, not at the first step."""
    rng = np.random.default_rng(0)
    sample(np.zeros((1, 4), np.float32), SamplingParams(top_k=2), rng)
