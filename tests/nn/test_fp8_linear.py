import numpy as np
import pytest
import torch
from torch import nn

from qat.errors import RecipeError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.fp8_linear import FP8Config, FP8Linear, convert_to_fp8, fp8_layers
from tests.references.fp8_reference import mx_exponent, round_to_fp8

TINY = ArchConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)


def _ref_fake_quant(x: np.ndarray, fmt: str, fp8_max: float) -> np.ndarray:
    """float64 current scaling: round(x * s) / s with s = fp8_max / amax (s in fp32, as TE)."""
    scale = np.float64(np.float32(fp8_max) / np.float32(np.abs(x).max()))
    return round_to_fp8(x * scale, fmt) / scale


def _layer(recipe="current", fmt="hybrid", bias=True, **kw) -> FP8Linear:
    torch.manual_seed(0)
    return FP8Linear.from_linear(nn.Linear(96, 40, bias=bias), FP8Config(recipe=recipe, format=fmt, **kw))


def _data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 96, generator=gen) * 5
    grad = torch.randn(3, 17, 40, generator=gen) * 1e-3
    return x, grad


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_current_scaling_forward_and_backward_match_float64_reference(fmt):
    layer = _layer("current", fmt)
    x, grad = _data()
    x.requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    x64, w64 = x.detach().double().reshape(-1, 96).numpy(), layer.weight.detach().double().numpy()
    xq, wq = _ref_fake_quant(x64, "e4m3", 448.0), _ref_fake_quant(w64, "e4m3", 448.0)
    y_ref = xq @ wq.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(y.detach().reshape(-1, 40).double().numpy(), y_ref, rtol=1e-5, atol=1e-5)
    g64 = grad.double().reshape(-1, 40).numpy()
    gq = _ref_fake_quant(g64, "e5m2", 57344.0) if fmt == "hybrid" else _ref_fake_quant(g64, "e4m3", 448.0)
    np.testing.assert_allclose(x.grad.reshape(-1, 96).double().numpy(), gq @ wq, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(layer.weight.grad.double().numpy(), gq.T @ xq, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(layer.bias.grad.double().numpy(), g64.sum(0), rtol=1e-5)  # unquantized
    # The gradient really went through FP8: it differs from the full-precision gradient.
    assert not np.allclose(x.grad.reshape(-1, 96).double().numpy(), g64 @ wq, rtol=1e-4, atol=0)


def test_hybrid_and_e4m3_gradients_differ():
    grads = []
    for fmt in ("hybrid", "e4m3"):
        layer = _layer("current", fmt)
        x, grad = _data()
        x.requires_grad_(True)
        layer(x).backward(grad)
        grads.append(x.grad)
    assert not torch.equal(grads[0], grads[1])


def test_delayed_scaling_state_follows_history_and_is_saved():
    layer = _layer("delayed", amax_history_len=2)
    amaxes_x, amaxes_g = [], []
    scales_used = []
    for step in range(4):
        x, grad = _data(seed=10 + step)
        x = x * (step + 1)
        scales_used.append(layer.fp8_scale.clone())
        layer(x).backward(grad)
        amaxes_x.append(float(x.abs().max()))
        amaxes_g.append(float(grad.abs().max()))
    w_amax = float(layer.weight.detach().abs().max())
    # Step t casts with the scale from the amaxes of steps t-2, t-1 (history of 2); step 0 with the initial 1.
    assert scales_used[0].tolist() == [1.0, 1.0, 1.0]
    for t in range(1, 4):
        window = amaxes_x[max(0, t - 2):t]
        assert float(scales_used[t][0]) == pytest.approx(448.0 / max(window), rel=1e-6)
        assert float(scales_used[t][1]) == pytest.approx(448.0 / w_amax, rel=1e-6)
        assert float(scales_used[t][2]) == pytest.approx(57344.0 / max(amaxes_g[max(0, t - 2):t]), rel=1e-6)
    state = layer.state_dict()
    assert {"fp8_amax_history", "fp8_scale"} <= set(state)
    assert state["fp8_amax_history"].shape == (2, 3)
    fresh = _layer("delayed", amax_history_len=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.fp8_scale, layer.fp8_scale)
    assert torch.equal(fresh.fp8_amax_history, layer.fp8_amax_history)


def test_evaluation_uses_but_does_not_update_the_state():
    layer = _layer("delayed", amax_history_len=4)
    x, grad = _data()
    layer(x).backward(grad)
    before = (layer.fp8_scale.clone(), layer.fp8_amax_history.clone())
    layer.eval()
    with torch.no_grad():
        layer(x * 100)
    assert torch.equal(layer.fp8_scale, before[0]) and torch.equal(layer.fp8_amax_history, before[1])


def _mx_ref(a: np.ndarray, fmt: str = "e4m3", axis: int = -1) -> np.ndarray:
    """float64 MX round trip in blocks of 32 along ``axis`` (zero-padded), from the OCP shared exponent."""
    a = np.moveaxis(a, axis, -1)
    n = a.shape[-1]
    padded = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, (-n) % 32)])
    blocks = padded.reshape(*padded.shape[:-1], -1, 32)
    emax = {"e4m3": 8, "e5m2": 15}[fmt]
    exps = np.apply_along_axis(lambda b: mx_exponent(b, emax), -1, blocks)[..., None]
    out = (round_to_fp8(blocks / np.exp2(exps), fmt) * np.exp2(exps)).reshape(padded.shape)[..., :n]
    return np.moveaxis(out, -1, axis)


def test_mxfp8_forward_and_backward_match_block_reference():
    layer = _layer("mxfp8", bias=False)
    x, grad = _data()
    x.requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    x64, w64 = x.detach().double().reshape(-1, 96).numpy(), layer.weight.detach().double().numpy()
    g64 = grad.double().reshape(-1, 40).numpy()
    np.testing.assert_allclose(y.detach().reshape(-1, 40).double().numpy(), _mx_ref(x64) @ _mx_ref(w64).T,
                               rtol=1e-5, atol=1e-5)
    # dgrad reduces over out_features (40: one full block and a padded one), wgrad over the 51 tokens.
    np.testing.assert_allclose(x.grad.reshape(-1, 96).double().numpy(),
                               _mx_ref(g64, "e5m2") @ _mx_ref(w64, axis=0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(layer.weight.grad.double().numpy(),
                               _mx_ref(g64, "e5m2", axis=0).T @ _mx_ref(x64, axis=0), rtol=1e-5, atol=1e-9)


def test_mxfp8_backward_runs_and_is_close_to_full_precision():
    layer = _layer("mxfp8")
    ref = nn.Linear(96, 40)
    ref.load_state_dict(layer.to_linear().state_dict())
    x, grad = _data()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(xa).backward(grad)
    ref(xb).backward(grad)
    rel = (xa.grad - xb.grad).norm() / xb.grad.norm()
    assert 0 < rel < 0.1
    assert ((layer.weight.grad - ref.weight.grad).norm() / ref.weight.grad.norm()) < 0.1


@pytest.mark.parametrize("recipe", ["current", "delayed", "mxfp8"])
def test_stats_collection(recipe):
    layer = _layer(recipe)
    x, grad = _data()
    layer(x).backward(grad)  # delayed: scales now from this step's amaxes
    layer.fp8_stats = {}
    layer(x * 4).backward(grad)
    stats = layer.fp8_stats
    assert stats["input/amax"] == pytest.approx(float(x.abs().max() * 4))
    assert set(k.split("/")[0] for k in stats) == {"input", "weight", "grad_output"}
    if recipe == "delayed":  # the input grew 4x since the scale was set: its largest values saturate
        expected = float((x.abs() * 4 > x.abs().max()).float().mean())
        assert stats["input/saturated_frac"] == pytest.approx(expected, abs=1e-3) and expected > 0.1
        assert stats["input/scale"] == pytest.approx(448.0 / float(x.abs().max()), rel=1e-6)
    else:  # current and MX scales come from the tensor itself: nothing saturates except MX's top binade
        assert stats["input/saturated_frac"] < 0.01
    assert 0 <= stats["grad_output/underflow_frac"] < 0.01


def test_convert_fp_model_keeps_first_and_last_layers():
    model = build_model(TINY)
    names = convert_to_fp8(model, FP8Config())
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert type(model.lm_head) is nn.Linear
    assert all(type(m) is nn.Linear for m in model.model.layers[0].modules() if isinstance(m, nn.Linear))
    assert len(fp8_layers(model)) == 7  # q, k, v, o, gate, up, down of layer 1


def test_convert_never_touches_quantized_layers():
    model = convert_to_qat(build_model(TINY), QuantConfig())
    bitlinears = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    with pytest.raises(RecipeError, match="selects no linear layer"):
        convert_to_fp8(model, FP8Config())  # the only full-precision linear, lm_head, is kept by default
    names = convert_to_fp8(model, FP8Config(keep_high_precision=[]))
    assert names == ["lm_head"]
    assert {n for n, m in model.named_modules() if isinstance(m, BitLinear)} == bitlinears


@pytest.mark.parametrize("kwargs,match", [
    ({"recipe": "tensorwise"}, "model.fp8.recipe"),
    ({"format": "e5m2"}, "model.fp8.format"),
    ({"amax_history_len": 0}, "amax_history_len"),
    ({"margin": -1}, "margin"),
    ({"backend": "cuda"}, "backend"),
    ({"keep_high_precision": "lm_head"}, "list"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        FP8Config(**kwargs)


def test_options_of_another_recipe_are_an_error():
    cfg = FP8Config(recipe="current", margin=2)
    with pytest.raises(RecipeError, match="apply to recipe 'delayed' only"):
        convert_to_fp8(build_model(TINY), cfg)


def test_fp8_inputs_feeding_ternary_weights_are_an_exact_fp8_gemm():
    quant = QuantConfig(activation="none")
    model = convert_to_qat(build_model(TINY), quant)
    names = convert_to_fp8(model, FP8Config(quantized_layer_inputs=True))
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, BitLinear) and "model.layers.1.mlp.down_proj" in names
    assert "model.layers.0.mlp.down_proj" not in names  # first decoder layer kept in high precision
    x = (torch.randn(2, 9, 128) * 3).requires_grad_(True)
    y = layer(x)
    codes, scale = layer.quantized_weight()
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}  # ternary codes: exact in E4M3
    x64 = x.detach().double().reshape(-1, 128).numpy()
    w_eff = (codes.double() * scale.double()).detach().numpy()
    ref = _ref_fake_quant(x64, "e4m3", 448.0) @ w_eff.T
    np.testing.assert_allclose(y.detach().reshape(-1, 64).double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y.detach().reshape(-1, 64).double().numpy(), x64 @ w_eff.T, rtol=1e-4, atol=0)
    y.sum().backward()  # straight-through: d/dx of the FP8 cast is 1
    np.testing.assert_allclose(x.grad.reshape(-1, 128)[0].double().numpy(), w_eff.sum(0), rtol=1e-5, atol=1e-6)


def test_fp8_inputs_need_bitlinear_without_int8_activations():
    model = convert_to_qat(build_model(TINY), QuantConfig())
    with pytest.raises(RecipeError, match="activation: none"):
        convert_to_fp8(model, FP8Config(quantized_layer_inputs=True))
    with pytest.raises(RecipeError, match="emulated only"):
        convert_to_fp8(model, FP8Config(quantized_layer_inputs=True, backend="te"))
