"""Convert a Hugging Face MusicGen checkpoint (saved with ``save_pretrained``) into a pack.

Offline only: the model folder must already hold ``config.json`` and the
weights; its T5 text encoder and EnCodec audio codec come from the same
folder. The tokenizer comes from the folder too (``tokenizer.json``, or
``spiece.model`` which is converted), or from ``--tokenizer``.

What maps to what::

    MusicgenForConditionalGeneration
      .text_encoder (T5) + .enc_to_dec_proj  -> conditioner.onnx   (T5Wrapper + ConditionerGraph)
      .decoder (MusicgenForCausalLM)         -> lm.onnx            (LM, sinusoidal positions, LMStep)
      .audio_encoder (EncodecModel)          -> decoder.onnx       (Codec, StreamingDecoder)
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from engine import pack as packfmt

log = logging.getLogger(__name__)


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why and what to do."""


def _load_model(model_dir: Path):
    if not model_dir.is_dir():
        raise ConversionError(f"--model {model_dir}: no such folder (give the folder written by save_pretrained)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"--model {model_dir}: config.json is missing; save the model with save_pretrained(DIR)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{cfg_path}: not valid JSON ({exc})") from None
    if cfg.get("model_type") != "musicgen":
        raise ConversionError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}; only 'musicgen' "
            "(MusicgenForConditionalGeneration) checkpoints convert"
        )
    from transformers import MusicgenForConditionalGeneration

    try:
        model = MusicgenForConditionalGeneration.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ConversionError(f"--model {model_dir}: transformers could not load it: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _tokenizer_json(model_dir: Path, explicit: Path | None, dest: Path) -> Path:
    """Find or build a ``tokenizers`` tokenizer.json for the T5 text encoder."""
    candidates = [explicit] if explicit is not None else [model_dir]
    for c in candidates:
        if c.is_file():
            return c
        if (c / "tokenizer.json").is_file():
            return c / "tokenizer.json"
        if (c / "spiece.model").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(c), local_files_only=True)
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is None:
                raise ConversionError(f"{c}: the tokenizer has no fast (tokenizers) form; install sentencepiece and protobuf")
            backend.save(str(dest))
            return dest
    where = explicit if explicit is not None else model_dir
    raise ConversionError(
        f"no tokenizer found in {where}: save the processor next to the model "
        "(AutoProcessor.save_pretrained(DIR)) or pass --tokenizer FILE|DIR"
    )


def recommended_sampling(model_dir: Path) -> dict[str, float | int]:
    """The checkpoint's own sampling settings (``generation_config.json``) as a pack's ``[sampling]``.

    ``guidance_scale`` -> guidance, ``temperature``, ``top_k``, and ``top_p`` where it filters (HF's 1.0 is off,
    cicada's 0); ``do_sample = false`` -> temperature 0 (greedy). A value outside cicada's range is left out
    (with a warning), and so is the whole table without the file: the engine's defaults are MusicGen's.
    """
    from engine.params import in_range

    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: not readable (%s); the pack gets the engine's default sampling", path, exc)
        return {}
    wanted: dict[str, float | int] = {}
    if isinstance(gen.get("guidance_scale"), (int, float)):
        wanted["guidance"] = float(gen["guidance_scale"])
    if gen.get("do_sample") is False:
        wanted["temperature"] = 0.0
    elif isinstance(gen.get("temperature"), (int, float)):
        wanted["temperature"] = float(gen["temperature"])
    if isinstance(gen.get("top_k"), int):
        wanted["top_k"] = int(gen["top_k"])
    if isinstance(gen.get("top_p"), (int, float)) and 0.0 < gen["top_p"] < 1.0:
        wanted["top_p"] = float(gen["top_p"])
    out, problems = in_range(wanted)
    for problem in problems:
        log.warning("%s: %s; left out", path, problem)
    return out  # type: ignore[return-value]  # sampling parameters are all numbers


def convert(
    model_dir: str | Path,
    out: str | Path,
    *,
    frames_per_step: int = 1,
    context: int | None = None,
    text_len: int = 64,
    quantize: str = "none",
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> packfmt.Pack:
    """Convert ``model_dir`` into a pack at ``out`` and return the loaded pack."""
    from export.codec import load_hf_encodec
    from export.conditioner import T5Wrapper
    from export.lm import load_hf_musicgen_decoder
    from export.pack import pack_models

    model_dir = Path(model_dir)
    model = _load_model(model_dir)
    try:
        codec = load_hf_encodec(model.audio_encoder)
        lm = load_hf_musicgen_decoder(model.decoder)
    except ValueError as exc:
        raise ConversionError(f"{model_dir}: {exc}") from None
    proj = getattr(model, "enc_to_dec_proj", None)
    uses_proj = (
        model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
        and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None
    )
    text = T5Wrapper(model.text_encoder, proj if uses_proj else None)

    max_pos = lm.cfg.max_positions
    ctx = context or min(1500, max_pos)
    if ctx > max_pos:
        raise ConversionError(f"--context {ctx} exceeds the model's {max_pos} positions")
    with tempfile.TemporaryDirectory() as tmp:
        return pack_models(
            out,
            codec=codec,
            lm=lm,
            text_encoder=text,
            tokenizer_file=_tokenizer_json(model_dir, Path(tokenizer) if tokenizer else None, Path(tmp) / "tokenizer.json"),
            name=f"musicgen-{model_dir.name}",
            description=f"Converted from the Hugging Face MusicGen checkpoint {model_dir.name}",
            prompts=[],
            frames_per_step=frames_per_step,
            context=ctx,
            text_len=text_len,
            quantize=quantize,
            source={
                "kind": "huggingface-musicgen",
                "model": str(model_dir.resolve()),
                "transformers_version": __import__("transformers").__version__,
            },
            sampling=recommended_sampling(model_dir),
            overwrite=overwrite,
        )
