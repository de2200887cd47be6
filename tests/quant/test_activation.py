import numpy as np
import torch

from qat.quant import absmax_int8_per_token
from tests.references.bitnet_reference import int8_per_token_ref


def test_int8_per_token_matches_reference_and_round_trips_within_half_a_step():
    x = torch.randn(3, 17, 96, dtype=torch.float64) * torch.rand(3, 17, 1, dtype=torch.float64) * 10
    codes, scale = absmax_int8_per_token(x)
    assert codes.min() >= -128 and codes.max() <= 127
    assert torch.equal(codes, codes.round())
    np.testing.assert_allclose((codes / scale).numpy(), int8_per_token_ref(x.numpy()), rtol=0, atol=1e-12)
    step = 1.0 / scale
    assert ((codes / scale - x).abs() <= 0.5 * step + 1e-12).all()
    # The largest magnitude of each token maps to +-127 exactly.
    assert torch.equal(codes.abs().amax(-1), torch.full((3, 17), 127.0, dtype=torch.float64))


def test_all_zero_token_is_safe():
    codes, scale = absmax_int8_per_token(torch.zeros(2, 8))
    assert torch.isfinite(scale).all() and (codes == 0).all()
