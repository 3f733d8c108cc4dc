"""The linter and the type checker, run by the test command: both clean.

ruff with the pyflakes, pycodestyle, import-order, bugbear, async (trio) and
pyupgrade rules; mypy on the sans-I/O packages and the public API (the
configuration is in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = _run("mypy", "--cache-dir", "/tmp/mmnotify-mypy-cache")
    assert result.returncode == 0, result.stdout + result.stderr
