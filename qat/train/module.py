"""``QATLanguageModel``: the LightningModule that trains a (quantized) causal LM. Training math only lives in
the layers and loss functions it composes; this class wires model, loss, optimizer and schedule."""

import copy
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F

from qat.checkpoint.integrity import non_finite_tensors
from qat.data.tokenizer import load_tokenizer
from qat.errors import CheckpointError
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, check_pretrained_tokenizer, convert_to_qat
from qat.train.fp8 import FP8Config, fp8_autocast, prepare_fp8, swap_to_te
from qat.train.fp8_monitor import FP8HealthMonitor
from qat.train.monitor import QATHealthMonitor, TokenThroughputMonitor
from qat.train.pretrained_baselines import PretrainedBaselines
from qat.train.schedule import OptimConfig, ScheduledLRAndWeightDecay

TOKENIZER_CHECKPOINT_KEY = "qat_tokenizer_files"


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each next token (positions 0..T-2 predict 1..T-1), computed in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


class QATLanguageModel(L.LightningModule):
    """A causal LM whose linear layers train quantized (``quant``) or in full precision (``quant: null``).

    Args:
        arch: the architecture (``vocab_size: 0`` takes the tokenizer's).
        quant: the quantization of linear layers; ``null`` trains the full-precision baseline.
        optim: AdamW and its LR / weight-decay schedule.
        tokenizer_dir: set by ``qat fit`` from the data module; its files are stored in every checkpoint so an
            exported model carries the exact tokenizer it was trained with.
        health_every_n_steps: how often QAT-health metrics are logged.
        fp8: mixed FP8 training of the full-precision linears (``null``: none).
    """

    def __init__(self, arch: ArchConfig = ArchConfig(), quant: Optional[QuantConfig] = QuantConfig(),
                 optim: OptimConfig = OptimConfig(), tokenizer_dir: Optional[str] = None,
                 health_every_n_steps: int = 50, fp8: Optional[FP8Config] = None):
        super().__init__()
        # The default configs above are one instance shared by every call: work on copies, so that filling in
        # the vocabulary size below changes neither a default nor the caller's config.
        arch, quant, optim = copy.deepcopy((arch, quant, optim))
        token_ids = {}
        self.tokenizer_files: dict[str, str] = {}
        if tokenizer_dir is not None:
            if arch.pretrained:
                check_pretrained_tokenizer(arch.pretrained, tokenizer_dir)
            tok = load_tokenizer(tokenizer_dir)
            if arch.vocab_size <= 0:
                arch.vocab_size = len(tok)
            token_ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                         "pad_token_id": tok.pad_token_id}
            self.tokenizer_files = {
                p.name: p.read_text() for p in Path(tokenizer_dir).iterdir()
                if p.is_file() and p.suffix in (".json", ".txt", ".model") and not p.name.startswith(".")}
        # Plain dicts in the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters({"arch": asdict(arch), "quant": asdict(quant) if quant else None,
                                   "optim": asdict(optim), "token_ids": token_ids,
                                   "health_every_n_steps": health_every_n_steps})
        self.arch, self.quant, self.optim_cfg = arch, quant, optim
        self.model = build_model(arch, token_ids=token_ids)
        if quant is not None:
            convert_to_qat(self.model, quant)
        self.hparams["fp8"] = asdict(fp8) if fp8 else None
        self.fp8_cfg = fp8
        self.fp8_layer_names = prepare_fp8(self.model, fp8)  # emulated: swapped now; te: in configure_model

    def configure_model(self) -> None:
        # TE layers must exist before the strategy (DeepSpeed) wraps the model and builds its optimizer.
        if self.fp8_cfg is not None and self.fp8_cfg.backend == "te":
            swap_to_te(self.model, self.fp8_layer_names)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with fp8_autocast(self.fp8_cfg):
            return self.model(input_ids=input_ids).logits

    def compute_loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The training objective; subclasses (e.g. distillation) change it here."""
        loss = next_token_nll(logits, batch["input_ids"])
        return loss, {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"])
        loss, extra = self.compute_loss(batch, logits)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        for key, value in extra.items():
            self.log(f"train/{key}", value, on_step=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll = next_token_nll(self(batch["input_ids"]), batch["input_ids"])
        self.log("val/loss", nll, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)  # norms and biases are never decayed
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
             {"params": no_decay, "weight_decay": 0.0, "decay": False}],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        scheduler = ScheduledLRAndWeightDecay(optimizer, int(self.trainer.estimated_stepping_batches), cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        callbacks = [TokenThroughputMonitor()]
        if self.quant is not None:
            callbacks.append(QATHealthMonitor(self.hparams.health_every_n_steps))
            if self.arch.pretrained:
                callbacks.append(PretrainedBaselines())
        if self.fp8_cfg is not None and self.fp8_cfg.backend == "emulated":
            callbacks.append(FP8HealthMonitor(self.hparams.health_every_n_steps))
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every save (scheduled, last, requeue; any strategy) passes here before a byte is written: a NaN/Inf
        # weight stops the save, so the previous checkpoint is neither overwritten nor rotated away.
        bad = non_finite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            raise CheckpointError(f"not saving the checkpoint of global step {checkpoint.get('global_step')}: "
                                  f"{len(bad)} weight tensors hold NaN/Inf (e.g. {bad[0]}); the earlier checkpoints "
                                  "are kept. Lower model.optim.lr and resume from the last one")
        checkpoint[TOKENIZER_CHECKPOINT_KEY] = self.tokenizer_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_files = checkpoint.get(TOKENIZER_CHECKPOINT_KEY, self.tokenizer_files)
