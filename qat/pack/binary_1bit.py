"""1 bit per weight: a {-1, +1} matrix (out, in) packed into uint8 (out, ceil(in / 8)), little-endian bit order
(bit j of byte b holds column 8·b + j; bit 1 = +1, bit 0 = -1). Same bit order as ``numpy.packbits(...,
bitorder="little")``; the padding bits of the last byte are 0.

This is the storage format of exported binary checkpoints: exactly 1 bit per weight (plus < 1 byte per row). The
kernel layout (``qat.pack.kernel_layout.pack_binary_1bit``) pads rows to 512 values, which would double the size of
a 256-wide layer on disk."""

import torch

_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.int32)


def pack_sign_1bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {-1, +1} (any dtype, 2-D) to uint8 (out, ceil(in / 8)).

    Raises:
        ValueError: a code is not -1 or +1 (e.g. a ternary 0), or the input is not 2-D.
    """
    if codes.ndim != 2:
        raise ValueError(f"pack_sign_1bit packs a 2-D weight, got shape {tuple(codes.shape)}")
    if not bool(((codes == 1) | (codes == -1)).all()):
        raise ValueError("pack_sign_1bit needs codes in {-1, +1}; a 0 (ternary) code cannot be stored in 1 bit")
    out, n = codes.shape
    bits = (codes > 0).to(torch.int32)
    bits = torch.nn.functional.pad(bits, (0, (-n) % 8)).reshape(out, -1, 8)
    return (bits * _BIT_WEIGHTS).sum(dim=-1).to(torch.uint8)


def unpack_sign_1bit(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact inverse of :func:`pack_sign_1bit`: codes in {-1, +1} of shape (out, in_features)."""
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"packed sign bits must be uint8 (out, {(in_features + 7) // 8}) for in_features="
                         f"{in_features}; got {packed.dtype} {tuple(packed.shape)}")
    bits = (packed.to(torch.int32)[..., None] & _BIT_WEIGHTS) != 0
    bits = bits.reshape(packed.shape[0], -1)[:, :in_features]
    return torch.where(bits, 1.0, -1.0).to(dtype)
