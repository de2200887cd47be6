import math

import numpy as np
import pytest
import torch

from qat.quant.fp8 import (
    E4M3,
    E5M2,
    FP8_MAX,
    FP32_MAX,
    cast_to_fp8,
    delayed_scaling_update,
    fp8_cast_stats,
    mx_block_exponents,
    mx_fake_quantize,
    mx_quantize,
    scale_from_amax,
)
from tests.references.fp8_reference import (
    decode,
    delayed_scales,
    max_finite,
    mx_exponent,
    positive_grid,
    round_to_fp8,
)

DTYPES = {"e4m3": E4M3, "e5m2": E5M2}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_bit_pattern_decode_agrees_with_torch_and_format_constants(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    torch_values = codes.view(DTYPES[fmt]).double().numpy()
    ref = np.array([decode(c, fmt) for c in range(256)])
    np.testing.assert_array_equal(torch_values, ref)  # NaN == NaN for assert_array_equal
    assert max_finite(fmt) == FP8_MAX[DTYPES[fmt]] == {"e4m3": 448.0, "e5m2": 57344.0}[fmt]
    smallest_subnormal = positive_grid(fmt)[0][1]
    assert smallest_subnormal == {"e4m3": 2.0 ** -9, "e5m2": 2.0 ** -16}[fmt]


def _special_values(fmt: str) -> np.ndarray:
    values = positive_grid(fmt)[0]
    mids = (values[1:] + values[:-1]) / 2  # exact ties: round to the even code
    top = values[-1]
    extra = [top, top * 1.0001, top * 1.5, top * 1000, math.inf, values[1] / 2, values[1] * 0.75, values[1] * 0.25,
             0.0, -0.0, math.nan, 1e-30]
    special = np.concatenate([values, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), extra])
    return np.concatenate([special, -special]).astype(np.float32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_equals_float64_grid_reference(fmt):
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.empty(200_000).uniform_(-22, 20, generator=gen))  # subnormals .. saturation
    random = (torch.randn(200_000, generator=gen).sign() * magnitudes).numpy().astype(np.float32)
    x = np.concatenate([random, _special_values(fmt)])
    got = cast_to_fp8(torch.from_numpy(x), DTYPES[fmt]).double().numpy()
    ref = round_to_fp8(x.astype(np.float64), fmt)
    np.testing.assert_array_equal(got, ref)
    # The test covers what it claims: ties, subnormals, saturation, NaN all occur.
    values = positive_grid(fmt)[0]
    assert np.isnan(got).sum() == 2
    assert (np.abs(got) == values[-1]).sum() > 100
    min_normal = 2.0 ** (1 - {"e4m3": 7, "e5m2": 15}[fmt])
    assert ((np.abs(got) > 0) & (np.abs(got) < min_normal)).sum() > 100  # subnormal results


def test_saturation_not_overflow():
    x = torch.tensor([449.0, 500.0, 1e6, math.inf, -math.inf, math.nan])
    np.testing.assert_array_equal(cast_to_fp8(x, E4M3).float().numpy(), [448, 448, 448, 448, -448, math.nan])
    np.testing.assert_array_equal(cast_to_fp8(torch.tensor([1e5, -math.inf]), E5M2).float().numpy(), [57344, -57344])
    # torch's bare E5M2 cast does not saturate (it overflows to inf); the clamp is what makes it saturate.
    assert torch.isinf(torch.tensor(1e5).to(E5M2).float())


def test_current_scale_special_amaxes():
    amaxes = torch.tensor([2.0, 0.0, math.inf, math.nan, 1e-45])
    scale = scale_from_amax(amaxes, 448.0)
    np.testing.assert_array_equal(scale.numpy(), np.array([224.0, 1.0, 1.0, 1.0, FP32_MAX], dtype=np.float32))


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("history_len,margin", [(1, 0), (3, 0), (4, 2)])
def test_delayed_scaling_follows_history(algo, history_len, margin):
    amaxes = [3.0, 10.0, 0.5, 0.25, 0.0, math.inf, 2.0, 0.125, 0.125, 0.125, 7.0, 1.0]
    history = torch.zeros(history_len, 1)
    scale = torch.ones(1)
    got = []
    for a in amaxes:
        history[0, 0] = a  # what a forward records
        history, scale = delayed_scaling_update(history, scale, 448.0, margin, algo)
        got.append(float(scale))
    expected = delayed_scales(amaxes, history_len, 448.0, margin, algo)
    if algo == "most_recent" or history_len == 1:
        # the zero / inf steps keep the previous scale
        assert got[4] == got[3] and got[5] == got[4]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_delayed_scaling_history_roll():
    history = torch.tensor([[5.0], [1.0], [2.0]])
    new_history, scale = delayed_scaling_update(history, torch.ones(1), 448.0, 0, "max")
    assert new_history.flatten().tolist() == [0.0, 2.0, 5.0]  # the newest amax moves to the end, slot 0 is free
    assert float(scale) == pytest.approx(448.0 / 5.0)
    with pytest.raises(ValueError, match="amax_compute_algo"):
        delayed_scaling_update(history, torch.ones(1), 448.0, 0, "mean")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_mx_scales_are_spec_powers_of_two(fmt):
    dtype = DTYPES[fmt]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 100, generator=gen) * torch.exp2(torch.randint(-30, 30, (6, 1), generator=gen).float())
    x[2, 32:64] = 0.0  # an all-zero block
    codes, scales = mx_quantize(x, dtype)
    assert codes.shape == (6, 4, 32) and scales.shape == (6, 4)
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all()  # exact powers of two
    emax = {"e4m3": 8, "e5m2": 15}[fmt]
    padded = torch.nn.functional.pad(x, (0, 28)).double().numpy().reshape(6, 4, 32)
    ref_exp = np.array([[mx_exponent(padded[r, b], emax) for b in range(4)] for r in range(6)])
    np.testing.assert_array_equal(mx_block_exponents(x, dtype).numpy(), ref_exp)
    assert scales[2, 1] == 2.0 ** -127
    # Elements: the float64 grid rounding of V / X, and decoding multiplies back exactly.
    ref_codes = round_to_fp8(padded / np.exp2(ref_exp)[..., None], fmt)
    np.testing.assert_array_equal(codes.double().numpy(), ref_codes)
    np.testing.assert_array_equal(mx_fake_quantize(x, dtype).double().numpy(),
                                  (ref_codes * np.exp2(ref_exp)[..., None]).reshape(6, 128)[:, :100])


def test_mx_along_other_dim_and_nan_block():
    x = torch.randn(64, 5)
    along0 = mx_fake_quantize(x, E4M3, dim=0)
    np.testing.assert_array_equal(along0.numpy(), mx_fake_quantize(x.t(), E4M3, dim=-1).t().numpy())
    x[3, 1] = math.nan
    out = mx_fake_quantize(x, E4M3, dim=0)
    assert torch.isnan(out[:32, 1]).all() and not torch.isnan(out[32:, 1]).any() and not torch.isnan(out[:, 0]).any()


def test_cast_stats():
    x = torch.tensor([1000.0, 1.0, 1e-6, 0.0, math.nan])
    saturated, underflow = fp8_cast_stats(x, torch.tensor(1.0), E4M3)
    assert saturated == pytest.approx(1 / 4)  # of the finite values
    assert underflow == pytest.approx(1 / 3)  # of the finite nonzeros: 1e-6 < 2^-10 rounds to 0
