"""Where the engine's PCM goes: a supervised audio process, a file, or nowhere at real-time pace.

Every sink takes blocks of interleaved float32 frames ``[N, C]`` at ``sink.rate`` and has the same small
interface (:class:`Sink`). The engine's producer loop generates while ``sink.queued()`` is under its target
fill and hands each block to ``sink.write``.

:class:`DeviceSink` keeps PortAudio out of the engine process. It owns a shared-memory :class:`~engine.ring.Ring`
and spawns an *audio process* (``multiprocessing`` "spawn" context, entry point :func:`_audio_process_main`) that
attaches to the ring by name and opens a ``sounddevice.OutputStream``. That stream's callback only copies from
the ring into ``outdata[:]`` and bumps counters in the ring's header (callbacks, heartbeat, underruns, frames
played). A supervisor thread in the engine process watches the heartbeat; when it stops for ``stall_timeout``
(device unplugged, JACK server gone: PortAudio can then hang in stop and close) or the audio process dies, it
kills the process (terminate, then kill; never an unbounded join), counts an outage, and starts a new one with
back-off (0.5 s doubling to 5 s) until a device is back. The ring outlives the audio processes.

The audio process opens ``preferred_rate`` first and falls back to the device's default rate if the device
refuses it; the rate it got is in the ring header and is what :attr:`DeviceSink.rate` reports. The ring holds
audio at that device rate: the engine resamples from the pack's rate. After an outage the device may come back
at another rate, so a producer compares ``sink.rate`` before each block (stale audio is discarded on restart).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.pack import current_umask
from engine.ring import (
    CALLBACKS,
    FRAMES_PLAYED,
    HEARTBEAT_NS,
    STOP_REQUEST,
    UNDERRUN_FRAMES,
    UNDERRUNS,
    XRUNS,
    Ring,
)

__all__ = [
    "AudioError",
    "DeviceSink",
    "FileSink",
    "NullSink",
    "Sink",
    "Status",
    "list_devices",
]

NO_DEVICE_REMEDY = "use --out FILE to render, or start JACK (jackd -d dummy)"
MAX_RING_RATE = 192_000  # the ring is sized for this rate; faster devices get a shorter ring
FADE_FRAMES = 64  # underrun fade-out / fade-in length (samples), about 1.3 ms at 48 kHz
STOP_FADE_SECONDS = 0.010  # fade-out length for stop(fade=True)


class AudioError(Exception):
    """An audio output could not be opened or written; the message says what to do about it.

    ``no_device`` is True when there is nothing to play on at all (no output device, or no PortAudio), so that a
    caller may fall back to rendering into a file.
    """

    def __init__(self, message: str, *, no_device: bool = False) -> None:
        super().__init__(message)
        self.no_device = no_device


class Status(enum.IntEnum):
    """Status codes the audio process writes into the ring header (slot ``STATUS``)."""

    IDLE = 0  # no audio process
    STARTING = 1  # process up, opening the device
    RUNNING = 2  # stream started, callback running
    STOPPING = 3  # asked to stop
    STOPPED = 4  # stream closed cleanly
    FAILED = 5  # could not open the device (message sent to the engine)
    LOST = 6  # the stream stopped by itself (device or server gone)


@runtime_checkable
class Sink(Protocol):
    """What the engine's producer loop writes to.

    ``rate`` is the sample rate the sink wants (for a device: the rate it was opened at, which may differ from
    the pack's; the engine resamples). ``write`` takes ``[N, channels]`` float32 blocks.
    """

    rate: int
    channels: int

    def start(self) -> None:
        """Open the output; raises :class:`AudioError` with a remedy on failure."""
        ...

    def queued(self) -> int:
        """Frames written but not yet played (0 for a file)."""
        ...

    def write(self, block: np.ndarray) -> None:
        """Take a block ``[N, channels]`` float32; never blocks for long (drops, counted, when full)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters and state: underruns, outages, restarts, played_samples, dropped_samples, device, rate, state."""
        ...

    def stop(self, fade: bool = True) -> None:
        """Stop (fading out the last few milliseconds if ``fade``) and release everything. Idempotent."""
        ...


# ------------------------------------------------------------------------------------------------------------
# PortAudio and JACK helpers
# ------------------------------------------------------------------------------------------------------------

_JACK_NAME_BUFFER: ctypes.Array[ctypes.c_char] | None = None  # PortAudio keeps the pointer: keep it alive


def _portaudio_library() -> ctypes.CDLL | None:
    """The PortAudio shared library sounddevice uses (same file, so the same handle), or None."""
    sd = sys.modules.get("sounddevice")
    name = getattr(sd, "_libname", None) if sd is not None else None
    if name is None:
        name = ctypes.util.find_library("portaudio")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _set_jack_client_name(name: str) -> None:
    """Name PortAudio's JACK client (default "PortAudio"). Must run before PortAudio initialises."""
    global _JACK_NAME_BUFFER
    lib = _portaudio_library()
    setter = getattr(lib, "PaJack_SetClientName", None) if lib is not None else None
    if setter is None:
        return
    setter.argtypes = [ctypes.c_char_p]
    setter.restype = ctypes.c_int
    _JACK_NAME_BUFFER = ctypes.create_string_buffer(name.encode())
    setter(_JACK_NAME_BUFFER)


def _jack_client_name_in_use() -> str | None:
    """The name JACK actually gave PortAudio's client (it appends -01 etc. on a clash), or None."""
    lib = _portaudio_library()
    getter = getattr(lib, "PaJack_GetClientName", None) if lib is not None else None
    if getter is None:
        return None
    getter.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
    getter.restype = ctypes.c_int
    out = ctypes.c_char_p()
    if getter(ctypes.byref(out)) != 0 or not out.value:
        return None
    return out.value.decode(errors="replace")


def _import_sounddevice(jack_client_name: str | None = None) -> Any:
    """Import sounddevice (which initialises PortAudio), naming PortAudio's JACK client first if asked.

    Raises AudioError with an install hint when the package or the PortAudio library is missing.
    """
    already = "sounddevice" in sys.modules
    if jack_client_name and not already:
        _set_jack_client_name(jack_client_name)
    try:
        import sounddevice as sd
    except OSError as exc:
        raise AudioError(
            f"the PortAudio library could not be loaded ({exc}): install libportaudio2 "
            "(Debian/Ubuntu: apt install libportaudio2; macOS: brew install portaudio)",
            no_device=True,
        ) from exc
    except ImportError as exc:
        raise AudioError(f"the sounddevice package is missing ({exc}): pip install sounddevice") from exc
    if jack_client_name and already:
        # PortAudio was initialised before we could name its JACK client: re-initialise it.
        with contextlib.suppress(Exception):
            sd._terminate()
        _set_jack_client_name(jack_client_name)
        sd._initialize()
    return sd


def _refresh_portaudio(sd: Any) -> None:
    """Re-scan devices (PortAudio enumerates them only when it initialises)."""
    with contextlib.suppress(Exception):
        sd._terminate()
    sd._initialize()


def _output_devices(sd: Any) -> list[tuple[int, dict[str, Any], str]]:
    """``(index, device info, host API name)`` for every device with output channels."""
    hostapis = sd.query_hostapis()
    out = []
    for index, info in enumerate(sd.query_devices()):
        if info["max_output_channels"] > 0:
            out.append((index, info, hostapis[info["hostapi"]]["name"]))
    return out


def _default_output(sd: Any) -> int:
    try:
        index = sd.default.device[1]
    except Exception:
        return -1
    return int(index) if index is not None else -1


def _format_outputs(sd: Any) -> str:
    outputs = _output_devices(sd)
    if not outputs:
        return "  (none)"
    default = _default_output(sd)
    lines = []
    for index, info, api in outputs:
        mark = "*" if index == default else " "
        lines.append(
            f"{mark} [{index}] {info['name']} ({api}): {info['max_output_channels']} out, "
            f"{info['default_samplerate']:g} Hz"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_jack(jack: Any) -> Any:
    """Silence libjack's error and info printing (e.g. "cannot connect to server") for a moment."""
    try:
        jack.set_error_function(lambda msg: None)
        jack.set_info_function(lambda msg: None)
    except Exception:
        pass
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            jack.set_error_function(None)
            jack.set_info_function(None)


def _jack_playback_ports(client_name: str) -> tuple[list[str], str] | None:
    """Audio input ports of the running JACK server (where we can send sound) and a one-line server summary.

    None when JACK-Client or libjack is missing or no server runs. Never starts a server.
    """
    try:
        import jack
    except Exception:
        return None
    with _quiet_jack(jack):
        try:
            client = jack.Client(client_name, no_start_server=True)
        except Exception:
            return None
        try:
            ports = [p.name for p in client.get_ports(is_audio=True, is_input=True)]
            summary = f"{client.samplerate} Hz, {client.blocksize} frames per period"
        finally:
            with contextlib.suppress(Exception):
                client.close()
    return ports, summary


def list_devices(jack_server: str | None = None) -> str:
    """Human-readable listing of PortAudio host APIs, output devices and, if a JACK server runs, its playback ports.

    The default output device is marked with ``*``. ``jack_server`` names a JACK server other than the default
    (as ``jackd -n NAME``). Loads PortAudio in the calling process (the one exception to keeping it in the audio
    process) and leaves it initialised, as ``import sounddevice`` does. Never starts a JACK server.
    """
    saved = os.environ.get("JACK_DEFAULT_SERVER")
    if jack_server:
        os.environ["JACK_DEFAULT_SERVER"] = jack_server  # libjack reads it when a client opens
    try:
        return _list_devices()
    finally:
        if jack_server:
            if saved is None:
                os.environ.pop("JACK_DEFAULT_SERVER", None)
            else:
                os.environ["JACK_DEFAULT_SERVER"] = saved


def _list_devices() -> str:
    lines: list[str] = []
    try:
        sd = _import_sounddevice()
    except AudioError as exc:
        lines.append(str(exc))
    else:
        _refresh_portaudio(sd)
        hostapis = sd.query_hostapis()
        lines.append(str(sd.get_portaudio_version()[1]))
        lines.append("Host APIs:")
        for api in hostapis:
            outs = sum(1 for i in api["devices"] if sd.query_devices(i)["max_output_channels"] > 0)
            lines.append(f"  {api['name']}: {outs} output device{'s' if outs != 1 else ''}")
        lines.append("Output devices (* = default):")
        if _output_devices(sd):
            lines.append(_format_outputs(sd))
        else:
            lines.append(f"  none: no sound device found: {NO_DEVICE_REMEDY}")
    jack_ports = _jack_playback_ports(f"cicada-devices-{os.getpid()}")
    if jack_ports is None:
        lines.append("JACK: no server running")
    else:
        ports, summary = jack_ports
        server = os.environ.get("JACK_DEFAULT_SERVER", "default")
        lines.append(f"JACK server {server!r} ({summary}), playback ports (for --connect):")
        lines.extend(f"  {p}" for p in ports)
        if not ports:
            lines.append("  (none)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# The audio callback (runs in the audio process, or in NullSink's thread)
# ------------------------------------------------------------------------------------------------------------


def _raised_cosine(n: int, rising: bool) -> np.ndarray:
    """Gain ramp ``[n, 1]`` float32 strictly between 0 and 1 (broadcasts over channels)."""
    x = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    ramp = 0.5 - 0.5 * np.cos(np.pi * x)
    if not rising:
        ramp = ramp[::-1]
    return np.ascontiguousarray(ramp, dtype=np.float32)[:, None]


class _Player:
    """The stream callback: ring -> ``outdata[:]``, plus counters in the ring header.

    No buffer allocation, locks, logging or exceptions escaping. An underrun (a block comes up short after full
    ones) counts once: the tail of what was there fades out over up to ``FADE_FRAMES`` samples, the rest is
    silence, and the next audio fades in. Silence before the first audio is not an underrun. Stop request 1
    fades the output out over ``stop_fade`` samples (possibly across callbacks) and then sets request 2, after
    which the callback plays silence without consuming the ring.
    """

    def __init__(self, ring: Ring, stop_fade: int, fade: int = FADE_FRAMES) -> None:
        self._ring = ring
        self._hdr = ring.header
        self._read_into = ring.read_into
        self._fade = fade
        self._ramp_in = _raised_cosine(fade, rising=True)
        self._ramp_out = _raised_cosine(fade, rising=False)
        self._fade_pos = 0  # position in the fade-in ramp; == fade once faded in
        self._playing = False  # the last block was full
        self._started = False  # some audio has been played
        self.hold = False  # play silence without consuming the ring (while JACK ports are being connected)
        self.set_stop_fade(stop_fade)

    def set_stop_fade(self, frames: int) -> None:
        """Preallocate the stop fade-out ramp (call before the stream starts)."""
        self._stop_len = max(1, int(frames))
        self._stop_ramp = _raised_cosine(self._stop_len, rising=False)
        self._stop_pos = 0

    def __call__(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """``outdata``: ``[frames, channels]`` float32 owned by PortAudio."""
        try:
            hdr = self._hdr
            hdr[HEARTBEAT_NS] = time.monotonic_ns()
            hdr[CALLBACKS] += 1
            hdr[FRAMES_PLAYED] += frames
            if status:
                hdr[XRUNS] += 1
            request = hdr[STOP_REQUEST]
            if self.hold or request >= 2:
                outdata.fill(0.0)
                return
            n = self._read_into(outdata)
            fade = self._fade
            if n > 0:
                self._started = True
                pos = self._fade_pos
                if pos < fade:
                    k = min(n, fade - pos)
                    head = outdata[:k]
                    np.multiply(head, self._ramp_in[pos : pos + k], out=head)
                    self._fade_pos = pos + k
            if n < frames:
                if n > 0:
                    k = min(n, fade)
                    tail = outdata[n - k : n]
                    np.multiply(tail, self._ramp_out[fade - k :], out=tail)
                outdata[n:].fill(0.0)
                if self._playing:
                    hdr[UNDERRUNS] += 1
                if self._started:
                    hdr[UNDERRUN_FRAMES] += frames - n
                self._playing = False
                self._fade_pos = 0
            else:
                self._playing = True
            if request == 1:
                pos = self._stop_pos
                k = min(frames, self._stop_len - pos)
                head = outdata[:k]
                np.multiply(head, self._stop_ramp[pos : pos + k], out=head)
                outdata[k:].fill(0.0)
                self._stop_pos = pos + k
                if self._stop_pos >= self._stop_len:
                    hdr[STOP_REQUEST] = 2
        except BaseException:  # nothing may escape into PortAudio
            with contextlib.suppress(BaseException):
                outdata.fill(0.0)


# ------------------------------------------------------------------------------------------------------------
# The audio process
# ------------------------------------------------------------------------------------------------------------


def _resolve_output(
    sd: Any, device: str | int | None, channels: int, prefer_jack: bool = False
) -> tuple[int, dict[str, Any], str]:
    """Pick the output device like sounddevice does: None = default, int = index, str = (sub)string of the name.

    With ``prefer_jack`` (JACK ports to connect to), None means the JACK host API's default output instead.
    """
    outputs = _output_devices(sd)
    if not outputs:
        named = f"no output device matches {device!r}: " if device not in (None, "", "default") else ""
        raise AudioError(f"{named}no sound device found: {NO_DEVICE_REMEDY}", no_device=True)
    by_index = {index: (index, info, api) for index, info, api in outputs}
    available = f"available output devices:\n{_format_outputs(sd)}"
    if isinstance(device, str) and device.strip().lstrip("-").isdigit():
        device = int(device)
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "default")):
        index = _default_output(sd)
        if prefer_jack:
            for api in sd.query_hostapis():
                if "JACK" in api["name"] and api["default_output_device"] in by_index:
                    index = api["default_output_device"]
        chosen = by_index.get(index, outputs[0])
    elif isinstance(device, int):
        if device not in by_index:
            raise AudioError(f"there is no output device with index {device}; {available}")
        chosen = by_index[device]
    else:
        try:
            index = int(sd.query_devices(device, "output")["index"])
        except (ValueError, sd.PortAudioError) as exc:
            detail = str(exc).split("\n", 1)[0]
            raise AudioError(
                f"no output device matches {device!r} ({detail}); {available}\n"
                "pass an index or a unique part of a name (see `cicada devices`)"
            ) from None
        chosen = by_index[index]
    index, info, api = chosen
    if info["max_output_channels"] < channels:
        raise AudioError(
            f"output device [{index}] {info['name']} ({api}) has {info['max_output_channels']} output "
            f"channel(s), {channels} needed; pick another device or fewer channels"
        )
    return chosen


def _jack_control_client(jack: Any, prefix: str) -> Any:
    with _quiet_jack(jack):
        try:
            return jack.Client(f"{prefix}-ctl-{os.getpid()}", no_start_server=True)
        except Exception as exc:
            raise AudioError(f"cannot reach the JACK server to connect ports ({exc}); is jackd running?") from exc


def _check_jack_targets(jack: Any, targets: list[str]) -> None:
    """Raise AudioError naming the first target port that does not exist or cannot take our audio."""
    client = _jack_control_client(jack, "cicada")
    try:
        available = [p.name for p in client.get_ports(is_audio=True, is_input=True)]
        for name in targets:
            if name not in available:
                listing = ", ".join(available) if available else "(none)"
                raise AudioError(
                    f"JACK port {name!r} does not exist or does not accept audio; playback ports: {listing}"
                )
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _connect_jack(jack: Any, pa_client: str, channels: int, targets: list[str]) -> tuple[list[str], list[str]]:
    """Replace PortAudio's automatic connections: our channel ``i % channels`` feeds ``targets[i]``.

    Returns (our port names, the ports we connected to, in order).
    """
    client = _jack_control_client(jack, "cicada")
    try:
        ours = [p.name for p in client.get_ports(f"^{re.escape(pa_client)}:", is_output=True, is_audio=True)]
        ours.sort(key=lambda name: int(m.group(1)) if (m := re.search(r"(\d+)$", name)) else 0)
        if len(ours) < channels:
            raise AudioError(f"found {len(ours)} JACK output ports for client {pa_client!r}, expected {channels}")
        ours = ours[:channels]
        for port in ours:
            for other in client.get_all_connections(port):
                client.disconnect(port, other)
        for i, target in enumerate(targets):
            try:
                client.connect(ours[i % channels], target)
            except Exception as exc:
                raise AudioError(f"cannot connect JACK port {ours[i % channels]} to {target!r}: {exc}") from exc
        return ours, list(targets)
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _terminate_portaudio(timeout: float = 1.0) -> None:
    """Let PortAudio close its clients (so a JACK server drops ours at once), but give up after ``timeout`` s.

    Pa_Terminate can hang when a JACK server vanished; it runs in a daemon thread that os._exit abandons.
    """
    sd = sys.modules.get("sounddevice")
    if sd is None or not getattr(sd, "_initialized", 0):
        return

    def terminate() -> None:
        with contextlib.suppress(Exception):
            while sd._initialized:
                sd._terminate()

    thread = threading.Thread(target=terminate, name="pa-terminate", daemon=True)
    thread.start()
    thread.join(timeout)


def _send(conn: multiprocessing.connection.Connection, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(Exception):
        conn.send(message)


def _run_audio_process(ring: Ring, conn: multiprocessing.connection.Connection, config: dict[str, Any]) -> int:
    """Open the stream, report, then wait for "stop", parent death or the stream dying. Returns an exit code."""
    parent = os.getppid()
    channels = int(config["channels"])
    targets: list[str] = list(config.get("jack_connect") or [])
    if config.get("jack_server"):
        os.environ["JACK_DEFAULT_SERVER"] = str(config["jack_server"])
    player = _Player(ring, stop_fade=int(config["preferred_rate"] * STOP_FADE_SECONDS))
    stream = None
    try:
        sd = _import_sounddevice(jack_client_name=config.get("client_name") or None)
        index, info, api = _resolve_output(sd, config.get("device"), channels, prefer_jack=bool(targets))
        is_jack = "JACK" in api
        jack_mod: Any = None
        if targets:
            if not is_jack:
                raise AudioError(
                    f"jack_connect needs a JACK device, but [{index}] {info['name']} is on {api}; "
                    "pick the JACK device (see `cicada devices`)"
                )
            try:
                import jack as jack_mod
            except Exception as exc:
                raise AudioError(
                    f"jack_connect needs the JACK-Client package (pip install JACK-Client): {exc}"
                ) from exc
            _check_jack_targets(jack_mod, targets)
        rates = [int(config["preferred_rate"])]
        default_rate = int(round(info["default_samplerate"]))
        if default_rate not in rates:
            rates.append(default_rate)
        errors = []
        for rate in rates:
            try:
                stream = sd.OutputStream(
                    samplerate=rate,
                    blocksize=int(config.get("blocksize") or 0),
                    device=index,
                    channels=channels,
                    dtype="float32",
                    latency=float(config["latency_s"]) if config["latency_s"] > 0 else "low",
                    callback=player,
                )
                break
            except Exception as exc:
                errors.append(f"{rate} Hz: {exc}")
        if stream is None:
            raise AudioError(f"cannot open output device [{index}] {info['name']} ({api}): {'; '.join(errors)}")
        rate = int(round(stream.samplerate))
        player.set_stop_fade(int(rate * STOP_FADE_SECONDS))
        ring.device_rate = rate
        ring.output_latency = float(stream.latency)
        player.hold = bool(targets)
        ring.heartbeat_ns = time.monotonic_ns()
        stream.start()
        pa_client = _jack_client_name_in_use() if is_jack else None
        our_ports: list[str] = []
        if targets and pa_client is not None:
            our_ports, _ = _connect_jack(jack_mod, pa_client, channels, targets)
        elif targets:
            raise AudioError("cannot tell PortAudio's JACK client name, so cannot connect ports by name")
        player.hold = False
    except AudioError as exc:
        ring.status = Status.FAILED
        # Close PortAudio (and so our JACK client) before reporting: the engine kills us soon after.
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.abort(ignore_errors=True)
                stream.close(ignore_errors=True)
        _terminate_portaudio()
        _send(conn, ("error", str(exc), exc.no_device))
        return 2
    ring.status = Status.RUNNING
    _send(
        conn,
        (
            "ok",
            {
                "device": info["name"],
                "index": index,
                "hostapi": api,
                "rate": rate,
                "latency": float(stream.latency),
                "blocksize": int(stream.blocksize),
                "jack_client": pa_client,
                "jack_ports": our_ports,
                "jack_connect": targets,
                "pid": os.getpid(),
            },
        ),
    )
    while True:
        try:
            if conn.poll(0.1) and conn.recv() == "stop":
                break
        except (EOFError, OSError):
            break  # the engine is gone
        if os.getppid() != parent:
            break
        if not stream.active:
            # PortAudio stopped the stream by itself (JACK server shut down, device gone). Closing it could hang,
            # so leave without cleanup; the engine's supervisor starts a new process.
            ring.status = Status.LOST
            _send(conn, ("lost", f"the stream on {info['name']} stopped by itself (device or server gone)"))
            return 3
    ring.status = Status.STOPPING
    stream.abort(ignore_errors=True)
    stream.close(ignore_errors=True)
    _terminate_portaudio()
    ring.status = Status.STOPPED
    return 0


def _audio_process_main(ring_name: str, conn: multiprocessing.connection.Connection, config: dict[str, Any]) -> None:
    """Entry point of the audio process (spawned by :class:`DeviceSink`).

    Reports ``("ok", info)`` or ``("error", message)`` on ``conn`` once the stream runs or cannot, then plays
    until told ``"stop"``. Leaves with ``os._exit`` so that no exit handler (PortAudio's terminate, which can
    hang when a JACK server vanished) runs.
    """
    code = 1
    ring: Ring | None = None
    with contextlib.suppress(OSError):
        os.nice(-10)  # ahead of the engine and everything else, where allowed (root, CAP_SYS_NICE, limits.conf)
    try:
        ring = Ring.attach(ring_name)
        ring.consumer_pid = os.getpid()
        ring.status = Status.STARTING
        code = _run_audio_process(ring, conn, config)
    except BaseException as exc:
        if ring is not None:
            with contextlib.suppress(Exception):
                ring.status = Status.FAILED
        _terminate_portaudio()
        _send(conn, ("error", f"the audio process failed: {type(exc).__name__}: {exc}"))
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


# ------------------------------------------------------------------------------------------------------------
# Sinks
# ------------------------------------------------------------------------------------------------------------


def _check_block(block: np.ndarray, channels: int) -> np.ndarray:
    block = np.asarray(block)
    if block.ndim != 2 or block.shape[1] != channels:
        raise ValueError(f"sink takes blocks of shape [N, {channels}], got {list(block.shape)}")
    return block


class _RingSink:
    """Producer side shared by DeviceSink and NullSink: a ring with a logical size and drop-on-timeout writes."""

    channels: int
    _ring: Ring | None
    _ring_seconds: float
    _write_timeout: float

    def __init__(self, channels: int, ring_seconds: float, write_timeout: float) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if ring_seconds <= 0:
            raise ValueError(f"ring_seconds must be > 0, got {ring_seconds}")
        self.channels = int(channels)
        self._ring = None
        self._ring_seconds = float(ring_seconds)
        self._write_timeout = float(write_timeout)
        self._dropped = 0
        self._closing = False

    @property
    def rate(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _limit(self, ring: Ring) -> int:
        return max(1, min(ring.capacity, int(self._ring_seconds * self.rate)))

    def queued(self) -> int:
        """Frames in the ring, written but not yet played."""
        ring = self._ring
        if ring is None or ring.closed:
            return 0
        return ring.fill()

    def write(self, block: np.ndarray) -> None:
        """Put ``block`` ``[N, channels]`` into the ring; wait (polling) up to ``write_timeout`` s for room.

        What still does not fit after that is dropped and counted in ``stats()["dropped_samples"]``: a stalled
        device never stalls the producer for long.
        """
        block = _check_block(block, self.channels)
        ring = self._ring
        if ring is None or ring.closed:
            raise AudioError("write() before start() or after stop()")
        total = block.shape[0]
        done = 0
        deadline = 0.0
        while True:
            room = self._limit(ring) - ring.fill()
            if room > 0:
                done += ring.write(block[done : done + min(room, total - done)])
            if done >= total:
                return
            now = time.monotonic()
            if deadline == 0.0:
                deadline = now + self._write_timeout
            if now >= deadline or self._closing:
                self._dropped += total - done
                return
            # Sleep for about the time the missing frames take to play, within [1, 10] ms.
            wait = (total - done) / max(self.rate, 1)
            time.sleep(min(0.010, max(0.001, wait), max(0.0, deadline - now)))


    def consumed(self) -> int:
        """Samples taken out of the ring so far (written audio only; silence before the first block not counted)."""
        ring = self._ring
        return 0 if ring is None or ring.closed else ring.read_index

    def panic(self) -> None:
        """Fade what is playing to silence (10 ms, from the next callback) and hold silence until ``resume``.

        The audio already queued in the ring is faded too: this is what makes a panic land within 50 ms
        whatever the latency setting. Safe from any thread.
        """
        ring = self._ring
        if ring is not None and not ring.closed and ring.stop_request == 0:
            ring.stop_request = 1

    def resume(self) -> None:
        """Leave a panic: drop the stale queued audio, then play what is written from now on."""
        ring = self._ring
        if ring is None or ring.closed or ring.stop_request == 0:
            return
        deadline = time.monotonic() + 0.1
        while ring.stop_request == 1 and time.monotonic() < deadline:  # let the fade finish
            time.sleep(0.002)
        ring.discard()
        ring.stop_request = 0


@dataclass
class _Child:
    process: BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float = field(default_factory=time.monotonic)


class DeviceSink(_RingSink):
    """A sound device (or JACK ports), played by a supervised audio process from a shared-memory ring.

    ``device``: None for the default output, an index, or a (sub)string of a name as in ``sounddevice``.
    ``preferred_rate``: tried first; if the device refuses it, its default rate is used and :attr:`rate` says
    which (the engine resamples). ``latency_ms``: the stream's suggested latency (PortAudio's buffer; the engine's
    own lead is its target ``queued()``). ``jack_connect``: JACK ports to connect our outputs to by name, channel
    ``i % channels`` to port ``i``, replacing PortAudio's automatic connections. ``ring_seconds``: most audio the
    ring holds. ``write_timeout``: how long ``write`` waits for room before dropping. ``stall_timeout``: heartbeat
    silence that counts as an outage. ``start_timeout``: how long ``start`` waits for the audio process.
    ``jack_server``: JACK server name (as ``jackd -n``) if not the default. ``client_name``: PortAudio's JACK
    client name (JACK appends -01 etc. when it is taken).
    """

    def __init__(
        self,
        device: str | int | None,
        channels: int,
        preferred_rate: int,
        latency_ms: float,
        jack_connect: list[str] | None = None,
        blocksize: int = 0,
        ring_seconds: float = 2.0,
        *,
        write_timeout: float = 0.1,
        stall_timeout: float = 1.0,
        start_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.5, 5.0),
        jack_server: str | None = None,
        client_name: str = "cicada",
    ) -> None:
        super().__init__(channels, ring_seconds, write_timeout)
        if preferred_rate <= 0:
            raise ValueError(f"preferred_rate must be > 0, got {preferred_rate}")
        self.device = device
        self.preferred_rate = int(preferred_rate)
        self.latency_ms = float(latency_ms)
        self.jack_connect = list(jack_connect) if jack_connect else None
        self.blocksize = int(blocksize)
        self.stall_timeout = float(stall_timeout)
        self.start_timeout = float(start_timeout)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.jack_server = jack_server
        self.client_name = client_name
        self._ctx = multiprocessing.get_context("spawn")
        self._child: _Child | None = None
        self._state = "idle"  # idle | starting | running | down | stopped
        self._info: dict[str, Any] = {}
        self._last_error: str | None = None
        self._outages = 0
        self._restarts = 0
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._final: dict[str, Any] | None = None
        self._finalizer: weakref.finalize | None = None
        self._process_box: list[BaseProcess | None] = [None]  # shared with the finalizer
        self._stuck: list[_Child] = []  # killed audio processes that have not exited yet

    # -- Sink interface ------------------------------------------------------------------------------------------

    @property
    def rate(self) -> int:
        """Sample rate of the device as opened (``preferred_rate`` until then). May change after an outage."""
        ring = self._ring
        if ring is not None and not ring.closed:
            opened = ring.device_rate
            if opened > 0:
                return opened
        return int(self._info.get("rate", self.preferred_rate))

    def start(self) -> None:
        """Start the audio process and wait until it plays; raise AudioError (with a remedy) if it cannot."""
        with self._lock:
            if self._state != "idle":
                raise AudioError(f"DeviceSink.start() called twice (state {self._state})")
            capacity = math.ceil(self._ring_seconds * max(self.preferred_rate, MAX_RING_RATE))
            self._ring = Ring.create(capacity, self.channels)
            self._finalizer = weakref.finalize(self, _emergency_cleanup, self._ring, self._process_box)
            self._state = "starting"
            self._spawn()
        child = self._child
        assert child is not None
        deadline = time.monotonic() + self.start_timeout
        message: tuple[Any, ...] | None = None
        while message is None:
            if child.conn.poll(0.02):
                with contextlib.suppress(EOFError, OSError):
                    message = child.conn.recv()
                if message is None:
                    message = ("error", self._exit_text(child, "during start-up"))
            elif child.process.exitcode is not None:
                # It may have said why just before exiting, after the poll above: read that first.
                if child.conn.poll(0):
                    with contextlib.suppress(EOFError, OSError):
                        message = child.conn.recv()
                if message is None:
                    message = ("error", self._exit_text(child, "during start-up"))
            elif time.monotonic() > deadline:
                message = ("error", f"the audio process did not open the device within {self.start_timeout:g} s")
        if message[0] != "ok":
            self._kill(child, grace=2.0 if message[0] == "error" else 0.0)
            self._child = None
            self._state = "stopped"
            self._close_ring()
            raise AudioError(str(message[1]), no_device=bool(message[2]) if len(message) > 2 else False)
        with self._lock:
            self._info = dict(message[1])
            self._state = "running"
            self._thread = threading.Thread(target=self._supervise, name="cicada-audio-supervisor", daemon=True)
            self._thread.start()

    def stats(self) -> dict[str, Any]:
        """Counters and state.

        Keys: state (idle|starting|running|down|stopped), device, hostapi, rate, channels, latency (s),
        underruns, underrun_samples, xruns, callbacks, played_samples, dropped_samples, queued, outages,
        restarts, last_error, jack_client, jack_ports, pid.
        """
        if self._final is not None:
            return dict(self._final)
        ring = self._ring
        live = ring is not None and not ring.closed
        info = self._info
        return {
            "state": self._state,
            "device": info.get("device"),
            "hostapi": info.get("hostapi"),
            "rate": self.rate,
            "channels": self.channels,
            "latency": ring.output_latency if live else info.get("latency"),
            "underruns": ring.underruns if live else 0,
            "underrun_samples": ring.underrun_frames if live else 0,
            "xruns": ring.xruns if live else 0,
            "callbacks": ring.callbacks if live else 0,
            "played_samples": ring.frames_played if live else 0,
            "dropped_samples": self._dropped,
            "queued": self.queued(),
            "outages": self._outages,
            "restarts": self._restarts,
            "last_error": self._last_error,
            "jack_client": info.get("jack_client"),
            "jack_ports": info.get("jack_ports"),
            "pid": info.get("pid"),
        }

    def stop(self, fade: bool = True) -> None:
        """Fade out (if ``fade``: about 10 ms, at most 0.5 s wait), stop the audio process, free the ring."""
        with self._lock:
            if self._state in ("idle", "stopped"):
                self._state = "stopped"
                return
            self._closing = True
            self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            child, self._child = self._child, None
            ring = self._ring
            if child is not None and ring is not None and child.process.exitcode is None and self._state == "running":
                if fade:
                    ring.stop_request = 1
                    deadline = time.monotonic() + 0.5
                    while ring.stop_request != 2 and time.monotonic() < deadline and child.process.exitcode is None:
                        time.sleep(0.005)
                with contextlib.suppress(Exception):
                    child.conn.send("stop")
                child.process.join(timeout=1.0)
            if child is not None:
                self._kill(child)
            self._final = self.stats()
            self._final["state"] = "stopped"
            self._state = "stopped"
            self._close_ring()

    def close(self) -> None:
        """Same as ``stop(fade=False)``."""
        self.stop(fade=False)

    def __enter__(self) -> DeviceSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- extras ------------------------------------------------------------------------------------------------

    def wait_running(self, timeout: float) -> bool:
        """Wait until the audio process plays (e.g. after an outage); True if it does within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._state == "running":
                return True
            if self._state == "stopped":
                return False
            time.sleep(0.02)
        return self._state == "running"

    @property
    def state(self) -> str:
        """idle | starting | running | down | stopped."""
        return self._state

    # -- internals ----------------------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "channels": self.channels,
            "preferred_rate": self.preferred_rate,
            "latency_s": self.latency_ms / 1000.0,
            "blocksize": self.blocksize,
            "jack_connect": self.jack_connect,
            "jack_server": self.jack_server,
            "client_name": self.client_name,
        }

    def _spawn(self) -> None:
        """Start a fresh audio process on the existing ring (caller holds the lock)."""
        ring = self._ring
        assert ring is not None
        ring.stop_request = 0
        ring.device_rate = 0
        ring.heartbeat_ns = 0
        ring.status = Status.STARTING
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_audio_process_main,
            args=(ring.name, child_conn, self._config()),
            name="cicada-audio",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self._child = _Child(process, parent_conn)
        self._process_box[0] = process

    @staticmethod
    def _exit_text(child: _Child, when: str) -> str:
        code = child.process.exitcode
        return f"the audio process exited {when} (exit code {code})"

    @staticmethod
    def _reap(child: _Child) -> bool:
        """True once the process has exited (and is reaped)."""
        with contextlib.suppress(Exception):
            child.process.join(timeout=0)
            if child.process.exitcode is not None:
                child.process.close()
                return True
        return False

    def _kill(self, child: _Child, grace: float = 0.0) -> None:
        """Wait ``grace`` s for the process to leave by itself, then terminate, then kill; every wait is bounded.

        A process that survives all that is remembered in ``_stuck``.
        """
        process = child.process
        with contextlib.suppress(Exception):
            if grace > 0 and process.exitcode is None:
                process.join(timeout=grace)
            if process.exitcode is None:
                process.terminate()
                process.join(timeout=0.5)
            if process.exitcode is None:
                process.kill()
                process.join(timeout=1.0)
        with contextlib.suppress(Exception):
            child.conn.close()
        if process.exitcode is not None:
            with contextlib.suppress(Exception):
                process.close()
        else:
            self._stuck.append(child)

    def _close_ring(self) -> None:
        ring = self._ring
        if ring is not None and not ring.closed:
            ring.close()
        if self._finalizer is not None:
            self._finalizer.detach()

    def _supervise(self) -> None:
        """Watch the audio process; on a stall or death kill it, count an outage and start another with back-off."""
        low, high = self.backoff
        delay = low
        next_try = 0.0
        stall_ns = int(self.stall_timeout * 1e9)
        while not self._stop_event.wait(0.05):
            with self._lock:
                if self._closing:
                    return
                ring = self._ring
                child = self._child
                now = time.monotonic()
                if ring is None:
                    return
                if self._state == "running" and child is not None:
                    reason = None
                    message = self._poll(child)
                    if message is not None and message[0] == "lost":
                        reason = str(message[1])
                    elif message is not None and message[0] == "eof":
                        reason = self._exit_text(child, "while playing")
                    elif child.process.exitcode is not None:
                        reason = self._exit_text(child, "while playing")
                    else:
                        beat = ring.heartbeat_ns
                        if time.monotonic_ns() - beat > stall_ns:
                            reason = f"no audio callback for {self.stall_timeout:g} s (device or server gone?)"
                    if reason is not None:
                        self._kill(child)
                        self._child = None
                        self._outages += 1
                        self._last_error = reason
                        self._state = "down"
                        delay = low if now - child.started_at >= 5.0 else min(high, max(low, delay * 2))
                        next_try = now + delay
                elif self._state == "down":
                    if now >= next_try:
                        self._stuck = [c for c in self._stuck if not self._reap(c)]
                        if self._stuck:
                            # An old audio process survived SIGKILL (uninterruptible sleep in a driver): never
                            # start a second consumer on the ring while it might still read from it.
                            next_try = now + delay
                            continue
                        ring.consumer_pid = 0
                        ring.discard()  # stale audio from before the outage
                        self._state = "starting"
                        try:
                            self._spawn()
                        except Exception as exc:
                            self._last_error = f"cannot start the audio process: {exc}"
                            self._state = "down"
                            delay = min(high, delay * 2)
                            next_try = now + delay
                elif self._state == "starting" and child is not None:
                    message = self._poll(child)
                    failed = None
                    if message is not None and message[0] == "ok":
                        self._info = dict(message[1])
                        self._restarts += 1
                        self._state = "running"
                        child.started_at = now
                    elif message is not None:
                        failed = str(message[1]) if message[0] != "eof" else self._exit_text(child, "at start-up")
                    elif child.process.exitcode is not None:
                        failed = self._exit_text(child, "at start-up")
                    elif now - child.started_at > self.start_timeout:
                        failed = f"the audio process did not open the device within {self.start_timeout:g} s"
                    if failed is not None:
                        self._kill(child, grace=2.0 if message is not None else 0.0)
                        self._child = None
                        self._last_error = failed
                        self._state = "down"
                        delay = min(high, max(low, delay * 2))
                        next_try = now + delay

    @staticmethod
    def _poll(child: _Child) -> tuple[Any, ...] | None:
        """One message from the audio process if there is one; ("eof",) if its end of the pipe closed."""
        try:
            if child.conn.poll(0):
                return tuple(child.conn.recv())
        except (EOFError, OSError):
            return ("eof",)
        return None


def _emergency_cleanup(ring: Ring, process_box: list[BaseProcess | None]) -> None:
    """At garbage collection or interpreter exit without stop(): kill the audio process, free the ring."""
    process = process_box[0]
    if process is not None:
        with contextlib.suppress(Exception):
            if process.exitcode is None:
                process.kill()
                process.join(timeout=1.0)
    with contextlib.suppress(Exception):
        ring.close()


class NullSink(_RingSink):
    """No device: with ``realtime`` a thread consumes the ring at ``rate`` frames per second (so ``queued()``
    behaves as with a device, underruns included); without it ``write`` only counts (for benchmarks)."""

    def __init__(
        self,
        rate: int,
        channels: int,
        realtime: bool = True,
        *,
        ring_seconds: float = 2.0,
        write_timeout: float = 0.1,
        period: float = 0.005,
    ) -> None:
        super().__init__(channels, ring_seconds, write_timeout)
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self._rate = int(rate)
        self.realtime = bool(realtime)
        self._period = float(period)
        self._state = "idle"
        self._played = 0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._final: dict[str, Any] | None = None

    @property
    def rate(self) -> int:
        """Sample rate (as given)."""
        return self._rate

    def start(self) -> None:
        """Create the ring and the consumer thread (realtime) or nothing (counting only)."""
        if self._state != "idle":
            raise AudioError(f"NullSink.start() called twice (state {self._state})")
        self._state = "running"
        if not self.realtime:
            return
        self._ring = Ring.create(math.ceil(self._ring_seconds * self._rate), self.channels)
        self._thread = threading.Thread(target=self._consume, name="cicada-null-sink", daemon=True)
        self._thread.start()

    def queued(self) -> int:
        """Frames waiting in the ring (0 without realtime)."""
        return super().queued() if self.realtime else 0

    def write(self, block: np.ndarray) -> None:
        """Realtime: into the ring (as DeviceSink.write). Otherwise: count the frames and forget them."""
        if self.realtime:
            super().write(block)
            return
        block = _check_block(block, self.channels)
        if self._state != "running":
            raise AudioError("write() before start() or after stop()")
        self._played += block.shape[0]

    def _consume(self) -> None:
        ring = self._ring
        assert ring is not None
        chunk = max(1, int(self._rate * 0.05))
        scratch = np.zeros((chunk, self.channels), dtype=np.float32)
        player = _Player(ring, stop_fade=int(self._rate * STOP_FADE_SECONDS))
        t0 = time.monotonic()
        consumed = 0
        while not self._stop_event.wait(self._period):
            due = int((time.monotonic() - t0) * self._rate) - consumed
            if due > self._rate:  # the thread was suspended for over a second: do not catch up in a burst
                consumed += due - chunk
                due = chunk
            while due > 0:
                n = min(due, chunk)
                player(scratch[:n], n, None, None)
                consumed += n
                due -= n

    def stats(self) -> dict[str, Any]:
        """state, rate, channels, underruns, underrun_samples, played_samples, dropped_samples, queued."""
        if self._final is not None:
            return dict(self._final)
        ring = self._ring
        live = ring is not None and not ring.closed
        return {
            "state": self._state,
            "device": "null",
            "rate": self._rate,
            "channels": self.channels,
            "underruns": ring.underruns if live else 0,
            "underrun_samples": ring.underrun_frames if live else 0,
            "played_samples": ring.frames_played if live else self._played,
            "dropped_samples": self._dropped,
            "queued": self.queued(),
            "outages": 0,
            "restarts": 0,
        }

    def stop(self, fade: bool = True) -> None:
        """Stop the consumer thread and free the ring (``fade`` has nothing to fade here)."""
        if self._state == "stopped":
            return
        self._closing = True
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._final = self.stats()
        self._final["state"] = "stopped"
        self._state = "stopped"
        if self._ring is not None:
            self._ring.close()


_FILE_FORMATS = {".wav": ("WAV", "FLOAT"), ".flac": ("FLAC", "PCM_24")}


class FileSink:
    """Render to a WAV or FLAC file, written under a temporary name in the same folder and renamed on ``stop()``.

    WAV is 32-bit float (exactly the engine's samples: no quantisation, nothing clipped); FLAC is 24-bit PCM
    (FLAC has no float), clipped to [-1, 1]. ``subtype`` overrides (any soundfile subtype the format takes).
    A failed or aborted render leaves nothing behind, not even the temporary file (unless the process is
    killed: then a hidden ``.NAME.*.part`` file remains). The last 10 ms are held back so that
    ``stop(fade=True)`` can fade them out.
    """

    def __init__(self, path: str | os.PathLike[str], rate: int, channels: int, subtype: str | None = None) -> None:
        if rate <= 0 or channels < 1:
            raise ValueError(f"FileSink needs rate > 0 and channels >= 1, got {rate}, {channels}")
        self.path = Path(path)
        self.rate = int(rate)
        self.channels = int(channels)
        self.subtype = subtype
        self._file: Any = None
        self._tmp: Path | None = None
        self._state = "idle"
        self._written = 0
        hold = max(1, int(self.rate * STOP_FADE_SECONDS))
        self._tail = np.zeros((hold, self.channels), dtype=np.float32)
        self._tail_n = 0
        self._clip = False

    def start(self) -> None:
        """Create the temporary file; AudioError if the folder is missing or the suffix is not .wav/.flac."""
        if self._state != "idle":
            raise AudioError(f"FileSink.start() called twice (state {self._state})")
        folder = self.path.parent
        if not folder.is_dir():
            raise AudioError(f"cannot write {self.path}: folder {folder} does not exist")
        suffix = self.path.suffix.lower()
        if suffix not in _FILE_FORMATS:
            raise AudioError(
                f"cannot write {self.path}: unsupported file type {self.path.suffix or '(no suffix)'!r}; "
                "use .wav or .flac"
            )
        try:
            import soundfile
        except (ImportError, OSError) as exc:
            raise AudioError(
                f"cannot write {self.path}: soundfile/libsndfile missing ({exc}): pip install soundfile"
            ) from exc
        fmt, default_subtype = _FILE_FORMATS[suffix]
        subtype = self.subtype or default_subtype
        if not soundfile.check_format(fmt, subtype):
            raise AudioError(f"cannot write {self.path}: {fmt} does not take subtype {subtype!r}")
        self._clip = not subtype.upper().startswith(("FLOAT", "DOUBLE"))
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".part")
            os.close(fd)
        except OSError as exc:
            raise AudioError(f"cannot write {self.path}: {exc}") from exc
        self._tmp = Path(tmp)
        try:
            self._file = soundfile.SoundFile(
                tmp, mode="w", samplerate=self.rate, channels=self.channels, format=fmt, subtype=subtype
            )
        except Exception as exc:
            self._remove_tmp()
            raise AudioError(f"cannot write {self.path}: {exc}") from exc
        self._state = "running"

    def queued(self) -> int:
        """Always 0: a file takes everything at once."""
        return 0

    def _emit(self, frames: np.ndarray) -> None:
        if frames.shape[0] == 0:
            return
        if self._clip:
            frames = np.clip(frames, -1.0, 1.0)
        try:
            self._file.write(frames)
        except Exception as exc:
            self.abort()
            raise AudioError(f"cannot write {self.path}: {exc}") from exc
        self._written += frames.shape[0]

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` ``[N, channels]`` (float32; other floats are converted)."""
        if self._state != "running":
            raise AudioError("write() before start() or after stop()")
        block = _check_block(block, self.channels).astype(np.float32, copy=False)
        hold = self._tail.shape[0]
        n = block.shape[0]
        kept = self._tail_n
        if n >= hold:
            self._emit(self._tail[:kept])
            self._emit(block[: n - hold])
            self._tail[:] = block[n - hold :]
            self._tail_n = hold
        elif kept + n <= hold:
            self._tail[kept : kept + n] = block
            self._tail_n = kept + n
        else:
            spill = kept + n - hold
            self._emit(self._tail[:spill])
            self._tail[: kept - spill] = self._tail[spill:kept].copy()
            self._tail[kept - spill :] = block
            self._tail_n = hold

    def stats(self) -> dict[str, Any]:
        """state, path, rate, channels, played_samples (frames written so far), underruns (0), dropped (0)."""
        return {
            "state": self._state,
            "device": str(self.path),
            "path": str(self.path),
            "rate": self.rate,
            "channels": self.channels,
            "played_samples": self._written,
            "underruns": 0,
            "dropped_samples": 0,
            "queued": 0,
            "outages": 0,
            "restarts": 0,
        }

    def stop(self, fade: bool = True) -> None:
        """Write the held-back tail (faded out over its 10 ms if ``fade``), close and rename into place."""
        if self._state != "running":
            return
        tail = self._tail[: self._tail_n]
        if fade and self._tail_n:
            tail = tail * _raised_cosine(self._tail.shape[0], rising=False)[-self._tail_n :]
        self._emit(tail)
        written = self._written
        try:
            self._file.close()
            assert self._tmp is not None
            os.chmod(self._tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a render is an ordinary file
            os.replace(self._tmp, self.path)
        except Exception as exc:
            self.abort()
            raise AudioError(f"cannot write {self.path}: {exc}") from exc
        self._tmp = None
        self._written = written
        self._tail_n = 0
        self._state = "stopped"

    def abort(self) -> None:
        """Give up: close and delete the temporary file; the destination is left as it was."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
        self._remove_tmp()
        self._state = "stopped"

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None

    def __enter__(self) -> FileSink:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.abort()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._state == "running":
                self.abort()
