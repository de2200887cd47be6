"""Trains the tiny BitLinear regressor of ``distributed_loss_curve.py`` with its two full-precision linears in
emulated FP8 (delayed scaling, amax reduced over ranks), under each strategy named on the command line, and writes
rank 0's global loss curves, engine/optimizer classes and every rank's FP8 scales to a JSON file. Launched by
tests/train/test_fp8_training.py with ``torch.distributed.run`` (1 or 2 ranks).

    python -m torch.distributed.run --standalone --nproc_per_node=2 fp8_distributed_run.py OUT.json deepspeed_stage_2
"""

import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from qat.nn.fp8_linear import FP8Config, convert_to_fp8, fp8_layers
from qat.train.strategies import build_strategy, release_process_group
from tests.train.distributed_loss_curve import EPOCHS, GLOBAL_BATCH, TinyRegressor, make_data


class FP8Regressor(TinyRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.fp8_names = convert_to_fp8(self.net, FP8Config(recipe="delayed", amax_history_len=4,
                                                            keep_high_precision=[]))


def run(strategy_name: str, world_size: int, rank: int) -> dict:
    L.seed_everything(0, verbose=False)
    model = FP8Regressor()
    data = make_data()
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=build_strategy(strategy_name, "cpu"),
                        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, use_distributed_sampler=False)
    trainer.fit(model, loader)
    scales = torch.cat([layer.fp8_scale for layer in fp8_layers(model).values()])
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.zeros_like(scales) for _ in range(world_size)]
        dist.all_gather(gathered, scales)
    else:
        gathered = [scales]
    return {"losses": model.global_losses, "fp8_layers": model.fp8_names,
            "scales_per_rank": [g.tolist() for g in gathered],
            "engine": type(trainer.strategy.model).__name__,
            "optimizer": type(trainer.strategy.optimizers[0]).__name__}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    curves = {name: run(name, world_size, rank) for name in names}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(curves, f)
    release_process_group()


if __name__ == "__main__":
    main()
