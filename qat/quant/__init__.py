"""Numerics: quantizers as pure functions (no I/O, no Lightning). The schemes that name them for recipes live in
``qat.nn.schemes``."""

from qat.quant.activation import absmax_int8_per_token, fake_quantize_int8_per_token
from qat.quant.binary import absmean_binary
from qat.quant.q8_0 import dequantize_q8_0, quantize_q8_0
from qat.quant.ste import straight_through
from qat.quant.ternary import absmean_ternary, absmedian_ternary, dequantize

__all__ = ["absmean_ternary", "absmedian_ternary", "absmean_binary", "dequantize", "absmax_int8_per_token",
           "straight_through", "quantize_q8_0", "dequantize_q8_0", "fake_quantize_int8_per_token"]
