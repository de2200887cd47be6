"""The non-finite guard in real Lightning training loops (a one-parameter model, so the expected weights are exact),
and the refusal to save or export non-finite weights."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from qat.checkpoint.io import AtomicCheckpointIO
from qat.checkpoint.trained import load_trained_model
from qat.errors import CheckpointError, TrainingError
from qat.nn.config import ArchConfig
from qat.train.module import QATLanguageModel
from qat.train.nonfinite import NonFiniteGuard


class OneWeight(L.LightningModule):
    """loss = (w * x)^2 with SGD lr 0.1: a batch x = nan gives a NaN loss; x = 0 with ``grad_inf`` gives a finite
    loss (0) whose gradient is not finite."""

    def __init__(self, grad_inf_at: tuple = ()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.grad_inf_at = grad_inf_at
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(float(self.w.detach()))
        x = batch[0]
        if batch_idx in self.grad_inf_at:
            return torch.sqrt((self.w - self.w.detach()).abs()).sum()  # value 0, d/dw = inf * 0 = nan
        return ((self.w * x) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, xs, guard):
    loader = DataLoader(torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 1), batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=len(xs), callbacks=[guard], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


def test_stop_raises_before_the_step_naming_it_and_the_fix():
    module = OneWeight()
    with pytest.raises(TrainingError, match=r"the loss is nan at global step 2 .*Lower model\.optim\.lr"):
        _fit(module, [1.0, 1.0, float("nan"), 1.0], NonFiniteGuard("stop"))
    assert torch.isfinite(module.w).all()


def test_stop_also_catches_a_non_finite_gradient_with_a_finite_loss():
    module = OneWeight(grad_inf_at=(1,))
    with pytest.raises(TrainingError, match="gradient norm is nan at global step 1"):
        _fit(module, [1.0, 1.0, 1.0], NonFiniteGuard("stop"))
    assert torch.isfinite(module.w).all()


def test_skip_leaves_the_weights_untouched_and_counts():
    module, guard = OneWeight(grad_inf_at=(3,)), NonFiniteGuard("skip", max_consecutive_skips=3)
    _fit(module, [1.0, float("nan"), 1.0, 1.0, 1.0], guard)
    # w <- w - 0.1 * 2 w x^2 = 0.8 w per good step; steps 1 (NaN loss) and 3 (NaN gradient) change nothing.
    assert module.seen == pytest.approx([1.0, 0.8, 0.8, 0.64, 0.64])
    assert float(module.w.detach()) == pytest.approx(0.512)
    assert guard.skipped_steps == 2 and guard.consecutive_skips == 0


def test_skip_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard("skip", max_consecutive_skips=2)
    with pytest.raises(TrainingError, match="2 steps in a row"):
        _fit(OneWeight(), [1.0, float("nan"), float("nan"), 1.0], guard)


def _tiny_model() -> QATLanguageModel:
    return QATLanguageModel(arch=ArchConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def test_a_checkpoint_with_non_finite_weights_is_never_saved():
    model = _tiny_model()
    model.on_save_checkpoint({"global_step": 7, "state_dict": model.state_dict()})  # finite: fine
    with torch.no_grad():
        model.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="global step 7: 1 weight tensors hold NaN/Inf .*down_proj"):
        model.on_save_checkpoint({"global_step": 7, "state_dict": model.state_dict()})


def test_export_refuses_a_checkpoint_with_nan_weights(tmp_path):
    model = _tiny_model()
    checkpoint = {"global_step": 3, "hyper_parameters": dict(model.hparams),
                  "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "good.ckpt")
    assert load_trained_model(str(tmp_path / "good.ckpt")).global_step == 3
    checkpoint["state_dict"]["model.model.layers.0.self_attn.q_proj.weight"][1, 1] = float("nan")
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "nan.ckpt")  # checksum matches: only NaN is wrong
    with pytest.raises(CheckpointError, match=r"nan\.ckpt: 1 weight tensors hold NaN/Inf .*q_proj"):
        load_trained_model(str(tmp_path / "nan.ckpt"))


def test_skip_with_gradient_accumulation_drops_the_whole_step():
    module, guard = OneWeight(), NonFiniteGuard("skip")
    loader = DataLoader(torch.tensor([1.0, float("nan"), 1.0, 1.0]).reshape(-1, 1, 1), batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, callbacks=[guard], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    # Step 0 (x = 1, nan) is skipped; step 1 (x = 1, 1; Lightning halves each loss) applies w -= 0.1 * 2 * w.
    assert guard.skipped_steps == 1 and float(module.w.detach()) == pytest.approx(0.8)
