import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from qat.pack.hf_bitnet import pack_ternary_hf, unpack_ternary_hf


@pytest.mark.parametrize("shape", [(4, 3), (256, 96), (68, 33)])
def test_pack_round_trip_and_agreement_with_transformers(shape):
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary_hf(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(unpack_ternary_hf(packed), codes)
    # The other runtime's own packer and unpacker agree byte for byte.
    assert torch.equal(packed, pack_weights(codes.float()))
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), codes.float())


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary_hf(torch.zeros(6, 2))
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_ternary_hf(torch.full((4, 2), 2))
