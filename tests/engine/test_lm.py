"""LMSession (IOBinding, ring cache, re-priming) against the PyTorch step module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine import pack as packfmt
from engine.codec import DecoderSession
from engine.lm import LMSession

torch = pytest.importorskip("torch")


def _build(out: Path, positions: str, max_positions: int, context: int, seed: int = 0):
    """A 'test'-shape pack with the given position scheme; returns (pack, torch LM, text encoder)."""
    from export.architectures import known_prompts, own_configs
    from export.codec import Codec
    from export.conditioner import TextEncoder, TextEncoderConfig, WordTokenizer
    from export.lm import LM
    from export.pack import pack_models

    torch.manual_seed(seed)
    ccfg, lcfg, tdims, text_len = own_configs("test")
    lcfg = dataclasses.replace(lcfg, positions=positions, max_positions=max_positions)
    tok = WordTokenizer.build(known_prompts(), length=text_len)
    lm = LM(lcfg).eval()
    text = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, max_len=text_len, **tdims)).eval()
    pack = pack_models(
        out, codec=Codec(ccfg).eval(), lm=lm, text_encoder=text,
        tokenizer_file=tok.save(out.parent / f"{out.name}-tokenizer.json"),
        name="t", description="t", prompts=known_prompts(), context=context, text_len=text_len,
    )
    return pack, lm, text_len


@pytest.fixture(scope="module")
def rotary(tmp_path_factory: pytest.TempPathFactory):
    return _build(tmp_path_factory.mktemp("lm") / "rotary", "rotary", 0, context=6)


@pytest.fixture(scope="module")
def sinusoidal(tmp_path_factory: pytest.TempPathFactory):
    return _build(tmp_path_factory.mktemp("lm") / "sin", "sinusoidal", 40, context=16)


def _reference_logits(lm, context: int, text_len: int, columns: np.ndarray, start: int = 0) -> np.ndarray:
    """export.lm.ring_step_through in torch, null condition on both rows: [B, K, T, V]."""
    from export.conditioner import null_condition
    from export.lm import LMStep, ring_step_through

    step = LMStep(lm, batch=2, context=context, text_len=text_len)
    ck, cv, cm = null_condition(lm, text_len, batch=2)
    codes = torch.from_numpy(np.repeat(columns.T[None], 2, axis=0))  # [2, K, T]
    return ring_step_through(step, codes, ck, cv, cm, start=start).numpy()


def _columns(pack: packfmt.Pack, n: int, seed: int = 0) -> np.ndarray:
    cb = pack.codebooks
    cols = np.random.default_rng(seed).integers(0, cb.cardinality, size=(n, cb.count))
    cols[0] = cb.special_token
    return cols


def test_ring_cache_matches_torch_past_wraparound(rotary) -> None:
    pack, lm, text_len = rotary
    sess = LMSession(pack)
    cols = _columns(pack, 15)  # context 6: the ring wraps twice
    got = np.stack([sess.step(c).copy() for c in cols], axis=2)
    want = _reference_logits(lm, pack.lm["context"], text_len, cols)
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert sess.position == 15


def test_reset_starts_a_fresh_stream(rotary) -> None:
    pack, _, _ = rotary
    sess = LMSession(pack)
    cols = _columns(pack, 5)
    first = [sess.step(c).copy() for c in cols]
    sess.reset()
    again = [sess.step(c).copy() for c in cols]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_condition_changes_logits_but_keeps_context(rotary) -> None:
    pack, _, _ = rotary
    from engine.conditioner import Conditioner

    cond = Conditioner(pack).encode(pack.prompts[0])
    a, b = LMSession(pack), LMSession(pack)
    cols = _columns(pack, 6)
    for c in cols[:4]:
        np.testing.assert_array_equal(a.step(c), b.step(c))
    b.set_condition(cond.cross_k, cond.cross_v, cond.mask)
    la, lb = a.step(cols[4]).copy(), b.step(cols[4]).copy()
    assert not np.allclose(la[0], lb[0])  # the conditioned row changed
    np.testing.assert_allclose(la[1], lb[1], atol=1e-6)  # the null row did not
    assert a.position == b.position == 5


def test_absolute_positions_reprime_and_stay_in_range(sinusoidal) -> None:
    pack, lm, text_len = sinusoidal
    sess = LMSession(pack)
    max_pos, p = 40, sess.prime_len
    assert p == 10
    cols = _columns(pack, 200, seed=3)
    swaps = []
    for n, c in enumerate(cols):
        before = sess.reprimes
        logits = sess.step(c).copy()
        assert sess._main.pos - 1 < max_pos
        if sess.reprimes != before:
            swaps.append((n, sess.replay_start, logits))
    assert sess.reprimes >= 5
    # Step n right after a swap equals a fresh model that saw the replayed columns (from P before
    # the re-prime started) up to n, from position 0.
    n, start, logits = swaps[1]
    assert n - start >= p
    want = _reference_logits(lm, pack.lm["context"], text_len, cols[start : n + 1])[:, :, -1]
    np.testing.assert_allclose(logits, want, atol=2e-4)


def test_decoder_binding_matches_plain_run(rotary) -> None:
    pack, _, _ = rotary
    dec = DecoderSession(pack)
    ref = pack.session(pack.decoder)
    states = {t.name: np.zeros(t.shape, np.float32 if t.dtype == "float32" else np.int64)
              for t in pack.decoder.inputs if t.state}
    names = ["pcm"] + [t.state for t in pack.decoder.inputs if t.state]
    rng = np.random.default_rng(0)
    for _ in range(7):
        codes = rng.integers(0, pack.codebooks.cardinality, size=(1, pack.codebooks.count, dec.frames_per_step))
        got = dec.step(codes).copy()
        outs = ref.run(names, {"codes": codes, **states})
        for t, v in zip([t for t in pack.decoder.inputs if t.state], outs[1:]):
            states[t.name] = v
        np.testing.assert_allclose(got, outs[0][0], atol=1e-6)
