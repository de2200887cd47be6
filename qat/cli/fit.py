"""``qat fit``: LightningCLI over ``QATLanguageModel`` + ``TextDataModule``, recipe = LightningCLI YAML.

Adds to plain LightningCLI: the tokenizer link (data -> model), a run section (name, checkpoint cadence, W&B),
``--resume auto|none|<ckpt>``, atomic checkpoints, and the QAT W&B logger unless the recipe names another.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from qat.cluster.requeue import add_slurm_requeue
from qat.data.datamodule import TextDataModule
from qat.errors import CheckpointError
from qat.checkpoint.deepspeed import check_deepspeed_checkpoint
from qat.checkpoint.io import AtomicCheckpointIO, SaveLastOnTrainEnd, load_checkpoint_file
from qat.train.module import QATLanguageModel
from qat.train.precision import resolve_precision
from qat.train.strategies import build_strategy
from qat.train.wandb_logger import QATWandbLogger

LAST_CHECKPOINT = "last.ckpt"


@dataclass
class RunConfig:
    """Where and how a run is kept.

    Attributes:
        name: run name (W&B run name, model card).
        checkpoint_every_n_steps: save ``last.ckpt`` (and a step-numbered copy) this often.
        wandb_project: W&B project.
        wandb_mode: ``auto`` = online iff WANDB_API_KEY is set, else offline.
        precision: used when ``trainer.precision`` is unset; ``auto`` = bf16-mixed where bf16 is fast
            (GPU, CPU with AMX/AVX512-BF16), else 32-true.
    """

    name: str = "qat-run"
    checkpoint_every_n_steps: int = 100
    wandb_project: str = "qat"
    wandb_mode: Literal["auto", "offline", "online"] = "auto"
    precision: str = "auto"


def newest_good_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """``last.ckpt`` if it loads, else the newest other ``*.ckpt`` that loads; None when there is none."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: (p.name == LAST_CHECKPOINT, p.stat().st_mtime),
                        reverse=True)
    for path in candidates:
        try:
            check_deepspeed_checkpoint(path) if path.is_dir() else load_checkpoint_file(path)
            return path
        except CheckpointError:
            continue
    return None


def resolve_resume(resume: str, run_dir: Path) -> Optional[str]:
    if resume == "none":
        return None
    if resume == "auto":
        found = newest_good_checkpoint(run_dir / "checkpoints")
        return str(found) if found else None
    if not Path(resume).exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint; use auto, none, or a path to a .ckpt")
    return resume


class QATLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_dataclass_arguments(RunConfig, "run")
        parser.add_argument("--resume", type=str, default="none",
                            help="auto: continue from the newest good checkpoint of this run dir; none; or a .ckpt path")
        parser.link_arguments("data.tokenizer_path", "model.tokenizer_dir", compute_fn=str, apply_on="instantiate")

    def _run_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs):
        cfg = self._run_config()
        run: RunConfig = cfg.run
        run_dir = Path(cfg.trainer.default_root_dir or Path("runs") / run.name)
        kwargs["default_root_dir"] = str(run_dir)
        accelerator = cfg.trainer.accelerator if isinstance(cfg.trainer.accelerator, str) else "auto"
        if cfg.trainer.precision is None:
            kwargs["precision"] = resolve_precision(run.precision, accelerator)
        self.ckpt_path = resolve_resume(cfg.resume, run_dir) if self.subcommand == "fit" else None
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}",
                                             auto_insert_metric_name=False, save_last=True, save_top_k=1,
                                             monitor="step", mode="max",
                                             every_n_train_steps=run.checkpoint_every_n_steps))
        callbacks.append(SaveLastOnTrainEnd(run_dir / "checkpoints" / LAST_CHECKPOINT))
        kwargs["callbacks"] = callbacks
        if cfg.trainer.logger in (None, True):
            kwargs["logger"] = QATWandbLogger(project=run.wandb_project, name=run.name, save_dir=str(run_dir),
                                              mode=run.wandb_mode, resume_run=self.ckpt_path is not None)
        plugins = list(kwargs.get("plugins") or [])
        if not any(isinstance(p, AtomicCheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        add_slurm_requeue(callbacks, plugins)  # no-op outside a SLURM job
        kwargs["plugins"] = plugins
        kwargs["use_distributed_sampler"] = False  # TextDataModule's sampler shards and resumes itself
        if isinstance(cfg.trainer.strategy, str):  # ddp | deepspeed_stage_N: DeepSpeed also on CPU
            kwargs["strategy"] = build_strategy(cfg.trainer.strategy, accelerator)
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "fit" and kwargs.get("ckpt_path") is None and self.ckpt_path:
            print(f"resuming from {self.ckpt_path}")
            kwargs["ckpt_path"] = self.ckpt_path
        return kwargs


def fit_cli(args: Optional[list[str]] = None, model_class: type[QATLanguageModel] = QATLanguageModel,
            run: bool = True) -> QATLightningCLI:
    """Run ``qat fit|validate ...`` (LightningCLI subcommands) and return the CLI (trainer, model, datamodule).

    ``model_class``: a subclass with more recipe keys (``qat distill``); ``run=False`` only parses the recipe and
    instantiates (``args`` then has no subcommand)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return QATLightningCLI(model_class, TextDataModule, args=args, run=run, seed_everything_default=1234,
                           save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
