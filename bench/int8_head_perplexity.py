"""Perplexity cost of the packed decoder's int8 (GGML Q8_0) lm_head on real held-out text.

    python bench/int8_head_perplexity.py CHECKPOINT [--blocks 0] [--threads 2]
    python bench/int8_head_perplexity.py --train-steps 400 [--recipe recipes/bitnet-b158-tiny-llamacpp.yaml]

Reads a `qat fit` checkpoint of a BitNet model (or first trains one: a real `qat fit` of ``--recipe`` for
``--train-steps`` steps into a temporary folder), packs it, and runs the run's own validation blocks through
qat's ``PackedDecoder`` twice: with the fp32 lm_head and with ``int8_head=True``; the QAT model itself (HF forward,
unpacked) is the reference the packed decoder must match. Prints held-out perplexity of each, the int8 head's
relative change, top-1 agreement and logit differences vs the fp32 head, and a last JSON line with the numbers.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def train_checkpoint(recipe: Path, steps: int, out_dir: Path) -> Path:
    """A real `qat fit` of ``recipe`` for ``steps`` steps (validation at the end only); its last checkpoint."""
    args = [sys.executable, "-m", "qat.cli.main", "fit", "--config", str(recipe), f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", f"--run.checkpoint_every_n_steps={steps}",
            f"--trainer.default_root_dir={out_dir}"]
    print(f"[int8 head] training {recipe.name} for {steps} steps ...", file=sys.stderr, flush=True)
    subprocess.run(args, cwd=REPO, check=True)
    return out_dir / "checkpoints" / "last.ckpt"


def head_perplexities(checkpoint: Path, max_blocks: int = 0) -> dict:
    """Held-out perplexity of the QAT model, the packed decoder (fp32 head) and the packed decoder (int8 head) on the
    checkpoint's validation blocks (all, or the first ``max_blocks``), and how the int8 head's logits differ."""
    from qat.checkpoint.trained import load_trained_model
    from qat.data.datamodule import TextDataModule
    from qat.eval.perplexity import heldout_metrics, logits_agreement
    from qat.nn.decoder import PackedDecoder
    from qat.nn.packed_linear import pack_model

    trained = load_trained_model(str(checkpoint))
    data = TextDataModule(**{k: v for k, v in trained.data_hparams.items() if not k.startswith("_")})
    data.setup()
    blocks = np.asarray(data.datasets["validation"].blocks)
    blocks = blocks[:max_blocks] if max_blocks else blocks
    packed = pack_model(trained.model)
    decoders = {"packed decoder, fp32 head": PackedDecoder(packed),
                "packed decoder, int8 head": PackedDecoder(packed, int8_head=True)}

    def decoder_logits(decoder):
        def logits(ids: torch.Tensor) -> torch.Tensor:      # one sequence at a time, as the decoder runs
            decoder.reset(ids.shape[1])
            return decoder.forward(ids)
        return logits

    metrics = {"QAT model (HF forward)": heldout_metrics(lambda ids: trained.model(input_ids=ids).logits, blocks)}
    for name, decoder in decoders.items():
        metrics[name] = heldout_metrics(decoder_logits(decoder), blocks, batch_size=1)
    with torch.no_grad():
        ids = torch.from_numpy(blocks[: min(len(blocks), 8)].astype(np.int64))
        fp32 = torch.cat([decoder_logits(decoders["packed decoder, fp32 head"])(row[None]) for row in ids])
        int8 = torch.cat([decoder_logits(decoders["packed decoder, int8 head"])(row[None]) for row in ids])
    fp32_ppl, int8_ppl = (metrics[k]["perplexity"] for k in decoders)
    return {"checkpoint": str(checkpoint), "tokens": metrics["QAT model (HF forward)"]["tokens"],
            "perplexity": {name: m["perplexity"] for name, m in metrics.items()},
            "int8_head_relative_change": int8_ppl / fp32_ppl - 1,
            "int8_vs_fp32_head": {**logits_agreement(int8, fp32), "logit_range": float(fp32.abs().max())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a `qat fit` checkpoint of a BitNet model")
    parser.add_argument("--train-steps", type=int, default=0, help="no checkpoint: train --recipe this many steps")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "bitnet-b158-tiny-llamacpp.yaml")
    parser.add_argument("--blocks", type=int, default=0, help="validation blocks to score (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.checkpoint and not args.train_steps:
        parser.error("give a CHECKPOINT, or --train-steps N to train one")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="qat-int8-head-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else train_checkpoint(args.recipe, args.train_steps,
                                                                                     Path(tmp) / "run")
        result = head_perplexities(checkpoint, args.blocks)
    print(f"\nHeld-out perplexity, {result['tokens']} tokens of {checkpoint}:")
    print("| model | perplexity |\n|---|---|")
    for name, ppl in result["perplexity"].items():
        print(f"| {name} | {ppl:.4f} |")
    agreement = result["int8_vs_fp32_head"]
    print(f"int8 head vs fp32 head: perplexity {result['int8_head_relative_change']:+.4%}, top-1 agreement "
          f"{agreement['top1_agreement']:.4f}, max |Δlogit| {agreement['max_abs_logit_diff']:.4f}, mean |Δlogit| "
          f"{agreement['mean_abs_logit_diff']:.5f} (logits up to {agreement['logit_range']:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
