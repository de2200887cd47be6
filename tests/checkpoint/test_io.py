import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from qat.checkpoint.integrity import state_dict_sha256
from qat.checkpoint.io import STATE_SHA256_KEY, AtomicCheckpointIO, load_checkpoint_file, remove_stale_temp_files
from qat.errors import CheckpointError
from qat.paths import atomic_write_bytes


def _checkpoint(value: float) -> dict:
    return {"global_step": int(value), "state_dict": {"model.w": torch.full((64, 64), value)}}


def corrupt_tensor_bytes(path: Path, record: str = "data/0") -> None:
    """Overwrite 16 bytes inside the stored bytes of one tensor (the zip entry ``archive/<record>``)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header, name, extra
    data[start + 64:start + 80] = os.urandom(8) + b"\xff" * 8  # never all equal to the original
    path.write_bytes(bytes(data))


class Payload:
    """Unpickling this creates a marker file: proof that a load ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_save_records_the_weights_checksum_and_load_verifies_it(tmp_path):
    path = tmp_path / "step-000001.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), path)
    loaded = load_checkpoint_file(path)
    assert loaded[STATE_SHA256_KEY] == state_dict_sha256(_checkpoint(1.0)["state_dict"])
    assert torch.equal(loaded["state_dict"]["model.w"], torch.ones(64, 64))


def test_corrupted_tensor_bytes_are_a_checksum_error_naming_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), path)
    corrupt_tensor_bytes(path)
    # torch.load alone reads the flipped bytes without complaint: only the checksum notices.
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["model.w"], torch.ones(64, 64))
    with pytest.raises(CheckpointError, match=r"last\.ckpt: checksum mismatch .* corrupted"):
        load_checkpoint_file(path)


def test_load_refuses_a_pickle_payload_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint_file(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: unpickled, it creates the marker
    assert marker.exists()


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    before = path.read_bytes()

    def fail_fsync(fd):
        raise OSError(28, "No space left on device")

    # The failure hits after the new bytes are in the temp file, before the rename.
    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(_checkpoint(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert load_checkpoint_file(path)["global_step"] == 1


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_remove_stale_temp_files_removes_only_dead_writers_temp_files(tmp_path):
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".last.ckpt.tmp-{dead_pid}"
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}"  # a save in progress
    others = [tmp_path / "last.ckpt", tmp_path / "notes.tmp-1", tmp_path / f".x.tmp-{dead_pid}.bak"]
    for p in [stale, live, *others]:
        p.write_bytes(b"x")
    (tmp_path / f".dir.tmp-{dead_pid}").mkdir()  # not a file qat writes
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and all(p.exists() for p in others)
    assert (tmp_path / f".dir.tmp-{dead_pid}").is_dir()


def test_remove_checkpoint_removes_files_and_deepspeed_directories(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "step-000001.ckpt")
    zero = tmp_path / "step-000002.ckpt" / "checkpoint"  # a DeepSpeed checkpoint is a directory of shards
    zero.mkdir(parents=True)
    (zero / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    io.remove_checkpoint(tmp_path / "step-000001.ckpt")
    io.remove_checkpoint(tmp_path / "step-000002.ckpt")
    io.remove_checkpoint(tmp_path / "missing.ckpt")  # nothing there: no error
    assert list(tmp_path.iterdir()) == []
