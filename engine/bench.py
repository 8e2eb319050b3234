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
- ``speedup_vs_torch_eager``  the same architecture stepped in PyTorch eager, per frame
- ``speedup_vs_transformers`` transformers' own ``generate`` with a streamer, per second of audio

The PyTorch figures come from ``python -m export.reference`` in a subprocess, so
torch never loads into the engine (and never inflates ``rss_mb``).
"""

from __future__ import annotations

import json
import logging
import os
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


def frame_timings(pack: packfmt.Pack, steps: int, prompt: str) -> dict[str, float]:
    """The streaming engine flat out: time between consecutive output frames."""
    from engine.stream import Stream

    gen = Generator(pack, seed=0, params=GenParams(prompt=prompt))
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


def _reference_once(pack_path: Path, steps: int, threads: int, transformers: bool, policy: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "export.reference", "--pack", str(pack_path), "--steps", str(steps),
           "--threads", str(threads)]
    if not transformers:
        cmd.append("--skip-transformers")
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"reference_error": str(exc)}
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"reference_error": f"export.reference failed: {tail[0]} (needs the export extra: torch, transformers)"}
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"reference_error": "export.reference printed no JSON"}


def reference(pack_path: Path, steps: int, threads: int, transformers: bool) -> dict[str, Any]:
    """PyTorch's best case, from ``python -m export.reference`` in subprocesses (torch stays out of this one).

    OpenMP's wait policy decides how fast torch is on small models, and which one wins depends on the
    machine and its load (spinning threads help on an idle machine, hurt on a busy one); torch reads it at
    start-up. So the reference runs once with each, and every timing keeps the faster of the two.
    """
    runs = {p: _reference_once(pack_path, steps, threads, transformers, p) for p in ("ACTIVE", "PASSIVE")}
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
) -> dict[str, Any]:
    pack = packfmt.load(pack_path)
    prompts = list(pack.prompts[:4]) or ["rain on a tin roof", "a cello drone", "crackling fire", "birdsong"]
    out: dict[str, Any] = {"pack": str(pack.path), "pack_name": pack.name, "quantization": pack.lm["quantization"],
                           "cpu_count": os.cpu_count(), "latency_setting_ms": latency_ms}
    out.update(step_timings(pack, steps, prompts[0]))
    out.update(frame_timings(pack, steps, prompts[0]))
    out.update(control_latency(pack, latency_ms, changes, prompts))
    out["rss_mb"] = rss_mb()
    if compare:
        ref = reference(pack.path, min(steps, 200), threads, transformers)
        out["reference"] = ref
        eager = ref.get("torch_eager_frame_ms_p50")
        out["speedup_vs_torch_eager"] = eager / out["frame_ms_p50"] if eager else None
        tf = ref.get("transformers_s_per_audio_s")
        out["speedup_vs_transformers"] = tf / out["rtf"] if tf else None
    return out
