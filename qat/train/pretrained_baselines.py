"""What quantizing a pretrained model costs before any training: at the start of a fresh fit from
``model.arch.pretrained``, the held-out loss of the full-precision original (``val/fp_loss``, ``val/fp_ppl``) and of
the quantized model as converted, i.e. post-training quantization (``val/ptq_loss``, ``val/ptq_ppl``), logged at
step 0 on the validation blocks that validation itself uses (``trainer.limit_val_batches`` applies)."""

import math

import lightning as L
import numpy as np

from qat.eval.perplexity import heldout_metrics
from qat.nn.convert import build_model


def validation_blocks(trainer: L.Trainer) -> np.ndarray:
    """The held-out blocks a validation epoch sees (all, a count of batches, or a fraction)."""
    datamodule = trainer.datamodule
    blocks = datamodule.datasets["validation"].blocks
    limit, batch = trainer.limit_val_batches, datamodule.hparams.batch_size
    if isinstance(limit, int):
        return blocks[: limit * batch]
    return blocks[: max(1, int(len(blocks) * float(limit)))]


class PretrainedBaselines(L.Callback):
    """Logs FP and PTQ held-out loss/perplexity at step 0 of a fit that starts from pretrained weights (not on a
    resume: the latent weights have moved by then)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != 0 or pl_module.quant is None or trainer.datamodule is None:
            return
        blocks = validation_blocks(trainer)
        batch, device = trainer.datamodule.hparams.batch_size, pl_module.device
        was_training = pl_module.training
        pl_module.eval()
        ptq = heldout_metrics(lambda ids: pl_module(ids.to(device)), blocks, batch, desc="PTQ")
        pl_module.train(was_training)
        original = build_model(pl_module.arch).to(device).eval()
        fp = heldout_metrics(lambda ids: original(input_ids=ids.to(device)).logits, blocks, batch, desc="FP")
        metrics = {"val/fp_loss": fp["nll_per_token"], "val/fp_ppl": fp["perplexity"],
                   "val/ptq_loss": ptq["nll_per_token"], "val/ptq_ppl": ptq["perplexity"]}
        if trainer.is_global_zero:
            print(f"pretrained {pl_module.arch.pretrained}: held-out perplexity FP {fp['perplexity']:.3f}, "
                  f"PTQ ({pl_module.quant.weight}, no training) {ptq['perplexity']:.3f} "
                  f"on {fp['tokens']} tokens")
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=0)
        pl_module.pretrained_baselines = {k: v for k, v in metrics.items() if math.isfinite(v)}
