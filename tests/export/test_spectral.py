"""The frame-rate spectral codec: causal, streaming equals offline (odd chunk sizes too), ONNX equals torch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx import export_graph, max_abs_diff, ort_session, run_onnx
from export.pack import EncoderGraph
from export.spectral import (
    MAX_PHASE_LOCK,
    PHASE_STARTS,
    SpectralCodec,
    SpectralCodecConfig,
    StreamingSpectralDecoder,
    band_filters,
    band_losses,
    direct_loss,
    frame_targets,
    gated_magnitudes,
    hann,
    lock_regions,
    lock_targets,
    locked_phases,
    peak_loss,
    start_phase,
)

TOTAL_FRAMES = 21  # a multiple of 1, 3 and 7


def tiny(channels: int = 2, **kw: object) -> SpectralCodecConfig:
    base: dict = dict(sample_rate=8000, channels=channels, hop=32, hidden=24, dimension=8, encoder_blocks=2,
                      decoder_blocks=2, n_codebooks=2, codebook_size=16)
    base.update(kw)
    return SpectralCodecConfig(**base)


def random_codec(cfg: SpectralCodecConfig, seed: int = 0) -> SpectralCodec:
    """Random weights with non-zero residual branches (their output layers start at zero)."""
    torch.manual_seed(seed)
    codec = SpectralCodec(cfg).eval()
    with torch.no_grad():
        for p in codec.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        codec.quantizer.embed.normal_()
    return codec


def stream(dec: StreamingSpectralDecoder, codes: torch.Tensor) -> torch.Tensor:
    state = dec.initial_state()
    out = []
    with torch.no_grad():
        for t in range(0, codes.shape[-1], dec.frames):
            pcm, *state = dec(codes[..., t : t + dec.frames], *state)
            out.append(pcm)
    return torch.cat(out, dim=-1)


def test_hann_sums_to_one_at_half_overlap() -> None:
    w = hann(64)
    assert torch.allclose(w[:32] + w[32:], torch.ones(32, dtype=torch.float64))


@pytest.mark.parametrize("frames", [1, 3, 7])
@pytest.mark.parametrize(("channels", "stereo_phase", "phase_start", "phase_lock", "gate"),
                         [(1, "linked", "alternate", 0, False), (2, "linked", "alternate", 0, False),
                          (2, "independent", "alternate", 0, False), (2, "linked", "zero", 0, False),
                          (1, "linked", "alternate", 3, False), (2, "linked", "alternate", 2, False),
                          (2, "independent", "alternate", 2, False), (2, "linked", "zero", 2, False),
                          (2, "linked", "alternate", 3, True), (1, "linked", "alternate", 0, True),
                          (2, "linked", "alternate", 2, "lock"), (2, "independent", "alternate", 3, "lock"),
                          (1, "linked", "zero", 1, "lock")])
def test_stream_equals_offline(channels: int, stereo_phase: str, phase_start: str, phase_lock: int,
                               gate: bool | str, frames: int) -> None:
    """``gate``: True adds the magnitude gate, ``"lock"`` the gate and a learned lock share."""
    cfg = tiny(channels, stereo_phase=stereo_phase, phase_start=phase_start, phase_lock=phase_lock,
               magnitude_gate=bool(gate), learned_lock=gate == "lock")
    codec = random_codec(cfg)
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, TOTAL_FRAMES))
    with torch.no_grad():
        offline = codec.decode(codes)
    dec = codec.streaming_decoder(frames)
    assert dec.lookahead_samples == 0
    got = stream(dec, codes)
    assert got.shape == offline.shape == (1, channels, TOTAL_FRAMES * cfg.hop)
    assert float(offline.abs().max()) > 1e-3  # not trivially silent
    assert max_abs_diff(got, offline) <= 1e-5


def test_encoder_is_causal() -> None:
    """Codes of a frame depend only on audio up to the end of that frame."""
    cfg = tiny()
    codec = random_codec(cfg, seed=3)
    x = torch.randn(1, cfg.channels, 12 * cfg.hop)
    y = x.clone()
    y[..., 8 * cfg.hop :] = torch.randn(1, cfg.channels, 4 * cfg.hop)
    with torch.no_grad():
        zx, zy = codec.encoder(x), codec.encoder(y)
    assert max_abs_diff(zx[..., :8], zy[..., :8]) <= 1e-6
    assert max_abs_diff(zx[..., 8:], zy[..., 8:]) > 1e-3


def test_decoder_is_causal() -> None:
    """Changing the codes from frame 8 on leaves the first 8 blocks of audio alone."""
    cfg = tiny()
    codec = random_codec(cfg, seed=4)
    a = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, 12))
    b = a.clone()
    b[..., 8:] = (b[..., 8:] + 1) % cfg.codebook_size
    with torch.no_grad():
        ya, yb = codec.decode(a), codec.decode(b)
    n = 8 * cfg.hop
    assert max_abs_diff(ya[..., :n], yb[..., :n]) <= 1e-6
    assert max_abs_diff(ya[..., n:], yb[..., n:]) > 1e-4


def test_encoder_features_match_an_fft() -> None:
    cfg = tiny(1)
    enc = SpectralCodec(cfg).encoder
    x = torch.randn(1, 1, 5 * cfg.hop, dtype=torch.float32)
    feats = enc.features(x)  # [1, N, 5]
    padded = torch.nn.functional.pad(x, (cfg.n_fft - cfg.hop, 0))[0, 0]
    frame = padded[2 * cfg.hop : 2 * cfg.hop + cfg.n_fft].double() * hann(cfg.n_fft)
    power = torch.fft.rfft(frame).abs().pow(2)
    assert torch.allclose(feats[0, :, 2].double(), 0.1 * torch.log(power + 1e-8), atol=1e-4)


def test_stereo_features_see_the_inter_channel_phase() -> None:
    """Centred (same signal both sides), swapped-polarity and decorrelated stereo have the same log power
    per channel; only the stereo rows tell them apart: cos 1 / -1 where centred / inverted, wandering values
    where the channels are independent."""
    cfg = dataclasses.replace(tiny(2), stereo_features=True)
    enc = SpectralCodec(cfg).encoder
    n = cfg.bins
    assert cfg.encoder_inputs == 4 * n
    g = torch.Generator().manual_seed(0)
    mono = torch.randn(1, 1, 8 * cfg.hop, generator=g)
    centred, inverted = torch.cat([mono, mono], 1), torch.cat([mono, -mono], 1)
    wide = torch.cat([mono, torch.randn(1, 1, 8 * cfg.hop, generator=g)], 1)
    fc, fi, fw = (enc.features(x)[0, :, 2:] for x in (centred, inverted, wide))  # frames that saw audio only
    assert fc.shape[0] == 4 * n
    assert torch.allclose(fc[: 2 * n], fi[: 2 * n])  # same power
    heard = fc[:n] > 0.1 * math.log(1e-2)  # bins with some power (a silent bin's rows go to 0, not +-1)
    assert heard.float().mean() > 0.9
    assert torch.allclose(fc[2 * n : 3 * n][heard], torch.ones(int(heard.sum())), atol=1e-3)
    assert torch.allclose(fi[2 * n : 3 * n][heard], -torch.ones(int(heard.sum())), atol=1e-3)
    assert fc[3 * n :].abs().max() < 1e-3
    assert fw[2 * n : 3 * n].mean() < 0.2 and fw[2 * n :].abs().max() <= 1.0 + 1e-5
    # a codec trained before the option existed loads without it
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "stereo_features"}
    assert type(cfg).from_dict(old).stereo_features is False


@pytest.mark.parametrize(("frames", "stereo_phase", "phase_start", "phase_lock", "gate"),
                         [(1, "linked", "alternate", 0, False), (3, "linked", "zero", 0, False),
                          (3, "independent", "alternate", 0, False), (1, "linked", "alternate", 3, False),
                          (3, "independent", "zero", 2, False), (3, "linked", "alternate", 3, True),
                          (3, "linked", "alternate", 3, "lock"), (1, "independent", "alternate", 2, "lock")])
def test_onnx_equals_torch(tmp_path: Path, frames: int, stereo_phase: str, phase_start: str,
                           phase_lock: int, gate: bool | str) -> None:
    cfg = tiny(stereo_phase=stereo_phase, phase_start=phase_start, phase_lock=phase_lock, magnitude_gate=bool(gate),
               learned_lock=gate == "lock")
    codec = random_codec(cfg, seed=1)
    dec = codec.streaming_decoder(frames)
    session = ort_session(export_graph(dec, dec.example_inputs(), dec.spec, tmp_path / "decoder.onnx"))
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, TOTAL_FRAMES))
    t_state = dec.initial_state()
    o_state: list = [s.numpy() for s in t_state]
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
    assert max_abs_diff(np.concatenate(pcm, axis=-1), offline) <= 1e-4


def test_encoder_graph_exports(tmp_path: Path) -> None:
    cfg = tiny()
    codec = random_codec(cfg, seed=2)
    graph = EncoderGraph(codec, seconds=0.2)
    session = ort_session(export_graph(graph.eval(), graph.example_inputs(), graph.spec, tmp_path / "encoder.onnx"))
    audio = torch.randn(graph.spec.inputs[0].shape) * 0.3
    (codes,) = run_onnx(session, graph.spec, [audio])
    with torch.no_grad():
        expect = codec.encode(audio)
    assert codes.shape == tuple(expect.shape)
    assert (codes == expect.numpy()).mean() > 0.99  # a float tie may flip a code
    import onnx  # each codebook is stored as the product's [D, N] and the residual lookup's [N, D] table, the
    #              last one without the lookup: no copy for the codewords' energies (it cost a pack 262 KB)
    q = codec.quantizer
    tables = [i for i in onnx.load(str(tmp_path / "encoder.onnx")).graph.initializer
              if sorted(i.dims) == sorted(q.embed.shape[1:])]
    assert len(tables) == 2 * q.n_codebooks - 1


def test_encoder_graph_exports_the_code_hysteresis_as_a_loop(tmp_path: Path) -> None:
    import onnx

    codec = random_codec(tiny(), seed=2)
    graph = EncoderGraph(codec, seconds=0.3)
    torch.manual_seed(3)
    audio = 0.3 * torch.randn(graph.spec.inputs[0].shape)
    with torch.no_grad():  # codebooks seeded from the latents of this noise, as training starts them
        z = codec.encoder(audio)
        codec.quantizer._init_from(z.permute(0, 2, 1).reshape(-1, z.shape[1]))
    codec.quantizer.hysteresis = 0.5
    path = export_graph(graph.eval(), graph.example_inputs(), graph.spec, tmp_path / "encoder.onnx")
    assert "Loop" in {n.op_type for n in onnx.load(str(path)).graph.node}
    (codes,) = run_onnx(ort_session(path), graph.spec, [audio])
    with torch.no_grad():
        held = codec.encode(audio)
        codec.quantizer.hysteresis = 0.0
        nearest = codec.encode(audio)
    assert (codes == held.numpy()).mean() > 0.99
    assert not torch.equal(held, nearest)  # the margin did change codes here


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="hop must be even"):
        tiny(hop=33)
    with pytest.raises(ValueError, match="channels"):
        tiny(channels=3)
    with pytest.raises(ValueError, match="stereo_phase"):
        tiny(stereo_phase="mid")
    with pytest.raises(ValueError, match="phase_start must be one of"):
        tiny(phase_start="random")
    cfg = tiny()
    assert cfg.stereo_phase == "linked" and cfg.linked and not tiny(1).linked
    assert SpectralCodecConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SpectralCodecConfig.from_dict({**cfg.to_dict(), "ratios": [8]})
    # a config saved before stereo_phase existed decodes the way it was trained
    saved = {k: v for k, v in cfg.to_dict().items() if k != "stereo_phase"}
    assert SpectralCodecConfig.from_dict(saved).stereo_phase == "independent"
    # ... and one saved before phase_start existed starts its phases at 0, as it was trained
    assert cfg.phase_start == "alternate"
    saved = {k: v for k, v in cfg.to_dict().items() if k != "phase_start"}
    assert SpectralCodecConfig.from_dict(saved).phase_start == "zero"
    # ... and one saved before phase_lock existed keeps every bin's own phase
    saved = {k: v for k, v in tiny(phase_lock=3).to_dict().items() if k != "phase_lock"}
    assert SpectralCodecConfig.from_dict(saved).phase_lock == 0
    for bad in (-1, MAX_PHASE_LOCK + 1):
        with pytest.raises(ValueError, match="phase_lock must be 0"):
            tiny(phase_lock=bad)


def _centred_decoder(stereo_phase: str) -> SpectralCodec:
    """A random stereo codec whose right channel's magnitude head copies the left's: a centred sound.

    Its phase heads: the left's advance head plus a small independent perturbation for the right (what two
    separately predicted advances look like); linked stereo reads the right's head as the inter-channel
    difference, zeroed here.
    """
    cfg = tiny(stereo_phase=stereo_phase)
    codec = random_codec(cfg, seed=8)
    n = cfg.bins
    out = codec.decoder.net.out
    with torch.no_grad():
        out.weight[n : 2 * n] = out.weight[:n]
        out.bias[n : 2 * n] = out.bias[:n]
        if stereo_phase == "linked":
            out.weight[3 * n :].zero_()
            out.bias[3 * n :].zero_()
        else:
            out.weight[3 * n :] = out.weight[2 * n : 3 * n] + 0.01 * torch.randn_like(out.weight[3 * n :])
            out.bias[3 * n :] = out.bias[2 * n : 3 * n]
    return codec


def test_linked_stereo_keeps_a_centred_sound_centred() -> None:
    """Independently accumulated phases drift apart and decorrelate the channels; linked ones cannot."""
    codes = torch.randint(0, 16, (1, 2, 200), generator=torch.Generator().manual_seed(9))
    corr = {}
    for mode in ("linked", "independent"):
        with torch.no_grad():
            y = _centred_decoder(mode).decode(codes)[0, :, 32:]
        corr[mode] = float((y[0] * y[1]).sum() / (y[0].norm() * y[1].norm()))
        if mode == "linked":
            assert max_abs_diff(y[0], y[1]) <= 1e-5
    assert corr["linked"] > 0.999
    assert corr["independent"] < 0.9


def test_linked_stereo_offsets_split_the_phase_difference() -> None:
    cfg = tiny(stereo_phase="linked")
    codec = random_codec(cfg, seed=10)
    z = torch.randn(1, cfg.dimension, 6)
    with torch.no_grad():
        m, adv, offset, share = codec.decoder.spectrum(z)
    assert share is None
    assert torch.equal(adv[:, 0], adv[:, 1])
    assert torch.allclose(offset[:, 0], -offset[:, 1])
    assert float(offset.abs().max()) < torch.pi / 2 + 1e-6 and float(offset.abs().max()) > 1e-3


@pytest.mark.parametrize("phase_start", PHASE_STARTS)
def test_targets_resynthesise_the_audio(phase_start: str) -> None:
    """The per-bin targets the decoder learns from (magnitude, phase advance) rebuild the audio exactly."""
    cfg = tiny(phase_start=phase_start)
    dec = SpectralCodec(cfg).decoder
    torch.manual_seed(5)
    t = torch.arange(10 * cfg.hop) / cfg.sample_rate
    audio = torch.stack([0.5 * torch.sin(2 * torch.pi * 440.0 * t), 0.1 * torch.randn(t.shape)])[None]
    target, mask = frame_targets(dec, audio)
    assert mask.tolist() == [1.0] * 9 + [0.0]
    angle = torch.angle(target)
    advance = angle - torch.nn.functional.pad(angle, (0, 0, 1, 0))[..., :-1, :]
    advance[..., 0, :] -= start_phase(dec.odd, cfg)  # the first frame's phase is the start plus its advance
    with torch.no_grad():
        y = dec.synthesize(torch.log(target.abs() + 1e-30), advance)
    # block 0 lacks the frame before it (it fades in); the last block needs the frame after it
    a, b = cfg.hop, 9 * cfg.hop
    assert max_abs_diff(y[..., a:b], audio[..., a:b]) <= 1e-4


@pytest.mark.parametrize("where", [2.3, 3.5, 5.7])
def test_alternate_phase_start_keeps_a_low_tone_at_its_level(where: float) -> None:
    """A decoder knows each bin's advance but not a tone's absolute phase, so it accumulates from a fixed
    start. Over ``n_fft = 2 * hop`` a tone's neighbouring bins are half a turn apart: started at 0 they are
    put in phase and partly cancel (a tone between two bins vanishes; one whose pitch moves swings in
    loudness as it crosses them), started at ``pi * (k mod 2)`` the tone comes back at its level."""
    level = {}
    for start in PHASE_STARTS:
        cfg = tiny(1, phase_start=start)
        dec = SpectralCodec(cfg).decoder
        t = torch.arange(80 * cfg.hop) / cfg.sample_rate
        tone = (0.5 * torch.sin(2 * torch.pi * where * cfg.sample_rate / cfg.n_fft * t + 0.7))[None, None]
        target, _ = frame_targets(dec, tone)
        angle = torch.angle(target)
        advance = angle - torch.nn.functional.pad(angle, (0, 0, 1, 0))[..., :-1, :]
        advance[..., 0, :] = 0.0  # what the decoder knows: how far each bin turns, not where it started
        with torch.no_grad():
            y = dec.synthesize(torch.log(target.abs() + 1e-30), advance)[0, 0, 4 * cfg.hop: 76 * cfg.hop]
        level[start] = float(y.pow(2).mean().sqrt() / tone.pow(2).mean().sqrt())
    assert abs(level["alternate"] - 1.0) < 0.01, level
    assert level["zero"] < 0.7, level


def test_lock_regions_climb_to_the_nearest_peak() -> None:
    ref = torch.tensor([1.0, 2.0, 5.0, 3.0, 1.0, 1.0, 4.0, 2.0])  # the docstring's example
    assert lock_regions(ref, 0).tolist() == list(range(8))
    assert lock_regions(ref, 1).tolist() == [1, 2, 2, 2, 3, 6, 6, 6]
    assert lock_regions(ref, 2).tolist() == [2, 2, 2, 2, 2, 6, 6, 6]
    assert lock_regions(ref, 5).tolist() == [2, 2, 2, 2, 2, 6, 6, 6]  # a peak stays put
    assert lock_regions(ref[None, None].expand(2, 3, 8), 2).shape == (2, 3, 8)


def _frame_level_db(y: torch.Tensor, hop: int) -> torch.Tensor:
    blocks = y.reshape(-1, hop)
    return 10.0 * torch.log10(blocks.pow(2).mean(-1) + 1e-12)


@pytest.mark.parametrize("where", [3.2, 5.5])
def test_phase_lock_keeps_a_tone_steady_despite_per_bin_advance_errors(where: float) -> None:
    """What a decoder gets wrong: each bin's advance a little (here up to 0.6 rad, differently in each bin).
    Accumulated bin by bin, the bins of one partial drift apart and beat, and a steady tone pulses (what made
    prompt 2's hum sound like prompt 6's impulses); locked to their peak, they turn together and the tone
    stays steady, only slightly off pitch."""
    spread = {}
    for lock in (0, 3):
        cfg = tiny(1, phase_lock=lock)
        dec = SpectralCodec(cfg).decoder
        t = torch.arange(120 * cfg.hop) / cfg.sample_rate
        tone = (0.5 * torch.sin(2 * torch.pi * where * cfg.sample_rate / cfg.n_fft * t))[None, None]
        target, _ = frame_targets(dec, tone)
        angle = torch.angle(target)
        advance = angle - torch.nn.functional.pad(angle, (0, 0, 1, 0))[..., :-1, :]
        advance += 0.6 * torch.sin(3.0 * torch.arange(cfg.bins, dtype=torch.float32))  # fixed per-bin errors
        with torch.no_grad():
            y = dec.synthesize(torch.log(target.abs() + 1e-30), advance)[0, 0, 8 * cfg.hop: 112 * cfg.hop]
        spread[lock] = float(_frame_level_db(y, cfg.hop).std())
    assert spread[3] < 0.5, spread
    assert spread[0] > 3 * spread[3], spread


def test_a_learned_lock_share_goes_from_each_bins_own_phase_to_its_peaks() -> None:
    """Share 1 is the plain lock, share 0 each bin's own accumulated phase, and a half share lands half-way
    along the shorter arc."""
    g = torch.Generator().manual_seed(3)
    b, c, f, n = 1, 2, 9, 12
    advance = torch.rand(b, c, f, n, generator=g) * 6.0
    ref = torch.rand(b, c, f, n, generator=g)
    start = start_phase((torch.arange(n) % 2).float(), tiny())
    full = locked_phases(advance, ref, start, 2)
    assert torch.allclose(locked_phases(advance, ref, start, 2, share=torch.ones_like(ref)), full, atol=1e-5)
    own = torch.remainder(torch.cumsum(advance, dim=2), 2 * math.pi)
    got = locked_phases(advance, ref, start, 2, share=torch.zeros_like(ref))
    assert float(torch.cos(got - own).min()) > 1.0 - 1e-6
    half = locked_phases(advance[:, :, :1], ref[:, :, :1], start, 2, share=torch.full_like(ref[:, :, :1], 0.5))
    apart = torch.remainder(full[:, :, :1] - own[:, :, :1] + math.pi, 2 * math.pi) - math.pi
    assert float(torch.cos(half - own[:, :, :1] - apart / 2).min()) > 1.0 - 1e-5
    with pytest.raises(ValueError, match="learned_lock needs phase_lock"):
        tiny(learned_lock=True)


def test_lock_targets_say_a_tones_main_lobe_turns_with_its_peak_and_noise_does_not() -> None:
    cfg = tiny(1, phase_lock=3)
    dec = SpectralCodec(cfg).decoder
    t = torch.arange(60 * cfg.hop) / cfg.sample_rate
    tone = (0.5 * torch.sin(2 * torch.pi * 4.3 * cfg.sample_rate / cfg.n_fft * t))[None, None]
    target, _ = frame_targets(dec, tone)
    target = target[:, :, 2:-2]
    should, led = lock_targets(target, target.abs(), 3, linked=False)
    # a sine window's main lobe is 3 bins wide: bins 3-5 turn with the peak (bin 4); bins 2 and 6 lie in the
    # first side lobes, which are in antiphase, so locking them would be wrong and the target says so
    assert float(should[0, 0, :, 3:6].mean()) > 0.95, should[0, 0, :, 3:6]
    assert float(should[0, 0, :, [2, 6]].mean()) < 0.05, should[0, 0, :, [2, 6]]
    assert led[0, 0, :, 4].sum() == 0 and led[0, 0, :, 3].all()  # the peak leads, its neighbours follow
    noise = torch.randn(1, 1, 200 * cfg.hop, generator=torch.Generator().manual_seed(1))
    nt, _ = frame_targets(dec, noise)
    should, led = lock_targets(nt, nt.abs(), 3, linked=False)
    chance = float((should * led).sum() / led.sum())
    assert chance < 0.2, chance  # a noise bin is in phase with its peak two frames running only by chance


def test_a_learned_lock_head_starts_almost_locked_and_learns_from_its_own_term() -> None:
    cfg = tiny(1, phase_lock=2)
    codec = random_codec(cfg, seed=4)
    codec.add_magnitude_gate()
    rows = codec.decoder.net.out.out_channels
    codec.add_learned_lock()
    assert codec.cfg.learned_lock and codec.decoder.net.out.out_channels == rows + cfg.bins
    linked = SpectralCodec(tiny(2, phase_lock=2))
    linked.add_learned_lock()  # one phase for both channels, so one row of shares
    assert linked.decoder.net.out.out_channels == (2 * 2 + 1) * linked.cfg.bins == linked.cfg.decoder_outputs
    with pytest.raises(ValueError, match="cannot change to independent"):
        linked.set_stereo_phase("independent")
    with pytest.raises(ValueError, match="before the learned lock"):
        SpectralCodec(dataclasses.replace(cfg, magnitude_gate=False, learned_lock=True)).add_magnitude_gate()
    with pytest.raises(ValueError, match="needs phase locking"):
        SpectralCodec(tiny(1)).add_learned_lock()
    out = codec.decoder.net.out
    assert float(out.weight[rows:].detach().abs().max()) == 0.0
    assert torch.allclose(out.bias[rows:].detach(), torch.tensor(3.0))
    audio = torch.randn(1, 1, 12 * cfg.hop) * 0.2
    losses = direct_loss(codec.decoder, codec.encoder(audio), audio)
    assert "lock" in losses and 0.0 < float(losses["lock"].detach()) < 5.0
    losses["lock"].backward()
    assert float(out.weight.grad[rows:].abs().sum()) > 0.0  # the share's head learns from the term


def test_magnitude_gate_holds_where_it_is_shut_and_follows_where_it_is_open() -> None:
    torch.manual_seed(7)
    raw = 5.0 + torch.randn(1, 1, 200, 1)  # a jittering level, e.g. the codes of a steady hum
    raw[:, :, 100:] += 10.0  # ... with an onset at frame 100
    gate = torch.full_like(raw, 2.0)  # hold ~88 % of the last frame
    gate[:, :, 100] = -20.0  # open at the onset
    held = gated_magnitudes(raw, gate, previous=torch.full((1, 1, 1), 5.0))
    assert float(held[0, 0, 20:100, 0].std()) < 0.4 * float(raw[0, 0, 20:100, 0].std())
    assert abs(float(held[0, 0, 100, 0] - raw[0, 0, 100, 0])) < 1e-6  # the onset passes at once
    open_ = gated_magnitudes(raw, torch.full_like(raw, -30.0))
    assert torch.allclose(open_, raw, atol=1e-6)
    first = gated_magnitudes(raw[:, :, :37], gate[:, :, :37])
    rest = gated_magnitudes(raw[:, :, 37:], gate[:, :, 37:], previous=first[:, :, -1])
    stepped = torch.cat([first, rest], dim=2)
    assert torch.allclose(stepped, gated_magnitudes(raw, gate), atol=1e-6)  # the state carries the stream


def test_direct_loss_is_bounded_and_trains_the_decoder() -> None:
    cfg = tiny(1)
    codec = random_codec(cfg, seed=6)
    audio = torch.randn(1, 1, 12 * cfg.hop) * 0.2
    z = codec.encoder(audio)
    losses = direct_loss(codec.decoder, z, audio)
    assert set(losses) == {"magnitude", "phase", "band", "flux"}
    assert float(losses["magnitude"].detach()) > 0.1 and 0.0 < float(losses["phase"].detach()) <= 2.0
    (losses["magnitude"] + losses["phase"]).backward()
    assert codec.decoder.net.out.weight.grad is not None


def test_band_flux_asks_a_steady_tone_to_stay_steady_and_noise_to_flutter() -> None:
    """``flux`` compares how much each band's loudness moves, not where: fluttering a steady tone costs,
    noise that flutters as much as the reference (but not in step with it) costs little."""
    sr, n_fft, frames, bins = 8000, 64, 40, 33
    fb = band_filters(sr, n_fft)
    mask = torch.ones(frames)
    steady = torch.zeros(1, 1, frames, bins)
    steady[..., 8] = 10.0  # one loud bin, every frame the same
    flutter = steady.clone()
    flutter[..., 8] *= (1.0 + 0.6 * (torch.arange(frames) % 2))  # +4 dB every other frame
    log = lambda m: torch.log(m + 1e-5)  # noqa: E731
    same = band_losses(fb, log(steady), steady, mask)
    assert float(same["band"]) < 1e-4 and float(same["flux"]) < 1e-4
    assert float(band_losses(fb, log(flutter), steady, mask)["flux"]) > 0.05
    g = torch.Generator().manual_seed(0)
    noise_a = torch.rand(1, 1, frames, bins, generator=g) + 0.1
    noise_b = torch.rand(1, 1, frames, bins, generator=g) + 0.1
    fluttering_like_it = float(band_losses(fb, log(noise_b), noise_a, mask)["flux"])
    held_still = float(band_losses(fb, log(noise_a.mean(2, keepdim=True).expand_as(noise_a)), noise_a, mask)["flux"])
    assert fluttering_like_it < 0.5 * held_still


def _tone_spectrum(where: float, frames: int = 12) -> torch.Tensor:
    """|X| ``[1, 1, F, N]`` of a tone at ``where`` bins (the tiny decoder's frames)."""
    cfg = tiny(1)
    dec = SpectralCodec(cfg).decoder
    t = torch.arange(frames * cfg.hop) / cfg.sample_rate
    tone = (0.5 * torch.sin(2 * torch.pi * where * cfg.sample_rate / cfg.n_fft * t))[None, None]
    return frame_targets(dec, tone)[0].abs()


def test_peak_loss_hears_where_a_partial_lies_inside_its_bin() -> None:
    """A tone 0.1 bin off costs less than one 0.4 bin off, in the same bin (so the per-bin loudest is the
    same); the right place costs nothing, and so does a frame without a partial."""
    true = _tone_spectrum(5.3)
    mask = torch.ones(true.shape[2])
    mask[-1] = 0.0
    cost = {w: float(peak_loss(torch.log(_tone_spectrum(w) + 1e-5), true, mask)) for w in (5.3, 5.2, 5.0, 4.9)}
    assert cost[5.3] < 1e-4 and 0.05 < cost[5.2] < cost[5.0] < cost[4.9], cost
    silent = torch.zeros_like(true)
    assert float(peak_loss(torch.log(silent + 1e-5), silent, mask)) == 0.0  # no peak: no cost, no NaN
    # only the low bins count: a partial above them is left to the other terms
    high = _tone_spectrum(14.3)
    assert float(peak_loss(torch.log(_tone_spectrum(14.0) + 1e-5), high, mask, bins=10)) == 0.0


def test_direct_loss_adds_the_peak_term_when_asked() -> None:
    cfg = tiny(1)
    codec = random_codec(cfg, seed=6)
    audio = torch.randn(1, 1, 12 * cfg.hop) * 0.2
    z = codec.encoder(audio)
    assert "peak" not in direct_loss(codec.decoder, z, audio, bands=False)
    losses = direct_loss(codec.decoder, z, audio, bands=False, peaks=True)
    assert float(losses["peak"].detach()) > 0.0
    losses["peak"].backward()
    assert codec.decoder.net.out.weight.grad is not None


def test_direct_loss_of_linked_stereo_learns_the_phase_difference() -> None:
    """The inter-channel phase term is small when the decoder says the true difference, large otherwise."""
    cfg = tiny(stereo_phase="linked")
    codec = random_codec(cfg, seed=11)
    t = torch.arange(16 * cfg.hop) / cfg.sample_rate
    tone = torch.sin(2 * torch.pi * 1000.0 * t)
    centred = torch.stack([tone, tone])[None] * 0.3
    with torch.no_grad():
        z = codec.encoder(centred)
    n = cfg.bins
    with torch.no_grad():  # say "no difference": right for the centred tone
        codec.decoder.net.out.weight[3 * n :].zero_()
        codec.decoder.net.out.bias[3 * n :].zero_()
    quadrature = torch.stack([tone, torch.cos(2 * torch.pi * 1000.0 * t)])[None] * 0.3  # 90 degrees apart
    with torch.no_grad():
        right = float(direct_loss(codec.decoder, z, centred)["ipd"])
        wrong = float(direct_loss(codec.decoder, z, quadrature)["ipd"])
    assert right < 1e-6
    assert 0.9 < wrong < 1.1  # 1 - cos(pi / 2)


def test_float16_storage_keeps_the_graph_and_halves_the_file(tmp_path: Path) -> None:
    from export.onnx import store_float16

    cfg = tiny(hidden=64)
    codec = random_codec(cfg, seed=7)
    dec = codec.streaming_decoder(1)
    full = export_graph(dec, dec.example_inputs(), dec.spec, tmp_path / "full.onnx")
    half = store_float16(full, tmp_path / "half.onnx")
    assert half.stat().st_size < 0.7 * full.stat().st_size
    a, b = ort_session(full), ort_session(half)
    state_a: list = [s.numpy() for s in dec.initial_state()]
    state_b = list(state_a)
    for t in range(5):
        codes = torch.full((1, cfg.n_codebooks, 1), t, dtype=torch.int64)
        out_a = run_onnx(a, dec.spec, [codes, *state_a])
        out_b = run_onnx(b, dec.spec, [codes, *state_b])
        assert max_abs_diff(out_a[0], out_b[0]) <= 2e-3 * max(1e-3, float(np.abs(out_a[0]).max()))
        state_a, state_b = out_a[1:], out_b[1:]
