"""Where qat writes what it produces at run time: caches (tokenized data, tokenizers, teachers, built kernels)
and run directories. Both are git-ignored and reused when valid."""

import os
import re
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$QAT_CACHE_DIR`` (default ``./.cache/qat``), joined with ``parts`` and created."""
    root = Path(os.environ.get("QAT_CACHE_DIR") or Path.cwd() / ".cache" / "qat")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


ATOMIC_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)$")  # what atomic_write_bytes leaves if killed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one, never half of one.

    The bytes go to ``.<name>.tmp-<pid>`` beside ``path`` (same filesystem, so the rename is atomic); a failure
    removes that file, a kill leaves it behind (matched by ``ATOMIC_TEMP_NAME``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def plain_file_name(name: str, what: str = "file name") -> str:
    """``name`` if it is a plain file name (no directory part, not ``.``/``..``, no control characters).

    Names read from a file (tokenizer files stored in a checkpoint, tensors in a manifest) are untrusted: joined to a
    folder unchecked, ``../x`` or ``/etc/x`` would write outside it.

    Raises:
        ValueError: naming the offending value.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name) or Path(name).name != name):
        raise ValueError(f"unsafe {what} {name!r}: only plain file names (no folders, '..' or control characters) "
                         "are accepted")
    return name
