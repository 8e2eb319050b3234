"""MIDI input: learn, soft takeover, 14-bit and relative knobs, notes, programs, clock, panic, garbage.

The first half feeds raw bytes straight into :meth:`MidiInput.feed` (no port, exact and fast). The second
half is the acceptance test through a real MIDI connection: a private ``jackd --no-realtime -d dummy``
(tests/jack_server.py), the engine's input as a virtual JACK MIDI port, and a second rtmidi client in the
test as the "controller", connected by port name. Every wait there polls with a timeout.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mido
import numpy as np
import pytest
import tomli_w

from engine import pack as packfmt
from engine.audio import NullSink, _Player
from engine.control.controller import Controller
from engine.control.midi import CCMapping, MidiError, MidiInput, MidiMap, list_ports, split_messages
from engine.generator import Generator, GenParams
from engine.params import ParamError, Registry
from engine.stream import Stream
from tests.jack_server import JackServer, jack_server, jackd_available


@pytest.fixture(scope="module")
def pack(tiny_pack_dir: Path) -> packfmt.Pack:
    return packfmt.load(tiny_pack_dir)


def _controller(pack: packfmt.Pack, presets_dir: Path | None = None, **values: Any) -> Controller:
    reg = Registry(values={"prompt": pack.prompts[0], "slot_1": pack.prompts[1], "slot_2": pack.prompts[2],
                           **values})
    gen = Generator(pack, seed=0, params=GenParams(prompt=pack.prompts[0]))
    return Controller(reg, gen, presets_dir=presets_dir)


@pytest.fixture
def ctl(pack: packfmt.Pack) -> Iterator[Controller]:
    c = _controller(pack)
    yield c
    c.close()


def cc(control: int, value: int, channel: int = 0) -> list[int]:
    return mido.Message("control_change", channel=channel, control=control, value=value).bytes()


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------------------
# bytes -> messages
# ------------------------------------------------------------------------------------------------------------


def test_valid_messages_split_as_mido_parses_them() -> None:
    rnd = random.Random(5)

    def r(n: int = 128) -> int:
        return rnd.randrange(n)

    makers: list[Callable[[int], mido.Message]] = [
        lambda ch: mido.Message("note_on", channel=ch, note=r(), velocity=r()),
        lambda ch: mido.Message("note_off", channel=ch, note=r()),
        lambda ch: mido.Message("control_change", channel=ch, control=r(), value=r()),
        lambda ch: mido.Message("program_change", channel=ch, program=r()),
        lambda ch: mido.Message("pitchwheel", channel=ch, pitch=r(16384) - 8192),
        lambda ch: mido.Message("aftertouch", channel=ch, value=r()),
        lambda ch: mido.Message("polytouch", channel=ch, note=r(), value=r()),
        lambda ch: mido.Message("clock"),
        lambda ch: mido.Message("start"),
        lambda ch: mido.Message("songpos", pos=r(16384)),
        lambda ch: mido.Message("sysex", data=[r() for _ in range(r(6))]),
    ]
    msgs = [rnd.choice(makers)(r(16)) for _ in range(300)]
    for m in msgs:
        got = list(split_messages(m.bytes()))
        assert got == [(None, tuple(m.bytes()))]
        assert mido.Message.from_bytes(list(got[0][1])) == m
    # running status within one event, and real-time bytes in the middle of a message
    assert list(split_messages([0xB0, 1, 2, 3, 4])) == [(None, (0xB0, 1, 2)), (None, (0xB0, 3, 4))]
    assert list(split_messages([0x90, 0xF8, 60, 100])) == [(None, (0xF8,)), (None, (0x90, 60, 100))]


def test_garbage_is_classified() -> None:
    def kinds(data: list[Any]) -> list[str | None]:
        return [k for k, _ in split_messages(data)]

    assert kinds([0x45, 0x30]) == ["running_status"]
    assert kinds([0xB0, 21]) == ["truncated"]
    assert kinds([0x90, 200]) == ["bad_data", "truncated"]  # 200 = 0xC8 is a status byte, itself cut short
    assert kinds([0xF0, 1, 2]) == ["sysex"]
    # rtmidi glues events behind an unterminated SysEx until an 0xF7: what is inside is recovered
    assert kinds([0xF0, 1, 2, 0xB0, 1, 2, 0xF8, 0xF7]) == ["sysex", None, None, "sysex"]
    assert kinds([0xF4]) == ["unknown_status"] and kinds([0xFD]) == ["unknown_status"]
    assert kinds([0xB0, 300, 1]) == ["not_bytes"] and kinds(["x"]) == ["not_bytes"]
    assert kinds([]) == []


# ------------------------------------------------------------------------------------------------------------
# the mapping as data
# ------------------------------------------------------------------------------------------------------------


def test_mapping_round_trips_through_toml() -> None:
    m = MidiMap(cc=[CCMapping("morph", 21), CCMapping("temperature", 1, channel=3, mode="14bit", low=0.5, high=2.0),
                    CCMapping("top_k", 40, mode="relative", step=8.0), CCMapping("gain_db", 7, pickup=False)],
                note_base=48, note_channel=9, programs=False, panic_cc=[123])
    text = tomli_w.dumps({"midi": m.to_dict()})
    back = MidiMap.from_dict(tomllib.loads(text)["midi"])
    assert back == m and back.to_dict() == m.to_dict()
    assert MidiMap.from_dict({}) == MidiMap()
    assert "low" not in CCMapping("morph", 1).to_dict()  # no None in a TOML document


@pytest.mark.parametrize("doc, words", [
    ({"cc": [{"param": "morph"}]}, "midi.cc[0]: missing key 'control'"),
    ({"cc": [{"param": "morph", "control": 200}]}, "midi.cc[0].control = 200 is out of range 0..127"),
    ({"cc": [{"param": "morph", "control": 40, "mode": "14bit"}]}, "out of range 0..31"),
    ({"cc": [{"param": "morph", "control": 1, "mode": "fast"}]}, "midi.cc[0].mode must be one of"),
    ({"cc": [{"param": "morph", "control": 1, "chanel": 2}]}, "unknown key 'chanel'"),
    ({"cc": [{"param": "morph", "control": 1, "channel": 16}]}, "channel = 16 is out of range -1..15"),
    ({"cc": [{"param": "morph", "control": 1, "step": 0}]}, "step must be > 0"),
    ({"cc": [{"param": "morph", "control": 1}, {"param": "guidance", "control": 33, "channel": 2},
             {"param": "temperature", "control": 1, "mode": "14bit"}]}, "midi.cc[2] (temperature)"),
    ({"cc": {"param": "morph"}}, "midi.cc must be a list"),
    ({"note_base": "C4"}, "midi.note_base must be a whole number"),
    ({"panic_cc": [123, 999]}, "midi.panic_cc"),
    ({"progams": True}, "unknown key 'progams'"),
])
def test_bad_mapping_names_the_key(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        MidiMap.from_dict(doc)


def test_mapping_must_name_a_knob_parameter(ctl: Controller) -> None:
    with pytest.raises(ValueError, match=r"midi.cc\[0\]: prompt is text"):
        MidiInput(ctl, mapping=MidiMap(cc=[CCMapping("prompt", 1)]))
    with pytest.raises(ValueError, match="unknown parameter 'tempreature'"):
        MidiInput(ctl, mapping=MidiMap(cc=[CCMapping("tempreature", 1)]))
    midi = MidiInput(ctl)
    with pytest.raises(ParamError, match="slot_1 is text"):
        midi.learn("slot_1")


# ------------------------------------------------------------------------------------------------------------
# behaviour, fed byte by byte
# ------------------------------------------------------------------------------------------------------------


def test_learn_then_follow_then_pickup_after_a_change_from_elsewhere(ctl: Controller) -> None:
    reg = ctl.registry
    midi = MidiInput(ctl)
    learned: list[CCMapping] = []
    midi.on_learn.append(learned.append)
    midi.learn("temperature")
    assert midi.learning == "temperature"
    midi.feed(cc(21, 40, channel=2))
    assert midi.learning is None and reg.get("temperature") == 1.0  # learning binds, it does not set
    assert midi.mapping.to_dict()["cc"] == [{"param": "temperature", "control": 21, "channel": 2,
                                             "mode": "absolute"}]
    assert learned and learned[0].param == "temperature"
    midi.feed(cc(21, 127, channel=2))
    assert reg.get("temperature") == 4.0
    midi.feed(cc(21, 0, channel=5))  # another channel: not this knob
    assert reg.get("temperature") == 4.0
    midi.feed(cc(21, 0, channel=2))
    assert reg.get("temperature") == 0.0
    # OSC moves it to 2.0 (knob position 63.5); the knob, at 0, does not jump it
    reg.set("temperature", 2.0, "osc")
    for v in (5, 20, 40, 60):
        midi.feed(cc(21, v, channel=2))
        assert reg.get("temperature") == 2.0
    assert midi.stats()["ignored"]["pickup"] == 4
    midi.feed(cc(21, 70, channel=2))  # crossed 63.5: picked up, follows from here
    assert reg.get("temperature") == pytest.approx(70 / 127 * 4)
    midi.feed(cc(21, 10, channel=2))
    assert reg.get("temperature") == pytest.approx(10 / 127 * 4)
    # coming within the tolerance also picks up (no crossing needed)
    reg.set("temperature", 1.0, "gui")  # at 31.75; the knob is at 10
    midi.feed(cc(21, 25, channel=2))
    assert reg.get("temperature") == 1.0
    midi.feed(cc(21, 30, channel=2))  # 1.75 steps away, not across
    assert reg.get("temperature") == pytest.approx(30 / 127 * 4)
    s = midi.stats()
    assert s["learned"] == 1 and s["mappings"] == 1 and s["malformed"] == {}


def test_mapping_from_a_preset_waits_for_pickup_and_pickup_false_jumps(ctl: Controller) -> None:
    reg = ctl.registry
    midi = MidiInput(ctl, mapping=MidiMap(cc=[CCMapping("guidance", 7), CCMapping("morph", 8, pickup=False)]))
    midi.feed(cc(7, 127))
    assert reg.get("guidance") == 3.0  # 3.0 is at 38.1: far away, position unknown before
    midi.feed(cc(7, 30))  # crossed it
    assert reg.get("guidance") == pytest.approx(30 / 127 * 10)
    midi.feed(cc(8, 127))
    assert reg.get("morph") == 1.0


def test_fourteen_bit_pair_learn_and_value(ctl: Controller) -> None:
    reg = ctl.registry
    midi = MidiInput(ctl)
    learned: list[CCMapping] = []
    midi.on_learn.append(learned.append)
    midi.learn("guidance")
    midi.feed(cc(1, 64))
    midi.feed(cc(33, 0))  # its LSB at once: a 14-bit control
    assert midi.mapping.cc[0].mode == "14bit" and midi.mapping.cc[0].control == 1
    assert [m.mode for m in learned] == ["14bit", "14bit"]  # told twice (bound, then found to be a pair)
    assert reg.get("guidance") == 3.0
    midi.feed(cc(1, 100))  # MSB waits for its LSB
    assert reg.get("guidance") == 3.0
    midi.feed(cc(33, 77))
    assert reg.get("guidance") == pytest.approx(((100 << 7) | 77) / 16383 * 10)
    midi.feed(cc(33, 78))  # fine moves send the LSB only
    assert reg.get("guidance") == pytest.approx(((100 << 7) | 78) / 16383 * 10)
    # a device that sends only MSBs still works (from its second message on)
    midi.feed(cc(1, 110))
    midi.feed(cc(1, 111))
    assert reg.get("guidance") == pytest.approx((111 << 7) / 16383 * 10)
    # a plain 7-bit knob on CC 2 is not turned into a pair by an unrelated CC
    midi.learn("morph")
    midi.feed(cc(2, 10))
    midi.feed(cc(40, 10))
    assert midi.mapping.to_dict()["cc"][-1]["mode"] == "absolute"


def test_relative_encoders(ctl: Controller) -> None:
    reg = ctl.registry
    midi = MidiInput(ctl, mapping=MidiMap(cc=[CCMapping("guidance", 10, mode="relative"),
                                              CCMapping("top_k", 11, mode="relative64", step=10.0),
                                              CCMapping("quantize", 12, mode="relative")]))
    midi.feed(cc(10, 1))  # two's complement: +1 tick = 10/127
    assert reg.get("guidance") == pytest.approx(3.0 + 10 / 127)
    midi.feed(cc(10, 125))  # -3 ticks
    assert reg.get("guidance") == pytest.approx(3.0 - 2 * 10 / 127)
    reg.set("guidance", 9.99, "osc")  # relative knobs go on from wherever the value is, and stop at the end
    midi.feed(cc(10, 5))
    assert reg.get("guidance") == 10.0
    midi.feed(cc(11, 66))  # offset 64: +2 ticks of 10
    assert reg.get("top_k") == 270
    midi.feed(cc(11, 61))
    assert reg.get("top_k") == 240
    midi.feed(cc(12, 1))
    assert reg.get("quantize") == "beat"
    midi.feed(cc(12, 127))
    assert reg.get("quantize") == "off"


def test_notes_select_slots_and_programs_load_presets(pack: packfmt.Pack, tmp_path: Path) -> None:
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        (tmp_path / f"{name}.toml").write_text(f'prompt = "{pack.prompts[i + 3]}"\n[params]\ntemperature = 0.{i + 1}\n')
    (tmp_path / "zeta.toml").write_text("prompt = 12\n")  # broken: counted, never raised
    ctl = _controller(pack, presets_dir=tmp_path)
    reg = ctl.registry
    midi = MidiInput(ctl)
    midi.feed(mido.Message("note_on", note=61, velocity=90).bytes())
    assert reg.get("prompt") == pack.prompts[2]  # note_base 60 + 1 -> slot 2
    midi.feed(mido.Message("note_on", note=62, velocity=90).bytes())  # slot 3 is empty: refused, counted
    midi.feed(mido.Message("note_on", note=60, velocity=0).bytes())  # velocity 0 is a note-off
    assert reg.get("prompt") == pack.prompts[2]
    midi.feed(mido.Message("program_change", program=1).bytes())
    assert ctl.preset_name == "beta" and reg.get("temperature") == pytest.approx(0.2)
    assert reg.get("prompt") == pack.prompts[4]
    midi.feed(mido.Message("program_change", program=3).bytes())  # zeta: broken
    midi.feed(mido.Message("program_change", program=40).bytes())  # no such preset
    assert ctl.preset_name == "beta"
    ignored = midi.stats()["ignored"]
    assert ignored["slot_refused"] == 1 and ignored["note_off"] == 1
    assert ignored["preset_error"] == 1 and ignored["program_out_of_range"] == 1
    ctl.close()


def test_a_preset_with_a_midi_table_brings_its_mappings(pack: packfmt.Pack, tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(f'prompt = "{pack.prompts[3]}"\n')  # no [midi]: bindings stay
    (tmp_path / "b.toml").write_text(f'prompt = "{pack.prompts[4]}"\n[midi]\nnote_base = 36\n'
                                     '[[midi.cc]]\nparam = "guidance"\ncontrol = 74\nchannel = 1\n')
    ctl = _controller(pack, presets_dir=tmp_path)
    midi = MidiInput(ctl, mapping=MidiMap(cc=[CCMapping("morph", 1)]))
    live = midi.mapping
    saved = midi.mapping.to_dict  # what the app hands the controller for saving presets
    midi.feed(mido.Message("program_change", program=0).bytes())
    assert ctl.preset_name == "a" and [m.param for m in midi.mapping.cc] == ["morph"]
    midi.feed(mido.Message("program_change", program=1).bytes())
    assert ctl.preset_name == "b" and midi.mapping is live
    assert saved()["cc"] == [{"param": "guidance", "control": 74, "channel": 1, "mode": "absolute"}]
    assert saved()["note_base"] == 36
    midi.feed(cc(74, 38, channel=1))  # a preset's mapping starts in pickup: 3.0 is at 38.1 -> within tolerance
    midi.feed(cc(74, 64, channel=1))
    assert ctl.registry.get("guidance") == pytest.approx(64 / 127 * 10)
    assert midi.unbind("guidance") and midi.mapping.cc == [] and not midi.unbind("guidance")
    midi.stop()
    assert midi._on_action not in ctl.on_action
    ctl.close()


def test_panic_ccs_and_garbage(ctl: Controller, caplog: pytest.LogCaptureFixture) -> None:
    actions: list[str] = []
    ctl.on_action.append(lambda action, info: actions.append(action))
    midi = MidiInput(ctl)
    midi.feed(cc(123, 0))
    midi.feed(cc(120, 0, channel=9))
    assert actions == ["panic", "panic"]
    midi.learn("morph")
    midi.feed(cc(123, 0))  # the panic is never learned
    assert midi.learning == "morph" and actions[-1] == "panic"
    midi.cancel_learn()
    with caplog.at_level(logging.WARNING, logger="cicada.midi"):
        for data in ([0xF0, 1, 2], [0x45, 0x30], [0x90, 200], [0xF5], [0xB0, 21], None, [1.5, 2]):
            midi.feed(data)  # type: ignore[arg-type]
    s = midi.stats()
    assert s["malformed"]["sysex"] == 1 and s["malformed"]["running_status"] == 1
    assert s["malformed"]["bad_data"] == 1 and s["malformed"]["unknown_status"] == 1
    assert s["malformed"]["truncated"] == 2 and s["malformed"]["not_bytes"] == 1 and s["malformed"]["error"] == 1
    summaries = [r for r in caplog.records if "malformed MIDI" in r.getMessage()]
    assert len(summaries) == 1  # one summary line, not one per message (the next one after LOG_EVERY_S)
    for _ in range(50):
        midi.feed(None)  # type: ignore[arg-type]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_clock_sets_tempo_and_marks_bars(ctl: Controller) -> None:
    beats: list[float] = []
    real_beat = ctl.beat
    ctl.beat = lambda: (beats.append(time.monotonic()), real_beat())  # type: ignore[method-assign]
    writes: list[str] = []
    ctl.registry.subscribe(lambda c: writes.append(c.source), names=["tempo_bpm"])
    midi = MidiInput(ctl)
    midi.feed([0xFA])
    tick = 60.0 / (140 * 24)
    rnd = random.Random(1)
    last = 0.0
    for k in range(1, 8 * 24 + 1):  # 8 beats, each tick's timestamp up to 3 ms early or late
        t = k * tick + rnd.uniform(-0.003, 0.003)
        midi.feed([0xF8], t - last)
        last = t
    assert ctl.registry.get("tempo_bpm") == pytest.approx(140, abs=0.6)
    assert midi.stats()["clock_bpm"] == pytest.approx(140, abs=0.6)
    assert writes and set(writes) == {"midi-clock"} and len(writes) <= 3  # only when it moves by > 0.5 BPM
    assert len(beats) == 3  # Start, and the bar lines at ticks 0 and 96
    # the clock stops, a new one runs at 90 BPM
    midi.feed([0xFC])
    for _ in range(6 * 24):
        midi.feed([0xF8], 60.0 / (90 * 24))
    assert ctl.registry.get("tempo_bpm") == pytest.approx(90, abs=0.6)


# ------------------------------------------------------------------------------------------------------------
# acceptance: through JACK MIDI
# ------------------------------------------------------------------------------------------------------------

needs_jack = pytest.mark.skipif(not jackd_available(), reason="needs jackd and the JACK-Client package")


@pytest.fixture(scope="module")
def midi_server() -> Iterator[JackServer]:
    """One private JACK dummy server for the MIDI tests; libjack clients find it through the environment."""
    if not jackd_available():
        pytest.skip("needs jackd and the JACK-Client package")
    with pytest.MonkeyPatch.context() as mp, jack_server(rate=48000, period=256, sync=False) as srv:
        for k, v in srv.env().items():
            mp.setenv(k, v)
        yield srv


class Sender:
    """The test's "controller": an rtmidi JACK MIDI output port."""

    def __init__(self, name: str) -> None:
        import rtmidi

        self.out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=name)
        self.out.open_virtual_port("out")
        self.lock = threading.Lock()

    def send(self, data: list[int]) -> None:
        with self.lock:
            self.out.send_message(data)

    def close(self) -> None:
        self.out.close_port()
        self.out.delete()


@pytest.fixture
def wired(midi_server: JackServer, pack: packfmt.Pack, tmp_path: Path
          ) -> Iterator[tuple[MidiInput, Sender, Controller]]:
    """The engine's virtual JACK MIDI input, connected by name to the test's output port."""
    import jack

    for i, name in enumerate(["alpha", "beta"]):
        (tmp_path / f"{name}.toml").write_text(f'prompt = "{pack.prompts[i + 3]}"\n[params]\nguidance = {i + 5}.0\n')
    ctl = _controller(pack, presets_dir=tmp_path)
    midi = MidiInput(ctl, virtual="cicada-test-in", api="jack", client_name="cicada-test")
    midi.start()
    sender = Sender("cicada-test-knobs")
    client = jack.Client("cicada-test-wiring", servername=midi_server.name, no_start_server=True)
    try:
        wait_for(lambda: bool(client.get_ports("cicada-test-in", is_midi=True, is_input=True)), what="the port")
        dst = client.get_ports("cicada-test-in", is_midi=True, is_input=True)[0].name
        src = client.get_ports("cicada-test-knobs", is_midi=True, is_output=True)[0].name
        client.connect(src, dst)
        # the connection is live once a message gets through
        wait_for(lambda: (sender.send([0xFE]), midi.stats()["messages"] > 0)[1], what="the first message")
        yield midi, sender, ctl
    finally:
        midi.stop()
        sender.close()
        client.close()
        ctl.close()


@needs_jack
@pytest.mark.timeout(120)
def test_through_jack_learn_pickup_program_garbage_clock(wired: tuple[MidiInput, Sender, Controller]) -> None:
    midi, sender, ctl = wired
    reg = ctl.registry
    # learn: the next CC that moves binds
    midi.learn("temperature")
    sender.send(cc(21, 40))
    wait_for(lambda: midi.learning is None, what="the mapping")
    assert midi.mapping.cc[0].param == "temperature" and midi.mapping.cc[0].control == 21
    # move it: the parameter follows
    sender.send(cc(21, 100))
    wait_for(lambda: reg.get("temperature") == pytest.approx(100 / 127 * 4), what="temperature to follow")
    # OSC sets it; the knob elsewhere is ignored until it crosses the value, then follows
    reg.set("temperature", 2.0, "osc")
    for v in (110, 120):
        before = midi.stats()["ignored"].get("pickup", 0)
        sender.send(cc(21, v))
        wait_for(lambda b=before: midi.stats()["ignored"].get("pickup", 0) > b, what="the knob to be ignored")
        assert reg.get("temperature") == 2.0
    sender.send(cc(21, 50))  # crosses 63.5
    wait_for(lambda: reg.get("temperature") == pytest.approx(50 / 127 * 4), what="pickup")
    sender.send(cc(21, 52))
    wait_for(lambda: reg.get("temperature") == pytest.approx(52 / 127 * 4), what="following after pickup")
    # program change 1 -> the second preset (sorted)
    sender.send(mido.Message("program_change", program=1).bytes())
    wait_for(lambda: ctl.preset_name == "beta", what="the preset")
    assert reg.get("guidance") == 6.0
    assert reg.get("temperature") == 1.0  # the preset's sound: sampling values it leaves out are defaults
    # ... so the knob (at 52; 1.0 is at 31.75) has to pick the value up again
    before = midi.stats()["ignored"].get("pickup", 0)
    sender.send(cc(21, 60))
    wait_for(lambda: midi.stats()["ignored"].get("pickup", 0) > before, what="the knob to be ignored")
    assert reg.get("temperature") == 1.0
    sender.send(cc(21, 30))
    wait_for(lambda: reg.get("temperature") == pytest.approx(30 / 127 * 4), what="pickup after the preset")
    # garbage: counted and dropped; the input goes on
    for data in ([0xF0, 0x7E, 0x01, 0xF7], [0x45, 0x30], [0xB0, 21], [0xF5], [0x90, 200]):
        sender.send(data)
    wait_for(lambda: sum(midi.stats()["malformed"].values()) >= 5, what="the garbage to be counted")
    s = midi.stats()
    assert s["ignored"]["sysex"] == 1 and s["malformed"]["running_status"] == 1
    sender.send(cc(21, 28))
    wait_for(lambda: reg.get("temperature") == pytest.approx(28 / 127 * 4), what="input after garbage")
    # MIDI clock at 24 ppq, 140 BPM, sent on a schedule (late ticks catch up); poll until the tempo settles
    tick = 60.0 / (140 * 24)
    sender.send([0xFA])
    t0 = time.monotonic()
    k = 0
    while time.monotonic() - t0 < 30.0:
        k += 1
        time.sleep(max(0.0, t0 + k * tick - time.monotonic()))
        sender.send([0xF8])
        if k > 8 * 24 and abs(float(reg.get("tempo_bpm")) - 140.0) < 1.5:
            break
    assert reg.get("tempo_bpm") == pytest.approx(140.0, abs=1.5), midi.stats()
    assert midi.stats()["clock_bpm"] == pytest.approx(140.0, abs=1.5)
    assert "error" not in midi.stats()["malformed"] and midi.running


@needs_jack
@pytest.mark.timeout(120)
def test_through_jack_all_notes_off_panics_and_the_output_fades(midi_server: JackServer, pack: packfmt.Pack,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """CC 123 -> Controller.panic(): what the (null) device plays is exact zeros within 50 ms."""
    played: list[np.ndarray] = []
    play = _Player.__call__

    def recording(self: _Player, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        play(self, outdata, frames, time_info, status)
        played.append(outdata.copy())

    monkeypatch.setattr(_Player, "__call__", recording)  # the NullSink's consumer thread plays in this process
    ctl = _controller(pack)
    sink = NullSink(pack.audio.sample_rate, pack.audio.channels)
    sink.start()
    stream = Stream(ctl.gen, sink, latency_ms=60.0)
    ctl.attach(stream)
    at_panic: list[int] = []
    ctl.on_action.append(lambda action, info: at_panic.append(len(played)) if action == "panic" else None)
    # this time the engine opens the test's port by (part of) its name
    sender = Sender("Cicada-Test-Pads")
    midi = MidiInput(ctl, port="test-pads", api="jack", client_name="cicada-test")
    assert any(p.startswith("Cicada-Test-Pads:") for p in list_ports("jack"))
    stream.start()
    try:
        with pytest.raises(MidiError, match=r"no MIDI input matching 'nanoKONTROL'; available: .*Cicada-Test-Pads"):
            MidiInput(ctl, port="nanoKONTROL", api="jack").start()
        midi.start()
        assert midi.port_name and "Cicada-Test-Pads" in midi.port_name
        wait_for(lambda: any(np.abs(b).max() > 0 for b in played[-20:]), what="sound")
        # rtmidi connects the ports in the background: the connection is live once a message gets through
        wait_for(lambda: (sender.send([0xFE]), midi.stats()["messages"] > 0)[1], what="the first message")
        sender.send(cc(123, 0))
        wait_for(lambda: ctl.panicking, timeout=30.0, what="the panic")  # patient on a busy machine
        assert stream.safety.is_panicking and at_panic
        wait_for(lambda: sum(b.shape[0] for b in played[at_panic[0]:]) > 0.2 * sink.rate, what="output after panic")
        after = played[at_panic[0]:]
        heard = np.concatenate(after)
        loud = np.flatnonzero(np.abs(heard).max(axis=1) > 0)
        # the chunk being played when the panic came may be whole; from then on, zeros within 50 ms
        limit = after[0].shape[0] + 0.05 * sink.rate
        assert loud.size == 0 or loud[-1] < limit, f"sound {loud[-1]} samples after the panic (limit {limit:.0f})"
    finally:
        midi.stop()
        stream.stop()
        sink.stop(fade=False)
        sender.close()
        ctl.close()


def test_no_midi_system_is_a_clear_error(ctl: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /dev/snd/seq and with no JACK server running: say so, and what to do."""
    if Path("/dev/snd/seq").exists():
        pytest.skip("this machine has an ALSA sequencer")
    monkeypatch.setenv("JACK_DEFAULT_SERVER", f"cicada-no-such-server-{id(ctl)}")
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    with pytest.raises(MidiError, match="no JACK server is running"):
        MidiInput(ctl, virtual="x").start()
    with pytest.raises(MidiError, match="--midi-in NAME"):
        MidiInput(ctl).start()
