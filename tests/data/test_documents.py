"""Reading training files: .txt paragraphs and JSON Lines, and a clear ``DataError`` (file, line, what is wrong)
for every bad file. Through the real CLI: exit code 2, one line, no traceback, nothing cached."""

import json
from pathlib import Path

import pytest

from qat.cli.main import main
from qat.data.corpus import default_corpus
from qat.data.documents import check_documents, documents_fingerprint, read_documents
from qat.errors import DataError
from tests.conftest import REPO, run_qat, run_qat_concurrently

RECIPE = str(REPO / "recipes" / "bitnet-b158-tiny.yaml")


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\nFirst line\nsecond line\n\n\n  \nSecond paragraph.\r\n\r\nThird\n")
    assert list(read_documents(path)) == ["First line\nsecond line", "Second paragraph.", "Third"]
    path.write_text("no newline at the end")
    assert list(read_documents(path)) == ["no newline at the end"]


def test_jsonl_documents_skip_blank_lines_and_read_the_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\n\\nthree"}\n')
    assert list(read_documents(path)) == ["one", "two\n\nthree"]
    path.write_text('{"body": "one"}\n')
    assert list(read_documents(path, "body")) == ["one"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", b"", r"empty\.jsonl: holds no text"),
    ("blank.txt", b"\n  \n\n", r"blank\.txt: holds no text"),
    ("latin1.txt", "ok\n\ncaf\u00e9\n".encode("latin-1"), r"latin1\.txt, line 3: not valid UTF-8 \(byte 0xe9"),
    ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1\.jsonl, line 1: not valid UTF-8"),
    ("nofield.jsonl", b'{"text": "a"}\n{"title": "b"}\n', r"nofield\.jsonl, line 2: no field 'text'"),
    ("notjson.jsonl", b'{"text": "a"}\n\nnot json\n', r"notjson\.jsonl, line 3: not JSON"),
    ("array.jsonl", b'["a"]\n', r"array\.jsonl, line 1: a JSON list, not an object"),
    ("number.jsonl", b'{"text": 5}\n', r"number\.jsonl, line 1: field 'text' is a int, not a string"),
    ("notes.csv", b"text\nhello\n", r"notes\.csv: unsupported file type '\.csv'"),
])
def test_bad_files_are_a_data_error_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        check_documents([path])


def test_a_bad_line_after_good_ones_is_found_before_training(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(1000)) + '{"title": "x"}\n')
    with pytest.raises(DataError, match="line 1001: no field 'text'"):
        check_documents([path])


def test_txt_and_other_fields_change_the_cache_key(tmp_path):
    jsonl, txt = tmp_path / "a.jsonl", tmp_path / "a.txt"
    # JSON Lines read through the default field keep the plain file hash (existing caches stay valid) ...
    assert documents_fingerprint("h", [jsonl], "text") == "h"
    # ... while a different reading of the same bytes gets its own key.
    assert documents_fingerprint("h", [jsonl], "body") != "h"
    assert documents_fingerprint("h", [txt], "text") not in ("h", documents_fingerprint("h", [jsonl], "body"))


def _cache_entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for sub in ("tokenizers", "tokens") if (cache / sub).is_dir()
            for p in (cache / sub).iterdir()}


BAD_FILES = {
    "empty.jsonl": b"",
    "latin1.txt": "Un caf\u00e9, s'il vous pla\u00eet.\n".encode("latin-1"),
    "nofield.jsonl": b'{"text": "a good line"}\n{"title": "no text here"}\n',
    "notjson.jsonl": b'{"text": "a good line"}\n{"text": "cut off\n',
}


def _fit_args(tmp_path: Path, bad: Path) -> list[str]:
    bad.write_bytes(BAD_FILES[bad.name])
    good = tmp_path / "val.txt"
    good.write_text("A held-out paragraph of plain text.\n")
    return ["fit", "--config", RECIPE, f"--data.train_files=[{bad}]", f"--data.val_files=[{good}]",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=1"]


def _assert_one_error_line(stderr: str, bad: Path, in_process: bool = False) -> None:
    # In-process, Lightning's log handler may still point at an earlier test's captured stream and print a
    # "--- Logging error ---" traceback of its own; a traceback of the DataError would name its type.
    assert "qat.errors.DataError" not in stderr if in_process else "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("qat fit: error: ") and str(bad) in errors[0], stderr


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_fit_rejects_a_bad_training_file_before_caching_anything(tmp_path, monkeypatch, capsys, name):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QAT_CACHE_DIR", str(cache))
    bad = tmp_path / name
    assert main(_fit_args(tmp_path, bad)) == 2
    _assert_one_error_line(capsys.readouterr().err, bad, in_process=True)
    assert _cache_entries(cache) == set()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_qat_command_rejects_bad_training_files_in_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QAT_CACHE_DIR", str(cache))
    bad_files = [tmp_path / name for name in sorted(BAD_FILES)]
    results = run_qat_concurrently(*(_fit_args(tmp_path, bad) for bad in bad_files), timeout=300)
    for bad, result in zip(bad_files, results):
        assert result.returncode == 2, result.stderr[-3000:]
        _assert_one_error_line(result.stderr, bad)
    assert _cache_entries(cache) == set()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tiny_training_run_on_txt_files(tmp_path, monkeypatch):
    # Real text: the first articles of the built-in corpus, one paragraph per document.
    articles = [json.loads(line)["text"] for line in default_corpus()["train"].read_text().splitlines()]
    (tmp_path / "train.txt").write_text("\n\n".join(articles[:6]) + "\n")
    (tmp_path / "val.txt").write_text("\n\n".join(articles[6:8]) + "\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("QAT_CACHE_DIR", str(cache))
    run_dir = tmp_path / "run"
    result = run_qat("fit", "--config", RECIPE, f"--data.train_files=[{tmp_path / 'train.txt'}]",
                     f"--data.val_files=[{tmp_path / 'val.txt'}]", "--data.seq_len=32", "--data.batch_size=2",
                     "--data.tokenizer_vocab_size=512", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
                     "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
                     "--model.optim.warmup_steps=1", f"--trainer.default_root_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    tokenizers = [p for p in (cache / "tokenizers").iterdir() if p.is_dir()]
    assert [p.name.startswith("bpe-512-") for p in tokenizers] == [True]  # no temporary folder left behind
    assert (tokenizers[0] / "tokenizer.json").is_file()


def test_a_failed_tokenizer_build_leaves_no_folder_in_the_cache(tmp_path, monkeypatch):
    from qat.data.tokenizer import tokenizer_dir

    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "train.jsonl"  # not checked first: the failure happens while the BPE trains
    bad.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(200)) + "{oops\n")
    with pytest.raises(DataError, match="line 201: not JSON"):
        tokenizer_dir("bpe", [bad], "text", 300, "fp")
    assert [p.name for p in (tmp_path / "cache" / "tokenizers").iterdir() if p.is_dir()] == []
