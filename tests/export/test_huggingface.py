"""`cicada export huggingface`: a saved random MusicGen converts to a pack that matches transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from engine import pack as packfmt  # noqa: E402
from engine.cli import main as cli_main  # noqa: E402
from engine.codec import DecoderSession  # noqa: E402
from export.conditioner import WordTokenizer, step_cross_inputs  # noqa: E402
from export.lm import LMStep, apply_delay, load_hf_musicgen_decoder, ring_step_through  # noqa: E402
from tests.export.test_lm_hf import CARD, K, tiny_musicgen  # noqa: E402

TOL = 1e-3
PROMPTS = ["deep rumbling hum", "rapid glitchy buzzing elements", "soft noise alarm"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random MusicGen (MusicGen's non-causal reflect-padded EnCodec) saved and converted by the CLI."""
    root = tmp_path_factory.mktemp("hf")
    # target_bandwidths: EnCodec derives its codebook count from it (4 at this frame rate, as MusicGen)
    model = tiny_musicgen(24, use_causal_conv=False, pad_mode="reflect", use_conv_shortcut=False,
                          target_bandwidths=[120.0])
    assert model.audio_encoder.config.num_quantizers == K
    # MusicGen's published sampling (the checkpoints' generation_config.json); the pack's [sampling] keeps it
    model.generation_config.update(do_sample=True, guidance_scale=3.0, top_k=250)
    model.save_pretrained(root / "model")
    tok = WordTokenizer.build(PROMPTS, length=8)
    tok.save(root / "model" / "tokenizer.json")
    rc = cli_main(["export", "huggingface", "--model", str(root / "model"), "--out", str(root / "pack"),
                   "--text-tokens", "8", "--frames-per-step", "3"])
    assert rc == 0
    return model, tok, packfmt.load(root / "pack")


def test_manifest_describes_model(converted) -> None:
    model, _, pack = converted
    assert pack.lm["positions"] == "sinusoidal"
    assert pack.lm["layers"] == model.decoder.config.num_hidden_layers
    assert pack.codebooks.count == K and pack.codebooks.cardinality == CARD
    assert pack.codebooks.delays == tuple(range(K))
    assert pack.audio.sample_rate == model.audio_encoder.config.sampling_rate
    assert pack.decoder["lookahead_samples"] > 0 and not pack.decoder["causal"]
    assert pack.info["source"]["kind"] == "huggingface-musicgen"
    assert pack.sampling["guidance"] == 3.0 and pack.sampling["top_k"] == 250


def test_recommended_sampling_maps_generation_config(tmp_path: Path) -> None:
    import json

    from export.huggingface import recommended_sampling

    assert recommended_sampling(tmp_path) == {}  # no generation_config.json: the engine's defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "guidance_scale": 3.5, "top_k": 50, "top_p": 1.0, "temperature": 0.7}))
    assert recommended_sampling(tmp_path) == {"guidance": 3.5, "temperature": 0.0, "top_k": 50}
    (tmp_path / "generation_config.json").write_text(json.dumps({"guidance_scale": 1e6, "top_p": 0.9}))
    assert recommended_sampling(tmp_path) == {"top_p": 0.9}  # out of cicada's range: left out
    (tmp_path / "generation_config.json").write_text("{not json")
    assert recommended_sampling(tmp_path) == {}


def test_streaming_decode_matches_encodec(converted) -> None:
    """decoder.onnx streamed 3 frames per call vs EncodecModel.decode, the start included."""
    model, _, pack = converted
    frames = 30
    codes = torch.randint(0, CARD, (1, K, frames), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.audio_encoder.decode(codes[None], [None]).audio_values[0].numpy()  # [C, T]
    dec = DecoderSession(pack)
    f = dec.frames_per_step
    look = dec.lookahead_samples
    extra = -(-look // pack.audio.hop_length) + f  # feed enough frames to flush the lookahead
    padded = np.concatenate([codes.numpy(), np.zeros((1, K, extra), np.int64)], axis=-1)
    n_calls = padded.shape[-1] // f
    pcm = np.concatenate([dec.step(padded[:, :, i * f:(i + 1) * f]).copy() for i in range(n_calls)], axis=-1)
    assert np.abs(pcm[:, :look]).max() == 0.0  # pre-roll is silent
    stream = pcm[:, look:look + ref.shape[-1]]
    valid = ref.shape[-1] - look  # only the final lookahead window may differ (the reference pads the end)
    assert valid > ref.shape[-1] // 2
    assert np.abs(stream[:, :valid] - ref[:, :valid]).max() <= TOL


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_lm_logits_match_transformers(converted, guidance: float) -> None:
    """conditioner.onnx + lm.onnx from the pack, stepped through the ring cache, vs the HF forward pass."""
    model, tok, pack = converted
    ids, mask = tok("deep rumbling hum")
    frames = 12
    codes = torch.randint(0, CARD, (1, K, frames), generator=torch.Generator().manual_seed(5))
    grid = torch.cat([torch.full((1, K, 1), CARD), apply_delay(codes, list(range(K)), CARD)], dim=-1)[..., :frames]
    with torch.no_grad():
        cond = model(input_ids=ids, attention_mask=mask, decoder_input_ids=grid.reshape(K, frames)).logits
        hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        null = model(encoder_outputs=(torch.zeros_like(hidden),), attention_mask=torch.zeros_like(mask),
                     decoder_input_ids=grid.reshape(K, frames)).logits
    cond, null = cond.view(K, frames, CARD), null.view(K, frames, CARD)
    want = null + (cond - null) * guidance if guidance != 1.0 else cond

    csess, lsess = pack.session(pack.conditioner), pack.session(pack.lm)
    ck, cv = csess.run(["cross_k", "cross_v"], {"text_tokens": ids.numpy(), "text_mask": mask.numpy()})

    lm = load_hf_musicgen_decoder(model.decoder)  # only drives the ring bookkeeping; ONNX computes
    step = LMStep(lm, batch=2, context=pack.lm["context"], text_len=pack.conditioner["max_tokens"])
    cross_k, cross_v, cross_mask = step_cross_inputs(torch.from_numpy(ck), torch.from_numpy(cv), mask, lm)
    names = [t.name for t in pack.lm.inputs]
    logits = ring_step_through(
        step, grid.repeat(2, 1, 1), cross_k, cross_v, cross_mask,
        run=lambda a: lsess.run(["logits", "new_k", "new_v"], {n: x.numpy() for n, x in zip(names, a)}),
    )
    got = logits[1] + (logits[0] - logits[1]) * guidance if guidance != 1.0 else logits[0]
    assert float((got - want).abs().max()) <= TOL


def test_int8_pack_loads_and_stays_close(converted, tmp_path: Path) -> None:
    model, _, pack = converted
    out = tmp_path / "int8"
    assert cli_main(["export", "huggingface", "--model", pack.info["source"]["model"], "--out", str(out),
                     "--text-tokens", "8", "--quantize", "int8"]) == 0
    q = packfmt.load(out)
    assert q.lm["quantization"] == "int8"
    assert q.lm.file.stat().st_size < pack.lm.file.stat().st_size


def test_refusals(tmp_path: Path, converted, capsys: pytest.CaptureFixture) -> None:
    _, _, pack = converted
    model_dir = Path(pack.info["source"]["model"])

    def run(*args: str) -> str:
        assert cli_main(["export", "huggingface", *args]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "no such folder" in run("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o1"))
    (tmp_path / "empty").mkdir()
    assert "config.json is missing" in run("--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "only 'musicgen'" in run("--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o3"))
    assert "exists and is not empty" in run("--model", str(model_dir), "--out", str(pack.path))
    assert "no tokenizer found" in run("--model", str(model_dir), "--out", str(tmp_path / "o4"),
                                       "--tokenizer", str(tmp_path / "empty"))
    assert not (tmp_path / "o4").exists()  # nothing half-written
