"""The panel's engine client (no Qt) against the engine's real OSC (UDP) and OSCQuery (HTTP) servers over a
controller of the tiny pack: a tree snapshot that is overtaken by newer values never wins over them, and the
periodic re-read of the tree heals a control whose feedback datagram was lost."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import gui.client
from engine import pack as packfmt
from engine.control.controller import Controller
from engine.control.osc import OscServer
from engine.control.oscquery import OscQueryServer
from engine.generator import Generator, GenParams
from engine.params import Registry
from gui.client import PREFIX, EngineClient, ParamInfo

WAIT_S = 20.0  # generous: a slow, shared CI machine


class OvertakenView:
    """What the OSCQuery server reads of a registry. Armed with ``late``, the next tree's snapshot is taken,
    then ``late()`` runs before the reply goes: whatever ``late`` changes (and waits for) reaches the client
    while the tree, with the old values, is still on its way (the race a loaded machine makes by chance)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.late: Callable[[], None] | None = None
        self.frozen: Any = None  # a snapshot to serve once instead of the current values
        self.served: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.registry)

    def snapshot(self) -> Any:
        snap, self.frozen = (self.frozen, None) if self.frozen is not None else (self.registry.snapshot(), None)
        self.served.append({p.name: snap[p.name] for p in self.registry})
        late, self.late = self.late, None
        if late is not None:
            late()
        return snap


@dataclass
class Heard:
    """Every value of one parameter the client reported, in the order its callbacks ran."""

    name: str
    events: list[tuple[str, Any]] = field(default_factory=list)
    trees: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, address: str, args: list[Any]) -> None:
        if address == f"{PREFIX}/{self.name}" and args:
            with self.lock:
                self.events.append(("udp", args[0]))

    def on_tree(self, params: list[ParamInfo]) -> None:
        with self.lock:
            self.trees += 1
            self.events.extend(("tree", p.value) for p in params if p.name == self.name)

    def last(self) -> tuple[str, Any] | None:
        with self.lock:
            return self.events[-1] if self.events else None

    def last_tree(self) -> Any:
        """The value the newest tree reported (an engine's reply to a send may come after it)."""
        with self.lock:
            return [v for k, v in self.events if k == "tree"][-1]


@dataclass
class Engine:
    registry: Registry
    controller: Controller
    osc: OscServer
    oscquery: OscQueryServer
    view: OvertakenView


@pytest.fixture
def engine(tiny_pack_dir: Path, tmp_path: Path) -> Iterator[Engine]:
    pack = packfmt.load(tiny_pack_dir)
    registry = Registry(values={"prompt": pack.prompts[0]})
    controller = Controller(registry, Generator(pack, seed=5, params=GenParams(prompt=pack.prompts[0])),
                            presets_dir=tmp_path / "presets")
    view = OvertakenView(registry)
    q = OscQueryServer(view, "127.0.0.1", 0)  # type: ignore[arg-type] (it reads snapshot() and iterates)
    q.start()
    osc = OscServer(controller, "127.0.0.1", 0, oscquery_port=q.port)
    osc.start()
    q.osc_port = osc.port
    try:
        yield Engine(registry, controller, osc, q, view)
    finally:
        osc.stop()
        q.stop()
        controller.close()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def connect(engine: Engine, heard: Heard, **kw: Any) -> EngineClient:
    # the tree's HTTP answer may wait on purpose (OvertakenView) on a loaded machine: a patient client
    client = EngineClient("127.0.0.1", engine.osc.port, engine.oscquery.port, http_timeout_s=WAIT_S, **kw)
    client.on_message = heard.on_message
    client.on_tree = heard.on_tree
    client.start()
    # a new subscriber gets every value once (the engine's first dump): after it, only changes come
    wait_for(lambda: client.connected and heard.trees >= 1 and any(k == "udp" for k, _ in list(heard.events)),
             "the client to connect, read the tree and get the engine's first dump")
    return client


def read_tree_again(client: EngineClient, heard: Heard, view: OvertakenView | None = None) -> None:
    """Ask for the tree and wait until the client has reported it: with ``view``, the tree whose snapshot
    ran ``view.late`` (a fetch already on its way when the test armed it, e.g. the one the client makes when
    the engine's first datagram comes, reports an older tree first)."""
    trees, late, at = heard.trees, view.late if view else None, []
    if view is not None and late is not None:
        def armed() -> None:
            with heard.lock:
                at.append(heard.trees)  # the trees reported before this snapshot's
            late()

        view.late = armed
    client.request_tree()
    wait_for(lambda: heard.trees > (at[0] if at else trees) and (late is None or bool(at)), "the tree")


def test_a_tree_overtaken_by_feedback_does_not_undo_it(engine: Engine) -> None:
    heard = Heard("morph")
    client = connect(engine, heard, tree_every_s=0)
    try:
        assert heard.last_tree() == pytest.approx(0.0)
        def late() -> None:
            engine.registry.update({"morph": 0.35}, source="test")
            wait_for(lambda: ("udp", pytest.approx(0.35)) in heard.events, "the feedback")

        engine.view.late = late
        read_tree_again(client, heard, engine.view)
        assert engine.view.served[-1]["morph"] == pytest.approx(0.0)  # the server sent the old value...
        with heard.lock:
            kinds = [k for k, _ in heard.events]
        assert kinds[-2:] == ["udp", "tree"]  # ...after the feedback had come
        assert heard.last() == ("tree", pytest.approx(0.35))  # and the client kept the newer one
        assert [p.value for p in client.tree if p.name == "morph"] == [pytest.approx(0.35)]
    finally:
        client.close()


def test_a_value_the_client_sent_after_the_snapshot_wins_over_it(engine: Engine) -> None:
    heard = Heard("gain_db")
    client = connect(engine, heard, tree_every_s=0)
    try:
        engine.view.late = lambda: client.set_param("gain_db", -9.0)
        read_tree_again(client, heard, engine.view)
        assert engine.view.served[-1]["gain_db"] == pytest.approx(0.0)
        assert heard.last_tree() == pytest.approx(-9.0)
        wait_for(lambda: engine.registry.get("gain_db") == pytest.approx(-9.0), "the engine to apply it")
    finally:
        client.close()


def test_a_tree_asked_for_while_one_is_on_its_way_comes_after_it(engine: Engine) -> None:
    """A request for the tree while a fetch is on its way (the panel's, or the client's own when the engine's
    first datagram comes) is not swallowed by that fetch's end: another snapshot follows it."""
    heard = Heard("gain_db")
    client = connect(engine, heard, tree_every_s=0)
    try:
        at: list[int] = []

        def ask() -> None:
            at.append(len(engine.view.served))
            client.request_tree()

        engine.view.late = ask
        read_tree_again(client, heard, engine.view)
        wait_for(lambda: len(engine.view.served) > at[0], "the tree asked for while the last was served")
    finally:
        client.close()


def test_a_value_sent_just_before_the_tree_was_asked_for_wins_over_it(engine: Engine,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine may serve a tree before it has read a datagram the panel sent just before asking (a loaded
    machine); it sends the panel no echo, so the tree must not put the fader back."""
    monkeypatch.setattr(gui.client, "OWN_GRACE_S", WAIT_S)  # the mechanism, not its 1 s (a loaded machine)
    heard = Heard("temperature")
    client = connect(engine, heard, tree_every_s=0)
    try:
        engine.view.frozen = engine.registry.snapshot()  # served as if taken before the datagram was read
        engine.view.late = lambda: None  # (marks the snapshot the frozen one is served in)
        client.set_param("temperature", 2.5)
        read_tree_again(client, heard, engine.view)
        wait_for(lambda: engine.registry.get("temperature") == pytest.approx(2.5), "the engine to apply it")
        assert engine.view.served[-1]["temperature"] == pytest.approx(1.0)
        assert heard.last_tree() == pytest.approx(2.5)
    finally:
        client.close()


def test_replies_to_older_values_in_flight_do_not_move_the_control_back(engine: Engine) -> None:
    """The engine answers every value with the value it took. With an engine slow to take them (a validator
    that sleeps), the replies to the first values of a fast move come back after the last was sent: they are
    dropped, so the control never steps back, and the last reply (the value in force) goes through. A value the
    engine clamps is not one the panel sent, and its reply goes through too."""
    heard = Heard("temperature")
    client = connect(engine, heard, tree_every_s=0)
    engine.registry.add_validator("temperature", lambda v: time.sleep(0.05))
    try:
        values = [1.5 + 0.05 * i for i in range(10)]
        shown: list[tuple[float, float]] = []  # (newest value sent, value a reply would show) per reply heard
        newest = [0.0]

        def on_message(address: str, args: list[Any]) -> None:
            heard.on_message(address, args)
            if address == f"{PREFIX}/temperature":
                shown.append((newest[0], float(args[0])))

        client.on_message = on_message
        for v in values:
            newest[0] = v
            client.set_param("temperature", v)
            time.sleep(0.03)  # past the throttle: each value goes out at once
        wait_for(lambda: heard.last() == ("udp", pytest.approx(values[-1])), "the reply to the last value")
        assert client.stale_replies >= 1
        back = [(sent, got) for sent, got in shown if got < sent - 1e-6]
        assert not back, f"replies that would move the control back from the newest value sent: {back}"
        client.set_param("temperature", 9.0)  # beyond the range: clamped to 4
        wait_for(lambda: heard.last() == ("udp", pytest.approx(4.0)), "the clamped value's reply")
    finally:
        client.close()


def test_the_periodic_tree_read_heals_a_lost_datagram(engine: Engine) -> None:
    heard = Heard("morph")
    client = connect(engine, heard, tree_every_s=0.3)
    try:
        # a change whose feedback skips this client, as a datagram lost on the way would
        engine.registry.update({"morph": 0.6}, source=f"osc:127.0.0.1:{client.local_port}")
        wait_for(lambda: heard.last() == ("tree", pytest.approx(0.6)), "the next tree to bring the value")
        with heard.lock:
            assert ("udp", pytest.approx(0.6)) not in heard.events
    finally:
        client.close()
