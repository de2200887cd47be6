"""The decode step's attention (``qat.kernels.attention``), native and torch, against a float64 reference."""

import math

import pytest
import torch

from qat.kernels.attention import bind_decode_attention
from qat.nn.decoder import rope_table

pytestmark = pytest.mark.kernels


def reference(qkv, rope, cache, layer, position, heads, kv_heads, d):
    """float64: RoPE on the pairs of q and k heads, the new k and v appended to the layer's cache, softmax(qK^T)V."""
    heads_kv = qkv.double().view(heads + 2 * kv_heads, d // 2, 2)
    turn = torch.view_as_real(rope[position, 0].to(torch.complex128))                 # (d / 2, 2): cos, sin
    a, b = heads_kv[:heads + kv_heads, :, 0], heads_kv[:heads + kv_heads, :, 1]
    rotated = torch.stack((a * turn[:, 0] - b * turn[:, 1], a * turn[:, 1] + b * turn[:, 0]), -1).view(-1, d)
    q, k, v = rotated[:heads], rotated[heads:], heads_kv[heads + kv_heads:].reshape(kv_heads, d)
    keys = torch.cat((cache[layer, 0, :, :position].double(), k[:, None]), 1)            # (kv_heads, position + 1, d)
    values = torch.cat((cache[layer, 1, :, :position].double(), v[:, None]), 1)
    group = torch.arange(heads) // (heads // kv_heads)
    weights = torch.softmax(torch.einsum("hd,hjd->hj", q, keys[group]), -1)
    return torch.einsum("hj,hjd->hd", weights, values[group]).reshape(1, -1), rotated, k, v


# (heads, kv_heads, head_dim, layers, position, max_len): MHA and GQA down to one kv head, the first and the last
# position of the cache, head_dim off the 8-wide partial sums (10), long enough to split heads across threads (100,
# 200).
CASES = [(4, 2, 16, 2, 0, 8), (4, 4, 16, 3, 7, 8), (8, 1, 64, 1, 30, 40), (6, 3, 10, 2, 5, 9),
         (24, 24, 64, 2, 200, 256), (8, 2, 64, 2, 100, 128)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}kv{}d{}L{}p{}of{}".format(*c))
def test_decode_attention_is_float64_attention_of_the_rotated_position(forced_path, case):
    """On every path: the native call (one C++ body for every native path) and the torch ops."""
    heads, kv_heads, d, layers, position, max_len = case
    gen = torch.Generator().manual_seed(sum(case))
    layer = layers - 1
    rope = rope_table(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), 1.3, max_len)
    cache = torch.randn(layers, 2, kv_heads, max_len, d, generator=gen) * 2
    qkv = torch.randn(1, (heads + 2 * kv_heads) * d, generator=gen) * 3 / math.sqrt(d) ** 0.5
    want, rotated, k, v = reference(qkv, rope, cache, layer, position, heads, kv_heads, d)
    before, qkv_in = cache.clone(), qkv.clone()
    out = torch.full((1, heads * d), float("nan"))

    assert bind_decode_attention(rope, cache)(qkv, layer, position, out) is out

    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5 * float(want.abs().max()))
    torch.testing.assert_close(qkv[0, :(heads + kv_heads) * d].double(), rotated.view(-1), rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[0, (heads + kv_heads) * d:], qkv_in[0, (heads + kv_heads) * d:])   # v is not rotated
    torch.testing.assert_close(cache[layer, 0, :, position].double(), k, rtol=1e-6, atol=1e-6)
    assert torch.equal(cache[layer, 1, :, position].double(), v)
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[layer, :, :, position] = True
    assert torch.equal(cache[~written], before[~written])   # nothing else in the cache moves


def test_native_decode_attention_rejects_bad_arguments_clearly(monkeypatch):
    monkeypatch.setenv("QAT_KERNEL_PATH", "portable")
    heads, kv_heads, d, max_len = 4, 2, 16, 8
    rope = rope_table(torch.ones(d // 2), 1.0, max_len)
    attend = bind_decode_attention(rope, torch.zeros(2, 2, kv_heads, max_len, d))
    qkv, out = torch.randn(1, (heads + 2 * kv_heads) * d), torch.empty(1, heads * d)
    with pytest.raises(RuntimeError, match="position 8 outside the cache's 2 layers / 8 positions"):
        attend(qkv, 1, max_len, out)
    with pytest.raises(RuntimeError, match="layer 2 / position 0 outside"):
        attend(qkv, 2, 0, out)
    with pytest.raises(RuntimeError, match=r"qkv must be contiguous float32 \(1, 128\)"):
        attend(qkv[:, :-1], 0, 0, out)
    with pytest.raises(RuntimeError, match="kv_cache must be contiguous float32"):
        bind_decode_attention(rope, torch.zeros(2, 2, kv_heads, max_len, d).transpose(3, 4))
    with pytest.raises(RuntimeError, match="rope must be contiguous float32 \\(max_len=9"):
        bind_decode_attention(rope, torch.zeros(2, 2, kv_heads, max_len + 1, d))
