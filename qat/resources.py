"""Files qat ships that are not Python modules: the kernel sources (``kernels/``) and the SLURM template
(``cluster/sbatch.template``).

They live in the repository's top-level ``kernels/`` and ``cluster/`` folders, which a source checkout and an
editable install read directly; a wheel carries copies under ``qat/_shipped/`` (``setup.py`` puts them there).
"""

from importlib.resources import files
from pathlib import Path

SHIPPED_DIR = "_shipped"


def shipped_path(*parts: str) -> Path:
    """The path of a shipped file or folder, e.g. ``shipped_path("kernels", "cpu", "packed_linear.cpp")``."""
    # The wheel's copy first: in an installed wheel the folder above qat/ is site-packages, where a top-level
    # `kernels` or `cluster` belongs to some other distribution.
    packaged = Path(str(files("qat") / SHIPPED_DIR))
    root = packaged if packaged.is_dir() else Path(__file__).resolve().parents[1]
    return root.joinpath(*parts)
