"""The one writer of a run's checkpoints: ``step-NNNNNN.ckpt`` every N steps (the newest ``keep`` kept) and
``last.ckpt`` — at every scheduled save and when training ends between two of them.

A second writer of ``last.ckpt`` beside Lightning's ``ModelCheckpoint`` made it version its own copies
(``last-v1.ckpt``, ...) and leave ``last.ckpt`` at an old step, which export and ``--resume auto`` then used.
"""

import re
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from qat.checkpoint.io import remove_stale_temp_files
from qat.checkpoint.layout import STEP_CHECKPOINT_PATTERN

STEP_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.ckpt$")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``<dirpath>/step-NNNNNN.ckpt`` every ``every_n_train_steps`` steps (keeping the
    ``keep`` newest) and ``<dirpath>/last.ckpt``, never a versioned copy.

    At the start of training it removes what an interrupted run of qat left in ``dirpath``: temp files of a killed
    save, and step checkpoints this callback no longer tracks (e.g. written after the checkpoint a run resumed from).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int, keep: int = 1):
        super().__init__(dirpath=dirpath, filename=STEP_CHECKPOINT_PATTERN, auto_insert_metric_name=False,
                         save_last=True, save_top_k=keep, monitor="step", mode="max",
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:
            for path in remove_stale_temp_files(self.dirpath):
                rank_zero_info(f"qat: removed {path.name}, left by an interrupted save")
            for path in self._untracked_step_checkpoints(trainer):
                rank_zero_info(f"qat: removed {path.name}, a step checkpoint no longer tracked by this run")
                trainer.strategy.checkpoint_io.remove_checkpoint(path)
        trainer.strategy.barrier("qat-checkpoint-cleanup")

    def _untracked_step_checkpoints(self, trainer) -> list[Path]:
        folder = Path(self.dirpath)
        if not folder.is_dir():
            return []
        tracked = {Path(p).resolve() for p in self.best_k_models}
        if trainer.ckpt_path:
            tracked.add(Path(trainer.ckpt_path).resolve())
        return [p for p in sorted(folder.iterdir())
                if STEP_CHECKPOINT_NAME.match(p.name) and not p.is_symlink() and p.resolve() not in tracked]

    def on_train_end(self, trainer, pl_module) -> None:
        # Training stopped between two scheduled saves (max_steps not a multiple of N): last.ckpt gets the
        # final weights, written by this callback so it stays the only writer.
        if not trainer.interrupted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
