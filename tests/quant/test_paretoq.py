"""ParetoQ quantizers against float64 references written from the formulas (levels, clamping, per-row and
per-group scales), and their gradients against torch autograd of those references (round as identity, LSQ's
gradient scale applied with the paper's ``alpha * g + (alpha - alpha * g).detach()`` trick)."""

import math

import pytest
import torch

from qat.quant.paretoq import PARETOQ_GRIDS, paretoq_codes, paretoq_init_alpha, paretoq_quantize

EXPECTED_LEVELS = {"1bit": {-1.0, 1.0}, "ternary": {-2 / 3, 0.0, 2 / 3}, "2bit": {-0.75, -0.25, 0.25, 0.75},
                   "3bit": set(map(float, range(-4, 4))), "4bit": set(map(float, range(-8, 8)))}
EXPECTED_CODES = {"1bit": {-1, 1}, "ternary": {-1, 0, 1}, "2bit": {-3, -1, 1, 3}, "3bit": set(range(-4, 4)),
                  "4bit": set(range(-8, 8))}


def round_ste(x):
    return x + (torch.round(x) - x).detach()


def reference(w: torch.Tensor, alpha: torch.Tensor, name: str) -> torch.Tensor:
    """float64 ParetoQ from the formulas; ``alpha`` (out, G); gradients by autograd with round's STE."""
    out, groups = alpha.shape
    qp = {"3bit": 3, "4bit": 7}.get(name, 1)
    g = 1.0 / math.sqrt(w.numel() * qp)
    a = (alpha * g + (alpha - alpha * g).detach()).unsqueeze(-1)    # LSQ gradient scale
    x = w.reshape(out, groups, -1) / a
    if name == "1bit":
        # sign(W) * alpha: sign does not depend on alpha; W gets the STE clipped to |x| <= 1 (ParetoQ).
        q = torch.where(w.reshape(x.shape) >= 0, 1.0, -1.0).double() * a
        inside = x.detach().abs() <= 1
        q = q + torch.where(inside, w.reshape(x.shape) - w.reshape(x.shape).detach(), 0.0)
    elif name in ("ternary", "2bit"):
        n, s = (1.5, 0.0) if name == "ternary" else (2.0, 0.5)
        q = (round_ste(x.clamp(-0.99, 0.99) * n - s) + s) / n * a
    else:
        b = int(name[0])
        q = round_ste(x.clamp(-(2 ** (b - 1)), 2 ** (b - 1) - 1)) * a
    return q.reshape(w.shape)


def random_case(out=6, inp=256, groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    # Scales from small to large, so that some weights fall outside every clamp range and some inside.
    alpha = torch.rand(out, groups, generator=gen, dtype=torch.float64) * 1.5 + 0.1
    return w, alpha


@pytest.mark.parametrize("name", list(PARETOQ_GRIDS))
@pytest.mark.parametrize("groups", [1, 4])
def test_forward_matches_float64_formula_and_levels(name, groups):
    w, alpha = random_case(groups=groups)
    got = paretoq_quantize(w, alpha, PARETOQ_GRIDS[name])
    want = reference(w, alpha, name)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    levels = (got.reshape(6, groups, -1) / alpha.unsqueeze(-1)).flatten()
    assert {round(v, 9) for v in levels.tolist()} == {round(v, 9) for v in EXPECTED_LEVELS[name]}


@pytest.mark.parametrize("name", list(PARETOQ_GRIDS))
@pytest.mark.parametrize("groups", [1, 4])
def test_codes_times_scale_is_the_forward_and_codes_are_integers(name, groups):
    w, alpha = random_case(groups=groups, seed=1)
    codes, scale = paretoq_codes(w, alpha, PARETOQ_GRIDS[name])
    assert set(codes.unique().long().tolist()) == EXPECTED_CODES[name]
    assert scale.shape == ((6, 1) if groups == 1 else (6, groups, 1))
    effective = (codes.reshape(6, groups, -1) * scale.reshape(6, groups, 1)).reshape(w.shape)
    assert torch.equal(effective, paretoq_quantize(w, alpha, PARETOQ_GRIDS[name]))


def test_seq_clamps_below_one_so_the_largest_weight_stays_on_the_grid():
    # alpha = max|W| puts the largest weight at x = 1, where clamp(., -1, 1) would round to 2 / 1.5 (not a level).
    w = torch.tensor([[1.0, -1.0, 0.2, 0.5]], dtype=torch.float64)
    alpha = torch.ones(1, 1, dtype=torch.float64)
    assert paretoq_quantize(w, alpha, PARETOQ_GRIDS["ternary"]).tolist() == [[2 / 3, -2 / 3, 0.0, 2 / 3]]
    assert paretoq_quantize(w, alpha, PARETOQ_GRIDS["2bit"]).tolist() == [[0.75, -0.75, 0.25, 0.25]]


def test_lsq_clamps_to_the_signed_range():
    w = torch.tensor([[100.0, -100.0, 7.4, -8.6]], dtype=torch.float64)
    out = paretoq_quantize(w, torch.ones(1, 1, dtype=torch.float64), PARETOQ_GRIDS["4bit"])
    assert out.tolist() == [[7.0, -8.0, 7.0, -8.0]]


def test_sign_of_zero_is_plus_one():
    w = torch.tensor([[0.0, -0.0, -1.0, 2.0]])
    codes, _ = paretoq_codes(w, torch.ones(1, 1), PARETOQ_GRIDS["1bit"])
    assert codes.tolist() == [[1.0, 1.0, -1.0, 1.0]]


@pytest.mark.parametrize("name", list(PARETOQ_GRIDS))
@pytest.mark.parametrize("groups", [1, 4])
def test_gradients_match_autograd_of_the_float64_formula(name, groups):
    w, alpha = random_case(out=5, inp=64, groups=groups, seed=2)
    upstream = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w1, a1 = w.clone().requires_grad_(), alpha.clone().requires_grad_()
    (paretoq_quantize(w1, a1, PARETOQ_GRIDS[name]) * upstream).sum().backward()
    w2, a2 = w.clone().requires_grad_(), alpha.clone().requires_grad_()
    (reference(w2, a2, name) * upstream).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)
    # The case covers both sides of the clamp range: W's gradient is the upstream one inside, 0 outside.
    assert bool((w1.grad == 0).any()) and bool((w1.grad == upstream).any())


def test_alpha_gradient_outside_the_clamp_range_is_the_boundary_level():
    # One weight far outside: d(level * alpha)/d alpha = boundary level, times 1 / sqrt(numel * Qp).
    w = torch.tensor([[50.0, -50.0]], dtype=torch.float64)
    for name, boundary in {"ternary": 2 / 3, "2bit": 0.75, "3bit": 3.0, "4bit": 7.0}.items():
        alpha = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
        (paretoq_quantize(w, alpha, PARETOQ_GRIDS[name])[0, 0]).backward()
        qp = {"3bit": 3, "4bit": 7}.get(name, 1)
        assert alpha.grad.item() == pytest.approx(boundary / math.sqrt(2 * qp), rel=1e-12), name


def test_init_alpha_per_row_and_group():
    w = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(paretoq_init_alpha(w, PARETOQ_GRIDS["1bit"]), w.abs().mean(1, keepdim=True))
    torch.testing.assert_close(paretoq_init_alpha(w, PARETOQ_GRIDS["ternary"]), w.abs().amax(1, keepdim=True))
    torch.testing.assert_close(paretoq_init_alpha(w, PARETOQ_GRIDS["3bit"], groups=2),
                               w.abs().reshape(4, 2, 8).amax(-1) / 3)
    torch.testing.assert_close(paretoq_init_alpha(w, PARETOQ_GRIDS["4bit"]), w.abs().amax(1, keepdim=True) / 7)


def test_bad_alpha_shape_is_refused():
    with pytest.raises(ValueError, match="alpha must be"):
        paretoq_quantize(torch.randn(4, 10), torch.ones(4, 3), PARETOQ_GRIDS["4bit"])
