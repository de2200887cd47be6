"""Models to evaluate, loaded from what a user points at: a qat export (reloaded by its format's runtime after
checking its checksums) or a training checkpoint, with the tokenizer it was trained with."""

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from qat.checkpoint.deepspeed import is_deepspeed_checkpoint
from qat.checkpoint.integrity import state_dict_sha256
from qat.checkpoint.trained import TrainedModel, load_trained_model
from qat.data.tokenizer import load_tokenizer
from qat.errors import CheckpointError, ExportError, QATError
from qat.export.folder import is_export, verify_export
from qat.export.formats import get_format
from qat.paths import plain_file_name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_exported_model(export_dir: str | Path, verify: bool = True) -> torch.nn.Module:
    """An export reloaded by its format's runtime (transformers for hf/hf-fp, qat's loaders for binary/GGUF),
    after checking every file against the manifest's SHA-256.

    Raises:
        ExportError: not an export, a file changed since export, or a file the runtime cannot read.
    """
    export_dir = Path(export_dir)
    manifest = verify_export(export_dir) if verify else json.loads((export_dir / "qat_export.json").read_text())
    fmt = get_format(manifest["format"])
    try:
        return fmt.load(export_dir).eval()
    except QATError:
        raise
    except Exception as e:  # safetensors/transformers/gguf errors on a damaged file
        raise ExportError(f"cannot load {export_dir} as a {fmt.name} export: {_one_line(e)}") from None


def classify_path(path: str) -> str:
    """``export`` or ``checkpoint``; CheckpointError for a missing path or anything else."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such path: {path}; pass an export folder (`qat export`) or a training checkpoint")
    if is_export(p):
        return "export"
    if p.is_file() and is_export(p.parent):
        raise CheckpointError(f"{path} is one file of the qat export {p.parent}; pass the folder: qat eval {p.parent}")
    if p.is_file() or is_deepspeed_checkpoint(p):
        return "checkpoint"
    raise CheckpointError(f"{path} is not a qat export or checkpoint (no qat_export.json, not a .ckpt file or "
                          "DeepSpeed checkpoint folder)")


def source_model(manifest: dict) -> Optional[TrainedModel]:
    """The export's source checkpoint when it is still there; ExportError when its weights changed since."""
    checkpoint = manifest.get("source_checkpoint")
    if not checkpoint or not Path(checkpoint).exists():
        return None
    trained = load_trained_model(checkpoint)
    if manifest.get("weights_sha256") and state_dict_sha256(trained.model.state_dict()) != manifest["weights_sha256"]:
        raise ExportError(f"the source checkpoint {checkpoint} holds other weights than when this export was written "
                          "(training continued or it was replaced); re-export it with `qat export --force`")
    return trained


def tokenizer_from_files(files: dict[str, str]) -> Any:
    """The HF tokenizer whose files (name -> text) a qat checkpoint stores."""
    if not files:
        raise CheckpointError("the checkpoint stores no tokenizer files; it was not written by `qat fit`")
    with tempfile.TemporaryDirectory(prefix="qat-tokenizer-") as folder:
        for name, text in files.items():
            (Path(folder) / plain_file_name(name, "tokenizer file name")).write_text(text)
        return load_tokenizer(folder)


def load_model_and_tokenizer(path: str, packed: bool = False) -> tuple[torch.nn.Module, Any]:
    """The model at ``path`` (an export, or a checkpoint's QAT model) in eval mode and its tokenizer;
    ``packed`` runs an export's quantized layers on qat's packed kernels (what ``qat generate`` runs).

    Raises:
        CheckpointError / ExportError: as :func:`classify_path`, :func:`load_exported_model`.
    """
    if classify_path(path) == "export":
        model = load_exported_model(path)
        if packed:
            from qat.nn.packed_linear import pack_model

            model = pack_model(model)
        return model, load_tokenizer(path)
    if packed:
        raise CheckpointError(f"{path} is a training checkpoint; packed kernels run an export: `qat export` it first")
    trained = load_trained_model(path)
    return trained.model, tokenizer_from_files(trained.tokenizer_files)
