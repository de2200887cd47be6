"""Int8 per-token absmax activation quantization (BitNet b1.58: ``s = 127 / max|x|``, round, clamp to int8)."""

import torch

from qat.quant.ste import straight_through

SCALE_EPS = 1e-5


def absmax_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return int8-valued codes (dtype of ``x``) and the per-token scale ``127 / max|x|`` (shape (..., 1)).

    ``x ≈ codes / scale``; the round trip error is at most half a step, ``0.5 / scale``.
    """
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    codes = (x * scale).round().clamp(-128, 127)
    return codes, scale


def fake_quantize_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` through the int8 per-token grid for QAT (straight-through gradient), in ``x``'s dtype. Computed in fp32:
    under bf16 autocast the product ``x * scale`` would lose the integer grid."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    codes, scale = absmax_int8_per_token(x32)
    return straight_through(x32, codes / scale).to(x.dtype)
