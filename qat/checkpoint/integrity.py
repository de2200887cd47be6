"""Checksums that let qat refuse a checkpoint or export whose bytes changed after it was written."""

import hashlib
from pathlib import Path
from typing import Mapping

import torch


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the names, dtypes, shapes and bytes of ``state``'s tensors, in name order (independent of
    how the tensors are serialised, so a checkpoint can carry the digest of its own weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_error_reason(exc: BaseException) -> str:
    """One line saying why ``torch.load`` failed: for a refused pickle, the class or function it would have run
    (torch's own message is a paragraph that suggests ``weights_only=False``, which qat never does)."""
    text = str(exc)
    for line in text.splitlines():
        if line.strip().startswith("WeightsUnpickler error:"):
            return "it holds pickled code or objects that are not weights (refused, nothing was run): " + \
                line.strip()[len("WeightsUnpickler error:"):].strip().split(". Please use")[0]
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [name for name, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.numel() and not bool(torch.isfinite(t).all())]
