"""Rebuild the trained model from a training checkpoint (Lightning ``.ckpt`` or DeepSpeed directory) without
Lightning or pickled code: architecture and quantization come from the checkpoint's plain-dict hyper-parameters."""

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from qat.checkpoint.deepspeed import load_training_checkpoint
from qat.checkpoint.integrity import non_finite_tensors
from qat.errors import CheckpointError
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.fp8_linear import FP8_STATE_BUFFERS

MODEL_PREFIX = "model."


@dataclass
class TrainedModel:
    """What export and evaluation need from a checkpoint."""

    model: nn.Module
    arch: ArchConfig
    quant: Optional[QuantConfig]
    tokenizer_files: dict[str, str]
    data_hparams: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The wrapped HF model's weights (the LightningModule stores it under ``model.``)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint has no state_dict; is it a `qat fit` checkpoint?")
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def load_trained_model(path: str) -> TrainedModel:
    """Load ``path`` into the model class it was trained as (``BitLinear`` layers for QAT runs), in eval mode."""
    checkpoint = load_training_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "arch" not in hparams:
        raise CheckpointError(f"{path} has no qat hyper-parameters (arch); it was not written by `qat fit`")
    arch = ArchConfig(**hparams["arch"])
    quant = QuantConfig(**hparams["quant"]) if hparams.get("quant") else None
    model = build_model(arch, token_ids=hparams.get("token_ids"))
    if quant is not None:
        convert_to_qat(model, quant)
    # FP8 training state (amax histories, scales) is not part of the trained model.
    state = {k: v for k, v in model_state_dict(checkpoint).items() if k.rsplit(".", 1)[-1] not in FP8_STATE_BUFFERS}
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors hold NaN/Inf (e.g. {bad[0]}): the run diverged "
                              "before this checkpoint; use an earlier checkpoint, or retrain with a lower "
                              "model.optim.lr")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not arch.tie_word_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its own architecture: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return TrainedModel(model=model.eval(), arch=arch, quant=quant,
                        tokenizer_files=checkpoint.get("qat_tokenizer_files") or {},
                        data_hparams=dict(checkpoint.get("datamodule_hyper_parameters") or {}),
                        hparams=hparams, global_step=int(checkpoint.get("global_step", 0)))
