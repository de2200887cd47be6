"""Training-time monitors: QAT health per layer group, and token throughput."""

import time
from collections import defaultdict

import lightning as L
import torch

from qat.nn.quantized import quantized_layers


def layer_group(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``: health is aggregated over layers of one role."""
    return name.rsplit(".", 1)[-1]


class QATHealthMonitor(L.Callback):
    """Every ``every_n_steps``: per layer group, the fraction of zero codes, the fraction of codes that changed
    since the last log (flips), and scale statistics. Rising flips late in training mean an unstable recipe."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self.previous_codes: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def health_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """``qat/<group>/{zero_frac, flip_frac, scale_mean, scale_min, scale_max}`` over every quantized layer
        (``QuantizedLinear.quantized_weight``); ``flip_frac`` from the second call on."""
        sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, layer in quantized_layers(model).items():
            codes, scale = layer.quantized_weight()
            codes = codes.to(torch.int8)
            g = sums[layer_group(name)]
            g["n"] += codes.numel()
            g["zeros"] += (codes == 0).sum().item()
            if name in self.previous_codes:
                g["n_compared"] += codes.numel()
                g["flips"] += (codes != self.previous_codes[name]).sum().item()
            self.previous_codes[name] = codes.clone()
            g["layers"] += 1
            g["scale_mean"] += scale.float().mean().item()
            g["scale_min"] = min(g.get("scale_min", float("inf")), scale.float().min().item())
            g["scale_max"] = max(g.get("scale_max", float("-inf")), scale.float().max().item())
        metrics = {}
        for group, g in sums.items():
            metrics[f"qat/{group}/zero_frac"] = g["zeros"] / g["n"]
            if g["n_compared"]:
                metrics[f"qat/{group}/flip_frac"] = g["flips"] / g["n_compared"]
            metrics[f"qat/{group}/scale_mean"] = g["scale_mean"] / g["layers"]
            metrics[f"qat/{group}/scale_min"] = g["scale_min"]
            metrics[f"qat/{group}/scale_max"] = g["scale_max"]
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero:
            metrics = self.health_metrics(pl_module)
            if metrics and trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=trainer.global_step)


class TokenThroughputMonitor(L.Callback):
    """Logs ``tokens_per_s``: tokens of all ranks per wall-clock second of the training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self.start
        tokens = batch["input_ids"].numel() * trainer.world_size
        pl_module.log("tokens_per_s", tokens / max(elapsed, 1e-9), on_step=True, prog_bar=True, logger=True)
