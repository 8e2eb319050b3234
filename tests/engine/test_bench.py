"""`cicada bench`: every key, and the eager ratio from rounds timed back to back against a real torch subprocess."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

pytest.importorskip("torch")

from engine.bench import PairedReference, run  # noqa: E402


def test_bench_reports_every_key_and_paired_rounds(tiny_pack_dir: Path) -> None:
    out = run(tiny_pack_dir, steps=60, changes=3, rounds=2, transformers=False)
    for key in ("lm_step_ms_p50", "lm_step_ms_p99", "decode_step_ms_p50", "decode_step_ms_p99", "frame_ms_p50",
                "frame_ms_p99", "rtf", "control_latency_ms_p95", "rss_mb", "speedup_vs_torch_eager"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert len(out["speedup_vs_torch_eager_rounds"]) == 2
    rounds = out["paired_rounds"]
    assert len(rounds["cicada_frame_ms_p50"]) == len(rounds["torch_eager_frame_ms_p50"]) == 2
    ratios = [e / c for e, c in zip(rounds["torch_eager_frame_ms_p50"], rounds["cicada_frame_ms_p50"])]
    assert out["speedup_vs_torch_eager"] == pytest.approx(statistics.median(ratios), rel=0.02)
    ref = out["reference"]
    assert ref["torch_eager_frame_ms_p50"] > 0 and set(ref["by_policy"]) == {"ACTIVE", "PASSIVE"}
    json.dumps(out)  # printable as it is


def test_paired_reference_answers_requests_and_refuses_nonsense(tiny_pack_dir: Path) -> None:
    ref = PairedReference(tiny_pack_dir, threads=1, transformers=False, policy="PASSIVE")
    try:
        assert ref.ready()
        a = ref.ask("frames 3")
        assert a is not None and a["torch_eager_frame_ms_p50"] > 0 and a["torch_eager_frames"] >= 3
        bad = ref.ask("dance")
        assert bad is not None and "unknown request" in bad["error"]
        final = ref.ask("finish")
        assert final is not None and final["steps"] >= 3 and "transformers_s_per_audio_s" not in final
    finally:
        ref.close()
    assert ref.proc.returncode == 0
