"""Binary (1-bit) weights: ``sign`` with an identity straight-through gradient, BitNet's binary weight quantizer,
and the scale math of FBI-LLM and OneBit as pure functions (the learnable scales are arguments; the layers in
``qat.nn.fbi_linear`` own them).

- BitNet (arXiv 2310.11453; unilm FAQ code ``sign(w - mean) * mean|w|``): codes ``sign(W - mean(W))`` and a fixed
  scale ``mean|W|`` per tensor/row/group, with int8 activations in ``BitLinear``: the W1A8 model that the binary
  packed kernels run.

- FBI-LLM (arXiv 2407.07093; ``qat/learnable_binarizer.py::BinaryLinearWscales``): ``W_b = alpha ⊙ sign(W) + beta``
  with column-wise alpha, beta (one per input feature, broadcast over output rows); init ``beta = mean_rows(W)``,
  ``alpha = mean_rows|W - beta|``; sign with identity STE, no clipping.
- OneBit (arXiv 2402.11295): ``W ≈ g ⊙ sign(W) ⊙ h``, i.e. ``g[:, None] * sign(W) * h[None, :]`` with an output
  vector g and an input vector h, initialised by SVID: the rank-1 SVD approximation ``|W| ≈ s·u·vᵀ``
  (u, v non-negative by Perron-Frobenius), ``g = sqrt(s)·|u|``, ``h = sqrt(s)·|v|``.
"""

import torch

from qat.quant.ste import straight_through
from qat.quant.ternary import SCALE_EPS, Granularity, grouped


def binary_sign(w: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, +1} (dtype of ``w``); ``sign(0) = +1`` so every weight is exactly one bit."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def absmean_binary(w: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet binary weights: codes ``sign(W - mean(W))`` in {-1, +1} (dtype of ``w``) and scale ``mean|W|``
    (clamped at 1e-5), both per tensor/row/group (shapes as in :mod:`qat.quant.ternary`)."""
    groups = grouped(w, granularity, group_size)
    codes = binary_sign(groups - groups.mean(dim=-1, keepdim=True))
    return codes.reshape(w.shape), groups.abs().mean(dim=-1, keepdim=True).clamp(min=SCALE_EPS)


def sign_ste(w: torch.Tensor) -> torch.Tensor:
    """``binary_sign(w)`` forward, identity gradient backward (FBI-LLM: no clipping of the STE)."""
    return straight_through(w, binary_sign(w))


def fbi_init_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FBI-LLM column-wise init for a weight (out, in): ``alpha = mean_rows|W - beta|``, ``beta = mean_rows(W)``,
    both of shape (in,)."""
    beta = w.mean(dim=0)
    alpha = (w - beta).abs().mean(dim=0)
    return alpha, beta


def fbi_binary_weight(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``alpha ⊙ sign(W) + beta`` with alpha, beta of shape (in,) broadcast over the rows of W (out, in)."""
    return alpha * sign_ste(w) + beta


def onebit_init_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OneBit SVID init for a weight (out, in): ``g`` (out,) and ``h`` (in,) from the top singular pair of |W|."""
    u, s, vh = torch.linalg.svd(w.detach().abs().float(), full_matrices=False)
    root = s[0].sqrt()
    return (root * u[:, 0].abs()).to(w.dtype), (root * vh[0].abs()).to(w.dtype)


def onebit_weight(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``g[:, None] * sign(W) * h[None, :]`` (OneBit's sign matrix between an output and an input vector)."""
    return g[:, None] * sign_ste(w) * h[None, :]
