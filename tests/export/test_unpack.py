"""Reading a pack's codec and LM back into PyTorch (export/unpack.py)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import pack as packfmt
from export import train
from export.unpack import (
    LM_TOLERANCE,
    LOCKED_MEL_TOLERANCE_DB,
    UnpackError,
    check_codec,
    check_lm,
    codec_from_pack,
    encoder_margin,
    lm_from_pack,
)


def test_the_codec_comes_back_weight_for_weight(runs: Path, base_pack: Path) -> None:
    """A float32 pack gives back exactly the checkpoint's weights; the pack's graphs agree with it."""
    original, _ = train.load_codec(runs / "codec" / train.CHECKPOINT)
    codec = codec_from_pack(packfmt.load(base_pack))
    theirs = original.state_dict()
    for name, value in codec.state_dict().items():
        if name.startswith(("encoder.", "decoder.")) or name == "quantizer.embed":
            assert torch.equal(value, theirs[name]), name
    assert codec.quantizer.hysteresis == 0.0
    result = check_codec(codec, packfmt.load(base_pack))  # its encoder graph holds codes at 0.15
    assert result["codes_equal"] == 1.0 and result["audio_error"] < 1e-4


def test_float16_weights_come_back_as_their_float16_values(runs: Path, tmp_path: Path) -> None:
    out = train.export_pack(tmp_path / "pack", codec_checkpoint=runs / "codec" / train.CHECKPOINT,
                            lm_checkpoint=runs / "lm" / train.CHECKPOINT, quantize="none", float16=True)
    original, _ = train.load_codec(runs / "codec" / train.CHECKPOINT)
    codec = codec_from_pack(out)
    w = original.decoder.net.out.weight  # large enough to be stored as float16 (export.onnx.store_float16)
    got = codec.decoder.net.out.weight
    assert torch.equal(got, w.half().float()) and not torch.equal(got, w)
    assert torch.equal(codec.decoder.net.blocks[0].norm_weight, original.decoder.net.blocks[0].norm_weight)


def test_a_codec_that_differs_from_the_graphs_is_refused(base_pack: Path) -> None:
    pack = packfmt.load(base_pack)
    codec = codec_from_pack(pack)
    with torch.no_grad():
        codec.decoder.net.blocks[0].norm_bias.add_(0.5)  # e.g. two blocks' norms swapped on the way back
    with pytest.raises(UnpackError, match="does not match them"):
        check_codec(codec, pack)


def test_packs_it_cannot_read_back_are_refused_with_a_remedy(base_pack: Path, tiny_pack_dir: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(UnpackError, match="no encoder.onnx.*pass a codec checkpoint"):
        codec_from_pack(packfmt.load(tiny_pack_dir))
    copy = tmp_path / "pack"
    shutil.copytree(base_pack, copy)
    doc = tomllib.loads((copy / packfmt.MANIFEST).read_text(encoding="utf-8"))
    doc["training"]["codec"]["kind"] = "seanet"
    packfmt.write_manifest(copy, doc)
    with pytest.raises(UnpackError, match="no spectral codec config.*`cicada train codec`"):
        codec_from_pack(packfmt.load(copy))


def test_the_encoder_margin_is_what_the_manifest_says() -> None:
    assert encoder_margin({}) == 0.0
    assert encoder_margin({"training": {"lm_training": {"config": {"hysteresis": 0.15}}}}) == 0.15
    assert encoder_margin({"training": {"encoder_hysteresis": 0.0,
                                        "lm_training": {"config": {"hysteresis": 0.15}}}}) == 0.0


def test_the_shipped_pack_reads_back() -> None:
    """The default pack's codec in PyTorch agrees with its graphs (checked on every prompt family)."""
    from engine.app import DEFAULT_PACK

    pack = packfmt.load(DEFAULT_PACK)
    codec = codec_from_pack(pack, check=False)
    result = check_codec(codec, pack, seconds=1.0)  # raises when they differ
    assert result["codes_equal"] > 0.99
    # the shipped decoder locks its phases, so it is compared by its spectrogram (see check_codec)
    assert codec.cfg.phase_lock and result["mel_error_db"] < LOCKED_MEL_TOLERANCE_DB
    assert np.isfinite(codec.quantizer.embed.numpy()).all()


# --------------------------------------------------------------------------- the LM side


def test_the_lm_comes_back_weight_for_weight(runs: Path, base_pack: Path) -> None:
    """A float32 pack gives back exactly the checkpoint's LM and text encoder, unfolded from the step graph's
    stacked and scaled matrices; the tokenizer is the pack's."""
    lm0, text0, tok0, record0 = train.load_lm(runs / "lm" / train.CHECKPOINT)
    lm, text, tok, record = lm_from_pack(packfmt.load(base_pack))
    for ours, theirs in ((lm, lm0), (text, text0)):
        want = theirs.state_dict()
        for name, value in ours.state_dict().items():
            assert torch.allclose(value, want[name], rtol=1e-6, atol=1e-7), name
    assert tok.tokenizer.to_str() == tok0.tokenizer.to_str()
    assert record["step"] == record0["step"] and record["stage"] == "lm"
    result = check_lm(lm, text, tok, packfmt.load(base_pack))
    assert result["cross_error"] < 1e-5 and result["logit_error"] < 1e-4 and result["top1_equal"] == 1.0


def test_an_int8_lm_comes_back_dequantized(runs: Path, tmp_path: Path) -> None:
    """The int8 LM's matrices come back as the graph computes with them, within a quantization step of the
    trained ones; the graph (which also quantizes its activations) scores within LM_TOLERANCE of it."""
    out = train.export_pack(tmp_path / "pack", codec_checkpoint=runs / "codec" / train.CHECKPOINT,
                            lm_checkpoint=runs / "lm" / train.CHECKPOINT, quantize="int8", float16=True)
    lm0, text0, _, _ = train.load_lm(runs / "lm" / train.CHECKPOINT)
    lm, text, tok, _ = lm_from_pack(out, check=False)
    w0, w = lm0.layers[1].fc1.weight.detach(), lm.layers[1].fc1.weight.detach()
    step = float(w0.abs().max()) / 127
    assert not torch.equal(w, w0) and float((w - w0).abs().max()) <= step * 0.51
    assert torch.equal(lm.layers[0].ffn_norm.weight, lm0.layers[0].ffn_norm.weight)  # small: stored as is
    assert torch.equal(text.layers[0].fc1.weight, text0.layers[0].fc1.weight)  # under float16's 4096 values
    result = check_lm(lm, text, tok, out)
    assert result["logit_error"] < LM_TOLERANCE and result["top1_equal"] > 0.9


def test_an_lm_that_differs_from_the_graphs_is_refused(base_pack: Path) -> None:
    pack = packfmt.load(base_pack)
    lm, text, tok, _ = lm_from_pack(pack)
    att = lm.layers[1].self_attn
    with torch.no_grad():  # e.g. keys and values swapped on the way back
        k = att.k_proj.weight.clone()
        att.k_proj.weight.copy_(att.v_proj.weight)
        att.v_proj.weight.copy_(k)
    with pytest.raises(UnpackError, match="LM read back from its graphs does not match"):
        check_lm(lm, text, tok, pack)


def test_lms_it_cannot_read_back_are_refused_with_a_remedy(base_pack: Path, tiny_pack_dir: Path,
                                                           tmp_path: Path) -> None:
    with pytest.raises(UnpackError, match=r"no \[training.lm\].*pass an LM checkpoint"):
        lm_from_pack(packfmt.load(tiny_pack_dir))
    copy = tmp_path / "pack"
    shutil.copytree(base_pack, copy)
    doc = tomllib.loads((copy / packfmt.MANIFEST).read_text(encoding="utf-8"))
    doc["training"]["lm"]["ffn_dim"] *= 2  # the manifest says another shape than the graph has
    packfmt.write_manifest(copy, doc)
    with pytest.raises(UnpackError, match="fc1 should be .* found"):
        lm_from_pack(packfmt.load(copy))


def test_the_shipped_lm_reads_back() -> None:
    """The default pack's int8 LM in PyTorch agrees with its graphs: what `cicada train lm --init
    packs/default` starts from."""
    from engine.app import DEFAULT_PACK

    pack = packfmt.load(DEFAULT_PACK)
    lm, text, tok, record = lm_from_pack(pack, check=False)
    result = check_lm(lm, text, tok, pack)
    assert result["cross_error"] < 1e-4 and result["logit_error"] < LM_TOLERANCE and result["top1_equal"] > 0.9
    assert record["stage"] == "lm" and lm.cfg.layers == 8
