"""The parameter registry: every value a performer, an installation or a DAW can steer.

All control surfaces (OSC, OSCQuery, MIDI, the Qt panel through OSC, presets)
write this one registry; the engine reads one immutable :class:`Snapshot` per
step and listens for changes. Nothing here blocks for long: ``set`` takes a
lock for a dict copy, then tells the listeners outside the lock.

::

    OSC ──┐                          ┌─> Controller (applies to the generator and the output)
    MIDI ─┼─> Registry.set(name, v) ─┼─> OSC feedback to subscribed clients
    GUI ──┘   clamp, validate,       └─> MIDI soft-takeover state, OSCQuery VALUE
              version += 1

A value outside its range is clamped and the caller gets a warning to pass
on (``Change.warning``); a value of the wrong type, an unknown name or a
value a validator refuses (a prompt with no word the pack knows) raises
:class:`ParamError` and changes nothing.

Each :class:`Param` says its name (its OSC address is ``/cicada/<name>``),
type, range, default, unit, description and smoothing time (how long the
engine takes to glide to a new value; 0 = at the next step).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

log = logging.getLogger("cicada.params")

Value = float | int | bool | str


class ParamError(ValueError):
    """A change the registry refuses; the message names the parameter and what to send instead."""


@dataclass(frozen=True)
class Param:
    """One steerable value.

    ``kind`` is ``float``, ``int``, ``bool`` or ``str``; ``low``/``high`` bound
    numbers (inclusive); ``choices`` limits a string to a set; ``live`` is
    False for values that only take effect when the engine (re)starts.
    """

    name: str
    kind: type
    default: Value
    description: str
    low: float | None = None
    high: float | None = None
    unit: str = ""
    smoothing_ms: float = 0.0
    group: str = "sound"
    choices: tuple[str, ...] = ()
    live: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (float, int, bool, str):
            raise TypeError(f"{self.name}: kind must be float, int, bool or str")
        if self.kind in (float, int) and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"{self.name}: numeric parameters need low <= high")

    @property
    def osc_type(self) -> str:
        """OSC type tag of the value: ``f``, ``i``, ``T``/``F`` (bool) or ``s``."""
        return {float: "f", int: "i", bool: "T", str: "s"}[self.kind]

    def coerce(self, value: Any) -> tuple[Value, str | None]:
        """``value`` as this parameter's type, clamped to range: ``(value, warning or None)``.

        Raises :class:`ParamError` for a value that cannot be this type.
        """
        k = self.kind
        if k is bool:
            if isinstance(value, bool):
                return value, None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return value >= 0.5, None  # a fader or a button sends 0/1 as numbers
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off", "1", "0"):
                return value.strip().lower() in ("true", "on", "1"), None
            raise ParamError(f"{self.name} is on/off: send true/false or 1/0, not {value!r}")
        if k is str:
            if not isinstance(value, str):
                raise ParamError(f"{self.name} is text: send a string, not {value!r}")
            if self.choices and value not in self.choices:
                raise ParamError(f"{self.name} must be one of {', '.join(self.choices)}, not {value!r}")
            return value, None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{self.name} is a number ({self.describe_range()}): not {value!r}")
        if not math.isfinite(value):
            raise ParamError(f"{self.name} must be a finite number ({self.describe_range()}), not {value!r}")
        assert self.low is not None and self.high is not None
        v: float | int = int(round(value)) if k is int else float(value)
        if v < self.low or v > self.high:
            clamped = k(min(max(v, self.low), self.high))
            return clamped, f"{self.name} {value!r} is out of range {self.describe_range()}: set to {clamped!r}"
        return v, None

    def describe_range(self) -> str:
        if self.kind in (float, int):
            return f"{self.low:g}..{self.high:g}{(' ' + self.unit) if self.unit else ''}"
        if self.choices:
            return " | ".join(self.choices)
        return "true/false" if self.kind is bool else "text"

    def normalized(self, value: Value) -> float:
        """A number's position in its range, 0..1 (bool: 0/1; text: 0)."""
        if self.kind is bool:
            return 1.0 if value else 0.0
        if self.kind is str or self.high == self.low:
            return 0.0
        assert self.low is not None and self.high is not None
        return (float(value) - self.low) / (self.high - self.low)  # type: ignore[arg-type]

    def from_normalized(self, x: float) -> Value:
        """0..1 -> a value in range (the inverse of :meth:`normalized`), for knobs and faders."""
        x = min(max(float(x), 0.0), 1.0)
        if self.kind is bool:
            return x >= 0.5
        if self.kind is str:
            return self.default
        assert self.low is not None and self.high is not None
        v = self.low + x * (self.high - self.low)
        return int(round(v)) if self.kind is int else float(v)


PROMPT_SLOTS = 8

PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "", "Prompt A: what to hear (free text; words the pack knows)", group="prompt"),
    Param("prompt_b", str, "", "Prompt B: what the morph moves towards (empty: prompt A only)", group="prompt"),
    Param("morph", float, 0.0, "Morph from prompt A (0) to prompt B (1)", 0.0, 1.0, smoothing_ms=150.0,
          group="prompt"),
    *(Param(f"slot_{i}", str, "", f"Prompt slot {i}: text recalled into prompt A by /cicada/select {i} or a MIDI note",
            group="slots") for i in range(1, PROMPT_SLOTS + 1)),
    Param("temperature", float, 1.0, "Randomness of the sampling (0 = always the likeliest token)", 0.0, 4.0,
          group="sampling"),
    Param("top_k", int, 250, "Sample among the k likeliest tokens (0 = all)", 0, 2048, group="sampling"),
    Param("top_p", float, 0.0, "Sample among the likeliest tokens holding this much probability (0 = off)",
          0.0, 1.0, group="sampling"),
    Param("guidance", float, 3.0, "How strongly the prompt steers (classifier-free guidance; 1 = plain)",
          0.0, 10.0, group="sampling"),
    Param("seed", int, 0, "Random seed; setting it restarts the random draw sequence", 0, 2**31 - 1,
          group="sampling"),
    Param("gain_db", float, 0.0, "Output gain before the limiter", -60.0, 12.0, "dB", smoothing_ms=50.0,
          group="output"),
    Param("mute", bool, False, "Mute the output (fades, no click)", group="output"),
    Param("ceiling_db", float, -1.0, "Limiter ceiling: the output never goes above it", -24.0, 0.0, "dBFS",
          group="output"),
    Param("latency_ms", float, 60.0, "Audio the engine keeps queued ahead of the speaker", 10.0, 1000.0, "ms",
          group="engine"),
    Param("tempo_bpm", float, 120.0, "Tempo for quantized prompt changes (MIDI clock sets it)", 20.0, 300.0,
          "BPM", group="engine"),
    Param("quantize", str, "off", "Apply prompt changes at once, or at the next beat or bar", group="engine",
          choices=("off", "beat", "bar")),
)

PARAM_BY_NAME: Mapping[str, Param] = MappingProxyType({p.name: p for p in PARAMS})
"""The built-in parameters by name (what presets, pack manifests and converters check values against)."""


def in_range(values: Mapping[str, Any]) -> tuple[dict[str, Value], list[str]]:
    """Values of built-in parameters taken as they are or not at all: ``(accepted, problems)``.

    Each value is coerced to its parameter's type; one that cannot be, or that :meth:`Param.coerce` would
    clamp, is left out and its problem names the key (``"top_k = 5000 is out of range 0..1000"``). For
    settings a file states (a pack's ``[sampling]``, a converted checkpoint's generation config), where a
    silently clamped value would be a different setting from the one written.
    """
    accepted: dict[str, Value] = {}
    problems: list[str] = []
    for key, value in values.items():
        param = PARAM_BY_NAME[key]
        try:
            v, warning = param.coerce(value)
        except ParamError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if warning is not None:
            problems.append(f"{key} = {value!r} is out of range {param.describe_range()}")
            continue
        accepted[key] = v
    return accepted, problems


@dataclass(frozen=True)
class Snapshot:
    """All values at one version (immutable; read it, never mutate it)."""

    version: int
    values: Mapping[str, Value]

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def get(self, name: str, default: Value | None = None) -> Value | None:
        return self.values.get(name, default)


@dataclass(frozen=True)
class Change:
    """What one ``set`` did: the value applied, the old value, who asked, and a warning (clamped) if any."""

    name: str
    value: Value
    old: Value
    version: int
    source: str = ""
    warning: str | None = None

    @property
    def changed(self) -> bool:
        return self.value != self.old


Listener = Callable[[Change], None]
Validator = Callable[[Value], None]


@dataclass
class _Subscription:
    fn: Listener
    names: frozenset[str] | None = None  # None: everything


class Registry:
    """The parameter registry. Thread-safe; listeners run on the caller's thread, after the lock."""

    def __init__(self, params: Iterable[Param] = PARAMS, values: Mapping[str, Any] | None = None) -> None:
        self._params: dict[str, Param] = {}
        for p in params:
            if p.name in self._params:
                raise ValueError(f"parameter {p.name!r} defined twice")
            self._params[p.name] = p
        self._lock = threading.Lock()
        self._values: dict[str, Value] = {p.name: p.default for p in self._params.values()}
        self._version = 0
        self._snapshot = Snapshot(0, MappingProxyType(dict(self._values)))
        self._subs: list[_Subscription] = []
        self._validators: dict[str, list[Validator]] = {}
        if values:
            self.update(values, source="init")

    # ---------------------------------------------------------------- reading

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def __iter__(self) -> Iterator[Param]:
        return iter(self._params.values())

    def names(self) -> list[str]:
        return list(self._params)

    def spec(self, name: str) -> Param:
        try:
            return self._params[name]
        except KeyError:
            raise ParamError(self._unknown(name)) from None

    def get(self, name: str) -> Value:
        if name not in self._params:
            raise ParamError(self._unknown(name))
        return self._snapshot.values[name]

    def snapshot(self) -> Snapshot:
        """The current values (one atomic read; safe from any thread)."""
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    def _unknown(self, name: str) -> str:
        close = [n for n in self._params if n.startswith(name[:3])] if name else []
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        return f"unknown parameter {name!r}{hint}; known: {', '.join(self._params)}"

    # ---------------------------------------------------------------- writing

    def add_validator(self, name: str, fn: Validator) -> None:
        """``fn(value)`` raises ParamError to refuse a value of ``name`` (checked before anything changes)."""
        self.spec(name)
        self._validators.setdefault(name, []).append(fn)

    def set(self, name: str, value: Any, source: str = "") -> Change:
        """Set one value (clamped to range); listeners hear about it. Raises ParamError, changing nothing."""
        return self.update({name: value}, source)[0]

    def update(self, values: Mapping[str, Any], source: str = "") -> list[Change]:
        """Set several values at once: all of them or (on any ParamError) none; one version step."""
        coerced: list[tuple[str, Value, str | None]] = []
        for name, raw in values.items():
            p = self.spec(name)
            v, warning = p.coerce(raw)
            for fn in self._validators.get(name, ()):
                fn(v)
            coerced.append((name, v, warning))
        with self._lock:
            new = dict(self._values)
            version = self._version + 1
            changes = [Change(n, v, new[n], version, source, w) for n, v, w in coerced]
            for n, v, _ in coerced:
                new[n] = v
            self._values = new
            self._version = version
            self._snapshot = Snapshot(version, MappingProxyType(dict(new)))
            subs = list(self._subs)
        for w in (c.warning for c in changes if c.warning):
            log.debug("%s", w)  # the caller passes it on (an OSC /cicada/warning reply, a log line)
        for sub in subs:
            for c in changes:
                if sub.names is None or c.name in sub.names:
                    try:
                        sub.fn(c)
                    except Exception:  # a broken listener must not break the others or the caller
                        log.exception("parameter listener failed on %s", c.name)
        return changes

    def reset(self, names: Iterable[str] | None = None, source: str = "") -> list[Change]:
        """Back to the defaults (all, or the names given)."""
        names = list(self._params) if names is None else list(names)
        return self.update({n: self.spec(n).default for n in names}, source)

    def subscribe(self, fn: Listener, names: Iterable[str] | None = None) -> Callable[[], None]:
        """Call ``fn(change)`` after every change (of ``names`` only, if given); returns an unsubscribe."""
        sub = _Subscription(fn, None if names is None else frozenset(names))
        with self._lock:
            self._subs.append(sub)

        def unsubscribe() -> None:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)

        return unsubscribe

    # ---------------------------------------------------------------- description

    def describe(self) -> list[dict[str, Any]]:
        """Every parameter as plain data (for OSCQuery, the GUI and the docs), with its current value."""
        snap = self._snapshot
        out = []
        for p in self._params.values():
            d: dict[str, Any] = {
                "name": p.name,
                "type": p.kind.__name__,
                "osc_type": p.osc_type,
                "default": p.default,
                "value": snap.values[p.name],
                "unit": p.unit,
                "description": p.description,
                "smoothing_ms": p.smoothing_ms,
                "group": p.group,
                "live": p.live,
            }
            if p.kind in (float, int):
                d["min"], d["max"] = p.low, p.high
            if p.choices:
                d["choices"] = list(p.choices)
            out.append(d)
        return out


@dataclass
class Smoother:
    """A one-pole glide of a float towards its target, advanced once per frame (about 95% of the way in ``smoothing_ms``)."""

    value: float
    target: float = field(default=float("nan"))

    def __post_init__(self) -> None:
        if math.isnan(self.target):
            self.target = self.value

    def step(self, dt_ms: float, smoothing_ms: float) -> float:
        """Move towards the target; within 1e-4 of it (or no smoothing) it lands exactly."""
        if smoothing_ms <= 0 or abs(self.target - self.value) < 1e-4:
            self.value = self.target
        else:
            self.value += (self.target - self.value) * (1.0 - math.exp(-dt_ms / (smoothing_ms / 3.0)))
        return self.value
