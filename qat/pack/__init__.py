"""Packers: one per format, each with its exact inverse beside it."""

from qat.pack.binary_1bit import pack_sign_1bit, unpack_sign_1bit
from qat.pack.gguf_ternary import block_scales, pack_tq, unpack_tq
from qat.pack.hf_bitnet import pack_ternary_hf, unpack_ternary_hf
from qat.pack.kernel_layout import (
                                    pack_binary_1bit,
                                    pack_ternary_2bit,
                                    ternary_2bit_from_hf,
                                    unpack_binary_1bit,
                                    unpack_ternary_2bit,
)

__all__ = ["pack_ternary_hf", "unpack_ternary_hf", "pack_ternary_2bit", "unpack_ternary_2bit", "pack_binary_1bit",
           "unpack_binary_1bit", "ternary_2bit_from_hf", "pack_tq", "unpack_tq", "block_scales",
           "pack_sign_1bit", "unpack_sign_1bit"]
