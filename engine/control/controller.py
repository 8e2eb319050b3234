"""The control API: what every surface (OSC, OSCQuery, MIDI, the Qt panel, presets) can do to a running engine.

Surfaces write the parameter registry (:mod:`engine.params`) and call the few
actions that are not values (panic, start, stop, select a prompt slot, load
or save a preset, status). The :class:`Controller` listens to the registry
and applies each change where it belongs::

    registry change ──> prompt / prompt_b / morph / sampling ──> Generator.set_params (next step)
                    ──> gain_db / mute ────────────────────────> OutputSafety gain ramp (no click)
                    ──> latency_ms / ceiling_db ───────────────> Stream target fill / limiter ceiling
                    ──> seed ──────────────────────────────────> a fresh random draw sequence

Prompt changes can wait for the next beat or bar (``quantize``) of the tempo
(``tempo_bpm``, which a MIDI clock sets). ``morph`` glides over its smoothing
time, one step per frame, so a fader jump never clicks.

A prompt with no word the pack knows is refused before anything changes
(:class:`~engine.params.ParamError` with the list of known prompts), so a typo
on stage never silences the engine.

Nothing here runs on the audio path: conditioning a new prompt runs on the
caller's thread (the OSC or MIDI thread), the generator picks up the result
at its next step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.conditioner import PromptError
from engine.generator import Generator, GenParams
from engine.params import Change, ParamError, Registry, Smoother, Snapshot

if TYPE_CHECKING:
    from engine.stream import Stream

log = logging.getLogger("cicada.control")

_GEN_KEYS = frozenset({"prompt", "prompt_b", "morph", "temperature", "top_k", "top_p", "guidance"})
_PROMPT_KEYS = frozenset({"prompt", "prompt_b"})
METER_WINDOW = 2048  # samples kept for the spectrum


class Meter:
    """Peak and RMS of the output, and a window of the latest samples for a spectrum.

    ``feed`` runs on the decode worker once per block: a few numpy reductions
    and one copy into a preallocated ring, no allocation beyond numpy's
    temporaries. Readers (OSC feedback, the panel) call :meth:`levels` and
    :meth:`spectrum` at their own rate.
    """

    def __init__(self, rate: int, channels: int) -> None:
        self.rate = rate
        self.channels = channels
        self._win = np.zeros((METER_WINDOW, channels), np.float32)
        self._pos = 0
        self._peak = np.zeros(channels, np.float64)
        self._rms = np.zeros(channels, np.float64)
        self._hann = np.hanning(METER_WINDOW).astype(np.float32)

    def feed(self, block: np.ndarray) -> None:
        """``block [N, C]`` float32, just handed to the sink."""
        n = block.shape[0]
        if n == 0:
            return
        np.max(np.abs(block), axis=0, out=self._peak)
        self._rms[:] = np.sqrt(np.mean(np.square(block, dtype=np.float64), axis=0))
        if n >= METER_WINDOW:
            self._win[:] = block[-METER_WINDOW:]
            self._pos = 0
            return
        end = self._pos + n
        if end <= METER_WINDOW:
            self._win[self._pos : end] = block
        else:
            k = METER_WINDOW - self._pos
            self._win[self._pos :] = block[:k]
            self._win[: n - k] = block[k:]
        self._pos = end % METER_WINDOW

    def levels(self) -> dict[str, list[float]]:
        """``{"peak_db": [C], "rms_db": [C]}`` of the last block (-120 for silence)."""

        def db(x: np.ndarray) -> list[float]:
            return [round(20.0 * math.log10(v), 2) if v > 1e-6 else -120.0 for v in x.tolist()]

        return {"peak_db": db(self._peak), "rms_db": db(self._rms)}

    def spectrum(self, bands: int = 64, low_hz: float = 30.0) -> np.ndarray:
        """Magnitudes in dB of the last ``METER_WINDOW`` samples (channels summed) in ``bands`` log bands."""
        x = np.roll(self._win, -self._pos, axis=0).mean(axis=1) * self._hann
        mag = np.abs(np.fft.rfft(x)) / (METER_WINDOW / 4)
        freqs = np.fft.rfftfreq(METER_WINDOW, 1.0 / self.rate)
        edges = np.geomspace(low_hz, self.rate / 2, bands + 1)
        idx = np.clip(np.searchsorted(freqs, edges), 1, mag.size - 1)
        out = np.empty(bands, np.float32)
        for i in range(bands):
            a, b = idx[i], max(idx[i + 1], idx[i] + 1)
            out[i] = mag[a:b].max()
        return (20.0 * np.log10(np.maximum(out, 1e-6))).astype(np.float32)


class Controller:
    """Applies registry changes to a generator and its stream; the actions every surface shares.

    ``stream`` may be None (a generator stepped by hand, as in tests and
    renders) and can be attached later with :meth:`attach`.
    """

    def __init__(
        self,
        registry: Registry,
        generator: Generator,
        stream: Stream | None = None,
        *,
        presets_dir: Path | None = None,
    ) -> None:
        self.registry = registry
        self.gen = generator
        self.stream: Stream | None = None
        self.presets_dir = presets_dir
        self.preset_name = ""
        self.started_at = time.monotonic()
        self._lock = threading.RLock()
        self._morph = Smoother(float(registry.get("morph")))
        self._glide: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        # the prompts in force: the registry's, except while a quantized change waits for its beat
        self._prompts = {k: registry.get(k) for k in _PROMPT_KEYS}
        self._beat_origin = time.monotonic()
        self._cpu = (time.monotonic(), time.process_time())
        self._cpu_pct = 0.0
        self.meter = Meter(generator.sample_rate, generator.channels)
        self.on_action: list[Callable[[str, dict[str, Any]], None]] = []  # feedback: ("panic", {...}) etc.
        self.midi_mapping: dict[str, Any] = {}  # from the last preset; the MIDI input takes it from here
        self.midi_source: Callable[[], dict[str, Any]] | None = None  # the MIDI input's live mapping, for saving
        self.osc_aliases: dict[str, str] = {}  # a controller's own addresses -> parameter names
        self.midi: Any = None  # the MIDI input, when the engine has one (for learn)
        # the registry's prompts must mean something to this pack before they are accepted
        for name in ("prompt", "prompt_b", *(n for n in registry.names() if n.startswith("slot_"))):
            if name in registry:
                registry.add_validator(name, self._check_prompt)
        self._unsubscribe = registry.subscribe(self._on_change)
        if stream is not None:
            self.attach(stream)

    # ------------------------------------------------------------------ wiring

    def attach(self, stream: Stream) -> None:
        """Steer this stream (gain, mute, latency, panic, meter) from now on."""
        self.stream = stream
        snap = self.registry.snapshot()
        stream.on_output = self.meter.feed
        self._apply_gain(snap)
        stream.set_latency_ms(float(snap["latency_ms"]))
        stream.set_ceiling_db(float(snap["ceiling_db"]))

    def close(self) -> None:
        self._unsubscribe()
        if self._timer is not None:
            self._timer.cancel()

    def gen_params(self, snap: Snapshot | None = None, morph: float | None = None) -> GenParams:
        """The generator's parameters for a registry snapshot (current morph position unless given)."""
        s = snap or self.registry.snapshot()
        return GenParams.from_values({**s.values, **self._prompts}, s.version,
                                     self._morph.value if morph is None else morph)

    def _check_prompt(self, value: Any) -> None:
        text = str(value)
        if not text.strip():
            return  # empty: prompt B off, or an empty slot
        try:
            self.gen.conditioner.check(text)
        except PromptError as exc:
            raise ParamError(str(exc)) from None

    # ------------------------------------------------------------------ applying changes

    def _on_change(self, change: Change) -> None:
        name = change.name
        snap = self.registry.snapshot()
        if name in _PROMPT_KEYS:
            if snap["quantize"] != "off":
                self._defer_prompt(snap)
                return
            self._take_prompts(snap)
        if name == "morph":
            self._morph.target = float(change.value)
            self._start_glide()
            return
        if name in _GEN_KEYS:
            self.gen.set_params(self.gen_params(snap))
        elif name in ("gain_db", "mute"):
            self._apply_gain(snap)
        elif name == "latency_ms" and self.stream is not None:
            self.stream.set_latency_ms(float(change.value))
        elif name == "ceiling_db" and self.stream is not None:
            self.stream.set_ceiling_db(float(change.value))
        elif name == "seed":
            self.gen.rng = np.random.default_rng(int(change.value))
        elif name == "tempo_bpm":
            # keep the place in the bar: the same fraction of 4 beats, at the new tempo
            now = time.monotonic()
            old_beat, new_beat = 60.0 / float(change.old), 60.0 / float(change.value)
            phase = ((now - self._beat_origin) / old_beat) % 4.0
            self._beat_origin = now - phase * new_beat

    def _apply_gain(self, snap: Snapshot) -> None:
        if self.stream is None:
            return
        self.stream.safety.set_gain_db(-math.inf if snap["mute"] else float(snap["gain_db"]))

    def _start_glide(self) -> None:
        """Move morph towards its target one frame at a time (on a small thread, not the audio path)."""
        with self._lock:
            if self._glide is not None and self._glide.is_alive():
                return
            self._glide = threading.Thread(target=self._glide_loop, name="cicada-morph", daemon=True)
            self._glide.start()

    def _glide_loop(self) -> None:
        smoothing = self.registry.spec("morph").smoothing_ms
        frame_ms = 1000.0 * self.gen.hop / self.gen.sample_rate
        while True:
            before = self._morph.value
            value = self._morph.step(frame_ms, smoothing)
            if value != before or value == self._morph.target:
                self.gen.set_params(self.gen_params(morph=value))
            if value == self._morph.target:
                return
            time.sleep(frame_ms / 1000.0)

    def _defer_prompt(self, snap: Snapshot) -> None:
        """Apply the prompts at the next beat or bar (4 beats) of ``tempo_bpm``."""
        beat_s = 60.0 / float(snap["tempo_bpm"])
        unit = beat_s * (4 if snap["quantize"] == "bar" else 1)
        elapsed = time.monotonic() - self._beat_origin
        wait = unit - (elapsed % unit)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(wait, self._take_prompts)
            self._timer.daemon = True
            self._timer.start()
        log.debug("prompt change in %.3f s (next %s)", wait, snap["quantize"])

    def _take_prompts(self, snap: Snapshot | None = None) -> None:
        """Put the registry's prompts in force (at once, or when a quantized change's beat comes)."""
        s = snap or self.registry.snapshot()
        with self._lock:
            self._prompts = {k: s[k] for k in _PROMPT_KEYS}
        if snap is None:  # the timer: nothing else will pass them on
            self.gen.set_params(self.gen_params(s))

    def beat(self) -> None:
        """Mark now as a beat boundary (MIDI clock start, song position, tap)."""
        self._beat_origin = time.monotonic()

    # ------------------------------------------------------------------ actions

    def select(self, slot: int, source: str = "") -> Change:
        """Recall prompt slot ``slot`` (1-based) into prompt A."""
        name = f"slot_{int(slot)}"
        if name not in self.registry:
            n = sum(1 for x in self.registry.names() if x.startswith("slot_"))
            raise ParamError(f"no prompt slot {slot}: slots are 1..{n}")
        text = str(self.registry.get(name))
        if not text.strip():
            raise ParamError(f"prompt slot {slot} is empty: set /cicada/slot_{slot} to a prompt first")
        return self.registry.set("prompt", text, source)

    def prompts(self) -> list[str]:
        """The prompts the pack was trained on (for completion in a panel)."""
        return list(self.gen.pack.prompts)

    def midi_learn(self, param: str) -> None:
        """Bind the next MIDI control that moves to ``param``."""
        self.registry.spec(param)
        if self.midi is None:
            raise ParamError("no MIDI input: start the engine with --midi-in NAME or --midi-virtual NAME")
        self.midi.learn(param)

    def panic(self) -> None:
        """Fade to silence within 50 ms and stay silent until :meth:`resume` (or start)."""
        if self.stream is not None:
            self.stream.panic()
        self._emit("panic", {})

    def resume(self) -> None:
        if self.stream is not None:
            self.stream.resume()
        self._emit("resume", {})

    @property
    def panicking(self) -> bool:
        return self.stream is not None and self.stream.safety.is_panicking

    def _emit(self, action: str, info: dict[str, Any]) -> None:
        for fn in list(self.on_action):
            try:
                fn(action, info)
            except Exception:
                log.exception("action listener failed on %s", action)

    # ------------------------------------------------------------------ presets

    def preset_names(self) -> list[str]:
        """Every preset this engine can load, sorted: index N is what MIDI program change N loads."""
        from engine import presets

        return presets.names(self.presets_dir)

    def load_preset(self, name: str, source: str = "") -> Any:
        """Load a preset by name or path: all its values at once, or nothing (PresetError).

        The sound is the preset's: prompt and sampling values it leaves out go back to their
        defaults (the pack's own sampling where its manifest has ``[sampling]``); output and engine values
        (gain, latency, tempo...) stay unless it sets them.
        """
        from engine import presets

        pre = presets.load(name, self.presets_dir)
        values: dict[str, Any] = {p.name: p.default for p in self.registry if p.group in ("prompt", "sampling")
                                  and p.name != "seed"}
        pack = getattr(self.gen, "pack", None)
        values.update(getattr(pack, "sampling", None) or {})
        values.update(pre.values)
        self.registry.update(values, source or "preset")
        self.preset_name = pre.name
        self.midi_mapping = dict(pre.midi)
        self.osc_aliases = dict(pre.osc)
        self._emit("preset", {"name": pre.name})
        return pre

    def save_preset(self, name: str, description: str = "", extra: dict[str, Any] | None = None) -> Path:
        """Save the current values (and the MIDI/OSC mappings in force) as a user preset, atomically."""
        from engine import presets

        extra = dict(extra or {})
        midi = self.midi_source() if self.midi_source is not None else self.midi_mapping
        extra.setdefault("midi", midi)
        extra.setdefault("osc", self.osc_aliases)
        path = presets.save(name, self.registry.snapshot().values, description=description, extra=extra,
                            folder=self.presets_dir)
        self.preset_name = name
        self._emit("saved", {"name": name, "path": str(path)})
        return path

    # ------------------------------------------------------------------ generation on/off

    def start(self) -> None:
        """Start generating (again) and fade in."""
        st = self.stream
        if st is None:
            raise ParamError("no output stream to start")
        if not st.running:
            st.start()
        st.resume()
        self._emit("start", {})

    def stop(self) -> None:
        """Fade out and stop generating; the engine and its control surfaces keep running."""
        st = self.stream
        if st is None:
            return
        st.panic()
        time.sleep(0.06)
        st.stop()
        self._emit("stop", {})

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Figures for a status display: rtf, buffer fill, underruns, CPU, levels, prompt, version."""
        now, cpu = time.monotonic(), time.process_time()
        t0, c0 = self._cpu
        if now - t0 >= 0.5:
            self._cpu_pct = 100.0 * (cpu - c0) / (now - t0)
            self._cpu = (now, cpu)
        out: dict[str, Any] = {
            "version": self.registry.version,
            "prompt": self.registry.get("prompt"),
            "playing": self.gen.condition.text,  # the prompt of the last step (a quantized change may be pending)
            "preset": self.preset_name,
            "steps": self.gen.steps,
            "cpu_pct": round(self._cpu_pct, 1),
            "uptime_s": round(now - self.started_at, 1),
            "running": False,
            "panic": self.panicking,
        }
        st = self.stream
        if st is not None:
            s = st.stats()
            frame_ms = 1000.0 * st.gen.hop / st.gen.sample_rate
            worst = max(s["lm_ms_p50"], s["decode_ms_p50"])
            out.update(
                running=st.running,
                rtf=round(worst / frame_ms, 3) if math.isfinite(worst) else None,
                buffer_ms=round(1000.0 * st.sink.queued() / st.sink.rate, 1),
                latency_ms=st.latency_ms,
                underruns=int(s.get("sink_underruns", 0)),
                outages=int(s.get("sink_outages", 0)),
                nonfinite=int(s["nonfinite_blocks"]),
                limiter_db=round(float(s["gain_reduction_db"]), 2),
            )
        out.update(self.meter.levels())
        return out
