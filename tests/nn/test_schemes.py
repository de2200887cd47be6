"""The scheme registry: every registered scheme trains, quantizes and (where it has a packed layout) packs through
the shared ``QuantizedLinear`` protocol, and a new scheme needs nothing but its registry entry and its layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import ExportError, RecipeError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.fbi_linear import FBILinear
from qat.nn.packed_linear import PackedLinear, pack_model
from qat.nn.quantized import QuantizedLinear, quantized_layers
from qat.nn.schemes import SCHEMES, Scheme, get_scheme, register_scheme
from qat.train.monitor import QATHealthMonitor

ARCH = ArchConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
PROJECTIONS = {f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def _settings(scheme: Scheme):
    """Every (granularity, activation) pair the scheme supports (groups of 32 divide every width of ARCH)."""
    return [(g, a) for g in scheme.granularities for a in scheme.activations]


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_builds_its_layers_with_codes_in_its_levels(name):
    scheme = get_scheme(name)
    for granularity, activation in _settings(scheme):
        torch.manual_seed(0)
        quant = QuantConfig(weight=name, granularity=granularity, group_size=32, activation=activation)
        model = convert_to_qat(build_model(ARCH), quant)
        layers = quantized_layers(model)
        assert set(layers) == PROJECTIONS
        assert all(type(m) is scheme.layer_class and m.scheme is scheme for m in layers.values())
        assert type(model.lm_head) is nn.Linear
        for layer in layers.values():
            codes, scale = layer.quantized_weight()
            assert codes.shape == layer.weight.shape
            assert set(codes.unique().tolist()) <= set(scheme.levels), (granularity, activation)
            assert (scale > 0).all()
        ids = torch.randint(0, ARCH.vocab_size, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers.values())


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_ternary_schemes_use_zero_and_weight_fn_schemes_match_their_function(name):
    scheme = get_scheme(name)
    layer = scheme.layer_class.from_linear(nn.Linear(64, 32), QuantConfig(weight=name,
                                                                          activation=scheme.activations[-1]))
    with torch.no_grad():  # past the init range: LSQ's code -2^(b-1) lies beyond max|W| / alpha at init
        layer.weight.mul_(1.5)
    codes, scale = layer.quantized_weight()
    # A random Gaussian weight hits every level: a scheme whose codes miss a level has wrong levels.
    assert set(codes.unique().tolist()) == set(scheme.levels)
    if scheme.weight_fn is not None:
        ref_codes, ref_scale = scheme.weight_fn(layer.weight, "tensor", 128)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@pytest.mark.kernels
@pytest.mark.parametrize("name", sorted(n for n, s in SCHEMES.items() if s.packed_layout))
def test_packed_layers_equal_the_layers_no_grad_forward(name):
    scheme = get_scheme(name)
    for granularity, activation in _settings(scheme):
        torch.manual_seed(1)
        quant = QuantConfig(weight=name, granularity=granularity, group_size=32, activation=activation)
        model = convert_to_qat(build_model(ARCH), quant).eval()
        packed_model = pack_model(model)
        x = torch.randn(3, 5, ARCH.hidden_size)
        for layer_name, layer in quantized_layers(model).items():
            packed = packed_model.get_submodule(layer_name)
            assert isinstance(packed, PackedLinear) and packed.bits == (2 if 0 in scheme.levels else 1)
            xi = x if layer.in_features == ARCH.hidden_size else torch.randn(3, 5, layer.in_features)
            with torch.no_grad():
                torch.testing.assert_close(packed(xi), layer(xi), rtol=1e-5, atol=1e-5,
                                           msg=f"{layer_name} {granularity} {activation}")


@pytest.mark.parametrize("name", sorted(n for n, s in SCHEMES.items() if not s.packed_layout))
def test_schemes_without_a_packed_layout_are_refused_by_name(name):
    scheme = get_scheme(name)
    model = convert_to_qat(build_model(ARCH), QuantConfig(weight=name, activation=scheme.activations[0]))
    with pytest.raises(ExportError, match=rf"cannot pack a layer quantized by '{name}'.*--format "
                                          rf"{scheme.default_export}"):
        pack_model(model)


def test_scheme_record_facts():
    assert get_scheme("absmean_ternary").bits == 1.58 and get_scheme("fbi_binary").bits == 1.0
    assert get_scheme("absmean_ternary").default_export == "hf"
    assert get_scheme("onebit").default_export == "binary"
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(get_scheme("onebit"))
    with pytest.raises(RecipeError, match="unknown quantization scheme 'nope'.*model.quant.weight"):
        get_scheme("nope")


def test_a_layer_refuses_a_scheme_of_another_layer_class_and_defaults_to_its_own():
    with pytest.raises(RecipeError, match="BitLinear cannot train scheme 'fbi_binary': its layer is FBILinear"):
        BitLinear(8, 8, quant=QuantConfig(weight="fbi_binary", activation="none"))
    with pytest.raises(RecipeError, match="FBILinear cannot train scheme 'absmean_ternary'"):
        FBILinear(8, 8, quant=QuantConfig(activation="none"))
    assert FBILinear(8, 4).quant == QuantConfig(weight="fbi_binary", activation="none")
    assert BitLinear(8, 4).quant == QuantConfig()


def test_layers_recheck_a_config_changed_after_it_was_built():
    quant = QuantConfig(weight="fbi_binary", activation="none")
    quant.activation = "int8_per_token"
    with pytest.raises(RecipeError, match="activation: none"):
        FBILinear(8, 8, quant=quant)


class RoundedLinear(QuantizedLinear):
    """A new scheme's layer, written only against the protocol: codes round(W / 0.1) in [-2, 2], scale 0.1."""

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.full((1, 1), 0.1, dtype=self.weight.dtype)
        return (self.weight / scale).round().clamp(-2, 2), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = self.quantized_weight()
        return F.linear(x, self.weight + (codes * scale - self.weight).detach(), self.bias)


@pytest.fixture
def rounded_scheme():
    scheme = register_scheme(Scheme("test_rounded_int3", (-2, -1, 0, 1, 2), RoundedLinear, None, None, ("hf-fp",),
                                    activations=("none",), granularities=("tensor",)))
    yield scheme
    del SCHEMES[scheme.name]


def test_adding_a_scheme_needs_only_its_entry_and_its_layer(rounded_scheme):
    quant = QuantConfig(weight="test_rounded_int3", activation="none")       # recipes accept the name
    model = convert_to_qat(build_model(ARCH), quant)                          # surgery builds its layer
    assert all(type(m) is RoundedLinear for m in quantized_layers(model).values())
    metrics = QATHealthMonitor().health_metrics(model)                        # the monitor sees it
    assert set(metrics) >= {f"qat/{p.rsplit('.', 1)[-1]}/zero_frac" for p in PROJECTIONS}
    assert metrics["qat/q_proj/scale_mean"] == pytest.approx(0.1)
    with pytest.raises(ExportError, match="'test_rounded_int3'.*--format hf-fp"):  # packing refuses it by name
        pack_model(model)
    with pytest.raises(RecipeError, match="model.quant.activation='int8_per_token'.*'test_rounded_int3'"):
        QuantConfig(weight="test_rounded_int3")
