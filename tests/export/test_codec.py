"""Offline codec: configuration, shapes, padding rules, quantiser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from export.codec import Codec, CodecConfig, PaddedConv1d, ResidualVQ, TrimmedConvTranspose1d, hold_codes, pad1d


def tiny(**kw: object) -> CodecConfig:
    base: dict = dict(
        sample_rate=8000, channels=1, n_filters=4, ratios=[4, 2], dimension=16,
        n_codebooks=2, codebook_size=16, causal=False, pad_mode="reflect",
    )
    base.update(kw)
    return CodecConfig(**base)


def test_musicgen_32khz_shape() -> None:
    cfg = CodecConfig.musicgen_32khz()
    assert (cfg.sample_rate, cfg.channels, cfg.n_filters, cfg.ratios, cfg.dimension) == (32000, 1, 64, [8, 5, 4, 4], 128)
    assert (cfg.lstm_layers, cfg.n_codebooks, cfg.codebook_size) == (2, 4, 2048)
    assert (cfg.causal, cfg.pad_mode, cfg.conv_shortcut) == (False, "reflect", False)
    assert cfg.hop_length == 640
    assert cfg.frame_rate == 50.0
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(channels=3), "channels"),
        (dict(pad_mode="replicate"), "pad_mode"),
        (dict(trim_right_ratio=0.5), "trim_right_ratio"),
        (dict(ratios=[]), "ratios"),
    ],
)
def test_config_rejects(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_pad1d_reflect_short_input() -> None:
    x = torch.arange(1.0, 3.0).view(1, 1, 2)  # [1, 2]
    # long enough: plain reflection
    assert pad1d(torch.arange(5.0).view(1, 1, 5), 2, 1, "reflect").flatten().tolist() == [2, 1, 0, 1, 2, 3, 4, 3]
    # too short for a pad of 3: zero-extend to 4 samples, reflect, cut from the right
    got = pad1d(x, 3, 1, "reflect").flatten().tolist()
    ext = F.pad(F.pad(x, (0, 2)), (3, 1), mode="reflect")[..., :-2].flatten().tolist()
    assert got == ext and len(got) == 2 + 3 + 1
    assert pad1d(x, 3, 1, "constant").flatten().tolist() == [0, 0, 0, 1, 2, 0]


@pytest.mark.parametrize("causal", [False, True])
def test_conv_padding_rules(causal: bool) -> None:
    conv = PaddedConv1d(1, 1, 3, dilation=2, causal=causal, pad_mode="constant")
    assert conv.padding_total == 4
    assert conv.static_padding() == ((4, 0) if causal else (2, 2))
    strided = PaddedConv1d(1, 1, 8, stride=4, causal=causal)
    assert strided.padding_total == 4
    assert [strided(torch.randn(1, 1, t)).shape[-1] for t in (1, 4, 5, 9)] == [1, 1, 2, 3]
    up = TrimmedConvTranspose1d(1, 1, 10, 5, causal=causal)
    assert up.trims() == ((0, 5) if causal else (3, 2))
    assert up(torch.randn(1, 1, 3)).shape[-1] == 15


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_encode_decode_shapes(channels: int, causal: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny(channels=channels, causal=causal, pad_mode="constant" if causal else "reflect", conv_shortcut=causal)
    codec = Codec(cfg).eval()
    with torch.no_grad():
        for t in (1, 7, 8, 37):
            wav = torch.randn(2, channels, t)
            codes = codec.encode(wav)
            assert codes.shape == (2, cfg.n_codebooks, math.ceil(t / cfg.hop_length))
            assert codes.dtype == torch.int64
            assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
            wav2 = codec.decode(codes)
            assert wav2.shape == (2, channels, codes.shape[-1] * cfg.hop_length)
            assert torch.isfinite(wav2).all()
        z = torch.randn(2, cfg.dimension, 5)
        assert codec.decode_latent(z).shape == (2, channels, 5 * cfg.hop_length)
    with pytest.raises(ValueError, match="wav"):
        codec.encode(torch.randn(2, 3, 16))


def test_rvq_encode_decode_residual() -> None:
    torch.manual_seed(0)
    vq = ResidualVQ(dim=8, n_codebooks=3, codebook_size=32)
    z = torch.randn(2, 8, 5)
    codes = vq.encode(z)
    assert codes.shape == (2, 3, 5)
    # first stage is the nearest neighbour of z, and decode sums the codewords
    flat = z.permute(0, 2, 1).reshape(-1, 8)
    nn0 = torch.cdist(flat, vq.embed[0]).argmin(-1).view(2, 5)
    assert torch.equal(codes[:, 0], nn0)
    want = sum(vq.embed[k][codes[:, k]] for k in range(3)).permute(0, 2, 1)
    assert torch.allclose(vq.decode(codes), want, atol=1e-6)
    # more stages never leave a larger residual on average
    errs = [(z - vq.decode(codes[:, :k])).pow(2).mean().item() for k in (1, 2, 3)]
    assert errs[0] >= errs[1] - 1e-6 >= errs[2] - 2e-6


def test_hold_codes_keeps_a_near_code_and_follows_a_real_change() -> None:
    # two codewords on a line at 0 and 1; the latent sits near 0.5 with one-frame wobbles, then moves to 1
    embed = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([0.45, 0.55, 0.45, 0.52, 0.48, 0.95, 0.97])[None, :, None]  # [B, F, D]
    dist = (x - embed.t()[None]).pow(2)  # [B, F, N]
    nearest = dist.argmin(-1)
    assert nearest.tolist() == [[0, 1, 0, 1, 0, 1, 1]]  # the flicker
    held = hold_codes(dist, nearest, 0.4 * x.squeeze(-1).pow(2))
    assert held.tolist() == [[0, 0, 0, 0, 0, 1, 1]]  # steady until the latent really moves
    assert torch.equal(hold_codes(dist, nearest, torch.zeros(1, 7)), nearest)


def test_rvq_hysteresis_steadies_codes_and_stays_within_its_margin() -> None:
    torch.manual_seed(0)
    vq = ResidualVQ(dim=8, n_codebooks=3, codebook_size=32)
    drift = torch.randn(2, 8, 1) + 0.3 * torch.randn(2, 8, 40)  # a steady latent with frame-to-frame noise
    nearest = vq.encode(drift)
    vq.hysteresis = 0.3
    held = vq.encode(drift)
    switches = [(c[..., 1:] != c[..., :-1]).sum().item() for c in (nearest, held)]
    assert switches[1] < 0.7 * switches[0]
    assert torch.equal(held[:, :, 0], nearest[:, :, 0])  # nothing to hold on the first frame
    # a held first-stage code is never more than the margin farther than the nearest one
    z = drift.permute(0, 2, 1)
    d = (z.unsqueeze(-2) - vq.embed[0]).pow(2).sum(-1)  # [B, F, N]
    extra = d.gather(-1, held[:, 0, :, None])[..., 0] - d.min(-1).values
    assert (extra <= 0.3 * z.pow(2).sum(-1) + 1e-5).all()
    vq.hysteresis = 0.0
    assert torch.equal(vq.encode(drift), nearest)


def test_training_forward_straight_through_and_ema() -> None:
    torch.manual_seed(0)
    codec = Codec(tiny()).train()
    wav = torch.randn(2, 1, 40)
    before = codec.quantizer.embed.clone()
    out = codec(wav)
    assert out.audio.shape == wav.shape and out.codes.shape == (2, 2, 5)
    loss = F.mse_loss(out.audio, wav) + out.commit_loss
    loss.backward()
    enc_grad = codec.encoder.layers[0].conv.parametrizations.weight.original1.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0  # gradient passed the quantiser
    assert not torch.equal(before, codec.quantizer.embed)  # first batch seeds, EMA updates
    assert bool(codec.quantizer.inited)
    seeded = codec.quantizer.embed.clone()
    codec(wav)
    assert not torch.equal(seeded, codec.quantizer.embed)
