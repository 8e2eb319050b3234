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

import numpy as np


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
    if top_k < vocab:
        idx = np.argpartition(logits, vocab - top_k, axis=-1)[:, vocab - top_k :]  # [K, top_k], unordered
        vals = np.take_along_axis(logits, idx, axis=-1)
    else:
        idx = np.broadcast_to(np.arange(vocab), logits.shape)
        vals = logits
    # Sort candidates by descending logit so top-p and the CDF walk are deterministic.
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=-1)
    vals = np.take_along_axis(vals, order, axis=-1).astype(np.float64) / params.temperature
    vals -= vals[:, :1]
    probs = np.exp(vals)
    probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    if 0.0 < params.top_p < 1.0:
        # Keep tokens up to and including the one that brings the mass to top_p.
        keep = (cdf - probs) < params.top_p
        probs = np.where(keep, probs, 0.0)
        cdf = np.cumsum(probs, axis=-1)
    cdf /= cdf[:, -1:]
    pick = np.minimum((cdf < u[:, None]).sum(axis=-1), cdf.shape[-1] - 1)
    return idx[np.arange(k_books), pick].astype(np.int64)
