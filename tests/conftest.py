"""Shared fixtures: tiny random-weight packs built once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jack_server import JackServer, jack_server, jackd_available

RATE = 48000


@pytest.fixture(scope="session")
def tiny_pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid pack of the 'test' shape (random weights, exported once)."""
    from export.architectures import random_pack

    out = tmp_path_factory.mktemp("packs") / "test"
    random_pack("test", out, seed=0)
    return out


@pytest.fixture
def pack_copy(tiny_pack_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny pack that a test may break."""
    dst = tmp_path / "pack"
    shutil.copytree(tiny_pack_dir, dst)
    return dst


@pytest.fixture
def server() -> Iterator[JackServer]:
    """A private JACK dummy server in the default (asynchronous) mode, as users run it."""
    if not jackd_available():
        pytest.skip("needs jackd and the JACK-Client package")
    with jack_server(rate=RATE, period=256, sync=False) as srv:
        yield srv


@pytest.fixture
def sync_server() -> Iterator[JackServer]:
    """A server in synchronous mode (jackd -S): each cycle waits for every client, so on a busy test machine
    the recorder never misses a cycle and a comparison can be sample-exact. (A client that dies without closing
    stalls such a server for seconds, so the tests that kill things use the asynchronous one.)"""
    if not jackd_available():
        pytest.skip("needs jackd and the JACK-Client package")
    with jack_server(rate=RATE, period=256, sync=True) as srv:
        yield srv


@pytest.fixture(autouse=True)
def private_user_presets(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Presets a test saves go to a private folder, never the user's ~/.config/cicada/presets."""
    folder = tmp_path_factory.mktemp("user-presets")
    monkeypatch.setenv("CICADA_PRESETS", str(folder))
    return folder
