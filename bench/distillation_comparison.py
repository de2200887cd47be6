"""Held-out perplexity, bits/byte and teacher top-1 agreement of several runs that share the SmolLM2 tokenizer
(e.g. binary-AD vs binary-CE vs FP baseline at equal steps), on the same validation blocks, side by side.

    .venv/bin/python bench/distillation_comparison.py runs/fbi-binary-tiny-ad runs/fbi-binary-tiny-ce runs/fp-smollm2
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from qat.checkpoint.layout import RunLayout
from qat.checkpoint.trained import load_trained_model
from qat.data.datamodule import TextDataModule
from qat.eval.perplexity import heldout_metrics, logits_agreement
from qat.teachers import TeacherConfig, load_teacher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="run directories (their checkpoints/last.ckpt is evaluated)")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = TextDataModule(tokenizer="smollm2", seq_len=args.seq_len, batch_size=8)
    data.setup("fit")
    val = np.asarray(data.datasets["validation"].blocks[: args.blocks])
    bpt = data.validation_bytes_per_token()
    teacher = load_teacher(TeacherConfig()).model
    batches = [torch.from_numpy(val[i:i + 8]).long() for i in range(0, len(val), 8)]
    with torch.no_grad():
        teacher_logits = [teacher(input_ids=b).logits for b in batches]
    results = {"teacher (SmolLM2-135M)": heldout_metrics(lambda ids: teacher(input_ids=ids).logits, val, 8, bpt)}
    for run in args.runs:
        model = load_trained_model(str(RunLayout(Path(run)).last_checkpoint)).model
        metrics = heldout_metrics(lambda ids: model(input_ids=ids).logits, val, 8, bpt)
        with torch.no_grad():
            metrics["teacher_top1_agreement"] = float(np.mean([
                logits_agreement(model(input_ids=b).logits, t)["top1_agreement"]
                for b, t in zip(batches, teacher_logits)]))
        results[Path(run).name] = metrics
    print(f"{'model':<28}{'ppl':>10}{'bits/byte':>11}{'top1 vs teacher':>17}")
    for name, m in results.items():
        agreement = m.get('teacher_top1_agreement', 1.0)
        print(f"{name:<28}{m['perplexity']:>10.2f}{m['bits_per_byte']:>11.4f}{agreement:>17.4f}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
