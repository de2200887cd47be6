"""Ternary weight quantizers (BitNet b1.58 and b1.58 Reloaded).

A quantizer maps a latent weight ``W`` (out, in) to integer codes in {-1, 0, 1} and a scale ``s`` such that
``W ≈ codes * s``. The scale has the shape needed to broadcast against ``W``:

- ``"tensor"``: shape (1, 1), one scale for the matrix (BitNet b1.58, HF ``BitNetForCausalLM``).
- ``"row"``: shape (out, 1), one scale per output row.
- ``"group"``: shape (out, in // group_size, 1) after reshaping ``W`` to (out, in // group_size, group_size).

Formulas (BitNet FAQ; arXiv 2407.09527): ``s = mean(|W|)`` (absmean) or ``median(|W|)`` (absmedian),
clamped at 1e-5, ``codes = clamp(round(W / s), -1, 1)``.
"""

from typing import Callable, Literal

import torch

Granularity = Literal["tensor", "row", "group"]
SCALE_EPS = 1e-5


def grouped(w: torch.Tensor, granularity: Granularity, group_size: int) -> torch.Tensor:
    """View ``w`` so that the last dim is the set of weights sharing one scale."""
    if granularity == "tensor":
        return w.reshape(1, -1)
    if granularity == "row":
        return w
    if granularity == "group":
        if w.shape[-1] % group_size:
            raise ValueError(f"in_features={w.shape[-1]} is not a multiple of group_size={group_size}")
        return w.reshape(w.shape[0], -1, group_size)
    raise ValueError(f"unknown granularity {granularity!r}; use 'tensor', 'row' or 'group'")


def _ternary_codes(w: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor],
                   granularity: Granularity, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = grouped(w, granularity, group_size)
    scale = reduce(groups.abs()).clamp(min=SCALE_EPS)
    codes = (groups / scale).round().clamp(-1, 1)
    return codes.reshape(w.shape), scale


def absmean_ternary(w: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58: codes in {-1,0,1} (dtype of ``w``) and scale ``mean|W|`` per tensor/row/group."""
    return _ternary_codes(w, lambda a: a.mean(dim=-1, keepdim=True), granularity, group_size)


def absmedian_ternary(w: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 Reloaded: like :func:`absmean_ternary` with ``median|W|`` (lower median) as the scale."""
    return _ternary_codes(w, lambda a: a.median(dim=-1, keepdim=True).values, granularity, group_size)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, granularity: Granularity, group_size: int = 128
               ) -> torch.Tensor:
    """Inverse of the quantizers above: ``codes * scale`` in the shape of ``codes``."""
    return (grouped(codes, granularity, group_size) * scale).reshape(codes.shape)
