"""``qat-packed``: ParetoQ models (``paretoq_*`` schemes) at their true bit width — codes packed at b bits
(1-bit: 1, ternary and 2-bit: 2, 3-bit: 3, 4-bit: 4; :mod:`qat.pack.nbit`) plus the learned scales alpha in fp32 —
in safetensors, and the qat loader that rebuilds the model with identical logits.

Folder layout:

- ``model.safetensors``: ``<layer>.codes_<b>bit`` uint8 (out, ceil(in * b / 8)), ``<layer>.alpha`` fp32 (one per
  row, per group of ``group_size`` inputs, or per tensor, row-major), every other tensor (embeddings, norms,
  lm_head, biases) fp32 under its HF name. Weight = codes * alpha / m, m = ``code_multiplier`` in config.json
  (1 for 1/3/4-bit, 1.5 for ternary, 4 for 2-bit);
- ``config.json``: ``model_type`` ``qat-packed`` (so HF transformers refuses the folder instead of loading random
  linear weights), the HF config of the base model, the quantization, the level set and bits of the codes.

Alpha is stored rather than alpha / m because the loader gives the layer that exact alpha back: its forward then
computes the same ``codes * (alpha / m)`` bit for bit.
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
from qat.nn.paretoq_linear import ParetoQLinear
from qat.nn.quantized import quantized_layers
from qat.nn.schemes import get_scheme
from qat.pack.nbit import pack_nbit, unpack_nbit
from qat.quant.paretoq import ALPHA_EPS

PACKED_MODEL_TYPE = "qat-packed"
ALPHA_SUFFIX = ".alpha"


def code_bits(levels: tuple[int, ...]) -> int:
    """Bits per stored code: the smallest b with 2^b >= number of levels (ternary: 2)."""
    return max(1, (len(levels) - 1).bit_length())


def codes_suffix(bits: int) -> str:
    return f".codes_{bits}bit"


def check(model: nn.Module) -> None:
    """Raise ExportError unless ``model`` is quantized by a ParetoQ scheme (codes + learned alpha)."""
    scheme = model_scheme(model)
    layers = quantized_layers(model)
    if scheme is None or not all(isinstance(m, ParetoQLinear) for m in layers.values()):
        what = f"quantized by {scheme.name!r}" if scheme else "full precision"
        instead = scheme.default_export if scheme else "hf-fp"
        raise ExportError(f"--format qat-packed holds ParetoQ models (model.quant.weight: paretoq_1bit | "
                          f"paretoq_ternary | paretoq_2bit | paretoq_3bit | paretoq_4bit); this one is {what}. "
                          f"Use --format {instead}")


def layer_levels(layer: nn.Module) -> tuple[int, ...]:
    """The codes a quantized layer's scheme uses (each layer its own, with model.quant.layer_groups)."""
    return get_scheme(layer.quant.weight).levels


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The export tensors: packed codes + fp32 alpha for ParetoQ layers, fp32 for everything else."""
    layers = quantized_layers(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            owner, _, leaf = name.rpartition(".")
            if owner in layers and leaf == "weight":
                levels = layer_levels(layers[owner])
                codes, _ = layers[owner].quantized_weight()
                state[owner + codes_suffix(code_bits(levels))] = pack_nbit(codes, levels, code_bits(levels))
            elif owner in layers and leaf == "alpha":
                # The alpha the forward uses: training can push the parameter below the quantizer's clamp.
                state[name] = tensor.detach().clamp(min=ALPHA_EPS).to(torch.float32).contiguous()
            elif not (tied and name == "lm_head.weight"):
                state[name] = tensor.detach().to(torch.float32).contiguous()
    return state


def write(model: nn.Module, folder: Path, dtype: str) -> None:
    """model.safetensors + config.json; every unpacked tensor is fp32 (``--dtype`` does not apply)."""
    scheme = model_scheme(model)
    layers = quantized_layers(model)
    write_qat_folder(model, folder, packed_state_dict(model), PACKED_MODEL_TYPE, scheme=scheme.name,
                     levels=list(scheme.levels), code_bits=code_bits(scheme.levels),
                     code_multiplier=next(iter(layers.values())).grid.code_multiplier,
                     layer_schemes={n: m.quant.weight for n, m in layers.items()})


def file_bits_per_weight(folder: Path) -> float:
    """Bits per quantized weight measured from ``model.safetensors``."""
    return measured_bits_per_weight(folder, WEIGHTS_FILE, PACKED_MODEL_TYPE, "qat-packed")


def load_packed_export(folder: str | Path) -> torch.nn.Module:
    """Rebuild an exported ParetoQ model (eval mode, fp32) whose logits equal the training model's.

    Each layer gets its stored alpha and, as latent weight, its dequantized codes ``codes * alpha / m``, which the
    quantizer maps back to exactly the stored codes.

    Raises:
        ExportError: the folder is not a qat-packed export or does not match its config.
    """
    folder = Path(folder)
    model, state = rebuild_qat_model(folder, PACKED_MODEL_TYPE, "qat-packed")
    layers = quantized_layers(model)
    for owner, layer in layers.items():
        levels = layer_levels(layer)
        bits = code_bits(levels)
        suffix = codes_suffix(bits)
        if owner + suffix not in state or owner + ALPHA_SUFFIX not in state:
            raise ExportError(f"{folder}: no {owner}{suffix} / {owner}{ALPHA_SUFFIX} for a quantized layer of the "
                              "model its config describes; re-export it")
        try:
            codes = unpack_nbit(state.pop(owner + suffix), levels, bits, layer.in_features)
        except ValueError as e:
            raise ExportError(f"{folder}: {owner}{suffix}: {e}") from None
        alpha = state[owner + ALPHA_SUFFIX]
        rows, groups = layer.alpha_shape
        scale = (alpha.reshape(rows, groups, 1) / layer.grid.code_multiplier)
        state[owner + ".weight"] = (codes.reshape(rows, groups, -1) * scale).reshape(codes.shape)
    return load_rebuilt_state(folder, model, state)


FORMAT = ExportFormat(
    name="qat-packed",
    description="ParetoQ codes at their true bit width (1/2/3/4 bits; ternary at 2) + fp32 scales alpha, safetensors",
    runtime="**qat only** (`qat.export.qat_packed.load_packed_export`). No other runtime reads this layout; "
            f"`config.json` has model_type `{PACKED_MODEL_TYPE}` so HF transformers refuses the folder rather than "
            "load it wrongly. Weight = codes * alpha / code_multiplier (config.json)",
    loading_code="from qat.export.qat_packed import load_packed_export\n"
                 "model = load_packed_export(path)  # a transformers model with qat's ParetoQ layers, eval mode",
    check=check, write=write, load=load_packed_export, bits_per_weight=file_bits_per_weight, holds_layer_groups=True)
