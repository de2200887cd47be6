"""Plots people would rather see than read: training/validation loss curves of one or several runs (PNG)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qat.train.wandb_logger import offline_run_files, read_wandb_history  # noqa: E402


def run_history(run_dir: str | Path) -> list[dict]:
    """History rows of the newest offline W&B run of a run directory (all its files, for requeued runs)."""
    rows = []
    for f in offline_run_files(run_dir):
        rows.extend(read_wandb_history(f))
    return rows


def plot_loss_curves(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """Train and validation loss vs step of each run (label -> run dir) in one figure."""
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        rows = run_history(run_dir)
        train = [(r["trainer/global_step"], r["train/loss"]) for r in rows if "train/loss" in r]
        val = [(r["trainer/global_step"], r["val/loss"]) for r in rows if "val/loss" in r]
        if train:
            ax_train.plot(*zip(*train), label=label)
        if val:
            ax_val.plot(*zip(*val), marker="o", label=label)
    for ax, title in ((ax_train, "train loss"), (ax_val, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("nats/token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
