"""Triton path of ``packed_linear`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

The kernel source lives in ``kernels/triton/packed_linear.py`` (located by :mod:`qat.resources`). ``triton.jit``
decides at decoration time whether a kernel is interpreted, so the module is loaded once per value of
``TRITON_INTERPRET``.
"""

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from qat.kernels.extension import SOURCE_DIR, KernelBuildError
from qat.pack.kernel_layout import BLOCK_BYTES, values_per_block
from qat.quant.activation import absmax_int8_per_token

TRITON_SOURCE = SOURCE_DIR / "triton" / "packed_linear.py"
BLOCK_M = 16   # tl.dot needs >= 16 on every dimension
BLOCK_N = 32


@functools.cache
def _kernel_module(interpret: bool):
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise KernelBuildError("the Triton path needs triton (`pip install triton`)") from err
    spec = importlib.util.spec_from_file_location(f"qat_triton_packed_linear_{int(interpret)}", TRITON_SOURCE)
    module = importlib.util.module_from_spec(spec)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"   # read by @triton.jit while the module executes
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before
    return module


def load_triton_kernel():
    """The ``@triton.jit`` kernel, interpreted when ``TRITON_INTERPRET=1``."""
    return _kernel_module(os.environ.get("TRITON_INTERPRET", "0") == "1").packed_linear_kernel


@torch.library.custom_op("qat::packed_linear_triton", mutates_args=())
def packed_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int,
                         group_size: int) -> torch.Tensor:
    """Same contract as :func:`qat.kernels.packed_linear.packed_linear`; output in ``x.dtype``."""
    rows, groups = scale.shape
    row_bytes = packed.shape[1]
    padded_k = row_bytes * (8 // bits)
    if groups > 1 and group_size % values_per_block(bits):
        raise ValueError(f"Triton path: group_size={group_size} must be a multiple of {values_per_block(bits)}")
    x_codes, x_scale = absmax_int8_per_token(x.reshape(-1, in_features).float())
    x_codes = F.pad(x_codes, (0, padded_k - in_features)).to(torch.int8).contiguous()
    tokens = x_codes.shape[0]
    y = torch.empty((tokens, rows), dtype=torch.float32, device=x.device)
    grid = (triton_cdiv(tokens, BLOCK_M), triton_cdiv(rows, BLOCK_N))
    blocks_per_group = row_bytes // BLOCK_BYTES if groups == 1 else group_size // values_per_block(bits)
    load_triton_kernel()[grid](x_codes, packed.contiguous(), scale.float().contiguous(),
                               x_scale.reshape(-1).contiguous(), y, tokens, rows, row_bytes, groups,
                               blocks_per_group, BITS=bits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)


@packed_linear_triton.register_fake
def _(x, packed, scale, bits, in_features, group_size):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
