"""The LR / weight-decay schedules against tables written from their formulas (BitNet b1.58 FAQ for ``two_stage``),
read off a real AdamW driven by ``ScheduledLRAndWeightDecay`` the way ``QATModule.configure_optimizers`` sets it up."""

import io
import math

import pytest
import torch

from qat.train.schedule import OptimConfig, ScheduledLRAndWeightDecay

TOTAL = 10

# two_stage, 10 steps, warmup 2, lr 1e-3 -> stage2_lr 5e-4, weight decay 0.1 -> 0 at the midpoint (step 5).
# Warmup: lr * (t + 1) / warmup. Then lr(t) = peak * (1 - t / T) with peak = lr before the midpoint and
# stage2_lr from it on.
TWO_STAGE_TABLE = [
    # step, lr, weight decay
    (0, 0.5e-3, 0.1),
    (1, 1.0e-3, 0.1),
    (2, 0.8e-3, 0.1),
    (3, 0.7e-3, 0.1),
    (4, 0.6e-3, 0.1),
    (5, 2.5e-4, 0.0),
    (6, 2.0e-4, 0.0),
    (7, 1.5e-4, 0.0),
    (8, 1.0e-4, 0.0),
    (9, 0.5e-4, 0.0),
]


def _optimizer(weight_decay: float) -> torch.optim.AdamW:
    matrix, gain = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.ones(3))
    return torch.optim.AdamW([{"params": [matrix], "weight_decay": weight_decay, "decay": True},
                              {"params": [gain], "weight_decay": 0.0, "decay": False}], lr=123.0)


def _run(cfg: OptimConfig, steps: int = TOTAL, scheduler=None, optimizer=None
         ) -> list[tuple[float, float, float, float]]:
    """(lr of both groups, weight decay of both groups) in effect at each optimizer step."""
    optimizer = optimizer or _optimizer(cfg.weight_decay)
    scheduler = scheduler or ScheduledLRAndWeightDecay(optimizer, TOTAL, cfg)
    seen = []
    for _ in range(steps):
        decay, no_decay = optimizer.param_groups
        seen.append((decay["lr"], no_decay["lr"], decay["weight_decay"], no_decay["weight_decay"]))
        for group in optimizer.param_groups:
            group["params"][0].grad = torch.ones_like(group["params"][0])
        optimizer.step()
        scheduler.step()
    return seen


def test_two_stage_schedule_matches_the_bitnet_table():
    cfg = OptimConfig(schedule="two_stage", lr=1e-3, stage2_lr=5e-4, warmup_steps=2, weight_decay=0.1,
                      stage2_weight_decay=0.0, midpoint=0.5)
    seen = _run(cfg)
    for (step, lr, wd), (lr_decay, lr_no_decay, wd_decay, wd_no_decay) in zip(TWO_STAGE_TABLE, seen, strict=True):
        assert lr_decay == pytest.approx(lr, rel=1e-12), step
        assert lr_no_decay == pytest.approx(lr, rel=1e-12), step
        assert wd_decay == pytest.approx(wd, abs=1e-15), step
        assert wd_no_decay == 0.0, step   # norms and biases are never decayed, in either stage


def test_two_stage_resumes_from_a_weights_only_state_dict():
    """A scheduler restored from a checkpoint (loaded with weights_only=True) continues the same table."""
    cfg = OptimConfig(schedule="two_stage", lr=1e-3, stage2_lr=5e-4, warmup_steps=2)
    optimizer = _optimizer(cfg.weight_decay)
    scheduler = ScheduledLRAndWeightDecay(optimizer, TOTAL, cfg)
    _run(cfg, steps=4, scheduler=scheduler, optimizer=optimizer)
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    # Lightning's order: configure_optimizers builds both, then the checkpoint restores optimizer and scheduler.
    resumed_optimizer = _optimizer(cfg.weight_decay)
    resumed = ScheduledLRAndWeightDecay(resumed_optimizer, TOTAL, cfg)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    seen = _run(cfg, steps=6, scheduler=resumed, optimizer=resumed_optimizer)
    for (step, lr, wd), (lr_decay, _, wd_decay, _) in zip(TWO_STAGE_TABLE[4:], seen, strict=True):
        assert lr_decay == pytest.approx(lr, rel=1e-12), step
        assert wd_decay == pytest.approx(wd, abs=1e-15), step


def test_linear_and_constant_schedules_after_warmup():
    # linear: lr * (1 - t / T) after the same warmup, never below min_lr.
    cfg = OptimConfig(schedule="linear", lr=1e-3, warmup_steps=2, min_lr=2.5e-4, weight_decay=0.05)
    expected_linear = [0.5e-3, 1.0e-3, 0.8e-3, 0.7e-3, 0.6e-3, 0.5e-3, 0.4e-3, 0.3e-3, 2.5e-4, 2.5e-4]
    seen = _run(cfg)
    assert [s[0] for s in seen] == pytest.approx(expected_linear, rel=1e-12)
    assert all(s[2] == 0.05 for s in seen)   # one weight decay throughout: only two_stage switches it

    cfg = OptimConfig(schedule="constant", lr=1e-3, warmup_steps=2)
    expected_constant = [0.5e-3] + [1e-3] * 9
    assert [s[0] for s in _run(cfg)] == pytest.approx(expected_constant, rel=1e-12)


def test_cosine_schedule_decays_from_lr_to_min_lr_after_warmup():
    # min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (t - warmup) / (T - warmup))) for t >= warmup.
    lr, min_lr, warmup = 1e-3, 1e-4, 2
    cfg = OptimConfig(schedule="cosine", lr=lr, min_lr=min_lr, warmup_steps=warmup)
    expected = [lr * 1 / 2, lr] + [min_lr + (lr - min_lr) / 2 * (1 + math.cos(math.pi * (t - 2) / 8))
                                   for t in range(2, TOTAL)]
    seen = [s[0] for s in _run(cfg)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[2] == pytest.approx(lr) and seen[6] == pytest.approx((lr + min_lr) / 2)   # peak, half-way
