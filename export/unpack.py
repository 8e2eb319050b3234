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

    return _graph_initializers(onnx.load(str(path)).graph)


def _graph_initializers(graph: Any) -> dict[str, np.ndarray]:
    """:func:`_initializers` of a loaded ``onnx.GraphProto``."""
    from onnx import numpy_helper

    out = {}
    for init in graph.initializer:
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


# --------------------------------------------------------------------------- the LM side


def _graph_weights(path: Path) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """A graph's matrix weights in node order, and its named initializers and constants.

    Returns ``([W [in, out] float32 for each MatMul / MatMulInteger whose second input is a weight],
    {name: array})``. An int8 weight (``quantize_dynamic``'s ``X_quantized`` with ``X_scale`` and
    ``X_zero_point``) comes back dequantized, ``(q - zero_point) * scale``: the values the graph computes
    with. A float16-stored weight comes back under its float32 name (:func:`_initializers`).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = _graph_initializers(graph)
    for node in graph.node:  # the exporter leaves some buffers as Constant nodes (ORT's optimiser folds them)
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    weights = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            weights.append(np.asarray(inits[node.input[1]], np.float32))
        elif node.op_type == "MatMulInteger" and node.input[1] in inits:
            weights.append(_dequantized(inits, node.input[1]))
    return weights, inits


def _dequantized(inits: dict[str, np.ndarray], name: str) -> np.ndarray:
    """``quantize_dynamic``'s int8 weight ``X_quantized`` as float32: ``(q - X_zero_point) * X_scale``."""
    base = name.removesuffix("_quantized")
    q = inits[name].astype(np.int32)
    zero = inits.get(f"{base}_zero_point", np.zeros((), np.int32)).astype(np.int32)
    return ((q - zero) * inits[f"{base}_scale"]).astype(np.float32)


def _take(weights: list[np.ndarray], shape: tuple[int, int], what: str, where: Path) -> torch.Tensor:
    """The next matrix weight ``[in, out]``, as a torch ``nn.Linear`` weight ``[out, in]``."""
    if not weights:
        raise UnpackError(f"{where}: the graph has fewer matrix weights than the manifest's model needs "
                          f"(none left for {what}); it was not exported by this version of `cicada train pack`")
    w = weights.pop(0)
    if w.shape != shape:
        raise UnpackError(f"{where}: {what} should be {list(shape)} in the graph, found {list(w.shape)}; the graph "
                          "does not match the manifest's [training.lm] / [training.text_encoder]")
    return torch.from_numpy(np.ascontiguousarray(w.T))


def lm_from_pack(pack: Any, check: bool = True) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The pack's LM, text encoder and tokenizer back in PyTorch (eval mode), and the LM's training record.

    ``pack`` is an :class:`engine.pack.Pack` made by ``cicada train pack``; its manifest's
    ``[training.lm]`` and ``[training.text_encoder]`` give the shapes. So ``cicada train lm --init PACK``
    fine-tunes a shipped LM without its ``out/`` checkpoint. The weights come back as the graphs compute
    with them: an int8 LM's matrices dequantized (a fine-tune starts within rounding of the pack), the
    conditioner's float16 ones as float32.

    Where the weights are (``L`` layers, in node order)::

        lm.onnx           Gather table [K * (card + 1), D]     the K code embeddings, stacked
                          MatMul(Integer) weights [in, out]:   text_in (if text_input), then per layer
                            [Wq * Dh^-0.5 ; Wk ; Wv]  self_attn out_proj  cross q * Dh^-0.5  cross out_proj
                            fc1  fc2, then the K heads stacked [D, K * card]
                          lm.layers.i.*_norm, lm.norm          by name
        conditioner.onnx  text_encoder.tok.weight, text_encoder.*.bias, *_norm  by name
                          Add constant [Tc, D]                 the positions text_encoder.pos[:Tc]
                          MatMul weights: per text layer q k v out fc1 fc2, then cross k, v per LM layer

    With ``check`` (the default) the result is compared with the pack's graphs first
    (:func:`check_lm`), and a pack they disagree on is refused.
    """
    from export.conditioner import TextEncoder, TextEncoderConfig, WordTokenizer
    from export.lm import LM, LMConfig

    where = pack.path
    training = pack.info.get("training", {})
    if "lm" not in training or "text_encoder" not in training:
        raise UnpackError(f"{where}: its manifest has no [training.lm] and [training.text_encoder] tables, so its "
                          "LM cannot be read back; only packs made by `cicada train pack` can (pass an LM "
                          "checkpoint from `cicada train lm` instead)")
    try:
        cfg = LMConfig(**training["lm"])
        tcfg = TextEncoderConfig(**training["text_encoder"])
    except (TypeError, ValueError) as exc:
        raise UnpackError(f"{where}: [training.lm] / [training.text_encoder] is not a model config this version "
                          f"knows ({exc})") from None
    if cfg.bias or not cfg.cross_attention:
        raise UnpackError(f"{where}: only LMs with cross-attention and no biases (cicada's recipe) can be read "
                          "back from a pack; pass the LM's checkpoint instead")
    lm, text = LM(cfg), TextEncoder(tcfg)
    d, dh, f, k, card = cfg.dim, cfg.head_dim, cfg.ffn_dim, cfg.n_codebooks, cfg.card
    unscale = dh**0.5
    state: dict[str, torch.Tensor] = {}

    weights, inits = _graph_weights(pack.lm.file)
    w = pack.lm.file
    table = [v for n, v in inits.items() if v.shape == (k * (card + 1), d)]
    if len(table) != 1:
        raise UnpackError(f"{w}: expected one embedding table [{k * (card + 1)}, {d}], found {len(table)}")
    for i, emb in enumerate(np.split(table[0], k)):
        state[f"emb.{i}.weight"] = torch.from_numpy(np.array(emb, np.float32))
    if cfg.text_input:
        state["text_in.weight"] = _take(weights, (d, d), "text_in", w)
    for i in range(cfg.layers):
        p = f"layers.{i}."
        q, kk, v = _take(weights, (d, 3 * d), f"layer {i}'s q, k, v", w).split(d)
        state.update({f"{p}self_attn.q_proj.weight": q * unscale, f"{p}self_attn.k_proj.weight": kk,
                      f"{p}self_attn.v_proj.weight": v})
        state[f"{p}self_attn.out_proj.weight"] = _take(weights, (d, d), f"layer {i}'s out_proj", w)
        state[f"{p}cross_attn.q_proj.weight"] = _take(weights, (d, d), f"layer {i}'s cross q", w) * unscale
        state[f"{p}cross_attn.out_proj.weight"] = _take(weights, (d, d), f"layer {i}'s cross out_proj", w)
        state[f"{p}fc1.weight"] = _take(weights, (d, f), f"layer {i}'s fc1", w)
        state[f"{p}fc2.weight"] = _take(weights, (f, d), f"layer {i}'s fc2", w)
    for i, head in enumerate(_take(weights, (d, k * card), "the heads", w).split(card)):
        state[f"heads.{i}.weight"] = head
    if weights:
        raise UnpackError(f"{w}: {len(weights)} matrix weights more than the manifest's LM has")

    cweights, cinits = _graph_weights(pack.conditioner.file)
    c = pack.conditioner.file
    tstate: dict[str, torch.Tensor] = {}
    for name, value in cinits.items():
        if name.startswith("text_encoder."):
            tstate[name.removeprefix("text_encoder.")] = torch.from_numpy(np.array(value, np.float32))
    tc = int(pack.conditioner["max_tokens"])
    pos = [v for n, v in cinits.items() if n.startswith("onnx::Add_") and v.shape == (tc, tcfg.dim)]
    if len(pos) != 1 or tc > tcfg.max_len:
        raise UnpackError(f"{c}: expected one position table [{tc}, {tcfg.dim}] (at most max_len "
                          f"{tcfg.max_len} rows), found {len(pos)}")
    positions = text.pos.detach().clone()
    positions[:tc] = torch.from_numpy(np.array(pos[0], np.float32))
    tstate["pos"] = positions
    for i in range(tcfg.layers):
        p = f"layers.{i}."
        for name, shape in (("attn.q_proj", (tcfg.dim, tcfg.dim)), ("attn.k_proj", (tcfg.dim, tcfg.dim)),
                            ("attn.v_proj", (tcfg.dim, tcfg.dim)), ("attn.out_proj", (tcfg.dim, tcfg.dim)),
                            ("fc1", (tcfg.dim, tcfg.ffn_dim)), ("fc2", (tcfg.ffn_dim, tcfg.dim))):
            tstate[f"{p}{name}.weight"] = _take(cweights, shape, f"text layer {i}'s {name}", c)
    for i in range(cfg.layers):
        for name in ("k_proj", "v_proj"):
            state[f"layers.{i}.cross_attn.{name}.weight"] = _take(cweights, (int(cfg.cross_dim), d),
                                                                   f"layer {i}'s cross {name}", c)
    if cweights:
        raise UnpackError(f"{c}: {len(cweights)} matrix weights more than the manifest's text encoder has")

    for name, value in inits.items():
        if name.startswith("lm."):
            state[name.removeprefix("lm.")] = torch.from_numpy(np.array(value, np.float32))
    for model, found, graph in ((lm, state, w), (text, tstate, c)):
        mine = model.state_dict()
        missing = sorted(set(mine) - set(found))
        extra = sorted(set(found) - set(mine))
        if missing or extra:
            raise UnpackError(f"{graph}: the graph's weights do not fit the manifest's model "
                              f"({'no ' + missing[0] if missing else 'unknown ' + extra[0]}); it was not exported by "
                              "this version of `cicada train pack`")
        try:
            model.load_state_dict({n: v.reshape(mine[n].shape) for n, v in found.items()})
        except RuntimeError as exc:
            raise UnpackError(f"{graph}: its weights do not fit the manifest's model ({exc})") from None
    lm.eval()
    text.eval()
    tok = WordTokenizer.load(pack.tokenizer)
    if check:
        check_lm(lm, text, tok, pack)
    record = dict(training.get("lm_training", {}))
    return lm, text, tok, record


LM_TOLERANCE = 1e-4
"""How far (RMS, relative to the logits' RMS) an LM read back from a pack may score from its graph (an int8
graph's float twin, :func:`_float_twin`). Float rounding stays near 1e-6; a weight in the wrong place scores
above 1e-1."""


def _float_twin(path: Path) -> bytes:
    """``path``'s graph with each int8 matrix product made a float one over the dequantized weight.

    ``quantize_dynamic`` turns ``y = MatMul(x, W)`` into ``DynamicQuantizeLinear(x)``, ``MatMulInteger`` with
    the int8 weight, ``Cast`` and ``Mul`` by the two scales; the twin computes ``MatMul(x, (q - zero) *
    scale)`` instead (the rest of the chain is left unused). Its output is what the weights read back give
    in float arithmetic, so a read-back can be checked to float rounding. The int8 graph itself is not a
    tight reference: its activations are quantized as it runs, and on CPUs without VNNI ONNX Runtime's
    u8 x s8 kernel saturates some pairs of products (0.6 % RMS per product here, 15 % of a tiny LM's logits).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = _graph_initializers(graph)  # int8 weights have no __f16 suffix: their names are kept
    made_by = {out: node for node in graph.node for out in node.output}
    used_by: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            used_by.setdefault(name, []).append(node)
    for node in list(graph.node):
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            continue
        quant = made_by.get(node.input[0])
        cast = (used_by.get(node.output[0]) or [None])[0]
        scale = (used_by.get(cast.output[0]) or [None])[0] if cast is not None else None
        if quant is None or quant.op_type != "DynamicQuantizeLinear" or scale is None or scale.op_type != "Mul":
            raise UnpackError(f"{path}: an int8 product ({node.name}) is not quantize_dynamic's chain; the graph "
                              "was not exported by this version of `cicada train pack`")
        weight = numpy_helper.from_array(_dequantized(inits, node.input[1]),
                                         node.input[1].removesuffix("_quantized") + "_float")
        graph.initializer.append(weight)
        at = list(graph.node).index(scale)
        graph.node.insert(at, helper.make_node("MatMul", [quant.input[0], weight.name], [scale.output[0]],
                                               name=f"{node.name}_float"))
        for gone in (node, cast, scale):
            graph.node.remove(gone)
    return model.SerializeToString()


def check_lm(lm: Any, text: Any, tok: Any, pack: Any, frames: int = 24, seed: int = 0) -> dict[str, float]:
    """Compare an LM and text encoder read back from ``pack`` with its graphs; returns the errors.

    The conditioner graph and the text encoder get each known prompt; the LM step graph (an int8 one as its
    float twin, :func:`_float_twin`) and the torch step (:class:`export.lm.LMStep`) get the same ``frames``
    random code columns under the first prompt. Returns ``{"cross_error": largest difference of cross_k /
    cross_v relative to their peak, "logit_error": RMS difference of the logits relative to their RMS,
    "top1_equal": fraction of equal argmaxes}`` and raises :class:`UnpackError` when the cross keys differ
    by more than 1e-3 or the logits by more than :data:`LM_TOLERANCE`.
    """
    import onnxruntime as ort

    from export.conditioner import ConditionerGraph
    from export.lm import LMStep, additive_mask, ring_step_through
    from export.onnx import ort_session

    tc = int(pack.conditioner["max_tokens"])
    cond = ConditionerGraph(text, lm, text_len=tc).eval()
    csess = ort_session(pack.conditioner.file)
    cross_err = 0.0
    first = None
    for prompt in pack.prompts:
        tokens, valid = tok(prompt)
        if tokens.shape[1] != tc:
            raise UnpackError(f"{pack.tokenizer}: pads prompts to {tokens.shape[1]} tokens, but the conditioner "
                              f"takes {tc} (conditioner.max_tokens)")
        theirs = csess.run(None, {"text_tokens": tokens.numpy(), "text_mask": valid.numpy()})
        with torch.no_grad():
            ours = [t.numpy() for t in cond(tokens, valid)]
        for a, b in zip(theirs, ours):
            cross_err = max(cross_err, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)))
        if first is None:
            first = (torch.from_numpy(theirs[0]), torch.from_numpy(theirs[1]), valid)
    batch = int(pack.lm["batch"])
    step = LMStep(lm, batch=batch, context=int(pack.lm["context"]), text_len=tc).eval()
    ck, cv, valid = first
    ck, cv = ck.expand(-1, batch, -1, -1, -1).contiguous(), cv.expand(-1, batch, -1, -1, -1).contiguous()
    cmask = additive_mask(valid.expand(batch, -1))
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, lm.cfg.card, (batch, lm.cfg.n_codebooks, frames)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    lsess = ort.InferenceSession(_float_twin(pack.lm.file), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in lsess.get_inputs()]

    def run(args: list[torch.Tensor]) -> list[np.ndarray]:
        return lsess.run(None, {n: a.numpy() for n, a in zip(step.spec.input_names, args) if n in names})

    theirs = ring_step_through(step, codes, ck, cv, cmask, run=run)
    ours = ring_step_through(step, codes, ck, cv, cmask)
    logit_err = float((theirs - ours).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt().clamp_min(1e-6))
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())
    result = {"cross_error": cross_err, "logit_error": logit_err, "top1_equal": top1}
    if cross_err > 1e-3 or logit_err > LM_TOLERANCE:
        raise UnpackError(f"{pack.path}: the LM read back from its graphs does not match them (cross keys "
                          f"{cross_err:.2e} of the peak apart, logits {logit_err:.3f} of their RMS); use the LM's "
                          "checkpoint instead")
    return result
