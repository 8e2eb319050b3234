"""The panel's link to a running engine: OSC over one UDP socket, and the OSCQuery tree over HTTP. No Qt here.

The client sends from one UDP socket and listens on the same one: the engine
replies to the sender's source port, and ``/cicada/subscribe`` (no port)
makes that port a feedback subscriber. A small keeper thread

- re-subscribes every few seconds (leases expire after 30 s),
- flushes throttled parameter changes (at most one message per parameter
  every ``min_interval_s``, and the last value of a fader move always goes),
- declares the link lost when nothing came from the engine for ``stale_s``
  seconds, and then keeps asking (subscribe, status, the OSCQuery tree)
  until an engine answers again: a restarted engine is picked up by itself,
- reads the whole OSCQuery tree again every ``tree_every_s`` seconds, so a
  control whose UDP feedback was lost (or late) catches up by itself.

A tree is a snapshot taken some time after its HTTP request went out.
Values that came by UDP after that moment are newer than the snapshot and
win over it, and so do the panel's own values sent up to ``OWN_GRACE_S``
before it (the engine may serve the tree before it has read a datagram sent
just before the request; it sends no echo that would correct the panel).
The tree's callback and the UDP callback are ordered under one lock, so a
stale tree never lands after a newer value.

The engine answers each value the panel sends with the value it took (a
reply, to this socket only). While a fader or a key moves a parameter,
several values are in flight, and the reply to an older one would put the
control back for a moment, so that a key pressed then steps from the old
place. A reply that matches a value sent before the newest one in flight
(or waiting in the throttle) is therefore dropped; one that matches none
(the engine clamped it, or another client changed it) goes through. (The
panel also drops what was heard before the user's latest change but reached
its GUI thread after it.)

Callbacks run on the client's threads; the Qt panel turns them into signals.

::

    panel ──set_param──> throttle ──UDP──> engine /cicada/<param>
    panel <──on_message── rx thread <──UDP── replies and feedback (same socket)
    panel <──on_tree───── keeper thread <──HTTP── OSCQuery tree (at connect, then every tree_every_s)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

log = logging.getLogger("cicada.gui")

PREFIX = "/cicada"

Value = float | int | bool | str

OWN_GRACE_S = 1.0
"""A value the panel sent counts as newer than any tree asked for up to this long after it (seconds)."""

IN_FLIGHT_S = 2.0
"""A value the panel sent waits this long for its reply (seconds); after that the reply counts as lost."""


def _call(cb: Callable[..., None] | None, *args: Any, what: str) -> None:
    """Run a user callback on the client's thread; one that raises is logged (``what`` failed), and the
    thread goes on."""
    if cb is None:
        return
    try:
        cb(*args)
    except Exception:
        log.exception("%s failed", what)


def _same_value(a: Any, b: Any) -> bool:
    """Whether a reply carries a value the panel sent (OSC floats are 32-bit: compare at that precision)."""
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- the parameter tree


def _registry_hints() -> dict[str, tuple[str, str]]:
    """(group, unit) by parameter name from the registry's definitions (plain data: importing starts nothing).

    Only hints: the panel builds its controls from the OSCQuery tree and works
    with an engine of another version, whose tree is all it has.
    """
    try:
        from engine.params import PARAMS
    except Exception:
        return {}
    return {p.name: (p.group, p.unit) for p in PARAMS}


# OSCQuery unit names (the proposal's units.md) back to what a person reads
_UNIT_NAMES = {"gain.db": "dB", "time.ms": "ms", "time.second": "s", "time.hz": "Hz", "time.bpm": "BPM"}


def _unit(node: dict[str, Any], hint: str) -> str:
    raw = node.get("UNIT")
    if isinstance(raw, list):
        raw = raw[0] if raw else ""
    raw = str(raw or "")
    readable = _UNIT_NAMES.get(raw, raw)
    # the registry's own spelling where it means the same unit ("dBFS" travels as gain.db)
    if hint and (hint == readable or _UNIT_NAMES.get(raw) and hint.startswith(readable)):
        return hint
    return readable


@dataclass
class ParamInfo:
    """One parameter as the OSCQuery tree describes it."""

    name: str
    type: str  # OSC type tag: f, i, T (bool), s
    value: Value
    description: str = ""
    unit: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    access: int = 3
    group: str = "other"
    path: str = ""

    @property
    def is_number(self) -> bool:
        return self.type in ("f", "i") and self.low is not None and self.high is not None

    @property
    def is_bool(self) -> bool:
        return self.type in ("T", "F")

    @property
    def is_choice(self) -> bool:
        return self.type == "s" and bool(self.choices)

    @property
    def writable(self) -> bool:
        return bool(self.access & 2)

    def coerce(self, value: Any) -> Value:
        """``value`` as this parameter's Python type (clamped to its range, for numbers)."""
        if self.is_bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "on")
            return bool(value)
        if self.type == "s":
            return str(value)
        v = float(value)
        if self.low is not None and self.high is not None:
            v = min(max(v, self.low), self.high)
        return int(round(v)) if self.type == "i" else v

    def normalized(self, value: Value) -> float:
        """A number's position in its range, 0..1."""
        if not self.is_number or self.high == self.low:
            return 0.0
        assert self.low is not None and self.high is not None
        return min(max((float(value) - self.low) / (self.high - self.low), 0.0), 1.0)

    def from_normalized(self, x: float) -> Value:
        """0..1 -> a value in range (the inverse of :meth:`normalized`)."""
        assert self.low is not None and self.high is not None
        return self.coerce(self.low + min(max(x, 0.0), 1.0) * (self.high - self.low))

    def describe(self) -> str:
        """The description with its range, for a tooltip."""
        if self.is_number:
            rng = f"{self.low:g} .. {self.high:g}{(' ' + self.unit) if self.unit else ''}"
        elif self.is_choice:
            rng = " | ".join(self.choices)
        elif self.is_bool:
            rng = "on / off"
        else:
            rng = "text"
        return f"{self.description}\n{self.path or PREFIX + '/' + self.name}  ({rng})".strip()


def parse_tree(tree: dict[str, Any], hints: dict[str, tuple[str, str]] | None = None) -> list[ParamInfo]:
    """The parameters under ``/cicada`` in an OSCQuery tree, in tree order.

    A parameter is a node with a ``TYPE`` and a ``VALUE`` (actions such as
    ``/cicada/panic``, containers such as ``/cicada/preset`` and the
    subscriber-only ``meter``/``spectrum`` have no VALUE). Its group is its
    first ``TAGS`` entry (cicada's engine tags each parameter with its
    registry group), else the registry's group by name, else ``other``.
    """
    hints = _registry_hints() if hints is None else hints
    root = tree.get("CONTENTS", {}).get(PREFIX.strip("/"), {})
    out: list[ParamInfo] = []
    for name, node in (root.get("CONTENTS") or {}).items():
        if not isinstance(node, dict) or "TYPE" not in node or "VALUE" not in node:
            continue
        typ = str(node["TYPE"])[:1] or "s"
        values = node.get("VALUE") or [None]
        rng = (node.get("RANGE") or [{}])[0] or {}
        choices = tuple(str(c) for c in rng.get("VALS", ()) or ())
        low, high = rng.get("MIN"), rng.get("MAX")
        value = values[0]
        if value is None:
            value = {"f": 0.0, "i": 0, "T": False, "F": False}.get(typ, "")
        group_hint, unit_hint = hints.get(name, ("", ""))
        tags = node.get("TAGS")
        group = str(tags[0]) if isinstance(tags, list) and tags else group_hint or "other"
        p = ParamInfo(
            name=name,
            type=typ,
            value=value,
            description=str(node.get("DESCRIPTION", "")),
            unit=_unit(node, unit_hint),
            low=float(low) if low is not None else None,
            high=float(high) if high is not None else None,
            choices=choices,
            access=int(node.get("ACCESS", 3)),
            group=group,
            path=str(node.get("FULL_PATH", f"{PREFIX}/{name}")),
        )
        with contextlib.suppress(TypeError, ValueError):
            p.value = p.coerce(value)
        out.append(p)
    return out


def fetch_tree(host: str, port: int, timeout: float = 1.0) -> dict[str, Any]:
    """GET the OSCQuery tree; raises OSError (nothing listening, timeout, HTTP error) or ValueError (not JSON).

    The connection is kept alive until the body is read and then closed by
    this side, so the TIME_WAIT of the TCP close lands on our ephemeral port,
    not on the engine's listening port (which a restarted engine must bind again).
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"OSCQuery at {host}:{port} answered HTTP {resp.status}")
    except http.client.HTTPException as exc:
        raise OSError(f"OSCQuery at {host}:{port}: {exc}") from exc
    finally:
        conn.close()
    return json.loads(body.decode("utf-8"))


def engine_answers(host: str, oscquery_port: int, timeout: float = 0.5) -> bool:
    """Does an engine answer at this OSCQuery port?"""
    try:
        tree = fetch_tree(host, oscquery_port, timeout)
    except (OSError, ValueError):
        return False
    return isinstance(tree, dict) and "CONTENTS" in tree


# --------------------------------------------------------------------------- the OSC client


def build_message(address: str, args: Sequence[Any]) -> bytes:
    """One OSC message (bool -> T/F, int -> i, float -> f, str -> s, bytes -> b)."""
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    return b.build().dgram


@dataclass
class Throttle:
    """At most one send per key every ``interval`` seconds; the latest value waits and always goes in the end."""

    interval: float = 0.02
    last: dict[str, float] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)

    def offer(self, key: str, value: Any, now: float) -> bool:
        """True: send ``value`` now. False: it is kept (replacing an older one) for :meth:`due`."""
        if now - self.last.get(key, -math.inf) >= self.interval:
            self.last[key] = now
            self.pending.pop(key, None)
            return True
        self.pending[key] = value
        return False

    def due(self, now: float) -> list[tuple[str, Any]]:
        """The kept values whose time has come (and forget them)."""
        out = []
        for key in list(self.pending):
            if now - self.last.get(key, -math.inf) >= self.interval:
                out.append((key, self.pending.pop(key)))
                self.last[key] = now
        return out

    def next_due(self, now: float) -> float | None:
        """Seconds until the next kept value is due (None: nothing kept)."""
        if not self.pending:
            return None
        return max(0.0, min(self.last.get(k, -math.inf) + self.interval for k in self.pending) - now)


MessageCallback = Callable[[str, list[Any]], None]


class EngineClient:
    """OSC + OSCQuery client of one engine; thread-safe; callbacks on its own threads.

    ``on_message(address, args)`` hears every reply and feedback message;
    ``on_tree(params)`` the parsed OSCQuery tree (after each (re)connection, on :meth:`request_tree`, and
    every ``tree_every_s`` seconds while connected; 0 turns the periodic reading off), its values patched
    with any newer ones heard or sent while it was being fetched;
    ``on_connection(bool)`` when the link comes up or goes down.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        osc_port: int = 9000,
        oscquery_port: int = 9001,
        *,
        resubscribe_s: float = 5.0,
        stale_s: float = 3.0,
        retry_s: float = 1.0,
        min_interval_s: float = 0.02,
        tree_every_s: float = 10.0,
        http_timeout_s: float = 1.0,
    ) -> None:
        self.host = host
        self.osc_port = int(osc_port)
        self.oscquery_port = int(oscquery_port)
        self.resubscribe_s = resubscribe_s
        self.stale_s = stale_s
        self.retry_s = retry_s
        self.tree_every_s = tree_every_s
        self.http_timeout_s = http_timeout_s
        self.on_message: MessageCallback | None = None
        self.on_tree: Callable[[list[ParamInfo]], None] | None = None
        self.on_connection: Callable[[bool], None] | None = None
        self._throttle = Throttle(min_interval_s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._connected = False
        self._last_rx = -math.inf
        self._last_sub = -math.inf
        self._need_tree = True
        self._next_tree_try = 0.0
        self._last_tree = -math.inf
        self._lost_at = -math.inf  # when the link was last declared lost
        # the newest value of each address, heard or sent: (time a tree must be asked after to be newer than
        # it, value); guarded by _order
        self._recent: dict[str, tuple[float, Any]] = {}
        self._order = threading.Lock()  # one callback at a time: a tree never overtakes a newer value
        self._in_flight: dict[str, list[tuple[float, Any]]] = {}  # values sent, oldest first; under _order
        self.stale_replies = 0  # replies to older values dropped (see the module docstring)
        self.lease_s: float | None = None
        self.tree: list[ParamInfo] = []
        self.last_status: dict[str, Any] = {}
        self.sent = 0
        self.received = 0

    # ------------------------------------------------------------------ life

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.osc_port)

    @property
    def local_port(self) -> int:
        """The UDP port replies and feedback come to (0 before :meth:`start`)."""
        return self._sock.getsockname()[1] if self._sock is not None else 0

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        """Open the socket and start the receive and keeper threads (subscribing at once)."""
        if self._sock is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._rx_loop, name="cicada-gui-rx", daemon=True),
            threading.Thread(target=self._keeper_loop, name="cicada-gui-keeper", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop the threads and close the socket (the engine's lease runs out by itself)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ sending

    def send(self, address: str, *args: Any) -> bool:
        """Send one message now; False if it could not be sent (no socket, network error)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendto(build_message(address, args), self.address)
        except OSError as exc:  # no route, or an ICMP refusal reported on this socket
            log.debug("send %s failed: %s", address, exc)
            return False
        self.sent += 1
        return True

    def set_param(self, name: str, value: Value) -> None:
        """``/cicada/<name> <value>``, at most once per ``min_interval_s`` per parameter (the last value wins)."""
        now = time.monotonic()
        with self._order:
            self._recent[name] = (now + OWN_GRACE_S, value)
        with self._lock:
            now_ok = self._throttle.offer(name, value, now)
        if now_ok:
            self._send_value(name, value)
        else:
            self._wake.set()

    def _send_value(self, name: str, value: Value) -> None:
        now = time.monotonic()
        with self._order:
            sent = [e for e in self._in_flight.get(name, []) if now - e[0] < IN_FLIGHT_S][-63:]
            self._in_flight[name] = sent + [(now, value)]
        self.send(f"{PREFIX}/{name}", value)

    def _stale_reply(self, name: str, value: Any) -> bool:
        """Whether ``value`` answers one of this client's sends older than the newest one sent or waiting in
        the throttle (forgetting the sends it answers). Call under ``_order`` (it takes ``_lock`` inside)."""
        sent = self._in_flight.get(name)
        if not sent:
            return False
        for i, (_, v) in enumerate(sent):
            if _same_value(v, value):
                del sent[: i + 1]
                with self._lock:
                    waiting = name in self._throttle.pending  # a newer value, held back by the throttle
                return bool(sent) or waiting
        return False

    def flush(self) -> None:
        """Send the throttled values that are due (the keeper thread does this by itself)."""
        with self._lock:
            due = self._throttle.due(time.monotonic())
        for name, value in due:
            self._send_value(name, value)

    def subscribe(self) -> None:
        self._last_sub = time.monotonic()
        self.send(f"{PREFIX}/subscribe")

    def request_tree(self) -> None:
        """Fetch the OSCQuery tree again (on the keeper thread) and report it through ``on_tree``."""
        self._need_tree = True
        self._next_tree_try = 0.0
        self._wake.set()

    # ------------------------------------------------------------------ threads

    def _rx_loop(self) -> None:
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                data, _ = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:  # ICMP port unreachable from an earlier send, or closed
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            try:
                messages = [m.message for m in OscPacket(data).messages]
            except Exception:
                log.debug("not OSC: %r", data[:64])
                continue
            for msg in messages:
                self._handle(msg.address, list(msg.params))

    def _handle(self, address: str, args: list[Any]) -> None:
        self.received += 1
        now = self._last_rx = time.monotonic()
        if not self._connected:
            self._connected = True
            # the tree now, unless one asked since the link was lost came or is on its way (at start: the first)
            if self._need_tree or self._last_tree < self._lost_at:
                self._need_tree = True
                self._next_tree_try = 0.0
                self._wake.set()
            self._emit_connection(True)
        if address == f"{PREFIX}/subscribed" and args:
            with contextlib.suppress(TypeError, ValueError):
                self.lease_s = float(args[0])
        elif address == f"{PREFIX}/status" and args and isinstance(args[0], str):
            with contextlib.suppress(ValueError):
                self.last_status = json.loads(args[0])
        with self._order:
            if len(args) == 1 and address.startswith(PREFIX + "/"):
                name = address[len(PREFIX) + 1:]
                if self._stale_reply(name, args[0]):
                    self.stale_replies += 1
                    return
                mine = self._recent.get(name)
                if mine is None or mine[0] < now or not _same_value(mine[1], args[0]):
                    self._recent[name] = (now, args[0])  # (the reply to the newest send keeps its grace)
            _call(self.on_message, address, args, what=f"message handler on {address}")

    def _emit_connection(self, up: bool) -> None:
        _call(self.on_connection, up, what="connection handler")

    def _keeper_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.flush()
            if self._connected and now - self._last_rx > self.stale_s:
                self._connected = False
                self._lost_at = now
                self._emit_connection(False)
            every = self.resubscribe_s if self._connected else self.retry_s
            if self.lease_s:
                every = min(every, max(0.5, self.lease_s / 3.0))
            if now - self._last_sub >= every:
                self.subscribe()
                if not self._connected:
                    self.send(f"{PREFIX}/status")  # answered at once, even before the subscription takes
            if self._connected and self.tree_every_s > 0 and now - self._last_tree >= self.tree_every_s:
                self._need_tree = True
            if self._need_tree and now >= self._next_tree_try:
                self._fetch_tree()
            with self._lock:
                wait = self._throttle.next_due(time.monotonic())
            self._wake.wait(0.25 if wait is None else min(0.25, max(wait, 0.002)))
            self._wake.clear()

    def _fetch_tree(self) -> None:
        asked = time.monotonic()
        self._need_tree = False  # before the request: one asked for while it is on its way comes after it
        try:
            params = parse_tree(fetch_tree(self.host, self.oscquery_port, timeout=self.http_timeout_s))
        except (OSError, ValueError) as exc:
            log.debug("OSCQuery fetch failed: %s", exc)
            self._need_tree = True
            self._next_tree_try = time.monotonic() + self.retry_s
            return
        self._last_tree = asked
        with self._lock:
            unsent = dict(self._throttle.pending)  # the panel's own newest values, not even sent yet
        with self._order:
            for p in params:
                newer = self._recent.get(p.name)
                value = unsent[p.name] if p.name in unsent else newer[1] if newer and newer[0] >= asked else p.value
                with contextlib.suppress(TypeError, ValueError):
                    p.value = p.coerce(value)
            self._recent = {k: v for k, v in self._recent.items() if v[0] >= asked}  # older ones: in the tree
            self.tree = params
            _call(self.on_tree, params, what="tree handler")
