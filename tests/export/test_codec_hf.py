"""Parity with Hugging Face transformers' EncodecModel (random weights, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from export.codec import CodecConfig, load_hf_encodec  # noqa: E402
from export.onnx import export_graph, ort_session, run_onnx  # noqa: E402
from export.streaming import StreamingDecoder, decoder_lookahead, stream_decode  # noqa: E402

TOTAL_FRAMES = 24


def hf_model(seed: int = 0, **kw: object) -> transformers.EncodecModel:
    """A tiny EncodecModel: hop 8, 2 codebooks x 16 (8 kbps at 1000 frames/s), random codebooks."""
    base: dict = dict(
        sampling_rate=8000, audio_channels=1, num_filters=4, upsampling_ratios=[4, 2], hidden_size=16,
        codebook_size=16, target_bandwidths=[8.0], num_lstm_layers=2, num_residual_layers=1,
        use_causal_conv=False, pad_mode="reflect", use_conv_shortcut=False,
    )
    base.update(kw)
    torch.manual_seed(seed)
    model = transformers.EncodecModel(transformers.EncodecConfig(**base)).eval()
    with torch.no_grad():  # HF initialises codebooks to zeros
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
    return model


VARIANTS = [
    dict(),
    dict(audio_channels=2, use_conv_shortcut=True),
    dict(use_causal_conv=True, pad_mode="constant"),
    dict(use_causal_conv=True, pad_mode="reflect", use_conv_shortcut=True, num_residual_layers=2),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=["nc-reflect", "nc-reflect-stereo", "causal-const", "causal-reflect"])
def test_offline_parity(kw: dict) -> None:
    hf = hf_model(**kw)
    codec = load_hf_encodec(hf)
    cfg = codec.cfg
    assert cfg.n_codebooks == hf.config.num_quantizers == 2
    with torch.no_grad():
        for frames in (1, 2, TOTAL_FRAMES):  # 1 and 2 frames exercise reflect on short inputs
            codes = torch.randint(0, 16, (2, 2, frames))
            want = hf.decode(codes[None], [None]).audio_values
            got = codec.decode(codes)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4
        for length in (5, 64, 93):
            wav = torch.randn(2, cfg.channels, length)
            want_codes = hf.encode(wav).audio_codes[0]
            got_codes = codec.encode(wav)
            assert got_codes.shape == want_codes.shape == (2, 2, -(-length // cfg.hop_length))
            assert torch.equal(got_codes, want_codes)


@pytest.mark.parametrize("kw", [VARIANTS[0], VARIANTS[3]], ids=["nc-reflect", "causal-reflect"])
def test_streaming_matches_hf(tmp_path: Path, kw: dict) -> None:
    hf = hf_model(seed=3, **kw)
    codec = load_hf_encodec(hf)
    codes = torch.randint(0, 16, (1, 2, TOTAL_FRAMES))
    with torch.no_grad():
        want = hf.decode(codes[None], [None]).audio_values
    dec = StreamingDecoder(codec, frames_per_step=3)
    la = dec.lookahead_samples
    n = want.shape[-1] - la

    stream = stream_decode(dec, codes)
    assert (stream[..., la:] - want[..., :n]).abs().max().item() <= 1e-3
    assert stream[..., :la].abs().max().item() == 0.0

    path = export_graph(dec, dec.example_inputs(), dec.spec, tmp_path / "dec.onnx")
    session = ort_session(path)
    state: list = [s.numpy() for s in dec.initial_state()]
    pcm = []
    for t in range(0, TOTAL_FRAMES, 3):
        out = run_onnx(session, dec.spec, [codes[..., t : t + 3], *state])
        pcm.append(out[0])
        state = out[1:]
    onnx_pcm = np.concatenate(pcm, axis=-1)
    assert np.abs(onnx_pcm[..., la:] - want[..., :n].numpy()).max() <= 1e-3
    assert np.abs(onnx_pcm[..., :la]).max() == 0.0


@pytest.mark.parametrize(
    "field, value",
    [("norm_type", "time_group_norm"), ("normalize", True), ("chunk_length_s", 1.0), ("pad_mode", "replicate")],
)
def test_refuses_unsupported(field: str, value: object) -> None:
    kw: dict = {field: value}
    if field == "chunk_length_s":
        kw["overlap"] = 0.01
    hf = hf_model(**kw)
    with pytest.raises(ValueError, match=field):
        load_hf_encodec(hf)


def test_musicgen_32khz_config_loads() -> None:
    hf_cfg = transformers.EncodecConfig(
        sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4], hidden_size=128,
        num_lstm_layers=2, num_residual_layers=1, use_causal_conv=False, pad_mode="reflect",
        use_conv_shortcut=False, codebook_size=2048, target_bandwidths=[2.2], normalize=False,
    )
    hf = transformers.EncodecModel(hf_cfg).eval()
    codec = load_hf_encodec(hf)
    assert codec.cfg == CodecConfig.musicgen_32khz()
    # structural lookahead: 3 frames * 640 + (4 + 1) * 80 + (3 + 1) * 16 + (2 + 1) * 4 + (2 + 1) + 3
    dec = StreamingDecoder(codec, frames_per_step=1)
    assert dec.lookahead_samples == decoder_lookahead(CodecConfig.musicgen_32khz()) == 2402
    with torch.no_grad():
        codes = torch.randint(0, 2048, (1, 4, 2))
        want = hf.decode(codes[None], [None]).audio_values
        got = codec.decode(codes)
    assert (got - want).abs().max().item() <= 1e-4
