"""The CUDA GEMV source compiles with the local nvcc for sm_80 and sm_90 and uses dp4a."""

import shutil
import subprocess

import pytest

from qat.kernels.extension import SOURCE_DIR

pytestmark = pytest.mark.kernels
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA source cannot be compiled here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles(arch, tmp_path):
    source = SOURCE_DIR / "cuda" / "packed_gemv.cu"
    ptx = tmp_path / f"packed_gemv_{arch}.ptx"
    cubin = tmp_path / f"packed_gemv_{arch}.cubin"
    for flag, out in (("-ptx", ptx), ("-cubin", cubin)):
        run = subprocess.run([NVCC, "-O3", f"-arch={arch}", flag, str(source), "-o", str(out)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    text = ptx.read_text()
    assert "dp4a." in text                                   # 4 int8 products per instruction
    assert text.count(".entry") == 2                         # ternary and binary kernels
    assert "ternary_gemv_kernel" in text and "binary_tile_gemv_kernel" in text
    assert cubin.stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA source cannot be compiled here")
def test_cuda_gemv_library_builds_once_and_loads(tmp_path, monkeypatch):
    """The launcher library the GPU path calls builds into the cache and loads (no driver needed to load it)."""
    from qat.kernels import cuda_gemv

    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path))
    cuda_gemv.load_cuda_gemv.cache_clear()
    launcher = cuda_gemv.load_cuda_gemv("sm_90")
    built = list((tmp_path / "cuda_kernels").glob("packed_gemv-sm_90-*.so"))
    assert len(built) == 1 and callable(launcher)
    assert not list((tmp_path / "cuda_kernels").glob(".*"))          # no partial build left behind
    mtime = built[0].stat().st_mtime_ns
    cuda_gemv.load_cuda_gemv.cache_clear()
    cuda_gemv.load_cuda_gemv("sm_90")
    assert built[0].stat().st_mtime_ns == mtime                      # reused, not rebuilt
    cuda_gemv.load_cuda_gemv.cache_clear()
