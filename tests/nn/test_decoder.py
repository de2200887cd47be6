"""``PackedDecoder`` against the packed HF model it reads: equal logits (prefill, then step by step), equal tokens;
its RMSNorm and RoPE against HF's modules."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm, apply_rotary_pos_emb

from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.decoder import (
    DecoderError,
    PackedDecoder,
    attention_qkv,
    fuse_packed_linears,
    rms_floor,
    rms_norm,
    rope_table,
)
from qat.nn.packed_linear import Q8_0Linear, pack_model
from qat.quant.q8_0 import quantize_q8_0
from tests.references.packed_linear_reference import assert_q8_0_matches_reference

pytestmark = pytest.mark.kernels


def packed_bitnet(weight: str, kv_heads: int = 2, seed: int = 0, hidden_act: str | None = None):
    """Tiny random BitNet (GQA: 4 query heads over ``kv_heads``; FFN activation HF's default relu², or
    ``hidden_act``), QAT-converted and packed."""
    torch.manual_seed(seed)
    arch = ArchConfig(family="bitnet", vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, hidden_act=hidden_act)
    return pack_model(convert_to_qat(build_model(arch), QuantConfig(weight=weight)).eval(), inplace=True)


def assert_logits_match(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to fp32 rounding. The decoder's norms and attention round differently from HF's modules (in the last
    bit), and where an int8 activation code lands at a rounding boundary that moves it by one step: then the logits
    move by up to ~5e-3 in these tiny models (4 of 80 random ones; the others agree to ~3e-7), as between an fp32 HF
    export and its QAT model (qat/eval/agreement.py). A wiring error moves them by O(max |logit|)."""
    assert got.shape == want.shape
    tolerance = 1e-2 * max(1.0, float(want.abs().max()))
    assert (got - want).abs().max() <= tolerance
    top2 = want.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * tolerance
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.parametrize("weight", ["absmean_ternary", "absmean_binary"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_logits_equal_the_packed_hf_models(weight, kv_heads):
    model = packed_bitnet(weight, kv_heads)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    decoder = PackedDecoder(model)
    decoder.reset(12)
    got = torch.cat([decoder.forward(ids[:, :5])] + [decoder.forward(ids[:, i:i + 1]) for i in range(5, 12)], dim=1)
    assert_logits_match(got, want)


@pytest.mark.parametrize("hidden_act", [None, "silu", "gelu"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_equal_the_packed_hf_models_fed_in_chunks(kv_heads, hidden_act):
    """Prompts of several positions after cached ones (the masked attention path), single steps between them; GQA
    down to one kv head, and FFN activations: relu² and the llama.cpp recipe's SiLU (computed in the up/gate call's
    epilogue) and GELU (applied by the decoder after the call)."""
    model = packed_bitnet("absmean_ternary", kv_heads, hidden_act=hidden_act)
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    decoder = PackedDecoder(model)
    decoder.reset(16)
    got, start = [], 0
    for tokens in (4, 3, 1, 2, 1, 3):
        got.append(decoder.forward(ids[:, start:start + tokens]))
        start += tokens
    assert_logits_match(torch.cat(got, dim=1), want)


def test_logits_equal_the_packed_hf_models_on_the_torch_kernel_path(monkeypatch):
    monkeypatch.setenv("QAT_KERNEL_PATH", "torch")
    model = packed_bitnet("absmean_ternary", hidden_act="silu")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids).logits
    decoder = PackedDecoder(model)
    decoder.reset(8)
    got = torch.cat([decoder.forward(ids[:, :5])] + [decoder.forward(ids[:, i:i + 1]) for i in (5, 6, 7)], dim=1)
    assert_logits_match(got, want)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_rms_norm_is_hf_bitnet_rms_norm(scale):
    """The decoder's 3-op RMSNorm against HF's module on fresh inputs: equal to fp32 rounding (each within a few
    ulps of the float64 value, as HF's own)."""
    n, eps = 96, 1e-6
    norm = BitNetRMSNorm(n, eps).requires_grad_(False)
    norm.weight.copy_(torch.randn(n))
    x = torch.randn(7, n) * scale
    x_and_floor = torch.cat((x, torch.full((7, 1), rms_floor(n, eps))), dim=-1)
    got = rms_norm(x_and_floor[:, :n], x_and_floor, norm.weight * math.sqrt(n))
    x64 = x.double()
    exact = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    hf = norm(x)
    row_max = exact.abs().amax(-1, keepdim=True)
    assert ((got.double() - exact).abs() <= 1e-6 * row_max).all()
    assert ((hf.double() - exact).abs() <= 1e-6 * row_max).all()
    torch.testing.assert_close(got, hf, rtol=2e-6, atol=2e-6 * float(row_max.max()))


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_rotated_q_and_k_are_hf_rope_in_pair_order(kv_heads):
    """``attention_qkv``'s output rotated by ``rope_table`` is HF's ``apply_rotary_pos_emb`` of the model's own
    q_proj / k_proj outputs (cos/sin from its rotary module), with each head's dims in pair order (i, i + d/2) and q
    scaled by 1 / sqrt(head_dim); v is v_proj's output unchanged."""
    model = packed_bitnet("absmean_ternary", kv_heads)
    heads, head_dim, tokens = 4, 16, 6
    attn, rotary = model.model.layers[1].self_attn, model.model.rotary_emb
    x, positions = torch.randn(tokens, 64), torch.arange(3, 3 + tokens)
    with torch.no_grad():
        cos, sin = rotary(x, positions[None])
        q = attn.q_proj(x).view(tokens, heads, head_dim).transpose(0, 1)[None]
        k = attn.k_proj(x).view(tokens, kv_heads, head_dim).transpose(0, 1)[None]
        want_q, want_k = (t[0].transpose(0, 1) for t in apply_rotary_pos_emb(q, k, cos, sin))   # (T, heads, D)
        out = attention_qkv(attn, heads, kv_heads, head_dim)(x)
    rotated = torch.view_as_complex(out[:, :(heads + kv_heads) * head_dim].reshape(tokens, -1, head_dim // 2, 2))
    rotated = rotated * rope_table(rotary.inv_freq, rotary.attention_scaling, 3 + tokens)[positions]
    # pair order (x0, x_{d/2}, x1, x_{d/2+1}, ...) back to HF's (x0, x1, ..., x_{d/2}, ...)
    rotated = torch.view_as_real(rotated).transpose(-1, -2).reshape(tokens, heads + kv_heads, head_dim)
    torch.testing.assert_close(rotated[:, :heads] * math.sqrt(head_dim), want_q, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rotated[:, heads:], want_k, rtol=1e-6, atol=1e-5)
    assert torch.equal(out[:, (heads + kv_heads) * head_dim:], attn.v_proj(x))


@pytest.mark.parametrize("weight", ["absmean_ternary", "absmean_binary"])
def test_greedy_tokens_equal_hf_generate(weight):
    model = packed_bitnet(weight)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(PackedDecoder(model).generate(prompt, 10, eos_token_id=[]), want)


def test_sequence_logits_are_the_packed_models_logits_of_a_batch():
    model = packed_bitnet("absmean_ternary", hidden_act="silu")
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids).logits
    assert_logits_match(PackedDecoder(model).sequence_logits(ids), want)


def test_last_only_logits_are_the_last_position_of_the_full_logits():
    model = packed_bitnet("absmean_ternary")
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(5))
    decoder = PackedDecoder(model)
    decoder.reset(8)
    full = decoder.forward(ids)
    decoder.reset(8)
    last = decoder.forward(ids, last_only=True)
    assert last.shape == (1, 1, 97) and decoder.length == 7
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)


def test_generate_stops_after_an_eos_token():
    model = packed_bitnet("absmean_ternary")
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    free = PackedDecoder(model).generate(prompt, 10, eos_token_id=[])
    eos = int(free[0, 6 + 3])                     # the 4th new token
    first = int((free[0, 6:] == eos).nonzero()[0])  # it may also come earlier
    stopped = PackedDecoder(model).generate(prompt, 10, eos_token_id=eos)
    assert torch.equal(stopped, free[:, :6 + first + 1])


def test_fused_layers_are_bit_identical_to_separate_ones():
    model = packed_bitnet("absmean_ternary")
    attn = model.model.layers[0].self_attn
    fused = fuse_packed_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    x = torch.randn(3, 64)
    assert torch.equal(fused(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1))


def test_unpacked_or_inlayer_models_are_a_clear_error():
    torch.manual_seed(0)
    arch = ArchConfig(family="bitnet", vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    qat_model = convert_to_qat(build_model(arch), QuantConfig()).eval()
    with pytest.raises(DecoderError, match="pack the model with qat.nn.packed_linear.pack_model"):
        PackedDecoder(qat_model)
    inlayer = pack_model(convert_to_qat(copy.deepcopy(build_model(arch)), QuantConfig(norm_placement="inlayer")))
    with pytest.raises(DecoderError, match="no in-layer norm"):
        PackedDecoder(inlayer)
    bf16 = packed_bitnet("absmean_ternary").to(torch.bfloat16)
    with pytest.raises(DecoderError, match="computes in float32"):
        PackedDecoder(bf16)


def test_cache_overflow_is_a_clear_error():
    decoder = PackedDecoder(packed_bitnet("absmean_ternary"))
    decoder.reset(4)
    decoder.forward(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(DecoderError, match="exceeds the cache of 4"):
        decoder.forward(torch.zeros(1, 2, dtype=torch.long))


def test_int8_head_logits_are_the_q8_0_head_of_the_final_hidden_states():
    """The int8-head decoder's logits: the Q8_0 formula (float64 reference) applied to the hidden states the fp32-head
    decoder feeds its head, and close to the fp32 head's logits."""
    model = packed_bitnet("absmean_ternary")
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    fp32, int8 = PackedDecoder(model), PackedDecoder(model, int8_head=True)
    assert isinstance(int8.lm_head, Q8_0Linear) and int8.lm_head is not model.lm_head
    hidden_states = PackedDecoder(model)
    hidden_states.lm_head = nn.Identity()                      # forward then returns the normed final hidden states
    logits = {}
    for name, decoder in (("fp32", fp32), ("int8", int8), ("hidden", hidden_states)):
        decoder.reset(9)
        logits[name] = torch.cat([decoder.forward(ids[:, :6])] + [decoder.forward(ids[:, i:i + 1]) for i in (6, 7, 8)],
                                 dim=1)[0]
    weight = model.lm_head.weight.detach()
    codes, d = quantize_q8_0(weight)
    assert_q8_0_matches_reference(logits["int8"], logits["hidden"], codes, d.half().float())
    assert ((logits["int8"] - logits["fp32"]).abs() <= 0.02 * (logits["hidden"].abs() @ weight.abs().T)).all()
    out = int8.generate(ids, 5, eos_token_id=[])
    assert out.shape == (1, 14) and torch.equal(out[:, :9], ids)


def test_int8_head_needs_a_linear_head():
    model = packed_bitnet("absmean_ternary")
    model.lm_head = nn.Sequential(model.lm_head)
    with pytest.raises(DecoderError, match="int8_head quantizes a full-precision linear lm_head"):
        PackedDecoder(model, int8_head=True)
