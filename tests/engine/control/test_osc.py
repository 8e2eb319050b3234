"""OSC over real UDP on 127.0.0.1: replies, refusals, feedback, allow-list, engine effect, and a fuzz flood.

The client side is python-osc (an encoder and decoder independent of the server's own codec).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from engine import pack as packfmt
from engine.audio import NullSink
from engine.control.controller import Controller
from engine.control.osc import (
    _OSCQUERY_HINT_PORT,
    MAX_BUNDLE_DEPTH,
    OscDecodeError,
    OscError,
    OscServer,
    allow_networks,
    decode_packet,
    encode_message,
)
from engine.generator import Generator, GenParams
from engine.params import ParamError, Registry
from engine.stream import Stream
from tests.sinks import ListSink

Reply = tuple[str, list[Any]]


# ------------------------------------------------------------------------------------------------------------
# helpers (also used by test_oscquery.py)
# ------------------------------------------------------------------------------------------------------------


def build(address: str, *args: Any, types: str | None = None) -> bytes:
    """An OSC message built by python-osc; ``types`` forces the type tags (e.g. ``"d"`` for a double)."""
    b = OscMessageBuilder(address)
    for i, a in enumerate(args):
        b.add_arg(a, types[i] if types else None)
    return b.build().dgram


class Client:
    """A UDP socket that sends to the server and reads the replies on the same port."""

    def __init__(self, port: int, bind: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.target = ("127.0.0.1", port)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, address: str, *args: Any, types: str | None = None) -> None:
        self.sock.sendto(build(address, *args, types=types), self.target)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def recv(self, timeout: float = 3.0) -> Reply | None:
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data, _ = self.sock.recvfrom(65536)
        except TimeoutError:
            return None
        msg = OscMessage(data)
        return msg.address, msg.params

    def collect(self, n: int, timeout: float = 3.0) -> list[Reply]:
        out: list[Reply] = []
        end = time.monotonic() + timeout
        while len(out) < n and (left := end - time.monotonic()) > 0:
            r = self.recv(left)
            if r is None:
                break
            out.append(r)
        return out

    def ask(self, address: str, *args: Any, n: int = 1, timeout: float = 3.0, types: str | None = None) -> list[Reply]:
        """Send, then collect ``n`` replies (fewer if ``timeout`` passes first)."""
        self.send(address, *args, types=types)
        return self.collect(n, timeout)

    def wait_for(self, pred: Callable[[Reply], bool], timeout: float = 3.0) -> Reply | None:
        """The first message ``pred`` accepts (others are skipped), or None after ``timeout``."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            r = self.recv(left)
            if r is None:
                return None
            if pred(r):
                return r
        return None

    def drain(self) -> list[Reply]:
        return self.collect(10**6, timeout=0.1)


def make_controller(pack: packfmt.Pack, presets_dir: Path | None = None, seed: int = 5, **values: Any) -> Controller:
    prompt = pack.prompts[0]
    gen = Generator(pack, seed=seed, params=GenParams(prompt=prompt))
    return Controller(Registry(values={"prompt": prompt, **values}), gen, presets_dir=presets_dir)




@pytest.fixture(scope="module")
def pack(tiny_pack_dir: Path) -> packfmt.Pack:
    return packfmt.load(tiny_pack_dir)


@pytest.fixture
def ctl(pack: packfmt.Pack, tmp_path: Path) -> Iterator[Controller]:
    c = make_controller(pack, presets_dir=tmp_path / "presets")
    yield c
    c.close()


@pytest.fixture
def osc(ctl: Controller) -> Iterator[OscServer]:
    server = OscServer(ctl, port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(osc: OscServer) -> Iterator[Client]:
    with Client(osc.port) as c:
        yield c


# ------------------------------------------------------------------------------------------------------------
# codec
# ------------------------------------------------------------------------------------------------------------


def test_codec_reads_python_osc_and_python_osc_reads_it() -> None:
    dgram = build("/a/b", 1, 2.5, "text", b"\x00\x01\x02", True, False, None, 2**40, 0.25, types="ifsbTFNhd")
    assert decode_packet(dgram) == [("/a/b", (1, 2.5, "text", b"\x00\x01\x02", True, False, None, 2**40, 0.25))]
    inner = OscBundleBuilder(IMMEDIATELY)
    inner.add_content(OscMessageBuilder("/x").build())
    outer = OscBundleBuilder(IMMEDIATELY)
    outer.add_content(OscMessageBuilder("/first").build())
    outer.add_content(inner.build())
    assert decode_packet(outer.build().dgram) == [("/first", ()), ("/x", ())]

    ours = encode_message("/r", 7, -1.5, "héllo", b"abcde", True, False, None, 2**40)
    assert OscMessage(ours).params == [7, -1.5, "héllo", b"abcde", True, False, None, 2**40]
    assert decode_packet(encode_message("/none")) == [("/none", ())]
    assert decode_packet(b"/old\x00\x00\x00\x00") == [("/old", ())]  # no type tag string: no arguments


def _bundle(*elements: bytes, prefix: bytes = b"#bundle\x00" + bytes(7) + b"\x01") -> bytes:
    return prefix + b"".join(struct.pack(">i", len(e)) + e for e in elements)


@functools.cache
def _nested(depth: int) -> bytes:
    data = _bundle(build("/cicada/ping"))
    for _ in range(depth - 1):
        data = _bundle(data)
    return data


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty"),
        (b"hello", "not_osc"),
        (b"/cicada/ping", "truncated"),  # no NUL
        (b"/ab\x00,f\x00\x00\x00\x00", "truncated"),  # float cut off
        (b"/ab\x00f\x00\x00\x00", "bad_type_tag"),  # no comma
        (b"/ab\x00,[f]", "truncated"),
        (b"/ab\x00,[\x00\x00", "bad_type_tag"),  # arrays are refused
        (b"/ab\x00,Q\x00\x00", "bad_type_tag"),
        (b"/ab\x00,s\x00\x00\xff\xfe\x00\x00", "bad_string"),
        (b"/ab\x00,b\x00\x00\x00\x00\x01\x00", "bad_blob"),
        (b"/ab\x00,b\x00\x00\xff\xff\xff\xf0", "bad_blob"),
        (b"/a b\x00\x00\x00\x00", "bad_address"),
        (b"#bundle\x00\x00", "truncated"),
        (_bundle(b"/x\x00\x00", prefix=b"#bundle\x00" + bytes(8))[:-2], "bad_bundle"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", -4) + b"/x\x00\x00", "bad_bundle"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", 4000) + b"/x\x00\x00", "bad_bundle"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", 3) + b"/x\x00\x00", "bad_bundle"),
        (_bundle(b"zzzz"), "bad_bundle"),
        (_nested(MAX_BUNDLE_DEPTH + 1), "too_deep"),
        (_nested(3000), "too_deep"),  # python-osc would recurse until RecursionError
        (_bundle(*[b"/x\x00\x00"] * 300), "too_many"),
    ],
)
def test_codec_refuses_bad_datagrams_by_kind(data: bytes, kind: str) -> None:
    with pytest.raises(OscDecodeError) as info:
        decode_packet(data)
    assert info.value.kind == kind


def test_codec_takes_bundles_nested_up_to_the_limit() -> None:
    assert decode_packet(_nested(MAX_BUNDLE_DEPTH)) == [("/cicada/ping", ())]


# ------------------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------------------


def test_setting_a_parameter_replies_the_applied_value(osc: OscServer, ctl: Controller, client: Client) -> None:
    assert client.ask("/cicada/temperature", 0.5) == [("/cicada/temperature", [0.5])]
    assert ctl.registry.get("temperature") == 0.5
    assert ctl.gen.params.sampling.temperature == 0.5
    assert client.ask("/cicada/top_k", 40.4) == [("/cicada/top_k", [40])]  # a float for an int: rounded
    assert client.ask("/cicada/guidance", 2, types="i") == [("/cicada/guidance", [2.0])]
    assert client.ask("/cicada/morph", 0.25, types="d") == [("/cicada/morph", [0.25])]
    prompt = ctl.gen.pack.prompts[3]
    assert client.ask("/cicada/prompt", prompt) == [("/cicada/prompt", [prompt])]
    assert ctl.gen.params.prompt == prompt
    # no argument: the current value
    assert client.ask("/cicada/top_k") == [("/cicada/top_k", [40])]
    assert client.ask("/cicada/quantize") == [("/cicada/quantize", ["off"])]
    assert osc.stats()["replies"] == 7 and osc.stats()["valid"] == 7


def test_on_off_takes_true_false_and_numbers(client: Client, ctl: Controller) -> None:
    assert client.ask("/cicada/mute", True) == [("/cicada/mute", [True])]
    assert ctl.registry.get("mute") is True
    assert client.ask("/cicada/mute", 0, types="i") == [("/cicada/mute", [False])]
    assert client.ask("/cicada/mute", 1.0) == [("/cicada/mute", [True])]
    assert client.ask("/cicada/mute", False) == [("/cicada/mute", [False])]


def test_a_clamped_value_is_applied_with_a_warning(client: Client, ctl: Controller) -> None:
    replies = client.ask("/cicada/temperature", 9.0, n=2)
    assert replies[0] == ("/cicada/temperature", [4.0])
    assert replies[1][0] == "/cicada/warning"
    assert replies[1][1][0] == "/cicada/temperature" and "out of range" in replies[1][1][1]
    assert ctl.registry.get("temperature") == 4.0


@pytest.mark.parametrize(
    ("address", "args", "types", "says"),
    [
        ("/cicada/prompt", ("zzqx wibble",), None, "no word of the prompt"),
        ("/cicada/temperature", ("hot",), None, "is a number"),
        ("/cicada/temperature", (math.nan,), None, "finite"),
        ("/cicada/temperature", (math.inf,), "d", "finite"),
        ("/cicada/temperature", (0.5, 0.6), None, "takes one value"),
        ("/cicada/temperature", (b"\x00" * 60000,), None, "is a number"),
        ("/cicada/prompt", (3,), None, "is text"),
        ("/cicada/prompt", ("crackle " * 1000,), None, "longer than"),
        ("/cicada/mute", (None,), None, "on/off"),
        ("/cicada/quantize", ("sometimes",), None, "must be one of"),
        ("/cicada/top_k", (True,), None, "is a number"),
    ],
)
def test_a_refused_value_gets_an_error_and_changes_nothing(
    client: Client, ctl: Controller, address: str, args: tuple[Any, ...], types: str | None, says: str
) -> None:
    before = dict(ctl.registry.snapshot().values)
    version = ctl.registry.version
    replies = client.ask(address, *args, types=types, n=2, timeout=0.3)
    assert len(replies) == 1, replies
    (reply_address, (where, text)) = replies[0]
    assert reply_address == "/cicada/error" and where == address
    assert says in text
    assert len(text) <= 1500
    assert ctl.registry.version == version and dict(ctl.registry.snapshot().values) == before


def test_unknown_addresses_get_an_error_that_says_where_to_look(client: Client, osc: OscServer) -> None:
    for address in ("/cicada/temprature", "/cicada/", "/other/thing", "/cicada/preset/delete"):
        [(reply_address, (where, text))] = client.ask(address, 1.0)
        assert reply_address == "/cicada/error" and where == address
        assert "unknown address" in text and f"GET http://127.0.0.1:{_OSCQUERY_HINT_PORT}/" in text
    [(_, (_, text))] = client.ask("/cicada/temprature", 1.0)
    assert "did you mean /cicada/temperature" in text
    assert osc.stats()["errors"]["unknown_address"] == 5


def test_a_bundle_applies_every_message_and_answers_each(client: Client, ctl: Controller) -> None:
    b = OscBundleBuilder(IMMEDIATELY)
    b.add_content(_msg("/cicada/temperature", 0.7))
    b.add_content(_msg("/cicada/top_k", 12))
    client.send_raw(b.build().dgram)
    assert client.collect(2) == [("/cicada/temperature", [pytest.approx(0.7)]), ("/cicada/top_k", [12])]
    assert ctl.registry.get("top_k") == 12


def _msg(address: str, *args: Any) -> OscMessage:
    return OscMessage(build(address, *args))


def test_undecodable_packets_are_counted_and_answered_only_when_the_address_decoded(
    client: Client, osc: OscServer
) -> None:
    client.send_raw(b"\xff\xfe garbage")
    client.send_raw(b"/cicada/temperature\x00,Q\x00\x00")
    [(address, (where, text))] = client.collect(2, timeout=0.3)
    assert address == "/cicada/error" and where == "/cicada/temperature" and "could not decode" in text
    assert osc.stats()["invalid"] == {"not_osc": 1, "bad_type_tag": 1}
    assert client.ask("/cicada/ping") == [("/cicada/pong", [])]


def test_aliases_map_a_controllers_own_addresses_to_parameters(ctl: Controller) -> None:
    server = OscServer(ctl, port=0, aliases={"/1/fader1": "morph"})
    server.start()
    try:
        with Client(server.port) as c:
            assert c.ask("/1/fader1", 0.5) == [("/1/fader1", [0.5])]
            assert ctl.registry.get("morph") == 0.5
            ctl.osc_aliases = {"/1/toggle1": "mute", "/1/bad": "nothing"}  # type: ignore[attr-defined]
            assert c.ask("/1/toggle1", 1.0) == [("/1/toggle1", [True])]
            assert ctl.registry.get("mute") is True
            [(address, (where, text))] = c.ask("/1/bad", 1.0)
            assert address == "/cicada/error" and where == "/1/bad" and "[osc]" in text
        with pytest.raises(ParamError):
            server.set_aliases({"/2/x": "volume"})
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------------------
# actions
# ------------------------------------------------------------------------------------------------------------


def test_ping_select_panic_status(client: Client, ctl: Controller) -> None:
    assert client.ask("/cicada/ping") == [("/cicada/pong", [])]
    assert client.ask("/cicada/ping", 0, timeout=0.5) == []  # a button's release: ignored
    [(_, (_, text))] = client.ask("/cicada/select", 2)
    assert "slot 2 is empty" in text
    prompt = ctl.gen.pack.prompts[4]
    client.ask("/cicada/slot_2", prompt)
    assert client.ask("/cicada/select", 2, n=2) == [("/cicada/select", [2]), ("/cicada/prompt", [prompt])]
    assert ctl.registry.get("prompt") == prompt
    [(_, (_, text))] = client.ask("/cicada/select", 1.5)
    assert "whole number" in text

    events: list[str] = []
    ctl.on_action.append(lambda action, info: events.append(action))
    assert client.ask("/cicada/panic") == [("/cicada/panic", [1])]
    assert client.ask("/cicada/panic", False) == [("/cicada/panic", [0])]
    assert client.ask("/cicada/panic", 1) == [("/cicada/panic", [1])]
    assert client.ask("/cicada/resume") == [("/cicada/panic", [0])]
    assert events == ["panic", "resume", "panic", "resume"]

    [(address, (doc,))] = client.ask("/cicada/status")
    status = json.loads(doc)
    assert address == "/cicada/status" and status["version"] == ctl.registry.version and "peak_db" in status


def test_start_and_stop_call_the_controller(client: Client, ctl: Controller) -> None:
    calls: list[str] = []
    ctl.start = lambda: calls.append("start")  # type: ignore[attr-defined]
    ctl.stop = lambda: calls.append("stop")  # type: ignore[attr-defined]
    assert client.ask("/cicada/stop") == [("/cicada/running", [0])]
    assert client.ask("/cicada/start", 1.0) == [("/cicada/running", [1])]
    assert calls == ["stop", "start"]


def test_presets_save_list_load(client: Client, ctl: Controller, tmp_path: Path) -> None:
    client.ask("/cicada/temperature", 0.3)
    [(address, (name, path))] = client.ask("/cicada/preset/save", "osc-test", "saved over OSC")
    assert address == "/cicada/preset/saved" and name == "osc-test" and Path(path).is_file()
    assert Path(path).parent == tmp_path / "presets"
    [(address, names)] = client.ask("/cicada/preset/list")
    assert address == "/cicada/preset/list" and "osc-test" in names
    client.ask("/cicada/temperature", 2.0)
    assert client.ask("/cicada/preset/load", "osc-test") == [("/cicada/preset/loaded", ["osc-test"])]
    assert ctl.registry.get("temperature") == pytest.approx(0.3)
    [(address, (where, text))] = client.ask("/cicada/preset/load", "no-such-preset")
    assert address == "/cicada/error" and where == "/cicada/preset/load"
    [(address, (_, text))] = client.ask("/cicada/preset/save", "bad/name")
    assert address == "/cicada/error" and "preset name" in text


# ------------------------------------------------------------------------------------------------------------
# feedback
# ------------------------------------------------------------------------------------------------------------


def test_a_subscriber_hears_changes_others_make_and_the_meters(osc: OscServer, ctl: Controller) -> None:
    with Client(osc.port) as a, Client(osc.port) as b:
        assert b.ask("/cicada/subscribe") == [("/cicada/subscribed", [30.0])]
        # a new subscriber first gets every value, then the panic state and the status
        dump = b.collect(len(ctl.registry.names()) + 2)
        assert [m[0] for m in dump[:-2]] == [f"/cicada/{n}" for n in ctl.registry.names()]
        assert dump[-2] == ("/cicada/panic", [0]) and dump[-1][0] == "/cicada/status"

        assert a.ask("/cicada/guidance", 4.5) == [("/cicada/guidance", [4.5])]
        assert b.wait_for(lambda m: m[0] == "/cicada/guidance") == ("/cicada/guidance", [4.5])
        a.ask("/cicada/panic")
        assert b.wait_for(lambda m: m[0] == "/cicada/panic") == ("/cicada/panic", [1])
        meter = b.wait_for(lambda m: m[0] == "/cicada/meter")
        assert meter is not None and len(meter[1]) == 4 and all(isinstance(v, float) for v in meter[1])
        spectrum = b.wait_for(lambda m: m[0] == "/cicada/spectrum")
        assert spectrum is not None and len(np.frombuffer(spectrum[1][0], "<f4")) == 64
        assert b.wait_for(lambda m: m[0] == "/cicada/status", timeout=2.5) is not None
        # the one who made a change gets its reply, not a second copy as feedback
        b.send("/cicada/top_k", 77)
        assert b.wait_for(lambda m: m[0] == "/cicada/top_k") == ("/cicada/top_k", [77])
        assert b.wait_for(lambda m: m[0] == "/cicada/top_k", timeout=0.3) is None

        b.send("/cicada/unsubscribe")
        assert b.wait_for(lambda m: m[0] == "/cicada/unsubscribed") is not None
        assert osc.stats()["subscribers"] == 0
        b.drain()
        a.ask("/cicada/guidance", 1.5)
        assert b.wait_for(lambda m: m[0] in ("/cicada/guidance", "/cicada/meter"), timeout=0.5) is None


def test_feedback_to_another_port_lapses_and_the_number_of_subscribers_is_capped(ctl: Controller) -> None:
    server = OscServer(ctl, port=0, lease_s=0.6, max_subscribers=2)
    server.start()
    try:
        with Client(server.port) as a, Client(server.port) as listener, Client(server.port) as c:
            assert a.ask("/cicada/subscribe", listener.port) == [("/cicada/subscribed", [pytest.approx(0.6)])]
            assert listener.recv() == ("/cicada/subscribed", [pytest.approx(0.6)])
            assert listener.wait_for(lambda m: m[0] == "/cicada/meter") is not None
            assert server.subscribers() == [("127.0.0.1", listener.port)]
            c.ask("/cicada/subscribe")
            [(address, (_, text))] = a.ask("/cicada/subscribe")
            assert address == "/cicada/error" and "too many subscribers (2)" in text
            time.sleep(1.0)  # no renewal: both lapse
            assert server.stats()["subscribers"] == 0
            listener.drain()
            assert listener.wait_for(lambda m: m[0] == "/cicada/meter", timeout=0.4) is None
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------------------
# who may talk
# ------------------------------------------------------------------------------------------------------------


def can_bind(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not can_bind("127.0.0.2"), reason="needs 127.0.0.2 on the loopback interface (Linux)")
def test_clients_not_allowed_are_dropped_and_counted(ctl: Controller, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cicada.osc")
    server = OscServer(ctl, port=0)  # loopback: 127.0.0.1 only
    server.start()
    try:
        with Client(server.port, bind="127.0.0.2") as stranger, Client(server.port) as local:
            assert stranger.ask("/cicada/temperature", 0.2, timeout=0.3) == []
            assert local.ask("/cicada/ping") == [("/cicada/pong", [])]
            assert ctl.registry.get("temperature") == 1.0
            assert server.stats()["dropped_not_allowed"] == 1
    finally:
        server.stop()
    assert any("not allowed (127.0.0.2 1" in r.getMessage() for r in caplog.records)
    server = OscServer(ctl, port=0, allow=["127.0.0.2/32"])
    server.start()
    try:
        with Client(server.port, bind="127.0.0.2") as friend:
            assert friend.ask("/cicada/temperature", 0.2) == [("/cicada/temperature", [pytest.approx(0.2)])]
    finally:
        server.stop()


def test_listening_beyond_loopback_needs_an_allow_list_and_a_free_port(ctl: Controller) -> None:
    with pytest.raises(OscError, match="--osc-allow"):
        OscServer(ctl, host="0.0.0.0", port=0).start()
    with pytest.raises(OscError, match="not an IP address or network"):
        OscServer(ctl, port=0, allow=["my phone"]).start()
    with pytest.raises(OscError, match="1..65535"):
        OscServer(ctl, port=70000).start()
    assert allow_networks("0.0.0.0", ["192.168.1.0/24"])[-1] == ipaddress.ip_network("192.168.1.0/24")
    first = OscServer(ctl, port=0)
    first.start()
    try:
        with pytest.raises(OscError, match=rf"port {first.port} on 127.0.0.1 is in use.*--osc-port") as info:
            OscServer(ctl, port=first.port).start()
        assert isinstance(info.value, OSError)
    finally:
        first.stop()


# ------------------------------------------------------------------------------------------------------------
# the engine hears it
# ------------------------------------------------------------------------------------------------------------


def _render(ctl: Controller, samples: int) -> np.ndarray:
    sink = ListSink(ctl.gen.sample_rate, ctl.gen.channels)
    stream = Stream(ctl.gen, sink)
    ctl.attach(stream)
    stream.render(samples)
    return sink.audio()


def test_an_osc_change_changes_what_the_engine_renders(pack: packfmt.Pack) -> None:
    n = pack.audio.sample_rate  # 1 s
    plain = make_controller(pack, seed=9)
    by_hand = make_controller(pack, seed=9)
    by_osc = make_controller(pack, seed=9)
    by_hand.registry.set("prompt", pack.prompts[6], "test")
    by_hand.registry.set("temperature", 0.4, "test")
    server = OscServer(by_osc, port=0)
    server.start()
    try:
        with Client(server.port) as c:
            assert c.ask("/cicada/prompt", pack.prompts[6]) == [("/cicada/prompt", [pack.prompts[6]])]
            assert c.ask("/cicada/temperature", 0.4) == [("/cicada/temperature", [pytest.approx(0.4)])]
        a, b, o = _render(plain, n), _render(by_hand, n), _render(by_osc, n)
    finally:
        server.stop()
    assert a.shape == b.shape == o.shape == (n, pack.audio.channels)
    np.testing.assert_array_equal(o, b)  # OSC does exactly what a direct registry change does
    assert not np.allclose(o, a)
    assert np.abs(o).max() > 0


# ------------------------------------------------------------------------------------------------------------
# robustness: a flood of garbage and valid messages while a stream plays
# ------------------------------------------------------------------------------------------------------------

FUZZ_PACKETS = 100_000
UDP_MAX = 65507  # the largest UDP payload over IPv4
VALID_PACKETS = 10_000
_TAGS = "ifsbTFNhdtcrmSI[]{}xyz?\x7f ,"


def _valid_messages(pack: packfmt.Pack) -> list[bytes]:
    prompts = list(pack.prompts[:6])
    out = [
        build("/cicada/temperature", 0.9), build("/cicada/temperature", 1.2), build("/cicada/top_k", 100),
        build("/cicada/top_k", 5000), build("/cicada/guidance", 3.5), build("/cicada/morph", 0.0),
        build("/cicada/gain_db", -3.0), build("/cicada/gain_db", 50.0), build("/cicada/mute", False),
        build("/cicada/top_p", 0.9), build("/cicada/seed", 12), build("/cicada/temperature"),
        build("/cicada/ping"), build("/cicada/status"), build("/cicada/select", 1), build("/cicada/nothing", 1),
        build("/cicada/slot_1", prompts[1]), build("/cicada/prompt_b", prompts[2]),
        *(build("/cicada/prompt", p) for p in prompts),
    ]
    b = OscBundleBuilder(IMMEDIATELY)
    b.add_content(_msg("/cicada/temperature", 1.1))
    b.add_content(_msg("/cicada/ping"))
    out.append(b.build().dgram)
    return out


def _fuzz(rng: random.Random, valid: list[bytes]) -> bytes:
    """One random or mutated datagram (at most 65507 bytes, the UDP limit)."""
    r = rng.random()
    v = rng.choice(valid)
    if r < 0.20:  # random bytes, sometimes looking like OSC
        head = rng.choice([b"", b"/", b"/cicada/", b"#bundle\x00"])
        return head + rng.randbytes(rng.randint(0, 200))
    if r < 0.35:  # a valid message cut short
        return v[: rng.randrange(len(v))]
    if r < 0.50:  # a few bytes changed
        b = bytearray(v)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if r < 0.60:  # bad type tags
        address = rng.choice([b"/cicada/temperature", b"/cicada/prompt", b"/cicada/mute", b"/x"])
        tags = "".join(rng.choice(_TAGS) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.7:
            tags = "," + tags
        return _pad(address) + _pad(tags.encode("utf-8", "replace")) + rng.randbytes(rng.randint(0, 40))
    if r < 0.61:  # huge
        size = rng.randint(8_000, 65_000)
        kind = rng.randrange(5)
        if kind == 0:
            return rng.randbytes(size)
        if kind == 1:  # (packed here: python-osc's builder re-reads strings byte by byte)
            return _pad(b"/cicada/prompt") + _pad(b",s") + _pad(b"crackle " * (size // 8))
        if kind == 2:
            return _pad(b"/cicada/temperature") + _pad(b",b") + struct.pack(">i", size) + _pad(rng.randbytes(size))
        if kind == 3:
            return _pad(b"/" + b"a" * size) + b",f\x00\x00" + bytes(4)
        return _bundle(*[build("/cicada/ping")] * (size // 24))
    if r < 0.71:  # bundles with bad sizes, garbage, deep nesting
        kind = rng.randrange(4)
        if kind == 0:
            e = rng.choice(valid)
            size = rng.choice([-4, -1, 0, 3, len(e) + 4, 2**31 - 1, len(e) - 1])
            return b"#bundle\x00" + bytes(8) + struct.pack(">i", size) + e
        if kind == 1:
            return _bundle(rng.choice(valid), _pad(rng.randbytes(rng.randint(1, 60))))
        if kind == 2:
            return _nested(rng.choice([2, 8, 9, 50, 1000, 3000]))
        return _bundle(*(rng.choice(valid) for _ in range(rng.randint(0, 5))))[: rng.randint(8, 400)]
    if r < 0.86:  # NaN, inf, wrong types, too many arguments
        return rng.choice(_wrong_typed())
    # unknown addresses
    name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz/_") for _ in range(rng.randint(1, 30)))
    return _pad(("/" + name).encode()) + b",f\x00\x00" + struct.pack(">f", rng.random())


@functools.cache
def _wrong_typed() -> list[bytes]:
    out = []
    for address in ("/cicada/temperature", "/cicada/top_k", "/cicada/mute", "/cicada/prompt", "/cicada/guidance",
                    "/cicada/select", "/cicada/morph", "/cicada/gain_db"):
        for value, t in [
            (math.nan, "f"), (math.inf, "f"), (-math.inf, "d"), (math.nan, "d"), (1e300, "d"), (-(2**63), "h"),
            (2**63 - 1, "h"), ("word", "s"), (b"blob", "b"), (None, "N"), (True, "T"), (3.0, "f"), (-7, "i"),
        ]:
            out.append(build(address, value, types=t))
            out.append(build(address, value, 1, types=t + "i"))
    return out


def _pad(b: bytes) -> bytes:
    return b + b"\x00" * (4 - len(b) % 4)


def test_a_flood_of_garbage_and_valid_messages_while_the_stream_plays(
    pack: packfmt.Pack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ctl = make_controller(pack, presets_dir=tmp_path / "presets", latency_ms=300.0)
    gen = ctl.gen
    sink = NullSink(gen.sample_rate, gen.channels, realtime=True)
    stream = Stream(gen, sink, latency_ms=300.0)
    ctl.attach(stream)
    server = OscServer(ctl, port=0)
    rng = random.Random(1234)
    valid = _valid_messages(pack)
    sink.start()
    stream.start()
    server.start()
    t0 = time.monotonic()
    try:
        while stream.written_samples < sink.rate * 0.3:  # primed
            time.sleep(0.01)
        caplog.clear()
        order = [True] * VALID_PACKETS + [False] * FUZZ_PACKETS
        rng.shuffle(order)
        sent = 0
        with Client(server.port) as flood:
            flood.sock.setblocking(False)
            for i, is_valid in enumerate(order):
                data = rng.choice(valid) if is_valid else _fuzz(rng, valid)[:UDP_MAX]
                try:
                    flood.sock.sendto(data, flood.target)
                    sent += 1
                except (BlockingIOError, OSError):
                    pass  # a full send buffer: a dropped datagram, as UDP does
                if i % 64 == 63:  # bursts of 64, then let the server catch up a little
                    end = time.monotonic() + 0.02
                    while sent - server.stats()["received"] > 64 and time.monotonic() < end:
                        time.sleep(0.0005)
        flood_s = time.monotonic() - t0
        # the server is alive and answers the next valid message
        time.sleep(0.2)
        with Client(server.port) as probe:
            answered = any(probe.ask("/cicada/ping", timeout=1.0) == [("/cicada/pong", [])] for _ in range(5))
            assert answered
            assert probe.ask("/cicada/temperature", 0.75) == [("/cicada/temperature", [0.75])]
        stats = server.stats()
        sink_stats = stream.stats()
        assert server.running and stream.running
    finally:
        server.stop()
        stream.stop()
        sink.stop()
        ctl.close()
    print(f"flood: {sent} sent in {flood_s:.1f} s; server stats {stats}")
    assert stats["received"] > 0.5 * sent
    assert stats["valid"] > 0.5 * VALID_PACKETS
    assert {"truncated", "bad_type_tag", "not_osc", "bad_bundle", "too_deep", "too_many"} <= set(stats["invalid"])
    assert stats["internal_errors"] == 0
    assert sink_stats["sink_underruns"] == 0, sink_stats
    assert ctl.registry.get("latency_ms") == 300.0
    # the log: summaries only (at most one per 5 s, plus the one at stop), no traceback
    osc_records = [r for r in caplog.records if r.name == "cicada.osc"]
    assert len(osc_records) <= 3 + flood_s / 5, [r.getMessage() for r in osc_records]
    assert not any(r.exc_info for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "cicada.osc"]


def test_prompts_and_midi_learn_without_a_midi_input(client: Client, ctl: Controller) -> None:
    [(address, prompts)] = client.ask("/cicada/prompts")
    assert address == "/cicada/prompts" and prompts == list(ctl.gen.pack.prompts)
    [(address, (where, text))] = client.ask("/cicada/midi/learn", "morph")
    assert address == "/cicada/error" and where == "/cicada/midi/learn" and "--midi-in" in text

    learned: list[str] = []

    class FakeMidi:  # stands in for MidiInput.learn only; the MIDI path itself is tested in test_midi.py
        def learn(self, param: str) -> None:
            learned.append(param)

    ctl.midi = FakeMidi()
    assert client.ask("/cicada/midi/learn", "morph") == [("/cicada/midi/learning", ["morph"])]
    assert learned == ["morph"]
    [(address, (_, text))] = client.ask("/cicada/midi/learn", "loudness")
    assert address == "/cicada/error" and "unknown parameter" in text


def test_a_preset_loaded_over_osc_sends_its_values_to_the_subscribed_asker(osc: OscServer, ctl: Controller) -> None:
    with Client(osc.port) as a:
        a.ask("/cicada/temperature", 0.3)
        a.ask("/cicada/preset/save", "echo-test")
        a.ask("/cicada/temperature", 2.0)
        a.ask("/cicada/subscribe", n=1)
        time.sleep(0.5)
        a.drain()  # the first dump of every value
        a.send("/cicada/preset/load", "echo-test")
        got = a.wait_for(lambda r: r[0] == "/cicada/temperature")
        assert got is not None and got[1] == [pytest.approx(0.3)]
