"""The tree passes ``ruff check`` with the rules in pyproject.toml, so that CI catches what a review would."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("engine", "export", "gui", "scripts", "tests")


def test_ruff_check_is_clean() -> None:
    assert importlib.util.find_spec("ruff") is not None, (
        "ruff is not installed: pip install -e '.[dev]' (or run bash scripts/bootstrap.sh test)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *CHECKED],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"ruff check found problems (fix them, or `ruff check --fix`):\n{done.stdout}{done.stderr}")
