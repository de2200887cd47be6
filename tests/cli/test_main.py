"""The ``qat`` entry point: a user's mistake is one line ``qat <verb>: error: ...`` with exit code 2, a bug is one
line with exit code 1, and the traceback is shown only with ``--debug`` (before or after the verb)."""

import json
from pathlib import Path

import pytest

from qat.cli import main as cli
from qat.errors import RecipeError
from tests.conftest import REPO, run_qat


def read_user_file(path: str, kind: str = "json") -> None:
    """A verb for these tests: reads the file the user named the way qat's verbs do.

    Args:
        path: the file.
        kind: json | text | safetensors.
    """
    if kind == "json":
        json.loads(Path(path).read_text())
    elif kind == "text":
        Path(path).read_bytes().decode("utf-8")
    elif kind == "safetensors":
        from safetensors.torch import load_file

        load_file(path)


def raise_error(kind: str) -> None:
    """A verb for these tests that fails.

    Args:
        kind: qat | permission | bug.
    """
    if kind == "qat":
        raise RecipeError("data.seq_len=0 must be at least 2\n(multi-line messages print as one line)")
    if kind == "permission":
        raise PermissionError(13, "Permission denied", "/srv/locked/recipe.yaml")
    raise KeyError("an internal invariant broke")


@pytest.fixture
def test_verbs(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "read", f"{__name__}:read_user_file")
    monkeypatch.setitem(cli.COMMANDS, "fail", f"{__name__}:raise_error")


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("content,kind,message", [
    (b'{"a": 1,,}', "json", "a file is not valid JSON (Expecting property name"),
    (b"caf\xe9", "text", "a file is not valid UTF-8 text ("),
    (b"\xff" * 16, "safetensors", "not a valid safetensors file ("),
])
def test_bad_file_content_is_one_line_and_exit_2(tmp_path, capsys, test_verbs, content, kind, message):
    path = tmp_path / "user-file"
    path.write_bytes(content)
    assert cli.main(["read", str(path), "--kind", kind]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"qat read: error: {message}"), lines


def test_missing_or_forbidden_path_names_the_path(tmp_path, capsys, test_verbs):
    missing = tmp_path / "nope.json"
    assert cli.main(["read", str(missing)]) == 2
    assert _stderr_lines(capsys) == [f"qat read: error: {missing}: No such file or directory"]
    assert cli.main(["fail", "permission"]) == 2
    assert _stderr_lines(capsys) == ["qat fail: error: /srv/locked/recipe.yaml: Permission denied"]


def test_qat_error_is_one_line_and_exit_2(capsys, test_verbs):
    assert cli.main(["fail", "qat"]) == 2
    assert _stderr_lines(capsys) == ["qat fail: error: data.seq_len=0 must be at least 2 (multi-line messages "
                                     "print as one line)"]


def test_a_bug_is_one_line_exit_1_and_says_how_to_see_the_traceback(capsys, test_verbs):
    assert cli.main(["fail", "bug"]) == 1
    assert _stderr_lines(capsys) == ["qat fail: unexpected error: KeyError: 'an internal invariant broke' "
                                     "(run with --debug for the traceback)"]


@pytest.mark.parametrize("argv", [["--debug", "fail", "bug"], ["fail", "bug", "--debug"]])
def test_debug_shows_the_traceback_before_or_after_the_verb(capsys, test_verbs, argv):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "raise KeyError" in err
    assert err.rstrip().endswith("qat fail: unexpected error: KeyError: 'an internal invariant broke' "
                                 "(traceback above)")


def test_debug_keeps_exit_2_for_a_user_error(capsys, test_verbs):
    assert cli.main(["fail", "qat", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "qat.errors.RecipeError" in err
    assert err.rstrip().splitlines()[-1].startswith("qat fail: error: data.seq_len=0")


def test_help_documents_debug(capsys):
    assert cli.main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


def test_the_qat_command_without_and_with_debug(tmp_path):
    # The real console entry point on a verb that needs no torch (fast): a missing recipe is a RecipeError.
    missing = tmp_path / "missing.yaml"
    plain = run_qat("submit", str(missing), "--dry-run", timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [f"qat submit: error: recipe {str(missing)!r} does not exist; pass a "
                                                 "YAML file such as recipes/bitnet-b158-tiny.yaml"]
    debug = run_qat("--debug", "submit", str(missing), "--dry-run", cwd=REPO, timeout=120)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
