"""scripts/gpu-check.sh cannot run here (no GPU); what can be checked without one is: it parses, refuses to run
without a GPU, and every check it lists names a gpu-marked test that exists."""

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"


def test_gpu_check_script_parses_and_names_existing_gpu_tests():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    test_ids = re.findall(r"\|(tests/[\w/.]+\.py)::(\w+)\"", SCRIPT.read_text())
    # every GPU check in tests/gpu runs (one line each), and each listed one exists
    defined = set(re.findall(r"^def (test_\w+)\(", (REPO / "tests/gpu/test_gpu_checks.py").read_text(), re.M))
    assert {name for _, name in test_ids} == defined and len(test_ids) == len(defined) == 6
    for path, name in test_ids:
        source = (REPO / path).read_text()
        assert f"def {name}(" in source, f"{path}::{name} does not exist"
        assert "pytest.mark.gpu" in source


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None, reason="this machine has nvidia-smi")
def test_gpu_check_script_refuses_to_run_without_a_gpu(tmp_path):
    # PATH without nvidia-smi: the script stops before installing anything.
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "venv")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 2 and "no NVIDIA GPU" in result.stderr
    assert not (tmp_path / "venv").exists()
