"""export.probe: which prompts a run confuses, blamed on the decoder or the LM, and the cached probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from export import evaluate as ev  # noqa: E402
from export import probe, train  # noqa: E402


def _confusion(rows: dict[int, list[int]], size: int = 22) -> np.ndarray:
    """``[P, P]`` counts from {asked (0-based): [heard, ...]}; prompts not named are heard right, 3 times."""
    c = np.zeros((size, size), np.int64)
    for i in range(size):
        for lab in rows.get(i, [i, i, i]):
            c[i, lab] += 1
    return c


def test_the_codec_s_losses_go_to_the_decoder_the_lm_s_own_to_the_lm() -> None:
    """The module docstring's example: 2, rendered right but generated as 6, is the LM's; 5, whose clips
    miss more often than its reconstructions, is both's; 7 (missed as often either way) and 16 (only its
    reconstructions) are the decoder's."""
    confusion = _confusion({1: [5, 5, 1], 4: [13, 13, 13], 6: [0, 6, 6], 15: [15, 15, 15]})
    heard = {i: [i, i, i] for i in range(22)} | {4: [4, 4, 13], 6: [6, 0, 6], 15: [12, 15, 15]}
    assert probe.choose_focus(confusion, heard) == probe.Focus(lm=(5, 2), decoder=(5, 7, 16),
                                                               mistaken_for=((5, 14), (2, 6)))


def test_the_most_missed_come_first_and_the_lists_are_capped() -> None:
    confusion = _confusion({0: [1, 0, 0], 3: [1, 1, 1], 4: [1, 1, 4], 8: [1, 8, 8], 9: [2, 2, 9]})
    heard = {i: [i, i] for i in range(22)} | {10: [0, 10], 11: [0, 0], 12: [0, 12], 20: [3, 20]}
    focus = probe.choose_focus(confusion, heard, lm_max=3, decoder_max=2)
    assert focus.lm == (4, 5, 10)  # 3 of 3 missed, then the 2-of-3s (5 and 10); the 1-of-3s are cut, and
    #                                11, 12, 13, 21 miss no clip: their reconstructions are the decoder's
    assert focus.mistaken_for == ((4, 2), (5, 2), (10, 3))  # each with the prompt it is heard as most
    assert focus.decoder == (12, 11)  # 2 of 2, then the first of the 1-of-2s
    assert probe.choose_focus(_confusion({}), {i: [i] for i in range(22)}) == probe.Focus(lm=(), decoder=())


@pytest.fixture(scope="module")
def small_classifier() -> ev.SoundClassifier:
    return ev.SoundClassifier().fit(seed=0, clips_per_prompt=3, seconds=1.5, sample_rate=16000,
                                    heldout_clips_per_prompt=1)


def test_probe_packs_listens_and_caches(runs: Path, tmp_path: Path, small_classifier: ev.SoundClassifier,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real probe of tiny runs: the pack is written, clips are generated and reconstructions heard, the
    focus is the one :func:`choose_focus` makes of them, and a second probe of the same files reads the
    record back; another decoder file is probed again."""
    codec = runs / "codec" / train.CHECKPOINT
    dcfg = train.DecoderTrainConfig(steps=1, batch=2, segment=0.1, warmup=1)
    train.train_decoder(tmp_path / "dec", dcfg, codec_checkpoint=codec, device="cpu", quiet=True)
    files = dict(codec_checkpoint=codec, lm_checkpoint=runs / "lm" / train.CHECKPOINT,
                 decoder_checkpoint=tmp_path / "dec" / train.CHECKPOINT)
    cfg = probe.ProbeConfig(clips=1, seconds=1.0, codec_clips=1, codec_seconds=1.0)
    folder = tmp_path / "probe"
    rec = probe.probe(folder, cfg=cfg, classifier=small_classifier, progress=False, **files)
    assert (folder / "pack" / "manifest.toml").is_file() and (folder / "confusion.png").is_file()
    confusion = np.asarray(rec["confusion"])
    assert confusion.shape == (22, 22) and confusion.sum() == 22
    heard = {int(k) - 1: [x - 1 for x in v] for k, v in rec["codec_heard_as"].items()}
    assert len(heard) == 22 and all(len(v) == 1 for v in heard.values())
    focus = probe.choose_focus(confusion, heard, cfg.lm_max, cfg.decoder_max)
    assert rec["focus"] == dict(lm=list(focus.lm), decoder=list(focus.decoder),
                                mistaken_for=[list(p) for p in focus.mistaken_for])
    assert json.loads((folder / probe.PROBE_FILE).read_text()) == rec
    assert "LM focus (" in probe.summary(rec)

    def refuse(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(ev, "evaluate", refuse)
    assert probe.probe(folder, cfg=cfg, classifier=small_classifier, progress=False, **files) == rec
    train.train_decoder(tmp_path / "dec", train.DecoderTrainConfig(steps=2, batch=2, segment=0.1, warmup=1),
                        codec_checkpoint=codec, device="cpu", quiet=True)
    with pytest.raises(AssertionError, match="probed again"):  # the decoder trained on: its digest changed
        probe.probe(folder, cfg=cfg, classifier=small_classifier, progress=False, **files)
