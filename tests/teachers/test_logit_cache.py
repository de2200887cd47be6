"""Top-k teacher-logit cache: exact round trip, refusal of caches for other inputs, interrupted builds (also a real
SIGKILL) that resume and are never used half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qat.errors import TeacherError
from qat.teachers.logit_cache import LogitCacheKey, build_logit_cache, open_logit_cache, tokens_sha256

VOCAB, SEQ, K = 300, 12, 5


def _teacher(ids: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in teacher: fixed random embedding of each token (enough to test storage)."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3))
    return table[ids]


def _blocks(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ)).astype(np.int32)


def _key(blocks: np.ndarray, **changes) -> LogitCacheKey:
    key = LogitCacheKey(tokens_sha256=tokens_sha256(blocks), num_blocks=len(blocks), seq_len=SEQ,
                        teacher="teacher-a", tokenizer_sha256="tok-a", top_k=K)
    return replace(key, **changes)


def test_cache_round_trip_is_the_exact_teacher_top_k(tmp_path):
    blocks = _blocks()
    cache = build_logit_cache(_key(blocks), blocks, _teacher, VOCAB, batch_size=3, root=tmp_path, progress=False)
    rows = torch.tensor([7, 0, 9])
    values, indices = cache.lookup(rows)
    top = _teacher(torch.from_numpy(blocks[rows.numpy()]).long()).topk(K, dim=-1)
    assert torch.equal(values, top.values) and torch.equal(indices, top.indices)
    assert cache.indices.dtype == np.uint16
    # A second build is a no-op that returns the same cache.
    again = build_logit_cache(_key(blocks), blocks, lambda ids: pytest.fail("recomputed"), VOCAB, root=tmp_path)
    assert again.folder == cache.folder


@pytest.mark.parametrize("change,expected", [({"teacher": "teacher-b"}, "teacher"),
                                             ({"tokenizer_sha256": "tok-b"}, "tokenizer"),
                                             ({"top_k": 8}, "top_k")])
def test_cache_for_other_teacher_tokenizer_or_k_is_refused_naming_the_difference(tmp_path, change, expected):
    blocks = _blocks()
    build_logit_cache(_key(blocks), blocks, _teacher, VOCAB, root=tmp_path, progress=False)
    with pytest.raises(TeacherError, match=rf"refused: .*{expected} \(") as e:
        open_logit_cache(_key(blocks, **change), root=tmp_path)
    assert "qat cache-teacher" in str(e.value)


def test_cache_for_other_data_is_refused(tmp_path):
    blocks = _blocks()
    build_logit_cache(_key(blocks), blocks, _teacher, VOCAB, root=tmp_path, progress=False)
    other = _blocks(seed=1)
    with pytest.raises(TeacherError, match=r"data \(token blocks\)"):
        open_logit_cache(_key(other), root=tmp_path)


def test_corrupted_cache_fails_its_checksum(tmp_path):
    blocks = _blocks()
    cache = build_logit_cache(_key(blocks), blocks, _teacher, VOCAB, root=tmp_path, progress=False)
    folder = cache.folder
    del cache
    data = bytearray((folder / "values.npy").read_bytes())
    data[-1] ^= 0xFF
    (folder / "values.npy").write_bytes(bytes(data))
    with pytest.raises(TeacherError, match="checksum"):
        open_logit_cache(_key(blocks), root=tmp_path)


def test_interrupted_build_is_never_used_and_resumes_to_the_same_bytes(tmp_path):
    blocks = _blocks()
    key = _key(blocks)
    reference = build_logit_cache(key, blocks, _teacher, VOCAB, batch_size=3, root=tmp_path / "ref", progress=False)
    assert build_logit_cache(key, blocks, _teacher, VOCAB, batch_size=3, root=tmp_path, progress=False,
                             stop_after_chunks=2) is None
    with pytest.raises(TeacherError, match="interrupted build exists"):
        open_logit_cache(key, root=tmp_path)
    calls = []
    resumed = build_logit_cache(key, blocks, lambda ids: calls.append(len(ids)) or _teacher(ids), VOCAB,
                                batch_size=3, root=tmp_path, progress=False)
    assert sum(calls) == len(blocks) - 6          # only the blocks after the two committed chunks
    assert (resumed.folder / "values.npy").read_bytes() == (reference.folder / "values.npy").read_bytes()
    assert (resumed.folder / "indices.npy").read_bytes() == (reference.folder / "indices.npy").read_bytes()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_partial_build_for_another_key_is_restarted_not_mixed(tmp_path):
    blocks = _blocks()
    key = _key(blocks)
    build_logit_cache(key, blocks, _teacher, VOCAB, batch_size=3, root=tmp_path, progress=False, stop_after_chunks=1)
    partial = tmp_path / f"{key.digest()}.partial"
    progress = (partial / "progress.json").read_text().replace('"teacher-a"', '"teacher-z"')
    (partial / "progress.json").write_text(progress)        # as if left by a build for another teacher
    calls = []
    build_logit_cache(key, blocks, lambda ids: calls.append(len(ids)) or _teacher(ids), VOCAB, batch_size=3,
                      root=tmp_path, progress=False)
    assert sum(calls) == len(blocks)


KILL_SCRIPT = """
import sys, time, numpy as np, torch
sys.path.insert(0, {tests!r})
from teachers.test_logit_cache import _blocks, _key, _teacher, VOCAB
from qat.teachers.logit_cache import build_logit_cache
def slow(ids):
    time.sleep(0.3)
    return _teacher(ids)
blocks = _blocks(40)
build_logit_cache(_key(blocks), blocks, slow, VOCAB, batch_size=2, root={root!r}, progress=False)
"""


def test_sigkilled_build_leaves_no_usable_cache_and_resumes(tmp_path):
    root = tmp_path / "cache"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    blocks = _blocks(40)
    key = _key(blocks)
    progress = root / f"{key.digest()}.partial" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.is_file() and '"blocks_done": 4' in progress.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / key.digest()).exists()
    with pytest.raises(TeacherError, match="interrupted build"):
        open_logit_cache(key, root=root)
    calls = []
    cache = build_logit_cache(key, blocks, lambda ids: calls.append(len(ids)) or _teacher(ids), VOCAB,
                              batch_size=2, root=root, progress=False)
    assert 0 < sum(calls) < len(blocks)
    values, indices = cache.lookup(torch.arange(len(blocks)))
    top = _teacher(torch.from_numpy(blocks).long()).topk(K, dim=-1)
    assert torch.equal(values, top.values) and torch.equal(indices, top.indices)


def _break_manifest(folder: Path, edit) -> None:
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    result = edit(data)
    manifest.write_bytes(result if isinstance(result, bytes) else json.dumps(data).encode())


@pytest.mark.parametrize("edit,problem", [
    (lambda m: b"{ not json", "is not JSON"),
    (lambda m: b"\xff\xfe", "is not JSON"),
    (lambda m: json.dumps([m]).encode(), "is a JSON list, not an object"),
    (lambda m: m.pop("sha256"), "lacks sha256"),
    (lambda m: m.pop("key"), "lacks key"),
    (lambda m: m.update(key="abc"), "has a key that is a str"),
    (lambda m: m.update(sha256=["values.npy"]), "has sha256 as a list"),
    (lambda m: m.update(sha256={}), r"lists checksums of \[\]"),  # would skip every checksum
    (lambda m: m["sha256"].update({"values.npy": 5}), "not a hex digest"),
    (lambda m: m["sha256"].update({"../../outside.npy": m["sha256"]["values.npy"]}), "unsafe array name"),
    (lambda m: m["sha256"].update({"/etc/passwd": "0" * 64}), "unsafe array name"),
])
def test_malformed_manifest_is_a_teacher_error_naming_the_folder_and_the_fix(tmp_path, edit, problem):
    blocks = _blocks()
    cache = build_logit_cache(_key(blocks), blocks, _teacher, VOCAB, batch_size=4, root=tmp_path, progress=False)
    _break_manifest(cache.folder, edit)
    for verify in (True, False):
        with pytest.raises(TeacherError, match=problem) as error:
            open_logit_cache(_key(blocks), root=tmp_path, verify=verify)
        assert str(cache.folder) in str(error.value) and "qat cache-teacher" in str(error.value)
        assert "Delete" in str(error.value)


def test_another_cache_with_a_malformed_manifest_does_not_hide_the_real_message(tmp_path):
    blocks = _blocks()
    other = build_logit_cache(_key(blocks, top_k=3), blocks, _teacher, VOCAB, batch_size=4, root=tmp_path,
                              progress=False)
    _break_manifest(other.folder, lambda m: b"garbage")
    with pytest.raises(TeacherError, match="no teacher-logit cache.*malformed manifest.*qat cache-teacher"):
        open_logit_cache(_key(blocks), root=tmp_path)


def test_array_of_another_shape_is_refused_without_verification(tmp_path):
    blocks = _blocks()
    cache = build_logit_cache(_key(blocks), blocks, _teacher, VOCAB, batch_size=4, root=tmp_path, progress=False)
    np.save(cache.folder / "values.npy", np.zeros((2, SEQ, K), np.float32))
    with pytest.raises(TeacherError, match="expected .10, 12, 5.*qat cache-teacher"):
        open_logit_cache(_key(blocks), root=tmp_path, verify=False)
