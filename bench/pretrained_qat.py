"""What QAT recovers on a pretrained model: for each finished run of a pretrained recipe (e.g.
``recipes/smollm2-135m-4bit.yaml``, ``recipes/smollm2-135m-ternary.yaml``), held-out perplexity and bits/byte of the
full-precision original (FP), of the recipe's quantization of it with no training (PTQ) and of the trained run (QAT:
its export's eval.json from ``qat run`` when that covered the same blocks, else its checkpoint), on the same
held-out blocks, beside the training budget (steps, tokens) and wall time of the run. Prints a markdown
table and draws ``pretrained_qat.png``.

    python bench/pretrained_qat.py runs/smollm2-135m-4bit runs/smollm2-135m-ternary [--max_blocks 64] [--out DIR]
"""

import argparse
import json
import math
from pathlib import Path

import torch
import yaml

from qat.checkpoint.layout import RunLayout
from qat.checkpoint.trained import load_trained_model
from qat.data.datamodule import TextDataModule
from qat.eval.perplexity import heldout_metrics
from qat.nn.convert import build_model, convert_to_qat
from qat.train.wandb_logger import offline_run_files, read_wandb_history


def measure(model, blocks, batch_size: int, bytes_per_token: float, desc: str) -> dict:
    with torch.no_grad():
        return heldout_metrics(lambda ids: model(input_ids=ids).logits, blocks, batch_size, bytes_per_token, desc)


def evaluated_export(run_dir: Path, tokens: int) -> dict | None:
    """The held-out metrics ``qat run`` measured on the run's export (its eval.json), when they cover exactly these
    tokens; None otherwise (then the checkpoint is evaluated here)."""
    for eval_file in sorted(run_dir.glob("export-*/eval.json")):
        exported = json.loads(eval_file.read_text()).get("exported") or {}
        if exported.get("tokens") == tokens and "bits_per_byte" in exported:
            return exported
    return None


def training_budget(run_dir: Path, data_hparams: dict, global_step: int) -> dict:
    """Steps, training tokens and wall time (W&B ``_runtime`` of the run's last record, the step-0 FP/PTQ
    evaluation included) of a finished run."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    accumulate = int((config.get("trainer") or {}).get("accumulate_grad_batches") or 1)
    tokens = global_step * accumulate * int(data_hparams["batch_size"]) * int(data_hparams["seq_len"])
    runtimes = [row["_runtime"] for f in offline_run_files(run_dir) for row in read_wandb_history(f)
                if "_runtime" in row]
    return {"steps": global_step, "tokens": tokens, "wall_min": max(runtimes) / 60 if runtimes else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of finished pretrained QAT runs")
    parser.add_argument("--max_blocks", type=int, default=64, help="held-out blocks (0 = all)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG (default: the first run's)")
    args = parser.parse_args()
    rows, cache = [], {}
    for run_dir in args.runs:
        trained = load_trained_model(str(RunLayout(run_dir).last_checkpoint))
        if not trained.arch.pretrained or trained.quant is None:
            parser.error(f"{run_dir} is not a QAT run from a pretrained model (model.arch.pretrained, model.quant)")
        data = TextDataModule(**{k: v for k, v in trained.data_hparams.items() if not k.startswith("_")})
        data.setup()
        blocks = data.datasets["validation"].blocks
        blocks = blocks[: args.max_blocks] if args.max_blocks else blocks
        bpt = data.validation_bytes_per_token()
        key = (trained.arch.pretrained, len(blocks), int(trained.data_hparams["seq_len"]))
        if key not in cache:
            cache[key] = measure(build_model(trained.arch).eval(), blocks, args.batch_size, bpt, "FP")
        ptq_key = (*key, repr(trained.quant))               # runs that differ only in training share their PTQ
        if ptq_key not in cache:
            cache[ptq_key] = measure(convert_to_qat(build_model(trained.arch), trained.quant).eval(), blocks,
                                     args.batch_size, bpt, "PTQ")
        qat = evaluated_export(run_dir, cache[key]["tokens"]) or measure(trained.model, blocks, args.batch_size, bpt,
                                                                        "QAT")
        rows.append({"run": run_dir.name, "scheme": trained.quant.weight, "fp": cache[key], "ptq": cache[ptq_key],
                     "qat": qat, **training_budget(run_dir, trained.data_hparams, trained.global_step)})
    tokens = rows[0]["fp"]["tokens"]
    print(f"Held-out Wikipedia perplexity (bits/byte) on the same {tokens} tokens, CPU: {torch.get_num_threads()} "
          "threads")
    print("| run | scheme | FP | PTQ (no training) | QAT | QAT recovers | steps | training tokens | wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp, ptq, qat = (r[k]["perplexity"] for k in ("fp", "ptq", "qat"))
        recovered = (math.log(ptq) - math.log(qat)) / (math.log(ptq) - math.log(fp)) if ptq != fp else math.nan
        cells = [f"{r[k]['perplexity']:.2f} ({r[k]['bits_per_byte']:.3f})" for k in ("fp", "ptq", "qat")]
        print(f"| {r['run']} | {r['scheme']} | " + " | ".join(cells) + f" | {100 * recovered:.0f}% of the PTQ loss gap"
              f" | {r['steps']} | {r['tokens']:,} | {r['wall_min']:.1f} min |")
    out = args.out or args.runs[0]
    plot(rows, out / "pretrained_qat.png")
    print(f"plot: {out / 'pretrained_qat.png'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(rows), 4))
    width = 0.25
    for i, (kind, color) in enumerate((("fp", "tab:gray"), ("ptq", "tab:red"), ("qat", "tab:blue"))):
        values = [r[kind]["perplexity"] for r in rows]
        bars = ax.bar([j + (i - 1) * width for j in range(len(rows))], values, width, label=kind.upper(), color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r['run']}\n{r['steps']} steps, {r['wall_min']:.0f} min" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("FP vs PTQ vs QAT on the held-out split")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
