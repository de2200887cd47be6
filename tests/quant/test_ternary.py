import numpy as np
import pytest
import torch

from qat.quant import absmean_ternary, absmedian_ternary, dequantize
from tests.references.bitnet_reference import absmean_ternary_ref, absmedian_ternary_ref

QUANTIZERS = [(absmean_ternary, absmean_ternary_ref), (absmedian_ternary, absmedian_ternary_ref)]


@pytest.mark.parametrize("quantizer,reference", QUANTIZERS)
@pytest.mark.parametrize("shape", [(64, 128), (37, 91), (1, 5)])
def test_per_tensor_matches_float64_formula(quantizer, reference, shape):
    w = torch.randn(shape, dtype=torch.float64) * torch.rand(1, dtype=torch.float64) * 3
    codes, scale = quantizer(w)
    ref_codes, ref_scale = reference(w.numpy())
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(float(scale), ref_scale, rtol=1e-12)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)


@pytest.mark.parametrize("quantizer,reference", QUANTIZERS)
def test_per_row_and_per_group_scales(quantizer, reference):
    w = torch.randn(12, 64, dtype=torch.float64) * torch.linspace(0.1, 4, 12, dtype=torch.float64)[:, None]
    codes, scale = quantizer(w, "row")
    assert scale.shape == (12, 1)
    for r in range(12):
        ref_codes, ref_scale = reference(w[r].numpy())
        np.testing.assert_allclose(float(scale[r]), ref_scale, rtol=1e-12)
        np.testing.assert_array_equal(codes[r].numpy(), ref_codes)
    codes, scale = quantizer(w, "group", group_size=16)
    assert scale.shape == (12, 4, 1)
    for r in range(12):
        for g in range(4):
            ref_codes, ref_scale = reference(w[r, g * 16:(g + 1) * 16].numpy())
            np.testing.assert_allclose(float(scale[r, g]), ref_scale, rtol=1e-12)
            np.testing.assert_array_equal(codes[r, g * 16:(g + 1) * 16].numpy(), ref_codes)
    deq = dequantize(codes, scale, "group", 16)
    np.testing.assert_allclose(deq[3, 16:32].numpy(), (codes[3, 16:32] * scale[3, 1]).numpy())


def test_values_are_ternary_times_scale_and_error_is_bounded():
    w = torch.randn(256, 256)
    codes, scale = absmean_ternary(w)
    deq = dequantize(codes, scale, "tensor")
    assert torch.equal(deq / scale, codes)
    # Inside the clip range (|w| <= 1.5 s) rounding moves a weight by at most half a step.
    inside = w.abs() <= 1.5 * scale
    assert ((deq - w).abs()[inside] <= 0.5 * scale + 1e-6).all()


def test_group_size_must_divide_inputs():
    with pytest.raises(ValueError, match="group_size"):
        absmean_ternary(torch.randn(4, 10), "group", group_size=4)
