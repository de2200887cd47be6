"""Trains a tiny BitLinear regressor with each strategy named on the command line, in this process group, and
writes rank 0's per-step global loss curves (and the engine and optimizer classes that ran) to a JSON file.
Launched by tests/train/test_strategies.py with ``torch.distributed.run`` (1 or 2 ranks); the global batch is the
same whatever the number of ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_loss_curve.py OUT.json \
        ddp deepspeed_stage_3
"""

import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qat.nn.bitlinear import BitLinear
from qat.nn.config import QuantConfig
from qat.train.strategies import build_strategy, release_process_group

GLOBAL_BATCH = 8
SAMPLES = 64
EPOCHS = 2


class TinyRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # BitLinear is in the middle so ZeRO-3 partitions a quantized weight: its scale must come from the full
        # (gathered) weight, or the loss curve departs from the 1-rank one.
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), BitLinear(32, 32, quant=QuantConfig()), nn.ReLU(),
                                 nn.Linear(32, 1))
        self.global_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        global_loss = loss.detach().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(global_loss)
            global_loss /= dist.get_world_size()
        self.global_losses.append(global_loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) ** 2) / 4 + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return TensorDataset(x, y)


def loss_curve(strategy_name: str, world_size: int, rank: int) -> dict:
    """Per-step global losses, and what actually ran: the wrapped model's and the optimizer's classes."""
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    # Rank r takes samples r, r + world_size, ... in order: the ranks together see exactly the samples of the
    # 1-rank batch at every step.
    data = make_data()
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=build_strategy(strategy_name, "cpu"),
                        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True,
                        use_distributed_sampler=False)
    trainer.fit(model, loader)
    return {"losses": model.global_losses, "strategy": type(trainer.strategy).__name__,
            "engine": type(trainer.strategy.model).__name__,
            "optimizer": type(trainer.strategy.optimizers[0]).__name__}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    curves = {name: loss_curve(name, world_size, rank) for name in names}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(curves, f)
    release_process_group()


if __name__ == "__main__":
    main()
