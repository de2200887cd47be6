import torch

from qat.nn.bitlinear import BitLinear
from qat.nn.config import QuantConfig
from qat.quant import absmean_ternary, dequantize, straight_through


def test_straight_through_gradient_is_identity():
    w = torch.randn(32, 48, requires_grad=True)
    codes, scale = absmean_ternary(w)
    upstream = torch.randn(32, 48)
    straight_through(w, dequantize(codes, scale, "tensor")).backward(upstream)
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)


def test_bitlinear_gradients_equal_those_of_the_dequantized_linear():
    layer = BitLinear(48, 32, quant=QuantConfig()).double()
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 32, dtype=torch.float64)
    layer(x).backward(upstream)
    with torch.no_grad():
        codes, scale = layer.quantized_weight()
        w_q = codes * scale
        x_codes = (x * 127 / x.abs().amax(-1, keepdim=True)).round()
        x_q = x_codes / (127 / x.abs().amax(-1, keepdim=True))
    # STE: dL/dW = upstream^T x_q, dL/dx = upstream W_q (identity through both quantizers).
    torch.testing.assert_close(layer.weight.grad, upstream.T @ x_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, upstream @ w_q, rtol=1e-12, atol=1e-12)
