"""FP8 emulation: step-time overhead vs no FP8 measured side by side (interleaved repetitions in one process, so
load from elsewhere hits all alike), and loss curves without FP8 vs FP8 delayed / current / mxfp8 from real
`qat fit` runs of the tiny FP recipe (same seed and data), plotted to a PNG with their final held-out losses. The
baseline runs at the precision the FP8 variants compute in (``--precision``, default auto as ``run.precision``:
bf16-mixed on AVX512-BF16/AMX CPUs, else fp32).

    .venv/bin/python bench/fp8_emulation.py [--steps 10] [--train_steps 100] [--out runs/bench-fp8]
    .venv/bin/python bench/fp8_emulation.py --train_steps 0     # step time only
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from qat.eval.plots import plot_loss_curves, run_history
from qat.nn.config import ArchConfig
from qat.nn.fp8_linear import FP8Config
from qat.train.module import QATLanguageModel, next_token_nll
from qat.train.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fp-baseline-tiny.yaml"
FP8_RECIPE = REPO / "recipes" / "fp-baseline-tiny-fp8.yaml"  # the same recipe with an fp8: section
VARIANTS = {"no-fp8": None, "fp8-delayed": FP8Config(recipe="delayed", amax_history_len=16),
            "fp8-current": FP8Config(recipe="current"), "fp8-mxfp8": FP8Config(recipe="mxfp8")}


def step_time(model, optimizer, ids, precision: str) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = next_token_nll(model(ids), ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure_step_times(steps: int, vocab: int, precision: str) -> dict[str, float]:
    recipe = yaml.safe_load(RECIPE.read_text())
    arch = ArchConfig(**{**recipe["model"]["arch"], "vocab_size": vocab})
    batch, seq = recipe["data"]["batch_size"], recipe["data"]["seq_len"]
    models = {}
    for name, fp8 in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = QATLanguageModel(arch, None, fp8=fp8)
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    ids = torch.randint(0, vocab, (batch, seq))
    times = {k: [] for k in models}
    for rep in range(steps + 2):
        for k in models:
            t = step_time(models[k], optims[k], ids, precision)
            if rep >= 2:  # warm-up
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"step time, batch {batch}x{seq} tokens, precision {precision}, {torch.get_num_threads()} thread(s), "
          f"FP8 on {len(models['fp8-delayed'].fp8_layer_names)} linears (first decoder layer and lm_head kept)")
    print(f"{'variant':<14}{'median s/step':>15}{'tokens/s':>12}{'vs no-fp8':>11}")
    for k, v in med.items():
        print(f"{k:<14}{v:>15.3f}{batch * seq / v:>12.0f}{v / med['no-fp8']:>10.2f}x")
    return med


def train_runs(train_steps: int, out: Path) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for name, fp8 in VARIANTS.items():
        run_dir = out / name
        args = [sys.executable, "-m", "qat.cli.main", "fit", "--config", str(RECIPE if fp8 is None else FP8_RECIPE),
                f"--trainer.max_steps={train_steps}", f"--trainer.val_check_interval={max(train_steps // 4, 1)}",
                "--trainer.limit_val_batches=8", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
                f"--run.checkpoint_every_n_steps={train_steps}", f"--trainer.default_root_dir={run_dir}",
                f"--model.optim.warmup_steps={max(train_steps // 8, 1)}"]
        if fp8 is not None:
            args += [f"--model.fp8.recipe={fp8.recipe}", f"--model.fp8.amax_history_len={fp8.amax_history_len}"]
        start = time.perf_counter()
        result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name}: qat fit failed:\n{result.stderr[-3000:]}")
        rows = run_history(run_dir)
        val = [r["val/loss"] for r in rows if "val/loss" in r]
        results[name] = {"run_dir": str(run_dir), "final_val_loss": val[-1], "wall_s": time.perf_counter() - start}
    base = results["no-fp8"]["final_val_loss"]
    print(f"\nheld-out loss after {train_steps} steps (same seed and data; run.precision auto)")
    for name, r in results.items():
        print(f"{name:<14}{r['final_val_loss']:>10.4f}  ({(r['final_val_loss'] - base) / base:+.2%} vs no-fp8)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--train_steps", type=int, default=100, help="steps of each training run (0: skip)")
    parser.add_argument("--out", default="runs/bench-fp8")
    parser.add_argument("--precision", default="auto", help="32-true, bf16-mixed, or auto (as the runs: run.precision)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(args.precision, "cpu")
    summary = {"precision": precision, "step_time_s": measure_step_times(args.steps, args.vocab, precision)}
    if args.train_steps > 0:
        summary["runs"] = train_runs(args.train_steps, out)
        png = plot_loss_curves({k: v["run_dir"] for k, v in summary["runs"].items()}, out / "fp8-loss-curves.png")
        print(f"loss curves: {png}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
