"""Ternary codes + scales <-> GGUF TQ2_0 / TQ1_0 blocks (llama.cpp ``ggml-common.h``; facts in the notes, §7).

Both formats hold 256 weights per block with one fp16 scale ``d`` (TQ2_0: 66 bytes, 2.0625 bits/weight;
TQ1_0: 54 bytes, base-3, 1.6875 bits/weight). The bit layouts are those of ``gguf.quants`` (the package's numpy
reference), which these functions call rather than re-implement: we hand it ``codes * d`` with ``d`` already
rounded to fp16, so its ``d = max|block|`` is our ``d`` and its ``round(x / d)`` gives back our codes exactly.
A block whose codes are all 0 stores ``d = 0`` (nothing to scale), which :func:`unpack_tq` reports as is.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from qat.errors import ExportError

QK_K = 256
TQ_TYPES = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0}
# Byte offset of the fp16 d inside one block (it is the last field of both structs).
_D_OFFSET = {GGMLQuantizationType.TQ2_0: 64, GGMLQuantizationType.TQ1_0: 52}


def block_scales(scale: torch.Tensor, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    """Per-tensor (1, 1), per-row (out, 1) or per-group (out, groups) scales -> one per 256-block (out, in / 256).

    Raises:
        ExportError: ``in_features`` not a multiple of 256, or groups that a 256-block would straddle.
    """
    if in_features % QK_K:
        raise ExportError(f"GGUF TQ1_0/TQ2_0 need rows that are a multiple of {QK_K}; this layer has "
                          f"in_features={in_features}. Use another export format or resize the model.")
    scale = scale.float().reshape(scale.shape[0], -1).expand(out_features, -1)
    groups = scale.shape[1]
    if groups > 1 and group_size % QK_K:
        raise ExportError(f"per-group scales with group_size={group_size} do not fit TQ blocks of {QK_K} weights; "
                          f"train with granularity 'tensor'/'row' or a group_size multiple of {QK_K}")
    blocks = in_features // QK_K
    return scale.repeat_interleave(blocks // groups, dim=1)


def pack_tq(codes: torch.Tensor, scale_per_block: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Codes in {-1, 0, 1} (out, in) and scales (out, in / 256) -> uint8 (out, in / 256 * block bytes)."""
    if not torch.isin(codes, torch.tensor([-1, 0, 1], dtype=codes.dtype)).all():
        raise ExportError("TQ packing needs ternary codes in {-1, 0, 1}")
    d = scale_per_block.to(torch.float16).float()                                   # what the block will store
    values = codes.float().reshape(codes.shape[0], -1, QK_K) * d.unsqueeze(-1)
    return quants.quantize(values.reshape(codes.shape).numpy(), qtype)


def unpack_tq(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_tq`: (codes int8 (out, in), d float32 (out, in / 256))."""
    rows, cols = shape
    block_bytes = quants.GGML_QUANT_SIZES[qtype][1]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // QK_K, block_bytes)
    d = blocks[..., _D_OFFSET[qtype]:_D_OFFSET[qtype] + 2].copy().view(np.float16).astype(np.float32)[..., 0]
    values = quants.dequantize(blocks.reshape(rows, -1), qtype).reshape(rows, cols // QK_K, QK_K)
    safe_d = np.where(d == 0, 1.0, d)[..., None]
    codes = np.rint(values / safe_d).astype(np.int8).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d)
