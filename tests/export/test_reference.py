"""export.reference: PyTorch eager and transformers reference timings of a pack."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import reference

ROOT = Path(__file__).resolve().parents[2]

EAGER_KEYS = (
    "torch_eager_lm_ms_p50",
    "torch_eager_decode_ms_p50",
    "torch_eager_frame_ms_p50",
    "torch_eager_frame_ms_p99",
)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.architectures import random_pack

    out = tmp_path_factory.mktemp("reference") / "p"
    random_pack("test", out, seed=0)
    return out


def positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_result(res: dict, transformers: bool = True) -> None:
    for key in EAGER_KEYS:
        assert positive(res.get(key)), (key, res.get(key))
    assert res["torch_eager_frame_ms_p99"] >= res["torch_eager_frame_ms_p50"]
    assert res["threads"] == 2 and res["steps"] == 5
    assert res["torch_version"] == torch.__version__
    assert "own_configs('test')" in res["reference_architecture"]
    assert res["reference_matches_pack"] is True, res.get("reference_mismatches")
    assert res["torch_eager_frames"] == 5
    if not transformers:
        assert not any(k.startswith("transformers_") for k in res)
        return
    # transformers: a figure, or an error string instead (never both missing)
    tf = res.get("transformers_s_per_audio_s")
    if tf is None:
        assert isinstance(res.get("transformers_error"), str) and res["transformers_error"]
    else:
        assert positive(tf) and positive(res["transformers_frame_ms"])
        assert isinstance(res["transformers_version"], str) and res["transformers_version"]
        # 0.2 s at 50 frames/s: 10 frames (plus the delay pattern)
        assert res["transformers_audio_seconds"] == pytest.approx(0.2)
        assert res["transformers_lm_steps"] >= 10


def test_measure(pack_dir: Path) -> None:
    res = reference.measure(pack_dir, steps=5, threads=2, seconds=0.2)
    check_result(res)
    # this transformers builds MusicGen for the 'test' shape: no error expected
    assert "transformers_error" not in res, res.get("transformers_error")


def test_cli_prints_one_json_line(pack_dir: Path) -> None:
    cmd = [sys.executable, "-m", "export.reference", "--pack", str(pack_dir), "--steps", "5", "--seconds", "0.2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-2000:]
    out = json.loads(lines[0])
    check_result(out)
    # a fresh process loads torch after export.reference chose the OpenMP wait policy
    assert out["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def test_skip_transformers(pack_dir: Path) -> None:
    res = reference.measure(pack_dir, steps=5, threads=2, seconds=0.2, transformers=False)
    check_result(res, transformers=False)


def test_transformers_error_does_not_cost_eager(pack_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> dict:
        raise TypeError("generate() got an unexpected keyword argument 'streamer'")

    monkeypatch.setattr(reference, "measure_transformers", broken)
    res = reference.measure(pack_dir, steps=5, threads=2, seconds=0.2)
    check_result(res)
    assert "streamer" in res["transformers_error"]


def test_torch_pattern_matches_engine() -> None:
    from engine.pattern import DelayPattern

    delays, special = (0, 1, 2, 3), 9
    ours, theirs = reference._TorchPattern(delays, special), DelayPattern(delays, special)
    rng = torch.Generator().manual_seed(0)
    for _ in range(12):
        col = torch.randint(0, 9, (4,), generator=rng)
        a, b = ours.push(col), theirs.push(col.numpy())
        assert (a is None) == (b is None)
        if a is not None:
            assert a.tolist() == b.tolist()
        assert ours.input_column.tolist() == theirs.input_column.tolist()


def test_manifest_derivation_rebuilds_the_pack(pack_dir: Path) -> None:
    """Without [source], the configs come from the manifest; the decoder must still match the pack."""
    from engine import pack as packfmt
    from export.architectures import own_configs

    pack = packfmt.load(pack_dir)
    stripped = packfmt.Pack(**{**pack.__dict__, "info": {}})
    arch = reference.derive_architecture(stripped)
    assert arch.how.startswith("manifest")
    codec, lm, _, _ = own_configs("test")
    assert arch.codec.ratios == codec.ratios and arch.codec.n_filters == codec.n_filters
    assert arch.codec.dimension == codec.dimension and arch.codec.lstm_layers == codec.lstm_layers
    assert (arch.lm.dim, arch.lm.layers, arch.lm.heads, arch.lm.n_codebooks, arch.lm.card) == (
        lm.dim,
        lm.layers,
        lm.heads,
        lm.n_codebooks,
        lm.card,
    )
    with torch.inference_mode():
        stream = reference.EagerStream(stripped, arch)
    assert stream.mismatches == []


def test_a_spectral_codec_is_compared_with_an_encodec_of_its_frame_rate() -> None:
    from export.lm import LMConfig
    from export.spectral import SpectralCodecConfig

    arch = reference.Architecture(SpectralCodecConfig(hidden=16, dimension=16, codebook_size=32),
                                  LMConfig(dim=32, layers=1, heads=2, ffn_dim=64, card=32), "test")
    cfg, notes = reference.musicgen_config(arch, 64)
    enc = cfg.audio_encoder
    assert math.prod(enc.upsampling_ratios) == arch.codec.hop_length == 640
    assert enc.audio_channels == 2 and enc.codebook_size == 32
    assert any("spectral codec" in n for n in notes)
