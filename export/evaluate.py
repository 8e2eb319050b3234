"""How well a pack does: text-sound match of what it generates, and codec reconstruction.

::

    export.data.corpus(TRAIN_SEED) ──> windows ──> augment (gain, noise, tilt, low-pass, stereo)
                                                     │
                                            features [D] ──> standardise ──> MLP ──> SoundClassifier
                                                                                          │
    pack ──> ClipRenderer (Generator + OutputSafety, as `cicada render`) ──> clip [C, N] ─┘──> predicted prompt
                                                                                                │
                                               per-prompt accuracy, confusion matrix (PNG) <────┘

    export.data.corpus(HELDOUT_SEED) ──> reconstruct (the pack's encoder + decoder) ──> SI-SNR, mel distance

The classifier is trained only on the procedural corpus, never on generated
audio, so "text match" asks: does the sound the pack makes for a prompt sound
like the corpus sound of that prompt (and unlike the other 21)? The features
are chosen to survive a lossy neural codec: spectral envelope, its movement,
modulation rates, stereo image and pitch movement, not fine waveform detail.

Only ``SoundClassifier.fit`` needs torch; features, prediction and the metrics
are numpy. ``evaluate`` needs matplotlib for the confusion-matrix figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.pack import write_atomic

log = logging.getLogger(__name__)

FEATURE_VERSION = 2  # bump when features() changes: cached classifiers are then refitted

# Feature analysis: ~32 ms frames every 10 ms (frame rate 100 Hz), mel bands up to 16 kHz.
FRAME_RATE = 100
N_MELS = 48
F_MIN = 30.0
F_MAX = 16000.0
FLOOR_DB = 80.0  # dB below the clip's loudest mel cell that count as silence (makes features gain-invariant)
MOD_BANDS = ((0.5, 2.0), (2.0, 8.0), (8.0, 32.0))  # envelope modulation bands, Hz
MOD_GROUPS = 4  # mel band groups whose envelopes are analysed separately (plus the whole spectrum)

Reconstructor = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- DSP helpers


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """Triangular HTK-mel filters ``[n_mels, n_fft // 2 + 1]``, each normalised to sum 1 (a band's mean power).

    ``f_max`` is clipped to Nyquist. A band too narrow to hold an FFT bin takes the nearest bin, so no band is
    ever empty.
    """
    f_max = min(f_max, sample_rate / 2.0)
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    for m in np.flatnonzero(fb.sum(1) <= 0.0):
        fb[m, int(np.argmin(np.abs(freqs - mid[m, 0])))] = 1.0
    fb /= fb.sum(1, keepdims=True)
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=32)
def _hann(n: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic
    w.setflags(write=False)
    return w


def stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Complex STFT of ``x [C, N]`` -> ``[C, T, n_fft // 2 + 1]`` (periodic Hann, frames centred by padding
    ``n_fft // 2`` zeros each side), scaled so a full-scale sine has magnitude ~1 in its bin.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    pad = n_fft // 2
    xp = np.pad(x, ((0, 0), (pad, pad)))
    if xp.shape[1] < n_fft:
        xp = np.pad(xp, ((0, 0), (0, n_fft - xp.shape[1])))
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft, axis=1)[:, ::hop]  # [C, T, n_fft]
    w = _hann(n_fft)
    return np.fft.rfft(frames * w.astype(x.dtype), axis=-1) * (2.0 / w.sum())


def _fft_size(sample_rate: int, seconds: float) -> int:
    return int(2 ** round(math.log2(max(16.0, seconds * sample_rate))))


def _as_stereo(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"expected audio [C, N], got shape {a.shape}")
    if a.shape[0] == 1:
        a = np.concatenate([a, a])
    return np.nan_to_num(a[:2].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``[C, N]`` at ``from_rate`` -> ``[C, N']`` at ``to_rate`` (soxr, high quality); float32."""
    audio = np.asarray(audio, np.float32)
    if int(from_rate) == int(to_rate):
        return audio
    import soxr

    return np.ascontiguousarray(soxr.resample(np.ascontiguousarray(audio.T), int(from_rate), int(to_rate), "HQ").T)


def _band_power(env: np.ndarray, rate: float) -> np.ndarray:
    """Modulation power of envelopes ``env [G, T]`` (dB) in ``MOD_BANDS`` -> ``[G, len(MOD_BANDS)]`` in dB."""
    G, T = env.shape
    e = env - env.mean(1, keepdims=True)
    w = np.hanning(T) if T > 2 else np.ones(T)
    spec = np.abs(np.fft.rfft(e * w, axis=1)) ** 2 / max(1e-9, (w**2).sum())
    f = np.fft.rfftfreq(T, 1.0 / rate)
    out = np.empty((G, len(MOD_BANDS)))
    for b, (lo, hi) in enumerate(MOD_BANDS):
        sel = (f >= lo) & (f < hi)
        out[:, b] = spec[:, sel].sum(1) if sel.any() else 0.0
    return 10.0 * np.log10(out + 1e-3)


# --------------------------------------------------------------------------- features


def feature_names() -> list[str]:
    """The name of every entry of :func:`features`, in order."""
    names = [f"mel{m}_mean" for m in range(N_MELS)] + [f"mel{m}_std" for m in range(N_MELS)]
    names += ["level_std", "level_crest", "flux_mean", "flux_std", "flux_median", "flux_p90", "onset_rate"]
    groups = [f"g{g}" for g in range(MOD_GROUPS)] + ["all"]
    names += [f"mod_{g}_{lo:g}-{hi:g}Hz" for g in groups for lo, hi in MOD_BANDS]
    names += ["balance_mean", "balance_std", "balance_speed", "balance_mod_slow", "icc", "coherence_mean",
              "coherence_std", "side_mid_db"]
    names += ["centroid_mean", "centroid_std", "centroid_speed", "peak_median", "peak_std", "peak_jump",
              "peak_still_frac", "peak_step_frac", "similarity_median", "similarity_p10",
              "flatness_mean", "flatness_std", "rolloff_mean", "rolloff_std", "peak_prominence"]
    return names


def _analyse(audio: np.ndarray, sample_rate: int) -> dict[str, Any]:
    """Frame-level quantities of ``audio [C, N]`` (~32 ms frames every 10 ms), each ``[T]`` or ``[T, M]``."""
    x = _as_stereo(audio)
    sr = int(sample_rate)
    hop = max(1, round(sr / FRAME_RATE))
    n_fft = _fft_size(sr, 0.032)
    X = stft(x, n_fft, hop)  # [2, T, F]
    P = X.real**2 + X.imag**2
    Pm = 0.5 * (P[0] + P[1])  # [T, F]
    freqs = np.arange(Pm.shape[1]) * sr / n_fft
    band = (freqs >= F_MIN) & (freqs <= min(F_MAX, sr / 2))
    Pb, fbnd = Pm[:, band], freqs[band]
    fb = mel_filterbank(sr, n_fft, N_MELS)
    mel = (Pm @ fb.T).astype(np.float64)  # [T, M]
    centres = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(min(F_MAX, sr / 2)), N_MELS + 2))[1:-1]
    cum = np.cumsum(mel, axis=1)
    tot = Pb.sum(1).astype(np.float64) + 1e-30
    return {
        "rate": sr / hop,
        "mel": mel,
        "pl": P[0].sum(1).astype(np.float64),
        "pr": P[1].sum(1).astype(np.float64),
        "cross": (X[0] * X[1].conj()).real.sum(1).astype(np.float64),
        "side": (np.abs(X[0] - X[1]) ** 2).sum(1).astype(np.float64),
        "mid": (np.abs(X[0] + X[1]) ** 2).sum(1).astype(np.float64),
        "centroid": np.log2((Pb @ fbnd) / tot + 1.0),
        "peak": _peak_octaves(Pb, fbnd, sr / n_fft),
        "prominence": 10.0 * np.log10(Pb.max(1) / (tot / Pb.shape[1]) + 1e-30),
        "flatness": np.log(mel + 1e-30).mean(1) - np.log(mel.mean(1) + 1e-30),
        "rolloff": np.log2(centres[np.minimum((cum < 0.85 * cum[:, -1:]).sum(1), N_MELS - 1)]),
        "similarity": _frame_similarity(mel),
    }


def _peak_octaves(P: np.ndarray, freqs: np.ndarray, bin_hz: float) -> np.ndarray:
    """Dominant peak of each frame of ``P [T, F]`` in octaves (log2 Hz), refined by parabolic interpolation
    of the log power around the largest bin -> ``[T]``."""
    k = np.clip(P.argmax(1), 1, P.shape[1] - 2)
    rows = np.arange(P.shape[0])
    a, b, c = (np.log(P[rows, k + d] + 1e-30) for d in (-1, 0, 1))
    den = a - 2.0 * b + c
    off = np.where(np.abs(den) > 1e-12, 0.5 * (a - c) / np.where(den == 0, 1.0, den), 0.0)
    return np.log2(np.maximum(freqs[k] + np.clip(off, -0.5, 0.5) * bin_hz, 1.0))


def _frame_similarity(mel: np.ndarray) -> np.ndarray:
    """Correlation of each frame's log-mel spectrum with the previous frame's -> ``[T]`` (first frame: 1)."""
    lm = np.log(mel + mel.max() * 10.0 ** (-FLOOR_DB / 10.0) + 1e-30)  # floor 80 dB down: gain-invariant
    lm = lm - lm.mean(1, keepdims=True)
    n = np.sqrt((lm**2).sum(1)) + 1e-9
    sim = np.ones(mel.shape[0])
    sim[1:] = (lm[1:] * lm[:-1]).sum(1) / (n[1:] * n[:-1])
    return sim


def _aggregate(a: dict[str, Any], lo: int, hi: int) -> np.ndarray:
    """Summary features ``[D]`` of frames ``lo:hi`` of an :func:`_analyse` result (see :func:`features`)."""
    rate = a["rate"]
    mel = a["mel"][lo:hi]
    T = mel.shape[0]
    mel_db = 10.0 * np.log10(mel + 1e-20)
    floor = mel_db.max() - FLOOR_DB
    mel_db = np.maximum(mel_db, floor)
    frame_pow = mel.mean(1)
    frame_db = np.maximum(10.0 * np.log10(frame_pow + 1e-20), floor)
    level = 10.0 * np.log10(frame_pow.mean() + 1e-20)
    loud = frame_db > frame_db.max() - 50.0  # frames that carry the sound (pitch and stereo statistics)
    if not loud.any():
        loud[:] = True

    out: list[Any] = [mel_db.mean(0) - level, mel_db.std(0), frame_db.std(), frame_db.max() - frame_db.mean()]

    flux = np.clip(np.diff(mel_db, axis=0), 0.0, None).mean(1) if T > 1 else np.zeros(1)
    out += [flux.mean(), flux.std(), np.median(flux), np.percentile(flux, 90)]
    if flux.size >= 3:
        med = np.median(flux)
        thr = med + 3.0 * np.median(np.abs(flux - med)) + 0.5
        peaks = (flux[1:-1] > flux[:-2]) & (flux[1:-1] >= flux[2:]) & (flux[1:-1] > thr)
        out.append(math.log1p(peaks.sum() * rate / T))
    else:
        out.append(0.0)

    bounds = np.linspace(0, N_MELS, MOD_GROUPS + 1).round().astype(int)
    genv = np.stack([10.0 * np.log10(mel[:, a0:b0].mean(1) + 1e-20) for a0, b0 in zip(bounds[:-1], bounds[1:])])
    env = np.concatenate([np.maximum(genv, floor), frame_db[None]])
    out.append(_band_power(env, rate).ravel())

    pl, pr, cross = a["pl"][lo:hi], a["pr"][lo:hi], a["cross"][lo:hi]
    eps = 1e-12 * (pl.max() + pr.max()) + 1e-30
    bal = np.clip(10.0 * np.log10((pl + eps) / (pr + eps)), -30.0, 30.0)
    bl = bal[loud]
    k = max(1, int(round(rate / 10)))  # 100 ms smoothing for the balance's speed
    bs = np.convolve(bal, np.ones(k) / k, mode="valid") if bal.size >= k else bal
    out += [bl.mean(), bl.std(), np.abs(np.diff(bs)).mean() * rate if bs.size > 1 else 0.0]
    out.append(_band_power(bal[None], rate)[0, 0] if T > 2 else 0.0)
    out.append(cross.sum() / math.sqrt(pl.sum() * pr.sum() + 1e-30))
    coh = (cross / np.sqrt(pl * pr + eps**2))[loud]
    out += [coh.mean(), coh.std()]
    out.append(10.0 * math.log10((a["side"][lo:hi].sum() + 1e-20) / (a["mid"][lo:hi].sum() + 1e-20)))

    cent, peak = a["centroid"][lo:hi][loud], a["peak"][lo:hi][loud]
    out += [cent.mean(), cent.std(), np.abs(np.diff(cent)).mean() * rate if cent.size > 1 else 0.0]
    jump = np.abs(np.diff(peak)) * 12.0 if peak.size > 1 else np.zeros(1)  # semitones per frame
    out += [np.median(peak), peak.std(), jump.mean(), (jump < 0.1).mean(), ((jump > 0.5) & (jump < 3.0)).mean()]
    sim = a["similarity"][lo + 1: hi]
    out += [np.median(sim), np.percentile(sim, 10)] if sim.size else [1.0, 1.0]
    flat, roll = a["flatness"][lo:hi][loud], a["rolloff"][lo:hi][loud]
    out += [flat.mean(), flat.std(), roll.mean(), roll.std(), a["prominence"][lo:hi][loud].mean()]

    f = np.concatenate([np.atleast_1d(np.asarray(v, np.float64)).ravel() for v in out])
    return np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _frame_windows(T: int, rate: float, seconds: float, hop_seconds: float) -> list[tuple[int, int]]:
    """Frame ranges of windows of ``seconds`` every ``hop_seconds`` over ``T`` frames (all of them when short)."""
    W = max(1, int(round(seconds * rate)))
    H = max(1, int(round(hop_seconds * rate)))
    if T <= W + 1:  # centred frames: a clip of exactly `seconds` has W + 1 of them
        return [(0, T)]
    starts = list(range(0, T - W + 1, H))
    if T - W - starts[-1] > H // 2:
        starts.append(T - W)  # cover the tail
    return [(s, s + W) for s in starts]


def features(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Deterministic, gain-invariant features of ``audio [C, N]`` (C = 1 or 2; mono counts as centred stereo).

    Returns ``[D]`` float32 with ``D = len(feature_names())``:

    - log-mel profile: 48 HTK-mel band levels (30 Hz .. min(16 kHz, Nyquist)), mean over time relative to the
      clip's mean level, and their standard deviation over time (dB; cells more than 80 dB below the loudest
      are floored there);
    - loudness dynamics: std and crest (max - mean) of the frame level, spectral flux (mean positive
      log-mel difference per frame) mean / std / median / 90th percentile, onset rate (log1p of flux peaks
      per second);
    - envelope modulation spectrum: power of the dB envelope of 4 mel band groups and of the whole spectrum
      in the 0.5-2, 2-8 and 8-32 Hz modulation bands (dB);
    - stereo: L/R balance (dB) mean, std, mean speed and 0.5-2 Hz modulation power; inter-channel
      correlation; per-frame spectral coherence mean / std; side/mid energy ratio (dB);
    - pitch movement: spectral centroid (octaves) mean / std / mean speed; dominant spectral peak (octaves,
      parabolic interpolation) median / std, its mean frame-to-frame jump (semitones), the fraction of frames
      where it holds still (< 0.1 semitone) and where it steps (0.5-3 semitones: stepped vs gliding pitch);
      frame-to-frame log-mel correlation median / 10th percentile; mel spectral flatness (log) mean / std;
      85 % mel rolloff (octaves) mean / std; mean peak prominence (dB over the frame's mean bin power).

    Pitch and stereo statistics use the frames within 50 dB of the loudest. Frames: ~32 ms (a power-of-two
    FFT) every 10 ms at any sample rate.
    """
    return _aggregate(_analyse(audio, sample_rate), 0, 1 << 62)


def window_features(audio: np.ndarray, sample_rate: int, seconds: float, hop_seconds: float) -> np.ndarray:
    """:func:`features` of each window of ``seconds`` every ``hop_seconds`` of ``audio [C, N]`` -> ``[Wn, D]``
    (one window, the whole clip, when it is shorter). One analysis serves every window."""
    a = _analyse(audio, sample_rate)
    return np.stack([_aggregate(a, lo, hi) for lo, hi in _frame_windows(a["mel"].shape[0], a["rate"], seconds,
                                                                         hop_seconds)])


# --------------------------------------------------------------------------- augmentation


def augment(audio: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``audio [C, N]`` with the artefacts a codec or a generator adds, drawn from ``rng``:
    random gain (-20..+6 dB), spectral tilt (-3..+3 dB/octave around 1 kHz), a gentle low-pass
    (half the time: 2nd order, 3.5..14 kHz), stereo narrowing (0..25 % crossfeed), a slight time shift
    (0..20 ms cut from the start), and white noise 20..50 dB below the signal. ``[C, N - shift]`` float32.
    """
    x = np.asarray(audio, np.float64).copy()
    C, N = x.shape
    X = np.fft.rfft(x, axis=1)
    f = np.fft.rfftfreq(N, 1.0 / sample_rate)
    tilt = rng.uniform(-3.0, 3.0)
    g = (np.maximum(f, 20.0) / 1000.0) ** (tilt / 6.0206)
    if rng.random() < 0.5:
        fc = rng.uniform(3500.0, 14000.0)
        g = g / np.sqrt(1.0 + (f / fc) ** 4)
    x = np.fft.irfft(X * g, n=N, axis=1)
    if C == 2:
        a = rng.uniform(0.0, 0.25)
        x = np.stack([(1 - a) * x[0] + a * x[1], (1 - a) * x[1] + a * x[0]])
    x = x[:, int(rng.integers(0, int(0.02 * sample_rate) + 1)):]
    rms = math.sqrt(float((x**2).mean()) + 1e-20)
    x += rng.standard_normal(x.shape) * rms * 10.0 ** (-rng.uniform(20.0, 50.0) / 20.0)
    x *= 10.0 ** (rng.uniform(-20.0, 6.0) / 20.0)
    return x.astype(np.float32)


# --------------------------------------------------------------------------- classifier


def _data_fingerprint() -> str:
    """Hash of what a fitted classifier depends on besides its arguments: the corpus code, the features."""
    from export import data

    h = hashlib.sha256(f"features v{FEATURE_VERSION}".encode())
    src = getattr(data, "__file__", None)
    if src and Path(src).is_file():
        h.update(Path(src).read_bytes())
    return h.hexdigest()[:16]


class SoundClassifier:
    """Which of the corpus prompts a clip sounds like: features -> standardise -> 1-hidden-layer MLP.

    Attributes: ``prompts`` (class order = ``export.data.prompts()``), ``sample_rate`` (clips at another rate
    are resampled to it), ``window_seconds`` / ``hop_seconds`` (a clip is classified window by window and
    the probabilities averaged), ``heldout_accuracy`` (per-clip accuracy on ``corpus(HELDOUT_SEED)``; None
    before ``fit``), ``config`` (the fit arguments and the data fingerprint).
    """

    def __init__(self, *, window_seconds: float = 3.0, hop_seconds: float = 1.5, hidden: int = 128) -> None:
        self.window_seconds = float(window_seconds)
        self.hop_seconds = float(hop_seconds)
        self.hidden = int(hidden)
        self.prompts: list[str] = []
        self.sample_rate: int = 32000
        self.mean: np.ndarray | None = None  # [D]
        self.std: np.ndarray | None = None  # [D]
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []  # (W [in, out], b [out]); ReLU between
        self.heldout_accuracy: float | None = None
        self.train_accuracy: float | None = None
        self.config: dict[str, Any] = {}

    # ------------------------------------------------------------------ features

    def window_features(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """``audio [C, N]`` -> features of each window ``[Wn, D]``."""
        x = resample(_as_stereo(audio).astype(np.float32), sample_rate, self.sample_rate)
        return window_features(x, self.sample_rate, self.window_seconds, self.hop_seconds)

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        seed: int = 0,
        clips_per_prompt: int = 8,
        seconds: float = 6.0,
        *,
        sample_rate: int | None = None,
        augmentations: int = 2,
        epochs: int = 300,
        heldout_clips_per_prompt: int = 4,
        progress: Callable[[str], None] | None = None,
    ) -> SoundClassifier:
        """Train on ``corpus(TRAIN_SEED, clips_per_prompt, seconds)``; validate on ``corpus(HELDOUT_SEED, ...)``.

        Every window of every training clip is used clean and in ``augmentations`` augmented copies
        (:func:`augment`); the MLP trains full-batch with Adam for ``epochs`` (seeded by ``seed``: same
        arguments, same weights). ``heldout_accuracy`` is then the whole-clip accuracy on
        ``heldout_clips_per_prompt`` unseen draws per prompt (clean, as the corpus makes them).
        """
        import torch

        from export import data

        say = progress or (lambda _msg: None)
        t0 = time.perf_counter()
        self.sample_rate = int(sample_rate or data.SAMPLE_RATE)
        self.prompts = list(data.prompts())
        rng = np.random.default_rng([seed, 7919])
        feats: list[np.ndarray] = []
        labels: list[int] = []
        for index, clip in data.corpus(data.TRAIN_SEED, clips_per_prompt, seconds, sample_rate=self.sample_rate):
            for v in [clip] + [augment(clip, self.sample_rate, rng) for _ in range(augmentations)]:
                f = window_features(v, self.sample_rate, self.window_seconds, self.hop_seconds)
                feats.append(f)
                labels += [index] * len(f)
        Xn = np.concatenate(feats).astype(np.float64)
        y = np.asarray(labels, np.int64)
        say(f"features of {len(y)} training windows in {time.perf_counter() - t0:.1f} s")
        self.mean = Xn.mean(0).astype(np.float32)
        self.std = (Xn.std(0) + 1e-6).astype(np.float32)
        Xs = (Xn - self.mean) / self.std

        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed))
        D, K = Xs.shape[1], len(self.prompts)
        dims = [D, self.hidden, K] if self.hidden > 0 else [D, K]
        lins = []
        for a, b in zip(dims[:-1], dims[1:]):
            lin = torch.nn.Linear(a, b)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(a)
                lin.weight.uniform_(-bound, bound, generator=g)
                lin.bias.zero_()
            lins.append(lin)
        mods: list[torch.nn.Module] = []
        for i, lin in enumerate(lins):
            if i:
                mods += [torch.nn.ReLU(), torch.nn.Dropout(0.2)]
            mods.append(lin)
        net = torch.nn.Sequential(*mods)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
        xt = torch.as_tensor(Xs, dtype=torch.float32)
        yt = torch.as_tensor(y)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a small net: more threads only contend (10x slower on a busy 2-core machine)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                net.train()
                for _ in range(epochs):
                    noise = torch.randn(xt.shape, generator=g) * 0.1  # feature noise: smoother boundaries
                    loss = torch.nn.functional.cross_entropy(net(xt + noise), yt, label_smoothing=0.05)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            torch.set_num_threads(threads)
        net.eval()
        with torch.no_grad():
            self.train_accuracy = float((net(xt).argmax(1) == yt).float().mean())
        self.layers = [(lin.weight.detach().numpy().T.astype(np.float32).copy(),
                        lin.bias.detach().numpy().astype(np.float32).copy()) for lin in lins]
        say(f"trained in {time.perf_counter() - t1:.1f} s (train accuracy {self.train_accuracy:.3f})")

        self.config = {
            "seed": int(seed), "clips_per_prompt": int(clips_per_prompt), "seconds": float(seconds),
            "sample_rate": self.sample_rate, "augmentations": int(augmentations), "epochs": int(epochs),
            "heldout_clips_per_prompt": int(heldout_clips_per_prompt), "window_seconds": self.window_seconds,
            "hop_seconds": self.hop_seconds, "hidden": self.hidden, "fingerprint": _data_fingerprint(),
        }
        t2 = time.perf_counter()
        self.heldout_accuracy = self.accuracy(data.corpus(data.HELDOUT_SEED, heldout_clips_per_prompt, seconds,
                                                          sample_rate=self.sample_rate), self.sample_rate)
        say(f"held-out accuracy {self.heldout_accuracy:.3f} ({time.perf_counter() - t2:.1f} s)")
        return self

    def accuracy(self, clips: Iterable[tuple[int, np.ndarray]], sample_rate: int) -> float:
        """Whole-clip accuracy over ``(class index, clip [C, N])`` pairs."""
        hits = [int(self.predict(clip, sample_rate) == index) for index, clip in clips]
        return float(np.mean(hits)) if hits else float("nan")

    # ------------------------------------------------------------------ predicting

    def _check_fitted(self) -> None:
        if self.mean is None or not self.layers:
            raise RuntimeError("the classifier is not fitted: call fit() or load()")

    def _proba(self, feats: np.ndarray) -> np.ndarray:
        """``feats [B, D]`` -> class probabilities ``[B, K]``."""
        self._check_fitted()
        h = (np.asarray(feats, np.float32) - self.mean) / self.std
        for i, (W, b) in enumerate(self.layers):
            if i:
                h = np.maximum(h, 0.0)
            h = h @ W + b
        h = h - h.max(1, keepdims=True)
        e = np.exp(h)
        return e / e.sum(1, keepdims=True)

    def predict_proba(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Class probabilities ``[K]`` of a whole clip ``audio [C, N]``: the mean over its windows."""
        return self._proba(self.window_features(audio, sample_rate)).mean(0)

    def predict(self, audio: np.ndarray, sample_rate: int) -> int:
        """The index (into ``prompts``) of the most likely prompt for ``audio [C, N]``."""
        return int(np.argmax(self.predict_proba(audio, sample_rate)))

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` (weights + JSON metadata; no pickles) atomically: temp file, then ``os.replace``."""
        self._check_fitted()
        path = Path(path)
        meta = {
            "format": 1, "prompts": self.prompts, "sample_rate": self.sample_rate,
            "window_seconds": self.window_seconds, "hop_seconds": self.hop_seconds, "hidden": self.hidden,
            "heldout_accuracy": self.heldout_accuracy, "train_accuracy": self.train_accuracy,
            "config": self.config, "layers": len(self.layers),
        }
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta)), "mean": self.mean, "std": self.std}
        for i, (W, b) in enumerate(self.layers):
            arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        write_atomic(path, lambda fh: np.savez(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SoundClassifier:
        """Read what :meth:`save` wrote."""
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            clf = cls(window_seconds=meta["window_seconds"], hop_seconds=meta["hop_seconds"], hidden=meta["hidden"])
            clf.prompts = list(meta["prompts"])
            clf.sample_rate = int(meta["sample_rate"])
            clf.heldout_accuracy = meta["heldout_accuracy"]
            clf.train_accuracy = meta["train_accuracy"]
            clf.config = dict(meta["config"])
            clf.mean, clf.std = z["mean"].copy(), z["std"].copy()
            clf.layers = [(z[f"W{i}"].copy(), z[f"b{i}"].copy()) for i in range(int(meta["layers"]))]
        return clf


# 8 x 6 s per prompt: ~1600 training windows; about a minute on a busy 2-core machine, then cached
DEFAULT_FIT: dict[str, Any] = {"seed": 0, "clips_per_prompt": 8, "seconds": 6.0, "heldout_clips_per_prompt": 4}


def load_or_fit(cache: str | os.PathLike[str] | None, progress: Callable[[str], None] | None = None,
                **fit: Any) -> SoundClassifier:
    """The classifier cached at ``cache`` if it was fitted with these arguments on the current corpus code;
    otherwise fit one (``DEFAULT_FIT`` updated with ``fit``) and cache it."""
    kwargs = {**DEFAULT_FIT, **fit}
    if cache is not None and Path(cache).is_file():
        try:
            clf = SoundClassifier.load(cache)
            c = clf.config
            same = c.get("fingerprint") == _data_fingerprint() and all(
                c.get(k) == (float(v) if isinstance(v, float) else v) for k, v in kwargs.items() if k in c)
            if same:
                return clf
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the cached classifier %s: %s", cache, exc)
    clf = SoundClassifier().fit(progress=progress, **kwargs)
    if cache is not None:
        clf.save(cache)
    return clf


# --------------------------------------------------------------------------- metrics


def _align(ref: np.ndarray, est: np.ndarray, latency_samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref, np.float64)
    est = np.asarray(est, np.float64)
    if ref.ndim == 1:
        ref = ref[None]
    if est.ndim == 1:
        est = est[None]
    if ref.shape[0] != est.shape[0]:
        raise ValueError(f"channel counts differ: ref {ref.shape}, est {est.shape}")
    if latency_samples:
        est = est[:, int(latency_samples):]
    n = min(ref.shape[1], est.shape[1])
    return ref[:, :n], est[:, :n]


def si_snr_db(ref: np.ndarray, est: np.ndarray, latency_samples: int = 0) -> float:
    """Scale-invariant SNR in dB of ``est [C, N']`` against ``ref [C, N]``, mean over channels.

    ``est`` is first advanced by ``latency_samples`` and both are trimmed to the shorter length. Per channel,
    with zero-mean ``r`` and ``e``: ``s = (<e, r> / <r, r>) r``, ``SI-SNR = 10 log10(|s|^2 / |e - s|^2)``
    (1e-12 added to both energies, so identical signals give a large finite value, ~120 dB or more).
    """
    r, e = _align(ref, est, latency_samples)
    r = r - r.mean(1, keepdims=True)
    e = e - e.mean(1, keepdims=True)
    alpha = (e * r).sum(1, keepdims=True) / ((r * r).sum(1, keepdims=True) + 1e-12)
    s = alpha * r
    num = (s * s).sum(1) + 1e-12
    den = ((e - s) ** 2).sum(1) + 1e-12
    return float(np.mean(10.0 * np.log10(num / den)))


MEL_RESOLUTIONS = (0.016, 0.032, 0.064)  # FFT lengths in seconds for mel_distance
MEL_FLOOR_DB = -80.0


def log_mel(audio: np.ndarray, sample_rate: int, fft_seconds: float = 0.032, n_mels: int = 64) -> np.ndarray:
    """Log-mel spectrogram in dB ``[C, T, M]`` of ``audio [C, N]``: power STFT (Hann, FFT of ``fft_seconds``
    rounded to a power of two, hop a quarter of it; a full-scale sine is ~0 dB), HTK-mel bands 30 Hz ..
    min(16 kHz, Nyquist) (``M = min(n_mels, n_fft // 8)``), floored at -80 dB."""
    a = np.asarray(audio, np.float64)
    if a.ndim == 1:
        a = a[None]
    n_fft = _fft_size(sample_rate, fft_seconds)
    X = stft(a, n_fft, n_fft // 4)
    fb = mel_filterbank(int(sample_rate), n_fft, min(n_mels, n_fft // 8))
    mel = (X.real**2 + X.imag**2) @ fb.T
    return np.maximum(10.0 * np.log10(mel + 1e-20), MEL_FLOOR_DB)


def mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int, latency_samples: int = 0) -> float:
    """Multi-resolution log-mel distance in dB between ``ref [C, N]`` and ``est [C, N']`` (0 = identical).

    After aligning as :func:`si_snr_db` does: for each FFT length in ``MEL_RESOLUTIONS`` (16, 32, 64 ms,
    rounded to powers of two; hop a quarter), the mean over channels, frames and bands of
    ``|log_mel(ref) - log_mel(est)|`` (:func:`log_mel`: dB, 64 bands, floored at -80 dB); then the mean over
    the resolutions. Not scale-invariant: a gain error of g dB adds up to |g|.
    """
    r, e = _align(ref, est, latency_samples)
    d = [np.abs(log_mel(r, sample_rate, s) - log_mel(e, sample_rate, s)).mean() for s in MEL_RESOLUTIONS]
    return float(np.mean(d))


def codec_metrics(
    reconstruct: Reconstructor,
    seed: int | None = None,
    clips_per_prompt: int = 1,
    seconds: float = 4.0,
    *,
    latency_samples: int = 0,
    sample_rate: int | None = None,
    classifier: SoundClassifier | None = None,
) -> dict[str, Any]:
    """Reconstruction quality of a codec on held-out corpus clips.

    With a ``classifier``, each reconstruction also goes through the engine's
    output stage (DC blocker, limiter: what a listener would hear of those
    codes) and is labelled: ``"recognised"`` is the fraction labelled as its
    own prompt (the ceiling of any LM's text-sound match with this codec) and
    ``"heard_as"`` maps each prompt to the labels of its reconstructions.

    ``reconstruct`` maps a clip ``[C, N]`` (float32, at ``sample_rate``, default ``export.data.SAMPLE_RATE``)
    to its reconstruction ``[C, N']``; the reconstruction is advanced by ``latency_samples`` and both are
    trimmed to the shorter length. Clips: ``corpus(seed, clips_per_prompt, seconds)`` (``seed`` defaults to
    ``HELDOUT_SEED``). Returns ``{"si_snr_db", "mel_distance"}`` (means over all clips), ``"per_prompt"``
    (prompt -> the same two, means over its clips) and ``"clips"``.
    """
    from export import data

    seed = data.HELDOUT_SEED if seed is None else seed
    sr = int(sample_rate or data.SAMPLE_RATE)
    names = data.prompts()
    per: dict[int, list[tuple[float, float]]] = {}
    heard: dict[int, list[int]] = {}
    for index, clip in data.corpus(seed, clips_per_prompt, seconds, sample_rate=sr):
        est = np.asarray(reconstruct(clip))
        per.setdefault(index, []).append((si_snr_db(clip, est, latency_samples),
                                          mel_distance(clip, est, sr, latency_samples)))
        if classifier is not None:
            heard.setdefault(index, []).append(classifier.predict(_output_stage(est, sr), sr))
    allv = np.array([v for vs in per.values() for v in vs], np.float64).reshape(-1, 2)
    extra: dict[str, Any] = {}
    if classifier is not None:
        extra["recognised"] = float(np.mean([lab == i for i, labs in heard.items() for lab in labs]))
        extra["heard_as"] = {names[i]: [int(x) for x in labs] for i, labs in heard.items()}
    return {
        **extra,
        "si_snr_db": float(allv[:, 0].mean()) if allv.size else None,
        "mel_distance": float(allv[:, 1].mean()) if allv.size else None,
        "per_prompt": {names[i]: {"si_snr_db": float(np.mean([v[0] for v in vs])),
                                  "mel_distance": float(np.mean([v[1] for v in vs]))} for i, vs in per.items()},
        "clips": int(allv.shape[0]),
    }


def _output_stage(audio: np.ndarray, sample_rate: int, block: int = 640) -> np.ndarray:
    """``audio [C, N]`` through a fresh engine output stage (DC blocker, gain 0 dB, limiter)."""
    from engine.post import OutputSafety

    post = OutputSafety(sample_rate, audio.shape[0])
    audio = np.ascontiguousarray(audio, np.float32)
    return np.concatenate([post.process(np.ascontiguousarray(audio[:, s : s + block])).copy()
                           for s in range(0, audio.shape[1], block)], axis=1)


def pack_encoder(pack: Any, threads: int = 1) -> Callable[..., np.ndarray] | None:
    """The pack's tokenizer of audio, ``clip [C, N] float32 -> codes [K, ceil(N / hop)]`` int64, or None
    without ``encoder.onnx``.

    ``pack`` is an :class:`engine.pack.Pack`. The encoder graph has a fixed
    length: a shorter clip is zero-padded at the end (its codes are unchanged,
    the encoder being causal), a longer one is refused. ``encode(clip, whole=True)``
    returns every frame of the graph's length instead.
    """
    from engine.lm import session_options

    if pack.encoder is None:
        return None
    session = pack.session(pack.encoder, session_options(threads))
    capacity = pack.encoder.input("audio").shape[-1]
    hop = pack.audio.hop_length

    def encode(clip: np.ndarray, whole: bool = False) -> np.ndarray:
        c, n = clip.shape
        if n > capacity:
            raise ValueError(f"clip of {n} samples is longer than the pack encoder's {capacity}")
        audio = np.zeros((1, c, capacity), np.float32)
        audio[0, :, :n] = clip
        codes = session.run(["codes"], {"audio": audio})[0][0]
        return codes if whole else codes[:, : -(-n // hop)]

    return encode


def stream_decode(decoder: Any, codes: np.ndarray, frames: int) -> np.ndarray:
    """``codes [1, K, F]`` -> audio ``[C, frames * hop]`` from an :class:`engine.codec.DecoderSession`, reset
    first and stepped as the engine steps it. ``frames`` is rounded up to whole decoder steps; a step that
    reaches past ``F`` repeats the last frame's codes."""
    fps = decoder.frames_per_step
    frames = -(-frames // fps) * fps
    if frames > codes.shape[-1]:
        codes = np.pad(codes, ((0, 0), (0, 0), (0, frames - codes.shape[-1])), mode="edge")
    decoder.reset()
    return np.concatenate([decoder.step(codes[:, :, f : f + fps]).copy() for f in range(0, frames, fps)], axis=-1)


def pack_reconstructor(pack_dir: str | os.PathLike[str]) -> Reconstructor | None:
    """The pack's codec round trip ``clip [C, N] -> reconstruction [C, N']``, or None without ``encoder.onnx``.

    Encodes with the pack's encoder graph (whole clip, zero-padded to its fixed
    length; longer clips are refused) and decodes with the engine's streaming
    decoder session frame by frame, i.e. exactly what the engine plays for
    those codes. The callable carries ``latency_samples`` (the decoder's
    lookahead), which :func:`evaluate` passes to :func:`codec_metrics`.
    """
    from engine import pack as packfmt
    from engine.codec import DecoderSession

    pack = packfmt.load(pack_dir)
    encode = pack_encoder(pack)
    if encode is None:
        return None
    decoder = DecoderSession(pack)
    hop = pack.audio.hop_length

    def reconstruct(clip: np.ndarray) -> np.ndarray:
        n = clip.shape[1]
        return stream_decode(decoder, encode(clip, whole=True)[None], -(-n // hop))[:, :n]

    reconstruct.latency_samples = decoder.lookahead_samples  # type: ignore[attr-defined]
    return reconstruct


# --------------------------------------------------------------------------- generation


class ClipRenderer:
    """Offline clips from a pack, exactly as ``cicada render`` writes them to WAV (same preset, the output
    limiter, the 10 ms fade-out at the end).

    The pack's sessions open once; each :meth:`clip` changes the prompt through the Generator's params,
    resets the stream and reseeds it, so clips are independent and reproducible: ``clip(p, s, seed)`` equals
    ``cicada render --prompt p --seconds s --seed seed`` (with the same preset) sample for sample.
    """

    def __init__(self, pack_dir: str | os.PathLike[str], *, preset: str | None = "default", compute: str = "cpu",
                 ceiling_db: float = -1.0) -> None:
        from engine import pack as packfmt
        from engine.app import RunOptions, initial_params, open_generator, pack_path

        self.opts = RunOptions(pack=Path(pack_dir), preset=preset, compute=compute, ceiling_db=ceiling_db)
        self.pack = packfmt.load(pack_path(self.opts.pack), check_graphs=False)
        params, seed, self.gain_db = initial_params(self.opts, pack=self.pack)
        self.base_params = params
        self.gen = open_generator(self.opts, self.pack, params, seed)
        self.sample_rate = self.gen.sample_rate
        self.channels = self.gen.channels

    def clip(self, prompt: str, seconds: float, seed: int) -> np.ndarray:
        """``[C, N]`` float32, ``N = round(seconds * sample_rate)``."""
        from engine.audio import STOP_FADE_SECONDS, _raised_cosine
        from engine.generator import GenParams
        from engine.post import OutputSafety

        gen = self.gen
        gen.set_params(GenParams(prompt=prompt, sampling=self.base_params.sampling, version=gen.params.version + 1))
        gen.reset()
        gen.seed = int(seed)
        gen.rng = np.random.default_rng(gen.seed)
        safety = OutputSafety(self.sample_rate, self.channels, ceiling_db=self.opts.ceiling_db)
        safety.set_gain_db(self.gain_db)
        total = int(round(seconds * self.sample_rate))
        out = np.empty((self.channels, total), np.float32)
        done = 0
        while done < total:
            pcm = gen.next_block()
            if not np.isfinite(pcm).all():  # as engine.stream does: silence, and a fresh stream
                gen.reset()
                pcm = np.zeros_like(pcm)
            n = min(pcm.shape[1], total - done)
            out[:, done: done + n] = safety.process(np.ascontiguousarray(pcm[:, :n]))
            done += n
        # the file sink's stop: the last 10 ms fade out (engine.audio.FileSink.stop)
        hold = max(1, int(self.sample_rate * STOP_FADE_SECONDS))
        n = min(hold, total)
        if n:
            out[:, total - n:] *= _raised_cosine(hold, rising=False)[-n:, 0]
        return out


@functools.lru_cache(maxsize=2)
def _renderer(pack_dir: str) -> ClipRenderer:
    return ClipRenderer(pack_dir)


def generate_clip(pack_dir: str | os.PathLike[str], prompt: str, seconds: float, seed: int) -> np.ndarray:
    """``[C, N]`` float32 from the pack at ``pack_dir`` (its sessions are kept open for the next call)."""
    return _renderer(str(Path(pack_dir).resolve())).clip(prompt, seconds, seed)


# --------------------------------------------------------------------------- evaluation


def save_confusion_png(confusion: np.ndarray, prompts: list[str], path: str | os.PathLike[str],
                       title: str = "") -> Path:
    """Draw ``confusion [K, K]`` (rows: asked prompt, columns: predicted) with counts in the cells into a PNG,
    atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    K = len(prompts)
    labels = [f"{i:2d} {p[:64] + ('…' if len(p) > 64 else '')}" for i, p in enumerate(prompts)]
    fig = Figure(figsize=(12, 11), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cm = np.asarray(confusion, np.float64)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(K), [str(i) for i in range(K)], fontsize=7)
    ax.set_yticks(range(K), labels, fontsize=7)
    ax.set_xlabel("predicted prompt (index)", fontsize=9)
    ax.set_ylabel("asked prompt", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    for i in range(K):
        for j in range(K):
            if cm[i, j]:
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the asked prompt's clips")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, lambda fh: fh.write(buf.getvalue()))
    return path


def _reporter(enabled: bool) -> Callable[[str], None]:
    """``say(message)``: a line on stderr when ``enabled``, else a log record (visible with ``-v``)."""
    if not enabled:
        return lambda m: log.info("eval: %s", m)
    from rich.console import Console

    console = Console(stderr=True)
    return lambda m: console.print(f"eval: {m}", highlight=False)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A transient rich progress bar on stderr; yields ``advance(description)``."""
    if not enabled:
        yield lambda _d: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("eval", total=total)
        yield lambda d: bar.update(task, advance=1, description=d[:40])


def evaluate(
    pack_dir: str | os.PathLike[str],
    *,
    clips_per_prompt: int = 2,
    seconds: float = 10.0,
    seed: int = 0,
    out_dir: str | os.PathLike[str] = "out/eval",
    codec: Reconstructor | None = None,
    progress: bool = True,
    classifier: SoundClassifier | str | os.PathLike[str] | None = None,
    preset: str | None = "default",
) -> dict[str, Any]:
    """Generate ``clips_per_prompt`` clips of ``seconds`` for every prompt the pack knows and classify them.

    The clips are rendered with the sampling settings of ``preset`` (a name or path, as ``cicada render
    --preset`` takes; None: the parameter registry's defaults); the result says which under ``sampling``.

    Clip ``j`` of every prompt uses seed ``seed + j``. ``classifier``: a fitted :class:`SoundClassifier`, a
    path to a saved one, or None for ``out_dir/classifier.npz`` (refitted with ``DEFAULT_FIT`` when missing
    or stale). ``codec``: a reconstructor for :func:`codec_metrics` (its ``latency_samples`` attribute, if
    any, is honoured), run on held-out corpus clips at the pack's sample rate.

    Returns a JSON-ready dict: ``text_match_mean`` / ``text_match_min`` (mean / min over prompts of the
    per-prompt accuracy, 0..1), ``per_prompt`` (prompt -> accuracy), ``text_match_prob_mean`` (mean
    probability the classifier gives the asked prompt), ``confusion`` (``[K, K]`` counts, rows asked, columns
    predicted, in ``prompts`` order), ``prompts``, ``classifier_heldout_accuracy``, ``si_snr_db`` /
    ``mel_distance`` / ``codec`` (None without ``codec``), ``confusion_png``, ``clips_per_prompt``,
    ``seconds``, ``seed``, ``pack``, ``preset``, ``sampling``, ``seconds_taken``; ``skipped_prompts`` lists pack prompts the classifier
    does not know (not generated).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    say = _reporter(progress)
    if isinstance(classifier, SoundClassifier):
        clf = classifier
    elif classifier is not None:
        clf = SoundClassifier.load(classifier)
    else:
        say("loading or fitting the sound classifier")
        clf = load_or_fit(out / "classifier.npz", progress=say)
    renderer = ClipRenderer(pack_dir, preset=preset)
    pack = renderer.pack
    asked = list(pack.prompts) or list(clf.prompts)
    known = {p: i for i, p in enumerate(clf.prompts)}
    skipped = [p for p in asked if p not in known]
    if skipped:
        log.warning("%d of the pack's prompts are not in the corpus; not evaluated: %s", len(skipped), skipped)
    prompts = [p for p in asked if p in known]
    if not prompts:
        raise ValueError(f"{pack.path}: none of the pack's prompts is one the classifier knows")
    K = len(clf.prompts)
    confusion = np.zeros((K, K), np.int64)
    prob_asked: dict[str, list[float]] = {p: [] for p in prompts}
    with _progress_bar(progress, len(prompts) * clips_per_prompt) as advance:
        for p in prompts:
            for j in range(clips_per_prompt):
                advance(p)
                clip = renderer.clip(p, seconds, seed + j)
                proba = clf.predict_proba(clip, renderer.sample_rate)
                confusion[known[p], int(np.argmax(proba))] += 1
                prob_asked[p].append(float(proba[known[p]]))
    per_prompt = {p: float(confusion[known[p], known[p]] / clips_per_prompt) for p in prompts}
    acc = np.array(list(per_prompt.values()))
    png = save_confusion_png(confusion, clf.prompts, out / "confusion.png",
                             title=f"{pack.name}: {clips_per_prompt} x {seconds:g} s per prompt, "
                                   f"text match {acc.mean():.0%} (min {acc.min():.0%})")

    codec_result = None
    if codec is not None:
        say("codec metrics")
        codec_result = codec_metrics(codec, latency_samples=int(getattr(codec, "latency_samples", 0)),
                                     sample_rate=renderer.sample_rate, clips_per_prompt=2, seconds=6.0,
                                     classifier=clf)
        # Does the LM make each prompt's family, as far as the codec can render it? Compare the labels
        # of its clips with the labels of the codec's own reconstructions of that family.
        agree = []
        for p in prompts:
            labs = codec_result["heard_as"].get(p, [])
            if labs:
                usual = max(set(labs), key=labs.count)
                agree.append(confusion[known[p], usual] / clips_per_prompt)
        codec_result["lm_agreement"] = float(np.mean(agree)) if agree else None
    return {
        "pack": str(pack.path),
        "text_match_mean": float(acc.mean()),
        "text_match_min": float(acc.min()),
        "text_match_prob_mean": float(np.mean([v for vs in prob_asked.values() for v in vs])),
        "per_prompt": per_prompt,
        "prompts": list(clf.prompts),
        "confusion": confusion.tolist(),
        "skipped_prompts": skipped,
        "classifier_heldout_accuracy": clf.heldout_accuracy,
        "si_snr_db": None if codec_result is None else codec_result["si_snr_db"],
        "mel_distance": None if codec_result is None else codec_result["mel_distance"],
        "codec_recognised": None if codec_result is None else codec_result["recognised"],
        "lm_agrees_with_codec": None if codec_result is None else codec_result["lm_agreement"],
        "codec": codec_result,
        "confusion_png": str(png),
        "clips_per_prompt": int(clips_per_prompt),
        "seconds": float(seconds),
        "seed": int(seed),
        "preset": preset,
        "sampling": dataclasses.asdict(renderer.base_params.sampling),
        "seconds_taken": time.perf_counter() - t0,
    }
