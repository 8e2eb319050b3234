"""Named model shapes, and random-weight packs built from them.

    test            minuscule; what the test suite exports (a pack in about a second)
    tiny            cicada's own architecture: causal stereo codec (32 kHz, n_filters 32,
                    ratios [8,5,4,4], 4 x 2048), rotary LM dim 256 x 16 layers, 8 heads
                    (about 21 M parameters), small word-level text encoder
    musicgen-small  MusicGen-small with the 32 kHz EnCodec and T5-base, built as a random
                    transformers MusicgenForConditionalGeneration, saved with
                    save_pretrained and converted by export.huggingface (the real path)

Random packs let the engine, the tests and the benchmarks run before (or
without) trained weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from engine import pack as packfmt

SHAPES = ("test", "tiny", "musicgen-small")

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")


def known_prompts() -> list[str]:
    """The food-sound prompts cicada's own models are trained on."""
    return [line.strip() for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def own_configs(shape: str):
    """(CodecConfig, LMConfig, TextEncoderConfig without vocab, text_len) for our own shapes."""
    from export.codec import CodecConfig
    from export.lm import LMConfig

    if shape == "test":
        codec = CodecConfig(
            sample_rate=8000, channels=2, n_filters=4, ratios=[8, 5, 4], dimension=16,
            lstm_layers=1, causal=True, pad_mode="constant", conv_shortcut=False,
            n_codebooks=2, codebook_size=32,
        )
        lm = LMConfig(dim=32, layers=2, heads=2, ffn_dim=64, n_codebooks=2, card=32, positions="rotary")
        return codec, lm, dict(dim=32, layers=1, heads=2, ffn_dim=64), 8
    if shape == "tiny":
        codec = CodecConfig(
            sample_rate=32000, channels=2, n_filters=32, ratios=[8, 5, 4, 4], dimension=128,
            lstm_layers=2, causal=True, pad_mode="constant", conv_shortcut=False,
            n_codebooks=4, codebook_size=2048,
        )
        lm = LMConfig(dim=256, layers=16, heads=8, ffn_dim=1024, n_codebooks=4, card=2048, positions="rotary")
        return codec, lm, dict(dim=256, layers=2, heads=4, ffn_dim=1024), 32
    raise ValueError(f"unknown own shape {shape!r}")


def random_pack(
    shape: str,
    out: str | Path,
    *,
    seed: int = 0,
    quantize: str = "none",
    frames_per_step: int = 1,
    context: int | None = None,
    overwrite: bool = False,
) -> packfmt.Pack:
    """Build a random-weight pack of ``shape`` at ``out``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if shape == "musicgen-small":
        return _musicgen_small(out, seed=seed, quantize=quantize, frames_per_step=frames_per_step,
                               context=context, overwrite=overwrite)

    from export.codec import Codec
    from export.conditioner import TextEncoder, TextEncoderConfig, WordTokenizer
    from export.lm import LM
    from export.pack import pack_models

    torch.manual_seed(seed)
    ccfg, lcfg, tdims, text_len = own_configs(shape)
    prompts = known_prompts()
    tok = WordTokenizer.build(prompts, length=text_len)
    codec = Codec(ccfg).eval()
    lm = LM(lcfg).eval()
    text = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, max_len=text_len, **tdims)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        return pack_models(
            out,
            codec=codec,
            lm=lm,
            text_encoder=text,
            tokenizer_file=tok.save(Path(tmp) / "tokenizer.json"),
            name=f"{shape}-random",
            description=f"Random weights, cicada '{shape}' architecture (seed {seed}); for tests and benchmarks",
            prompts=prompts,
            frames_per_step=frames_per_step,
            context=context or (16 if shape == "test" else 500),
            text_len=text_len,
            quantize=quantize,
            source={"kind": "random", "shape": shape, "seed": seed},
            overwrite=overwrite,
        )


def musicgen_small_model(seed: int = 0):
    """A random-weight transformers MusicgenForConditionalGeneration of MusicGen-small's shape."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    torch.manual_seed(seed)
    t5 = T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
        relative_attention_num_buckets=32, feed_forward_proj="relu",
    )
    encodec = EncodecConfig(
        sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
        hidden_size=128, num_lstm_layers=2, codebook_size=2048, target_bandwidths=[2.2],
        use_causal_conv=False, pad_mode="reflect", norm_type="weight_norm", use_conv_shortcut=False,
        compress=2, residual_kernel_size=3, num_residual_layers=1, normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        ffn_dim=4096, num_codebooks=4, max_position_embeddings=2048, activation_function="gelu",
    )
    config = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=encodec.to_dict(), decoder=decoder.to_dict())
    return MusicgenForConditionalGeneration(config).eval()


def _musicgen_small(out, *, seed, quantize, frames_per_step, context, overwrite) -> packfmt.Pack:
    from export.conditioner import WordTokenizer
    from export.huggingface import convert

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "musicgen-small-random"
        musicgen_small_model(seed).save_pretrained(model_dir)
        # No T5 vocabulary can be downloaded here: a word-level tokenizer over
        # the known prompts stands in (ids fit T5's vocabulary).
        WordTokenizer.build(known_prompts(), length=64).save(model_dir / "tokenizer.json")
        return convert(model_dir, out, frames_per_step=frames_per_step, context=context,
                       quantize=quantize, overwrite=overwrite)
