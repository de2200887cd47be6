"""The protocol every quantized linear layer shares, written once.

A quantized layer keeps its latent full-precision weight as ``weight`` (so optimizers, ZeRO and checkpoints see an
ordinary linear layer), knows its scheme (:mod:`qat.nn.schemes`) from ``quant.weight``, and can say which integer
codes and scale it currently represents. Model surgery, the health monitor, packing and the exporters ask a layer
for these instead of testing its class.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from qat.nn.config import QuantConfig

if TYPE_CHECKING:
    from qat.nn.schemes import Scheme


class QuantizedLinear(nn.Linear):
    """Base of ``BitLinear`` and the binary layers with learnable scales.

    Subclasses implement :meth:`quantized_weight` and may override :meth:`from_linear` to initialise their scales.
    """

    quant: QuantConfig

    @property
    def scheme(self) -> "Scheme":
        from qat.nn.schemes import get_scheme

        return get_scheme(self.quant.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: QuantConfig, norm_eps: float = 1e-5) -> "QuantizedLinear":
        """A quantized layer holding ``linear``'s weight (and bias) as its latent weight."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, quant=quant,
                    norm_eps=norm_eps, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reset_quantization_state()
        return layer

    def reset_quantization_state(self) -> None:
        """(Re-)initialise scales that are learned (binary/ParetoQ layers) from the current latent weight."""

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (the weight's dtype, values in ``scheme.levels``) and their scale, such that the layer's
        effective weight is ``codes * scale`` (scale shapes as in :mod:`qat.quant.ternary`). Layers whose
        effective weight is not of that form (FBI-LLM's ``alpha * sign + beta``) return their codes and the
        mean magnitude of their effective weight per output row."""
        raise NotImplementedError


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized linear layer of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
