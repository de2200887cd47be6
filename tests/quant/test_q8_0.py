"""GGML Q8_0 block quantization: d = max|x| / 127 per block of 32, codes = round(x / d), zero-padded last block."""

import torch

from qat.quant.q8_0 import Q8_0_BLOCK, dequantize_q8_0, quantize_q8_0


def test_block_scales_codes_and_round_trip_within_half_a_step():
    block_magnitudes = torch.logspace(-3, 3, 4, dtype=torch.float64).repeat_interleave(Q8_0_BLOCK)
    x = torch.randn(3, 5, 128, dtype=torch.float64) * block_magnitudes
    codes, d = quantize_q8_0(x)
    assert codes.dtype == torch.int8 and codes.shape == (3, 5, 128) and d.shape == (3, 5, 4)
    blocks = x.float().reshape(3, 5, 4, Q8_0_BLOCK)
    assert torch.equal(d, blocks.abs().amax(-1) / 127)
    # Each block's largest magnitude maps to +-127; every value is within half a step of codes * d.
    assert torch.equal(codes.reshape(3, 5, 4, 32).abs().amax(-1), torch.full((3, 5, 4), 127, dtype=torch.int8))
    err = (dequantize_q8_0(codes, d) - x.float()).abs().reshape(3, 5, 4, 32)
    assert (err <= 0.5 * d.unsqueeze(-1) * (1 + 1e-5)).all()


def test_zero_block_and_padding():
    x = torch.randn(2, 70)
    x[0, 32:64] = 0
    codes, d = quantize_q8_0(x)
    assert codes.shape == (2, 96) and d.shape == (2, 3)
    assert d[0, 1] == 0 and (codes[0, 32:64] == 0).all()            # an all-zero block: d = 0, no division by 0
    assert (codes[:, 70:] == 0).all()                                # padding quantizes to 0 ...
    assert torch.equal(d[:, 2], x[:, 64:].abs().amax(-1) / 127)      # ... and leaves the last block's scale alone
