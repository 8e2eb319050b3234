"""Conditioner: word tokenizer round trip, conditioning graph ONNX == torch, null row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.conditioner import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    ConditionerGraph,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
    null_condition,
    step_cross_inputs,
)
from export.lm import LM, LMConfig, LMStep, additive_mask, ring_step_through
from export.onnx import export_graph, max_abs_diff, ort_session, run_onnx
from tests.export.test_lm import assert_graph_matches_spec

PROMPTS = [
    "Continuous hum with pitch and frequency modulation",
    "Continuous, rapid, sizzling elements",
    "Crispy crunch; sizzling OIL in a hot pan!",
]


def test_word_tokenizer_round_trip(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = WordTokenizer.build(PROMPTS, length=8)
    vocab = tok.tokenizer.get_vocab()
    assert (vocab["<pad>"], vocab["<unk>"], vocab["</s>"]) == (PAD_ID, UNK_ID, EOS_ID)
    assert vocab["continuous"] == 3 and vocab["sizzling"] == 4  # most frequent first
    ids, mask = tok.encode("SIZZLING, crispy   banana-oil")
    assert ids == [vocab["sizzling"], vocab["crispy"], UNK_ID, vocab["oil"], EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert mask == [1, 1, 1, 1, 1, 0, 0, 0]
    long_ids, long_mask = tok.encode(" ".join(["hum"] * 20))
    assert len(long_ids) == 8 and long_ids[-1] == EOS_ID and long_mask == [1] * 8

    path = tok.save(tmp_path / "tokenizer.json")
    plain = Tokenizer.from_file(str(path))  # what the engine does: no cicada code
    for text in PROMPTS + ["", "unknown words only", "Crispy CRUNCH"]:
        enc = plain.encode(text)
        assert (list(enc.ids), list(enc.attention_mask)) == tok.encode(text)
    again = WordTokenizer.load(path)
    assert again.length == 8 and again.vocab_size == tok.vocab_size
    t, m = again(PROMPTS)
    assert t.shape == m.shape == (3, 8) and t.dtype == torch.int64


def tiny_text_side(bias: bool = False) -> tuple[TextEncoder, LM]:
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(vocab_size=20, dim=24, layers=2, heads=4, ffn_dim=48, max_len=7)).eval()
    lm = LM(LMConfig(dim=32, layers=2, heads=4, ffn_dim=64, n_codebooks=2, card=8, cross_dim=24, bias=bias)).eval()
    return enc, lm


def test_conditioner_graph_onnx_equals_torch(tmp_path: Path) -> None:
    enc, lm = tiny_text_side()
    graph = ConditionerGraph(enc, lm).eval()
    assert graph.spec.output_names == ["cross_k", "cross_v"]
    assert graph.spec.outputs[0].shape == (2, 1, 4, 7, 8)
    path = export_graph(graph, graph.example_inputs(vocab_size=20), graph.spec, tmp_path / "cond.onnx")
    assert_graph_matches_spec(path, graph.spec)
    sess = ort_session(path)
    tok = WordTokenizer.build(PROMPTS, length=7)
    for text in ["sizzling oil", "continuous hum with pitch and frequency modulation"]:
        tokens, mask = tok(text)
        with torch.no_grad():
            ref = graph(tokens, mask)
            hidden = enc(tokens, mask)
            direct = lm.cross_kv(hidden)
        got = run_onnx(sess, graph.spec, [tokens, mask])
        for g, r, d in zip(got, ref, direct):
            assert max_abs_diff(g, r) <= 1e-4
            assert max_abs_diff(r, d) == 0.0
        n = int(mask.sum())
        assert torch.all(hidden[0, n:] == 0)  # padding zeroed, as MusicGen does


def test_null_row_equals_zero_hidden_zero_mask() -> None:
    """Engine's null row (zero k/v, fully masked) == the LM conditioned on zero hidden with a zero mask."""
    enc, lm = tiny_text_side()
    graph = ConditionerGraph(enc, lm).eval()
    tokens, mask = graph.example_inputs(vocab_size=20)
    codes = torch.randint(0, 9, (2, 2, 5))
    codes[:, :, 0] = 8
    with torch.no_grad():
        ck, cv = graph(tokens, mask)
        cross = torch.stack([enc(tokens, mask)[0], torch.zeros(7, 24)])
        full = lm(codes, cross, torch.stack([mask[0], torch.zeros(7, dtype=torch.int64)]))
    k2, v2, m2 = step_cross_inputs(ck, cv, mask, lm)
    assert torch.equal(m2[1], null_condition(lm, 7)[2][0])
    step = LMStep(lm, batch=2, context=5, text_len=7)
    stepped = ring_step_through(step, codes, k2, v2, m2)
    assert max_abs_diff(stepped, full) <= 1e-4


def test_conditioner_refuses_biased_cross_projections() -> None:
    enc, lm = tiny_text_side(bias=True)
    with pytest.raises(ValueError, match="bias"):
        ConditionerGraph(enc, lm)
    enc2 = TextEncoder(TextEncoderConfig(vocab_size=5, dim=16, layers=1, heads=2, ffn_dim=16, max_len=4))
    with pytest.raises(ValueError, match="cross_dim"):
        ConditionerGraph(enc2, tiny_text_side()[1])
    assert additive_mask(torch.tensor([1, 0])).tolist()[0] == 0.0
