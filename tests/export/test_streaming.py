"""Streaming decoder: exact against offline decode, ONNX exact against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.codec import Codec, CodecConfig
from export.onnx import GraphSpec, export_graph, max_abs_diff, ort_session, run_onnx
from export.streaming import StreamingDecoder, stream_decode

TOTAL_FRAMES = 21  # a multiple of 1, 3 and 7


def tiny(causal: bool, pad_mode: str, channels: int = 1, **kw: object) -> CodecConfig:
    base: dict = dict(
        sample_rate=8000, channels=channels, n_filters=4, ratios=[4, 2], dimension=16,
        n_codebooks=2, codebook_size=16, causal=causal, pad_mode=pad_mode,
    )
    base.update(kw)
    return CodecConfig(**base)


def check_against_offline(stream: torch.Tensor | np.ndarray, offline: torch.Tensor, lookahead: int, atol: float) -> None:
    """Stream sample i == offline sample i - lookahead; the pre-roll is silent."""
    stream = torch.as_tensor(np.asarray(stream)) if not isinstance(stream, torch.Tensor) else stream
    n = offline.shape[-1] - lookahead
    assert n > 0
    assert max_abs_diff(stream[..., lookahead:], offline[..., :n]) <= atol
    if lookahead:
        assert float(stream[..., :lookahead].abs().max()) == 0.0


@pytest.mark.parametrize("frames", [1, 3, 7])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("causal", [False, True])
def test_stream_equals_offline(causal: bool, pad_mode: str, channels: int, frames: int) -> None:
    torch.manual_seed(0)
    # two residual layers (dilations 1, 2) and a conv shortcut in the stereo cases
    cfg = tiny(causal, pad_mode, channels, n_residual_layers=2, conv_shortcut=channels == 2)
    codec = Codec(cfg).eval()
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.n_codebooks, TOTAL_FRAMES))
    with torch.no_grad():
        offline = codec.decode(codes)
    dec = StreamingDecoder(codec, frames_per_step=frames, batch=2)
    stream = stream_decode(dec, codes)
    assert stream.shape == offline.shape
    if causal and pad_mode == "constant":
        assert dec.lookahead_samples == 0
    check_against_offline(stream, offline, dec.lookahead_samples, 1e-4)


def test_lookahead_values() -> None:
    # ratios [4, 2], kernels 7/7/3, one residual layer, non-causal:
    # conv 3 frames -> up(4): 3*4+2 -> res +1 -> up(2): 15*2+1 -> res +1 -> conv +3 = 35
    codec = Codec(tiny(False, "constant"))
    assert StreamingDecoder(codec).lookahead_samples == 35
    assert StreamingDecoder(Codec(tiny(False, "reflect"))).lookahead_samples == 35
    # causal reflect pads the whole kernel on the left, which needs that much future at the start
    assert StreamingDecoder(Codec(tiny(True, "reflect"))).lookahead_samples == 6 * 8 + 2 * 2 + 2 + 6


def test_spec_contract() -> None:
    dec = StreamingDecoder(Codec(tiny(False, "reflect", 2)), frames_per_step=3, batch=2)
    spec = dec.spec
    assert spec.inputs[0].name == "codes" and spec.inputs[0].shape == (2, 2, 3) and spec.inputs[0].dtype == "int64"
    assert spec.outputs[0].name == "pcm" and spec.outputs[0].shape == (2, 2, 24)
    assert (spec.inputs[1].name, spec.inputs[1].shape, spec.inputs[1].dtype) == ("step_in", (1,), "int64")
    assert (spec.outputs[1].name, spec.outputs[1].shape, spec.outputs[1].dtype) == ("step_out", (1,), "int64")
    assert len(spec.inputs) == len(spec.outputs)
    for i, o in zip(spec.inputs[1:], spec.outputs[1:]):
        assert i.name.endswith("_in") and o.name == i.name[:-3] + "_out"
        assert i.state == o.name and o.state == i.name
        assert i.shape == o.shape and i.dtype == o.dtype
    assert spec.meta["lookahead_samples"] == dec.lookahead_samples
    state = dec.initial_state()
    assert [tuple(s.shape) for s in state] == [s.shape for s in spec.inputs[1:]]
    outs = dec(*dec.example_inputs())
    assert [tuple(o.shape) for o in outs] == [s.shape for s in spec.outputs]
    assert int(outs[1]) == 3


def check_graph_io(path: Path, spec: GraphSpec) -> None:
    import onnx

    model = onnx.load(str(path))
    types = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    for values, specs in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        assert [v.name for v in values] == [s.name for s in specs]
        for v, s in zip(values, specs):
            t = v.type.tensor_type
            assert tuple(d.dim_value for d in t.shape.dim) == s.shape, v.name
            assert t.elem_type == types[s.dtype], v.name


@pytest.mark.parametrize(
    "causal, pad_mode, channels, frames",
    [(False, "reflect", 1, 1), (False, "constant", 2, 3), (True, "constant", 1, 3), (True, "reflect", 2, 7)],
)
def test_onnx_equals_torch(tmp_path: Path, causal: bool, pad_mode: str, channels: int, frames: int) -> None:
    torch.manual_seed(1)
    cfg = tiny(causal, pad_mode, channels, conv_shortcut=causal)
    codec = Codec(cfg).eval()
    dec = StreamingDecoder(codec, frames_per_step=frames)
    path = export_graph(dec, dec.example_inputs(), dec.spec, tmp_path / "decoder.onnx")
    check_graph_io(path, dec.spec)
    session = ort_session(path)

    codes = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, TOTAL_FRAMES))
    t_state = dec.initial_state()
    o_state: list = [s.numpy() for s in dec.initial_state()]
    pcm = []
    with torch.no_grad():
        for t in range(0, TOTAL_FRAMES, frames):
            chunk = codes[..., t : t + frames]
            t_out = dec(chunk, *t_state)
            o_out = run_onnx(session, dec.spec, [chunk, *o_state])
            for a, b, s in zip(t_out, o_out, dec.spec.outputs):
                assert max_abs_diff(a, b) <= 1e-4, s.name
            pcm.append(o_out[0])
            t_state, o_state = list(t_out[1:]), o_out[1:]
        offline = codec.decode(codes)
    assert int(o_state[0][0]) == TOTAL_FRAMES
    check_against_offline(np.concatenate(pcm, axis=-1), offline, dec.lookahead_samples, 1e-4)
