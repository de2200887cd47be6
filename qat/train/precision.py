"""Training precision: ``auto`` picks bf16 only where the hardware makes it fast.

On CPUs without AMX or AVX512-BF16 (e.g. AMD Zen 3, AVX2 only) torch's bf16 matmuls run 10-60x slower than fp32,
so ``bf16-mixed`` would be a trap there.
"""

from functools import lru_cache
from pathlib import Path

import torch

FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return any(flag in cpu_flags() for flag in FAST_BF16_CPU_FLAGS)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> ``bf16-mixed`` on CUDA or a CPU with AMX/AVX512-BF16, else ``32-true``; others pass through."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu or cpu_has_fast_bf16() else "32-true"
