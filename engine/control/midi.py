"""MIDI input: knobs with MIDI learn and soft takeover, notes for prompt slots, program changes, clock, panic.

::

    controller / DAW ──> rtmidi port (ALSA sequencer or JACK MIDI)
                          │  rtmidi's own queue (no Python on the JACK process thread)
                          ▼
    cicada-midi thread:  poll ──> split bytes into messages (count and drop garbage)
                          ├─ CC (mapped) ──> pickup check ──> Registry.set(param, value, "midi")
                          ├─ CC 120 / 123 ─────────────────> Controller.panic()
                          ├─ note-on note_base+i ──────────> Controller.select(i + 1)   (quantize: Controller)
                          ├─ program change N ─────────────> Controller.load_preset(presets.names()[N])
                          └─ clock 0xF8, start, continue ──> tempo_bpm ("midi-clock"), Controller.beat()

**Learn.** ``learn("temperature")`` binds the next control change that moves
to that parameter (on the channel it came on). A controller number 0-31
followed at once by its partner 32-63 is bound as one 14-bit control. The
learned mapping lives in :attr:`MidiInput.mapping` (a :class:`MidiMap`, plain
data that a preset saves as its ``[midi]`` table; see docs/midi.md).

**Soft takeover (pickup).** When a mapped parameter changes from anywhere
else (OSC, the panel, a preset, another knob), an absolute knob no longer
drives it: its messages are ignored until the knob crosses the current value
(or comes within ``pickup_tolerance`` of it), then it follows again. So a
knob never makes the sound jump. A mapping read from a preset starts in that
state (the knob's position is unknown); a freshly learned one follows at once
(you are holding it). Relative encoders, on/off and choice parameters do not
need pickup.

**Robustness.** rtmidi hands over raw bytes. They are split and checked here
(status bytes, data bytes below 0x80, message lengths, SysEx framing);
anything malformed or unexpected is counted in :meth:`MidiInput.stats` and
dropped, and a summary is logged at most every ``LOG_EVERY_S`` seconds.
Nothing raises out of the input thread.

Registry writes happen on the ``cicada-midi`` thread, never on the audio path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.params import Change, Param, ParamError, Registry

if TYPE_CHECKING:
    from engine.control.controller import Controller

log = logging.getLogger("cicada.midi")

MODES = ("absolute", "relative", "relative64", "14bit")
CLOCK_PPQ = 24  # MIDI clock ticks per quarter note
CLOCK_WINDOW = 4 * CLOCK_PPQ  # the tempo is fitted over the last 4 beats
CLOCK_MIN_TICKS = 2 * CLOCK_PPQ  # ... once 2 beats have been seen
CLOCK_GAP_S = 0.25  # a longer pause between ticks (< 10 BPM) restarts the estimate
TEMPO_DEADBAND_BPM = 0.5  # tempo_bpm is written only when the estimate moves by more than this
BAR_TICKS = 4 * CLOCK_PPQ  # Controller.beat() marks bar lines (4/4) counted from Start / song position
PAIR_WINDOW_S = 0.5  # while learning: an LSB this soon after its MSB makes the mapping 14-bit
LOG_EVERY_S = 10.0
DEFAULT_PANIC_CC = (120, 123)  # all sound off, all notes off
SOURCE = "midi"
CLOCK_SOURCE = "midi-clock"


class MidiError(RuntimeError):
    """A MIDI port that cannot be opened; the message says what exists and what to pass instead."""


# ----------------------------------------------------------------------------------------------------------
# The mapping: plain data, round-trips through TOML (a preset's [midi] table)
# ----------------------------------------------------------------------------------------------------------


def _int_field(d: Mapping[str, Any], key: str, where: str, low: int, high: int, default: int | None = None) -> int:
    if key not in d:
        if default is None:
            raise ValueError(f"{where}: missing key {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}.{key} must be a whole number {low}..{high}, got {v!r}")
    if not low <= v <= high:
        raise ValueError(f"{where}.{key} = {v} is out of range {low}..{high}")
    return v


def _num_field(d: Mapping[str, Any], key: str, where: str) -> float | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}.{key} must be a finite number, got {v!r}")
    return float(v)


def _bool_field(d: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}.{key} must be true or false, got {v!r}")
    return v


def _check_keys(d: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a table, got {type(d).__name__}")
    for key in d:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")


@dataclass
class CCMapping:
    """One control change bound to one parameter.

    ``control`` is the controller number (0-127; for ``14bit`` the MSB
    number 0-31, its LSB is ``control + 32``). ``channel`` is 0-15 (as mido
    counts: 0 is the channel a device shows as 1) or -1 for any. ``low`` and
    ``high`` narrow (or, with ``low > high``, invert) the range the knob
    sweeps, in the parameter's units (default: its whole range). ``step`` is
    the change per encoder tick in relative modes (default: range / 127).
    ``pickup`` False lets an absolute knob jump the value (no soft takeover).
    """

    param: str
    control: int
    channel: int = -1
    mode: str = "absolute"
    low: float | None = None
    high: float | None = None
    step: float | None = None
    pickup: bool = True

    KEYS = ("param", "control", "channel", "mode", "low", "high", "step", "pickup")

    @property
    def controls(self) -> tuple[int, ...]:
        """The controller numbers this mapping listens to (MSB and LSB for 14-bit)."""
        return (self.control, self.control + 32) if self.mode == "14bit" else (self.control,)

    def overlaps(self, other: CCMapping) -> bool:
        """True if some CC would drive both mappings (same control, channels that can meet)."""
        if -1 not in (self.channel, other.channel) and self.channel != other.channel:
            return False
        return bool(set(self.controls) & set(other.controls))

    def matches(self, channel: int, control: int) -> bool:
        """True if a CC ``control`` on ``channel`` drives this mapping (the LSB too for 14-bit)."""
        if self.channel not in (-1, channel):
            return False
        return control in self.controls

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML-safe: optional fields are left out, never None)."""
        d: dict[str, Any] = {"param": self.param, "control": self.control, "channel": self.channel,
                             "mode": self.mode}
        for key in ("low", "high", "step"):
            v = getattr(self, key)
            if v is not None:
                d[key] = v
        if not self.pickup:
            d["pickup"] = False
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "cc") -> CCMapping:
        """Parse and check one mapping; ValueError names the key and the problem."""
        _check_keys(d, cls.KEYS, where)
        param = d.get("param")
        if not isinstance(param, str) or not param:
            raise ValueError(f"{where}.param must be a parameter name, got {param!r}")
        mode = d.get("mode", "absolute")
        if mode not in MODES:
            raise ValueError(f"{where}.mode must be one of {', '.join(MODES)}, got {mode!r}")
        control = _int_field(d, "control", where, 0, 31 if mode == "14bit" else 127)
        channel = _int_field(d, "channel", where, -1, 15, default=-1)
        step = _num_field(d, "step", where)
        if step is not None and step <= 0:
            raise ValueError(f"{where}.step must be > 0, got {step!r}")
        return cls(param=param, control=control, channel=channel, mode=mode, low=_num_field(d, "low", where),
                   high=_num_field(d, "high", where), step=step, pickup=_bool_field(d, "pickup", where, True))


@dataclass
class MidiMap:
    """Every MIDI binding of a session: CC mappings, the prompt-slot notes, program changes, the panic CCs.

    Notes ``note_base .. note_base + 7`` (note-on) select prompt slots 1..8
    when ``notes``; program change N loads the N-th preset (sorted names)
    when ``programs``. Channels are 0-15 or -1 for any.
    """

    cc: list[CCMapping] = field(default_factory=list)
    note_base: int = 60
    note_channel: int = -1
    notes: bool = True
    program_channel: int = -1
    programs: bool = True
    panic_cc: list[int] = field(default_factory=lambda: list(DEFAULT_PANIC_CC))

    KEYS = ("cc", "note_base", "note_channel", "notes", "program_channel", "programs", "panic_cc")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a preset's ``[midi]`` table (``MidiMap.from_dict(m.to_dict()) == m``)."""
        return {
            "cc": [m.to_dict() for m in self.cc],
            "note_base": self.note_base,
            "note_channel": self.note_channel,
            "notes": self.notes,
            "program_channel": self.program_channel,
            "programs": self.programs,
            "panic_cc": list(self.panic_cc),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MidiMap:
        """Parse and check a ``[midi]`` table (every key optional); ValueError names the key and the problem."""
        _check_keys(d, cls.KEYS, "midi")
        raw_cc = d.get("cc", [])
        if not isinstance(raw_cc, (list, tuple)):
            raise ValueError(f"midi.cc must be a list of tables ([[midi.cc]]), got {type(raw_cc).__name__}")
        cc = [CCMapping.from_dict(m, f"midi.cc[{i}]") for i, m in enumerate(raw_cc)]
        for i, m in enumerate(cc):
            for j in range(i):
                if m.overlaps(cc[j]):
                    raise ValueError(f"midi.cc[{i}] ({m.param}): control {m.control} on channel {m.channel} is "
                                     f"already mapped by midi.cc[{j}] ({cc[j].param}); remove one of them")
        panic = d.get("panic_cc", list(DEFAULT_PANIC_CC))
        if not isinstance(panic, (list, tuple)) or any(isinstance(c, bool) or not isinstance(c, int)
                                                       or not 0 <= c <= 127 for c in panic):
            raise ValueError(f"midi.panic_cc must be a list of controller numbers 0..127, got {panic!r}")
        return cls(
            cc=cc,
            note_base=_int_field(d, "note_base", "midi", 0, 127, default=60),
            note_channel=_int_field(d, "note_channel", "midi", -1, 15, default=-1),
            notes=_bool_field(d, "notes", "midi", True),
            program_channel=_int_field(d, "program_channel", "midi", -1, 15, default=-1),
            programs=_bool_field(d, "programs", "midi", True),
            panic_cc=list(panic),
        )

    def validate(self, registry: Registry) -> None:
        """Check that every mapped parameter exists and a knob can set it; ValueError otherwise."""
        for i, m in enumerate(self.cc):
            try:
                _check_mappable(registry, m.param)
            except ParamError as exc:
                raise ValueError(f"midi.cc[{i}]: {exc}") from None

    def bind(self, mapping: CCMapping) -> None:
        """Add ``mapping``, replacing any mapping of the same parameter and any on the same control."""
        self.cc = [m for m in self.cc if m.param != mapping.param and not m.overlaps(mapping)]
        self.cc.append(mapping)

    def unbind(self, param: str) -> bool:
        """Remove the mappings of ``param``; True if there were any."""
        n = len(self.cc)
        self.cc = [m for m in self.cc if m.param != param]
        return len(self.cc) != n


def _check_mappable(registry: Registry, name: str) -> Param:
    p = registry.spec(name)  # ParamError for an unknown name, with suggestions
    if p.kind is str and not p.choices:
        raise ParamError(f"{name} is text: a knob cannot set it (map notes to prompt slots instead)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Splitting raw bytes into messages
# ----------------------------------------------------------------------------------------------------------

# data bytes that follow each status (None: undefined status)
_SYSTEM_LEN: dict[int, int | None] = {0xF1: 1, 0xF2: 2, 0xF3: 1, 0xF4: None, 0xF5: None, 0xF6: 0}
_CHANNEL_LEN = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2}


def _realtime(b: int) -> tuple[str | None, tuple[int, ...]]:
    return ("unknown_status", (b,)) if b in (0xF9, 0xFD) else (None, (b,))


def split_messages(data: Sequence[int]) -> Iterator[tuple[str | None, tuple[int, ...]]]:
    """Split one raw event into ``(None, message)`` and ``(kind, bytes)`` for what is malformed.

    Follows the MIDI wire rules within the event: real-time bytes (0xF8-0xFF)
    may appear anywhere, running status (data bytes after a complete channel
    message reuse its status) is honoured, a SysEx runs from 0xF0 to 0xF7.
    Malformed kinds: ``running_status`` (data bytes with no status before
    them), ``truncated`` (the event ends inside a message), ``bad_data`` (a
    status byte where a data byte belongs), ``sysex`` (not terminated, or a
    stray 0xF7), ``unknown_status`` (0xF4, 0xF5, 0xF9, 0xFD), ``not_bytes``
    (anything but integers 0..255: the whole event is dropped). After a
    problem, parsing resumes at the next status byte, so messages that rtmidi
    glued behind a broken SysEx still count. One event may add several counts.
    """
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in data):
        yield "not_bytes", ()
        return
    n = len(data)
    i = 0
    running: int | None = None
    while i < n:
        b = data[i]
        if b >= 0xF8:  # real-time: one byte, anywhere
            yield _realtime(b)
            i += 1
            continue
        if b == 0xF0:
            j = i + 1
            while j < n and (data[j] < 0x80 or data[j] >= 0xF8):
                j += 1
            if j < n and data[j] == 0xF7:
                yield None, tuple(x for x in data[i : j + 1] if x < 0xF8)
                for x in data[i + 1 : j]:  # real-time bytes inside a SysEx still count
                    if x >= 0xF8:
                        yield _realtime(x)
                i = j + 1
            else:
                yield "sysex", tuple(data[i:j])
                i = j
            running = None
            continue
        if b == 0xF7:
            yield "sysex", (b,)
            i += 1
            running = None
            continue
        if b >= 0x80:
            status = b
            need = _SYSTEM_LEN.get(b, 0) if b >= 0xF0 else _CHANNEL_LEN[b & 0xF0]
            if need is None:
                yield "unknown_status", (b,)
                i += 1
                running = None
                continue
            running = status if b < 0xF0 else None
            i += 1
        elif running is not None:
            status = running
            need = _CHANNEL_LEN[status & 0xF0]
        else:
            j = i
            while j < n and data[j] < 0x80:
                j += 1
            yield "running_status", tuple(data[i:j])
            i = j
            continue
        body: list[int] = []
        realtime: list[int] = []
        while len(body) < need and i < n and (data[i] < 0x80 or data[i] >= 0xF8):
            (realtime if data[i] >= 0xF8 else body).append(data[i])
            i += 1
        for x in realtime:
            yield _realtime(x)
        if len(body) < need:
            yield ("bad_data", (status, *body, data[i])) if i < n else ("truncated", (status, *body))
            running = None
            continue
        yield None, (status, *body)


# ----------------------------------------------------------------------------------------------------------
# Ports
# ----------------------------------------------------------------------------------------------------------


def _api_id(api: str) -> int:
    import rtmidi

    name = api.lower()
    if name == "auto":
        name = "alsa" if Path("/dev/snd/seq").exists() else "jack"
    ids = {"alsa": rtmidi.API_LINUX_ALSA, "jack": rtmidi.API_UNIX_JACK}
    if name not in ids:
        raise MidiError(f"unknown MIDI API {api!r}: use auto, alsa or jack")
    if ids[name] not in rtmidi.get_compiled_api():
        raise MidiError(f"this python-rtmidi has no {name.upper()} support; "
                        f"it has: {', '.join(rtmidi.get_api_name(a) for a in rtmidi.get_compiled_api()) or 'none'}")
    return ids[name]


def _api_remedy(api_id: int) -> str:
    import rtmidi

    if api_id == rtmidi.API_UNIX_JACK:
        return ("no JACK server is running (there is no ALSA sequencer, /dev/snd/seq, here): start one "
                "(`jackd -d dummy` or a real one) or load the snd-seq kernel module")
    return ("the ALSA sequencer (/dev/snd/seq) cannot be opened: check that your user may use it "
            "(the audio group) and that the snd-seq kernel module is loaded")


def _open_midi_in(api_id: int, client: str) -> Any:
    import rtmidi

    try:
        return rtmidi.MidiIn(api_id, name=client, queue_size_limit=4096)
    except rtmidi.RtMidiError as exc:
        raise MidiError(f"cannot open MIDI input ({exc}); {_api_remedy(api_id)}") from None


def list_ports(api: str = "auto") -> list[str]:
    """Names of the MIDI inputs one can open (sources: controllers, other programs' outputs).

    Raises :class:`MidiError` when the MIDI system itself cannot be opened
    (no ALSA sequencer and no JACK server), with what to do.
    """
    midi_in = _open_midi_in(_api_id(api), "cicada-list")
    try:
        return list(midi_in.get_ports())
    finally:
        with contextlib.suppress(Exception):
            midi_in.delete()


# ----------------------------------------------------------------------------------------------------------
# The input
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Knob:
    """Run-time state of one mapping (not saved)."""

    picked_up: bool = False
    last_x: float | None = None  # the knob's last position, 0..1 along the mapping's range
    value: float | None = None  # relative modes: the accumulated value (fractions of an int step kept)
    msb: int | None = None  # 14-bit: the MSB waiting for its LSB
    msb_only: bool = False  # 14-bit: the device sent an MSB with no LSB after the previous MSB


class _Summary:
    """Counts problems and logs them at most once every ``every`` seconds."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self.pending: Counter[str] = Counter()
        self.last = -math.inf

    def add(self, kind: str) -> None:
        self.pending[kind] += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            what = ", ".join(f"{k}: {v}" for k, v in sorted(self.pending.items()))
            log.warning("ignored %d malformed MIDI message(s) (%s); see MidiInput.stats()",
                        sum(self.pending.values()), what)
            self.pending.clear()


class MidiInput:
    """One MIDI input port steering a :class:`~engine.control.controller.Controller`.

    Pass ``port`` (part of an existing input's name, case-insensitive) or
    ``virtual`` (the name of a port cicada creates for others to connect to).
    ``api`` is ``auto`` (the ALSA sequencer where /dev/snd/seq exists, JACK
    MIDI otherwise), ``alsa`` or ``jack``. Nothing opens until :meth:`start`;
    :meth:`feed` processes a raw message without any port (tests, other transports).

    Keyword options: ``client_name`` (the ALSA/JACK client), ``pickup_tolerance``
    (how close, 0..1 of the knob's travel, counts as reaching the value),
    ``poll_ms`` (how often the input thread looks at rtmidi's queue),
    ``preset_names`` (what program change N indexes; default
    ``engine.presets.names(controller.presets_dir)``), ``follow_presets``
    (adopt the ``[midi]`` table of a preset when one is loaded, if it has one).
    """

    def __init__(
        self,
        controller: Controller,
        port: str | None = None,
        virtual: str | None = None,
        api: str = "auto",
        mapping: MidiMap | None = None,
        *,
        client_name: str = "cicada",
        pickup_tolerance: float = 2.0 / 127.0,
        poll_ms: float = 2.0,
        preset_names: Callable[[], Sequence[str]] | None = None,
        follow_presets: bool = True,
    ) -> None:
        if port is not None and virtual is not None:
            raise ValueError("pass either port (open an existing MIDI input) or virtual (create one), not both")
        self.controller = controller
        self.registry: Registry = controller.registry
        self.port = port
        self.virtual = virtual
        self.api = api
        self.client_name = client_name
        self.pickup_tolerance = float(pickup_tolerance)
        self.poll_s = max(0.0002, poll_ms / 1000.0)
        self._preset_names = preset_names
        self.port_name: str | None = None  # what was opened (the port's name, or the virtual port's)
        self.learning: str | None = None
        self.on_learn: list[Callable[[CCMapping], None]] = []  # feedback for a panel: the mapping just made
        self._learn_mode: str | None = None
        self._learn_pair: tuple[CCMapping, float] | None = None  # a mapping that may become 14-bit
        self._lock = threading.RLock()
        self._local = threading.local()  # .applying: the mapping whose write is under way on this thread
        self._knobs: dict[int, _Knob] = {}
        self._map = MidiMap()
        if mapping is not None:
            self.mapping = mapping
        self.follow_presets = follow_presets
        self._midi_in: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._attach()
        # counters
        self._messages = 0
        self._mapped = 0
        self._ignored: Counter[str] = Counter()
        self._malformed: Counter[str] = Counter()
        self._learned = 0
        self._summary = _Summary()
        self._last_error_log = -math.inf
        # clock
        self._now = 0.0  # seconds, summed from rtmidi's deltas (the driver's timestamps, not our polling)
        self._ticks: deque[float] = deque(maxlen=CLOCK_WINDOW + 1)
        self._tick_count = 0  # since Start / song position: marks bar lines
        self._clock_bpm: float | None = None

    # ------------------------------------------------------------------ mapping

    @property
    def mapping(self) -> MidiMap:
        """The bindings in use (a preset saves ``mapping.to_dict()``).

        Assigning a :class:`MidiMap` checks it (ValueError) and copies its bindings into this live map, whose
        identity never changes (so a saved ``midi.mapping.to_dict`` stays valid); every knob must pick up again.
        """
        return self._map

    @mapping.setter
    def mapping(self, value: MidiMap) -> None:
        value.validate(self.registry)
        with self._lock:
            for f in fields(MidiMap):
                v = getattr(value, f.name)
                setattr(self._map, f.name, list(v) if isinstance(v, list) else v)
            self._knobs = {}
            self._learn_pair = None

    def _on_action(self, action: str, info: dict[str, Any]) -> None:
        """A preset was loaded: adopt its ``[midi]`` table if it has one (keep the current bindings otherwise)."""
        if action != "preset" or not self.follow_presets:
            return
        table = getattr(self.controller, "midi_mapping", None)
        if not table:
            return
        try:
            self.mapping = MidiMap.from_dict(table)
            log.info("MIDI mappings from preset %s: %d control(s)", info.get("name", "?"), len(self._map.cc))
        except (ValueError, ParamError) as exc:
            log.warning("preset %s: MIDI mappings not used (%s); keeping the current ones", info.get("name", "?"), exc)

    def _prune(self) -> None:
        """Forget the state of mappings that are gone (called with the lock held)."""
        live = {id(m) for m in self._map.cc}
        self._knobs = {i: k for i, k in self._knobs.items() if i in live}

    def _knob(self, m: CCMapping) -> _Knob:
        k = self._knobs.get(id(m))
        if k is None:
            k = self._knobs[id(m)] = _Knob()
        return k

    def learn(self, param: str, mode: str | None = None) -> None:
        """Bind the next CC that moves (or 14-bit pair) to ``param``; ``mode`` forces a mode (e.g. ``relative``).

        Raises :class:`~engine.params.ParamError` for a parameter a knob cannot set.
        """
        _check_mappable(self.registry, param)
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        with self._lock:
            self.learning = param
            self._learn_mode = mode
        log.info("MIDI learn: move a control to bind it to %s", param)

    def cancel_learn(self) -> None:
        """Stop waiting for a control to learn."""
        with self._lock:
            self.learning = None
            self._learn_mode = None

    def unbind(self, param: str) -> bool:
        """Remove the mappings of ``param``; True if there were any."""
        with self._lock:
            gone = self._map.unbind(param)
            self._prune()
            return gone

    # ------------------------------------------------------------------ port

    def start(self) -> None:
        """Open the port and start the input thread. Raises MidiError (what exists, what to pass) if it cannot."""
        if self._thread is not None:
            return
        self._attach()
        if self.port is None and self.virtual is None:
            raise MidiError("no MIDI input chosen: pass --midi-in NAME (an existing port) or --midi-virtual NAME")
        api_id = _api_id(self.api)
        midi_in = _open_midi_in(api_id, self.client_name)
        try:
            midi_in.ignore_types(sysex=False, timing=False, active_sense=False)  # we count and filter ourselves
            if self.virtual is not None:
                midi_in.open_virtual_port(self.virtual)
                self.port_name = self.virtual
            else:
                ports = list(midi_in.get_ports())
                index = self._match_port(ports, str(self.port))
                midi_in.open_port(index, "in")
                self.port_name = ports[index]
        except MidiError:
            midi_in.delete()
            raise
        except Exception as exc:
            midi_in.delete()
            raise MidiError(f"cannot open MIDI input {self.port or self.virtual!r}: {exc}") from None
        self._midi_in = midi_in
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cicada-midi", daemon=True)
        self._thread.start()
        log.info("MIDI input: %s%s", self.port_name, " (virtual)" if self.virtual is not None else "")

    @staticmethod
    def _match_port(ports: Sequence[str], want: str) -> int:
        low = want.lower()
        exact = [i for i, p in enumerate(ports) if p.lower() == low]
        found = exact or [i for i, p in enumerate(ports) if low in p.lower()]
        if not found:
            avail = ", ".join(repr(p) for p in ports) or "none"
            raise MidiError(f"no MIDI input matching {want!r}; available: {avail}; "
                            "pass --midi-in NAME (part of one of those) or --midi-virtual NAME")
        if len(found) > 1:
            log.info("MIDI input %r matches %s; using %r", want, ", ".join(repr(ports[i]) for i in found),
                     ports[found[0]])
        return found[0]

    def stop(self) -> None:
        """Stop the input thread, close the port and stop listening to the registry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        midi_in, self._midi_in = self._midi_in, None
        if midi_in is not None:
            def close() -> None:
                with contextlib.suppress(Exception):
                    midi_in.close_port()
                with contextlib.suppress(Exception):
                    midi_in.delete()

            # closing a JACK client whose server has gone can hang: never let that hang the caller
            closer = threading.Thread(target=close, name="cicada-midi-close", daemon=True)
            closer.start()
            closer.join(timeout=2.0)
            if closer.is_alive():
                log.warning("MIDI input %s did not close within 2 s (its server gone?); leaving it", self.port_name)
        self._detach()

    close = stop

    def _attach(self) -> None:
        """Listen to the registry (pickup) and the controller's actions (presets)."""
        if self._unsubscribe is None:
            self._unsubscribe = self.registry.subscribe(self._on_change)
        if self._on_action not in self.controller.on_action:
            self.controller.on_action.append(self._on_action)

    def _detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(ValueError):
            self.controller.on_action.remove(self._on_action)

    def __enter__(self) -> MidiInput:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """Poll rtmidi's queue (its driver thread queues; no Python runs on the JACK process thread)."""
        midi_in = self._midi_in
        while not self._stop.is_set():
            try:
                item = midi_in.get_message()
            except Exception as exc:  # the port went away: say so once and end the thread
                log.warning("MIDI input %s failed (%s); stopping it", self.port_name, exc)
                return
            if item is None:
                self._stop.wait(self.poll_s)
                continue
            message, delta = item
            self.feed(message, delta)

    # ------------------------------------------------------------------ messages

    def feed(self, data: Sequence[int], delta: float = 0.0) -> None:
        """Process one raw event (bytes as rtmidi delivers them; ``delta``: seconds since the previous one).

        Never raises: what cannot be used is counted in :meth:`stats`.
        """
        try:
            d = float(delta)
            self._now += d if math.isfinite(d) and d >= 0 else 0.0
            for kind, msg in split_messages(data):
                self._messages += 1
                if kind is not None:
                    self._malformed[kind] += 1
                    self._summary.add(kind)
                    continue
                self._dispatch(msg)
        except Exception:  # never out of the input thread; a traceback at most every LOG_EVERY_S
            self._malformed["error"] += 1
            now = time.monotonic()
            if now - self._last_error_log >= LOG_EVERY_S:
                self._last_error_log = now
                log.exception("MIDI message %.80r could not be handled (%d so far)", data, self._malformed["error"])

    def _ignore(self, reason: str) -> None:
        self._ignored[reason] += 1

    def _dispatch(self, msg: tuple[int, ...]) -> None:
        status = msg[0]
        if status >= 0xF0:
            self._system(msg)
            return
        kind, channel = status & 0xF0, status & 0x0F
        if kind == 0xB0:
            self._control_change(channel, msg[1], msg[2])
        elif kind == 0x90 and msg[2] > 0:
            self._note_on(channel, msg[1])
        elif kind == 0xC0:
            self._program_change(channel, msg[1])
        else:
            self._ignore({0x80: "note_off", 0x90: "note_off", 0xA0: "aftertouch", 0xD0: "aftertouch",
                          0xE0: "pitch_bend"}[kind])

    def _system(self, msg: tuple[int, ...]) -> None:
        status = msg[0]
        if status == 0xF8:
            self._clock_tick()
        elif status == 0xFA:  # start: position 0, a bar line now
            self._ticks.clear()
            self._tick_count = 0
            self.controller.beat()
            self._mapped += 1
        elif status == 0xFB:  # continue: from the song position (or where the clock stopped)
            self._ticks.clear()
            if self._tick_count % BAR_TICKS == 0:
                self.controller.beat()
            self._mapped += 1
        elif status == 0xFC:  # stop
            self._ticks.clear()
            self._mapped += 1
        elif status == 0xF2:  # song position pointer, in 16th notes (6 ticks each)
            self._tick_count = ((msg[2] << 7) | msg[1]) * 6
            self._mapped += 1
        else:
            self._ignore({0xF0: "sysex", 0xFE: "active_sensing", 0xFF: "reset", 0xF1: "timecode",
                          0xF3: "song_select", 0xF6: "tune_request"}.get(status, "system"))

    # ------------------------------------------------------------------ control change

    def _control_change(self, channel: int, control: int, value: int) -> None:
        learned: CCMapping | None = None
        with self._lock:
            if control in self._map.panic_cc:
                pass
            elif self.learning is not None and control < 120:
                learned = self._learn_from(channel, control, value)
                if learned is None:
                    return
            elif self._learn_pair is not None:
                learned = self._upgrade_pair(channel, control, value)
        if learned is not None:  # listeners hear about it outside the lock
            self._tell_learned(learned)
            return
        if control in self._map.panic_cc:
            log.warning("MIDI panic (CC %d on channel %d)", control, channel + 1)
            self.controller.panic()
            self._mapped += 1
            return
        with self._lock:
            targets = [m for m in self._map.cc if m.matches(channel, control)]
        if not targets:
            self._ignore("unmapped_cc")
            return
        for m in targets:
            self._apply(m, control, value)

    def _learn_from(self, channel: int, control: int, value: int) -> CCMapping | None:
        """Called with the lock held: bind the learning parameter to this control; the new mapping."""
        param = self.learning
        assert param is not None
        mode = self._learn_mode or "absolute"
        if mode == "14bit" and control > 31:
            self._ignore("learn_needs_msb")
            return None
        m = CCMapping(param=param, control=control, channel=channel, mode=mode)
        self._map.bind(m)
        self._prune()
        knob = self._knob(m)
        knob.picked_up = True  # you are holding the knob: it follows from its next move
        if mode in ("absolute", "14bit"):
            knob.last_x = value / 127.0
        if mode == "14bit":
            knob.msb = value
        self._learn_pair = (m, time.monotonic()) if self._learn_mode is None and control < 32 else None
        self.learning = None
        self._learn_mode = None
        self._learned += 1
        self._mapped += 1
        log.info("MIDI learn: CC %d (channel %d) -> %s", control, channel + 1, param)
        return m

    def _upgrade_pair(self, channel: int, control: int, value: int) -> CCMapping | None:
        """Called with the lock held: an LSB right after a just-learned MSB makes that mapping 14-bit."""
        assert self._learn_pair is not None
        m, at = self._learn_pair
        self._learn_pair = None
        if (time.monotonic() - at > PAIR_WINDOW_S or control != m.control + 32 or m.channel != channel
                or all(x is not m for x in self._map.cc)
                or any(x.matches(channel, control) for x in self._map.cc if x is not m)):
            return None
        m.mode = "14bit"
        knob = self._knob(m)
        msb = round((knob.last_x or 0.0) * 127)
        knob.msb = msb
        knob.last_x = ((msb << 7) | value) / 16383.0
        log.info("MIDI learn: CC %d/%d is a 14-bit pair -> %s", m.control, control, m.param)
        self._mapped += 1
        return m

    def _tell_learned(self, m: CCMapping) -> None:
        for fn in list(self.on_learn):
            try:
                fn(m)
            except Exception:
                log.exception("MIDI learn listener failed")

    def _apply(self, m: CCMapping, control: int, value: int) -> None:
        try:
            p = self.registry.spec(m.param)
        except ParamError:
            self._ignore("unknown_param")
            return
        low = m.low if m.low is not None else float(p.low if p.low is not None else 0.0)
        high = m.high if m.high is not None else float(p.high if p.high is not None else 1.0)
        with self._lock:
            knob = self._knob(m)
            if m.mode in ("relative", "relative64"):
                new = self._relative(m, knob, p, value, low, high)
            else:
                x = self._position(m, knob, control, value)
                if x is None:
                    return
                new = self._absolute(m, knob, p, x, low, high)
            if new is None:
                return
        self._local.applying = m
        try:
            self.registry.set(m.param, new, SOURCE)
            self._mapped += 1
        except ParamError as exc:
            self._ignore("refused")
            log.info("MIDI CC %d -> %s refused: %s", control, m.param, exc)
        finally:
            self._local.applying = None

    def _position(self, m: CCMapping, knob: _Knob, control: int, value: int) -> float | None:
        """The knob's position 0..1 (None: waiting for the other half of a 14-bit pair)."""
        if m.mode != "14bit":
            return value / 127.0
        if control == m.control:  # MSB: wait for its LSB, unless this device sends MSBs alone
            alone = knob.msb is not None and knob.msb_only
            knob.msb_only = True
            knob.msb = value
            if not alone:
                self._ignore("msb_wait")
                return None
            return (value << 7) / 16383.0
        knob.msb_only = False
        if knob.msb is None:
            self._ignore("lsb_without_msb")
            return None
        return ((knob.msb << 7) | value) / 16383.0

    def _absolute(self, m: CCMapping, knob: _Knob, p: Param, x: float, low: float, high: float) -> Any:
        last, knob.last_x = knob.last_x, x
        if p.kind is bool:
            return x >= 0.5
        if p.kind is str:  # choices
            return p.choices[min(len(p.choices) - 1, int(x * len(p.choices)))]
        if m.pickup and not knob.picked_up:
            current = float(self.registry.get(m.param))  # type: ignore[arg-type]
            target = 0.0 if high == low else min(max((current - low) / (high - low), 0.0), 1.0)
            crossed = last is not None and (last - target) * (x - target) <= 0
            if not crossed and abs(x - target) > self.pickup_tolerance:
                self._ignore("pickup")
                return None
            knob.picked_up = True
        return low + x * (high - low)

    def _relative(self, m: CCMapping, knob: _Knob, p: Param, value: int, low: float, high: float) -> Any:
        if m.mode == "relative":  # two's complement: 1..63 = +n, 65..127 = -(128 - n)
            ticks = value if value < 64 else value - 128
        else:  # relative64: offset 64: 65..127 = +(n - 64), 0..63 = -(64 - n)
            ticks = value - 64
        if ticks == 0:
            self._ignore("relative_zero")
            return None
        lo, hi = min(low, high), max(low, high)
        if p.kind is bool:
            return ticks > 0
        if p.kind is str:  # choices: one step per message
            current = self.registry.get(m.param)
            i = p.choices.index(current) if current in p.choices else 0
            return p.choices[min(max(i + (1 if ticks > 0 else -1), 0), len(p.choices) - 1)]
        step = m.step if m.step is not None else (hi - lo) / 127.0
        base = knob.value if knob.value is not None else float(self.registry.get(m.param))  # type: ignore[arg-type]
        new = min(max(base + ticks * step, lo), hi)
        knob.value = new
        return new

    def _on_change(self, change: Change) -> None:
        """A registry change from anywhere: knobs of that parameter (except the one writing) must pick up again."""
        applying = getattr(self._local, "applying", None)
        with self._lock:
            for m in self._map.cc:
                if m.param == change.name and m is not applying:
                    knob = self._knobs.get(id(m))
                    if knob is not None:
                        knob.picked_up = False
                        knob.value = None

    # ------------------------------------------------------------------ notes, programs

    def _note_on(self, channel: int, note: int) -> None:
        mp = self._map
        if not mp.notes or mp.note_channel not in (-1, channel):
            self._ignore("note")
            return
        slots = sum(1 for n in self.registry.names() if n.startswith("slot_"))
        i = note - mp.note_base
        if not 0 <= i < slots:
            self._ignore("note")
            return
        try:
            self.controller.select(i + 1, source=SOURCE)
            self._mapped += 1
        except ParamError as exc:
            self._ignore("slot_refused")
            log.info("MIDI note %d: %s", note, exc)

    def _program_change(self, channel: int, program: int) -> None:
        mp = self._map
        if not mp.programs or mp.program_channel not in (-1, channel):
            self._ignore("program")
            return
        try:
            names = list(self._preset_names() if self._preset_names is not None else self._default_preset_names())
        except Exception as exc:
            self._ignore("preset_error")
            log.warning("MIDI program change %d: cannot list presets (%s)", program, exc)
            return
        if program >= len(names):
            self._ignore("program_out_of_range")
            log.info("MIDI program change %d: there are only %d presets (0..%d)", program, len(names),
                     len(names) - 1)
            return
        try:
            self.controller.load_preset(names[program])
            self._mapped += 1
        except Exception as exc:  # PresetError, ParamError: a broken preset must not stop the input
            self._ignore("preset_error")
            log.warning("MIDI program change %d: preset %r not loaded: %s", program, names[program], exc)

    def _default_preset_names(self) -> list[str]:
        return self.controller.preset_names()

    # ------------------------------------------------------------------ clock

    def _clock_tick(self) -> None:
        now = self._now
        ticks = self._ticks
        if ticks and now - ticks[-1] > CLOCK_GAP_S:
            ticks.clear()
        ticks.append(now)
        if self._tick_count % BAR_TICKS == 0:  # this tick is on a bar line (position counted from Start)
            self.controller.beat()
        self._tick_count += 1
        self._mapped += 1
        if len(ticks) > CLOCK_MIN_TICKS and self._tick_count % 6 == 0:
            bpm = _fit_bpm(ticks)
            if bpm is None:
                return
            self._clock_bpm = bpm
            spec = self.registry.spec("tempo_bpm")
            bpm = min(max(bpm, float(spec.low or 0)), float(spec.high or 1000))
            if abs(bpm - float(self.registry.get("tempo_bpm"))) > TEMPO_DEADBAND_BPM:  # type: ignore[arg-type]
                self.registry.set("tempo_bpm", round(bpm, 2), CLOCK_SOURCE)

    # ------------------------------------------------------------------ status

    def stats(self) -> dict[str, Any]:
        """Counters: ``messages`` (all), ``mapped`` (acted on), ``ignored`` and ``malformed`` (by reason/kind),
        ``clock_bpm`` (the clock's tempo estimate, None without a clock), ``learned``, ``mappings``, ``learning``."""
        return {
            "messages": self._messages,
            "mapped": self._mapped,
            "ignored": dict(self._ignored),
            "malformed": dict(self._malformed),
            "clock_bpm": None if self._clock_bpm is None else round(self._clock_bpm, 2),
            "learned": self._learned,
            "mappings": len(self._map.cc),
            "learning": self.learning,
            "port": self.port_name,
            "running": self.running,
        }


def _fit_bpm(ticks: Sequence[float]) -> float | None:
    """Least-squares slope of tick time against tick number -> BPM (robust to per-tick jitter)."""
    n = len(ticks)
    mean_i = (n - 1) / 2.0
    mean_t = sum(ticks) / n
    num = sum((i - mean_i) * (t - mean_t) for i, t in enumerate(ticks))
    den = sum((i - mean_i) ** 2 for i in range(n))
    if den <= 0 or num <= 0:
        return None
    return 60.0 / (CLOCK_PPQ * num / den)
