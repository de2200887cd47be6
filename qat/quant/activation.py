"""Int8 per-token absmax activation quantization (BitNet b1.58: ``s = 127 / max|x|``, round, clamp to int8)."""

import torch

SCALE_EPS = 1e-5


def absmax_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return int8-valued codes (dtype of ``x``) and the per-token scale ``127 / max|x|`` (shape (..., 1)).

    ``x ≈ codes / scale``; the round trip error is at most half a step, ``0.5 / scale``.
    """
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    codes = (x * scale).round().clamp(-128, 127)
    return codes, scale
