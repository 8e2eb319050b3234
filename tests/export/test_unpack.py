"""Reading a pack's codec back into PyTorch (export/unpack.py)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import pack as packfmt
from export import train
from export.unpack import LOCKED_MEL_TOLERANCE_DB, UnpackError, check_codec, codec_from_pack, encoder_margin


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
