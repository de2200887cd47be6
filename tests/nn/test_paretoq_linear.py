"""``ParetoQLinear``: ParetoQ's alpha init, codes * scale forward, learnable alpha, int8 activations option, and the
model-level protocol (surgery, health monitor) through the scheme registry."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.paretoq_linear import ParetoQLinear
from qat.nn.quantized import quantized_layers
from qat.nn.schemes import get_scheme
from qat.quant.activation import absmax_int8_per_token
from qat.train.monitor import QATHealthMonitor

NAMES = ["paretoq_1bit", "paretoq_ternary", "paretoq_2bit", "paretoq_3bit", "paretoq_4bit"]


def layer_of(name, granularity="row", activation="none", group_size=16, seed=0, shape=(24, 64)):
    torch.manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    return ParetoQLinear.from_linear(linear, QuantConfig(weight=name, granularity=granularity, group_size=group_size,
                                                         activation=activation))


@pytest.mark.parametrize("granularity", ["row", "group", "tensor"])
def test_alpha_init_follows_paretoq(granularity):
    w = layer_of("paretoq_1bit", granularity).weight.detach()
    groups = {"row": w.reshape(24, 1, 64), "group": w.reshape(24, 4, 16), "tensor": w.reshape(1, 1, -1)}[granularity]
    expected = {"paretoq_1bit": groups.abs().mean(-1), "paretoq_ternary": groups.abs().amax(-1),
                "paretoq_2bit": groups.abs().amax(-1), "paretoq_3bit": groups.abs().amax(-1) / 3,
                "paretoq_4bit": groups.abs().amax(-1) / 7}
    for name, alpha in expected.items():
        layer = layer_of(name, granularity)
        torch.testing.assert_close(layer.alpha_2d(), alpha)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("granularity", ["row", "group"])
def test_forward_is_codes_times_scale_and_alpha_learns(name, granularity):
    layer = layer_of(name, granularity)
    codes, scale = layer.quantized_weight()
    assert set(codes.unique().long().tolist()) <= set(get_scheme(name).levels)
    assert scale.shape == ((24, 1) if granularity == "row" else (24, 4, 1))
    weight = (codes.reshape(24, -1, scale.shape[1] if granularity == "row" else 16)
              * scale.reshape(24, -1, 1)).reshape(24, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=0, atol=0)
    layer(x).pow(2).sum().backward()
    assert layer.alpha.grad is not None and layer.alpha.grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0


def test_ternary_and_two_bit_scales_are_fractions_of_alpha():
    for name, m in (("paretoq_ternary", 1.5), ("paretoq_2bit", 4.0), ("paretoq_4bit", 1.0)):
        layer = layer_of(name)
        _, scale = layer.quantized_weight()
        torch.testing.assert_close(scale, layer.alpha_2d() / m)


def test_int8_activations_quantize_the_input_per_token():
    layer = layer_of("paretoq_4bit", activation="int8_per_token")
    x = torch.randn(2, 5, 64)
    codes, scale = absmax_int8_per_token(x)
    codes_w, scale_w = layer.quantized_weight()
    torch.testing.assert_close(layer(x), F.linear(codes / scale, codes_w * scale_w))
    assert not torch.allclose(layer(x), layer_of("paretoq_4bit")(x))


def test_alpha_is_a_1d_parameter_so_weight_decay_skips_it():
    # QATLanguageModel decays parameters with ndim >= 2 only; a decayed alpha would shrink every scale.
    assert layer_of("paretoq_4bit", "group").alpha.ndim == 1


def test_group_size_must_divide_in_features():
    with pytest.raises(RecipeError, match="group_size=48 does not divide in_features=64"):
        layer_of("paretoq_4bit", "group", group_size=48)


@pytest.mark.parametrize("name", ["paretoq_ternary", "paretoq_4bit"])
def test_a_hundred_steps_fit_another_linear_map(name):
    """Latent weight (STE) and alpha (LSQ) together learn a random target map from an unrelated init."""
    torch.manual_seed(0)
    target = nn.Linear(64, 24, bias=False)
    layer = ParetoQLinear.from_linear(nn.Linear(64, 24, bias=False), QuantConfig(weight=name, granularity="row",
                                                                                 activation="none"))
    x = torch.randn(512, 64)
    y = target(x).detach()
    before = F.mse_loss(layer(x), y).item()
    alpha0 = layer.alpha.detach().clone()
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
    assert F.mse_loss(layer(x), y).item() < 0.25 * before
    assert not torch.equal(alpha0, layer.alpha.detach())


def test_model_surgery_and_health_metrics_through_the_registry():
    arch = ArchConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = convert_to_qat(build_model(arch), QuantConfig(weight="paretoq_ternary", granularity="row",
                                                          activation="none"))
    layers = quantized_layers(model)
    assert len(layers) == 7 and all(isinstance(m, ParetoQLinear) for m in layers.values())
    metrics = QATHealthMonitor().health_metrics(model)
    assert 0 < metrics["qat/q_proj/zero_frac"] < 1
    q = layers["model.layers.0.self_attn.q_proj"]
    assert metrics["qat/q_proj/scale_mean"] == pytest.approx((q.alpha * 2 / 3).mean().item(), rel=1e-6)
