"""Text -> conditioning tensors.

Two text sides exist:

- cicada's own models: :class:`WordTokenizer` (a word-level Hugging Face
  ``tokenizers`` tokenizer, so the engine tokenizes with that library alone)
  and :class:`TextEncoder` (a small transformer encoder);
- converted MusicGen checkpoints: :class:`T5Wrapper` around transformers'
  ``T5EncoderModel`` and MusicGen's optional ``enc_to_dec_proj``.

:class:`ConditionerGraph` turns either into the ONNX graph the engine runs once
per prompt change: ``text_tokens, text_mask -> cross_k, cross_v`` (every LM
layer's cross-attention keys and values).

Null condition (classifier-free guidance). transformers builds it as zero
encoder hidden states with an all-zero attention mask. Its keys and values are
``k_proj(0) = v_proj(0) = 0`` because MusicGen's projections have no bias, and
the fully masked row attends uniformly to those zeros, so its cross-attention
output is ``out_proj(0) = 0``. The engine therefore builds the null row as zero
``cross_k`` / ``cross_v`` with a fully masked ``cross_mask``;
:class:`ConditionerGraph` refuses an LM whose cross-attention key/value
projections have a bias, where that would no longer hold.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.lm import LM, NEG, Attention, additive_mask, attend
from export.onnx import GraphSpec, TensorSpec

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
SPLIT_PATTERN = r"[^\p{L}\p{N}]+"
"""Words are runs of letters and digits; everything else separates them."""


# --------------------------------------------------------------------------- tokenizer


def _build_hf_tokenizer(vocab: dict[str, int], length: int):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, EOS_ID)])
    tok.add_special_tokens([PAD, UNK, EOS])
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=PAD_ID, pad_token=PAD)
    return tok


def split_words(text: str) -> list[str]:
    """The words the tokenizer sees: lowercased runs of letters and digits."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Lowercase().normalize_str(text)
    return [w for w, _ in pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed").pre_tokenize_str(norm) if w]


class WordTokenizer:
    """Word-level tokenizer: lowercase, split on non-alphanumerics, ``</s>`` appended.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2, then the words of the training
    prompts (most frequent first, ties alphabetical). Every encoding is
    truncated / padded to ``length`` tokens (the conditioning graph's ``Tc``),
    with ``</s>`` kept. Saved as a Hugging Face ``tokenizer.json`` that holds all
    of this, so ``tokenizers.Tokenizer.from_file(path).encode(text)`` gives the
    same ``ids`` and ``attention_mask`` without cicada.
    """

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self.tokenizer = tokenizer
        pad = tokenizer.padding
        if not pad or pad.get("length") is None:
            raise ValueError("WordTokenizer needs a tokenizer with fixed-length padding")
        self.length: int = int(pad["length"])

    @classmethod
    def build(cls, prompts: Iterable[str], length: int = 32) -> WordTokenizer:
        """Vocabulary from ``prompts``; encodings are ``length`` tokens long."""
        if length < 2:
            raise ValueError(f"length must be >= 2 (a word and </s>), got {length}")
        counts = Counter(w for p in prompts for w in split_words(p))
        vocab = {PAD: PAD_ID, UNK: UNK_ID, EOS: EOS_ID}
        for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if w not in vocab:
                vocab[w] = len(vocab)
        return cls(_build_hf_tokenizer(vocab, length))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """``text`` -> ``(ids, attention_mask)``, both ``length`` long."""
        enc = self.tokenizer.encode(text)
        return list(enc.ids), list(enc.attention_mask)

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> ``tokens, mask`` int64 ``[B, length]``."""
        if isinstance(texts, str):
            texts = [texts]
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.int64)
        return ids, mask

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))


# --------------------------------------------------------------------------- text encoders


@dataclass
class TextEncoderConfig:
    vocab_size: int
    dim: int = 256
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 1024
    max_len: int = 32
    norm_eps: float = 1e-5


class _EncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention + GELU FFN."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim, bias=True)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``mask [B, 1, 1, T]`` additive."""
        a = self.attn
        h = self.attn_norm(x)
        x = x + a.merge(attend(a.split(a.q_proj(h)), a.split(a.k_proj(h)), a.split(a.v_proj(h)), mask))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ffn_norm(x))))


class TextEncoder(nn.Module):
    """Small transformer text encoder for cicada's own models.

    ``forward(tokens [B, Tc] int64, mask [B, Tc] (1 valid / 0 pad)) -> [B, Tc, D]``;
    learned positions, pre-norm layers, final LayerNorm, padded positions zeroed
    (as MusicGen zeroes its projected T5 states).
    """

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        self.layers = nn.ModuleList([_EncoderLayer(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"{t} text tokens exceed max_len={self.cfg.max_len}")
        x = self.tok(tokens) + self.pos[:t]
        m = additive_mask(mask)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, m)
        return self.norm(x) * mask[..., None].to(x.dtype)


class T5Wrapper(nn.Module):
    """transformers' ``T5EncoderModel`` plus MusicGen's optional ``enc_to_dec_proj``.

    ``forward(tokens [B, Tc], mask [B, Tc]) -> proj(t5(tokens, mask)) * mask[..., None]``
    ``[B, Tc, D]``, exactly as ``MusicgenForConditionalGeneration`` prepares the
    decoder's encoder hidden states.
    """

    def __init__(self, t5: nn.Module, proj: nn.Linear | None = None) -> None:
        super().__init__()
        self.t5 = t5
        self.proj = proj

    @classmethod
    def from_musicgen(cls, model: nn.Module) -> T5Wrapper:
        """From a ``MusicgenForConditionalGeneration`` (``enc_to_dec_proj`` exists
        exactly when transformers applies it)."""
        return cls(model.text_encoder, getattr(model, "enc_to_dec_proj", None))

    @property
    def out_dim(self) -> int:
        return self.proj.out_features if self.proj is not None else int(self.t5.config.d_model)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.t5(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.proj is not None:
            h = self.proj(h)
        return h * mask[..., None].to(h.dtype)


# --------------------------------------------------------------------------- conditioning graph


class ConditionerGraph(nn.Module):
    """``text_tokens, text_mask -> cross_k, cross_v``: run once per prompt change.

    Inputs: ``text_tokens`` int64 ``[1, Tc]``, ``text_mask`` int64 ``[1, Tc]``
    (1 valid / 0 pad). Outputs: ``cross_k``, ``cross_v`` float32
    ``[L, 1, H, Tc, Dh]``, each LM layer's cross-attention key / value
    projections of the encoder's hidden states. The engine derives the LM
    step's additive ``cross_mask`` from ``text_mask``, and builds the null row as
    zeros with a fully masked ``cross_mask`` (see the module docstring).
    """

    def __init__(self, text_encoder: nn.Module, lm: LM, text_len: int | None = None) -> None:
        super().__init__()
        cfg = lm.cfg
        if not cfg.cross_attention:
            raise ValueError("the LM has no cross-attention: there is nothing to condition")
        out_dim = getattr(text_encoder, "out_dim", None)
        if out_dim is not None and out_dim != cfg.cross_dim:
            raise ValueError(f"text encoder width {out_dim} != LM cross_dim {cfg.cross_dim}")
        for i, layer in enumerate(lm.layers):
            for name in ("k_proj", "v_proj"):
                if getattr(layer.cross_attn, name).bias is not None:
                    raise ValueError(
                        f"layer {i} cross_attn.{name} has a bias: zero cross_k/cross_v would not equal "
                        "the null condition (zero hidden states)"
                    )
        if text_len is None:
            text_len = getattr(getattr(text_encoder, "cfg", None), "max_len", None)
            if text_len is None:
                raise ValueError("pass text_len (the fixed text length Tc)")
        self.text_encoder = text_encoder
        self.lm = lm
        self.text_len = int(text_len)
        l, h, d, tc = cfg.layers, cfg.heads, cfg.head_dim, self.text_len
        self.spec = GraphSpec(
            inputs=[TensorSpec("text_tokens", (1, tc), "int64"), TensorSpec("text_mask", (1, tc), "int64")],
            outputs=[TensorSpec("cross_k", (l, 1, h, tc, d)), TensorSpec("cross_v", (l, 1, h, tc, d))],
            meta={"text_len": tc},
        )

    def example_inputs(self, n_valid: int | None = None, vocab_size: int = 8) -> list[torch.Tensor]:
        """Token ids in ``[3, vocab_size)`` with the last positions padded.

        Padding is on by default so that any data-dependent shortcut a text
        encoder may take for "no padding" is not what gets traced.
        """
        tc = self.text_len
        n = max(1, tc - max(1, tc // 4)) if n_valid is None else n_valid
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, max(4, vocab_size), (1, tc), generator=g)
        mask = torch.zeros(1, tc, dtype=torch.int64)
        mask[:, :n] = 1
        tokens = tokens * mask
        return [tokens, mask]

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text_encoder(text_tokens, text_mask)  # [1, Tc, cross_dim]
        return self.lm.cross_kv(hidden)


def null_condition(lm: LM, text_len: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The null (unconditioned) row as the engine builds it.

    Returns ``cross_k, cross_v`` zeros ``[L, batch, H, Tc, Dh]`` and an additive
    ``cross_mask`` ``[batch, Tc]`` fully masked (float32 min).
    """
    cfg = lm.cfg
    shape = (cfg.layers, batch, cfg.heads, text_len, cfg.head_dim)
    return torch.zeros(shape), torch.zeros(shape), torch.full((batch, text_len), NEG)


def step_cross_inputs(
    cond_k: torch.Tensor, cond_v: torch.Tensor, text_mask: torch.Tensor, lm: LM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a conditioned row and the null row into the LM step's B=2 inputs.

    ``cond_k, cond_v [L, 1, H, Tc, Dh]``, ``text_mask [1, Tc]`` (1/0) ->
    ``cross_k, cross_v [L, 2, H, Tc, Dh]``, ``cross_mask [2, Tc]`` additive.
    """
    nk, nv, nm = null_condition(lm, cond_k.shape[3])
    return (
        torch.cat([cond_k, nk], dim=1),
        torch.cat([cond_v, nv], dim=1),
        torch.cat([additive_mask(text_mask), nm], dim=0),
    )
