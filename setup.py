"""Build hook (everything else is in pyproject.toml): the wheel carries the kernel sources and the sbatch template
from the top-level ``kernels/`` and ``cluster/`` folders under ``qat/_shipped/``, where
``qat.resources.shipped_path`` finds them when qat is installed from a wheel (``pip install .``)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("kernels/cpu/*.cpp", "kernels/triton/*.py", "kernels/cuda/*.cu", "cluster/sbatch.template")


class BuildPyWithShippedFiles(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for pattern in SHIPPED:
            sources = sorted(root.glob(pattern))
            if not sources:
                raise FileNotFoundError(f"nothing matches {pattern} in {root}: the wheel would lack it")
            for source in sources:
                target = Path(self.build_lib, "qat", "_shipped", source.relative_to(root))
                self.mkpath(str(target.parent))
                self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
