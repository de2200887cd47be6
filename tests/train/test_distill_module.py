"""DistillationLanguageModel in online mode under a real Lightning Trainer with the real SmolLM2 teacher."""

import lightning as L
import pytest

from qat.data.datamodule import TextDataModule
from qat.errors import TeacherError
from qat.nn.config import ArchConfig, QuantConfig
from qat.teachers import TeacherConfig
from qat.train.distill_module import DistillationLanguageModel, DistillConfig
from qat.train.schedule import OptimConfig

pytestmark = pytest.mark.slow

ARCH = dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=True)


def _fit(distill: DistillConfig, tokenizer: str = "smollm2", steps: int = 3):
    dm = TextDataModule(tokenizer=tokenizer, seq_len=32, batch_size=2, max_train_blocks=4, max_val_blocks=2)
    model = DistillationLanguageModel(arch=ArchConfig(**ARCH), quant=QuantConfig(weight="onebit", activation="none"),
                                      optim=OptimConfig(schedule="constant", lr=1e-3, warmup_steps=1),
                                      tokenizer_dir=str(dm.tokenizer_path), teacher=TeacherConfig(), distill=distill)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    return model, trainer


def test_online_distillation_trains_a_binary_student_with_a_frozen_unsaved_teacher():
    model, trainer = _fit(DistillConfig(mode="online", temperature=2.0, gt_weight=0.5))
    assert trainer.global_step == 3
    assert {"train/kd_loss", "train/gt_loss", "train/loss"} <= set(trainer.callback_metrics)
    (teacher,) = model._teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith(("model.", "distill_loss")) for k in model.state_dict())
    expected = 0.5 * trainer.callback_metrics["train/kd_loss"] + 0.5 * trainer.callback_metrics["train/gt_loss"]
    assert trainer.callback_metrics["train/loss"] == pytest.approx(float(expected), rel=1e-5)


def test_online_teacher_with_another_tokenizer_is_refused_before_training():
    with pytest.raises(TeacherError, match="data.tokenizer"):
        _fit(DistillConfig(mode="online"), tokenizer="bpe")
