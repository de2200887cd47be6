"""The decode step's attention (``qat.nn.decoder``): one new position against a static KV cache, bound to the cache.

Layouts: ``qkv`` (1, (heads + 2 kv_heads) * head_dim) holds the q heads, k heads and v heads of the new position,
each head's dims in RoPE's pair order (values 2i, 2i + 1 rotate together; ``qat.nn.decoder.attention_qkv``) and q
already scaled by 1 / sqrt(head_dim); ``kv_cache`` (layers, 2, kv_heads, max_len, head_dim) keys then values;
``rope`` (max_len, 1, head_dim / 2) complex, ``cos + i sin`` of each position (``qat.nn.decoder.rope_table``).
"""

from typing import Callable

import torch

from qat.kernels.extension import load_cpu_extension
from qat.kernels.packed_linear import selected_path

DecodeAttention = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


def decode_attention_torch(qkv: torch.Tensor, rope: torch.Tensor, kv_cache: torch.Tensor, layer: int, position: int,
                           out: torch.Tensor) -> torch.Tensor:
    """Rotates q and k of ``qkv`` in place (RoPE at ``position``), writes k and v into ``kv_cache[layer]`` at
    ``position``, and writes ``softmax(q K^T) V`` over positions 0..position of each query head into ``out``
    (1, heads * head_dim); query head h reads kv head h // (heads / kv_heads) (GQA without copies)."""
    kv_heads, _, head_dim = kv_cache.shape[2:]
    heads = out.shape[-1] // head_dim
    pairs = qkv.view(heads + 2 * kv_heads, head_dim // 2, 2)
    torch.view_as_complex(pairs[:heads + kv_heads]).mul_(rope[position])
    cache = kv_cache[layer]
    cache[:, :, position].copy_(qkv[0, heads * head_dim:].view(2, kv_heads, head_dim))
    q = qkv[0, :heads * head_dim].view(kv_heads, heads // kv_heads, head_dim)
    keys, values = cache[0, :, :position + 1], cache[1, :, :position + 1]
    torch.bmm(torch.softmax(torch.bmm(q, keys.mT), -1), values, out=out.view(kv_heads, heads // kv_heads, head_dim))
    return out


def bind_decode_attention(rope: torch.Tensor, kv_cache: torch.Tensor) -> DecodeAttention:
    """``(qkv, layer, position, out) -> out``: ``decode_attention_torch`` over ``rope`` and ``kv_cache``, as one
    native call (the extension's ``BoundDecodeAttention``: 5 aten ops and 3 views a layer took 60-90 µs of a 700M
    decode step) on every CPU path but ``torch``, which runs ``decode_attention_torch`` itself. Each query head's
    scores and weighted sum round differently from ``bmm``'s (fp32, the same values to a few ulps); the softmax's exp
    is vectorized on the SIMD paths (within 2 ulp), glibc's ``expf`` on ``portable``."""
    path = selected_path()
    if path == "torch":
        return lambda qkv, layer, position, out: decode_attention_torch(qkv, rope, kv_cache, layer, position, out)
    bound = load_cpu_extension().BoundDecodeAttention(torch.view_as_real(rope).contiguous(), kv_cache, path)

    def attend(qkv: torch.Tensor, layer: int, position: int, out: torch.Tensor) -> torch.Tensor:
        bound(qkv, layer, position, out)
        return out
    return attend
