"""Ternary codes <-> HF transformers BitNet packed layout (``transformers/integrations/bitnet.py``).

uint8 tensor of shape (out // 4, in); code + 1 in {0, 1, 2}; packed along dim 0 in blocks: bits 2i..2i+1 of
packed row r hold original row ``i * (out // 4) + r``. The exact inverse is :func:`unpack_ternary_hf`.
"""

import torch

VALUES_PER_BYTE = 4


def pack_ternary_hf(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer-valued ternary codes (out, in) into uint8 (out // 4, in). ``out`` must be a multiple of 4."""
    out_features = codes.shape[0]
    if out_features % VALUES_PER_BYTE:
        raise ValueError(f"out_features={out_features} must be a multiple of {VALUES_PER_BYTE} for HF BitNet packing")
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8)
    if int(shifted.max()) > 2:
        raise ValueError("codes must be in {-1, 0, 1}")
    rows = out_features // VALUES_PER_BYTE
    packed = torch.zeros((rows, codes.shape[1]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        packed |= shifted[i * rows:(i + 1) * rows] << (2 * i)
    return packed


def unpack_ternary_hf(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary_hf`: (out // 4, in) uint8 -> (out, in) codes in {-1, 0, 1}."""
    slices = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    return (torch.cat(slices, dim=0).to(torch.int16) - 1).to(dtype)
