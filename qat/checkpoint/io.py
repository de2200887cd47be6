"""Checkpoint I/O: atomic writes (tmp file, fsync, rename), a checksum of the weights inside every ``.ckpt``, and
pickle-free loading (``weights_only=True``) that verifies it."""

import io
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qat.checkpoint.integrity import load_error_reason, state_dict_sha256
from qat.errors import CheckpointError
from qat.paths import ATOMIC_TEMP_NAME, atomic_write_bytes

# Lightning stores hyper-parameters as an AttributeDict (a plain dict subclass): safe to allow.
torch.serialization.add_safe_globals([AttributeDict])

STATE_SHA256_KEY = "qat_state_sha256"
# Only in DeepSpeed checkpoints: the dtype of each weight at save time. Consolidation returns the fp32 master
# weights; cast back to these dtypes they are the saved module weights again (bf16 params are rounded masters).
STATE_DTYPES_KEY = "qat_state_dtypes"


def with_state_checksum(checkpoint: dict[str, Any], record_dtypes: bool = False) -> dict[str, Any]:
    """``checkpoint`` plus ``qat_state_sha256``: the digest of its ``state_dict``, checked when it is loaded."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return checkpoint
    extra = {STATE_SHA256_KEY: state_dict_sha256(state)}
    if record_dtypes:
        extra[STATE_DTYPES_KEY] = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()
                                   if isinstance(v, torch.Tensor)}
    return {**checkpoint, **extra}


def verify_state_checksum(checkpoint: dict[str, Any], source: str | Path) -> None:
    """``CheckpointError`` when the weights no longer hash to the digest recorded at save time (bit rot, a torn
    copy, a bad disk: ``torch.load`` itself reads flipped tensor bytes without complaint)."""
    expected = checkpoint.get(STATE_SHA256_KEY)
    if expected is None:
        return  # written before qat recorded checksums, or not by qat: nothing to compare with
    state = checkpoint.get("state_dict")
    dtypes = checkpoint.get(STATE_DTYPES_KEY)
    if isinstance(state, dict) and isinstance(dtypes, dict):
        state = {k: v.to(getattr(torch, dtypes[k])) if isinstance(v, torch.Tensor) and k in dtypes else v
                 for k, v in state.items()}
    actual = state_dict_sha256(state) if isinstance(state, dict) else "no state_dict"
    if actual != expected:
        raise CheckpointError(f"checkpoint {source}: checksum mismatch (weights hash to {actual[:16]}, recorded "
                              f"{expected[:16]}): the file is corrupted; use another checkpoint of the run")


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` without executing pickled code and verify its weights' checksum.

    Raises:
        CheckpointError: missing, unreadable, not a checkpoint, pickled code, or checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt written by `qat fit` "
                              "(runs/<name>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or unsafe pickle
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error_reason(e)}. It may be truncated, "
                              "tampered with, or not a qat checkpoint") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                              "pass a .ckpt written by `qat fit`")
    verify_state_checksum(checkpoint, path)
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill during a save leaves the previous checkpoint intact, never a truncated one; every checkpoint carries
    the checksum of its weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        buffer = io.BytesIO()
        torch.save(with_state_checksum(checkpoint), buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return load_checkpoint_file(path)

    def remove_checkpoint(self, path) -> None:
        # DeepSpeed checkpoints are directories (one shard per rank); ModelCheckpoint's top-k/last rotation
        # removes them through here too.
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files ``atomic_write_bytes`` left in ``folder`` when a save was killed.

    Only plain files of exactly that pattern whose writer process is gone (a live writer is mid-save) and never
    anything else. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = ATOMIC_TEMP_NAME.match(path.name)
        if match and path.is_file() and not path.is_symlink() and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
