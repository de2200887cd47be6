"""The one registry of weight quantizers, by the name recipes use.

A weight quantizer is a pure function ``(w, granularity, group_size) -> (codes, scale)`` with
``w ≈ dequantize(codes, scale)``. Other families (binary, n-bit) register here too.
"""

from typing import Callable

import torch

from qat.errors import RecipeError
from qat.quant.binary import absmean_binary
from qat.quant.ternary import absmean_ternary, absmedian_ternary

WeightQuantizer = Callable[..., tuple[torch.Tensor, torch.Tensor]]

WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {
    "absmean_ternary": absmean_ternary,
    "absmedian_ternary": absmedian_ternary,
    "absmean_binary": absmean_binary,
}

# Codes each quantizer can produce; export formats check this (ternary packers need {-1, 0, 1}).
QUANTIZER_LEVELS: dict[str, tuple[int, ...]] = {
    "absmean_ternary": (-1, 0, 1),
    "absmedian_ternary": (-1, 0, 1),
    "absmean_binary": (-1, 1),
}


# Names handled by dedicated layer classes rather than a quantizer function (qat.nn.fbi_linear).
LAYER_QUANTIZER_NAMES = ("fbi_binary", "onebit")


def register_weight_quantizer(name: str, fn: WeightQuantizer, levels: tuple[int, ...]) -> None:
    WEIGHT_QUANTIZERS[name] = fn
    QUANTIZER_LEVELS[name] = levels


def get_weight_quantizer(name: str) -> WeightQuantizer:
    try:
        return WEIGHT_QUANTIZERS[name]
    except KeyError:
        raise RecipeError(
            f"unknown weight quantizer {name!r}; known: "
            f"{', '.join(sorted((*WEIGHT_QUANTIZERS, *LAYER_QUANTIZER_NAMES)))}. "
            "Fix `model.quant.weight` in the recipe."
        ) from None
