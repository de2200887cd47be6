"""Binary linear layers with learnable full-precision scales: ``FBILinear`` (FBI-LLM) and ``OneBitLinear``
(OneBit). The latent full-precision weight stays the parameter; every forward binarizes it with ``sign`` (identity
STE). Activations stay full precision: both papers are W1A16. Math lives in ``qat.quant.binary``.

Recipes select them with ``model.quant.weight: fbi_binary | onebit`` (see :data:`BINARY_LINEAR_LAYERS`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import QuantConfig
from qat.nn.quantized import QuantizedLinear
from qat.quant.binary import (binary_sign, fbi_binary_weight, fbi_init_scales, onebit_init_scales,
                              onebit_weight)


class BinaryLinear(QuantizedLinear):
    """Base of the 1-bit layers: ``y = x @ binary_weight().T + bias``; subclasses own the scales."""

    quant_name = ""  # the ``QuantConfig.weight`` that selects this class
    # Names of the full-precision scale parameters stored next to the packed sign bits on export.
    scale_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantConfig | None = None,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant = quant or QuantConfig(weight=self.quant_name, activation="none")
        check_binary_quant(self.quant)
        if self.quant.weight != self.quant_name:
            raise RecipeError(f"{type(self).__name__} implements weight={self.quant_name!r}, "
                              f"not {self.quant.weight!r}")
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
        return f"{super().extra_repr()}, weight={self.quant_name} (1 bit + {'/'.join(self.scale_names)})"


class FBILinear(BinaryLinear):
    """FBI-LLM: ``W_b = alpha ⊙ sign(W) + beta`` with learnable column-wise ``alpha``, ``beta`` of shape (in,).

    FBI-LLM stores them as (1, in); 1-D here so AdamW treats them like norm gains (no weight decay).

    Example usage::

        layer = FBILinear.from_linear(nn.Linear(256, 512, bias=False), QuantConfig(weight="fbi_binary",
                                                                                   activation="none"))
        layer.alpha, layer.beta   # initialised to mean|W - mean_col|, mean_col
    """

    quant_name = "fbi_binary"
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

    quant_name = "onebit"
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


# ``QuantConfig.weight`` names that select a binary layer class instead of ``BitLinear``.
BINARY_LINEAR_LAYERS: dict[str, type[BinaryLinear]] = {"fbi_binary": FBILinear, "onebit": OneBitLinear}


def check_binary_quant(quant: QuantConfig) -> None:
    """FBI-LLM and OneBit binarize weights only (W1A16) and keep the model's norms.

    Raises:
        RecipeError: an unknown binary name, int8 activations, or in-layer norms requested.
    """
    if quant.weight not in BINARY_LINEAR_LAYERS:
        raise RecipeError(f"model.quant.weight={quant.weight!r} is not a binary layer; use one of "
                          f"{', '.join(BINARY_LINEAR_LAYERS)}")
    if quant.activation != "none":
        raise RecipeError(f"model.quant.weight={quant.weight} keeps activations in full precision (W1A16, as in "
                          f"FBI-LLM/OneBit); set model.quant.activation: none (got {quant.activation!r})")
    if quant.norm_placement != "subln":
        raise RecipeError(f"model.quant.weight={quant.weight} keeps the model's norms; set "
                          f"model.quant.norm_placement: subln (got {quant.norm_placement!r})")


def binary_layers(model: nn.Module) -> dict[str, BinaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryLinear)}
