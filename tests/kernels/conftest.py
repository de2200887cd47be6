"""Fixtures of the kernel tests."""

import pytest

from qat.kernels.packed_linear import CPU_PATHS, path_support


@pytest.fixture(params=CPU_PATHS)
def forced_path(request, monkeypatch):
    """Each CPU kernel path in turn (``QAT_KERNEL_PATH``), skipped with the reason where this CPU lacks it."""
    ok, why = path_support(request.param)
    if not ok:
        pytest.skip(f"path {request.param}: {why}")
    monkeypatch.setenv("QAT_KERNEL_PATH", request.param)
    return request.param
