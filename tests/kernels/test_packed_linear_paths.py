"""Every CPU path of qat.kernels.packed_linear, forced in turn, against the float64 reference."""

import pytest
import torch

from qat.kernels.extension import load_cpu_extension
from qat.kernels.packed_linear import (
    CPU_PATHS,
    KernelPathError,
    bind_packed_linear,
    dense_linear,
    packed_linear,
    packed_linear_torch,
    path_support,
    q8_0_linear,
    selected_path,
)
from qat.pack.kernel_layout import pack_q8_0
from qat.quant.activation import absmax_int8_per_token
from qat.quant.q8_0 import quantize_q8_0
from tests.references.packed_linear_reference import (
    PACKERS,
    assert_matches_reference,
    assert_q8_0_matches_reference,
    random_problem,
    reference_packed_linear,
)

pytestmark = pytest.mark.kernels

# (tokens, out_features, in_features, groups): odd sizes, sizes off the 256/512 blocks, the token tile (4) and the
# int8-GEMM batch (32, avx512_vnni with AMX only), per-group scales on block multiples. avx512_vnni's GEMM (2+ tokens)
# splits tokens into near-equal tiles of <= 6 (7 -> 4 + 3, 8 -> 4 + 4, 13 -> 5 + 4 + 4, 64 -> 9 x 6 + 2 x 5) and rows
# into 4-row register tiles plus single rows, unpacked rows padded off 4 KiB strides (in_features 4096, 8192). Decode (1
# token) splits each thread's rows into 4 spread streams (ternary, AVX-512 and AVX2) or spread 32-row tiles (binary: 4
# on AVX-512 VBMI and on AVX2) plus leftovers: 130 / 293 / 300 rows (300: 5 tiles a thread, the last one partial, row
# scales), per-group scales; AVX2's 4-row ternary tile widens its int16 sums every 2 blocks, so 2560 / 2 groups (5
# blocks a group) ends each group on a 1-block chunk. Binary on AVX2 takes the table lookup up to 256 tokens and the
# unpacked 4 x 2 tile above (257, 258 tokens). Ternary on AVX2 reads the packed rows from 2 tokens on: whole groups of 8
# tokens on the 1 x 8 tile (8-row blocks plus leftover rows; K chunks of 8 blocks, cut at group ends: 2560 / 2 groups =
# 5 blocks a group), the other tokens (9 -> 8 + 1, 14 -> 8 + 6, 257 -> 256 + 1) on the packed 4 x 2 tile.
SHAPES = [(1, 1, 1, 1), (1, 7, 300, 1), (1, 130, 4096, 1), (1, 293, 1024, 2), (1, 300, 2048, 1), (1, 97, 1536, 3),
          (1, 43, 2560, 2), (3, 33, 1000, 1), (5, 16, 1024, 2), (9, 65, 517, 1), (40, 24, 700, 1),
          (33, 19, 1536, 3), (2, 4, 4096, 4), (6, 6, 256, 1), (7, 37, 4096, 1), (8, 35, 1024, 2), (13, 3, 777, 1),
          (64, 70, 1536, 3), (11, 64, 8192, 16), (16, 10, 768, 1), (17, 10, 768, 1), (8, 21, 2560, 2),
          (14, 13, 1536, 1), (257, 37, 300, 1),
          (258, 9, 1024, 2)]


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_path_matches_float64_reference(forced_path, bits, shape):
    tokens, rows, in_features, groups = shape
    if groups > 1 and (in_features // groups) % (256 if bits == 2 else 512):
        groups = 1   # the binary block is 512 wide; these shapes test groups for ternary
    codes, packed, scale, x = random_problem(bits, tokens, rows, in_features, groups, seed=hash(shape) % 1000 + bits)
    out = torch.full((tokens, rows), float("nan"))
    y = packed_linear(x, packed, scale, bits, in_features, in_features // groups, out=out)
    assert selected_path() == forced_path
    assert y.shape == (tokens, rows)
    assert_matches_reference(y, x, codes, scale)


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
def test_bound_packed_linear_writes_packed_linears_output(forced_path, bits):
    """``bind_packed_linear`` (the decoder's per-layer call), on every path: packed_linear's values, written into a
    contiguous ``out`` and into a strided view (columns of a wider buffer) without touching the other columns."""
    codes, packed, scale, x = random_problem(bits, 5, 33, 1000, 1, seed=11 + bits)
    want = packed_linear(x, packed, scale, bits, 1000, 1000)
    matmul = bind_packed_linear(packed, scale, bits, 1000, 1000)
    out = torch.full((5, 33), float("nan"))
    assert matmul(x, out) is out and torch.equal(out, want)
    wide = torch.full((5, 40), float("nan"))
    assert torch.equal(matmul(x, wide[:, 2:35]), want)
    assert wide[:, :2].isnan().all() and wide[:, 35:].isnan().all()
    if forced_path == "torch":
        return
    # The native paths' bound call (pybind11) raises the kernel's own checks as RuntimeError.
    with pytest.raises(RuntimeError, match="out must be a contiguous float32 tensor of 5 x 33"):
        matmul(x, torch.empty(5, 32))
    with pytest.raises(RuntimeError, match="input has 999 features, layer expects 1000"):
        matmul(x[:, :999], out)


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0])
def test_bound_packed_linear_with_norm_is_the_packed_linear_of_the_rms_norm(forced_path, bits, magnitude):
    """``bind_packed_linear(..., norm_weight)`` (the decoder's norm + matmul in one call), on every path, against
    the float64 reference of the packed linear of the float64 RMSNorm: the input rows carry their floor sqrt(n * eps)
    as a last column (which dominates the norm of the 1e-3 inputs) and sit in a wider buffer (the decoder's FFN
    product); the output is exact up to activation codes within 1e-4 of a rounding boundary (the norm is fp32, a
    code there may land either side), one integer step each. A wrong norm scales every output: many steps off."""
    tokens, rows, n, eps = 5, 33, 1000, 1e-6
    codes, packed, scale, x = random_problem(bits, tokens, rows, n, 1, seed=int(magnitude * 7) + bits)
    x = x / x.abs().amax(-1, keepdim=True) * magnitude
    weight = torch.randn(n, generator=torch.Generator().manual_seed(bits)) * 2
    wide = torch.full((tokens, n + 9), float("nan"))
    wide[:, 3:3 + n], wide[:, 3 + n] = x, (n * eps) ** 0.5
    x_and_floor = wide[:, 3:4 + n]                                  # rows of stride n + 9
    out = torch.full((tokens, rows), float("nan"))
    assert bind_packed_linear(packed, scale, bits, n, n, norm_weight=weight)(x_and_floor, out) is out

    x64 = x_and_floor.double()
    normed = (x64[:, :n] / x64.norm(dim=-1, keepdim=True) * weight.double()).float()
    ref = reference_packed_linear(normed, codes, scale)
    _, x_scale = absmax_int8_per_token(normed)
    scaled = normed.double() * x_scale.double()
    boundary = ((scaled.abs() - scaled.abs().floor() - 0.5).abs() < 1e-4).sum(-1, keepdim=True)   # (tokens, 1)
    step = scale.double().min() / x_scale.double()
    assert torch.isfinite(out).all()
    err_in_steps = (out.double() - ref).abs() / step
    assert (err_in_steps <= boundary + 0.05).all(), f"max error {err_in_steps.max():.3g} steps"
    if forced_path == "torch":
        return
    with pytest.raises(RuntimeError, match="must be float32 \\(tokens, 1001\\)"):
        bind_packed_linear(packed, scale, bits, n, n, norm_weight=weight)(x, out)


# float64 activation and a bound on |act'| near g (the error a perturbation of g makes, per unit)
GATED_REFERENCE = {"silu": (lambda g: g * torch.sigmoid(g), lambda g: torch.full_like(g, 1.1)),
                   "relu2": (lambda g: g.clamp(min=0) ** 2, lambda g: 2 * g.abs() + 1)}


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("epilogue", ["bias", "residual", "silu", "relu2", "bias+silu+residual"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_bound_packed_linear_epilogues_are_float64_epilogues(forced_path, bits, epilogue, tokens):
    """``bind_packed_linear``'s epilogues (the decoder's bias, FFN activation over the fused up/gate output, residual
    add) on every path, against the float64 packed linear followed by them in float64: bias added, then act(gate) *
    up left in the gate half (up unchanged), then the result added to ``out``'s old values. Each element is held to
    an error bound carried through those operations from the matmul's (1e-6 of its sum of |terms|) with 1e-6
    relative per operation (fp32 rounds at 6e-8); a missing or misplaced step moves outputs by O(1). With 4 tokens
    ``out`` is a strided view (a prompt's buffers), which runs the Python epilogue after the native matmul."""
    rows, n = 34, 1000
    codes, packed, scale, x = random_problem(bits, tokens, rows, n, 1, seed=len(epilogue) + bits + tokens)
    gen = torch.Generator().manual_seed(tokens)
    bias = torch.randn(rows, generator=gen) if "bias" in epilogue else None
    gated = next((name for name in GATED_REFERENCE if name in epilogue), None)
    residual = "residual" in epilogue
    wide = torch.randn(tokens, rows + 3, generator=gen) * 10
    out = wide[:, 1:1 + rows] if tokens > 1 else wide[:, :rows].contiguous()
    wide_before, before = wide.clone(), out.clone()
    matmul = bind_packed_linear(packed, scale, bits, n, n, bias=bias, residual=residual, gated_activation=gated)
    assert matmul(x, out) is out

    want = reference_packed_linear(x, codes, scale)
    bound = 1e-6 * reference_packed_linear(x.abs(), codes.abs(), scale)   # the matmul's sum of |terms|
    if bias is not None:
        want = want + bias.double()
        bound = bound + 1e-6 * want.abs()
    if gated is not None:
        act, slope = GATED_REFERENCE[gated]
        (up, gate), (up_bound, gate_bound) = want.chunk(2, dim=-1), bound.chunk(2, dim=-1)
        product = act(gate) * up
        want = torch.cat((up, product), dim=-1)
        bound = torch.cat((up_bound, slope(gate) * gate_bound * up.abs() + act(gate).abs() * up_bound
                           + 1e-6 * product.abs()), dim=-1)
    if residual:
        want = want + before.double()
        bound = bound + 1e-6 * want.abs()
    assert torch.isfinite(out).all()
    excess = (out.double() - want).abs() - bound
    assert (excess <= 0).all(), f"off by {excess.max():.3g} beyond the rounding bound"
    if tokens > 1:   # the columns around the strided out are untouched
        assert torch.equal(wide[:, [0, -2, -1]], wide_before[:, [0, -2, -1]])
    with pytest.raises(ValueError, match="gated_activation 'gelu' is not one of"):
        bind_packed_linear(packed, scale, bits, n, n, gated_activation="gelu")


@pytest.mark.parametrize("tokens", [1, 2])
def test_silu_epilogue_is_float64_silu_over_exp_range(forced_path, tokens):
    """The SiLU epilogue alone (the matmul's input is zero, so up and gate are exactly the bias) over gate values
    spanning exp's whole fp32 range and its edges: exp(-g) subnormal (g near 100), 1 (g = 0), overflowing (g < -88.72),
    random values in [-20, 20], and a NaN that must stay NaN. Each product is held to 5e-7 of its float64 value (exp
    within 2 ulp, then three roundings: 4.2e-7) plus 4e-37 |up| where exp(-g) overflows (every implementation gives 0
    there; the true value is below 104 e^-88.72 |up|). One token runs the native epilogue (vectorized exp on the
    SIMD paths, glibc's expf on portable), two tokens into a strided view the Python one (F.silu)."""
    gen = torch.Generator().manual_seed(7)
    edges = torch.tensor([-110.0, -104.0, -103.5, -95.0, -88.8, -88.72, -88.5, -87.4, -87.3, -86.9, -30.0, -1e-30,
                          0.0, 1e-30, 1e-3, 30.0, 86.9, 87.3, 87.4, 88.5, 88.8, 95.0, 104.0, 110.0, float("nan")])
    gate = torch.cat((edges, torch.linspace(-100, 100, 201), torch.rand(300, generator=gen) * 40 - 20))
    up = torch.randn(gate.numel(), generator=gen) * 4
    rows, n = 2 * gate.numel(), 64
    codes, packed, scale, _ = random_problem(2, tokens, rows, n, 1, seed=3)
    x = torch.zeros(tokens, n)
    wide = torch.zeros(tokens, rows + 1)
    out = wide[:, 1:] if tokens > 1 else wide[:, :rows].contiguous()
    bind_packed_linear(packed, scale, 2, n, n, bias=torch.cat((up, gate)), gated_activation="silu")(x, out)

    assert torch.equal(out[:, :gate.numel()], up.expand(tokens, -1))
    g, u = gate.double(), up.double()
    want = g * torch.sigmoid(g) * u
    bound = 5e-7 * want.abs() + torch.where(g < -88.72, 4e-37 * u.abs(), 0)
    product = out[:, gate.numel():].double()
    nan_gate = torch.isnan(g)
    assert nan_gate.sum() == 1 and torch.isnan(product[:, nan_gate]).all()
    excess = (product[:, ~nan_gate] - want[~nan_gate]).abs() - bound[~nan_gate]
    worst = g[~nan_gate][excess.max(0).values.argmax()]
    assert (excess <= 0).all(), f"off by {excess.max():.3g} beyond the rounding bound (gate {worst})"


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
def test_amx_route_matches_the_reference_and_the_vnni_gemm(monkeypatch, bits):
    """avx512_vnni prefill on AMX CPUs: unpack to int8, oneDNN's int8 GEMM (at::_int_mm), the fp32 epilogue. Forced
    here on any AVX-512 VNNI CPU (oneDNN then runs without AMX): the float64 reference's values, and bit-identical
    to qat's own VNNI GEMM (the same IEEE epilogue; exact int32 dots either way)."""
    ok, why = path_support("avx512_vnni")
    if not ok:
        pytest.skip(f"path avx512_vnni: {why}")
    monkeypatch.setenv("QAT_KERNEL_PATH", "avx512_vnni")
    module = load_cpu_extension()
    for tokens, rows, in_features in [(32, 40, 1000), (64, 70, 1536)]:
        codes, packed, scale, x = random_problem(bits, tokens, rows, in_features, 1, seed=tokens + bits)
        module.int8_gemm_without_amx(True)
        try:
            via_onednn = packed_linear(x, packed, scale, bits, in_features, in_features)
        finally:
            module.int8_gemm_without_amx(False)
        assert_matches_reference(via_onednn, x, codes, scale)
        if not module.cpu_has_amx_int8():   # otherwise both calls take the oneDNN route
            assert torch.equal(via_onednn, packed_linear(x, packed, scale, bits, in_features, in_features))


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("lead", [(2, 3), (1, 1)], ids=["6tokens", "decode"])
def test_paths_agree_bitwise_and_keep_leading_dims(monkeypatch, bits, lead):
    """All paths share one fp32 epilogue (scalar or vectorized, the same operations in the same order), so
    tensor/row-scale results are bit-identical across paths; 40 rows end in a partial 32-row binary tile."""
    codes, packed, scale, x = random_problem(bits, lead[0] * lead[1], 40, 777, 1, seed=7)
    x = x.reshape(*lead, 777)
    results = {}
    for path in CPU_PATHS:
        if path_support(path)[0]:
            monkeypatch.setenv("QAT_KERNEL_PATH", path)
            results[path] = packed_linear(x, packed, scale, bits, 777, 777)
    assert len(results) >= 2
    first = next(iter(results.values()))
    assert first.shape == (*lead, 40)
    for path, y in results.items():
        assert torch.equal(y, first), path


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("tokens", [1, 3], ids=["decode", "3tokens"])
def test_nan_input_counts_as_minus_absmax_on_every_native_path(monkeypatch, bits, tokens):
    """A NaN input has no int8 code: the max skips it and the native paths clamp it to -127 (not -128, which the AVX2
    binary tables cannot hold: code + 127 must fit a byte), i.e. it counts as -max|x| of its token, on every native
    path alike (the torch path propagates NaN)."""
    codes, packed, scale, x = random_problem(bits, tokens, 40, 777, 1, seed=5 + bits)
    x[0, [3, 500]] = float("nan")
    finite = x.clone()
    finite[0, [3, 500]] = -x[0].nan_to_num(0.0).abs().max()
    results = {}
    for path in CPU_PATHS:
        if path != "torch" and path_support(path)[0]:
            monkeypatch.setenv("QAT_KERNEL_PATH", path)
            results[path] = packed_linear(x, packed, scale, bits, 777, 777)
    assert len(results) >= 2
    first = next(iter(results.values()))
    assert_matches_reference(first, finite, codes, scale)
    for path, y in results.items():
        assert torch.equal(y, first), path


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("tokens", [1, 5, 13, 257])
def test_extreme_dots_do_not_overflow_narrow_accumulators(forced_path, bits, sign, tokens):
    """Every activation code at +-127 and every weight code at +-1: the largest dots the int16 lanes (vpmaddubsw sums,
    table-lookup sums) and the GEMM's int32 lanes ever hold, over 8192 inputs, for decode (1 token), a 4-token tile
    and a decode token (5), GEMM tiles (13), and AVX2's binary tile GEMM past the table lookup's 256 tokens (257)."""
    rows, k = 37, 8192
    codes = torch.full((rows, k), sign)
    packed = PACKERS[bits](codes)
    scale = torch.ones(rows, 1)
    x = torch.full((tokens, k), 3.0)                     # all codes 127, x_scale = 127 / 3
    x[1::2] = -3.0                                       # and -127 (the codes' negative extreme) in every other token
    y = packed_linear(x, packed, scale, bits, k, k)
    expected = sign * x[:, :1] * k
    torch.testing.assert_close(y, expected.expand(tokens, rows), rtol=1e-6, atol=0)
    assert_matches_reference(y, x, codes, scale)


def test_bf16_input_gives_bf16_output(monkeypatch):
    codes, packed, scale, x = random_problem(2, 3, 20, 300, 1, seed=3)
    y = packed_linear(x.bfloat16(), packed, scale, 2, 300, 300)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, packed_linear_torch(x.bfloat16(), packed, scale, 2, 300, 300))


def test_group_size_off_the_block_falls_back_to_torch():
    codes, packed, scale, x = random_problem(2, 2, 8, 384, 3, seed=5)   # groups of 128 < the 256-value block
    assert_matches_reference(packed_linear(x, packed, scale, 2, 384, 128), x, codes, scale)


def test_unknown_or_unsupported_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QAT_KERNEL_PATH", "sse9")
    with pytest.raises(KernelPathError, match="unknown kernel path 'sse9'.*Unset it or pick one of"):
        selected_path()


def test_native_op_rejects_wrong_in_features():
    _, packed, scale, x = random_problem(2, 1, 8, 300, 1, seed=1)
    if not path_support("portable")[0]:
        pytest.skip(path_support("portable")[1])
    with pytest.raises(RuntimeError, match="layer expects 301"):
        packed_linear(x, packed, scale, 2, 301, 301)


@pytest.mark.parametrize("rows,k", [(1, 1), (7, 33), (33, 1000), (130, 1536), (1003, 70)])
def test_dense_gemv_matches_float64_reference(forced_path, rows, k):
    """The full-precision head's one-token GEMV (every path) against float64: within fp32 accumulation error, far
    below what one missed or doubled product (~1/k of the sum of |w x|) would add."""
    gen = torch.Generator().manual_seed(rows * k)
    weight, bias = torch.randn(rows, k, generator=gen), torch.randn(rows, generator=gen)
    x = torch.randn(1, 1, k, generator=gen)
    y = dense_linear(x, weight, bias)
    assert y.shape == (1, 1, rows) and y.dtype == torch.float32
    ref = x.double() @ weight.double().T + bias.double()
    magnitude = x.double().abs() @ weight.double().abs().T + bias.double().abs()
    assert ((y.double() - ref).abs() <= 1e-5 * magnitude).all()
    batch = torch.randn(3, k, generator=gen)                    # more than one token: F.linear, bit for bit
    assert torch.equal(dense_linear(batch, weight, bias), torch.nn.functional.linear(batch, weight, bias))


def q8_0_problem(tokens: int, rows: int, k: int, seed: int):
    """Random fp32 weight and its Q8_0 codes / fp16 scales, packed; inputs of widely varying magnitude."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen) * 0.05
    codes, d = quantize_q8_0(weight)
    w_d = d.half()                                                  # what the packed layer stores
    qweight, scale = pack_q8_0(codes, w_d)
    x = torch.randn(tokens, k, generator=gen) * torch.logspace(-2, 2, tokens).unsqueeze(1)
    return weight, codes, w_d.float(), qweight, scale, x


# Sizes on and off the 32-value block and the 512-value chunk, one token (decode) and a prefill batch; one token on
# AVX2 reads 4 rows a quarter of each thread's range apart, plus leftovers (70, 130, 1003 rows).
Q8_0_SHAPES = [(1, 1, 32), (1, 70, 96), (2, 5, 600), (3, 33, 1536), (16, 100, 2048), (1, 130, 4100), (1, 1003, 1024)]


@pytest.mark.parametrize("shape", Q8_0_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_q8_0_linear_matches_float64_reference(forced_path, shape):
    tokens, rows, k = shape
    weight, codes, w_d, qweight, scale, x = q8_0_problem(tokens, rows, k, seed=sum(shape))
    y = q8_0_linear(x.reshape(1, tokens, k), qweight, scale, k)
    assert selected_path() == forced_path
    assert y.shape == (1, tokens, rows) and y.dtype == torch.float32
    assert_q8_0_matches_reference(y, x, codes, w_d)
    # Against the fp32 weights, loosely: each factor is rounded by up to half a step, 1/254 of its block's maximum.
    exact = x.double() @ weight.double().T
    assert ((y[0].double() - exact).abs() <= 0.02 * (x.double().abs() @ weight.double().abs().T)).all()
    if tokens == 1 and forced_path != "torch":   # native decode tiles: each row's arithmetic as in the batched loop
        assert torch.equal(y[0, 0], q8_0_linear(x.expand(2, k), qweight, scale, k)[1])


def test_q8_0_reference_check_catches_one_wrong_code():
    """The tolerance of assert_q8_0_matches_reference is tight enough to see a single weight code off by one."""
    _, codes, w_d, qweight, scale, x = q8_0_problem(2, 8, 1536, seed=11)
    y = q8_0_linear(x, qweight, scale, 1536)
    wrong = codes.clone()
    wrong[3, 700] += 1 if wrong[3, 700] < 127 else -1
    with pytest.raises(AssertionError, match="of sum"):
        assert_q8_0_matches_reference(y, x, wrong, w_d)


def test_q8_0_extreme_codes_do_not_overflow(forced_path):
    """Every code at +-127 over 8192 inputs: vpmaddubsw pairs at 2 * 127^2 (int16's limit is 32767)."""
    k = 8192
    codes = torch.full((3, k), 127, dtype=torch.int8)
    codes[1] = -127
    qweight, scale = pack_q8_0(codes, torch.ones(3, k // 32))
    x = torch.full((2, k), 5.0)
    x[1] = -5.0                                                   # activation codes +-127, d = 5 / 127
    y = q8_0_linear(x, qweight, scale, k)
    expected = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]) * 127 * 5 * k
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)


def test_activation_codes_round_half_to_even_like_torch(forced_path):
    """The native per-token quantizer (AVX2 fp32 rows, scalar otherwise) rounds ties to even and clamps as torch's
    ``absmax_int8_per_token``: an identity-like ternary weight (row j = +1 at column j) reads every code back out.
    Max |x| = 127 makes the scale 1, so x = +-0.5, +-1.5, +-2.5 ... are exact ties; 77 columns put some in the
    vector loop and some in its tail."""
    k = 77
    ties = torch.arange(k, dtype=torch.float32) - 38.5              # -38.5 .. 37.5, every one a tie
    x = torch.cat([torch.tensor([127.0]), ties[1:]])[None]
    codes = torch.eye(k, dtype=torch.int8)
    packed = PACKERS[2](codes)
    scale = torch.ones(k, 1)
    y = packed_linear(x, packed, scale, 2, k, k)
    expected = torch.round(x)                                       # round half to even, scale 1
    assert torch.equal(y, expected), (y - expected).abs().max()
    assert torch.equal(y, packed_linear_torch(x, packed, scale, 2, k, k))
