"""Output safety: the last stage every PCM block passes before it reaches a sink.

``OutputSafety.process(x [C, N] float32) -> y [C, N] float32``, any ``N >= 1``.
Per sample, in this order::

    x [C, N] float32
      -> non-finite guard   (block level: any NaN/Inf in x -> the block is replaced by
                             silence, crossfaded from the previous output; DSP state reset)
      -> DC blocker         (one-pole high-pass per channel, ``dc_block_hz``, unity gain at Nyquist)
      -> master gain        (linear ramp over ``gain_ramp_ms`` after ``set_gain_db``)
      -> lookahead limiter  (channel-linked brickwall: the gain reaches its target within the
                             lookahead, so no sample exceeds the ceiling; exponential release)
      -> hard clip at the ceiling (a guard against rounding only; the limiter does the work)
      -> panic envelope     (linear fade to exact zeros in ``panic_ms`` and back after ``resume``)
    y [C, N] float32,  |y| <= 10 ** (ceiling_db / 20), never NaN/Inf

Latency: the limiter delays the audio by ``latency_samples = round(lookahead_ms * sr / 1000)``
samples (32 at 32 kHz for the default 1 ms); the other stages add none. Processing is
sample-exact across block boundaries: a signal processed in chunks of any sizes gives
bitwise the same output as processing it in one block (the non-finite guard, which
acts on whole blocks, is the one exception).

Limiter: per input sample the required gain is ``g = min(1, ceiling / max_c |s_c|)``;
``h`` is the minimum of ``g`` over the last ``W = L + 1`` samples, ``r`` follows ``h``
down instantly and up with a one-pole release, and the applied gain is the mean of ``r``
over the last ``W`` samples, applied to the audio delayed by ``L``. Every ``r`` in that
mean is <= the required gain of the sample it is applied to, so the attack is a linear
ramp over the lookahead and never overshoots.

Buffers: ``process`` returns a view of an internal ``[C, N]`` float32 buffer that the next
call overwrites, or writes into ``out=`` (which may be ``x`` itself: in-place). Everything
runs in float64 on state allocated up front and work buffers that grow to the largest block
seen; the per-sample work is one numba ``@njit(cache=True, nogil=True)`` kernel, compiled
(or loaded from numba's on-disk cache) by ``warmup()`` in ``__init__``. Without numba the same
code runs as plain Python: correct, but about 5 ms per [2, 640] block instead of ~15 us.

Threads: ``process``/``reset`` belong to the audio thread; ``set_gain_db``, ``panic`` and
``resume`` may be called from any thread (they post requests the next block picks up).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a run-time dependency; this keeps import working
    HAVE_NUMBA = False

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        """Stand-in for ``numba.njit``: the function runs as plain (slow) Python."""
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f


GAIN_MIN_DB: float = -80.0
"""Gains at or below this (including ``-inf``) mean exact silence."""
GAIN_MAX_DB: float = 12.0
"""Gains above this are clamped to it."""
PANIC_MAX_MS: float = 50.0
NONFINITE_FADE_MS: float = 2.0
"""Length of the fade from the last good output to silence when a non-finite block arrives."""

# float64 state vector (``_fs``) slots
_F_G = 0  # current master gain (linear)
_F_G0 = 1  # gain at the start of the current ramp
_F_G1 = 2  # ramp target
_F_HOLD = 3  # limiter: minimum required gain in the window
_F_REL = 4  # limiter: released gain r (previous sample)
_F_SUM = 5  # limiter: running sum of r over the window
_F_R = 6  # DC blocker pole
_F_DCN = 7  # DC blocker normalisation (1 + R) / 2
_F_CEIL = 8  # ceiling (linear, exactly representable in float32)
_F_RELC = 9  # release coefficient, 1 - exp(-1 / (release_s * sr))
_F_TGT = 10  # limiter target: a hair under the ceiling, so rounding never reaches the guard clip
_NF = 11

# int64 state vector (``_is``) slots
_I_POS = 0  # write position in the window rings (length W)
_I_RK = 1  # samples done of the current gain ramp
_I_RLEN = 2  # gain ramp length
_I_HAGE = 3  # age (samples) of the current hold value
_I_EPOS = 4  # panic envelope position, 0 (silent) .. ELEN (open)
_I_ETGT = 5  # panic envelope target: 0 or 1
_I_ELEN = 6  # panic fade length (samples)
_I_TPOS = 7  # non-finite tail: samples left
_I_TLEN = 8  # non-finite tail length
_NI = 9

# per-block statistics (``_st``) slots
_S_MING = 0  # smallest limiter gain applied in the block
_S_NLIM = 1  # samples (per frame, not per channel) with limiter gain < 1
_S_PEAK = 2  # largest |output|
_S_NCLIP = 3  # samples the hard clip changed (expected 0 up to rounding)
_NS = 4


@njit(cache=True, nogil=True)
def _all_finite(x: np.ndarray) -> bool:
    """True when every sample of ``x [C, N]`` is finite."""
    C, N = x.shape
    for c in range(C):
        for n in range(N):
            v = x[c, n]
            if not math.isfinite(v):
                return False
    return True


@njit(cache=True, nogil=True)
def _reset_dsp(
    fs: np.ndarray, is_: np.ndarray, dc: np.ndarray, hist: np.ndarray, gbuf: np.ndarray, rbuf: np.ndarray
) -> None:
    """DC blocker, delay line and limiter back to their initial (silent, unity-gain) state."""
    dc[:] = 0.0
    hist[:] = 0.0
    gbuf[:] = 1.0
    rbuf[:] = 1.0
    fs[_F_HOLD] = 1.0
    fs[_F_REL] = 1.0
    fs[_F_SUM] = float(gbuf.shape[0])
    is_[_I_POS] = 0
    is_[_I_HAGE] = 0


@njit(cache=True, nogil=True)
def _process(
    x: np.ndarray,
    out: np.ndarray,
    w: np.ndarray,
    wk: np.ndarray,
    fs: np.ndarray,
    is_: np.ndarray,
    dc: np.ndarray,
    hist: np.ndarray,
    gbuf: np.ndarray,
    rbuf: np.ndarray,
    prev: np.ndarray,
    tail: np.ndarray,
    st: np.ndarray,
) -> bool:
    """Process ``x [C, N]`` into ``out [C, N]`` (may be ``x``). Returns False for a non-finite block.

    Work buffers (contents not kept): ``w [C, >= L + N]`` the gained signal with the ``L``
    delayed samples in front, ``wk [3, >= N]`` per-sample master gain, then limiter gain;
    panic envelope; non-finite fade. State: ``dc [2, C]`` (previous input, previous output),
    ``hist [C, L]`` delay line, ``gbuf/rbuf [W]`` required / released gain rings (``W = L + 1``),
    ``prev [C]`` last output before the panic envelope, ``tail [C]`` the value the non-finite
    fade starts from. ``st [_NS]`` receives the block's statistics.
    """
    C, N = x.shape
    L = hist.shape[1]
    W = gbuf.shape[0]
    finite = _all_finite(x)
    if not finite:
        # Silence from here, faded from what the listener heard last; nothing of the bad block survives.
        _reset_dsp(fs, is_, dc, hist, gbuf, rbuf)
        for c in range(C):
            tail[c] = prev[c]
        is_[_I_TPOS] = is_[_I_TLEN]
    ceil = fs[_F_CEIL]
    gk = wk[0]
    envk = wk[1]
    tailk = wk[2]

    # 1. master gain per sample (linear ramp after set_gain_db)
    g = fs[_F_G]
    g0 = fs[_F_G0]
    g1 = fs[_F_G1]
    rk = is_[_I_RK]
    rlen = is_[_I_RLEN]
    for n in range(N):
        if rk < rlen:
            rk += 1
            g = g1 if rk == rlen else g0 + (g1 - g0) * (rk / rlen)
        gk[n] = g
    fs[_F_G] = g
    is_[_I_RK] = rk

    # 2. DC blocker and gain, per channel, into w[:, L:] behind the delayed samples
    R = fs[_F_R]
    dcn = fs[_F_DCN]
    for c in range(C):
        for i in range(L):
            w[c, i] = hist[c, i]
        if finite:
            x1 = dc[0, c]
            y1 = dc[1, c]
            for n in range(N):
                v = float(x[c, n])
                y1 = dcn * (v - x1) + R * y1
                x1 = v
                w[c, L + n] = y1 * gk[n]
            dc[0, c] = x1
            dc[1, c] = y1
        else:
            for n in range(N):
                w[c, L + n] = 0.0

    # 3. limiter gain (aligned with the delayed samples w[:, n]), panic envelope, non-finite fade
    tgt = fs[_F_TGT]
    relc = fs[_F_RELC]
    hold = fs[_F_HOLD]
    rel = fs[_F_REL]
    bsum = fs[_F_SUM]
    pos = is_[_I_POS]
    hage = is_[_I_HAGE]
    epos = is_[_I_EPOS]
    etgt = is_[_I_ETGT]
    elen = is_[_I_ELEN]
    tpos = is_[_I_TPOS]
    tlen = is_[_I_TLEN]
    ming = 1.0
    nlim = 0
    for n in range(N):
        pk = 0.0
        for c in range(C):
            pk = max(pk, abs(w[c, L + n]))
        # required gain -> sliding-window minimum over W samples (hold)
        req = tgt / pk if pk > tgt else 1.0
        gbuf[pos] = req
        if req <= hold:
            hold = req
            hage = 0
        else:
            hage += 1
            if hage >= W:  # the minimum left the window: find the next one (newest on ties)
                hold = req
                hage = 0
                for age in range(1, W):
                    i = pos - age
                    if i < 0:
                        i += W
                    if gbuf[i] < hold:
                        hold = gbuf[i]
                        hage = age
        # instant attack / exponential release
        if hold <= rel:
            rel = hold
        else:
            rel += relc * (hold - rel)
            if hold - rel < 1e-9:  # land exactly (the approach alone would stall an ulp short)
                rel = hold
        # box average over the window: a linear attack ramp that ends on the peak
        nxt = pos + 1
        if nxt == W:  # once per lap: exact sum, so rounding cannot drift
            rbuf[pos] = rel
            bsum = 0.0
            for i in range(W):
                bsum += rbuf[i]
            nxt = 0
        else:
            bsum += rel - rbuf[pos]
            rbuf[pos] = rel
        # The mean is <= the aligned sample's required gain gbuf[pos + 1] in exact arithmetic; the
        # min makes that hold after rounding too (the running sum loses precision in deep reduction).
        gl = min(bsum / W, gbuf[nxt])  # bsum / W is exactly 1.0 for a window of ones
        pos = nxt
        if gl >= 1.0:
            gl = 1.0
        else:
            gl = max(gl, 0.0)
            nlim += 1
            ming = min(ming, gl)
        gk[n] = gl
        # panic envelope
        if etgt == 0:
            if epos > 0:
                epos -= 1
        elif epos < elen:
            epos += 1
        envk[n] = epos / elen
        # non-finite fade
        if tpos > 0:
            tpos -= 1
            tailk[n] = tpos / tlen
        else:
            tailk[n] = 0.0
    fs[_F_HOLD] = hold
    fs[_F_REL] = rel
    fs[_F_SUM] = bsum
    is_[_I_POS] = pos
    is_[_I_HAGE] = hage
    is_[_I_EPOS] = epos
    is_[_I_TPOS] = tpos

    # 4. apply: delayed sample x limiter gain (+ fade), guard clip, panic envelope
    peak = 0.0
    nclip = 0
    for c in range(C):
        tc = tail[c]
        o = prev[c]
        for n in range(N):
            o = w[c, n] * gk[n] + tc * tailk[n]
            if o > ceil:
                o = ceil
                nclip += 1
            elif o < -ceil:
                o = -ceil
                nclip += 1
            elif math.isnan(o):  # cannot happen for finite input; belt and braces
                o = 0.0
            e = envk[n]
            y = o * e if e > 0.0 else 0.0
            peak = max(peak, abs(y))
            out[c, n] = y
        prev[c] = o
        for i in range(L):
            hist[c, i] = w[c, N + i]
    st[_S_MING] = ming
    st[_S_NLIM] = nlim
    st[_S_PEAK] = peak
    st[_S_NCLIP] = nclip
    return finite


def _ceiling_f32(ceiling_db: float) -> float:
    """The largest float32 value <= ``10 ** (ceiling_db / 20)``."""
    lin = 10.0 ** (ceiling_db / 20.0)
    c = np.float32(lin)
    if float(c) > lin:
        c = np.nextafter(c, np.float32(0.0))
    return float(c)


class OutputSafety:
    """NaN guard, DC blocker, master gain, lookahead brickwall limiter and panic fade for ``[C, N]`` blocks.

    Threads: call ``process`` (and ``reset``/``warmup``) from one thread, the audio thread. ``set_gain_db``,
    ``panic`` and ``resume`` may be called from any thread: they only post a request (one atomic attribute
    store) that the next ``process`` call picks up, so they take effect from the first sample it produces.
    """

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        ceiling_db: float = -1.0,
        dc_block_hz: float = 5.0,
        lookahead_ms: float = 1.0,
        release_ms: float = 80.0,
        panic_ms: float = 40.0,
        gain_ramp_ms: float = 10.0,
        max_block: int = 4096,
    ) -> None:
        """
        Args:
            sample_rate: Hz.
            channels: ``C`` of the ``[C, N]`` blocks.
            ceiling_db: output ceiling in dBFS (<= 0); no output sample's magnitude exceeds it.
            dc_block_hz: DC blocker corner frequency (0 turns it into a pass-through).
            lookahead_ms: limiter lookahead, which is also the stage's latency (0 allowed).
            release_ms: limiter release time constant.
            panic_ms: length of the panic fade-out and of the fade-in after ``resume`` (0 < panic_ms <= 50).
            gain_ramp_ms: length of the ramp after ``set_gain_db``.
            max_block: work buffers are allocated for blocks up to this size now (bigger blocks grow them).
        """
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(f"sample_rate and channels must be positive, got {sample_rate}, {channels}")
        if not math.isfinite(ceiling_db) or ceiling_db > 0.0:
            raise ValueError(f"ceiling_db must be finite and <= 0 dBFS, got {ceiling_db}")
        if not 0.0 <= dc_block_hz < sample_rate / 2:
            raise ValueError(f"dc_block_hz must be in [0, sample_rate / 2), got {dc_block_hz}")
        if not 0.0 <= lookahead_ms <= 100.0:
            raise ValueError(f"lookahead_ms must be in [0, 100], got {lookahead_ms}")
        if not release_ms > 0.0:
            raise ValueError(f"release_ms must be > 0, got {release_ms}")
        if not 0.0 < panic_ms <= PANIC_MAX_MS:
            raise ValueError(f"panic_ms must be in (0, {PANIC_MAX_MS}], got {panic_ms}")
        if not gain_ramp_ms >= 0.0:
            raise ValueError(f"gain_ramp_ms must be >= 0, got {gain_ramp_ms}")
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.ceiling_db = float(ceiling_db)
        self.ceiling: float = _ceiling_f32(ceiling_db)
        """Linear ceiling; ``abs(output) <= ceiling`` always (a float32 value <= 10 ** (ceiling_db / 20))."""
        sr = self.sample_rate
        self._lookahead = round(lookahead_ms * sr / 1000.0)
        W = self._lookahead + 1
        R = math.exp(-2.0 * math.pi * dc_block_hz / sr)

        fs = np.zeros(_NF, np.float64)
        fs[_F_G] = fs[_F_G0] = fs[_F_G1] = 1.0
        fs[_F_R] = R
        fs[_F_DCN] = (1.0 + R) / 2.0
        fs[_F_CEIL] = self.ceiling
        fs[_F_TGT] = self.ceiling * (1.0 - 1e-12)
        fs[_F_RELC] = -math.expm1(-1000.0 / (release_ms * sr))
        is_ = np.zeros(_NI, np.int64)
        is_[_I_ELEN] = max(1, round(panic_ms * sr / 1000.0))
        is_[_I_EPOS] = is_[_I_ELEN]
        is_[_I_ETGT] = 1
        is_[_I_TLEN] = max(1, round(NONFINITE_FADE_MS * sr / 1000.0))
        self._ramp_len = round(gain_ramp_ms * sr / 1000.0)
        self._fs = fs
        self._is = is_
        self._dc = np.zeros((2, channels), np.float64)
        self._hist = np.zeros((channels, self._lookahead), np.float64)
        self._gbuf = np.ones(W, np.float64)
        self._rbuf = np.ones(W, np.float64)
        self._prev = np.zeros(channels, np.float64)
        self._tail = np.zeros(channels, np.float64)
        self._st = np.zeros(_NS, np.float64)
        self._st[_S_MING] = 1.0
        # work buffers, grown to the largest block seen
        self._buf = np.zeros(0, np.float32)  # flat output buffer
        self._w = np.zeros((channels, self._lookahead), np.float64)
        self._wk = np.zeros((3, 0), np.float64)
        self._grow(max(1, max_block))
        self._gain_db = 0.0
        self._gain_req: tuple[int, float] = (0, 1.0)  # (sequence number, linear target), posted by set_gain_db
        self._gain_seq = 0  # the last request process() applied
        self._panic_req = False  # posted by panic() / resume()
        self._ceiling_req: float | None = None  # posted by set_ceiling_db()

        self.nonfinite_blocks: int = 0
        """Blocks that contained NaN/Inf (each was replaced by a fade to silence)."""
        self.last_block_nonfinite: bool = False
        """True when the last ``process`` call got a non-finite block: the caller should reset its generator."""
        self.limited_samples: int = 0
        """Sample frames (all channels together) on which the limiter reduced the gain."""
        self.clipped_samples: int = 0
        """Samples the final hard clip changed; the limiter keeps this at 0 up to rounding."""
        self.blocks: int = 0
        self.samples: int = 0
        self._state = (
            self._fs,
            self._is,
            self._dc,
            self._hist,
            self._gbuf,
            self._rbuf,
            self._prev,
            self._tail,
            self._st,
        )
        _reset_dsp(fs, is_, self._dc, self._hist, self._gbuf, self._rbuf)
        self.warmup()

    # ------------------------------------------------------------------ properties
    @property
    def latency_samples(self) -> int:
        """Delay this stage adds, in samples (the limiter's lookahead)."""
        return self._lookahead

    @property
    def gain_db(self) -> float:
        """Target master gain in dB (``-inf`` for silence)."""
        return self._gain_db

    @property
    def gain_reduction_db(self) -> float:
        """Largest limiter gain reduction in the last block, in dB (>= 0)."""
        g = float(self._st[_S_MING])
        return 0.0 if g >= 1.0 else (math.inf if g <= 0.0 else -20.0 * math.log10(g))

    @property
    def peak_db(self) -> float:
        """Peak of the last output block in dBFS (``-inf`` for silence)."""
        p = float(self._st[_S_PEAK])
        return 20.0 * math.log10(p) if p > 0.0 else -math.inf

    @property
    def is_panicking(self) -> bool:
        """True between ``panic()`` and ``resume()``."""
        return self._panic_req

    @property
    def is_silent(self) -> bool:
        """True once a panic fade has completed: output is exact zeros until ``resume()``."""
        return self._panic_req and int(self._is[_I_EPOS]) == 0

    def status(self) -> dict[str, float | int | bool]:
        """Figures for a status line."""
        return {
            "gain_db": self.gain_db,
            "peak_db": self.peak_db,
            "gain_reduction_db": self.gain_reduction_db,
            "limited_samples": self.limited_samples,
            "clipped_samples": self.clipped_samples,
            "nonfinite_blocks": self.nonfinite_blocks,
            "panic": self.is_panicking,
            "silent": self.is_silent,
        }

    # ------------------------------------------------------------------ controls
    def set_gain_db(self, db: float) -> None:
        """Master gain, reached by a linear ramp over ``gain_ramp_ms``.

        Clamped to at most ``GAIN_MAX_DB`` (+12 dB); ``db <= GAIN_MIN_DB`` (-80 dB), ``-inf``
        included, means exact silence. NaN raises ``ValueError``.
        """
        db = float(db)
        if math.isnan(db):
            raise ValueError("gain_db is NaN")
        db = min(db, GAIN_MAX_DB)
        if db <= GAIN_MIN_DB:
            self._gain_db, target = -math.inf, 0.0
        else:
            self._gain_db, target = db, 10.0 ** (db / 20.0)
        self._gain_req = (self._gain_req[0] + 1, target)

    def set_ceiling_db(self, db: float) -> None:
        """Move the ceiling (dBFS, <= 0) from the next block: the guard clip holds the new one at once."""
        db = float(db)
        if not math.isfinite(db) or db > 0.0:
            raise ValueError(f"ceiling_db must be finite and <= 0 dBFS, got {db}")
        self._ceiling_req = db

    def panic(self) -> None:
        """Fade to exact silence within ``panic_ms`` from the next sample, then stay silent until ``resume()``."""
        self._panic_req = True

    def resume(self) -> None:
        """Fade back in over ``panic_ms`` (from wherever a panic fade has got to)."""
        self._panic_req = False

    def _apply_controls(self) -> None:
        """Move posted gain and panic requests into the kernel state (on the processing thread)."""
        fs, is_ = self._fs, self._is
        seq, target = self._gain_req
        if seq != self._gain_seq:
            self._gain_seq = seq
            fs[_F_G0] = fs[_F_G]
            fs[_F_G1] = target
            is_[_I_RK] = 0
            is_[_I_RLEN] = self._ramp_len
            if self._ramp_len == 0:
                fs[_F_G] = target
        is_[_I_ETGT] = 0 if self._panic_req else 1
        req, self._ceiling_req = self._ceiling_req, None
        if req is not None and req != self.ceiling_db:
            self.ceiling_db, self.ceiling = req, _ceiling_f32(req)
            fs[_F_CEIL] = self.ceiling
            fs[_F_TGT] = self.ceiling * (1.0 - 1e-12)

    def reset(self) -> None:
        """Clear all signal state: DC blocker, delay line, limiter, non-finite fade.

        User settings persist and their ramps complete at once: the master gain jumps to its
        target and the panic envelope to closed (after ``panic()``) or open. Counters are kept.
        """
        self._apply_controls()
        fs, is_ = self._fs, self._is
        _reset_dsp(fs, is_, self._dc, self._hist, self._gbuf, self._rbuf)
        fs[_F_G] = fs[_F_G0] = fs[_F_G1]
        is_[_I_RK] = is_[_I_RLEN] = 0
        is_[_I_EPOS] = is_[_I_ELEN] if is_[_I_ETGT] else 0
        is_[_I_TPOS] = 0
        self._prev[:] = 0.0
        self._tail[:] = 0.0
        self._st[:] = 0.0
        self._st[_S_MING] = 1.0
        self.last_block_nonfinite = False

    def warmup(self) -> None:
        """Compile (or load from numba's on-disk cache) the kernels, leaving all state as it was."""
        saved = [a.copy() for a in self._state]
        x = np.zeros((self.channels, 1), np.float32)
        _process(x, x, self._w, self._wk, *self._state)
        x[0, 0] = np.nan
        _process(x, x, self._w, self._wk, *self._state)
        for a, s in zip(self._state, saved):
            a[...] = s

    # ------------------------------------------------------------------ processing
    def process(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Process one block ``x [C, N]`` (float32; N >= 1) and return ``[C, N]`` float32.

        Without ``out`` the result is a view of an internal buffer that is overwritten by the
        next call (copy it if you keep it). With ``out`` (a C-contiguous float32 ``[C, N]``
        array, which may be ``x`` itself for in-place processing) the result is written there
        and ``out`` is returned. ``x`` is converted to C-contiguous float32 if it is not one
        already (values beyond float32 range then become Inf, i.e. a non-finite block).

        After a block with any NaN/Inf, ``last_block_nonfinite`` is True, ``nonfinite_blocks``
        has gone up by one and the output is a short fade from the previous output to silence.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] != self.channels or x.shape[1] < 1:
            raise ValueError(f"expected a [{self.channels}, N>=1] block, got shape {x.shape}")
        if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
            x = np.array(x, dtype=np.float32, order="C")  # one kernel specialisation only
        C, N = x.shape
        if self._wk.shape[1] < N:
            self._grow(N)
        if out is None:
            out = self._buf[: C * N].reshape(C, N)
        elif out.shape != x.shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {x.shape}")
        self._apply_controls()
        finite = _process(x, out, self._w, self._wk, *self._state)
        st = self._st
        self.last_block_nonfinite = not finite
        self.nonfinite_blocks += not finite
        self.limited_samples += int(st[_S_NLIM])
        self.clipped_samples += int(st[_S_NCLIP])
        self.blocks += 1
        self.samples += N
        return out

    def _grow(self, n: int) -> None:
        """Work buffers for blocks of up to ``n`` samples (they only ever grow)."""
        if self._wk.shape[1] >= n:
            return
        C = self.channels
        self._buf = np.zeros(C * n, np.float32)
        self._w = np.zeros((C, self._lookahead + n), np.float64)
        self._wk = np.zeros((3, n), np.float64)
