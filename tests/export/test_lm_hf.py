"""Parity with transformers' MusicGen: T5 conditioning graph + LM step graph (ONNX) vs the HF forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from export.conditioner import ConditionerGraph, T5Wrapper, step_cross_inputs  # noqa: E402
from export.lm import (  # noqa: E402
    LMStep,
    apply_delay,
    load_hf_musicgen_decoder,
    ring_step_through,
    sinusoidal_embedding,
)
from export.onnx import export_graph, max_abs_diff, ort_session, run_onnx  # noqa: E402
from tests.export.test_lm import assert_graph_matches_spec  # noqa: E402

TOL = 1e-3
CARD, K, TC, FRAMES = 32, 4, 6, 10


def tiny_musicgen(text_dim: int, seed: int = 0, **encodec_kwargs):
    """A random MusicgenForConditionalGeneration built offline from tiny sub-configs.

    ``encodec_kwargs`` override the tiny EnCodec config (e.g. MusicGen's
    non-causal reflect padding: ``use_causal_conv=False, pad_mode="reflect"``).
    """
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # special ids == vocab_size is MusicGen's convention, not an error
    torch.manual_seed(seed)
    decoder = MusicgenDecoderConfig(
        vocab_size=CARD,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        num_codebooks=K,
        max_position_embeddings=64,
        pad_token_id=CARD,
        bos_token_id=CARD,
        decoder_start_token_id=CARD,
    )
    t5 = T5Config(
        vocab_size=40, d_model=text_dim, d_kv=4, d_ff=24, num_layers=2, num_heads=2, relative_attention_num_buckets=8
    )
    encodec = EncodecConfig(
        **{"codebook_size": CARD, "num_filters": 4, "upsampling_ratios": [2, 2], "hidden_size": 8, "codebook_dim": 8,
           **encodec_kwargs}
    )
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5, audio_encoder=encodec, decoder=decoder))
    with torch.no_grad():  # move every weight (LayerNorms included) off its init value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval()


@pytest.mark.parametrize("text_dim", [16, 24], ids=["same-width", "enc_to_dec_proj"])
def test_onnx_graphs_match_transformers(text_dim: int, tmp_path: Path) -> None:
    model = tiny_musicgen(text_dim)
    assert hasattr(model, "enc_to_dec_proj") == (text_dim != 16)
    g = torch.Generator().manual_seed(1)

    # text: 4 real tokens then padding (T5 sees the mask; the states are zeroed after, as in HF)
    ids = torch.randint(1, 40, (1, TC), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    ids = ids * mask

    # decoder input: BOS column + delay pattern, as MusicGen's build_delay_pattern_mask lays it out
    codes = torch.randint(0, CARD, (1, K, FRAMES), generator=g)
    grid = torch.cat([torch.full((1, K, 1), CARD), apply_delay(codes, list(range(K)), CARD)], dim=-1)[..., :FRAMES]
    assert grid[0, 3, :4].tolist() == [CARD] * 4
    dec_ids = grid.reshape(K, FRAMES)

    with torch.no_grad():
        cond = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        t5_hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        # transformers' null condition for guidance_scale > 1: zero states, zero mask
        null = model(
            encoder_outputs=(torch.zeros_like(t5_hidden),),
            attention_mask=torch.zeros_like(mask),
            decoder_input_ids=dec_ids,
        ).logits
    cond, null = cond.view(1, K, FRAMES, CARD)[0], null.view(1, K, FRAMES, CARD)[0]
    assert torch.isfinite(null).all()

    lm = load_hf_musicgen_decoder(model.decoder)
    table = model.decoder.model.decoder.embed_positions.weights  # MusicGen's sinusoidal table
    assert max_abs_diff(sinusoidal_embedding(torch.arange(table.shape[0]), lm.inv_freq), table) <= 1e-6
    text = T5Wrapper.from_musicgen(model).eval()
    cgraph = ConditionerGraph(text, lm, text_len=TC).eval()
    step = LMStep(lm, batch=2, context=FRAMES, text_len=TC).eval()

    # torch LM full forward first (localises a failure), then the ONNX graphs
    with torch.no_grad():
        hidden = text(ids, mask)
        full = lm(grid.repeat(2, 1, 1), torch.cat([hidden, torch.zeros_like(hidden)]), torch.cat([mask, 0 * mask]))
    assert max_abs_diff(full[0], cond) <= TOL
    assert max_abs_diff(full[1], null) <= TOL

    cpath = export_graph(cgraph, [ids, mask], cgraph.spec, tmp_path / "conditioner.onnx")
    spath = export_graph(step, step.example_inputs(), step.spec, tmp_path / "lm_step.onnx")
    assert_graph_matches_spec(cpath, cgraph.spec)
    assert_graph_matches_spec(spath, step.spec)
    csess, ssess = ort_session(cpath), ort_session(spath)

    ck, cv = (torch.from_numpy(a) for a in run_onnx(csess, cgraph.spec, [ids, mask]))
    with torch.no_grad():
        ref_k, ref_v = cgraph(ids, mask)
    assert max_abs_diff(ck, ref_k) <= 1e-4 and max_abs_diff(cv, ref_v) <= 1e-4
    cross_k, cross_v, cross_mask = step_cross_inputs(ck, cv, mask, lm)
    logits = ring_step_through(
        step, grid.repeat(2, 1, 1), cross_k, cross_v, cross_mask, run=lambda a: run_onnx(ssess, step.spec, a)
    )
    assert max_abs_diff(logits[0], cond) <= TOL
    assert max_abs_diff(logits[1], null) <= TOL
    scale = 3.0
    guided = logits[1] + (logits[0] - logits[1]) * scale
    assert max_abs_diff(guided, null + (cond - null) * scale) <= TOL

    # the ONNX conditioner also holds for another prompt (no padding at all)
    ids2 = torch.randint(1, 40, (1, TC), generator=g)
    mask2 = torch.ones(1, TC, dtype=torch.int64)
    with torch.no_grad():
        ref2 = cgraph(ids2, mask2)
    for got, ref in zip(run_onnx(csess, cgraph.spec, [ids2, mask2]), ref2):
        assert max_abs_diff(got, ref) <= 1e-4


def test_loader_refuses_unsupported_settings() -> None:
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    def decoder(**kw):
        c = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=8, num_codebooks=2)
        c.update(kw)
        return MusicgenForCausalLM(MusicgenDecoderConfig(pad_token_id=8, bos_token_id=8, **c))

    assert load_hf_musicgen_decoder(decoder()).cfg.card == 8
    with pytest.raises(ValueError, match="audio_channels"):
        load_hf_musicgen_decoder(decoder(audio_channels=2, num_codebooks=4))
    with pytest.raises(ValueError, match="activation_function"):
        load_hf_musicgen_decoder(decoder(activation_function="silu"))
