"""Straight-through estimator: forward the quantized value, backward the identity."""

import torch


def straight_through(x: torch.Tensor, x_quantized: torch.Tensor) -> torch.Tensor:
    """Return ``x_quantized`` in the forward pass with d/dx = 1 (BitNet FAQ: ``x + (q(x) - x).detach()``)."""
    return x + (x_quantized - x).detach()
