"""cicada's own codec back in PyTorch, read from a pack's graphs.

A pack made by ``cicada train pack`` holds its spectral codec twice over:
``encoder.onnx`` has the encoder's weights and the codebooks, ``decoder.onnx``
the decoder's weights and the codebooks again (as one ``table [K * N, D]``).
:func:`codec_from_pack` puts them back into an
:class:`export.spectral.SpectralCodec`, so that what needs the model rather
than its graphs works on a pack alone (no ``out/`` checkpoint): encoding the
corpus with held codes (``cicada train lm --codec PACK --hysteresis M``) and
exporting an encoder graph that holds them.

Where the weights are::

    encoder.onnx  codec.encoder.net.{inp,blocks.i.conv,blocks.i.out,out}.{weight,bias}
                  onnx::Mul_* / onnx::Add_*  [1, H, 1]  each block's norm weight / bias
                                                         (folded by the tracer, in block order)
    decoder.onnx  {inp,blocks.i.block.conv,blocks.i.block.out,out}.{weight,bias}
                  onnx::Mul_* / onnx::Add_*  [1, H, 1]  as above, for the decoder's blocks
                  table [K * N, D]                      the quantiser's codebooks

Large weights are stored as float16 (``name__f16``); they come back as float32
holding those float16 values, which is what the graphs compute with.
:func:`check_codec` compares the result with the pack's own graphs, and
:func:`codec_from_pack` refuses a pack where they disagree.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.spectral import SpectralCodec, SpectralCodecConfig


class UnpackError(Exception):
    """A pack whose codec cannot be read back into PyTorch (the message says why and what to do)."""


def _initializers(path: Path) -> dict[str, np.ndarray]:
    """``name -> float32 array`` of a graph's initializers, with the ``__f16`` suffix dropped."""
    import onnx
    from onnx import numpy_helper

    out = {}
    for init in onnx.load(str(path)).graph.initializer:
        name = init.name[: -len("__f16")] if init.name.endswith("__f16") else init.name
        out[name] = numpy_helper.to_array(init)
    return out


def _folded_norms(inits: dict[str, np.ndarray], hidden: int, blocks: int, where: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each block's (norm weight, norm bias) ``[H]``: the tracer's ``onnx::Mul_n`` / ``onnx::Add_n``
    constants of shape ``[1, H, 1]``, paired in the order they were traced (block order)."""
    def numbered(op: str) -> list[np.ndarray]:
        found = []
        for name, value in inits.items():
            m = re.fullmatch(rf"onnx::{op}_(\d+)", name)
            if m and value.shape == (1, hidden, 1):
                found.append((int(m.group(1)), value.reshape(hidden)))
        return [v for _, v in sorted(found, key=lambda nv: nv[0])]

    weights, biases = numbered("Mul"), numbered("Add")
    if len(weights) != blocks or len(biases) != blocks:
        raise UnpackError(f"{where}: expected {blocks} block norms, found {len(weights)} weights and "
                          f"{len(biases)} biases; the graph was not exported by this version of `cicada train pack`")
    return list(zip(weights, biases))


def codec_config(info: dict[str, Any], where: Path) -> SpectralCodecConfig:
    """The spectral codec config of a pack manifest's ``[training.codec]`` table."""
    saved = dict(info.get("training", {}).get("codec", {}))
    if saved.pop("kind", None) != "spectral":
        raise UnpackError(f"{where}: its manifest has no spectral codec config ([training.codec] with "
                          "kind = \"spectral\"); only packs made by `cicada train pack` with the spectral codec "
                          "can be read back (train a codec with `cicada train codec` instead)")
    try:
        return SpectralCodecConfig.from_dict(saved)
    except (TypeError, ValueError) as exc:
        raise UnpackError(f"{where}: [training.codec] is not a codec config this version knows ({exc})") from None


def encoder_margin(info: dict[str, Any]) -> float:
    """The code hysteresis a pack's ``encoder.onnx`` holds codes with (0: always the nearest code).

    ``[training] encoder_hysteresis`` where the manifest says it; otherwise the packed LM's margin
    (``[training.lm_training.config] hysteresis``), which is what ``cicada train pack`` gave the encoder.
    """
    training = info.get("training", {})
    if "encoder_hysteresis" in training:
        return float(training["encoder_hysteresis"])
    return float(training.get("lm_training", {}).get("config", {}).get("hysteresis", 0.0))


def codec_from_pack(pack: Any, check: bool = True) -> SpectralCodec:
    """The pack's codec as a :class:`SpectralCodec` (eval mode, float32 holding the graphs' float16 weights).

    ``pack`` is an :class:`engine.pack.Pack` with an ``encoder.onnx``. With ``check`` (the default) the
    codec's codes and audio are compared with the pack's graphs first (:func:`check_codec`).
    """
    where = pack.path
    if pack.encoder is None:
        raise UnpackError(f"{where}: the pack has no encoder.onnx, so its encoder cannot be read back; "
                          "pass a codec checkpoint (`cicada train codec`) instead")
    cfg = codec_config(pack.info, where)
    codec = SpectralCodec(cfg)
    enc = _initializers(pack.encoder.file)
    dec = _initializers(pack.decoder.file)
    state: dict[str, np.ndarray] = {}
    try:
        for prefix, graph, inits, net, blocks, block in (
                ("encoder.net.", pack.encoder.file, enc, "codec.encoder.net.", cfg.encoder_blocks, "blocks.{i}."),
                ("decoder.net.", pack.decoder.file, dec, "", cfg.decoder_blocks, "blocks.{i}.block.")):
            for layer in ("inp", "out"):
                for p in ("weight", "bias"):
                    state[f"{prefix}{layer}.{p}"] = inits[f"{net}{layer}.{p}"]
            for i, (w, b) in enumerate(_folded_norms(inits, cfg.hidden, blocks, graph)):
                state[f"{prefix}blocks.{i}.norm_weight"], state[f"{prefix}blocks.{i}.norm_bias"] = w, b
                for layer in ("conv", "out"):
                    for p in ("weight", "bias"):
                        state[f"{prefix}blocks.{i}.{layer}.{p}"] = inits[f"{net}{block.format(i=i)}{layer}.{p}"]
        embed = dec["table"].reshape(cfg.n_codebooks, cfg.codebook_size, cfg.dimension)
    except (KeyError, ValueError) as exc:
        raise UnpackError(f"{where}: its codec graphs lack a weight the codec needs ({exc}); the pack was "
                          "not exported by this version of `cicada train pack`") from None
    state.update({"quantizer.embed": embed, "quantizer.embed_avg": embed,
                  "quantizer.cluster_size": np.ones((cfg.n_codebooks, cfg.codebook_size), np.float32),
                  "quantizer.inited": np.array(True)})
    model = codec.state_dict()
    missing = sorted(set(model) - set(state))
    if missing:
        raise UnpackError(f"{where}: no weights for {missing}")
    try:
        codec.load_state_dict({k: torch.from_numpy(np.array(v, dtype=model[k].numpy().dtype))
                               .reshape(model[k].shape) for k, v in state.items()})
    except RuntimeError as exc:
        raise UnpackError(f"{where}: its weights do not fit the manifest's codec config ({exc})") from None
    codec.eval()
    if check:
        check_codec(codec, pack)
    return codec


LOCKED_MEL_TOLERANCE_DB = 0.05
"""How far (log-mel distance, dB) a phase-locked decoder read back from a pack may sound from its graph."""


def check_codec(codec: SpectralCodec, pack: Any, seconds: float = 2.0, seed: int = 0) -> dict[str, float]:
    """Compare ``codec`` with the pack's graphs on procedural clips of every prompt family.

    The codec encodes with the pack encoder's margin (:func:`encoder_margin`) for the comparison and is
    left at 0 (nearest codes). Returns ``{"codes_equal": fraction of codes the two encoders agree on, "audio_error": largest
    difference of the decoders' output for the same codes, relative to its peak, "mel_error_db": largest
    log-mel distance between them}`` and raises :class:`UnpackError` when the codes agree less than 99% of
    the time or the audio differs by more than 1e-3 of its peak (float rounding, computed in another order,
    stays far below both).

    A phase-locked decoder (``phase_lock``) is compared by its log-mel spectrogram instead, within
    :data:`LOCKED_MEL_TOLERANCE_DB`: which bin a region locks to flips on rounding-level ties, and the
    flipped phase stays in the stream, so two exact copies of its weights computed in another order differ
    by about 1e-2 of the peak (so do weights perturbed by one part in a million), while their spectrograms
    agree within 0.01 dB and weights off by 1 % move them by 0.7 dB.
    """
    from engine.codec import DecoderSession
    from export import data
    from export.evaluate import mel_distance, pack_encoder, stream_decode

    encode = pack_encoder(pack)
    decoder = DecoderSession(pack)
    agree = total = 0
    worst = mel = 0.0
    codec.quantizer.hysteresis = encoder_margin(pack.info)
    try:
        for _, clip in data.corpus(seed + 7000, 1, seconds, pack.audio.sample_rate):
            theirs = encode(clip)
            with torch.no_grad():
                ours = codec.encode(torch.from_numpy(clip)[None])[0].numpy()
                audio = codec.decode(torch.from_numpy(theirs)[None])[0].numpy()
            f = min(theirs.shape[-1], ours.shape[-1])
            agree += int((theirs[:, :f] == ours[:, :f]).sum())
            total += theirs[:, :f].size
            played = stream_decode(decoder, theirs[None], theirs.shape[-1])
            n = min(played.shape[-1], audio.shape[-1])
            worst = max(worst, float(np.abs(played[..., :n] - audio[..., :n]).max() / max(np.abs(played).max(), 1e-6)))
            mel = max(mel, mel_distance(played[..., :n], audio[..., :n], pack.audio.sample_rate))
    finally:
        codec.quantizer.hysteresis = 0.0
    result = {"codes_equal": agree / total, "audio_error": worst, "mel_error_db": mel}
    audio_ok = mel <= LOCKED_MEL_TOLERANCE_DB if codec.cfg.phase_lock else worst <= 1e-3
    if result["codes_equal"] < 0.99 or not audio_ok:
        raise UnpackError(f"{pack.path}: the codec read back from its graphs does not match them (codes equal "
                          f"{result['codes_equal']:.1%}, audio error {result['audio_error']:.2e} of the peak, "
                          f"{mel:.3f} dB log-mel); use the codec's checkpoint instead")
    return result
