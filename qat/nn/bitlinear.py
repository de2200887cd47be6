"""``BitLinear``: a linear layer trained with fake-quantized weights (and int8 activations) via STE.

Keeps the latent full-precision weight as its parameter; the quantized weight is recomputed from the full
weight in every forward (also under ZeRO-3, where DeepSpeed gathers the full weight before the forward).
"""

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import QuantConfig
from qat.nn.quantized import QuantizedLinear
from qat.quant import absmax_int8_per_token, dequantize, fake_quantize_int8_per_token, straight_through


class BitLinear(QuantizedLinear):
    """``nn.Linear`` whose forward uses ``codes * scale`` weights and, optionally, int8 per-token inputs.

    Example usage::

        layer = BitLinear.from_linear(nn.Linear(256, 512, bias=False), QuantConfig())
        codes, scale = layer.quantized_weight()   # codes in {-1, 0, 1}
    """

    has_inlayer_norm = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantConfig | None = None,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, quant=quant, norm_eps=norm_eps, device=device,
                         dtype=dtype)
        self.weight_quantizer = self.scheme.weight_fn
        if self.weight_quantizer is None:
            raise RecipeError(f"scheme {self.quant.weight!r} has no weight function; BitLinear needs one")
        # unilm FAQ variant: RMSNorm inside the layer, before activation quantization.
        self.rms_norm = (nn.RMSNorm(in_features, eps=norm_eps, device=device, dtype=dtype)
                           if self.quant.norm_placement == "inlayer" else None)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (dtype of the weight) and scale of the current latent weight."""
        return self.weight_quantizer(self.weight, self.quant.granularity, self.quant.group_size)

    def fake_quantized_weight(self) -> torch.Tensor:
        codes, scale = self.quantized_weight()
        return straight_through(self.weight, dequantize(codes, scale, self.quant.granularity, self.quant.group_size))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if self.quant.activation == "none":
            return x
        return fake_quantize_int8_per_token(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.quant.activation != "none" and self.quant.granularity != "group":
            return self.integer_forward(x)
        return F.linear(self.quantize_input(x), self.fake_quantized_weight(), self.bias)

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference math of packed runtimes (HF ``BitLinear``, qat kernels): an integer-valued matmul (exact in
        fp32 while |sum| < 2^24) rescaled once, ``y = (x_q @ W_q^T) / (x_scale * (1 / w_scale))``."""
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        x_codes, x_scale = absmax_int8_per_token(x.to(compute_dtype))
        codes, scale = self.quantized_weight()
        scale = scale.to(compute_dtype)
        w_scale = scale.reshape(1, -1) if self.quant.granularity == "row" else scale.reshape(1)
        y = F.linear(x_codes, codes.to(compute_dtype)) / (x_scale * (1.0 / w_scale))
        if self.bias is not None:
            y = y + self.bias.to(compute_dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.quant.weight}/{self.quant.granularity}, "
                f"activation={self.quant.activation}, norm={self.quant.norm_placement}")
