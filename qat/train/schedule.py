"""Learning-rate and weight-decay schedules, as one ``LRScheduler`` that also drives weight decay.

BitNet b1.58 two-stage schedule (unilm FAQ): linear LR decay whose peak is cut at the midpoint
(``lr(t) = peak(t) * (1 - t / T)``, ``peak = lr`` then ``stage2_lr``), and weight decay ``weight_decay`` in stage 1,
``stage2_weight_decay`` (0) in stage 2 — large late weight decay flips ternary weights.
"""

import math
from dataclasses import dataclass, field
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


@dataclass
class OptimConfig:
    """AdamW and its schedule.

    Attributes:
        schedule: ``two_stage`` (BitNet), ``cosine``, ``linear`` or ``constant``, all after a linear warmup.
        lr: peak learning rate (stage 1 for ``two_stage``).
        stage2_lr: peak learning rate after the midpoint (``two_stage`` only).
        min_lr: floor of the learning rate.
        weight_decay: AdamW weight decay (stage 1 for ``two_stage``), applied to matrices only.
        stage2_weight_decay: weight decay after the midpoint (``two_stage`` only).
        midpoint: fraction of training where stage 2 starts.
    """

    schedule: Literal["two_stage", "cosine", "linear", "constant"] = "two_stage"
    lr: float = 1.5e-3
    stage2_lr: float = 1.0e-3
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.1
    stage2_weight_decay: float = 0.0
    midpoint: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


def lr_and_weight_decay(step: int, total_steps: int, cfg: OptimConfig) -> tuple[float, float]:
    """The (learning rate, weight decay) of optimizer step ``step`` out of ``total_steps``."""
    total = max(total_steps, 1)
    second_stage = cfg.schedule == "two_stage" and step >= cfg.midpoint * total
    wd = cfg.stage2_weight_decay if second_stage else cfg.weight_decay
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps, wd
    progress = min(step / total, 1.0)
    if cfg.schedule == "two_stage":
        lr = (cfg.stage2_lr if second_stage else cfg.lr) * (1.0 - progress)
    elif cfg.schedule == "linear":
        lr = cfg.lr * (1.0 - progress)
    elif cfg.schedule == "cosine":
        after_warmup = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(after_warmup, 1.0)))
    else:
        lr = cfg.lr
    return max(lr, cfg.min_lr), wd


class ScheduledLRAndWeightDecay(LRScheduler):
    """Sets each param group's ``lr`` and, for groups created with ``decay=True``, ``weight_decay``."""

    def __init__(self, optimizer: Optimizer, total_steps: int, cfg: OptimConfig, last_epoch: int = -1):
        self.total_steps, self.cfg = total_steps, cfg
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> dict:
        # The config is rebuilt from the recipe; keeping it out keeps checkpoints loadable with weights_only=True.
        return {k: v for k, v in super().state_dict().items() if k != "cfg"}

    def get_lr(self) -> list[float]:
        lr, wd = lr_and_weight_decay(self.last_epoch, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            if group.get("decay", False):
                group["weight_decay"] = wd
        return [lr for _ in self.optimizer.param_groups]
