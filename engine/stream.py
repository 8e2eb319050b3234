"""The running engine: a Generator on two pipelined workers, feeding a sink.

::

    control (any thread) ── set_params ──> Generator (snapshot read once per step)

    LM worker:      waits until the sink needs audio, then
                    gen.next_codes() ──> codes [K, F] ──┐   (queue of 2 blocks)
                                                        v
    decode worker:  gen.decode ──> pcm [C, F*hop] ──> finite? ──> resample (soxr) ──>
                    OutputSafety (DC, gain, limiter, panic) ──> sink.write([N, C])

The LM for block n+1 runs while the decoder renders block n: with one ONNX
Runtime thread each, two cores do both (pipelining beats two intra-op threads
one after the other). The LM worker starts a block when half of it fits:
``sink.queued() + blocks in flight + block / 2 <= latency target``, so the
queue holds the latency setting on average (between half a block below and
half a block above it), parameters are read as late as possible, and a change
is heard after about ``latency + block / 2 + delay pattern + one block's
compute``. (Filling to the setting at most would shave half a block off that,
at the price of half a block less slack against a late audio server.)

A block that comes out of the decoder with NaN or Inf is replaced by silence,
counted, and the generator is reset (fresh context, same prompt): the stream
goes on. Render (a FileSink, which never has anything queued) runs the same
path flat out, so a render equals a playback of the same seed sample for sample.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.audio import Sink
from engine.generator import Generator, GenParams
from engine.post import OutputSafety

log = logging.getLogger("cicada.stream")


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; falls back to peak RSS)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StealMeter:
    """Share of CPU time the hypervisor gave to other guests ("steal", Linux /proc/stat) since the last call.

    On a virtual machine, a vCPU the host takes away stalls whatever runs on it, the engine's producer
    included, while the audio process on another vCPU keeps playing: an underrun the engine cannot prevent.
    The status line reports this figure so that such underruns can be told from the engine's own.
    """

    def __init__(self, path: str = "/proc/stat") -> None:
        self.path = path
        self._last = self._read()

    def _read(self) -> tuple[int, int] | None:
        """(steal, total) jiffies over all CPUs, or None where /proc/stat is missing or unreadable."""
        try:
            with open(self.path, encoding="ascii") as f:
                fields = f.readline().split()
            if fields[0] != "cpu" or len(fields) < 9:
                return None
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            return ticks[7], sum(ticks)
        except (OSError, ValueError, IndexError):
            return None

    def take(self) -> float | None:
        """Percent of all CPU time stolen since the last call (or since construction); None if unknown."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return 100.0 * (now[0] - last[0]) / (now[1] - last[1])


def raise_priority(increment: int) -> bool:
    """Lower this thread's nice value by ``increment`` (Linux: per thread) where allowed; say if it worked.

    Real-time work should not queue behind a desktop's or a server's other processes. Without the right
    (root, CAP_SYS_NICE or an rtprio/nice limit in /etc/security/limits.conf) this is a no-op.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) - increment)
        return True
    except (OSError, AttributeError):
        return False


def quiet_gc() -> None:
    """Keep Python's cyclic collector out of the steady state: freeze what startup made, collect rarely.

    The steps allocate few objects and no cycles (numpy temporaries are freed by reference counting), so
    a full collection walking every object at a bad moment is the only thing the collector would add.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class _Timings:
    """Fixed-size ring of durations in ms (no allocation per entry)."""

    def __init__(self, size: int = 3000) -> None:
        self.buf = np.zeros(size, np.float64)
        self.n = 0

    def add(self, ms: float) -> None:
        self.buf[self.n % self.buf.size] = ms
        self.n += 1

    def values(self) -> np.ndarray:
        return self.buf[: min(self.n, self.buf.size)].copy()

    def pct(self, q: float) -> float:
        v = self.values()
        return float(np.percentile(v, q)) if v.size else float("nan")


@dataclass
class WrittenBlock:
    """Where a block landed in the sink stream, and the parameter version it reflects."""

    start_sample: int
    version: int


class Resampler:
    """Streaming sample-rate conversion ``[N, C]`` with soxr; identity when rates match."""

    def __init__(self, in_rate: int, out_rate: int, channels: int) -> None:
        self.in_rate, self.out_rate, self.channels = in_rate, out_rate, channels
        self._rs = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.in_rate == self.out_rate:
            return x
        if self._rs is None:
            import soxr

            self._rs = soxr.ResampleStream(self.in_rate, self.out_rate, self.channels, dtype="float32",
                                           quality="HQ")
        return self._rs.resample_chunk(np.ascontiguousarray(x))

    def release(self) -> None:
        """Free the soxr state (the next call starts a fresh one). Without this, a stream still referenced
        at interpreter exit made nanobind print a "leaked instance" report on every `cicada serve` exit."""
        self._rs = None


class Stream:
    """Runs a Generator into a Sink with a latency target, pipelined, until stopped."""

    def __init__(
        self,
        generator: Generator,
        sink: Sink,
        *,
        latency_ms: float = 60.0,
        ceiling_db: float = -1.0,
        pipelined: bool = True,
        on_block: Callable[[int], None] | None = None,
    ) -> None:
        if not latency_ms > 0:
            raise ValueError(f"latency must be > 0 ms, got {latency_ms}")
        self.gen = generator
        self.sink = sink
        self.latency_ms = float(latency_ms)
        self.ceiling_db = ceiling_db
        self.pipelined = pipelined
        self.on_block = on_block
        self.on_output: Callable[[np.ndarray], None] | None = None  # sees each block [N, C] handed to the sink
        self._q: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue(maxsize=2)
        self._running = threading.Event()
        self._threads: list[threading.Thread] = []
        self._produced = 0  # blocks the LM worker has made (written by it only)
        self._consumed = 0  # blocks the decode worker has finished (written by it only)
        self.limit_samples: int | None = None  # stop after this many samples (render)
        self._reset_lm = threading.Event()
        self.error: BaseException | None = None
        self.lm_ms = _Timings()
        self.decode_ms = _Timings()
        self.post_ms = _Timings()
        self.blocks = 0
        self.written_samples = 0  # at the sink rate
        self.nonfinite_blocks = 0
        self.last_written = WrittenBlock(0, 0)
        self._primed = False  # the first target's worth of audio has been handed to the sink
        self._held: list[np.ndarray] = []  # blocks kept back until then
        self.first_sound_at: float | None = None
        # Since the last take_window(): the longest wait between two blocks handed to the sink, and the
        # emptiest the sink's queue was when one arrived (what an underrun post-mortem needs).
        self._last_write_at: float | None = None
        self._gap_max = 0.0
        self._queue_min: float | None = None
        self._configure()

    def _configure(self) -> None:
        """Set up the stages that depend on the sink's rate (again when a device comes back at another rate)."""
        rate = int(self.sink.rate)
        old = getattr(self, "safety", None)
        self.resampler = Resampler(self.gen.sample_rate, rate, self.gen.channels)
        self.safety = OutputSafety(rate, self.gen.channels, ceiling_db=self.ceiling_db)
        if old is not None:  # keep what the user set: gain, and a panic in force
            self.safety.set_gain_db(old.gain_db)
            if old.is_panicking:
                self.safety.panic()
        self.target_samples = max(1, int(round(self.latency_ms * rate / 1000.0)))
        self.block_out_samples = self.gen.block_samples * rate / self.gen.sample_rate

    # ------------------------------------------------------------------ latency

    @property
    def latency_report(self) -> dict[str, float]:
        """Each stage's latency in ms, and the total from a parameter change to the sound."""
        rate = self.sink.rate
        gen_ms = 1000.0 * self.gen.latency_samples / self.gen.sample_rate
        post_ms = 1000.0 * self.safety.latency_samples / rate
        block_ms = 1000.0 * self.gen.block_samples / self.gen.sample_rate
        return {
            "generator_ms": gen_ms,  # delay pattern + block assembly + decoder lookahead
            "block_ms": block_ms,
            "post_ms": post_ms,
            "buffer_ms": self.latency_ms,
            # worst case: the queue is at its fullest (latency + half a block) when the change lands;
            # add the compute of the next step, which `cicada bench` measures
            "total_ms": gen_ms + post_ms + self.latency_ms + block_ms / 2,
        }

    # ------------------------------------------------------------------ control

    def set_params(self, params: GenParams) -> None:
        self.gen.set_params(params)

    def set_ceiling_db(self, ceiling_db: float) -> None:
        """Move the limiter ceiling live (kept when the output is set up again at another rate)."""
        self.safety.set_ceiling_db(ceiling_db)
        self.ceiling_db = float(ceiling_db)

    def set_latency_ms(self, latency_ms: float) -> None:
        """Change the target fill live (the LM worker reads it before each block)."""
        if not latency_ms > 0:
            raise ValueError(f"latency must be > 0 ms, got {latency_ms}")
        self.latency_ms = float(latency_ms)
        self.target_samples = max(1, int(round(self.latency_ms * self.sink.rate / 1000.0)))

    def panic(self) -> None:
        """Fade everything to silence within 50 ms (also what is already queued in a device sink)."""
        self.safety.panic()
        panic = getattr(self.sink, "panic", None)
        if panic is not None:
            panic()

    def resume(self) -> None:
        resume = getattr(self.sink, "resume", None)
        if resume is not None:
            resume()
        self.safety.resume()

    # ------------------------------------------------------------------ run

    def start(self) -> None:
        quiet_gc()
        self._running.set()
        if self.pipelined:
            self._threads = [
                threading.Thread(target=self._guard(self._lm_worker), name="cicada-lm", daemon=True),
                threading.Thread(target=self._guard(self._decode_worker), name="cicada-decode", daemon=True),
            ]
        else:
            self._threads = [threading.Thread(target=self._guard(self._serial_worker), name="cicada-gen", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._running.clear()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)  # wake the decode worker
        for t in self._threads:
            t.join(timeout=5.0)
        if not any(t.is_alive() for t in self._threads):
            self.resampler.release()  # only the workers use it
        self._threads = []
        self._consumed = self._produced  # blocks dropped from the queue are no longer in flight

    @property
    def running(self) -> bool:
        return self._running.is_set() and all(t.is_alive() for t in self._threads)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            raise_priority(5)
            try:
                fn()
            except BaseException as exc:  # a worker must never die silently
                self.error = exc
                log.exception("generation stopped: %s", exc)
                self._running.clear()

        return run

    def _wait_for_room(self) -> bool:
        """Block until the queue, with the blocks in flight and half the next one, is at most the target."""
        while self._running.is_set():
            ahead = self.sink.queued() + (self._produced - self._consumed + 0.5) * self.block_out_samples
            excess = ahead - max(self.target_samples, self.block_out_samples)
            if excess <= 0:
                return True
            time.sleep(min(0.002, max(0.0005, excess / self.sink.rate)))
        return False

    def _step_block(self) -> np.ndarray:
        """LM steps until a block of codes is complete (resetting the context first if the decoder asked)."""
        gen = self.gen
        if self._reset_lm.is_set():
            self._reset_lm.clear()
            gen.reset_context()
        t0 = time.perf_counter()
        codes = gen.next_codes()
        self.lm_ms.add((time.perf_counter() - t0) * 1000.0 / gen.block_frames)
        return codes

    def _lm_worker(self) -> None:
        while self._wait_for_room():
            item = (self._step_block().copy(), self.gen.block_version)
            self._produced += 1
            while self._running.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _decode_worker(self) -> None:
        while self._running.is_set():
            try:
                item = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            codes, version = item
            self._emit(codes, version)
            self._consumed += 1

    def _serial_worker(self) -> None:
        while self._wait_for_room():
            codes = self._step_block()
            self._emit(codes, self.gen.block_version)

    def _emit(self, codes: np.ndarray, version: int) -> None:
        """Decode one block, make it safe, hand it to the sink."""
        if int(self.sink.rate) != self.resampler.out_rate:
            log.info("output rate changed to %d Hz; resampling to it", self.sink.rate)
            self._configure()
        t0 = time.perf_counter()
        pcm = self.gen.decode(codes)
        t1 = time.perf_counter()
        self.decode_ms.add((t1 - t0) * 1000.0 / self.gen.block_frames)
        if not np.isfinite(pcm).all():
            # Never let NaN/Inf into the resampler or the speakers; start a fresh stream.
            self.nonfinite_blocks += 1
            log.warning("the model produced NaN/Inf; resetting the generator (%d so far)", self.nonfinite_blocks)
            self.gen.decoder.reset()
            self._reset_lm.set()  # the LM worker resets the context before its next step
            pcm = np.zeros_like(pcm)
        y = self.resampler(pcm.T)
        if self.limit_samples is not None:
            y = y[: max(0, self.limit_samples - self.written_samples)]
        if y.shape[0]:
            out = self.safety.process(np.ascontiguousarray(y.T))
            block = np.ascontiguousarray(out.T)
            self.post_ms.add((time.perf_counter() - t1) * 1000.0)
            self.last_written = WrittenBlock(self.written_samples, version)
            self._write(block)
            if self.on_output is not None:
                self.on_output(block)
            self.written_samples += block.shape[0]
            if self.first_sound_at is None and np.any(block):
                self.first_sound_at = time.monotonic()
        self.blocks += 1
        if self.limit_samples is not None and self.written_samples >= self.limit_samples:
            self._running.clear()
        if self.on_block is not None:
            self.on_block(self.blocks)

    def _write(self, block: np.ndarray) -> None:
        """Hand a block to the sink; hold back the very first ones until the latency target is reached.

        A device starts playing as soon as anything is queued; starting with a full buffer means the first
        slow steps (caches warming up) cannot cause an underrun.
        """
        if not self._primed:
            self._held.append(block)
            if self.limit_samples is None and sum(b.shape[0] for b in self._held) < self.target_samples:
                return
            block = np.concatenate(self._held)
            self._held.clear()
            self._primed = True
        now = time.perf_counter()
        if self._last_write_at is not None:
            self._gap_max = max(self._gap_max, now - self._last_write_at)
            queued = self.sink.queued()
            self._queue_min = queued if self._queue_min is None else min(self._queue_min, queued)
        self._last_write_at = now
        self.sink.write(block)

    def take_window(self) -> dict[str, float | None]:
        """``write_gap_ms_max`` (longest wait between two blocks written) and ``queue_ms_min`` (emptiest
        queue seen as a block arrived) since the last call; then starts a new window."""
        rate = float(self.sink.rate)
        out = {"write_gap_ms_max": 1000.0 * self._gap_max,
               "queue_ms_min": None if self._queue_min is None else 1000.0 * self._queue_min / rate}
        self._gap_max, self._queue_min = 0.0, None
        return out

    # ------------------------------------------------------------------ offline

    def render(self, samples: int, progress: Callable[[int], None] | None = None) -> int:
        """Run until ``samples`` (at the sink rate) have been written; return the count written."""
        self.limit_samples = int(samples)
        self.start()
        try:
            last = 0
            while self.written_samples < samples:
                if self.error is not None:
                    raise self.error
                if not self._running.is_set():
                    break
                time.sleep(0.005)
                if progress is not None and self.written_samples != last:
                    progress(min(self.written_samples, samples) - last)
                    last = min(self.written_samples, samples)
        finally:
            self.stop()
        if self.error is not None:
            raise self.error
        return self.written_samples

    # ------------------------------------------------------------------ status

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "blocks": self.blocks,
            "steps": self.gen.steps,
            "lm_ms_p50": self.lm_ms.pct(50),
            "lm_ms_p99": self.lm_ms.pct(99),
            "decode_ms_p50": self.decode_ms.pct(50),
            "decode_ms_p99": self.decode_ms.pct(99),
            "nonfinite_blocks": self.nonfinite_blocks,
            "resets": self.gen.resets,
            "reprimes": self.gen.lm.reprimes,
            "gain_reduction_db": self.safety.gain_reduction_db,
            "prompt": self.gen.condition.text,
        }
        s.update({f"sink_{k}": v for k, v in self.sink.stats().items()})
        return s
