"""OSC over UDP: every registry parameter and the engine's actions, under ``/cicada/``.

::

    address                                  arguments            reply to the sender
    /cicada/<param>                          value                /cicada/<param> <applied value>
                                                                  (+ /cicada/warning <address> <text> if clamped)
    /cicada/<param>                          (none)               /cicada/<param> <current value>
    /cicada/select                           int slot             /cicada/select <slot>, /cicada/prompt <text>
    /cicada/panic                            (none) | 1 | 0       /cicada/panic 1 (0: resume, /cicada/panic 0)
    /cicada/resume                                                /cicada/panic 0
    /cicada/start, /cicada/stop                                   /cicada/running 1 | 0
    /cicada/preset/load                      name                 /cicada/preset/loaded <name>
    /cicada/preset/save                      name [description]   /cicada/preset/saved <name> <path>
    /cicada/preset/list                                           /cicada/preset/list <name> <name> ...
    /cicada/status                                                /cicada/status <json>
    /cicada/subscribe                        [int port]           /cicada/subscribed <lease seconds>
    /cicada/unsubscribe                      [int port]           /cicada/unsubscribed
    /cicada/ping                                                  /cicada/pong
    anything else                                                 /cicada/error <address> <text>

A refused value (wrong type, unknown prompt words) gets ``/cicada/error
<address> <text>`` and changes nothing. Subscribers (the sender's IP and the
given port, else its source port) get every registry change as
``/cicada/<param> <value>``, ``/cicada/panic 1|0``, ``/cicada/preset/loaded
<name>``, ``/cicada/meter <peakL> <peakR> <rmsL> <rmsR>`` (dB, 20 Hz),
``/cicada/spectrum <blob: 64 float32 little-endian dB>`` (15 Hz) and
``/cicada/status <json>`` (1 Hz), until the lease (30 s) runs out: re-send
``/cicada/subscribe`` every few seconds. Parameter types: numbers take OSC
int or float (i, h, f, d), on/off takes T/F or a number (>= 0.5 is on), text
takes a string. Every reply leaves from the server's own socket to the
sender's source address and port.

The server listens on 127.0.0.1 unless told otherwise; on any other address it
needs an allow-list of client addresses or networks (``--osc-allow``);
packets from other addresses are dropped and counted. Datagrams are decoded by
a strict OSC 1.0 decoder of our own (python-osc's logs to the root logger on
some malformed packets, walks strings byte by byte and recurses without a
limit on nested bundles): a packet that does not decode is counted by kind and
dropped whole, and what goes wrong is logged as a summary at most every few
seconds, never per packet.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import ipaddress
import json
import logging
import math
import queue
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from engine.params import Change, Param, ParamError

if TYPE_CHECKING:
    from engine.control.controller import Controller

log = logging.getLogger("cicada.osc")

DEFAULT_OSC_PORT = 9000
PREFIX = "/cicada/"
LEASE_S = 30.0  # a subscription lasts this long unless renewed
MAX_SUBSCRIBERS = 16
METER_HZ = 20.0
SPECTRUM_HZ = 15.0
STATUS_HZ = 1.0
SPECTRUM_BANDS = 64
SUMMARY_EVERY_S = 5.0  # at most one summary of bad traffic per this many seconds
MAX_BUNDLE_DEPTH = 8
MAX_MESSAGES_PER_PACKET = 256
MAX_TEXT = 4096  # characters in a text argument
MAX_REPLY_TEXT = 1500  # characters of a message in an error or warning reply
_OSCQUERY_HINT_PORT = 9001  # engine.control.oscquery.DEFAULT_OSCQUERY_PORT (kept here: no import cycle)
_ALWAYS_ALLOWED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = tuple[str, int]


class OscError(OSError):
    """The OSC (or OSCQuery) server cannot start; the message says what to do instead."""


# ------------------------------------------------------------------------------------------------------------
# codec: strict OSC 1.0
# ------------------------------------------------------------------------------------------------------------


class OscDecodeError(ValueError):
    """A datagram that is not valid OSC. ``kind`` names the problem (for counting); ``address`` is the
    message's address when that much decoded (so the sender can be told)."""

    def __init__(self, kind: str, detail: str, address: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.address = address


_BUNDLE = b"#bundle\x00"
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_F32 = struct.Struct(">f")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_FIXED: dict[str, tuple[int, Callable[[bytes, int], Any]]] = {
    "i": (4, lambda d, i: _I32.unpack_from(d, i)[0]),
    "f": (4, lambda d, i: _F32.unpack_from(d, i)[0]),
    "h": (8, lambda d, i: _I64.unpack_from(d, i)[0]),
    "d": (8, lambda d, i: _F64.unpack_from(d, i)[0]),
    "t": (8, lambda d, i: _U64.unpack_from(d, i)[0]),
    "r": (4, lambda d, i: _U32.unpack_from(d, i)[0]),
    "c": (4, lambda d, i: chr(_U32.unpack_from(d, i)[0] & 0x10FFFF)),
    "m": (4, lambda d, i: tuple(d[i : i + 4])),
}
_CONST = {"T": True, "F": False, "N": None, "I": math.inf}


def _string(data: bytes, i: int, what: str) -> tuple[str, int]:
    end = data.find(b"\x00", i)
    if end < 0:
        raise OscDecodeError("truncated", f"{what} has no terminating NUL")
    nxt = i + ((end - i) // 4 + 1) * 4
    if nxt > len(data):
        raise OscDecodeError("truncated", f"{what} is not padded to 4 bytes")
    try:
        return data[i:end].decode("utf-8"), nxt
    except UnicodeDecodeError:
        raise OscDecodeError("bad_string", f"{what} is not UTF-8") from None


def decode_message(data: bytes) -> tuple[str, tuple[Any, ...]]:
    """One OSC message -> ``(address, args)``; raises :class:`OscDecodeError`.

    Types: i h f d s S b T F N I c r m t (arrays are refused). A message without a type tag string has no
    arguments; bytes after the last argument are ignored.
    """
    if not data.startswith(b"/"):
        raise OscDecodeError("not_osc", "an OSC message starts with '/'")
    address, i = _string(data, 0, "the address")
    if not address.isprintable() or " " in address:
        raise OscDecodeError("bad_address", "the address has spaces or control characters")
    if i >= len(data):
        return address, ()
    tags, i = _string(data, i, "the type tag string")
    if not tags.startswith(","):
        raise OscDecodeError("bad_type_tag", "the type tag string does not start with ','", address)
    args: list[Any] = []
    n = len(data)
    for tag in tags[1:]:
        if tag in _FIXED:
            size, read = _FIXED[tag]
            if i + size > n:
                raise OscDecodeError("truncated", f"argument {len(args) + 1} ({tag}) is cut off", address)
            args.append(read(data, i))
            i += size
        elif tag in ("s", "S"):
            text, i = _string(data, i, f"argument {len(args) + 1} (string)")
            args.append(text)
        elif tag == "b":
            if i + 4 > n:
                raise OscDecodeError("truncated", f"argument {len(args) + 1} (blob) is cut off", address)
            size = _I32.unpack_from(data, i)[0]
            end = i + 4 + size
            if size < 0 or end > n:
                raise OscDecodeError("bad_blob", f"argument {len(args) + 1}: blob size {size} is wrong", address)
            args.append(bytes(data[i + 4 : end]))
            i = end + (-size % 4)
        elif tag in _CONST:
            args.append(_CONST[tag])
        else:
            raise OscDecodeError("bad_type_tag", f"unsupported OSC type tag {tag!r} (use i f s T F)", address)
    return address, tuple(args)


def decode_packet(data: bytes) -> list[tuple[str, tuple[Any, ...]]]:
    """A datagram (a message or a bundle, nested up to ``MAX_BUNDLE_DEPTH``) -> its messages, in order.

    The whole packet decodes or :class:`OscDecodeError` is raised (nothing of it should be applied). Bundle
    time tags are ignored: everything applies on arrival.
    """
    if not data:
        raise OscDecodeError("empty", "empty datagram")
    out: list[tuple[str, tuple[Any, ...]]] = []
    if data.startswith(b"/"):
        out.append(decode_message(data))
    elif data.startswith(_BUNDLE):
        _decode_bundle(data, 1, out)
    else:
        raise OscDecodeError("not_osc", "neither an OSC message ('/...') nor a bundle ('#bundle')")
    return out


def _decode_bundle(data: bytes, depth: int, out: list[tuple[str, tuple[Any, ...]]]) -> None:
    if depth > MAX_BUNDLE_DEPTH:
        raise OscDecodeError("too_deep", f"bundles nested deeper than {MAX_BUNDLE_DEPTH}")
    if len(data) < 16:
        raise OscDecodeError("truncated", "a bundle needs a time tag")
    i, n = 16, len(data)
    while i < n:
        if i + 4 > n:
            raise OscDecodeError("bad_bundle", "a bundle element size is cut off")
        size = _I32.unpack_from(data, i)[0]
        i += 4
        if size <= 0 or size % 4 or i + size > n:
            raise OscDecodeError("bad_bundle", f"bundle element size {size} is wrong")
        element = data[i : i + size]
        i += size
        if element.startswith(_BUNDLE):
            _decode_bundle(element, depth + 1, out)
        elif element.startswith(b"/"):
            out.append(decode_message(element))
        else:
            raise OscDecodeError("bad_bundle", "a bundle element is neither a message nor a bundle")
        if len(out) > MAX_MESSAGES_PER_PACKET:
            raise OscDecodeError("too_many", f"more than {MAX_MESSAGES_PER_PACKET} messages in one packet")


def _pad(b: bytes) -> bytes:
    return b + b"\x00" * (4 - len(b) % 4)


def encode_message(address: str, *args: Any) -> bytes:
    """An OSC message: bool -> T/F, int -> i (h beyond 32 bits), float -> f, str -> s, bytes -> b, None -> N."""
    tags = [","]
    body: list[bytes] = []
    for a in args:
        if a is True or a is False:
            tags.append("T" if a else "F")
        elif a is None:
            tags.append("N")
        elif isinstance(a, int):
            if -(2**31) <= a < 2**31:
                tags.append("i")
                body.append(_I32.pack(a))
            else:
                tags.append("h")
                body.append(_I64.pack(a))
        elif isinstance(a, float):
            tags.append("f")
            body.append(_F32.pack(a if abs(a) <= 3.4e38 or not math.isfinite(a) else math.copysign(math.inf, a)))
        elif isinstance(a, str):
            tags.append("s")
            body.append(_pad(a.encode("utf-8")))
        elif isinstance(a, (bytes, bytearray, memoryview)):
            b = bytes(a)
            tags.append("b")
            body.append(_I32.pack(len(b)) + b + b"\x00" * (-len(b) % 4))
        else:
            raise TypeError(f"cannot send {type(a).__name__} in OSC")
    return _pad(address.encode("utf-8")) + _pad("".join(tags).encode("ascii")) + b"".join(body)


# ------------------------------------------------------------------------------------------------------------
# who may talk to us
# ------------------------------------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for 127.x.x.x, ::1 and names that resolve only to them (``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def allow_networks(host: str, allow: Iterable[str] | None, option: str = "--osc-allow",
                   what: str = "OSC") -> tuple[Network, ...]:
    """The client networks a server on ``host`` accepts (127.0.0.1 and ::1 always).

    On a loopback host nothing else is needed; on any other address an empty ``allow`` is refused (anyone on
    the network could steer the sound), with a message naming ``option``.
    """
    nets: list[Network] = list(_ALWAYS_ALLOWED)
    entries = [str(a).strip() for a in (allow or ()) if str(a).strip()]
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise OscError(f"{option} {entry!r} is not an IP address or network: give one like 192.168.1.20 "
                           f"or 192.168.1.0/24 (several are allowed)") from None
    if not entries and not is_loopback_host(host):
        raise OscError(
            f"refusing to listen for {what} on {host}: anyone who can reach this machine could steer it. Name "
            f"the clients with {option} (an address or network, e.g. {option} 192.168.1.0/24), or listen on "
            f"127.0.0.1 (this machine only)"
        )
    return tuple(nets)


def client_allowed(ip: str, networks: Iterable[Network]) -> bool:
    """Whether a client address (IPv4, IPv6, IPv4-mapped IPv6) is in one of ``networks``."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in networks)


def bind_error(exc: OSError, what: str, host: str, port: int, port_option: str, host_option: str) -> OscError:
    """A bind failure as an :class:`OscError` that says what to pass instead."""
    if isinstance(exc, socket.gaierror):
        msg = f"cannot resolve {host!r} for {what}: pass {host_option} with an IP address of this machine"
    elif exc.errno == errno.EADDRINUSE:
        msg = (f"{what} port {port} on {host} is in use (another cicada, or another OSC program): pass "
               f"{port_option} N with a free port")
    elif exc.errno == errno.EACCES:
        msg = (f"no permission to listen for {what} on port {port}: ports below 1024 need root; pass "
               f"{port_option} with a port above 1023")
    elif exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        msg = (f"{host} is not an address of this machine, so {what} cannot listen there: pass {host_option} "
               f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface, with an allow-list)")
    else:
        msg = f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}"
    err = OscError(msg)
    err.errno = exc.errno
    return err


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.split("%")[0]).version == 6 else socket.AF_INET
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        return socket.AF_INET if any(i[0] == socket.AF_INET for i in infos) else infos[0][0]


def _clip(text: str, n: int = MAX_REPLY_TEXT) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _truthy(v: Any) -> bool | None:
    """An action's on/off argument: bool, a finite number (>= 0.5 is on) or on/off text; None if neither."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and math.isfinite(v):
        return v >= 0.5
    if isinstance(v, str) and v.strip().lower() in ("1", "0", "true", "false", "on", "off"):
        return v.strip().lower() in ("1", "true", "on")
    return None


def _whole(v: Any) -> int | None:
    """A whole number from an OSC int or float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        return None
    return int(v)


def _wire(p: Param, value: Any) -> Any:
    """A parameter value in its OSC type (f, i, T/F, s)."""
    if p.kind is bool:
        return bool(value)
    if p.kind is int:
        return int(value)
    if p.kind is float:
        return float(value)
    return str(value)


# ------------------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------------------


class _Reply(Exception):
    """Raised inside a handler to answer ``/cicada/error <address> <text>`` (kind: for counting)."""

    def __init__(self, text: str, kind: str = "refused") -> None:
        super().__init__(text)
        self.kind = kind


Handler = Callable[[str, tuple[Any, ...], Address], None]


class OscServer:
    """OSC over UDP for one :class:`~engine.control.controller.Controller` (see the module's address table).

    ``start()`` binds (raising :class:`OscError` with a remedy), then one thread receives and applies messages
    and a second sends feedback to subscribers. ``port`` is the bound port (``port=0`` picks a free one).
    ``aliases`` maps other addresses (a controller's own, e.g. TouchOSC's ``/1/fader1``) to parameter names;
    the controller's ``osc_aliases`` (a preset's ``[osc]`` table), when it has one, is read live after them.
    The allow-list is checked in ``start()``.
    """

    def __init__(
        self,
        controller: Controller,
        host: str = "127.0.0.1",
        port: int = DEFAULT_OSC_PORT,
        allow: list[str] | None = None,
        *,
        lease_s: float = LEASE_S,
        max_subscribers: int = MAX_SUBSCRIBERS,
        aliases: Mapping[str, str] | None = None,
        oscquery_port: int | None = _OSCQUERY_HINT_PORT,
    ) -> None:
        self.controller = controller
        self.registry = controller.registry
        self.host = host
        self.port = int(port)
        self.allow = list(allow) if allow else []
        self.networks: tuple[Network, ...] = ()
        self.lease_s = float(lease_s)
        self.max_subscribers = int(max_subscribers)
        self.oscquery_port = oscquery_port
        self.aliases: dict[str, str] = {}
        if aliases:
            self.set_aliases(aliases)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._events: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._subs: dict[Address, float] = {}  # target -> lease expiry (monotonic)
        self._fresh: set[Address] = set()  # new subscribers waiting for their first full dump
        self._subs_lock = threading.Lock()
        self._allowed_cache: dict[str, bool] = {}
        self._unsubscribe: Callable[[], None] | None = None
        # counters, under _count_lock (both threads write them)
        self._received = 0
        self._valid = 0
        self._invalid: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._dropped = 0
        self._replies = 0
        self._feedback = 0
        self._send_failed = 0
        self._internal = 0
        self._count_lock = threading.Lock()
        # what happened since the last summary in the log
        self._recent_invalid: Counter[str] = Counter()
        self._recent_errors: Counter[str] = Counter()
        self._recent_dropped: Counter[str] = Counter()
        self._recent_internal = 0
        self._last_summary = -math.inf
        self._actions: dict[str, Handler] = {
            "select": self._select,
            "panic": self._panic,
            "resume": self._resume,
            "start": self._start_stop,
            "stop": self._start_stop,
            "preset/load": self._preset_load,
            "preset/save": self._preset_save,
            "preset/list": self._preset_list,
            "status": self._status,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe_action,
            "ping": self._ping,
            "prompts": self._prompts,
            "midi/learn": self._midi_learn,
        }

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Check the allow-list, bind the socket, start the receive and feedback threads.

        Raises :class:`OscError` (an OSError) with what to do: no allow-list for a non-loopback host, a bad
        allow entry, a port in use, an address that is not this machine's.
        """
        if self._sock is not None:
            return
        if not 0 <= self.port <= 65535:
            raise OscError(f"OSC port {self.port} is out of range: pass --osc-port with a port in 1..65535")
        self.networks = allow_networks(self.host, self.allow)
        self._allowed_cache.clear()
        try:
            sock = socket.socket(_family(self.host), socket.SOCK_DGRAM)
        except OSError as exc:
            raise bind_error(exc, "OSC", self.host, self.port, "--osc-port", "--osc-host") from exc
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((self.host, self.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise bind_error(exc, "OSC", self.host, self.port, "--osc-port", "--osc-host") from exc
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._stop.clear()
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self.controller.on_action.append(self._on_action)
        self._threads = [
            threading.Thread(target=self._receive_loop, name="cicada-osc", daemon=True),
            threading.Thread(target=self._feedback_loop, name="cicada-osc-feedback", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("OSC listening on %s:%d (UDP); addresses under %s", self.host, self.port, PREFIX)

    def stop(self) -> None:
        """Stop both threads and close the socket (idempotent)."""
        if self._sock is None:
            return
        self._stop.set()
        self._events.put(None)
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(ValueError):
            self.controller.on_action.remove(self._on_action)
        self._summary(force=True)
        self._sock.close()
        self._sock = None
        with self._subs_lock:
            self._subs.clear()
            self._fresh.clear()

    def __enter__(self) -> OscServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._sock is not None and all(t.is_alive() for t in self._threads)

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        """Replace the address aliases (address -> parameter name), e.g. a preset's ``[osc]`` table."""
        new: dict[str, str] = {}
        for address, name in aliases.items():
            if not str(address).startswith("/"):
                raise ValueError(f"OSC alias {address!r}: an address starts with '/'")
            self.registry.spec(str(name))  # ParamError for an unknown name
            new[str(address)] = str(name)
        self.aliases = new

    def stats(self) -> dict[str, Any]:
        """Counters: received (datagrams), valid (messages decoded), invalid (undecodable datagrams, by kind),
        errors (error replies, by kind), dropped_not_allowed, replies, feedback (messages sent to subscribers),
        send_failed, internal_errors, subscribers (now)."""
        with self._count_lock:
            out = {
                "received": self._received,
                "valid": self._valid,
                "invalid": dict(self._invalid),
                "errors": dict(self._errors),
                "dropped_not_allowed": self._dropped,
                "replies": self._replies,
                "feedback": self._feedback,
                "send_failed": self._send_failed,
                "internal_errors": self._internal,
            }
        with self._subs_lock:
            out["subscribers"] = len(self._subs)
        return out

    def subscribers(self) -> list[Address]:
        with self._subs_lock:
            return list(self._subs)

    # ------------------------------------------------------------------ receiving

    def _receive_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 0.25)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            for _ in range(512 if ready else 0):  # drain what is there, then look at the stop flag again
                try:
                    data, sender = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. an ICMP error reported on a later receive: not ours to handle
                    continue
                try:
                    self._packet(data, (str(sender[0]), int(sender[1])))
                except Exception:  # nothing escapes the loop; the traceback is logged once per summary period
                    self._internal_error("handling a packet")
            self._summary()

    def _allowed(self, ip: str) -> bool:
        ok = self._allowed_cache.get(ip)
        if ok is None:
            ok = client_allowed(ip, self.networks)
            if len(self._allowed_cache) > 4096:
                self._allowed_cache.clear()
            self._allowed_cache[ip] = ok
        return ok

    def _packet(self, data: bytes, sender: Address) -> None:
        with self._count_lock:
            self._received += 1
        if not self._allowed(sender[0]):
            with self._count_lock:
                self._dropped += 1
                self._recent_dropped[sender[0]] += 1
            return
        try:
            messages = decode_packet(data)
        except OscDecodeError as exc:
            with self._count_lock:
                self._invalid[exc.kind] += 1
                self._recent_invalid[exc.kind] += 1
            if exc.address is not None:  # the address decoded: tell the sender what is wrong
                self._error(sender, exc.address, f"could not decode the arguments: {exc}", "bad_args")
            return
        for address, args in messages:
            with self._count_lock:
                self._valid += 1
            try:
                self._dispatch(address, args, sender)
            except _Reply as r:
                self._error(sender, address, str(r), r.kind)
            except Exception as exc:
                self._internal_error(f"handling {_clip(address, 100)}")
                self._error(sender, address, f"internal error: {_clip(str(exc), 300)} (see the log)", "internal")

    def _dispatch(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        alias = self.aliases.get(address)
        if alias is None:
            table = getattr(self.controller, "osc_aliases", None)
            alias = table.get(address) if isinstance(table, Mapping) else None
        if alias is not None:
            if str(alias) not in self.registry:
                raise _Reply(f"{address} is an alias of {alias!r}, which is not a parameter: fix the preset's "
                             f"[osc] table", "bad_alias")
            self._param(str(alias), address, args, sender)
            return
        name = address[len(PREFIX) :] if address.startswith(PREFIX) else None
        if name is not None and name in self.registry:
            self._param(name, address, args, sender)
            return
        handler = self._actions.get(name) if name is not None else None
        if handler is None:
            raise _Reply(self._unknown(address), "unknown_address")
        handler(address, args, sender)

    def _unknown(self, address: str) -> str:
        where = self.host if self.host not in ("0.0.0.0", "::") else "<this machine>"
        hint = ""
        name = address[len(PREFIX) :]
        if address.startswith(PREFIX) and 0 < len(name) <= 32:  # a typo of ours: name the likely ones
            close = difflib.get_close_matches(name, [*self.registry.names(), *self._actions], n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        query = f" or GET http://{where}:{self.oscquery_port}/" if self.oscquery_port else ""
        return (f"unknown address{hint}; see /cicada/<parameter> (e.g. /cicada/temperature 0.8), /cicada/ping, "
                f"/cicada/status, /cicada/panic, /cicada/subscribe, ... in docs/osc.md{query}")

    # ------------------------------------------------------------------ parameters

    def _param(self, name: str, address: str, args: tuple[Any, ...], sender: Address) -> None:
        p = self.registry.spec(name)
        if not args:
            self._send(sender, address, _wire(p, self.registry.get(name)))
            return
        if len(args) > 1:
            raise _Reply(f"{name} takes one value ({p.describe_range()}), got {len(args)}", "bad_args")
        value = args[0]
        if p.kind is str:
            if not isinstance(value, str):
                raise _Reply(f"{name} is text: send an OSC string (type s)", "bad_args")
            if len(value) > MAX_TEXT:
                raise _Reply(f"{name}: text longer than {MAX_TEXT} characters", "bad_args")
        elif p.kind is bool:
            if not isinstance(value, (bool, int, float, str)) or (isinstance(value, str) and len(value) > 16):
                raise _Reply(f"{name} is on/off: send T/F or 1/0", "bad_args")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Reply(f"{name} is a number ({p.describe_range()}): send an OSC int or float", "bad_args")
        try:
            change = self.registry.set(name, value, source=f"osc:{sender[0]}:{sender[1]}")
        except ParamError as exc:
            raise _Reply(str(exc)) from None
        self._send(sender, address, _wire(p, change.value))
        if change.warning:
            self._send(sender, PREFIX + "warning", address, _clip(change.warning))

    # ------------------------------------------------------------------ actions

    @staticmethod
    def _trigger(args: tuple[Any, ...]) -> bool:
        """Argument-less actions fire with no argument or a true one; a 0/false (a button's release) is
        ignored."""
        return not args or _truthy(args[0]) is not False

    def _ping(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if self._trigger(args):
            self._send(sender, PREFIX + "pong")

    def _select(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        slot = _whole(args[0]) if len(args) == 1 else None
        if slot is None:
            raise _Reply("select takes one whole number: the prompt slot (1..8)", "bad_args")
        try:
            change = self.controller.select(slot, source=f"osc:{sender[0]}:{sender[1]}")
        except ParamError as exc:
            raise _Reply(str(exc)) from None
        self._send(sender, address, slot)
        self._send(sender, PREFIX + "prompt", str(change.value))

    def _panic(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        on = True if not args else _truthy(args[0])
        if on is None:
            raise _Reply("panic takes no argument (panic), or 1/true (panic) or 0/false (resume)", "bad_args")
        if on:
            self.controller.panic()
        else:
            self.controller.resume()
        self._send(sender, PREFIX + "panic", int(on))

    def _resume(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if self._trigger(args):
            self.controller.resume()
            self._send(sender, PREFIX + "panic", 0)

    def _start_stop(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if not self._trigger(args):
            return
        action = address[len(PREFIX) :]
        fn = getattr(self.controller, action, None)
        if not callable(fn):
            raise _Reply(f"this engine cannot {action} generation over OSC; use /cicada/panic and "
                         f"/cicada/resume to silence it and bring it back", "unsupported")
        fn()
        self._send(sender, PREFIX + "running", int(action == "start"))

    def _preset_load(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if len(args) != 1 or not isinstance(args[0], str) or not args[0].strip():
            raise _Reply("preset/load takes one string: the preset's name (see /cicada/preset/list)", "bad_args")
        from engine import presets

        try:
            # source "preset": the values go back to every subscriber, the client that asked included
            pre = self.controller.load_preset(args[0], source="preset")
        except (ParamError, presets.PresetError, OSError, ValueError) as exc:
            raise _Reply(str(exc)) from None
        self._send(sender, PREFIX + "preset/loaded", str(getattr(pre, "name", args[0])))

    def _preset_save(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if not 1 <= len(args) <= 2 or not all(isinstance(a, str) for a in args) or not args[0].strip():
            raise _Reply("preset/save takes a name and an optional description (strings)", "bad_args")
        from engine import presets

        try:
            path = self.controller.save_preset(args[0], args[1] if len(args) > 1 else "")
        except (ParamError, presets.PresetError, OSError, ValueError) as exc:
            raise _Reply(str(exc)) from None
        self._send(sender, PREFIX + "preset/saved", args[0], str(path))

    def _prompts(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if self._trigger(args):
            fn = getattr(self.controller, "prompts", None)
            self._send(sender, address, *(_clip(t) for t in (fn() if callable(fn) else [])))

    def _midi_learn(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if len(args) != 1 or not isinstance(args[0], str):
            raise _Reply("midi/learn takes one string: the parameter the next moved MIDI control binds to",
                         "bad_args")
        try:
            self.controller.midi_learn(args[0])
        except (ParamError, AttributeError) as exc:
            raise _Reply(str(exc)) from None
        self._send(sender, PREFIX + "midi/learning", args[0])

    def _preset_list(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if self._trigger(args):
            self._send(sender, address, *self.controller.preset_names())

    def _status(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        if self._trigger(args):
            self._send(sender, address, self._status_json())

    def _status_json(self) -> str:
        return json.dumps(self.controller.status(), default=str, allow_nan=False, separators=(",", ":"))

    # ------------------------------------------------------------------ subscriptions

    def _target(self, name: str, args: tuple[Any, ...], sender: Address) -> Address:
        if not args:
            return sender
        port = _whole(args[0]) if len(args) == 1 else None
        if port is None or not 1 <= port <= 65535:
            raise _Reply(f"{name} takes no argument (feedback to the port you send from) or one int port "
                         f"(1..65535)", "bad_args")
        return (sender[0], port)

    def _subscribe(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        target = self._target("subscribe", args, sender)
        with self._subs_lock:
            new = target not in self._subs
            if new and len(self._subs) >= self.max_subscribers:
                raise _Reply(f"too many subscribers ({self.max_subscribers}): unsubscribe another client first "
                             f"(/cicada/unsubscribe), or wait {self.lease_s:g} s for one to lapse", "full")
            self._subs[target] = time.monotonic() + self.lease_s
            if new:
                self._fresh.add(target)
        self._send(sender, PREFIX + "subscribed", float(self.lease_s))
        if target != sender:
            self._send(target, PREFIX + "subscribed", float(self.lease_s))
        if new:  # (after the reply: the client hears of its lease first, then every value)
            log.info("OSC feedback to %s:%d for %g s (renewable)", target[0], target[1], self.lease_s)
            self._events.put(("dump", target))

    def _unsubscribe_action(self, address: str, args: tuple[Any, ...], sender: Address) -> None:
        target = self._target("unsubscribe", args, sender)
        with self._subs_lock:
            self._subs.pop(target, None)
            self._fresh.discard(target)
        self._send(sender, PREFIX + "unsubscribed")

    # ------------------------------------------------------------------ feedback

    def _on_change(self, change: Change) -> None:  # on whichever thread set the value
        if self._subs:
            self._events.put(("change", change))

    def _on_action(self, action: str, info: dict[str, Any]) -> None:
        if self._subs:
            self._events.put(("action", action, dict(info)))

    def _feedback_loop(self) -> None:
        periods = {"meter": 1.0 / METER_HZ, "spectrum": 1.0 / SPECTRUM_HZ, "status": 1.0 / STATUS_HZ}
        due = dict.fromkeys(periods, time.monotonic())
        failures = 0
        while not self._stop.is_set():
            now = time.monotonic()
            wait = max(0.0, min(due.values()) - now) if self._subs else 0.25
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                event = None
            try:
                if event is not None:
                    self._feedback_event(event)
                    continue  # events first; the periodic sends follow when the queue is empty
                now = time.monotonic()
                targets = self._live_targets(now)
                if not targets:
                    for k in due:
                        due[k] = now
                    continue
                for kind, period in periods.items():
                    if now >= due[kind]:
                        self._periodic(kind, targets)
                        due[kind] = due[kind] + period if now - due[kind] < period else now + period
                failures = 0
            except Exception:
                failures += 1
                self._internal_error("sending OSC feedback")
                if failures > 3:
                    time.sleep(1.0)  # something is persistently broken: do not spin on it

    def _live_targets(self, now: float) -> list[Address]:
        """Subscribers whose lease runs and who have had their first dump (lapsed ones are dropped)."""
        with self._subs_lock:
            gone = [t for t, expiry in self._subs.items() if expiry <= now]
            for t in gone:
                del self._subs[t]
                self._fresh.discard(t)
            targets = [t for t in self._subs if t not in self._fresh]
        for t in gone:
            log.info("OSC feedback to %s:%d lapsed (no /cicada/subscribe for %g s)", t[0], t[1], self.lease_s)
        return targets

    def _feedback_event(self, event: tuple[Any, ...] | None) -> None:
        if event is None:
            return
        kind = event[0]
        targets = self._live_targets(time.monotonic())
        if kind == "change":
            change: Change = event[1]
            p = self.registry.spec(change.name)
            data = encode_message(PREFIX + change.name, _wire(p, change.value))
            for t in targets:
                if change.source != f"osc:{t[0]}:{t[1]}":  # the sender had the reply already
                    self._sendto(t, data, feedback=True)
        elif kind == "action":
            action, info = event[1], event[2]
            if action in ("panic", "resume"):
                data = encode_message(PREFIX + "panic", int(action == "panic"))
            elif action == "preset":
                data = encode_message(PREFIX + "preset/loaded", str(info.get("name", "")))
            elif action == "saved":
                data = encode_message(PREFIX + "preset/saved", str(info.get("name", "")), str(info.get("path", "")))
            else:
                data = encode_message(PREFIX + str(action), *(str(v) for v in info.values()))
            for t in targets:
                self._sendto(t, data, feedback=True)
        elif kind == "dump":  # a new subscriber: every value now, so its faders match; then the rest
            target = event[1]
            with self._subs_lock:
                if target not in self._fresh:
                    return  # gone already
            snap = self.registry.snapshot()
            for p in self.registry:
                self._sendto(target, encode_message(PREFIX + p.name, _wire(p, snap[p.name])), feedback=True)
            self._sendto(target, encode_message(PREFIX + "panic", int(self.controller.panicking)), feedback=True)
            self._sendto(target, encode_message(PREFIX + "status", self._status_json()), feedback=True)
            with self._subs_lock:
                self._fresh.discard(target)

    def _periodic(self, kind: str, targets: list[Address]) -> None:
        meter = self.controller.meter
        if kind == "meter":
            levels = meter.levels()
            peak, rms = levels["peak_db"], levels["rms_db"]
            data = encode_message(PREFIX + "meter", float(peak[0]), float(peak[-1] if len(peak) < 2 else peak[1]),
                                  float(rms[0]), float(rms[-1] if len(rms) < 2 else rms[1]))
        elif kind == "spectrum":
            data = encode_message(PREFIX + "spectrum", meter.spectrum(SPECTRUM_BANDS).astype("<f4").tobytes())
        else:
            data = encode_message(PREFIX + "status", self._status_json())
        for t in targets:
            self._sendto(t, data, feedback=True)

    # ------------------------------------------------------------------ sending

    def _send(self, target: Address, address: str, *args: Any) -> None:
        self._sendto(target, encode_message(address, *args))

    def _error(self, target: Address, address: str, text: str, kind: str) -> None:
        with self._count_lock:
            self._errors[kind] += 1
            self._recent_errors[kind] += 1
        self._sendto(target, encode_message(PREFIX + "error", _clip(address, 256), _clip(text)))

    def _sendto(self, target: Address, data: bytes, feedback: bool = False) -> None:
        with self._count_lock:  # counted first, so a client that got its reply sees it counted
            if feedback:
                self._feedback += 1
            else:
                self._replies += 1
        sock = self._sock
        try:
            if sock is None:
                raise OSError("closed")
            sock.sendto(data, target)
        except OSError:  # a full send buffer (non-blocking), an unreachable client: count, never wait
            with self._count_lock:
                self._send_failed += 1
                if feedback:
                    self._feedback -= 1
                else:
                    self._replies -= 1

    # ------------------------------------------------------------------ logging, rate-limited

    def _internal_error(self, what: str) -> None:
        with self._count_lock:
            self._internal += 1
            first = self._recent_internal == 0
            self._recent_internal += 1
        if first:  # one traceback per summary period, the rest are counted
            log.exception("OSC: unexpected error %s (further ones are counted)", what)

    def _summary(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_summary < SUMMARY_EVERY_S:
            return
        with self._count_lock:
            inv, err, drop = self._recent_invalid, self._recent_errors, self._recent_dropped
            internal = self._recent_internal
            if not (inv or err or drop or internal):
                return
            prev, self._last_summary = self._last_summary, now
            self._recent_invalid, self._recent_errors, self._recent_dropped = Counter(), Counter(), Counter()
            self._recent_internal = 0

        def kinds(c: Counter[str]) -> str:
            return ", ".join(f"{k} {n}" for k, n in c.most_common())

        parts = []
        if inv:
            parts.append(f"{sum(inv.values())} undecodable packets ({kinds(inv)})")
        if drop:
            parts.append(f"{sum(drop.values())} packets from addresses not allowed ({kinds(drop)}; "
                         f"allow with --osc-allow)")
        if err:
            parts.append(f"{sum(err.values())} error replies ({kinds(err)})")
        if internal:
            parts.append(f"{internal} unexpected errors")
        level = logging.WARNING if inv or drop or internal else logging.INFO
        since = f"in the last {now - prev:.0f} s" if math.isfinite(prev) else "since start"
        log.log(level, "OSC %s: %s", since, "; ".join(parts))
