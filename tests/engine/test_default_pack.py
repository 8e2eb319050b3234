"""The shipped default pack: valid, small, documented, and it follows reworded prompts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from engine import pack as packfmt
from engine.conditioner import Conditioner, PromptError

DEFAULT = Path(__file__).resolve().parents[2] / "packs" / "default"


@pytest.fixture(scope="module")
def pack() -> packfmt.Pack:
    return packfmt.load(DEFAULT)


@pytest.fixture(scope="module")
def conditioner(pack: packfmt.Pack) -> Conditioner:
    return Conditioner(pack)


def test_it_ships_small_with_its_training_record(pack: packfmt.Pack) -> None:
    size = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert size <= 50e6
    tr = pack.info["training"]
    for stage in ("codec_training", "lm_training"):
        rec = tr[stage]
        assert rec["command"].startswith("cicada train") and "losses" in rec and "device" in rec
        assert rec["config"]["seed"] == 0 and rec["step"] > 0
    assert pack.encoder is not None and len(pack.prompts) == 22
    assert pack.audio.sample_rate == 32000 and pack.audio.channels == 2
    assert pack.sampling == {"temperature": 0.9, "top_k": 250, "guidance": 1.5}  # what its eval measured


def pooled(c) -> np.ndarray:
    """Cross-attention values averaged over the prompt's tokens: what attention sees, order aside."""
    valid = c.mask == 0
    v = c.cross_v[:, :, valid].mean(axis=2)
    return (v / np.linalg.norm(v)).ravel()


def variants(prompt: str) -> list[str]:
    words = re.findall(r"[A-Za-z0-9-]+", prompt)
    return [
        prompt.upper(),
        " ".join(words).lower(),  # no punctuation
        " ".join(reversed(words)),  # another word order
        " ".join(words[1:]),  # the first word left out
    ]


def test_wording_close_to_a_prompt_conditions_like_that_prompt(pack: packfmt.Pack, conditioner: Conditioner) -> None:
    known = np.stack([pooled(conditioner.encode(p)) for p in pack.prompts])
    misses = []
    for i, p in enumerate(pack.prompts):
        for v in variants(p):
            nearest = int(np.argmax(known @ pooled(conditioner.encode(v))))
            if nearest != i:
                misses.append((v, pack.prompts[nearest]))
    # Every variant lands nearest its own prompt, except at most a few word drops that
    # leave two prompts almost the same words.
    assert len(misses) <= 4, misses


def test_unknown_prompt_is_refused(conditioner: Conditioner) -> None:
    with pytest.raises(PromptError, match="Continuous hum with pitch and frequency modulation"):
        conditioner.encode("purple elephants")


def test_play_defaults_render_sound(tmp_path: Path) -> None:
    import soundfile as sf

    from engine.cli import main

    out = tmp_path / "default.wav"
    assert main(["render", "--seconds", "3", "--out", str(out)]) == 0  # default pack, default preset
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 32000 and audio.shape[1] == 2
    rms_db = 20 * np.log10(np.sqrt(np.mean(audio[rate:] ** 2)) + 1e-12)
    assert -45 < rms_db < -1 and np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-4


def test_a_prompt_morph_leaves_each_prompt_without_a_step(pack: packfmt.Pack, conditioner: Conditioner) -> None:
    """A morph a hair away from either end predicts what that end predicts (KL of the LM's next-code
    distributions under 0.01 nats). Before the morph weighed each slot by its presence, a prompt's extra
    words took their share of the attention at once: 0.094 nats at w = 1e-4 from prompt 3 towards 21, and
    0.022 at w = 1 - 1e-4 from 7 towards 1 (against 0.9 and 0.8 between the prompts)."""
    from engine.conditioner import blend
    from engine.lm import LMSession

    lm = LMSession(pack)
    columns = np.random.default_rng(0).integers(0, pack.codebooks.cardinality, (8, pack.codebooks.count))

    def log_probs(c) -> np.ndarray:
        lm.reset()
        lm.set_condition(c.cross_k, c.cross_v, c.mask)
        logits = np.stack([lm.step(col.astype(np.int64))[0].copy() for col in columns]).astype(np.float64)
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        return float((np.exp(p) * (p - q)).sum(-1).mean())

    for i, j, w, end in ((3, 21, 1e-4, "a"), (7, 1, 1 - 1e-4, "b"), (21, 3, 1 - 1e-4, "b"), (1, 7, 1e-4, "a")):
        a, b = conditioner.encode(pack.prompts[i - 1]), conditioner.encode(pack.prompts[j - 1])
        la, lb, lw = log_probs(a), log_probs(b), log_probs(blend(a, b, w))
        assert kl(la, lb) > 0.3, (i, j)  # the two prompts differ
        assert kl(la if end == "a" else lb, lw) < 0.01, (i, j, w)
