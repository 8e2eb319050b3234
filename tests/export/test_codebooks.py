"""export/codebooks.py: the k-means re-fit of a trained codec's codebooks, and the LM's --init."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from export import codebooks, train
from tests.export.conftest import tiny_lm_cfg


def _clusters(seed: int = 0, k: int = 8, per: int = 50, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 5.0
    points = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(k * per, dim, generator=g)
    return points, centres


def test_a_stage_revives_a_collapsed_codebook() -> None:
    points, centres = _clusters()
    init = torch.zeros(8, 4)  # every codeword in one place: all but one start dead
    fitted = codebooks.kmeans_stage(points, init, iterations=20)
    assert len(codebooks.nearest(points, fitted).unique()) == 8  # no codeword left dead
    left = (points - fitted[codebooks.nearest(points, fitted)]).pow(2).sum()
    assert float(left) < 0.25 * float((points - points.mean(0)).pow(2).sum())
    # from a start near the answer it lands on the clusters' centres
    near = codebooks.kmeans_stage(points, centres + 0.5, iterations=5)
    assert float(torch.cdist(centres, near).min(1).values.max()) < 0.05


def test_residual_kmeans_leaves_less_than_the_trained_codebooks() -> None:
    points, _ = _clusters(seed=1, k=16, per=30, dim=6)
    g = torch.Generator().manual_seed(2)
    init = torch.randn(2, 16, 6, generator=g) * torch.tensor([3.0, 0.3])[:, None, None]
    before, _ = codebooks.quantise_residual(points, init)
    after, used = codebooks.quantise_residual(points, codebooks.residual_kmeans(points, init, 10))
    assert float(after.pow(2).sum()) < 0.1 * float(before.pow(2).sum())
    assert used[0] == 16


def test_kept_stages_stay_and_the_rest_fit_what_they_leave() -> None:
    points, _ = _clusters(seed=3, k=16, per=30, dim=6)
    init = torch.randn(3, 16, 6, generator=torch.Generator().manual_seed(4))
    out = codebooks.residual_kmeans(points, init, 5, keep=1)
    assert torch.equal(out[0], init[0]) and not torch.equal(out[1], init[1])
    kept, _ = codebooks.quantise_residual(points, out)
    before, _ = codebooks.quantise_residual(points, init)
    assert float(kept.pow(2).sum()) < float(before.pow(2).sum())


def test_relative_error_is_per_prompt() -> None:
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    labels = np.array([0, 0, 1, 1])
    embed = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # serves prompt 0 exactly, prompt 1 not at all
    err, used = codebooks.relative_error(z, labels, embed, prompts=3)
    assert err[0] == pytest.approx(0.0) and err[1] > 0.5 and np.isnan(err[2]) and used == [2]


def _tiny_cfg() -> codebooks.CodebooksConfig:
    return codebooks.CodebooksConfig(draws=1, seconds=0.5, iterations=2, held_out_draws=1)


def test_a_codec_checkpoint_gets_new_codebooks_and_keeps_its_networks(runs: Path, tmp_path: Path) -> None:
    src = runs / "codec" / train.CHECKPOINT
    rec = codebooks.train_codebooks(tmp_path / "cb", src, _tiny_cfg(), quiet=True)
    measured = rec["codebooks"]
    assert measured["error_after"] < measured["error_before"]
    assert len(measured["error_after_per_prompt"]) == 22 and measured["frames"] == 22 * 25
    assert measured["source_digest"] == train.file_digest(src) and rec["stage"] == "codec"
    old, _ = train.load_codec(src)
    new, new_rec = train.load_codec(tmp_path / "cb" / train.CHECKPOINT)
    assert new_rec["codebooks"]["error_after"] == measured["error_after"]
    for name, value in old.state_dict().items():
        same = torch.equal(value, new.state_dict()[name])
        assert same != name.startswith("quantizer."), name  # only the quantiser changed
    # `train codec` will not resume it as if it were a run of its own
    with pytest.raises(train.TrainError, match="re-fitted codebooks"):
        train.train_codec(tmp_path / "cb", None, device="cpu", quiet=True)


def test_too_few_draws_for_the_codewords_are_refused(runs: Path, tmp_path: Path) -> None:
    cfg = codebooks.CodebooksConfig(draws=1, seconds=0.02, iterations=1, held_out_draws=1)
    with pytest.raises(train.TrainError, match="raise --draws"):
        codebooks.train_codebooks(tmp_path / "cb", runs / "codec" / train.CHECKPOINT, cfg, quiet=True)
    cfg = codebooks.CodebooksConfig(draws=1, seconds=0.5, iterations=1, held_out_draws=1, keep=4)
    with pytest.raises(train.TrainError, match="keep 0 to 3"):
        codebooks.train_codebooks(tmp_path / "cb", runs / "codec" / train.CHECKPOINT, cfg, quiet=True)


def test_the_cli_refits_a_packs_codebooks_then_an_lm_starts_from_the_old_one(
        base_pack: Path, runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cb"
    args = ["train", "codebooks", "--codec", str(base_pack), "--out", str(out), "--draws", "1",
            "--iterations", "2", "--seconds", "0.5", "--held-out-draws", "1", "--keep", "1", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out quantisation error" in printed and f"cicada train lm --codec {out / train.CHECKPOINT}" in printed
    assert main(args) == 1
    assert "pass --force" in capsys.readouterr().err
    rec = torch.load(out / train.CHECKPOINT, weights_only=False)["record"]
    assert rec["source"] == str(base_pack) and rec["codebooks"]["command"].startswith("cicada ")
    assert rec["codebooks"]["config"]["keep"] == 1

    # the LM of the old codes starts the LM of the new ones
    lm = tmp_path / "lm"
    state = train.train_lm(lm, tiny_lm_cfg(1), codec_checkpoint=out / train.CHECKPOINT, device="cpu", quiet=True,
                           init=runs / "lm" / train.CHECKPOINT)
    assert state["init"]["checkpoint"] == str(runs / "lm" / train.CHECKPOINT) and state["init"]["step"] == 6
    # a different shape is refused with what to do
    other = tiny_lm_cfg(1)
    other.lm.update(dim=16, heads=2, ffn_dim=32)
    other.text.update(dim=16)
    with pytest.raises(train.TrainError, match="another shape"):
        train.train_lm(tmp_path / "lm2", other, codec_checkpoint=out / train.CHECKPOINT, device="cpu", quiet=True,
                       init=runs / "lm" / train.CHECKPOINT)


def test_init_starts_from_the_old_weights(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def no_training(self, cfg, opt, params, max_norm, step_fn, checkpoint, quiet, after=None):  # type: ignore[no-untyped-def]
        seen["first"] = [p.detach().clone() for p in params[:3]]
        checkpoint()

    monkeypatch.setattr(train.Loop, "run", no_training)
    train.train_lm(tmp_path / "lm", tiny_lm_cfg(1), codec_checkpoint=runs / "codec" / train.CHECKPOINT,
                   device="cpu", quiet=True, init=runs / "lm" / train.CHECKPOINT)
    old, text, _, _ = train.load_lm(runs / "lm" / train.CHECKPOINT)
    theirs = (list(old.parameters()) + list(text.parameters()))[:3]
    assert all(torch.equal(a, b) for a, b in zip(seen["first"], theirs))


def test_a_decoder_tuned_on_refitted_codes_keeps_the_old_decoders_record(runs: Path, tmp_path: Path) -> None:
    codebooks.train_codebooks(tmp_path / "cb", runs / "codec" / train.CHECKPOINT, _tiny_cfg(), quiet=True)
    ckpt = tmp_path / "cb" / train.CHECKPOINT
    state = torch.load(ckpt, weights_only=False)
    state["record"]["decoder"] = {"command": "cicada train decoder --codec packs/old"}  # as from a pack
    torch.save(state, ckpt)
    cfg = train.DecoderTrainConfig(steps=1, batch=1, segment=0.1, warmup=1)
    train.train_decoder(tmp_path / "dec", cfg, codec_checkpoint=ckpt, device="cpu", quiet=True)
    _, record = train.load_codec(ckpt, tmp_path / "dec" / train.CHECKPOINT)
    assert record["decoder"]["step"] == 1
    assert record["decoder"]["previous"]["command"] == "cicada train decoder --codec packs/old"
    assert "codebooks" in record
