import pytest
import torch
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.fbi_linear import FBILinear, OneBitLinear, binary_layers


def _quant(weight: str) -> QuantConfig:
    return QuantConfig(weight=weight, activation="none")


@pytest.mark.parametrize("cls,weight,scales", [(FBILinear, "fbi_binary", ("alpha", "beta")),
                                               (OneBitLinear, "onebit", ("g", "h"))])
def test_scales_and_latent_weight_receive_gradients(cls, weight, scales):
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(16, 8, bias=False), _quant(weight))
    x = torch.randn(3, 16)
    y = layer(x)
    y.square().sum().backward()
    # Independent float64 reference of L = sum(y^2), y = x @ W_b^T, with the identity STE through sign(W).
    w, xd = layer.weight.detach().double(), x.double()
    s = torch.where(w >= 0, 1.0, -1.0).double()
    p = {name: getattr(layer, name).detach().double() for name in scales}
    if cls is FBILinear:   # W_b = alpha * S + beta (column-wise)
        wb = p["alpha"] * s + p["beta"]
    else:                  # W_b = g[:, None] * S * h[None, :]
        wb = p["g"][:, None] * s * p["h"][None, :]
    yd = xd @ wb.T
    assert torch.allclose(y.double(), yd, rtol=1e-5, atol=1e-6)
    d_wb = 2 * yd.T @ xd   # dL/dW_b, shape (out, in)
    if cls is FBILinear:
        expected = {"weight": d_wb * p["alpha"], "alpha": (d_wb * s).sum(0), "beta": d_wb.sum(0)}
    else:
        expected = {"weight": d_wb * p["g"][:, None] * p["h"][None, :],
                    "g": (d_wb * s * p["h"][None, :]).sum(1), "h": (d_wb * s * p["g"][:, None]).sum(0)}
    for name, ref in expected.items():
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad.double(), ref, rtol=1e-4, atol=1e-5), name


def test_fbi_layer_starts_from_the_paper_init_and_uses_two_values_per_column():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    layer = FBILinear.from_linear(linear, _quant("fbi_binary"))
    w = linear.weight.detach()
    assert torch.allclose(layer.beta, w.mean(0))
    assert torch.allclose(layer.alpha, (w - w.mean(0)).abs().mean(0))
    wb = layer.binary_weight().detach()
    assert all(len(wb[:, j].unique()) <= 2 for j in range(64))


def test_convert_to_qat_selects_binary_layers_and_keeps_lm_head_full_precision():
    model = build_model(ArchConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    convert_to_qat(model, _quant("fbi_binary"))
    layers = binary_layers(model)
    assert len(layers) == 7 and all(isinstance(m, FBILinear) for m in layers.values())
    assert type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 64, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.alpha.grad is not None and m.beta.grad is not None for m in layers.values())


def test_binary_layers_refuse_int8_activations_with_a_fix():
    with pytest.raises(RecipeError, match="activation: none"):
        FBILinear.from_linear(nn.Linear(8, 8), QuantConfig(weight="fbi_binary"))
