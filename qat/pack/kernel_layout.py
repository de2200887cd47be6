"""Ternary (2 bits) and binary (1 bit) codes <-> the layouts the packed kernels read (``kernels/``).

Ternary, shape (out, padded_in / 4): per output row, the input dimension is cut into blocks of 64 bytes; element
``e = 64 * plane + j`` of a block is stored in byte ``j``, bits ``[2 * plane, 2 * plane + 2)``, as ``code + 1`` in
{0, 1, 2} (as I2_S / TQ2_0 / HF). One shift and mask of a 64-byte load yields 64 weights that line up with 64
contiguous int8 activations (AVX-512: one register, AVX2: two), so the dot product needs no shuffles.

Binary, shape (ceil(out / 32), padded_in / 8, 32): rows in tiles of 32; within a tile, byte ``c`` of a row holds
columns ``8c .. 8c + 7`` (bit ``i`` = column ``8c + i``, 1 for code +1, 0 for -1), and the 32 rows' byte ``c`` are
stored together, row ``BINARY_TILE_ROWS[p]`` at position ``p``. A 32-byte load is then one 4-column group (a
nibble) of 32 rows, the index vector of a T-MAC style table lookup (``vpshufb`` into the 16 signed sums of 4
activations); the position order is the one AVX2's byte unpack produces, so results come out in row order.

Q8_0 (int8 codes, one scale per block of 32 inputs; the int8 lm_head), shape (out, padded_in): the input
dimension is cut into chunks of 16 blocks (512 values); within a chunk, byte ``4 * (16 * i + j) + b`` holds value
``4 * i + b`` of block ``j``. A 64-byte load ``i`` then holds 4 consecutive values of each of the chunk's 16 blocks,
so ``vpdpbusd`` leaves block ``j``'s partial dot in 32-bit lane ``j``: after the chunk's 8 loads each lane is one
whole block's dot product, ready for its scale, with no horizontal sums. Scales: (out, padded_in / 32).

Input columns are zero-padded to whole 256 (ternary) / 512 (binary, Q8_0) value blocks, binary rows to whole tiles;
the kernels zero-pad the activations and never write padded rows, so padding never contributes. Group scales
fall on these blocks. Each packer has its exact inverse here; :func:`ternary_2bit_from_hf` converts the HF
export layout without going through floats.
"""

import torch

from qat.pack.hf_bitnet import unpack_ternary_hf

BLOCK_BYTES = 64
TERNARY_BITS = 2
BINARY_BITS = 1
BINARY_TILE = 32
# Tile position -> row: AVX2's byte unpack of a 32-byte vector yields positions 0-7, 16-23 (low) then 8-15, 24-31.
BINARY_TILE_ROWS = (*range(0, 8), *range(16, 24), *range(8, 16), *range(24, 32))


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
    """Codes in {-1, 1}, shape (out, in) -> uint8 (ceil(out / 32), padded_in / 8, 32) in the tiled layout."""
    _check_codes(codes, (-1, 1))
    rows, k = codes.shape
    tiles = -(-rows // BINARY_TILE)
    bits = torch.zeros((tiles * BINARY_TILE, padded_in_features(k, BINARY_BITS)), dtype=torch.uint8,
                       device=codes.device)
    bits[:rows, :k] = codes > 0
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.uint8))
    row_bytes = (bits.reshape(tiles * BINARY_TILE, -1, 8) * weights).sum(-1, dtype=torch.uint8)   # disjoint bits
    order = torch.tensor(BINARY_TILE_ROWS, device=codes.device)
    return row_bytes.reshape(tiles, BINARY_TILE, -1)[:, order].transpose(1, 2).contiguous()


def unpack_binary_1bit(packed: torch.Tensor, in_features: int, out_features: int,
                       dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Exact inverse of :func:`pack_binary_1bit`."""
    if packed.dim() != 3 or packed.shape[2] != BINARY_TILE or packed.shape[0] != -(-out_features // BINARY_TILE):
        raise ValueError(f"binary packed weight must be (ceil(out / 32), padded_in / 8, 32) for out_features="
                         f"{out_features}; got {tuple(packed.shape)}")
    inverse = torch.argsort(torch.tensor(BINARY_TILE_ROWS, device=packed.device))
    row_bytes = packed.transpose(1, 2)[:, inverse].reshape(-1, packed.shape[1])      # (tiles * 32, padded_in / 8)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (row_bytes.unsqueeze(-1) >> shifts) & 1
    return (bits.reshape(row_bytes.shape[0], -1)[:out_features, :in_features].to(torch.int16) * 2 - 1).to(dtype)


Q8_0_CHUNK_BLOCKS = 16                        # blocks of 32 per chunk: one 32-bit lane each
Q8_0_CHUNK = 32 * Q8_0_CHUNK_BLOCKS


def _q8_0_chunks(values: torch.Tensor) -> torch.Tensor:
    """(rows, padded_in) -> (rows, chunks, 16 blocks, 8 loads, 4 bytes): the block order of a chunk."""
    return values.reshape(values.shape[0], -1, Q8_0_CHUNK_BLOCKS, 8, 4)


def pack_q8_0(codes: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 codes int8 (out, k) and block scales (out, k / 32) (:func:`qat.quant.q8_0.quantize_q8_0`, k a multiple
    of 32) -> int8 (out, padded_in) in the interleaved chunk layout and fp16 scales (out, padded_in / 32), zero in
    the padding (fp16 as GGML Q8_0 stores them)."""
    rows, k = codes.shape
    if k % 32 or d.shape != (rows, k // 32):
        raise ValueError(f"Q8_0 codes (out, k) need k a multiple of 32 and scales (out, k / 32); got codes "
                         f"{tuple(codes.shape)}, scales {tuple(d.shape)}")
    padded = -(-k // Q8_0_CHUNK) * Q8_0_CHUNK
    full = torch.zeros((rows, padded), dtype=torch.int8, device=codes.device)
    full[:, :k] = codes
    scales = torch.zeros((rows, padded // 32), dtype=torch.float16, device=codes.device)
    scales[:, :k // 32] = d
    return _q8_0_chunks(full).transpose(2, 3).reshape(rows, padded).contiguous(), scales


def unpack_q8_0(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_q8_0` for the codes: int8 (out, in_features) in input order."""
    rows = packed.shape[0]
    interleaved = packed.reshape(rows, -1, 8, Q8_0_CHUNK_BLOCKS, 4)       # (rows, chunks, loads, blocks, bytes)
    return interleaved.transpose(2, 3).reshape(rows, -1)[:, :in_features]


def ternary_2bit_from_hf(packed_hf: torch.Tensor) -> torch.Tensor:
    """HF ``BitNetForCausalLM`` uint8 (out / 4, in) -> kernel layout, exactly (integer codes only)."""
    return pack_ternary_2bit(unpack_ternary_hf(packed_hf, torch.int8))
