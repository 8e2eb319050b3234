"""`cicada bench`: step, frame and control-latency timings of a pack, with reference ratios.

Everything in one run, side by side, because the machines are shared and noisy:

- ``lm_step_ms_*``     one LM step (ONNX Runtime, 1 thread) including guidance and sampling
- ``decode_step_ms_*`` the streaming decoder, per frame (1 thread)
- ``frame_ms_*``       one full streamed frame through the engine's pipelined workers
                       (LM and decoder on two threads, output safety, into a sink that
                       never waits): the time between consecutive frames
- ``rtf``              median frame time / frame duration (< 1 is faster than real time)
- ``control_latency_ms_p95``  a prompt change to the first output sample that reflects it,
                       streaming in real time into a null sink at the latency setting
- ``rss_mb``           resident memory of this process after all of the above
- ``speedup_vs_torch_eager``  the same architecture stepped in PyTorch eager, per frame: the median
                       of several rounds, each timing cicada's frames and eager's frames back to back
                       (``speedup_vs_torch_eager_rounds``), so a machine whose load drifts during the
                       run moves both sides of each ratio together
- ``speedup_vs_transformers`` transformers' own ``generate`` with a streamer, per second of audio

The PyTorch figures come from ``python -m export.reference --paired`` in subprocesses, so
torch never loads into the engine (and never inflates ``rss_mb``); they sleep (SIGSTOP)
while cicada is timed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine import pack as packfmt
from engine.generator import Generator, GenParams
from engine.stream import rss_mb

log = logging.getLogger("cicada.bench")


def _pcts(values: list[float] | np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(np.percentile(v, 50)), float(np.percentile(v, 99))


class _CountingSink:
    """A sink that takes everything at once and timestamps each block (for frame timing)."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate, self.channels = rate, channels
        self.times: list[float] = []

    def start(self) -> None:
        pass

    def queued(self) -> int:
        return 0

    def write(self, block: np.ndarray) -> None:
        self.times.append(time.perf_counter())

    def stats(self) -> dict[str, Any]:
        return {}

    def stop(self, fade: bool = True) -> None:
        pass


def step_timings(pack: packfmt.Pack, steps: int, prompt: str) -> dict[str, float]:
    """LM and decoder alone, one after the other, one thread each."""
    gen = Generator(pack, seed=0, params=GenParams(prompt=prompt))
    for _ in range(10):
        gen.next_block()
    lm: list[float] = []
    dec: list[float] = []
    f = gen.block_frames
    for _ in range(max(1, steps // f)):
        t0 = time.perf_counter()
        codes = gen.next_codes()
        t1 = time.perf_counter()
        gen.decode(codes)
        t2 = time.perf_counter()
        lm.append((t1 - t0) * 1000.0 / f)
        dec.append((t2 - t1) * 1000.0 / f)
    lm50, lm99 = _pcts(lm)
    d50, d99 = _pcts(dec)
    return {"lm_step_ms_p50": lm50, "lm_step_ms_p99": lm99, "decode_step_ms_p50": d50, "decode_step_ms_p99": d99}


def frame_timings(pack: packfmt.Pack, steps: int, prompt: str, gen: Generator | None = None) -> dict[str, float]:
    """The streaming engine flat out: time between consecutive output frames (``gen``: one to go on with)."""
    from engine.stream import Stream

    gen = gen or Generator(pack, seed=0, params=GenParams(prompt=prompt))
    sink = _CountingSink(gen.sample_rate, gen.channels)
    stream = Stream(gen, sink)
    warm = 20
    stream.render((steps + warm) * gen.hop)
    t = np.asarray(sink.times[warm // gen.block_frames :])
    per_frame = np.diff(t) * 1000.0 / gen.block_frames
    f50, f99 = _pcts(per_frame)
    frame_dur_ms = 1000.0 * gen.hop / gen.sample_rate
    return {"frame_ms_p50": f50, "frame_ms_p99": f99, "rtf": f50 / frame_dur_ms, "frame_duration_ms": frame_dur_ms}


def control_latency(pack: packfmt.Pack, latency_ms: float, changes: int, prompts: list[str]) -> dict[str, float]:
    """Prompt change -> first output sample generated under it, consumed by a real-time null sink."""
    from engine.audio import NullSink
    from engine.stream import Stream

    gen = Generator(pack, seed=0, params=GenParams(prompt=prompts[0]))
    sink = NullSink(gen.sample_rate, gen.channels, realtime=True)
    sink.start()
    stream = Stream(gen, sink, latency_ms=latency_ms)
    marks: list[tuple[int, int]] = []  # (version, start sample) of the first block of each version
    lock = threading.Lock()

    def note(_: int) -> None:
        w = stream.last_written
        with lock:
            if not marks or w.version > marks[-1][0]:
                marks.append((w.version, w.start_sample))

    stream.on_block = note
    stream.start()
    lat: list[float] = []
    try:
        time.sleep(0.5)
        params = gen.params
        for i in range(changes):
            params = params.with_changes(prompt=prompts[(i + 1) % len(prompts)])
            gen.prepare(params)  # what a control surface does before the switch (conditioner, cached)
            t0 = time.perf_counter()
            stream.set_params(params)
            deadline = t0 + 2.0
            start = None
            while time.perf_counter() < deadline:
                with lock:
                    start = next((s for v, s in marks if v >= params.version), None)
                if start is not None and sink.consumed() > start:
                    lat.append((time.perf_counter() - t0) * 1000.0)
                    break
                time.sleep(0.0005)
            time.sleep(0.2 + 0.1 * (i % 3))
    finally:
        stream.stop()
        sink.stop(fade=False)
    if not lat:
        return {"control_latency_ms_p95": float("nan")}
    return {
        "control_latency_ms_p50": float(np.percentile(lat, 50)),
        "control_latency_ms_p95": float(np.percentile(lat, 95)),
        "underruns_during_latency_test": int(sink.stats().get("underruns", 0)),
    }


class PairedReference:
    """``python -m export.reference --paired`` in a subprocess, frozen (SIGSTOP) except while it answers.

    torch stays out of this process; while cicada's own timings run, the reference cannot
    take a core, not even with idle OpenMP threads spinning (``OMP_WAIT_POLICY=ACTIVE``).
    """

    def __init__(self, pack_path: Path, threads: int, transformers: bool, policy: str) -> None:
        import tempfile

        cmd = [sys.executable, "-m", "export.reference", "--pack", str(pack_path), "--threads", str(threads),
               "--paired"]
        if not transformers:
            cmd.append("--skip-transformers")
        self.policy = policy
        self.log = tempfile.TemporaryFile(mode="w+")  # its stderr (a pipe nobody reads could fill and block it)
        self.error: str | None = None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "OMP_WAIT_POLICY": policy},
                                     cwd=Path(__file__).resolve().parent.parent)

    def _read(self, timeout: float) -> dict[str, Any] | None:
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.error = f"export.reference ({self.policy}) gave no answer in {timeout:g} s"
                return None
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = (self.log.read().strip().splitlines() or ["no output"])[-1]
            self.error = f"export.reference failed: {tail} (needs the export extra: torch, transformers)"
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.error = "export.reference printed something that is not JSON"
            return None

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def ready(self, timeout: float = 600.0) -> bool:
        """Wait for its warm-up, then freeze it."""
        msg = self._read(timeout)
        if msg is not None and not msg.get("ready"):
            self.error = msg.get("unsupported") or f"export.reference: {msg}"
            return False
        self._signal(signal.SIGSTOP)
        return msg is not None

    def ask(self, request: str, timeout: float = 600.0) -> dict[str, Any] | None:
        """Thaw it, send one request, read the answer, freeze it again."""
        if self.error is not None:
            return None
        assert self.proc.stdin is not None
        self._signal(signal.SIGCONT)
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            self.error = f"export.reference stopped: {exc}"
            return None
        msg = self._read(timeout)
        if request != "finish":
            self._signal(signal.SIGSTOP)
        return msg

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _best_of(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One reference record: each timing the faster of the two OpenMP wait policies."""
    ok = [r for r in runs.values() if "reference_error" not in r]
    if not ok:
        return runs["PASSIVE"]
    best: dict[str, Any] = dict(ok[0])
    for r in ok[1:]:
        for k, v in r.items():
            if isinstance(v, float) and (k.endswith("_ms_p50") or k.endswith("_ms_p99") or k.endswith("_s_per_audio_s")):
                best[k] = min(best.get(k, v), v)
    best["omp_wait_policy"] = "best of ACTIVE and PASSIVE per figure"
    best["by_policy"] = {p: {k: v for k, v in r.items() if k.endswith(("_ms_p50", "_s_per_audio_s"))}
                         for p, r in runs.items()}
    return best


def run(
    pack_path: Path,
    *,
    steps: int = 300,
    latency_ms: float = 60.0,
    changes: int = 20,
    compare: bool = True,
    transformers: bool = True,
    threads: int = 2,
    rounds: int = 5,
) -> dict[str, Any]:
    """Everything in one JSON-able dict. With ``compare``, the speed-up against PyTorch eager is the median of
    ``rounds`` ratios, each from cicada's frames and eager's frames timed back to back (OpenMP's wait policy
    decides how fast torch is on small models, and which one wins depends on the machine and its load, so each
    round keeps the faster of a spinning and a passive reference)."""
    pack = packfmt.load(pack_path)
    prompts = list(pack.prompts[:4]) or ["rain on a tin roof", "a cello drone", "crackling fire", "birdsong"]
    out: dict[str, Any] = {"pack": str(pack.path), "pack_name": pack.name, "quantization": pack.lm["quantization"],
                           "cpu_count": os.cpu_count(), "latency_setting_ms": latency_ms}
    refs: dict[str, PairedReference] = {}
    failed: dict[str, str] = {}
    if compare:  # torch loads and warms up now, then sleeps (SIGSTOP) while cicada is timed
        started = {p: PairedReference(pack.path, threads, transformers, p) for p in ("ACTIVE", "PASSIVE")}
        for p, r in started.items():
            if r.ready():
                refs[p] = r
            else:
                failed[p] = r.error or "no answer"
                r.close()
    try:
        out.update(step_timings(pack, steps, prompts[0]))
        out.update(frame_timings(pack, steps, prompts[0]))
        out.update(control_latency(pack, latency_ms, changes, prompts))
        out["rss_mb"] = rss_mb()
        if compare:
            out.update(_paired_rounds(pack, refs, rounds, max(50, steps // rounds), prompts[0]))
            if failed and not refs:
                out["reference"] = {"reference_error": "; ".join(sorted(set(failed.values())))}
    finally:
        for r in refs.values():
            if r.proc.poll() is None:
                r.close()
    return out


def _paired_rounds(pack: packfmt.Pack, refs: dict[str, PairedReference], rounds: int, frames: int,
                   prompt: str) -> dict[str, Any]:
    ratios: list[float] = []
    eager_rounds: list[float] = []
    ours_rounds: list[float] = []
    gen = Generator(pack, seed=0, params=GenParams(prompt=prompt))  # opened once, stepped on round after round
    for _ in range(rounds):
        ours = frame_timings(pack, frames, prompt, gen)["frame_ms_p50"]
        eager = [a["torch_eager_frame_ms_p50"] for r in refs.values()
                 if (a := r.ask(f"frames {frames}")) is not None and "torch_eager_frame_ms_p50" in a]
        if not eager:
            break
        ours_rounds.append(ours)
        eager_rounds.append(min(eager))
        ratios.append(min(eager) / ours)
    finals = {p: (r.ask("finish") or {"reference_error": r.error or "no answer"}) for p, r in refs.items()}
    for p, r in refs.items():
        if r.error and "reference_error" not in finals[p]:
            finals[p]["reference_error"] = r.error
    out: dict[str, Any] = {"reference": _best_of(finals) if finals else {"reference_error": "no reference ran"}}
    out["speedup_vs_torch_eager"] = float(np.median(ratios)) if ratios else None
    out["speedup_vs_torch_eager_rounds"] = [round(x, 2) for x in ratios]
    out["paired_rounds"] = {"frames_per_round": frames, "cicada_frame_ms_p50": [round(x, 3) for x in ours_rounds],
                            "torch_eager_frame_ms_p50": [round(x, 3) for x in eager_rounds]}
    tf = out["reference"].get("transformers_s_per_audio_s")
    ours_rtf = float(np.median(ours_rounds)) / (1000.0 / pack.audio.frame_rate) if ours_rounds else None
    out["speedup_vs_transformers"] = tf / ours_rtf if tf and ours_rtf else None
    return out
