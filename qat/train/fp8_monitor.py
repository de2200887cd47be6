"""FP8 health: per FP8 layer and GEMM operand, the amax, scale, and the fractions of values that saturate at the
format max and that underflow to zero. Logged to the same logger as the QAT-health metrics."""

import lightning as L

from qat.nn.fp8_linear import fp8_layers


class FP8HealthMonitor(L.Callback):
    """Every ``every_n_steps``: arms each ``FP8Linear`` to collect statistics during that step's forward and
    backward (an extra pass over each operand, so not every step), then logs ``fp8/<layer>/<operand>/<stat>``."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def _due(self, trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._due(trainer):
            for layer in fp8_layers(pl_module).values():
                layer.fp8_stats = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {}
        for name, layer in fp8_layers(pl_module).items():
            if layer.fp8_stats:
                short = name.removeprefix("model.").removeprefix("model.")
                metrics.update({f"fp8/{short}/{key}": value for key, value in layer.fp8_stats.items()})
            layer.fp8_stats = None
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
