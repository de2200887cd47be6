"""Models to evaluate, loaded from what a user points at: a qat export (reloaded by its format's runtime after
checking its checksums, see ``qat.cli.evaluate``) or a training checkpoint, with the tokenizer it was trained with."""

import tempfile
from pathlib import Path
from typing import Any

import torch

from qat.checkpoint.trained import load_trained_model
from qat.data.tokenizer import load_tokenizer
from qat.errors import CheckpointError
from qat.paths import plain_file_name


def tokenizer_from_files(files: dict[str, str]) -> Any:
    """The HF tokenizer whose files (name -> text) a qat checkpoint stores."""
    if not files:
        raise CheckpointError("the checkpoint stores no tokenizer files; it was not written by `qat fit`")
    with tempfile.TemporaryDirectory(prefix="qat-tokenizer-") as folder:
        for name, text in files.items():
            try:
                safe = plain_file_name(name, "tokenizer file name")
            except ValueError as e:   # names come from the checkpoint: never joined to a folder unchecked
                raise CheckpointError(f"the checkpoint's tokenizer files: {e}") from None
            (Path(folder) / safe).write_text(text)
        return load_tokenizer(folder)


def load_model_and_tokenizer(path: str, packed: bool = False) -> tuple[torch.nn.Module, Any]:
    """The model at ``path`` (an export, or a checkpoint's QAT model) in eval mode and its tokenizer;
    ``packed`` runs an export's quantized layers on qat's packed kernels (what ``qat generate`` runs).

    Raises:
        CheckpointError / ExportError: as ``qat.cli.evaluate.classify_path`` / ``load_exported_model``.
    """
    # The export loader lives with `qat eval`, which verifies checksums the same way.
    from qat.cli.evaluate import classify_path, load_exported_model

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
