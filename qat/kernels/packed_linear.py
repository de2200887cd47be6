"""``packed_linear``: int8-per-token activations x packed ternary/binary weights, dispatched to a kernel path.

Math (BitNet b1.58, arXiv 2402.17764): ``y = (x_codes . w_codes) * w_scale / x_scale`` with
``x_codes, x_scale = absmax_int8_per_token(x)``, summed per group when the weight has per-group scales.

Paths, fastest first: ``triton`` (CUDA tensors), ``avx512_vnni``, ``avx2``, ``portable`` (C++ extension, chosen
by what the CPU supports) and ``torch`` (pure-torch fallback, same results). ``QAT_KERNEL_PATH=<name>``
forces a CPU path (tests run each in turn); ``auto`` or unset picks the fastest the CPU supports.
"""

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F

from qat.errors import QATError
from qat.kernels.extension import KernelBuildError, load_cpu_extension
from qat.pack.kernel_layout import (
    BINARY_BITS,
    TERNARY_BITS,
    unpack_binary_1bit,
    unpack_q8_0,
    unpack_ternary_2bit,
    values_per_block,
)
from qat.quant.activation import absmax_int8_per_token
from qat.quant.q8_0 import Q8_0_BLOCK, quantize_q8_0

CPU_PATHS = ("avx512_vnni", "avx2", "portable", "torch")
NATIVE_PATHS = CPU_PATHS[:-1]
PATH_ENV = "QAT_KERNEL_PATH"
MAX_NATIVE_GROUPS = 64  # per-row group accumulators the C++ kernels keep on the stack


class KernelPathError(QATError, ValueError):
    """A forced kernel path is unknown or this machine cannot run it."""


@functools.cache
def _native_ops():
    load_cpu_extension()
    ops = torch.ops.qat_kernels

    @torch.library.register_fake("qat_kernels::packed_linear_out")
    def _(x, packed, scale, bits, in_features, group_size, path, out):
        return None

    @torch.library.register_fake("qat_kernels::packed_linear")
    def _(x, packed, scale, bits, in_features, group_size, path):
        return x.new_empty((*x.shape[:-1], scale.shape[0]))

    @torch.library.register_fake("qat_kernels::dense_gemv")
    def _(x, weight, path):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("qat_kernels::q8_0_linear")
    def _(x, qweight, scale, in_features, path):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    return ops


def path_support(path: str) -> tuple[bool, str]:
    """Whether ``path`` can run here, and if not, why (for skips and error messages)."""
    if path == "torch":
        return True, ""
    if path not in NATIVE_PATHS:
        return False, f"unknown kernel path {path!r}; known: {', '.join(CPU_PATHS)}"
    try:
        ops = _native_ops()
    except KernelBuildError as err:
        return False, str(err)
    if not ops.cpu_supports(path):
        return False, f"this CPU lacks the instructions of the {path!r} path"
    return True, ""


@functools.cache
def _auto_path() -> str:
    return next(p for p in CPU_PATHS if path_support(p)[0])


def selected_path() -> str:
    """The CPU path to run: ``$QAT_KERNEL_PATH`` if set (checked), else the fastest supported one."""
    return _checked_path(os.environ.get(PATH_ENV, "auto"))


@functools.cache
def _checked_path(forced: str) -> str:
    # Cached per value: a decode step calls this per layer, and the CPU's answer does not change.
    if forced == "auto":
        return _auto_path()
    ok, why = path_support(forced)
    if not ok:
        raise KernelPathError(f"{PATH_ENV}={forced}: {why}. Unset it or pick one of: "
                              f"{', '.join(p for p in CPU_PATHS if path_support(p)[0])}")
    return forced


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int, out_features: int,
                 dtype: torch.dtype = torch.int8) -> torch.Tensor:
    if bits == TERNARY_BITS:
        return unpack_ternary_2bit(packed, in_features, dtype)
    if bits == BINARY_BITS:
        return unpack_binary_1bit(packed, in_features, out_features, dtype)
    raise ValueError(f"bits must be {BINARY_BITS} (binary) or {TERNARY_BITS} (ternary), got {bits}")


def packed_linear_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int,
                        group_size: int) -> torch.Tensor:
    """Pure-torch fallback: exact integer dot products (float64 holds them), then the kernels' fp32 epilogue."""
    rows, groups = scale.shape
    x_codes, x_scale = absmax_int8_per_token(x.reshape(-1, in_features).float())
    w_codes = unpack_codes(packed, bits, in_features, rows, torch.float64)
    dots = torch.einsum("tgk,ngk->tng", x_codes.double().reshape(-1, groups, in_features // groups),
                        w_codes.reshape(rows, groups, in_features // groups))
    y = (dots.float() * scale).sum(-1) / x_scale
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)


def _native_groups(scale: torch.Tensor, bits: int, group_size: int) -> bool:
    # The native kernels apply group scales at block boundaries; other group sizes take the fallback.
    groups = scale.shape[1]
    return groups == 1 or (group_size % values_per_block(bits) == 0 and groups <= MAX_NATIVE_GROUPS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int,
                  group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., in_features) float -> (..., out_features) in ``x.dtype``.

    ``packed`` is the kernel layout of :mod:`qat.pack.kernel_layout`; ``scale`` is float32
    (out_features, groups) with ``groups == 1`` (tensor/row scales) or ``in_features // group_size``.
    ``out``: optional float32 buffer of tokens x out_features elements that the native paths write into.
    """
    if x.is_cuda:
        from qat.kernels.triton_packed import packed_linear_triton

        return packed_linear_triton(x, packed, scale, bits, in_features, group_size)
    path = selected_path()
    if path == "torch" or not _native_groups(scale, bits, group_size):
        return packed_linear_torch(x, packed, scale, bits, in_features, group_size)
    # The overloads themselves (``.default``): resolving the op packet costs ~1 µs a call.
    if out is None:
        return _native_ops().packed_linear.default(x, packed, scale, bits, in_features, group_size, path)
    _native_ops().packed_linear_out.default(x, packed, scale, bits, in_features, group_size, path, out)
    return out.to(x.dtype).reshape(*x.shape[:-1], scale.shape[0])


def rms_norm(x: torch.Tensor, x_and_floor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HF's ``BitNetRMSNorm`` over n features, ``w * x / sqrt(mean(x²) + eps)``, computed as
    ``(w * sqrt(n)) * x / |(x, sqrt(n * eps))|``: ``x_and_floor`` is ``x`` with each row followed by sqrt(n * eps) (the
    same buffer: ``x`` is a view of its first n columns; ``qat.nn.decoder.rms_floor``) and ``weight`` is
    ``w * sqrt(n)``. The same value to fp32 rounding in 3 aten ops where HF's form takes 7 and ``F.rms_norm``'s
    composite 10 (each op costs 1.5-4 µs in a decode step); ``bind_packed_linear`` with a ``norm_weight`` computes it
    inside the native matmul call."""
    return torch.div(x, torch.linalg.vector_norm(x_and_floor, 2, -1, True)).mul_(weight)


GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": lambda gate: F.silu(gate, inplace=True),
    "relu2": lambda gate: F.relu(gate, inplace=True).square_(),   # HF's ReLUSquaredActivation, in place
}


def bind_packed_linear(packed: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int, group_size: int,
                       norm_weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       residual: bool = False, gated_activation: str | None = None
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, out) -> out`` holding ``packed_linear(x, packed, scale, bits, in_features, group_size)``, for CPU ``x``
    and ``out`` float32 (tokens, out_features), with the kernel path chosen now: the native kernel itself where
    ``packed_linear`` would call it, without its per-call dispatch in Python and torch.ops (~5 µs, which a
    decode step pays four times per layer; ``qat.nn.decoder``). A contiguous ``out`` is written in place, a
    strided view (columns of a wider buffer) through a temporary.

    With ``norm_weight`` (in_features float32, ``rms_norm``'s weight) the call is ``(x_and_floor, out) -> out``: the
    packed linear of ``rms_norm(x_and_floor[:, :-1], x_and_floor, norm_weight)``, the norm computed in the native
    call (a few µs, where the 3 aten ops took 15-35 µs in a decode step). Its norm is correctly rounded to fp32 where
    torch's reduction is within an ulp of that, so an activation code at a rounding boundary can differ by one step.

    Epilogues, in this order, in the native call (each replaces an aten op of 2-5 µs in a decode step): ``bias``
    (out_features) is added; ``gated_activation`` (a ``GATED_ACTIVATIONS`` name) takes the output's two halves as
    ``up`` and ``gate`` (``fuse_packed_linears([up, gate])``) and leaves ``act(gate) * up`` in the gate half, the
    FFN product; ``residual`` adds the result to ``out`` (the residual stream) instead of writing it.
    """
    if gated_activation is not None and gated_activation not in GATED_ACTIVATIONS:
        raise KernelPathError(f"gated_activation {gated_activation!r} is not one of {sorted(GATED_ACTIVATIONS)}")

    def normed(x_and_floor: torch.Tensor) -> torch.Tensor:
        return x_and_floor if norm_weight is None else rms_norm(x_and_floor[:, :-1], x_and_floor, norm_weight)

    def finish(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if bias is not None:
            y = y + bias
        if gated_activation is not None:
            up, gate = y.chunk(2, dim=-1)
            GATED_ACTIVATIONS[gated_activation](gate).mul_(up)
        return out.add_(y) if residual else out.copy_(y)

    path = selected_path()
    if path == "torch" or not _native_groups(scale, bits, group_size):
        def matmul_torch(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return finish(packed_linear_torch(normed(x), packed, scale, bits, in_features, group_size).view(out.shape),
                          out)
        return matmul_torch
    op = _native_ops().packed_linear.default
    bound = load_cpu_extension().BoundPackedLinear(packed, scale, bits, in_features, group_size, path,
                                                   None if norm_weight is None else norm_weight.float(),
                                                   None if bias is None else bias.float(), residual,
                                                   gated_activation or "")

    def matmul(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if out.is_contiguous():
            bound(x, out)
            return out
        return finish(op(normed(x), packed, scale, bits, in_features, group_size, path).view(out.shape), out)
    return matmul


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for the layers a packed model keeps in full precision (the ``lm_head``): one fp32 token on the
    CPU runs qat's GEMV kernel, which streams the weight at ~90% of the memory bandwidth where torch's GEMV reaches
    55-75% (``bench/kernels.py``); everything else, and ``QAT_KERNEL_PATH=torch``, is ``F.linear``."""
    if (x.numel() == weight.shape[-1] and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and weight.is_contiguous()):
        path = selected_path()
        if path != "torch":
            y = _native_ops().dense_gemv(x, weight, path)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def q8_0_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Pure-torch Q8_0 x Q8_0: activations quantized per token and block of 32 (``quantize_q8_0``), per-block integer
    dots (exact in fp32: 32 products of at most 127^2), each scaled by ``d_w * d_x`` and summed in fp32."""
    rows, padded = qweight.shape
    x_codes, x_d = quantize_q8_0(x.reshape(-1, in_features))
    x_codes = F.pad(x_codes, (0, padded - x_codes.shape[-1]))
    x_d = F.pad(x_d, (0, padded // Q8_0_BLOCK - x_d.shape[-1]))
    blocks = padded // Q8_0_BLOCK
    w_blocks = unpack_q8_0(qweight, padded).float().reshape(rows, blocks, Q8_0_BLOCK).permute(1, 2, 0)
    x_blocks = x_codes.float().reshape(-1, blocks, Q8_0_BLOCK).transpose(0, 1)
    dots = torch.bmm(x_blocks, w_blocks)                                        # (blocks, tokens, rows)
    y = (dots * (scale.float().t().unsqueeze(1) * x_d.t().unsqueeze(-1))).sum(0)
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)


def q8_0_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` (..., in_features) float times GGML Q8_0 weights -> (..., out_features) in ``x.dtype``; activations
    quantized to Q8_0 per token and block of 32 (:mod:`qat.quant.q8_0`), as llama.cpp does for Q8_0 weights.

    ``qweight`` int8 (out_features, padded_in) and ``scale`` fp16 (out_features, padded_in / 32) are
    :func:`qat.pack.kernel_layout.pack_q8_0`'s output. The C++ paths stream the int8 codes once for all tokens;
    CUDA tensors and ``QAT_KERNEL_PATH=torch`` take the pure-torch fallback.
    """
    if x.device.type != "cpu" or selected_path() == "torch":
        return q8_0_linear_torch(x, qweight, scale, in_features)
    return _native_ops().q8_0_linear(x, qweight, scale, in_features, selected_path())
