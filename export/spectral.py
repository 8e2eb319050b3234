"""A causal codec that works at the frame rate: STFT frames in, inverse-FFT frames out.

Where SEANet (:mod:`export.codec`) learns to down- and upsample the waveform
with strided convolutions, this codec leaves the sample-rate work to fixed DSP
and learns only at the frame rate (50 Hz), which makes it far cheaper to train
on a CPU and to run::

    audio [B, C, T] ─> causal frames (Hann, n_fft) ─> |DFT|^2 ─> log ─> [B, C*N, F]
        ─> 1x1 conv ─> causal residual blocks ─> 1x1 conv ─> latent z [B, D, F] ─> residual VQ (codes [B, K, F])
        ─> 1x1 conv ─> causal residual blocks ─> 1x1 conv ─> log magnitude m, phase advance a [B, C, F, N]
        ─> phase p = cumsum_t(a) ─> exp(m) e^(i p) ─> irfft ─> sqrt-Hann ─> overlap-add (hop) ─> audio [B, C, T]

Frame ``t`` of the analysis covers samples ``[(t+1)*hop - n_fft, (t+1)*hop)``: the
encoder never looks ahead. The decoder's frame ``t`` is synthesised over
``[t*hop, t*hop + n_fft)``; with ``n_fft = 2 * hop`` and a sqrt-Hann window
(whose square sums to 1 at 50 % overlap) output samples ``[t*hop, (t+1)*hop)``
are the second half of frame ``t-1`` plus the first half of frame ``t``. Frame
``t``'s first half is audio its encoder frame has seen; its second half is the
decoder's guess of what follows, corrected by the next frame. So the stream has
no lookahead, like the causal SEANet codec.

Phase. A frame-local network cannot know a tone's absolute phase, so the
decoder predicts how far each bin's phase *advances* over one hop (the bin's
instantaneous frequency) and the phase is accumulated from the start of the
stream, as a phase vocoder does; in the step graph it is a state tensor. It
starts at ``pi * (k mod 2)`` in bin ``k`` (``phase_start = "alternate"``; codecs
configured before it start at 0, ``"zero"``), as a tone's neighbouring bins
are half a turn apart. Re-synthesising the procedural corpus from its true
magnitudes and advances this way is recognised by ``cicada eval``'s
classifier about as often as the original audio (65 of 66 clips against 66;
from 0: 62, losing prompt 2's low hum twice: docs/training.md, "The FM hum
through the decoder's synthesis"), while a random or fixed phase loses the
hums. Training supervises every
bin of every frame directly (:func:`direct_loss`: the log magnitude and the
advance of the corresponding sqrt-Hann frame of the input) besides the
multi-resolution spectral loss on the audio.

Phase locking. A decoder gets each bin's advance a little wrong, and differently in
each bin. Accumulated bin by bin, the bins of one partial then drift apart and
beat: a steady low hum comes out pulsing at a few Hz. With ``phase_lock = n``
each frame's bins first advance, then every bin takes the phase of the peak it
reaches by climbing ``n`` times to its louder neighbour (:func:`lock_regions`),
shifted by the half turn per bin of one partial's main lobe: a phase vocoder's
identity phase locking (Laroche and Dolson). Only the peaks' advances then
carry over from frame to frame, the bins around them follow, and a partial's
lobe stays one partial. The locked phase is the step graph's state, as the
plain accumulated phase is without locking::

    psi[t, k] = acc[t, p] + pi (k - p) - (start[k] - start[p])     acc[t] = psi[t - 1] + a[t]
    p = lock_regions(|X[t]|, n)[k]                                 (0 mod 2 pi for "alternate")

A rumble that the decoder draws as a few sharp lines locks too, and then sounds
tonal. With ``learned_lock`` a fourth head says each bin's share ``w`` in (0, 1)
of the way from its own phase ``acc[t, k]`` to the locked one (along the
shorter arc), trained on whether the true bin is in phase with its peak
(:func:`lock_targets`)::

    psi[t, k] = acc[t, k] + w[t, k] wrap(locked[t, k] - acc[t, k])

Stereo. Left and right each accumulating their own advances would drift apart
(every small difference between the two predictions adds up), and the stream
would sound wide and decorrelated whatever the input: a centred hum came out
with an inter-channel correlation of 0 instead of 1. With ``stereo_phase =
"linked"`` (the default) the two channels share one accumulated phase and the
decoder says, per frame and bin, the inter-channel phase difference ``d``
(left gets ``+d/2``, right ``-d/2``), which is not accumulated::

    phase_L[t] = sum_{s<=t} a[s] + d[t] / 2        phase_R[t] = sum_{s<=t} a[s] - d[t] / 2

``"independent"`` is the older scheme, kept so that codecs trained with it load
and decode as they were trained.

Shapes: ``B`` batch, ``C`` channels, ``T`` samples, ``F`` frames, ``D`` latent,
``H`` hidden width, ``K`` codebooks, ``N`` bins (``n_fft // 2 + 1``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from export.codec import CodecOutput, ResidualVQ
from export.onnx import GraphSpec, TensorSpec
from export.streaming import CodesStepGraph

LOG_POWER_FLOOR = 1e-8
TWO_PI = 2.0 * math.pi
STEREO_PHASES = ("linked", "independent")
"""How a stereo decoder's channels get their phase (see the module docstring)."""
PHASE_STARTS = ("alternate", "zero")
"""Where each bin's accumulated phase starts (see the module docstring, "Phase")."""
MAX_PHASE_LOCK = 8
"""The most climbs :func:`lock_regions` may take (a peak at most this many bins away)."""


@dataclass
class SpectralCodecConfig:
    """Shape of a :class:`SpectralCodec`. ``kind`` tells pack readers and checkpoints which codec this is."""

    kind: str = "spectral"
    sample_rate: int = 32_000
    channels: int = 2
    hop: int = 640
    hidden: int = 512
    dimension: int = 128
    encoder_blocks: int = 3
    decoder_blocks: int = 4
    kernel_size: int = 3
    n_codebooks: int = 4
    codebook_size: int = 1024
    stereo_phase: str = "linked"  # configs saved before it existed mean "independent" (see from_dict)
    stereo_features: bool = False  # stereo encoder also sees each bin's inter-channel phase (see SpectralEncoder)
    phase_start: str = "alternate"  # configs saved before it existed mean "zero" (see from_dict)
    phase_lock: int = 0  # climbs of :func:`lock_regions` (0: every bin keeps its own phase; see "Phase locking")
    magnitude_gate: bool = False  # the decoder says how much of each bin's last magnitude it keeps (gated_magnitudes)
    learned_lock: bool = False  # the decoder says how far each bin's phase follows its peak's (locked_phases)

    def __post_init__(self) -> None:
        if self.kind != "spectral":
            raise ValueError(f"SpectralCodecConfig.kind must be 'spectral', got {self.kind!r}")
        if self.stereo_phase not in STEREO_PHASES:
            raise ValueError(f"SpectralCodecConfig.stereo_phase must be one of {STEREO_PHASES}, "
                             f"got {self.stereo_phase!r}")
        if self.phase_start not in PHASE_STARTS:
            raise ValueError(f"SpectralCodecConfig.phase_start must be one of {PHASE_STARTS}, "
                             f"got {self.phase_start!r}")
        if not 0 <= int(self.phase_lock) <= MAX_PHASE_LOCK:
            raise ValueError(f"SpectralCodecConfig.phase_lock must be 0..{MAX_PHASE_LOCK} (climbs to a bin's "
                             f"peak; 0 is off), got {self.phase_lock!r}")
        if self.learned_lock and not int(self.phase_lock):
            raise ValueError("SpectralCodecConfig.learned_lock needs phase_lock >= 1 (the share is of the phase "
                             "of a peak that the lock finds)")
        if self.channels not in (1, 2):
            raise ValueError(f"SpectralCodecConfig.channels must be 1 or 2, got {self.channels}")
        for name in ("sample_rate", "hop", "hidden", "dimension", "kernel_size", "n_codebooks", "codebook_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SpectralCodecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hop % 2:
            raise ValueError(f"SpectralCodecConfig.hop must be even, got {self.hop}")

    @property
    def hop_length(self) -> int:
        return int(self.hop)

    @property
    def n_fft(self) -> int:
        return 2 * int(self.hop)

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def encoder_inputs(self) -> int:
        """Feature rows per frame the encoder sees: each channel's log power, and with ``stereo_features``
        the cosine and sine of each bin's inter-channel phase difference."""
        return (self.channels + (2 if self.stereo_features and self.channels == 2 else 0)) * self.bins

    @property
    def heads(self) -> int:
        """Decoder outputs per channel and bin: log magnitude, phase, and with ``magnitude_gate`` the gate."""
        return 3 if self.magnitude_gate else 2

    @property
    def lock_channels(self) -> int:
        """Rows of bins of the ``learned_lock`` share (after the heads): one for linked stereo, which shares
        one phase, else one per channel; 0 without it."""
        return 0 if not self.learned_lock else 1 if self.linked else self.channels

    @property
    def decoder_outputs(self) -> int:
        """Rows of the decoder network's output: ``[heads, C, N]`` then the lock share's ``[lock_channels, N]``."""
        return (self.heads * self.channels + self.lock_channels) * self.bins

    @property
    def linked(self) -> bool:
        """Whether the decoder's two channels share one accumulated phase (``stereo_phase = "linked"``)."""
        return self.channels == 2 and self.stereo_phase == "linked"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpectralCodecConfig:
        """The config saved as ``d``; one saved before ``stereo_phase``, ``stereo_features`` or ``phase_start``
        existed loads as it was trained (``"independent"``, no inter-channel features, phases from 0)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SpectralCodecConfig fields: {sorted(unknown)}")
        return cls(**{"stereo_phase": "independent", "stereo_features": False, "phase_start": "zero", **d})


def hann(n: int) -> torch.Tensor:
    """Periodic Hann window ``[n]`` (sums to exactly 1 at 50 % overlap)."""
    return 0.5 - 0.5 * torch.cos(2.0 * math.pi * torch.arange(n, dtype=torch.float64) / n)


class CausalBlock(nn.Module):
    """Residual block at the frame rate: ``x + W2 gelu(causal_conv(norm(x)))``, ``[B, H, F] -> [B, H, F]``."""

    def __init__(self, hidden: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.norm_bias = nn.Parameter(torch.zeros(hidden))
        self.conv = nn.Conv1d(hidden, hidden, kernel)
        self.out = nn.Conv1d(hidden, hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def branch(self, x_padded: torch.Tensor) -> torch.Tensor:
        """The residual branch on ``x`` with ``kernel - 1`` frames of history in front: ``[B, H, F + k - 1] -> [B, H, F]``."""
        return self.out(F.gelu(self.conv(x_padded)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_frames(x)
        return x + self.branch(F.pad(h, (self.kernel - 1, 0)))

    def norm_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame layer norm over channels (causal: no statistics across time)."""
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + 1e-5) * self.norm_weight[None, :, None] + self.norm_bias[None, :, None]


class FrameNet(nn.Module):
    """``[B, I, F] -> [B, O, F]``: a 1x1 input projection, causal residual blocks, a 1x1 output projection."""

    def __init__(self, inputs: int, hidden: int, outputs: int, blocks: int, kernel: int) -> None:
        super().__init__()
        self.inp = nn.Conv1d(inputs, hidden, 1)
        self.blocks = nn.ModuleList(CausalBlock(hidden, kernel) for _ in range(blocks))
        self.out = nn.Conv1d(hidden, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


class SpectralEncoder(nn.Module):
    """``audio [B, C, T] -> z [B, D, T // hop]`` (causal).

    Its input is each channel's log power per bin. Power alone cannot tell a centred sound from one that is
    wide or decorrelated, so with ``stereo_features`` a stereo encoder also sees, per bin, the cosine and
    sine of the inter-channel phase difference (``L R* / (|L| |R|)``): 1 and 0 for a centred bin, values
    that wander from frame to frame for a diffuse one. The linked decoder (see "Stereo" above) says that
    difference; these rows let the tokens carry it.
    """

    def __init__(self, cfg: SpectralCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.n_fft
        ang = 2.0 * math.pi * torch.arange(cfg.bins, dtype=torch.float64)[:, None] * torch.arange(n)[None] / n
        basis = torch.cat([torch.cos(ang), -torch.sin(ang)]) * hann(n)[None]  # [2N, n_fft]
        self.register_buffer("analysis", basis.float()[:, None], persistent=False)
        self.net = FrameNet(cfg.encoder_inputs, cfg.hidden, cfg.dimension, cfg.encoder_blocks, cfg.kernel_size)

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """Encoder input of causal frames, ``[B, cfg.encoder_inputs, F]``; frame ``t`` ends at sample
        ``(t + 1) * hop``: each channel's log power times 0.1 (``C * N`` rows), then with ``stereo_features``
        the cosine and sine of each bin's inter-channel phase difference (``2 * N`` rows).

        The windowed DFT is a strided convolution with a fixed basis, so the exported encoder needs no
        FFT operator.
        """
        cfg = self.cfg
        b, c, t = audio.shape
        frames = t // cfg.hop
        x = F.pad(audio[..., : frames * cfg.hop], (cfg.n_fft - cfg.hop, 0)).reshape(b * c, 1, -1)
        spec = F.conv1d(x, self.analysis, stride=cfg.hop)  # [B*C, 2N, F]: real parts, then imaginary
        re, im = spec[:, : cfg.bins], spec[:, cfg.bins :]
        power = re.pow(2) + im.pow(2)
        logp = torch.log(power + LOG_POWER_FLOOR).reshape(b, c * cfg.bins, frames) * 0.1
        if cfg.encoder_inputs == logp.shape[1]:
            return logp
        re, im, power = (v.reshape(b, c, cfg.bins, frames) for v in (re, im, power))
        # L R*: its angle is the inter-channel phase difference; divided by |L| |R| (floored) it is unit length
        cross_re = re[:, 0] * re[:, 1] + im[:, 0] * im[:, 1]
        cross_im = im[:, 0] * re[:, 1] - re[:, 0] * im[:, 1]
        norm = torch.sqrt(power[:, 0] * power[:, 1] + LOG_POWER_FLOOR)
        return torch.cat([logp, cross_re / norm, cross_im / norm], dim=1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(audio))


class SpectralDecoder(nn.Module):
    """``z [B, D, F] -> audio [B, C, F * hop]`` (causal, see the module docstring)."""

    def __init__(self, cfg: SpectralCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = FrameNet(cfg.dimension, cfg.hidden, cfg.decoder_outputs, cfg.decoder_blocks, cfg.kernel_size)
        self.register_buffer("window", hann(cfg.n_fft).sqrt().float(), persistent=False)
        self.register_buffer("odd", (torch.arange(cfg.bins) % 2).float(), persistent=False)

    def spectrum(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``z [B, D, F]`` -> log magnitude, phase advance, phase offset and lock share of each frame, each
        ``[B, C, F, N]`` (the share is None without ``learned_lock``).

        The advance is accumulated over frames, the offset is not: linked stereo has the same advance on
        both channels and offsets ``+d/2`` / ``-d/2``; otherwise the offset is 0.
        """
        cfg = self.cfg
        h, share = split_outputs(self.net(z), cfg)
        log_mag = log_magnitude(h[0], cfg.n_fft)
        if cfg.magnitude_gate:
            log_mag = gated_magnitudes(log_mag, h[2], detach=True)
        return (log_mag, *phase_channels(h[1], self.odd, cfg.linked), share)

    def synthesize(self, log_mag: torch.Tensor, advance: torch.Tensor, offset: torch.Tensor | None = None,
                   share: torch.Tensor | None = None) -> torch.Tensor:
        """Log magnitudes, phase advances, offsets and lock shares ``[B, C, F, N]`` -> audio ``[B, C, F * hop]``.

        The phase of frame ``t`` is the start (:func:`start_phase`) plus the sum of the advances of frames
        ``0..t`` plus that frame's offset; the frames are inverse-FFT'd, sqrt-Hann windowed and overlap-added (block
        ``t`` = first half of frame ``t`` + second half of frame ``t - 1``).
        """
        cfg = self.cfg
        mag = torch.exp(log_mag)
        start = start_phase(self.odd, cfg)
        # Each frame's advance learns from its own frame against the phase it inherits: the gradient does
        # not flow back through the whole history (which made it noisy and training slow).
        if cfg.phase_lock:
            ref = lock_reference(mag.detach(), cfg.linked)
            phase = locked_phases(advance, ref, start, cfg.phase_lock, detach=True, share=share) + start
        else:
            inherited = (torch.cumsum(advance, dim=2) - advance).detach()
            phase = inherited + advance + start
        if offset is not None:
            phase = phase + offset
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        fr = torch.fft.irfft(spec, n=cfg.n_fft, dim=-1) * self.window  # [B, C, F, 2 * hop]
        b, c, f, _ = fr.shape
        prev = F.pad(fr[..., cfg.hop :], (0, 0, 1, 0))[:, :, :f]
        return (fr[..., : cfg.hop] + prev).reshape(b, c, f * cfg.hop)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.synthesize(*self.spectrum(z))


def split_outputs(out: torch.Tensor, cfg: SpectralCodecConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder network's output ``[B, decoder_outputs, F]`` -> its heads ``[heads, B, C, F, N]`` (log
    magnitude, phase[, gate]) and the learned lock's shares ``[B, C, F, N]`` (None without ``learned_lock``)."""
    b, _, f = out.shape
    rows = cfg.heads * cfg.channels * cfg.bins
    h = out[:, :rows].reshape(b, cfg.heads, cfg.channels, cfg.bins, f).permute(1, 0, 2, 4, 3)
    if not cfg.learned_lock:
        return h, None
    return h, lock_share(out[:, rows:].reshape(b, cfg.lock_channels, cfg.bins, f).transpose(2, 3), cfg.channels)


def frame_targets(decoder: SpectralDecoder, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the decoder's frames should be for ``audio [B, C, F * hop]``: each synthesis frame's complex
    spectrum ``[B, C, F, N]`` (sqrt-Hann over ``[t * hop, t * hop + n_fft)``, the last frame's second half
    zero-padded) and a mask ``[F]`` of the frames that lie wholly inside the audio.

    With the sqrt-Hann synthesis window, overlap-adding ``irfft`` of these spectra gives ``audio`` back, and
    so does their magnitude with the phase accumulated from each bin's advance (:func:`phase_advance`), which
    is what the decoder predicts.
    """
    cfg = decoder.cfg
    f = audio.shape[-1] // cfg.hop
    x = F.pad(audio[..., : f * cfg.hop], (0, cfg.hop)).unfold(-1, cfg.n_fft, cfg.hop) * decoder.window
    mask = torch.ones(f, device=audio.device)
    mask[-1] = 0.0
    return torch.fft.rfft(x, dim=-1), mask


def direct_loss(decoder: SpectralDecoder, z: torch.Tensor, audio: torch.Tensor,
                spectrum: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                bands: bool = True, peaks: bool = False) -> dict[str, torch.Tensor]:
    """Per-bin supervision of the decoder's frames: ``"magnitude"`` (log-magnitude L1), ``"phase"``
    (magnitude-weighted phase-advance loss), for linked stereo ``"ipd"`` (the inter-channel phase
    difference, weighted by the geometric mean of the two channels' magnitudes), with ``learned_lock``
    ``"lock"`` (the lock share's binary cross-entropy against :func:`lock_targets`, weighted by each
    non-peak bin's share of their magnitude), the band terms of :func:`band_losses` (``"band"``, ``"flux"``) and
    with ``peaks`` :func:`peak_loss` (``"peak"``).

    Much easier to learn from than the waveform alone: every bin of every frame gets its own target. The
    phase terms are ``1 - cos(predicted - true)`` weighted by each bin's share of its frame's magnitude,
    so phase is learned where there is something to hear. ``spectrum`` is ``decoder.spectrum(z)`` when
    the caller has it already (the decoder then runs once per step); ``bands = False`` leaves the band
    terms out (not computed) for a caller that does not train on them.
    """
    target, mask = frame_targets(decoder, audio)
    m, adv, offset, share = decoder.spectrum(z) if spectrum is None else spectrum
    mag = target.abs()
    out = {"magnitude": ((m - torch.log(mag + 1e-5)).abs().mean(-1) * mask).mean() / mask.mean()}
    angle = torch.angle(target)
    true_adv = angle - F.pad(angle, (0, 0, 1, 0))[..., :-1, :]
    weight = mag / mag.sum(-1, keepdim=True).clamp_min(1e-7)
    out["phase"] = (((1.0 - torch.cos(adv - true_adv)) * weight).sum(-1)[..., 1:] * mask[1:]).mean() / mask[1:].mean()
    if share is not None:
        cfg = decoder.cfg
        should, led = lock_targets(target, torch.exp(m).detach(), cfg.phase_lock, cfg.linked)
        bce = F.binary_cross_entropy(share.clamp(1e-6, 1.0 - 1e-6), should, reduction="none")
        w = weight * led
        out["lock"] = ((bce * w).sum(-1) / w.sum(-1).clamp_min(1e-7) * mask).mean() / mask.mean()
    if decoder.cfg.linked:
        true_ipd = torch.angle(target[:, 0] * target[:, 1].conj())  # [B, F, N]
        both = (mag[:, 0] * mag[:, 1]).sqrt()
        w = both / both.sum(-1, keepdim=True).clamp_min(1e-7)
        ipd = offset[:, 0] - offset[:, 1]
        out["ipd"] = (((1.0 - torch.cos(ipd - true_ipd)) * w).sum(-1) * mask).mean() / mask.mean()
    if bands:
        out.update(band_losses(band_filters(decoder.cfg.sample_rate, decoder.cfg.n_fft).to(m.device), m, mag, mask))
    if peaks:
        out["peak"] = peak_loss(m, mag, mask)
    return out


PEAK_BINS = 40
"""The low bins :func:`peak_loss` looks for partials in (40 of 25 Hz: up to 1 kHz)."""

PEAK_FLOOR = 3.45
"""How far under a frame's loudest low bin a peak still counts, in nats (30 dB)."""


def peak_loss(log_mag: torch.Tensor, true_mag: torch.Tensor, mask: torch.Tensor, bins: int = PEAK_BINS,
              floor: float = PEAK_FLOOR) -> torch.Tensor:
    """Where each low partial lies inside its bin: L1 between the predicted and true log-magnitude *tilt*
    ``m[k+1] - m[k-1]`` across every true peak ``k`` of the first ``bins`` bins, weighted by the peak's
    magnitude relative to the frame's loudest (peaks more than ``floor`` nats under it are left out).

    ``log_mag [B, C, F, N]`` predicted log magnitudes, ``true_mag [B, C, F, N]`` target magnitudes,
    ``mask [F]`` frames wholly inside the audio. A partial at 160-300 Hz sits in bins 25 Hz wide (1.4-2.5
    semitones); its place inside the bin lives only in the ratio of the magnitudes around the peak, which
    the per-bin L1 weighs like any other bin. A decoder that misses it holds a gliding partial in one bin and
    then jumps to the next, so a glide is heard as steps (docs/training.md, "Telling 5 from 14 by the text").

        true |X| around a peak k        tilt = log|X[k+1]| - log|X[k-1]|
           k-1   k   k+1
            .    #    .                 0      (the partial at the bin's centre)
            .    #    #                 > 0    (between k and k+1)
            #    #    .                 < 0    (between k-1 and k)
    """
    t = torch.log(true_mag[..., : bins + 1] + 1e-5)
    p = log_mag[..., : bins + 1]
    centre, left, right = t[..., 1:-1], t[..., :-2], t[..., 2:]
    loud = t.amax(-1, keepdim=True)
    peak = (centre > left) & (centre >= right) & (centre > loud - floor)
    w = peak * torch.exp(centre - loud)  # [B, C, F, bins - 1]
    miss = ((p[..., 2:] - p[..., :-2]) - (right - left)).abs()
    per_frame = (miss * w).sum(-1) / w.sum(-1).clamp_min(1e-7)  # [B, C, F]
    return (per_frame * mask).mean() / mask.mean()


BANDS = 32
"""Mel bands of :func:`band_losses` over the decoder's bins."""


@functools.lru_cache(maxsize=8)
def band_filters(sample_rate: int, n_fft: int) -> torch.Tensor:
    """``[BANDS, n_fft // 2 + 1]`` mel filters (30 Hz to Nyquist), for :func:`band_losses`."""
    from export.evaluate import mel_filterbank

    fb = mel_filterbank(sample_rate, n_fft, BANDS, 30.0, sample_rate / 2)
    return torch.from_numpy(fb.astype("float32"))


def band_losses(fb: torch.Tensor, log_mag: torch.Tensor, true_mag: torch.Tensor, mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Frame-level loudness of each mel band: ``"band"`` and ``"flux"`` (natural-log units).

    ``log_mag`` and ``true_mag`` are ``[B, C, F, N]`` (predicted log magnitudes, target magnitudes), ``fb``
    is ``[M, N]``, ``mask`` ``[F]`` (frames wholly inside the audio). Band energies ``E = log(fb |X|^2)``
    (floored 70 dB under the loudest band of the example).

    - ``"band"``: L1 between the predicted and true ``E``. The per-bin magnitude loss is a mean over every
      bin, most of them near silence; this one weighs what is heard.
    - ``"flux"``: L1 between the predicted and true mean frame-to-frame change ``mean_t |E[t] - E[t-1]|`` of
      each band. A statistic, not a frame-by-frame match: a steady hum must come out steady (the codes of a
      steady sound jitter from frame to frame, and a decoder that follows them makes the hum flutter, which
      is heard as pulsing), while noise must fluctuate as much as the noise did, wherever it does.
    """
    def energies(power: torch.Tensor) -> torch.Tensor:
        return floored_log(torch.einsum("mn,bcfn->bcfm", fb, power), dims=(2, 3))

    keep = mask.bool()
    ep = energies(torch.exp(2.0 * log_mag))[:, :, keep]
    et = energies(true_mag.square())[:, :, keep]
    out = {"band": (ep - et).abs().mean()}
    out["flux"] = flux_l1(ep, et, dim=2) if ep.shape[2] > 1 else ep.new_zeros(())
    return out


def floored_log(energy: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``log(energy)`` floored 70 dB under the largest value over ``dims`` (so near-silence is one level)."""
    return torch.log(energy + energy.amax(dim=dims, keepdim=True) * 1e-7 + 1e-12)


def flux_l1(predicted: torch.Tensor, true: torch.Tensor, dim: int) -> torch.Tensor:
    """L1 between the mean absolute frame-to-frame change along ``dim`` of two log-energy tensors."""
    return (predicted.diff(dim=dim).abs().mean(dim) - true.diff(dim=dim).abs().mean(dim)).abs().mean()


def log_magnitude(h: torch.Tensor, n_fft: int) -> torch.Tensor:
    """The decoder head's magnitude channel -> log magnitude of a bin.

    A head output of 0 is a quiet bin (``n_fft * e^-9``: a fresh decoder whispers); the magnitude is capped
    at ``n_fft`` (a full-scale sine), so no head output can make a bin explode.
    """
    return (h + (math.log(n_fft) - 9.0)).clamp(max=math.log(n_fft))


def phase_advance(h: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """The head's phase channel ``[..., N]`` -> each bin's phase advance over one hop, ``[..., N]``.

    A partial in bin ``k`` advances by ``pi * k`` (bin centre, ``n_fft = 2 * hop``) plus a deviation in
    ``(-pi, pi)`` set by where in the bin it lies; the head says the deviation. ``pi * k`` is kept modulo
    ``2 pi`` (``odd`` is ``k mod 2``), so the accumulated phase stays small and exact in float32.
    """
    return math.pi * (odd + torch.tanh(h))


def start_phase(odd: torch.Tensor, cfg: SpectralCodecConfig) -> torch.Tensor:
    """Each bin's phase before the first advance, ``[N]``: ``pi * (k mod 2)`` (``"alternate"``) or 0.

    With a sine window over ``n_fft = 2 * hop`` samples, the bins of one partial's main lobe are half a turn
    apart (``arg X_k = const - pi k``). Starting every bin at 0 puts neighbours in phase, which moves a tone to
    its frame's edges, where the synthesis window takes most of it away: from its *true* magnitudes and
    advances, a steady tone between two bins comes back about 8 dB too quiet (or not at all, half-way between
    them), one whose pitch moves swings in loudness as it crosses the bins, and the corpus's FM hum (prompt 2)
    is heard as another family. Started at ``pi * (k mod 2)``, the tone comes back at its level
    (docs/training.md, "The phase start, fine-tuned").
    """
    return odd * math.pi if cfg.phase_start == "alternate" else torch.zeros_like(odd)


def lock_regions(ref: torch.Tensor, climbs: int) -> torch.Tensor:
    """The bin each bin takes its phase from: ``ref [..., N]`` (magnitudes) -> indices ``[..., N]`` (int64).

    Each bin climbs ``climbs`` times to its louder neighbour (the louder of the two when both are louder
    than it; it stays on a tie), so a bin up to ``climbs`` bins from a peak lands on that peak: the peak's
    "region of influence" in a phase vocoder's terms. ``climbs = 0`` is every bin itself. A few gathers:
    cheap enough for the step graph, and plain ONNX (``GatherElements``, ``Where``).

    Example, magnitudes of one frame and two climbs::

        bin     0  1  2  3  4  5  6  7
        ref     1  2  5  3  1  1  4  2
        step    1  2  2  2  3  6  6  6      (each bin's louder neighbour, or itself)
        lock    2  2  2  2  2  6  6  6      (two steps; bin 4 reached 2 via 3)
    """
    n = ref.shape[-1]
    here = torch.arange(n, device=ref.device).expand_as(ref)
    if climbs <= 0:
        return here.clone()
    floor = torch.full_like(ref[..., :1], -1.0)
    left = torch.cat([floor, ref[..., :-1]], dim=-1)
    right = torch.cat([ref[..., 1:], floor], dim=-1)
    step = torch.where((right > ref) & (right >= left), here + 1, torch.where(left > ref, here - 1, here))
    lock = step
    for _ in range(climbs - 1):
        lock = torch.gather(step, -1, lock)
    return lock


GATE_BIAS = -3.0
"""The bias a new gate head starts at: ``sigmoid(-3)`` keeps 5 % of the last magnitude."""


def gated_magnitudes(raw: torch.Tensor, gate: torch.Tensor, previous: torch.Tensor | None = None,
                     detach: bool = False) -> torch.Tensor:
    """Log magnitudes ``[B, C, F, N]`` that keep a learned share of the last frame's: ``m[t] = g m[t-1] +
    (1 - g) raw[t]`` with ``g = sigmoid(gate)``, per bin.

    A decoder that follows its codes frame by frame makes a steady hum flutter (the codes of a steady sound
    jitter); one that always smooths blurs every attack. The gate lets it choose, bin by bin and frame by
    frame: near 1 holds a steady partial, near 0 lets an onset through. ``previous [B, C, N]`` is the last
    frame's (zeros at the start of a stream, as in the step graph's state); ``detach`` keeps the gradient
    out of the history, as the phase does.
    """
    g = torch.sigmoid(gate)
    m = raw.new_zeros(raw.shape[:2] + raw.shape[3:]) if previous is None else previous
    out = []
    for t in range(raw.shape[2]):
        m = g[:, :, t] * (m.detach() if detach else m) + (1.0 - g[:, :, t]) * raw[:, :, t]
        out.append(m)
    return torch.stack(out, dim=2)


LOCK_BIAS = 3.0
"""The bias a new lock-share head starts at: ``sigmoid(3)``, 95 % of the way to the peak's phase, so that a
fine-tune from a locked decoder starts where it was."""
LOCK_COHERENCE = 0.9
"""A true bin counts as in phase with its peak (:func:`lock_targets`) when ``cos`` of their phase difference,
less the half turns between them, exceeds this (within about 25 degrees)."""


def lock_share(h: torch.Tensor, channels: int) -> torch.Tensor:
    """The lock-share head ``h [..., L, F, N]`` -> how far each bin's phase moves to its peak's,
    ``[..., channels, F, N]`` in ``(0, 1)``. ``L`` is 1 for linked stereo (one phase, so one share for both
    channels) or ``channels``."""
    share = torch.sigmoid(h)
    return share.expand(*share.shape[:-3], channels, *share.shape[-2:])


def lock_targets(target: torch.Tensor, ref: torch.Tensor, climbs: int, linked: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the lock is right in the true frames ``target [B, C, F, N]`` (complex), for the regions that the
    lock finds on the decoder's magnitudes ``ref [B, C, F, N]``: ``(should, led)``, each ``[B, C, F, N]``.

    ``should`` is 1.0 where bin ``k`` is in phase with its peak ``p`` in this frame *and* the last one
    (``cos(arg X_k - arg X_p - pi (k - p)) > LOCK_COHERENCE`` in both, the same ``p``), else 0.0: the bin turns
    with its peak, as in the main lobe of a steady partial. In noise, and in a sine window's side lobes (in
    antiphase), it does not. ``led`` is 1.0 where ``k`` is not its own peak (the peaks are what the others
    follow, so their share changes nothing). Linked stereo judges the channels' sum, as it locks on the sum.

    The decoder's own regions, not the true ones, are the ones its lock will use: a low rumble that the
    decoder draws as a few sharp lines is still noise under those lines. Over the procedural corpus (true
    regions, 3 climbs), the magnitude-weighted share of non-peak bins that should lock is 0.84 for the FM
    hum and 0.79 for the sixth, against 0.10 for the deep rumble and 0.05-0.07 for the rapid sizzles.
    """
    spec = target.sum(dim=-3, keepdim=True).expand_as(target) if linked else target
    angle = torch.angle(spec)
    peak = lock_regions(lock_reference(ref, linked), climbs)
    k = torch.arange(angle.shape[-1], device=angle.device)
    shift = math.pi * (k - peak).to(angle.dtype)
    last = F.pad(angle, (0, 0, 1, 0))[..., :-1, :]
    last[..., 0, :] = angle[..., 0, :]  # the first frame has no last one: judged on itself
    now = torch.cos(angle - torch.gather(angle, -1, peak) - shift) > LOCK_COHERENCE
    before = torch.cos(last - torch.gather(last, -1, peak) - shift) > LOCK_COHERENCE
    return (now & before).to(angle.dtype), (peak != k).to(angle.dtype)


def lock_reference(mag: torch.Tensor, linked: bool) -> torch.Tensor:
    """The magnitudes ``[..., C, F, N]`` that :func:`lock_regions` finds peaks on: each channel's own, or for
    linked stereo (one phase for both channels) their sum, on both channels."""
    return mag.sum(dim=-3, keepdim=True).expand_as(mag) if linked else mag


def locked_phases(advance: torch.Tensor, ref: torch.Tensor, start: torch.Tensor, climbs: int,
                  phase: torch.Tensor | None = None, detach: bool = False, share: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Accumulated phases with identity phase locking, ``[B, C, F, N]`` (the start not included).

    ``advance [B, C, F, N]`` per-frame advances, ``ref [B, C, F, N]`` the magnitudes the regions are found
    on (the same for both channels of linked stereo), ``start [N]`` :func:`start_phase`, ``phase [B, C, N]``
    the previous frame's (zeros at the start of a stream). Frame ``t``: every bin advances, then takes the
    phase of its region's peak ``p`` (:func:`lock_regions`) shifted by ``pi (k - p)``, the half turn between
    neighbouring bins of one partial (see :func:`start_phase`); in these start-less terms that is
    ``pi (k - p) - (start[k] - start[p])``, which is 0 (mod 2 pi) for ``"alternate"``. ``detach`` keeps the
    gradient out of the inherited phase, as :meth:`SpectralDecoder.synthesize` does without locking.

    ``share [B, C, F, N]`` (``learned_lock``): each bin moves only that share of the way from its own
    advanced phase to its peak's, along the shorter arc (1: locked, 0: its own), so the decoder can lock a
    hum's lobe and leave noise to its own advances. Without it every bin locks fully.
    """
    b, c, f, n = advance.shape
    psi = advance.new_zeros(b, c, n) if phase is None else phase
    k = torch.arange(n, device=advance.device)
    out = []
    for t in range(f):
        acc = (psi.detach() if detach else psi) + advance[:, :, t]
        lock = lock_regions(ref[:, :, t], climbs)
        shift = math.pi * (k - lock).to(acc.dtype) - (start - start[lock])
        psi = torch.gather(acc, -1, lock) + shift
        if share is not None:
            apart = psi - acc
            apart = apart - TWO_PI * torch.floor((apart + math.pi) / TWO_PI)  # in [-pi, pi)
            psi = acc + share[:, :, t] * apart
        psi = psi - TWO_PI * torch.floor(psi / TWO_PI)
        out.append(psi)
    return torch.stack(out, dim=2)


def phase_channels(h: torch.Tensor, odd: torch.Tensor, linked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's phase channels ``h [..., C, F, N]`` -> (advance, offset), each ``[..., C, F, N]``.

    Independent: channel ``c``'s advance is :func:`phase_advance` of ``h[c]`` and the offset is 0. Linked
    (``C = 2``): both advance by :func:`phase_advance` of ``h[0]``, and ``h[1]`` says the inter-channel
    phase difference ``d = pi tanh(h[1])``, split as offsets ``+d/2`` (left) and ``-d/2`` (right).
    """
    if not linked:
        adv = phase_advance(h, odd)
        return adv, torch.zeros_like(adv)
    shared = phase_advance(h[..., :1, :, :], odd)
    half = 0.5 * math.pi * torch.tanh(h[..., 1:, :, :])
    return torch.cat([shared, shared], dim=-3), torch.cat([half, -half], dim=-3)


class SpectralCodec(nn.Module):
    """Encoder, residual VQ and decoder with :class:`export.codec.Codec`'s interface (``encode``, ``decode``,
    ``decode_latent``, ``forward``, ``cfg``, ``encoder``, ``quantizer``, ``decoder``)."""

    def __init__(self, cfg: SpectralCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SpectralEncoder(cfg)
        self.quantizer = ResidualVQ(cfg.dimension, cfg.n_codebooks, cfg.codebook_size)
        self.decoder = SpectralDecoder(cfg)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``[B, C, T] -> codes [B, K, T // hop]``."""
        return self.quantizer.encode(self.encoder(wav))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, K, F] -> audio [B, C, F * hop]``."""
        return self.decoder(self.quantizer.decode(codes))

    def forward(self, wav: torch.Tensor) -> CodecOutput:
        q = self.quantizer(self.encoder(wav))
        return CodecOutput(self.decoder(q.quantized), q.codes, q.commit_loss)

    def set_stereo_phase(self, mode: str) -> None:
        """Decode stereo phase as ``mode`` (:data:`STEREO_PHASES`) from now on. The weights have the same
        shapes either way (but for a learned lock's, so it refuses to relink one); a decoder fine-tuned with
        another mode than its codec's uses this."""
        if self.cfg.learned_lock and mode != self.cfg.stereo_phase:
            raise ValueError(f"this decoder's learned lock was made for {self.cfg.stereo_phase} stereo phase; it "
                             f"cannot change to {mode}")
        self._reconfigure(stereo_phase=mode)

    def set_phase_start(self, start: str) -> None:
        """Start each bin's accumulated phase as ``start`` (:data:`PHASE_STARTS`) from now on: a decoder
        fine-tuned with another start than its codec's uses this (the weights are the same shapes)."""
        self._reconfigure(phase_start=start)

    def set_phase_lock(self, climbs: int) -> None:
        """Lock each bin's phase to its peak's, found in ``climbs`` steps (:func:`locked_phases`; 0: off) from
        now on: a decoder fine-tuned with locking uses this (the weights are the same shapes)."""
        self._reconfigure(phase_lock=int(climbs))

    def add_magnitude_gate(self) -> None:
        """Give the decoder a magnitude gate head (:func:`gated_magnitudes`), started almost shut
        (:data:`GATE_BIAS`), so that a decoder fine-tuned with it starts where it was."""
        if self.cfg.magnitude_gate:
            return
        if self.cfg.learned_lock:
            raise ValueError("add the magnitude gate before the learned lock (the lock share is the last head)")
        self._add_head(GATE_BIAS)
        self._reconfigure(magnitude_gate=True)

    def add_learned_lock(self) -> None:
        """Give a locking decoder a lock-share head (:func:`locked_phases`' ``share``), started almost fully
        locked (:data:`LOCK_BIAS`), so that a decoder fine-tuned with it starts where it was. Set the stereo
        phase first: a linked decoder's share has one row of bins, not one per channel."""
        if self.cfg.learned_lock:
            return
        if not self.cfg.phase_lock:
            raise ValueError("a learned lock needs phase locking: set the phase lock (climbs >= 1) first")
        self._reconfigure(learned_lock=True)
        self._add_head(LOCK_BIAS, self.cfg.lock_channels * self.cfg.bins)

    def _add_head(self, bias: float, rows: int | None = None) -> None:
        """Grow the decoder's output conv by ``rows`` (default one head, ``C * N``) whose weights are zero and
        bias ``bias``."""
        out = self.decoder.net.out
        rows = self.cfg.channels * self.cfg.bins if rows is None else rows
        new = nn.Conv1d(out.in_channels, out.out_channels + rows, out.kernel_size, device=out.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[: out.out_channels] = out.weight
            new.bias.fill_(bias)
            new.bias[: out.out_channels] = out.bias
        self.decoder.net.out = new

    def _reconfigure(self, **changes: Any) -> None:
        cfg = dataclasses.replace(self.cfg, **changes)
        self.cfg = self.encoder.cfg = self.decoder.cfg = cfg

    def streaming_decoder(self, frames_per_step: int = 1) -> StreamingSpectralDecoder:
        """The decoder's step graph for a pack (a frozen copy: later training is not seen)."""
        return StreamingSpectralDecoder(self, frames_per_step)


# --------------------------------------------------------------------------- streaming


class StreamingSpectralDecoder(CodesStepGraph):
    """Explicit-state step graph of a :class:`SpectralDecoder`::

        (codes [1, K, F], *state_in) -> (pcm [1, C, F * hop], *state_out)

    State: each causal block's last ``kernel - 1`` normalised input frames
    (``block{i}_in [1, H, k - 1]``), every bin's phase (``phase_in [1, C, N]``, kept
    in ``[0, 2 pi)``; linked stereo keeps the shared phase in both rows and adds the
    frame's offsets, which are not state) and the overlap-add tail (``ola_in [1, C, hop]``, the second
    half of the last frame). The inverse FFT is a matrix product with
    a fixed basis (window folded in), so the graph needs no FFT operator.
    Stream sample ``i`` equals offline sample ``i`` (no lookahead).
    """

    def __init__(self, codec: SpectralCodec, frames_per_step: int = 1) -> None:
        super().__init__()
        cfg = codec.cfg
        self.cfg = cfg
        self.frames = int(frames_per_step)
        self.hop = cfg.hop_length
        self.lookahead_samples = 0
        k, card, dim = codec.quantizer.embed.shape
        self.n_codebooks, self.codebook_size = k, card
        self.register_buffer("table", codec.quantizer.embed.detach().clone().reshape(k * card, dim))
        self.register_buffer("offsets", (torch.arange(k, dtype=torch.int64) * card).view(1, k, 1))
        net = codec.decoder.net  # read only: the step graph holds its own copies
        self.inp = copy.deepcopy(net.inp)
        self.blocks = nn.ModuleList(_SteppedBlock(b) for b in net.blocks)
        self.out = copy.deepcopy(net.out)
        # irfft as a matrix product: frame[n] = sum_k re[k] A[k, n] + im[k] B[k, n], window folded in.
        n, bins = cfg.n_fft, cfg.bins
        kk = torch.arange(bins, dtype=torch.float64)[:, None]
        nn_ = torch.arange(n, dtype=torch.float64)[None]
        scale = torch.full((bins, 1), 2.0 / n, dtype=torch.float64)
        scale[0] = scale[-1] = 1.0 / n
        ang = 2.0 * math.pi * kk * nn_ / n
        win = hann(n).sqrt()[None]
        self.register_buffer("cos_basis", (scale * torch.cos(ang) * win).float())
        self.register_buffer("sin_basis", (-scale * torch.sin(ang) * win).float())
        self.register_buffer("odd", (torch.arange(bins) % 2).float())
        self.register_buffer("start", start_phase(self.odd, cfg))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

        c, f, h = cfg.channels, self.frames, cfg.hidden
        self._state: list[tuple[str, tuple[int, ...]]] = [
            (f"block{i}", (1, h, cfg.kernel_size - 1)) for i in range(len(self.blocks))] + (
            [("mag", (1, c, cfg.bins))] if cfg.magnitude_gate else []) + [
            ("phase", (1, c, cfg.bins)), ("ola", (1, c, self.hop))]
        inputs = [TensorSpec("codes", (1, k, f), "int64")]
        outputs = [TensorSpec("pcm", (1, c, f * self.hop))]
        for name, shape in self._state:
            inputs.append(TensorSpec(f"{name}_in", shape, "float32", f"{name}_out"))
            outputs.append(TensorSpec(f"{name}_out", shape, "float32", f"{name}_in"))
        self.spec = GraphSpec(inputs, outputs, meta={
            "kind": "codec_decoder", "frames_per_step": f, "batch": 1, "hop_length": self.hop,
            "sample_rate": cfg.sample_rate, "channels": c, "n_codebooks": k, "codebook_size": card,
            "lookahead_samples": 0})

    def forward(self, codes: torch.Tensor, *state_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        z = F.embedding(codes + self.offsets, self.table).sum(dim=1).transpose(1, 2)  # [1, D, F]
        h = self.inp(z)
        new_state: list[torch.Tensor] = []
        for block, cache in zip(self.blocks, state_in[: len(self.blocks)]):
            h, cache = block(h, cache)
            new_state.append(cache)
        heads, share = split_outputs(self.out(h), cfg)  # [heads, 1, C, F, N], [1, C, F, N] or None
        out = heads[:, 0]  # [heads, C, F, N]
        c, f = cfg.channels, self.frames
        log_mag = log_magnitude(out[0], cfg.n_fft)
        if cfg.magnitude_gate:
            log_mag = gated_magnitudes(log_mag[None], out[2][None], state_in[-3])[0]
            new_state.append(log_mag[:, -1][None])
        mag = torch.exp(log_mag)
        adv, offset = phase_channels(out[1], self.odd, cfg.linked)
        if cfg.phase_lock:
            ref = lock_reference(mag, cfg.linked)
            phase = locked_phases(adv[None], ref[None], self.start, cfg.phase_lock, state_in[-2], share=share)[0]
        else:
            phase = state_in[-2][0][:, None] + torch.cumsum(adv, dim=1)  # [C, F, N]
        heard = phase + self.start + offset if cfg.linked else phase + self.start
        re, im = mag * torch.cos(heard), mag * torch.sin(heard)
        frames = re @ self.cos_basis + im @ self.sin_basis  # [C, F, n_fft]
        first, second = frames[..., : self.hop], frames[..., self.hop :]
        tail = state_in[-1][0]  # [C, hop]
        prev = torch.cat([tail[:, None], second[:, :-1]], dim=1)  # [C, F, hop]
        pcm = (first + prev).reshape(1, c, f * self.hop)
        last = phase[:, -1]
        last = last - TWO_PI * torch.floor(last / TWO_PI)  # kept in [0, 2 pi): exact forever
        return (pcm, *new_state, last[None], second[:, -1][None])


class _SteppedBlock(nn.Module):
    """A copy of a :class:`CausalBlock` stepped with its last ``kernel - 1`` normalised frames as state."""

    def __init__(self, block: CausalBlock) -> None:
        super().__init__()
        self.block = copy.deepcopy(block)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp = torch.cat([cache, self.block.norm_frames(x)], dim=-1)
        return x + self.block.branch(hp), hp[..., hp.shape[-1] - cache.shape[-1]:]
