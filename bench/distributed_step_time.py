"""Steady-state training step time of the tiny recipe model (its arch and quant) through Lightning, on CPU with
gloo: 1 rank vs DDP and DeepSpeed ZeRO-1/2/3 on 2 ranks, same global batch, side by side in one run (the
configurations are interleaved over ``--rounds``, so load from elsewhere hits them alike).

    .venv/bin/python bench/distributed_step_time.py [--config recipes/bitnet-b158-tiny.yaml] [--global-batch 8]
        [--seq-len 256] [--steps 12] [--warmup 3] [--rounds 2] [--threads 1]

Each configuration is a ``torch.distributed.run`` launch of this file in worker mode; rank 0 reports the wall
time between consecutive ``on_train_batch_end`` (forward, backward, gradient reduction, optimizer step). Every
rank gets ``--threads`` intra-op threads, so on a 2-core machine 2 ranks use both cores and 1 rank uses one:
the ideal 2-rank / 1-rank ratio is then 0.5.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (label, strategy name for build_strategy, ranks)
CONFIGURATIONS = [("1 rank", "auto", 1), ("DDP x2", "ddp", 2), ("ZeRO-1 x2", "deepspeed_stage_1", 2),
                  ("ZeRO-2 x2", "deepspeed_stage_2", 2), ("ZeRO-3 x2", "deepspeed_stage_3", 2)]


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    import yaml
    from torch.utils.data import DataLoader, Dataset

    from qat.nn.config import ArchConfig, QuantConfig
    from qat.train.module import QATLanguageModel
    from qat.train.strategies import build_strategy

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(Path(args.config).read_text())
    arch = ArchConfig(**{**recipe["model"]["arch"], "vocab_size": args.vocab})
    quant = QuantConfig(**recipe["model"]["quant"]) if recipe["model"].get("quant") else None

    class RandomTokens(Dataset):
        def __len__(self) -> int:
            return args.global_batch * (args.warmup + args.steps)

        def __getitem__(self, i: int) -> dict:
            ids = torch.randint(0, args.vocab, (args.seq_len,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "block_index": i}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *_) -> None:
            self.ends.append(time.perf_counter())

    L.seed_everything(1234, verbose=False)
    model = QATLanguageModel(arch, quant)
    timer = StepTimer()
    # The default DistributedSampler splits the global batch: each of `world` ranks takes global_batch / world.
    loader = DataLoader(RandomTokens(), batch_size=args.global_batch // world, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=build_strategy(args.worker, "cpu"),
                        precision="32-true", max_steps=args.warmup + args.steps, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
    trainer.fit(model, loader)
    if trainer.is_global_zero:
        steps = [b - a for a, b in zip(timer.ends[args.warmup - 1:], timer.ends[args.warmup:])]
        with open(args.out, "a") as f:
            f.write(json.dumps({"strategy": args.worker, "world": world, "steps": steps}) + "\n")


def launch(strategy: str, ranks: int, args: argparse.Namespace, out: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           "--worker", strategy, "--out", str(out), *forwarded(args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        sys.exit(f"{strategy} on {ranks} rank(s) failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


def forwarded(args: argparse.Namespace) -> list[str]:
    return [f"--config={args.config}", f"--global-batch={args.global_batch}", f"--seq-len={args.seq_len}",
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}", f"--vocab={args.vocab}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "recipes" / "bitnet-b158-tiny.yaml"))
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per launch")
    parser.add_argument("--rounds", type=int, default=2, help="launches of every configuration, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    out = Path(tempfile.mkdtemp(prefix="qat-bench-")) / "steps.jsonl"
    started = time.perf_counter()
    for _ in range(args.rounds):
        for _, strategy, ranks in CONFIGURATIONS:
            launch(strategy, ranks, args, out)
    steps: dict[str, list[float]] = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["strategy"], []).extend(record["steps"])
    median = {strategy: statistics.median(times) for strategy, times in steps.items()}
    base = median["auto"]
    print(f"tiny model ({Path(args.config).name}), global batch {args.global_batch}x{args.seq_len}, fp32, "
          f"{args.threads} thread(s)/rank, {args.rounds}x{args.steps} timed steps each; {os.cpu_count()} CPUs; "
          f"total {time.perf_counter() - started:.0f} s")
    print(f"{'configuration':<14}{'median s/step':>15}{'p90 s/step':>12}{'vs 1 rank':>11}")
    for label, strategy, _ in CONFIGURATIONS:
        times = sorted(steps[strategy])
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        print(f"{label:<14}{median[strategy]:>15.3f}{p90:>12.3f}{median[strategy] / base:>10.2f}x")


if __name__ == "__main__":
    main()
