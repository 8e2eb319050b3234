"""Free-text prompts: close wording works, unknown words are ignored, no known word is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import pack as packfmt
from engine.cli import main
from engine.conditioner import Conditioner, PromptError


@pytest.fixture(scope="module")
def conditioner(tiny_pack_dir: Path) -> Conditioner:
    return Conditioner(packfmt.load(tiny_pack_dir))


def test_case_and_punctuation_do_not_matter(conditioner: Conditioner) -> None:
    a = conditioner.encode("Continuous, deep, spatial and gloomy")
    b = conditioner.encode("CONTINUOUS deep -- spatial AND gloomy!!")
    np.testing.assert_array_equal(a.cross_k, b.cross_k)
    assert a.unknown == b.unknown == ()


def test_unknown_words_are_named_and_ignored(conditioner: Conditioner) -> None:
    c = conditioner.encode("deep gloomy wobbly")
    assert c.unknown == ("wobbly",)


def test_a_prompt_with_no_known_word_is_refused_with_the_list(conditioner: Conditioner) -> None:
    with pytest.raises(PromptError) as err:
        conditioner.encode("purple elephants")
    msg = str(err.value)
    assert "purple elephants" in msg and "Continuous, deep, spatial and gloomy" in msg
    assert msg.count("\n") >= 22  # one line per known prompt


def test_empty_prompt_is_the_null_condition(conditioner: Conditioner) -> None:
    c = conditioner.encode("   ")
    assert not c.cross_k.any()


def test_render_refuses_an_unknown_prompt_in_one_line(tiny_pack_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["render", "--pack", str(tiny_pack_dir), "--prompt", "zzz qqq", "--seconds", "0.2",
                 "--out", str(tmp_path / "x.wav")])
    err = capsys.readouterr().err
    assert code != 0 and "no word of the prompt 'zzz qqq'" in err and "Traceback" not in err
    assert not (tmp_path / "x.wav").exists()


def test_a_morph_attends_each_slot_as_much_as_it_is_there(conditioner: Conditioner) -> None:
    """blend's mask: 0 where both prompts have a token, log(1 - w) / log w where only one has, padding stays
    padding; blends of blends keep the presence; the ends are the prompts themselves."""
    from engine.conditioner import blend
    from engine.lm import NEG

    a, b = conditioner.encode("deep gloomy"), conditioner.encode("continuous rapid sizzling elements")
    na, nb = int((a.mask == 0).sum()), int((b.mask == 0).sum())
    assert 0 < na < nb < len(a.mask)
    w = 0.25
    m = blend(a, b, w).mask
    np.testing.assert_allclose(m[:na], 0.0, atol=1e-7)  # both have a token
    np.testing.assert_allclose(m[na:nb], np.log(w), rtol=1e-6)  # only b
    assert (m[nb:] == NEG).all()  # neither
    np.testing.assert_allclose(blend(b, a, w).mask[na:nb], np.log(1 - w), rtol=1e-6)  # only the first
    twice = blend(blend(a, b, 0.5), b, 0.5).mask  # b's extra slots: 0.5 * 0.5 + 0.5
    np.testing.assert_allclose(twice[na:nb], np.log(0.75), rtol=1e-6)
    assert blend(a, b, 0.0) is a and blend(a, b, 1.0) is b
