"""Triton packed linear: int8 activation codes x 2-bit ternary / 1-bit binary weights (kernel layout).

Reads the layouts of ``qat/pack/kernel_layout.py``. Ternary: per row, 64-byte blocks, element ``64 * plane + j``
in byte j, bits ``[2 plane, 2 plane + 2)``. Binary: 32-row tiles, byte ``c`` of a row (columns 8c..8c+7, bit i =
column 8c + i) at position ``BINARY_TILE_ROWS.index(row % 32)`` of the tile's 32-byte column ``c``. Each program
computes a (BLOCK_M tokens, BLOCK_N rows) tile: per 64 columns it turns the weight bytes into a (BLOCK_N, 64) int8
code tile (ternary: a load, shift and mask per plane; binary: a gather of each byte per bit) and feeds
``tl.dot`` with the matching 64 activations (int8 x int8 -> int32: exact, also in the interpreter, whose bf16
``tl.dot`` is broken; see the environment notes). Group scales are applied at group boundaries.
"""

import triton
import triton.language as tl

BLOCK_BYTES = tl.constexpr(64)


@triton.jit
def _weight_codes(w_ptr, offs_n, mask_n, row_bytes, b, plane, BITS: tl.constexpr):
    """int8 codes (BLOCK_N rows, 64) of columns ``64 * plane .. + 63`` of value block ``b``, for either layout."""
    offs_j = tl.arange(0, BLOCK_BYTES)
    if BITS == 2:
        w = tl.load(w_ptr + offs_n[:, None] * row_bytes + b * BLOCK_BYTES + offs_j[None, :],
                    mask=mask_n[:, None], other=0).to(tl.int32)
        codes = ((w >> (plane * 2)) & 3) - 1
    else:
        r = offs_n % 32                                       # tile position of the row (BINARY_TILE_ROWS)
        tile_pos = tl.where(r < 8, r, tl.where(r < 16, r + 8, tl.where(r < 24, r - 8, r)))
        col = plane * BLOCK_BYTES + offs_j                    # column within the 512-value block
        byte = tl.load(w_ptr + ((offs_n // 32) * (row_bytes * 32) + tile_pos)[:, None]
                       + (b * BLOCK_BYTES + col[None, :] // 8) * 32, mask=mask_n[:, None], other=0).to(tl.int32)
        codes = 2 * ((byte >> (col[None, :] % 8)) & 1) - 1
    return codes.to(tl.int8)


@triton.jit
def packed_linear_kernel(x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, y_ptr, M, N, row_bytes, groups,
                         blocks_per_group, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    PLANES: tl.constexpr = 8 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_BYTES)
    mask_m = offs_m < M
    mask_n = offs_n < N
    padded_k = row_bytes * PLANES
    n_blocks = row_bytes // BLOCK_BYTES
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, groups):
        end = tl.where(g + 1 == groups, n_blocks, (g + 1) * blocks_per_group)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for b in range(g * blocks_per_group, end):
            for plane in tl.static_range(PLANES):
                codes = _weight_codes(w_ptr, offs_n, mask_n, row_bytes, b, plane, BITS)
                x = tl.load(x_ptr + offs_m[:, None] * padded_k + (b * PLANES + plane) * BLOCK_BYTES + offs_j[None, :],
                            mask=mask_m[:, None], other=0)
                acc += tl.dot(x, tl.trans(codes), out_dtype=tl.int32)
        ws = tl.load(w_scale_ptr + offs_n * groups + g, mask=mask_n, other=0.0)
        y += acc.to(tl.float32) * ws[None, :]
    xs = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=1.0)
    y = y / xs[:, None]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])
