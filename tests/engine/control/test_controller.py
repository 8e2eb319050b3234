"""Controller: registry changes reach the generator and the output; actions; refusals change nothing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from engine import pack as packfmt
from engine.audio import NullSink
from engine.control.controller import Controller, Meter
from engine.generator import Generator, GenParams
from engine.params import ParamError, Registry
from engine.stream import Stream


@pytest.fixture(scope="module")
def pack(tiny_pack_dir: Path) -> packfmt.Pack:
    return packfmt.load(tiny_pack_dir)


def _controller(pack: packfmt.Pack, **values: object) -> Controller:
    reg = Registry(values={"prompt": pack.prompts[0], **values})
    gen = Generator(pack, seed=int(reg.get("seed")), params=GenParams(prompt=str(reg.get("prompt"))))
    return Controller(reg, gen)


def _render(ctl: Controller, blocks: int) -> np.ndarray:
    return np.concatenate([ctl.gen.next_block().copy() for _ in range(blocks)], axis=1)


def test_sampling_and_prompt_changes_reach_the_generator(pack: packfmt.Pack) -> None:
    ctl = _controller(pack)
    ctl.registry.set("temperature", 0.5, "test")
    ctl.registry.set("top_k", 10, "test")
    assert ctl.gen.params.sampling.temperature == 0.5 and ctl.gen.params.sampling.top_k == 10
    ctl.registry.set("prompt", pack.prompts[3], "test")
    ctl.gen.next_block()
    assert ctl.gen.condition.text == pack.prompts[3]
    assert ctl.gen.params.version == ctl.registry.version


def test_a_prompt_with_no_known_word_is_refused_and_changes_nothing(pack: packfmt.Pack) -> None:
    ctl = _controller(pack)
    before = ctl.registry.snapshot()
    with pytest.raises(ParamError, match="no word"):
        ctl.registry.set("prompt", "zzzq xxyy", "test")
    assert ctl.registry.snapshot() is before
    assert ctl.gen.params.prompt == pack.prompts[0]


def test_clamped_value_applies_the_clamp_and_warns(pack: packfmt.Pack) -> None:
    ctl = _controller(pack)
    change = ctl.registry.set("guidance", 99.0, "test")
    assert change.value == 10.0 and change.warning and "out of range" in change.warning
    assert ctl.gen.params.sampling.guidance == 10.0


def test_changes_alter_the_render_and_same_values_repeat_it(pack: packfmt.Pack) -> None:
    a = _render(_controller(pack, seed=5), 20)
    b = _render(_controller(pack, seed=5), 20)
    ctl = _controller(pack, seed=5)
    ctl.registry.set("temperature", 3.0, "test")
    c = _render(ctl, 20)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_seed_change_restarts_the_draw_sequence(pack: packfmt.Pack) -> None:
    ctl = _controller(pack, seed=1)
    ctl.registry.set("seed", 9, "test")
    first = ctl.gen.rng.random()
    assert first == np.random.default_rng(9).random()


def test_morph_glides_to_its_target(pack: packfmt.Pack) -> None:
    ctl = _controller(pack, prompt_b=pack.prompts[1])
    ctl.registry.set("morph", 1.0, "test")
    seen = set()
    deadline = time.monotonic() + 3.0
    while ctl.gen.params.morph < 1.0 and time.monotonic() < deadline:
        seen.add(round(ctl.gen.params.morph, 3))
        time.sleep(0.005)
    assert ctl.gen.params.morph == 1.0
    assert any(0.0 < m < 1.0 for m in seen)  # it passed through values in between


def test_select_recalls_a_slot_and_refuses_empty_or_missing_ones(pack: packfmt.Pack) -> None:
    ctl = _controller(pack, slot_2=pack.prompts[4])
    ctl.select(2)
    assert ctl.registry.get("prompt") == pack.prompts[4]
    with pytest.raises(ParamError, match="empty"):
        ctl.select(3)
    with pytest.raises(ParamError, match="slots are 1..8"):
        ctl.select(9)


def test_quantized_prompt_change_waits_for_the_beat(pack: packfmt.Pack) -> None:
    ctl = _controller(pack, quantize="beat", tempo_bpm=120.0)
    ctl.beat()
    t0 = time.monotonic()
    ctl.registry.set("prompt", pack.prompts[2], "test")
    assert ctl.gen.params.prompt == pack.prompts[0]  # not yet
    ctl.registry.set("temperature", 0.7, "test")  # other changes go through at once, the prompt still waits
    assert ctl.gen.params.sampling.temperature == 0.7 and ctl.gen.params.prompt == pack.prompts[0]
    while ctl.gen.params.prompt != pack.prompts[2] and time.monotonic() - t0 < 2.0:
        time.sleep(0.005)
    waited = time.monotonic() - t0
    assert ctl.gen.params.prompt == pack.prompts[2]
    assert 0.3 < waited < 1.0  # the next beat at 120 BPM is 0.5 s after the mark


def test_gain_mute_panic_latency_and_status_on_a_stream(pack: packfmt.Pack) -> None:
    reg = Registry(values={"prompt": pack.prompts[0], "gain_db": -6.0})
    gen = Generator(pack, seed=0, params=GenParams(prompt=pack.prompts[0]))
    sink = NullSink(gen.sample_rate, gen.channels, realtime=True)
    sink.start()
    stream = Stream(gen, sink)
    ctl = Controller(reg, gen, stream)
    try:
        assert stream.safety.gain_db == -6.0
        stream.start()
        deadline = time.monotonic() + 5
        while gen.steps < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        reg.set("mute", True, "test")
        assert stream.safety.gain_db == -np.inf
        reg.set("mute", False, "test")
        assert stream.safety.gain_db == -6.0
        reg.set("latency_ms", 120.0, "test")
        assert stream.latency_ms == 120.0
        reg.set("ceiling_db", -12.0, "test")
        deadline = time.monotonic() + 5
        while stream.safety.ceiling_db != -12.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.safety.ceiling_db == -12.0 and stream.ceiling_db == -12.0
        ctl.panic()
        assert ctl.panicking
        ctl.resume()
        status = ctl.status()
        assert status["running"] and status["steps"] >= 20
        assert status["rtf"] is not None and status["buffer_ms"] >= 0
        assert len(status["peak_db"]) == gen.channels
        ctl.stop()
        assert not stream.running
        ctl.start()
        steps = gen.steps
        deadline = time.monotonic() + 5
        while gen.steps <= steps + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gen.steps > steps + 5  # generation resumed after stop/start
    finally:
        stream.stop()
        sink.stop(fade=False)
        ctl.close()


def test_preset_save_and_load_through_the_controller(pack: packfmt.Pack, tmp_path: Path) -> None:
    ctl = _controller(pack, temperature=0.4, prompt_b=pack.prompts[2], morph=0.5)
    ctl.presets_dir = tmp_path
    ctl.osc_aliases = {"/1/fader1": "morph"}
    path = ctl.save_preset("mine", "test preset")
    assert path.parent == tmp_path
    ctl.registry.update({"temperature": 2.0, "prompt_b": "", "morph": 0.0})
    ctl.load_preset("mine")
    assert ctl.registry.get("temperature") == 0.4
    assert ctl.registry.get("prompt_b") == pack.prompts[2]
    assert ctl.osc_aliases == {"/1/fader1": "morph"}
    assert ctl.preset_name == "mine"


def test_a_preset_without_sampling_gets_the_packs_own(pack: packfmt.Pack, tmp_path: Path) -> None:
    """Sampling a preset leaves out goes back to the pack's ``[sampling]``, not to the registry's defaults."""
    import dataclasses

    ctl = _controller(pack, temperature=2.0, guidance=6.0)
    ctl.gen.pack = dataclasses.replace(pack, sampling={"temperature": 0.8, "guidance": 1.25})
    (tmp_path / "plain.toml").write_text(f'name = "plain"\nprompt = "{pack.prompts[1]}"\n')
    ctl.presets_dir = tmp_path
    ctl.load_preset("plain")
    assert ctl.registry.get("temperature") == 0.8 and ctl.registry.get("guidance") == 1.25
    assert ctl.gen.params.sampling.guidance == 1.25


def test_meter_levels_and_spectrum_follow_the_signal() -> None:
    m = Meter(32000, 2)
    t = np.arange(3000) / 32000
    tone = np.stack([0.5 * np.sin(2 * np.pi * 1000 * t), np.zeros_like(t)], axis=1).astype(np.float32)
    m.feed(tone[:700])
    m.feed(tone[700:])
    lv = m.levels()
    assert abs(lv["peak_db"][0] - 20 * np.log10(0.5)) < 0.1 and lv["peak_db"][1] == -120.0
    spec = m.spectrum(64)
    edges = np.geomspace(30, 16000, 65)
    band = int(np.searchsorted(edges, 1000.0)) - 1
    assert spec.shape == (64,) and int(np.argmax(spec)) == band
