"""Sinks: the audio callback's arithmetic, the null and file sinks, and DeviceSink against a real JACK server.

The device tests start a private ``jackd`` dummy server each (``tests/jack_server.py``), record what our
PortAudio ports send with a JACK client in another process, and compare it with what was written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from engine.audio import AudioError, DeviceSink, FileSink, NullSink, Sink, _Player, list_devices
from engine.pack import current_umask
from engine.ring import Ring
from tests.jack_server import JackServer, Recorder, first_sound, jackd_available, recorder_hears

ROOT = Path(__file__).resolve().parents[2]
RATE = 48000

needs_jack = pytest.mark.skipif(not jackd_available(), reason="needs jackd and the JACK-Client package")
bounded = pytest.mark.timeout(90)  # a hang in a device test fails it instead of stalling the suite


def tone(n: int, rate: int = RATE, start: int = 0) -> np.ndarray:
    """Two channels of cosines (440 Hz, 660 Hz) with non-zero phase, so the first sample is not 0. ``[n, 2]``."""
    t = np.arange(start, start + n, dtype=np.float64)[:, None] / rate
    return (np.array([0.5, 0.3]) * np.cos(2 * np.pi * np.array([440.0, 660.0]) * t + np.array([0.3, 0.1]))).astype(
        np.float32
    )


# ------------------------------------------------------------------------------------------------------------
# The callback (no device needed)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring.create(4096, 2)
    yield r
    r.close()


def test_player_fades_in_counts_one_underrun_and_fades_out(ring: Ring) -> None:
    player = _Player(ring, stop_fade=100, fade=64)
    out = np.full((256, 2), 9.0, np.float32)
    player(out, 256, None, None)  # nothing written yet: silence, and not an underrun
    assert (out == 0).all() and ring.underruns == 0 and ring.underrun_frames == 0
    ring.write(np.ones((300, 2), np.float32))
    player(out, 256, None, None)
    ramp = out[:64, 0]
    assert 0 < ramp[0] < 0.01 and (np.diff(ramp) > 0).all() and ramp[-1] > 0.99  # faded in
    assert (out[64:] == 1).all() and ring.underruns == 0
    player(out, 256, None, None)  # 44 frames left: an underrun
    assert ring.underruns == 1 and ring.underrun_frames == 212
    tail = out[:44, 1]
    assert (np.diff(tail) < 0).all() and tail[-1] < 0.01  # faded out, no step to 0
    assert (out[44:] == 0).all()
    player(out, 256, None, None)  # still starved: same underrun, more silence
    assert ring.underruns == 1 and ring.underrun_frames == 212 + 256
    ring.write(np.ones((600, 2), np.float32))
    player(out, 256, None, None)
    assert out[0, 0] < 0.01 and out[-1, 0] == 1  # fades in again after the underrun
    assert ring.callbacks == 5 and ring.frames_played == 5 * 256
    assert ring.heartbeat_ns > 0


def test_player_stop_fade_then_silence_without_consuming(ring: Ring) -> None:
    player = _Player(ring, stop_fade=100, fade=4)
    ring.write(np.ones((2000, 2), np.float32))
    out = np.zeros((64, 2), np.float32)
    player(out, 64, None, None)
    ring.stop_request = 1
    player(out, 64, None, None)
    first = out[:, 0].copy()
    player(out, 64, None, None)
    second = out[:, 0].copy()
    faded = np.concatenate([first, second[:36]])
    assert faded[0] > 0.99 and (np.diff(faded) < 0).all() and faded[-1] < 0.01
    assert (second[36:] == 0).all()
    assert ring.stop_request == 2
    fill = ring.fill()
    player(out, 64, None, None)
    assert (out == 0).all() and ring.fill() == fill  # silent, ring untouched


def test_player_allocates_no_buffers(ring: Ring) -> None:
    player = _Player(ring, stop_fade=480)
    out = np.zeros((1024, 2), np.float32)
    block = np.ones((700, 2), np.float32)
    for _ in range(5):
        ring.write(block)
        player(out, 1024, None, None)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(1000):
            ring.write(block)  # 700 < 1024: every call is an underrun with fades
            player(out, 1024, None, None)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 1024 and peak - before < 4096


# ------------------------------------------------------------------------------------------------------------
# NullSink
# ------------------------------------------------------------------------------------------------------------


def test_null_sink_consumes_in_real_time() -> None:
    sink = NullSink(8000, 1)
    assert isinstance(sink, Sink)
    sink.start()
    try:
        sink.write(np.zeros((4000, 1), np.float32))  # 0.5 s
        assert sink.queued() > 3000
        time.sleep(0.25)
        assert 1200 < sink.queued() < 3000  # about half gone
        time.sleep(0.5)
        stats = sink.stats()
        assert sink.queued() == 0 and stats["underruns"] == 1 and stats["played_samples"] >= 5500
    finally:
        sink.stop()
    assert sink.stats()["state"] == "stopped"


def test_null_sink_without_realtime_counts_and_full_ring_drops() -> None:
    counting = NullSink(48000, 2, realtime=False)
    counting.start()
    counting.write(np.zeros((960, 2), np.float32))
    assert counting.queued() == 0 and counting.stats()["played_samples"] == 960
    counting.stop()

    sink = NullSink(1000, 2, ring_seconds=0.1, write_timeout=0.05)
    sink.start()
    try:
        t0 = time.monotonic()
        sink.write(np.zeros((500, 2), np.float32))  # 0.5 s into a 0.1 s ring
        assert time.monotonic() - t0 < 0.5
        assert sink.stats()["dropped_samples"] > 300
    finally:
        sink.stop()


# ------------------------------------------------------------------------------------------------------------
# FileSink
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "subtype", "atol"), [(".wav", "FLOAT", 0.0), (".flac", "PCM_24", 2.0**-22)])
def test_file_sink_writes_readable_file(tmp_path: Path, suffix: str, subtype: str, atol: float) -> None:
    path = tmp_path / f"out{suffix}"
    sink = FileSink(path, 32000, 2)
    sink.start()
    signal_ = tone(32000 + 123, rate=32000)
    for i in range(0, len(signal_), 640):
        sink.write(signal_[i : i + 640])
    assert not path.exists()  # nothing at the destination until stop()
    sink.stop(fade=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # an ordinary file, not mkstemp's 0600
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (32000, 2, len(signal_), subtype)
    data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    np.testing.assert_allclose(data, signal_, atol=atol, rtol=0)


def test_file_sink_fades_the_end(tmp_path: Path) -> None:
    path = tmp_path / "fade.wav"
    with FileSink(path, 8000, 1) as sink:
        sink.write(np.ones((1000, 1), np.float32))
    data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert len(data) == 1000 and (data[:920] == 1).all()  # the last 10 ms (80 frames) fade
    assert (np.diff(data[920:, 0]) < 0).all() and data[-1, 0] < 0.01


def test_file_sink_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "out.wav"
    with pytest.raises(AudioError, match=r"cannot write .*out\.wav: folder .*nope does not exist"):
        FileSink(path, 48000, 2).start()
    assert not (tmp_path / "nope").exists()


def test_file_sink_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"unsupported file type '\.mp3'; use \.wav or \.flac"):
        FileSink(tmp_path / "out.mp3", 48000, 2).start()
    assert list(tmp_path.iterdir()) == []


def test_file_sink_failure_leaves_nothing_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "take.flac"
    path.write_bytes(b"previous render")
    with pytest.raises(RuntimeError, match="generator blew up"):
        with FileSink(path, 48000, 2) as sink:
            sink.write(tone(4800))
            raise RuntimeError("generator blew up")
    assert path.read_bytes() == b"previous render"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take.flac"]
    sink = FileSink(path, 48000, 2)
    sink.start()
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        sink.write(np.zeros((10, 3), np.float32))
    sink.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take.flac"]


# ------------------------------------------------------------------------------------------------------------
# DeviceSink on a JACK dummy server
# ------------------------------------------------------------------------------------------------------------


def play(sink: DeviceSink, source: np.ndarray, target_s: float = 0.06, chunk: int = 960) -> None:
    """Producer loop: write ``source`` in chunks, keeping ``queued()`` near ``target_s``."""
    target = int(target_s * sink.rate)
    pos = 0
    while pos < len(source):
        if sink.queued() < target:
            sink.write(source[pos : pos + chunk])
            pos += chunk
        else:
            time.sleep(0.002)


@needs_jack
@bounded
def test_plays_continuously_into_jack(sync_server: JackServer) -> None:
    server = sync_server
    had_portaudio = "sounddevice" in sys.modules
    source = tone(int(1.5 * RATE))
    with Recorder(server.name) as recorder:
        sink = DeviceSink(None, 2, RATE, 20.0, jack_connect=recorder.ports, jack_server=server.name)
        sink.start()
        try:
            stats = sink.stats()
            assert stats["state"] == "running" and stats["rate"] == RATE and stats["hostapi"].startswith("JACK")
            assert stats["jack_ports"] == [f"{stats['jack_client']}:out_0", f"{stats['jack_client']}:out_1"]
            play(sink, source)
            assert sink.stats()["underruns"] == 0
            time.sleep(0.15)  # let the last blocks reach the recorder
        finally:
            sink.stop()
        recording = recorder.take()
        assert recorder.gaps == 0
    start = first_sound(recording)
    # The first 64 samples fade in; the last block fades out when the ring runs dry after the last write.
    fade = 64
    heard = recording[start : start + len(source) - 1024]
    assert len(heard) >= RATE  # at least a second
    np.testing.assert_allclose(heard[fade:], source[fade : len(heard)], atol=1e-6, rtol=0)
    assert np.abs(heard[:fade] - source[:fade]).max() > 1e-3  # the fade-in is there (and the check can fail)
    assert sink.stats()["dropped_samples"] == 0 and sink.stats()["state"] == "stopped"
    assert had_portaudio or "sounddevice" not in sys.modules  # PortAudio stayed in the audio process


@needs_jack
@bounded
def test_unknown_device_names_it_and_lists_devices(server: JackServer) -> None:
    sink = DeviceSink("no-such-card-xyz", 2, RATE, 20.0, jack_server=server.name)
    t0 = time.monotonic()
    with pytest.raises(AudioError, match=r"no output device matches 'no-such-card-xyz'") as info:
        sink.start()
    assert "system" in str(info.value)  # the listing of what there is
    assert info.value.no_device is False  # there are devices, just not that one
    assert time.monotonic() - t0 < 10
    assert sink.stats()["state"] == "stopped"


@needs_jack
@bounded
def test_unknown_jack_port_is_named(server: JackServer) -> None:
    sink = DeviceSink("system", 2, RATE, 20.0, jack_connect=["nobody:in_7"], jack_server=server.name)
    with pytest.raises(AudioError, match=r"JACK port 'nobody:in_7' does not exist.*system:playback_1"):
        sink.start()


@needs_jack
@bounded
def test_falls_back_to_the_device_rate(server: JackServer) -> None:
    sink = DeviceSink("system", 2, 32000, 20.0, jack_server=server.name)
    assert sink.rate == 32000  # until it opens
    sink.start()
    try:
        assert sink.rate == 48000 and sink.stats()["rate"] == 48000
    finally:
        sink.stop(fade=False)


@needs_jack
@bounded
def test_list_devices_with_and_without_server(server: JackServer) -> None:
    def run(name: str) -> str:
        code = f"from engine.audio import list_devices; print(list_devices(jack_server={name!r}))"
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout

    listing = run(server.name)
    assert "[0] system (JACK Audio Connection Kit)" in listing
    assert "system:playback_1" in listing and "system:playback_2" in listing
    absent = f"{server.name}-absent"
    missing = run(absent)
    assert "JACK: no server running" in missing and "system:playback_1" not in missing
    assert list_devices.__doc__

    # No server, no other device on this machine: start() says so, flags no_device, names the remedy.
    if "Output devices (* = default):\n  none" in missing:
        sink = DeviceSink(None, 2, RATE, 20.0, jack_server=absent)
        with pytest.raises(AudioError, match=r"no sound device found: use --out FILE .*jackd -d dummy") as info:
            sink.start()
        assert info.value.no_device is True


class Producer(threading.Thread):
    """The engine's producer loop in a thread: a tone, paced by ``queued()``; records its slowest write."""

    def __init__(self, sink: DeviceSink) -> None:
        super().__init__(daemon=True)
        self.sink = sink
        self.halt = threading.Event()
        self.slowest = 0.0
        self.writes = 0

    def run(self) -> None:
        pos = 0
        while not self.halt.is_set():
            if self.sink.queued() < int(0.06 * self.sink.rate):
                t0 = time.monotonic()
                self.sink.write(tone(960, start=pos))
                self.slowest = max(self.slowest, time.monotonic() - t0)
                self.writes += 1
                pos += 960
            else:
                time.sleep(0.002)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        assert not self.is_alive()


@needs_jack
@bounded
def test_server_vanishes_and_comes_back(server: JackServer) -> None:
    recorder = Recorder(server.name)
    sink = DeviceSink(
        None,
        2,
        RATE,
        20.0,
        jack_connect=recorder.ports,
        ring_seconds=0.25,
        write_timeout=0.05,
        backoff=(0.2, 1.0),
        jack_server=server.name,
    )
    sink.start()
    producer = Producer(sink)
    producer.start()
    try:
        assert recorder_hears(recorder, 0.2, timeout=5).size
        first_pid = sink.stats()["pid"]

        server.kill()  # SIGKILL: no goodbye to the clients
        recorder.kill()
        recorder.close()
        t0 = time.monotonic()
        while sink.stats()["outages"] == 0 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert sink.stats()["outages"] == 1, sink.stats()
        assert sink.stats()["state"] in ("down", "starting")

        # No device: writes into the full ring give up after write_timeout and count the drop.
        producer.stop()
        t1 = time.monotonic()
        block = tone(960)
        while time.monotonic() - t1 < 0.8:
            t = time.monotonic()
            sink.write(block)
            assert time.monotonic() - t < 0.3
        assert sink.stats()["dropped_samples"] > 0
        assert producer.slowest < 0.3
        callbacks = sink.stats()["callbacks"]

        server.start()
        recorder = Recorder(server.name)
        producer = Producer(sink)
        producer.start()
        assert sink.wait_running(10), sink.stats()
        stats = sink.stats()
        assert stats["restarts"] >= 1 and stats["pid"] != first_pid
        heard = recorder_hears(recorder, 0.3, timeout=5)
        assert len(heard) >= 0.3 * RATE, "no sound after the server came back"
        assert sink.stats()["callbacks"] > callbacks  # the heartbeat moves again
    finally:
        producer.stop()
        sink.stop()
        recorder.close()


@needs_jack
@bounded
def test_dead_or_hung_audio_process_is_replaced(server: JackServer) -> None:
    sink = DeviceSink("system", 2, RATE, 20.0, backoff=(0.2, 1.0), jack_server=server.name)
    sink.start()
    producer = Producer(sink)
    producer.start()
    try:
        pid = sink.stats()["pid"]
        os.kill(pid, signal.SIGKILL)  # dies: exit code set
        t0 = time.monotonic()
        while sink.stats()["restarts"] < 1 and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        stats = sink.stats()
        assert stats["outages"] == 1 and stats["restarts"] == 1 and stats["pid"] != pid, stats

        pid = stats["pid"]
        os.kill(pid, signal.SIGSTOP)  # hangs: alive, but the heartbeat stops
        t1 = time.monotonic()
        while sink.stats()["outages"] < 2 and time.monotonic() - t1 < 5:
            time.sleep(0.02)
        noticed = time.monotonic() - t1
        assert sink.stats()["outages"] == 2 and 0.8 < noticed < 3.0, (noticed, sink.stats())
        while sink.stats()["restarts"] < 2 and time.monotonic() - t1 < 10:
            time.sleep(0.02)
        stats = sink.stats()
        assert stats["restarts"] == 2 and stats["state"] == "running", stats
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the hung process was killed and reaped
        callbacks = stats["callbacks"]
        time.sleep(0.2)
        assert sink.stats()["callbacks"] > callbacks
    finally:
        producer.stop()
        sink.stop()
