"""The protocol every quantized linear layer shares, written once.

A quantized layer keeps its latent full-precision weight as ``weight`` (so optimizers, ZeRO and checkpoints see an
ordinary linear layer), knows its scheme (:mod:`qat.nn.schemes`) from ``quant.weight``, and can say which integer
codes and scale it currently represents. Model surgery, the health monitor, packing and the exporters ask a layer
for these instead of testing its class.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import QuantConfig

if TYPE_CHECKING:
    from qat.nn.schemes import Scheme


class QuantizedLinear(nn.Linear):
    """Base of ``BitLinear`` and the binary layers with learnable scales.

    Subclasses implement :meth:`quantized_weight` and may override :meth:`reset_quantization_state` to initialise
    their scales. ``quant=None`` takes the first registered scheme that this class implements.

    Raises:
        RecipeError: ``quant`` names a scheme implemented by another layer class, or settings it does not support.
    """

    quant: QuantConfig
    # Whether the layer can hold an RMSNorm of its input (``norm_placement: inlayer``, unilm BitNet FAQ).
    has_inlayer_norm = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantConfig | None = None,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        """``norm_eps``: epsilon of an in-layer RMSNorm, for the layers that have one (``has_inlayer_norm``)."""
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant = quant if quant is not None else self.default_quant()
        scheme = self.scheme
        if not isinstance(self, scheme.layer_class):
            raise RecipeError(f"{type(self).__name__} cannot train scheme {scheme.name!r}: its layer is "
                              f"{scheme.layer_class.__name__}; build layers with qat.nn.convert.convert_to_qat")
        scheme.check_config(self.quant)

    @classmethod
    def default_quant(cls) -> QuantConfig:
        """The config of the first registered scheme whose layer is ``cls``, with its first supported settings."""
        from qat.nn.schemes import SCHEMES

        for scheme in SCHEMES.values():
            if scheme.layer_class is cls:
                return QuantConfig(weight=scheme.name, granularity=scheme.granularities[0],
                                   activation=scheme.activations[0])
        raise RecipeError(f"no registered scheme uses {cls.__name__}; pass quant=QuantConfig(weight=...)")

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
