"""LM: ring-cache stepping == full forward, ONNX == torch, delay pattern."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

from export.lm import (
    LM,
    NEG,
    LMConfig,
    LMStep,
    additive_mask,
    apply_delay,
    revert_delay,
    ring_step_through,
)
from export.onnx import GraphSpec, export_graph, max_abs_diff, ort_session, run_onnx

TOL = 1e-4


def tiny_lm(positions: str, seed: int = 0, cross_dim: int = 24, text_input: bool = False) -> LM:
    torch.manual_seed(seed)
    cfg = LMConfig(dim=32, layers=2, heads=4, ffn_dim=64, n_codebooks=4, card=16, positions=positions,
                   cross_dim=cross_dim, text_input=text_input)
    lm = LM(cfg).eval()
    with torch.no_grad():  # LayerNorms start as identity: make them matter
        for m in lm.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return lm


def lm_inputs(lm: LM, t: int, tc: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [2, K, T] with a BOS column, cross [2, Tc, cross_dim], mask: row 0 padded, row 1 null."""
    g = torch.Generator().manual_seed(seed)
    cfg = lm.cfg
    codes = torch.randint(0, cfg.card + 1, (2, cfg.n_codebooks, t), generator=g)
    codes[:, :, 0] = cfg.special
    cross = torch.randn(2, tc, int(cfg.cross_dim), generator=g)
    mask = torch.ones(2, tc)
    mask[0, tc - 2 :] = 0
    mask[1] = 0  # fully masked: attends uniformly, as transformers' null condition
    return codes, cross, mask


def step_logits(lm: LM, codes: torch.Tensor, cross: torch.Tensor, mask: torch.Tensor, context: int, start: int = 0, run=None) -> torch.Tensor:
    step = LMStep(lm, batch=2, context=context, text_len=cross.shape[1]).eval()
    with torch.no_grad():
        ck, cv = lm.cross_kv(cross)
    return ring_step_through(step, codes, ck, cv, additive_mask(mask), start=start, run=run)


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_ring_step_equals_full_forward(positions: str) -> None:
    lm = tiny_lm(positions)
    codes, cross, mask = lm_inputs(lm, t=12)
    with torch.no_grad():
        full = lm(codes, cross, mask)
    assert full.shape == (2, 4, 12, 16)
    stepped = step_logits(lm, codes, cross, mask, context=16)
    assert max_abs_diff(stepped, full) <= TOL
    stepped_exact = step_logits(lm, codes, cross, mask, context=12)  # S == T
    assert max_abs_diff(stepped_exact, full) <= TOL


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_ring_wraps_like_sliding_window(positions: str) -> None:
    lm = tiny_lm(positions, seed=3)
    s = 5
    codes, cross, mask = lm_inputs(lm, t=14, seed=4)
    with torch.no_grad():
        windowed = lm(codes, cross, mask, window=s + 1)
        full = lm(codes, cross, mask)
    stepped = step_logits(lm, codes, cross, mask, context=s)
    assert max_abs_diff(stepped, windowed) <= TOL
    assert max_abs_diff(windowed, full) > 1e-3  # the window really bites


def test_rotary_far_position_keeps_precision() -> None:
    """Rotary is relative: starting at position 1e9 (about 8 months at 50 Hz) gives the same logits."""
    lm = tiny_lm("rotary", seed=5)
    codes, cross, mask = lm_inputs(lm, t=8, seed=6)
    with torch.no_grad():
        full = lm(codes, cross, mask)
    far = step_logits(lm, codes, cross, mask, context=8, start=10**9 + 7)
    assert max_abs_diff(far, full) <= TOL


def test_no_cross_attention_step() -> None:
    torch.manual_seed(0)
    lm = LM(LMConfig(dim=16, layers=1, heads=2, ffn_dim=32, n_codebooks=2, card=8, cross_attention=False)).eval()
    step = LMStep(lm, batch=1, context=6)
    assert "cross_k" not in step.spec.input_names
    codes = torch.randint(0, 9, (1, 2, 6))
    with torch.no_grad():
        full = lm(codes)
    assert max_abs_diff(ring_step_through(step, codes), full) <= TOL


def assert_graph_matches_spec(path: Path, spec: GraphSpec) -> None:
    model = onnx.load(str(path))
    elem = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}

    def io(values) -> list[tuple[str, tuple[int, ...], str]]:
        return [
            (v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim), elem[v.type.tensor_type.elem_type])
            for v in values
        ]

    assert io(model.graph.input) == [(s.name, s.shape, s.dtype) for s in spec.inputs]
    assert io(model.graph.output) == [(s.name, s.shape, s.dtype) for s in spec.outputs]


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_onnx_step_equals_torch(positions: str, tmp_path: Path) -> None:
    lm = tiny_lm(positions, seed=7)
    s = 6
    codes, cross, mask = lm_inputs(lm, t=10, seed=8)
    step = LMStep(lm, batch=2, context=s, text_len=cross.shape[1]).eval()
    path = export_graph(step, step.example_inputs(), step.spec, tmp_path / "lm_step.onnx")
    assert_graph_matches_spec(path, step.spec)
    state = {s_.name: s_.state for s_ in step.spec.inputs + step.spec.outputs if s_.state}
    layers = lm.cfg.layers
    assert state == {
        **{f"cache_k_{i}": "new_k" for i in range(layers)},
        **{f"cache_v_{i}": "new_v" for i in range(layers)},
        "new_k": "cache_k_*",
        "new_v": "cache_v_*",
    }
    sess = ort_session(path, threads=1)
    run = lambda args: run_onnx(sess, step.spec, args)  # noqa: E731
    got = step_logits(lm, codes, cross, mask, context=s, run=run)  # wraps the ring too (T > S)
    ref = step_logits(lm, codes, cross, mask, context=s)
    assert max_abs_diff(got, ref) <= TOL


def test_text_input_adds_the_pooled_prompt_to_every_frame(tmp_path: Path) -> None:
    lm = tiny_lm("rotary", seed=9, text_input=True)
    codes, cross, mask = lm_inputs(lm, t=10, seed=10)
    cross[1] = 0  # the null condition: zero hidden states, fully masked
    with torch.no_grad():
        full = lm(codes, cross, mask)
        ck, cv = lm.cross_kv(cross)
        offset = lm.text_offset(cv[0], additive_mask(mask)[:, None, None, :])
        # the mean of the valid text positions through layer 0's value projection, then text_in
        mean = (cross[0, :4]).mean(0)
        want = lm.text_in(lm.layers[0].cross_attn.v_proj(mean))
    assert offset.shape == (2, 1, 32)
    assert torch.allclose(offset[0, 0], want, atol=1e-5)
    assert float(offset[1].abs().max()) == 0.0  # the null row gets no offset: guidance stays what it was
    plain = LM(dataclasses.replace(lm.cfg, text_input=False)).eval()
    plain.load_state_dict({k: v for k, v in lm.state_dict().items() if not k.startswith("text_in.")})
    with torch.no_grad():
        without = plain(codes, cross, mask)
    assert max_abs_diff(full[1], without[1]) <= TOL and max_abs_diff(full[0], without[0]) > 1e-2

    # the step graph (torch and ONNX) computes the offset from its cross_v_0 / cross_mask inputs
    s = 6
    assert max_abs_diff(step_logits(lm, codes, cross, mask, context=16), full) <= TOL
    step = LMStep(lm, batch=2, context=s, text_len=cross.shape[1]).eval()
    path = export_graph(step, step.example_inputs(), step.spec, tmp_path / "lm_step.onnx")
    assert_graph_matches_spec(path, step.spec)
    sess = ort_session(path, threads=1)
    got = step_logits(lm, codes, cross, mask, context=s, run=lambda args: run_onnx(sess, step.spec, args))
    assert max_abs_diff(got, step_logits(lm, codes, cross, mask, context=s)) <= TOL


def test_delay_pattern_round_trip() -> None:
    codes = torch.arange(2 * 4 * 5).view(2, 4, 5)
    delays = [0, 1, 2, 3]
    d = apply_delay(codes, delays, special=-1)
    assert d.shape == (2, 4, 8)
    assert d[0, 1].tolist() == [-1, 5, 6, 7, 8, 9, -1, -1]
    assert d[0, 3].tolist() == [-1, -1, -1, 15, 16, 17, 18, 19]
    assert torch.equal(revert_delay(d, delays), codes)
    odd = [2, 0, 5]
    c3 = torch.randint(0, 10, (1, 3, 7))
    assert torch.equal(revert_delay(apply_delay(c3, odd, 99), odd), c3)
    with pytest.raises(ValueError):
        apply_delay(c3, delays, 0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="positions"):
        LMConfig(positions="alibi")
    with pytest.raises(ValueError, match="activation"):
        LMConfig(activation="swish")
    assert LMConfig(dim=64, heads=4).cross_dim == 64
    with pytest.raises(ValueError, match="text_input needs cross_attention"):
        LMConfig(text_input=True, cross_attention=False)
    assert NEG == torch.finfo(torch.float32).min
