"""Training step time of the same model in QAT (ternary BitLinear) vs full precision, measured side by side in
one process (interleaved repetitions, so load from elsewhere hits both alike).

    .venv/bin/python bench/qat_step_time.py [--config recipes/bitnet-b158-tiny.yaml] [--steps 10] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import yaml

from qat.nn.config import ArchConfig, QuantConfig
from qat.train.module import QATLanguageModel, next_token_nll
from qat.train.precision import resolve_precision


def step_time(model, optimizer, ids, dtype) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16-mixed"):
        loss = next_token_nll(model(ids), ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="recipes/bitnet-b158-tiny.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(open(args.config))
    arch = ArchConfig(**{**recipe["model"]["arch"], "vocab_size": args.vocab})
    quant = QuantConfig(**recipe["model"]["quant"])
    batch, seq = recipe["data"]["batch_size"], recipe["data"]["seq_len"]
    precision = resolve_precision("auto", "cpu")
    torch.manual_seed(0)
    models = {"qat-ternary": QATLanguageModel(arch, quant), "fp": QATLanguageModel(arch, None)}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    ids = torch.randint(0, args.vocab, (batch, seq))
    times = {k: [] for k in models}
    for rep in range(args.steps + 2):
        for k in models:
            t = step_time(models[k], optims[k], ids, precision)
            if rep >= 2:  # warm-up
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {batch}x{seq} tokens, {args.threads} thread(s), precision {precision}, vocab {args.vocab}")
    print(f"{'model':<14}{'median s/step':>15}{'tokens/s':>12}")
    for k, v in med.items():
        print(f"{k:<14}{v:>15.3f}{batch * seq / v:>12.0f}")
    print(f"QAT / FP step-time ratio: {med['qat-ternary'] / med['fp']:.2f}x")


if __name__ == "__main__":
    main()
