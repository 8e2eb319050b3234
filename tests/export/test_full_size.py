"""A full-size random MusicGen-small (T5-base, 32 kHz EnCodec) converts to a pack whose graphs load.

The slowest test of the suite (about 1.5 minutes on 2 cores): it goes through
save_pretrained and `cicada export huggingface`, exactly like a user's
checkpoint. Step timings of the same pack are the business of
`python -m export.bench`, not of this test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from engine import pack as packfmt  # noqa: E402
from engine.codec import DecoderSession  # noqa: E402
from export.architectures import random_pack  # noqa: E402


def test_musicgen_small_shape_converts_and_loads(tmp_path: Path) -> None:
    pack = random_pack("musicgen-small", tmp_path / "pack")
    assert (pack.lm["layers"], pack.lm["dim"], pack.lm["heads"]) == (24, 1024, 16)
    assert (pack.codebooks.count, pack.codebooks.cardinality) == (4, 2048)
    assert (pack.audio.sample_rate, pack.audio.hop_length, pack.audio.channels) == (32000, 640, 1)
    assert pack.decoder["lookahead_samples"] == 2402  # EnCodec 32 kHz, non-causal, reflect padding
    for g in (pack.conditioner, pack.lm):
        s = pack.session(g)
        assert [i.name for i in s.get_inputs()] == [t.name for t in g.inputs]
    dec = DecoderSession(pack)
    pcm = dec.step(np.zeros((1, 4, 1), np.int64))
    assert pcm.shape == (1, 640) and np.isfinite(pcm).all()
    packfmt.load(pack.path)  # and it validates again from disk
