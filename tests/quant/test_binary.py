"""Binary numerics against float64 references written from the papers' formulas (numpy, no torch autograd)."""

import numpy as np
import pytest
import torch

from qat.quant.binary import (
    binary_sign,
    fbi_binary_weight,
    fbi_init_scales,
    onebit_init_scales,
    onebit_weight,
    sign_ste,
)


def test_binary_sign_is_plus_minus_one_with_zero_mapped_to_plus():
    w = torch.tensor([[-2.0, -0.0, 0.0, 1e-9, -1e-9]])
    assert binary_sign(w).tolist() == [[-1.0, 1.0, 1.0, 1.0, -1.0]]


def test_sign_ste_gradient_is_identity():
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    (sign_ste(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_fbi_init_matches_column_statistics():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 9)) * rng.uniform(0.1, 2, size=(1, 9)) + rng.normal(size=(1, 9))
    alpha, beta = fbi_init_scales(torch.from_numpy(w))
    for j in range(9):  # per input column, over the output rows
        col = w[:, j]
        assert beta[j].item() == pytest.approx(col.sum() / len(col), rel=1e-12)
        assert alpha[j].item() == pytest.approx(np.abs(col - col.mean()).mean(), rel=1e-12)


def test_onebit_init_is_the_rank1_approximation_of_abs_w():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 10))
    g, h = onebit_init_scales(torch.from_numpy(w))
    u, s, vt = np.linalg.svd(np.abs(w))
    best = s[0] * np.outer(u[:, 0], vt[0])  # Eckart-Young: the best rank-1 approximation of |W|
    np.testing.assert_allclose(np.outer(g.numpy(), h.numpy()), best, rtol=1e-5, atol=1e-6)
    assert (g >= 0).all() and (h >= 0).all()


@pytest.mark.parametrize("kind", ["fbi", "onebit"])
def test_binary_linear_forward_and_gradients_match_float64_reference(kind):
    rng = np.random.default_rng(2)
    out_f, in_f, n = 6, 11, 4
    w, x, gy = rng.normal(size=(out_f, in_f)), rng.normal(size=(n, in_f)), rng.normal(size=(n, out_f))
    a, b = rng.uniform(0.2, 1.5, size=in_f), rng.normal(size=in_f)
    s = np.where(w >= 0, 1.0, -1.0)
    if kind == "fbi":
        # FBI-LLM: W_b[i, j] = alpha[j] * sign(W[i, j]) + beta[j]
        wb = a[None, :] * s + b[None, :]
    else:
        # OneBit: W_b[i, j] = g[i] * sign(W[i, j]) * h[j]
        g, h = rng.uniform(0.2, 1.5, size=out_f), np.abs(b)
        wb = g[:, None] * s * h[None, :]
    y_ref = x @ wb.T
    gwb = gy.T @ x                     # dL/dW_b for L = sum(gy * y)
    if kind == "fbi":
        grads_ref = {"w": gwb * a[None, :], "p": (gwb * s).sum(0), "q": gwb.sum(0)}   # identity STE through sign
    else:
        grads_ref = {"w": gwb * g[:, None] * h[None, :], "p": (gwb * s * h[None, :]).sum(1),
                     "q": (gwb * s * g[:, None]).sum(0)}

    tw = torch.tensor(w, requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    if kind == "fbi":
        tp, tq = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        weight = fbi_binary_weight(tw, tp, tq)
    else:
        tp, tq = torch.tensor(g, requires_grad=True), torch.tensor(h, requires_grad=True)
        weight = onebit_weight(tw, tp, tq)
    y = torch.nn.functional.linear(tx, weight)
    (y * torch.from_numpy(gy)).sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tw.grad.numpy(), grads_ref["w"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tp.grad.numpy(), grads_ref["p"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tq.grad.numpy(), grads_ref["q"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tx.grad.numpy(), gy @ wb, rtol=1e-12, atol=1e-12)


def _bitnet_binary_ref(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet (arXiv 2310.11453, unilm FAQ ``sign(w - mean) * mean|w|``) in float64: codes, scale of one group."""
    w = w.astype(np.float64)
    return np.where(w - w.mean() >= 0, 1.0, -1.0), max(float(np.abs(w).mean()), 1e-5)


@pytest.mark.parametrize("granularity,group_size", [("tensor", 128), ("row", 128), ("group", 32)])
def test_absmean_binary_matches_float64_formula(granularity, group_size):
    from qat.quant import absmean_binary

    w = torch.randn(9, 96, generator=torch.Generator().manual_seed(5)) * 0.03 + 0.01
    codes, scale = absmean_binary(w, granularity, group_size)
    spans = {"tensor": [(slice(None), slice(None))],
             "row": [(r, slice(None)) for r in range(9)],
             "group": [(r, slice(g, g + group_size)) for r in range(9) for g in range(0, 96, group_size)]}[granularity]
    flat_scales = scale.reshape(-1)
    assert flat_scales.numel() == len(spans)
    for i, span in enumerate(spans):
        ref_codes, ref_scale = _bitnet_binary_ref(w[span].numpy())
        np.testing.assert_array_equal(codes[span].numpy(), ref_codes)
        assert flat_scales[i].item() == pytest.approx(ref_scale, rel=1e-6)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
