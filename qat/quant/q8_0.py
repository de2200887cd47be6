"""GGML Q8_0 block quantization: int8 codes with one scale per block of 32 consecutive values.

llama.cpp's ``quantize_row_q8_0``: per block ``d = max|x| / 127``, ``q = round(x * (1 / d))`` (``q = 0`` for an
all-zero block), ``x ≈ q * d``. Used for the int8 lm_head of the packed decoder (weights, with ``d`` stored as fp16
as Q8_0 stores it) and for the activations it multiplies (``d`` kept in fp32, as llama.cpp does for the activation
side of its Q8_0 dot products). The C++ kernel (``kernels/cpu/packed_linear.cpp``) quantizes activations with these
exact fp32 operations, so its codes equal these.
"""

import torch
import torch.nn.functional as F

Q8_0_BLOCK = 32


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., k) float -> (codes int8 (..., k'), d float32 (..., k' / 32)), ``k'`` = k rounded up to whole blocks
    (zero-padded: a partial last block quantizes as if its missing values were 0)."""
    k = x.shape[-1]
    padded = -(-k // Q8_0_BLOCK) * Q8_0_BLOCK
    blocks = F.pad(x.float(), (0, padded - k)).reshape(*x.shape[:-1], -1, Q8_0_BLOCK)
    d = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    # |x * (1 / d)| <= 127 up to one rounding; the clamp keeps -128 out (the kernels negate weight codes).
    codes = (blocks * inverse.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return codes.reshape(*x.shape[:-1], padded), d


def dequantize_q8_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``codes * d`` per block, float32 (..., k')."""
    blocks = codes.float().reshape(*codes.shape[:-1], -1, Q8_0_BLOCK) * d.float().unsqueeze(-1)
    return blocks.reshape(codes.shape)
