"""Packed low-bit kernels (sources in ``kernels/``): ``packed_linear`` and its path selection.

The C++ extension is built on first use; the Triton path (``qat.kernels.triton_packed``) is imported only for CUDA
tensors or by tests.
"""

from qat.kernels.packed_linear import (
                                       CPU_PATHS,
                                       KernelPathError,
                                       packed_linear,
                                       packed_linear_torch,
                                       path_support,
                                       selected_path,
)

__all__ = ["packed_linear", "packed_linear_torch", "selected_path", "path_support", "CPU_PATHS", "KernelPathError"]
