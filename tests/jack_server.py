"""Test helpers: a private JACK dummy server, and a recorder client in a process of its own.

``jack_server()`` starts ``jackd --no-realtime [-S] -n NAME -d dummy -r RATE -p PERIOD`` under a unique server name,
waits until it accepts clients, and stops it by its process id (SIGTERM, then SIGKILL). PortAudio, JACK-Client
and the JACK tools pick a named server from the ``JACK_DEFAULT_SERVER`` environment variable (libjack reads it
whenever a client opens without a server name), so a test sets that variable for the processes it starts;
:meth:`JackServer.env` and the ``jack_env`` argument of the fixtures in the tests do that.

``Recorder`` runs a JACK-Client client with input ports in a spawned process (its own GIL, and a process the
test can kill when the server vanishes, since closing a client of a dead server can hang) and streams what it
hears into a shared-memory :class:`~engine.ring.Ring` that the test reads.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.ring import UNDERRUNS, Ring

_counter = itertools.count()


def jackd_available() -> bool:
    """True if ``jackd`` is on PATH and the JACK-Client package loads (libjack present)."""
    if shutil.which("jackd") is None:
        return False
    try:
        import jack  # noqa: F401
    except Exception:
        return False
    return True


def _probe(name: str) -> bool:
    """True if the server ``name`` accepts a client now. Never starts a server."""
    import jack

    jack.set_error_function(lambda msg: None)
    jack.set_info_function(lambda msg: None)
    try:
        client = jack.Client(f"probe-{os.getpid()}", servername=name, no_start_server=True)
    except Exception:
        return False
    finally:
        jack.set_error_function(None)
        jack.set_info_function(None)
    client.close()
    return True


class JackServer:
    """One ``jackd`` dummy-backend server process under a unique name; restartable under the same name."""

    def __init__(self, rate: int = 48000, period: int = 256, name: str | None = None, sync: bool = True) -> None:
        self.rate = rate
        self.period = period
        self.sync = sync
        self.name = name or f"cicada-test-{os.getpid()}-{next(_counter)}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")[1])

    @property
    def pid(self) -> int | None:
        """Process id of the running jackd, or None."""
        return self.process.pid if self.process is not None else None

    def env(self) -> dict[str, str]:
        """Environment variables that point libjack clients (PortAudio, JACK-Client, jack_lsp) at this server."""
        return {"JACK_DEFAULT_SERVER": self.name, "JACK_NO_START_SERVER": "1"}

    def command(self) -> list[str]:
        """The jackd command line."""
        cmd = ["jackd", "--no-realtime", "-n", self.name]
        if self.sync:
            cmd.append("-S")  # synchronous: the dummy driver waits for every client, so no cycle is skipped
        return [*cmd, "-d", "dummy", "-r", str(self.rate), "-p", str(self.period)]

    def start(self, timeout: float = 10.0) -> JackServer:
        """Start jackd and wait until it accepts clients; RuntimeError (with its log) if it does not."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"jackd {self.name} already runs (pid {self.process.pid})")
        log = open(self._log, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jackd exited with {self.process.returncode}:\n{self.log()}")
            if _probe(self.name):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"jackd {self.name} did not accept clients within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """What jackd printed so far."""
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")
        return ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes without telling its clients."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by pid, SIGKILL if it is still there after ``timeout`` s; then remove its leftover files."""
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.process = None
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Semaphores and sockets of clients that were killed are left in /dev/shm under the server's name."""
        shm = Path("/dev/shm")
        if not shm.is_dir():
            return
        for path in shm.iterdir():
            if f"_{self.name}_" in path.name and path.name.startswith("jack"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def close(self) -> None:
        """Stop the server and delete its log."""
        self.stop()
        with contextlib.suppress(OSError):
            self._log.unlink()


@contextlib.contextmanager
def jack_server(rate: int = 48000, period: int = 256, sync: bool = True) -> Iterator[JackServer]:
    """A running private JACK dummy server for the duration of the block; stopped by pid afterwards."""
    server = JackServer(rate=rate, period=period, sync=sync)
    try:
        server.start()
        yield server
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------------------
# Recorder
# ------------------------------------------------------------------------------------------------------------


def _recorder_main(
    ring_name: str, conn: multiprocessing.connection.Connection, client_name: str, channels: int, server: str | None
) -> None:
    """Spawned: a JACK client with ``channels`` input ports that appends what it hears to the ring.

    Counts cycles whose frame time does not follow the previous one (the recorder missed audio) in the ring's
    UNDERRUNS slot, so a test can tell its own gaps from the player's.
    """
    import jack

    ring = Ring.attach(ring_name)
    client = jack.Client(client_name, servername=server, no_start_server=True)
    ports = [client.inports.register(f"in_{i + 1}") for i in range(channels)]
    scratch = np.zeros((8192, channels), dtype=np.float32)
    hdr = ring.header
    last = [-1]

    @client.set_process_callback
    def process(frames: int) -> None:
        start = client.last_frame_time
        if last[0] >= 0 and start != last[0]:
            hdr[UNDERRUNS] += 1
        last[0] = start + frames
        for c, port in enumerate(ports):
            scratch[:frames, c] = port.get_array()
        ring.write(scratch[:frames])

    client.activate()
    conn.send([p.name for p in ports])
    with contextlib.suppress(EOFError, OSError):
        conn.recv()
    client.deactivate()
    client.close()
    ring.close()
    os._exit(0)


class Recorder:
    """A JACK capture client in its own process. ``ports`` are its input port names (connect to them)."""

    def __init__(
        self,
        server: str | None = None,
        channels: int = 2,
        seconds: float = 20.0,
        rate: int = 48000,
        name: str = "recorder",
    ) -> None:
        self.channels = channels
        self.ring = Ring.create(int(seconds * rate), channels)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_recorder_main,
            args=(self.ring.name, child, name, channels, server),
            daemon=True,
            name="jack-recorder",
        )
        self.process.start()
        child.close()
        try:
            if not self._conn.poll(15):
                raise RuntimeError("the JACK recorder did not start within 15 s")
            self.ports: list[str] = self._conn.recv()
        except BaseException:
            self.close()
            raise

    @property
    def gaps(self) -> int:
        """JACK cycles the recorder itself missed."""
        return self.ring.underruns

    def take(self) -> np.ndarray:
        """Everything recorded since the last call, ``[N, channels]`` float32."""
        out = np.zeros((self.ring.fill(), self.channels), dtype=np.float32)
        n = self.ring.read_into(out)
        return out[:n]

    def kill(self) -> None:
        """Kill the recorder process by pid (works when its server is gone)."""
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(timeout=5)

    def close(self) -> None:
        """Stop the recorder (politely, then by force) and free its ring."""
        if self.process.exitcode is None:
            with contextlib.suppress(Exception):
                self._conn.send("stop")
            self.process.join(timeout=3)
        self.kill()
        self._conn.close()
        self.ring.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def first_sound(recording: np.ndarray) -> int:
    nonzero = np.flatnonzero(np.abs(recording[:, 0]) > 0)
    assert nonzero.size, "the recorder heard nothing"
    return int(nonzero[0])


def recorder_hears(recorder: Recorder, seconds: float, timeout: float, rate: int = 48000) -> np.ndarray:
    """Collect until ``seconds`` of non-silent audio arrived (or ``timeout``); return the non-silent part."""
    chunks = []
    deadline = time.monotonic() + timeout
    loud = 0
    while time.monotonic() < deadline and loud < seconds * rate:
        time.sleep(0.05)
        got = recorder.take()
        chunks.append(got)
        loud += int(np.count_nonzero(np.abs(got[:, 0]) > 0))
    recording = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.float32)
    return recording[np.abs(recording[:, 0]) > 0]
