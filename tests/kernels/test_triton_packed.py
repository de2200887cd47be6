"""The Triton kernel: run in Triton's CPU interpreter against the float64 reference, and compiled for sm_80/sm_90."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported by this module; the loader keys on it

import pytest
import torch

triton = pytest.importorskip("triton")

from qat.kernels.triton_packed import packed_linear_triton  # noqa: E402
from tests.references.packed_linear_reference import assert_matches_reference, random_problem  # noqa: E402

pytestmark = pytest.mark.kernels


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled memory, so any output element a kernel forgets to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)
    return empty


@pytest.mark.parametrize("bits,shape", [(2, (3, 37, 300, 1)), (1, (17, 20, 700, 1)), (2, (2, 33, 512, 2)),
                                        (1, (1, 5, 1024, 2)), (1, (2, 45, 1100, 1))], ids=str)
def test_interpreted_kernel_matches_float64_reference(bits, shape, poisoned_empty, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens, rows, in_features, groups = shape
    codes, packed, scale, x = random_problem(bits, tokens, rows, in_features, groups, seed=11 + bits)
    y = packed_linear_triton(x, packed, scale, bits, in_features, in_features // groups)
    assert y.shape == (tokens, rows)
    assert_matches_reference(y, x, codes, scale)


# Compiled in a fresh process: this module runs the interpreter, which patches triton.language in place (dtype
# lowering included) and does not undo every patch, so a real compile here would lower through the interpreter's
# hooks and fail whenever Triton's cache does not already hold the kernel.
COMPILE_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qat.kernels.triton_packed import _kernel_module

bits, capability = int(sys.argv[1]), int(sys.argv[2])
signature = {"x_ptr": "*i8", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "y_ptr": "*fp32",
             "M": "i32", "N": "i32", "row_bytes": "i32", "groups": "i32", "blocks_per_group": "i32",
             "BITS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
kernel = _kernel_module(False).packed_linear_kernel     # the real (not interpreted) JIT function
compiled = triton.compile(ASTSource(fn=kernel, signature=signature,
                                    constexprs={"BITS": bits, "BLOCK_M": 16, "BLOCK_N": 32}),
                          target=GPUTarget("cuda", capability, 32))
print(json.dumps({"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"])}))
"""


@pytest.mark.slow   # a full Triton compile per case (~10 s)
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("bits", [2, 1])
def test_kernel_compiles_for_gpu_with_int8_tensor_cores(capability, bits, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)                  # compile for real, not from a cache
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(bits), str(capability)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    ptx = compiled["ptx"]
    assert f".target sm_{capability}" in ptx
    assert "mma.sync.aligned" in ptx and ".s32.s8.s8.s32" in ptx   # int8 MMA, not a float fallback
    assert compiled["cubin_bytes"] > 0
