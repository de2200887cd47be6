"""The one place exports touch the file system: where an export may go, how it is swapped in, what its manifest
records, and how a reader checks it.

An export folder always holds ``qat_export.json`` (the manifest: format, provenance, and the SHA-256 of every
other file). qat only ever replaces a folder that has one, so a wrong ``--out_dir`` (a folder of the user's,
the run folder, the working directory) is refused instead of emptied. The new folder is written beside the
target in a temporary folder and renamed in; a failure midway leaves the previous export as it was.

Example usage::

    folder = write_export_folder(out_dir, lambda tmp: save_file(state, tmp / "model.safetensors"),
                                 tokenizer_files, manifest={"format": "hf"}, force=True,
                                 protected=[checkpoint_path])
    verify_export(folder)     # ExportError if a file changed since it was written
"""

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from qat.checkpoint.integrity import file_sha256
from qat.errors import ExportError
from qat.paths import plain_file_name

EXPORT_MANIFEST = "qat_export.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_VERSION = 2
# Exports are published artefacts: readable by every user (mkdtemp creates 0700 folders).
DIR_MODE, FILE_MODE = 0o755, 0o644


# ---------------------------------------------------------------------------------------------------- checks
def read_manifest(folder: str | Path) -> Optional[dict[str, Any]]:
    """The export manifest of ``folder``, or None when it has none (not a qat export)."""
    path = Path(folder) / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not readable JSON ({e}); re-export with `qat export`") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise ExportError(f"{path} is not a qat export manifest (no 'format'); re-export with `qat export`")
    return manifest


def is_export(folder: str | Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / EXPORT_MANIFEST).is_file()


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_export_target(out_dir: str | Path, force: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """``out_dir`` resolved, if an export may be written there; ExportError saying why not otherwise.

    Allowed: a path that does not exist, an empty folder, or (with ``force``) a previous qat export. Refused: a
    file, a non-empty folder that is not a qat export (with or without ``force``), the working directory or a
    folder holding it, and any folder holding one of ``protected`` (the source checkpoint, the run folder).
    """
    out = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out):
        raise ExportError(f"--out_dir {out_dir} is the working directory (or holds it); exports replace their "
                          "folder, so pass a new folder such as runs/<name>/export-<format>")
    for path in protected:
        p = Path(path).expanduser().resolve()
        if _is_within(p, out):
            raise ExportError(f"--out_dir {out_dir} holds {p} (the source checkpoint or its run folder); "
                              "pass a new folder such as <run>/export-<format>")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out_dir {out_dir} is a file, not a folder; pass a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_export(out):
            raise ExportError(f"--out_dir {out_dir} is a non-empty folder that is not a qat export (no "
                              f"{EXPORT_MANIFEST}); qat never replaces it. Pass a new or empty folder")
        if not force:
            raise ExportError(f"--out_dir {out_dir} already holds a qat export; pass --force to replace it, or "
                              "choose another folder")
    return out


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """ExportError naming the first floating tensor with a NaN or Inf (an export must hold a usable model)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ExportError(f"tensor {name!r} has {bad} NaN/Inf values; the model diverged or the checkpoint is "
                              "damaged. Export an earlier checkpoint (runs/<name>/checkpoints/step-*.ckpt)")


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_files_of(tokenizer: Any) -> dict[str, str]:
    """``{file name: text}`` of a tokenizer: a dict of files (as stored in a qat checkpoint) or an HF tokenizer."""
    if isinstance(tokenizer, Mapping):
        return dict(tokenizer)
    if hasattr(tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}
    raise ExportError(f"tokenizer must be an HF tokenizer or a dict of tokenizer files, not {type(tokenizer).__name__}")


def write_tokenizer(tokenizer_files: Mapping[str, str], folder: Path) -> None:
    """Write the tokenizer files into ``folder``; names come from a checkpoint, so only plain file names pass."""
    if not tokenizer_files:
        raise ExportError("the model comes without tokenizer files; re-train with `qat fit` (it stores them) or pass "
                          "the tokenizer")
    for name in tokenizer_files:
        try:
            plain_file_name(name, "tokenizer file name")
        except ValueError as e:
            raise ExportError(f"{e}; the checkpoint's tokenizer files are damaged or crafted") from None
    for name, text in tokenizer_files.items():
        (folder / name).write_text(text)


# --------------------------------------------------------------------------------------------------- writing
def _files_sha256(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != EXPORT_MANIFEST}


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    tmp = folder / f".{EXPORT_MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, folder / EXPORT_MANIFEST)


def _make_readable(folder: Path) -> None:
    os.chmod(folder, DIR_MODE)
    for p in folder.iterdir():
        os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)


def write_export_folder(out_dir: str | Path, write_contents: Callable[[Path], None],
                        tokenizer_files: Mapping[str, str], manifest: Mapping[str, Any], force: bool = False,
                        protected: Iterable[str | Path] = ()) -> Path:
    """Write an export to ``out_dir`` and return it.

    The tokenizer files go in first (so ``write_contents`` may read them, as the GGUF writer does); then
    ``write_contents(folder)`` writes the format's files; then the manifest with every file's SHA-256. The
    folder is built beside ``out_dir`` and swapped in by renames; on any failure the temporary folder is removed
    and ``out_dir`` is as it was.

    Raises:
        ExportError: ``out_dir`` may not be replaced (:func:`check_export_target`) or is not writable.
    """
    out = check_export_target(out_dir, force, protected)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except PermissionError:
        raise ExportError(f"cannot write in {out.parent}: permission denied; pass an --out_dir in a folder you "
                          "can write") from None
    old = None
    try:
        write_tokenizer(tokenizer_files, tmp)
        write_contents(tmp)
        _write_manifest(tmp, {**manifest, "manifest_version": MANIFEST_VERSION, "files": _files_sha256(tmp)})
        _make_readable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}-old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)              # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def update_manifest_files(folder: str | Path, names: Iterable[str]) -> None:
    """Record the new SHA-256 of files qat rewrote in an export (``qat eval`` writes eval.json and the card)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ExportError(f"{folder} has no {EXPORT_MANIFEST}")
    files = dict(manifest.get("files") or {})
    for name in names:
        files[plain_file_name(name)] = file_sha256(folder / name)
        os.chmod(folder / name, FILE_MODE)
    _write_manifest(folder, {**manifest, "files": files})


# --------------------------------------------------------------------------------------------------- reading
def verify_export(folder: str | Path) -> dict[str, Any]:
    """The manifest of ``folder`` after checking every listed file against its SHA-256.

    Raises:
        ExportError: no manifest, no checksums (written by an older qat), a listed file missing or changed.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ExportError(f"{folder} is not a qat export (no {EXPORT_MANIFEST}); write one with `qat export`")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{folder / EXPORT_MANIFEST} records no file checksums (an export from an older qat); "
                          "re-export it with `qat export --force`")
    for name, digest in files.items():
        try:
            path = folder / plain_file_name(name, "manifest file name")
        except ValueError as e:
            raise ExportError(f"{folder / EXPORT_MANIFEST}: {e}") from None
        if not path.is_file():
            raise ExportError(f"{folder} lacks {name}, listed in its manifest; the export is incomplete. Re-export it")
        if file_sha256(path) != digest:
            raise ExportError(f"{path} does not match the SHA-256 in {EXPORT_MANIFEST}: the file changed after "
                              "export (corrupt copy or tampering). Re-export it with `qat export --force`")
    return manifest

