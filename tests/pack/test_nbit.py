"""b-bit packing: exact round trips on random codes of every ParetoQ level set, the documented bit order (checked
against an independent numpy bit stream), sizes, and refusal of codes outside the levels."""

import numpy as np
import pytest
import torch

from qat.pack.nbit import pack_nbit, unpack_nbit

LEVEL_SETS = {1: (-1, 1), 2: (-3, -1, 1, 3), 3: tuple(range(-4, 4)), 4: tuple(range(-8, 8))}
TERNARY = (-1, 0, 1)


@pytest.mark.parametrize("bits,levels", [*LEVEL_SETS.items(), (2, TERNARY)])
@pytest.mark.parametrize("in_features", [1, 7, 8, 13, 64, 577])
def test_round_trip_is_exact(bits, levels, in_features):
    gen = torch.Generator().manual_seed(in_features * 10 + bits)
    codes = torch.tensor(levels, dtype=torch.float32)[torch.randint(0, len(levels), (5, in_features), generator=gen)]
    packed = pack_nbit(codes, levels, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (in_features * bits + 7) // 8)
    assert torch.equal(unpack_nbit(packed, levels, bits, in_features), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bit_order_matches_a_numpy_little_endian_stream(bits):
    levels = LEVEL_SETS[bits]
    rng = np.random.default_rng(bits)
    index = rng.integers(0, len(levels), size=(3, 29))
    # Independent reference: each index as `bits` little-endian bits, concatenated per row, numpy.packbits.
    stream = ((index[..., None] >> np.arange(bits)) & 1).reshape(3, -1).astype(np.uint8)
    want = np.packbits(stream, axis=1, bitorder="little")
    codes = torch.tensor(np.asarray(levels)[index], dtype=torch.float32)
    assert np.array_equal(pack_nbit(codes, levels, bits).numpy(), want)


def test_codes_outside_the_levels_are_refused():
    with pytest.raises(ValueError, match=r"codes \[0.0\] are not among the levels \(-3, -1, 1, 3\)"):
        pack_nbit(torch.tensor([[1.0, 0.0, 3.0]]), (-3, -1, 1, 3), 2)
    with pytest.raises(ValueError, match="not among the levels"):
        pack_nbit(torch.tensor([[9.0]]), tuple(range(-8, 8)), 4)
    with pytest.raises(ValueError, match="do not fit in 2 bits"):
        pack_nbit(torch.tensor([[1.0]]), tuple(range(-4, 4)), 2)


def test_unpack_refuses_a_wrong_shape_and_an_index_past_the_levels():
    with pytest.raises(ValueError, match=r"uint8 \(out, 3\).*got torch.uint8 \(2, 4\)"):
        unpack_nbit(torch.zeros(2, 4, dtype=torch.uint8), TERNARY, 2, 12)
    # Index 3 (bits 11) does not exist among 3 ternary levels.
    with pytest.raises(ValueError, match="corrupt"):
        unpack_nbit(torch.full((1, 1), 0b11, dtype=torch.uint8), TERNARY, 2, 1)
