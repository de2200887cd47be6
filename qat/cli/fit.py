"""``qat fit``: LightningCLI over ``QATLanguageModel`` + ``TextDataModule``, recipe = LightningCLI YAML.

Adds to plain LightningCLI: the tokenizer link (data -> model), a run section (name, checkpoint cadence, W&B),
``--resume auto|none|<ckpt>``, atomic checkpoints, and the QAT W&B logger unless the recipe names another.
"""

import os
from dataclasses import dataclass
from typing import Literal, Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from qat.checkpoint.callback import RunCheckpoint
from qat.checkpoint.io import AtomicCheckpointIO
from qat.checkpoint.layout import RunLayout
from qat.checkpoint.resume import resolve_resume
from qat.cluster.requeue import add_slurm_requeue
from qat.data.datamodule import TextDataModule
from qat.errors import RecipeError
from qat.train.module import QATLanguageModel
from qat.train.nonfinite import NonFiniteGuard
from qat.train.precision import resolve_precision
from qat.train.strategies import build_strategy
from qat.train.wandb_logger import QATWandbLogger


@dataclass
class RunConfig:
    """Where and how a run is kept.

    Attributes:
        name: run name (W&B run name, model card); the run folder is ``$QAT_RUNS_DIR/<name>`` (default
            ``runs/<name>``) unless ``trainer.default_root_dir`` is set.
        checkpoint_every_n_steps: save ``last.ckpt`` and ``step-NNNNNN.ckpt`` this often (``last.ckpt`` also
            when training ends).
        keep_step_checkpoints: how many ``step-NNNNNN.ckpt`` to keep (the newest).
        wandb_project: W&B project.
        wandb_mode: ``auto`` = online iff WANDB_API_KEY is set, else offline.
        precision: used when ``trainer.precision`` is unset; ``auto`` = bf16-mixed where bf16 is fast
            (GPU, CPU with AMX/AVX512-BF16), else 32-true.
        on_nonfinite: a NaN/Inf loss or gradient norm: ``stop`` the run (exit code 2, the checkpoints keep the
            last finite weights) or ``skip`` that optimizer step.
        max_consecutive_skips: with ``skip``, stop after this many non-finite steps in a row.
    """

    name: str = "qat-run"
    checkpoint_every_n_steps: int = 100
    keep_step_checkpoints: int = 1
    wandb_project: str = "qat"
    wandb_mode: Literal["auto", "offline", "online"] = "auto"
    precision: str = "auto"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 10


def check_run_recipe(run: RunConfig, max_steps: Optional[int]) -> None:
    """``RecipeError`` naming the key when a run setting cannot work (checked before anything is created)."""
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise RecipeError(f"trainer.max_steps={max_steps}: must be a positive number of optimizer steps "
                          "(or -1 for no step limit, with trainer.max_epochs)")
    for key in ("checkpoint_every_n_steps", "keep_step_checkpoints", "max_consecutive_skips"):
        if getattr(run, key) < 1:
            raise RecipeError(f"run.{key}={getattr(run, key)}: must be at least 1")


class QATLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_dataclass_arguments(RunConfig, "run")
        parser.add_argument("--resume", type=str, default="none",
                            help="auto: continue from the checkpoint of this run with the highest step that loads; "
                                 "none: start at step 0 (an earlier run's checkpoints are moved aside); "
                                 "or a checkpoint path")
        parser.link_arguments("data.tokenizer_path", "model.tokenizer_dir", compute_fn=str, apply_on="instantiate")

    def _run_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs):
        cfg = self._run_config()
        run: RunConfig = cfg.run
        # Everything that can reject the recipe runs before anything is written (run folder, W&B run).
        check_run_recipe(run, cfg.trainer.max_steps)
        layout = RunLayout.for_run(run.name, cfg.trainer.default_root_dir)
        kwargs["default_root_dir"] = str(layout.run_dir)
        accelerator = cfg.trainer.accelerator if isinstance(cfg.trainer.accelerator, str) else "auto"
        if cfg.trainer.precision is None:
            kwargs["precision"] = resolve_precision(run.precision, accelerator)
        if isinstance(cfg.trainer.strategy, str):  # ddp | deepspeed_stage_N: DeepSpeed also on CPU
            kwargs["strategy"] = build_strategy(cfg.trainer.strategy, accelerator)
        self.ckpt_path = resolve_resume(cfg.resume, layout) if self.subcommand == "fit" else None
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(RunCheckpoint(layout.checkpoints_dir, run.checkpoint_every_n_steps,
                                           keep=run.keep_step_checkpoints))
        callbacks.append(NonFiniteGuard(run.on_nonfinite, run.max_consecutive_skips))
        kwargs["callbacks"] = callbacks
        plugins = list(kwargs.get("plugins") or [])
        if not any(isinstance(p, AtomicCheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        add_slurm_requeue(callbacks, plugins)  # no-op outside a SLURM job
        kwargs["plugins"] = plugins
        kwargs["use_distributed_sampler"] = False  # TextDataModule's sampler shards and resumes itself
        if cfg.trainer.logger in (None, True):
            # Creates nothing on disk until the first log (the W&B run folder, the stored run id).
            kwargs["logger"] = QATWandbLogger(project=run.wandb_project, name=run.name, save_dir=str(layout.run_dir),
                                              mode=run.wandb_mode, resume_run=self.ckpt_path is not None)
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "fit" and kwargs.get("ckpt_path") is None and self.ckpt_path:
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
