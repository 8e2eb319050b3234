"""Presets: shipped ones load, round trips are equal, bad files are refused with file, key and reason,
and an interrupted save leaves the old file whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import pack as packfmt
from engine import presets
from engine.params import PARAMS, Registry


def test_every_shipped_preset_loads_and_fits_the_registry() -> None:
    shipped = sorted(p.stem for p in presets.PRESETS_DIR.glob("*.toml"))
    assert len(shipped) >= 23
    assert shipped == [n for n in presets.names() if n in shipped]
    for name in shipped:
        pre = presets.load(name)
        assert pre.prompt.strip(), name
        Registry(PARAMS, pre.values)  # every value is a registry value, in range


def test_round_trip_save_load_equal(tmp_path: Path) -> None:
    reg = Registry()
    reg.update({"prompt": "Rapid sizzling", "prompt_b": "Deep, spatial and gloomy", "morph": 0.25,
                "temperature": 0.7, "top_k": 40, "top_p": 0.9, "guidance": 4.5, "seed": 123, "gain_db": -3.5,
                "mute": True, "quantize": "bar", "slot_3": "Rapid sizzling"})
    midi = {"note_base": 48, "cc": [{"param": "morph", "control": 21, "channel": -1, "mode": "absolute"}]}
    osc = {"/1/fader1": "morph"}
    path = presets.save("my set", reg.snapshot().values, description="for tonight", extra={"midi": midi, "osc": osc},
                        folder=tmp_path)
    assert path == tmp_path / "my set.toml"
    back = presets.load("my set", tmp_path)
    assert back.name == "my set" and back.description == "for tonight"
    assert dict(back.values) == dict(reg.snapshot().values)
    assert dict(back.osc) == osc
    assert back.midi["note_base"] == 48 and back.midi["cc"][0]["param"] == "morph"
    assert [p.name for p in tmp_path.iterdir()] == ["my set.toml"]  # no temporary left behind


def test_saved_user_preset_is_found_first(private_user_presets: Path) -> None:
    presets.save("default", {"prompt": "Rapid sizzling"})
    assert presets.find("default") == private_user_presets / "default.toml"
    assert presets.load("default").prompt == "Rapid sizzling"
    assert "default" in presets.names()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('prompt = "a\nname = 1', ["bad.toml", "not valid TOML"]),
        ('prompt = "x"\nloudness = 3', ["bad.toml", "unknown key 'loudness'"]),
        ('prompt = "x"\n[params]\nwarmth = 1.0', ["bad.toml", "params.warmth", "unknown"]),
        ('prompt = "x"\n[params]\ntemperature = 99.0', ["bad.toml", "params.temperature", "out of range"]),
        ('prompt = "x"\n[params]\ntop_k = "many"', ["bad.toml", "params.top_k", "must be a whole number"]),
        ('prompt = "x"\n[params]\ntop_k = 2.5', ["bad.toml", "params.top_k", "must be a whole number"]),
        ('prompt = "x"\n[params]\nmute = 1', ["bad.toml", "params.mute", "must be true or false"]),
        ('prompt = "x"\n[params]\nquantize = "bars"', ["bad.toml", "params.quantize", "must be one of"]),
        ('prompt = 5', ["bad.toml", "prompt must be a str"]),
        ('prompt = "x"\n[params]\nprompt = "y"', ["bad.toml", "params.prompt", "top level"]),
        ('prompt = "x"\n[osc]\n"/fader" = "nothing"', ["bad.toml", "osc"]),
    ],
)
def test_malformed_preset_refused_with_file_key_and_reason(tmp_path: Path, text: str, needles: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(presets.PresetError) as err:
        presets.load(str(bad))
    for needle in needles:
        assert needle in str(err.value)


def test_interrupted_save_leaves_old_preset_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    presets.save("live", {"prompt": "Rapid sizzling", "temperature": 0.5}, folder=tmp_path)
    before = (tmp_path / "live.toml").read_bytes()

    real = packfmt.os.fsync

    def crash(fd: int) -> None:  # the process dies after writing, before the rename
        real(fd)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(packfmt.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        presets.save("live", {"prompt": "Deep, spatial and gloomy", "temperature": 2.0}, folder=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "live.toml").read_bytes() == before
    assert presets.load("live", tmp_path).values["temperature"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["live.toml"]


def test_bad_name_and_unwritable_folder_are_clear(tmp_path: Path) -> None:
    with pytest.raises(presets.PresetError, match="preset name"):
        presets.save("../escape", {"prompt": "x"}, folder=tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(presets.PresetError, match="cannot write"):
        presets.save("ok", {"prompt": "x"}, folder=blocker / "sub")


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(presets.PresetError) as err:
        presets.load("no-such-preset")
    assert "default" in str(err.value) and "cicada presets" in str(err.value)
