"""Autoregressive distillation (FBI-LLM, arXiv 2407.07093): at every position the student's next-token distribution
is trained towards the teacher's, optionally mixed with the ground-truth next-token cross-entropy.

Per position t (predicting token t+1) with temperature T:

    kd_t = T² · CE(softmax(z_teacher,t / T), softmax(z_student,t / T)) = -T² Σ_v p_t(v) log q_t(v)
    loss = (1 - gt_weight) · mean_t kd_t + gt_weight · mean_t -log q_t(x_{t+1}) (at T = 1)

T² keeps the gradient scale independent of T (Hinton et al. 2015). CE and KL(p‖q) differ by the teacher entropy, a
constant, so their gradients match; CE is what FBI-LLM optimises (``use_kd=1``: gt_weight 0; ``use_kd=2``: 0.5).
With cached top-k teacher logits, p is the teacher softmax renormalised over its k largest logits (the rest get
probability 0) and q is still the student's full softmax. Works for any student (binary, ternary, n-bit, FP).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import RecipeError
from qat.train.module import next_token_nll


def soft_target_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              temperature: float = 1.0) -> torch.Tensor:
    """Per-position ``-Σ_v softmax(teacher/T) · log_softmax(student/T)`` (fp32), shape = logits.shape[:-1]."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(p * log_q).sum(dim=-1)


def topk_soft_target_cross_entropy(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                                   teacher_indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Like :func:`soft_target_cross_entropy` with the teacher known only on its top-k logits: its softmax is
    renormalised over those k tokens. ``teacher_values``/``teacher_indices``: (..., k)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_values.float() / temperature, dim=-1)
    return -(p * log_q.gather(-1, teacher_indices.long())).sum(dim=-1)


class AutoregressiveDistillationLoss(nn.Module):
    """``(1 - gt_weight) · T² · soft CE(teacher → student) + gt_weight · CE(labels)``, averaged over positions
    0..L-2 of each block (position t predicts token t+1, as in :func:`qat.train.module.next_token_nll`).

    Args:
        temperature: T > 0 of both softmaxes in the distillation term.
        gt_weight: weight in [0, 1] of the ground-truth cross-entropy (0 = pure distillation, FBI-LLM).

    Example usage::

        loss_fn = AutoregressiveDistillationLoss(temperature=2.0, gt_weight=0.5)
        loss, parts = loss_fn(student_logits, input_ids, teacher_logits=teacher_logits)
        loss, parts = loss_fn(student_logits, input_ids, teacher_topk=(values, indices))  # cached top-k
    """

    def __init__(self, temperature: float = 1.0, gt_weight: float = 0.0):
        super().__init__()
        if not temperature > 0:
            raise RecipeError(f"model.distill.temperature={temperature} must be > 0")
        if not 0.0 <= gt_weight <= 1.0:
            raise RecipeError(f"model.distill.gt_weight={gt_weight} must be in [0, 1] (0 = distillation only)")
        self.temperature, self.gt_weight = float(temperature), float(gt_weight)

    def forward(self, student_logits: torch.Tensor, input_ids: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None,
                teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss and its parts (``kd_loss``, ``gt_loss``, detached) for logging."""
        if (teacher_logits is None) == (teacher_topk is None):
            raise ValueError("pass exactly one of teacher_logits (online) or teacher_topk (cached)")
        student = student_logits[:, :-1]
        if teacher_logits is not None:
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                                 f"{tuple(student_logits.shape)}: teacher and student must share the vocabulary")
            kd = soft_target_cross_entropy(student, teacher_logits[:, :-1], self.temperature)
        else:
            values, indices = teacher_topk
            kd = topk_soft_target_cross_entropy(student, values[:, :-1], indices[:, :-1], self.temperature)
        kd = self.temperature ** 2 * kd.mean()
        gt = next_token_nll(student_logits, input_ids)
        loss = (1.0 - self.gt_weight) * kd + self.gt_weight * gt
        return loss, {"kd_loss": kd.detach(), "gt_loss": gt.detach()}
