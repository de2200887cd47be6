"""``ruff check`` (config in pyproject.toml: pycodestyle, pyflakes, import order, 120 columns) is clean on the repo."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _ruff(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: `pip install -r requirements-cpu.txt` (it pins ruff)")
    # --no-cache: the check writes nothing into the checkout.
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_repo_passes_ruff():
    result = _ruff(".")
    assert result.returncode == 0, (f"ruff check found problems (`ruff check --fix .` fixes the [*] ones):\n"
                                    f"{result.stdout[-8000:]}{result.stderr[-2000:]}")


def test_ruff_config_catches_long_lines_and_unsorted_imports(tmp_path):
    """The repo config is the one applied, with the rules and line length it promises."""
    bad = tmp_path / "bad.py"
    # A 120-column line is fine, a 121-column one is not.
    lines = ["import sys", "import os", "", "A = '" + "a" * 114 + "'", "B = '" + "b" * 115 + "'",
             "print(os.sep, sys.argv)"]
    bad.write_text("\n".join(lines) + "\n")
    result = _ruff("--config", str(REPO / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bad.py:1:1: I001" in result.stdout, result.stdout
    assert result.stdout.count("E501") == 1 and "bad.py:5:121: E501 Line too long (121 > 120)" in result.stdout, \
        result.stdout
