"""Kernel-layout packers: exact round trips, the documented bit positions, exact conversion from the HF layout."""

import pytest
import torch

from qat.pack.hf_bitnet import pack_ternary_hf
from qat.pack.kernel_layout import (
    BINARY_TILE_ROWS,
    pack_binary_1bit,
    pack_q8_0,
    pack_ternary_2bit,
    padded_in_features,
    ternary_2bit_from_hf,
    unpack_binary_1bit,
    unpack_q8_0,
    unpack_ternary_2bit,
)


@pytest.mark.parametrize("shape", [(1, 1), (3, 255), (5, 256), (8, 1000), (4, 4096)])
def test_ternary_round_trip_and_size(shape):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed = pack_ternary_2bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], padded_in_features(shape[1], 2) // 4)
    assert torch.equal(unpack_ternary_2bit(packed, shape[1]), codes.to(torch.int8))


@pytest.mark.parametrize("shape", [(1, 1), (3, 511), (5, 512), (7, 1300), (32, 8), (45, 600), (64, 1024)])
def test_binary_round_trip_and_size(shape):
    codes = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(sum(shape))) * 2 - 1
    packed = pack_binary_1bit(codes)
    assert packed.shape == (-(-shape[0] // 32), padded_in_features(shape[1], 1) // 8, 32)
    assert torch.equal(unpack_binary_1bit(packed, shape[1], shape[0]), codes.to(torch.int8))
    with pytest.raises(ValueError, match="ceil\\(out / 32\\)"):
        unpack_binary_1bit(packed, shape[1], shape[0] + 32)


def test_bit_positions_follow_the_documented_layout():
    """Element 64 * plane + j of a block sits in byte j, bits [2 plane, 2 plane + 2), stored as code + 1."""
    codes = torch.zeros(1, 512, dtype=torch.int64)
    codes[0, 64 * 2 + 5] = 1            # block 0, plane 2, byte 5 -> stored 2 at bits 4..5
    codes[0, 256 + 64 * 3 + 63] = -1    # block 1, plane 3, byte 63 -> stored 0 at bits 6..7
    packed = pack_ternary_2bit(codes)[0]
    zero_byte = 0b01010101              # code 0 -> stored 1 in all four planes
    assert packed[5] == (zero_byte & ~(0b11 << 4)) | (2 << 4)
    assert packed[64 + 63] == zero_byte & ~(0b11 << 6)



def test_binary_bit_positions_follow_the_documented_tile_layout():
    """Row n, column k: tile n // 32, byte k // 8, position p with BINARY_TILE_ROWS[p] == n % 32, bit k % 8."""
    assert sorted(BINARY_TILE_ROWS) == list(range(32))
    assert BINARY_TILE_ROWS[8] == 16 and BINARY_TILE_ROWS[16] == 8     # AVX2 unpack order: 0-7, 16-23 | 8-15, 24-31
    binary = torch.ones(40, 520, dtype=torch.int64)
    binary[33, 8 * 3 + 5] = -1          # tile 1, row 1 -> position 1; byte 3, bit 5 cleared
    binary[9, 512 + 2] = -1             # tile 0, row 9 -> position 17; byte 64, bit 2 cleared
    packed = pack_binary_1bit(binary)
    assert packed[1, 3, 1] == 0b11011111
    assert packed[0, 64, 17] == 0b11111011
    assert packed[1, 0, BINARY_TILE_ROWS.index(8)] == 0          # rows past out_features: zero bits (code -1)


def test_conversion_from_hf_layout_is_exact():
    codes = torch.randint(-1, 2, (64, 700), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ternary_2bit_from_hf(pack_ternary_hf(codes)), pack_ternary_2bit(codes))


def test_codes_outside_the_levels_are_rejected():
    with pytest.raises(ValueError, match="codes must be in"):
        pack_ternary_2bit(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="codes must be in"):
        pack_binary_1bit(torch.tensor([[0, 1]]))


@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (5, 512), (2, 1536), (4, 1600)])
def test_q8_0_round_trip_size_and_zero_padded_scales(shape):
    rows, k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    d = torch.rand(rows, k // 32, generator=gen)
    packed, scales = pack_q8_0(codes, d)
    padded = -(-k // 512) * 512
    assert packed.dtype == torch.int8 and packed.shape == (rows, padded)
    assert scales.dtype == torch.float16 and scales.shape == (rows, padded // 32)
    assert torch.equal(unpack_q8_0(packed, k), codes)
    assert torch.equal(scales[:, :k // 32], d.half()) and (scales[:, k // 32:] == 0).all()
    assert (unpack_q8_0(packed, padded)[:, k:] == 0).all()


def test_q8_0_positions_follow_the_documented_layout():
    """Byte 4 * (16 * i + j) + b of a 512-value chunk holds value 4 * i + b of the chunk's block j."""
    codes = torch.zeros(1, 1024, dtype=torch.int8)
    codes[0, 32 * 5 + 4 * 3 + 2] = 7            # chunk 0, block 5, load 3, byte 2
    codes[0, 512 + 32 * 15 + 4 * 7 + 3] = -9    # chunk 1, block 15, load 7, byte 3
    packed, _ = pack_q8_0(codes, torch.ones(1, 32))
    expected = torch.zeros(1, 1024, dtype=torch.int8)
    expected[0, 4 * (16 * 3 + 5) + 2] = 7
    expected[0, 512 + 4 * (16 * 7 + 15) + 3] = -9
    assert torch.equal(packed, expected)


def test_q8_0_rejects_a_width_off_the_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_q8_0(torch.zeros(2, 40, dtype=torch.int8), torch.ones(2, 1))
