"""Float64 reference of the packed-linear math (activation codes from qat.quant, the formula under test being the
int dot product and the scaling), and random packed problems for the kernel tests."""

import torch

from qat.pack.kernel_layout import pack_binary_1bit, pack_ternary_2bit
from qat.quant.activation import absmax_int8_per_token

LEVELS = {2: (-1, 0, 1), 1: (-1, 1)}
PACKERS = {2: pack_ternary_2bit, 1: pack_binary_1bit}


def random_problem(bits: int, tokens: int, rows: int, in_features: int, groups: int, seed: int):
    """Fresh random codes, packed weight, positive scales (rows, groups) and float inputs."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor(LEVELS[bits])
    codes = levels[torch.randint(len(levels), (rows, in_features), generator=gen)]
    scale = torch.rand(rows, groups, generator=gen) + 0.05
    # A wide range of token magnitudes, so per-token scales matter.
    x = torch.randn(tokens, in_features, generator=gen) * torch.logspace(-2, 2, tokens).unsqueeze(1)
    return codes, PACKERS[bits](codes), scale, x


def reference_packed_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64: y = sum_g (x_codes . w_codes)_g * w_scale_g / x_scale, x quantized by qat.quant (BitNet absmax)."""
    x_codes, x_scale = absmax_int8_per_token(x.float())
    rows, groups = scale.shape
    dots = torch.einsum("tgk,ngk->tng", x_codes.double().reshape(x.shape[0], groups, -1),
                        codes.double().reshape(rows, groups, -1))
    return (dots * scale.double()).sum(-1) / x_scale.double()


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Every element written, and the integer dot products exact.

    The only rounding allowed is fp32 in the epilogue (~1e-7 relative to sum|x_code * w_code|). Expressed in units
    of one integer step of the dot (w_scale / x_scale), that stays far below 0.5, while any wrong activation code,
    weight code or missed element moves the result by at least one step.
    """
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite outputs"
    ref = reference_packed_linear(x, codes, scale)
    _, x_scale = absmax_int8_per_token(x.float())
    step = scale.double().min() / x_scale.double()              # (tokens, 1)
    err_in_steps = ((y.double() - ref).abs() / step).max().item()
    assert err_in_steps < 0.05, f"max error {err_in_steps:.3g} integer steps"


def reference_q8_0_linear(x: torch.Tensor, w_codes: torch.Tensor, w_d: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """float64 GGML Q8_0 x Q8_0: y = sum_b (x_codes . w_codes)_b * d_w * d_x, activations quantized per token and
    block of 32 by qat.quant.q8_0; also the sum of |terms| (the scale of fp32 summation error)."""
    from qat.quant.q8_0 import quantize_q8_0

    x_codes, x_d = quantize_q8_0(x.float())
    tokens, rows = x_codes.shape[0], w_codes.shape[0]
    xb = x_codes.double().reshape(tokens, -1, 32)
    wb = w_codes.double().reshape(rows, -1, 32)
    scales = w_d.double().unsqueeze(0) * x_d.double().unsqueeze(1)              # (tokens, rows, blocks)
    y = (torch.einsum("tbk,nbk->tnb", xb, wb) * scales).sum(-1)
    magnitude = (torch.einsum("tbk,nbk->tnb", xb.abs(), wb.abs()) * scales.abs()).sum(-1)
    return y, magnitude


# fp32 error of the per-block scaling and block sums: ~1e-7 of sum|terms|. One wrong activation or weight code
# moves a result by d_w * d_x * |other code|, ~1/(32 * blocks) of sum|terms| (~2e-5 at 1536 inputs): far above.
Q8_0_RTOL = 2e-6


def assert_q8_0_matches_reference(y: torch.Tensor, x: torch.Tensor, w_codes: torch.Tensor, w_d: torch.Tensor) -> None:
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite outputs"
    ref, magnitude = reference_q8_0_linear(x, w_codes, w_d)
    err = ((y.double().reshape(ref.shape) - ref).abs() / magnitude.clamp(min=1e-30)).max().item()
    assert err < Q8_0_RTOL, f"max error {err:.3g} of sum|terms|"
