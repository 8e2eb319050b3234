"""MusicGen-compatible token language model, its delay pattern and its ONNX step graph.

The model (:class:`LM`) follows MusicGen's decoder: ``K`` codebook embedding
tables summed into one vector per frame, positions (MusicGen's sinusoidal table,
or rotary embeddings for cicada's own models), pre-norm decoder layers
(causal self-attention, cross-attention to the text conditioning, GELU FFN), a
final LayerNorm and ``K`` linear heads. The special token (BOS and delay pad)
is ``card``, so each embedding table has ``card + 1`` rows.

:class:`LMStep` is the graph the engine runs once per frame. Its KV cache is a
fixed ring of ``S`` slots that the engine owns: the graph reads it, and returns
only the new key and value, which the engine writes into slot
``position % S``. Constant cost per step, forever.

Masks are additive and use ``torch.finfo(float32).min`` (never ``-inf``): a
row whose keys are all masked then attends uniformly instead of producing NaN,
which is what transformers does for the classifier-free-guidance null
condition (zero hidden states, zero attention mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.lm import rope_inv_freq
from export.onnx import GraphSpec, TensorSpec

NEG: float = float(torch.finfo(torch.float32).min)
"""Additive mask value for a masked key (float32 min, never -inf)."""

POSITION_KINDS = ("sinusoidal", "rotary")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


# --------------------------------------------------------------------------- config


@dataclass
class LMConfig:
    """Shape and options of an :class:`LM`.

    ``card`` is the codebook size; the special token (BOS / delay pad) is
    ``card`` itself. ``cross_dim`` is the width of the conditioning hidden
    states fed to cross-attention (after any projection); ``None`` means
    ``dim``. ``max_positions`` is the sinusoidal table length the model was
    trained for (kept for the manifest; the graph computes the table entry from
    the position, so it never indexes out of range).
    """

    dim: int = 256
    layers: int = 16
    heads: int = 8
    ffn_dim: int = 1024
    n_codebooks: int = 4
    card: int = 2048
    positions: str = "rotary"
    max_positions: int = 2048
    rope_theta: float = 10000.0
    cross_dim: int | None = None
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = False
    scale_embedding: bool = False
    cross_attention: bool = True
    text_input: bool = False  # also add the pooled text to every frame's input (see LM.text_offset)

    def __post_init__(self) -> None:
        if self.cross_dim is None:
            self.cross_dim = self.dim
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"LMConfig.positions={self.positions!r}: expected one of {POSITION_KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LMConfig.activation={self.activation!r}: expected one of {ACTIVATIONS}")
        if self.dim % self.heads:
            raise ValueError(f"LMConfig.dim={self.dim} is not divisible by heads={self.heads}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.text_input and not self.cross_attention:
            raise ValueError("LMConfig.text_input needs cross_attention: the pooled text is read from it")
        if self.positions == "sinusoidal" and (self.dim % 2 or self.dim < 4):
            raise ValueError(f"sinusoidal positions need an even dim >= 4, got {self.dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def special(self) -> int:
        """The BOS / pad token id (== card)."""
        return self.card


# --------------------------------------------------------------------------- positions


def sinusoidal_inv_freq(dim: int) -> torch.Tensor:
    """MusicGen's sinusoid frequencies ``[dim // 2]`` float32: exp(-i * log(10000) / (half - 1))."""
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    return torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)


def sinusoidal_embedding(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Sinusoidal position vectors ``[..., dim]`` for integer ``positions [...]``.

    Same values as MusicGen's table row ``positions``: ``[cos(p * f), sin(p * f)]``
    computed in float32.
    """
    ang = positions.float().unsqueeze(-1) * inv_freq
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def rope_cos_sin(positions: int | Sequence[int] | np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Rotary tables ``cos, sin`` of shape ``[P, head_dim // 2]`` (float32).

    ``angle_i = p * theta ** (-2 i / head_dim)``, computed in float64 so that an
    absolute position in the billions (weeks at 50 Hz) keeps full precision.
    The engine computes the step graph's ``rope_cos`` / ``rope_sin`` this way
    (numpy only), with ``P == 1``.
    """
    pos = np.atleast_1d(np.asarray(positions, dtype=np.float64))
    ang = pos[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, Dh]`` by ``cos, sin [T, Dh/2]`` (half-split convention).

    ``x1 = x[..., :Dh/2], x2 = x[..., Dh/2:]`` ->
    ``cat(x1 cos - x2 sin, x1 sin + x2 cos)``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# --------------------------------------------------------------------------- delay pattern


def apply_delay(codes: torch.Tensor, delays: Sequence[int], special: int) -> torch.Tensor:
    """Shift codebook ``k`` right by ``delays[k]`` frames, filling with ``special``.

    ``codes [B, K, T] -> [B, K, T + max(delays)]``, ``out[:, k, t + d_k] = codes[:, k, t]``.
    MusicGen's delays ``[0, 1, 2, 3]`` with ``T = 4`` (``S`` = special)::

        codes            delayed
        k0: a0 a1 a2 a3  a0 a1 a2 a3 S  S  S
        k1: b0 b1 b2 b3  S  b0 b1 b2 b3 S  S
        k2: c0 c1 c2 c3  S  S  c0 c1 c2 c3 S
        k3: d0 d1 d2 d3  S  S  S  d0 d1 d2 d3

    The LM reads one column of the delayed grid per step (preceded by an
    all-``S`` BOS column) and predicts the next column, so codebook ``k`` of
    frame ``t`` is predicted knowing codebooks ``< k`` of the same frame.
    """
    if codes.dim() != 3 or codes.shape[1] != len(delays):
        raise ValueError(f"codes must be [B, K={len(delays)}, T], got {tuple(codes.shape)}")
    if min(delays) < 0:
        raise ValueError(f"delays must be >= 0, got {list(delays)}")
    b, k, t = codes.shape
    out = codes.new_full((b, k, t + max(delays)), special)
    for i, d in enumerate(delays):
        out[:, i, d : d + t] = codes[:, i]
    return out


def revert_delay(delayed: torch.Tensor, delays: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`apply_delay`: ``[B, K, T'] -> [B, K, T' - max(delays)]``.

    ``codes[:, k, t] = delayed[:, k, t + d_k]`` (the special fill is dropped).
    """
    if delayed.dim() != 3 or delayed.shape[1] != len(delays):
        raise ValueError(f"delayed must be [B, K={len(delays)}, T], got {tuple(delayed.shape)}")
    t = delayed.shape[-1] - max(delays)
    if t < 0:
        raise ValueError(f"{delayed.shape[-1]} frames are fewer than the largest delay {max(delays)}")
    return torch.stack([delayed[:, i, d : d + t] for i, d in enumerate(delays)], dim=1)


# --------------------------------------------------------------------------- layers


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with an additive mask.

    ``q [B, H, Tq, Dh]``, ``k, v [B, H, Tk, Dh]``, ``mask`` broadcastable to
    ``[B, H, Tq, Tk]`` -> ``[B, H, Tq, Dh]``.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


class Attention(nn.Module):
    """Multi-head attention projections; ``kv_dim`` is the key/value source width."""

    def __init__(self, dim: int, heads: int, kv_dim: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H * Dh] -> [B, H, T, Dh]``."""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, Dh] -> [B, T, H * Dh]`` then the output projection."""
        b, h, t, d = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(b, t, h * d))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, kv_dim] -> k, v [B, H, T, Dh]`` (no rotary)."""
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention, FFN."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.heads, cfg.dim, cfg.bias)
        self.has_cross = cfg.cross_attention
        if cfg.cross_attention:
            self.cross_attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
            self.cross_attn = Attention(cfg.dim, cfg.heads, int(cfg.cross_dim), cfg.bias)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)
        self.act = _activation(cfg.activation)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.ffn_norm(x))))

    def cross(self, x: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``ck, cv [B, H, Tc, Dh]``, ``cmask [B, 1, 1, Tc]`` additive."""
        if not self.has_cross:
            return x
        q = self.cross_attn.split(self.cross_attn.q_proj(self.cross_attn_norm(x)))
        return x + self.cross_attn.merge(attend(q, ck, cv, cmask))


# --------------------------------------------------------------------------- model


class LM(nn.Module):
    """MusicGen-style LM over ``K`` parallel codebooks (delay pattern applied outside)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_codebooks)])
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.heads = nn.ModuleList([nn.Linear(cfg.dim, cfg.card, bias=cfg.bias) for _ in range(cfg.n_codebooks)])
        if cfg.positions == "sinusoidal":
            self.register_buffer("inv_freq", sinusoidal_inv_freq(cfg.dim), persistent=False)
        if cfg.text_input:
            self.text_in = nn.Linear(cfg.dim, cfg.dim, bias=False)

    # -- pieces shared by the full forward and the step graph

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, K, T]`` int64 -> summed embeddings ``[B, T, D]``."""
        x = self.emb[0](codes[:, 0])
        for k in range(1, self.cfg.n_codebooks):
            x = x + self.emb[k](codes[:, k])
        if self.cfg.scale_embedding:
            x = x * math.sqrt(self.cfg.dim)
        return x

    def project_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]`` (before the final norm) -> logits ``[B, K, T, card]``."""
        x = self.norm(x)
        return torch.stack([head(x) for head in self.heads], dim=1)

    def cross_kv(self, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of every layer: ``cross [B, Tc, cross_dim]`` -> ``[L, B, H, Tc, Dh]`` twice."""
        if not self.cfg.cross_attention:
            raise ValueError("this LM has no cross-attention")
        ks, vs = zip(*(layer.cross_attn.keys_values(cross) for layer in self.layers))
        return torch.stack(ks), torch.stack(vs)

    def text_offset(self, cross_v0: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
        """The pooled text added to every frame's input when ``cfg.text_input``: ``[B, 1, D]``.

        ``cross_v0 [B, H, Tc, Dh]`` are layer 0's cross-attention values and
        ``cmask [B, 1, 1, Tc]`` the additive text mask. ``softmax(cmask)`` is
        the mean over the valid text positions, so the offset is
        ``text_in(v_proj_0(mean of the text's hidden states))`` and needs no
        graph input beyond those the step already has; the null condition
        (zero values) gives zero. Cross-attention alone let the LM follow its
        own context rather than the prompt (docs/training.md, "Held codes");
        this puts the prompt in every frame's input.
        """
        b, h, _, dh = cross_v0.shape
        pooled = torch.matmul(torch.softmax(cmask, dim=-1), cross_v0)  # [B, H, 1, Dh]
        return self.text_in(pooled.reshape(b, 1, h * dh))

    # -- full sequence

    def forward(
        self,
        codes: torch.Tensor,
        cross: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Logits of a whole sequence with causal self-attention.

        codes: ``[B, K, T]`` int64 (values 0..card, card = special).
        cross: ``[B, Tc, cross_dim]`` conditioning hidden states.
        cross_mask: ``[B, Tc]``, 1 valid / 0 pad (``None``: all valid).
        window: if set, each query attends to itself and at most ``window - 1``
            previous frames (what a ring cache of ``window - 1`` slots sees).
        Returns ``[B, K, T, card]``.
        """
        cfg = self.cfg
        b, _, t = codes.shape
        x = self.embed(codes)
        pos = torch.arange(t, device=codes.device)
        cos = sin = None
        if cfg.positions == "sinusoidal":
            x = x + sinusoidal_embedding(pos, self.inv_freq)
        else:
            c, s = rope_cos_sin(np.arange(t), cfg.head_dim, cfg.rope_theta)
            cos, sin = torch.from_numpy(c).to(x.device), torch.from_numpy(s).to(x.device)
        i = pos[:, None]
        j = pos[None, :]
        allowed = j <= i
        if window is not None:
            allowed = allowed & (j > i - window)
        causal = torch.zeros(t, t, device=x.device).masked_fill(~allowed, NEG)
        ck = cv = cmask = None
        if cfg.cross_attention:
            if cross is None:
                raise ValueError("this LM has cross-attention: pass cross [B, Tc, cross_dim]")
            ck, cv = self.cross_kv(cross)
            if cross_mask is None:
                cross_mask = torch.ones(cross.shape[:2], device=cross.device)
            cmask = additive_mask(cross_mask)[:, None, None, :]
            if cfg.text_input:
                x = x + self.text_offset(cv[0], cmask)
        for li, layer in enumerate(self.layers):
            att = layer.self_attn
            h = layer.self_attn_norm(x)
            q, k, v = att.split(att.q_proj(h)), att.split(att.k_proj(h)), att.split(att.v_proj(h))
            if cos is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            x = x + att.merge(attend(q, k, v, causal))
            if ck is not None:
                x = layer.cross(x, ck[li], cv[li], cmask)
            x = layer.ffn(x)
        return self.project_logits(x)


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 valid / 0 pad -> additive float32 (0 / float32 min), same shape."""
    return (1.0 - mask.float()) * NEG


# --------------------------------------------------------------------------- step graph


class LMStep(nn.Module):
    """One LM step over a ring KV cache: the graph the engine runs every frame.

    Inputs (``B`` batch, 2 = conditioned + null for guidance; ``S`` ring slots;
    ``Tc`` text length; ``L`` layers, ``H`` heads, ``Dh`` head dim):

    - ``tokens`` int64 ``[B, K]``: one column of the delayed grid (0..card)
    - sinusoidal: ``position`` int64 ``[1]``; rotary: ``rope_cos``,
      ``rope_sin`` float32 ``[1, Dh/2]`` (see :func:`rope_cos_sin`)
    - ``cache_k_<l>``, ``cache_v_<l>`` float32 ``[B, H, S, Dh]`` for each layer
      ``l`` (keys after rotary)
    - ``cache_mask`` float32 ``[1, S]`` additive (0 filled / float32 min empty)
    - ``cross_k_<l>``, ``cross_v_<l>`` float32 ``[B, H, Tc, Dh]`` for each layer,
      ``cross_mask`` float32 ``[B, Tc]`` additive (only with cross-attention)

    Outputs: ``logits`` ``[B, K, card]``; ``new_k``, ``new_v`` ``[L, B, H, 1, Dh]``;
    layer ``l`` of them is written into ring slot ``position % S`` of
    ``cache_k_<l>`` / ``cache_v_<l>``.

    Cost is independent of how long the stream has run, and nearly of ``S``:
    the cache is never concatenated, sliced or transposed (each of which would
    copy it every step: one tensor per layer, not a stacked ``[L, ...]`` one, and
    scores computed as ``K @ q`` with ``q`` as a column). Scores against the
    cache and against the new key are computed apart and softmaxed together.

    A step is a few hundred tiny operations, so their number, not their
    arithmetic, sets its cost (in ONNX Runtime and in PyTorch eager alike). The
    weights are therefore rearranged once, here, so that each layer needs few
    of them (see :meth:`fold`):

    - one table lookup for all ``K`` embeddings, one matmul for all ``K`` heads;
    - the attention scale ``Dh ** -0.5`` folded into the query projections;
    - rotary without slicing, on ``q`` and ``k`` of every head at once:
      ``rot(x) = x * [cos, cos] + swap(x) * [-sin, sin]``, where ``swap``
      exchanges the two halves of each head, one gather::

          h ──[Wq*s ; Wk ; Wv]──> [ qk | v ]         qk: [B, 1, 2*H*Dh]
          qk = qk * cos2 + qk[..., swap] * sin2      per head: (x1, x2) -> (x2, x1)
          q, k = split(qk)

    - with one query row, ``[B, H, 1, Dh] <-> [B, 1, H*Dh]`` and row/column
      layouts are reshapes (no copies, no transposes).

    The folded weights are taken from ``lm`` when the step is built; build a
    new step (or call :meth:`fold`) after changing ``lm``'s weights.
    """

    def __init__(self, lm: LM, batch: int = 2, context: int = 500, text_len: int = 32) -> None:
        super().__init__()
        self.lm = lm
        self.batch = batch
        self.context = context
        self.text_len = text_len
        self.spec = self._build_spec()
        self.fold()

    def _build_spec(self) -> GraphSpec:
        cfg = self.lm.cfg
        b, s, tc = self.batch, self.context, self.text_len
        l, h, d, k = cfg.layers, cfg.heads, cfg.head_dim, cfg.n_codebooks
        inputs = [TensorSpec("tokens", (b, k), "int64")]
        if cfg.positions == "sinusoidal":
            inputs.append(TensorSpec("position", (1,), "int64"))
        else:
            inputs += [TensorSpec("rope_cos", (1, d // 2)), TensorSpec("rope_sin", (1, d // 2))]
        for i in range(l):
            inputs += [
                TensorSpec(f"cache_k_{i}", (b, h, s, d), state="new_k"),
                TensorSpec(f"cache_v_{i}", (b, h, s, d), state="new_v"),
            ]
        inputs.append(TensorSpec("cache_mask", (1, s)))
        if cfg.cross_attention:
            for i in range(l):
                inputs += [TensorSpec(f"cross_k_{i}", (b, h, tc, d)), TensorSpec(f"cross_v_{i}", (b, h, tc, d))]
            inputs.append(TensorSpec("cross_mask", (b, tc)))
        outputs = [
            TensorSpec("logits", (b, k, cfg.card)),
            TensorSpec("new_k", (l, b, h, 1, d), state="cache_k_*"),
            TensorSpec("new_v", (l, b, h, 1, d), state="cache_v_*"),
        ]
        meta: dict[str, Any] = {
            "positions": cfg.positions,
            "context": s,
            "text_len": tc,
            "batch": b,
            "card": cfg.card,
            "special": cfg.special,
            "n_codebooks": k,
            "max_positions": cfg.max_positions,
            "rope_theta": cfg.rope_theta,
            "head_dim": d,
        }
        return GraphSpec(inputs, outputs, meta)

    @torch.no_grad()
    def fold(self) -> None:
        """Rearrange ``lm``'s weights for the step (buffers: initializers on export, computed once in eager)."""
        lm = self.lm
        cfg = lm.cfg
        h, dh = cfg.heads, cfg.head_dim
        scale = dh**-0.5

        table = torch.cat([e.weight for e in lm.emb])  # [K * (card + 1), D]
        if cfg.scale_embedding:
            table = table * math.sqrt(cfg.dim)
        self.register_buffer("emb_table", table.detach().clone(), persistent=False)
        self.register_buffer(
            "emb_offset", (torch.arange(cfg.n_codebooks, dtype=torch.int64) * (cfg.card + 1))[None], persistent=False
        )
        self.register_buffer("head_w", torch.cat([hd.weight for hd in lm.heads]).detach().clone(), persistent=False)
        hb = None if lm.heads[0].bias is None else torch.cat([hd.bias for hd in lm.heads]).detach().clone()
        self.register_buffer("head_b", hb, persistent=False)
        # swap[j]: the index whose value lands at j when the halves of each of the 2H (q and k) heads change places
        j = torch.arange(2 * h * dh, dtype=torch.int64)
        self.register_buffer("rope_swap", j - j % dh + (j % dh + dh // 2) % dh, persistent=False)
        for i, layer in enumerate(lm.layers):
            att = layer.self_attn
            w = torch.cat([att.q_proj.weight * scale, att.k_proj.weight, att.v_proj.weight])
            self.register_buffer(f"qkv_w_{i}", w.detach().clone(), persistent=False)
            bias = None
            if att.q_proj.bias is not None:
                bias = torch.cat([att.q_proj.bias * scale, att.k_proj.bias, att.v_proj.bias]).detach().clone()
            self.register_buffer(f"qkv_b_{i}", bias, persistent=False)
            if cfg.cross_attention:
                cq = layer.cross_attn.q_proj
                self.register_buffer(f"cq_w_{i}", (cq.weight * scale).detach().clone(), persistent=False)
                self.register_buffer(
                    f"cq_b_{i}", None if cq.bias is None else (cq.bias * scale).detach().clone(), persistent=False
                )

    def example_inputs(self, position: int = 0) -> list[torch.Tensor]:
        """Inputs for a first step at ``position`` (empty ring, all text valid)."""
        cfg = self.lm.cfg
        out: list[torch.Tensor] = []
        for spec in self.spec.inputs:
            if spec.name == "tokens":
                out.append(torch.full(spec.shape, cfg.special, dtype=torch.int64))
            elif spec.name == "position":
                out.append(torch.tensor([position], dtype=torch.int64))
            elif spec.name in ("rope_cos", "rope_sin"):
                c, s = rope_cos_sin(position, cfg.head_dim, cfg.rope_theta)
                out.append(torch.from_numpy(c if spec.name == "rope_cos" else s))
            elif spec.name == "cache_mask":
                out.append(torch.full(spec.shape, NEG))
            elif spec.name.startswith(("cross_k_", "cross_v_")):
                out.append(torch.randn(spec.shape) * 0.1)
            else:
                out.append(spec.zeros())
        return out

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs in ``self.spec.inputs`` order; returns ``(logits, new_k, new_v)``."""
        x_in = dict(zip(self.spec.input_names, inputs))
        lm = self.lm
        cfg = lm.cfg
        tokens = x_in["tokens"]
        b = tokens.shape[0]
        hd, dh, dim = cfg.heads, cfg.head_dim, cfg.dim
        # [B, K] -> one lookup in the stacked tables -> [B, K, D] -> sum -> [B, 1, D]
        x = F.embedding(tokens + self.emb_offset, self.emb_table).sum(1, keepdim=True)
        rope = None
        if cfg.positions == "sinusoidal":
            x = x + sinusoidal_embedding(x_in["position"], lm.inv_freq)  # [1, D]
        else:
            # [1, Dh/2] -> [1, 2 * H * Dh]: (cos, cos) and (-sin, sin) for every q and k head
            cos = torch.cat([x_in["rope_cos"], x_in["rope_cos"]], dim=-1).repeat(1, 2 * hd)
            sin = torch.cat([-x_in["rope_sin"], x_in["rope_sin"]], dim=-1).repeat(1, 2 * hd)
            rope = (cos, sin)
        # [1, S] -> [1, 1, 1, S + 1]: the ring's mask, then the new key (always valid)
        mask = torch.cat([x_in["cache_mask"], torch.zeros_like(x_in["cache_mask"][:, :1])], dim=-1)[:, None, None]
        s = mask.shape[-1] - 1
        cmask = x_in["cross_mask"][:, None, None, :] if cfg.cross_attention else None
        if cfg.text_input:
            x = x + lm.text_offset(x_in["cross_v_0"], cmask)
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        for li, layer in enumerate(lm.layers):
            proj = F.linear(layer.self_attn_norm(x), getattr(self, f"qkv_w_{li}"), getattr(self, f"qkv_b_{li}"))
            qk, v = proj.split([2 * dim, dim], dim=-1)
            if rope is not None:
                qk = qk * rope[0] + qk.index_select(-1, self.rope_swap) * rope[1]
            q, k = qk.split([dim, dim], dim=-1)  # [B, 1, D] each
            q_col = q.reshape(b, hd, dh, 1)
            k_row, v_row = k.reshape(b, hd, 1, dh), v.reshape(b, hd, 1, dh)
            new_k.append(k)
            new_v.append(v)
            # scores [B, H, 1, S + 1]: the ring (K @ q reads the cache in place) and the new key
            s_cache = torch.matmul(x_in[f"cache_k_{li}"], q_col).reshape(b, hd, 1, s)
            p = torch.softmax(torch.cat([s_cache, torch.matmul(k_row, q_col)], dim=-1) + mask, dim=-1)
            p_cache, p_new = p.split([s, 1], dim=-1)
            o = torch.matmul(p_cache, x_in[f"cache_v_{li}"]) + p_new * v_row  # [B, H, 1, Dh]
            x = x + layer.self_attn.out_proj(o.reshape(b, 1, dim))
            if cmask is not None:
                cq = F.linear(layer.cross_attn_norm(x), getattr(self, f"cq_w_{li}"), getattr(self, f"cq_b_{li}"))
                sc = torch.matmul(x_in[f"cross_k_{li}"], cq.reshape(b, hd, dh, 1)).reshape(b, hd, 1, -1)
                pc = torch.softmax(sc + cmask, dim=-1)
                o = torch.matmul(pc, x_in[f"cross_v_{li}"])  # [B, H, 1, Dh]
                x = x + layer.cross_attn.out_proj(o.reshape(b, 1, dim))
            x = layer.ffn(x)
        logits = F.linear(lm.norm(x), self.head_w, self.head_b).reshape(b, cfg.n_codebooks, cfg.card)
        # L x [B, 1, H*Dh] -> [L*B, 1, H*Dh] -> [L, B, H, 1, Dh]: one reshape, not one per layer
        shape = (cfg.layers, b, hd, 1, dh)
        return logits, torch.cat(new_k).reshape(shape), torch.cat(new_v).reshape(shape)


def ring_step_through(
    step: LMStep,
    codes: torch.Tensor,
    cross_k: torch.Tensor | None = None,
    cross_v: torch.Tensor | None = None,
    cross_mask: torch.Tensor | None = None,
    start: int = 0,
    run: Callable[[list[torch.Tensor]], Sequence[Any]] | None = None,
) -> torch.Tensor:
    """Reference driver: feed ``codes`` column by column through ``step``, writing the ring.

    codes: ``[B, K, T]`` (the LM input grid, BOS column included).
    cross_k, cross_v: ``[L, B, H, Tc, Dh]``; cross_mask: ``[B, Tc]`` additive.
    start: absolute position of the first column.
    run: how to execute one step (default: ``step(*inputs)`` in torch); e.g. an
        ONNX Runtime call returning ``(logits, new_k, new_v)`` arrays.
    Returns logits ``[B, K, T, card]``.
    """
    cfg = step.lm.cfg
    spec = {s.name: s for s in step.spec.inputs}
    cache = {n: s.zeros() for n, s in spec.items() if n.startswith(("cache_k_", "cache_v_"))}
    cache_mask = torch.full(spec["cache_mask"].shape, NEG)
    n_slots = cache_mask.shape[-1]
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        for t in range(codes.shape[-1]):
            pos = start + t
            feeds: dict[str, torch.Tensor] = {"tokens": codes[:, :, t].contiguous(), "cache_mask": cache_mask, **cache}
            if cfg.positions == "sinusoidal":
                feeds["position"] = torch.tensor([pos], dtype=torch.int64)
            else:
                c, s = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
                feeds["rope_cos"], feeds["rope_sin"] = torch.from_numpy(c), torch.from_numpy(s)
            if cfg.cross_attention:
                for i in range(cfg.layers):
                    feeds[f"cross_k_{i}"], feeds[f"cross_v_{i}"] = cross_k[i], cross_v[i]
                feeds["cross_mask"] = cross_mask
            args = [feeds[n] for n in step.spec.input_names]
            logits, nk, nv = run(args) if run is not None else step(*args)
            logits, nk, nv = (torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in (logits, nk, nv))
            slot = pos % n_slots
            cache = {n: c.clone() for n, c in cache.items()}
            cache_mask = cache_mask.clone()
            for i in range(cfg.layers):
                cache[f"cache_k_{i}"][:, :, slot] = nk[i, :, :, 0]
                cache[f"cache_v_{i}"][:, :, slot] = nv[i, :, :, 0]
            cache_mask[0, slot] = 0.0
            outs.append(logits)
    return torch.stack(outs, dim=2)


# --------------------------------------------------------------------------- Hugging Face


_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}


def musicgen_lm_config(c: Any, norm_eps: float = 1e-5) -> LMConfig:
    """The LMConfig of a transformers ``MusicgenDecoderConfig`` (its shapes and options, not its weights)."""
    return LMConfig(
        dim=c.hidden_size,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        ffn_dim=c.ffn_dim,
        n_codebooks=c.num_codebooks,
        card=c.vocab_size,
        positions="sinusoidal",
        max_positions=c.max_position_embeddings,
        cross_dim=c.hidden_size,
        norm_eps=norm_eps,
        activation=_HF_ACTIVATIONS.get(c.activation_function, "gelu"),
        bias=False,
        scale_embedding=False,
        cross_attention=True,
    )


def load_hf_musicgen_decoder(hf_decoder: nn.Module) -> LM:
    """Build an :class:`LM` holding the weights of a transformers MusicGen decoder.

    ``hf_decoder`` is a ``transformers.MusicgenForCausalLM`` (the ``.decoder``
    of ``MusicgenForConditionalGeneration``; the composite model is accepted
    too). The text-side projection ``enc_to_dec_proj`` is not part of the
    decoder: see ``export.conditioner.T5Wrapper``.

    Notes on transformers' semantics followed here: the decoder LayerNorms
    use their module's ``eps`` (1e-5, the config has no field for it);
    ``scale_embedding`` is read by transformers but its ``embed_scale`` is never
    applied in the forward pass, so the LM is built with
    ``scale_embedding=False`` whatever the config says.

    Raises ``ValueError`` naming the config field for settings cicada does not
    run: stereo (``audio_channels=2``), an unknown ``activation_function``,
    a ``cross_attention_hidden_size`` other than ``hidden_size``, special token
    ids other than ``vocab_size``.
    """
    if not hasattr(hf_decoder, "lm_heads") and hasattr(hf_decoder, "decoder"):
        hf_decoder = hf_decoder.decoder
    if not hasattr(hf_decoder, "lm_heads"):
        raise TypeError(f"expected a transformers MusicgenForCausalLM, got {type(hf_decoder).__name__}")
    c = hf_decoder.config
    if getattr(c, "audio_channels", 1) != 1:
        raise ValueError(f"audio_channels={c.audio_channels}: only mono MusicGen decoders are supported")
    if c.activation_function not in _HF_ACTIVATIONS:
        raise ValueError(
            f"activation_function={c.activation_function!r} is not supported (known: {sorted(_HF_ACTIVATIONS)})"
        )
    cah = getattr(c, "cross_attention_hidden_size", None)
    if cah is not None and cah != c.hidden_size:
        raise ValueError(f"cross_attention_hidden_size={cah} differs from hidden_size={c.hidden_size}")
    for field in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
        v = getattr(c, field, None)
        if v is not None and v != c.vocab_size:
            raise ValueError(f"{field}={v}: cicada's special token is vocab_size={c.vocab_size}")
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"hidden_size={c.hidden_size} is not divisible by num_attention_heads={c.num_attention_heads}")

    dec = hf_decoder.model.decoder
    cfg = musicgen_lm_config(c, norm_eps=float(dec.layer_norm.eps))
    lm = LM(cfg)
    sd: dict[str, torch.Tensor] = {}
    for k in range(cfg.n_codebooks):
        sd[f"emb.{k}.weight"] = dec.embed_tokens[k].weight
        sd[f"heads.{k}.weight"] = hf_decoder.lm_heads[k].weight
    names = {
        "self_attn_norm": "self_attn_layer_norm",
        "cross_attn_norm": "encoder_attn_layer_norm",
        "ffn_norm": "final_layer_norm",
        "fc1": "fc1",
        "fc2": "fc2",
    }
    for i, hl in enumerate(dec.layers):
        hsd = hl.state_dict()
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                if f"{theirs}.{p}" in hsd:
                    sd[f"layers.{i}.{ours}.{p}"] = hsd[f"{theirs}.{p}"]
        for ours, theirs in (("self_attn", "self_attn"), ("cross_attn", "encoder_attn")):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd[f"layers.{i}.{ours}.{proj}.weight"] = hsd[f"{theirs}.{proj}.weight"]
                if f"{theirs}.{proj}.bias" in hsd:
                    raise ValueError(f"layer {i} {theirs}.{proj} has a bias; MusicGen decoders have none")
    sd["norm.weight"] = dec.layer_norm.weight
    sd["norm.bias"] = dec.layer_norm.bias
    lm.load_state_dict({k: v.detach().clone().float() for k, v in sd.items()}, strict=True)
    return lm.eval()
