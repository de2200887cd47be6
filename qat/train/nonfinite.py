"""Stop (or skip the step) when training produces a NaN/Inf loss or gradient norm.

Without this a diverged run goes on to its last step, exits 0, rotates its last finite checkpoint away and export
publishes NaN weights. The checks sit where the step can still be refused: the loss before ``backward``, the
gradients before the optimizer step.
"""

import math
from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from qat.errors import TrainingError


def gradient_norm(parameters) -> float:
    """The 2-norm of all gradients together (``nan``/``inf`` when any gradient is non-finite); 0 without any."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


class NonFiniteGuard(Callback):
    """``stop``: raise ``TrainingError`` at the first non-finite loss or gradient norm, before the optimizer step
    (so neither the weights nor any checkpoint ever hold the result). ``skip``: drop that step's gradients so the
    optimizer leaves weights and moments untouched, count it, and stop after ``max_consecutive_skips`` in a row.

    With DeepSpeed the gradients live in ZeRO's partitions (``p.grad`` is empty), so only the loss is checked and
    a non-finite loss always stops.
    """

    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 10):
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self._loss_bad = False

    def _stop(self, trainer, what: str) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        raise TrainingError(f"{what} at global step {trainer.global_step} (learning rate {lr:.3g}): training "
                            "diverged. Lower model.optim.lr (or raise warmup_steps / set gradient_clip_val), or set "
                            "run.on_nonfinite: skip; the checkpoints keep the last finite weights")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not math.isfinite(float(loss.detach()))
        # Every rank must take the same branch (a lone rank raising or skipping would hang the collectives).
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._loss_bad = self._loss_bad or bad  # any micro-batch of an accumulated step
        if bad and (self.on_nonfinite == "stop" or isinstance(trainer.strategy, DeepSpeedStrategy)):
            self._stop(trainer, f"the loss is {float(loss.detach())}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = gradient_norm(pl_module.parameters())
        loss_bad, self._loss_bad = self._loss_bad, False
        # DDP all-reduced the gradients already, so every rank sees the same norm.
        if not loss_bad and math.isfinite(norm):
            self.consecutive_skips = 0
            return
        what = "the loss is not finite" if loss_bad else f"the gradient norm is {norm}"
        if self.on_nonfinite == "stop":
            self._stop(trainer, what)
        self.consecutive_skips += 1
        self.skipped_steps += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            self._stop(trainer, f"{what} for {self.consecutive_skips} steps in a row "
                                f"(run.max_consecutive_skips={self.max_consecutive_skips})")
        rank_zero_warn(f"qat: {what} at global step {trainer.global_step}: optimizer step skipped "
                       f"({self.skipped_steps} skipped so far)")
        # A parameter without a gradient is left alone by torch optimizers: weights, moments and step count.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive_skips = state_dict.get("consecutive_skips", 0)
