"""Checkpoint I/O: atomic writes (tmp file, fsync, rename) and pickle-free loading (``weights_only=True``)."""

import io
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qat.errors import CheckpointError
from qat.paths import atomic_write_bytes

# Lightning stores hyper-parameters as an AttributeDict (a plain dict subclass): safe to allow.
torch.serialization.add_safe_globals([AttributeDict])


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` without executing pickled code; a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt written by `qat fit` "
                              "(runs/<name>/checkpoints/last.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or unsafe pickle
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. It may be truncated or not a qat checkpoint.") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill during a save leaves the previous checkpoint intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return load_checkpoint_file(path)

    def remove_checkpoint(self, path) -> None:
        # DeepSpeed checkpoints are directories (one shard per rank); ModelCheckpoint's top-k/last rotation
        # removes them through here too.
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)


class SaveLastOnTrainEnd(Callback):
    """Writes ``last.ckpt`` when training ends between two scheduled checkpoints, so the final weights are kept."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.last_saved_step = -1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.last_saved_step = checkpoint.get("global_step", trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step and not trainer.interrupted:
            trainer.save_checkpoint(self.path)
