"""b bits per weight (b = 1, 2, 3, 4): integer codes from an evenly spaced level set (``Scheme.levels``, e.g.
{-1, 0, 1} at 2 bits, {-3, -1, 1, 3}, [-8, 7]) stored as their index in the sorted levels, a row (out, in) packed
into uint8 (out, ceil(in * b / 8)) as one little-endian bit stream: bit k of index j is bit ``j * b + k`` of the
row, and bit i of the row is bit ``i % 8`` of byte ``i // 8``. 3-bit indices straddle byte boundaries; the padding
bits of a row's last byte are 0.

Exactly b bits per weight (plus < 1 byte per row), the storage of qat's ``qat-packed`` export."""

import torch


def _bit_weights(bits: int) -> torch.Tensor:
    return torch.tensor([1 << k for k in range(bits)], dtype=torch.int32)


def _check_levels(levels: tuple[int, ...], bits: int) -> torch.Tensor:
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"bits={bits}: qat packs 1, 2, 3 or 4 bits per weight")
    if len(levels) > 1 << bits:
        raise ValueError(f"{len(levels)} levels do not fit in {bits} bits")
    return torch.tensor(sorted(levels), dtype=torch.float64)


def pack_nbit(codes: torch.Tensor, levels: tuple[int, ...], bits: int) -> torch.Tensor:
    """Pack 2-D ``codes`` (any dtype, values in ``levels``) to uint8 (out, ceil(in * bits / 8)).

    Raises:
        ValueError: a code outside ``levels``, a non-2-D input, or more levels than ``bits`` hold.
    """
    table = _check_levels(levels, bits)
    if codes.ndim != 2:
        raise ValueError(f"pack_nbit packs a 2-D weight, got shape {tuple(codes.shape)}")
    values = codes.detach().to(torch.float64)
    index = torch.searchsorted(table, values.contiguous()).clamp(max=len(table) - 1)
    if not bool((table[index] == values).all()):
        bad = values[table[index] != values][:5].tolist()
        raise ValueError(f"pack_nbit: codes {bad} are not among the levels {tuple(sorted(levels))}")
    out, n = codes.shape
    stream = ((index.to(torch.int32)[..., None] & _bit_weights(bits)) != 0).to(torch.int32).reshape(out, n * bits)
    stream = torch.nn.functional.pad(stream, (0, (-n * bits) % 8)).reshape(out, -1, 8)
    return (stream * _bit_weights(8)).sum(dim=-1).to(torch.uint8)


def unpack_nbit(packed: torch.Tensor, levels: tuple[int, ...], bits: int, in_features: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact inverse of :func:`pack_nbit`: codes (out, in_features) in ``dtype``.

    Raises:
        ValueError: wrong dtype/shape of ``packed``, or an index beyond the levels (a corrupt file).
    """
    table = _check_levels(levels, bits)
    row_bytes = (in_features * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != row_bytes:
        raise ValueError(f"packed {bits}-bit codes must be uint8 (out, {row_bytes}) for in_features={in_features}; "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    stream = (packed.to(torch.int32)[..., None] & _bit_weights(8)) != 0
    stream = stream.reshape(packed.shape[0], -1)[:, : in_features * bits].reshape(packed.shape[0], in_features, bits)
    index = (stream.to(torch.int64) * _bit_weights(bits)).sum(dim=-1)
    if bool((index >= len(table)).any()):
        raise ValueError(f"packed {bits}-bit codes hold an index >= {len(table)} (the number of levels): the data "
                         "is corrupt")
    return table[index].to(dtype)
