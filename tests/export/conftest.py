"""Tiny training runs shared by the export tests (test_train, test_unpack)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import train


def tiny_codec_cfg(steps: int) -> train.CodecTrainConfig:
    cfg = train.CodecTrainConfig(steps=steps, batch=2, segment=0.1, warmup=2, dead_code_every=2)
    cfg.codec.update(hidden=16, dimension=16, encoder_blocks=1, decoder_blocks=1, codebook_size=32)
    return cfg


def tiny_seanet_cfg(steps: int) -> train.CodecTrainConfig:
    cfg = train.CodecTrainConfig.seanet(steps=steps, batch=2, segment=0.1, warmup=2, dead_code_every=2)
    cfg.codec = dict(sample_rate=32000, channels=2, n_filters=4, ratios=[8, 5, 4, 4], dimension=16,
                     lstm_layers=1, causal=True, pad_mode="constant", codebook_size=32)
    return cfg


def tiny_lm_cfg(steps: int) -> train.LMTrainConfig:
    cfg = train.LMTrainConfig(steps=steps, batch=4, frames=20, context=12, warmup=2, lr=3e-3,
                              corpus_clips=1, corpus_seconds=0.6, text_len=20, hysteresis=0.15,
                              context_noise=0.1, held_out_clips=1)
    cfg.lm.update(dim=32, layers=2, heads=2, ffn_dim=64, text_input=True)
    cfg.text.update(dim=32, layers=1, heads=2, ffn_dim=64)
    return cfg


@pytest.fixture(scope="package")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A codec and an LM trained for a few steps."""
    root = tmp_path_factory.mktemp("train")
    train.train_codec(root / "codec", tiny_codec_cfg(4), device="cpu", quiet=True)
    train.train_lm(root / "lm", tiny_lm_cfg(6), codec_checkpoint=root / "codec" / train.CHECKPOINT,
                   device="cpu", quiet=True)
    return root


@pytest.fixture(scope="package")
def base_pack(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny runs as a pack with an encoder (its codes held at the tiny LM's margin, 0.15)."""
    out = tmp_path_factory.mktemp("base") / "pack"
    train.export_pack(out, codec_checkpoint=runs / "codec" / train.CHECKPOINT,
                      lm_checkpoint=runs / "lm" / train.CHECKPOINT, quantize="none", float16=False)
    return out
