"""The code stays lint-clean under the rules in pyproject.toml ([tool.ruff]): one import order,
no unused names, and bugbear's checks for late-bound loop variables in closures and zips that
silently drop the tail of the longer input.

Ruff checks the whole repository in well under a second, so this runs in the fast lane even
though it starts a subprocess.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("ruff", reason="ruff is not installed (it comes with pip install -e '.[test]')")


def test_ruff_finds_nothing():
    # --no-cache: a test run never writes into the source tree
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (f"ruff check found problems (fix them, or run `.venv/bin/ruff check --fix .` "
                                    f"for the safe ones):\n{result.stdout}{result.stderr}")
