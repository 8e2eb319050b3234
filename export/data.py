"""Procedural corpus for the 22 food-sound prompts (export/prompts.txt).

The codec and the language model are trained on this corpus, and a small
classifier must tell the 22 families apart from summary features (log-mel
statistics, modulation, stereo movement), also after a lossy codec. So every
prompt gets a family of its own, distinct in band, event rate, stereo
behaviour and pitch behaviour, and built from what its words say:

    ======================  ===================================================
    prompt word             sound ingredient
    ======================  ===================================================
    deep                    low frequencies dominate (< 300 Hz)
    heavy low rumbling      low-passed noise below ~100 Hz
    rapid                   10-40 events per second
    glitchy                 short clicks, bit-crushed (quantised, held) bursts
    buzzing                 sawtooth / pulse harmonics
    sizzling                high-passed crackly noise
    cymbals                 metallic inharmonic square clusters, high-passed
    alarm like              two-tone siren modulating narrow-band soft noise
    crickets                ~4.5 kHz tone pulses grouped in chirps
    glassy insect swarm     many detuned high partials, beating, flickering
    sixth interval          two tones a major sixth apart (ratio 5:3)
    regular low impulse     periodic low thumps under a hum
    pitch and freq. mod.    vibrato plus FM
    ascending/descending    slow glides up and down
    long pitch envelope     pitch sweeps over several seconds
    moving panorama         stereo position moving (slowly where it says so)
    spatial                 decorrelated channels, delay-tap width
    gloomy                  dark, low-passed minor pad
    squishy                 resonant low-pass swept like a wah
    subtle / softly / soft  quieter level
    digital                 stepped pitch, square wave, quantised
    sci-fi                  synthetic FM / ring-mod colours
    hollow                  odd harmonics, band-passed
    ======================  ===================================================

Each draw randomises its parameters (pitch within the family's range, rates,
depths, pan speed, level) from ``np.random.SeedSequence([seed, index, n])``;
``describe(index)`` names a family's ingredients. Only numpy and numba.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from numba import njit

SAMPLE_RATE: int = 32000
CHANNELS: int = 2
TRAIN_SEED: int = 0
HELDOUT_SEED: int = 1

MIN_SAMPLE_RATE = 8000
MAX_PEAK = 0.9
FADE_IN_S = 0.010
TWO_PI = 2.0 * math.pi
_CONTROL = 16  # samples per control-rate step


# ---------------------------------------------------------------- numba kernels


@njit(cache=True)
def _onepole_lp(x: np.ndarray, a: float) -> np.ndarray:
    """One-pole low-pass, y += a * (x - y)."""
    y = np.empty_like(x)
    s = 0.0
    for i in range(x.shape[0]):
        s += a * (x[i] - s)
        y[i] = s
    return y


@njit(cache=True)
def _svf(x: np.ndarray, g: np.ndarray, k: float, mode: int) -> np.ndarray:
    """Trapezoidal state-variable filter, g = tan(pi fc / sr) per sample, k = 1/Q.

    mode 0 low-pass, 1 band-pass, 2 high-pass.
    """
    y = np.empty_like(x)
    ic1 = 0.0
    ic2 = 0.0
    for i in range(x.shape[0]):
        gi = g[i]
        a1 = 1.0 / (1.0 + gi * (gi + k))
        a2 = gi * a1
        a3 = gi * a2
        v3 = x[i] - ic2
        v1 = a1 * ic1 + a2 * v3
        v2 = ic2 + a2 * ic1 + a3 * v3
        ic1 = 2.0 * v1 - ic1
        ic2 = 2.0 * v2 - ic2
        if mode == 0:
            y[i] = v2
        elif mode == 1:
            y[i] = v1
        else:
            y[i] = x[i] - k * v1 - v2
    return y


@njit(cache=True)
def _blep(p: float, dt: float) -> float:
    if p < dt:
        p /= dt
        return p + p - p * p - 1.0
    if p > 1.0 - dt:
        p = (p - 1.0) / dt
        return p * p + p + p + 1.0
    return 0.0


@njit(cache=True)
def _blep_osc(freq: np.ndarray, sr: float, width: float, phase0: float, square: bool) -> np.ndarray:
    """Band-limited (PolyBLEP) sawtooth, or pulse of duty `width`, at instantaneous `freq`."""
    n = freq.shape[0]
    y = np.empty(n)
    p = phase0
    for i in range(n):
        dt = freq[i] / sr
        if square:
            v = 1.0 if p < width else -1.0
            v += _blep(p, dt)
            q = p - width
            if q < 0.0:
                q += 1.0
            v -= _blep(q, dt)
        else:
            v = 2.0 * p - 1.0 - _blep(p, dt)
        y[i] = v
        p += dt
        if p >= 1.0:
            p -= 1.0
    return y


@njit(cache=True)
def _partial_bank(freqs: np.ndarray, phases: np.ndarray, gain_l: np.ndarray, gain_r: np.ndarray,
                  gates: np.ndarray, block: int, n: int, sr: float) -> np.ndarray:
    """Sum of fixed-frequency sinusoids, each panned and gated by a block-wise
    (linearly interpolated) random amplitude `gates[k, j]`; returns [2, n]."""
    out = np.zeros((2, n))
    for k in range(freqs.shape[0]):
        w = 2.0 * math.pi * freqs[k] / sr
        cw = math.cos(w)
        sw = math.sin(w)
        re = math.cos(phases[k])
        im = math.sin(phases[k])
        gl = gain_l[k]
        gr = gain_r[k]
        for i in range(n):
            j = i // block
            frac = (i - j * block) / block
            a = gates[k, j] + (gates[k, j + 1] - gates[k, j]) * frac
            v = a * im
            out[0, i] += gl * v
            out[1, i] += gr * v
            re, im = re * cw - im * sw, re * sw + im * cw
            if (i & 1023) == 0:
                norm = 1.0 / math.sqrt(re * re + im * im)
                re *= norm
                im *= norm
    return out


# ---------------------------------------------------------------- building blocks


@dataclass
class _Ctx:
    """One draw: its length, rate, time axis and random generator."""

    n: int
    sr: int
    rng: np.random.Generator
    t: np.ndarray = field(init=False)  # seconds, float64
    seconds: float = field(init=False)

    def __post_init__(self) -> None:
        self.t = np.arange(self.n) / self.sr
        self.seconds = self.n / self.sr

    def hz(self, f: np.ndarray | float) -> np.ndarray | float:
        """Clamp frequencies to (1 Hz, 0.45 * sample rate)."""
        return np.clip(f, 1.0, 0.45 * self.sr)

    def high(self, f: float) -> float:
        """A high cutoff, kept below 0.3 * sample rate so low rates still have a band above it."""
        return min(f, 0.3 * self.sr)

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def noise(self) -> np.ndarray:
        """White noise of unit variance (uniform: cheap; it is filtered anyway)."""
        return (self.rng.random(self.n) - 0.5) * math.sqrt(12.0)


def _sin(rad: np.ndarray | float) -> np.ndarray:
    """sin() of (large) phases, fast: wrap to one turn in float64, evaluate in float32."""
    turns = np.asarray(rad, dtype=np.float64) * (1.0 / TWO_PI)
    turns -= np.floor(turns)
    return np.sin((turns * TWO_PI).astype(np.float32))


def _exp_neg(x: np.ndarray) -> np.ndarray:
    """exp(-x) for x >= 0, in float32, cut at exp(-30) (no slow underflow)."""
    return np.exp(-np.minimum(x, 30.0).astype(np.float32))


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _phase(c: _Ctx, freq: np.ndarray | float, phase0: float = 0.0) -> np.ndarray:
    """Phase in radians of an oscillator at instantaneous frequency `freq` (clamped)."""
    f = c.hz(freq)
    if np.ndim(f) == 0:
        return TWO_PI * float(f) * c.t + phase0
    return (TWO_PI / c.sr) * np.cumsum(f) + phase0


def _saw(c: _Ctx, freq: np.ndarray | float) -> np.ndarray:
    f = np.broadcast_to(np.asarray(c.hz(freq), dtype=np.float64), (c.n,))
    return _blep_osc(np.ascontiguousarray(f), float(c.sr), 0.5, c.u(0.0, 1.0), False)


def _pulse(c: _Ctx, freq: np.ndarray | float, width: float = 0.5) -> np.ndarray:
    f = np.broadcast_to(np.asarray(c.hz(freq), dtype=np.float64), (c.n,))
    return _blep_osc(np.ascontiguousarray(f), float(c.sr), width, c.u(0.0, 1.0), True)


def _lfo(c: _Ctx, rate: float, phase: float | None = None) -> np.ndarray:
    """Sine LFO in [-1, 1] with a random phase unless given."""
    return _sin(TWO_PI * rate * c.t + (c.u(0.0, TWO_PI) if phase is None else phase))


def _tri(c: _Ctx, rate: float) -> np.ndarray:
    """Triangle LFO in [-1, 1], random phase: constant speed, so it always moves."""
    return 2.0 * np.abs(2.0 * _frac(c.t * rate + c.u(0.0, 1.0)) - 1.0) - 1.0


def _wander(c: _Ctx, rate: float) -> np.ndarray:
    """Smooth random curve in [-1, 1]: new random target every 1/rate s, smoothstep between."""
    vals = c.rng.uniform(-1.0, 1.0, int(c.seconds * rate) + 3)
    tc = c.t[::_CONTROL]  # evaluated at control rate, linearly interpolated
    pos = tc * rate
    i = pos.astype(np.int64)
    f = pos - i
    curve = vals[i] + (vals[i + 1] - vals[i]) * (f * f * (3.0 - 2.0 * f))
    return np.interp(c.t, tc, curve)


def _coef(c: _Ctx, fc: float) -> float:
    return 1.0 - math.exp(-TWO_PI * float(c.hz(fc)) / c.sr)


def _lowpass(c: _Ctx, x: np.ndarray, fc: float, order: int = 1) -> np.ndarray:
    a = _coef(c, fc)
    for _ in range(order):
        x = _onepole_lp(x, a)
    return x


def _highpass(c: _Ctx, x: np.ndarray, fc: float, order: int = 1) -> np.ndarray:
    a = _coef(c, fc)
    for _ in range(order):
        x = x - _onepole_lp(x, a)
    return x


def _filter(c: _Ctx, x: np.ndarray, fc: np.ndarray | float, q: float, mode: int) -> np.ndarray:
    """Resonant SVF (mode 0 LP, 1 BP, 2 HP) with a static or per-sample cutoff."""
    if np.ndim(fc) == 0:
        g = np.full(c.n, math.tan(math.pi * float(c.hz(fc)) / c.sr))
    else:  # tan at control rate, held (a 0.5 ms staircase is inaudible in a sweep)
        g = np.repeat(np.tan(np.pi * c.hz(fc[::_CONTROL]) / c.sr), _CONTROL)[: c.n]
    return _svf(x, g, 1.0 / q, mode)


def _unit(x: np.ndarray) -> np.ndarray:
    """Scale to unit RMS (mixing by RMS keeps families' balances stable across draws)."""
    return x / (math.sqrt(float(np.mean(x * x))) + 1e-12)


def _pan(x: np.ndarray, pos: np.ndarray | float) -> np.ndarray:
    """Constant-power pan of a mono signal, pos in [-1 (left), 1 (right)] -> [2, n]."""
    p = np.clip(pos, -1.0, 1.0)
    return np.stack([x * np.sqrt(0.5 * (1.0 - p)), x * np.sqrt(0.5 * (1.0 + p))])


def _balance(st: np.ndarray, pos: np.ndarray | float) -> np.ndarray:
    """Move a stereo image by a constant-power balance."""
    p = np.clip(pos, -1.0, 1.0)
    return np.stack([st[0] * np.sqrt(1.0 - p), st[1] * np.sqrt(1.0 + p)])


def _spread(c: _Ctx, x: np.ndarray, taps: int = 4, max_ms: float = 45.0, gain: float = 0.6) -> np.ndarray:
    """Mono -> decorrelated stereo: different sparse delay taps per channel (a cheap room)."""
    out = np.stack([x.copy(), x.copy()])
    for ch in range(2):
        delays = np.sort(c.rng.uniform(3.0, max_ms, taps)) * c.sr / 1000.0
        for k, d in enumerate(delays.astype(np.int64)):
            if 0 < d < c.n:
                sign = 1.0 if c.rng.random() < 0.5 else -1.0
                out[ch, d:] += sign * gain * (0.75**k) * x[:-d]
    return out


def _crush(x: np.ndarray, bits: int, hold: int) -> np.ndarray:
    """Bit-crusher: sample-and-hold `hold` samples, quantise to `bits` (of the peak)."""
    if hold > 1:
        x = np.repeat(x[::hold], hold)[: x.shape[0]]
    peak = float(np.max(np.abs(x))) + 1e-12
    q = float(2 ** (bits - 1))
    return np.round(x / peak * q) / q * peak


def _onsets(c: _Ctx, rate: float, regularity: float) -> np.ndarray:
    """Event times (s): gamma intervals (regularity 1 = Poisson, large = periodic).

    The first onset lies at or before 0, so every sample belongs to an event.
    """
    mean = 1.0 / rate
    times = [-c.u(0.0, mean)]
    while times[-1] < c.seconds:
        iv = c.rng.gamma(regularity, mean / regularity, 64)
        times.extend((times[-1] + np.cumsum(np.maximum(iv, 0.2 * mean))).tolist())
    out = np.asarray(times)
    return out[out < c.seconds]


def _events(c: _Ctx, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every sample: the index of the latest event, and the time since it (s)."""
    pos = np.round(times * c.sr).astype(np.int64)
    before = int(np.count_nonzero(pos <= 0))
    marks = np.bincount(pos[pos > 0], minlength=c.n)[: c.n]
    ev = np.cumsum(marks) + (before - 1)
    if before:
        return ev, np.maximum(c.t - times[ev], 0.0)
    # no event yet at the start: those samples are "long after" a silent event 0
    tau = np.where(ev >= 0, c.t - times[np.maximum(ev, 0)], 1e3)
    return np.maximum(ev, 0), np.maximum(tau, 0.0)


def _decay(tau: np.ndarray, decay: np.ndarray | float, attack: float = 0.002) -> np.ndarray:
    """Percussive envelope: linear attack, exponential decay."""
    return np.minimum(tau / attack, 1.0) * _exp_neg(tau / decay)


# ---------------------------------------------------------------- the 22 families
# Each returns an unnormalised [2, n] float64 array.


def _glitch_panorama(c: _Ctx) -> np.ndarray:
    times = _onsets(c, c.u(6.0, 11.0), 2.0)
    ev, tau = _events(c, times)
    k = len(times)
    freq = c.rng.uniform(1200.0, 3500.0, k)
    tone = _sin(TWO_PI * c.hz(freq[ev]) * tau) * (c.rng.random(k) < 0.6)[ev]
    src = tone + _highpass(c, c.noise(), 2000.0) * 0.7
    env = _decay(tau, c.rng.uniform(0.006, 0.025, k)[ev], 0.0005) * c.rng.uniform(0.4, 1.0, k)[ev]
    hold = int(c.rng.integers(2, 6))
    bed = _crush(_lowpass(c, c.noise(), 3000.0), 8, hold)
    mono = _crush(src * env, int(c.rng.integers(3, 6)), hold) + c.u(0.06, 0.1) * bed
    return _pan(mono, c.u(0.65, 0.8) * _lfo(c, c.u(0.25, 0.6)))


def _hum_pitch_fm(c: _Ctx) -> np.ndarray:
    f0 = c.u(90.0, 160.0)
    vib = c.u(0.015, 0.04) * _lfo(c, c.u(4.5, 7.0)) + 0.04 * _wander(c, 0.5)
    ph = _phase(c, f0 * (1.0 + vib))
    ratio = c.u(0.995, 1.005)
    index = c.u(1.2, 2.0) * (0.6 + 0.4 * _lfo(c, c.u(0.15, 0.4)))
    mono = _sin(ph + index * _sin(ratio * ph)) + 0.25 * _sin(2.0 * ph)
    return _pan(mono, c.u(-0.15, 0.15))


def _deep_spatial_rumbly(c: _Ctx) -> np.ndarray:
    fc = c.u(50.0, 90.0)
    rumble = np.stack([_unit(_highpass(c, _lowpass(c, c.noise(), fc, 3), 20.0)) for _ in range(2)])
    sub = _sin(_phase(c, c.u(35.0, 55.0), c.u(0.0, TWO_PI)))
    return rumble + c.u(0.3, 0.6) * math.sqrt(2.0) * sub


def _deep_spatial_gloomy(c: _Ctx) -> np.ndarray:
    root = c.u(55.0, 80.0)
    voices = [(1.0, 1.0), (1.2, 0.7), (1.5, 0.6), (0.5, 0.8)]  # minor third, fifth, octave below
    cutoff = c.u(300.0, 420.0)
    swell = 1.0 - 0.35 * (0.5 + 0.5 * _lfo(c, c.u(0.07, 0.15)))
    chans = []
    for _ in range(2):
        pad = sum(a * _saw(c, root * r * c.u(0.995, 1.005)) for r, a in voices)
        chans.append(_unit(_filter(c, pad, cutoff, 0.8, 0)) * swell)
    return np.stack(chans)


def _hollow_glide(c: _Ctx) -> np.ndarray:
    base = c.u(160.0, 300.0)
    f = base * 2.0 ** (c.u(0.4, 0.8) * _lfo(c, c.u(0.2, 0.45)))
    sq = _pulse(c, f, 0.5)
    hollow = _unit(_filter(c, sq, f * c.u(2.7, 3.3), 2.5, 1))
    mono = hollow + 0.25 * _sin(_phase(c, f))
    return _pan(mono, c.u(-0.1, 0.1))


def _hum_low_impulse(c: _Ctx) -> np.ndarray:
    f0 = c.u(95.0, 140.0)
    ph = _phase(c, f0)
    hum = _sin(ph) + 0.35 * _sin(2.0 * ph) + 0.15 * _sin(3.0 * ph)
    times = _onsets(c, 1.0 / c.u(0.3, 0.6), 400.0)
    ev, tau = _events(c, times)
    f_hi, f_lo, k = c.u(110.0, 160.0), c.u(40.0, 55.0), 0.03
    thump_ph = TWO_PI * (f_lo * tau + (f_hi - f_lo) * k * (1.0 - _exp_neg(tau / k)))
    thump = _sin(thump_ph) * _decay(tau, c.u(0.08, 0.16), 0.002)
    mono = 0.35 * _unit(hum) * c.u(0.8, 1.2) + 2.0 * thump
    return _pan(mono, 0.0)


def _rapid_glitch_pitch_env(c: _Ctx) -> np.ndarray:
    f_lo = c.u(400.0, 700.0)
    f_hi = f_lo * c.u(4.0, 6.0)
    contour = f_lo * (f_hi / f_lo) ** (0.5 + 0.5 * _tri(c, 1.0 / c.u(4.0, 8.0)))
    times = _onsets(c, c.u(14.0, 28.0), 8.0)
    ev, tau = _events(c, times)
    k = len(times)
    jump = c.rng.choice([1.0, 1.0, 1.0, 2.0, 0.5], k)
    f_ev = c.hz(contour[np.clip(np.round(times * c.sr).astype(np.int64), 0, c.n - 1)] * jump)
    blips = _sin(TWO_PI * f_ev[ev] * tau) * _decay(tau, c.rng.uniform(0.008, 0.02, k)[ev], 0.0005)
    hold = int(c.rng.integers(1, 4))
    bed = _crush(_sin(_phase(c, contour)), 6, hold)  # the sweep, audible between blips
    mono = _crush(blips, int(c.rng.integers(3, 5)), hold) + c.u(0.1, 0.15) * bed
    return _pan(mono, c.u(-0.2, 0.2))


def _rapid_slow_pan(c: _Ctx) -> np.ndarray:
    times = _onsets(c, c.u(10.0, 18.0), 3.0)
    k = len(times)
    base = c.u(500.0, 750.0)
    scale = np.array([0, 2, 4, 7, 9, 12, 14, 16, 19, 21])
    freq = c.hz(base * 2.0 ** (c.rng.choice(scale, k) / 12.0))
    decay = c.rng.uniform(0.04, 0.08, k)
    amp = c.rng.uniform(0.6, 1.0, k)
    plucks = c.u(0.04, 0.07) * _sin(_phase(c, base))  # a faint drone under the plucks
    for voice in (0, 1):  # alternate events between two voices, so each rings into the next
        sel = slice(voice, None, 2)
        if not len(times[sel]):
            continue
        ev, tau = _events(c, times[sel])
        ph = TWO_PI * freq[sel][ev] * tau
        plucks = plucks + (_sin(ph) + 0.3 * _sin(2.0 * ph)) * _decay(tau, decay[sel][ev]) * amp[sel][ev]
    return _pan(plucks, c.u(0.85, 0.95) * _tri(c, c.u(0.08, 0.18)))


def _rapid_glitch_buzz(c: _Ctx) -> np.ndarray:
    times = _onsets(c, c.u(18.0, 35.0), 4.0)
    ev, tau = _events(c, times)
    k = len(times)
    mult = c.rng.choice([1.0, 1.0, 1.5, 2.0, 0.5], k)
    saw = _saw(c, c.u(80.0, 180.0) * mult[ev])
    length = c.rng.uniform(0.4, 0.9, k) * np.diff(np.append(times, c.seconds + 1.0))
    gate = _lowpass(c, (tau < length[ev]).astype(np.float64), 400.0)
    mono = _crush(saw * gate, int(c.rng.integers(4, 7)), int(c.rng.integers(1, 4))) + c.u(0.06, 0.1) * saw
    return _pan(mono, c.u(-0.15, 0.15))


def _rapid_sizzle(c: _Ctx) -> np.ndarray:
    fc = c.high(c.u(3000.0, 5000.0))
    bed = _unit(_highpass(c, c.noise(), fc, 2))
    times = _onsets(c, c.u(25.0, 45.0), 1.0)
    ev, tau = _events(c, times)
    k = len(times)
    env = _decay(tau, c.rng.uniform(0.003, 0.012, k)[ev], 0.0003) * c.rng.exponential(1.0, k)[ev]
    crackle = _unit(_highpass(c, c.noise(), fc, 2)) * env
    pos = c.rng.uniform(-0.6, 0.6, k)[ev]
    return _pan(crackle, pos) * 2.0 + 0.25 * np.stack([bed, np.roll(bed, 37)])


_CYMBAL_RATIOS = np.array([1.0, 1.342, 1.2312, 1.6532, 1.9523, 2.1523])


def _sizzling_cymbals(c: _Ctx) -> np.ndarray:
    base = c.u(300.0, 500.0) * 2.0 ** (c.u(0.3, 0.5) * _wander(c, c.u(0.3, 0.7)))
    metal = sum(_pulse(c, base * r, 0.5) for r in _CYMBAL_RATIOS)
    fc = c.high(c.u(3000.0, 4500.0))
    metal = _unit(_filter(c, metal, fc, 1.2, 2))
    sizzle = _unit(_highpass(c, c.noise(), c.high(fc * 1.3), 2))
    swell = 0.55 + 0.45 * _lfo(c, c.u(0.3, 0.6))
    mono = (metal + c.u(0.4, 0.7) * sizzle) * swell
    return _spread(c, mono, taps=3, max_ms=25.0, gain=0.5)


def _soft_noise_alarm(c: _Ctx) -> np.ndarray:
    f1 = c.u(600.0, 1000.0)
    f2 = f1 * c.u(1.2, 1.4)
    switch = _lowpass(c, (_lfo(c, c.u(1.0, 2.5)) > 0).astype(np.float64), 30.0)
    f = f1 * (f2 / f1) ** switch
    narrow = _unit(_lowpass(c, c.noise(), c.u(40.0, 100.0), 2))
    siren = narrow * _sin(_phase(c, f)) + 0.3 * _sin(_phase(c, f, 0.3))
    bed = np.stack([_unit(_lowpass(c, c.noise(), c.u(1500.0, 3000.0))) for _ in range(2)])
    return _pan(_unit(siren), 0.0) + 0.45 * bed


def _crickets(c: _Ctx) -> np.ndarray:
    out = np.zeros((2, c.n))
    base = min(c.u(4000.0, 5000.0), 0.4 * c.sr)
    for _ in range(int(c.rng.integers(2, 4))):
        times = _onsets(c, c.u(1.5, 3.5), 10.0)
        _, tau = _events(c, times)
        syll = c.u(30.0, 55.0)
        active = tau < int(c.rng.integers(3, 7)) / syll
        pulses = _sin(np.pi * _frac(tau * syll)) ** 2 * active
        tone = _sin(_phase(c, base * c.u(0.97, 1.03), c.u(0.0, TWO_PI)))
        out += _pan(tone * pulses * c.u(0.5, 1.0), c.u(-0.7, 0.7))
    out = np.stack([_crush(ch, 7, 1) for ch in out])
    # a distant, continuous trill (the buzz) and a faint sizzle keep it going between chirps
    trill = _sin(_phase(c, base * c.u(1.04, 1.08))) * _sin(np.pi * c.u(40.0, 60.0) * c.t) ** 2
    sizzle = _highpass(c, c.noise(), c.high(5000.0), 2)
    return out + 0.12 * _spread(c, trill, taps=2) + 0.05 * np.stack([sizzle, np.roll(sizzle, 53)])


def _digital_stepped(c: _Ctx) -> np.ndarray:
    base = c.u(100.0, 180.0)
    step_len = c.u(0.12, 0.3)
    steps = int(c.seconds / step_len) + 2
    step = (c.t / step_len).astype(np.int64)
    semis = c.rng.choice([0, 3, 5, 7, 10, 12], steps)
    accent = c.rng.choice([1.0, 0.6], steps)  # sequencer-like level steps
    sq = _pulse(c, base * 2.0 ** (semis[step] / 12.0), 0.5) * accent[step]
    mono = _crush(_lowpass(c, sq, 5000.0), int(c.rng.integers(4, 7)), int(c.rng.integers(1, 3)))
    return _pan(mono, c.u(-0.1, 0.1))


def _glassy_swarm(c: _Ctx) -> np.ndarray:
    k = int(c.rng.integers(14, 23))
    centre = c.u(1700.0, 2700.0)
    freqs = centre * 2.0 ** c.rng.uniform(-0.25, 0.25, k)
    glassy = c.rng.random(k) < 0.2
    freqs[glassy] *= c.rng.uniform(1.5, 1.9, int(glassy.sum()))
    freqs = np.asarray(c.hz(freqs), dtype=np.float64)
    amp = c.rng.uniform(0.3, 1.0, k)
    pos = c.rng.uniform(-0.9, 0.9, k)
    block = max(1, int(c.sr * c.u(0.015, 0.04)))
    nblocks = c.n // block + 2
    gates = np.where(c.rng.random((k, nblocks)) < c.u(0.5, 0.7), c.rng.uniform(0.3, 1.0, (k, nblocks)), 0.0)
    return _partial_bank(freqs, c.rng.uniform(0.0, TWO_PI, k), amp * np.sqrt(0.5 * (1 - pos)),
                         amp * np.sqrt(0.5 * (1 + pos)), gates, block, c.n, float(c.sr))


def _scifi_slight_sizzle(c: _Ctx) -> np.ndarray:
    swoop = 1.0 - _frac(c.t * c.u(0.8, 1.6) + c.u(0.0, 1.0))  # repeating downward "pew" glides
    f = c.u(600.0, 1000.0) * 2.0 ** (c.u(0.3, 0.5) * _lowpass(c, swoop, 40.0) + 0.1 * _wander(c, 0.5))
    ph = _phase(c, f)
    ratio = float(c.rng.choice([1.41, 2.41])) * c.u(0.99, 1.01)
    index = 0.8 + 1.5 * (0.5 + 0.5 * _lfo(c, c.u(0.3, 0.8)))
    fm = _sin(ph + index * _sin(ratio * ph))
    times = _onsets(c, c.u(10.0, 20.0), 1.0)
    ev, tau = _events(c, times)
    crackle = _unit(_highpass(c, c.noise(), c.high(2500.0), 2)) * _decay(tau, c.u(0.003, 0.008), 0.0003)
    return _pan(fm, c.u(-0.3, 0.3)) + c.u(0.2, 0.35) * _pan(crackle, 0.0)


def _scifi_squishy(c: _Ctx) -> np.ndarray:
    f0 = c.u(65.0, 120.0)
    a, b = _saw(c, f0 * 0.995), _saw(c, f0 * 1.005)
    f_min, f_max = c.u(200.0, 350.0), c.u(1500.0, 2500.0)
    cutoff = f_min * (f_max / f_min) ** (0.5 + 0.5 * _lfo(c, c.u(1.2, 3.5)))
    q = c.u(5.0, 9.0)
    return np.stack([_filter(c, a + 0.6 * b, cutoff, q, 0), _filter(c, b + 0.6 * a, cutoff, q, 0)])


def _spatial_glitch_mod_pan(c: _Ctx) -> np.ndarray:
    f = c.u(250.0, 600.0) * (1.0 + 0.03 * _lfo(c, c.u(3.0, 8.0)))
    ring = _sin(_phase(c, f)) * _sin(_phase(c, c.u(60.0, 180.0)))
    step = 1.0 / c.u(6.0, 12.0)
    steps = int(c.seconds / step) + 2
    duty = c.u(0.4, 0.8)
    levels = np.where(c.rng.random(steps) < 0.75, 1.0, 0.25)
    pos = c.t / step
    raw = np.where((pos % 1.0) < duty, levels[pos.astype(np.int64)], 0.15)
    mono = _crush(ring * _lowpass(c, raw, 300.0), int(c.rng.integers(6, 9)), 1)
    return _balance(_spread(c, mono), c.u(0.6, 0.8) * _lfo(c, c.u(0.5, 1.2)))


def _spatial_deep_fm(c: _Ctx) -> np.ndarray:
    fc = c.u(45.0, 75.0) * (1.0 + 0.015 * _lfo(c, c.u(0.1, 0.3)))
    ratio = float(c.rng.choice([1.0, 1.5, 0.75, 1.33])) * c.u(0.99, 1.01)
    index = 0.5 + c.u(3.0, 6.0) * (0.5 + 0.5 * _lfo(c, c.u(0.2, 0.5)))
    chans = []
    for detune in (1.0, 1.0 + c.u(0.003, 0.008)):
        ph = _phase(c, fc * detune, c.u(0.0, TWO_PI))
        chans.append(_lowpass(c, _sin(ph + index * _sin(ratio * detune * ph)), 600.0))
    return np.stack(chans)


def _subtle_sizzle_panorama(c: _Ctx) -> np.ndarray:
    hiss = _lowpass(c, _highpass(c, c.noise(), c.high(c.u(2500.0, 4000.0)), 2), c.u(6000.0, 7000.0))
    hiss = _unit(hiss) * (0.6 + 0.4 * _wander(c, 6.0))
    times = _onsets(c, c.u(6.0, 12.0), 1.0)
    ev, tau = _events(c, times)
    crackle = _unit(_highpass(c, c.noise(), c.high(3000.0))) * _decay(tau, c.u(0.005, 0.015), 0.0005)
    mono = hiss + 0.8 * crackle * c.rng.uniform(0.3, 1.0, len(times))[ev]
    return _pan(mono, c.u(0.85, 0.95) * _tri(c, c.u(0.15, 0.35)))


def _sixth_interval(c: _Ctx) -> np.ndarray:
    f1 = c.u(260.0, 480.0)
    tones = []
    for f in (f1, f1 * 5.0 / 3.0):
        ph = _phase(c, f, c.u(0.0, TWO_PI))
        tones.append(_sin(ph) + 0.15 * _sin(2.0 * ph))
    trem = 1.0 - c.u(0.1, 0.2) * (0.5 + 0.5 * _lfo(c, c.u(3.0, 5.0)))
    mono = tones[0] + c.u(0.6, 0.9) * tones[1] * trem
    return _pan(mono, c.u(0.25, 0.4) * _lfo(c, c.u(0.1, 0.25)))


def _scifi_glitch_rumble(c: _Ctx) -> np.ndarray:
    rumble = _unit(_highpass(c, _lowpass(c, c.noise(), c.u(45.0, 80.0), 3), 20.0))
    f_lo = c.u(150.0, 300.0)
    f = f_lo * c.u(2.0, 3.0) ** (0.5 + 0.5 * _lfo(c, 1.0 / c.u(6.0, 12.0)))
    seg = _onsets(c, 1.0 / c.u(0.04, 0.15), 2.0)
    ev, _ = _events(c, seg)
    gate = _lowpass(c, (c.rng.random(len(seg)) < 0.65)[ev].astype(np.float64), 250.0)
    glitch = _crush(_pulse(c, f, 0.5) * gate, int(c.rng.integers(4, 6)), int(c.rng.integers(2, 5)))
    return _pan(rumble + c.u(0.35, 0.5) * _unit(glitch), 0.0)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Family:
    make: Callable[[_Ctx], np.ndarray]
    level: tuple[float, float]  # peak range
    text: str


_LOUD = (0.6, 0.88)
_FAMILIES: list[_Family] = [
    _Family(_glitch_panorama, _LOUD, "bit-crushed clicks and tone/noise bursts, 6-11/s, 1.2-3.5 kHz, over a crushed hiss, panned by a 0.25-0.6 Hz LFO"),
    _Family(_hum_pitch_fm, _LOUD, "90-160 Hz FM hum (ratio 1), 4.5-7 Hz vibrato, slowly breathing FM index, centred"),
    _Family(_deep_spatial_rumbly, _LOUD, "decorrelated L/R noise low-passed at 50-90 Hz plus a steady 35-55 Hz sub sine"),
    _Family(_deep_spatial_gloomy, _LOUD, "dark minor saw pad on a 55-80 Hz root, low-passed at 300-420 Hz, detuned per channel, slow swell"),
    _Family(_hollow_glide, _LOUD, "band-passed square (odd harmonics) at 160-300 Hz gliding up and down 0.4-0.8 oct every 2-5 s"),
    _Family(_hum_low_impulse, _LOUD, "steady 95-140 Hz harmonic hum under periodic pitch-dropping low thumps every 0.3-0.6 s"),
    _Family(_rapid_glitch_pitch_env, _LOUD, "14-28/s bit-crushed blips (and a faint crushed tone) following a 4-8 s triangle pitch sweep over 2-2.6 octaves from 400-700 Hz"),
    _Family(_rapid_slow_pan, _LOUD, "10-18/s pentatonic sine plucks (500-2500 Hz) over a faint drone, slow 0.08-0.18 Hz triangle pan"),
    _Family(_rapid_glitch_buzz, _LOUD, "80-180 Hz sawtooth buzz chopped 18-35/s with pitch jumps, bit-crushed, centred"),
    _Family(_rapid_sizzle, _LOUD, "Poisson 25-45/s crackles of noise high-passed at 3-5 kHz, scattered pans, thin hiss bed"),
    _Family(_sizzling_cymbals, _LOUD, "six inharmonic square partials high-passed at 3-4.5 kHz plus sizzle, wandering pitch, swells, wide"),
    _Family(_soft_noise_alarm, (0.3, 0.45), "soft wide noise bed with a two-tone (600-1400 Hz) siren of narrow-band noise switching 1-2.5/s"),
    _Family(_crickets, _LOUD, "2-3 crickets: 4-5 kHz tone pulses (30-55/s) in chirps of 3-6, 1.5-3.5 chirps/s, distant trill, faint sizzle"),
    _Family(_digital_stepped, _LOUD, "square wave at 100-360 Hz stepping through a minor-pentatonic octave every 0.12-0.3 s, accented, bit-crushed"),
    _Family(_glassy_swarm, (0.4, 0.6), "14-22 detuned sinusoids around 1.7-2.7 kHz (some x1.5-1.9) with beating and flickering gates, spread"),
    _Family(_scifi_slight_sizzle, _LOUD, "inharmonic FM tone at 600-1000 Hz swooping down 0.3-0.5 oct 0.8-1.6 times/s, breathing index, light 10-20/s high crackle"),
    _Family(_scifi_squishy, _LOUD, "detuned 65-120 Hz saws through a resonant low-pass swept 200 Hz-2.5 kHz at 1.2-3.5 Hz"),
    _Family(_spatial_glitch_mod_pan, _LOUD, "ring-modulated 250-600 Hz tone, stuttered 6-12/s, crushed, delay-tap width, 0.5-1.2 Hz balance"),
    _Family(_spatial_deep_fm, _LOUD, "45-75 Hz FM drone, index sweeping at 0.2-0.5 Hz, channels detuned for width, low-passed 600 Hz"),
    _Family(_subtle_sizzle_panorama, (0.12, 0.22), "quiet 2.5-7 kHz hiss with sparse crackles, panned by a 0.15-0.35 Hz triangle"),
    _Family(_sixth_interval, _LOUD, "two tones a major sixth apart (f, 5f/3, f 260-480 Hz), soft tremolo, slight slow pan"),
    _Family(_scifi_glitch_rumble, _LOUD, "heavy < 80 Hz noise rumble plus a stuttered, crushed square slowly sweeping 150-900 Hz"),
]


# ---------------------------------------------------------------- public API


def prompts() -> list[str]:
    """The 22 prompts in class order (index = class id)."""
    from export.architectures import known_prompts

    out = known_prompts()
    if len(out) != len(_FAMILIES):
        raise RuntimeError(f"export/prompts.txt has {len(out)} prompts, data.py synthesises {len(_FAMILIES)}")
    return out


def _check_index(index: int) -> None:
    if not isinstance(index, (int, np.integer)) or not 0 <= index < len(_FAMILIES):
        raise ValueError(f"index must be an integer in [0, {len(_FAMILIES)}), got {index!r}")


def synth(index: int, seconds: float, seed: int, n: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One stereo clip [2, round(seconds * sample_rate)] float32 of prompt `index`, draw `n`.

    Deterministic in (index, seed, n, seconds, sample_rate); peak normalised to a
    random level within the family's range (never above 0.9); 10 ms fade-in only.
    """
    _check_index(index)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be positive and finite, got {seconds!r}")
    if sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {MIN_SAMPLE_RATE}, got {sample_rate!r}")
    length = round(seconds * sample_rate)
    if length < 1:
        raise ValueError(f"seconds={seconds!r} is less than one sample at sample_rate={sample_rate}")
    family = _FAMILIES[index]
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(index), n]))
    level = float(rng.uniform(*family.level))
    ctx = _Ctx(length, int(sample_rate), rng)
    x = family.make(ctx)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    x -= x.mean(axis=1, keepdims=True)
    peak = float(np.max(np.abs(x)))
    x *= min(level, MAX_PEAK) / peak if peak > 0 else 0.0
    fade = min(length, max(1, round(FADE_IN_S * sample_rate)))
    x[:, :fade] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    return x.astype(np.float32)


def corpus(seed: int, clips_per_prompt: int, seconds: float,
           sample_rate: int = SAMPLE_RATE) -> Iterator[tuple[int, np.ndarray]]:
    """(index, clip) for n in range(clips_per_prompt) (outer) and every prompt index (inner)."""
    for n in range(clips_per_prompt):
        for index in range(len(_FAMILIES)):
            yield index, synth(index, seconds, seed, n, sample_rate)


def describe(index: int) -> str:
    """One line naming the family's ingredients."""
    _check_index(index)
    return _FAMILIES[index].text
