"""Reference timings for ``cicada bench``: the pack's model in PyTorch eager, and transformers' ``generate``.

    python -m export.reference --pack DIR [--steps 200] [--threads 2] [--seconds 4] [--skip-transformers]

Prints one JSON object on stdout (its last line; logs go to stderr). The engine
runs this in a subprocess so torch never loads into the engine's process.

PyTorch eager (``torch_eager_*``): the very modules the pack was exported from
(:class:`export.lm.LMStep` over the ring KV cache the engine keeps, and
:class:`export.streaming.StreamingDecoder`), random weights of the pack's
architecture, under ``torch.inference_mode()`` with ``torch.set_num_threads``.
One streamed frame is one LM step (batch 2: conditioned + null row), guidance
and sampling in torch (temperature, ``torch.topk`` 250, ``torch.multinomial``,
per codebook), the ring-cache write, the delay pattern, and the decoder step
for that frame. With ``frames_per_step`` F > 1 a block of F frames is timed as
a whole and divided by F (what ``cicada bench`` does for the engine).

- ``torch_eager_lm_ms_*``       LM step plus guidance, sampling, ring write (per frame)
- ``torch_eager_lm_forward_ms_p50`` / ``torch_eager_sample_ms_p50``  the two parts apart
- ``torch_eager_decode_ms_*``   decoder step, per frame
- ``torch_eager_frame_ms_*``    the whole frame (block / F)

transformers (``transformers_*``): ``MusicgenForConditionalGeneration.generate``
with a streamer that counts ``put`` calls, random weights, decoder and EnCodec
configured like the pack (MusicGen has sinusoidal positions only; a rotary
pack is timed with sinusoidal ones, and a stereo pack as one mono-layout
decoder over a stereo EnCodec: see ``transformers_note``), a small T5 text
encoder (it runs once). ``seconds`` of audio, EnCodec decode included:

- ``transformers_s_per_audio_s``  wall time / seconds of audio produced
- ``transformers_frame_ms``       wall time / frames produced

How the architecture was derived from the pack is in ``reference_architecture``;
``reference_matches_pack`` says whether the rebuilt step graphs declare exactly
the pack's input shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The engine runs ONNX Runtime with spinning off; the torch reference waits the same
# way (libgomp reads this once, when torch loads). Spinning OpenMP threads on a busy
# machine cost torch 10x on small models. Set OMP_WAIT_POLICY=ACTIVE to time torch spinning.
_TORCH_PRELOADED = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
OMP_WAIT_POLICY = (
    "unknown (torch was loaded before export.reference)" if _TORCH_PRELOADED else os.environ["OMP_WAIT_POLICY"]
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import pack as packfmt  # noqa: E402

log = logging.getLogger("cicada.reference")

WARMUP_STEPS = 20
GUIDANCE = 3.0
TEMPERATURE = 1.0
TOP_K = 250
T5_VOCAB = 32128


class UnsupportedPack(Exception):
    """The pack's architecture cannot be rebuilt in PyTorch."""


# --------------------------------------------------------------------------- architecture


@dataclass
class Architecture:
    """What to build: our codec and LM configs, how they were found, and a MusicGen config if there is one."""

    codec: Any  # export.codec.CodecConfig or export.spectral.SpectralCodecConfig
    lm: Any  # export.lm.LMConfig
    how: str
    musicgen: Any = None  # transformers.MusicgenConfig for MusicGen-derived packs


def _from_musicgen_config(cfg: Any, how: str) -> Architecture:
    from export.codec import codec_config_from_hf
    from export.lm import musicgen_lm_config

    return Architecture(codec_config_from_hf(cfg.audio_encoder), musicgen_lm_config(cfg.decoder), how, cfg)


def _musicgen_small_config() -> Any:
    """MusicGen-small's MusicgenConfig, from export.architectures (built on the meta device: no weights)."""
    from export.architectures import musicgen_small_model

    with torch.device("meta"):
        return musicgen_small_model().config


def _looks_like_musicgen_small(pack: packfmt.Pack) -> bool:
    lm, a, cb = pack.lm, pack.audio, pack.codebooks
    return (
        lm["positions"] == "sinusoidal"
        and lm["dim"] == 1024
        and lm["layers"] == 24
        and lm["heads"] == 16
        and cb.count == 4
        and cb.cardinality == 2048
        and a.sample_rate == 32000
        and a.channels == 1
        and a.hop_length == 640
    )


def _lm_from_manifest(pack: packfmt.Pack) -> Any:
    from export.lm import LMConfig

    lm = pack.lm
    kw: dict[str, Any] = dict(
        dim=lm["dim"],
        layers=lm["layers"],
        heads=lm["heads"],
        ffn_dim=4 * lm["dim"],
        n_codebooks=pack.codebooks.count,
        card=pack.codebooks.cardinality,
        positions=lm["positions"],
        cross_attention=lm.input("cross_k_0") is not None,
    )
    if lm["max_positions"] > 0:
        kw["max_positions"] = lm["max_positions"]
    if "rope_theta" in lm.params:
        kw["rope_theta"] = float(lm["rope_theta"])
    return LMConfig(**kw)


def _codec_from_manifest(pack: packfmt.Pack) -> tuple[Any, str]:
    """A CodecConfig from [audio], [codebooks] and the decoder's state tensor shapes."""
    from export.codec import CodecConfig

    a, d = pack.audio, pack.decoder
    shapes = {t.name.removesuffix("_in"): t.shape for t in d.inputs}
    causal = bool(d["causal"])
    kw: dict[str, Any] = dict(
        sample_rate=a.sample_rate,
        channels=a.channels,
        n_codebooks=pack.codebooks.count,
        codebook_size=pack.codebooks.cardinality,
        causal=causal,
        pad_mode="constant" if causal else "reflect",
    )
    found = []
    # up<i>_ola: [1, C_out, kernel - stride] with kernel = 2 * ratio, so the tail is the ratio.
    ups = sorted((int(m.group(1)), s) for n, s in shapes.items() if (m := re.fullmatch(r"up(\d+)_ola", n)))
    ratios = [s[2] for _, s in ups]
    if ratios and math.prod(ratios) == a.hop_length:
        kw["ratios"] = ratios
        kw["n_filters"] = ups[-1][1][1]  # the last upsampling stage outputs n_filters channels
        found.append(f"ratios {ratios} and n_filters {kw['n_filters']} from up*_ola")
    else:
        kw["ratios"] = _factor_hop(a.hop_length)
        found.append(f"ratios {kw['ratios']} factored from hop_length {a.hop_length}")
    if "conv0_cache" in shapes:
        kw["dimension"] = shapes["conv0_cache"][1]
        if causal:
            kw["kernel_size"] = shapes["conv0_cache"][2] + 1
        found.append(f"dimension {kw['dimension']} from conv0_cache")
    if "lstm_h" in shapes:
        kw["lstm_layers"] = shapes["lstm_h"][0]
    else:
        kw["lstm_layers"] = 0
    found.append(f"lstm_layers {kw['lstm_layers']}")
    if causal and "conv1_cache" in shapes:
        kw["last_kernel_size"] = shapes["conv1_cache"][2] + 1
    res = {int(m.group(1)) for n in shapes if (m := re.fullmatch(r"up0_res(\d+)_.*", n))}
    kw["n_residual_layers"] = len(res)
    found.append(f"{len(res)} residual layer(s)")
    return CodecConfig(**kw), "; ".join(found)


def _factor_hop(hop: int) -> list[int]:
    known = {640: [8, 5, 4, 4], 320: [8, 5, 4, 2], 16: [4, 4]}
    if hop in known:
        return known[hop]
    out, rest = [], hop
    while rest > 1:
        d = next((d for d in (8, 7, 6, 5, 4, 3, 2) if rest % d == 0), rest)
        out.append(d)
        rest //= d
    return sorted(out, reverse=True) or [1]


def _dataclass_kwargs(cls: type, d: Any) -> dict[str, Any] | None:
    if not isinstance(d, dict):
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    return kw or None


def _from_training(pack: packfmt.Pack) -> Architecture | None:
    """Codec / LM config dicts recorded in [training], if any (keys codec|codec_config, lm|lm_config)."""
    from export.codec import CodecConfig
    from export.lm import LMConfig
    from export.spectral import SpectralCodecConfig

    tr = pack.info.get("training") or {}
    if not isinstance(tr, dict):
        return None
    spectral = isinstance(tr.get("codec"), dict) and tr["codec"].get("kind") == "spectral"
    codec_cls = SpectralCodecConfig if spectral else CodecConfig
    codec_kw = next(
        (kw for k in ("codec", "codec_config", "codec_cfg") if (kw := _dataclass_kwargs(codec_cls, tr.get(k)))), None
    )
    lm_kw = next((kw for k in ("lm", "lm_config", "lm_cfg") if (kw := _dataclass_kwargs(LMConfig, tr.get(k)))), None)
    if codec_kw is None and lm_kw is None:
        return None
    parts = []
    try:
        if lm_kw is not None:
            lm = LMConfig(**lm_kw)
            parts.append("LM from the [training] LM config")
        else:
            lm = _lm_from_manifest(pack)
            parts.append("LM from [lm] (ffn_dim = 4 * dim)")
        if codec_kw is not None:
            codec = codec_cls(**codec_kw)
            parts.append("codec from the [training] codec config")
        else:
            codec, found = _codec_from_manifest(pack)
            parts.append(f"codec from [audio] and decoder state shapes ({found})")
    except (TypeError, ValueError) as exc:
        log.warning("the [training] configs do not build (%s); deriving from the manifest instead", exc)
        return None
    return Architecture(codec, lm, "; ".join(parts))


def derive_architecture(pack: packfmt.Pack) -> Architecture:
    """Codec and LM configs of ``pack``'s model, and a sentence saying where they came from."""
    from export.architectures import own_configs

    src = pack.info.get("source") or {}
    kind, shape = src.get("kind"), src.get("shape")
    if kind == "random" and shape in ("test", "tiny"):
        codec, lm, _, _ = own_configs(shape)
        return Architecture(
            codec, lm, f"export.architectures.own_configs({shape!r}) ([source] kind=random, shape={shape})"
        )
    if kind == "huggingface-musicgen" and src.get("model") and (Path(src["model"]) / "config.json").is_file():
        from transformers import MusicgenConfig

        cfg = MusicgenConfig.from_pretrained(src["model"], local_files_only=True)
        return _from_musicgen_config(
            cfg, f"MusicgenConfig from {src['model']}/config.json ([source] huggingface-musicgen)"
        )
    if (kind == "random" and shape == "musicgen-small") or (
        kind == "huggingface-musicgen" and _looks_like_musicgen_small(pack)
    ):
        return _from_musicgen_config(
            _musicgen_small_config(), f"export.architectures.musicgen_small_model() config ([source] kind={kind})"
        )
    trained = _from_training(pack)
    if trained is not None:
        return trained
    lm = _lm_from_manifest(pack)
    codec, found = _codec_from_manifest(pack)
    how = f"manifest: LM from [lm] and [codebooks] (ffn_dim = 4 * dim); codec from [audio] and decoder state shapes ({found})"
    if kind == "huggingface-musicgen":
        how += "; MusicGen conventions (GELU, no biases)"
    return Architecture(codec, lm, how)


def _spec_mismatches(graph: packfmt.GraphInfo, spec: Any) -> list[str]:
    ours = {t.name: tuple(t.shape) for t in spec.inputs}
    theirs = {t.name: tuple(t.shape) for t in graph.inputs}
    out = [
        f"{graph.section}: input {n} {list(s)} in the pack, missing here" for n, s in theirs.items() if n not in ours
    ]
    out += [
        f"{graph.section}: input {n} {list(s)} here, missing in the pack" for n, s in ours.items() if n not in theirs
    ]
    out += [
        f"{graph.section}: input {n} is {list(theirs[n])} in the pack, {list(s)} here"
        for n, s in ours.items()
        if n in theirs and theirs[n] != s
    ]
    return out


# --------------------------------------------------------------------------- torch eager


def _capped(items: list[str], n: int = 8) -> list[str]:
    return items if len(items) <= n else [*items[:n], f"... and {len(items) - n} more"]


def _pcts(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(np.percentile(v, 50)), float(np.percentile(v, 99))


def sample_torch(
    logits: torch.Tensor, guidance: float, temperature: float, top_k: int, gen: torch.Generator
) -> torch.Tensor:
    """``logits [2, K, V]`` (cond, null) -> tokens ``[K]``: guidance, temperature, top-k, multinomial per codebook."""
    cond, uncond = logits[0], logits[1]
    guided = uncond + (cond - uncond) * guidance
    vals, idx = torch.topk(guided / temperature, top_k, dim=-1)  # [K, top_k]
    probs = torch.softmax(vals, dim=-1)
    pick = torch.multinomial(probs, 1, generator=gen)  # [K, 1]
    return idx.gather(-1, pick).squeeze(-1)


class _TorchPattern:
    """The engine's streaming delay pattern (engine.pattern.DelayPattern), on torch tensors."""

    def __init__(self, delays: tuple[int, ...], special: int) -> None:
        self.delays = torch.tensor(delays, dtype=torch.int64)
        self.max_delay = max(delays)
        self.back = [self.max_delay - d for d in delays]  # columns back to codebook k of the completed frame
        self.special = special
        self.hist: deque[torch.Tensor] = deque(maxlen=max(delays) + 1)
        self.columns = 0
        self.input_column = torch.full((len(delays),), special, dtype=torch.int64)

    def push(self, column: torch.Tensor) -> torch.Tensor | None:
        """Take the sampled column ``[K]``; return the frame it completes ``[K]`` or None."""
        c = self.columns
        col = torch.where(c < self.delays, self.special, column)
        self.hist.append(col)
        self.input_column = col
        self.columns = c + 1
        if c < self.max_delay:
            return None
        return torch.stack([self.hist[-1 - b][k] for k, b in enumerate(self.back)])


class EagerStream:
    """The pack's model stepped frame by frame in PyTorch eager, fed like the engine feeds the ONNX graphs."""

    def __init__(self, pack: packfmt.Pack, arch: Architecture, seed: int = 0) -> None:
        from export.codec import Codec
        from export.lm import LM, NEG, LMStep, rope_cos_sin
        from export.spectral import SpectralCodec, SpectralCodecConfig

        self._rope = rope_cos_sin
        torch.manual_seed(seed)
        self.cfg = arch.lm
        self.frames = int(pack.decoder["frames_per_step"])
        self.step = LMStep(
            LM(arch.lm).eval(), batch=2, context=int(pack.lm["context"]), text_len=int(pack.conditioner["max_tokens"])
        ).eval()
        codec = SpectralCodec(arch.codec) if isinstance(arch.codec, SpectralCodecConfig) else Codec(arch.codec)
        self.decoder = codec.eval().streaming_decoder(self.frames)
        self.mismatches = _spec_mismatches(pack.lm, self.step.spec) + _spec_mismatches(pack.decoder, self.decoder.spec)
        self.gen = torch.Generator().manual_seed(seed)
        self.top_k = min(TOP_K, arch.lm.card)
        self.pattern = _TorchPattern(tuple(pack.codebooks.delays), arch.lm.special)
        self.names = self.step.spec.input_names
        self.feeds: dict[str, torch.Tensor] = {}
        for t in self.step.spec.inputs:
            if t.name.startswith(("cross_k_", "cross_v_")):
                x = torch.randn(t.shape, generator=self.gen) * 0.1
                x[1] = 0.0  # the null condition: zero keys/values, fully masked
                self.feeds[t.name] = x
            elif t.name == "cross_mask":
                m = torch.zeros(t.shape)
                m[1] = NEG
                self.feeds[t.name] = m
            elif t.name == "cache_mask":
                self.feeds[t.name] = torch.full(t.shape, NEG)
            elif t.name.startswith(("cache_k_", "cache_v_")):
                self.feeds[t.name] = torch.zeros(t.shape)
        self.caches_k = [self.feeds[f"cache_k_{i}"] for i in range(self.cfg.layers)]
        self.caches_v = [self.feeds[f"cache_v_{i}"] for i in range(self.cfg.layers)]
        self.slots = self.feeds["cache_mask"].shape[-1]
        self.position = 0
        self.dec_state = self.decoder.initial_state()
        self.pending: list[torch.Tensor] = []

    def lm_step(self) -> tuple[torch.Tensor | None, float, float]:
        """One LM step + sampling; returns (completed frame or None, forward ms, sampling ms)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        f = self.feeds
        f["tokens"] = self.pattern.input_column.unsqueeze(0).expand(2, -1).contiguous()
        if cfg.positions == "sinusoidal":
            f["position"] = torch.tensor([self.position], dtype=torch.int64)
        else:
            c, s = self._rope(self.position, cfg.head_dim, cfg.rope_theta)
            f["rope_cos"], f["rope_sin"] = torch.from_numpy(c), torch.from_numpy(s)
        logits, new_k, new_v = self.step(*(f[n] for n in self.names))
        t1 = time.perf_counter()
        slot = self.position % self.slots
        for i in range(cfg.layers):
            self.caches_k[i][:, :, slot] = new_k[i, :, :, 0]
            self.caches_v[i][:, :, slot] = new_v[i, :, :, 0]
        f["cache_mask"][0, slot] = 0.0
        self.position += 1
        frame = self.pattern.push(sample_torch(logits, GUIDANCE, TEMPERATURE, self.top_k, self.gen))
        t2 = time.perf_counter()
        return frame, (t1 - t0) * 1000.0, (t2 - t1) * 1000.0

    def decode(self, frames: list[torch.Tensor]) -> torch.Tensor:
        codes = torch.stack(frames, dim=-1).unsqueeze(0)  # [1, K, F]
        pcm, *self.dec_state = self.decoder(codes, *self.dec_state)
        return pcm

    def block(self) -> dict[str, float]:
        """LM steps until ``frames`` frames are complete, then one decoder step. Times in ms (totals)."""
        fwd = smp = 0.0
        lm_steps = 0
        t0 = time.perf_counter()
        while len(self.pending) < self.frames:
            frame, a, b = self.lm_step()
            fwd, smp, lm_steps = fwd + a, smp + b, lm_steps + 1
            if frame is not None:
                self.pending.append(frame)
        t1 = time.perf_counter()
        self.decode(self.pending)
        self.pending = []
        t2 = time.perf_counter()
        return {
            "lm": (t1 - t0) * 1000.0,
            "forward": fwd,
            "sample": smp,
            "decode": (t2 - t1) * 1000.0,
            "frame": (t2 - t0) * 1000.0,
            "lm_steps": lm_steps,
        }


def warm_eager(pack: packfmt.Pack, arch: Architecture, warmup: int = WARMUP_STEPS) -> EagerStream:
    """An EagerStream past its warm-up steps and the delay pattern's first frames."""
    with torch.inference_mode():
        s = EagerStream(pack, arch)
        if s.mismatches:
            log.warning(
                "the rebuilt graphs differ from the pack in %d input(s), e.g. %s",
                len(s.mismatches),
                "; ".join(s.mismatches[:3]),
            )
        done = 0
        while done < warmup or s.position <= max(pack.codebooks.delays):
            done += s.block()["lm_steps"]
    return s


def eager_blocks(s: EagerStream, frames: int) -> list[dict[str, float]]:
    """Time at least ``frames`` more frames of a warm EagerStream, block by block."""
    with torch.inference_mode():
        return [s.block() for _ in range(max(1, math.ceil(frames / s.frames)))]


def measure_torch_eager(
    pack: packfmt.Pack, arch: Architecture, steps: int, warmup: int = WARMUP_STEPS
) -> dict[str, Any]:
    """Per-frame PyTorch eager timings of the pack's architecture (random weights)."""
    s = warm_eager(pack, arch, warmup)
    return summarize_eager(pack, s, eager_blocks(s, steps))


def summarize_eager(pack: packfmt.Pack, s: EagerStream, blocks: list[dict[str, float]]) -> dict[str, Any]:
    """Percentiles per frame of timed blocks."""
    f = s.frames
    per = {k: [b[k] / f for b in blocks] for k in ("lm", "forward", "sample", "decode", "frame")}
    lm50, lm99 = _pcts(per["lm"])
    d50, d99 = _pcts(per["decode"])
    f50, f99 = _pcts(per["frame"])
    frame_dur = 1000.0 / pack.audio.frame_rate
    return {
        "torch_eager_lm_ms_p50": lm50,
        "torch_eager_lm_ms_p99": lm99,
        "torch_eager_lm_forward_ms_p50": _pcts(per["forward"])[0],
        "torch_eager_sample_ms_p50": _pcts(per["sample"])[0],
        "torch_eager_decode_ms_p50": d50,
        "torch_eager_decode_ms_p99": d99,
        "torch_eager_frame_ms_p50": f50,
        "torch_eager_frame_ms_p99": f99,
        "torch_eager_rtf": f50 / frame_dur,
        "torch_eager_frames": len(blocks) * f,
        "frame_duration_ms": frame_dur,
        "frames_per_step": f,
        "reference_matches_pack": not s.mismatches,
        **({"reference_mismatches": _capped(s.mismatches)} if s.mismatches else {}),
    }


# --------------------------------------------------------------------------- transformers


def _encodec_config(codec: Any) -> Any:
    from transformers import EncodecConfig

    hop = math.prod(codec.ratios)
    frame_rate = math.ceil(codec.sample_rate / hop)
    nbits = math.ceil(math.log2(codec.codebook_size))
    # transformers derives the codebook count: int(1000 * bandwidth // (frame_rate * nbits))
    bandwidth = (codec.n_codebooks * frame_rate * nbits + 0.5) / 1000.0
    cfg = EncodecConfig(
        sampling_rate=int(codec.sample_rate),
        audio_channels=int(codec.channels),
        num_filters=int(codec.n_filters),
        upsampling_ratios=[int(r) for r in codec.ratios],
        hidden_size=int(codec.dimension),
        num_lstm_layers=int(codec.lstm_layers),
        num_residual_layers=int(codec.n_residual_layers),
        kernel_size=int(codec.kernel_size),
        last_kernel_size=int(codec.last_kernel_size),
        residual_kernel_size=int(codec.residual_kernel_size),
        dilation_growth_rate=int(codec.dilation_base),
        compress=int(codec.compress),
        use_causal_conv=bool(codec.causal),
        pad_mode=str(codec.pad_mode),
        trim_right_ratio=float(codec.trim_right_ratio),
        use_conv_shortcut=bool(codec.conv_shortcut),
        codebook_size=int(codec.codebook_size),
        target_bandwidths=[bandwidth],
        norm_type="weight_norm",
        normalize=False,
    )
    if cfg.num_quantizers != codec.n_codebooks:
        raise ValueError(f"EncodecConfig gives {cfg.num_quantizers} codebooks, the codec has {codec.n_codebooks}")
    return cfg


def musicgen_config(arch: Architecture, max_positions: int) -> tuple[Any, list[str]]:
    """A MusicgenConfig for ``arch`` (a small T5 text encoder) and notes on what differs from the pack."""
    from transformers import MusicgenConfig, MusicgenDecoderConfig, T5Config

    from export.codec import CodecConfig

    notes = ["text encoder: T5 d_model 256, 2 layers (random; runs once per generate)"]
    t5 = T5Config(
        vocab_size=T5_VOCAB, d_model=256, d_kv=64, d_ff=1024, num_layers=2, num_heads=4, feed_forward_proj="relu"
    )
    lm = arch.lm
    if arch.musicgen is not None:
        enc = arch.musicgen.audio_encoder
        dec = arch.musicgen.decoder.to_dict()
        dec["max_position_embeddings"] = max(int(dec["max_position_embeddings"]), max_positions)
        dec = MusicgenDecoderConfig(**{k: v for k, v in dec.items() if k not in ("model_type", "transformers_version")})
    else:
        codec = arch.codec
        if not hasattr(codec, "ratios"):  # the spectral codec: transformers has no such model
            from export.train import CodecTrainConfig

            codec = CodecConfig(**{**CodecTrainConfig.seanet().codec, "sample_rate": codec.sample_rate,
                                   "channels": codec.channels, "ratios": _factor_hop(codec.hop_length),
                                   "dimension": codec.dimension, "n_codebooks": codec.n_codebooks,
                                   "codebook_size": codec.codebook_size})
            notes.append(f"the pack's spectral codec has no transformers counterpart: EnCodec with the same hop, "
                         f"channels and codebooks, shaped like the SEANet that `cicada train codec --kind seanet` "
                         f"trains (ratios {codec.ratios}, n_filters {codec.n_filters}, {codec.lstm_layers} LSTM "
                         "layer), whose decoder step costs about the same")
        enc = _encodec_config(codec)
        if lm.positions != "sinusoidal":
            notes.append(f"MusicGen has sinusoidal positions only; the pack's LM is {lm.positions}")
        if not lm.cross_attention:
            notes.append("MusicGen always cross-attends to the text; the pack's LM does not")
        if arch.codec.channels == 2:
            notes.append(
                "stereo: one MusicGen decoder over the pack's K codebooks (audio_channels=1) and a stereo EnCodec "
                "(audio_channels=2), the pack's own layout; MusicGen's stereo mode (2K interleaved codebooks, "
                "two mono decodes) is not used"
            )
        activation = {"gelu_tanh": "gelu_new"}.get(lm.activation, lm.activation)
        dec = MusicgenDecoderConfig(
            vocab_size=lm.card,
            hidden_size=lm.dim,
            num_hidden_layers=lm.layers,
            num_attention_heads=lm.heads,
            ffn_dim=lm.ffn_dim,
            num_codebooks=lm.n_codebooks,
            max_position_embeddings=max(2048, max_positions),
            activation_function=activation,
            audio_channels=1,
            pad_token_id=lm.card,
            bos_token_id=lm.card,
        )
    cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict())
    return cfg, notes


class _CountingStreamer:
    """A transformers streamer that only counts ``put`` calls (the first is the prompt column).

    transformers 5.23's ``MusicgenForConditionalGeneration.generate`` never passes the streamer on
    to its sampling loop, so there the count stays 1; ``transformers_lm_steps`` counts decoder calls.
    """

    def __init__(self) -> None:
        self.puts = 0
        self.ended = False

    def put(self, value: Any) -> None:
        self.puts += 1

    def end(self) -> None:
        self.ended = True


def _streamer() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class CountingStreamer(_CountingStreamer, BaseStreamer):
        pass

    return CountingStreamer()


def measure_transformers(pack: packfmt.Pack, arch: Architecture, seconds: float, seed: int = 0) -> dict[str, Any]:
    """transformers' MusicGen generate (with a streamer, EnCodec decode included) per second of audio."""
    import transformers
    from transformers import MusicgenForConditionalGeneration

    k = arch.lm.n_codebooks
    frames = max(1, round(seconds * pack.audio.frame_rate))
    new_tokens = frames + k - 1  # the delay pattern needs K - 1 more columns
    cfg, notes = musicgen_config(arch, new_tokens + 16)
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(cfg).eval()
    card = arch.lm.card
    gc = model.generation_config
    gc.decoder_start_token_id = gc.pad_token_id = gc.bos_token_id = card
    gc.eos_token_id = None
    text_len = int(pack.conditioner["max_tokens"])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, T5_VOCAB, (1, text_len), generator=g)
    mask = torch.ones_like(ids)
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        guidance_scale=GUIDANCE,
        top_k=min(TOP_K, card),
        temperature=TEMPERATURE,
    )
    calls = [0]
    # Some transformers versions hand MusicGen's streamer only the prompt column (the
    # composite generate passes streamer=None on to _sample): count decoder calls too.
    hook = model.decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with torch.inference_mode():
        model.generate(**kw, max_new_tokens=k + 3, streamer=_streamer())  # warm-up
        streamer = _streamer()
        calls[0] = 0
        t0 = time.perf_counter()
        audio = model.generate(**kw, max_new_tokens=new_tokens, streamer=streamer)
        wall = time.perf_counter() - t0
    hook.remove()
    samples = int(audio.shape[-1])
    if samples <= 0:
        raise RuntimeError(f"generate returned no audio ({tuple(audio.shape)})")
    audio_s = samples / pack.audio.sample_rate
    out_frames = samples / arch.codec.hop_length
    return {
        "transformers_s_per_audio_s": wall / audio_s,
        "transformers_frame_ms": wall * 1000.0 / out_frames,
        "transformers_audio_seconds": audio_s,
        "transformers_lm_steps": calls[0],
        "transformers_streamer_puts": streamer.puts,
        "transformers_wall_s": wall,
        "transformers_version": transformers.__version__,
        "transformers_note": "; ".join(notes),
    }


# --------------------------------------------------------------------------- entry points


def measure(
    pack_path: str | Path,
    steps: int = 200,
    threads: int = 2,
    seconds: float = 4.0,
    transformers: bool = True,
) -> dict[str, Any]:
    """Reference timings of the pack at ``pack_path``: PyTorch eager and (optionally) transformers."""
    torch.set_num_threads(threads)
    pack = packfmt.load(pack_path)
    out: dict[str, Any] = {
        "pack": str(pack.path),
        "pack_name": pack.name,
        "threads": threads,
        "steps": steps,
        "torch_version": torch.__version__,
        "omp_wait_policy": OMP_WAIT_POLICY,
    }
    try:
        arch = derive_architecture(pack)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the bench goes on without reference figures
        out["unsupported"] = f"cannot rebuild this pack's architecture in PyTorch: {type(exc).__name__}: {exc}"
        return out
    out["reference_architecture"] = arch.how
    log.info("architecture: %s", arch.how)
    t0 = time.perf_counter()
    out.update(measure_torch_eager(pack, arch, steps))
    log.info("torch eager: %.2f ms/frame (p50) in %.1f s", out["torch_eager_frame_ms_p50"], time.perf_counter() - t0)
    if transformers:
        _transformers_into(out, pack, arch, seconds)
    return out


def serve_paired(pack_path: str | Path, threads: int, seconds: float, transformers: bool) -> int:
    """Timings on request, so that a caller can interleave them with its own (``--paired``).

    One JSON line per answer on stdout. After warm-up: ``{"ready": true}``. Then, for each line
    on stdin: ``frames N`` times N more eager frames and answers ``{"torch_eager_frame_ms_p50": ...}``;
    ``finish`` answers what :func:`measure` would (every frame timed so far, then transformers if
    asked) and exits. The caller may stop this process (SIGSTOP) between requests, so that idle
    OpenMP threads cannot spin while it measures.
    """
    torch.set_num_threads(threads)
    pack = packfmt.load(pack_path)
    out: dict[str, Any] = {"pack": str(pack.path), "pack_name": pack.name, "threads": threads,
                           "torch_version": torch.__version__, "omp_wait_policy": OMP_WAIT_POLICY}
    try:
        arch = derive_architecture(pack)
    except Exception as exc:  # noqa: BLE001 - reported: the bench goes on without reference figures
        out["unsupported"] = f"cannot rebuild this pack's architecture in PyTorch: {type(exc).__name__}: {exc}"
        _answer(out)
        return 0
    out["reference_architecture"] = arch.how
    stream = warm_eager(pack, arch)
    _answer({"ready": True})
    timed: list[dict[str, float]] = []
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["frames"] and len(cmd) == 2 and cmd[1].isdigit():
            blocks = eager_blocks(stream, int(cmd[1]))
            timed += blocks
            _answer(summarize_eager(pack, stream, blocks))
        elif cmd == ["finish"]:
            break
        else:
            _answer({"error": f"unknown request {line.strip()!r}: send 'frames N' or 'finish'"})
    out["steps"] = len(timed) * stream.frames
    if timed:
        out.update(summarize_eager(pack, stream, timed))
    if transformers:
        _transformers_into(out, pack, arch, seconds)
    _answer(out)
    return 0


def _answer(obj: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def _transformers_into(out: dict[str, Any], pack: packfmt.Pack, arch: Architecture, seconds: float) -> None:
    try:
        out["transformers_version"] = __import__("transformers").__version__
        t0 = time.perf_counter()
        out.update(measure_transformers(pack, arch, seconds))
        log.info("transformers: %.3f s per audio second in %.1f s", out["transformers_s_per_audio_s"],
                 time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - an API mismatch must not cost the eager figures
        log.exception("transformers reference failed")
        out["transformers_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.reference", description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, required=True, help="pack folder")
    ap.add_argument("--steps", type=int, default=200, help=f"frames to time after {WARMUP_STEPS} warm-up steps")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of audio for transformers' generate")
    ap.add_argument("--skip-transformers", action="store_true", help="PyTorch eager only")
    ap.add_argument("--paired", action="store_true",
                    help="answer 'frames N' / 'finish' requests on stdin (for interleaved side-by-side timing)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or args.seconds <= 0:
        ap.error("--steps and --threads must be >= 1 and --seconds > 0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.set_verbosity_error()
    # stdout carries exactly one JSON line (per answer): anything a library prints goes to stderr.
    if args.paired:
        with contextlib.redirect_stdout(sys.stderr):
            return serve_paired(args.pack, args.threads, args.seconds, transformers=not args.skip_transformers)
    with contextlib.redirect_stdout(sys.stderr):
        result = measure(args.pack, args.steps, args.threads, args.seconds, transformers=not args.skip_transformers)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
