import numpy as np
import pytest
import torch

from qat.pack.binary_1bit import pack_sign_1bit, unpack_sign_1bit


@pytest.mark.parametrize("shape", [(3, 8), (5, 13), (2, 256), (1, 1)])
def test_pack_unpack_round_trip_and_numpy_bit_order(shape):
    codes = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.5, -1.0, 1.0)
    packed = pack_sign_1bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 7) // 8)
    assert np.array_equal(packed.numpy(), np.packbits((codes > 0).numpy(), axis=1, bitorder="little"))
    assert torch.equal(unpack_sign_1bit(packed, shape[1]), codes)


def test_pack_refuses_zero_codes_and_bad_shapes():
    with pytest.raises(ValueError, match="ternary"):
        pack_sign_1bit(torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="uint8"):
        unpack_sign_1bit(torch.zeros(2, 3, dtype=torch.uint8), 8)
