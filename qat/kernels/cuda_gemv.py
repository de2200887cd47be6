"""The CUDA packed GEMV (``kernels/cuda/packed_gemv.cu``, dp4a) built with nvcc for the GPU at hand and called
through its C launcher on torch CUDA tensors. Decode-sized batches; same weight layouts as the CPU kernels.

Built (first use, seconds) into ``qat.paths.cache_dir('cuda_kernels')``, one library per source digest and GPU
architecture, written under a temporary name and renamed so a half-built library is never loaded.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch
import torch.nn.functional as F

from qat.kernels.extension import SOURCE_DIR, KernelBuildError
from qat.paths import cache_dir
from qat.quant.activation import absmax_int8_per_token

CUDA_SOURCE = SOURCE_DIR / "cuda" / "packed_gemv.cu"


@functools.cache
def load_cuda_gemv(arch: str) -> ctypes._CFuncPtr:
    """The ``qat_packed_gemv`` launcher compiled for ``arch`` (e.g. ``sm_90``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise KernelBuildError("nvcc not found on PATH: install the CUDA toolkit to build the CUDA GEMV")
    digest = hashlib.sha256(CUDA_SOURCE.read_bytes()).hexdigest()[:16]
    library = cache_dir("cuda_kernels") / f"packed_gemv-{arch}-{digest}.so"
    if not library.exists():
        partial = library.with_name(f".{library.name}.{os.getpid()}")
        build = subprocess.run([nvcc, "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", str(CUDA_SOURCE),
                                "-o", str(partial)], capture_output=True, text=True, timeout=600)
        if build.returncode != 0:
            partial.unlink(missing_ok=True)
            raise KernelBuildError(f"nvcc failed to build {CUDA_SOURCE} for {arch}:\n{build.stderr}")
        os.replace(partial, library)
    launcher = ctypes.CDLL(str(library)).qat_packed_gemv
    launcher.restype = ctypes.c_int
    launcher.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    return launcher


def quantize_activations(x: torch.Tensor, in_features: int, row_bytes: int, bits: int):
    """What the launcher reads besides the weights: int8 codes padded to whole blocks, their per-token sums and
    the per-token scales (the activation quantizer every qat kernel uses)."""
    x_codes, x_scale = absmax_int8_per_token(x.reshape(-1, in_features).float())
    x_codes = F.pad(x_codes, (0, row_bytes * (8 // bits) - in_features)).to(torch.int8).contiguous()
    return x_codes, x_codes.sum(1, dtype=torch.int32), x_scale.reshape(-1).float().contiguous()


def launch_gemv(x_codes: torch.Tensor, x_sum: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor,
                w_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel alone on quantized activations; ``w_scale`` fp32 (rows,), contiguous."""
    major, minor = torch.cuda.get_device_capability(x_codes.device)
    launcher = load_cuda_gemv(f"sm_{major}{minor}")
    rows, tokens, row_bytes = w_scale.shape[0], x_codes.shape[0], packed.shape[1]
    y = torch.empty((tokens, rows), dtype=torch.float32, device=x_codes.device)
    status = launcher(x_codes.data_ptr(), x_sum.data_ptr(), x_scale.data_ptr(), packed.data_ptr(),
                      w_scale.data_ptr(), y.data_ptr(), rows, row_bytes, tokens, bits,
                      torch.cuda.current_stream(x_codes.device).cuda_stream)
    if status != 0:
        raise KernelBuildError(f"the CUDA GEMV launch failed with cudaError {status}")
    return y


def packed_gemv_cuda(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int,
                     in_features: int) -> torch.Tensor:
    """``y = x W^T`` (fp32) for packed ternary (``bits=2``) or binary (``bits=1``) weights with one scale per row;
    ``x`` (tokens, in_features) on the GPU, quantized per token to int8 as every qat kernel does."""
    if scale.dim() == 2 and scale.shape[1] != 1:
        raise ValueError("the CUDA GEMV takes one scale per row (groups == 1)")
    packed = packed.contiguous()
    x_codes, x_sum, x_scale = quantize_activations(x, in_features, packed.shape[1], bits)
    return launch_gemv(x_codes, x_sum, x_scale, packed, scale.reshape(-1).float().contiguous(), bits)
