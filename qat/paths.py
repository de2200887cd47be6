"""Where qat writes what it produces at run time: caches (tokenized data, tokenizers, teachers, built kernels)
and run directories. Both are git-ignored and reused when valid."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$QAT_CACHE_DIR`` (default ``./.cache/qat``), joined with ``parts`` and created."""
    root = Path(os.environ.get("QAT_CACHE_DIR") or Path.cwd() / ".cache" / "qat")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """``$QAT_RUNS_DIR`` (default ``./runs``): one folder per training run."""
    return Path(os.environ.get("QAT_RUNS_DIR") or Path.cwd() / "runs")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
