"""Build a pack folder from PyTorch models: three step graphs + tokenizer + manifest.

The pack is assembled in a temporary sibling folder and renamed into place at
the end, so an interrupted export never leaves a half-written pack where the
engine would find it. The result is loaded back with :func:`engine.pack.load`
before it is handed over, so every pack this writes has passed the same checks
the engine applies.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import pack as packfmt
from export.onnx import GraphSpec, export_graph, quantize_int8, store_float16

log = logging.getLogger(__name__)


@dataclass
class PackSpec:
    """What goes into a pack besides the graphs themselves."""

    name: str
    description: str
    sample_rate: int
    channels: int
    hop_length: int
    n_codebooks: int
    cardinality: int
    delays: list[int]
    prompts: list[str]
    frames_per_step: int = 1
    context: int = 500
    text_len: int = 32
    quantize: str = "none"  # "none" | "int8"
    source: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, float | int] = field(default_factory=dict)  # the manifest's [sampling] (engine.pack.Pack)


@dataclass
class TextSide:
    """The LM side of a pack: the LM step graph (``export.lm.LMStep``), the conditioner
    (``export.conditioner.ConditionerGraph``), the tokenizer file, the ``[lm]`` keys that describe the model
    (:func:`lm_manifest`), the known prompts, the ring-cache length, the prompt length and the LM's
    quantization (``"none"`` or ``"int8"``)."""

    lm_step: nn.Module
    conditioner: nn.Module
    tokenizer_file: str | Path
    lm_meta: dict[str, Any]
    prompts: list[str]
    context: int
    text_len: int
    quantize: str = "none"


def _tensor_table(spec: GraphSpec) -> dict[str, list[dict]]:
    return {
        "inputs": [t.to_manifest() for t in spec.inputs],
        "outputs": [t.to_manifest() for t in spec.outputs],
    }


def _export(module: nn.Module, spec: GraphSpec, example: tuple, path: Path, what: str, float16: bool = False,
            float16_constants: bool = True) -> None:
    t0 = time.perf_counter()
    export_graph(module, example, spec, path)
    if float16:
        store_float16(path, path, constants=float16_constants)
    log.info("exported %s -> %s in %.1f s", what, path.name, time.perf_counter() - t0)


def build_pack(
    out: str | Path,
    spec: PackSpec,
    *,
    decoder_step: nn.Module,
    lm_step: nn.Module,
    conditioner: nn.Module,
    tokenizer_file: str | Path,
    lm_meta: dict[str, Any],
    encoder: nn.Module | None = None,
    overwrite: bool = False,
    float16: bool = False,
) -> packfmt.Pack:
    """Export the three step graphs and write a validated pack to ``out``.

    ``float16`` stores the decoder's, conditioner's and encoder's large weights as float16 (computed in
    float32: :func:`export.onnx.store_float16`), about halving their files.

    ``decoder_step``, ``lm_step`` and ``conditioner`` are the explicit-state
    wrappers (export.streaming.StreamingDecoder, export.lm.LMStep,
    export.conditioner.ConditionerGraph); each exposes ``spec`` and
    ``example_inputs()``. ``lm_meta`` holds the [lm] manifest keys that
    describe the model (positions, max_positions, layers, heads, head_dim,
    dim, rope_theta).
    """
    out = Path(out)
    tmp = _staging(out, overwrite)
    try:
        with torch.no_grad():
            decoder_table = _export_decoder(tmp, decoder_step, spec.frames_per_step, float16)
            text_side = _export_text_side(tmp, TextSide(lm_step, conditioner, tokenizer_file, lm_meta, spec.prompts,
                                                        spec.context, spec.text_len, spec.quantize), float16)
            encoder_table = _export_encoder(tmp, encoder, float16) if encoder is not None else None

        doc: dict[str, Any] = {
            "format": packfmt.FORMAT_VERSION,
            "name": spec.name,
            "description": spec.description,
            "audio": {
                "sample_rate": spec.sample_rate,
                "channels": spec.channels,
                "frame_rate": spec.sample_rate / spec.hop_length,
                "hop_length": spec.hop_length,
            },
            "codebooks": {
                "count": spec.n_codebooks,
                "cardinality": spec.cardinality,
                "special_token": spec.cardinality,
                "delays": list(spec.delays),
            },
            "decoder": decoder_table,
            **text_side,
        }
        if encoder_table is not None:
            doc["encoder"] = encoder_table
        if spec.sampling:
            doc["sampling"] = dict(spec.sampling)
        if spec.source:
            doc["source"] = spec.source
        if spec.training:
            doc["training"] = spec.training
        return _publish(tmp, out, doc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def derive_pack(
    base: str | Path,
    out: str | Path,
    *,
    text_side: TextSide | None = None,
    decoder_step: nn.Module | None = None,
    encoder: nn.Module | None = None,
    float16: bool = False,
    training: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> packfmt.Pack:
    """A pack made of ``base`` with some of its parts replaced; the others are copied byte for byte.

    - ``text_side``: a new LM, conditioner and tokenizer (``cicada train pack --codec PACK --lm CKPT``, for
      an LM trained on ``base``'s tokens);
    - ``decoder_step``: a new decoder graph for ``base``'s codes (a ``StreamingDecoder`` of ``base``'s codec
      with a fine-tuned decoder: ``--decoder CKPT``), stepping ``base``'s ``frames_per_step``;
    - ``encoder``: an :class:`EncoderGraph` of ``base``'s codec, for an LM trained on codes ``base``'s
      encoder graph does not pick (``--hysteresis``).

    The manifest keeps ``base``'s audio and codebook tables and its sampling; ``training`` entries replace
    or add to its ``[training]``. ``out`` may be ``base`` itself (with ``overwrite``): the new pack is
    staged beside it and renamed into place.
    """
    if text_side is None and decoder_step is None and encoder is None:
        raise ValueError("derive_pack: nothing to replace (give a text side, a decoder or an encoder)")
    base_pack = packfmt.load(base)
    doc = tomllib.loads((base_pack.path / packfmt.MANIFEST).read_text(encoding="utf-8"))
    tmp = _staging(Path(out), overwrite)
    try:
        new = {"decoder": decoder_step is not None, "encoder": encoder is not None}
        for name in ("decoder", "encoder"):
            if name in doc and not new[name]:
                shutil.copyfile(base_pack.path / doc[name]["file"], tmp / doc[name]["file"])
        if text_side is None:
            for name in {doc["lm"]["file"], doc["conditioner"]["file"], doc["conditioner"]["tokenizer"]}:
                shutil.copyfile(base_pack.path / name, tmp / name)
        with torch.no_grad():
            if decoder_step is not None:
                doc["decoder"] = _export_decoder(tmp, decoder_step, base_pack.decoder["frames_per_step"], float16)
            if encoder is not None:
                doc["encoder"] = _export_encoder(tmp, encoder, float16)
            if text_side is not None:
                doc.update(_export_text_side(tmp, text_side, float16))
        doc["training"] = {**doc.get("training", {}), **(training or {})}
        if source:
            doc["source"] = {**doc.get("source", {}), **source}
        return _publish(tmp, Path(out), doc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _staging(out: Path, overwrite: bool) -> Path:
    """An empty private sibling folder of ``out`` to build the pack in (``out`` itself is refused if it has
    files and ``overwrite`` is off)."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~packfmt.current_umask())  # mkdtemp makes it private; a pack is an ordinary folder
    return tmp


def _export_decoder(tmp: Path, decoder_step: nn.Module, frames_per_step: int, float16: bool) -> dict[str, Any]:
    """Export a streaming decoder step as ``tmp/decoder.onnx``; returns the manifest's ``decoder`` table."""
    _export(decoder_step.eval(), decoder_step.spec, decoder_step.example_inputs(), tmp / "decoder.onnx",
            "decoder step", float16)
    lookahead = int(decoder_step.lookahead_samples)
    return {"file": "decoder.onnx", "frames_per_step": frames_per_step, "lookahead_samples": lookahead,
            "causal": lookahead == 0, **_tensor_table(decoder_step.spec)}


def _export_encoder(tmp: Path, encoder: nn.Module, float16: bool) -> dict[str, Any]:
    """Export an :class:`EncoderGraph` as ``tmp/encoder.onnx``; returns the manifest's ``encoder`` table."""
    # its analysis basis feeds a logarithm: kept float32 (store_float16)
    _export(encoder.eval(), encoder.spec, encoder.example_inputs(), tmp / "encoder.onnx", "encoder", float16,
            float16_constants=False)
    return {"file": "encoder.onnx", **_tensor_table(encoder.spec)}


def _export_text_side(tmp: Path, side: TextSide, float16: bool) -> dict[str, Any]:
    """Export the LM step (quantized as ``side.quantize`` says) and the conditioner into ``tmp``, copy the
    tokenizer; returns the manifest's ``lm``, ``conditioner`` and ``prompts`` tables."""
    _export(side.conditioner.eval(), side.conditioner.spec, side.conditioner.example_inputs(),
            tmp / "conditioner.onnx", "conditioner", float16)
    lm_file = tmp / "lm.onnx"
    _export(side.lm_step.eval(), side.lm_step.spec, side.lm_step.example_inputs(), lm_file, "LM step")
    if side.quantize == "int8":
        fp32 = tmp / "lm.fp32.onnx"
        lm_file.rename(fp32)
        quantize_int8(fp32, lm_file)
        fp32.unlink()
    elif side.quantize != "none":
        raise ValueError(f"--quantize {side.quantize!r}: choose none or int8")
    shutil.copyfile(side.tokenizer_file, tmp / "tokenizer.json")
    return {
        "lm": {
            "file": "lm.onnx",
            "context": side.context,
            "batch": 2,
            "quantization": side.quantize,
            **side.lm_meta,
            **_tensor_table(side.lm_step.spec),
        },
        "conditioner": {
            "file": "conditioner.onnx",
            "tokenizer": "tokenizer.json",
            "max_tokens": side.text_len,
            **_tensor_table(side.conditioner.spec),
        },
        "prompts": {"known": list(side.prompts)},
    }


def _publish(tmp: Path, out: Path, doc: dict[str, Any]) -> packfmt.Pack:
    """Write ``doc`` as ``tmp``'s manifest, check ``tmp`` as the engine would, then rename it to ``out``."""
    packfmt.write_manifest(tmp, doc)
    packfmt.load(tmp)  # refuse to hand over anything the engine would refuse
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return packfmt.load(out)


def lm_manifest(lm: nn.Module) -> dict[str, Any]:
    """The [lm] manifest keys that describe an export.lm.LM."""
    c = lm.cfg
    meta: dict[str, Any] = {
        "positions": c.positions,
        "max_positions": int(c.max_positions) if c.positions == "sinusoidal" else 0,
        "layers": c.layers,
        "heads": c.heads,
        "head_dim": c.dim // c.heads,
        "dim": c.dim,
    }
    if c.positions == "rotary":
        meta["rope_theta"] = float(c.rope_theta)
    return meta


def pack_models(
    out: str | Path,
    *,
    codec: nn.Module,
    lm: nn.Module,
    text_encoder: nn.Module,
    tokenizer_file: str | Path,
    name: str,
    description: str,
    prompts: list[str],
    frames_per_step: int = 1,
    context: int = 500,
    text_len: int = 32,
    quantize: str = "none",
    source: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    sampling: dict[str, float | int] | None = None,
    encoder: nn.Module | None = None,
    encoder_seconds: float = 10.0,
    overwrite: bool = False,
    float16: bool = False,
) -> packfmt.Pack:
    """Pack a codec (export.codec.Codec or export.spectral.SpectralCodec), an LM (export.lm.LM) and a text encoder.

    Wraps them in their step graphs (the codec's ``streaming_decoder()``, LMStep with batch 2 for
    guidance, ConditionerGraph) and takes the audio and codebook figures from
    their configs; delays follow MusicGen's pattern (codebook k waits k frames).
    """
    from export.conditioner import ConditionerGraph
    from export.lm import LMStep

    ccfg, lcfg = codec.cfg, lm.cfg
    spec = PackSpec(
        name=name,
        description=description,
        sample_rate=ccfg.sample_rate,
        channels=ccfg.channels,
        hop_length=ccfg.hop_length,
        n_codebooks=lcfg.n_codebooks,
        cardinality=lcfg.card,
        delays=list(range(lcfg.n_codebooks)),
        prompts=prompts,
        frames_per_step=frames_per_step,
        context=context,
        text_len=text_len,
        quantize=quantize,
        source=source or {},
        training=training or {},
        sampling=sampling or {},
    )
    with torch.no_grad():
        return build_pack(
            out,
            spec,
            decoder_step=codec.streaming_decoder(frames_per_step),
            lm_step=LMStep(lm, batch=2, context=context, text_len=text_len),
            conditioner=ConditionerGraph(text_encoder, lm, text_len=text_len),
            tokenizer_file=tokenizer_file,
            lm_meta=lm_manifest(lm),
            encoder=EncoderGraph(encoder, encoder_seconds) if encoder is not None else None,
            overwrite=overwrite,
            float16=float16,
        )


class EncoderGraph(nn.Module):
    """Whole-clip encoder for a pack: ``audio [1, C, T] -> codes [1, K, ceil(T / hop)]`` (int64).

    ``T`` is fixed (``seconds`` of audio); a shorter clip is zero-padded at the
    end, which leaves its codes unchanged when the encoder is causal. The
    engine never runs it while streaming; ``cicada eval`` uses it to measure
    the codec's reconstruction.
    """

    def __init__(self, codec: nn.Module, seconds: float = 10.0) -> None:
        super().__init__()
        from export.onnx import TensorSpec

        self.codec = codec
        c = codec.cfg
        self.samples = round(seconds * c.sample_rate / c.hop_length) * c.hop_length
        self.spec = GraphSpec(
            inputs=[TensorSpec("audio", (1, c.channels, self.samples))],
            outputs=[TensorSpec("codes", (1, c.n_codebooks, self.samples // c.hop_length), "int64")],
        )

    def example_inputs(self) -> list[torch.Tensor]:
        return [torch.randn(self.spec.inputs[0].shape) * 0.1]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        # The reshape to the (known) fixed shape lets the exported graph declare it; the codes'
        # own shape comes out of the quantizer's stacking with symbolic dimensions.
        return self.codec.encode(audio).reshape(self.spec.outputs[0].shape)
