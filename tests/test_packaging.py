"""qat installed from a wheel (``pip install .``, not only ``-e``) finds its kernel sources and sbatch template: the
build copies the top-level ``kernels/`` and ``cluster/`` files into the wheel, ``qat.resources`` locates them."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SHIPPED_FILES = ["kernels/cpu/packed_linear.cpp", "kernels/triton/packed_linear.py", "kernels/cuda/packed_gemv.cu",
                 "cluster/sbatch.template"]


def test_source_checkout_reads_the_top_level_folders():
    from qat.cluster.submit import TEMPLATE
    from qat.kernels.extension import CPU_SOURCE
    from qat.kernels.triton_packed import TRITON_SOURCE
    from qat.resources import shipped_path

    assert not (REPO / "qat" / "_shipped").exists()   # only wheels carry copies
    for relative in SHIPPED_FILES:
        assert shipped_path(*relative.split("/")) == REPO / relative
        assert (REPO / relative).is_file(), relative
    assert (CPU_SOURCE, TRITON_SOURCE, TEMPLATE) == (REPO / SHIPPED_FILES[0], REPO / SHIPPED_FILES[1],
                                                     REPO / SHIPPED_FILES[3])


# Runs in the fresh environment, outside the repository: qat from the wheel, a freshly built packed kernel against
# a float64 dense reference written out here, and an sbatch script rendered from the wheel's template.
WHEEL_CHECK = r"""
import sys
from pathlib import Path

import torch

import qat
from qat.cluster.submit import TEMPLATE, SlurmJob, render_sbatch_script
from qat.kernels.extension import CPU_SOURCE
from qat.kernels.packed_linear import packed_linear, selected_path
from qat.pack.kernel_layout import pack_ternary_2bit

site, recipe = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
for path in (qat.__file__, CPU_SOURCE, TEMPLATE):
    assert Path(path).resolve().is_relative_to(site), f"{path} is not from the wheel in {site}"

gen = torch.Generator().manual_seed(3)
codes = torch.randint(-1, 2, (24, 300), generator=gen)
scale = torch.rand(24, 1, generator=gen) + 0.1
x = torch.randn(5, 300, generator=gen)
y = packed_linear(x, pack_ternary_2bit(codes), scale, 2, 300, 300)
assert selected_path() != "torch", "the native kernel was not used"
# BitNet b1.58: int8 per-token absmax activations (s = 127 / max|x|) times the scaled ternary weight.
s = 127.0 / x.double().abs().amax(-1, keepdim=True)
ref = ((x.double() * s).round().clamp(-128, 127) @ (codes.double() * scale.double()).T) / s
err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
assert err < 1e-5, err

script = render_sbatch_script(SlurmJob(recipe=recipe, nodes=2, time="00:10:00", run_dir=Path("run")))
assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in script and "{{" not in script, script
assert "--trainer.num_nodes=2" in script
print("WHEEL-OK", selected_path())
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.kernels
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and qat.egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "build", "tmp",
                                                                "*.egg-info", "__pycache__", "wandb", "lightning_logs"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source),
          "-w", str(tmp_path / "dist")])
    (wheel,) = (tmp_path / "dist").glob("qat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"qat/_shipped/{f}" for f in SHIPPED_FILES} <= names
    assert not any(n.startswith(("kernels/", "cluster/", "tests/")) for n in names)   # nothing at top level

    # A fresh environment that sees this one's dependencies (torch, ...) through a .pth line, but not its qat:
    # a plain path in a .pth does not run the editable-install hook found in that folder.
    _run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")])
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    deps_site = Path(sysconfig.get_path("purelib"))
    (site / "qat_test_dependencies.pth").write_text(f"{deps_site}\n")
    before = sorted(p.name for p in deps_site.iterdir() if "qat" in p.name.lower())
    # --target implies --ignore-installed: pip then never uninstalls the qat of the environment it runs in.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    after = sorted(p.name for p in deps_site.iterdir() if "qat" in p.name.lower())
    assert after == before, "installing the wheel changed the qat of the running environment"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QAT_KERNEL_PATH")}
    env.update(QAT_CACHE_DIR=str(tmp_path / "cache"), PYTHONNOUSERSITE="1")
    result = _run([str(python), "-c", WHEEL_CHECK, str(site), str(REPO / "recipes" / "bitnet-b158-tiny.yaml")],
                  cwd=elsewhere, env=env)
    assert "WHEEL-OK" in result.stdout
    assert any((tmp_path / "cache" / "torch_extensions").rglob("*.so"))   # built from the wheel's source
