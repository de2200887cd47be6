"""Binary linear layers with learnable full-precision scales: ``FBILinear`` (FBI-LLM) and ``OneBitLinear``
(OneBit). The latent full-precision weight stays the parameter; every forward binarizes it with ``sign`` (identity
STE). Activations stay full precision: both papers are W1A16. Math lives in ``qat.quant.binary``.

Recipes select them with ``model.quant.weight: fbi_binary | onebit`` (their schemes in :mod:`qat.nn.schemes`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from qat.nn.config import QuantConfig
from qat.nn.quantized import QuantizedLinear
from qat.quant.binary import binary_sign, fbi_binary_weight, fbi_init_scales, onebit_init_scales, onebit_weight


class BinaryLinear(QuantizedLinear):
    """Base of the 1-bit layers: ``y = x @ binary_weight().T + bias``; subclasses own the scales."""

    # Names of the full-precision scale parameters stored next to the packed sign bits on export.
    scale_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantConfig | None = None,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, quant=quant, norm_eps=norm_eps, device=device,
                         dtype=dtype)
        self.create_scales(device, dtype)
        self.reset_scales()

    def create_scales(self, device, dtype) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reset_scales(self) -> None:
        """(Re-)initialise the scales from the current latent weight, as the paper does."""
        raise NotImplementedError

    def binary_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def reset_quantization_state(self) -> None:
        self.reset_scales()

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sign codes and the mean magnitude of the effective weight per output row."""
        return self.sign_codes(), self.binary_weight().abs().mean(dim=-1, keepdim=True)

    def sign_codes(self) -> torch.Tensor:
        """The 1-bit codes in {-1, +1} (dtype of the weight)."""
        return binary_sign(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binary_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.quant.weight} (1 bit + {'/'.join(self.scale_names)})"


class FBILinear(BinaryLinear):
    """FBI-LLM: ``W_b = alpha ⊙ sign(W) + beta`` with learnable column-wise ``alpha``, ``beta`` of shape (in,).

    FBI-LLM stores them as (1, in); 1-D here so AdamW treats them like norm gains (no weight decay).

    Example usage::

        layer = FBILinear.from_linear(nn.Linear(256, 512, bias=False), QuantConfig(weight="fbi_binary",
                                                                                   activation="none"))
        layer.alpha, layer.beta   # initialised to mean|W - mean_col|, mean_col
    """

    scale_names = ("alpha", "beta")

    def create_scales(self, device, dtype) -> None:
        self.alpha = nn.Parameter(torch.empty(self.in_features, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.empty(self.in_features, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_scales(self) -> None:
        alpha, beta = fbi_init_scales(self.weight)
        self.alpha.copy_(alpha)
        self.beta.copy_(beta)

    def binary_weight(self) -> torch.Tensor:
        return fbi_binary_weight(self.weight, self.alpha, self.beta)


class OneBitLinear(BinaryLinear):
    """OneBit: ``W_b = g[:, None] * sign(W) * h[None, :]`` with learnable ``g`` (out,) and ``h`` (in,), SVID init."""

    scale_names = ("g", "h")

    def create_scales(self, device, dtype) -> None:
        self.g = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        self.h = nn.Parameter(torch.empty(self.in_features, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_scales(self) -> None:
        g, h = onebit_init_scales(self.weight)
        self.g.copy_(g)
        self.h.copy_(h)

    def binary_weight(self) -> torch.Tensor:
        return onebit_weight(self.weight, self.g, self.h)


def binary_layers(model: nn.Module) -> dict[str, BinaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryLinear)}
