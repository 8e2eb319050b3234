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


def initial_params(opts: RunOptions) -> tuple[GenParams, int, float]:
    """(params, seed, gain_db) from the preset, overridden by --prompt / --seed."""
    gain_db = 0.0
    seed = 0
    params = GenParams()
    if opts.preset:
        try:
            pre = presets.load(opts.preset)
        except presets.PresetError as exc:
            raise AppError(str(exc)) from None
        params = pre.gen_params()
        gain_db = pre.gain_db
        seed = pre.seed if pre.seed is not None else 0
    if opts.prompt is not None:
        params = GenParams(prompt=opts.prompt, sampling=params.sampling)
    if opts.seed is not None:
        seed = opts.seed
    return params, seed, gain_db


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
    params, seed, gain_db = initial_params(opts)
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


def status_line(stream: Stream) -> str:
    from engine.stream import rss_mb

    s = stream.stats()
    frame_s = stream.gen.block_samples / stream.gen.sample_rate
    rtf = max(s["lm_ms_p50"], s["decode_ms_p50"]) / 1000.0 / (frame_s / stream.gen.block_frames)
    return (
        f"steps {s['steps']}  lm {s['lm_ms_p50']:.1f}/{s['lm_ms_p99']:.1f} ms  "
        f"dec {s['decode_ms_p50']:.1f}/{s['decode_ms_p99']:.1f} ms  rtf {rtf:.2f}  "
        f"underruns {s.get('sink_underruns', 0)}  outages {s.get('sink_outages', 0)}  "
        f"nan {s['nonfinite_blocks']}  limiter {s['gain_reduction_db']:.1f} dB  rss {rss_mb():.0f} MB"
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

    pack = packfmt.load(pack_path(opts.pack), check_graphs=False)
    params, seed, gain_db = initial_params(opts)
    gen_box: dict[str, Generator] = {}
    # Load the pack while the audio process starts: both take a moment.
    err: list[BaseException] = []

    def load() -> None:
        try:
            from engine.post import OutputSafety

            OutputSafety(48000, 2)  # loads the compiled DSP (numba cache) while the rest starts
            gen_box["gen"] = open_generator(opts, pack, params, seed)
        except BaseException as exc:
            err.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    sink: Any = DeviceSink(opts.device, pack.audio.channels, opts.rate or pack.audio.sample_rate, opts.latency_ms,
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
    lat = stream.latency_report
    log.info("latency: %s", ", ".join(f"{k} {v:.1f}" for k, v in lat.items()))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    wd = Watchdog()
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
                log.info("first sound %.2f s after the process started",
                         process_age() - (time.monotonic() - stream.first_sound_at))
            # Only tell systemd we're alive if generation is actually moving.
            if gen.steps != last_steps:
                wd.ping()
                last_steps = gen.steps
            now = time.monotonic()
            if now >= next_status:
                line = status_line(stream)
                wd.notify("STATUS=" + line)
                (on_status or log.info)(line)
                next_status = now + status_every
            if seconds is not None and stream.written_samples >= seconds * sink.rate:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stream.panic()
        time.sleep(0.06)
        stream.stop()
        sink.stop(fade=True)
    return 0
