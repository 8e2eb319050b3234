"""Pack loading: a valid pack loads; every malformed pack is refused with a precise message."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import tomli_w

from engine import pack as packfmt
from engine.cli import main as cli_main


def _edit_manifest(root: Path, fn) -> None:
    path = root / "manifest.toml"
    doc = tomllib.loads(path.read_text())
    fn(doc)
    path.write_text(tomli_w.dumps(doc))


def _refused(root: Path, *patterns: str) -> str:
    with pytest.raises(packfmt.PackError) as info:
        packfmt.load(root)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in message:\n{msg}"
    return msg


def test_valid_pack_loads(tiny_pack_dir: Path) -> None:
    p = packfmt.load(tiny_pack_dir)
    assert p.audio.hop_length * p.audio.frame_rate == p.audio.sample_rate
    assert p.lm["batch"] == 2
    assert p.decoder.input("codes").shape == (1, p.codebooks.count, p.decoder["frames_per_step"])
    # every declared state input pairs with an output of the same shape
    for t in p.decoder.inputs:
        if t.state:
            assert p.decoder.output(t.state).shape == t.shape


def test_sessions_open_and_match(tiny_pack_dir: Path) -> None:
    p = packfmt.load(tiny_pack_dir)
    for g in (p.decoder, p.lm, p.conditioner):
        s = p.session(g)
        assert [i.name for i in s.get_inputs()] == [t.name for t in g.inputs]
        assert [o.name for o in s.get_outputs()] == [t.name for t in g.outputs]


def test_missing_folder_and_manifest(tmp_path: Path) -> None:
    _refused(tmp_path / "nope", r"no such folder")
    _refused(tmp_path, r"manifest\.toml is missing")


def test_missing_graph_file(pack_copy: Path) -> None:
    (pack_copy / "decoder.onnx").unlink()
    _refused(pack_copy, r"decoder\.onnx is missing", r"re-export")


def test_renamed_tensor(pack_copy: Path) -> None:
    def rename(doc):
        doc["lm"]["inputs"][0]["name"] = "tokenz"

    _edit_manifest(pack_copy, rename)
    msg = _refused(pack_copy, r"lm\.onnx", r"'tokenz'", r"no such input")
    assert "'tokens'" in msg  # names the graph's real input too


def test_tensor_renamed_in_graph(pack_copy: Path) -> None:
    """The ONNX file's input was renamed (e.g. a re-export by other code)."""
    import onnx

    path = pack_copy / "decoder.onnx"
    model = onnx.load(str(path))
    old = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["codes_renamed" if i == old else i for i in node.input]
    model.graph.input[0].name = "codes_renamed"
    onnx.save(model, str(path))
    _refused(
        pack_copy,
        r"decoder\.onnx: the manifest declares input 'codes' but the graph has no such input",
        r"graph input 'codes_renamed' is not declared",
    )


def test_wrong_shape_declared(pack_copy: Path) -> None:
    def grow(doc):
        for t in doc["decoder"]["inputs"]:
            if t["name"] == "codes":
                t["shape"] = [1, t["shape"][1], 9]

    _edit_manifest(pack_copy, grow)
    _refused(pack_copy, r"\[decoder\] input 'codes' is declared \[1, \d+, 9\] int64, expected \[1, \d+, 1\] int64")


def test_graph_and_manifest_disagree(pack_copy: Path) -> None:
    """Both sides consistent in the manifest, but the ONNX file says otherwise."""

    def relabel(doc):
        doc["decoder"]["frames_per_step"] = 2
        for t in doc["decoder"]["inputs"]:
            if t["name"] == "codes":
                t["shape"][2] = 2
        for t in doc["decoder"]["outputs"]:
            if t["name"] == "pcm":
                t["shape"][2] *= 2

    _edit_manifest(pack_copy, relabel)
    _refused(pack_copy, r"decoder\.onnx: input 'codes' is \[1, \d+, 1\] int64 in the graph, the manifest expects \[1, \d+, 2\] int64")


def test_wrong_dtype(pack_copy: Path) -> None:
    def f(doc):
        doc["conditioner"]["inputs"][0]["dtype"] = "float32"

    _edit_manifest(pack_copy, f)
    _refused(pack_copy, r"text_tokens", r"float32", r"int64")


def test_corrupt_onnx(pack_copy: Path) -> None:
    (pack_copy / "lm.onnx").write_bytes(b"\x08\x07garbage" * 100)
    _refused(pack_copy, r"lm\.onnx", r"(not a readable ONNX model|holds no graph)")


def test_truncated_onnx(pack_copy: Path) -> None:
    data = (pack_copy / "decoder.onnx").read_bytes()
    (pack_copy / "decoder.onnx").write_bytes(data[: len(data) // 3])
    _refused(pack_copy, r"decoder\.onnx")


def test_unknown_manifest_key(pack_copy: Path) -> None:
    def f(doc):
        doc["audio"]["samplerate"] = 44100
        doc["colour"] = "blue"

    _edit_manifest(pack_copy, f)
    _refused(pack_copy, r"unknown key 'audio\.samplerate'", r"unknown key 'colour'", r"spelling")


def test_wrong_sample_rate(pack_copy: Path) -> None:
    def f(doc):
        doc["audio"]["sample_rate"] = 44100

    _edit_manifest(pack_copy, f)
    _refused(pack_copy, r"audio\.sample_rate 44100 does not equal hop_length \d+ x frame_rate")


def test_wrong_type_and_missing_key(pack_copy: Path) -> None:
    def f(doc):
        doc["audio"]["channels"] = "two"
        del doc["codebooks"]["delays"]

    _edit_manifest(pack_copy, f)
    _refused(pack_copy, r"'audio\.channels' must be an integer, found 'two'", r"missing key 'codebooks\.delays'")


def test_bad_toml(pack_copy: Path) -> None:
    (pack_copy / "manifest.toml").write_text("format = 1\n[audio\nsample_rate = 3")
    _refused(pack_copy, r"manifest\.toml: not valid TOML", r"line")


def test_future_format(pack_copy: Path) -> None:
    _edit_manifest(pack_copy, lambda d: d.__setitem__("format", 99))
    _refused(pack_copy, r"format 99 is not supported")


def test_missing_tokenizer(pack_copy: Path) -> None:
    (pack_copy / "tokenizer.json").unlink()
    _refused(pack_copy, r"tokenizer\.json is missing")


def test_cli_info_refuses_without_traceback(pack_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (pack_copy / "lm.onnx").write_bytes(b"")
    assert cli_main(["info", str(pack_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cicada: pack ") and "lm.onnx" in err
    assert "Traceback" not in err


def test_cli_info_ok(tiny_pack_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["info", str(tiny_pack_dir)]) == 0
    assert "every graph matches the manifest" in capsys.readouterr().out


def test_pack_sampling_is_optional_checked_and_played_with(pack_copy: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``[sampling]`` replaces the registry's defaults for this pack; a preset's own values still win; a value
    out of range or a misspelt key is refused with the key named."""
    from engine.app import RunOptions, initial_registry

    assert packfmt.load(pack_copy).sampling == {}  # a pack without the table: the registry's defaults
    _edit_manifest(pack_copy, lambda doc: doc.update(sampling={"temperature": 0.7, "guidance": 2}))
    pack = packfmt.load(pack_copy)
    assert pack.sampling == {"temperature": 0.7, "guidance": 2.0}

    plain = tmp_path / "plain.toml"
    plain.write_text('name = "plain"\nprompt = "hum"\n')
    reg, _ = initial_registry(RunOptions(pack=pack_copy, preset=str(plain)), pack)
    assert reg.get("temperature") == 0.7 and reg.get("guidance") == 2.0 and reg.get("top_k") == 250
    own = tmp_path / "own.toml"
    own.write_text('name = "own"\nprompt = "hum"\n[params]\ntemperature = 1.2\n')
    reg, _ = initial_registry(RunOptions(pack=pack_copy, preset=str(own)), pack)
    assert reg.get("temperature") == 1.2 and reg.get("guidance") == 2.0

    _edit_manifest(pack_copy, lambda doc: doc["sampling"].update(temperature=9.0))
    _refused(pack_copy, r"sampling\.temperature = 9\.0 is out of range")
    _edit_manifest(pack_copy, lambda doc: doc.update(sampling={"temprature": 0.5}))
    _refused(pack_copy, r"unknown key 'sampling\.temprature'")
