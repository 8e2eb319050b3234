"""Text -> conditioning: tokenizer + the pack's conditioner graph, once per prompt change.

``Conditioner.encode(text) -> Condition`` with ``cross_k, cross_v [L, H, Tc, Dh]``
and an additive ``mask [Tc]`` (0 = token, float32 min = padding; a morph's slots
in between, see :func:`blend`). These are the
LM's cross-attention keys and values for the conditioned row; they depend only
on the text, so they are computed when the prompt changes, never per step.

The empty prompt is the null condition (zeros, fully masked): the stream then
runs unconditioned. ``blend(a, b, w)`` morphs between two prompts.

Prompts are free text. The tokenizer lowercases and drops punctuation, and our
own models are trained on reworded prompts (words reordered, one or two left
out), so wording close to a known prompt works. Words the tokenizer does not
know are ignored (``Condition.unknown`` lists them); a prompt with no known word
at all is refused with :class:`PromptError`, which lists the known prompts,
rather than turned silently into the unconditioned sound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.lm import NEG, session_options
from engine.pack import Pack

if TYPE_CHECKING:
    from tokenizers import Encoding


class PromptError(ValueError):
    """A prompt the pack cannot condition on; the message lists the prompts it knows."""


@dataclass(frozen=True)
class Condition:
    """The conditioned row of the LM's cross-attention inputs."""

    text: str
    cross_k: np.ndarray  # [L, H, Tc, Dh] float32
    cross_v: np.ndarray  # [L, H, Tc, Dh] float32
    mask: np.ndarray  # [Tc] float32, additive
    truncated: bool = False  # the text had more tokens than the pack's Tc
    unknown: tuple[str, ...] = ()  # words of the text the tokenizer does not know (ignored)


def blend(a: Condition, b: Condition, weight: float) -> Condition:
    """Morph ``a`` (weight 0) into ``b`` (weight 1), continuously all the way.

    Keys and values are interpolated slot by slot (a padding slot contributes
    zeros). Each slot is attended in proportion to how much of it is there: the
    additive mask is ``log((1 - w) exp(mask_a) + w exp(mask_b))``, so a slot both
    prompts have a token in keeps 0, one only ``b`` has gets ``log w``, one only
    ``a`` has ``log(1 - w)``, and padding in both stays masked::

        slot        a tok  a tok  pad    pad
                    b tok  pad    b tok  pad
        mask        0      log(1-w)  log w  NEG

    A slot only ``b`` has therefore fades in from nothing as ``w`` leaves 0,
    instead of taking its share of the attention at once (an audible step,
    measured in tests/engine/test_default_pack.py). At 0 and 1 this is exactly ``a``
    or ``b``; a blend of blends works the same way (``exp(mask)`` is a slot's
    presence).
    """
    w = float(min(1.0, max(0.0, weight)))
    if w <= 0.0:
        return a
    if w >= 1.0:
        return b
    pa = np.exp(np.maximum(a.mask, -80.0)) * (a.mask > NEG / 2)  # [Tc] presence of each slot, 0..1
    pb = np.exp(np.maximum(b.mask, -80.0)) * (b.mask > NEG / 2)
    va = (pa > 0)[None, None, :, None]
    vb = (pb > 0)[None, None, :, None]
    k = (1 - w) * np.where(va, a.cross_k, 0) + w * np.where(vb, b.cross_k, 0)
    v = (1 - w) * np.where(va, a.cross_v, 0) + w * np.where(vb, b.cross_v, 0)
    present = (1 - w) * pa + w * pb
    mask = np.where(present > 0, np.log(np.maximum(present, 1e-30)), NEG).astype(np.float32)
    return Condition(f"{a.text} ~{w:.2f}~ {b.text}", k.astype(np.float32), v.astype(np.float32), mask)


class Conditioner:
    """Tokenizes a prompt and runs the conditioner graph (thread-safe; keeps a small cache)."""

    def __init__(self, pack: Pack, threads: int = 1, providers: list[str] | None = None, cache: int = 64) -> None:
        from tokenizers import Tokenizer

        g = pack.conditioner
        self.pack = pack
        self.text_len: int = int(g["max_tokens"])
        self.session = pack.session(g, session_options(threads), providers)
        try:
            self.tokenizer = Tokenizer.from_file(str(pack.tokenizer))
        except Exception as exc:
            from engine.pack import PackError

            raise PackError(f"{pack.tokenizer}: cannot read the tokenizer ({exc}). Re-export the pack.") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.unk_id = self.tokenizer.token_to_id("<unk>")
        self.special_ids = {i for i in (self.unk_id, self.tokenizer.token_to_id("<pad>"),
                                        self.tokenizer.token_to_id("</s>")) if i is not None}
        lm = pack.lm
        self.shape = (lm["layers"], lm["heads"], self.text_len, lm["head_dim"])
        self._cache: OrderedDict[str, Condition] = OrderedDict()
        self._cache_size = cache

    def null(self) -> Condition:
        z = np.zeros(self.shape, np.float32)
        return Condition("", z, z.copy(), np.full(self.text_len, NEG, np.float32))

    def check(self, text: str, enc: Encoding | None = None) -> tuple[str, ...]:
        """Raise :class:`PromptError` if no word of ``text`` is known; else return the words the
        tokenizer maps to ``<unk>`` (ignored). ``enc``: the tokenizer's encoding of ``text``, if at hand."""
        if self.unk_id is None or not text.strip():
            return ()
        enc = enc or self.tokenizer.encode(text)
        if self.pack.prompts and all(i in self.special_ids for i in enc.ids):
            listing = "\n".join(f"  {p}" for p in self.pack.prompts)
            raise PromptError(
                f"no word of the prompt {text!r} is known to the pack '{self.pack.name}'; "
                f"use words from its prompts (any order, case or punctuation):\n{listing}"
            )
        return tuple(text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_id)

    def tokens(self, text: str, enc: Encoding | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
        """``text -> (ids [1, Tc] int64, mask [1, Tc] int64, truncated)``."""
        ids = (enc or self.tokenizer.encode(text)).ids
        truncated = len(ids) > self.text_len
        ids = ids[: self.text_len]
        tok = np.zeros((1, self.text_len), np.int64)
        mask = np.zeros((1, self.text_len), np.int64)
        tok[0, : len(ids)] = ids
        mask[0, : len(ids)] = 1
        return tok, mask, truncated

    def encode(self, text: str) -> Condition:
        text = text.strip()
        if not text:
            return self.null()
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        enc = self.tokenizer.encode(text)
        unknown = self.check(text, enc)
        tok, mask, truncated = self.tokens(text, enc)
        ck, cv = self.session.run(["cross_k", "cross_v"], {"text_tokens": tok, "text_mask": mask})
        cond = Condition(
            text,
            np.ascontiguousarray(ck[:, 0]),
            np.ascontiguousarray(cv[:, 0]),
            np.where(mask[0] == 1, 0.0, NEG).astype(np.float32),
            truncated,
            unknown,
        )
        self._cache[text] = cond
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return cond
