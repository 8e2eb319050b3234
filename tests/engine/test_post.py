"""engine.post.OutputSafety: ceiling, transparency, DC, non-finite guard, streaming, panic, gain."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

import numpy as np
import pytest

from engine.post import OutputSafety

SR = 32000
CEIL_DB = -1.0
CEIL = 10 ** (CEIL_DB / 20)


def sine(freq: float, amp: float, n: int, channels: int = 2, phase: float = 0.0) -> np.ndarray:
    t = np.arange(n) / SR
    s = amp * np.sin(2 * np.pi * freq * t + phase)
    return np.stack([s * (1.0 - 0.1 * c) for c in range(channels)]).astype(np.float32)


def run(
    post: OutputSafety,
    x: np.ndarray,
    sizes: Iterable[int] = (640,),
    events: dict[int, Callable[[OutputSafety], None]] | None = None,
) -> np.ndarray:
    """Process ``x`` in chunks of ``sizes`` (cycled), calling ``events[i](post)`` before sample ``i``."""
    events = dict(events or {})
    sizes = list(sizes)
    out = np.empty_like(x)
    i = k = 0
    while i < x.shape[1]:
        if i in events:
            events.pop(i)(post)
        n = min(sizes[k % len(sizes)], x.shape[1] - i)
        nxt = [e for e in events if i < e < i + n]
        if nxt:
            n = min(nxt) - i
        out[:, i : i + n] = post.process(x[:, i : i + n])
        i += n
        k += 1
    return out


def assert_safe(y: np.ndarray, ceiling: float = CEIL) -> None:
    assert np.isfinite(y).all()
    assert np.abs(y).max() <= ceiling, f"peak {np.abs(y).max()!r} > ceiling {ceiling!r}"


# ---------------------------------------------------------------- ceiling


@pytest.mark.parametrize("sizes", [(640,), (3200,), (1, 7, 1001, 640)])
def test_ceiling_loud_noise(sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, SR)) * 10.0).astype(np.float32)
    post = OutputSafety(SR, 2)
    y = run(post, x, sizes)
    assert_safe(y)
    assert post.limited_samples > 0
    assert post.clipped_samples == 0  # the limiter holds the ceiling, the guard clip never acts
    assert np.abs(y).max() > 0.95 * CEIL  # and it does not over-limit


def test_ceiling_sine_plus_20_dbfs_is_limited_not_clipped() -> None:
    x = sine(1000.0, 10.0, SR)  # +20 dBFS, 1 kHz
    post = OutputSafety(SR, 2, release_ms=20.0)
    y = run(post, x)
    assert_safe(y)
    assert post.clipped_samples == 0
    assert post.gain_reduction_db == pytest.approx(21.0, abs=0.1)
    # Settled (the DC blocker's start-up made the first peaks higher; the release has caught up
    # since), the output is the unlimited output scaled by a constant gain. A clipper would square it off.
    quiet = run(OutputSafety(SR, 2), x / np.float32(100.0))  # -20 dBFS: untouched by the limiter
    ref = quiet[:, SR // 2 :].astype(np.float64)
    got = y[:, SR // 2 :].astype(np.float64)
    k = float((got * ref).sum() / (ref * ref).sum())
    assert k * 0.1 == pytest.approx(CEIL, rel=1e-3)
    assert np.abs(got - k * ref).max() < 1e-5


def test_ceiling_single_sample_spikes() -> None:
    x = sine(440.0, 0.3, SR)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, SR, 40)
    x[0, idx] = 1e6
    x[1, idx[::2]] = -1e6
    post = OutputSafety(SR, 2)
    y = run(post, x, (1, 640, 7, 1001))
    assert_safe(y)
    assert post.clipped_samples == 0


@pytest.mark.parametrize("level", [2.0, -5.0, 1e30, np.finfo(np.float32).max, -np.finfo(np.float32).max])
def test_ceiling_steps_and_huge_values(level: float) -> None:
    x = np.zeros((2, 8000), np.float32)
    x[:, 1000:5000] = level
    x[1, 3000:3001] = -level
    post = OutputSafety(SR, 2)
    y = run(post, x, (640, 3, 1001))
    assert_safe(y)
    assert post.nonfinite_blocks == 0  # huge but finite is limited, not treated as bad input
    assert np.abs(y).max() > 0.5 * CEIL


@pytest.mark.parametrize("ceiling_db", [0.0, -0.1, -3.0, -12.0])
@pytest.mark.parametrize("lookahead_ms", [0.0, 1.0, 5.0])
def test_ceiling_other_settings_with_max_gain(ceiling_db: float, lookahead_ms: float) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 16000)) * rng.uniform(0, 3, 16000)).astype(np.float32)
    post = OutputSafety(SR, 2, ceiling_db=ceiling_db, lookahead_ms=lookahead_ms)
    post.set_gain_db(12.0)
    y = run(post, x, (640, 1, 333))
    assert_safe(y, 10 ** (ceiling_db / 20))
    assert post.latency_samples == round(lookahead_ms * SR / 1000)


def test_ceiling_random_configs() -> None:
    rng = np.random.default_rng(4)
    for trial in range(20):
        ch = int(rng.integers(1, 4))
        post = OutputSafety(
            int(rng.choice([16000, 32000, 48000])),
            ch,
            ceiling_db=float(rng.uniform(-6, 0)),
            lookahead_ms=float(rng.uniform(0, 3)),
            release_ms=float(rng.uniform(1, 300)),
        )
        post.set_gain_db(float(rng.uniform(-20, 12)))
        n = int(rng.integers(1, 5000))
        x = (rng.standard_normal((ch, n)) * 10 ** rng.uniform(-2, 3, n)).astype(np.float32)
        y = run(post, x, [int(s) for s in rng.integers(1, 1500, 5)])
        assert np.isfinite(y).all(), trial
        assert np.abs(y).max() <= 10 ** (post.ceiling_db / 20), trial


def test_attack_is_within_lookahead_and_release_is_exponential() -> None:
    # No DC blocker, so the limiter's gain is simply output / delayed input.
    post = OutputSafety(SR, 1, dc_block_hz=0.0, release_ms=80.0)
    n, k = SR, SR // 4
    x = np.full((1, n), 0.1, np.float32)
    x[0, k] = 100.0
    y = run(post, x)
    lat = post.latency_samples
    gain = y[0, lat:].astype(np.float64) / x[0, : n - lat]
    assert np.all(gain[: k - lat] == 1.0)  # untouched until the lookahead reaches the spike
    assert 0.0 < gain[k - lat] < 1.0  # the attack starts one lookahead early...
    assert np.all(np.diff(gain[k - lat : k + 1]) < 0)  # ...and ramps down smoothly
    assert gain[k] * 100.0 == pytest.approx(CEIL, rel=1e-6)  # to exactly the ceiling on the spike
    g0 = CEIL / 100.0
    for ms in (20.0, 80.0, 160.0):  # then recovers with the release time constant
        i = k + lat + round(ms * SR / 1000)
        expect = 1.0 - (1.0 - g0) * math.exp(-(i - k - lat) / (0.080 * SR))
        assert gain[i] == pytest.approx(expect, abs=0.01), ms
    assert gain[-1] == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- transparency, latency, DC


def test_quiet_sine_passes_unchanged_but_delayed() -> None:
    x = sine(1000.0, 0.1, SR)  # -20 dBFS
    post = OutputSafety(SR, 2)
    y = run(post, x, (640, 7))
    lat = post.latency_samples
    assert lat == 32
    settle = SR // 4  # let the DC blocker's start-up transient die away
    err = np.abs(y[:, settle:] - x[:, settle - lat : SR - lat]).max()
    assert err < 1e-3
    assert post.limited_samples == 0
    assert post.gain_reduction_db == 0.0
    assert post.peak_db == pytest.approx(-20.0, abs=0.1)


def test_latency_is_the_impulse_delay() -> None:
    for lookahead_ms in (0.0, 1.0, 2.5):
        post = OutputSafety(SR, 1, lookahead_ms=lookahead_ms)
        x = np.zeros((1, 1000), np.float32)
        x[0, 100] = 0.5
        y = run(post, x, (64,))
        assert int(np.argmax(np.abs(y[0]))) == 100 + post.latency_samples
        assert y[0, 100 + post.latency_samples] == pytest.approx(0.5, rel=1e-3)


def test_dc_offset_is_removed() -> None:
    n = 2 * SR
    x = sine(440.0, 0.1, n) + np.float32(0.5)
    post = OutputSafety(SR, 2)
    y = run(post, x)
    tail = y[:, -SR // 2 :]
    assert np.abs(tail.mean(axis=1)).max() < 1e-3
    assert np.abs(tail).max() < 0.11  # the sine survives, the offset does not


# ---------------------------------------------------------------- non-finite guard


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("bad_len", [1, 640])
def test_nonfinite_block(bad: float, bad_len: int) -> None:
    good = sine(300.0, 0.5, SR)
    post = OutputSafety(SR, 2)
    y0 = run(post, good[:, : SR // 2])
    assert not post.last_block_nonfinite

    blk = good[:, SR // 2 : SR // 2 + bad_len].copy()
    blk[1, bad_len // 2] = bad
    y1 = post.process(blk).copy()
    assert post.last_block_nonfinite
    assert post.nonfinite_blocks == 1
    assert np.isfinite(y1).all()
    # faded from the previous output, no click
    assert np.abs(y1[:, 0] - y0[:, -1]).max() < 0.05

    rest = good[:, SR // 2 + bad_len :]
    y2 = run(post, rest)
    assert not post.last_block_nonfinite
    assert post.nonfinite_blocks == 1
    assert_safe(y2)
    joined = np.concatenate([y0[:, -1:], y1, y2], axis=1)
    assert np.abs(np.diff(joined, axis=1)).max() < 0.1  # the fade to silence is smooth
    # nothing of the bad values or the old state lingers: once the fade is over the output
    # is exactly that of a fresh stage fed the same samples
    fresh = run(OutputSafety(SR, 2), rest)
    np.testing.assert_array_equal(y2[:, 64:], fresh[:, 64:])
    assert np.abs(y2[:, 1000:]).max() > 0.3  # and the sound is back


def test_nonfinite_block_output_is_silence_after_the_fade() -> None:
    post = OutputSafety(SR, 2)
    run(post, sine(300.0, 0.5, SR // 4))
    bad = np.full((2, 3200), np.nan, np.float32)
    y = post.process(bad)
    assert post.last_block_nonfinite
    assert np.all(y[:, 64:] == 0.0)
    assert np.abs(y[:, :64]).max() > 0.0


# ---------------------------------------------------------------- streaming


def test_chunked_equals_whole() -> None:
    rng = np.random.default_rng(5)
    n = SR
    x = sine(523.0, 0.4, n) + np.float32(0.2)
    x += (rng.standard_normal((2, n)) * (rng.uniform(0, 1, n) > 0.7) * 4.0).astype(np.float32)
    x[:, rng.integers(0, n, 10)] = 1e6
    events = {
        5000: lambda p: p.set_gain_db(9.0),
        12345: lambda p: p.panic(),
        15000: lambda p: p.resume(),
        20001: lambda p: p.set_gain_db(-6.0),
    }
    whole = run(OutputSafety(SR, 2), x, (n,), events)
    assert_safe(whole)
    for sizes in [(1,), (7,), (640,), (1001,), (1, 7, 640, 1001, 3200, 2)]:
        got = run(OutputSafety(SR, 2), x, sizes, events)
        np.testing.assert_array_equal(got, whole, err_msg=str(sizes))


def test_output_buffer_and_inplace() -> None:
    x = sine(700.0, 3.0, 2000)
    a = OutputSafety(SR, 2)
    b = OutputSafety(SR, 2)
    c = OutputSafety(SR, 2)
    ya = a.process(x.copy())
    assert ya.shape == (2, 2000) and ya.dtype == np.float32 and ya.flags.c_contiguous
    ya = ya.copy()
    out = np.empty_like(x)
    assert b.process(x, out=out) is out
    np.testing.assert_array_equal(out, ya)
    xin = x.copy()
    c.process(xin, out=xin)
    np.testing.assert_array_equal(xin, ya)
    # the internal buffer is reused: a second call overwrites the first result
    r1 = a.process(x[:, :100].copy())
    r2 = a.process(x[:, 100:200].copy())
    assert np.shares_memory(r1, r2)


def test_accepts_other_layouts_and_rejects_bad_shapes() -> None:
    x64 = sine(700.0, 0.3, 1000).astype(np.float64)
    a = OutputSafety(SR, 2)
    b = OutputSafety(SR, 2)
    ya = a.process(np.asfortranarray(x64)).copy()
    yb = b.process(x64.astype(np.float32))
    np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ValueError):
        a.process(np.zeros((3, 10), np.float32))
    with pytest.raises(ValueError):
        a.process(np.zeros((2, 0), np.float32))
    with pytest.raises(ValueError):
        a.process(np.zeros(10, np.float32))
    with pytest.raises(ValueError):
        a.process(np.zeros((2, 10), np.float32), out=np.zeros((2, 11), np.float32))


# ---------------------------------------------------------------- panic


def test_panic_fades_to_exact_silence_and_resume_fades_back() -> None:
    n = SR
    x = sine(220.0, 0.8, n)
    at, back = SR // 4, SR // 2
    post = OutputSafety(SR, 2, panic_ms=40.0)
    ref = run(OutputSafety(SR, 2), x)
    y = run(post, x, (640,), {at: lambda p: p.panic()})
    assert post.is_silent and post.is_panicking
    fade = round(0.040 * SR)
    assert fade <= 0.050 * SR
    np.testing.assert_array_equal(y[:, :at], ref[:, :at])
    assert np.all(y[:, at + fade - 1 :] == 0.0)
    assert not np.any(np.signbit(y[:, at + fade - 1 :]))  # +0.0, not -0.0
    # the fade is a monotone envelope on the signal: no click
    seg, rseg = y[0, at : at + fade], ref[0, at : at + fade]
    ok = np.abs(rseg) > 0.05
    env = seg[ok] / rseg[ok]
    assert np.all(np.diff(env) <= 1e-6) and env[0] > 0.95 and env[-1] < 0.05
    assert np.abs(np.diff(y[0, at - 1 : at + fade])).max() <= np.abs(np.diff(ref[0])).max() + 1e-6

    # silent stays silent, whatever comes in
    loud = np.random.default_rng(6).standard_normal((2, 3200)).astype(np.float32) * 100
    assert np.all(post.process(loud) == 0.0)
    assert post.is_silent

    post2 = OutputSafety(SR, 2, panic_ms=40.0)
    y2 = run(post2, x, (640,), {at: lambda p: p.panic(), back: lambda p: p.resume()})
    assert not post2.is_silent and not post2.is_panicking
    assert np.all(y2[:, at + fade - 1 : back] == 0.0)
    seg, rseg = y2[0, back : back + fade], ref[0, back : back + fade]
    ok = np.abs(rseg) > 0.05
    env = seg[ok] / rseg[ok]
    assert np.all(np.diff(env) >= -1e-6) and env[0] < 0.05 and env[-1] > 0.95
    np.testing.assert_array_equal(y2[:, back + fade :], ref[:, back + fade :])


def test_panic_from_one_sample_blocks_and_bad_panic_ms() -> None:
    post = OutputSafety(SR, 1, panic_ms=10.0)
    run(post, sine(100.0, 0.5, 1000, 1))
    post.panic()
    assert not post.is_silent
    y = run(post, sine(100.0, 0.5, 1000, 1), (1,))
    assert np.all(y[0, 319:] == 0.0) and np.abs(y[0, :300]).max() > 0
    assert post.is_silent
    with pytest.raises(ValueError):
        OutputSafety(SR, 1, panic_ms=60.0)
    with pytest.raises(ValueError):
        OutputSafety(SR, 1, panic_ms=0.0)


# ---------------------------------------------------------------- gain


def test_gain_change_ramps() -> None:
    n = SR // 2
    x = sine(440.0, 0.1, n)
    at = SR // 4
    post = OutputSafety(SR, 2)
    ref = run(OutputSafety(SR, 2), x)
    y = run(post, x, (640,), {at: lambda p: p.set_gain_db(6.0)})
    assert post.gain_db == 6.0
    target = 10 ** (6 / 20)
    lat = post.latency_samples
    start = at + lat  # the gain acts before the lookahead delay
    ramp = round(0.010 * SR)
    idx = np.arange(start - 200, start + ramp + 200)
    ok = np.abs(ref[0, idx]) > 0.02
    r = y[0, idx][ok] / ref[0, idx][ok]
    steps = np.diff(r) / np.diff(idx[ok])
    assert r[0] == pytest.approx(1.0, abs=1e-5) and r[-1] == pytest.approx(target, rel=1e-5)
    assert np.all(steps >= -1e-6)
    assert steps.max() <= 1.05 * (target - 1.0) / ramp  # a ramp, not a step
    np.testing.assert_allclose(y[:, start + ramp + 1 :], ref[:, start + ramp + 1 :] * target, atol=1e-6)


def test_gain_silence_and_clamp() -> None:
    x = sine(440.0, 0.5, SR // 4)
    post = OutputSafety(SR, 2)
    run(post, x)
    post.set_gain_db(-math.inf)
    assert post.gain_db == -math.inf
    y = run(post, x)
    settle = round(0.010 * SR) + post.latency_samples
    assert np.all(y[:, settle:] == 0.0)
    assert np.abs(np.diff(y[0, :settle])).max() < 0.1
    post.set_gain_db(-200.0)
    assert post.gain_db == -math.inf
    post.set_gain_db(40.0)
    assert post.gain_db == 12.0
    post.set_gain_db(-80.0)
    assert post.gain_db == -math.inf
    post.set_gain_db(-79.0)
    assert post.gain_db == -79.0
    with pytest.raises(ValueError):
        post.set_gain_db(math.nan)


def test_controls_from_another_thread() -> None:
    post = OutputSafety(SR, 2)
    x = sine(440.0, 0.5, 640)
    stop = threading.Event()

    def knob() -> None:
        rng = np.random.default_rng(9)
        while not stop.is_set():
            post.set_gain_db(float(rng.uniform(-90, 20)))
            if rng.uniform() < 0.1:
                post.panic()
            else:
                post.resume()

    t = threading.Thread(target=knob)
    t.start()
    try:
        for _ in range(300):
            assert_safe(post.process(x))
    finally:
        stop.set()
        t.join()
    post.resume()
    post.set_gain_db(-6.0)
    ref = OutputSafety(SR, 2)
    ref.set_gain_db(-6.0)
    ref.reset()
    for _ in range(100):  # panic fade-in, gain ramp, then settled
        y = post.process(x).copy()
        r = ref.process(x)
    np.testing.assert_allclose(y, r, atol=1e-6)


def test_gain_change_mid_ramp_is_continuous() -> None:
    x = sine(440.0, 0.1, SR // 4)
    post = OutputSafety(SR, 2)
    events = {4000: lambda p: p.set_gain_db(12.0), 4100: lambda p: p.set_gain_db(-30.0)}
    y = run(post, x, (64,), events)
    # slope of a 0.1..0.4 sine is < 0.035 per sample; a gain step would jump by far more
    assert np.abs(np.diff(y, axis=1)).max() < 0.04


# ---------------------------------------------------------------- reset, warm-up, stats, speed


def test_reset_clears_state_but_not_counters() -> None:
    rng = np.random.default_rng(7)
    loud = (rng.standard_normal((2, 5000)) * 5 + 0.5).astype(np.float32)
    post = OutputSafety(SR, 2)
    run(post, loud)
    post.process(np.full((2, 10), np.nan, np.float32))
    post.set_gain_db(-6.0)
    limited = post.limited_samples
    post.reset()
    assert post.nonfinite_blocks == 1 and post.limited_samples == limited
    x = sine(300.0, 2.0, 4000)
    fresh = OutputSafety(SR, 2)
    fresh.set_gain_db(-6.0)
    fresh.reset()  # the ramp completes at once
    np.testing.assert_array_equal(run(post, x, (333,)), run(fresh, x, (640,)))


def test_reset_keeps_panic() -> None:
    post = OutputSafety(SR, 2)
    post.panic()
    post.reset()
    assert post.is_silent
    assert np.all(post.process(sine(300.0, 0.5, 640)) == 0.0)


def test_warmup_leaves_state_alone() -> None:
    x = sine(300.0, 3.0, 3000) + np.float32(0.3)
    a = OutputSafety(SR, 2)
    b = OutputSafety(SR, 2)
    ya = run(a, x[:, :1500]).copy()
    yb = run(b, x[:, :1500]).copy()
    b.warmup()
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(run(a, x[:, 1500:]), run(b, x[:, 1500:]))
    assert a.blocks == b.blocks and a.samples == b.samples == 3000


def test_status() -> None:
    post = OutputSafety(SR, 2)
    s = post.status()
    assert s["peak_db"] == -math.inf and s["gain_reduction_db"] == 0.0 and s["panic"] is False
    run(post, sine(1000.0, 4.0, 6400))
    s = post.status()
    assert s["gain_reduction_db"] > 10.0 and s["limited_samples"] > 0
    assert s["peak_db"] <= CEIL_DB


def test_bad_arguments() -> None:
    for kwargs in (
        {"sample_rate": 0},
        {"channels": 0},
        {"ceiling_db": 1.0},
        {"ceiling_db": math.nan},
        {"release_ms": 0.0},
        {"lookahead_ms": -1.0},
        {"dc_block_hz": SR},
    ):
        args = {"sample_rate": SR, "channels": 2} | kwargs
        with pytest.raises(ValueError):
            OutputSafety(**args)


def test_ceiling_moves_live_from_the_next_block() -> None:
    s = OutputSafety(48000, 2, ceiling_db=-1.0)
    loud = np.full((2, 4800), 0.95, np.float32)
    loud[:, ::2] *= -1.0
    s.process(loud.copy())
    s.set_ceiling_db(-12.0)
    assert s.ceiling_db == -1.0  # posted, applied by the next process() on the processing thread
    out = s.process(loud.copy())
    assert s.ceiling_db == -12.0
    assert np.abs(out).max() <= 10 ** (-12 / 20)
    with pytest.raises(ValueError, match="<= 0 dBFS"):
        s.set_ceiling_db(3.0)
