"""The one registry of quantization schemes, by the name recipes use (``model.quant.weight``).

A :class:`Scheme` says everything the rest of qat needs to know about a way of quantizing linear weights: its
levels and bit width, the layer class that trains it, its pure weight function when it has one, the packed
layout the kernels run, and which export formats hold it exactly. Adding a scheme = its function/layer file plus
one :func:`register_scheme` call here.

Example usage::

    scheme = get_scheme("absmean_ternary")
    scheme.levels, scheme.bits, scheme.export_formats     # (-1, 0, 1), 1.58, ("hf", "gguf-tq2_0", ...)
    layer = scheme.layer_class.from_linear(linear, QuantConfig(weight=scheme.name))
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from qat.errors import RecipeError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import QuantConfig
from qat.nn.fbi_linear import FBILinear, OneBitLinear
from qat.nn.paretoq_linear import ParetoQLinear
from qat.nn.quantized import QuantizedLinear
from qat.quant.binary import absmean_binary
from qat.quant.ternary import absmean_ternary, absmedian_ternary

WeightFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ACTIVATIONS = ("int8_per_token", "none")


@dataclass(frozen=True)
class Scheme:
    """One way of quantizing linear weights.

    Attributes:
        name: the recipe name (``model.quant.weight``).
        levels: the integer codes a weight can take.
        layer_class: the trainable layer (a :class:`qat.nn.quantized.QuantizedLinear`).
        weight_fn: the pure ``(w, granularity, group_size) -> (codes, scale)`` function, or None when the layer
            owns learnable scales.
        packed_layout: the kernel layout that holds the codes (``ternary_2bit`` | ``binary_1bit``), None if the
            packed kernels cannot run it.
        export_formats: export formats that hold the trained model exactly; the first is the default.
        activations: the ``model.quant.activation`` settings the scheme supports.
        granularities: the ``model.quant.granularity`` settings the scheme supports.
        description: one line for errors, model cards and ``--help``.
    """

    name: str
    levels: tuple[int, ...]
    layer_class: type[QuantizedLinear]
    weight_fn: Optional[WeightFunction]
    packed_layout: Optional[str]
    export_formats: tuple[str, ...]
    activations: tuple[str, ...] = ACTIVATIONS
    granularities: tuple[str, ...] = ("tensor", "row", "group")
    description: str = ""

    @property
    def bits(self) -> float:
        """Information bits per weight: log2 of the number of levels (1.58 for ternary)."""
        return round(math.log2(len(self.levels)), 2)

    @property
    def default_export(self) -> str:
        return self.export_formats[0]

    def check_config(self, quant: QuantConfig) -> None:
        """Refuse settings this scheme's layer does not implement.

        Raises:
            RecipeError: unsupported granularity or activation, or ``inlayer`` norms for a layer without one.
        """
        if quant.granularity not in self.granularities:
            raise RecipeError(f"model.quant.granularity={quant.granularity!r} is not supported by scheme "
                              f"{self.name!r}; set model.quant.granularity to one of {', '.join(self.granularities)}")
        if quant.activation not in self.activations:
            raise RecipeError(f"model.quant.activation={quant.activation!r} is not supported by scheme {self.name!r} "
                              f"({self.description}); set model.quant.activation: {' or '.join(self.activations)}")
        if quant.norm_placement == "inlayer" and not self.layer_class.has_inlayer_norm:
            raise RecipeError(f"model.quant.norm_placement=inlayer: the layers of scheme {self.name!r} "
                              f"({self.layer_class.__name__}) have no in-layer RMSNorm; "
                              "set model.quant.norm_placement: subln")


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add ``scheme`` to the registry (a name may be registered once)."""
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is already registered")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """The scheme a recipe names.

    Raises:
        RecipeError: unknown name (the message lists the known ones).
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise RecipeError(f"unknown quantization scheme {name!r}; known: {', '.join(sorted(SCHEMES))}. "
                          "Fix `model.quant.weight` in the recipe.") from None


TERNARY_EXPORTS = ("hf", "gguf-tq2_0", "gguf-tq1_0")

register_scheme(Scheme(
    "absmean_ternary", (-1, 0, 1), BitLinear, absmean_ternary, "ternary_2bit", TERNARY_EXPORTS,
    description="BitNet b1.58: codes round(W / mean|W|) clamped to {-1, 0, 1}, scale mean|W|"))
register_scheme(Scheme(
    "absmedian_ternary", (-1, 0, 1), BitLinear, absmedian_ternary, "ternary_2bit", TERNARY_EXPORTS,
    description="BitNet b1.58 Reloaded: ternary codes with scale median|W|"))
register_scheme(Scheme(
    "absmean_binary", (-1, 1), BitLinear, absmean_binary, "binary_1bit", TERNARY_EXPORTS,
    description="BitNet binary (W1A8): codes sign(W - mean W), scale mean|W|"))
register_scheme(Scheme(
    "fbi_binary", (-1, 1), FBILinear, None, None, ("binary",), activations=("none",), granularities=("tensor",),
    description="FBI-LLM: alpha * sign(W) + beta with learnable column-wise alpha, beta (W1A16)"))
register_scheme(Scheme(
    "onebit", (-1, 1), OneBitLinear, None, None, ("binary",), activations=("none",), granularities=("tensor",),
    description="OneBit: g * sign(W) * h with learnable output/input vectors, SVID init (W1A16)"))

# ParetoQ (arXiv 2502.02631): learnable scale alpha per row/group, effective weight codes * scale
# (qat.quant.paretoq); weight-only by default (the first activation setting).
PARETOQ_EXPORTS = ("qat-packed", "gguf-q4_0")
# Codes in {-1, 0, 1}: HF BitNet holds them too when the scale is one per tensor and activations are int8 per token
# (HF's BitLinear always quantizes them); transformers applies it to any architecture (llama too).
PARETOQ_TERNARY_EXPORTS = (*PARETOQ_EXPORTS, "hf")
PARETOQ_ACTIVATIONS = ("none", "int8_per_token")

register_scheme(Scheme(
    "paretoq_1bit", (-1, 1), ParetoQLinear, None, None, PARETOQ_TERNARY_EXPORTS,
    activations=PARETOQ_ACTIVATIONS,
    description="ParetoQ 1-bit: codes sign(W), scale alpha (learnable, init mean|W|)"))
register_scheme(Scheme(
    "paretoq_ternary", (-1, 0, 1), ParetoQLinear, None, None, PARETOQ_TERNARY_EXPORTS,
    activations=PARETOQ_ACTIVATIONS,
    description="ParetoQ ternary (SEQ n=1.5): levels {-2/3, 0, 2/3} * alpha = codes {-1, 0, 1} * (2 alpha / 3)"))
register_scheme(Scheme(
    "paretoq_2bit", (-3, -1, 1, 3), ParetoQLinear, None, None, PARETOQ_EXPORTS, activations=PARETOQ_ACTIVATIONS,
    description="ParetoQ 2-bit (SEQ n=2, s=0.5): levels {±1/4, ±3/4} * alpha = codes {±1, ±3} * (alpha / 4)"))
register_scheme(Scheme(
    "paretoq_3bit", tuple(range(-4, 4)), ParetoQLinear, None, None, PARETOQ_EXPORTS,
    activations=PARETOQ_ACTIVATIONS,
    description="ParetoQ 3-bit (LSQ): codes clamp(round(W / alpha), -4, 3), scale alpha"))
register_scheme(Scheme(
    "paretoq_4bit", tuple(range(-8, 8)), ParetoQLinear, None, None, PARETOQ_EXPORTS,
    activations=PARETOQ_ACTIVATIONS,
    description="ParetoQ 4-bit (LSQ): codes clamp(round(W / alpha), -8, 7), scale alpha"))
