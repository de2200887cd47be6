"""The AD loss against a hand-written float64 computation (explicit loops over positions and the vocabulary)."""

import math

import numpy as np
import pytest
import torch

from qat.errors import RecipeError
from qat.train.distillation import AutoregressiveDistillationLoss


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _reference_loss(s, t, ids, temperature, gt_weight, k=None):
    """float64: mean over positions 0..L-2 of -T² Σ p log q (p = teacher softmax, top-k renormalised) mixed with
    the next-token CE."""
    kd, gt, n = 0.0, 0.0, 0
    for b in range(s.shape[0]):
        for pos in range(s.shape[1] - 1):
            q = _softmax(s[b, pos] / temperature)
            tz = t[b, pos]
            if k is None:
                p = _softmax(tz / temperature)
            else:
                keep = np.argsort(-tz)[:k]
                p = np.zeros_like(tz)
                p[keep] = _softmax(tz[keep] / temperature)
            kd += -sum(p[v] * math.log(q[v]) for v in range(len(p)) if p[v] > 0)
            gt += -math.log(_softmax(s[b, pos])[ids[b, pos + 1]])
            n += 1
    return (1 - gt_weight) * temperature ** 2 * kd / n + gt_weight * gt / n


@pytest.mark.parametrize("temperature,gt_weight", [(1.0, 0.0), (2.0, 0.0), (1.5, 0.3), (0.7, 1.0)])
def test_online_loss_matches_hand_computed_ce(temperature, gt_weight):
    rng = np.random.default_rng(int(temperature * 10 + gt_weight * 100))
    s, t = rng.normal(size=(2, 5, 11)) * 2, rng.normal(size=(2, 5, 11)) * 3
    ids = rng.integers(0, 11, size=(2, 5))
    loss_fn = AutoregressiveDistillationLoss(temperature, gt_weight)
    loss, parts = loss_fn(torch.tensor(s), torch.tensor(ids), teacher_logits=torch.tensor(t))
    assert loss.item() == pytest.approx(_reference_loss(s, t, ids, temperature, gt_weight), rel=1e-5)
    assert set(parts) == {"kd_loss", "gt_loss"}


def test_topk_loss_matches_hand_computed_renormalised_ce_and_equals_online_at_full_k():
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(2, 6, 13)), rng.normal(size=(2, 6, 13)) * 4
    ids = rng.integers(0, 13, size=(2, 6))
    loss_fn = AutoregressiveDistillationLoss(temperature=2.0, gt_weight=0.25)
    for k in (1, 4, 13):
        values, indices = torch.tensor(t).topk(k, dim=-1)
        loss, _ = loss_fn(torch.tensor(s), torch.tensor(ids), teacher_topk=(values, indices))
        assert loss.item() == pytest.approx(_reference_loss(s, t, ids, 2.0, 0.25, k=k), rel=1e-5)
    online, _ = loss_fn(torch.tensor(s), torch.tensor(ids), teacher_logits=torch.tensor(t))
    assert loss.item() == pytest.approx(online.item(), rel=1e-6)  # the loss is computed in fp32


def test_distillation_gradient_vanishes_when_student_equals_teacher():
    z = torch.randn(1, 4, 9, dtype=torch.float64, requires_grad=True)
    loss, _ = AutoregressiveDistillationLoss(temperature=3.0)(z, torch.zeros(1, 4, dtype=torch.long),
                                                               teacher_logits=z.detach().clone())
    loss.backward()
    assert z.grad.abs().max() < 1e-6  # fp32 softmaxes


def test_bad_settings_are_recipe_errors():
    with pytest.raises(RecipeError, match="temperature"):
        AutoregressiveDistillationLoss(temperature=0)
    with pytest.raises(RecipeError, match="gt_weight"):
        AutoregressiveDistillationLoss(gt_weight=1.5)
