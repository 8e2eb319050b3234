"""Procedural food-sound corpus: API contract, audible words, separable families."""

from __future__ import annotations

import numpy as np
import pytest

from export import data

N = 22
FRAME_S = 0.1


def find(*words: str) -> list[int]:
    """Prompt indices whose text contains all `words` (case-insensitive)."""
    return [i for i, p in enumerate(data.prompts()) if all(w in p.lower() for w in words)]


def spectrum(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequency axis and power spectrum of the channel sum."""
    mono = x.sum(axis=0).astype(np.float64)
    power = np.abs(np.fft.rfft(mono * np.hanning(mono.size))) ** 2
    return np.fft.rfftfreq(mono.size, 1.0 / sr), power


def centroid(x: np.ndarray, sr: int) -> float:
    f, p = spectrum(x, sr)
    return float((f * p).sum() / p.sum())


def low_fraction(x: np.ndarray, sr: int, below: float = 200.0) -> float:
    f, p = spectrum(x, sr)
    return float(p[f < below].sum() / p.sum())


def frames(x: np.ndarray, sr: int, frame_s: float = FRAME_S) -> np.ndarray:
    """[channels, frames, samples] of non-overlapping frames."""
    size = int(frame_s * sr)
    count = x.shape[1] // size
    return x[:, : count * size].reshape(x.shape[0], count, size).astype(np.float64)


def balance_std(x: np.ndarray, sr: int) -> float:
    """Std over 0.1 s frames of the L/R energy balance in dB."""
    e = (frames(x, sr) ** 2).sum(axis=2) + 1e-9
    return float(np.std(10.0 * np.log10(e[0] / e[1])))


def modulation(x: np.ndarray, sr: int) -> np.ndarray:
    """Log power of the (log) envelope's modulation in 1-4, 4-10, 10-20 and 20-45 Hz."""
    hop = sr // 200  # 5 ms
    win = 5 * hop  # 25 ms
    mono = x.sum(axis=0).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(mono * mono)])
    starts = np.arange(0, mono.size - win, hop)
    env = np.log(np.sqrt((csum[starts + win] - csum[starts]) / win) + 1e-4)
    env -= env.mean()
    power = np.abs(np.fft.rfft(env * np.hanning(env.size))) ** 2 / env.size
    f = np.fft.rfftfreq(env.size, hop / sr)
    return np.log10([power[(f >= lo) & (f < hi)].sum() + 1e-3 for lo, hi in ((1, 4), (4, 10), (10, 20), (20, 45))])


def features(x: np.ndarray, sr: int) -> np.ndarray:
    """Summary features a small classifier might use: log band energies (mean and std
    over 0.1 s frames), L/R balance std, L/R correlation, envelope modulation."""
    fr = frames(x, sr)
    spec = np.abs(np.fft.rfft(fr * np.hanning(fr.shape[2]), axis=2)) ** 2
    spec = spec.sum(axis=0)  # [frames, bins]
    freqs = np.fft.rfftfreq(fr.shape[2], 1.0 / sr)
    edges = np.geomspace(30.0, sr / 2.0, 21)
    bands = np.stack([spec[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], 1)
    logb = np.log10(bands + 1e-5 * bands.sum(axis=1).mean())  # a 50 dB range, like a dB spectrogram
    corr = np.corrcoef(x[0].astype(np.float64), x[1].astype(np.float64))[0, 1]
    return np.concatenate([logb.mean(0), logb.std(0), [balance_std(x, sr), corr], modulation(x, sr)])


# ---------------------------------------------------------------- API contract


def test_prompts_match_the_prompt_file() -> None:
    from export.architectures import known_prompts

    assert data.prompts() == known_prompts()
    assert len(data.prompts()) == N
    assert all(data.describe(i) for i in range(N))


@pytest.mark.parametrize("index", range(N))
def test_shape_dtype_finite_peak_fade(index: int) -> None:
    x = data.synth(index, 2.0, data.TRAIN_SEED, 0, 8000)
    assert x.shape == (data.CHANNELS, 16000)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    peak = float(np.abs(x).max())
    assert 0.05 < peak <= 0.9
    assert float(np.abs(x[:, 0]).max()) < 1e-6  # fade-in starts from silence
    # continuous: no 0.1 s frame is (near) silent
    rms = np.sqrt((frames(x, 8000) ** 2).mean(axis=(0, 2)))
    assert rms.min() > 1e-3 * peak, index


def test_deterministic_and_draws_differ() -> None:
    a = data.synth(5, 1.0, 0, 0, 16000)
    assert np.array_equal(a, data.synth(5, 1.0, 0, 0, 16000))
    assert not np.array_equal(a, data.synth(5, 1.0, 0, 1, 16000))
    assert not np.array_equal(a, data.synth(5, 1.0, 1, 0, 16000))
    assert data.synth(3, 0.5, 0, 0, 32000).shape == (2, 16000)
    assert data.synth(3, 0.25, 0, 0, 11025).shape == (2, round(0.25 * 11025))


@pytest.mark.parametrize("seconds", [1 / 8000, 0.003, 0.05])
def test_very_short_clips(seconds: float) -> None:
    for i in range(N):
        x = data.synth(i, seconds, 0, 0, 8000)
        assert x.shape == (2, round(seconds * 8000)) and np.isfinite(x).all()
        assert float(np.abs(x).max()) <= 0.9


def test_corpus_order() -> None:
    got = list(data.corpus(7, 2, 0.1, 8000))
    assert [i for i, _ in got] == list(range(N)) * 2
    assert np.array_equal(got[N + 3][1], data.synth(3, 0.1, 7, 1, 8000))


@pytest.mark.parametrize(
    ("call", "word"),
    [
        (lambda: data.synth(N, 1.0, 0), "index"),
        (lambda: data.synth(-1, 1.0, 0), "index"),
        (lambda: data.synth(0, 0.0, 0), "seconds"),
        (lambda: data.synth(0, -1.0, 0), "seconds"),
        (lambda: data.synth(0, 1.0, 0, sample_rate=4000), "sample_rate"),
        (lambda: data.describe(99), "index"),
    ],
)
def test_bad_arguments(call, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        call()


# ---------------------------------------------------------------- the words are audible


SR = 16000


def test_deep_is_low_and_sizzling_is_high() -> None:
    deep = find("deep")
    sizzling = find("sizzling")
    assert len(deep) == 3 and len(sizzling) == 5
    for d in deep:
        for n in range(2):
            x = data.synth(d, 2.0, 0, n, SR)
            assert low_fraction(x, SR) > 0.5, (d, n)
            assert centroid(x, SR) < 400.0, (d, n)
    deep_max = max(centroid(data.synth(d, 2.0, 0, 0, SR), SR) for d in deep)
    for s in sizzling:
        assert centroid(data.synth(s, 2.0, 0, 0, SR), SR) > 3 * deep_max, s


def test_rapid_has_faster_events_than_hum() -> None:
    rapid = find("rapid")
    hums = find("hum")
    hums = [h for h in hums if h not in find("impulse")]
    assert len(rapid) == 4 and len(hums) >= 3
    fast = lambda i: float(np.log10((10.0 ** modulation(data.synth(i, 2.0, 0, 0, SR), SR)[2:]).sum()))  # noqa: E731
    slowest_rapid = min(fast(i) for i in rapid)
    fastest_hum = max(fast(i) for i in hums)
    assert slowest_rapid > fastest_hum, (slowest_rapid, fastest_hum)


def test_moving_panorama_moves() -> None:
    moving = find("moving panorama")
    assert len(moving) == 4
    still = [find("regular low impulse")[0], find("hum with pitch and frequency modulation")[0]]
    still_max = max(balance_std(data.synth(i, 2.0, 0, n, SR), SR) for i in still for n in range(2))
    for i in moving:
        for n in range(2):
            assert balance_std(data.synth(i, 2.0, 0, n, SR), SR) > 3 * still_max + 0.5, (i, n)


def test_sixth_interval_has_peaks_five_to_three() -> None:
    (index,) = find("sixth interval")
    for n in range(3):
        f, p = spectrum(data.synth(index, 2.0, 0, n, SR), SR)
        peaks = []
        for _ in range(2):
            k = int(np.argmax(p))
            peaks.append(f[k])
            p[max(0, k - 20) : k + 20] = 0.0
        assert abs(max(peaks) / min(peaks) - 5.0 / 3.0) < 0.01, (n, peaks)


def test_low_sample_rate_keeps_sound_below_nyquist() -> None:
    """At 8 kHz high oscillators are clamped and high cutoffs scaled: little piles up at the
    top (sizzle noise may reach it, tones must not)."""
    tonal = find("crickets") + find("glassy") + find("sixth") + find("digital")
    for i in range(N):
        f, p = spectrum(data.synth(i, 1.0, 0, 0, 8000), 8000)
        top = p[f > 3800].sum() / p.sum()
        assert top < (0.02 if i in tonal else 0.15), (i, top)


# ---------------------------------------------------------------- separability


def test_families_are_separable_by_a_nearest_centroid_classifier() -> None:
    train = [(i, features(x, SR)) for i, x in data.corpus(data.TRAIN_SEED, 6, 2.0, SR)]
    test = [(i, features(x, SR)) for i, x in data.corpus(data.HELDOUT_SEED, 3, 2.0, SR)]
    xs = np.stack([f for _, f in train])
    mean, std = xs.mean(0), xs.std(0) + 1e-6
    labels = np.array([i for i, _ in train])
    centroids = np.stack([((xs[labels == k] - mean) / std).mean(0) for k in range(N)])
    wrong = []
    for i, f in test:
        guess = int(np.argmin((((f - mean) / std - centroids) ** 2).sum(1)))
        if guess != i:
            wrong.append((i, guess))
    accuracy = 1.0 - len(wrong) / len(test)
    assert accuracy >= 0.95, (accuracy, wrong)
