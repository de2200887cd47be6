"""``PackedLinear``: inference twin of a quantized layer (``BitLinear``) holding 2-bit (ternary) or 1-bit (binary)
packed weights, in the kernel layout its scheme names (``Scheme.packed_layout``).

``pack_model`` turns a trained QAT model into a packed inference model. With int8 activations the forward is
BitLinear's math evaluated exactly in integers by the packed kernels (``qat.kernels``):
``y = (x_codes . w_codes) * w_scale / x_scale (+ bias)``; with 16-bit activations (``activation: none``) it
unpacks the codes and runs ``F.linear`` on ``codes * scale``, as BitLinear does.
"""

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.bitnet import BitLinear as HFBitLinear

from qat.errors import ExportError
from qat.kernels.packed_linear import dense_linear, packed_linear, q8_0_linear, unpack_codes
from qat.nn.quantized import QuantizedLinear, quantized_layers
from qat.nn.schemes import Scheme
from qat.pack.hf_bitnet import unpack_ternary_hf
from qat.pack.kernel_layout import (
    BINARY_BITS,
    TERNARY_BITS,
    pack_binary_1bit,
    pack_q8_0,
    pack_ternary_2bit,
    unpack_q8_0,
)
from qat.quant.q8_0 import Q8_0_BLOCK, dequantize_q8_0, quantize_q8_0

# ``Scheme.packed_layout`` -> bits per code and the packer of the kernel layout (qat.pack.kernel_layout).
PACKED_LAYOUTS = {"ternary_2bit": (TERNARY_BITS, pack_ternary_2bit), "binary_1bit": (BINARY_BITS, pack_binary_1bit)}
PACKERS = dict(PACKED_LAYOUTS.values())


def packed_layout(scheme: Scheme) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Bits per code and packer of ``scheme``'s kernel layout.

    Raises:
        ExportError: the scheme has no packed layout (e.g. FBI-LLM's ``alpha * sign + beta`` is not
            ``codes * scale``).
    """
    if scheme.packed_layout not in PACKED_LAYOUTS:
        raise ExportError(
            f"cannot pack a layer quantized by {scheme.name!r} (levels {scheme.levels}, packed layout "
            f"{scheme.packed_layout}); the packed kernels hold the {' and '.join(PACKED_LAYOUTS)} layouts. Keep "
            f"this model unpacked, or export it with --format {scheme.default_export}.")
    return PACKED_LAYOUTS[scheme.packed_layout]


class PackedLinear(nn.Module):
    """Linear layer over packed ternary/binary codes with per-tensor/row/group scales.

    Buffers: ``packed`` uint8 in the kernel layout (ternary (out, padded_in / 4), binary row tiles
    (ceil(out / 32), padded_in / 8, 32); :mod:`qat.pack.kernel_layout`), ``scale`` float32
    (out, groups), optional ``bias``. ``rms_norm`` is BitLinear's in-layer RMSNorm (``inlayer`` placement).

    Example usage::

        packed = PackedLinear.from_quantized(bitlinear_layer)
        y = packed(x)   # == bitlinear_layer(x) up to fp32 rounding
    """

    def __init__(self, in_features: int, out_features: int, bits: int, packed: torch.Tensor, scale: torch.Tensor,
                 group_size: int, activation: str = "int8_per_token", bias: torch.Tensor | None = None,
                 rms_norm: nn.Module | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.activation = group_size, activation
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", bias)
        self.rms_norm = rms_norm

    @classmethod
    def from_quantized(cls, layer: QuantizedLinear) -> "PackedLinear":
        """Pack ``layer``'s current quantized weight in its scheme's packed layout (the layer's effective weight
        must be ``codes * scale``, as for ``BitLinear``).

        Raises:
            ExportError: the layer's scheme has no packed layout (only ternary and binary codes with plain scales).
        """
        bits, packer = packed_layout(layer.scheme)
        with torch.no_grad():
            codes, scale = layer.quantized_weight()
            out_features, in_features = codes.shape
            # tensor (1, 1) / row (out, 1) / group (out, groups, 1) -> (out, groups)
            scale = scale.float().reshape(scale.shape[0], -1).expand(out_features, -1).contiguous()
            packed = packer(codes.round().to(torch.int8))
            bias = None if layer.bias is None else layer.bias.detach().clone()
        group_size = layer.quant.group_size if layer.quant.granularity == "group" else in_features
        return cls(in_features, out_features, bits, packed, scale, group_size, layer.quant.activation, bias,
                   copy.deepcopy(getattr(layer, "rms_norm", None)))

    from_bitlinear = from_quantized  # the name callers used before schemes had packed layouts

    @classmethod
    def from_hf_bitlinear(cls, layer: HFBitLinear) -> "PackedLinear":
        """Repack an HF ``BitNetForCausalLM`` layer (``linear_class: bitlinear``, packed uint8 weights) exactly.

        HF divides by ``weight_scale`` (= 1 / absmean, notes §7); its activation quantizer is BitNet's absmax,
        the same formula as ours, so the packed layer computes what the HF layer computes. HF stores every model
        at 2 bits; a layer without zero codes (a binary BitNet, ``absmean_binary``) is repacked at 1 bit, which
        holds the same codes in half the bytes and runs the binary kernels.
        """
        out_features, in_features = layer.out_features, layer.in_features
        scale = (1.0 / layer.weight_scale.detach().float()).reshape(1, 1).expand(out_features, 1).contiguous()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        codes = unpack_ternary_hf(layer.weight, torch.int8)
        bits = BINARY_BITS if codes.numel() and not (codes == 0).any() else TERNARY_BITS
        return cls(in_features, out_features, bits, PACKERS[bits](codes), scale, in_features, "int8_per_token",
                   bias, copy.deepcopy(layer.rms_norm))

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits, self.in_features, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes().to(dtype).reshape(self.out_features, self.scale.shape[1], -1)
        return (codes * self.scale.to(dtype).unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if self.activation == "none":
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        y = packed_linear(x, self.packed, self.scale, self.bits, self.in_features, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = "ternary" if self.bits == TERNARY_BITS else "binary"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind} {self.bits}-bit, "
                f"groups={self.scale.shape[1]}, activation={self.activation}, bias={self.bias is not None}")


class DenseLinear(nn.Linear):
    """A full-precision ``nn.Linear`` of a packed model (``keep_full_precision``, e.g. ``lm_head``) whose one-token
    fp32 forward runs qat's GEMV kernel (:func:`qat.kernels.packed_linear.dense_linear`); same parameters."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DenseLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias   # the same Parameters: tied embeddings stay tied
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)


class Q8_0Linear(nn.Module):
    """A full-precision linear layer (the ``lm_head``) with GGML Q8_0 weights: int8 codes and one fp16 scale per block
    of 32 inputs (``d = max|w| / 127``, ``q = round(w / d)``), 1.06 bytes per weight instead of fp32's 4. A decode
    step streams the head's weight from memory once per token (32000 x 1536 fp32: 197 MB, more than all packed
    layers of a 700M model), so its bytes set its time. Activations are quantized per token and block the same way
    (:func:`qat.kernels.packed_linear.q8_0_linear`), as llama.cpp's Q8_0 dot products do.

    Buffers: ``qweight`` int8 (out, padded_in) in the interleaved chunk layout and ``scale`` fp16 (out,
    padded_in / 32) (:func:`qat.pack.kernel_layout.pack_q8_0`), optional ``bias``.

    Example usage::

        head = Q8_0Linear.from_linear(model.lm_head)
        logits = head(hidden)   # ~ model.lm_head(hidden); held-out perplexity +0.003% (bench/int8_head_perplexity.py)
    """

    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Q8_0Linear":
        """Quantize ``linear``'s weight to Q8_0 (a copy: a tied embedding keeps its fp32 weight)."""
        with torch.no_grad():
            codes, d = quantize_q8_0(linear.weight.float())
            qweight, scale = pack_q8_0(codes, d)
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(linear.in_features, linear.out_features, qweight, scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack_q8_0(self.qweight, -(-self.in_features // Q8_0_BLOCK) * Q8_0_BLOCK)
        d = self.scale[:, :codes.shape[1] // Q8_0_BLOCK]
        return dequantize_q8_0(codes, d)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = q8_0_linear(x, self.qweight, self.scale, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0, bias={self.bias is not None}"


def pack_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every quantized layer of ``model`` (a copy unless ``inplace``) by its ``PackedLinear`` — qat's
    ``QuantizedLinear`` layers, whose schemes must have a packed layout, and HF's packed BitNet ``BitLinear`` —
    and every remaining plain ``nn.Linear`` by a ``DenseLinear`` over the same weights.

    Raises:
        ExportError: the model has no quantized layer, or one whose scheme has no packed layout (checked for every
            layer before the model is copied).
    """
    for layer in quantized_layers(model).values():
        packed_layout(layer.scheme)
    packed_model = model if inplace else copy.deepcopy(model)
    layers = [(name, m) for name, m in packed_model.named_modules() if isinstance(m, (QuantizedLinear, HFBitLinear))]
    if not layers:
        raise ExportError("pack_model found no quantized layer; convert the model with qat.nn.convert_to_qat, "
                          "load a QAT checkpoint or an HF BitNet export before packing")
    for name, layer in layers:
        packed = (PackedLinear.from_quantized(layer) if isinstance(layer, QuantizedLinear)
                  else PackedLinear.from_hf_bitlinear(layer))
        packed_model.set_submodule(name, packed)
    for name, module in list(packed_model.named_modules()):
        if type(module) is nn.Linear:
            packed_model.set_submodule(name, DenseLinear.from_linear(module))
    return packed_model.eval()
