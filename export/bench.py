"""Step-time benchmark of exported packs (ONNX Runtime, CPU, fixed thread count).

    python -m export.bench                         # tiny + musicgen-small, fp32 + int8
    python -m export.bench --shapes tiny --steps 300
    python -m export.bench --write docs/performance.md

For each shape it builds a random-weight pack (``musicgen-small`` goes the
whole way through a full-size random ``MusicgenForConditionalGeneration``
saved with ``save_pretrained`` and ``cicada export huggingface``), derives an
int8 LM from the same fp32 graph, opens every graph with ONNX Runtime and
times single steps: the LM step (batch 2, guidance) and the decoder step.
Reported: median and p99 milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine import pack as packfmt
from export.onnx import ort_session


def feeds_for(graph: packfmt.GraphInfo, pack: packfmt.Pack, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plausible inputs: random tokens in range, filled caches, unmasked text."""
    feeds: dict[str, np.ndarray] = {}
    for t in graph.inputs:
        if t.dtype == "int64":
            hi = pack.codebooks.cardinality if t.name in ("codes", "tokens") else 8
            feeds[t.name] = rng.integers(0, hi, size=t.shape).astype(np.int64)
        elif t.name.endswith("_mask"):
            feeds[t.name] = np.zeros(t.shape, np.float32)  # every slot filled: the worst case
        else:
            feeds[t.name] = (rng.standard_normal(t.shape) * 0.1).astype(np.float32)
    if "text_mask" in feeds:
        feeds["text_mask"][:] = 1
    if "step_in" in feeds:
        feeds["step_in"][:] = 1000
    return feeds


def time_steps(sess, feeds: dict[str, np.ndarray], steps: int, warmup: int = 10) -> dict[str, float]:
    names = [o.name for o in sess.get_outputs()]
    for _ in range(warmup):
        sess.run(names, feeds)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))],
        "steps": steps,
    }


def bench_pack(pack_dir: Path, threads: int, steps: int, label: str) -> list[dict[str, Any]]:
    from export.onnx import quantize_int8

    pack = packfmt.load(pack_dir)
    rng = np.random.default_rng(0)
    rows = []
    lm_feeds = feeds_for(pack.lm, pack, rng)
    variants = [("fp32", pack.lm.file)]
    if pack.lm["quantization"] == "none":
        q = pack_dir / "lm.int8.onnx"
        if not q.exists():
            quantize_int8(pack.lm.file, q)
        variants.append(("int8", q))
    for kind, path in variants:
        r = time_steps(ort_session(path, threads), lm_feeds, steps)
        rows.append({"shape": label, "graph": f"LM step (batch 2, context {pack.lm['context']})", "precision": kind, **r})
    dec = ort_session(pack.decoder.file, threads)
    r = time_steps(dec, feeds_for(pack.decoder, pack, rng), steps)
    f = pack.decoder["frames_per_step"]
    rows.append({"shape": label, "graph": f"decoder step ({f} frame{'s' if f > 1 else ''})", "precision": "fp32", **r})
    return rows


def build(shape: str, out: Path, frames_per_step: int, reuse: bool) -> tuple[Path, bool]:
    from export.architectures import random_pack

    if reuse and (out / packfmt.MANIFEST).is_file():
        packfmt.load(out)
        return out, False
    random_pack(shape, out, seed=0, frames_per_step=frames_per_step, overwrite=True)
    return out, True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,musicgen-small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--frames-per-step", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="keep the built packs in this folder")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse packs already built there")
    ap.add_argument("--write", type=Path, default=None, help="write a markdown report here")
    args = ap.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="cicada-bench-"))
    rows: list[dict[str, Any]] = []
    builds: dict[str, float] = {}
    try:
        for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            t0 = time.perf_counter()
            pack_dir, built = build(shape, work / shape, args.frames_per_step, args.reuse)
            if built:
                builds[shape] = time.perf_counter() - t0
                print(f"built {shape} pack in {builds[shape]:.0f} s", flush=True)
            else:
                print(f"reusing the {shape} pack in {pack_dir}", flush=True)
            for row in bench_pack(pack_dir, args.threads, args.steps, shape):
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.write:
        write_report(args.write, rows, builds, args)
    return 0


def write_report(path: Path, rows: list[dict[str, Any]], builds: dict[str, float], args: argparse.Namespace) -> None:
    import onnxruntime as ort

    cmd = f"python -m export.bench --shapes {args.shapes} --threads {args.threads} --steps {args.steps}"
    lines = [
        "| shape | graph | precision | median ms | p99 ms |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['graph']} | {r['precision']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} |")
    section = "\n".join(
        [
            "<!-- bench:begin -->",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
            f"{args.threads} intra-op threads, spinning off, ONNX Runtime {ort.__version__}, "
            f"{args.steps} steps after 10 warm-up steps, random weights.",
            "",
            *lines,
            "",
            *(
                ["Pack build times (random weights, export, validation): "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in builds.items()), ""]
                if builds else []
            ),
            f"Reproduce: `{cmd}`",
            "<!-- bench:end -->",
        ]
    )
    text = path.read_text() if path.exists() else "# Performance\n\n<!-- bench:begin -->\n<!-- bench:end -->\n"
    head, _, rest = text.partition("<!-- bench:begin -->")
    _, _, tail = rest.partition("<!-- bench:end -->")
    packfmt.write_text_atomic(path, head + section + tail)


if __name__ == "__main__":
    raise SystemExit(main())
