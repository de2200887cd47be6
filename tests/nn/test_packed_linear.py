"""PackedLinear / pack_model: the packed model reproduces the QAT model (logits and greedy tokens)."""

import pytest
import torch
from torch import nn

from qat.errors import ExportError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.packed_linear import DenseLinear, PackedLinear, Q8_0Linear, pack_model
from qat.nn.schemes import SCHEMES, Scheme, register_scheme
from qat.quant.q8_0 import quantize_q8_0
from tests.references.packed_linear_reference import assert_q8_0_matches_reference

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("weight,granularity,group_size,bias,activation", [
    ("absmean_ternary", "tensor", 128, False, "int8_per_token"),
    ("absmean_ternary", "row", 128, True, "int8_per_token"),
    ("absmedian_ternary", "group", 256, False, "int8_per_token"),
    ("absmean_ternary", "group", 128, False, "int8_per_token"),   # groups off the kernel block: torch fallback
    ("absmean_ternary", "row", 128, False, "none"),
    ("absmean_binary", "tensor", 128, False, "int8_per_token"),
    ("absmean_binary", "row", 128, True, "int8_per_token"),
    ("absmean_binary", "group", 512, False, "int8_per_token"),   # groups on the binary kernel block
])
def test_packed_layer_equals_bitlinear(weight, granularity, group_size, bias, activation):
    torch.manual_seed(0)
    quant = QuantConfig(weight=weight, granularity=granularity, group_size=group_size, activation=activation)
    layer = BitLinear.from_linear(nn.Linear(1024, 77, bias=bias), quant)
    packed = PackedLinear.from_quantized(layer)
    assert packed.bits == (1 if weight.endswith("binary") else 2)
    x = torch.randn(2, 5, 1024)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    codes, _ = layer.quantized_weight()
    assert torch.equal(packed.codes(), codes.to(torch.int8))


@pytest.fixture
def int4_scheme():
    """A throwaway BitLinear scheme with 16 levels and no packed layout, removed from the registry afterwards."""
    scheme = register_scheme(Scheme("test_int4", tuple(range(-8, 8)), BitLinear,
                                    lambda w, g, s: (w.round().clamp(-8, 7), torch.ones(1, 1)), None, ("hf-fp",)))
    yield scheme
    del SCHEMES[scheme.name]


def test_unpackable_scheme_is_a_clear_error(int4_scheme):
    layer = BitLinear(16, 8, quant=QuantConfig(weight="test_int4"))
    with pytest.raises(ExportError, match="cannot pack a layer quantized by 'test_int4'.*--format hf-fp"):
        PackedLinear.from_quantized(layer)
    ternary = BitLinear(16, 16, quant=QuantConfig())
    model = nn.Sequential(ternary, layer)
    with pytest.raises(ExportError, match="'test_int4'"):
        pack_model(model, inplace=True)
    assert model[0] is ternary and model[1] is layer   # refused before anything was replaced
    with pytest.raises(ExportError, match="no quantized layer"):
        pack_model(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("norm_placement,family,weight", [("subln", "bitnet", "absmean_ternary"),
                                                          ("inlayer", "llama", "absmean_ternary"),
                                                          ("subln", "bitnet", "absmean_binary")])
def test_packed_model_logits_and_greedy_tokens_equal_qat_model(norm_placement, family, weight):
    torch.manual_seed(0)
    arch = ArchConfig(family=family, vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    qat_model = convert_to_qat(build_model(arch), QuantConfig(weight=weight, norm_placement=norm_placement)).eval()
    packed_model = pack_model(qat_model)
    assert not any(isinstance(m, BitLinear) for m in packed_model.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed_model.modules()) == 2 * 7
    assert isinstance(packed_model.lm_head, DenseLinear)        # the fp32 head on qat's one-token GEMV
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = qat_model(ids).logits, packed_model(ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(packed_model.generate(ids, **kwargs), qat_model.generate(ids, **kwargs))


def test_dense_head_keeps_tied_embeddings_tied():
    arch = ArchConfig(family="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    packed_model = pack_model(convert_to_qat(build_model(arch), QuantConfig()))
    assert isinstance(packed_model.lm_head, DenseLinear)
    assert packed_model.lm_head.weight is packed_model.model.embed_tokens.weight


def test_q8_0_head_computes_the_q8_0_formula_of_the_linear_layer():
    torch.manual_seed(0)
    linear = nn.Linear(200, 77)                                  # 200 inputs: a partial last block, padded
    head = Q8_0Linear.from_linear(linear)
    x = torch.randn(2, 3, 200)
    with torch.no_grad():
        y, want = head(x), linear(x)
    assert y.shape == (2, 3, 77)
    codes, d = quantize_q8_0(linear.weight.detach())
    assert_q8_0_matches_reference(y - linear.bias.detach(), x.reshape(6, 200), codes, d.half().float())
    # Weights within half a step plus the fp16 rounding of d (|code| <= 127 times 2^-11 d), logits close to fp32's.
    err = (head.dequantized_weight() - linear.weight.detach()).abs()
    assert (err <= (0.5 + 127 * 2**-11) * d.repeat_interleave(32, dim=1)[:, :200]).all()
    assert ((y - want).abs() <= 0.02 * (x.abs() @ linear.weight.detach().abs().T)).all()


def test_q8_0_head_of_a_tied_embedding_leaves_the_embedding_alone():
    arch = ArchConfig(family="bitnet", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    packed_model = pack_model(convert_to_qat(build_model(arch), QuantConfig()))
    before = packed_model.model.embed_tokens.weight.detach().clone()
    head = Q8_0Linear.from_linear(packed_model.lm_head)
    assert head.qweight.dtype == torch.int8 and head.qweight.shape == (300, 512)
    assert torch.equal(packed_model.model.embed_tokens.weight, before)
    assert packed_model.lm_head.weight is packed_model.model.embed_tokens.weight
