"""Build (first use) and load the C++ packed-kernel extension from ``kernels/cpu/`` (see :mod:`qat.resources`).

Built with ``torch.utils.cpp_extension.load`` (ninja) into ``qat.paths.cache_dir('torch_extensions')``, one folder
per source version; later loads reuse the build. The extension registers its ops with
``TORCH_LIBRARY(qat_kernels, ...)``; they are called as ``torch.ops.qat_kernels.*``. The same library is a Python
module (pybind11) holding the decode loop's pre-bound matmul (``BoundPackedLinear``).
"""

import functools
import hashlib
import sys
import time
from types import ModuleType

from qat.errors import QATError
from qat.paths import cache_dir
from qat.resources import shipped_path

SOURCE_DIR = shipped_path("kernels")
CPU_SOURCE = SOURCE_DIR / "cpu" / "packed_linear.cpp"
EXTENSION_NAME = "qat_packed_cpu"


class KernelBuildError(QATError, RuntimeError):
    """A native kernel cannot be built or loaded."""


@functools.cache
def load_cpu_extension() -> ModuleType:
    """Compile (once, ~30 s) and load the CPU extension: registers ``torch.ops.qat_kernels`` and returns the Python
    module (``BoundPackedLinear``)."""
    import torch.utils.cpp_extension as cpp_extension

    if not CPU_SOURCE.exists():
        raise KernelBuildError(f"kernel source {CPU_SOURCE} is missing; reinstall qat (`pip install .` from a full "
                               "source checkout) or set QAT_KERNEL_PATH=torch")
    # One build folder per source version: checkouts that share a cache (git worktrees, a job still running an
    # older checkout) then keep their own builds instead of rebuilding, and replacing the loaded .so under, each other.
    source_digest = hashlib.sha256(CPU_SOURCE.read_bytes()).hexdigest()[:12]
    build_dir = cache_dir("torch_extensions", f"{EXTENSION_NAME}-{source_digest}")
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        print(f"[qat] building the packed CPU kernels into {build_dir} (first use, ~30 s) ...", file=sys.stderr,
              flush=True)
    start = time.perf_counter()
    try:
        # No -march=native: SIMD paths are compiled per function (target attributes) and chosen at run time,
        # so one build runs on every x86-64 CPU. No FMA contraction: every path rounds like the torch fallback.
        module = cpp_extension.load(name=EXTENSION_NAME, sources=[str(CPU_SOURCE)], build_directory=str(build_dir),
                                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                                    is_python_module=True, verbose=False)
    except (RuntimeError, OSError) as err:
        raise KernelBuildError(
            f"building {CPU_SOURCE} failed: {err}. It needs a C++17 compiler (g++) and ninja "
            "(`pip install ninja`); set QAT_KERNEL_PATH=torch to run the pure-torch fallback instead."
        ) from err
    if fresh:
        print(f"[qat] packed CPU kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module
