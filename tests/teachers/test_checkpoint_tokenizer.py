"""Tokenizer files stored in a checkpoint used as a teacher: their names are untrusted (a crafted checkpoint must
not write outside the cache), so only plain file names are accepted."""

import pytest

from qat.errors import TeacherError
from qat.teachers.load import _tokenizer_dir_from_files


def _all_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["../escaped.json", "../../escaped.json", "sub/../../escaped.json", "sub/x.json",
                                  "ABSOLUTE", "..", ".", "", "tokenizer.json\n", "a\\..\\b"])
def test_unsafe_tokenizer_file_names_write_nothing(tmp_path, monkeypatch, name):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QAT_CACHE_DIR", str(cache))
    if name == "ABSOLUTE":
        name = str(tmp_path / "escaped.json")
    files = {"tokenizer_config.json": "{}", name: '{"pwned": true}'}
    with pytest.raises(TeacherError, match="unsafe tokenizer file name.*use another teacher source") as error:
        _tokenizer_dir_from_files(files, "crafted.ckpt")
    assert "crafted.ckpt" in str(error.value)
    assert _all_files(tmp_path) == []  # not even the cache folder: checked before anything is written


@pytest.mark.parametrize("files,message", [
    ({"tokenizer.json": b"bytes"}, "is a bytes, not text"),
    (["tokenizer.json"], "are a list, not a mapping"),
    ({5: "{}"}, "unsafe tokenizer file name 5"),
])
def test_malformed_tokenizer_files_are_a_teacher_error(tmp_path, monkeypatch, files, message):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(TeacherError, match=message):
        _tokenizer_dir_from_files(files, "crafted.ckpt")
    assert _all_files(tmp_path) == []


def test_plain_names_are_written_into_one_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    folder = _tokenizer_dir_from_files({"tokenizer.json": '{"a": 1}', "tokenizer_config.json": "{}"})
    assert folder.parent == tmp_path / "cache" / "teachers"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert (folder / "tokenizer.json").read_text() == '{"a": 1}'
    # The same files again: the same folder, nothing else written.
    before = _all_files(tmp_path)
    assert _tokenizer_dir_from_files({"tokenizer_config.json": "{}", "tokenizer.json": '{"a": 1}'}) == folder
    assert _all_files(tmp_path) == before
