"""Binary (1-bit) weights: ``sign`` with an identity straight-through gradient, and the scale math of FBI-LLM and
OneBit as pure functions (the learnable scales are arguments; the layers in ``qat.nn.fbi_linear`` own them).

- FBI-LLM (arXiv 2407.07093; ``qat/learnable_binarizer.py::BinaryLinearWscales``): ``W_b = alpha ⊙ sign(W) + beta``
  with column-wise alpha, beta (one per input feature, broadcast over output rows); init ``beta = mean_rows(W)``,
  ``alpha = mean_rows|W - beta|``; sign with identity STE, no clipping.
- OneBit (arXiv 2402.11295): ``W ≈ g ⊙ sign(W) ⊙ h``, i.e. ``g[:, None] * sign(W) * h[None, :]`` with an output
  vector g and an input vector h, initialised by SVID: the rank-1 SVD approximation ``|W| ≈ s·u·vᵀ``
  (u, v non-negative by Perron-Frobenius), ``g = sqrt(s)·|u|``, ``h = sqrt(s)·|v|``.
"""

import torch

from qat.quant.ste import straight_through


def binary_sign(w: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, +1} (dtype of ``w``); ``sign(0) = +1`` so every weight is exactly one bit."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


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
