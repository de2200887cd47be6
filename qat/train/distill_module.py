"""``DistillationLanguageModel``: ``QATLanguageModel`` trained by autoregressive distillation from a frozen teacher.

The teacher is never part of the module's state (checkpoints hold only the student, so `qat export` / `qat eval`
treat them like any other run). Its logits come either from a forward pass in the training step (``online``) or
from the top-k cache built by ``qat cache-teacher`` (``cached``), looked up by the batch's block indices.
"""

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from qat.errors import RecipeError, TeacherError
from qat.nn.config import ArchConfig, QuantConfig
from qat.teachers.load import TeacherConfig, check_same_tokenizer, load_teacher, teacher_fingerprint
from qat.teachers.logit_cache import LogitCacheKey, TeacherLogitCache, open_logit_cache, tokenizer_sha256, tokens_sha256
from qat.train.distillation import AutoregressiveDistillationLoss
from qat.train.module import QATLanguageModel
from qat.train.schedule import OptimConfig

SELF_TEACHER = "self"


@dataclass
class DistillConfig:
    """How the teacher's distribution is used.

    Attributes:
        mode: ``cached`` (top-k logits precomputed by `qat cache-teacher`) or ``online`` (teacher forward in every
            training step).
        temperature: softmax temperature T of the distillation term (scaled by T²).
        gt_weight: weight of the ground-truth next-token CE (0 = pure distillation as FBI-LLM; 0.5 = its use_kd=2).
        top_k: teacher logits kept per position in cached mode (the teacher softmax is renormalised over them).
        cache_batch_size: blocks per teacher forward pass when building the cache.
    """

    mode: Literal["cached", "online"] = "cached"
    temperature: float = 1.0
    gt_weight: float = 0.0
    top_k: int = 32
    cache_batch_size: int = 8


def logit_cache_key(teacher: TeacherConfig, distill: DistillConfig, train_blocks: np.ndarray,
                    tokenizer_dir: Path | str) -> LogitCacheKey:
    """The key of the top-k cache for this teacher, training block stream and tokenizer."""
    if distill.top_k < 1:
        raise RecipeError(f"model.distill.top_k={distill.top_k} must be at least 1")
    return LogitCacheKey(tokens_sha256=tokens_sha256(train_blocks), num_blocks=int(train_blocks.shape[0]),
                         seq_len=int(train_blocks.shape[1]), teacher=teacher_fingerprint(teacher),
                         tokenizer_sha256=tokenizer_sha256(tokenizer_dir), top_k=distill.top_k)


class DistillationLanguageModel(QATLanguageModel):
    """A (quantized) student trained towards a frozen teacher: any ``quant`` works (binary, ternary, FP).

    Args:
        arch, quant, optim, tokenizer_dir, health_every_n_steps: as :class:`QATLanguageModel`.
        teacher: the teacher (``null``: no teacher, plain next-token CE, for an A/B twin of a distilled run).
        distill: temperature, ground-truth mix, online/cached and top-k.
    """

    def __init__(self, arch: ArchConfig = ArchConfig(), quant: Optional[QuantConfig] = QuantConfig(),
                 optim: OptimConfig = OptimConfig(), tokenizer_dir: Optional[str] = None,
                 health_every_n_steps: int = 50, teacher: Optional[TeacherConfig] = TeacherConfig(),
                 distill: DistillConfig = DistillConfig()):
        super().__init__(arch, quant, optim, tokenizer_dir, health_every_n_steps)
        teacher, distill = copy.deepcopy((teacher, distill))  # the defaults above are shared by every call
        if teacher is not None and teacher.source == SELF_TEACHER:
            # Self-distillation: the frozen full-precision original of the pretrained student.
            if not arch.pretrained:
                raise RecipeError("model.teacher.source: self distils from the pretrained original and needs "
                                  "model.arch.pretrained; set it or name another teacher")
            teacher.source = arch.pretrained
        self.hparams["teacher"] = asdict(teacher) if teacher else None
        self.hparams["distill"] = asdict(distill)
        self.teacher_cfg, self.distill_cfg = teacher, distill
        self.tokenizer_dir = tokenizer_dir
        self.distill_loss = AutoregressiveDistillationLoss(distill.temperature, distill.gt_weight)
        # Held in a tuple so the teacher is not a submodule: never in state_dict, optimizer or checkpoints.
        self._teacher: tuple = ()
        self.logit_cache: Optional[TeacherLogitCache] = None

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.teacher_cfg is None:
            return
        if self.tokenizer_dir is None:
            raise RecipeError("distillation needs the student's tokenizer (model.tokenizer_dir, linked by "
                              "`qat distill`)")
        if self.distill_cfg.mode == "online":
            teacher = load_teacher(self.teacher_cfg)
            check_same_tokenizer(self.tokenizer_dir, teacher.tokenizer_dir, teacher.name,
                                 getattr(teacher.model.config, "vocab_size", None))
            self._teacher = (teacher.model.to(self.device),)
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or "train" not in getattr(datamodule, "datasets", {}):
            raise RecipeError("cached distillation needs qat's TextDataModule (it yields the block indices)")
        key = logit_cache_key(self.teacher_cfg, self.distill_cfg, np.asarray(datamodule.datasets["train"].blocks),
                              self.tokenizer_dir)
        self.logit_cache = open_logit_cache(key)

    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        (teacher,) = self._teacher
        with torch.no_grad():
            return teacher(input_ids=input_ids).logits.float()

    def compute_loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.teacher_cfg is None:
            return super().compute_loss(batch, logits)
        if self.logit_cache is not None:
            if "block_index" not in batch:
                raise TeacherError("cached distillation needs batch['block_index'] from qat's TextDataModule")
            values, indices = self.logit_cache.lookup(batch["block_index"])
            loss, parts = self.distill_loss(logits, batch["input_ids"],
                                            teacher_topk=(values.to(logits.device), indices.to(logits.device)))
        else:
            loss, parts = self.distill_loss(logits, batch["input_ids"],
                                            teacher_logits=self.teacher_logits(batch["input_ids"]))
        return loss, parts
