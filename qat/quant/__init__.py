"""Numerics: quantizers as pure functions (no I/O, no Lightning)."""

from qat.quant.activation import absmax_int8_per_token
from qat.quant.registry import QUANTIZER_LEVELS, WEIGHT_QUANTIZERS, get_weight_quantizer, register_weight_quantizer
from qat.quant.ste import straight_through
from qat.quant.ternary import absmean_ternary, absmedian_ternary, dequantize

__all__ = [
    "absmean_ternary", "absmedian_ternary", "dequantize", "absmax_int8_per_token", "straight_through",
    "WEIGHT_QUANTIZERS", "QUANTIZER_LEVELS", "get_weight_quantizer", "register_weight_quantizer",
]
