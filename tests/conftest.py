"""Shared fixtures: tiny random-weight packs built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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
