"""Documents of a training/held-out text file, read the same way for the BPE tokenizer and for tokenization.

Formats: ``.jsonl``/``.json`` are JSON Lines (one object per line, the text in ``text_field``; blank lines are
skipped); ``.txt`` is plain UTF-8 text with one document per paragraph (paragraphs are separated by one or more
blank lines; a paragraph's line breaks are kept). Every problem is a :class:`DataError` naming the file and line.
"""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from qat.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
SUFFIXES = JSON_SUFFIXES + TEXT_SUFFIXES
# Bumped when the reading of a format changes, so token caches keyed on it are rebuilt.
TXT_FORMAT = "txt-paragraphs-v1"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) of a UTF-8 file; a bad byte is an error naming the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); re-encode the file as UTF-8") from None


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not JSON ({e.msg} at column {e.colno}); a {path.suffix} file "
                            "needs one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object; a "
                            f"{path.suffix} file needs one JSON object per line") from None
        if text_field not in record:
            raise DataError(f"{path}, line {number}: no field {text_field!r} (fields: {sorted(record)}); "
                            "set data.text_field or fix the file")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}, line {number}: field {text_field!r} is a {type(text).__name__}, not a string")
        yield text


def _paragraphs(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\r\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\r\n")


def read_documents(path: Path | str, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, in order (see the module docstring for the formats).

    Raises:
        DataError: unsupported suffix, bytes that are not UTF-8, a JSON line that is not an object with a string
            ``text_field`` (naming the file and line).
    """
    path = Path(path)
    if path.suffix in JSON_SUFFIXES:
        return _json_documents(path, text_field)
    if path.suffix in TEXT_SUFFIXES:
        return _paragraphs(path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl/.json (one JSON object per line "
                    "with a text field) or .txt (one document per blank-line-separated paragraph)")


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    """The documents of several files, file after file."""
    for path in paths:
        yield from read_documents(path, text_field)


def check_documents(paths: list[Path], text_field: str = "text") -> None:
    """Read every file once so a bad one fails before anything is trained or cached.

    Raises:
        DataError: a file is unreadable (as :func:`read_documents`) or holds no text at all.
    """
    for path in paths:
        has_text = False
        for doc in read_documents(path, text_field):  # to the end: a bad line anywhere must fail now
            has_text = has_text or bool(doc.strip())
        if not has_text:
            raise DataError(f"{path}: holds no text (the file is empty or every document is blank); "
                            "add text or drop the file")


def documents_fingerprint(file_hash: str, paths: list[Path], text_field: str) -> str:
    """Cache key of the documents read from ``paths`` whose content hash is ``file_hash``.

    JSON Lines read through the default field keep ``file_hash`` (caches built before this key existed stay
    valid); another text field or a .txt file (whose reading may change, see ``TXT_FORMAT``) changes it.
    """
    if text_field == "text" and all(Path(p).suffix in JSON_SUFFIXES for p in paths):
        return file_hash
    extra = f"{file_hash}|{text_field}|{TXT_FORMAT}"
    return hashlib.sha256(extra.encode()).hexdigest()[:16]
