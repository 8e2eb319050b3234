"""Generator: determinism, live prompt changes, morphing, providers; Stream: pipelining, NaN guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import pack as packfmt
from engine.conditioner import blend
from engine.generator import Generator, GeneratorError, GenParams
from engine.sampling import SamplingParams
from engine.stream import Stream
from tests.sinks import ListSink


@pytest.fixture(scope="module")
def pack(tiny_pack_dir: Path) -> packfmt.Pack:
    return packfmt.load(tiny_pack_dir)


def _blocks(gen: Generator, n: int) -> np.ndarray:
    return np.concatenate([gen.next_block().copy() for _ in range(n)], axis=1)


def test_same_seed_same_samples_different_seed_differs(pack: packfmt.Pack) -> None:
    p = GenParams(prompt=pack.prompts[0])
    a = _blocks(Generator(pack, seed=3, params=p), 40)
    b = _blocks(Generator(pack, seed=3, params=p), 40)
    c = _blocks(Generator(pack, seed=4, params=p), 40)
    assert a.shape == (pack.audio.channels, 40 * pack.audio.hop_length)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.abs(a).max() > 0


def test_prompt_change_keeps_the_past_and_changes_the_future(pack: packfmt.Pack) -> None:
    p0 = GenParams(prompt=pack.prompts[0])
    plain = Generator(pack, seed=1, params=p0)
    steered = Generator(pack, seed=1, params=p0)
    before_a, before_b = _blocks(plain, 20), _blocks(steered, 20)
    np.testing.assert_array_equal(before_a, before_b)
    steered.set_params(p0.with_changes(prompt=pack.prompts[5]))
    pos = steered.lm.position
    after_a, after_b = _blocks(plain, 30), _blocks(steered, 30)
    assert steered.lm.position > pos  # no reset: the context carried on
    assert steered.resets == 0
    assert not np.allclose(after_a, after_b)


def test_block_version_tags_the_first_frame_sampled_under_a_change(pack: packfmt.Pack) -> None:
    gen = Generator(pack, seed=0, params=GenParams(prompt=pack.prompts[0]))
    for _ in range(5):
        gen.next_codes()
    new = gen.params.with_changes(prompt=pack.prompts[1])
    gen.set_params(new)
    versions = []
    for _ in range(6):
        gen.next_codes()
        versions.append(gen.block_version)
    # frames already in the delay pattern finish under the old version, then the new one
    delay = gen.pattern.max_delay
    assert versions[:delay] == [0] * delay
    assert versions[delay:] == [new.version] * (6 - delay)


def test_morph_endpoints_are_the_prompts(pack: packfmt.Pack) -> None:
    gen = Generator(pack)
    a, b = gen.conditioner.encode(pack.prompts[0]), gen.conditioner.encode(pack.prompts[1])
    assert blend(a, b, 0.0) is a and blend(a, b, 1.0) is b
    mid = blend(a, b, 0.5)
    assert np.isfinite(mid.cross_k).all() and mid.cross_k.shape == a.cross_k.shape
    gen.set_params(GenParams(prompt=pack.prompts[0], prompt_b=pack.prompts[1], morph=0.5))
    gen.next_codes()
    np.testing.assert_allclose(gen.condition.cross_k, mid.cross_k)


def test_empty_prompt_is_the_null_condition(pack: packfmt.Pack) -> None:
    gen = Generator(pack, params=GenParams(prompt="  "))
    assert (gen.lm.cross_k == 0).all()
    assert gen.condition.text == ""


def test_bad_sampling_params_are_refused_and_nothing_changes(pack: packfmt.Pack) -> None:
    gen = Generator(pack)
    before = gen.params
    with pytest.raises(ValueError, match="top_p"):
        gen.set_params(GenParams(sampling=SamplingParams(top_p=2.0)))
    assert gen.params is before


def test_cuda_asked_for_but_missing_is_a_clear_error(pack: packfmt.Pack) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(GeneratorError, match="onnxruntime-gpu"):
        Generator(pack, compute="cuda")
    assert Generator(pack, compute="auto").providers == ["CPUExecutionProvider"]




def _render(pack: packfmt.Pack, samples: int, *, pipelined: bool, rate: int | None = None, seed: int = 2) -> np.ndarray:
    gen = Generator(pack, seed=seed, params=GenParams(prompt=pack.prompts[2]))
    sink = ListSink(rate or gen.sample_rate, gen.channels)
    Stream(gen, sink, pipelined=pipelined).render(samples)
    return sink.audio()


def test_stream_reports_its_write_gaps_and_queue_low_point(pack: packfmt.Pack) -> None:
    """What an underrun post-mortem reads from the status line: the longest wait between two blocks and the
    emptiest the queue was when one arrived, per window (each call starts a new one)."""
    gen = Generator(pack, seed=1, params=GenParams(prompt=pack.prompts[0]))
    sink = ListSink(gen.sample_rate, gen.channels)
    stream = Stream(gen, sink, pipelined=False)
    assert stream.take_window() == {"write_gap_ms_max": 0.0, "queue_ms_min": None}
    stream.render(20 * gen.block_samples)
    w = stream.take_window()
    assert w["write_gap_ms_max"] > 0.0 and w["queue_ms_min"] == 0.0  # ListSink plays at once: never queued
    assert stream.take_window() == {"write_gap_ms_max": 0.0, "queue_ms_min": None}


def test_pipelined_stream_equals_serial_and_is_exact_length(pack: packfmt.Pack) -> None:
    n = 50 * pack.audio.hop_length + 7
    a = _render(pack, n, pipelined=True)
    b = _render(pack, n, pipelined=False)
    assert a.shape == (n, pack.audio.channels)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and np.abs(a).max() <= 10 ** (-1 / 20) + 1e-6


def test_stream_resamples_to_the_sink_rate(pack: packfmt.Pack) -> None:
    rate = pack.audio.sample_rate * 3 // 2
    out = _render(pack, rate, pipelined=True, rate=rate)
    assert out.shape == (rate, pack.audio.channels)
    np.testing.assert_array_equal(out, _render(pack, rate, pipelined=True, rate=rate))


def test_nan_from_the_model_is_silenced_counted_and_recovered(pack: packfmt.Pack) -> None:
    gen = Generator(pack, seed=0, params=GenParams(prompt=pack.prompts[0]))
    real = gen.decode
    calls = {"n": 0}

    def flaky(codes: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        pcm = real(codes)
        if calls["n"] == 10:
            return np.full_like(pcm, np.nan)
        return pcm

    gen.decode = flaky  # type: ignore[method-assign]
    sink = ListSink(gen.sample_rate, gen.channels)
    stream = Stream(gen, sink)
    stream.render(40 * gen.block_samples)
    out = sink.audio()
    assert np.isfinite(out).all()
    assert stream.nonfinite_blocks == 1
    assert gen.resets == 1
    assert np.abs(out[-10 * gen.block_samples :]).max() > 0  # sound came back


def test_sessions_are_checked_against_the_manifest(pack_copy: Path) -> None:
    """The engine loads manifests without parsing graphs; opening a session still refuses a mismatch."""
    import shutil

    shutil.copy(pack_copy / "conditioner.onnx", pack_copy / "lm.onnx")  # a valid graph, the wrong one
    p = packfmt.load(pack_copy, check_graphs=False)
    with pytest.raises(packfmt.PackError, match="lm.onnx: the manifest declares input 'tokens'"):
        Generator(p)
