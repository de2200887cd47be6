"""The default corpus: real Wikipedia articles shipped in gensim's test data, written once as JSONL.

105 articles (3.1M characters). Every 10th article is held out for validation, so no article appears in both.
"""

import bz2
import hashlib
import json
import re
from pathlib import Path

from filelock import FileLock

from qat.paths import atomic_write_bytes, cache_dir

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT_EVERY = 10
CORPUS_VERSION = "wiki-gensim-v1"


def _clean_wiki_text(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)                 # bold/italic quote markup
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia_articles() -> list[tuple[str, str]]:
    """(title, plain text) of each real article in gensim's test dump, redirects dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    with bz2.open(datapath(WIKI_FILE), "rb") as f:
        pages = [(title, filter_wiki(text)) for title, text, _ in extract_pages(f, filter_namespaces=("0",))
                 if not text.lower().startswith("#redirect")]
    return [(title, _clean_wiki_text(text)) for title, text in pages if text.strip()]


def default_corpus() -> dict[str, Path]:
    """Paths of ``train.jsonl`` and ``validation.jsonl`` of the default corpus (built once, then reused)."""
    root = cache_dir("corpora", CORPUS_VERSION)
    paths = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    with FileLock(str(root / ".lock")):
        if not all(p.is_file() for p in paths.values()):
            articles = wikipedia_articles()
            splits = {"train": [], "validation": []}
            for i, (title, text) in enumerate(articles):
                split = "validation" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
                splits[split].append(json.dumps({"title": title, "text": text}, ensure_ascii=False))
            for split, lines in splits.items():
                atomic_write_bytes(paths[split], ("\n".join(lines) + "\n").encode())
    return paths


def file_fingerprint(paths: list[Path]) -> str:
    """Content hash of data files (names, sizes and bytes), for cache keys."""
    h = hashlib.sha256()
    for p in sorted(map(Path, paths)):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
