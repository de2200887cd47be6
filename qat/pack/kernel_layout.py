"""Ternary (2 bits) and binary (1 bit) codes <-> the layout the packed kernels read (``kernels/``).

Per output row, the input dimension is cut into blocks of 64 bytes. Element ``e = 64 * plane + j`` of a block is
stored in byte ``j``, bits ``[plane * bits, (plane + 1) * bits)``:

- ternary: 4 planes, 256 values per block, stored value ``code + 1`` in {0, 1, 2} (as I2_S / TQ2_0 / HF);
- binary: 8 planes, 512 values per block, stored bit ``(code + 1) / 2`` in {0, 1}.

One shift and mask of a 64-byte load yields 64 weights that line up with 64 contiguous int8 activations
(AVX-512: one register, AVX2: two), so the kernels need no shuffles. Rows are zero-code padded to whole blocks
(the kernels zero-pad the activations, so padding never contributes). Each packer has its exact inverse here;
:func:`ternary_2bit_from_hf` converts the HF export layout without going through floats.
"""

import torch

from qat.pack.hf_bitnet import unpack_ternary_hf

BLOCK_BYTES = 64
TERNARY_BITS = 2
BINARY_BITS = 1


def values_per_block(bits: int) -> int:
    return BLOCK_BYTES * (8 // bits)


def padded_in_features(in_features: int, bits: int) -> int:
    block = values_per_block(bits)
    return -(-in_features // block) * block


def _pack_planes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, k) small unsigned values -> (rows, padded_k * bits / 8) uint8 in the block layout."""
    rows, k = stored.shape
    planes = 8 // bits
    padded = padded_in_features(k, bits)
    full = torch.zeros((rows, padded), dtype=torch.uint8, device=stored.device)
    full[:, :k] = stored
    full = full.reshape(rows, -1, planes, BLOCK_BYTES)            # (rows, blocks, plane, byte)
    shifts = (torch.arange(planes, device=stored.device, dtype=torch.uint8) * bits).view(1, 1, planes, 1)
    packed = (full << shifts).sum(dim=2, dtype=torch.uint8)        # planes occupy disjoint bits: sum == or
    return packed.reshape(rows, -1)


def _unpack_planes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    rows = packed.shape[0]
    planes = 8 // bits
    shifts = (torch.arange(planes, device=packed.device, dtype=torch.uint8) * bits).view(1, 1, planes, 1)
    blocks = packed.reshape(rows, -1, 1, BLOCK_BYTES)
    stored = (blocks >> shifts) & ((1 << bits) - 1)
    return stored.reshape(rows, -1)[:, :in_features]


def _check_codes(codes: torch.Tensor, allowed: tuple[int, ...]) -> None:
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) code matrix, got shape {tuple(codes.shape)}")
    if codes.numel() and not torch.isin(codes, torch.tensor(allowed, dtype=codes.dtype, device=codes.device)).all():
        raise ValueError(f"codes must be in {set(allowed)}; quantize the weight first (qat.quant)")


def pack_ternary_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, 1}, shape (out, in) -> uint8 (out, padded_in / 4) in the kernel layout."""
    _check_codes(codes, (-1, 0, 1))
    return _pack_planes((codes.to(torch.int16) + 1).to(torch.uint8), TERNARY_BITS)


def unpack_ternary_2bit(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Exact inverse of :func:`pack_ternary_2bit`."""
    return (_unpack_planes(packed, TERNARY_BITS, in_features).to(torch.int16) - 1).to(dtype)


def pack_binary_1bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 1}, shape (out, in) -> uint8 (out, padded_in / 8) in the kernel layout."""
    _check_codes(codes, (-1, 1))
    return _pack_planes((codes > 0).to(torch.uint8), BINARY_BITS)


def unpack_binary_1bit(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Exact inverse of :func:`pack_binary_1bit`."""
    return (_unpack_planes(packed, BINARY_BITS, in_features).to(torch.int16) * 2 - 1).to(dtype)


def ternary_2bit_from_hf(packed_hf: torch.Tensor) -> torch.Tensor:
    """HF ``BitNetForCausalLM`` uint8 (out / 4, in) -> kernel layout, exactly (integer codes only)."""
    return pack_ternary_2bit(unpack_ternary_hf(packed_hf, torch.int8))
