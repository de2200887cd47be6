"""Top-k teacher logits for a training token stream, computed once and memory-mapped by every later run.

Layout of a cache folder ``$QAT_CACHE_DIR/teacher_logits/<key digest>/``:

- ``values.npy``  float32 (blocks, seq_len, k): the teacher's k largest logits per position, descending;
- ``indices.npy`` uint16 (int32 for vocabularies > 65,536) (blocks, seq_len, k): their token ids;
- ``manifest.json``: the key (data, teacher, tokenizer, k, shape) and the sha256 of both arrays.

A build writes into ``<digest>.partial/`` in chunks (``progress.json`` after each flushed chunk, so an interrupted
build resumes where it stopped), then writes the manifest and renames the folder into place: a folder without the
``.partial`` suffix is always complete. Opening a cache checks the key and the checksums; a cache built for other
data, another teacher, tokenizer or k is refused with what differs.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from filelock import FileLock

from qat.errors import TeacherError
from qat.paths import atomic_write_bytes, cache_dir, plain_file_name

CACHE_FORMAT = "qat-teacher-topk-v1"
MANIFEST, PROGRESS = "manifest.json", "progress.json"
ARRAYS = ("values.npy", "indices.npy")
REBUILD = "rebuild it with `qat cache-teacher --config <your recipe>` (same data, teacher, tokenizer and top_k)"


@dataclass(frozen=True)
class LogitCacheKey:
    """Everything the cached logits depend on."""

    tokens_sha256: str     # the exact token blocks (data files + tokenizer + seq_len + block selection)
    num_blocks: int
    seq_len: int
    teacher: str           # teacher weight fingerprint (qat.teachers.teacher_fingerprint)
    tokenizer_sha256: str
    top_k: int
    format: str = CACHE_FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def tokens_sha256(blocks: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(blocks, dtype=np.int32).tobytes()).hexdigest()


def tokenizer_sha256(tokenizer_dir: Path | str) -> str:
    return hashlib.sha256(Path(tokenizer_dir, "tokenizer.json").read_bytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _root(root: Optional[Path]) -> Path:
    return Path(root) if root is not None else cache_dir("teacher_logits")


class TeacherLogitCache:
    """Read side: ``lookup(block_indices)`` -> (values float32, indices int64) tensors (B, seq_len, k)."""

    def __init__(self, folder: Path, key: LogitCacheKey):
        self.folder, self.key = folder, key
        shape = (key.num_blocks, key.seq_len, key.top_k)
        try:
            self.values = np.load(folder / "values.npy", mmap_mode="r", allow_pickle=False)
            self.indices = np.load(folder / "indices.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TeacherError(f"teacher-logit cache {folder}: unreadable array ({e}). Delete {folder} and "
                               f"{REBUILD}") from None
        if self.values.shape != shape or self.indices.shape != shape:
            raise TeacherError(f"teacher-logit cache {folder}: arrays of shape {self.values.shape} / "
                               f"{self.indices.shape}, expected {shape}. Delete {folder} and {REBUILD}")

    def lookup(self, block_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(block_indices.cpu(), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.key.num_blocks):
            raise TeacherError(f"block index {int(rows.max())} is outside the teacher-logit cache "
                               f"({self.key.num_blocks} blocks); the data module and the cache disagree")
        values = torch.from_numpy(np.ascontiguousarray(self.values[rows]))
        indices = torch.from_numpy(np.ascontiguousarray(self.indices[rows]).astype(np.int64))
        return values, indices


def _describe_difference(expected: LogitCacheKey, found: dict) -> str:
    names = {"tokens_sha256": "data (token blocks)", "num_blocks": "number of blocks", "seq_len": "seq_len",
             "teacher": "teacher", "tokenizer_sha256": "tokenizer", "top_k": "top_k", "format": "format"}
    return ", ".join(f"{names[k]} ({found.get(k)!r:.24} != {v!r:.24})" for k, v in asdict(expected).items()
                     if found.get(k) != v)


def read_manifest(folder: Path) -> dict:
    """The manifest of a cache folder, checked: JSON, a ``key`` mapping, and a sha256 hex digest per array, under
    the array's plain file name (names come from the file: ``../x`` must never be opened).

    Raises:
        TeacherError: naming the folder, what is wrong and how to fix it.
    """
    def bad(problem: str) -> TeacherError:
        return TeacherError(f"teacher-logit cache {folder}: {MANIFEST} {problem}. Delete {folder} and {REBUILD}")

    try:
        manifest = json.loads((folder / MANIFEST).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"is not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise bad(f"is a JSON {type(manifest).__name__}, not an object")
    missing = [k for k in ("key", "sha256") if k not in manifest]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    if not isinstance(manifest["key"], dict):
        raise bad(f"has a key that is a {type(manifest['key']).__name__}, not an object")
    digests = manifest["sha256"]
    if not isinstance(digests, dict):
        raise bad(f"has sha256 as a {type(digests).__name__}, not an object")
    for name, digest in digests.items():
        try:
            plain_file_name(name, "array name")
        except ValueError as e:
            raise bad(f"names an {e}") from None
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise bad(f"has {digest!r} as the sha256 of {name!r}, not a hex digest")
    if sorted(digests) != sorted(ARRAYS):  # every array is checked, none is skipped by leaving it out
        raise bad(f"lists checksums of {sorted(digests)}, expected {list(ARRAYS)}")
    return manifest


def open_logit_cache(key: LogitCacheKey, root: Optional[Path] = None, verify: bool = True) -> TeacherLogitCache:
    """The complete cache for ``key``.

    Raises:
        TeacherError: none exists (naming how the closest existing cache differs, if any), or its manifest or
            checksums do not match (a stale, corrupted or malformed cache is never used).
    """
    root = _root(root)
    folder = root / key.digest()
    if not (folder / MANIFEST).is_file():
        others = []
        for manifest in sorted(root.glob(f"*/{MANIFEST}")):
            try:
                found = read_manifest(manifest.parent)["key"]
            except TeacherError:
                others.append(f"{manifest.parent.name}: malformed manifest")
                continue
            others.append(f"{manifest.parent.name}: {_describe_difference(key, found)}")
        partial = " (an interrupted build exists; rerunning the command resumes it)" \
            if (root / f"{key.digest()}.partial").is_dir() else ""
        stale = f" Existing caches are for other inputs and are refused: {'; '.join(others)}." if others else ""
        raise TeacherError(f"no teacher-logit cache for this data/teacher/tokenizer/top_k{partial}.{stale} "
                           f"Fix: {REBUILD}")
    manifest = read_manifest(folder)
    if manifest["key"] != asdict(key):
        raise TeacherError(f"teacher-logit cache {folder} is stale: {_describe_difference(key, manifest['key'])}. "
                           f"Delete it and {REBUILD}")
    if verify:
        for name, digest in manifest["sha256"].items():
            if not (folder / name).is_file() or _file_sha256(folder / name) != digest:
                raise TeacherError(f"teacher-logit cache {folder}: {name} is missing or does not match its checksum "
                                   f"(corrupted). Delete {folder} and {REBUILD}")
    return TeacherLogitCache(folder, key)


def build_logit_cache(key: LogitCacheKey, blocks: np.ndarray, teacher_logits: Callable[[torch.Tensor], torch.Tensor],
                      vocab_size: int, batch_size: int = 8, root: Optional[Path] = None, progress: bool = True,
                      stop_after_chunks: Optional[int] = None) -> Optional[TeacherLogitCache]:
    """Compute the top-k teacher logits of ``blocks`` (num_blocks, seq_len) and commit the cache for ``key``.

    ``teacher_logits(input_ids)`` returns (B, seq_len, vocab) logits. Resumes a matching interrupted build;
    restarts one whose progress does not match. ``stop_after_chunks`` stops early (returning None) to test resuming.
    """
    if blocks.shape != (key.num_blocks, key.seq_len):
        raise ValueError(f"blocks {blocks.shape} do not match the key ({key.num_blocks}, {key.seq_len})")
    root = _root(root)
    final, partial = root / key.digest(), root / f"{key.digest()}.partial"
    with FileLock(str(final) + ".lock"):
        if (final / MANIFEST).is_file():
            return open_logit_cache(key, root)
        done = 0
        progress_file = partial / PROGRESS
        shape = (key.num_blocks, key.seq_len, key.top_k)
        try:
            state = json.loads(progress_file.read_text())
            if state["key"] != asdict(key):
                raise ValueError("other key")
            values = np.load(partial / "values.npy", mmap_mode="r+")
            indices = np.load(partial / "indices.npy", mmap_mode="r+")
            if values.shape != shape or indices.shape != shape:
                raise ValueError("other shape")
            done = int(state["blocks_done"])
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(partial, ignore_errors=True)   # nothing usable: restart from scratch
            partial.mkdir(parents=True)
            values = np.lib.format.open_memmap(partial / "values.npy", "w+", np.float32, shape)
            indices = np.lib.format.open_memmap(partial / "indices.npy", "w+", _index_dtype(vocab_size), shape)
            atomic_write_bytes(progress_file, json.dumps({"key": asdict(key), "blocks_done": 0}).encode())

        from tqdm import tqdm

        bar = tqdm(total=key.num_blocks, initial=done, unit="block", desc="teacher top-k logits",
                   disable=not progress)
        chunks = 0
        with torch.no_grad():
            while done < key.num_blocks:
                end = min(done + batch_size, key.num_blocks)
                logits = teacher_logits(torch.from_numpy(np.asarray(blocks[done:end], dtype=np.int64)))
                if logits.shape[-1] != vocab_size:
                    raise TeacherError(f"teacher outputs {logits.shape[-1]} logits, expected {vocab_size}")
                top = logits.float().topk(key.top_k, dim=-1)
                values[done:end] = top.values.numpy()
                indices[done:end] = top.indices.numpy().astype(indices.dtype)
                values.flush()
                indices.flush()
                # Progress is committed only after the chunk's data is flushed: a kill loses at most one chunk.
                bar.update(end - done)
                done = end
                atomic_write_bytes(progress_file, json.dumps({"key": asdict(key), "blocks_done": done}).encode())
                chunks += 1
                if stop_after_chunks is not None and chunks >= stop_after_chunks and done < key.num_blocks:
                    bar.close()
                    return None
        bar.close()
        del values, indices
        manifest = {"key": asdict(key), "sha256": {n: _file_sha256(partial / n) for n in ("values.npy", "indices.npy")},
                    "index_dtype": str(_index_dtype(vocab_size))}
        atomic_write_bytes(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
        progress_file.unlink()
        os.replace(partial, final)
    return open_logit_cache(key, root)
