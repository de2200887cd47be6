"""ParetoQ weight quantizers with a learnable scale ``alpha`` (arXiv 2502.02631; facebookresearch/ParetoQ
``models/utils_quant.py``): sign (1 bit), SEQ (ternary, 2 bit) and LSQ (3, 4 bit), as pure functions of the latent
weight ``W`` (out, in) and ``alpha`` (out, G): one scale per output row (G = 1) or per group of ``in / G``
consecutive inputs.

With ``x = W / alpha`` (alpha clamped at 1e-5) the quantized weight is ``level(x) * alpha``:

- sign: ``level = sign(x)`` with sign(0) = +1;
- SEQ (stretched elastic): ``level = (round(clamp(x, -c, c) * n - s) + s) / n``; ternary n = 1.5, s = 0 ->
  {-2/3, 0, 2/3}; 2 bit n = 2, s = 0.5 -> {±1/4, ±3/4}. ``c = 0.99`` as in ParetoQ's code, not 1: at |x| = 1,
  ``round(1.5) = 2`` would give a fourth ternary level 4/3 (and 2 bit a level 5/4), and the init
  ``alpha = max|W|`` puts every row's largest weight exactly there;
- LSQ: ``level = round(clamp(x, -2^(b-1), 2^(b-1) - 1))``.

Integer codes are ``level * m`` with ``m`` = 1 (sign, LSQ), 1.5 (ternary) or 4 (2 bit), and their scale is
``alpha / m``: the forward pass computes ``codes * (alpha / m)``, so training and the packed export hold the same
numbers.

Gradients (:class:`LearnedScaleQuantize`): W gets the straight-through gradient inside the clamp range and 0
outside (ParetoQ; for sign the range is |x| <= 1). alpha gets LSQ's gradient, the derivative of the formula with
round as identity: ``level - x`` inside the clamp range, ``level`` (the boundary level) outside; for sign
``level`` everywhere (sign(W) does not depend on alpha). It is multiplied by ParetoQ's gradient scale
``1 / sqrt(W.numel() * Qp)`` with Qp = 2^(b-1) - 1 (1 for sign, ternary and 2 bit). ParetoQ's ternary code uses 1
instead of the boundary level 2/3 outside the clamp range; qat uses the derivative of the forward it computes.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from qat.quant.binary import binary_sign

ALPHA_EPS = 1e-5
SEQ_CLIP = 0.99


@dataclass(frozen=True)
class ParetoQGrid:
    """One ParetoQ quantizer.

    Attributes:
        kind: ``sign`` | ``seq`` | ``lsq``.
        bits: 1, 2, 3, 4; ternary is ``seq`` with bits 1.58.
        n, shift: SEQ's stretch and shift.
        code_multiplier: ``m`` of the module docstring (codes = level * m).
    """

    kind: Literal["sign", "seq", "lsq"]
    bits: float
    n: float = 1.0
    shift: float = 0.0
    code_multiplier: float = 1.0

    @property
    def clip(self) -> tuple[float, float]:
        """The clamp range of ``x = W / alpha``."""
        if self.kind == "lsq":
            return -(2.0 ** (self.bits - 1)), 2.0 ** (self.bits - 1) - 1
        return (-SEQ_CLIP, SEQ_CLIP) if self.kind == "seq" else (-1.0, 1.0)

    @property
    def grad_qp(self) -> float:
        """Qp of ParetoQ's gradient scale: 2^(b-1) - 1 for LSQ, 1 otherwise."""
        return self.clip[1] if self.kind == "lsq" else 1.0

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized value of ``x = W / alpha`` in units of alpha."""
        if self.kind == "sign":
            return binary_sign(x)
        lo, hi = self.clip
        if self.kind == "seq":
            return (torch.round(x.clamp(lo, hi) * self.n - self.shift) + self.shift) / self.n
        return torch.round(x.clamp(lo, hi))


PARETOQ_GRIDS: dict[str, ParetoQGrid] = {
    "1bit": ParetoQGrid("sign", 1),
    "ternary": ParetoQGrid("seq", 1.58, n=1.5, shift=0.0, code_multiplier=1.5),
    "2bit": ParetoQGrid("seq", 2, n=2.0, shift=0.5, code_multiplier=4.0),
    "3bit": ParetoQGrid("lsq", 3),
    "4bit": ParetoQGrid("lsq", 4),
}


def _grouped(w: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as (out, G, in / G) and ``alpha`` (out, G) as (out, G, 1), alpha clamped at 1e-5."""
    if w.ndim != 2 or alpha.ndim != 2 or alpha.shape[0] != w.shape[0] or w.shape[1] % alpha.shape[1]:
        raise ValueError(f"alpha must be (out, G) with G dividing in_features; got weight {tuple(w.shape)}, "
                         f"alpha {tuple(alpha.shape)}")
    groups = alpha.shape[1]
    return w.reshape(w.shape[0], groups, -1), alpha.clamp(min=ALPHA_EPS).unsqueeze(-1)


def paretoq_codes(w: torch.Tensor, alpha: torch.Tensor, grid: ParetoQGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (dtype of ``w``, shape of ``w``) and their scale ``alpha / m``, shape (out, G, 1) — or
    (out, 1) for one scale per row, the shapes of :mod:`qat.quant.ternary` — with weight = codes * scale."""
    wg, ag = _grouped(w.detach(), alpha.detach())
    codes = torch.round(grid.levels(wg / ag) * grid.code_multiplier)
    scale = ag / grid.code_multiplier
    return codes.reshape(w.shape), scale.squeeze(-1) if alpha.shape[1] == 1 else scale


class LearnedScaleQuantize(torch.autograd.Function):
    """``codes * (alpha / m)`` forward; straight-through W gradient inside the clamp range; LSQ alpha gradient
    (module docstring)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, alpha: torch.Tensor, grid: ParetoQGrid) -> torch.Tensor:
        wg, ag = _grouped(w, alpha)
        x = wg / ag
        level = grid.levels(x)
        ctx.save_for_backward(x, level)
        ctx.grid, ctx.numel = grid, w.numel()
        codes = torch.round(level * grid.code_multiplier)
        return (codes * (ag / grid.code_multiplier)).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, level = ctx.saved_tensors
        grid: ParetoQGrid = ctx.grid
        lo, hi = grid.clip
        g = grad_out.reshape(x.shape)
        inside = (x >= lo) & (x <= hi)
        grad_w = torch.where(inside, g, torch.zeros_like(g)).reshape(grad_out.shape)
        d_alpha = level if grid.kind == "sign" else torch.where(inside, level - x, level)
        grad_scale = 1.0 / math.sqrt(ctx.numel * grid.grad_qp)
        grad_alpha = (d_alpha * g).sum(dim=-1) * grad_scale
        return grad_w, grad_alpha, None


def paretoq_quantize(w: torch.Tensor, alpha: torch.Tensor, grid: ParetoQGrid) -> torch.Tensor:
    """The fake-quantized weight ``codes * (alpha / m)`` (shape of ``w``) with ParetoQ's gradients."""
    return LearnedScaleQuantize.apply(w, alpha, grid)


def paretoq_init_alpha(w: torch.Tensor, grid: ParetoQGrid, groups: int = 1) -> torch.Tensor:
    """ParetoQ's init per row/group (out, G): mean|W| (sign), max|W| (SEQ), max|W| / (2^(b-1) - 1) (LSQ)."""
    wg = w.detach().abs().reshape(w.shape[0], groups, -1)
    if grid.kind == "sign":
        return wg.mean(dim=-1)
    peak = wg.amax(dim=-1)
    return peak / grid.clip[1] if grid.kind == "lsq" else peak
