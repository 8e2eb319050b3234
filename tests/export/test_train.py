"""Training: tiny models through every stage, resume, the exported pack and its encoder."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.cli import _prompt_numbers, main
from export import train
from tests.export.conftest import tiny_codec_cfg, tiny_lm_cfg, tiny_seanet_cfg


def test_codec_checkpoint_resumes_where_it_stopped(tmp_path: Path) -> None:
    rec = train.train_codec(tmp_path, tiny_codec_cfg(2), device="cpu", quiet=True)
    assert rec["step"] == 2 and rec["device"].startswith("cpu")
    first = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)
    # Resuming keeps the checkpoint's config but takes the new step count: it continues from step 2.
    longer = tiny_codec_cfg(3)
    longer.batch = 5  # ignored: the checkpoint's batch size stays
    rec = train.train_codec(tmp_path, longer, device="cpu", quiet=True)
    assert rec["config"]["batch"] == 2
    assert rec["step"] == 3
    assert set(rec["losses"]) == {"magnitude", "phase", "spectral", "wave", "commit"}
    second = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)
    assert second["step"] == 3 and second["elapsed"] >= first["elapsed"]
    changed = [k for k, v in first["model"].items() if v.is_floating_point() and not torch.equal(v, second["model"][k])]
    assert changed  # the third step trained the weights further
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_finished_stage_run_again_leaves_its_checkpoint_as_it_was(tmp_path: Path) -> None:
    """Re-running ``train all`` (e.g. with more --minutes, as the cap's warning says) resumes every stage. A
    finished codec must stay byte for byte the file the LM and decoder were trained on: they name it by its
    digest, and a re-saved codec (a new command in its record) made the LM refuse to resume."""
    codec, lm, dec = tmp_path / "codec", tmp_path / "lm", tmp_path / "dec"
    rec = train.train_codec(codec, tiny_codec_cfg(2), device="cpu", quiet=True, command="first")
    train.train_lm(lm, tiny_lm_cfg(2), codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True)
    dcfg = train.DecoderTrainConfig(steps=2, batch=2, segment=0.1, warmup=1)
    train.train_decoder(dec, dcfg, codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True)
    files = {p: p.read_bytes() for p in (codec / train.CHECKPOINT, dec / train.CHECKPOINT)}

    again = train.train_codec(codec, tiny_codec_cfg(2), device="cpu", quiet=True, command="again")
    assert again == rec and again["command"] == "first"  # the record of the file as it is
    dec_again = train.train_decoder(dec, dcfg, codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True)
    assert dec_again["step"] == 2
    assert {p: p.read_bytes() for p in files} == files
    longer = train.train_lm(lm, tiny_lm_cfg(3), codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True)
    assert longer["step"] == 3  # resumed on the same codec, not refused as another one's tokens


def test_a_seanet_codec_trains_with_the_same_loop(tmp_path: Path) -> None:
    rec = train.train_codec(tmp_path, tiny_seanet_cfg(2), device="cpu", quiet=True)
    assert rec["step"] == 2 and set(rec["losses"]) == {"spectral", "wave", "commit"}
    codec, record = train.load_codec(tmp_path / train.CHECKPOINT)
    assert type(codec).__name__ == "Codec" and record["stage"] == "codec"


def test_same_seed_same_codec(tmp_path: Path) -> None:
    a = train.train_codec(tmp_path / "a", tiny_codec_cfg(2), device="cpu", quiet=True)
    b = train.train_codec(tmp_path / "b", tiny_codec_cfg(2), device="cpu", quiet=True)
    assert a["losses"] == b["losses"]
    sa = torch.load(tmp_path / "a" / train.CHECKPOINT, weights_only=False)["model"]
    sb = torch.load(tmp_path / "b" / train.CHECKPOINT, weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stereo_weight_makes_decorrelated_channels_cost() -> None:
    """Per-channel spectra cannot tell a centred sound from two uncorrelated ones; mid/side can."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 1, 8000, generator=g), torch.randn(1, 1, 8000, generator=g)
    centred, wide = torch.cat([a, a], 1) * 0.2, torch.cat([a, b], 1) * 0.2
    plain = float(train.spectral_loss(centred, wide))
    stereo = float(train.spectral_loss(centred, wide, stereo_weight=1.0))
    assert float(train.spectral_loss(centred, centred, stereo_weight=1.0)) < 1e-4
    assert stereo - plain > 1.0  # the side signal is ~80 dB (the floor) louder than the centred sound's
    assert float(train.spectral_loss(centred[:, :1], wide[:, :1], stereo_weight=1.0)) < 1e-4  # mono: no effect


def test_envelope_flux_hears_a_pulsing_tone() -> None:
    """Two overlapping frames out of phase partly cancel: a steady tone comes out pulsing. The envelope
    term sees that on the audio; noise against other noise costs little."""
    sr = 32000
    t = torch.arange(sr // 2) / sr
    tone = torch.sin(2 * torch.pi * 220.0 * t)
    pulsing = tone * (1.0 - 0.5 * (torch.sin(2 * torch.pi * 25.0 * t) > 0).float())  # -6 dB at 25 Hz
    steady = torch.stack([tone, tone])[None] * 0.3
    assert float(train.envelope_flux_loss(steady, steady)) < 1e-5
    bad = float(train.envelope_flux_loss(steady, torch.stack([pulsing, pulsing])[None] * 0.3))
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(1, 2, sr // 2, generator=g) * 0.1 for _ in range(2))
    assert float(train.envelope_flux_loss(a, b)) < 0.2 * bad


def test_the_decoder_runs_once_per_step_for_all_losses() -> None:
    """reconstruction_losses decodes the latent itself: the audio it returns is the decoder's, and the
    weights say which terms count (a zero weight leaves the total alone)."""
    from export.spectral import SpectralCodec, SpectralCodecConfig

    torch.manual_seed(0)
    codec = SpectralCodec(SpectralCodecConfig(sample_rate=8000, hop=32, hidden=16, dimension=8, encoder_blocks=1,
                                              decoder_blocks=1, n_codebooks=2, codebook_size=16))
    x = torch.randn(2, 2, 80 * 32) * 0.1  # longer than the spectral loss's 2048-sample window
    z = codec.encoder(x)
    calls = []
    codec.decoder.net.register_forward_hook(lambda *_: calls.append(1))
    y, losses = train.reconstruction_losses(codec, x, z, train.LossWeights())
    assert len(calls) == 1
    assert torch.equal(y, codec.decoder(z)[..., : x.shape[-1]])
    assert {"spectral", "wave", "magnitude", "phase"} <= set(losses) and "flux" not in losses  # weight 0
    w = train.LossWeights(band=0.5, flux=1.0, envelope=1.0)
    _, more = train.reconstruction_losses(codec, x, z, w)
    expected = (losses["total"] + 0.5 * more["band"] + more["flux"] + more["envelope"])
    assert torch.allclose(more["total"], expected, rtol=1e-5)
    assert "peak" not in losses
    _, peaked = train.reconstruction_losses(codec, x, z, train.LossWeights(peak=2.0))
    assert torch.allclose(peaked["total"], losses["total"] + 2.0 * peaked["peak"], rtol=1e-5)
    assert train.LossWeights.of(train.DecoderTrainConfig(peak_weight=2.0)).peak == 2.0


def test_train_decoder_cli_starts_from_init_with_the_peak_term(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """``cicada train decoder --init CKPT --peak-weight W`` passes the checkpoint on as ``init`` (a new run from
    its weights) and the weight into the config."""
    seen = {}

    def fake(out, cfg, **kw):
        seen.update(out=Path(out), cfg=cfg, **kw)
        return dict(step=1, elapsed_minutes=0.1, device="cpu", losses={"peak": 1.0})

    monkeypatch.setattr(train, "train_decoder", fake)
    start = tmp_path / "runs" / "decoder" / train.CHECKPOINT
    assert main(["train", "decoder", "--init", str(start), "--peak-weight", "0.5", "--focus", "5,2",
                 "--out", str(tmp_path / "pk")]) == 0
    assert seen["init"] == start and seen["out"] == tmp_path / "pk"
    assert seen["cfg"].peak_weight == 0.5 and tuple(seen["cfg"].focus) == (5, 2)
    assert main(["train", "decoder", "--out", str(tmp_path / "plain")]) == 0
    assert seen["init"] is None and seen["cfg"].peak_weight == 0.0


def test_saved_configs_from_before_a_field_keep_their_meaning() -> None:
    assert train.saved_config("decoder", {"steps": 5})["stereo_phase"] == "independent"
    assert train.saved_config("decoder", {"steps": 5})["flux_weight"] == 0.0
    assert train.saved_config("decoder", {"stereo_phase": "linked"})["stereo_phase"] == "linked"
    # a decoder run from before the phase start resumes from 0, as it was trained (the default is now pi in
    # odd bins), and without code noise
    assert train.saved_config("decoder", {"steps": 5})["phase_start"] == "zero"
    assert train.saved_config("decoder", {"steps": 5})["code_noise"] == 0.0
    # ... and from before the focus: every prompt drawn equally (the default now draws 2 and 16 more often)
    assert train.saved_config("decoder", {"steps": 5})["focus"] == ()
    # ... and from before phase locking: every bin keeps its own phase
    assert train.saved_config("decoder", {"steps": 5})["phase_lock"] == 0
    assert train.saved_config("decoder", {"steps": 5})["magnitude_gate"] is False
    assert train.saved_config("decoder", {"steps": 5})["learned_lock"] is False
    assert train.saved_config("decoder", {"steps": 5})["focus_weight"] == 1.0
    assert train.saved_config("decoder", {"steps": 5})["peak_weight"] == 0.0
    assert train.saved_config("decoder", {"flux_weight": 1.0})["flux_weight"] == 1.0  # a saved weight stays
    # ... and an LM run from before the contrast told no prompts apart
    assert train.saved_config("lm", {"steps": 5}) == {
        "steps": 5,
        "context_noise": 0.0,
        "self_feed": 0.0,
        "contrast": (),
        "contrast_weight": 1.0,
        "contrast_margin": 0.25,
    }
    assert train.saved_config("lm", {"context_noise": 0.2})["context_noise"] == 0.2


def test_spectral_loss_is_zero_for_equal_audio_and_grows_with_error() -> None:
    x = torch.randn(2, 2, 4000) * 0.1
    assert float(train.spectral_loss(x, x)) < 1e-4
    small = float(train.spectral_loss(x, x + 0.01 * torch.randn_like(x)))
    large = float(train.spectral_loss(x, x + 0.1 * torch.randn_like(x)))
    assert 0 < small < large


def test_reword_keeps_the_prompt_words() -> None:
    from export.conditioner import split_words

    rng = np.random.default_rng(0)
    prompt = "Continuous, deep, spatial and gloomy"
    words = set(split_words(prompt))
    variants = {train.reword(prompt, rng) for _ in range(50)}
    assert len(variants) > 5
    for v in variants:
        assert set(v.split()) <= words and len(v.split()) >= len(words) - 2


def test_lm_training_lowers_the_loss(runs: Path) -> None:
    state = torch.load(runs / "lm" / train.CHECKPOINT, weights_only=False)
    rec = state["record"]
    assert rec["step"] == 6 and rec["corpus"]["clips"] == 22
    lm, text, tok, _ = train.load_lm(runs / "lm" / train.CHECKPOINT)
    assert lm.cfg.card == 32 and tok.vocab_size > 22
    # The trained LM predicts the corpus better than the same LM before training.
    cfg = train.LMTrainConfig(**rec["config"])
    corpus = next((runs / "lm").glob("corpus-*.npz"))
    with np.load(corpus) as z:
        codes, labels = z["codes"], z["labels"]
    from export import data
    from export.conditioner import TextEncoder, TextEncoderConfig
    from export.lm import LM

    batch, texts, _ = train.lm_batch(codes, labels, data.prompts(), cfg, np.random.default_rng(123))
    torch.manual_seed(cfg.seed)
    fresh_lm, fresh_text = LM(lm.cfg).eval(), TextEncoder(TextEncoderConfig(**dataclasses.asdict(text.cfg))).eval()
    with torch.no_grad():
        before, _ = train.lm_loss(fresh_lm, fresh_text, tok, batch, texts, window=cfg.context)
        after, _ = train.lm_loss(lm, text, tok, batch, texts, window=cfg.context)
    assert float(after) < float(before) - 0.05


def test_lm_training_measures_held_out_clips(runs: Path) -> None:
    """The LM stage encodes clips it never trains on (another corpus seed, cached beside the corpus) and
    records their teacher-forced cross-entropy against the same measure on as many training clips."""
    rec = torch.load(runs / "lm" / train.CHECKPOINT, weights_only=False)["record"]
    held = rec["held_out"]
    assert held["step"] == 6 and held["clips"] == 22
    per_book = [held[f"ce{k}"] for k in range(4)]
    assert all(math.isfinite(v) and v > 0 for v in per_book)
    assert held["ce"] == pytest.approx(float(np.mean(per_book)))
    assert held["gap"] == pytest.approx(held["ce"] - held["train_ce"])
    with np.load(next((runs / "lm").glob("held-out-*.npz"))) as z:
        held_codes, held_labels = z["codes"], z["labels"]
    with np.load(next((runs / "lm").glob("corpus-*.npz"))) as z:
        codes, labels = z["codes"], z["labels"]
    assert held_codes.shape == codes.shape and (held_labels == labels).all()
    assert not (held_codes == codes).all()  # other draws of the same prompts
    # The record's number is the measure itself, over the held-out clips' middle frames.
    lm, text, tok, _ = train.load_lm(runs / "lm" / train.CHECKPOINT)
    cfg = train.LMTrainConfig(**rec["config"])
    from export import data

    lm.train()
    text.train()
    again = train.held_out_ce(lm, text, tok, held_codes, held_labels, data.prompts(), cfg.frames, cfg.context)
    assert again == pytest.approx(per_book, rel=1e-4)
    assert lm.training and text.training  # measured in eval mode, then put back as they were


def test_self_feed_puts_the_lms_own_samples_in_its_input(runs: Path) -> None:
    """Parallel scheduled sampling: a first pass samples each column from the LM given the true context; that
    fraction of the next pass's input codes are those samples (shifted one column); fill and BOS stay."""
    from export import data

    lm, text, tok, rec = train.load_lm(runs / "lm" / train.CHECKPOINT)
    cfg = train.LMTrainConfig(**rec["config"])
    corpus = next((runs / "lm").glob("corpus-*.npz"))
    with np.load(corpus) as z:
        batch, texts, _ = train.lm_batch(z["codes"], z["labels"], data.prompts(), cfg, np.random.default_rng(5))
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        """The LM, except that its first pass is sure of code 7 everywhere."""

        def __init__(self) -> None:
            super().__init__()
            self.inner, self.cfg = lm, lm.cfg

        def forward(self, inputs: torch.Tensor, cross: torch.Tensor, mask: torch.Tensor, window: int
                    ) -> torch.Tensor:
            seen.append(inputs.clone())
            out = self.inner(inputs, cross, mask, window=window)
            if len(seen) == 1:
                out = torch.full_like(out, -30.0)
                out[..., 7] = 30.0
            return out

    special = lm.cfg.special
    with torch.no_grad():
        train.lm_loss(Spy(), text, tok, batch, texts, window=cfg.context, rng=np.random.default_rng(1),
                      self_feed=1.0)
        first, second = seen
        fill = first == special
        assert bool((second[fill] == special).all()) and bool((second[~fill] == 7).all())
        seen.clear()
        train.lm_loss(Spy(), text, tok, batch, texts, window=cfg.context, rng=np.random.default_rng(1),
                      self_feed=0.3)
        first, second = seen
        changed = float((first != second)[first != special].float().mean())
        assert 0.2 < changed < 0.35, changed
        seen.clear()
        train.lm_loss(Spy(), text, tok, batch, texts, window=cfg.context, rng=np.random.default_rng(1))
        assert len(seen) == 1  # off: one pass


def test_contrast_texts_pair_each_crop_with_the_other_prompt_both_ways_round() -> None:
    from export import data

    prompts = data.prompts()
    texts = ["a clip of 5", "a clip of 14", "", "a clip of 3", "a clip of 19"]
    picked = np.array([4, 13, 4, 2, 18])
    assert train.contrast_texts(texts, picked, prompts, [(5, 14), (19, 4)]) == [
        prompts[13], prompts[4], None, None, prompts[3]]  # a crop trained without text has no other prompt
    assert train.contrast_texts(texts, picked, prompts, [(7, 8)]) is None  # no crop of a pair: no extra pass
    assert train.contrast_texts(texts, picked, prompts, ()) is None
    for bad in ([(5, 5)], [(5, 23)], [(0, 3)]):
        with pytest.raises(train.TrainError, match="numbered 1 to 22"):
            train.contrast_texts(texts, picked, prompts, bad)


def test_text_margin_loss_is_a_hinge_on_the_gap_between_the_two_prompts() -> None:
    target = torch.tensor([[[0, 1, -100]], [[1, 1, 0]]])  # [B=2, K=1, T=3]; -100 is not scored
    sure = torch.full((2, 1, 3, 2), -20.0)
    sure.scatter_(-1, target.clamp(min=0)[..., None], 20.0)  # certain of every target
    unsure = torch.zeros(2, 1, 3, 2)  # ln 2 a code
    nll = train.code_nll(unsure, target)
    assert torch.allclose(nll, torch.full((2,), np.log(2)))
    hinge, gap = train.text_margin_loss(sure, unsure, target, margin=0.25)
    assert float(hinge) == 0.0 and abs(gap - np.log(2)) < 1e-4  # past the margin: no cost
    hinge, gap = train.text_margin_loss(unsure, unsure, target, margin=0.25)
    assert abs(float(hinge) - 0.25) < 1e-6 and gap == 0.0
    own = unsure.clone().requires_grad_()
    other = unsure.clone().requires_grad_()
    train.text_margin_loss(own, other, target, margin=0.25)[0].backward()
    # The hinge lowers the cost under the sequence's own prompt and raises it under the other one.
    picked = own.grad.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    assert float(picked[target != -100].max()) < 0 and float(own.grad[0, 0, 2].abs().sum()) == 0
    assert float(other.grad.gather(-1, target.clamp(min=0)[..., None])[..., 0][target != -100].min()) > 0


def test_lm_loss_with_contrast_scores_the_paired_crops_under_the_other_prompt(runs: Path) -> None:
    from export import data

    lm, text, tok, rec = train.load_lm(runs / "lm" / train.CHECKPOINT)
    cfg = train.LMTrainConfig(**rec["config"])
    corpus = next((runs / "lm").glob("corpus-*.npz"))
    with np.load(corpus) as z:
        batch, texts, picked = train.lm_batch(z["codes"], z["labels"], data.prompts(), cfg,
                                              np.random.default_rng(5))
    texts = [t or "x" for t in texts]
    pairs = [(int(picked[0]) + 1, int(picked[0]) + 2 if picked[0] < 21 else 1)]
    contrast = train.contrast_texts(texts, picked, data.prompts(), pairs)
    rows = [i for i, c in enumerate(contrast or []) if c]
    assert rows and rows[0] == 0
    calls: list[int] = []

    class Count(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cfg = lm.cfg

        def forward(self, inputs: torch.Tensor, cross: torch.Tensor, mask: torch.Tensor, window: int
                    ) -> torch.Tensor:
            calls.append(len(inputs))
            return lm(inputs, cross, mask, window=window)

    terms: dict[str, float] = {}
    with torch.no_grad():
        plain, books = train.lm_loss(Count(), text, tok, batch, texts, window=cfg.context)
        both, books2 = train.lm_loss(Count(), text, tok, batch, texts, window=cfg.context, contrast=contrast,
                                     margin=10.0, contrast_weight=1.0, terms=terms)
    assert calls == [len(batch), len(batch), len(rows)]  # one more pass, of the paired crops only
    assert books == books2 and "margin" in terms
    assert abs(float(both) - float(plain) - (10.0 - terms["margin"])) < 1e-4  # the whole gap is under 10 nats


def test_corrupt_replaces_a_fraction_of_the_codes_never_the_special_token() -> None:
    x = torch.randint(0, 32, (4, 4, 500))
    x[:, :, :3] = 32  # the BOS column and the delay pattern's fill
    y = train.corrupt(x, 0.1, 32, np.random.default_rng(0))
    changed = float((y != x).float().mean())
    assert 0.08 < changed < 0.11  # 0.1 of the codes, less the draws that hit the same code
    assert bool((y[:, :, :3] == 32).all()) and int(y[:, :, 3:].max()) < 32
    assert torch.equal(train.corrupt(x, 0.0, 32, np.random.default_rng(0)), x)
    assert torch.equal(y, train.corrupt(x, 0.1, 32, np.random.default_rng(0)))  # seeded by the step's rng


def test_lm_refuses_a_checkpoint_of_another_codec(runs: Path, tmp_path: Path) -> None:
    other = tmp_path / "codec"
    train.train_codec(other, tiny_codec_cfg(1), device="cpu", quiet=True)
    with pytest.raises(train.TrainError, match="another codec"):
        train.train_lm(runs / "lm", None, codec_checkpoint=other / train.CHECKPOINT, device="cpu", quiet=True)


def test_exported_pack_runs_and_its_encoder_matches_torch(runs: Path, tmp_path: Path) -> None:
    from engine.generator import Generator, GenParams
    from engine.sampling import SamplingParams

    out = tmp_path / "pack"
    pack = train.export_pack(out, codec_checkpoint=runs / "codec" / train.CHECKPOINT,
                             lm_checkpoint=runs / "lm" / train.CHECKPOINT, quantize="none", float16=False)
    assert pack.encoder is not None and pack.lm["context"] == 12
    assert pack.sampling == train.PACK_SAMPLING  # what the recipe's packs are played with
    tr = pack.info["training"]
    assert tr["lm"]["layers"] == 2 and tr["codec_training"]["step"] == 4 and "losses" in tr["lm_training"]
    assert tr["lm_training"]["device"].startswith("cpu")

    codec, _ = train.load_codec(runs / "codec" / train.CHECKPOINT)
    # the pack's encoder holds codes as the LM's corpus did
    assert tr["lm_training"]["config"]["hysteresis"] == 0.15
    codec.quantizer.hysteresis = 0.15
    from export.data import synth

    clip = synth(5, 1.0, seed=3)
    n = pack.encoder.inputs[0].shape[-1]
    padded = np.zeros((1, 2, n), np.float32)
    padded[0, :, : clip.shape[1]] = clip
    session = pack.session(pack.encoder)
    codes = session.run(["codes"], {"audio": padded})[0]
    with torch.no_grad():
        want = codec.encode(torch.from_numpy(clip)[None]).numpy()
    frames = want.shape[-1]
    assert (codes[..., :frames] == want).mean() > 0.99  # argmin ties may differ in the last ulp

    from export.evaluate import codec_metrics, pack_reconstructor

    reconstruct = pack_reconstructor(out)
    assert reconstruct is not None and reconstruct.latency_samples == 0  # a causal codec
    y = reconstruct(clip)
    assert y.shape == clip.shape and np.isfinite(y).all()
    with torch.no_grad():  # the engine's streaming decode of the encoder's codes == torch's offline round trip
        offline = codec.decode(torch.from_numpy(codes[..., :frames])).numpy()[0, :, : clip.shape[1]]
    assert np.abs(y - offline).max() < 1e-3
    metrics = codec_metrics(reconstruct, clips_per_prompt=1, seconds=0.5)
    assert np.isfinite(metrics["si_snr_db"]) and metrics["mel_distance"] > 0

    gen = Generator(pack, seed=1, params=GenParams(prompt=pack.prompts[2], sampling=SamplingParams(1.0)))
    block = np.concatenate([gen.next_block().copy() for _ in range(5)], axis=-1)
    assert block.shape[0] == 2 and np.isfinite(block).all()


def test_float16_weights_halve_the_files_and_decode_the_same(runs: Path, tmp_path: Path) -> None:
    from engine.codec import DecoderSession

    packs = {half: train.export_pack(tmp_path / str(half), codec_checkpoint=runs / "codec" / train.CHECKPOINT,
                                     lm_checkpoint=runs / "lm" / train.CHECKPOINT, quantize="none", float16=half)
             for half in (False, True)}
    for name in ("decoder.onnx", "conditioner.onnx", "encoder.onnx"):
        full, half = ((packs[h].path / name).stat().st_size for h in (False, True))
        # the tiny conditioner has no tensor big enough to convert; the decoder holds DFT bases; the
        # encoder's analysis basis stays float32 (below)
        assert half < 0.7 * full if name == "decoder.onnx" else half <= full, name
    assert "decoder, conditioner, encoder float16" in packs[True].info["training"]["weights"]
    # The encoder's analysis basis feeds a logarithm: rounded to float16 its leakage lifted every quiet
    # bin's log power and changed most codes of the shipped codec. A loud tone over a very quiet floor:
    from engine.lm import session_options

    encoders = [packs[h].session(packs[h].encoder, session_options(1)) for h in (False, True)]
    n = packs[True].encoder.input("audio").shape[-1]
    t = np.arange(n) / packs[True].audio.sample_rate
    rng = np.random.default_rng(1)
    audio = (0.5 * np.sin(2 * np.pi * 440.0 * t) + 1e-5 * rng.standard_normal((2, n))).astype(np.float32)[None]
    c32, c16 = (e.run(["codes"], {"audio": audio})[0] for e in encoders)
    assert (c32 == c16).mean() >= 0.95
    import onnx

    graph = onnx.load(str(packs[True].path / "encoder.onnx")).graph
    bases = [n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute
             and n.attribute[0].name == "value" and np.prod(n.attribute[0].t.dims) >= 4096]
    assert bases and all(t.data_type == onnx.TensorProto.FLOAT for t in bases)
    sessions = [DecoderSession(packs[h]) for h in (False, True)]
    rng = np.random.default_rng(0)
    k, card = packs[True].codebooks.count, packs[True].codebooks.cardinality
    for _ in range(6):
        codes = rng.integers(0, card, (1, k, 1))
        a, b = (s.step(codes).copy() for s in sessions)
        assert np.abs(a - b).max() <= 1e-2 * max(1e-3, float(np.abs(a).max()))


def test_an_lm_trains_on_a_packs_tokens_and_replaces_its_lm(base_pack: Path, runs: Path, tmp_path: Path) -> None:
    """`cicada train lm --codec PACK`, then `cicada train pack --codec PACK`: a new LM for a pack whose
    codec checkpoint is not at hand (the shipped pack, a converted one)."""
    import shutil
    import tomllib

    from engine import pack as packfmt
    from engine.generator import Generator, GenParams
    from engine.sampling import SamplingParams
    from export import data
    from export.evaluate import pack_encoder

    base = tmp_path / "base"
    shutil.copytree(base_pack, base)
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    cfg = tiny_lm_cfg(3)
    cfg.hysteresis = 0.0  # the pack's encoder graph chooses its codes (at its own margin)
    rec = train.train_lm(tmp_path / "lm", cfg, codec_checkpoint=base, device="cpu", quiet=True)
    assert rec["step"] == 3 and rec["codec_pack"] == str(base)
    assert rec["codec_digest"] == train.file_digest(base / "encoder.onnx")
    assert rec["codec_record"]["pack_name"] == "cicada-food" and rec["codec_record"]["step"] == 4

    # the corpus is the pack encoder's tokens of the same dithered clips
    with np.load(next((tmp_path / "lm").glob("corpus-*.npz"))) as z:
        codes = z["codes"]
    encode = pack_encoder(packfmt.load(base))
    idx, clip = next(iter(data.corpus(cfg.seed + 2000, cfg.corpus_clips, cfg.corpus_seconds, 32000)))
    assert np.array_equal(codes[0], encode(train.dither(clip, np.random.default_rng(0))))

    # an LM of another codec's tokens, or a checkpoint that is no decoder fine-tune, is refused
    with pytest.raises(train.TrainError, match="another codec"):
        train.export_pack(base, codec_checkpoint=base, lm_checkpoint=runs / "lm" / train.CHECKPOINT, overwrite=True)
    with pytest.raises(train.TrainError, match="not a decoder checkpoint"):
        train.export_pack(base, codec_checkpoint=base, lm_checkpoint=tmp_path / "lm" / train.CHECKPOINT,
                          decoder_checkpoint=runs / "codec" / train.CHECKPOINT, overwrite=True)
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before  # refusals leave the pack as it was

    # in place: the codec graphs stay byte for byte, the LM side and the record are new
    pack = train.export_pack(base, codec_checkpoint=base, lm_checkpoint=tmp_path / "lm" / train.CHECKPOINT,
                             quantize="none", overwrite=True)
    after = {f.name: f.read_bytes() for f in base.iterdir()}
    assert sorted(after) == sorted(before) and not list(base.parent.glob(".base.*"))  # nothing left staged
    assert after["decoder.onnx"] == before["decoder.onnx"] and after["encoder.onnx"] == before["encoder.onnx"]
    assert after["lm.onnx"] != before["lm.onnx"]
    tr = pack.info["training"]
    assert tr["lm_training"]["codec_pack"] == str(base) and tr["lm_training"]["step"] == 3
    assert tr["codec_training"]["step"] == 4  # the codec's own record is kept
    assert tr["weights"].startswith("lm none; conditioner float16; decoder, encoder as in")
    assert tr["encoder_hysteresis"] == 0.15  # the copied encoder's margin (the base LM's), not the new LM's 0
    assert tr["lm"]["text_input"] is True
    old = tomllib.loads(before["manifest.toml"].decode())
    new = tomllib.loads(after["manifest.toml"].decode())
    assert new["decoder"] == old["decoder"] and new["encoder"] == old["encoder"] and new["audio"] == old["audio"]
    assert new["sampling"] == old["sampling"] and new["lm"]["context"] == cfg.context
    gen = Generator(pack, seed=1, params=GenParams(prompt=pack.prompts[3], sampling=SamplingParams(1.0)))
    block = np.concatenate([gen.next_block().copy() for _ in range(5)], axis=-1)
    assert block.shape[0] == 2 and np.isfinite(block).all()


def test_an_lm_on_a_packs_held_codes_gets_an_encoder_that_holds_them(base_pack: Path, tmp_path: Path) -> None:
    """`cicada train lm --codec PACK --hysteresis M`: the pack's codec is read back into PyTorch to hold
    codes; `cicada train pack --codec PACK` then exports an encoder graph at the LM's margin, decoder kept."""
    from engine import pack as packfmt
    from export import data
    from export.evaluate import pack_encoder
    from export.unpack import codec_from_pack

    cfg = tiny_lm_cfg(2)
    cfg.hysteresis = 0.3  # not the base encoder's 0.15: the new graph must come from the LM's margin
    rec = train.train_lm(tmp_path / "lm", cfg, codec_checkpoint=base_pack, device="cpu", quiet=True)
    assert rec["codec_digest"] == train.file_digest(base_pack / "encoder.onnx")
    with np.load(next((tmp_path / "lm").glob("corpus-*-h0.3.npz"))) as z:
        codes = z["codes"]
    codec = codec_from_pack(packfmt.load(base_pack))
    codec.quantizer.hysteresis = 0.3
    _, clip = next(iter(data.corpus(cfg.seed + 2000, cfg.corpus_clips, cfg.corpus_seconds, 32000)))
    clip = train.dither(clip, np.random.default_rng(0))
    with torch.no_grad():
        held = codec.encode(torch.from_numpy(clip)[None])[0].numpy()
    assert np.array_equal(codes[0], held)
    codec.quantizer.hysteresis = 0.0
    with torch.no_grad():
        nearest = codec.encode(torch.from_numpy(clip)[None])[0].numpy()
    assert (held[:, 1:] != held[:, :-1]).sum() < (nearest[:, 1:] != nearest[:, :-1]).sum()  # held codes switch less

    pack = train.export_pack(tmp_path / "pack", codec_checkpoint=base_pack,
                             lm_checkpoint=tmp_path / "lm" / train.CHECKPOINT, quantize="none")
    assert (pack.path / "decoder.onnx").read_bytes() == (base_pack / "decoder.onnx").read_bytes()
    assert (pack.path / "encoder.onnx").read_bytes() != (base_pack / "encoder.onnx").read_bytes()
    tr = pack.info["training"]
    assert tr["encoder_hysteresis"] == 0.3
    assert tr["weights"].startswith("lm none; conditioner float16; decoder as in")
    assert "encoder read back from" in tr["weights"] and "hysteresis 0.3" in tr["weights"]
    assert np.array_equal(pack_encoder(pack)(clip), held)  # the engine's encoder makes the LM's tokens
    codec_from_pack(pack)  # and reads back, checked at the new margin


def test_cli_trains_an_lm_on_a_pack(base_pack: Path, tiny_pack_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    lm = tmp_path / "lm"
    assert main(["train", "lm", "--codec", str(tiny_pack_dir), "--out", str(lm)]) == 1
    err = capsys.readouterr().err
    assert "has no encoder.onnx" in err and "Traceback" not in err
    assert main(["train", "lm", "--codec", str(base_pack), "--corpus-clips", "1", "--steps", "1", "--batch", "1",
                 "--threads", "1", "--context-noise", "0.1", "--cfg-dropout", "0.2", "--text-input",
                 "--out", str(lm)]) == 0
    assert "lm: step 1" in capsys.readouterr().out
    config = torch.load(lm / train.CHECKPOINT, weights_only=False)["record"]["config"]
    assert config["context_noise"] == 0.1 and config["cfg_dropout"] == 0.2 and config["lm"]["text_input"] is True
    out = tmp_path / "pack"
    assert main(["train", "pack", "--codec", str(base_pack), "--lm", str(lm / train.CHECKPOINT),
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["train", "pack", "--codec", str(base_pack), "--lm", str(lm / train.CHECKPOINT),
                 "--out", str(out)]) == 1
    assert "pass --force" in capsys.readouterr().err
    from engine import pack as packfmt

    pack = packfmt.load(out)
    assert pack.lm["quantization"] == "int8" and (out / "decoder.onnx").read_bytes() == (base_pack / "decoder.onnx").read_bytes()

    # --hysteresis needs the pack's codec back in PyTorch: a pack whose codec is not cicada's is refused
    import shutil
    import tomllib

    other = tmp_path / "other"
    shutil.copytree(base_pack, other)
    doc = tomllib.loads((other / packfmt.MANIFEST).read_text(encoding="utf-8"))
    del doc["training"]["codec"]
    packfmt.write_manifest(other, doc)
    assert main(["train", "lm", "--codec", str(other), "--hysteresis", "0.15", "--out", str(tmp_path / "lm2")]) == 1
    err = capsys.readouterr().err
    assert "no spectral codec config" in err and "needed for --hysteresis with a pack" in err
    assert "Traceback" not in err


def test_cli_train_codec_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "pack", "--codec", str(tmp_path / "none.pt"), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "cicada train codec" in err and "Traceback" not in err
    assert main(["train", "lm", "--codec", str(tmp_path / "none.pt"), "--out", str(tmp_path / "lm")]) == 1
    assert "no codec checkpoint" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "codec", "--device", "cuda", "--out", str(tmp_path / "c")]) == 1
        assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["train", "codec", "--kind", "seanet", "--peak-weight", "0.5", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err  # refused before anything is trained or written
    assert "--peak-weight 0.5" in err and "--kind spectral" in err and not (tmp_path / "s").exists()
    assert main(["train", "codec", "--steps", "1", "--batch", "1", "--threads", "1", "--peak-weight", "0.5",
                 "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "codec: step 1" in out and (tmp_path / "c" / train.CHECKPOINT).exists()
    codec, record = train.load_codec(tmp_path / "c" / train.CHECKPOINT)
    assert type(codec).__name__ == "SpectralCodec" and record["config"]["segment"] == 0.8  # the default kind
    assert record["config"]["peak_weight"] == 0.5 and "peak" in record["losses"]  # trained on the peak term
    assert main(["train", "lm", "--codec", str(tmp_path / "c" / train.CHECKPOINT), "--corpus-clips", "2",
                 "--hysteresis", "0.2", "--steps", "1", "--batch", "1", "--threads", "1", "--out", str(tmp_path / "lm")]) == 0
    assert "lm: step 1" in capsys.readouterr().out
    record = torch.load(tmp_path / "lm" / train.CHECKPOINT, weights_only=False)["record"]
    assert record["config"]["corpus_clips"] == 2 and record["corpus"]["clips"] == 2 * 22
    assert record["config"]["hysteresis"] == 0.2
    assert len(list((tmp_path / "lm").glob("corpus-*-0-2x8s-h0.2.npz"))) == 1
    with pytest.raises(SystemExit):
        main(["train", "lm", "--hysteresis", "1.5"])
    assert "--hysteresis: must be at least 0 and below 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "decoder", "--focus", "2,sixteen"])
    assert "expected prompt numbers separated by commas, like 2,16,7; got '2,sixteen'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "decoder", "--focus-weight", "0"])
    assert "--focus-weight: must be > 0" in capsys.readouterr().err
    assert main(["train", "codec", "--kind", "seanet", "--steps", "1", "--batch", "1", "--threads", "1",
                 "--out", str(tmp_path / "s")]) == 0
    assert "codec: step 1" in capsys.readouterr().out
    codec, record = train.load_codec(tmp_path / "s" / train.CHECKPOINT)
    assert type(codec).__name__ == "Codec" and record["config"]["segment"] == 0.4


def test_cli_train_all_probes_then_aims_the_fine_tunes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`cicada train all` is codec, LM, decoder, the probe, the LM's and the decoder's focus fine-tunes (each
    from its stage's checkpoint, aimed at the prompts the probe heard it confuse), pack: each in its run
    folder, the pack taking the two fine-tunes. (The stages themselves are tested elsewhere; a real `train
    all` at the defaults takes hours.)"""
    from export import probe

    calls: list[tuple[str, dict]] = []
    rec = dict(step=1, elapsed_minutes=0.0, device="cpu", losses={})

    def stage(name: str):
        def run(out, cfg=None, **kw):
            calls.append((name, dict(out=Path(out), cfg=cfg, **kw)))
            if name == "lm":  # a checkpoint whose corpus is not the default (the LM stage's, and the focus's)
                Path(out).mkdir(parents=True, exist_ok=True)
                torch.save(dict(config={**dataclasses.asdict(cfg), "corpus_clips": 7, "held_out_clips": 2}),
                           Path(out) / train.CHECKPOINT)
            return rec
        return run

    class Written:
        path = tmp_path / "pack"

    def pack(out, **kw):
        calls.append(("pack", dict(out=Path(out), **kw)))
        Written.path.mkdir(exist_ok=True)
        return Written

    def heard(folder, **kw):
        calls.append(("probe", dict(out=Path(folder), **kw)))
        return dict(focus=dict(lm=[5, 2], decoder=[16, 7, 21], mistaken_for=[[5, 14], [2, 6]]),
                    text_match_mean=0.8,
                    text_match_min=0.0,
                    codec_recognised=0.9)

    for name in ("codec", "lm", "decoder"):
        monkeypatch.setattr(train, f"train_{name}", stage(name))
    monkeypatch.setattr(train, "export_pack", pack)
    monkeypatch.setattr(probe, "probe", heard)
    runs = tmp_path / "runs"
    assert main(["train", "all", "--runs", str(runs), "--out", str(tmp_path / "pack"), "--seed", "3"]) == 0
    assert [c[0] for c in calls] == ["codec", "lm", "decoder", "probe", "lm", "decoder", "pack"]
    by = dict(calls[:4])
    lm_focus, dec_focus, packed = calls[4][1], calls[5][1], calls[6][1]
    ckpt = train.CHECKPOINT
    assert by["lm"]["out"] == runs / "lm" and by["lm"]["init"] is None and by["lm"]["cfg"].focus == ()
    assert by["decoder"]["out"] == runs / "decoder" and by["decoder"]["codec_checkpoint"] == runs / "codec" / ckpt
    assert by["decoder"]["cfg"].seed == 3 and by["decoder"]["cfg"].flux_weight == 3.0
    assert tuple(by["decoder"]["cfg"].focus) == (2, 16, 3) and by["decoder"]["cfg"].focus_weight == 4.0
    assert by["decoder"]["cfg"].phase_lock == 3 and by["decoder"]["cfg"].magnitude_gate
    assert by["decoder"]["cfg"].learned_lock  # the shipped decoder's options, in one fine-tune
    # the probe hears the LM stage's LM through the decoder stage's decoder
    assert by["probe"]["out"] == runs / "probe" and by["probe"]["lm_checkpoint"] == runs / "lm" / ckpt
    assert by["probe"]["decoder_checkpoint"] == runs / "decoder" / ckpt
    # the LM's focus fine-tune, from the LM stage's checkpoint, on its corpus, aimed where the probe says
    assert lm_focus["out"] == runs / "lm_focus" and lm_focus["init"] == runs / "lm" / ckpt
    assert lm_focus["corpus_dir"] == runs / "lm" and lm_focus["sized_like_init"] and not lm_focus["fresh"]
    assert lm_focus["codec_checkpoint"] == runs / "codec" / ckpt
    cfg = lm_focus["cfg"]
    assert (tuple(cfg.focus), cfg.focus_weight, cfg.steps, cfg.lr, cfg.seed) == ((5, 2), 3.0, 1000, 1e-4, 3)
    assert cfg.contrast == ()  # what the probe heard them as is only reported (the contrast did not help)
    assert (cfg.corpus_clips, cfg.held_out_clips) == (7, 2)  # the LM stage's corpus, not the defaults'
    # the decoder's, from the decoder stage's checkpoint
    assert dec_focus["out"] == runs / "decoder_focus" and dec_focus["init"] == runs / "decoder" / ckpt
    dcfg = dec_focus["cfg"]
    assert (tuple(dcfg.focus), dcfg.focus_weight, dcfg.steps, dcfg.seed) == ((16, 7, 21), 4.0, 8000, 3)
    assert dcfg.minutes == 45.0  # twice the decoder stage's 4000 steps, and room for them on 2 cores
    assert dcfg.learned_lock and dcfg.phase_lock == 3 and not dec_focus["fresh"]
    assert packed["decoder_checkpoint"] == runs / "decoder_focus" / ckpt
    assert packed["lm_checkpoint"] == runs / "lm_focus" / ckpt
    printed = capsys.readouterr().out
    assert "decoder: step 1" in printed and "lm focus (5,2 x3): step 1" in printed
    assert "decoder focus (16,7,21 x4): step 1" in printed
    assert "LM focus (5,2; heard as 5:14,2:6), decoder focus (16,7,21)" in printed
    assert by["codec"]["cfg"].peak_weight == dcfg.peak_weight == by["decoder"]["cfg"].peak_weight == 0.0
    calls.clear()  # --peak-weight reaches the codec and both decoder fine-tunes
    assert main(["train", "all", "--runs", str(runs), "--out", str(tmp_path / "pack"), "--peak-weight", "0.5"]) == 0
    weights = [c[1]["cfg"].peak_weight for c in calls if c[0] in ("codec", "decoder")]
    assert weights == [0.5, 0.5, 0.5]
    calls.clear()  # --rounds 2: a second probe and pair of fine-tunes, each from what the first round left
    assert main(["train", "all", "--runs", str(runs), "--out", str(tmp_path / "pack"), "--rounds", "2"]) == 0
    assert [c[0] for c in calls] == ["codec", "lm", "decoder", "probe", "lm", "decoder", "probe", "lm", "decoder",
                                     "pack"]
    probe2, lm2, dec2, packed = (c[1] for c in calls[6:])
    assert probe2["out"] == runs / "probe2" and probe2["lm_checkpoint"] == runs / "lm_focus" / ckpt
    assert probe2["decoder_checkpoint"] == runs / "decoder_focus" / ckpt
    assert lm2["out"] == runs / "lm_focus2" and lm2["init"] == runs / "lm_focus" / ckpt
    assert lm2["corpus_dir"] == runs / "lm" and (lm2["cfg"].corpus_clips, tuple(lm2["cfg"].focus)) == (7, (5, 2))
    assert dec2["out"] == runs / "decoder_focus2" and dec2["init"] == runs / "decoder_focus" / ckpt
    assert packed["lm_checkpoint"] == runs / "lm_focus2" / ckpt
    assert packed["decoder_checkpoint"] == runs / "decoder_focus2" / ckpt
    assert "lm focus2 (5,2 x3): step 1" in capsys.readouterr().out


def test_the_focus_stage_shares_the_corpus_and_restarts_when_its_lm_trained_on(tmp_path: Path) -> None:
    """``train all``'s LM focus stage reads the LM stage's encoded corpus (no second encoding), records the
    digest of the LM file it started from, and is started again when that LM has trained since, or when the
    probe aims it at other prompts."""
    codec, lm, focus = tmp_path / "codec", tmp_path / "lm", tmp_path / "lm_focus"
    train.train_codec(codec, tiny_codec_cfg(1), device="cpu", quiet=True)
    train.train_lm(lm, tiny_lm_cfg(2), codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True)
    base, ckpt = lm / train.CHECKPOINT, focus / train.CHECKPOINT
    assert train.restart_reason(ckpt, base, "lm", (5, 7)) is None  # nothing there yet
    cfg = train.LMTrainConfig.focus_tune(steps=2, **{k: getattr(tiny_lm_cfg(2), k) for k in ("batch", "frames", "context",
                                            "corpus_clips", "corpus_seconds", "text_len", "hysteresis")})
    rec = train.train_lm(focus, cfg, codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True,
                         init=base, sized_like_init=True, corpus_dir=lm)
    assert rec["init"]["digest"] == train.file_digest(base) and tuple(rec["config"]["focus"]) == (5, 7)
    assert rec["config"]["lm"]["dim"] == 32  # the tiny LM's size, not the defaults'
    assert list(focus.glob("corpus-*")) == [] and len(list(lm.glob("corpus-*"))) == 1
    assert train.restart_reason(ckpt, base, "lm", (5, 7)) is None
    assert "other prompts than (2,5)" in train.restart_reason(ckpt, base, "lm", (2, 5))
    assert "told other prompts apart than (5:14)" in train.restart_reason(ckpt, base, "lm", (5, 7), [(5, 14)])
    train.train_lm(lm, tiny_lm_cfg(3), codec_checkpoint=codec / train.CHECKPOINT, device="cpu", quiet=True)
    assert "fine-tuned from an earlier" in train.restart_reason(ckpt, base, "lm", (5, 7))  # the LM trained on


def test_a_decoder_fine_tune_starts_from_another_decoder_checkpoint(runs: Path, tmp_path: Path) -> None:
    """``train_decoder(init=)`` (``train all``'s decoder focus stage) starts from a decoder checkpoint of
    the same codec: its weights, a new optimizer and schedule, the init in the record; a decoder of another
    codec, or with other decoder options, is refused with what to do."""
    codec_ckpt = runs / "codec" / train.CHECKPOINT
    cfg = train.DecoderTrainConfig(steps=2, batch=2, segment=0.1, warmup=1)
    first = tmp_path / "dec" / train.CHECKPOINT
    train.train_decoder(first.parent, cfg, codec_checkpoint=codec_ckpt, device="cpu", quiet=True)
    start = torch.load(first, weights_only=False)["model"]
    focus_cfg = train.DecoderTrainConfig.focus_tune((7, 16), steps=1, batch=2, segment=0.1, warmup=1, lr=1e-12)
    rec = train.train_decoder(tmp_path / "focus", focus_cfg, codec_checkpoint=codec_ckpt, device="cpu", quiet=True,
                              init=first)
    assert rec["step"] == 1 and rec["init"]["digest"] == train.file_digest(first) and rec["init"]["step"] == 2
    assert tuple(rec["config"]["focus"]) == (7, 16) and rec["config"]["focus_weight"] == 4.0
    tuned = torch.load(tmp_path / "focus" / train.CHECKPOINT, weights_only=False)["model"]
    assert all(torch.allclose(tuned[k], v, atol=1e-6) for k, v in start.items())  # lr ~0: the init's weights
    assert train.restart_reason(tmp_path / "focus" / train.CHECKPOINT, first, "decoder", (7, 16)) is None
    with pytest.raises(train.TrainError, match="another phase_lock"):
        train.train_decoder(tmp_path / "other", dataclasses.replace(focus_cfg, phase_lock=2), device="cpu",
                            codec_checkpoint=codec_ckpt, quiet=True, init=first)
    train.train_codec(tmp_path / "codec2", tiny_codec_cfg(1), device="cpu", quiet=True)
    with pytest.raises(train.TrainError, match="another codec"):
        train.train_decoder(tmp_path / "other", focus_cfg, codec_checkpoint=tmp_path / "codec2" / train.CHECKPOINT,
                            device="cpu", quiet=True, init=first)


def test_configs_are_plain_data() -> None:
    for cfg in (train.CodecTrainConfig(), train.CodecTrainConfig.seanet(), train.LMTrainConfig(),
                train.DecoderTrainConfig()):
        d = dataclasses.asdict(cfg)
        assert type(cfg)(**d) == cfg


def test_decoder_fine_tuning_keeps_the_tokens_and_packs(runs: Path, tmp_path: Path) -> None:
    codec_ckpt = runs / "codec" / train.CHECKPOINT
    cfg = train.DecoderTrainConfig(steps=3, batch=2, segment=0.1, warmup=1)
    rec = train.train_decoder(tmp_path / "dec", cfg, codec_checkpoint=codec_ckpt, device="cpu", quiet=True)
    assert rec["step"] == 3 and set(rec["losses"]) == {"magnitude", "phase", "ipd", "spectral", "wave",
                                                              "band", "flux", "envelope", "lock"}
    base, _ = train.load_codec(codec_ckpt)
    tuned, record = train.load_codec(codec_ckpt, tmp_path / "dec" / train.CHECKPOINT)
    assert record["decoder"]["step"] == 3
    for name, v in base.state_dict().items():  # encoder and codebooks untouched, decoder trained
        same = torch.equal(v, tuned.state_dict()[name])
        assert same if not name.startswith("decoder.") else True, name
    assert any(not torch.equal(v, tuned.decoder.state_dict()[k]) for k, v in base.decoder.state_dict().items())
    x = torch.randn(1, base.cfg.channels, 640 * 8) * 0.1
    with torch.no_grad():
        assert torch.equal(base.encode(x), tuned.encode(x))
    pack = train.export_pack(tmp_path / "pack", codec_checkpoint=codec_ckpt, lm_checkpoint=runs / "lm" / train.CHECKPOINT,
                             decoder_checkpoint=tmp_path / "dec" / train.CHECKPOINT, quantize="none")
    assert pack.info["training"]["codec_training"]["decoder"]["step"] == 3
    other = tmp_path / "other-codec"
    train.train_codec(other, tiny_codec_cfg(1), device="cpu", quiet=True)
    with pytest.raises(train.TrainError, match="another codec"):
        train.load_codec(other / train.CHECKPOINT, tmp_path / "dec" / train.CHECKPOINT)


def test_code_noise_feeds_the_decoder_random_codes(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``code_noise`` replaces that fraction of the codes the decoder is trained on (the targets stay clean)."""
    codec_ckpt = runs / "codec" / train.CHECKPOINT
    corrupted: list[tuple[torch.Tensor, torch.Tensor]] = []
    latents: list[tuple[Any, torch.Tensor]] = []
    real_corrupt, real_losses = train.corrupt, train.reconstruction_losses

    def corrupt(codes, fraction, card, rng):  # type: ignore[no-untyped-def]
        out = real_corrupt(codes, fraction, card, rng)
        corrupted.append((codes, out))
        return out

    def losses(codec, x, latent, w):  # type: ignore[no-untyped-def]
        latents.append((codec, latent))
        return real_losses(codec, x, latent, w)

    monkeypatch.setattr(train, "corrupt", corrupt)
    monkeypatch.setattr(train, "reconstruction_losses", losses)
    cfg = train.DecoderTrainConfig(steps=2, batch=2, segment=0.2, warmup=1, code_noise=0.5)
    train.train_decoder(tmp_path / "dec", cfg, codec_checkpoint=codec_ckpt, device="cpu", quiet=True)
    assert len(corrupted) == len(latents) == 2
    for (clean, noisy), (codec, latent) in zip(corrupted, latents):
        changed = float((clean != noisy).float().mean())
        assert 0.3 < changed < 0.6, changed  # about half, less the random codes that happen to be the same
        assert torch.equal(latent, codec.quantizer.decode(noisy))  # what the decoder was given
    corrupted.clear()
    train.train_decoder(tmp_path / "clean", train.DecoderTrainConfig(steps=1, batch=2, segment=0.2, warmup=1),
                        codec_checkpoint=codec_ckpt, device="cpu", quiet=True)
    assert not corrupted  # off by default


def test_focus_draws_the_named_prompts_more_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """``focus`` / ``focus_weight``: the decoder sees more examples of the families named (1-based)."""
    w = train.prompt_weights((2, 16), 4.0)
    assert w is not None and w.shape == (22,) and np.isclose(w.sum(), 1.0)
    assert w[1] == w[15] == pytest.approx(4 * w[0]) and np.all(np.delete(w, [1, 15]) == w[0])
    assert train.prompt_weights((), 4.0) is None and train.prompt_weights((2,), 1.0) is None  # all equal
    assert _prompt_numbers("2, 16,7") == (2, 16, 7) and _prompt_numbers("") == ()  # `--focus ''`: all equal
    with pytest.raises(train.TrainError, match="numbered 1 to 22"):
        train.prompt_weights((0, 2), 3.0)
    with pytest.raises(train.TrainError, match="above 0"):
        train.prompt_weights((2,), 0.0)

    drawn: list[int] = []

    def synth(index: int, seconds: float, seed: int, n: int = 0, sample_rate: int = 32000) -> np.ndarray:
        drawn.append(index)
        return np.zeros((2, round(seconds * sample_rate)), np.float32)

    monkeypatch.setattr(train.data, "synth", synth)
    plain = train.codec_batch(3, 0, 8, 0.05, 32000)
    assert np.array_equal(plain, train.codec_batch(3, 0, 8, 0.05, 32000, None))
    drawn.clear()
    for step in range(60):
        train.codec_batch(step, 0, 8, 0.05, 32000, w)
    share = np.bincount(drawn, minlength=22) / len(drawn)
    focused, rest = share[[1, 15]].mean(), np.delete(share, [1, 15]).mean()
    assert 2.5 < focused / rest < 6.5, (focused, rest)  # 4 expected, from 480 draws


def test_a_packs_decoder_fine_tunes_and_replaces_only_the_decoder(base_pack: Path, runs: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`cicada train decoder --codec PACK`, then `cicada train pack --codec PACK --decoder CKPT` (no --lm):
    the codec is read back from the pack, its decoder fine-tuned, and only decoder.onnx changes."""
    from engine import pack as packfmt
    from engine.generator import Generator, GenParams
    from engine.sampling import SamplingParams
    from export.unpack import UnpackError, check_codec, codec_from_pack

    dec = tmp_path / "dec"
    assert main(["train", "decoder", "--codec", str(base_pack), "--steps", "2", "--batch", "2", "--threads", "1",
                 "--out", str(dec), "--phase-start", "alternate", "--code-noise", "0.2", "--focus", "2,16",
                 "--focus-weight", "3", "--flux-weight", "2.5", "--envelope-weight", "0", "--phase-lock", "2",
                 "--magnitude-gate", "--learned-lock"]) == 0
    printed = capsys.readouterr().out
    assert "decoder: step 2" in printed
    assert f"pack it with `cicada train pack --codec {base_pack} --decoder {dec / train.CHECKPOINT}`" in printed
    state = torch.load(dec / train.CHECKPOINT, weights_only=False)
    assert state["record"]["codec_pack"] == str(base_pack)
    assert state["record"]["codec_digest"] == train.file_digest(base_pack / "encoder.onnx")
    assert state["config"]["phase_start"] == "alternate" and state["config"]["code_noise"] == 0.2
    assert tuple(state["config"]["focus"]) == (2, 16) and state["config"]["focus_weight"] == 3.0
    assert state["config"]["flux_weight"] == 2.5 and state["config"]["envelope_weight"] == 0.0
    assert state["config"]["phase_lock"] == 2 and state["config"]["magnitude_gate"] is True
    assert state["config"]["learned_lock"] is True
    base = codec_from_pack(packfmt.load(base_pack))
    assert base.cfg.phase_start == "zero"  # the codec stage's recipe
    assert any(not torch.equal(v, state["model"][k]) for k, v in base.decoder.state_dict().items())  # it trained

    out = tmp_path / "pack"
    assert main(["train", "pack", "--codec", str(base_pack), "--decoder", str(dec / train.CHECKPOINT),
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    for name in ("lm.onnx", "conditioner.onnx", "tokenizer.json", "encoder.onnx"):
        assert (out / name).read_bytes() == (base_pack / name).read_bytes(), name
    assert (out / "decoder.onnx").read_bytes() != (base_pack / "decoder.onnx").read_bytes()
    pack = packfmt.load(out)
    tr, old = pack.info["training"], packfmt.load(base_pack).info["training"]
    assert tr["lm_training"] == old["lm_training"]  # the kept LM keeps its record
    assert tr["codec_training"]["decoder"]["step"] == 2 and tr["codec_training"]["step"] == 4
    assert tr["codec_training"]["decoder"]["codec_pack"] == str(base_pack)
    assert tr["weights"] == (f"lm, conditioner, encoder as in {base_pack} (computed in float32); "
                             f"decoder fine-tuned from {base_pack}'s (float16)")
    assert tr["encoder_hysteresis"] == 0.15
    # the new graph is the fine-tuned decoder: the pack reads back (checked against its graphs) with its weights,
    # and with the phase start it was fine-tuned with (a graph that started at 0 would fail that check)
    assert tr["codec"]["phase_start"] == "alternate" and tr["codec"]["phase_lock"] == 2
    assert tr["codec"]["magnitude_gate"] is True and tr["codec"]["learned_lock"] is True
    tuned = codec_from_pack(pack)
    assert tuned.cfg.phase_start == "alternate" and tuned.cfg.phase_lock == 2 and tuned.cfg.magnitude_gate
    assert tuned.cfg.learned_lock
    # a locked decoder is checked by its spectrogram (its lock flips on rounding ties), and still refused when
    # a weight came back wrong
    assert check_codec(tuned, pack, seconds=1.0)["mel_error_db"] < 0.05
    wrong = codec_from_pack(pack)
    with torch.no_grad():
        wrong.decoder.net.blocks[0].norm_bias.add_(0.5)
    with pytest.raises(UnpackError, match="does not match them"):
        check_codec(wrong, pack, seconds=1.0)
    for k, v in state["model"].items():  # large weights were stored as float16, small ones as they were
        got = tuned.decoder.state_dict()[k]
        assert torch.equal(got, v) or torch.equal(got, v.half().float()), k
    gen = Generator(pack, seed=1, params=GenParams(prompt=pack.prompts[2], sampling=SamplingParams(1.0)))
    block = np.concatenate([gen.next_block().copy() for _ in range(5)], axis=-1)
    assert block.shape[0] == 2 and np.isfinite(block).all()

    # a second fine-tune of the result keeps the first one's record inside its own; its learned lock needs
    # the lock it learned on
    with pytest.raises(train.TrainError, match="has a learned lock"):
        train.train_decoder(tmp_path / "dec2", train.DecoderTrainConfig(steps=1, batch=1, segment=0.1, warmup=1,
                                                                        phase_lock=0, learned_lock=False),
                            codec_checkpoint=out, device="cpu", quiet=True)
    again = train.train_decoder(tmp_path / "dec2", train.DecoderTrainConfig(steps=1, batch=1, segment=0.1, warmup=1,
                                                                            phase_lock=2),
                                codec_checkpoint=out, device="cpu", quiet=True)
    assert again["codec_pack"] == str(out)
    packed = train.export_pack(tmp_path / "pack2", codec_checkpoint=out, decoder_checkpoint=tmp_path / "dec2" /
                               train.CHECKPOINT, float16=False)
    assert packed.info["training"]["codec_training"]["decoder"]["previous"]["step"] == 2
    # a decoder fine-tuned on another codec's tokens is refused, and nothing is written
    train.train_decoder(tmp_path / "dec3", train.DecoderTrainConfig(steps=1, batch=1, segment=0.1, warmup=1),
                        codec_checkpoint=runs / "codec" / train.CHECKPOINT, device="cpu", quiet=True)
    with pytest.raises(train.TrainError, match="fine-tuned on another codec"):
        train.export_pack(tmp_path / "pack3", codec_checkpoint=base_pack,
                          decoder_checkpoint=tmp_path / "dec3" / train.CHECKPOINT)
    assert not (tmp_path / "pack3").exists()


def test_a_codec_trains_linked_from_the_start_with_stereo_features(tmp_path: Path) -> None:
    cfg = tiny_codec_cfg(1)
    cfg.codec.update(stereo_phase="linked", stereo_features=True)
    cfg.stereo_weight = 1.0
    rec = train.train_codec(tmp_path, cfg, device="cpu", quiet=True)
    assert "ipd" in rec["losses"]
    codec, _ = train.load_codec(tmp_path / train.CHECKPOINT)
    assert codec.cfg.linked and codec.cfg.stereo_features
    assert codec.encoder.net.inp.in_channels == 4 * codec.cfg.bins


def test_a_decoder_fine_tune_links_an_independent_codecs_stereo_phase(tmp_path: Path) -> None:
    """A codec trained with independently accumulated channel phases gets a linked decoder: it starts out
    centred (no inter-channel difference), keeps its tokens, and a pack of it decodes linked."""
    cfg = tiny_codec_cfg(2)
    cfg.codec.update(stereo_phase="independent", stereo_features=False)  # the recipe before linked training
    cfg.stereo_weight = 0.0
    train.train_codec(tmp_path / "codec", cfg, device="cpu", quiet=True)
    codec_ckpt = tmp_path / "codec" / train.CHECKPOINT
    base, _ = train.load_codec(codec_ckpt)
    assert base.cfg.stereo_phase == "independent"
    start, _ = train.load_codec(codec_ckpt)
    train.link_stereo_phase(start, "linked")
    with torch.no_grad():
        _, adv, offset, _ = start.decoder.spectrum(torch.randn(1, start.cfg.dimension, 5))
    assert torch.equal(offset, torch.zeros_like(offset)) and torch.equal(adv[:, 0], adv[:, 1])
    rec = train.train_decoder(tmp_path / "dec", train.DecoderTrainConfig(steps=2, batch=2, segment=0.1, warmup=1),
                              codec_checkpoint=codec_ckpt, device="cpu", quiet=True)
    assert rec["config"]["stereo_phase"] == "linked" and "ipd" in rec["losses"]
    tuned, _ = train.load_codec(codec_ckpt, tmp_path / "dec" / train.CHECKPOINT)
    assert tuned.cfg.stereo_phase == "linked" and tuned.decoder.cfg.linked
    x = torch.randn(1, 2, 640 * 6) * 0.1
    with torch.no_grad():
        assert torch.equal(base.encode(x), tuned.encode(x))
        y = tuned.decode(base.encode(x))
        graph = tuned.streaming_decoder(1)
        state = graph.initial_state()
        codes = base.encode(x)
        streamed = []
        for t in range(codes.shape[-1]):
            pcm, *state = graph(codes[..., t : t + 1], *state)
            streamed.append(pcm)
    assert float((torch.cat(streamed, -1) - y).abs().max()) <= 1e-5


def _run_loop(steps: int, minutes: float, seconds_per_step: float, caplog: pytest.LogCaptureFixture
              ) -> tuple[train.Loop, list[float]]:
    """A :class:`train.Loop` on a toy problem whose steps take ``seconds_per_step`` on a fake clock."""
    now = [0.0]
    loop = train.Loop("toy", clock=lambda: now[0])
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    cfg = train.DecoderTrainConfig(steps=steps, minutes=minutes, lr=1.0, warmup=10)
    rates: list[float] = []

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        now[0] += seconds_per_step
        rates.append(opt.param_groups[0]["lr"])
        return (w * 1e-3).pow(2).sum(), {}

    with caplog.at_level("WARNING", logger="cicada"):
        loop.run(cfg, opt, [w], 1.0, step_fn, lambda: None, quiet=True)
    return loop, rates


def test_the_learning_rate_anneals_by_the_time_cap(caplog: pytest.LogCaptureFixture) -> None:
    """A stage the cap will stop early ends its cosine where it will stop, not at a step it never reaches."""
    loop, rates = _run_loop(1000, 10.0, 1.0, caplog)  # 600 s of a 1000-s schedule
    assert loop.step in (600, 601) and 590 <= loop.schedule_end <= 601
    assert loop.summary()["schedule_steps"] == loop.schedule_end
    assert rates[-1] == pytest.approx(0.1, abs=0.01)  # annealed to the floor
    assert all(b <= a + 1e-12 for a, b in zip(rates[10:], rates[11:]))  # never raised again
    assert rates[:train.SCHEDULE_TIMED_STEPS] == [train.lr_at(s, 1000, 1.0, 10)
                                                   for s in range(train.SCHEDULE_TIMED_STEPS)]
    assert "stops training near step" in caplog.text


@pytest.mark.parametrize("seconds_per_step", [0.5, 0.595])
def test_a_stage_that_fits_its_cap_keeps_its_schedule(seconds_per_step: float,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Ending at the step count, or cut by less than 2% of it, the schedule is the step-based one."""
    loop, rates = _run_loop(1000, 10.0, seconds_per_step, caplog)
    assert loop.schedule_end == 1000 and loop.step >= 1000 * (1 - train.SCHEDULE_SLACK)
    assert rates == [train.lr_at(s, 1000, 1.0, 10) for s in range(len(rates))]
    assert "stops training near step" not in caplog.text


def test_the_training_record_says_the_commit_and_whether_the_code_differed_from_it() -> None:
    import re

    commit = train.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", commit), commit


def test_lm_focus_draws_the_named_prompts_more_often() -> None:
    """``LMTrainConfig.focus``: the LM's crops come from the named prompts focus_weight times as often; without
    it the draws are those of every earlier run (the same batches from the same seed)."""
    from export import data

    labels = np.repeat(np.arange(22), 3)
    codes = np.zeros((len(labels), 2, 10), np.int64)
    codes[:, 0, :] = np.arange(len(labels))[:, None]  # each clip says which it is
    cfg = train.LMTrainConfig(batch=64, frames=4, focus=(5, 7), focus_weight=3.0)
    weights = train.prompt_weights(cfg.focus, cfg.focus_weight)
    drawn = []
    for seed in range(40):
        batch, _, picked = train.lm_batch(codes, labels, data.prompts(), cfg, np.random.default_rng(seed), weights)
        drawn += [int(labels[c]) for c in batch[:, 0, 0]]
        assert picked.tolist() == [int(labels[c]) for c in batch[:, 0, 0]]
    share = np.bincount(drawn, minlength=22) / len(drawn)
    focused, rest = share[[4, 6]].mean(), np.delete(share, [4, 6]).mean()
    assert 2.4 < focused / rest < 3.6, (focused, rest)  # 3 expected, from 2560 crops
    plain = train.LMTrainConfig(batch=8, frames=4)
    a, ta, _ = train.lm_batch(codes, labels, data.prompts(), plain, np.random.default_rng(3))
    b, tb, _ = train.lm_batch(codes, labels, data.prompts(), plain, np.random.default_rng(3), None)
    assert torch.equal(a, b) and ta == tb


def test_cli_fine_tunes_a_packs_lm(base_pack: Path, tiny_pack_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`cicada train lm --codec PACK --init PACK --focus ...`: the pack's LM is read back from its graphs and
    fine-tuned; the record says where it started; a pack without a readable LM is refused with a remedy."""
    from engine import pack as packfmt
    from export.unpack import lm_from_pack

    lm = tmp_path / "lm"
    assert main(["train", "lm", "--codec", str(base_pack), "--init", str(base_pack), "--corpus-clips", "1",
                 "--steps", "1", "--batch", "2", "--threads", "1", "--focus", "5,7", "--focus-weight", "3",
                 "--contrast", "5:14, 7:1", "--contrast-margin", "0.5", "--lr", "1e-9", "--out", str(lm)]) == 0
    assert "lm: step 1" in capsys.readouterr().out
    state = torch.load(lm / train.CHECKPOINT, weights_only=False)
    assert tuple(state["config"]["focus"]) == (5, 7) and state["config"]["focus_weight"] == 3.0
    assert state["config"]["contrast"] == ((5, 14), (7, 1)) and state["config"]["contrast_margin"] == 0.5
    init = state["record"]["init"]
    assert init["pack"] == str(base_pack) and init["step"] == 6 and "checkpoint" not in init
    start, _, _, _ = lm_from_pack(packfmt.load(base_pack), check=False)
    tuned, _, _, _ = train.load_lm(lm / train.CHECKPOINT)
    for name, value in tuned.state_dict().items():  # one step at lr 1e-9 stays where the pack's LM was
        assert torch.allclose(value, start.state_dict()[name], atol=1e-6), name

    assert main(["train", "lm", "--codec", str(base_pack), "--init", str(tiny_pack_dir), "--corpus-clips", "1",
                 "--steps", "1", "--threads", "1", "--out", str(tmp_path / "lm2")]) == 1
    err = capsys.readouterr().err
    assert f"--init {tiny_pack_dir}" in err and "pass an LM checkpoint" in err and "Traceback" not in err
    assert main(["train", "lm", "--codec", str(base_pack), "--focus", "23", "--corpus-clips", "1", "--steps", "1",
                 "--threads", "1", "--out", str(tmp_path / "lm3")]) == 1
    assert "numbered 1 to 22" in capsys.readouterr().err
    assert main(["train", "lm", "--codec", str(base_pack), "--contrast", "5:23", "--corpus-clips", "1",
                 "--steps", "1", "--batch", "22", "--threads", "1", "--out", str(tmp_path / "lm4")]) == 1
    assert "contrast pair 5:23: prompts are numbered 1 to 22" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "lm", "--contrast", "5-14"])
    assert "expected pairs of prompt numbers like 5:14,2:4" in capsys.readouterr().err


def test_sigterm_stops_a_training_run_with_its_checkpoint_saved(tmp_path: Path) -> None:
    """`kill` (SIGTERM: what a service manager or CI runner sends; a background job ignores Ctrl-C's SIGINT)
    stops `cicada train` like Ctrl-C: the stage saves its checkpoint on the way out and the run resumes there."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "codec"
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "codec", "--out", str(out), "--steps",
                             "100000", "--batch", "1", "--threads", "1"], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stderr is not None
        end = time.monotonic() + 300
        for line in proc.stderr:  # the progress log's first line comes after the first step
            if "step 1/100000" in line or time.monotonic() > end:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    state = torch.load(out / train.CHECKPOINT, weights_only=False)
    assert state["step"] >= 1 and state["record"]["step"] == state["step"]
