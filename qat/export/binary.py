"""``binary``: 1 bit per linear weight plus the layer's fp32 scales (FBI-LLM ``alpha``/``beta``, OneBit ``g``/``h``),
in safetensors, and the qat loader that rebuilds the model with identical logits.

Folder layout:

- ``model.safetensors``: ``<layer>.weight_sign_1bit`` uint8 (out, ceil(in/8)) from ``qat.pack.pack_sign_1bit``,
  the layer's scales fp32, every other tensor (embeddings, norms, lm_head) fp32 under its HF name;
- ``config.json``: ``model_type`` ``qat-binary`` (so HF transformers refuses the folder instead of silently
  loading random linear weights), the HF config of the base model and the quantization.

No other runtime implements FBI-LLM/OneBit column scales on 1-bit weights (llama.cpp/bitnet.cpp have ternary
TQ1_0/TQ2_0/I2_S, not this), so the folder loads through qat only: :func:`load_binary_export`.
"""

from pathlib import Path

import torch
from torch import nn

from qat.errors import ExportError
from qat.export.exporter import (
    ExportFormat,
    load_rebuilt_state,
    measured_bits_per_weight,
    model_scheme,
    rebuild_qat_model,
    write_qat_folder,
)
from qat.export.folder import WEIGHTS_FILE
from qat.nn.quantized import quantized_layers
from qat.pack.binary_1bit import pack_sign_1bit, unpack_sign_1bit

BINARY_MODEL_TYPE = "qat-binary"
SIGN_SUFFIX = ".weight_sign_1bit"


def check(model: nn.Module) -> None:
    """Raise ExportError unless ``model``'s scheme is stored exactly as 1-bit signs plus its own scales."""
    scheme = model_scheme(model)
    if scheme is None or "binary" not in scheme.export_formats:
        what = f"quantized by {scheme.name!r}" if scheme else "full precision"
        instead = scheme.default_export if scheme else "hf-fp"
        raise ExportError(f"--format binary needs a binary model (model.quant.weight: fbi_binary or onebit); this "
                          f"one is {what}. Use --format {instead}")


def binary_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The export tensors: packed signs for binary layers' weights, fp32 for everything else."""
    layers = quantized_layers(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            owner, _, leaf = name.rpartition(".")
            if owner in layers and leaf == "weight":
                codes, _ = layers[owner].quantized_weight()
                state[owner + SIGN_SUFFIX] = pack_sign_1bit(codes)
            elif not (tied and name == "lm_head.weight"):
                state[name] = tensor.detach().to(torch.float32).contiguous()
    return state


def write(model: nn.Module, folder: Path, dtype: str) -> None:
    """model.safetensors + config.json (every tensor stays fp32: the scales are what the 1-bit signs need)."""
    write_qat_folder(model, folder, binary_state_dict(model), BINARY_MODEL_TYPE)


def file_bits_per_weight(folder: Path) -> float:
    """Bits per quantized weight measured from ``model.safetensors``."""
    return measured_bits_per_weight(folder, WEIGHTS_FILE, BINARY_MODEL_TYPE, "binary")


def load_binary_export(folder: str | Path) -> torch.nn.Module:
    """Rebuild an exported binary model (eval mode, fp32) whose logits equal the training model's.

    Raises:
        ExportError: the folder is not a qat binary export.
    """
    folder = Path(folder)
    model, stored = rebuild_qat_model(folder, BINARY_MODEL_TYPE, "binary")
    layers = quantized_layers(model)
    state = {}
    for key, tensor in stored.items():
        if key.endswith(SIGN_SUFFIX):
            owner = key[: -len(SIGN_SUFFIX)]
            if owner not in layers:
                raise ExportError(f"{folder}: {key} names no binary layer of the model its config describes")
            # Latent weight = its own sign (±1): sign() of it gives back exactly the exported codes.
            state[owner + ".weight"] = unpack_sign_1bit(tensor, layers[owner].in_features)
        else:
            state[key] = tensor
    return load_rebuilt_state(folder, model, state)


FORMAT = ExportFormat(
    name="binary", description="1 bit per linear weight + the layer's fp32 scales (FBI-LLM / OneBit), safetensors",
    runtime="**qat only** (`qat.export.binary.load_binary_export`). HF transformers, llama.cpp and bitnet.cpp do not "
            f"implement 1-bit weights with FBI/OneBit scales; `config.json` has model_type `{BINARY_MODEL_TYPE}` so "
            "they refuse the folder rather than load it wrongly",
    loading_code="from qat.export.binary import load_binary_export\n"
                 "model = load_binary_export(path)  # a transformers model with qat's binary layers, eval mode",
    check=check, write=write, load=load_binary_export, bits_per_weight=file_bits_per_weight)
