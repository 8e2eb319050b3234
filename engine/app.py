"""What `cicada play`, `serve` and `render` share: pack + preset + generator + sink + stream.

The CLI parses; this module opens things in the right order, with the errors
a user can act on, and runs them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import pack as packfmt
from engine import presets
from engine.conditioner import PromptError
from engine.generator import Generator, GeneratorError, GenParams
from engine.params import PROMPT_SLOTS, ParamError, Registry

if TYPE_CHECKING:
    # engine.stream pulls in numba (engine.post): imported where it is used, so that `play` can start the
    # audio process first and load the DSP while that process starts.
    from engine.stream import Stream

log = logging.getLogger("cicada")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PACK = REPO / "packs" / "default"


_IMPORTED = time.monotonic()


def process_age() -> float:
    """Seconds since this process started (Linux /proc), or since this module was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


class AppError(Exception):
    """A problem the user can fix; the CLI prints it as one line."""


@dataclass
class RunOptions:
    pack: Path | None = None
    preset: str | None = "default"
    prompt: str | None = None
    seed: int | None = None
    compute: str = "cpu"
    latency_ms: float = 60.0
    ceiling_db: float = -1.0
    device: str | None = None
    connect: list[str] | None = None
    rate: int | None = None  # output rate (render: resample to it; play: ask the device for it)
    null_sink: bool = False  # play into a real-time null sink (no sound device)
    osc_host: str = "127.0.0.1"
    osc_port: int | None = None  # None: the default port, and carry on without OSC if it is taken; 0: off
    oscquery_port: int | None = None
    osc_allow: list[str] | None = None
    midi_in: str | None = None
    midi_virtual: str | None = None


def pack_path(given: Path | None) -> Path:
    if given is not None:
        return given
    env = os.environ.get("CICADA_PACK")
    if env:
        return Path(env)
    if (DEFAULT_PACK / "manifest.toml").is_file():
        return DEFAULT_PACK
    raise AppError(
        f"no default pack at {DEFAULT_PACK}: pass --pack DIR, set CICADA_PACK, or build one with "
        "`cicada export random --shape tiny --out packs/default`"
    )


def initial_registry(opts: RunOptions, pack: packfmt.Pack | None = None
                     ) -> tuple[Registry, presets.Preset | None]:
    """The parameter registry at start: defaults, then the pack's own sampling (``[sampling]``), then the
    preset, then --prompt / --seed / --latency / --ceiling."""
    reg = Registry()
    pre = None
    values: dict[str, Any] = dict(pack.sampling) if pack is not None else {}
    if opts.preset:
        try:
            pre = presets.load(opts.preset)
        except presets.PresetError as exc:
            raise AppError(str(exc)) from None
        values.update(pre.values)
    if opts.prompt is not None:
        values.update(prompt=opts.prompt, prompt_b="")
    if opts.seed is not None:
        values["seed"] = opts.seed
    values["latency_ms"] = opts.latency_ms
    values["ceiling_db"] = opts.ceiling_db
    try:
        for change in reg.update(values, source="start"):
            if change.warning and change.name in ("latency_ms", "ceiling_db"):
                raise AppError(change.warning.replace(" set to", " use a value in range, e.g."))
    except ParamError as exc:
        raise AppError(str(exc)) from None
    return reg, pre


def initial_params(opts: RunOptions, reg: Registry | None = None, pack: packfmt.Pack | None = None
                   ) -> tuple[GenParams, int, float]:
    """(params, seed, gain_db) from the registry at start (:func:`initial_registry` for ``pack``, built here
    if not given)."""
    s = (reg or initial_registry(opts, pack)[0]).snapshot()
    return GenParams.from_values(s.values), int(s["seed"]), float(s["gain_db"])


def open_generator(opts: RunOptions, pack: packfmt.Pack, params: GenParams, seed: int) -> Generator:
    """The generator for a pack loaded without its graphs.

    The graphs' inputs and outputs are checked against the manifest as their sessions open
    (engine.pack.check_session), so nothing parses every graph twice.
    """
    try:
        gen = Generator(pack, seed=seed, params=params, compute=opts.compute)
    except (GeneratorError, PromptError) as exc:
        raise AppError(str(exc)) from None
    if gen.condition.unknown:
        log.warning("words the pack does not know are ignored: %s", ", ".join(gen.condition.unknown))
    if gen.condition.truncated:
        log.warning("prompt longer than the pack's %d text tokens; the rest is ignored", gen.conditioner.text_len)
    return gen


def make_stream(gen: Generator, sink: Any, opts: RunOptions, gain_db: float) -> Stream:
    from engine.stream import Stream

    stream = Stream(gen, sink, latency_ms=opts.latency_ms, ceiling_db=opts.ceiling_db)
    stream.safety.set_gain_db(gain_db)
    return stream


# --------------------------------------------------------------------------- render


def render(opts: RunOptions, seconds: float, out: Path, progress: Callable[[int, int], None] | None = None) -> dict:
    """Render ``seconds`` into ``out`` (WAV/FLAC) faster than real time; return a summary."""
    from engine.audio import AudioError, FileSink

    # Check the preset and the destination before the (slower) model load: a typo fails at once.
    pack = packfmt.load(pack_path(opts.pack), check_graphs=False)
    params, seed, gain_db = initial_params(opts, pack=pack)
    rate = opts.rate or pack.audio.sample_rate
    sink = FileSink(out, rate, pack.audio.channels)
    try:
        sink.start()
    except AudioError as exc:
        raise AppError(str(exc)) from None
    try:
        gen = open_generator(opts, pack, params, seed)
    except BaseException:
        _abort(sink)
        raise
    stream = make_stream(gen, sink, opts, gain_db)
    total = int(round(seconds * rate))
    t0 = time.perf_counter()
    ok = False
    try:
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        stream.render(total, tick)
        ok = True
    finally:
        sink.stop() if ok else _abort(sink)
    wall = time.perf_counter() - t0
    return {"samples": total, "rate": rate, "seconds": seconds, "wall_s": wall, "speed": seconds / wall if wall else 0}


def _abort(sink: Any) -> None:
    abort = getattr(sink, "abort", None)
    (abort or sink.stop)()


# --------------------------------------------------------------------------- play / serve


def open_device_sink(gen: Generator, opts: RunOptions) -> Any:
    from engine.audio import AudioError, DeviceSink

    sink = DeviceSink(
        opts.device,
        gen.channels,
        opts.rate or gen.sample_rate,
        opts.latency_ms,
        jack_connect=opts.connect,
    )
    try:
        sink.start()
    except AudioError as exc:
        raise AppError(str(exc)) from None
    return sink


class Watchdog:
    """systemd notify protocol (READY, WATCHDOG, STATUS) over $NOTIFY_SOCKET; no-op without it."""

    def __init__(self) -> None:
        self.addr = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval = int(usec) / 2e6 if usec and usec.isdigit() else None
        self.sock = None
        if self.addr:
            if self.addr.startswith("@"):
                self.addr = "\0" + self.addr[1:]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)  # a reader that stalls must never stall the engine
        self._last_ping = 0.0

    def notify(self, msg: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(msg.encode(), self.addr)
        except OSError as exc:  # including BlockingIOError: drop the message
            log.debug("sd_notify failed: %s", exc)

    def ping(self) -> None:
        """WATCHDOG=1, at most twice per watchdog interval."""
        now = time.monotonic()
        if self.interval is not None and now - self._last_ping >= self.interval / 2:
            self._last_ping = now
            self.notify("WATCHDOG=1")


def status_line(stream: Stream, steal: float | None = None) -> str:
    """One line for the log: step costs, pacing, the sink's counters, safety, memory and (on a virtual
    machine) the CPU time the host took away (``steal``, percent; see :class:`engine.stream.StealMeter`)."""
    from engine.stream import rss_mb

    s = stream.stats()
    w = stream.take_window()
    frame_s = stream.gen.block_samples / stream.gen.sample_rate
    rtf = max(s["lm_ms_p50"], s["decode_ms_p50"]) / 1000.0 / (frame_s / stream.gen.block_frames)
    queue = "-" if w["queue_ms_min"] is None else f"{w['queue_ms_min']:.0f}"
    return (
        f"steps {s['steps']}  lm {s['lm_ms_p50']:.1f}/{s['lm_ms_p99']:.1f} ms  "
        f"dec {s['decode_ms_p50']:.1f}/{s['decode_ms_p99']:.1f} ms  rtf {rtf:.2f}  "
        f"gap max {w['write_gap_ms_max']:.0f} ms  queue min {queue} ms  "
        f"underruns {s.get('sink_underruns', 0)}  outages {s.get('sink_outages', 0)}  "
        f"nan {s['nonfinite_blocks']}  limiter {s['gain_reduction_db']:.1f} dB  rss {rss_mb():.0f} MB"
        + ("" if steal is None else f"  steal {steal:.1f}%")
    )


def run_live(
    opts: RunOptions,
    *,
    seconds: float | None = None,
    status_every: float = 60.0,
    on_status: Callable[[str], None] | None = None,
    fallback_file: Path | None = None,
) -> int:
    """Play until SIGINT/SIGTERM (or ``seconds``): the engine of `play` and `serve`."""
    from engine.audio import AudioError, DeviceSink, FileSink
    from engine.control.controller import Controller

    pack = packfmt.load(pack_path(opts.pack), check_graphs=False)
    registry, preset = initial_registry(opts, pack)
    params, seed, gain_db = initial_params(opts, registry)
    gen_box: dict[str, Generator] = {}
    # Load the pack while the audio process starts: both take a moment.
    err: list[BaseException] = []

    def load() -> None:
        try:
            from engine.post import OutputSafety
            from engine.sampling import warmup

            OutputSafety(48000, 2)  # loads the compiled DSP (numba cache) while the rest starts
            warmup()
            gen_box["gen"] = open_generator(opts, pack, params, seed)
        except BaseException as exc:
            err.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    sink: Any
    if opts.null_sink:
        from engine.audio import NullSink

        sink = NullSink(opts.rate or pack.audio.sample_rate, pack.audio.channels, realtime=True)
    else:
        sink = DeviceSink(opts.device, pack.audio.channels, opts.rate or pack.audio.sample_rate, opts.latency_ms,
                          jack_connect=opts.connect)
    try:
        sink.start()
    except AudioError as exc:
        if fallback_file is None or not getattr(exc, "no_device", False):
            loader.join()
            raise AppError(str(exc)) from None
        print(f"cicada: {exc}\ncicada: no sound device, so playing into {fallback_file} instead", flush=True)
        fallback_file.parent.mkdir(parents=True, exist_ok=True)
        sink = FileSink(fallback_file, pack.audio.sample_rate, pack.audio.channels)
        sink.start()
        if seconds is None:
            seconds = 30.0
    loader.join()
    if err:
        sink.stop(fade=False)
        if isinstance(err[0], (AppError, packfmt.PackError)):
            raise err[0]
        raise AppError(f"cannot open the pack: {err[0]}")
    gen = gen_box["gen"]
    stream = make_stream(gen, sink, opts, gain_db)
    controller = Controller(registry, gen, stream)
    # empty prompt slots start with the pack's own prompts, so notes and /cicada/select work at once
    slots = {f"slot_{i + 1}": text for i, text in enumerate(pack.prompts[:PROMPT_SLOTS])
             if not str(registry.get(f"slot_{i + 1}")).strip()}
    if slots:
        registry.update(slots, source="start")
    if preset is not None:
        controller.preset_name = preset.name
        controller.midi_mapping = dict(preset.midi)
        controller.osc_aliases = dict(preset.osc)
    try:
        surfaces = start_surfaces(opts, controller)
    except AppError:
        sink.stop(fade=False)
        raise
    lat = stream.latency_report
    log.info("latency: %s", ", ".join(f"{k} {v:.1f}" for k, v in lat.items()))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    wd = Watchdog()
    from engine.stream import StealMeter

    steal = StealMeter()
    stream.start()
    wd.notify("READY=1")
    next_status = time.monotonic() + status_every
    last_steps = -1
    reported_first = False
    try:
        while not stop.is_set():
            stop.wait(0.25 if wd.interval is None else min(0.25, wd.interval))
            if stream.error is not None:
                raise AppError(f"generation failed: {stream.error}")
            if stream.first_sound_at is not None and not reported_first:
                reported_first = True
                first = process_age() - (time.monotonic() - stream.first_sound_at)
                (on_status or log.info)(f"first sound {first:.2f} s after the process started")
            # Only tell systemd we're alive if generation is actually moving.
            if gen.steps != last_steps:
                wd.ping()
                last_steps = gen.steps
            now = time.monotonic()
            if now >= next_status:
                line = status_line(stream, steal.take())
                wd.notify("STATUS=" + line)
                (on_status or log.info)(line)
                next_status = now + status_every
            if seconds is not None and stream.written_samples >= seconds * sink.rate:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for surface in reversed(surfaces):
            try:
                surface.stop()
            except Exception as exc:  # shutting down: report, go on
                log.warning("stopping %s: %s", type(surface).__name__, exc)
        controller.close()
        stream.panic()
        time.sleep(0.06)
        stream.stop()
        sink.stop(fade=True)
    return 0


def start_surfaces(opts: RunOptions, controller: Any) -> list[Any]:
    """OSC, OSCQuery and MIDI for a running engine, as the options ask; say where each listens.

    The default OSC port is a convenience: if another program holds it, the engine plays on
    without OSC and says so. A port or MIDI input asked for by name must work, or nothing starts.
    """
    from engine.control.osc import DEFAULT_OSC_PORT, OscServer, allow_networks
    from engine.control.oscquery import DEFAULT_OSCQUERY_PORT, OscQueryServer

    started: list[Any] = []

    def fail(msg: str) -> None:
        for s in reversed(started):
            s.stop()
        raise AppError(msg)

    if opts.osc_port != 0:
        try:
            allow_networks(opts.osc_host, opts.osc_allow)  # listening beyond this machine needs an allow-list
        except OSError as exc:
            fail(str(exc))
        osc = OscServer(controller, host=opts.osc_host, port=opts.osc_port or DEFAULT_OSC_PORT, allow=opts.osc_allow)
        try:
            osc.start()
            started.append(osc)
        except OSError as exc:
            if opts.osc_port is not None:
                fail(str(exc))
            print(f"cicada: OSC off: {exc}", flush=True)
            osc = None
        if osc is not None:
            q_port = opts.oscquery_port if opts.oscquery_port is not None else DEFAULT_OSCQUERY_PORT
            query = OscQueryServer(controller.registry, host=opts.osc_host, port=q_port, osc_port=osc.port,
                                   allow=opts.osc_allow)
            try:
                query.start()
                started.append(query)
                osc.oscquery_port = query.port
                where = f", OSCQuery http://{opts.osc_host}:{query.port}/"
            except OSError as exc:
                if opts.oscquery_port is not None:
                    fail(str(exc))
                osc.oscquery_port = None
                where = f" (OSCQuery off: {exc})"
            print(f"cicada: OSC on udp {opts.osc_host}:{osc.port}{where}", flush=True)
    if opts.midi_in or opts.midi_virtual:
        from engine.control.midi import MidiInput, MidiMap

        try:
            mapping = MidiMap.from_dict(controller.midi_mapping) if controller.midi_mapping else None
            midi = MidiInput(controller, port=opts.midi_in, virtual=opts.midi_virtual, mapping=mapping)
            midi.start()
        except (OSError, ValueError, RuntimeError) as exc:
            fail(f"MIDI: {exc}")
        started.append(midi)
        controller.midi_source = midi.mapping.to_dict
        controller.midi = midi
        print(f"cicada: MIDI in {opts.midi_in or opts.midi_virtual!r}", flush=True)
    return started
