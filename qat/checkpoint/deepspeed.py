"""Training checkpoints written by DeepSpeed (a directory per checkpoint, one shard per rank), read back as the
dict a Lightning ``.ckpt`` gives, so export and evaluation take either.

Consolidation is Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` (DeepSpeed's zero_to_fp32 inside).
Both call ``torch.load(weights_only=False)``; here they run with every ``torch.load`` forced to
``weights_only=True`` plus an allow-list of the few plain classes DeepSpeed pickles, so no pickled code runs.
"""

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from qat.checkpoint.integrity import load_error_reason
from qat.errors import CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def check_deepspeed_checkpoint(path: str | Path) -> Path:
    """The tag folder of a complete DeepSpeed checkpoint; ``CheckpointError`` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint directory")
    latest = path / "latest"
    if not latest.is_file():
        # DeepSpeed writes `latest` after the shards: without it the save did not finish.
        raise CheckpointError(f"{path} has no 'latest' file: the DeepSpeed save did not finish; "
                              "resume from an older checkpoint")
    tag_dir = path / latest.read_text().strip()
    if not (tag_dir / MODEL_STATES).is_file() or not any(tag_dir.glob("*optim_states.pt")):
        raise CheckpointError(f"{tag_dir} lacks {MODEL_STATES} or the optimizer shards: incomplete DeepSpeed "
                              "checkpoint; resume from an older checkpoint")
    return tag_dir


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block every ``torch.load`` (DeepSpeed's and Lightning's included) runs with ``weights_only=True``
    and allows only the few plain classes DeepSpeed checkpoints hold: a pickled payload is refused, not run."""
    original = torch.load

    def load_weights_only(*args: Any, **kwargs: Any):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load_weights_only
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def _deepspeed_safe_globals() -> list:
    # Plain containers DeepSpeed stores next to the tensors (client args, zero stage enum, loss scaler state).
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from lightning.fabric.utilities.data import AttributeDict

    from qat.nn.config import ArchConfig, QuantConfig
    from qat.train.schedule import OptimConfig

    # qat's own config dataclasses travel in the hyper-parameters Lightning stores with the client state.
    return [argparse.Namespace, ZeroStageEnum, LossScaler, fragment_address, AttributeDict, ArchConfig, QuantConfig,
            OptimConfig]


def deepspeed_checkpoint_step(path: str | Path) -> int:
    """The global step recorded in a DeepSpeed checkpoint folder (read from its model-states file, weights only).

    Raises:
        CheckpointError: incomplete or unreadable checkpoint.
    """
    model_states = check_deepspeed_checkpoint(path) / MODEL_STATES
    try:
        with weights_only_loads():
            state = torch.load(model_states, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated shard
        raise CheckpointError(f"cannot read DeepSpeed checkpoint {path} ({model_states.name}): "
                              f"{load_error_reason(exc)}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"DeepSpeed checkpoint {path} records no global_step; it was not written by `qat fit`")
    return state["global_step"]


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as the dict ``torch.load(ckpt, weights_only=True)`` gives for a Lightning ``.ckpt``:
    ``state_dict`` (full fp32 weights, consolidated from the ZeRO shards), ``global_step``, ``hyper_parameters``,
    ``loops``, callback and module extras. Accepts a ``.ckpt`` file or a DeepSpeed checkpoint directory.

    Raises:
        CheckpointError: missing, incomplete or unreadable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt file or DeepSpeed checkpoint folder "
                              "written by `qat fit` (e.g. runs/<name>/checkpoints/last.ckpt)")
    if path.is_file():
        from qat.checkpoint.io import load_checkpoint_file

        return load_checkpoint_file(path)
    check_deepspeed_checkpoint(path)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp, weights_only_loads():
        try:
            checkpoint = convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "consolidated.ckpt")
        except Exception as exc:  # unpickling refused, shard missing, mismatched world size
            raise CheckpointError(f"cannot consolidate DeepSpeed checkpoint {path}: {load_error_reason(exc)}") from exc
    from qat.checkpoint.io import verify_state_checksum

    verify_state_checksum(checkpoint, path)
    return checkpoint
