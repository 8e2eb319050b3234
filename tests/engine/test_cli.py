"""The `cicada` command: render determinism, bad input -> one clear line and an exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.cli import main


def _cicada(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def test_render_same_seed_same_samples(tiny_pack_dir: Path, tmp_path: Path) -> None:
    outs = []
    for name, seed in (("a.wav", "5"), ("b.flac", "5"), ("c.wav", "6")):
        out = tmp_path / name
        rc = main(["render", "--pack", str(tiny_pack_dir), "--seconds", "0.5", "--seed", seed, "--out", str(out)])
        assert rc == 0
        data, rate = sf.read(out, dtype="float32", always_2d=True)
        assert rate == 8000 and data.shape == (4000, 2)
        outs.append(data)
    np.testing.assert_allclose(outs[0], outs[1], atol=2**-15)  # FLAC is 24-bit
    assert not np.allclose(outs[0], outs[2])
    assert np.abs(outs[0]).max() <= 10 ** (-1 / 20) + 1e-6
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_render_prompt_and_rate(tiny_pack_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.wav"
    rc = main(["render", "--pack", str(tiny_pack_dir), "--seconds", "0.25", "--prompt", "Sci-fi, science fiction, "
               "squishy humming", "--rate", "12000", "--out", str(out)])
    assert rc == 0
    assert sf.info(out).samplerate == 12000 and sf.info(out).frames == 3000


def test_render_into_a_missing_folder(tiny_pack_dir: Path, tmp_path: Path) -> None:
    r = _cicada("render", "--pack", str(tiny_pack_dir), "--seconds", "1", "--out", str(tmp_path / "nope" / "x.wav"))
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pack_that_fails_validation(pack_copy: Path, tmp_path: Path) -> None:
    (pack_copy / "lm.onnx").write_bytes(b"not onnx")
    r = _cicada("render", "--pack", str(pack_copy), "--seconds", "1", "--out", str(tmp_path / "x.wav"))
    assert r.returncode == 1
    assert "lm.onnx" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize("latency", ["0", "-5", "abc"])
def test_bad_latency(tiny_pack_dir: Path, latency: str) -> None:
    r = _cicada("play", "--pack", str(tiny_pack_dir), f"--latency={latency}")
    assert r.returncode == 2
    assert "--latency" in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset_names_the_choices(tiny_pack_dir: Path, tmp_path: Path) -> None:
    r = _cicada("render", "--pack", str(tiny_pack_dir), "--preset", "nosuch", "--seconds", "1",
                "--out", str(tmp_path / "x.wav"))
    assert r.returncode == 1
    assert "nosuch" in r.stderr and "default" in r.stderr and "Traceback" not in r.stderr


def test_no_default_pack_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import app

    monkeypatch.delenv("CICADA_PACK", raising=False)
    monkeypatch.setattr(app, "DEFAULT_PACK", tmp_path / "packs" / "default")
    with pytest.raises(app.AppError, match="--pack"):
        app.pack_path(None)


def test_cuda_not_available_is_one_line(tiny_pack_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    r = _cicada("render", "--pack", str(tiny_pack_dir), "--compute", "cuda", "--seconds", "1",
                "--out", str(tmp_path / "x.wav"))
    assert r.returncode == 1 and "onnxruntime-gpu" in r.stderr and "Traceback" not in r.stderr


def test_preset_file_errors_are_named(tmp_path: Path) -> None:
    from engine import presets

    bad = tmp_path / "bad.toml"
    bad.write_text('prompt = "x"\n[params]\ntop_p = 3.0\n')
    with pytest.raises(presets.PresetError, match=r"bad.toml: params.top_p = 3.0 is out of range"):
        presets.load(str(bad))
    bad.write_text('prompt = "x"\ncolour = "red"\n')
    with pytest.raises(presets.PresetError, match="unknown key 'colour'"):
        presets.load(str(bad))
    bad.write_text("prompt = \n")
    with pytest.raises(presets.PresetError, match="not valid TOML"):
        presets.load(str(bad))
    assert presets.load("default").prompt


def test_shipped_presets_are_valid() -> None:
    from engine import presets

    for path in sorted(presets.PRESETS_DIR.glob("*.toml")):
        presets.load(str(path)).gen_params().sampling.checked()


def test_help_lists_the_commands() -> None:
    r = _cicada("--help")
    for cmd in ("play", "serve", "render", "devices", "bench"):
        assert cmd in r.stdout


def test_play_reaches_the_audio_process_start_without_numba_or_onnxruntime() -> None:
    """`play` starts the audio process before it loads the DSP and the pack's sessions (in a thread, while
    that process starts): importing what comes before must not pull in numba (about 0.5 s) or ONNX Runtime."""
    code = ("import sys, engine.cli, engine.app, engine.audio; "
            "print(sorted(m for m in ('numba', 'onnxruntime', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_presets_lists_shipped_and_saved_with_program_numbers(private_user_presets: Path) -> None:
    from engine import presets

    presets.save("zz-mine", {"prompt": "Rapid sizzling"}, description="saved here")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "presets"], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2], env={**os.environ})
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert any(line.split()[:2] == ["0", "01-glitchy-moving-panorama:"] for line in lines)
    assert any("zz-mine (saved): saved here" in line for line in lines)


def test_gui_passes_its_own_options_through() -> None:
    r = _cicada("gui", "--help")
    assert r.returncode == 0 and "--no-start" in r.stdout and "--large" in r.stdout


def test_serve_refuses_an_osc_port_it_cannot_have_and_a_network_host_without_allow_list(tiny_pack_dir: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        r = _cicada("serve", "--pack", str(tiny_pack_dir), "--null", "--seconds", "1", "--osc-port", str(port))
    assert r.returncode != 0 and "--osc-port" in r.stderr and "Traceback" not in r.stderr
    r = _cicada("serve", "--pack", str(tiny_pack_dir), "--null", "--seconds", "1", "--osc-host", "0.0.0.0")
    assert r.returncode != 0 and "--osc-allow" in r.stderr and "Traceback" not in r.stderr


def _free_port(kind: int) -> int:
    import socket

    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_null_answers_osc_and_oscquery_then_stops_on_sigint(tiny_pack_dir: Path) -> None:
    import json
    import signal
    import socket
    import time
    import urllib.request

    from pythonosc.osc_message import OscMessage
    from pythonosc.osc_message_builder import OscMessageBuilder

    osc_port, query_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--pack", str(tiny_pack_dir), "--null",
                             "--seconds", "60", "--osc-port", str(osc_port), "--oscquery-port", str(query_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])

    def ask(sock: socket.socket, address: str, *args: object) -> OscMessage:
        b = OscMessageBuilder(address)
        for a in args:
            b.add_arg(a)
        sock.sendto(b.build().dgram, ("127.0.0.1", osc_port))
        return OscMessage(sock.recv(65536))

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            deadline = time.monotonic() + 60
            while True:  # the engine loads, then answers
                try:
                    assert ask(sock, "/cicada/ping").address == "/cicada/pong"
                    break
                except (TimeoutError, ConnectionRefusedError):
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            sock.settimeout(5)
            reply = ask(sock, "/cicada/temperature", 0.5)
            assert reply.address == "/cicada/temperature" and reply.params == [0.5]
        with urllib.request.urlopen(f"http://127.0.0.1:{query_port}/cicada/temperature", timeout=5) as r:
            assert json.load(r)["VALUE"] == [0.5]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"OSC on udp 127.0.0.1:{osc_port}" in out and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
