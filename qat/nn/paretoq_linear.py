"""``ParetoQLinear``: a linear layer trained with ParetoQ's learnable-scale weight quantizers (1, 1.58, 2, 3, 4 bits;
math in :mod:`qat.quant.paretoq`). The latent full-precision weight stays the parameter ``weight``; ``alpha`` is a
learnable scale per output row (``granularity: row``, ParetoQ's default), per group of ``group_size`` inputs
(``group``) or per tensor. Activations stay 16/32-bit by default (ParetoQ is weight-only); ``activation:
int8_per_token`` adds BitNet's absmax int8 activations.

Recipes select it with ``model.quant.weight: paretoq_1bit | paretoq_ternary | paretoq_2bit | paretoq_3bit |
paretoq_4bit`` (schemes in :mod:`qat.nn.schemes`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import QuantConfig
from qat.nn.quantized import QuantizedLinear
from qat.quant import fake_quantize_int8_per_token
from qat.quant.paretoq import PARETOQ_GRIDS, ParetoQGrid, paretoq_codes, paretoq_init_alpha, paretoq_quantize

SCHEME_PREFIX = "paretoq_"


class ParetoQLinear(QuantizedLinear):
    """``y = x @ (codes * alpha / m).T + bias`` with a learnable ``alpha``, stored flat, viewed as (out, G): G = 1 per
    row, ``in / group_size`` per group; (1, 1) per tensor.

    Example usage::

        layer = ParetoQLinear.from_linear(nn.Linear(576, 576, bias=False),
                                          QuantConfig(weight="paretoq_4bit", granularity="row", activation="none"))
        codes, scale = layer.quantized_weight()   # codes in [-8, 7], scale = alpha as (576, 1)

    Raises:
        RecipeError: ``group_size`` does not divide ``in_features`` (``granularity: group``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantConfig | None = None,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, quant=quant, norm_eps=norm_eps, device=device,
                         dtype=dtype)
        self.grid: ParetoQGrid = PARETOQ_GRIDS[self.quant.weight.removeprefix(SCHEME_PREFIX)]
        granularity = self.quant.granularity
        if granularity == "group" and in_features % self.quant.group_size:
            raise RecipeError(f"model.quant.group_size={self.quant.group_size} does not divide in_features="
                              f"{in_features}; choose a group size that divides every quantized layer's input width")
        rows = 1 if granularity == "tensor" else out_features
        groups = in_features // self.quant.group_size if granularity == "group" else 1
        self.alpha_shape = (rows, groups)
        # ParetoQ's ``weight_clip_val``, kept 1-D (viewed as (rows, groups)): qat's AdamW decays only parameters
        # with ndim >= 2, and decay would shrink the scales.
        self.alpha = nn.Parameter(torch.empty(rows * groups, device=device, dtype=dtype))
        self.reset_quantization_state()

    def _weight_2d(self) -> torch.Tensor:
        """The latent weight as the (rows of alpha, inputs per row of alpha) matrix the quantizer sees."""
        return self.weight.reshape(1, -1) if self.quant.granularity == "tensor" else self.weight

    def alpha_2d(self) -> torch.Tensor:
        return self.alpha.view(self.alpha_shape)

    @torch.no_grad()
    def reset_quantization_state(self) -> None:
        """ParetoQ's init of alpha from the current latent weight (mean|W|, max|W|, max|W| / (2^(b-1) - 1))."""
        self.alpha.copy_(paretoq_init_alpha(self._weight_2d(), self.grid, self.alpha_shape[1]).flatten())

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (dtype of the weight) and scale ``alpha / m``: (1, 1) per tensor, (out, 1) per row,
        (out, in / group_size, 1) per group."""
        codes, scale = paretoq_codes(self._weight_2d(), self.alpha_2d(), self.grid)
        return codes.reshape(self.weight.shape), scale

    def fake_quantized_weight(self) -> torch.Tensor:
        return paretoq_quantize(self._weight_2d(), self.alpha_2d(), self.grid).reshape(self.weight.shape)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant.activation == "none":
            return x
        return fake_quantize_int8_per_token(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.fake_quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.quant.weight}/{self.quant.granularity}, "
                f"activation={self.quant.activation}")
