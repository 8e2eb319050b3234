"""export.evaluate: metrics, the corpus classifier, offline clips, `evaluate` and `cicada eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("matplotlib")

from export import data  # noqa: E402
from export import evaluate as ev  # noqa: E402

RATE = 16000


def _tone(seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t + 1.0)]).astype(np.float32)


@pytest.fixture(scope="module")
def small_classifier() -> ev.SoundClassifier:
    """Fitted on 4 clips of 2 s per prompt at 16 kHz (a few seconds), validated on 2 unseen draws per prompt."""
    return ev.SoundClassifier().fit(seed=0, clips_per_prompt=4, seconds=2.0, sample_rate=RATE,
                                    heldout_clips_per_prompt=2)


# --------------------------------------------------------------------------- metrics


def test_si_snr() -> None:
    x = _tone()
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    assert ev.si_snr_db(x, x) > 60
    assert ev.si_snr_db(x, 0.25 * x) > 60  # scale-invariant
    assert ev.si_snr_db(x, x + 0.01 * noise) == pytest.approx(
        10 * np.log10((x[0] ** 2).mean() / 1e-4) / 2 + 10 * np.log10((x[1] ** 2).mean() / 1e-4) / 2, abs=0.5)
    assert ev.si_snr_db(x, noise) < -10
    delayed = np.pad(noise, ((0, 0), (37, 0)))[:, :-5]  # a decoder with 37 samples of latency, a shorter output
    assert ev.si_snr_db(noise, delayed) < -10
    assert ev.si_snr_db(noise, delayed, latency_samples=37) > 60


def test_mel_distance() -> None:
    x = _tone()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    assert ev.mel_distance(x, x, RATE) == 0.0
    d = [ev.mel_distance(x, x + a * noise, RATE) for a in (1e-3, 1e-2, 1e-1)]
    assert 0 < d[0] < d[1] < d[2]
    assert 0.0 < ev.mel_distance(x, 0.5 * x, RATE) <= 20 * np.log10(2) + 1e-6  # a 6 dB gain error (less: floor)
    assert ev.mel_distance(x, np.pad(x, ((0, 0), (100, 0))), RATE, latency_samples=100) == 0.0


def test_codec_metrics_identity_with_latency() -> None:
    def codec(clip: np.ndarray) -> np.ndarray:
        return np.pad(clip, ((0, 0), (64, 0)))

    m = ev.codec_metrics(codec, clips_per_prompt=1, seconds=0.5, latency_samples=64, sample_rate=RATE)
    assert m["clips"] == len(data.prompts()) and set(m["per_prompt"]) == set(data.prompts())
    assert m["si_snr_db"] > 60 and m["mel_distance"] == 0.0


# --------------------------------------------------------------------------- features and classifier


def test_features_deterministic_and_gain_invariant() -> None:
    x = data.synth(7, 2.0, 0, sample_rate=RATE)
    f = ev.features(x, RATE)
    assert f.shape == (len(ev.feature_names()),) and f.dtype == np.float32 and np.isfinite(f).all()
    np.testing.assert_array_equal(f, ev.features(x, RATE))
    np.testing.assert_allclose(ev.features(0.1 * x, RATE), f, atol=1e-3)
    assert np.isfinite(ev.features(np.zeros((2, RATE), np.float32), RATE)).all()  # silence
    assert np.isfinite(ev.features(x[:1, :100], RATE)).all()  # mono, shorter than a frame


def test_classifier_heldout_and_round_trip(small_classifier: ev.SoundClassifier, tmp_path: Path) -> None:
    clf = small_classifier
    assert clf.prompts == data.prompts()
    assert clf.heldout_accuracy >= 0.9
    path = clf.save(tmp_path / "clf.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["clf.npz"]  # written atomically, no temp file left
    back = ev.SoundClassifier.load(path)
    assert back.heldout_accuracy == clf.heldout_accuracy and back.config == clf.config
    for i in (0, 11, 21):
        x = data.synth(i, 3.0, data.HELDOUT_SEED, n=5, sample_rate=32000)  # resampled to the classifier's rate
        np.testing.assert_allclose(back.predict_proba(x, 32000), clf.predict_proba(x, 32000), atol=1e-6)
        assert back.predict(x, 32000) == clf.predict(x, 32000)


# --------------------------------------------------------------------------- generation and evaluate


def test_clip_equals_render(tiny_pack_dir: Path, tmp_path: Path) -> None:
    from engine.cli import main

    prompts = data.prompts()
    r = ev.ClipRenderer(tiny_pack_dir)
    r.clip(prompts[0], 0.3, 9)  # an earlier clip must not leak into the next one
    clip = r.clip(prompts[5], 0.5, 3)
    assert clip.shape == (2, 4000) and clip.dtype == np.float32
    out = tmp_path / "r.wav"
    assert main(["render", "--pack", str(tiny_pack_dir), "--seconds", "0.5", "--seed", "3",
                 "--prompt", prompts[5], "--out", str(out)]) == 0
    wav, rate = sf.read(out, dtype="float32", always_2d=True)
    np.testing.assert_array_equal(clip, wav.T)
    np.testing.assert_array_equal(ev.generate_clip(tiny_pack_dir, prompts[5], 0.5, 3), clip)


def test_evaluate_end_to_end(tiny_pack_dir: Path, tmp_path: Path, small_classifier: ev.SoundClassifier) -> None:
    def codec(clip: np.ndarray) -> np.ndarray:
        return clip + 1e-3

    res = ev.evaluate(tiny_pack_dir, clips_per_prompt=1, seconds=1.0, out_dir=tmp_path, codec=codec,
                      progress=False, classifier=small_classifier)
    K = len(data.prompts())
    assert set(res["per_prompt"]) == set(data.prompts())
    assert all(v in (0.0, 1.0) for v in res["per_prompt"].values())
    assert 0.0 <= res["text_match_min"] <= res["text_match_mean"] <= 1.0
    assert np.asarray(res["confusion"]).shape == (K, K) and np.asarray(res["confusion"]).sum() == K
    assert res["classifier_heldout_accuracy"] == small_classifier.heldout_accuracy
    assert res["si_snr_db"] > 20 and res["mel_distance"] >= 0.0
    assert res["clips_per_prompt"] == 1 and res["seconds"] == 1.0 and res["seconds_taken"] > 0
    png = Path(res["confusion_png"])
    assert png == tmp_path / "confusion.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))
    json.dumps(res)


def test_cli_eval_json(tiny_pack_dir: Path, tmp_path: Path, small_classifier: ev.SoundClassifier,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    # the CLI fits (and caches) a classifier with DEFAULT_FIT: make that the small one, already cached
    cfg = small_classifier.config
    monkeypatch.setattr(ev, "DEFAULT_FIT", {k: cfg[k] for k in ("seed", "clips_per_prompt", "seconds",
                                                                 "sample_rate", "heldout_clips_per_prompt")})
    small_classifier.save(tmp_path / "classifier.npz")
    preset = tmp_path / "steer.toml"
    preset.write_text('prompt = "Continuous, soft noise. Alarm like effect"\n[params]\nguidance = 2.5\ntop_k = 40\n')
    rc = main(["eval", "--pack", str(tiny_pack_dir), "--json", "--clips", "1", "--seconds", "0.5",
               "--out", str(tmp_path), "--preset", str(preset)])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    assert 0.0 <= res["text_match_mean"] <= 1.0 and res["mel_distance"] is None and res["si_snr_db"] is None
    assert res["clips_per_prompt"] == 1 and Path(res["confusion_png"]).is_file()
    assert res["preset"] == str(preset) and res["sampling"]["guidance"] == 2.5 and res["sampling"]["top_k"] == 40


def test_pack_reconstructor_hook(tiny_pack_dir: Path) -> None:
    assert ev.pack_reconstructor(tiny_pack_dir) is None  # no encoder.onnx in the pack (yet)


def test_cli_eval_without_extras(tiny_pack_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from engine.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["eval", "--pack", str(tiny_pack_dir), "--json"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "pip install -e '.[export]'" in err.err and len(err.err.strip().splitlines()) == 1
